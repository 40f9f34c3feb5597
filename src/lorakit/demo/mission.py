"""The demo mission on the embedded base model: teach it a concept and a style with two LoRAs, and measure both.

    report = run_mission(MissionConfig(output=Path("demo-out")))

1. Writes the training data as kohya folders (PNG + .txt captions): 16 thick crosses named by the trigger word
   ``zkx``, 16 pretraining shapes on the teal palette named by ``in qvz style``, and regularization images that the
   base model draws for ordinary prompts (prior preservation; see ``lorakit.demo.datasets``).
2. Trains each LoRA with ``lorakit.train.train`` from a TOML file written beside the data (the same code path as
   ``lorakit train concept.toml``); the LoRA files are kohya format.
3. Measures with the checker (``lorakit.demo.checker``), LoRAs applied through ``lorakit.generate.apply_lora``: the
   concept score at weights 0, 0.5 and 1; the style score; how prompts without a trigger change; both LoRAs together.
4. Draws one grid through ``lorakit.generate.generate_image`` with ``<lora:name:w>`` tags, and writes report.json.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.demo import datasets
from lorakit.demo.mission_eval import Scores, TargetCheck, check_targets, evaluate
from lorakit.errors import ConfigError, OutputError
from lorakit.formats.safetensors_io import read_file
from lorakit.formats.safetensors_writer import atomic_file

__all__ = ["STAGES", "LoraSummary", "MissionConfig", "MissionReport", "check_output", "prepare_output", "run_mission"]

STAGES = ("reg images", "concept LoRA", "style LoRA", "evaluation", "grid")
"""The stages, in order, as passed to the progress callback."""
Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``."""


@dataclass(frozen=True)
class MissionConfig:
    """Sizes and settings of the demo (the defaults meet the targets in under 10 minutes on 2 CPU cores)."""

    output: Path = Path("demo-out")
    """Folder for the data, LoRAs, grid and report (created; a previous demo's output there is replaced)."""
    seed: int = 0
    """Seed of the data, training and generation."""
    model: str | None = None
    """A diffusers folder of a model pretrained like the embedded one (scripts/pretrain_tiny.py); None: embedded."""
    images: int = 16
    """Training images per LoRA."""
    repeats: int = 4
    """Sightings per epoch of each training image (the kohya ``N_`` folder prefix)."""
    reg_images: int = 64
    """Regularization images drawn by the base model (balanced to the training sightings, as kohya does)."""
    concept_steps: int = 500
    """Optimizer steps of the concept LoRA."""
    style_steps: int = 400
    """Optimizer steps of the style LoRA."""
    rank: int = 8
    """LoRA rank (attention projections of the UNet)."""
    lr: float = 2e-3
    """AdamW learning rate."""
    prior_loss_weight: float = 3.0
    """Loss weight of the regularization images (kohya's prior_loss_weight). Measured on the embedded model: at 1
    the concept LoRA cost prompts without the trigger 16 points of checker score, at 3 about 3 points."""
    batch_size: int = 16
    """Images per step (training and regularization images mixed)."""
    eval_prompts: int = 64
    """Prompts per measured setting."""
    sample_steps: int = 20
    """Denoising steps of every generated image."""
    guidance: float = 4.0
    """Classifier-free guidance scale."""
    grid_rows: int = 4
    """Rows of the grid."""

    def __post_init__(self) -> None:
        for name in ("images", "repeats", "reg_images", "concept_steps", "style_steps", "rank", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo: {name} must be at least 1, not {getattr(self, name)}")
        for name in ("eval_prompts", "sample_steps", "grid_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo: {name} must be at least 1, not {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"demo: lr must be > 0, not {self.lr}")
        if self.prior_loss_weight < 0:
            raise ConfigError(f"demo: prior_loss_weight must be >= 0, not {self.prior_loss_weight}")

    @classmethod
    def quick(cls, output: Path, seed: int = 0, steps: int = 2) -> MissionConfig:
        """A reduced run for tests: a few images and steps, two prompts per setting, a one-row grid."""
        return cls(
            output=output,
            seed=seed,
            images=4,
            repeats=1,
            reg_images=4,
            concept_steps=steps,
            style_steps=steps,
            batch_size=4,
            eval_prompts=2,
            sample_steps=2,
            grid_rows=1,
        )


@dataclass
class LoraSummary:
    """One trained LoRA."""

    name: str
    trigger: str
    file: str
    bytes: int
    steps: int
    seconds: float
    """Wall time of ``train()``: loading, caching and the loop."""
    seconds_per_step: float
    train_images: int
    """Training images per epoch (repeats counted)."""
    reg_images: int
    """Regularization images per epoch."""
    first_loss: float
    last_loss: float


@dataclass
class MissionReport:
    """Everything the demo measured (``report.json``)."""

    output: str
    grid: str
    seconds: float
    stage_seconds: dict[str, float]
    loras: list[LoraSummary]
    scores: Scores
    targets: list[TargetCheck]
    grid_prompts: list[list[str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def all_targets_met(self) -> bool:
        return all(t.met for t in self.targets)


def check_output(folder: Path) -> None:
    """Refuse an output folder that is a file, or a non-empty folder that holds no earlier demo's report."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; give a folder for the demo output with -o")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "report.json").is_file():
        raise OutputError(
            f"{folder}: the folder is not empty and holds no demo report; choose a new folder with -o "
            "(the demo replaces only its own output)"
        )


def prepare_output(folder: Path) -> Path:
    """Create the output folder, or clear a previous demo's output in it; refuse any other non-empty folder."""
    check_output(folder)
    for name in ("data", "concept", "style"):
        shutil.rmtree(folder / name, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _toml_config(config: MissionConfig, name: str, data: str, steps: int, trigger: str) -> str:
    """The ``lorakit train`` config of one LoRA (paths relative to the output folder)."""
    model = [] if config.model is None else ["[model]", f"path = {json.dumps(str(Path(config.model).resolve()))}", ""]
    return "\n".join(
        [
            f"# lorakit train {name}.toml: the demo's {name} LoRA on the embedded base model",
            *model,
            "[dataset]",
            "resolution = 32",
            "min_bucket_reso = 32",
            "max_bucket_reso = 64",
            "bucket_reso_steps = 32",
            "",
            "[[dataset.folders]]",
            f'path = "{data}"',
            "",
            "[[dataset.folders]]  # prior preservation: the base model's own images for ordinary prompts",
            'path = "data/reg"',
            "is_reg = true",
            "",
            "[network]",
            f"rank = {config.rank}",
            'targets = "attention"',
            "",
            "[optimizer]",
            f"lr = {config.lr!r}",
            "",
            "[training]",
            f"steps = {steps}",
            f"batch_size = {config.batch_size}",
            f"seed = {config.seed}",
            f"prior_loss_weight = {config.prior_loss_weight!r}",
            "",
            "[save]",
            f'output_dir = "{name}"',
            f'name = "{name}"',
            f'trigger = "{trigger}"',
            "",
        ]
    )


def _train_lora(
    config: MissionConfig, name: str, data: str, steps: int, trigger: str, progress: Progress | None
) -> LoraSummary:
    from lorakit.train import load_config, train

    out = config.output
    toml = out / f"{name}.toml"
    toml.write_text(_toml_config(config, name, data, steps, trigger), encoding="utf-8")
    stage = f"{name} LoRA"

    def on_step(step: int, total: int, loss: float, smoothed: float) -> None:
        if progress is not None:
            progress(stage, step, total)

    started = time.perf_counter()
    result = train(load_config(toml), base_dir=out, progress=on_step)
    seconds = time.perf_counter() - started
    _, meta = read_file(result.output)
    return LoraSummary(
        name=name,
        trigger=trigger,
        file=str(result.output),
        bytes=result.output.stat().st_size,
        steps=result.steps,
        seconds=seconds,
        seconds_per_step=result.seconds_per_step,
        train_images=int(meta.get("ss_num_train_images", 0)),
        reg_images=int(meta.get("ss_num_reg_images", 0)),
        first_loss=result.losses[0] if result.losses else float("nan"),
        last_loss=result.losses[-1] if result.losses else float("nan"),
    )


def _write_data(config: MissionConfig, pipe: Any, progress: Callable[[int, int], None]) -> None:
    """The three kohya folders under ``output/data``: concept, style and regularization images."""
    out, n, seed = config.output / "data", config.images, config.seed
    concept = out / "concept" / f"{config.repeats}_{datasets.TRIGGER}"
    datasets.write_spec_folder(concept, datasets.concept_specs(n, seed), datasets.concept_caption)
    style = out / "style" / f"{config.repeats}_qvz style"
    datasets.write_spec_folder(style, datasets.style_specs(n, seed + 2), datasets.style_caption)
    reg = out / "reg" / "1_shape"
    steps, guidance = config.sample_steps, config.guidance
    datasets.write_reg_folder(reg, pipe, config.reg_images, seed + 1, steps=steps, guidance=guidance, progress=progress)


def run_mission(config: MissionConfig, progress: Progress | None = None) -> MissionReport:
    """Run the whole demo and write its files into ``config.output``.

    Args:
        config: sizes and settings.
        progress: called as ``progress(stage, done, total)``; stages are :data:`STAGES`.

    Returns:
        The report, also written to ``report.json`` in the output folder.
    """
    from lorakit.models import load_pipeline

    started = time.perf_counter()
    out = prepare_output(config.output)
    loaded = load_pipeline(config.model)
    seconds: dict[str, float] = {}

    def stage(name: str) -> Callable[[int, int], None]:
        seconds[name] = time.perf_counter()  # replaced by the stage's duration below
        return lambda done, total: progress(name, done, total) if progress is not None else None

    def done(name: str) -> None:
        seconds[name] = time.perf_counter() - seconds[name]

    _write_data(config, loaded.pipe, stage("reg images"))
    done("reg images")
    loras = []
    for name, data, steps, trigger in (
        ("concept", "data/concept", config.concept_steps, datasets.TRIGGER),
        ("style", "data/style", config.style_steps, datasets.STYLE_PHRASE),
    ):
        stage(f"{name} LoRA")
        loras.append(_train_lora(config, name, data, steps, trigger, progress))
        done(f"{name} LoRA")
    files = [Path(lora.file) for lora in loras]
    scores = evaluate(loaded.pipe, files[0], files[1], config, stage("evaluation"))
    done("evaluation")
    grid, prompts = _grid(loaded, config, stage("grid"))
    done("grid")
    report = MissionReport(
        output=str(out),
        grid=str(grid),
        seconds=time.perf_counter() - started,
        stage_seconds=seconds,
        loras=loras,
        scores=scores,
        targets=check_targets(scores),
        grid_prompts=prompts,
        settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    )
    _write_report(out / "report.json", report)
    return report


def _grid(loaded: Any, config: MissionConfig, progress: Callable[[int, int], None]) -> tuple[Path, list[list[str]]]:
    from lorakit.demo.grid import grid_columns, render_grid

    specs = datasets.concept_specs(config.grid_rows, config.seed + 21)
    return render_grid(
        loaded,
        specs,
        grid_columns("concept", "style"),
        config.output / "grid.png",
        lora_dir=config.output,
        seed=config.seed + 21,
        steps=config.sample_steps,
        guidance=config.guidance,
        progress=progress,
    )


def _write_report(path: Path, report: MissionReport) -> None:
    data = asdict(report)
    data["all_targets_met"] = report.all_targets_met
    with atomic_file(path) as (file, _):
        file.write((json.dumps(data, indent=2) + "\n").encode("utf-8"))
