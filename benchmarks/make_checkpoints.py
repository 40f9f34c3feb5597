"""Synthetic full-size checkpoints and LoRAs for the bake / extract / merge benchmarks.

    .venv/bin/python benchmarks/make_checkpoints.py sdxl /tmp/bench/sdxl.safetensors        # 6.9 GB fp16
    .venv/bin/python benchmarks/make_checkpoints.py flux /tmp/bench/flux.safetensors        # 23.8 GB bf16
    .venv/bin/python benchmarks/make_checkpoints.py sd15-pair /tmp/bench/base.safetensors /tmp/bench/tuned.safetensors
    .venv/bin/python benchmarks/make_checkpoints.py lora sdxl /tmp/bench/a.safetensors --rank 32 --seed 0

Checkpoints have the real key names and shapes of A1111 / BFL single files (UNet / transformer and text encoders in
original naming, fused q/k/v, biases), taken from lorakit's bundled architecture tables; values are Gaussian (scale
0.02), drawn once into a pool and sliced, so writing is disk-bound. Files are streamed (``TensorSource`` through the
bake's direct-I/O writer, ``lorakit.ops.bake_io.write_direct``), never held in memory. ``sd15-pair`` writes a base
and a "fine-tuned" copy whose Linear and conv weights differ by a rank-16 delta plus a little noise, so an extracted
LoRA has a known answer. LoRAs are kohya files
on every attention Linear of the UNet and the text encoders (SD), or every block Linear of the transformer (FLUX).
"""

from __future__ import annotations

import argparse
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from lorakit.arch import checkpoint_prefix, components, module_info, original_map, reverse_map
from lorakit.arch.refs import TRANSPOSE
from lorakit.core.patches import LoraPatch
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import save_lora
from lorakit.formats.safetensors_writer import TensorSource
from lorakit.ops.bake_io import write_direct

Layout = list[tuple[str, tuple[int, ...], str, str]]
"""(key, stored shape, component, module of the first member or '')."""


def checkpoint_layout(arch: str, parts: list[str], *, prefixed: bool = True) -> Layout:
    """Every stored tensor of a single file of ``arch`` (weights and biases), in original names."""
    out: Layout = []
    for component in parts:
        prefix = checkpoint_prefix(arch, component) if prefixed else ""
        info = module_info(arch, component)
        fused = reverse_map(arch, component)
        for module, ref in original_map(arch, component).items():
            members = fused[ref.module]
            if ref.rows is not None and members[0].module != module:
                continue
            rows = sum(info[m.module].shape[0] for m in members) if ref.rows else info[module].shape[0]
            shape = (rows, *info[module].shape[1:])
            if ref.transform == TRANSPOSE:
                shape = tuple(reversed(shape))
            out.append((prefix + ref.key, shape, component, module))
            if info[module].bias and ref.bias_key is not None:
                out.append((prefix + ref.bias_key, (rows,), component, ""))
    return out


class Pool:
    """Gaussian values drawn once; tensors are slices at varying offsets (cheap, not all equal)."""

    def __init__(self, largest: int, dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.values = (torch.randn(largest + 4_000_037, generator=g) * 0.02).to(dtype)
        self.count = 0

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        self.count += 1
        start = (self.count * 1_000_003) % (self.values.numel() - n + 1)
        return self.values[start : start + n].view(shape)


def write_checkpoint(
    path: Path, layout: Layout, dtype: torch.dtype, change: Callable[[str, torch.Tensor], torch.Tensor] | None = None
) -> int:
    """Stream a checkpoint to ``path``; ``change(key, tensor)`` may alter a tensor (the tuned copy)."""
    pool = Pool(max(math.prod(s) for _, s, _, _ in layout), dtype)
    order = {key: i for i, (key, _, _, _) in enumerate(layout)}

    def source(key: str, shape: tuple[int, ...]) -> TensorSource:
        def produce() -> torch.Tensor:
            pool.count = order[key]  # the same key gets the same values in every file
            tensor = pool.take(shape)
            return change(key, tensor) if change is not None else tensor

        return TensorSource(key, dtype, shape, produce)

    # the direct-I/O writer of the bake: same bytes as write_file, several times faster on virtual disks
    return write_direct(path, [source(k, s) for k, s, _, _ in layout], {"modelspec.title": "synthetic"})


def _low_rank_change(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() < 2 or "embedding" in key:
        return tensor
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    rows, cols = tensor.shape[0], math.prod(tensor.shape[1:])
    delta = torch.randn(rows, 16, generator=g) @ torch.randn(16, cols, generator=g) * (0.004 / 4)
    delta += torch.randn(rows, cols, generator=g) * 2e-4
    return (tensor.float() + delta.reshape(tensor.shape)).to(tensor.dtype)


def lora_targets(arch: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(component, module, shape): attention Linears of an SD UNet and its encoders, FLUX block Linears."""
    out = []
    for component in components(arch):
        for module, info in module_info(arch, component).items():
            if info.kind != "linear" or (arch == "flux" and component != "transformer"):  # BFL files hold no encoders
                continue
            if component == "unet" and ".attentions." not in module:
                continue
            if component == "transformer" and "transformer_blocks." not in module:
                continue
            if component.startswith("text_encoder") and ".layers." not in module:
                continue
            out.append((component, module, info.shape))
    return out


def make_lora(arch: str, path: Path, rank: int, seed: int) -> int:
    """A kohya LoRA of rank ``rank`` with a decaying spectrum (like trained ones), fp16."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(rank) / (rank / 4))
    patches = {}
    for component, module, shape in lora_targets(arch):
        up = (torch.randn(shape[0], rank, generator=g) * decay * 0.01).half()
        down = (torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5).half()
        patches[Target(component, module)] = LoraPatch(up=up, down=down, alpha=rank / 2)
    save_lora(LoraFile(patches=patches, arch=arch), path, dialect="kohya", arch=arch)
    return len(patches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["sdxl", "flux", "sd15-pair", "lora"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.what == "sdxl":
        layout = checkpoint_layout("sdxl", ["unet", "text_encoder", "text_encoder_2"])
        print(f"{args.paths[0]}: {write_checkpoint(Path(args.paths[0]), layout, torch.float16) / 1e9:.2f} GB")
    elif args.what == "flux":
        # BFL's own file: the transformer alone, no key prefix
        layout = checkpoint_layout("flux", ["transformer"], prefixed=False)
        print(f"{args.paths[0]}: {write_checkpoint(Path(args.paths[0]), layout, torch.bfloat16) / 1e9:.2f} GB")
    elif args.what == "sd15-pair":
        layout = checkpoint_layout("sd1", ["unet", "text_encoder"])
        base, tuned = Path(args.paths[0]), Path(args.paths[1])
        print(f"{base}: {write_checkpoint(base, layout, torch.float16) / 1e9:.2f} GB")
        print(f"{tuned}: {write_checkpoint(tuned, layout, torch.float16, _low_rank_change) / 1e9:.2f} GB")
    else:
        arch, path = args.paths[0], Path(args.paths[1])
        print(f"{path}: {make_lora(arch, path, args.rank, args.seed)} modules, rank {args.rank}")


if __name__ == "__main__":
    main()
