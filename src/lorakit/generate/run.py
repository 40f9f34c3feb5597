"""Generate an image with LoRAs applied: the library function behind ``lorakit generate``.

LoRAs come from ``--lora FILE:W`` options and from ``<lora:name:w>`` tags in the prompt (resolved in a LoRA folder);
they are applied for the one run and removed afterwards, so the pipeline is left as it was, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, InputError
from lorakit.generate.apply import LoraHandle, apply_lora
from lorakit.generate.infotext import Infotext, format_infotext, lora_hashes_value, lora_short_hash
from lorakit.generate.prompt import format_lora_tag, parse_prompt, resolve_lora
from lorakit.generate.samplers import set_sampler
from lorakit.models.loading import LoadedPipeline

__all__ = ["GenerateConfig", "GenerateResult", "LoraUse", "generate_image", "parse_lora_option", "resolve_loras"]

_DEFAULT_CFG = {"sd1": 7.0, "sd2": 7.0, "sdxl": 7.0, "flux": 3.5, "sd3": 7.0}


@dataclass(frozen=True)
class LoraUse:
    """One LoRA to apply for a generation.

    Attributes:
        path: the LoRA file.
        weight: strength on the denoiser.
        text_encoder_weight: strength on the text encoders (None: ``weight``).
        blocks: block-weight spec (LBW notation), or None.
    """

    path: Path
    weight: float = 1.0
    text_encoder_weight: float | None = None
    blocks: str | None = None


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of one generation."""

    prompt: str
    """The prompt, with ``<lora:name:w>`` tags allowed."""
    negative: str = ""
    """The negative prompt."""
    steps: int = 20
    """Denoising steps."""
    cfg: float | None = None
    """Guidance scale (None: 7, or 3.5 for FLUX)."""
    seed: int = 0
    """Seed of the initial noise."""
    size: tuple[int, int] | None = None
    """(width, height) in pixels; None: the pipeline's default."""
    sampler: str | None = None
    """Sampler name (``euler``, ``euler_a``, ``ddim``, ``dpm++_2m``...); None keeps the pipeline's."""
    loras: tuple[LoraUse, ...] = ()
    """LoRAs given outside the prompt."""
    lora_dir: Path | None = None
    """Folder where prompt tags are looked up."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps {self.steps}: must be at least 1")
        if self.size is not None and (min(self.size) < 8 or any(v % 8 for v in self.size)):
            raise ConfigError(f"--size {self.size[0]}x{self.size[1]}: width and height must be multiples of 8")


@dataclass
class GenerateResult:
    """A generated image with its infotext and what was applied.

    Attributes:
        image: the PIL image.
        infotext: the A1111 ``parameters`` text for the PNG.
        loras: name -> (denoiser weight, text-encoder weight, short hash, targets applied).
    """

    image: Any
    infotext: str
    loras: dict[str, tuple[float, float, str, int]] = field(default_factory=dict)


def parse_lora_option(value: str) -> LoraUse:
    """``FILE``, ``FILE:W`` or ``FILE:W:TE_W`` from ``--lora`` (the weights are the last numeric fields)."""
    parts = value.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = Path(":".join(parts))
    if not path.is_file():
        raise InputError(f"--lora {value}: {path} is not a file; write --lora FILE.safetensors:0.8")
    weight = numbers[0] if numbers else 1.0
    te = numbers[1] if len(numbers) > 1 else None
    return LoraUse(path, weight, te)


def resolve_loras(config: GenerateConfig) -> tuple[str, list[tuple[str, LoraUse]]]:
    """The prompt text without tags and every LoRA to apply (options first, then tags), checked before any loading.

    Raises:
        ConfigError: bad prompt syntax, or a LoRA given twice.
        InputError: a name not found in the LoRA folder.
    """
    text, refs = parse_prompt(config.prompt)
    uses = [(use.path.stem, use) for use in config.loras]
    for ref in refs:
        path = resolve_lora(ref.name, config.lora_dir)
        uses.append((ref.name, LoraUse(path, ref.weight, ref.text_encoder_weight, ref.lbw)))
    names = [n for n, _ in uses]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"LoRA {', '.join(twice)} given twice (by --lora and in the prompt); give it once")
    return text, uses


def _call_kwargs(loaded: LoadedPipeline, config: GenerateConfig, text: str, cfg: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt": text,
        "num_inference_steps": config.steps,
        "guidance_scale": cfg,
        "generator": torch.Generator("cpu").manual_seed(config.seed),
    }
    if config.size is not None:
        kwargs["width"], kwargs["height"] = config.size
    if config.negative:
        kwargs["negative_prompt"] = config.negative
        if loaded.arch == "flux":
            kwargs["true_cfg_scale"] = cfg  # FLUX's guidance is distilled; a negative prompt needs true CFG
    return kwargs


def generate_image(
    loaded: LoadedPipeline,
    config: GenerateConfig,
    *,
    on_step: Callable[[int, int], None] | None = None,
    model_hash: str | None = None,
) -> GenerateResult:
    """Generate one image with the configured LoRAs, then remove them.

    Args:
        loaded: the base pipeline (``lorakit.models.load_pipeline``).
        config: prompt, sampler, LoRAs...
        on_step: called as ``on_step(done, total)`` after every denoising step (progress bars).
        model_hash: the base model's hash for the infotext (A1111's first 10 hex of the file's sha256).

    Returns:
        The image, its infotext and the applied LoRAs.

    Raises:
        ConfigError: bad prompt syntax, a bad sampler or size.
        InputError: a LoRA name not found in the LoRA folder.
        TargetError: a LoRA whose targets do not fit the model.
    """
    text, uses = resolve_loras(config)
    pipe = loaded.pipe
    cfg = _DEFAULT_CFG[loaded.arch] if config.cfg is None else config.cfg
    old_scheduler = pipe.scheduler
    handles: list[LoraHandle] = []
    applied: dict[str, tuple[float, float, str, int]] = {}
    try:
        label = set_sampler(pipe, config.sampler, loaded.arch)
        for name, use in uses:
            handle = apply_lora(
                pipe,
                use.path,
                weight=use.weight,
                text_encoder_weight=use.text_encoder_weight,
                blocks=use.blocks,
                name=name,
                arch=loaded.arch,
            )
            handles.append(handle)
            te = use.weight if use.text_encoder_weight is None else use.text_encoder_weight
            applied[name] = (use.weight, te, lora_short_hash(use.path), sum(handle.report.matched.values()))
        kwargs = _call_kwargs(loaded, config, text, cfg)
        if on_step is not None:
            kwargs["callback_on_step_end"] = _step_callback(on_step, config.steps)
        image = pipe(**kwargs).images[0]
    finally:
        for handle in handles:
            handle.remove()
        pipe.scheduler = old_scheduler
    info = _infotext(config, uses, applied, label, cfg, image.size, model_hash, loaded.source)
    return GenerateResult(image, format_infotext(info), applied)


def _step_callback(on_step: Callable[[int, int], None], total: int):
    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        on_step(step + 1, total)
        return kwargs

    return callback


def _infotext(
    config: GenerateConfig,
    uses: Sequence[tuple[str, LoraUse]],
    applied: dict,
    label: str,
    cfg: float,
    size: tuple[int, int],
    model_hash: str | None,
    source: str,
) -> Infotext:
    prompt = config.prompt
    # --lora files go into the prompt as tags too: Civitai and A1111 read LoRAs from the prompt text
    extra = [
        format_lora_tag(n, u.weight, u.text_encoder_weight, u.blocks) for n, u in uses if f"<lora:{n}" not in prompt
    ]
    if extra:
        prompt = f"{prompt} {' '.join(extra)}"
    params = {
        "Steps": str(config.steps),
        "Sampler": label,
        "CFG scale": f"{cfg:g}",
        "Seed": str(config.seed),
        "Size": f"{size[0]}x{size[1]}",
    }
    if model_hash:
        params["Model hash"] = model_hash
    params["Model"] = Path(source).stem if source != "embedded" else "embedded"
    if applied:
        params["Lora hashes"] = lora_hashes_value({n: h for n, (_, _, h, _) in applied.items()})
    from lorakit import __version__

    params["Version"] = f"lorakit {__version__}"
    return Infotext(prompt, config.negative, params)
