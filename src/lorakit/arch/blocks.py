"""Block ids: which block of a base model a module sits in, for coverage reports and per-block weights.

The ids follow the "LoRA Block Weight" notation users know:

- SD1 / SD2 / SDXL: ``BASE`` for every text encoder, ``IN00``.. / ``M00`` / ``OUT00``.. after the LDM block a UNet
  module lives in (``input_blocks.k`` -> ``INkk``, ``middle_block`` -> ``M00``, ``output_blocks.k`` -> ``OUTkk``).
  The modules outside those blocks get ``TIME`` (time and SDXL size embeddings) and ``OUT`` (final norm and conv);
  LBW has no ids for them.
- FLUX: ``CLIP``, ``T5``, ``IN`` (embedders), ``D00``..``D18`` (double blocks), ``S00``..``S37`` (single blocks),
  ``OUT`` (final norm and projection).
- SD3 (no community notation; same scheme): ``CLIP-L``, ``CLIP-G``, ``T5``, ``IN``, ``J00``.. (joint blocks), ``OUT``.
"""

from __future__ import annotations

import functools
import re

from lorakit.arch.names import to_original
from lorakit.arch.registry import VARIANTS, arch_of, resolve_variant
from lorakit.arch.tables import module_table, normalize_module_name

__all__ = ["block_ids", "block_of"]

_TEXT_IDS = {
    "sd1": {"text_encoder": "BASE"},
    "sd2": {"text_encoder": "BASE"},
    "sdxl": {"text_encoder": "BASE", "text_encoder_2": "BASE"},
    "flux": {"text_encoder": "CLIP", "text_encoder_2": "T5"},
    "sd3": {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5"},
}
_LDM_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.")
_LDM_IDS = {"input_blocks": "IN", "middle_block": "M", "output_blocks": "OUT"}
_DIT_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_DIT_IDS = {"flux": {"transformer_blocks": "D", "single_transformer_blocks": "S"}, "sd3": {"transformer_blocks": "J"}}
_ORDER = ("BASE", "CLIP", "CLIP-L", "CLIP-G", "T5", "TIME", "IN", "M", "D", "S", "J", "OUT")
"""Rank of an id's letters (``IN`` before ``M`` before ``OUT``); the number breaks ties."""


def _unet_block(arch: str, module: str) -> str:
    ldm = to_original(arch, "unet", module).module
    m = _LDM_BLOCK.match(ldm)
    if m is None:
        return "OUT" if ldm.startswith("out.") else "TIME"
    # middle_block has sub-indices 0..2 but is one block, M00
    index = 0 if m.group(1) == "middle_block" else int(m.group(2))
    return f"{_LDM_IDS[m.group(1)]}{index:02d}"


def _transformer_block(family: str, module: str) -> str:
    m = _DIT_BLOCK.match(module)
    if m is not None:
        return f"{_DIT_IDS[family][m.group(1)]}{int(m.group(2)):02d}"
    return "OUT" if module.startswith(("norm_out.", "proj_out")) else "IN"


def block_of(arch: str, component: str, module: str) -> str:
    """The block id of one module (``block_of("sdxl", "unet", "down_blocks.1.attentions.0.proj_in") == "IN04"``).

    Args:
        arch: architecture or variant.
        component: the component.
        module: a module name of the component's table (text encoders in either transformers form).

    Raises:
        KeyError: unknown architecture, component or module.
    """
    family = arch_of(arch)
    name = normalize_module_name(arch, component, module)
    if name not in module_table(arch, component):
        raise KeyError(f"{module!r} is not a module of {arch} {component}")
    if component == "unet":
        return _unet_block(arch, name)
    if component == "transformer":
        return _transformer_block(family, name)
    return _TEXT_IDS[family][component]


def _rank(block: str) -> tuple[int, int]:
    if block in _ORDER:
        # the bare OUT (final norm and conv) comes after OUT00..OUT11; other bare ids lead their group
        return _ORDER.index(block), 10**9 if block == "OUT" else -1
    letters = block.rstrip("0123456789")
    return _ORDER.index(letters), int(block[len(letters) :])


@functools.cache
def _block_ids(variant: str) -> tuple[str, ...]:
    ids = {block_of(variant, c, m) for c in VARIANTS[variant].components for m in module_table(variant, c)}
    return tuple(sorted(ids, key=_rank))


def block_ids(arch: str) -> list[str]:
    """Every block id of an architecture or variant, in model order (text encoders first)."""
    return list(_block_ids(resolve_variant(arch)))
