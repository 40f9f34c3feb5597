"""The bridge to ``lorakit.arch``: module tables and original-checkpoint names per component.

The name maps of ``lorakit.arch`` take a module table, so they work for the real models and for tiny test configs
alike; which map applies is read from the table's own names (a UNet has ``down_blocks``, FLUX has
``single_transformer_blocks``, SD3's transformer has neither), so a caller-supplied table needs no architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorakit.formats.dialects.names import ForeignMap, ModuleShapes, Part

__all__ = ["ORIGINAL_FAMILIES", "foreign_names", "module_table", "original_family"]

ORIGINAL_FAMILIES = ("ldm", "bfl", "sd3")
"""Original naming families: LDM/SGM UNets, BFL FLUX transformers, Stability MMDiT (SD3)."""


def module_table(arch: str | None, component: str) -> ModuleShapes | None:
    """The bundled module table of ``component`` for ``arch``, or None when either is unknown."""
    if arch is None:
        return None
    from lorakit.arch import tables

    try:
        return tables.module_table(arch, component)
    except KeyError:
        return None


def original_family(component: str, table: ModuleShapes) -> str | None:
    """``ldm``, ``bfl`` or ``sd3`` for a denoiser table, None for text encoders (whose files keep HF names)."""
    if component == "unet":
        return "ldm"
    if component == "transformer":
        return "bfl" if any(n.startswith("single_transformer_blocks.") for n in table) else "sd3"
    return None


def _mapper(family: str) -> Callable[[str, ModuleShapes], Any]:
    from lorakit.arch import names_dit, names_unet

    return {"ldm": names_unet.unet_to_original, "bfl": names_dit.flux_to_original, "sd3": names_dit.sd3_to_original}[
        family
    ]


def foreign_names(component: str, table: ModuleShapes) -> ForeignMap | None:
    """Original name -> the diffusers modules it holds (in row order, with rows and transform), or None.

    Only weights whose original is a ``.weight`` (LoRA files name modules, not bare parameters) are listed.
    """
    family = original_family(component, table)
    if family is None:
        return None
    to_original = _mapper(family)
    groups: dict[str, list[Part]] = {}
    for module in table:
        try:
            ref = to_original(module, table)
        except KeyError:
            continue
        if ref.param != ".weight":
            continue
        groups.setdefault(ref.module, []).append(Part(module, ref.rows, ref.transform))
    return {name: tuple(sorted(parts, key=lambda p: p.rows or (0, 0))) for name, parts in groups.items()}
