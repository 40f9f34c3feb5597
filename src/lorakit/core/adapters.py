"""One adapter on one layer, as an nn.Module: the trainable LoRA and a frozen patch of any kind.

Each adapter reads its strength from an ``AdapterState`` shared by every layer the adapter touches, so changing an
adapter's weight is one float assignment for the whole model: no layer is visited, nothing is rebuilt.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core.patches import LoraPatch, Patch

__all__ = ["Adapter", "AdapterState", "LoraAdapter", "PatchAdapter"]


@dataclass
class AdapterState:
    """What one named adapter shares across all its layers."""

    name: str
    weight: float = 1.0
    enabled: bool = True
    fused_in: int = 0
    """How many layers hold this adapter fused into their weight; a weight change visits layers only when > 0.
    A count, not references to layers, so that models with adapters still pickle and deep-copy."""


class Adapter(nn.Module, abc.ABC):
    """Base of the per-layer adapter modules."""

    def __init__(self, state: AdapterState) -> None:
        super().__init__()
        self.state = state
        self.multiplier = 1.0  # per-layer factor on top of the adapter's weight (block weights)

    def strength(self) -> float:
        """The strength ``s`` this adapter acts with on this layer now (0 when disabled)."""
        return self.state.weight * self.multiplier if self.state.enabled else 0.0

    @property
    def low_rank(self) -> bool:
        """True when the adapter has ``add_delta``, an output path that never forms ``dW`` (LoRA only)."""
        return False

    @abc.abstractmethod
    def to_patch(self) -> Patch:
        """The adapter as a detached canonical patch."""

    def effect(self, weight: Tensor) -> Tensor:
        """Full-strength change ``D(W)`` in fp32."""
        return self.to_patch().effect(weight)

    def bias_effect(self) -> Tensor | None:
        return self.to_patch().bias_effect()


def _conv_args(layer: nn.Module) -> dict:
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}


class LoraAdapter(Adapter):
    """LoRA on a Linear or Conv2d: ``D x = scale * B(A(dropout(x)))``, never forming ``B @ A``.

    ``lora_A`` is ``[r, in]`` (conv: ``[r, in, kh, kw]``, or ``[r, in, 1, 1]`` with a Tucker ``lora_mid``
    ``[r, r, kh, kw]``), ``lora_B`` is ``[out, r]`` (conv: ``[out, r, 1, 1]``).
    """

    def __init__(
        self,
        state: AdapterState,
        up: Tensor,
        down: Tensor,
        mid: Tensor | None,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        trainable: bool = False,
    ) -> None:
        super().__init__(state)
        self.lora_A = nn.Parameter(down, requires_grad=trainable)
        self.lora_B = nn.Parameter(up, requires_grad=trainable)
        self.lora_mid = None if mid is None else nn.Parameter(mid, requires_grad=trainable)
        self.alpha = float(alpha)
        self.rank = int(down.shape[0])
        self.use_rslora = use_rslora
        self.scale = self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def fresh(
        cls,
        state: AdapterState,
        layer: nn.Module,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        tucker: bool = False,
    ) -> LoraAdapter:
        """A new trainable adapter for ``layer``: A Kaiming-uniform, B zero."""
        weight = layer.weight
        out_f, in_f, *kernel = weight.shape
        one = [1] * len(kernel)
        use_mid = tucker and math.prod(kernel) > 1
        down = torch.empty(rank, in_f, *(one if use_mid else kernel), dtype=torch.float32, device=weight.device)
        mid = torch.empty(rank, rank, *kernel, device=weight.device) if use_mid else None
        # A random and B zero: the adapter starts as the identity on the model (dW = 0) while gradients still
        # reach B; Kaiming-uniform with a = sqrt(5) is nn.Linear's own init, so A's outputs have the layer's scale.
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        if mid is not None:
            nn.init.kaiming_uniform_(mid, a=math.sqrt(5))
        up = torch.zeros(out_f, rank, *one, dtype=torch.float32, device=weight.device)
        return cls(state, up, down, mid, alpha, dropout=dropout, use_rslora=use_rslora, trainable=True)

    @classmethod
    def from_patch(cls, state: AdapterState, patch: LoraPatch) -> LoraAdapter:
        """A frozen adapter holding a LoRA patch's factors (alpha None reads as alpha = r)."""
        alpha = patch.alpha if patch.alpha is not None else patch.rank
        return cls(
            state, patch.up.detach(), patch.down.detach(), None if patch.mid is None else patch.mid.detach(), alpha
        )

    @property
    def low_rank(self) -> bool:
        return True

    def _unscaled_delta(self, x: Tensor, layer: nn.Module) -> Tensor:
        """``B(A(dropout(x)))``, without the scale."""
        a = self.lora_A
        if not isinstance(self.dropout, nn.Identity):  # skip a module call per layer when there is no dropout
            x = self.dropout(x)
        x = x.to(a.dtype)
        if isinstance(layer, nn.Conv2d):
            if self.lora_mid is None:
                h = F.conv2d(x, a, **_conv_args(layer))
            else:
                h = F.conv2d(F.conv2d(x, a), self.lora_mid, **_conv_args(layer))
            return F.conv2d(h, self.lora_B)
        return F.linear(F.linear(x, a), self.lora_B.flatten(1))

    def forward_delta(self, x: Tensor, layer: nn.Module) -> Tensor:
        """The adapter's output ``scale * B(A x)`` at full strength for the layer's input ``x``."""
        return self._unscaled_delta(x, layer) * self.scale

    def add_delta(self, y: Tensor, x: Tensor, layer: nn.Module, s: float) -> Tensor:
        """``y + s * scale * B(A x)`` in ``y``'s dtype, as a new tensor (``y`` is not modified)."""
        # scale, strength and sum in one op
        h = self._unscaled_delta(x, layer)
        if h.dtype == y.dtype:
            return torch.add(y, h, alpha=self.scale * s)
        return y + (h * (self.scale * s)).to(y.dtype)

    def to_patch(self) -> LoraPatch:
        # An rsLoRA scale alpha/sqrt(r) is stored as the equivalent plain alpha, so every reader gets the strength.
        alpha = self.scale * self.rank
        mid = None if self.lora_mid is None else self.lora_mid.detach()
        return LoraPatch(up=self.lora_B.detach(), down=self.lora_A.detach(), mid=mid, alpha=alpha)


class PatchAdapter(Adapter):
    """A frozen patch of any kind; its tensors are buffers so that ``.to(device)`` moves them with the model."""

    def __init__(self, state: AdapterState, patch: Patch) -> None:
        super().__init__(state)
        self._template = patch
        self._names: list[str] = []
        for f in dataclasses.fields(patch):
            value = getattr(patch, f.name)
            if isinstance(value, Tensor):
                self.register_buffer(f.name, value.detach())
                self._names.append(f.name)
        if patch.dora is not None:
            self.register_buffer("dora_scale", patch.dora.magnitude.detach())

    def to_patch(self) -> Patch:
        changes = {n: getattr(self, n) for n in self._names}
        if self._template.dora is not None:
            changes["dora"] = dataclasses.replace(self._template.dora, magnitude=self.dora_scale)
        return dataclasses.replace(self._template, **changes)
