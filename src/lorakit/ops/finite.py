"""Find NaN and infinite values in a safetensors file, tensor by tensor (bounded memory).

A LoRA trained in fp16 with too high a learning rate often holds NaN or inf in a few ``lora_up`` tensors; applied, it
turns every image black. The scan reads one tensor at a time and counts in chunks, so even a full checkpoint scans
with memory bounded by its largest tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.formats.safetensors_reader import SafetensorsReader

__all__ = ["NonFinite", "scan_nonfinite", "tensor_files"]

_CHUNK = 1 << 24
"""Elements counted at once: a 64 MB fp32 temporary at most, whatever the tensor's size."""


@dataclass(frozen=True)
class NonFinite:
    """Non-finite values of one tensor.

    Attributes:
        key: the tensor's name in the file.
        nan: how many NaN values.
        posinf: how many +inf values.
        neginf: how many -inf values.
        total: the tensor's element count.
    """

    key: str
    nan: int
    posinf: int
    neginf: int
    total: int

    def __str__(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.nan, "NaN"), (self.posinf, "+inf"), (self.neginf, "-inf")) if n]
        return f"{self.key}: {', '.join(parts)} of {self.total} values"


def _count(tensor: torch.Tensor) -> tuple[int, int, int]:
    flat = tensor.reshape(-1)
    nan = posinf = neginf = 0
    for start in range(0, flat.numel(), _CHUNK):
        # fp8 and some integer-backed float types have no isnan kernel; fp32 holds every value they can.
        chunk = flat[start : start + _CHUNK].to(torch.float32)
        nan += int(torch.isnan(chunk).sum())
        posinf += int(torch.isposinf(chunk).sum())
        neginf += int(torch.isneginf(chunk).sum())
    return nan, posinf, neginf


def tensor_files(path: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a LoRA: the file itself, or every ``*.safetensors`` in a (PEFT) folder, sorted."""
    file = Path(path)
    return sorted(file.rglob("*.safetensors")) if file.is_dir() else [file]


def scan_nonfinite(path: str | os.PathLike[str]) -> list[NonFinite]:
    """Every tensor holding NaN or inf, in file order (empty when all values are finite).

    Args:
        path: a safetensors file, or a folder of them (keys then read ``relative/file.safetensors:key``).

    Raises:
        InputError: the file is missing or unreadable.
        FileFormatError: the file is not a valid safetensors file.
    """
    root = Path(path)
    found: list[NonFinite] = []
    for file in tensor_files(root):
        prefix = f"{file.relative_to(root)}:" if root.is_dir() else ""
        with SafetensorsReader(file) as reader:
            for key in reader.keys():
                if not reader.dtype(key).is_floating_point:
                    continue
                nan, posinf, neginf = _count(reader.get(key))
                if nan or posinf or neginf:
                    found.append(
                        NonFinite(
                            prefix + key, nan, posinf, neginf, reader.entry(key).nbytes // reader.dtype(key).itemsize
                        )
                    )
    return found
