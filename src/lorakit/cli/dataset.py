"""``lorakit dataset``: check a training dataset before training on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.options import JsonOption, print_json
from lorakit.cli.progress import progress_bar
from lorakit.errors import ConfigError, LorakitError

dataset_app = typer.Typer(help="Check training datasets (folders of images and captions).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(dataset_app, name="dataset")


@dataset_app.command("check")
def check(
    folder: Annotated[
        Path | None,
        typer.Argument(help="Folder of images, or a parent of N_name folders (kohya layout). Optional with --config."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML dataset file (several folders, per-folder settings).")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Training resolution to check against (default 512, or the file's).")
    ] = None,
    no_upscale: Annotated[
        bool | None, typer.Option("--no-upscale", help="Keep small images small (bucket_no_upscale).")
    ] = None,
    json: JsonOption = False,
) -> None:
    """Find what is wrong with a dataset (missing or empty captions, corrupt or tiny images, duplicates, folder
    names kohya users get wrong, stray files) and preview its aspect buckets. Changes nothing.

    Exit status: 0 when there are no errors (warnings allowed), 1 when there are errors, 2 when the dataset cannot
    be read at all.

    Examples: lorakit dataset check train/ --resolution 1024;  lorakit dataset check --config dataset.toml --json
    """
    try:
        from lorakit.train.data.check import check_dataset
    except ImportError as exc:  # Pillow is in the "diffusion" extra
        raise LorakitError(f"lorakit dataset check needs Pillow ({exc}); pip install 'lorakit[diffusion]'") from None
    from lorakit.train.data.config import DatasetConfig, load_dataset_config

    overrides = {"resolution": resolution, "bucket_no_upscale": no_upscale}
    if config is not None:
        dataset = load_dataset_config(config, **overrides)
    elif folder is not None:
        dataset = DatasetConfig.for_folder(folder, **{k: v for k, v in overrides.items() if v is not None})
    else:
        raise ConfigError("give a dataset folder or --config FILE; e.g. lorakit dataset check train/")
    with progress_bar(unit="image", disable=json) as bar:
        task = bar.add_task("reading images", total=None)
        report = check_dataset(dataset, progress=lambda done, total: bar.update(task, completed=done, total=total))
    if json:
        print_json({**_as_dict(report), "errors": report.errors, "warnings": report.warnings})
    else:
        _print_report(report)
    if report.errors:
        raise typer.Exit(1)


def _as_dict(report) -> dict:
    import dataclasses

    return dataclasses.asdict(report)


def _shown(path: str) -> str:
    # Paths relative to the current folder read better; fall back to the absolute path outside it.
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return path if relative.startswith("..") else relative


def _print_report(report) -> None:
    console = Console(width=max(Console().width, 140))
    console.print(
        f"{report.images} images, {report.per_epoch} samples per epoch (repeats counted), "
        f"resolution {report.resolution}, in {', '.join(_shown(f) for f in report.folders)}"
    )
    if report.problems:
        table = Table(title="problems")
        for column in ("severity", "path", "problem", "fix"):
            table.add_column(column, overflow="fold")
        for p in report.problems:
            style = "red" if p.severity == "error" else "yellow"
            table.add_row(f"[{style}]{p.severity}[/{style}]", _shown(p.path), p.problem, p.fix)
        console.print(table)
    if report.buckets:
        buckets = Table(title="aspect buckets")
        for column in ("bucket (w x h)", "aspect", "images", "per epoch"):
            buckets.add_column(column, justify="right")
        for row in report.buckets:
            buckets.add_row(
                f"{row.width} x {row.height}", f"{row.width / row.height:.2f}", str(row.images), str(row.per_epoch)
            )
        console.print(buckets)
    verdict = "[red]errors: training would refuse this dataset[/red]" if report.errors else "[green]ok[/green]"
    console.print(f"{report.errors} error(s), {report.warnings} warning(s): {verdict}")
