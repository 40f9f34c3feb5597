"""Merge LoRAs into one: ``sum_i w_i * dW_i``, exactly (concat) or at the best smaller rank (svd).

Strength acts linearly: the merged file at strength 1 equals the inputs applied at their weights. Nothing squares a
ratio and nothing combines A and B separately (the cross terms that kohya's same-rank merge and PEFT's "linear"
combination introduce).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lorakit.core.lowrank import concat_factors, factor_svd, truncate
from lorakit.core.patches import FullPatch, Patch
from lorakit.errors import LorakitError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.ops.algebra import (
    LoraResult,
    ModuleReport,
    delta_shape,
    dense_svd,
    factors_of,
    lora_from_factors,
    plain_lora,
    require_additive,
)

__all__ = ["merge_loras"]


def _is_conv(shape: torch.Size) -> bool:
    return len(shape) > 2 and math.prod(shape[2:]) > 1


def _merge_target(
    target: Target,
    parts: list[tuple[Patch, float]],
    method: str,
    rank: int | None,
    conv_rank: int | None,
    dtype: torch.dtype,
) -> tuple[Patch, ModuleReport]:
    name = str(target)
    for patch, _ in parts:
        require_additive(patch, name, "merged")
    rank_in = sum(p.rank or 0 for p, _ in parts)
    shape = _common_shape(name, parts)
    want = (conv_rank if conv_rank is not None else rank) if _is_conv(shape) else rank
    if all(plain_lora(p) for p, _ in parts):
        up, down = concat_factors([factors_of(p, w) for p, w in parts])
        like = parts[0][0].down
        if method == "concat" or want is None or want >= up.shape[1]:
            return lora_from_factors(up, down, like, dtype), ModuleReport(name, rank_in, up.shape[1], 0.0, "concat")
        new_up, new_down, err = truncate(factor_svd(up, down), want)
        return lora_from_factors(new_up, new_down, like, dtype), ModuleReport(name, rank_in, want, err, "svd-factors")
    delta = sum(p.delta(shape) * w for p, w in parts)
    if method == "concat" or want is None:
        # kinds without shared factors (LoHa, LoKr, Tucker, full) merge exactly only as a full difference
        return FullPatch(diff=delta.to(dtype)), ModuleReport(name, rank_in, None, 0.0, "dense")
    new_up, new_down, err = truncate(dense_svd(delta), want)
    kernel_like = delta if delta.dim() > 2 else delta.flatten(1)
    return lora_from_factors(new_up, new_down, kernel_like, dtype), ModuleReport(name, rank_in, want, err, "svd-dense")


def _common_shape(name: str, parts: list[tuple[Patch, float]]) -> torch.Size:
    shapes = {tuple(delta_shape(p)) for p, _ in parts}
    if len({math.prod(s) for s in shapes}) != 1:
        raise LorakitError(
            f"{name}: the LoRAs disagree on the layer's shape ({sorted(shapes)}); they were made for different models"
        )
    return torch.Size(max(shapes, key=len))


def merge_loras(
    inputs: Sequence[tuple[LoraFile, float]],
    *,
    method: str = "concat",
    rank: int | None = None,
    conv_rank: int | None = None,
    dtype: torch.dtype | None = None,
    multipliers: Callable[[Target], float] | None = None,
) -> LoraResult:
    """Merge LoRAs at weights into one LoRA.

    Args:
        inputs: (lora, weight) pairs; weights may be negative.
        method: ``concat`` keeps every factor (exact; rank = sum of ranks); ``svd`` keeps the best rank-``rank``
            approximation of ``sum_i w_i dW_i``, computed from the factors without forming dense matrices when all
            inputs of a target are plain LoRAs.
        rank: target rank for ``svd`` (Linear and 1x1 conv).
        conv_rank: target rank for k x k convs (defaults to ``rank``).
        dtype: output dtype; defaults to the first input's.
        multipliers: optional per-target factor on top of the weights (block weights).

    Returns:
        The merged LoraFile (architecture of the inputs, alpha = rank so the strength is explicit) and the report.
    """
    if method not in ("concat", "svd"):
        raise LorakitError(f"unknown merge method {method!r}; use concat or svd")
    if method == "svd" and rank is None:
        raise LorakitError("an svd merge needs --rank")
    if not inputs:
        raise LorakitError("nothing to merge: give at least one LoRA")
    archs = {lora.arch for lora, _ in inputs if lora.arch}
    if len(archs) > 1:
        raise LorakitError(
            f"the LoRAs are for different architectures ({', '.join(sorted(archs))}); merge only LoRAs "
            f"of one base model"
        )
    out_dtype = dtype or _first_dtype(inputs)
    grouped: dict[Target, list[tuple[Patch, float]]] = {}
    for lora, weight in inputs:
        for target, patch in lora.patches.items():
            factor = weight * (multipliers(target) if multipliers else 1.0)
            grouped.setdefault(target, []).append((patch, factor))
    merged = LoraFile(dialect="lorakit", arch=next(iter(archs), None), arch_reason="merged inputs")
    result = LoraResult(merged)
    for target in sorted(grouped):
        parts = [(p, w) for p, w in grouped[target] if w != 0.0]
        if not parts:
            continue
        patch, report = _merge_target(target, parts, method, rank, conv_rank, out_dtype)
        merged.patches[target] = patch
        result.modules.append(report)
    return result


def _first_dtype(inputs: Sequence[tuple[LoraFile, float]]) -> torch.dtype:
    for lora, _ in inputs:
        for patch in lora.patches.values():
            for t in patch.tensors().values():
                return t.dtype
    return torch.float32
