"""``lorakit extract``: a LoRA of the difference between a fine-tuned checkpoint and its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorakit.cli.bake import lazy_progress
from lorakit.cli.merge import ArchOption, OutputOption, print_modules, report_data
from lorakit.cli.options import JsonOption, print_json


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)


def extract(
    base: Annotated[Path, typer.Option(help="The base checkpoint (single file or diffusers folder).")],
    tuned: Annotated[Path, typer.Option(help="The fine-tuned checkpoint (any layout, same architecture).")],
    output: OutputOption,
    rank: Annotated[int, typer.Option(help="Rank of Linear and 1x1 conv modules.")],
    conv_rank: Annotated[
        int | None, typer.Option("--conv-rank", help="Rank of 3x3 convs (LoCon); left out if not given.")
    ] = None,
    method: Annotated[str, typer.Option(help="randomized (seeded, fast) or exact (full SVD).")] = "randomized",
    seed: Annotated[int, typer.Option(help="Seed of the randomized SVD: same seed, same file.")] = 0,
    min_diff: Annotated[
        float,
        typer.Option(
            "--min-diff",
            help="Leave out modules whose largest absolute change is at most this (untrained text encoders).",
        ),
    ] = 0.0,
    dtype: Annotated[str, typer.Option(help="dtype of the LoRA: fp16, bf16 or fp32.")] = "fp16",
    arch: ArchOption = None,
    json: JsonOption = False,
) -> None:
    """Extract a LoRA: the best rank-R approximation of (tuned - base), module by module, streaming both files.

    Examples:
      lorakit extract --base sd15.safetensors --tuned finetune.safetensors --rank 32 -o extracted.safetensors
      lorakit extract --base sdxl/ --tuned tuned.safetensors --rank 64 --conv-rank 16 --method exact -o x.safetensors
    """
    from lorakit.ops.extract import extract_to_file
    from lorakit.ops.lora_files import parse_dtype

    with lazy_progress("extracting", "module", json) as progress:
        result = extract_to_file(
            base,
            tuned,
            output,
            rank=rank,
            conv_rank=conv_rank,
            method=method,
            seed=seed,
            min_diff=min_diff,
            dtype=parse_dtype(dtype),
            arch=arch,
            progress=progress,
        )
    headline = f"extracted {output} ({method})"
    if json:
        data = report_data(result, headline)
        data.update({"components": result.components, "unchanged": result.unchanged})
        print_json(data)
        return
    print_modules(result, headline)
    if result.unchanged:
        print(f"left out {len(result.unchanged)} unchanged modules (max |diff| <= {min_diff})")
