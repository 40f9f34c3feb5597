"""``lorakit train``: train a LoRA from a TOML config, with flags that override the file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.options import JsonOption, print_json
from lorakit.cli.progress import progress_bar


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def _overrides(**flags: Any) -> dict[str, Any]:
    """CLI flags as dotted config keys; a flag left out (None) keeps the file's value."""
    data = flags.pop("data")
    out = {
        "model.path": flags["model"],
        "model.arch": flags["arch"],
        "save.output_dir": flags["output"],
        "save.name": flags["name"],
        "save.every_steps": flags["save_every"],
        "training.steps": flags["steps"],
        "training.batch_size": flags["batch_size"],
        "training.seed": flags["seed"],
        "network.rank": flags["rank"],
        "network.alpha": flags["alpha"],
        "optimizer.lr": flags["lr"],
        "optimizer.name": flags["optimizer"],
        "preset": flags["preset"],
    }
    if data is not None:
        out["dataset.config" if Path(data).suffix == ".toml" else "dataset.path"] = str(Path(data).resolve())
    for key in ("save.output_dir", "model.path"):  # a flag's path is relative to where the command runs
        if out[key] is not None:
            out[key] = str(Path(out[key]).resolve())
    return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def train(
    config: Annotated[
        Path | None,
        typer.Argument(help="TOML config with tables model, dataset, network, optimizer, training, save, sample."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Base model: diffusers folder or .safetensors checkpoint.")] = None,
    arch: Annotated[str | None, typer.Option(help="Architecture of --model when it cannot be detected.")] = None,
    data: Annotated[str | None, typer.Option(help="Image folder, or a dataset .toml file.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output folder.")] = None,
    name: Annotated[str | None, typer.Option(help="File name stem of the LoRA.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (per process).")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: the rank).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw, adamw8bit, prodigy or lion.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Save a LoRA and a training state every N steps.")] = None,
    preset: Annotated[str | None, typer.Option(help="sd1.5, sdxl, flux, or with a memory tier: sdxl-8gb, ...")] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads (default: OMP_NUM_THREADS, else 1; small ops are far faster on one)."),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Training state folder, or the output folder (latest state).")
    ] = None,
    json: JsonOption = False,
) -> None:
    """Train a LoRA; writes NAME.safetensors (kohya format), states, samples, loss.csv and loss.png.

    Examples:
        lorakit train train.toml
        lorakit train --preset sdxl-8gb --model ./sdxl --data ./10_dog --steps 1500 -o out
        lorakit train train.toml --rank 8 --lr 2e-4 --resume out
        accelerate launch --num_processes 2 -m lorakit train train.toml
    """
    from lorakit.train.config import load_config
    from lorakit.train.loop import train as run_training

    _set_threads(threads)

    settings = load_config(
        config,
        _overrides(
            model=model,
            arch=arch,
            data=data,
            output=output,
            name=name,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            alpha=alpha,
            lr=lr,
            optimizer=optimizer,
            save_every=save_every,
            preset=preset,
        ),
    )
    base_dir = config.parent if config is not None else None
    with progress_bar("loss {task.fields[loss]:.4f}", unit="step", disable=json) as bar:
        task = bar.add_task("training", total=settings.training.steps, loss=float("nan"))
        result = run_training(
            settings,
            base_dir=base_dir,
            resume=resume,
            progress=lambda step, total, loss, smooth: bar.update(task, completed=step, loss=smooth),
        )
    if json:
        print_json(result)
        return
    _print_result(result)


def _set_threads(threads: int | None) -> None:
    import os

    import torch

    if threads is not None or (not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ):
        # a small model's ops are 10-70x slower with two threads than with one on a busy 2-core machine
        torch.set_num_threads(threads or 1)


def _print_result(result) -> None:
    table = Table(title=f"trained {result.arch} LoRA")
    table.add_column("what")
    table.add_column("value")
    table.add_row("file", str(result.output))
    table.add_row("steps", str(result.steps))
    if result.losses:
        table.add_row("loss", f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    table.add_row("trainable parameters", f"{result.trainable_params:,}")
    table.add_row("seconds per step", f"{result.seconds_per_step:.3f}")
    table.add_row("saves", str(len(result.saves)))
    table.add_row("loss log", f"{result.loss_csv}, {result.loss_png}")
    if result.samples:
        table.add_row("samples", str(result.samples[-1].parent))
    Console().print(table)
