"""The lorakit engine against PEFT on one plain nn.Module, in one run: attach, weight change, dynamic forward.

    .venv/bin/python benchmarks/bench_core.py            # table
    .venv/bin/python benchmarks/bench_core.py --json     # JSON instead
    .venv/bin/python benchmarks/bench_core.py --record   # table, and append it to benchmarks/RESULTS.md

The model is ``blocks`` residual blocks of four ``dim x dim`` Linear layers with ReLU (512 Linear layers by default),
built from a fixed seed. Three rank-16 LoRAs ``a``, ``b``, ``c`` go on every Linear. Before anything is timed the
script copies the same random A/B factors into both libraries and checks that lorakit, PEFT and a dense reference
(``W + sum s_i B_i A_i`` folded into a copy of the model) give the same output with all three adapters active.

Every figure is the median of several repeats after warm-up; the contenders run interleaved inside each repeat, so
load from other processes on the machine hits them alike. Timing runs on ``--threads`` torch threads (1 by default:
small ops are much slower with more on this machine).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).with_name("RESULTS.md")
NAMES = ("a", "b", "c")
WEIGHTS = (0.3, 0.6, 0.9)
TARGETS = ["fc1", "fc2", "fc3", "fc4"]

RESULTS_HEADER = """# Benchmark results

Each benchmark runs lorakit and its peer (PEFT, diffusers, a naive dense implementation) on the same input in one
process and prints a table with ratios and the floor (flops over the matmul rate, bytes over the copy rate) beside
each figure. `--record` appends the table to this file with the machine, the versions and the date; `--json` prints
the figures as JSON instead of a table.

| benchmark | what it measures | run it |
|---|---|---|
| `bench_core.py` | attaching 3 LoRAs, changing their weights, dynamic forward overhead: lorakit vs PEFT on a plain \
nn.Module with 512 Linear layers | `.venv/bin/python benchmarks/bench_core.py --record` |

The machine is shared: the load average at the start of a run is recorded with it. Contenders run interleaved within
each repeat and the median is reported, which keeps outside load from favouring one side.
"""


# --- the model --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        h = torch.relu(self.fc3(h))
        return x + self.fc4(h)


class Stack(nn.Module):
    def __init__(self, blocks: int, dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build_model(blocks: int, dim: int, seed: int) -> Stack:
    torch.manual_seed(seed)
    return Stack(blocks, dim).eval()


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# --- the contenders ---------------------------------------------------------------------------------------------
def lorakit_attach(model: nn.Module, rank: int) -> list:
    from lorakit.core import LoraConfig, attach_lora

    return [attach_lora(model, LoraConfig(rank=rank), name) for name in NAMES]


def peft_config(rank: int):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)


def peft_inject(model: nn.Module, rank: int) -> nn.Module:
    """What diffusers' ``load_lora_adapter`` does per adapter: ``inject_adapter_in_model``."""
    from peft import inject_adapter_in_model

    for name in NAMES:
        inject_adapter_in_model(peft_config(rank), model, adapter_name=name)
    return model


def peft_get_model(model: nn.Module, rank: int) -> nn.Module:
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config(rank), adapter_name=NAMES[0])
    for name in NAMES[1:]:
        peft_model.add_adapter(name, peft_config(rank))
    return peft_model


def peft_set_weights(model: nn.Module, weights: tuple[float, ...]) -> None:
    """What ``pipe.set_adapters(names, weights)`` pays on a PEFT-wrapped model."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    set_weights_and_activate_adapters(model, list(NAMES), list(weights))


def peft_set_scales(layers: list, weights: tuple[float, ...]) -> None:
    """The least PEFT can do: ``set_scale`` on every LoRA layer, the layers already collected."""
    for layer in layers:
        for name, w in zip(NAMES, weights):
            layer.set_scale(name, w)


# --- timing -----------------------------------------------------------------------------------------------------
def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    number: int = 1,
    setup: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` samples each, the functions alternating within a repeat.

    With ``setup``, each call gets a fresh ``setup()`` result (made outside the timer) as its argument.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for key, fn in fns.items():
            arg = setup() if setup is not None else None
            start = time.perf_counter()
            for _ in range(number):
                fn(arg) if setup is not None else fn()
            elapsed = (time.perf_counter() - start) / number
            if i >= warmup:
                times[key].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def matmul_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """GFLOP/s of an ``[m, k] @ [k, n]`` fp32 product on the current threads."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    reps = max(1, int(2e8 / (2 * m * k * n)))
    samples = interleaved({"mm": lambda: [a @ b for _ in range(reps)]}, repeats)["mm"]
    return 2 * m * k * n * reps / median(samples) / 1e9


def op_dispatch_us() -> float:
    """Microseconds of one tiny op (a 1x8 by 8x8 linear): the per-call cost that dominates small layers."""
    x, w = torch.randn(1, 8), torch.randn(8, 8)
    samples = interleaved({"op": lambda: torch.nn.functional.linear(x, w)}, 5, number=2000)["op"]
    return median(samples) * 1e6


# --- correctness ------------------------------------------------------------------------------------------------
@torch.no_grad()
def load_same_factors(bare: nn.Module, lk: nn.Module, pf: nn.Module, rank: int, seed: int) -> dict:
    """Random A/B for every adapter and layer, copied into both models; returns them for the dense reference."""
    from peft.tuners.lora import LoraLayer

    from lorakit.core.layer import AdaptedLayer

    gen = torch.Generator().manual_seed(seed + 1)
    lk_layers = dict(lk.named_modules())
    pf_layers = dict(pf.named_modules())
    factors = {}
    for layer_name in linear_names(bare):
        base = bare.get_submodule(layer_name)
        lk_layer, pf_layer = lk_layers[layer_name], pf_layers[layer_name]
        assert isinstance(lk_layer, AdaptedLayer) and isinstance(pf_layer, LoraLayer), layer_name
        for name in NAMES:
            down = torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features)
            up = torch.randn(base.out_features, rank, generator=gen) * 0.1 / math.sqrt(rank)
            lk_layer.adapters[name].lora_A.copy_(down)
            lk_layer.adapters[name].lora_B.copy_(up)
            pf_layer.lora_A[name].weight.copy_(down)
            pf_layer.lora_B[name].weight.copy_(up)
            factors[(layer_name, name)] = (up, down)
    return factors


@torch.no_grad()
def check_agreement(bare: nn.Module, lk: nn.Module, pf: nn.Module, factors: dict, dim: int, seed: int) -> dict:
    """lorakit, PEFT and the dense reference agree with all three adapters at 0.3/0.6/0.9; the adapters matter."""
    from peft.tuners.lora import LoraLayer

    dense = copy.deepcopy(bare)
    for layer_name in linear_names(bare):
        weight = dense.get_submodule(layer_name).weight
        for name, s in zip(NAMES, WEIGHTS):
            up, down = factors[(layer_name, name)]
            weight.add_(up @ down, alpha=s)  # alpha = rank on both sides: scale 1
    pf_layers = [m for m in pf.modules() if isinstance(m, LoraLayer)]
    active = {tuple(m.active_adapters) for m in pf_layers}
    if active != {NAMES}:
        raise AssertionError(f"PEFT layers do not have all three adapters active: {active}")
    scales = {tuple(m.scaling[n] for n in NAMES) for m in pf_layers}
    if scales != {WEIGHTS}:
        raise AssertionError(f"PEFT scalings are {scales}, not {WEIGHTS}")
    x = torch.randn(16, dim, generator=torch.Generator().manual_seed(seed + 2))
    y_bare, y_ref, y_lk, y_pf = (m(x) for m in (bare, dense, lk, pf))
    scale = y_ref.abs().max().item()
    out = {
        "adapter_effect": (y_ref - y_bare).abs().max().item() / scale,
        "lorakit_vs_dense": (y_lk - y_ref).abs().max().item() / scale,
        "peft_vs_dense": (y_pf - y_ref).abs().max().item() / scale,
        "lorakit_vs_peft": (y_lk - y_pf).abs().max().item() / scale,
    }
    if out["adapter_effect"] < 1e-2:
        raise AssertionError(f"the adapters barely change the output ({out['adapter_effect']:.2e}): nothing checked")
    for key in ("lorakit_vs_dense", "peft_vs_dense", "lorakit_vs_peft"):
        if out[key] > 1e-4:
            raise AssertionError(f"outputs disagree: {key} = {out[key]:.2e} (relative to max |y|)")
    return out


# --- the benchmark ----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    from peft.tuners.lora import LoraLayer

    torch.set_num_threads(args.threads)
    bare = build_model(args.blocks, args.dim, args.seed)
    n_linear = len(linear_names(bare))
    res: dict = {
        "config": {
            "blocks": args.blocks,
            "dim": args.dim,
            "linear_layers": n_linear,
            "rank": args.rank,
            "adapters": list(NAMES),
            "threads": torch.get_num_threads(),
            "seed": args.seed,
        }
    }

    # correctness first: same factors, same weights, all three active on both sides
    lk = copy.deepcopy(bare)
    handles = lorakit_attach(lk, args.rank)
    pf = peft_inject(copy.deepcopy(bare), args.rank)
    factors = load_same_factors(bare, lk, pf, args.rank, args.seed)
    for handle, w in zip(handles, WEIGHTS):
        handle.set_weight(w)
    peft_set_weights(pf, WEIGHTS)
    res["agreement"] = check_agreement(bare, lk, pf, factors, args.dim, args.seed)

    # context: the machine's rates
    dim = args.dim
    res["context"] = {
        "matmul_gflops_1024": matmul_rate(1024, 1024, 1024),
        "op_dispatch_us": op_dispatch_us(),
    }

    # 1. attach three adapters to a fresh copy of the model
    def init_floor(_model: nn.Module) -> None:  # allocating and initialising the factors, nothing else
        for _ in range(n_linear * len(NAMES)):
            nn.init.kaiming_uniform_(torch.empty(args.rank, dim), a=math.sqrt(5))
            torch.zeros(dim, args.rank)

    attach = interleaved(
        {
            "lorakit": lambda m: lorakit_attach(m, args.rank),
            "peft_inject": lambda m: peft_inject(m, args.rank),
            "peft_get_peft_model": lambda m: peft_get_model(m, args.rank),
            "init_floor": init_floor,
        },
        args.attach_repeats,
        setup=lambda: copy.deepcopy(bare),
    )
    res["attach_s"] = {k: median(v) for k, v in attach.items()}

    # 2. change all three weights (alternating values, so no call is a no-op)
    pf_layers = [m for m in pf.modules() if isinstance(m, LoraLayer)]
    flip = {"lk": False, "pf": False, "ps": False}

    def next_weights(key: str) -> tuple[float, ...]:
        flip[key] = not flip[key]
        return WEIGHTS if flip[key] else WEIGHTS[::-1]

    def lk_set() -> None:
        for handle, w in zip(handles, next_weights("lk")):
            handle.set_weight(w)

    lk_weight = interleaved({"lorakit": lk_set}, args.repeats, number=2000)["lorakit"]
    pf_weight = interleaved(
        {
            "peft_set_adapters": lambda: peft_set_weights(pf, next_weights("pf")),
            "peft_set_scale_loop": lambda: peft_set_scales(pf_layers, next_weights("ps")),
        },
        args.repeats,
        number=3,
    )
    res["set_weights_s"] = {"lorakit": median(lk_weight), **{k: median(v) for k, v in pf_weight.items()}}
    for handle, w in zip(handles, WEIGHTS):
        handle.set_weight(w)
    peft_set_weights(pf, WEIGHTS)

    # 3. dynamic forward with all three adapters active, against the bare model
    res["forward"] = []
    for shape in args.shapes:
        tokens = math.prod(shape)
        x = torch.randn(*shape, dim, generator=torch.Generator().manual_seed(args.seed + 3))
        reps = args.repeats if tokens <= 64 else max(3, args.repeats // 2)
        with torch.no_grad():
            t = interleaved({"bare": lambda: bare(x), "lorakit": lambda: lk(x), "peft": lambda: pf(x)}, reps, warmup=2)
        over_lk = [(lt - bt) / bt for lt, bt in zip(t["lorakit"], t["bare"])]
        over_pf = [(pt - bt) / bt for pt, bt in zip(t["peft"], t["bare"])]
        flops = 2 * tokens * dim * dim * n_linear
        adapter_flops = len(NAMES) * 4 * tokens * dim * args.rank * n_linear
        res["forward"].append(
            {
                "shape": [*shape, dim],
                "tokens": tokens,
                "bare_s": median(t["bare"]),
                "lorakit_s": median(t["lorakit"]),
                "peft_s": median(t["peft"]),
                "overhead_lorakit": median(over_lk),
                "overhead_peft": median(over_pf),
                "bare_gflop": flops / 1e9,
                "bare_gflops_rate": flops / median(t["bare"]) / 1e9,
                "flop_floor_overhead": adapter_flops / flops,
                "layer_matmul_gflops": matmul_rate(tokens, dim, dim),
            }
        )
    return res


# --- report -----------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "peft", "diffusers", "lorakit"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} µs"


def rows(res: dict) -> list[tuple[str, str, str, str, str, str, str]]:
    """(measure, lorakit, PEFT, ratio, target, met, floor/context) rows."""
    n = res["config"]["linear_layers"]
    ctx = res["context"]
    out = []
    a = res["attach_s"]
    floor = f"init of {3 * n} A/B pairs: {ms(a['init_floor'])}"
    for key, label in (
        ("peft_inject", "inject_adapter_in_model x3"),
        ("peft_get_peft_model", "get_peft_model + add_adapter x2"),
    ):
        ratio = a[key] / a["lorakit"]
        out.append(
            (
                f"1. attach 3 adapters ({label})",
                ms(a["lorakit"]),
                ms(a[key]),
                f"{ratio:.1f}x",
                "lorakit no slower",
                "yes" if ratio >= 1 else "NO",
                floor,
            )
        )
    w = res["set_weights_s"]
    for key, label, target in (
        ("peft_set_adapters", "diffusers set_weights_and_activate_adapters", True),
        ("peft_set_scale_loop", "bare set_scale loop over collected layers", False),
    ):
        ratio = w[key] / w["lorakit"]
        out.append(
            (
                f"2. set 3 weights (PEFT: {label})",
                ms(w["lorakit"]),
                ms(w[key]),
                f"{ratio:.0f}x",
                "lorakit >= 10x faster" if target else "(context)",
                ("yes" if ratio >= 10 else "NO") if target else "-",
                f"3 float stores; PEFT visits {n} layers",
            )
        )
    for f in res["forward"]:
        shape = "x".join(map(str, f["shape"]))
        lk_o, pf_o = f["overhead_lorakit"], f["overhead_peft"]
        out.append(
            (
                f"3. forward overhead, 3 active, input {shape}",
                f"{lk_o:+.0%} ({ms(f['lorakit_s'])})",
                f"{pf_o:+.0%} ({ms(f['peft_s'])})",
                f"{pf_o / lk_o:.2f}x" if lk_o > 0 else "-",
                "lorakit overhead <= PEFT's",
                "yes" if lk_o <= pf_o else "NO",
                f"bare {ms(f['bare_s'])} = {f['bare_gflop']:.2f} GFLOP at {f['bare_gflops_rate']:.0f} GFLOP/s; "
                f"flop floor {f['flop_floor_overhead']:+.0%}; layer matmul {f['layer_matmul_gflops']:.0f} "
                f"GFLOP/s; op dispatch {ctx['op_dispatch_us']:.1f} µs",
            )
        )
    return out


def markdown(res: dict, mach: dict, argv: list[str]) -> str:
    cfg = res["config"]
    v = mach["versions"]
    ag = res["agreement"]
    lines = [
        f"## bench_core — {mach['date']}",
        "",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, load average {mach['load_avg_1m']} at start; "
        f"{cfg['threads']} torch thread(s); 1024^3 fp32 matmul {res['context']['matmul_gflops_1024']:.0f} GFLOP/s",
        f"- versions: torch {v['torch']}, peft {v['peft']}, diffusers {v['diffusers']}, lorakit {v['lorakit']}, "
        f"python {mach['python']}",
        f"- model: {cfg['blocks']} residual blocks of 4 Linear {cfg['dim']}x{cfg['dim']} + ReLU "
        f"({cfg['linear_layers']} Linear), LoRAs {', '.join(cfg['adapters'])} rank {cfg['rank']} on every Linear",
        f"- agreement (max |diff| / max |y|, weights 0.3/0.6/0.9, all active): lorakit vs dense "
        f"{ag['lorakit_vs_dense']:.1e}, PEFT vs dense {ag['peft_vs_dense']:.1e}, lorakit vs PEFT "
        f"{ag['lorakit_vs_peft']:.1e}; adapters change the output by {ag['adapter_effect']:.1e}",
        f"- command: `{' '.join([os.path.relpath(sys.executable), *argv])}`",
        "",
        "| measure | lorakit | PEFT | PEFT / lorakit | target | met | floor / context |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(res)]
    return "\n".join(lines) + "\n"


def print_table(res: dict, mach: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = res["config"]
    table = Table(
        title=f"lorakit vs PEFT: {cfg['linear_layers']} Linear {cfg['dim']}x{cfg['dim']}, 3 LoRAs rank "
        f"{cfg['rank']}, {cfg['threads']} thread(s), median of repeats"
    )
    for col in ("measure", "lorakit", "PEFT", "PEFT / lorakit", "target", "met", "floor / context"):
        table.add_column(col, overflow="fold")
    for r in rows(res):
        table.add_row(*r, style=None if r[5] != "NO" else "red")
    console = Console(width=200)
    console.print(table)
    ag = res["agreement"]
    console.print(
        f"agreement: lorakit vs dense {ag['lorakit_vs_dense']:.1e}, PEFT vs dense {ag['peft_vs_dense']:.1e}, "
        f"adapter effect {ag['adapter_effect']:.1e}; {mach['cpu']}, {mach['cores']} cores, load "
        f"{mach['load_avg_1m']}; torch {mach['versions']['torch']}, peft {mach['versions']['peft']}; "
        f"1024^3 matmul {res['context']['matmul_gflops_1024']:.0f} GFLOP/s"
    )


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.lower().split("x"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--record", action="store_true", help=f"append the results to {RESULTS.name}")
    parser.add_argument("--blocks", type=int, default=128, help="residual blocks of 4 Linear (default 128)")
    parser.add_argument("--dim", type=int, default=320, help="width of every Linear (default 320)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats of the cheap parts (default 9)")
    parser.add_argument("--attach-repeats", type=int, default=5)
    parser.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        default=[(16,), (4, 64)],
        help="input shapes without the feature dim, e.g. 16 4x64 (default: 16 tokens, 4x64 tokens)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")  # PEFT warns on every second adapter injected into a plain module
    started = time.perf_counter()
    res = run(args)
    mach = machine()
    res["machine"] = mach
    res["wall_s"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res, mach)
        print(f"total {res['wall_s']:.0f} s")
    if args.record:
        cmd = ["benchmarks/bench_core.py", *(sys.argv[1:] if argv is None else argv)]
        new = not RESULTS.exists()
        with RESULTS.open("a", encoding="utf-8") as f:
            if new:
                f.write(RESULTS_HEADER)
            f.write("\n" + markdown(res, mach, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
