"""Coverage: how a LoRA maps onto a base model, target by target, with every shape checked.

    model = model_for_arch("sdxl")                      # or model_for_modules({"unet": unet}), model_for_checkpoint(p)
    lora = load_for_model("style.safetensors", model)   # refuses a LoRA made for another architecture
    report = coverage(lora, model)
    report.matched_percent, report.unmatched, report.blocks

A target *matches* when the model has the module and the patch's delta has the module's weight shape (checked on the
meta device: no memory, no arithmetic). Everything else is listed with its reason. Untouched modules are the model's
Linear and conv weights that no target reaches, counted by block (``IN04``, ``D07``... for the known architectures).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core.patches import Patch
from lorakit.errors import LorakitError, ShapeError, TargetError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import load_lora, module_shapes

__all__ = [
    "BlockCoverage",
    "CoverageReport",
    "ModelTables",
    "Unmatched",
    "block_name",
    "coverage",
    "detect_file_arch",
    "load_for_model",
    "model_for_arch",
    "model_for_checkpoint",
    "model_for_modules",
    "patch_misfit",
    "require_same_arch",
]

ADAPTABLE = ("linear", "conv")
"""Module kinds a LoRA usually adapts; the untouched count is over these."""


@dataclass(frozen=True)
class ModelTables:
    """A base model as coverage needs it: module tables and kinds per component.

    Attributes:
        name: how messages name the model (an architecture name or a path).
        arch: its architecture family (``sd1`` ... ``sd3``), or None for a custom model.
        variant: the released model when known (``flux-schnell``), else None.
        tables: component -> module name -> weight shape.
        kinds: component -> module name -> ``linear``, ``conv``, ``norm``, ``embedding`` or ``other``.
        concrete: True for a real model (its own names place the LoRA's keys), False for an architecture's tables.
    """

    name: str
    arch: str | None
    variant: str | None
    tables: dict[str, dict[str, tuple[int, ...]]]
    kinds: dict[str, dict[str, str]]
    concrete: bool


@dataclass(frozen=True)
class Unmatched:
    """A target the model cannot take. ``reason``: ``no such component``, ``no such module`` or ``wrong shape: ...``."""

    target: str
    reason: str


@dataclass(frozen=True)
class BlockCoverage:
    """Adaptable modules of one block: how many a target reaches (``touched``) and how many it does not."""

    block: str
    touched: int
    untouched: int


@dataclass
class CoverageReport:
    """How a LoRA maps onto a model.

    Attributes:
        model: the model's name.
        arch: the model's architecture, or None.
        matched: targets that fit their module, shape checked.
        unmatched: targets that do not, with the reason.
        skipped_keys: file keys the reader could not place at all.
        blocks: adaptable modules per block, touched and untouched, in model order.
        matched_percent: 100 * matched / all targets (100 when every target fits).
        modules_percent: 100 * touched / adaptable modules of the model (how much of the model the LoRA reaches).
    """

    model: str
    arch: str | None
    matched: list[str] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)
    blocks: list[BlockCoverage] = field(default_factory=list)
    matched_percent: float = 100.0
    modules_percent: float = 0.0

    @property
    def untouched(self) -> int:
        """Adaptable modules no target reaches."""
        return sum(b.untouched for b in self.blocks)


# -- building the model's tables ---------------------------------------------------------------------------------


def model_for_arch(arch: str) -> ModelTables:
    """The bundled tables of an architecture (its default variant) or a variant.

    Raises:
        LorakitError: unknown architecture; the message lists the known ones.
    """
    from lorakit.arch import registry, tables

    try:
        variant = registry.resolve_variant(arch)
    except KeyError as exc:
        raise LorakitError(str(exc).strip("'\"") + "; pass one of those to --arch") from None
    info = registry.VARIANTS[variant]
    shapes = {c: dict(tables.module_table(variant, c)) for c in info.components}
    kinds = {c: {m: i.kind for m, i in tables.module_info(variant, c).items()} for c in info.components}
    return ModelTables(arch, info.arch, variant, shapes, kinds, concrete=False)


def _kind_of_module(module: nn.Module, shape: tuple[int, ...]) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if len(shape) == 1:
        return "norm"
    return _kind_of_shape(shape)


def _kind_of_shape(shape: tuple[int, ...]) -> str:
    return "linear" if len(shape) == 2 else "conv" if len(shape) > 2 else "norm"


def _components_of(model: Any) -> Mapping[str, Any]:
    if isinstance(model, Mapping):
        return model
    parts = getattr(model, "components", None)  # a diffusers pipeline
    if isinstance(parts, Mapping):
        return {k: v for k, v in parts.items() if isinstance(v, nn.Module)}
    raise TypeError("model must map component names to nn.Modules or module tables, or be a diffusers pipeline")


def model_for_modules(model: Any, *, arch: str | None = None, name: str = "the model") -> ModelTables:
    """Tables of a concrete model: ``{"unet": module_or_table, ...}`` or a diffusers pipeline (its ``components``).

    Args:
        model: component -> ``nn.Module`` or ``{module name: weight shape}``, or an object with ``components``.
        arch: the model's architecture or variant when known (enables block ids and the architecture check).
        name: how messages name the model.
    """
    from lorakit.arch.registry import arch_of

    tables: dict[str, dict[str, tuple[int, ...]]] = {}
    kinds: dict[str, dict[str, str]] = {}
    for component, part in _components_of(model).items():
        if isinstance(part, nn.Module):
            tables[component] = module_shapes(part)
            named = dict(part.named_modules())
            kinds[component] = {m: _kind_of_module(named[m], s) for m, s in tables[component].items()}
        else:
            tables[component] = {m: tuple(s) for m, s in part.items()}
            kinds[component] = {m: _kind_of_shape(s) for m, s in tables[component].items()}
    family = arch_of(arch) if arch else None
    return ModelTables(name, family, arch if arch and arch != family else None, tables, kinds, concrete=True)


def model_for_checkpoint(
    path: str | os.PathLike[str], *, arch: str | None = None, allow_pickle: bool = False
) -> ModelTables:
    """Tables of a base-model checkpoint (single file or diffusers folder), read from its header only.

    Kinds come from the architecture's bundled tables where the module is known, else from the weight's rank.
    """
    from lorakit.arch import tables as arch_tables
    from lorakit.formats.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(path, arch=arch, allow_pickle=allow_pickle)
    try:
        shapes = {c: dict(checkpoint.shapes(c)) for c in checkpoint.components()}
        family = checkpoint.arch
    finally:
        checkpoint.close()
    kinds: dict[str, dict[str, str]] = {}
    for component, table in shapes.items():
        try:
            known = {m: i.kind for m, i in arch_tables.module_info(arch or family, component).items()}
        except KeyError:
            known = {}
        kinds[component] = {m: known.get(m, _kind_of_shape(s)) for m, s in table.items()}
    variant = arch if arch and arch != family else None
    return ModelTables(str(path), family, variant, shapes, kinds, concrete=True)


# -- the architecture check and loading ----------------------------------------------------------------------------


def detect_file_arch(path: str | os.PathLike[str]) -> tuple[str | None, str]:
    """What architecture a LoRA file says it is for, from its header only: ``(family or None, reason)``."""
    from lorakit.formats.dialects.detect import detect_arch
    from lorakit.formats.dialects.peft import is_peft_folder
    from lorakit.formats.safetensors_reader import SafetensorsReader

    file = Path(path)
    if file.is_dir() and is_peft_folder(file):
        return None, "unknown: a PEFT folder"
    with SafetensorsReader(file) as reader:
        shapes = {k: torch.empty(reader.shape(k), device="meta") for k in reader.keys()}
        metadata = reader.metadata
    family, _, reason = detect_arch(shapes, metadata)
    return family, reason


def require_same_arch(where: str, file_arch: str | None, reason: str, model_arch: str | None, model_name: str) -> None:
    """Refuse a LoRA made for another architecture than the model's.

    Args:
        where: the LoRA file, for the message.
        file_arch: the architecture the file is for (``detect_file_arch``), or None when unknown.
        reason: why the file is for that architecture.
        model_arch: the model's architecture family, or None for a custom model.
        model_name: the model, for the message.

    Raises:
        TargetError: both are known and differ; the message says what the file is for.
    """
    if file_arch is not None and model_arch is not None and file_arch != model_arch:
        model = model_arch if model_name == model_arch else f"{model_arch} ({model_name})"
        raise TargetError(
            f"{where}: is a LoRA for {file_arch} ({reason}), not for {model}; "
            f"use it with the {file_arch} base model it was made for"
        )


def load_for_model(path: str | os.PathLike[str], model: ModelTables) -> LoraFile:
    """Read a LoRA for ``model``: refuse another architecture, then place its keys with the model's own names.

    Keys that cannot be placed are skipped and listed (``LoraFile.skipped``), so coverage can report them.

    Raises:
        TargetError: the file is for another architecture.
        FileFormatError, InputError, UnsafeFileError: as ``load_lora``.
    """
    family, reason = detect_file_arch(path)
    require_same_arch(str(path), family, reason, model.arch, model.name)
    arch = model.variant or model.arch
    modules = model.tables if model.concrete else None
    lora = load_lora(path, modules=modules, arch=arch, skip_unknown=True)
    if arch is not None:
        # keep the file's own evidence rather than "given by the caller"
        lora.arch_reason = reason if family is not None else f"{reason}; taken from the model"
    return lora


# -- the report --------------------------------------------------------------------------------------------------


def _weight_shape(target: Target, shape: tuple[int, ...]) -> tuple[int, ...] | str:
    if target.rows is None:
        return shape
    start, stop = target.rows
    if not 0 <= start < stop <= shape[0]:
        return f"wrong shape: rows {start}:{stop} outside the module's {shape[0]} rows"
    return (stop - start, *shape[1:])


def patch_misfit(patch: Patch, shape: tuple[int, ...]) -> str | None:
    """None when ``patch`` fits a weight of ``shape``, else why not (computed on the meta device: no memory)."""
    try:
        effect = patch.to("meta").effect(torch.empty(shape, device="meta"))
    except (ShapeError, RuntimeError) as exc:
        return f"wrong shape: {str(exc).split(';')[0]}"
    if tuple(effect.shape) != tuple(shape):
        return f"wrong shape: the patch gives {tuple(effect.shape)}, the module has {tuple(shape)}"
    return None


def _find_module(table: Mapping[str, tuple[int, ...]], module: str) -> str | None:
    # Text encoders: transformers 5's CLIPTextModel drops the ``text_model.`` level that files and tables keep.
    for name in (module, module.removeprefix("text_model."), "text_model." + module):
        if name in table:
            return name
    return None


_NUMBERED = re.compile(r"^(.*?\.\d+)(\.|$)")


def block_name(arch: str | None, component: str, module: str) -> str:
    """The block id of a module (``IN04``, ``D07``: see ``lorakit.arch.blocks``) for a known architecture, else
    ``component:`` plus the name up to its first numbered part (``unet:down_blocks.1``)."""
    if arch is not None:
        from lorakit.arch.blocks import block_of

        try:
            return block_of(arch, component, module)
        except KeyError:
            pass
    # a custom model: the component and the name up to its first numbered part (``down_blocks.1``)
    m = _NUMBERED.match(module)
    return f"{component}:{m.group(1) if m else module.split('.')[0]}"


def coverage(lora: LoraFile, model: ModelTables) -> CoverageReport:
    """Match every target of ``lora`` against ``model``, check each shape, and count untouched modules by block.

    Args:
        lora: the LoRA (read for this model: see ``load_for_model``).
        model: the model's tables.

    Returns:
        The report; ``matched_percent == 100`` means every target has a module of the right shape.
    """
    report = CoverageReport(model=model.name, arch=model.arch, skipped_keys=list(lora.skipped))
    touched: dict[str, set[str]] = {}
    for target, patch in lora.patches.items():
        table = model.tables.get(target.component)
        if table is None:
            report.unmatched.append(Unmatched(str(target), "no such component"))
            continue
        module = _find_module(table, target.module)
        if module is None:
            report.unmatched.append(Unmatched(str(target), "no such module"))
            continue
        shape = _weight_shape(target, table[module])
        misfit = shape if isinstance(shape, str) else patch_misfit(patch, shape)
        if misfit is not None:
            report.unmatched.append(Unmatched(str(target), misfit))
            continue
        report.matched.append(str(target))
        touched.setdefault(target.component, set()).add(module)
    report.blocks = _blocks(model, touched)
    total = len(lora.patches)
    report.matched_percent = 100.0 * len(report.matched) / total if total else 100.0
    adaptable = sum(b.touched + b.untouched for b in report.blocks)
    report.modules_percent = 100.0 * sum(b.touched for b in report.blocks) / adaptable if adaptable else 0.0
    return report


def _blocks(model: ModelTables, touched: Mapping[str, set[str]]) -> list[BlockCoverage]:
    counts: dict[str, list[int]] = {}
    for component, kinds in model.kinds.items():
        hit = touched.get(component, set())
        for module, kind in kinds.items():
            if kind not in ADAPTABLE and module not in hit:
                continue
            entry = counts.setdefault(block_name(model.variant or model.arch, component, module), [0, 0])
            entry[0 if module in hit else 1] += 1
    blocks = [BlockCoverage(block, t, u) for block, (t, u) in counts.items()]
    if model.arch is not None:
        from lorakit.arch.blocks import block_ids

        order = {block: i for i, block in enumerate(block_ids(model.variant or model.arch))}
        blocks.sort(key=lambda b: order.get(b.block, len(order)))  # model order, text encoders first
    return blocks
