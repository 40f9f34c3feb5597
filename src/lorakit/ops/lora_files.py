"""File-level merge and resize: parse ``FILE[:weight]`` arguments, load, run the pure operation, write atomically.

The output path is checked before anything is loaded (never an input, folder writable), and the result is written
in the kohya dialect (what A1111, ComfyUI and diffusers all load) with the operation recorded in the metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lorakit.errors import ConfigError
from lorakit.formats.checkpoint import model_shapes
from lorakit.formats.lora_io import load_lora, save_lora
from lorakit.formats.safetensors_writer import check_output_path
from lorakit.ops.algebra import LoraResult
from lorakit.ops.blocks import parse_block_weights
from lorakit.ops.merge import merge_loras
from lorakit.ops.resize import resize_lora

__all__ = ["merge_files", "parse_dtype", "parse_dynamic", "parse_weighted", "resize_file"]

_DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``fp16`` / ``bf16`` / ``fp32`` (or the torch names) -> a torch dtype; None passes through.

    Raises:
        ConfigError: an unknown name.
    """
    if name is None:
        return None
    if name.lower() not in _DTYPES:
        raise ConfigError(f"--dtype {name!r} is not known; use fp16, bf16 or fp32")
    return _DTYPES[name.lower()]


def parse_weighted(item: str, default: float = 1.0) -> tuple[Path, float]:
    """``style.safetensors:0.7`` -> (path, 0.7); without a number after the last colon the weight is ``default``.

    A colon that is part of the path (``C:\\loras\\a.safetensors``) stays in the path: only a trailing number counts.
    """
    head, sep, tail = item.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(item), default


def parse_dynamic(rule: str) -> dict[str, float]:
    """``fro=0.9`` / ``ratio=4`` / ``cumulative=0.8`` -> the keyword for ``resize_lora``.

    Raises:
        ConfigError: another form or a value out of range.
    """
    name, _, value = rule.partition("=")
    name = name.strip().lower()
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if name not in ("fro", "ratio", "cumulative") or not number == number:
        raise ConfigError(f"--dynamic {rule!r}: use fro=0.9, ratio=4 or cumulative=0.8")
    if (name != "ratio" and not 0.0 < number <= 1.0) or (name == "ratio" and number < 1.0):
        raise ConfigError(f"--dynamic {rule!r}: fro and cumulative take a fraction in (0, 1], ratio a value >= 1")
    return {name: number}


def merge_files(
    inputs: Sequence[tuple[str | os.PathLike[str], float]],
    output: str | os.PathLike[str],
    *,
    method: str = "concat",
    rank: int | None = None,
    conv_rank: int | None = None,
    blocks: str | None = None,
    dtype: torch.dtype | None = None,
    arch: str | None = None,
    model: str | os.PathLike[str] | None = None,
) -> LoraResult:
    """Merge LoRA files at weights (``merge_loras``) and write the result in the kohya dialect.

    Args:
        inputs: (file, weight) pairs.
        output: the ``.safetensors`` to write; may not be an input.
        method: ``concat`` (exact) or ``svd`` (best rank-``rank`` approximation).
        rank: target rank for ``svd``.
        conv_rank: target rank of k x k convs.
        blocks: an LBW block-weight spec applied to every input.
        dtype: output dtype (default: the first input's).
        arch: architecture of the inputs when their keys do not tell it.
        model: a base model whose own module names and shapes place the keys (models of custom widths).

    Returns:
        The merged LoRA and the per-module report (rank in and out, relative error, energy kept).
    """
    check_output_path(output, [path for path, _ in inputs])
    arch, modules = model_shapes(model, arch)
    loras = [(load_lora(path, arch=arch, modules=modules), weight) for path, weight in inputs]
    multipliers = None
    if blocks:
        family = arch or next((lora.arch for lora, _ in loras if lora.arch), None)
        if family is None:
            raise ConfigError("--blocks needs the architecture; the inputs do not tell it, pass --arch")
        multipliers = parse_block_weights(blocks, family)
    result = merge_loras(loras, method=method, rank=rank, conv_rank=conv_rank, dtype=dtype, multipliers=multipliers)
    record = {
        "inputs": [{"name": Path(p).name, "weight": w} for p, w in inputs],
        "method": method,
        "rank": rank,
        "conv_rank": conv_rank,
        "blocks": blocks,
    }
    result.lora.metadata = {"lorakit.merge": json.dumps(record, sort_keys=True)}
    save_lora(result.lora, output, dialect="kohya", arch=arch, modules=modules)
    return result


def resize_file(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    dynamic: str | None = None,
    max_rank: int | None = None,
    conv_rank: int | None = None,
    dtype: torch.dtype | None = None,
    arch: str | None = None,
    model: str | os.PathLike[str] | None = None,
) -> LoraResult:
    """Resize a LoRA file (``resize_lora``: exact truncation from the factors) and write it in the kohya dialect.

    Args:
        path: the input file.
        output: the ``.safetensors`` to write; may not be the input.
        rank: a fixed rank; exactly one of ``rank`` and ``dynamic``.
        dynamic: ``fro=0.9``, ``ratio=4`` or ``cumulative=0.8`` (see ``lorakit.core.lowrank.pick_rank``).
        max_rank: upper bound for a dynamic rule.
        conv_rank: fixed rank for k x k convs.
        dtype: output dtype (default: each patch's own).
        arch: architecture when the keys do not tell it.
        model: a base model whose own module names and shapes place the keys (models of custom widths).
    """
    if (rank is None) == (dynamic is None):
        raise ConfigError("give exactly one of --rank and --dynamic")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank {rank}: must be at least 1")
    rule = parse_dynamic(dynamic) if dynamic else {}
    check_output_path(output, [path])
    arch, modules = model_shapes(model, arch)
    lora = load_lora(path, arch=arch, modules=modules)
    result = resize_lora(lora, rank=rank, max_rank=max_rank, conv_rank=conv_rank, dtype=dtype, **rule)
    meta = dict(result.lora.metadata)
    for key in ("ss_network_dim", "ss_network_alpha"):
        meta.pop(key, None)
    if rank is not None:
        meta.update({"ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    meta["lorakit.resize"] = json.dumps(
        {"from": Path(path).name, "rank": rank, "dynamic": dynamic, "max_rank": max_rank, "conv_rank": conv_rank},
        sort_keys=True,
    )
    result.lora.metadata = meta
    save_lora(result.lora, output, dialect="kohya", arch=arch, modules=modules)
    return result
