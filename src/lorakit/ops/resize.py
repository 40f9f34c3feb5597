"""Resize a LoRA's rank: the exact best truncation, computed from the factors.

kohya's resize forms the dense ``B @ A`` of every module and runs a full SVD on it (minutes to an hour for an SDXL
file); the same truncation follows from two thin QRs and an ``r x r`` SVD per module (``lorakit.core.lowrank``).
"""

from __future__ import annotations

import torch

from lorakit.core.lowrank import factor_svd, pick_rank, truncate
from lorakit.formats.canonical import LoraFile
from lorakit.ops.algebra import LoraResult, ModuleReport, lora_from_factors, plain_lora

__all__ = ["resize_lora"]


def resize_lora(
    lora: LoraFile,
    *,
    rank: int | None = None,
    fro: float | None = None,
    ratio: float | None = None,
    cumulative: float | None = None,
    max_rank: int | None = None,
    conv_rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> LoraResult:
    """Truncate every plain LoRA patch to a smaller rank; other kinds are kept as they are.

    Args:
        lora: the input; not modified.
        rank: a fixed rank (modules with fewer singular values keep all of theirs).
        fro: per module, the fewest singular values keeping this fraction of the squared Frobenius norm.
        ratio: per module, keep singular values at least ``s_max / ratio``.
        cumulative: per module, the fewest singular values whose sum reaches this fraction.
        max_rank: upper bound for the dynamic rules.
        conv_rank: fixed rank for k x k conv modules (defaults to the rule above).
        dtype: output dtype (defaults to each patch's own).

    Returns:
        A new LoraFile (alpha = new rank, so scale 1 and the strength is unchanged) and per-module errors.
    """
    out = LoraFile(metadata=dict(lora.metadata), dialect=lora.dialect, arch=lora.arch, arch_reason=lora.arch_reason)
    result = LoraResult(out)
    for target, patch in lora.patches.items():
        if not plain_lora(patch):
            out.patches[target] = patch
            result.modules.append(ModuleReport(str(target), patch.rank, patch.rank, 0.0, "kept"))
            continue
        svd = factor_svd(patch.up, patch.down)
        is_conv = patch.down.dim() > 2 and patch.down[0, 0].numel() > 1
        if is_conv and conv_rank is not None:
            k = pick_rank(svd.S, rank=conv_rank)
        else:
            k = pick_rank(svd.S, rank=rank, fro=fro, ratio=ratio, cumulative=cumulative, max_rank=max_rank)
        up, down, err = truncate(svd, k)
        # the patch's scale is folded into the factors (half on each side, sign on up), so alpha = new rank
        root = abs(patch.scale) ** 0.5
        sign = 1.0 if patch.scale >= 0 else -1.0
        new = lora_from_factors(up * (root * sign), down * root, patch.down, dtype or patch.down.dtype)
        out.patches[target] = new
        result.modules.append(ModuleReport(str(target), patch.rank, new.rank, err, "svd-factors"))
    return result
