"""The wrapper that puts adapters on one layer, in dynamic or fused mode.

Dynamic mode: ``y = base_layer(x) + sum_i s_i * D_i x``. LoRA adapters compute ``D_i x`` as ``B(A x)`` without forming
``dW``, so the base layer may be frozen, quantized or offloaded. Kinds whose effect depends on the weight (DoRA,
(IA)^3) or that have no low-rank path (LoHa, LoKr, full) act through a dense ``sum_i s_i * D_i(W)``.

Fused mode: ``W <- cast(W + sum_i s_i * D_i(W))`` accumulated in fp32 and cast once; the original tensors are kept,
so unfusing restores them bit for bit however often it is done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lorakit.core.adapters import Adapter
from lorakit.core.patches import Patch
from lorakit.errors import ShapeError

__all__ = ["AdaptedLayer", "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


def _linear_like(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Run ``layer``'s operation with another weight and bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    raise TypeError(type(layer).__name__)


class AdaptedLayer(nn.Module):
    """A layer carrying named adapters. ``base_layer`` is the original module, untouched until fused."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.fused: set[str] = set()
        self._counted: set[str] = set()  # fused adapters already counted in their AdapterState.fused_in
        self._original: dict[str, Tensor] = {}

    @property
    def weight(self) -> Tensor:
        """The wrapped layer's weight, so code that reads ``module.weight`` (dtype, device) keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # --- adapters ---------------------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter) -> None:
        self.adapters[name] = adapter
        if name in self.fused:  # replacing a fused adapter must not leave its old effect in the weight
            self.refuse()

    def remove(self, name: str) -> None:
        self._count_fused(name, False)
        if name in self.fused:
            self.fused.discard(name)
            self.refuse()
        del self.adapters[name]

    # --- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        base, fused = self.base_layer, self.fused
        active = []
        for name, adapter in self.adapters.items():
            if name not in fused:
                s = adapter.strength()
                if s != 0.0:
                    active.append((adapter, s))
        if not active:
            return base(x, *args, **kwargs)
        if not isinstance(base, SUPPORTED_LAYERS):
            return self._forward_functional(x, active, *args, **kwargs)
        y = base(x, *args, **kwargs)
        dense = []
        for adapter, s in active:
            if adapter.low_rank:
                y = adapter.add_delta(y, x, base, s)
            else:
                dense.append((adapter, s))
        if dense:
            weight, bias = self._dense_effect(dense)
            y = y + _linear_like(self.base_layer, x.to(weight.dtype), weight, bias).to(y.dtype)
        return y

    def _dense_effect(self, active: list[tuple[Adapter, float]]) -> tuple[Tensor, Tensor | None]:
        """``sum_i s_i * D_i(W)`` and the same for the bias, in fp32."""
        base = self.base_layer.weight
        weight = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        bias = None
        for adapter, s in active:
            weight.add_(adapter.effect(base), alpha=s)
            db = adapter.bias_effect()
            if db is not None:
                bias = db * s if bias is None else bias + db * s
        return weight, bias

    def _forward_functional(self, x: Tensor, active: list[tuple[Adapter, float]], *args, **kwargs) -> Tensor:
        """Any other module with a weight (norms, embeddings): run it with the patched parameters."""
        weight, bias = self._patched([(a.to_patch(), s) for a, s in active], self._current())
        params = {"weight": weight}
        if bias is not None:
            params["bias"] = bias
        return functional_call(self.base_layer, params, (x, *args), kwargs)

    # --- fuse -------------------------------------------------------------------------------------------------
    def _current(self) -> dict[str, Tensor]:
        """The layer's own weight and bias as they are without any fused adapter."""
        if self._original:
            return dict(self._original)
        out = {"weight": self.base_layer.weight}
        if getattr(self.base_layer, "bias", None) is not None:
            out["bias"] = self.base_layer.bias
        return out

    @staticmethod
    def _patched(patches: list[tuple[Patch, float]], original: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        w0 = original["weight"]
        weight = w0.to(torch.float32, copy=True)
        bias = original.get("bias")
        bias32 = None if bias is None else bias.to(torch.float32, copy=True)
        for patch, s in patches:
            weight.add_(patch.effect(w0), alpha=s)
            db = patch.bias_effect()
            if db is not None:
                bias32 = db * s if bias32 is None else bias32 + db * s
        return weight.to(w0.dtype), None if bias32 is None else bias32.to(w0.dtype if bias is None else bias.dtype)

    def fuse(self, names: list[str] | None = None) -> None:
        """Fold the named adapters (all when None) into the base weight; the others stay dynamic."""
        chosen = set(self.adapters) if names is None else {n for n in names if n in self.adapters}
        self.fused |= chosen
        self.refuse()

    def unfuse(self) -> None:
        """Restore the original weight and bias bit for bit; every adapter becomes dynamic again."""
        self.fused.clear()
        self.refuse()

    def _count_fused(self, name: str, fused: bool) -> None:
        """Keep the adapter's count of fused layers in step with this layer's own record."""
        counted = self._counted
        if fused and name not in counted:
            counted.add(name)
            self.adapters[name].state.fused_in += 1
        elif not fused and name in counted:
            counted.discard(name)
            self.adapters[name].state.fused_in -= 1

    @torch.no_grad()
    def refuse(self) -> None:
        """Recompute the fused weight from the kept original (after a weight change or a new fused set)."""
        for name in self.adapters:
            self._count_fused(name, name in self.fused)
        if not self.fused:
            self._restore()
            return
        if not self._original:
            self._original = {k: v.detach().clone() for k, v in self._current().items()}
        patches = [(self.adapters[n].to_patch(), self.adapters[n].strength()) for n in sorted(self.fused)]
        weight, bias = self._patched(patches, self._original)
        self.base_layer.weight.data.copy_(weight)
        if bias is not None:
            if getattr(self.base_layer, "bias", None) is None:
                # attach refuses this (check_patch_fits); reaching it means a patch was swapped in afterwards
                raise ShapeError(
                    f"a bias difference cannot be fused into {type(self.base_layer).__name__} without a bias"
                )
            self.base_layer.bias.data.copy_(bias)

    @torch.no_grad()
    def _restore(self) -> None:
        for key, value in self._original.items():
            getattr(self.base_layer, key).data.copy_(value)
        self._original = {}

    def extra_repr(self) -> str:
        fused = f", fused={sorted(self.fused)}" if self.fused else ""
        return f"adapters={list(self.adapters)}{fused}"
