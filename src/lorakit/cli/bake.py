"""``lorakit bake``: bake LoRAs into a checkpoint, streaming with bounded memory."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.merge import ArchOption, DtypeOption
from lorakit.cli.options import JsonOption, print_json
from lorakit.cli.progress import progress_bar


def register(app: typer.Typer) -> None:
    app.command("bake")(bake)


@contextlib.contextmanager
def lazy_progress(description: str, unit: str, disable: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress callback whose bar appears with the first report, so an early error prints one line only."""
    bar = progress_bar(unit=unit, disable=disable)
    task: list = []

    def update(done: int, total: int) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task(description, total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        yield update
    finally:
        if task:
            bar.stop()


def bake(
    loras: Annotated[list[str], typer.Argument(help="LoRA files, each FILE or FILE:WEIGHT (weight 1 if left out).")],
    model: Annotated[Path, typer.Option(help="The base checkpoint: a single .safetensors file or a diffusers folder.")],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The file (for a single-file model) or new folder (for a diffusers folder) to write."
        ),
    ],
    dtype: DtypeOption = None,
    blocks: Annotated[
        str | None,
        typer.Option(
            help="Block weights in LoRA Block Weight notation or a preset (MIDD, OUTALL...), applied to every LoRA."
        ),
    ] = None,
    allow_missing: Annotated[
        bool, typer.Option("--allow-missing", help="Bake what matches and report LoRA targets the checkpoint lacks.")
    ] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read a pickled .ckpt (weights only).")] = False,
    arch: ArchOption = None,
    json: JsonOption = False,
) -> None:
    """Bake LoRAs into a checkpoint: W + sum of weight x delta, in fp32, cast once; inputs never modified.

    Examples:
      lorakit bake --model sd15.safetensors style.safetensors:0.8 -o sd15_style.safetensors
      lorakit bake --model sdxl_base/ a.safetensors:0.6 b.safetensors:-0.2 --blocks OUTALL -o sdxl_baked/
    """
    from lorakit.ops.bake import bake_files
    from lorakit.ops.lora_files import parse_dtype, parse_weighted

    inputs = [parse_weighted(item) for item in loras]
    with lazy_progress("baking", "tensor", json) as progress:
        report = bake_files(
            model,
            inputs,
            output,
            dtype=parse_dtype(dtype),
            blocks=blocks,
            allow_missing=allow_missing,
            arch=arch,
            allow_pickle=allow_pickle,
            progress=progress,
        )
    if json:
        print_json(report)
        return
    console = Console()
    console.print(
        f"baked into {report.output} ({report.layout}, {report.arch}: {report.arch_reason}); "
        f"{report.tensors_changed} tensors changed, {report.tensors_copied} copied, dtype {report.dtype}"
    )
    table = Table(title="coverage")
    for col in ("LoRA", "weight", "targets", "matched"):
        table.add_column(col, justify="left" if col == "LoRA" else "right")
    for entry in report.loras:
        table.add_row(entry["name"], f"{entry['weight']:g}", str(entry["targets"]), str(entry["matched"]))
    console.print(table)
    for line in report.unmatched[:20]:
        console.print(f"not baked: {line}")
    if len(report.unmatched) > 20:
        console.print(f"... and {len(report.unmatched) - 20} more (--json lists all)")
