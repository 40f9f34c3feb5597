"""Reading a kohya SDXL LoRA and converting it to diffusers form: lorakit against diffusers, in one run.

    .venv/bin/python benchmarks/bench_convert.py                  # 228 MB file (rank 32, fp16), table
    .venv/bin/python benchmarks/bench_convert.py --rank 8 --json  # smaller file, JSON

The file is what kohya sd-scripts writes for a default SDXL LoRA: rank 32, fp16, every Linear of the UNet's
transformer blocks and of both text encoders' attention and MLP (986 modules, 228 MB), LDM (``input_blocks``) names,
built from lorakit's SDXL module tables with seeded random factors.

Each side runs in its own fresh interpreter, so peak memory (``ru_maxrss``) is its own:

- lorakit: ``load_lora(path)`` then ``to_state_dict(lora, "diffusers")`` (keys in diffusers' PEFT naming, alphas in
  the metadata);
- diffusers: ``StableDiffusionXLPipeline.lora_state_dict(path)`` (its kohya conversion).

Peak memory is reported above the baseline of an idle interpreter with the same imports (measured the same way).
Times are the best of ``--repeats`` runs in the same process, after the file is in the page cache. The floor is the
file's size over this machine's memory copy rate (every byte has to be read into memory once).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KOHYA_TE = r"(self_attn|mlp)\."


def build_file(path: Path, rank: int) -> int:
    """Write the SDXL kohya LoRA; returns the number of modules."""
    from lorakit.arch import tables
    from lorakit.core.patches import LoraPatch
    from lorakit.formats.canonical import LoraFile, Target
    from lorakit.formats.lora_io import save_lora

    g = torch.Generator().manual_seed(0)
    patches = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for module, info in tables.module_info("sdxl", component).items():
            wanted = ".attentions." in module if component == "unet" else re.search(KOHYA_TE, module)
            if info.kind != "linear" or not wanted:
                continue
            out, inp = info.shape
            down = (torch.randn(rank, inp, generator=g) / inp**0.5).half()
            up = (torch.randn(out, rank, generator=g) * 0.01).half()
            patches[Target(component, module)] = LoraPatch(up=up, down=down, alpha=float(rank) / 2)
    lora = LoraFile(patches=patches, metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": str(rank)})
    save_lora(lora, path, dialect="kohya", arch="sdxl")
    return len(patches)


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux): the import's transient peak then no longer hides the run's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _job(side: str, path: str, write: bool):
    if side == "lorakit":
        from lorakit.formats.lora_io import load_lora, to_state_dict
        from lorakit.formats.safetensors_io import write_file

        def run(out: str | None) -> int:
            tensors, metadata = to_state_dict(load_lora(path), "diffusers")
            if out:
                write_file(out, tensors, metadata)
            return len(tensors)

        return run
    import warnings

    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    warnings.filterwarnings("ignore")

    def run(out: str | None) -> int:
        state, _ = StableDiffusionXLPipeline.lora_state_dict(path)
        if out:
            save_file({k: v.contiguous() for k, v in state.items()}, out)
        return len(state)

    return run


def child(side: str, path: str, repeats: int, idle: bool, write: bool) -> None:
    """Run one side in this (fresh) process and print its figures as JSON."""
    torch.set_num_threads(1)
    run = _job(side, path, write)
    if idle:
        print(json.dumps({"peak_kib": _peak_kib()}))
        return
    out = str(Path(path).with_name(f"out_{side}.safetensors")) if write else None
    times, keys = [], 0
    exact = _reset_high_water_mark()
    start_rss = _status_kib("VmRSS") or 0
    for _ in range(repeats):
        start = time.perf_counter()
        keys = run(out)
        times.append(time.perf_counter() - start)
    run_peak = (_status_kib("VmHWM") or 0) - start_rss if exact else None
    print(json.dumps({"seconds": min(times), "peak_kib": _peak_kib(), "run_peak_kib": run_peak, "keys": keys}))


def _spawn(side: str, path: Path, repeats: int, idle: bool, write: bool) -> dict:
    args = [sys.executable, __file__, "--child", side, "--file", str(path), "--repeats", str(repeats)]
    args += (["--idle"] if idle else []) + (["--write"] if write else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def copy_rate(nbytes: int) -> float:
    """Bytes per second of a plain memory copy of ``nbytes`` (best of 5)."""
    source = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure(path: Path, repeats: int) -> dict:
    size = path.stat().st_size
    path.read_bytes()  # page cache: both sides read from memory, not from the disk
    result = {"file_mb": size / 1e6, "floor_seconds": size / copy_rate(size)}
    for write in (False, True):
        for side in ("lorakit", "diffusers"):
            idle = _spawn(side, path, repeats, idle=True, write=write)
            run = _spawn(side, path, repeats, idle=False, write=write)
            run_peak = run["run_peak_kib"]
            result[f"{side}{'_write' if write else ''}"] = {
                "seconds": run["seconds"],
                "keys": run["keys"],
                "peak_mb": (run["peak_kib"] - idle["peak_kib"]) * 1024 / 1e6,
                "run_peak_mb": None if run_peak is None else run_peak * 1024 / 1e6,
            }
    return result


def _row(name: str, side: dict, file_mb: float) -> str:
    run_peak = "n/a" if side["run_peak_mb"] is None else f"{side['run_peak_mb']:.1f}"
    return (
        f"{name:36} {side['seconds']:8.3f} {side['peak_mb']:14.1f} {run_peak:>14} "
        f"{(side['run_peak_mb'] or side['peak_mb']) / file_mb:11.2f} {side['keys']:6d}"
    )


def print_table(result: dict, modules: int) -> None:
    file_mb = result["file_mb"]
    print(
        f"kohya SDXL LoRA: {modules} modules, {file_mb:.1f} MB; floor (size / copy rate) "
        f"{result['floor_seconds'] * 1e3:.1f} ms"
    )
    print(f"{'':36} {'wall s':>8} {'maxrss-idle MB':>14} {'run peak MB':>14} {'peak/file':>11} {'keys':>6}")
    rows = (
        ("lorakit: read + to diffusers", "lorakit"),
        ("diffusers: lora_state_dict", "diffusers"),
        ("lorakit: same + write the file", "lorakit_write"),
        ("diffusers: same + save_file", "diffusers_write"),
    )
    for name, key in rows:
        print(_row(name, result[key], file_mb))
    for suffix in ("", "_write"):
        lk, df = result["lorakit" + suffix], result["diffusers" + suffix]
        peak_ok = (lk["run_peak_mb"] if lk["run_peak_mb"] is not None else lk["peak_mb"]) <= 1.1 * file_mb
        print(
            f"{'read + convert' if not suffix else 'read + convert + write'}: diffusers / lorakit time "
            f"{df['seconds'] / lk['seconds']:.2f}x; lorakit no slower: {lk['seconds'] <= df['seconds']}; "
            f"lorakit peak <= file size + 10%: {peak_ok}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=("lorakit", "diffusers"))
    parser.add_argument("--file")
    parser.add_argument("--idle", action="store_true")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.file, args.repeats, args.idle, args.write)
        return
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as folder:
        path = Path(folder) / "sdxl_kohya.safetensors"
        modules = build_file(path, args.rank)
        result = measure(path, args.repeats)
    result.update({"modules": modules, "rank": args.rank, "torch": torch.__version__, "cpus": os.cpu_count()})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result, modules)


if __name__ == "__main__":
    main()
