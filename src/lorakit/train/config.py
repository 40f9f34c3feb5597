"""Training configuration: frozen dataclasses, one per TOML table, checked on construction.

    [model]      path, arch, prediction
    [dataset]    passed to lorakit.train.data.DatasetConfig as it is
    [network]    rank, alpha, dropout, targets, conv_rank, text encoder training
    [optimizer]  name, lr, schedule, warmup, weight decay, clipping
    [training]   steps, batch size, accumulation, seed, precision, checkpointing, noise and timestep options
    [save]       output folder, name, how often, dtype, trigger phrase
    [sample]     prompts and how often to draw them

A top-level ``preset = "sdxl-8gb"`` applies a preset first; the file's values override it, and command-line flags
override the file (``load_config(path, overrides)``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "ModelConfig",
    "NetworkConfig",
    "OptimizerConfig",
    "SampleConfig",
    "SaveConfig",
    "TrainConfig",
    "TrainingConfig",
    "config_from_dict",
    "load_config",
]

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "lion")
SCHEDULES = ("constant", "linear", "cosine")
PREDICTIONS = ("auto", "epsilon", "v_prediction", "flow")
PRECISIONS = ("auto", "no", "fp16", "bf16")
TARGET_PRESETS = ("attention", "attention-mlp", "all")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
SAVE_DTYPES = ("fp32", "fp16", "bf16")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(choices)}")


def _check_positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {value}")


@dataclass(frozen=True)
class ModelConfig:
    """The base model to train on."""

    path: str | None = None
    """A diffusers folder or a single-file checkpoint; None trains on the embedded tiny model shipped with lorakit."""
    arch: str | None = None
    """sd1, sd2, sdxl, flux or sd3; None detects it from the files."""
    prediction: str = "auto"
    """epsilon, v_prediction or flow; auto reads the model's scheduler (flow for FLUX and SD3)."""

    def __post_init__(self) -> None:
        _check_choice("model.prediction", self.prediction, PREDICTIONS)


@dataclass(frozen=True)
class NetworkConfig:
    """The LoRA to train."""

    rank: int = 16
    """Rank of the Linear (and 1x1 conv) adapters."""
    alpha: float | None = None
    """Scale numerator; None means alpha = rank (scale 1): dim 4 / alpha 1 style defaults barely train."""
    dropout: float = 0.0
    """Dropout on each adapter's input."""
    targets: str = "attention-mlp"
    """attention, attention-mlp (attention and feed-forward), or all (every Linear and conv: LoCon with conv_rank)."""
    conv_rank: int | None = None
    """Rank of the k x k conv adapters with targets = all; None leaves k x k convs out."""
    conv_alpha: float | None = None
    """Alpha of the conv adapters; None means conv_alpha = conv_rank."""
    train_text_encoder: bool = False
    """Also train LoRAs on the text encoders (CLIP ones; never T5)."""
    text_encoder_lr: float | None = None
    """Learning rate of the text encoder LoRAs; None uses the optimizer's lr."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"network.rank must be at least 1, not {self.rank}")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise ConfigError(f"network.conv_rank must be at least 1, not {self.conv_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"network.dropout must be in [0, 1), not {self.dropout}")
        _check_positive("network.alpha", self.alpha)
        _check_positive("network.conv_alpha", self.conv_alpha)
        _check_positive("network.text_encoder_lr", self.text_encoder_lr, allow_zero=True)
        _check_choice("network.targets", self.targets, TARGET_PRESETS)


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw"
    """adamw, adamw8bit (needs bitsandbytes), prodigy (lr about 1.0) or lion (lr about 3-10x smaller than AdamW's)."""
    lr: float = 1e-4
    """Peak learning rate of the denoiser LoRA."""
    weight_decay: float = 1e-2
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Moment coefficients (Lion: interpolation and momentum coefficients, e.g. 0.9, 0.99)."""
    eps: float = 1e-8
    """Denominator term of AdamW and Prodigy."""
    schedule: str = "constant"
    """constant, linear (to zero) or cosine (to zero), after the warmup."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from zero."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this; None does not clip."""

    def __post_init__(self) -> None:
        _check_choice("optimizer.name", self.name, OPTIMIZERS)
        _check_choice("optimizer.schedule", self.schedule, SCHEDULES)
        _check_positive("optimizer.lr", self.lr)
        _check_positive("optimizer.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("optimizer.max_grad_norm", self.max_grad_norm)
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, not {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), not {list(self.betas)}")


@dataclass(frozen=True)
class TrainingConfig:
    """The loop."""

    steps: int = 1000
    """Optimizer steps in all (each one sees batch_size x gradient_accumulation images)."""
    batch_size: int = 1
    """Images per forward pass (per process with several processes: the global batch is this x processes)."""
    gradient_accumulation: int = 1
    """Forward passes per optimizer step."""
    seed: int = 0
    """Seed of the adapters' init, data order, noise and timesteps."""
    mixed_precision: str = "auto"
    """no, fp16 or bf16 (GPU only); auto is bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, about 30% slower."""
    lean_activations: bool = True
    """Frozen convolutions and GEGLUs keep only what the gradient needs (exact, no time cost; lorakit.train.lean)."""
    cache_latents: bool = True
    """Encode each image once (when flips and random crops are off) and drop the VAE from the step."""
    cache_text: bool = True
    """Encode each caption once when the text encoders are frozen."""
    cache_dir: str | None = None
    """Keep the caches on disk in this folder; None keeps them in memory."""
    min_snr_gamma: float | None = None
    """Min-SNR loss weighting (5 is usual) for epsilon and v-prediction; None weights every timestep the same."""
    prior_loss_weight: float = 1.0
    """Loss weight of regularization (``is_reg``) images against training images, as kohya's prior_loss_weight."""
    noise_offset: float = 0.0
    """Add this times per-channel constant noise (helps very dark and bright images); 0.05-0.1 is usual."""
    timestep_sampling: str = "logit_normal"
    """Flow matching: uniform, logit_normal or mode (SD3 paper); SD1/SD2/SDXL always sample uniformly."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal timestep density."""
    mode_scale: float = 1.29
    """Scale of the mode density."""
    flow_shift: float | None = None
    """Flow-matching shift of the noise levels; None uses the model's scheduler (FLUX: shifted by resolution)."""
    guidance_scale: float = 1.0
    """Guidance value fed to FLUX-dev's guidance embedding during training."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "gradient_accumulation"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be at least 1, not {getattr(self, name)}")
        _check_choice("training.mixed_precision", self.mixed_precision, PRECISIONS)
        _check_choice("training.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        _check_positive("training.min_snr_gamma", self.min_snr_gamma)
        _check_positive("training.noise_offset", self.noise_offset, allow_zero=True)
        _check_positive("training.prior_loss_weight", self.prior_loss_weight, allow_zero=True)
        _check_positive("training.logit_std", self.logit_std)
        _check_positive("training.flow_shift", self.flow_shift)


@dataclass(frozen=True)
class SaveConfig:
    """What is written, where and how often."""

    output_dir: str = "output"
    """Folder for the LoRA files, training states, loss log and plot."""
    name: str = "lora"
    """File name stem: NAME.safetensors at the end, NAME-step000100.safetensors on the way."""
    every_steps: int | None = None
    """Save (and keep a training state) every this many steps."""
    every_epochs: int | None = None
    """Save every this many epochs."""
    dtype: str = "fp16"
    """Weights dtype in the file: fp16 (A1111 and ComfyUI default), bf16 or fp32."""
    trigger: str = ""
    """Trigger phrase recorded in modelspec.trigger_phrase."""
    absolute_paths: bool = False
    """Record absolute dataset and model paths in the metadata (off: only folder names, which leak nothing)."""
    keep_states: int = 2
    """Training states to keep (older ones are deleted); the last LoRA files are all kept."""

    def __post_init__(self) -> None:
        _check_choice("save.dtype", self.dtype, SAVE_DTYPES)
        for name in ("every_steps", "every_epochs"):
            _check_positive(f"save.{name}", getattr(self, name))
        if not self.name or "/" in self.name or "\\" in self.name:
            raise ConfigError(f"save.name = {self.name!r} must be a plain file name stem, like 'my_style'")
        if self.keep_states < 1:
            raise ConfigError(f"save.keep_states must be at least 1, not {self.keep_states}")


@dataclass(frozen=True)
class SampleConfig:
    """Sample images drawn during training with the same code that applies LoRAs for generation."""

    prompts: tuple[str, ...] = ()
    """Prompts to draw; none draws nothing."""
    every_steps: int | None = None
    """Draw every this many steps (and at the end); None draws only at the end when prompts are given."""
    steps: int = 20
    """Denoising steps per image."""
    guidance_scale: float = 7.0
    """Classifier-free guidance scale."""
    width: int | None = None
    """Image width; None uses the dataset resolution."""
    height: int | None = None
    """Image height; None uses the dataset resolution."""
    seed: int = 0
    """Seed of the first prompt (the next get seed + 1, ...), so samples of different steps compare."""

    def __post_init__(self) -> None:
        _check_positive("sample.every_steps", self.every_steps)
        if self.steps < 1:
            raise ConfigError(f"sample.steps must be at least 1, not {self.steps}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; ``load_config`` reads it from TOML."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: Mapping[str, Any] = field(default_factory=dict)
    """The [dataset] table, given to lorakit.train.data.DatasetConfig."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    preset: str | None = None
    """The preset applied under the file's values (see lorakit.train.presets)."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "network": NetworkConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "save": SaveConfig,
    "sample": SampleConfig,
}

_TUPLES = {("optimizer", "betas"), ("sample", "prompts")}


def _section(name: str, table: Mapping[str, Any], where: str) -> Any:
    cls = SECTIONS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} in [{name}]; known keys: {', '.join(sorted(known))}")
    values = {k: tuple(v) if (name, k) in _TUPLES and isinstance(v, list) else v for k, v in table.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{where}: [{name}] {err}") from None


def merge_tables(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, one level of tables deep (a table's keys override key by key)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def config_from_dict(data: Mapping[str, Any], *, where: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested tables (a parsed TOML file), applying its ``preset`` first.

    Raises:
        ConfigError: an unknown table or key, a wrong type, or a value out of range (named with ``where``).
    """
    from lorakit.train.presets import preset_tables

    preset = data.get("preset")
    tables = merge_tables(preset_tables(preset), data) if preset else dict(data)
    unknown = sorted(set(tables) - set(SECTIONS) - {"dataset", "preset"})
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {unknown}; known: {', '.join(sorted([*SECTIONS, 'dataset']))}")
    for key in SECTIONS:
        if key in tables and not isinstance(tables[key], Mapping):
            raise ConfigError(f"{where}: {key} must be a table ([{key}]), not {type(tables[key]).__name__}")
    sections = {name: _section(name, tables.get(name, {}), where) for name in SECTIONS}
    dataset = tables.get("dataset", {})
    if not isinstance(dataset, Mapping):
        raise ConfigError(f"{where}: dataset must be a table ([dataset])")
    return TrainConfig(dataset=dict(dataset), preset=preset, **sections)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a one-line error naming the file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: no such config file; give a TOML file such as train.toml")
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: not valid TOML ({err}); fix the line it names") from None


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a TOML config (or start empty with None) and apply ``overrides``, dotted keys such as
    ``{"training.steps": 500, "network.rank": 8}``; a value of None leaves the file's value."""
    data = read_toml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        if dotted == "preset":
            data["preset"] = value
            continue
        table, _, key = dotted.partition(".")
        section = data.setdefault(table, {})
        if table == "dataset" and key in ("path", "config", "folders"):
            for source in ("path", "config", "folders"):  # a new data source replaces the file's
                section.pop(source, None)
        section[key] = value
    return config_from_dict(data, where=str(path) if path is not None else "flags")
