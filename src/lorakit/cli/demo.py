"""``lorakit demo``: the main job on what ships with lorakit."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.options import JsonOption, print_json
from lorakit.cli.progress import progress_bar


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    steps: Annotated[int, typer.Option(help="Training steps of the demo LoRA.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the model, data and adapters.")] = 0,
    json: JsonOption = False,
) -> None:
    """Train a LoRA on a small model, stack a LoHa on it, switch weights, fuse and unfuse, and print what changed.

    Example: lorakit demo --steps 300
    """
    import torch

    from lorakit.demo.engine import run_engine_demo

    torch.set_num_threads(1)  # small ops: one thread is much faster on a 2-core machine
    with progress_bar("loss {task.fields[loss]:.3e}", unit="step", disable=json) as bar:
        task = bar.add_task("training LoRA", total=steps, loss=float("nan"))
        report = run_engine_demo(steps=steps, seed=seed,
                                 progress=lambda step, loss: bar.update(task, completed=step, loss=loss))
    if json:
        print_json(report)
        return
    _print_report(report)


def _print_report(report) -> None:
    console = Console()
    console.print(f"model: {report.layers} Linear layers, {report.base_params:,} frozen parameters; "
                  f"LoRA r4 on {report.targeted} layers: {report.trainable_params:,} trainable")
    console.print(f"training: loss {report.losses[0]:.3e} -> {report.losses[-1]:.3e} in {len(report.losses)} steps, "
                  f"{report.train_seconds:.1f} s")
    table = Table(title="outputs by adapter weight (relative L2)")
    for col in ("learned LoRA", "LoHa", "distance to target", "change from base"):
        table.add_column(col, justify="right")
    for row in report.rows:
        table.add_row(f"{row['learned']:.1f}", f"{row['loha']:.1f}", f"{row['to_target']:.4f}",
                      f"{row['from_base']:.4f}")
    console.print(table)
    checks = Table(title="engine checks")
    checks.add_column("check")
    checks.add_column("result", justify="right")
    checks.add_row("set_weight (whole model)", f"{report.set_weight_us:.2f} us")
    checks.add_row("fused vs dynamic, max |diff|", f"{report.fused_vs_dynamic:.2e}")
    checks.add_row("unfuse restores the base bit for bit", str(report.unfuse_exact))
    checks.add_row("detach restores the model bit for bit", str(report.detach_exact))
    console.print(checks)
