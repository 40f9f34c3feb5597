"""Lean activations: frozen layers keep for the backward pass only what their input gradient needs. Exact.

A LoRA run freezes the base model, but PyTorch's convolution saves its input for the backward pass whatever is
frozen (the input is only needed for the weight's gradient). In a UNet those inputs are the largest activations
there are, kept for nothing. And GEGLU (the SD1/SD2/SDXL feed-forward) keeps both its projection and the GELU of
the gate, where the GELU is cheap to compute again from the projection.

``lean_activations(module)`` makes every frozen ``nn.Conv2d`` save only its weight, and every GEGLU save only its
projection. The backward passes call the very kernels autograd calls (``convolution_backward`` for the input
gradient only, ``gelu_backward``), so the gradients are the same bits; tests compare them. The effect lasts until
the returned handle's ``remove()``.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LeanHandle", "lean_activations"]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype a convolution runs in under the current autocast, or None when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class _FrozenConv2d(torch.autograd.Function):
    """``conv2d`` with a frozen weight: saves the weight, not the input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> Tensor:  # type: ignore[override]
        dtype = _autocast_dtype(x.device)
        if dtype is not None:  # do what autocast does to a convolution, then turn it off for the kernel
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.save_for_backward(weight)
        ctx.shape, ctx.conv, ctx.dtype = x.shape, conv, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        conv = ctx.conv
        grad_input = torch.nn.grad.conv2d_input(
            ctx.shape, weight, grad.to(weight.dtype), conv.stride, conv.padding, conv.dilation, conv.groups
        )
        return grad_input, None, None, None


def _lean_conv_forward(self: nn.Conv2d, x: Tensor) -> Tensor:
    if (
        not torch.is_grad_enabled()
        or not x.requires_grad
        or self.weight.requires_grad
        or (self.bias is not None and self.bias.requires_grad)
        or self.padding_mode != "zeros"
        or isinstance(self.padding, str)
    ):
        return nn.Conv2d.forward(self, x)
    return _FrozenConv2d.apply(x, self.weight, self.bias, self)


class _Geglu(torch.autograd.Function):
    """``hidden * gelu(gate)`` of a projection ``[hidden, gate]``: saves the projection only."""

    @staticmethod
    def forward(ctx, projection: Tensor) -> Tensor:  # type: ignore[override]
        hidden, gate = projection.chunk(2, dim=-1)
        ctx.save_for_backward(projection)
        return hidden * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (projection,) = ctx.saved_tensors
        hidden, gate = projection.chunk(2, dim=-1)
        grad_gate = torch.ops.aten.gelu_backward(grad * hidden, gate)
        return torch.cat([grad * F.gelu(gate), grad_gate], dim=-1)


def _geglu_class() -> type | None:
    try:
        from diffusers.models.activations import GEGLU
    except ImportError:  # pragma: no cover - diffusers is part of the diffusion extra that training needs
        return None
    return GEGLU


def _make_lean_geglu_forward(original: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def forward(self: nn.Module, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs or not torch.is_grad_enabled() or hidden_states.device.type not in ("cpu", "cuda"):
            return original(self, hidden_states, *args, **kwargs)
        projection = self.proj(hidden_states)
        if not projection.requires_grad:
            hidden, gate = projection.chunk(2, dim=-1)
            return hidden * F.gelu(gate)
        return _Geglu.apply(projection)

    return forward


class LeanHandle:
    """The modules made lean; ``remove()`` gives them back their own forward."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.modules = []

    def __len__(self) -> int:
        return len(self.modules)


def lean_activations(model: nn.Module) -> LeanHandle:
    """Make the frozen convolutions and the GEGLUs of ``model`` keep less for the backward pass (see the module
    doc). A convolution whose weight trains later is still handled right: the choice is made at each call.

    Only modules that run the stock forward are changed (a subclass with its own forward is left alone).
    """
    geglu = _geglu_class()
    lean_geglu = _make_lean_geglu_forward(geglu.forward) if geglu is not None else None
    changed = []
    for module in model.modules():
        if "forward" in module.__dict__:
            continue  # already lean, or someone else's override
        if isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward:
            module.forward = types.MethodType(_lean_conv_forward, module)
        elif geglu is not None and isinstance(module, geglu) and type(module).forward is geglu.forward:
            module.forward = types.MethodType(lean_geglu, module)
        else:
            continue
        changed.append(module)
    return LeanHandle(changed)
