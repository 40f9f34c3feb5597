"""``lorakit inspect`` and ``lorakit check``: what a LoRA file holds, and what is wrong with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.options import JsonOption, print_json
from lorakit.cli.progress import progress_bar

ModelOption = Annotated[
    Path | None,
    typer.Option("--model", help="Base-model checkpoint (single file or diffusers folder) to check coverage against."),
]
ArchOption = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture or variant to check against: sd1, sd2, sdxl, flux, flux-schnell, sd3..."),
]
MAX_ROWS = 20


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.command("check")(check)


def inspect(
    file: Annotated[Path, typer.Argument(help="LoRA file (.safetensors) or PEFT adapter folder.")],
    model: ModelOption = None,
    arch: ArchOption = None,
    json: JsonOption = False,
) -> None:
    """Show a LoRA's dialect, architecture, adapter kinds, ranks and alphas per block, size, trigger words, training
    facts, hashes (and whether its embedded hash is stale), non-finite values, and coverage of a base model.

    Example: lorakit inspect style.safetensors --arch sdxl
    """
    from lorakit.ops.inspect import inspect_lora

    report = inspect_lora(file, model=model, arch=arch)
    if json:
        data = dataclasses.asdict(report)
        data["embedded_hashes"] = [{**dataclasses.asdict(c), "stale": c.stale} for c in report.embedded_hashes]
        data["nonfinite"] = [{**dataclasses.asdict(n), "text": str(n)} for n in report.nonfinite]
        print_json(data)
        return
    _print_inspect(report, Console())


def _print_inspect(report, console: Console) -> None:
    kinds = ", ".join(f"{kind} x{n}" for kind, n in report.kinds.items()) or "none"
    dtypes = ", ".join(f"{d} x{n}" for d, n in report.dtypes.items())
    console.print(f"[bold]{report.path}[/bold]")
    console.print(f"dialect: {report.dialect}; architecture: {report.arch or 'unknown'} ({report.arch_reason})")
    console.print(
        f"adapters: {report.targets} targets ({kinds}); {report.tensors} tensors, {report.parameters:,} "
        f"parameters, {report.size / 1e6:.2f} MB, dtypes {dtypes}"
    )
    blocks = Table(title="rank and alpha per block")
    for column in ("block", "modules", "kinds", "rank", "alpha"):
        blocks.add_column(column, justify="left" if column in ("block", "kinds") else "right")
    for row in report.blocks:
        alphas = ", ".join("=rank" if a is None else f"{a:g}" for a in row.alphas)
        blocks.add_row(row.block, str(row.modules), ", ".join(row.kinds), ", ".join(map(str, row.ranks)), alphas)
    console.print(blocks)
    if report.trigger_phrase or report.top_tags:
        console.print(f"trigger phrase: {report.trigger_phrase or '-'}")
        console.print("top tags: " + (", ".join(f"{t} ({n})" for t, n in report.top_tags) or "-"))
    if report.training:
        facts = Table(title="training")
        facts.add_column("fact")
        facts.add_column("value")
        for label, value in report.training:
            facts.add_row(label, value)
        console.print(facts)
    _print_hashes(report, console)
    _print_problems(report, console)
    if report.coverage is not None:
        _print_coverage(report.coverage, console)


def _print_hashes(report, console: Console) -> None:
    if not report.hashes:
        return
    hashes = Table(title="hashes")
    hashes.add_column("hash")
    hashes.add_column("value")
    for name, value in report.hashes.items():
        hashes.add_row(name.replace("auto", "Auto").upper() if name != "crc32" else "CRC32", value or "-")
    for check in report.embedded_hashes:
        state = "[red]stale[/red]" if check.stale else "matches"
        hashes.add_row(f"embedded {check.key}", f"{check.stored} ({state})")
    console.print(hashes)


def _print_problems(report, console: Console) -> None:
    if report.nonfinite:
        console.print(f"[red]non-finite values in {len(report.nonfinite)} tensors:[/red]")
        for item in report.nonfinite[:MAX_ROWS]:
            console.print(f"  {item}")
    else:
        console.print("non-finite values: none")
    if report.skipped_keys:
        console.print(
            f"[red]{len(report.skipped_keys)} keys cannot be placed[/red] on the {report.arch or 'known'} module "
            "tables (names or shapes differ; for a model of custom widths pass --model PATH): "
            + ", ".join(report.skipped_keys[:5])
        )


def _print_coverage(cov, console: Console) -> None:
    console.print(
        f"coverage of {cov.model}: {len(cov.matched)} of {len(cov.matched) + len(cov.unmatched)} targets "
        f"match ({cov.matched_percent:.1f}%); the LoRA reaches {cov.modules_percent:.1f}% of the model's "
        f"Linear and conv modules ({cov.untouched} untouched)"
    )
    for miss in cov.unmatched[:MAX_ROWS]:
        console.print(f"  [red]unmatched[/red] {miss.target}: {miss.reason}")
    table = Table(title="modules by block")
    for column in ("block", "touched", "untouched"):
        table.add_column(column, justify="left" if column == "block" else "right")
    for block in cov.blocks:
        table.add_row(block.block, str(block.touched), str(block.untouched))
    console.print(table)


def check(
    files: Annotated[list[Path], typer.Argument(help="LoRA files or PEFT folders to check.")],
    model: ModelOption = None,
    arch: ArchOption = None,
    json: JsonOption = False,
) -> None:
    """Check LoRA files: unreadable or unknown keys, shapes that fit no module, NaN/inf values, stale embedded
    hashes, another architecture than --model/--arch. One line per problem; exit code 1 when any is found.

    Example: lorakit check a.safetensors b.safetensors --arch sdxl
    """
    from lorakit.ops.check import check_files

    with progress_bar(unit="file", disable=json or len(files) < 2) as bar:
        task = bar.add_task("checking", total=len(files))
        results = check_files(files, model=model, arch=arch, progress=lambda done: bar.update(task, completed=done))
    if json:
        print_json([{"path": r.path, "ok": r.ok, "problems": r.problems} for r in results])
    else:
        for result in results:
            for problem in result.problems or ["ok"]:
                print(f"{result.path}: {problem}")
    if not all(r.ok for r in results):
        raise typer.Exit(code=1)
