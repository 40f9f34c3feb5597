"""Exact conversions between one patch on a fused weight (FLUX ``qkv``, ``linear1``) and patches on its parts.

Splitting a fused LoRA: each part keeps ``A`` (down), its rank and its alpha, and takes its row block of ``B`` (up), so
``scale * B[rows] @ A`` is exactly the rows of the fused delta. Fusing separate LoRAs is the inverse when they share
``A`` and alpha; otherwise ``A`` is stacked and ``B`` made block-diagonal (rank ``sum r_i``), with alpha chosen so the
scale is unchanged (``alpha' = R * alpha_i / r_i`` when the parts agree on the scale, else each scale is folded into
its block of ``B`` and ``alpha' = R``). kohya's own ``split_qkv`` keeps alpha while tripling the rank, which changes
the strength; these functions never do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from lorakit.core.patches import DoraMagnitude, FullPatch, Ia3Patch, LohaPatch, LoraPatch, Patch
from lorakit.errors import AdapterError
from lorakit.formats.dialects.kinds import delta_shape
from lorakit.formats.dialects.names import SWAP_HALVES, Part

__all__ = ["fuse_patches", "split_patch", "swap_halves", "take_rows"]


def _rows(t: Tensor, index: Tensor) -> Tensor:
    return t.index_select(0, index)


def take_rows(patch: Patch, index: Tensor) -> Patch | None:
    """The patch whose delta is ``delta[index]``: output rows selected or reordered, exactly and in the same kind.

    Args:
        patch: any patch.
        index: a 1-D long tensor of output rows.

    Returns:
        The new patch, or None when the kind cannot be restricted to rows without changing it (LoKr, LoHa with one
        Tucker core, a DoRA normalised per input column).
    """
    if patch.dora is not None and patch.dora.axis != "out":
        return None
    dora = None if patch.dora is None else DoraMagnitude(_rows(patch.dora.magnitude, index), "out")
    if isinstance(patch, LoraPatch):
        return dataclasses.replace(patch, up=_rows(patch.up, index), dora=dora)
    if isinstance(patch, LohaPatch):
        # Without Tucker w?a is [out, r]; with Tucker [r, out]: the output rows are its first or second dim.
        if patch.t1 is None and patch.t2 is None:
            return dataclasses.replace(patch, w1a=_rows(patch.w1a, index), w2a=_rows(patch.w2a, index), dora=dora)
        if patch.t1 is not None and patch.t2 is not None:
            return dataclasses.replace(
                patch, w1a=patch.w1a.index_select(1, index), w2a=patch.w2a.index_select(1, index), dora=dora
            )
        return None
    if isinstance(patch, FullPatch):
        diff_b = None if patch.diff_b is None else _rows(patch.diff_b, index)
        return dataclasses.replace(patch, diff=_rows(patch.diff, index), diff_b=diff_b, dora=dora)
    if isinstance(patch, Ia3Patch):
        # Per input column, every output row gets the same vector; per output row, select it.
        weight = patch.weight if patch.on_input else patch.weight.reshape(-1).index_select(0, index)
        return dataclasses.replace(patch, weight=weight, dora=dora)
    return None


def swap_halves(patch: Patch) -> Patch | None:
    """The patch with its two halves of output rows exchanged (FLUX/SD3 final modulation: [shift; scale])."""
    rows = _out_rows(patch)
    half = rows // 2
    return take_rows(patch, torch.cat([torch.arange(half, rows), torch.arange(0, half)]))


def _out_rows(patch: Patch) -> int:
    if isinstance(patch, Ia3Patch):
        return patch.weight.numel()
    return int(delta_shape(patch)[0])


def split_patch(patch: Patch, parts: Sequence[Part]) -> list[Patch] | None:
    """The patch's exact restriction to each part's rows, as patches of the same kind.

    Args:
        patch: a patch on the fused weight.
        parts: the parts with their row slices (covering the fused weight in order).

    Returns:
        One patch per part (a part with ``swap_halves`` gets its halves put back in diffusers order), or None when
        the kind cannot be split without changing it; the caller then keeps the fused patch on row-sliced targets.
    """
    out: list[Patch] = []
    for part in parts:
        piece = patch if part.rows is None else take_rows(patch, torch.arange(*part.rows))
        if piece is not None and part.transform == SWAP_HALVES:
            piece = swap_halves(piece)
        if piece is None:
            return None
        out.append(piece)
    return out


def _same(tensors: Sequence[Tensor]) -> bool:
    first = tensors[0]
    return all(t.dtype == first.dtype and t.shape == first.shape and torch.equal(t, first) for t in tensors[1:])


def _fused_dora(present: Sequence[Patch], complete: bool) -> tuple[bool, DoraMagnitude | None]:
    """(possible, magnitude): per-row magnitudes stack; a missing part's magnitude would need the base weight."""
    doras = [p.dora for p in present]
    if all(d is None for d in doras):
        return True, None
    if not complete or any(d is None or d.axis != "out" for d in doras):
        return False, None
    return True, DoraMagnitude(torch.cat([d.magnitude for d in doras]), "out")


def _fuse_shared_lora(present: Sequence[LoraPatch], dora: DoraMagnitude | None) -> LoraPatch | None:
    if any(p.mid is not None for p in present) or len({p.alpha for p in present}) != 1:
        return None
    if not _same([p.down for p in present]) or len({p.up.dtype for p in present}) != 1:
        return None
    return LoraPatch(up=torch.cat([p.up for p in present]), down=present[0].down, alpha=present[0].alpha, dora=dora)


def _fuse_block_lora(
    items: Sequence[tuple[Part, LoraPatch | None]], total: int, dora: DoraMagnitude | None
) -> LoraPatch:
    present = [p for _, p in items if p is not None]
    like = present[0]
    if len({p.down.shape[1:] for p in present}) != 1 or any(p.mid is not None for p in present):
        raise AdapterError("the LoRAs on the parts of a fused weight differ in kernel shape or use Tucker cores")
    ranks = [p.rank for p in present]
    rank = sum(ranks)
    scales = [p.scale for p in present]
    fold = len(set(scales)) != 1
    up = torch.zeros(total, rank, *like.up.shape[2:], dtype=like.up.dtype)
    col = 0
    for part, patch in items:
        if patch is None:
            continue
        block = patch.up.to(torch.float32) * patch.scale if fold else patch.up
        up[part.rows[0] : part.rows[1], col : col + patch.rank] = block.to(up.dtype)
        col += patch.rank
    down = torch.cat([p.down.to(like.down.dtype) for p in present])
    alpha = float(rank) if fold else rank * scales[0]
    return LoraPatch(up=up, down=down, alpha=alpha, dora=dora)


def _fuse_dense(items: Sequence[tuple[Part, Patch | None]], total: int, dora: DoraMagnitude | None) -> FullPatch:
    present = [p for _, p in items if p is not None]
    if any(not dataclasses.replace(p, dora=None).additive for p in present):
        raise AdapterError(
            "(IA)^3 patches on the parts of a fused weight cannot be fused without the base weight; "
            "write a dialect with split names (diffusers) instead"
        )
    tail = delta_shape(dataclasses.replace(present[0], dora=None))[1:]
    dtype = next(t for t in present[0].tensors().values() if t.is_floating_point()).dtype
    diff = torch.zeros(total, *tail, dtype=torch.float32)
    biases = [p.bias_effect() for p in present]
    diff_b = torch.zeros(total, dtype=torch.float32) if any(b is not None for b in biases) else None
    for part, patch in items:
        if patch is None:
            continue
        a, b = part.rows
        diff[a:b] = dataclasses.replace(patch, dora=None).delta(torch.Size((b - a, *tail)))
        if diff_b is not None and patch.bias_effect() is not None:
            diff_b[a:b] = patch.bias_effect()
    return FullPatch(diff=diff.to(dtype), diff_b=None if diff_b is None else diff_b.to(dtype), dora=dora)


def fuse_patches(items: Sequence[tuple[Part, Patch | None]]) -> Patch:
    """One patch on the fused weight whose rows are exactly the parts' patches (zero rows for a missing part).

    Args:
        items: every part of the fused weight in row order, with its patch or None.

    Returns:
        The fused patch: a LoRA (shared ``A`` stacked ``B``, or block-diagonal), a LoHa sharing its ``b`` factors,
        else a dense ``FullPatch`` of the exact delta.

    Raises:
        AdapterError: the parts hold DoRA or (IA)^3 patches that cannot be stacked without the base weight.
    """
    total = items[-1][0].rows[1]
    present = [p for _, p in items if p is not None]
    complete = len(present) == len(items)
    possible, dora = _fused_dora(present, complete)
    if not possible:
        raise AdapterError(
            "DoRA magnitudes on the parts of a fused weight stack only when every part has one per "
            "output row; write a dialect with split names (diffusers) instead"
        )
    if all(isinstance(p, LoraPatch) for p in present):
        shared = _fuse_shared_lora(present, dora) if complete else None
        return shared or _fuse_block_lora(items, total, dora)
    if complete and all(isinstance(p, LohaPatch) and p.t1 is None and p.t2 is None for p in present):
        if _same([p.w1b for p in present]) and _same([p.w2b for p in present]) and len({p.alpha for p in present}) == 1:
            first = present[0]
            return LohaPatch(
                w1a=torch.cat([p.w1a for p in present]),
                w1b=first.w1b,
                w2a=torch.cat([p.w2a for p in present]),
                w2b=first.w2b,
                alpha=first.alpha,
                dora=dora,
            )
    return _fuse_dense(items, total, dora)
