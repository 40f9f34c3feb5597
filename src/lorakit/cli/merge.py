"""``lorakit merge`` and ``lorakit resize``: combine LoRAs exactly or at a smaller rank, and change a LoRA's rank."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.options import JsonOption, print_json

OutputOption = Annotated[Path, typer.Option("--output", "-o", help="The .safetensors file to write (never an input).")]
ArchOption = Annotated[
    str | None, typer.Option(help="Architecture (sd1, sd2, sdxl, flux, sd3) when the keys do not tell it.")
]
DtypeOption = Annotated[str | None, typer.Option(help="Output dtype: fp16, bf16 or fp32.")]
ModelOption = Annotated[
    Path | None,
    typer.Option("--model", help="Base model whose module names and shapes place the keys (models of custom widths)."),
]


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
    app.command("resize")(resize)


def merge(
    loras: Annotated[
        list[str],
        typer.Argument(help="LoRA files, each FILE or FILE:WEIGHT (weight 1 if left out; negative weights subtract)."),
    ],
    output: OutputOption,
    method: Annotated[
        str,
        typer.Option(help="concat: exact, rank = sum of ranks; svd: best rank-R approximation of the weighted sum."),
    ] = "concat",
    rank: Annotated[int | None, typer.Option(help="Target rank for --method svd.")] = None,
    conv_rank: Annotated[
        int | None, typer.Option("--conv-rank", help="Target rank of 3x3 convs (default: --rank).")
    ] = None,
    blocks: Annotated[
        str | None,
        typer.Option(
            help="Block weights in LoRA Block Weight notation (17/26 values for "
            "SD1/2, 12/20 SDXL, 61 FLUX) or a preset (MIDD, OUTALL...)."
        ),
    ] = None,
    dtype: DtypeOption = None,
    arch: ArchOption = None,
    model: ModelOption = None,
    json: JsonOption = False,
) -> None:
    """Merge LoRAs into one: the weighted sum of their deltas, exactly or at a chosen rank.

    Examples:
      lorakit merge style.safetensors:0.8 detail.safetensors:0.5 -o both.safetensors
      lorakit merge a.safetensors b.safetensors:-0.3 --method svd --rank 64 -o merged.safetensors
      lorakit merge char.safetensors --blocks MIDD -o char_mid.safetensors
    """
    from lorakit.ops.lora_files import merge_files, parse_dtype, parse_weighted

    inputs = [parse_weighted(item) for item in loras]
    result = merge_files(
        inputs,
        output,
        method=method,
        rank=rank,
        conv_rank=conv_rank,
        blocks=blocks,
        dtype=parse_dtype(dtype),
        arch=arch,
        model=model,
    )
    _report(result, f"merged {len(inputs)} LoRAs into {output}", json)


def resize(
    lora: Annotated[Path, typer.Argument(help="The LoRA file to resize.")],
    output: OutputOption,
    rank: Annotated[int | None, typer.Option(help="A fixed rank for every module.")] = None,
    dynamic: Annotated[
        str | None,
        typer.Option(
            help="A rank per module: fro=0.9 (energy kept), ratio=4 (singular values >= s_max / 4) or cumulative=0.8."
        ),
    ] = None,
    max_rank: Annotated[int | None, typer.Option("--max-rank", help="Upper bound for --dynamic.")] = None,
    conv_rank: Annotated[int | None, typer.Option("--conv-rank", help="A fixed rank for 3x3 convs.")] = None,
    dtype: DtypeOption = None,
    arch: ArchOption = None,
    model: ModelOption = None,
    json: JsonOption = False,
) -> None:
    """Change a LoRA's rank: the exact best truncation, computed from the factors.

    Examples:
      lorakit resize big.safetensors --rank 32 -o small.safetensors
      lorakit resize big.safetensors --dynamic fro=0.9 --max-rank 64 -o adaptive.safetensors
    """
    from lorakit.ops.lora_files import parse_dtype, resize_file

    result = resize_file(
        lora,
        output,
        rank=rank,
        dynamic=dynamic,
        max_rank=max_rank,
        conv_rank=conv_rank,
        dtype=parse_dtype(dtype),
        arch=arch,
        model=model,
    )
    _report(result, f"resized {lora} into {output}", json)


def report_data(result, headline: str) -> dict:
    """A LoraResult as plain data: summary plus one row per module."""
    modules = [
        {
            "target": m.target,
            "rank_in": m.rank_in,
            "rank_out": m.rank_out,
            "error": m.error,
            "energy_kept": m.energy_kept,
            "method": m.method,
        }
        for m in result.modules
    ]
    return {
        "summary": headline,
        "modules_written": len(result.lora.patches),
        "worst_error": result.worst_error,
        "modules": modules,
    }


def _report(result, headline: str, json: bool) -> None:
    if json:
        print_json(report_data(result, headline))
        return
    print_modules(result, headline)


def print_modules(result, headline: str, limit: int = 15) -> None:
    """The summary and the modules with the largest error (all of them with --json)."""
    console = Console()
    console.print(f"{headline}: {len(result.lora.patches)} modules, worst relative error {result.worst_error:.3e}")
    rows = sorted(result.modules, key=lambda m: m.error, reverse=True)[:limit]
    table = Table(title=f"modules by error (top {len(rows)} of {len(result.modules)})")
    for col in ("module", "rank in", "rank out", "rel. error", "energy kept", "method"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in rows:
        table.add_row(
            m.target,
            str(m.rank_in if m.rank_in is not None else "-"),
            str(m.rank_out if m.rank_out is not None else "full"),
            f"{m.error:.3e}",
            f"{100 * m.energy_kept:.3f}%",
            m.method,
        )
    console.print(table)
