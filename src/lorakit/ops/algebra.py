"""Turning patches into factors and back: the common ground of merge, resize and extract."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lorakit.core.lowrank import FactorSVD
from lorakit.core.patches import LoraPatch, Patch
from lorakit.errors import LorakitError
from lorakit.formats.canonical import LoraFile

__all__ = ["LoraResult", "ModuleReport", "delta_shape", "dense_svd", "factors_of", "lora_from_factors", "plain_lora"]


@dataclass
class ModuleReport:
    """What an operation did to one target."""

    target: str
    rank_in: int | None
    rank_out: int | None
    error: float
    """Relative Frobenius error of the result against the exact delta (0 when exact)."""
    method: str
    """``concat``, ``svd-factors``, ``svd-dense``, ``kept`` or ``dense``."""

    @property
    def energy_kept(self) -> float:
        """Fraction of the squared Frobenius norm kept: ``1 - error^2``."""
        return 1.0 - self.error**2


@dataclass
class LoraResult:
    """A LoRA made by an operation (merge, resize, extract) and what happened to each target."""

    lora: LoraFile
    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def worst_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)


def plain_lora(patch: Patch) -> bool:
    """True for a LoRA whose delta is exactly ``up @ down`` (no Tucker core, no DoRA)."""
    return isinstance(patch, LoraPatch) and patch.mid is None and patch.dora is None


def factors_of(patch: LoraPatch, coef: float = 1.0) -> tuple[Tensor, Tensor, float]:
    """``(up, down, coef * scale)`` of a plain LoRA, ready for ``concat_factors``."""
    return patch.up, patch.down, coef * patch.scale


def lora_from_factors(up: Tensor, down: Tensor, like: Tensor, dtype: torch.dtype) -> LoraPatch:
    """A LoRA patch with scale 1 (alpha = rank) whose ``up @ down`` is the given product.

    ``like`` is an input ``down`` (or a weight-shaped tensor) whose trailing kernel dims the new ``down`` takes.
    """
    rank = up.shape[1]
    kernel = tuple(like.shape[2:]) if like.dim() > 2 else ()
    new_down = down.reshape(rank, -1, *kernel) if kernel else down
    new_up = up.reshape(up.shape[0], rank, *([1] * len(kernel)))
    return LoraPatch(up=new_up.to(dtype).contiguous(), down=new_down.to(dtype).contiguous(), alpha=float(rank))


def dense_svd(delta: Tensor) -> FactorSVD:
    """SVD of a dense delta (conv kernels flattened), fp64 for small matrices and fp32 for large ones."""
    matrix = delta.flatten(1)
    dtype = torch.float64 if matrix.numel() <= 4_000_000 else torch.float32
    u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    return FactorSVD(u, s, vh)


def delta_shape(patch: Patch) -> torch.Size:
    """Shape of a patch's additive delta, computed on the meta device (no memory, no arithmetic)."""
    return patch.to("meta").delta().shape


def require_additive(patch: Patch, target: str, what: str) -> None:
    """Refuse kinds whose effect depends on the base weight (DoRA, (IA)^3) where no base weight is at hand."""
    if not patch.additive:
        raise LorakitError(
            f"{target}: a {type(patch).__name__}{' with DoRA' if patch.dora is not None else ''} "
            f"depends on the base weight, so it cannot be {what} without the model; bake it into "
            f"the checkpoint instead (lorakit bake)"
        )
