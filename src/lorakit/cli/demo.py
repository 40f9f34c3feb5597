"""``lorakit demo``: the main job on what ships with lorakit (``--engine``: the adapter engine on a plain module)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.options import JsonOption, print_json
from lorakit.cli.progress import progress_bar


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for data, LoRAs, grid and report.")] = Path(
        "demo-out"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the data, training and generation.")] = 0,
    model: Annotated[
        str | None, typer.Option(help="A diffusers folder pretrained like the embedded model (default: embedded).")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Training steps of each LoRA (default: 500 concept, 400 style; --engine: 300)."),
    ] = None,
    quick: Annotated[
        bool, typer.Option(help="A reduced run (few images, steps and prompts) that only checks.")
    ] = False,
    engine: Annotated[
        bool, typer.Option(help="Instead: the adapter engine walkthrough on a plain module (seconds).")
    ] = False,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (the tiny model is fastest on one).")] = 1,
    json: JsonOption = False,
) -> None:
    """Teach the embedded base model a new concept and a style with two LoRAs, and measure them.

    Writes a kohya dataset (16 images + regularization images) per LoRA and trains both with `lorakit train`.
    Draws a grid (base, concept at 0 / 0.5 / 1, style, both) and writes report.json; about 4-6 minutes on 2 cores.

    Examples:
        lorakit demo
        lorakit demo -o my-demo --seed 1 --json
        lorakit demo --quick -o /tmp/demo
        lorakit demo --engine
    """
    import torch

    if engine:
        torch.set_num_threads(1)  # small ops: one thread is much faster on a 2-core machine
        _engine(steps if steps is not None else 300, seed, json)
        return
    torch.set_num_threads(threads)
    _mission(output, seed, model, steps, quick, json)


def _mission(output: Path, seed: int, model: str | None, steps: int | None, quick: bool, json: bool) -> None:
    import dataclasses

    from lorakit.demo.mission import STAGES, MissionConfig, check_output, run_mission

    config = MissionConfig.quick(output, seed) if quick else MissionConfig(output=output, seed=seed)
    config = dataclasses.replace(config, model=model)
    if steps is not None:
        config = dataclasses.replace(config, concept_steps=steps, style_steps=steps)
    check_output(config.output)  # before any bar is drawn: a refused folder is one line
    with progress_bar(unit="it", disable=json) as bar:
        tasks = {stage: bar.add_task(stage, total=None, start=False) for stage in STAGES}

        def progress(stage: str, done: int, total: int) -> None:
            task = tasks[stage]
            if not bar.tasks[task].started:
                bar.start_task(task)
            bar.update(task, completed=done, total=total)

        report = run_mission(config, progress)
    if json:
        data = dataclasses.asdict(report)
        data["all_targets_met"] = report.all_targets_met
        print_json(data)
        return
    _print_mission(report)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _print_mission(report) -> None:
    console = Console()
    loras = Table(title="trained LoRAs (lorakit train, kohya format)")
    for col in ("LoRA", "trigger", "steps", "train time", "s/step", "loss", "file", "size"):
        loras.add_column(col, justify="right" if col in ("steps", "train time", "s/step", "size") else "left")
    for lora in report.loras:
        loras.add_row(
            lora.name,
            lora.trigger,
            str(lora.steps),
            f"{lora.seconds:.0f} s",
            f"{lora.seconds_per_step:.2f}",
            f"{lora.first_loss:.3f} -> {lora.last_loss:.3f}",
            lora.file,
            f"{lora.bytes / 1024:.0f} KiB",
        )
    console.print(loras)
    s = report.scores
    scores = Table(title=f"checker scores ({s.prompts} prompts per row)")
    for col in ("prompts", "LoRAs", "score", "value"):
        scores.add_column(col, justify="right" if col == "value" else "left")
    for weight in ("0", "0.5", "1"):
        scores.add_row("concept (trigger zkx)", f"concept {weight}", "cross drawn", _pct(s.concept[weight]))
    scores.add_row("style (in qvz style)", "none", "teal palette", _pct(s.style["base"]))
    scores.add_row("style (in qvz style)", "style 1", "teal palette", _pct(s.style["lora"]))
    scores.add_row("no trigger", "none", "shape and colour right", _pct(s.plain["base"]))
    for name in ("concept", "style"):
        change = s.plain_pixel_change[name]
        scores.add_row(
            "no trigger", f"{name} 1", "shape and colour right", f"{_pct(s.plain[name])} (pixels {change:.3f})"
        )
    m = s.combined
    scores.add_row("concept in style", "none", "cross / teal", f"{_pct(m['base_concept'])} / {_pct(m['base_style'])}")
    scores.add_row("concept in style", "both 1", "cross / teal", f"{_pct(m['concept'])} / {_pct(m['style'])}")
    console.print(scores)
    targets = Table(title="targets")
    for col in ("target", "measured", "goal", "met"):
        targets.add_column(col)
    for t in report.targets:
        targets.add_row(t.name, t.value, t.goal, "yes" if t.met else "NO")
    console.print(targets)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in report.stage_seconds.items())
    console.print(f"total {report.seconds:.0f} s ({stages})")
    console.print(f"grid: {report.grid}; report: {Path(report.output) / 'report.json'}")


def _engine(steps: int, seed: int, json: bool) -> None:
    from lorakit.demo.engine import run_engine_demo

    with progress_bar("loss {task.fields[loss]:.3e}", unit="step", disable=json) as bar:
        task = bar.add_task("training LoRA", total=steps, loss=float("nan"))
        report = run_engine_demo(
            steps=steps, seed=seed, progress=lambda step, loss: bar.update(task, completed=step, loss=loss)
        )
    if json:
        print_json(report)
        return
    _print_engine(report)


def _print_engine(report) -> None:
    console = Console()
    console.print(
        f"model: {report.layers} Linear layers, {report.base_params:,} frozen parameters; "
        f"LoRA r4 on {report.targeted} layers: {report.trainable_params:,} trainable"
    )
    console.print(
        f"training: loss {report.losses[0]:.3e} -> {report.losses[-1]:.3e} in {len(report.losses)} steps, "
        f"{report.train_seconds:.1f} s"
    )
    table = Table(title="outputs by adapter weight (relative L2)")
    for col in ("learned LoRA", "LoHa", "distance to target", "change from base"):
        table.add_column(col, justify="right")
    for row in report.rows:
        table.add_row(
            f"{row['learned']:.1f}", f"{row['loha']:.1f}", f"{row['to_target']:.4f}", f"{row['from_base']:.4f}"
        )
    console.print(table)
    checks = Table(title="engine checks")
    checks.add_column("check")
    checks.add_column("result", justify="right")
    checks.add_row("set_weight (whole model)", f"{report.set_weight_us:.2f} us")
    checks.add_row("fused vs dynamic, max |diff|", f"{report.fused_vs_dynamic:.2e}")
    checks.add_row("unfuse restores the base bit for bit", str(report.unfuse_exact))
    checks.add_row("detach restores the model bit for bit", str(report.detach_exact))
    console.print(checks)
