"""Extract a rank-32 LoRA from two SD1.5-size checkpoints: randomized SVD against dense (exact) SVD, in one run.

    .venv/bin/python benchmarks/bench_extract.py --dir /tmp/bench            # two 2 GB fp16 single files

The checkpoints are synthetic (``make_checkpoints.py sd15-pair``: real SD1.5 names and shapes; the tuned one differs
by a rank-16 delta plus white noise on every Linear and conv). Both methods run through ``lorakit extract`` (UNet and
text encoder, Linear and 1x1 conv modules), each in its own process: time, peak RSS (``ru_maxrss``) and the relative
Frobenius error per module. The dense method is what kohya's ``extract_lora_from_models`` does per module
(``torch.linalg.svd`` of the full difference). Floor: the randomized path costs about ``4 m n (r + p)(1 + q)``
flops per module (``p`` = 16 probes, ``q`` = 3 power iterations), printed against the machine's matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from make_checkpoints import _low_rank_change, checkpoint_layout, write_checkpoint  # noqa: E402

_RUN = """
import json, resource, sys, time
import torch
from lorakit.ops.extract import extract_to_file
start = time.perf_counter()
result = extract_to_file(sys.argv[1], sys.argv[2], sys.argv[3], rank=32, method=sys.argv[4], seed=0)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "threads": torch.get_num_threads(), "errors": {m.target: m.error for m in result.modules}}))
"""


def _run(base: Path, tuned: Path, out: Path, method: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    run = subprocess.run(
        [sys.executable, "-c", _RUN, str(base), str(tuned), str(out), method],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def _flops(errors: dict) -> float:
    from lorakit.arch import module_info

    total = 0.0
    for target in errors:
        component, module = target.split(".", 1)
        m, n = module_info("sd1", component)[module].shape[:2]
        total += 4 * m * n * (32 + 16) * (1 + 3)  # rank + probes, 1 + power iterations
    return total


def _matmul_rate() -> float:
    a = torch.randn(1024, 1024)
    a @ a
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 1024**3 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base, tuned = args.dir / "sd15_base.safetensors", args.dir / "sd15_tuned.safetensors"
    outs = [args.dir / "x_randomized.safetensors", args.dir / "x_exact.safetensors"]
    layout = checkpoint_layout("sd1", ["unet", "text_encoder"])
    try:
        write_checkpoint(base, layout, torch.float16)
        write_checkpoint(tuned, layout, torch.float16, _low_rank_change)
        fast = _run(base, tuned, outs[0], "randomized")
        exact = _run(base, tuned, outs[1], "exact")
    finally:
        if not args.keep:
            for path in (base, tuned, *outs):
                path.unlink(missing_ok=True)
    excess = [(fast["errors"][t] - e) / e for t, e in exact["errors"].items() if e > 0]
    rate = _matmul_rate()
    result = {
        "modules": len(exact["errors"]),
        "randomized": {k: v for k, v in fast.items() if k != "errors"},
        "exact": {k: v for k, v in exact.items() if k != "errors"},
        "speedup": exact["seconds"] / fast["seconds"],
        "error_excess_mean": sum(excess) / len(excess),
        "error_excess_max": max(excess),
        "mean_error_exact": sum(exact["errors"].values()) / len(exact["errors"]),
        "matmul_gflops": rate / 1e9,
        "randomized_floor_seconds": _flops(fast["errors"]) / rate,
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"SD1.5-size pair (UNet + CLIP-L, fp16, {base.stat().st_size / 1e9 if base.exists() else 2.0:.1f} GB each), "
        f"rank 32 on {result['modules']} Linear / 1x1 modules; load average {os.getloadavg()[0]:.2f}"
    )
    print("| method | seconds | peak RSS | ratio | mean rel. error |")
    print("|---|---|---|---|---|")
    mean_fast = sum(fast["errors"].values()) / len(fast["errors"])
    print(
        f"| lorakit randomized (seeded) | {fast['seconds']:.1f} | {fast['rss'] / 2**30:.2f} GiB | 1.0x | "
        f"{mean_fast:.4f} |"
    )
    print(
        f"| dense SVD per module (kohya's method) | {exact['seconds']:.1f} | {exact['rss'] / 2**30:.2f} GiB | "
        f"{result['speedup']:.1f}x slower | {result['mean_error_exact']:.4f} |"
    )
    print(
        f"randomized error above exact: mean {100 * result['error_excess_mean']:.3f}%, worst module "
        f"{100 * result['error_excess_max']:.3f}%. Floor of the randomized path: "
        f"{result['randomized_floor_seconds']:.1f} s of matmul at {rate / 1e9:.0f} GFLOP/s."
    )


if __name__ == "__main__":
    main()
