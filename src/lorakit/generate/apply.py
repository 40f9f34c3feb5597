"""Apply LoRA files to a diffusers pipeline (or any module) at run time, with weights, block weights and handles.

    handle = apply_lora(pipe, "style.safetensors", weight=0.8, blocks="MIDD")
    handle.set_weight(0.5)            # O(1) in dynamic mode: one number shared by every adapted layer
    handle.remove()                   # the pipeline is the original again, bit for bit

Each LoRA becomes one adapter name on every component it touches (denoiser and text encoders). The strength of a
module is ``weight`` (``text_encoder_weight`` on text encoders) times its block multiplier:
``W' = W + weight * m_block * dW``. Dynamic mode adds ``s * B (A x)`` in the forward pass (quantized or offloaded
bases stay untouched); fused mode folds the delta into the weight in fp32 and keeps the original for unfusing.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.core.attach import adapter_for, check_lora_fits, check_patch_fits, new_state, wrap
from lorakit.core.model import AdapterHandle, fuse, unfuse
from lorakit.core.patches import LoraPatch, Patch
from lorakit.errors import ConfigError, TargetError
from lorakit.formats.canonical import COMPONENTS, LoraFile, Target
from lorakit.formats.lora_io import load_lora
from lorakit.generate.targets import place_targets

__all__ = ["ApplyReport", "LoraHandle", "apply_lora", "lora_components"]

_TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")
_MODES = ("dynamic", "fused")


@dataclass
class ApplyReport:
    """What one ``apply_lora`` matched.

    Attributes:
        name: the adapter name.
        matched: targets applied, per component (counts).
        unmatched: targets that matched no module (only with ``strict=False``), as ``component.module`` strings.
    """

    name: str
    matched: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


def lora_components(pipe_or_module: Any) -> dict[str, nn.Module]:
    """The adaptable components of a pipeline by diffusers name, or ``{"unet": module}`` for a bare module."""
    if isinstance(pipe_or_module, nn.Module):
        return {"unet": pipe_or_module}
    found = {}
    for name in COMPONENTS:
        module = getattr(pipe_or_module, name, None)
        if isinstance(module, nn.Module):
            found[name] = module
    if not found:
        raise TargetError(f"{type(pipe_or_module).__name__} has no unet, transformer or text encoder to adapt")
    return found


def _pipeline_arch(components: Mapping[str, nn.Module]) -> str | None:
    from lorakit.models.loading import arch_of_components

    return arch_of_components(components)


class LoraHandle:
    """One applied LoRA: change its weights or blocks, switch it off, fuse it, remove it.

    Attributes:
        name: the adapter name (unique per pipeline).
        lora: the canonical LoRA.
        report: what matched.
    """

    def __init__(
        self,
        name: str,
        lora: LoraFile,
        arch: str | None,
        handles: dict[str, AdapterHandle],
        targets: dict[str, dict[str, Target]],
        report: ApplyReport,
    ) -> None:
        self.name = name
        self.lora = lora
        self.arch = arch
        self.report = report
        self._handles = handles
        self._targets = targets  # component -> runtime module name -> the canonical target it came from
        self.weight = 1.0
        self.text_encoder_weight: float | None = None
        self.blocks: Any = None
        self.fused = False

    def set_weight(self, weight: float, text_encoder_weight: float | None = None) -> None:
        """Set the strength: ``weight`` on the denoiser, ``text_encoder_weight`` (None: ``weight``) on text encoders."""
        self.weight, self.text_encoder_weight = float(weight), text_encoder_weight
        te = float(weight if text_encoder_weight is None else text_encoder_weight)
        for component, handle in self._handles.items():
            handle.set_weight(te if component in _TEXT else self.weight)

    def set_blocks(self, blocks: Mapping[str, float] | str | None) -> None:
        """Set block weights: ``{"IN04": 0.5, ...}`` (unnamed blocks 1), an LBW spec (``"MIDD"``, 17 numbers...), or
        None for 1 everywhere. Block ids are ``lorakit.arch.blocks.block_of``'s."""
        multiplier = _block_multiplier(blocks, self.arch)
        # every multiplier first: a bad spec or an unplaceable module must leave the old blocks in force
        table = {c: {m: multiplier(t) for m, t in self._targets[c].items()} for c in self._handles}
        for component, handle in self._handles.items():
            handle.set_multipliers(table[component])
        self.blocks = blocks

    def enable(self) -> None:
        """Switch the LoRA on (its weight acts again)."""
        for handle in self._handles.values():
            handle.enable()

    def disable(self) -> None:
        """Switch the LoRA off without removing it."""
        for handle in self._handles.values():
            handle.disable()

    def fuse(self) -> None:
        """Fold the LoRA into the base weights (fp32, one cast); weight changes then recompute the fused weights."""
        for handle in self._handles.values():
            handle.fuse()
        self.fused = True

    def unfuse(self) -> None:
        """Back to dynamic mode; the base weights are restored bit for bit (other fused LoRAs are refolded)."""
        for component, handle in self._handles.items():
            others = _fused_names(handle.model) - {self.name}
            unfuse(handle.model)
            if others:
                fuse(handle.model, sorted(others))
        self.fused = False

    def remove(self) -> None:
        """Take the LoRA off every component; with every LoRA removed the model is the original, bit for bit."""
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}

    def __repr__(self) -> str:
        return f"LoraHandle({self.name!r}, weight={self.weight}, components={list(self._handles)})"


def _fused_names(model: nn.Module) -> set[str]:
    from lorakit.core.attach import adapted_layers

    return {n for _, layer in adapted_layers(model) for n in layer.fused}


def _block_multiplier(blocks: Mapping[str, float] | str | None, arch: str | None):
    if blocks is None:
        return lambda target: 1.0
    if isinstance(blocks, str):
        from lorakit.ops.blocks import parse_block_weights

        if arch is None:
            raise ConfigError("block weights need the base model's architecture; pass arch= to apply_lora")
        parsed = parse_block_weights(blocks, arch)
        return parsed.multiplier
    table = {str(k): float(v) for k, v in blocks.items()}

    def multiplier(target: Target) -> float:
        from lorakit.arch import block_of

        if arch is None:
            raise ConfigError("block weights need the base model's architecture; pass arch= to apply_lora")
        try:
            return table.get(block_of(arch, target.component, target.module), 1.0)
        except KeyError:
            raise ConfigError(f"blocks: {target} is not a module of {arch}, so it has no block") from None

    return multiplier


def _read(lora: str | os.PathLike[str] | LoraFile, arch: str | None, components: Mapping[str, nn.Module]) -> LoraFile:
    if isinstance(lora, LoraFile):
        return lora
    # the live modules place names that the bundled full-size tables cannot (tiny or custom models)
    return load_lora(lora, arch=arch, modules=dict(components))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: wrapping thousands of layers of a big model otherwise triggers full
    collections that walk every object of the model, which costs more than the attaching itself."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _attach_all(
    components: Mapping[str, nn.Module],
    placed: dict,
    name: str,
    handles: dict[str, AdapterHandle],
    targets: dict[str, dict[str, Target]],
) -> None:
    with _gc_paused():
        for component, items in placed.items():
            patches: dict[str, Patch] = {module: patch for module, (_, patch) in items.items()}
            handles[component] = _attach(components[component], patches, name)
            targets[component] = {module: target for module, (target, _) in items.items()}


def _attach(model: nn.Module, patches: dict[str, Patch], name: str) -> AdapterHandle:
    """``attach_patches`` with a cheaper fit check for plain LoRAs on Linear / Conv2d: their factor shapes decide
    the fit exactly, so the delta need not be traced (on the meta device) for each of a big model's layers."""
    layers = {n: m for n, m in model.named_modules() if n in patches}
    missing = [n for n in patches if n not in layers]
    if missing:
        raise TargetError(f"{len(missing)} adapter targets are not modules of {type(model).__name__}: {missing[:5]}")
    for module, patch in patches.items():
        layer = getattr(layers[module], "base_layer", layers[module])
        if isinstance(patch, LoraPatch) and patch.dora is None and isinstance(layer, (nn.Linear, nn.Conv2d)):
            check_lora_fits(layer, patch, module)
        else:
            check_patch_fits(layer, patch, module)
    state = new_state(model, name, 1.0, False)
    for module, patch in patches.items():
        wrap(model, module).add(name, adapter_for(state, patch))
    return AdapterHandle(model, name, list(patches))


def apply_lora(
    pipe_or_module: Any,
    lora: str | os.PathLike[str] | LoraFile,
    *,
    weight: float = 1.0,
    text_encoder_weight: float | None = None,
    blocks: Mapping[str, float] | str | None = None,
    name: str | None = None,
    mode: str = "dynamic",
    strict: bool = True,
    arch: str | None = None,
) -> LoraHandle:
    """Apply a LoRA to a diffusers pipeline's denoiser and text encoders (or to a bare module, as ``unet``).

    Args:
        pipe_or_module: a diffusers pipeline (SD1, SD2, SDXL, FLUX, SD3) or an ``nn.Module``.
        lora: a LoRA file in any dialect, or a loaded ``LoraFile``.
        weight: strength ``s`` on the denoiser: ``W' = W + s * m_block * dW``.
        text_encoder_weight: strength on the text encoders (default: ``weight``).
        blocks: block weights: ``{"IN04": 0.5}`` (other blocks 1) or an LBW spec string (``"MIDD"``, 17 numbers).
        name: the adapter name (default: the file stem; must be new on this pipeline).
        mode: ``dynamic`` (adds ``s * B(Ax)`` per forward; any base) or ``fused`` (folds into the weights).
        strict: unmatched targets are an error listing them; with False they are skipped and listed in the report.
        arch: the base model's architecture; detected from the pipeline when None.

    Returns:
        A ``LoraHandle``.

    Raises:
        TargetError: targets that match no module (strict), or a pipeline without adaptable components.
        ShapeError: a patch that does not fit its module.
        ConfigError: an unknown mode or bad block weights.
    """
    if mode not in _MODES:
        raise ConfigError(f"mode {mode!r}: use one of {', '.join(_MODES)}")
    components = lora_components(pipe_or_module)
    arch = arch or _pipeline_arch(components)
    with _gc_paused():
        lora_file = _read(lora, arch, components)
        placed, unmatched = place_targets(lora_file.patches, components)
    name = name or (Path(lora).stem if not isinstance(lora, LoraFile) else "lora")
    if unmatched and strict:
        shown = ", ".join(unmatched[:8]) + (f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else "")
        raise TargetError(
            f"{name}: {len(unmatched)} of {len(lora_file.patches)} targets match no module of the "
            f"pipeline: {shown}; is it a LoRA for another base model? pass strict=False to apply the rest"
        )
    report = ApplyReport(name, {c: len(p) for c, p in placed.items()}, unmatched)
    handles: dict[str, AdapterHandle] = {}
    targets: dict[str, dict[str, Target]] = {}
    try:
        _attach_all(components, placed, name, handles, targets)
    except BaseException:
        for handle in handles.values():
            handle.remove()
        raise
    handle = LoraHandle(name, lora_file, arch, handles, targets, report)
    handle.set_weight(weight, text_encoder_weight)
    if blocks is not None:
        handle.set_blocks(blocks)
    if mode == "fused":
        handle.fuse()
    return handle
