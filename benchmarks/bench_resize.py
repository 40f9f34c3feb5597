"""Resize rank 128 -> 32: lorakit (QR + r x r SVD from the factors) against a dense SVD per module, in one run.

    .venv/bin/python benchmarks/bench_resize.py                 # a sample of SDXL UNet Linear modules
    .venv/bin/python benchmarks/bench_resize.py --modules 0     # every SDXL UNet Linear (743 modules, slow peer)
    .venv/bin/python benchmarks/bench_resize.py --json

The dense peer is what kohya's resize does per module: form ``B @ A`` (``out x in``), run ``torch.linalg.svd`` on
it, keep the top ``R`` singular triplets. Both sides give the same best rank-``R`` truncation; the script checks the
relative Frobenius errors agree before it reports the times. Shapes are SDXL's UNet Linear layers from lorakit's
bundled architecture table; the factors are random with a decaying spectrum like trained LoRAs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lorakit.arch import module_info
from lorakit.core.lowrank import factor_svd, truncate


def _modules(sample: int) -> list[tuple[str, tuple[int, ...]]]:
    linear = [(n, i.shape) for n, i in module_info("sdxl", "unet").items() if i.kind == "linear"]
    if sample and sample < len(linear):
        step = len(linear) / sample
        linear = [linear[int(i * step)] for i in range(sample)]
    return linear


def _factors(shape: tuple[int, ...], rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(rank) / (rank / 4))
    up = torch.randn(shape[0], rank, generator=g) * decay
    down = torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5
    return up, down


def _dense(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[float, float]:
    start = time.perf_counter()
    dense = up @ down
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    seconds = time.perf_counter() - start
    return seconds, float((approx - dense).norm() / dense.norm())


def _ours(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[float, float]:
    start = time.perf_counter()
    _, _, error = truncate(factor_svd(up, down), rank)
    return time.perf_counter() - start, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=40, help="sample size (0 = all SDXL UNet Linear modules)")
    parser.add_argument("--rank-in", type=int, default=128)
    parser.add_argument("--rank-out", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modules = _modules(args.modules)
    _ours(*_factors((320, 320), args.rank_in, 0), args.rank_out)  # warm-up
    _dense(*_factors((320, 320), args.rank_in, 0), args.rank_out)
    ours_t = dense_t = worst = 0.0
    for i, (_, shape) in enumerate(modules):
        up, down = _factors(shape, args.rank_in, i)
        t1, e1 = _ours(up, down, args.rank_out)
        t2, e2 = _dense(up, down, args.rank_out)
        ours_t, dense_t, worst = ours_t + t1, dense_t + t2, max(worst, abs(e1 - e2))
    result = {
        "modules": len(modules),
        "rank": f"{args.rank_in}->{args.rank_out}",
        "threads": args.threads,
        "lorakit_s": round(ours_t, 3),
        "dense_svd_s": round(dense_t, 3),
        "speedup": round(dense_t / ours_t, 1),
        "max_error_difference": worst,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"SDXL UNet Linear modules: {result['modules']}, rank {result['rank']}, {args.threads} threads")
    print("| method | seconds | ratio |")
    print("|---|---|---|")
    print(f"| lorakit (QR + {args.rank_in}x{args.rank_in} SVD) | {ours_t:.3f} | 1.0x |")
    print(f"| dense SVD per module (kohya's method) | {dense_t:.3f} | {dense_t / ours_t:.1f}x slower |")
    print(f"relative Frobenius errors agree within {worst:.1e}")


if __name__ == "__main__":
    main()
