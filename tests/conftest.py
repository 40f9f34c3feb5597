"""Shared fixtures: tiny seeded models that mix every layer kind the engine wraps.

Torch runs single-threaded: on the 2-core test machines small ops are far slower with two threads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

TINY_LINEARS = ["blocks.0.to_q", "blocks.0.to_v", "blocks.0.ff"]
TINY_CONVS = ["conv_in", "conv_mid", "proj"]
"""conv_in: 3x3 stride 2 padding 1; conv_mid: 3x3 padding 1 no bias; proj: 1x1."""


class TinyBlock(nn.Module):
    def __init__(self, dim: int, inner: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.ff = nn.Linear(inner, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return self.ff(F.gelu(self.to_q(h)) + self.to_v(h))


class TinyNet(nn.Module):
    """``[b, 3, 8, 8]`` -> ``[b, 16, 5]``: 3x3 strided conv, 3x3 conv, 1x1 conv, LayerNorm, three Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv_mid = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.proj = nn.Conv2d(8, 6, 1)
        self.blocks = nn.ModuleList([TinyBlock(6, 12, 5)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(x))
        h = self.proj(F.silu(self.conv_mid(h)))
        h = h.flatten(2).transpose(1, 2)
        return self.blocks[0](h)


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
    """A fresh TinyNet with seeded, non-trivial weights (LayerNorm affine too) in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    model = TinyNet()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(dtype).eval()


def tiny_input(seed: int = 0, dtype: torch.dtype = torch.float32, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(batch, 3, 8, 8, generator=gen).to(dtype)


@pytest.fixture(scope="session")
def make_tiny():
    """Factory ``make_tiny(seed=0, dtype=torch.float32)`` (session scoped, so hypothesis tests may use it)."""
    return build_tiny


@pytest.fixture(scope="session")
def make_input():
    """Factory ``make_input(seed=0, dtype=torch.float32, batch=2)`` for TinyNet."""
    return tiny_input


@pytest.fixture
def tiny() -> TinyNet:
    return build_tiny(0)


@pytest.fixture
def tiny_x() -> torch.Tensor:
    return tiny_input(0)
