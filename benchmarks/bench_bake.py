"""Bake a LoRA into a full-size checkpoint: lorakit's streaming bake against a plain ``cp`` of the file, in one run.

    .venv/bin/python benchmarks/bench_bake.py --arch sdxl --dir /tmp/bench     # 6.8 GB fp16 SDXL single file
    .venv/bin/python benchmarks/bench_bake.py --arch flux --dir /tmp/bench     # 23.8 GB bf16 FLUX (BFL) file

The checkpoint and the LoRA are synthetic (``make_checkpoints.py``: real key names and shapes). Each contender runs
in its own process; peak memory is that process's ``ru_maxrss`` (lorakit reads with plain reads, so no mapped pages
inflate it). ``cp`` runs first and again last, so the page cache is as warm for it as for the bake. A few baked
tensors are checked against ``W + w * scale * B @ A`` computed densely here. Files are deleted at the end unless
``--keep``. Floor: the bytes read and written over the measured ``cp`` rate (the bake must read and write the file
once, like ``cp``).
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
from make_checkpoints import checkpoint_layout, make_lora, write_checkpoint  # noqa: E402

_BAKE = """
import json, resource, sys, time
import torch
from lorakit.ops.bake import bake_files
start = time.perf_counter()
report = bake_files(sys.argv[1], [(sys.argv[2], 0.8)], sys.argv[3])
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "rss": rss, "changed": report.tensors_changed, "matched": report.matched,
                  "unmatched": len(report.unmatched)}))
"""

_LAYOUTS = {
    "sdxl": (["unet", "text_encoder", "text_encoder_2"], True, torch.float16, 32),
    "flux": (["transformer"], False, torch.bfloat16, 16),
}


def _cp(src: Path, dst: Path, sync: bool = False) -> float:
    """``cp`` of the file; with ``sync`` also fsync the copy (the bake fsyncs its output before renaming it)."""
    start = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    if sync:
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - start
    dst.unlink()
    return seconds


def _check(base: Path, lora_path: Path, out: Path, count: int = 4) -> float:
    """Largest |baked - dense reference| over a few changed tensors, in units of the output dtype's rounding step
    (eps * max |reference|): at most about 1 means equal up to the final cast."""
    from lorakit.formats.checkpoint import Checkpoint
    from lorakit.ops.bake import _to_diffusers, load_for_checkpoint

    worst = 0.0
    with Checkpoint.open(base) as a, Checkpoint.open(out) as b:
        lora = load_for_checkpoint(lora_path, a)
        targets = [t for t in lora.patches if t.rows is None][:: max(1, len(lora.patches) // count)][:count]
        for target in targets:
            ref = a.weight_ref(target.component, target.module)
            w = a.read(ref.key)
            w = w if ref.rows is None else w[ref.rows[0] : ref.rows[1]]
            w = _to_diffusers(w, ref.transform).float()
            delta = 0.8 * lora.patches[target].delta(w.shape)
            want = (w + delta).to(b.dtype(ref.key))
            got = b.read(ref.key)
            got = _to_diffusers(got if ref.rows is None else got[ref.rows[0] : ref.rows[1]], ref.transform)
            step = torch.finfo(want.dtype).eps * float(want.float().abs().max())
            worst = max(worst, float((got.float() - want.float()).abs().max()) / step)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(_LAYOUTS), default="sdxl")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    parts, prefixed, dtype, rank = _LAYOUTS[args.arch]
    base, lora, out = args.dir / f"{args.arch}.safetensors", args.dir / f"{args.arch}_lora.safetensors", None
    try:
        start = time.perf_counter()
        size = write_checkpoint(base, checkpoint_layout(args.arch, parts, prefixed=prefixed), dtype)
        build = time.perf_counter() - start
        modules = make_lora(args.arch, lora, rank, seed=0)
        cp_first = _cp(base, args.dir / "copy.safetensors")
        out = args.dir / f"{args.arch}_baked.safetensors"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        run = subprocess.run(
            [sys.executable, "-c", _BAKE, str(base), str(lora), str(out)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        bake = json.loads(run.stdout.strip().splitlines()[-1])
        error = _check(base, lora, out)
        out.unlink()  # disk: at most two copies of the checkpoint at a time (48 GB for FLUX)
        cp_last = _cp(base, args.dir / "copy.safetensors")
        cp_sync = _cp(base, args.dir / "copy.safetensors", sync=True)
    finally:
        if not args.keep:
            for path in (base, lora, out, args.dir / "copy.safetensors"):
                if path is not None:
                    path.unlink(missing_ok=True)
    cp_time = min(cp_first, cp_last)  # the faster cp: the stricter target
    result = {
        "arch": args.arch,
        "size_bytes": size,
        "build_seconds": build,
        "lora_modules": modules,
        "rank": rank,
        "cp_seconds": [cp_first, cp_last],
        "cp_fsync_seconds": cp_sync,
        "bake": bake,
        "ratio_vs_cp": bake["seconds"] / cp_time,
        "check_worst_relative": error,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    gb = size / 1e9
    print(
        f"{args.arch}: {gb:.2f} GB {str(dtype).removeprefix('torch.')} single file, LoRA rank {rank} on {modules} "
        f"modules, weight 0.8; {bake['changed']} tensors changed; load average {os.getloadavg()[0]:.2f}"
    )
    print("| contender | seconds | peak RSS | vs cp |")
    print("|---|---|---|---|")
    print(f"| cp (first, last) | {cp_first:.1f}, {cp_last:.1f} | - | 1.0x |")
    print(f"| cp + fsync of the copy | {cp_sync:.1f} | - | {cp_sync / cp_time:.2f}x |")
    print(f"| lorakit bake | {bake['seconds']:.1f} | {bake['rss'] / 2**30:.2f} GiB | {result['ratio_vs_cp']:.2f}x |")
    print(
        f"floor: {gb:.1f} GB read + written at the cp rate ({gb / cp_time:.2f} GB/s) = {cp_time:.1f} s; "
        f"a whole-model load in fp32 would need {2 * gb:.1f} GB. Baked tensors match the dense reference within "
        f"{error:.2f} rounding steps of the output dtype."
    )


if __name__ == "__main__":
    main()
