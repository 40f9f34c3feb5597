"""Helpers shared by the bytes-on-disk tests.

A plain module rather than a conftest.py: tests/core does ``from conftest import``, and a second conftest module
would shadow tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A tensor of random bits (NaNs included for floats); bools are 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    count = torch.Size(shape).numel()
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (count * itemsize,), generator=generator, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN-safe, unlike torch.equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def write_raw(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    """Write a file with a hand-made header: a dict/list (JSON-encoded) or raw bytes, and an optional length lie."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(raw) if length is None else length
    path.write_bytes(size.to_bytes(8, "little") + raw + data)
    return path


def make_sample_tensors() -> dict[str, torch.Tensor]:
    """One tensor per dtype, plus an empty tensor and a 0-d scalar."""
    tensors = {
        f"t_{str(dtype).removeprefix('torch.')}": random_tensor((3, 5), dtype, i) for i, dtype in enumerate(DTYPES)
    }
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.float16)
    return tensors
