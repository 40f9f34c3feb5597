"""SD1 / SD2 / SDXL UNet: diffusers module names -> original LDM / SGM names (``model.diffusion_model.`` keys).

The LDM UNet numbers its blocks flat: ``input_blocks.k`` for every resnet, attention and downsampler of the down path,
``middle_block.0..2`` and ``output_blocks.k`` for the up path; inside a block, ``.0`` is the resnet (or the
downsampler ``op``), ``.1`` the attention, and the upsampler sits after them. With ``L`` resnets per down block (2 in
every released model) and ``L + 1`` per up block:

- ``down_blocks.i.{resnets,attentions}.j`` -> ``input_blocks.(1 + i(L+1) + j).{0,1}``
- ``down_blocks.i.downsamplers.0.conv`` -> ``input_blocks.((i+1)(L+1)).0.op``
- ``mid_block.resnets.j`` -> ``middle_block.(2j)``, ``mid_block.attentions.0`` -> ``middle_block.1``
- ``up_blocks.i.{resnets,attentions}.j`` -> ``output_blocks.(i(L+1) + j).{0,1}``
- ``up_blocks.i.upsamplers.0.conv`` -> ``output_blocks.(i(L+1) + L).(2 if the block has attentions else 1).conv``

Attention internals (``proj_in``, ``transformer_blocks.t.attn1.to_q``...) keep their names; resnet parts are renamed
(``conv1`` -> ``in_layers.2``...). The layout is read from the table itself, so SDXL's three down blocks and missing
attentions in its first block need no special case.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from lorakit.arch.refs import OriginalRef

__all__ = ["unet_to_original"]

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK_PART = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_SAMPLER = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv")
_MID_PART = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


@functools.lru_cache(maxsize=8)
def _layout(names: frozenset[str]) -> tuple[int, frozenset[int]]:
    """Resnets per down block and the up blocks that have attentions, read from a table's module names."""
    per_down = {
        int(m.group(4))
        for n in names
        if (m := _BLOCK_PART.fullmatch(n))
        and m.group(1) == "down_blocks"
        and m.group(3) == "resnets"
        and m.group(2) == "0"
    }
    up_with_attn = frozenset(
        int(m.group(2))
        for n in names
        if (m := _BLOCK_PART.fullmatch(n)) and m.group(1) == "up_blocks" and m.group(3) == "attentions"
    )
    return len(per_down), up_with_attn


_LAST_LAYOUT: list = [None, 0, None]
"""The last table asked about, its size and its layout: callers map a whole file against one table, and hashing the
table's names for ``_layout``'s cache on every call costs more than the mapping itself."""


def _layout_of(table: Mapping[str, object]) -> tuple[int, frozenset[int]]:
    if _LAST_LAYOUT[0] is not table or _LAST_LAYOUT[1] != len(table):
        _LAST_LAYOUT[:] = [table, len(table), _layout(frozenset(table))]
    return _LAST_LAYOUT[2]


def _part(kind: str, rest: str) -> str:
    """The LDM name of a module inside a resnet or attention block (resnet parts renamed, attention parts kept)."""
    if kind == "attentions":
        return rest
    if rest not in _RESNET_PARTS:
        raise KeyError(rest)
    return _RESNET_PARTS[rest]


def unet_to_original(module: str, table: Mapping[str, object]) -> OriginalRef:
    """The LDM module for a diffusers UNet module (relative to ``model.diffusion_model.``).

    Args:
        module: a diffusers module name, e.g. ``up_blocks.1.attentions.2.proj_out``.
        table: the UNet's module table (its names give the block layout).

    Raises:
        KeyError: the name is not a UNet module this map knows.
    """
    if module in _TOP:
        return OriginalRef(_TOP[module])
    per_down, up_with_attn = _layout_of(table)
    per_up = per_down + 1
    slot = {"resnets": 0, "attentions": 1}
    if m := _BLOCK_PART.fullmatch(module):
        path, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if path == "down_blocks":
            return OriginalRef(f"input_blocks.{1 + i * per_up + j}.{slot[kind]}.{_part(kind, rest)}")
        return OriginalRef(f"output_blocks.{i * per_up + j}.{slot[kind]}.{_part(kind, rest)}")
    if m := _SAMPLER.fullmatch(module):
        i = int(m.group(2))
        if m.group(1) == "down_blocks":
            return OriginalRef(f"input_blocks.{(i + 1) * per_up}.0.op")
        return OriginalRef(f"output_blocks.{i * per_up + per_down}.{2 if i in up_with_attn else 1}.conv")
    if m := _MID_PART.fullmatch(module):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        index = 2 * j if kind == "resnets" else 1
        return OriginalRef(f"middle_block.{index}.{_part(kind, rest)}")
    raise KeyError(module)
