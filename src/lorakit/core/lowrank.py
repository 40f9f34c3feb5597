"""Exact low-rank algebra on LoRA factors, never forming the dense ``out x in`` matrix.

The SVD of ``M = B @ A`` (``B`` ``[out, r]``, ``A`` ``[r, in]``) comes from two thin QRs and the SVD of an ``r x r``
core: ``B = Qb Rb``, ``A^T = Qa Ra``, so ``M = Qb (Rb Ra^T) Qa^T`` and with ``Rb Ra^T = U S V^T``,
``M = (Qb U) S (Qa V)^T``. Cost ``O((out + in) r^2 + r^3)`` instead of ``O(out * in * min(out, in))``.

A weighted sum of LoRAs ``sum_i w_i * scale_i * B_i A_i`` is itself the product of the concatenated factors
``[w_1 s_1 B_1, ..., w_n s_n B_n] @ [A_1; ...; A_n]``, so merging is concatenation (exact) followed, if a smaller rank
is wanted, by the truncation above (optimal in the Frobenius and spectral norms, Eckart-Young).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.errors import ConfigError, ShapeError

__all__ = ["FactorSVD", "concat_factors", "factor_svd", "pick_rank", "truncate"]


@dataclass(frozen=True)
class FactorSVD:
    """``B @ A = U diag(S) Vh`` with ``U`` ``[out, k]``, ``S`` ``[k]`` (descending), ``Vh`` ``[k, in]``, fp64 inside."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def energy(self) -> Tensor:
        """Squared Frobenius norm of the product: the sum of ``S^2``."""
        return (self.S**2).sum()


def factor_svd(up: Tensor, down: Tensor, *, dtype: torch.dtype = torch.float64) -> FactorSVD:
    """SVD of ``up @ down`` from the factors (shapes ``[out, r]`` and ``[r, in]``; conv kernels flattened first).

    fp64 by default: the factors are small, so the extra precision is cheap and the truncation error reported later
    is then exact to far below fp32 rounding.
    """
    b = up.flatten(1).to(dtype)
    a = down.flatten(1).to(dtype)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return FactorSVD(qb @ u, s, vh @ qa.T)


def concat_factors(parts: Sequence[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """Stack ``(up_i, down_i, coef_i)`` into one factor pair with ``up @ down = sum_i coef_i * up_i @ down_i``.

    The coefficient (weight times ``alpha / r``) goes onto ``up`` so that ``down`` keeps its values. Kernels of conv
    factors are kept on ``down``; all parts must share their kernel shape.
    """
    ups = [u.to(torch.float32).flatten(1) * float(c) for u, _, c in parts]
    downs = [d.to(torch.float32) for _, d, _ in parts]
    kernels = {tuple(d.shape[1:]) for d in downs}
    if len(kernels) != 1:
        raise ShapeError(f"cannot concatenate LoRA factors with different input shapes: {sorted(kernels)}")
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def pick_rank(
    s: Tensor,
    *,
    rank: int | None = None,
    fro: float | None = None,
    ratio: float | None = None,
    cumulative: float | None = None,
    max_rank: int | None = None,
) -> int:
    """Choose how many singular values to keep; never more than exist, never fewer than 1.

    Args:
        s: singular values, descending.
        rank: keep exactly this many (capped by ``len(s)``).
        fro: keep the fewest whose squared sum reaches this fraction of the total (Frobenius energy), e.g. 0.9.
        ratio: keep values at least ``s[0] / ratio``.
        cumulative: keep the fewest whose plain sum reaches this fraction of the total.
        max_rank: upper bound applied after any rule.
    """
    n = int(s.numel())
    if sum(x is not None for x in (rank, fro, ratio, cumulative)) != 1:
        raise ConfigError("give exactly one of rank, fro, ratio, cumulative")
    nonzero = int((s > s[0] * 1e-12).sum()) if n and s[0] > 0 else 0
    if rank is not None:
        k = rank
    elif ratio is not None:
        k = int((s >= s[0] / ratio).sum())
    else:
        values = s**2 if fro is not None else s
        target = fro if fro is not None else cumulative
        total = values.sum()
        cum = torch.cumsum(values, 0) / (total if total > 0 else 1)
        # the first index where the kept fraction reaches the target, counted as a rank (index + 1)
        k = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype) - 1e-12).item()) + 1
        k = min(k, max(nonzero, 1))
    if max_rank is not None:
        k = min(k, max_rank)
    return max(1, min(k, n))


def truncate(svd: FactorSVD, k: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``k`` factors ``(up [out, k], down [k, in])`` and the relative Frobenius error of the truncation.

    The singular values are split evenly (``sqrt(S)`` on each side) so both factors have comparable norms, as
    trained LoRAs do; the error is ``sqrt(sum of discarded S^2 / sum of all S^2)``.
    """
    k = max(1, min(k, int(svd.S.numel())))
    root = svd.S[:k].sqrt()
    up = svd.U[:, :k] * root
    down = root[:, None] * svd.Vh[:k]
    total = float(svd.energy)
    kept = float((svd.S[:k] ** 2).sum())
    error = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
    return up, down, error
