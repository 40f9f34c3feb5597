"""``lorakit convert``: rewrite a LoRA in another dialect."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lorakit.cli.options import JsonOption, print_json
from lorakit.errors import ConfigError

_DTYPES = ("fp32", "fp16", "bf16")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)


def convert(
    source: Annotated[Path, typer.Argument(help="LoRA file (any dialect) or PEFT adapter folder.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (a folder for --to peft).")],
    to: Annotated[str, typer.Option("--to", help="Dialect to write: kohya, diffusers, peft or comfy.")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Read the output back and compare every effective delta with the input.")
    ] = False,
    arch: Annotated[
        str | None, typer.Option("--arch", help="Architecture or variant, when the file does not tell it.")
    ] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Cast weights to fp32, fp16 or bf16.")] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Base model whose module names and shapes place the keys (custom widths)."),
    ] = None,
    json: JsonOption = False,
) -> None:
    """Convert a LoRA between the kohya/A1111, diffusers, PEFT and ComfyUI dialects, exactly (alphas included).

    Example: lorakit convert style.safetensors -o style_diffusers.safetensors --to diffusers --verify
    """
    import torch

    from lorakit.ops.convert import convert_lora

    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"--dtype {dtype}: unknown; use one of {', '.join(_DTYPES)}")
    cast = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype or "")
    result = convert_lora(source, output, to, verify=verify, arch=arch, dtype=cast, model=model)
    if json:
        print_json(result)
        return
    console = Console()
    console.print(
        f"{result.source} ({result.dialect_in}, {result.arch or 'unknown architecture'}) -> "
        f"{result.output} ({result.dialect_out}): {result.targets} targets"
    )
    if result.verified:
        console.print(
            f"verified: largest delta difference {result.max_error:.3g} (relative {result.max_relative_error:.3g})"
        )
