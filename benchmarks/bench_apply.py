"""Apply LoRAs at run time: lorakit against diffusers ``load_lora_weights`` / ``set_adapters`` (PEFT), in one run.

    nice -n 10 .venv/bin/python benchmarks/bench_apply.py --dir /tmp/bench_apply

1. Load + apply a rank-32 SDXL-shaped kohya LoRA (attention and feed-forward of the UNet) to an SDXL-size UNet with
   random weights (fp16, built on the meta device and filled, the same model for both sides). lorakit: ``apply_lora``
   (dynamic mode) plus one read of every adapter tensor, so lazily mapped file pages count; diffusers:
   ``load_lora_weights`` (default, and with ``low_cpu_mem_usage=True``). Floor: the file's bytes over the measured
   copy rate.
2. Change the weights of 3 loaded LoRAs: ``LoraHandle.set_weight`` x3 against ``set_adapters`` with 3 weights.
3. Dynamic-mode forward overhead on an SD1.5-size UNet (fp32, 16x16 latent, batch 1, one thread): the time a
   rank-32 LoRA adds to a forward, lorakit dynamic against PEFT as diffusers loads it. Floor: the LoRA's flops
   over the matmul rate.

Only one big model exists at a time; the LoRA files are deleted at the end.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import time
from pathlib import Path

import torch

from lorakit.arch import module_info
from lorakit.core.patches import LoraPatch
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import save_lora

_TARGETS = ("attn1.to_", "attn2.to_", "ff.net", "proj_in", "proj_out")


def _quiet() -> None:
    import diffusers
    import transformers

    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def _random_lora(arch: str, rank: int, seed: int) -> LoraFile:
    generator = torch.Generator().manual_seed(seed)
    patches = {}
    for name, info in module_info(arch, "unet").items():
        if info.kind == "linear" and any(t in name for t in _TARGETS):
            out, inp = info.shape
            down = (torch.randn(rank, inp, generator=generator) * 0.01).half()
            up = (torch.randn(out, rank, generator=generator) * 0.01).half()
            patches[Target("unet", name)] = LoraPatch(up=up, down=down, alpha=float(rank))
    return LoraFile(patches=patches, arch=arch)


def _big_unet(arch: str, dtype: torch.dtype):
    """A full-size UNet with random weights: built on meta, allocated once in ``dtype``, filled uniformly."""
    from diffusers import UNet2DConditionModel

    from lorakit.arch import load_config

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_config(arch, "unet"))
    unet = unet.to(dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.uniform_(-0.02, 0.02, generator=generator)
    return unet.eval().requires_grad_(False)


def _pipeline(arch: str, unet):
    """A diffusers pipeline around a big UNet; the other parts tiny (load_lora_weights is a pipeline method)."""
    from lorakit.models import build_tiny_pipeline

    tiny = build_tiny_pipeline(arch)
    parts = dict(tiny.components)
    parts["unet"] = unet
    return type(tiny)(**parts)


def _touch(handle) -> None:
    # read every adapter tensor once: a lazily mapped file is only loaded when touched
    for component_handle in handle._handles.values():
        for name, layer in component_handle.model.named_modules():
            adapters = getattr(layer, "adapters", None)
            if adapters is not None and handle.name in adapters:
                for t in adapters[handle.name].parameters():
                    t.data.float().sum()
                for t in adapters[handle.name].buffers():
                    t.float().sum()


def _copy_rate() -> float:
    src = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.numel() / best


def bench_load_and_switch(folder: Path) -> list[tuple[str, str, str, str]]:
    from lorakit.generate import apply_lora

    files = [
        save_lora(_random_lora("sdxl", 32, s), folder / f"sdxl_r32_{s}.safetensors", dtype=torch.float16)
        for s in range(3)
    ]
    size = files[0].stat().st_size
    for f in files:
        f.read_bytes()  # warm the page cache for both sides
    start = time.perf_counter()
    pipe = _pipeline("sdxl", _big_unet("sdxl", torch.float16))
    print(f"SDXL UNet built in {time.perf_counter() - start:.1f} s; LoRA file {size / 2**20:.0f} MiB")
    # one thread for both sides: loading is many small ops, which two threads on a shared 2-core machine slow down
    # by 10-100x (for lorakit's page-touching read as much as for PEFT's per-layer init)
    torch.set_num_threads(1)
    rows = []

    def ours_once() -> float:
        start = time.perf_counter()
        handle = apply_lora(pipe, files[0], name="l0")
        _touch(handle)
        seconds = time.perf_counter() - start
        handle.remove()
        return seconds

    def theirs_once(**kwargs) -> float:
        start = time.perf_counter()
        pipe.load_lora_weights(files[0], adapter_name="d0", **kwargs)
        seconds = time.perf_counter() - start
        pipe.unload_lora_weights()
        return seconds

    # alternate the contenders; the first call of each (imports, first-touch) is reported apart from the median
    times: dict[str, list[float]] = {"ours": [], "theirs": [], "low": []}
    for _ in range(4):
        times["ours"].append(ours_once())
        times["theirs"].append(theirs_once())
        times["low"].append(theirs_once(low_cpu_mem_usage=True))
    ours_first, theirs_first = times["ours"][0], times["theirs"][0]
    ours, theirs, theirs_low = (statistics.median(times[k][1:]) for k in ("ours", "theirs", "low"))

    handles = [apply_lora(pipe, f, name=f"l{i}") for i, f in enumerate(files)]
    ours_switch = _median_switch(lambda ws: [h.set_weight(w) for h, w in zip(handles, ws, strict=True)])
    for h in handles:
        h.remove()
    for i, f in enumerate(files):
        pipe.load_lora_weights(f, adapter_name=f"d{i}")
    theirs_switch = _median_switch(lambda ws: pipe.set_adapters(["d0", "d1", "d2"], list(ws)))
    pipe.unload_lora_weights()
    floor = size / _copy_rate()
    rows.append(
        (
            "load + apply r32 (SDXL UNet fp16), first call",
            f"{ours_first:.2f} s",
            f"{theirs_first:.2f} s",
            f"{theirs_first / ours_first:.1f}x",
        )
    )
    rows.append(("load + apply r32, median of 3 more", f"{ours:.2f} s", f"{theirs:.2f} s", f"{theirs / ours:.1f}x"))
    rows.append(("  vs low_cpu_mem_usage=True", f"{ours:.2f} s", f"{theirs_low:.2f} s", f"{theirs_low / ours:.1f}x"))
    rows.append(("  floor: file bytes / copy rate", f"{floor:.3f} s", "", ""))
    rows.append(
        (
            "set weights of 3 LoRAs",
            f"{ours_switch * 1e6:.1f} us",
            f"{theirs_switch * 1e3:.1f} ms",
            f"{theirs_switch / ours_switch:.0f}x",
        )
    )
    return rows  # the pipeline goes with this frame: one big model at a time


def _median_switch(change) -> float:
    times = []
    for i in range(7):
        weights = (0.5 + 0.1 * i, 0.8 - 0.1 * i, 0.3)
        start = time.perf_counter()
        change(weights)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _forward_time(unet, inputs, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            unet(*inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _lora_flops(unet, lora: LoraFile, inputs) -> float:
    """``2 r (in + out)`` flops per input row of every targeted Linear, rows counted by hooks in one base forward."""
    flops = [0.0]
    hooks = []
    for target, patch in lora.patches.items():
        out_f, in_f = patch.up.shape[0], patch.down.shape[1]
        cost = 2 * patch.rank * (in_f + out_f)

        def count(module, args, output, cost=cost):
            flops[0] += cost * args[0].numel() / args[0].shape[-1]

        hooks.append(unet.get_submodule(target.module).register_forward_hook(count))
    _forward_time(unet, inputs, 1)
    for hook in hooks:
        hook.remove()
    return flops[0]


def bench_forward(folder: Path, repeats: int) -> list[tuple[str, str, str, str]]:
    from lorakit.generate import apply_lora

    torch.set_num_threads(2)
    path = save_lora(_random_lora("sd1", 32, 7), folder / "sd1_r32.safetensors", dtype=torch.float32)
    pipe = _pipeline("sd1", _big_unet("sd1", torch.float32))
    torch.set_num_threads(1)  # LoRA's small matmuls are far slower with 2 threads on a shared 2-core machine
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, 4, 16, 16, generator=generator),
        torch.tensor([500]),
        torch.randn(1, 77, 768, generator=generator),
    )
    _forward_time(unet, inputs, 2)  # warm-up (oneDNN)
    lora_flops = _lora_flops(unet, _random_lora("sd1", 32, 7), inputs)
    # rounds of base / lorakit / PEFT side by side, so that load changes on the shared machine hit all three alike
    base_times, ours_times, theirs_times = [], [], []
    for _ in range(repeats):
        base_times.append(_forward_time(unet, inputs, 1))
        handle = apply_lora(pipe, path, name="dyn")
        ours_times.append(_forward_time(unet, inputs, 1))
        handle.remove()
        pipe.load_lora_weights(path, adapter_name="peft")
        theirs_times.append(_forward_time(unet, inputs, 1))
        pipe.unload_lora_weights()
    base, ours, theirs = (statistics.median(t) for t in (base_times, ours_times, theirs_times))
    ours_over = statistics.median(o - b for o, b in zip(ours_times, base_times, strict=True))
    theirs_over = statistics.median(t - b for t, b in zip(theirs_times, base_times, strict=True))
    floor = lora_flops / 60e9
    return [
        ("forward, no LoRA (SD1.5 UNet fp32, 16x16)", f"{base:.3f} s", f"{base:.3f} s", ""),
        ("forward, r32 LoRA dynamic", f"{ours:.3f} s", f"{theirs:.3f} s", ""),
        (
            "  overhead over the base (median per round)",
            f"{ours_over:+.3f} s",
            f"{theirs_over:+.3f} s",
            f"{theirs_over / max(ours_over, 1e-3):.2f}x",
        ),
        ("  floor: LoRA flops / 60 GFLOP/s", f"{floor:.3f} s", "", ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_apply"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-sdxl", action="store_true")
    args = parser.parse_args()
    _quiet()
    args.dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # random small weights make denormal activations, which are 100x slower on CPU
    rows = []
    try:
        if not args.skip_sdxl:
            rows += bench_load_and_switch(args.dir)
            gc.collect()
        rows += bench_forward(args.dir, args.repeats)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    from diffusers import __version__ as diffusers_version
    from peft import __version__ as peft_version

    print(f"\ntorch {torch.__version__}, diffusers {diffusers_version}, peft {peft_version}; 1 thread (model build: 2)")
    print(f"| {'case':<46} | {'lorakit':>12} | {'diffusers/PEFT':>14} | {'ratio':>7} |")
    print(f"|{'-' * 48}|{'-' * 14}|{'-' * 16}|{'-' * 9}|")
    for case, ours, theirs, ratio in rows:
        print(f"| {case:<46} | {ours:>12} | {theirs:>14} | {ratio:>7} |")


if __name__ == "__main__":
    main()
