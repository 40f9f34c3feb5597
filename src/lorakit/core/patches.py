"""Adapter kinds as pure tensor math: what each kind adds to a weight.

A patch holds the tensors of one adapter on one weight, in the canonical names of the papers (``up`` = B, shape
``[out, r]``; ``down`` = A, shape ``[r, in]``) and an alpha. Every patch gives its full-strength effect on a weight,
``D(W)``, computed in fp32 with ``scale = alpha / r`` included. Applying the patch at strength ``s`` is always

    W' = W + s * D(W)

so strength acts linearly and exactly once, for every kind. For the additive kinds (LoRA, LoHa, LoKr, full diff) ``D``
does not depend on ``W``; for (IA)^3 and DoRA it does. DoRA at strength ``s`` therefore interpolates linearly between
the base weight and the full DoRA weight (the convention ComfyUI uses; LyCORIS's own ``multiplier`` is not linear and
does not give the base weight back at 0). At ``s = 1`` every convention agrees.

Dialect names (``lora_down``, ``hada_w1_a``...) belong to ``lorakit.formats``; this module knows none of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lorakit.errors import ShapeError

__all__ = [
    "DoraMagnitude",
    "FullPatch",
    "Ia3Patch",
    "LohaPatch",
    "LokrPatch",
    "LoraPatch",
    "Patch",
    "apply_patches",
]


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32)


def _fit(delta: Tensor, shape: torch.Size | None, what: str) -> Tensor:
    """Reshape a delta to the target weight's shape (a flat conv kernel, a 1x1 conv stored as Linear).

    Output rows must agree as well as the element count, so a transposed matrix is refused, not scrambled.
    """
    if shape is None or tuple(delta.shape) == tuple(shape):
        return delta
    if delta.numel() != math.prod(shape) or delta.shape[0] != shape[0]:
        raise ShapeError(
            f"{what} gives a delta of shape {tuple(delta.shape)}, which cannot fit a weight of shape "
            f"{tuple(shape)}; the adapter was made for another layer or model"
        )
    return delta.reshape(shape)


@dataclass(frozen=True)
class DoraMagnitude:
    """DoRA's learned magnitude ``m`` and the axis its norm runs over.

    ``W' = m * (W + dW) / ||W + dW||``. With ``axis="out"`` the norm is taken per output row (LyCORIS default, PEFT's
    ``lora_magnitude_vector``; stored shapes ``[out]`` or ``[out, 1, ...]``); with ``axis="in"`` per input column
    (shape ``[1, in, ...]``).
    """

    magnitude: Tensor
    axis: str = "out"

    def __post_init__(self) -> None:
        if self.axis not in ("out", "in"):
            raise ValueError(f"DoRA axis must be 'out' or 'in', not {self.axis!r}")

    @staticmethod
    def from_shape(magnitude: Tensor, weight_shape: torch.Size) -> DoraMagnitude:
        """Detect the axis from the stored shape: ``[out]``/``[out, 1, ...]`` per row, ``[1, in, ...]`` per column."""
        shape = tuple(magnitude.shape)
        out, inp = weight_shape[0], weight_shape[1]
        if len(shape) == 1 and shape[0] == out:
            return DoraMagnitude(magnitude, "out")
        if len(shape) >= 2 and shape[0] == out and math.prod(shape[1:]) == 1:
            return DoraMagnitude(magnitude, "out")
        if len(shape) >= 2 and shape[0] == 1 and shape[1] == inp and math.prod(shape[2:]) == 1:
            return DoraMagnitude(magnitude, "in")
        raise ShapeError(
            f"DoRA magnitude of shape {shape} fits neither the rows ({out}) nor the columns ({inp}) of a "
            f"weight of shape {tuple(weight_shape)}"
        )

    def rescale(self, merged: Tensor) -> Tensor:
        """Return ``m * merged / (norm(merged) + eps)`` in fp32, the norm along this magnitude's axis.

        ``vector_norm``, not ``Tensor.norm``: the latter refuses more than two dims (conv weights). The fp32 eps is
        LyCORIS's (and ComfyUI's): an all-zero row stays zero instead of turning into NaN.
        """
        dims = tuple(d for d in range(merged.dim()) if d != (0 if self.axis == "out" else 1))
        norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True) + torch.finfo(torch.float32).eps
        m = self.magnitude.to(torch.float32).reshape(norm.shape)
        return merged * (m / norm)


@dataclass(frozen=True)
class Patch:
    """Base of all adapter kinds. Subclasses define ``delta`` (additive kinds) or override ``effect``."""

    alpha: float | None = field(default=None, kw_only=True)
    dora: DoraMagnitude | None = field(default=None, kw_only=True)

    @property
    def rank(self) -> int | None:
        """The rank ``r`` that alpha is divided by, or None for kinds without one."""
        return None

    @property
    def scale(self) -> float:
        """``alpha / r``; a missing alpha means ``alpha = r`` (scale 1), as kohya, LyCORIS and diffusers read it."""
        if self.alpha is None or self.rank is None:
            return 1.0
        return float(self.alpha) / self.rank

    def delta(self, shape: torch.Size | None = None) -> Tensor:
        """The additive delta ``dW`` in fp32, scale included, reshaped to ``shape`` when given."""
        # only (IA)^3 lacks one, and it overrides effect(); callers check `additive` before asking
        raise ShapeError(
            f"{type(self).__name__} has no weight-independent delta: its effect depends on the base "
            f"weight; apply it to a model or bake it into a checkpoint"
        )

    @property
    def additive(self) -> bool:
        """True when ``D(W)`` does not depend on ``W`` (no DoRA, not (IA)^3)."""
        return self.dora is None

    def effect(self, weight: Tensor) -> Tensor:
        """Full-strength change ``D(W)`` of ``weight`` in fp32: the patched weight at strength s is ``W + s * D(W)``."""
        w = weight.to(torch.float32)
        dw = self.delta(weight.shape)
        if self.dora is None:
            return dw
        return self.dora.rescale(w + dw) - w

    def bias_effect(self) -> Tensor | None:
        """Full-strength change of the layer's bias in fp32, or None."""
        return None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Patch:
        """A copy with every tensor moved or cast (``"meta"`` gives shapes without memory)."""
        changes = {
            f.name: getattr(self, f.name).to(device=device, dtype=dtype)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        if self.dora is not None:
            changes["dora"] = dataclasses.replace(
                self.dora, magnitude=self.dora.magnitude.to(device=device, dtype=dtype)
            )
        return dataclasses.replace(self, **changes)

    def tensors(self) -> dict[str, Tensor]:
        """The patch's tensors by canonical name (None entries left out), DoRA magnitude as ``dora_scale``."""
        out = {k: v for k, v in vars(self).items() if isinstance(v, Tensor)}
        if self.dora is not None:
            out["dora_scale"] = self.dora.magnitude
        return out


@dataclass(frozen=True)
class LoraPatch(Patch):
    """LoRA / LoCon: ``dW = (alpha / r) * up @ down``; conv ``k x k`` keeps the kernel on ``down`` (or ``mid``).

    Shapes: ``up`` ``[out, r]`` (or ``[out, r, 1, 1]``), ``down`` ``[r, in]`` (or ``[r, in, kh, kw]``), optional
    Tucker ``mid`` ``[r, r, kh, kw]`` between a 1x1 ``down`` and a 1x1 ``up``.
    """

    up: Tensor = field(kw_only=True)
    down: Tensor = field(kw_only=True)
    mid: Tensor | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        r = self.down.shape[0]
        if self.up.dim() < 2 or self.up.shape[1] != r or math.prod(self.up.shape[2:]) != 1:
            raise ShapeError(f"LoRA up {tuple(self.up.shape)} and down {tuple(self.down.shape)} disagree on the rank")
        if self.mid is not None and tuple(self.mid.shape[:2]) != (r, r):
            raise ShapeError(f"LoRA mid {tuple(self.mid.shape)} does not match rank {r}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: torch.Size | None = None) -> Tensor:
        up = self.up.to(torch.float32).flatten(1)
        down = self.down.to(torch.float32)
        if self.mid is not None:
            mid = self.mid.to(torch.float32)
            # Ellipsis, not "h w": LyCORIS writes Tucker mids for conv1d and conv3d too.
            dw = torch.einsum("m n ..., o m, n i -> o i ...", mid, up, down.flatten(1))
        else:
            dw = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return _fit(dw * self.scale, shape, "LoRA")


def _rebuild_tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS Tucker rebuild: ``t [r, r, k...]``, ``wa [r, out]``, ``wb [r, in]`` -> ``[out, in, k...]``."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


@dataclass(frozen=True)
class LohaPatch(Patch):
    """LoHa: ``dW = (alpha / r) * (w1a @ w1b) * (w2a @ w2b)`` (Hadamard product), ``r = rows(w1b)``.

    Without Tucker: ``w1a``/``w2a`` ``[out, r]``, ``w1b``/``w2b`` ``[r, in * kh * kw]``. With Tucker cores ``t1``,
    ``t2`` ``[r, r, kh, kw]``: ``w1a``/``w2a`` are ``[r, out]`` and ``w1b``/``w2b`` ``[r, in]``.
    """

    w1a: Tensor = field(kw_only=True)
    w1b: Tensor = field(kw_only=True)
    w2a: Tensor = field(kw_only=True)
    w2b: Tensor = field(kw_only=True)
    t1: Tensor | None = field(default=None, kw_only=True)
    t2: Tensor | None = field(default=None, kw_only=True)

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    def _half(self, wa: Tensor, wb: Tensor, t: Tensor | None) -> Tensor:
        wa, wb = wa.to(torch.float32), wb.to(torch.float32)
        if t is not None:
            return _rebuild_tucker(t.to(torch.float32), wa, wb)
        return wa.flatten(1) @ wb.flatten(1)

    def delta(self, shape: torch.Size | None = None) -> Tensor:
        h1 = self._half(self.w1a, self.w1b, self.t1)
        h2 = self._half(self.w2a, self.w2b, self.t2)
        if h1.shape != h2.shape:
            raise ShapeError(f"LoHa halves disagree: {tuple(h1.shape)} vs {tuple(h2.shape)}")
        return _fit(h1 * h2 * self.scale, shape, "LoHa")


@dataclass(frozen=True)
class LokrPatch(Patch):
    """LoKr: ``dW = scale * kron(w1, w2)``; each factor is full or a product ``a @ b`` (``w2`` also Tucker via ``t2``).

    ``scale = alpha / r`` with ``r`` the rank of the factored part; when both factors are full, scale is 1
    (LyCORIS ignores alpha then).
    """

    w1: Tensor | None = field(default=None, kw_only=True)
    w1a: Tensor | None = field(default=None, kw_only=True)
    w1b: Tensor | None = field(default=None, kw_only=True)
    w2: Tensor | None = field(default=None, kw_only=True)
    w2a: Tensor | None = field(default=None, kw_only=True)
    w2b: Tensor | None = field(default=None, kw_only=True)
    t2: Tensor | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if (self.w1 is None) == (self.w1a is None or self.w1b is None):
            raise ShapeError("LoKr needs either w1 or both w1a and w1b")
        if (self.w2 is None) == (self.w2a is None or self.w2b is None):
            raise ShapeError("LoKr needs either w2 or both w2a and w2b")

    @property
    def rank(self) -> int | None:
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        return None

    def _w1(self) -> Tensor:
        if self.w1 is not None:
            return self.w1.to(torch.float32)
        return self.w1a.to(torch.float32) @ self.w1b.to(torch.float32)

    def _w2(self) -> Tensor:
        if self.w2 is not None:
            return self.w2.to(torch.float32)
        wa, wb = self.w2a.to(torch.float32), self.w2b.to(torch.float32)
        if self.t2 is not None:
            return _rebuild_tucker(self.t2.to(torch.float32), wa, wb)
        r, inner, *k = wb.shape
        return (wa @ wb.reshape(r, -1)).reshape(-1, inner, *k)

    def delta(self, shape: torch.Size | None = None) -> Tensor:
        w1, w2 = self._w1(), self._w2()
        if shape is not None and w2.dim() == 2 and len(shape) == 4 and math.prod(shape[2:]) > 1:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])  # conv weight stored flat in w2
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        # torch.kron views its operands and fails on a non-contiguous one (a Tucker rebuild is); LyCORIS also copies.
        return _fit(torch.kron(w1, w2.contiguous()) * self.scale, shape, "LoKr")


@dataclass(frozen=True)
class Ia3Patch(Patch):
    """(IA)^3: ``W' = W * (1 + s * w)`` per output row, or per input column when ``on_input``. No alpha."""

    weight: Tensor = field(kw_only=True)
    on_input: bool = field(default=False, kw_only=True)

    @property
    def additive(self) -> bool:
        return False

    def effect(self, weight: Tensor) -> Tensor:
        w = weight.to(torch.float32)
        v = self.weight.to(torch.float32).flatten()
        axis = 1 if self.on_input else 0
        if v.numel() != w.shape[axis]:
            raise ShapeError(
                f"(IA)^3 vector of {v.numel()} values does not fit axis {axis} of a weight of shape {tuple(w.shape)}"
            )
        view = [1] * w.dim()
        view[axis] = -1
        return w * v.reshape(view)


@dataclass(frozen=True)
class FullPatch(Patch):
    """Full difference (LyCORIS ``full``/``diff`` and ``norm``): ``dW = diff``, optional bias difference."""

    diff: Tensor = field(kw_only=True)
    diff_b: Tensor | None = field(default=None, kw_only=True)

    def delta(self, shape: torch.Size | None = None) -> Tensor:
        return _fit(self.diff.to(torch.float32), shape, "full diff")

    def bias_effect(self) -> Tensor | None:
        return _f32(self.diff_b)


def apply_patches(weight: Tensor, patches: list[tuple[Patch, float]]) -> Tensor:
    """Return ``W + sum_i s_i * D_i(W)`` accumulated in fp32 (every effect taken against the same base ``W``).

    Args:
        weight: the base weight, any float dtype.
        patches: (patch, strength) pairs.

    Returns:
        The patched weight in fp32; the caller casts once.
    """
    out = weight.to(torch.float32, copy=True)
    for patch, strength in patches:
        if strength != 0.0:
            out.add_(patch.effect(weight), alpha=strength)
    return out
