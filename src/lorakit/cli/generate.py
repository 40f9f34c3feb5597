"""``lorakit generate``: one image from a base model with LoRAs applied, with A1111 infotext in the PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.options import JsonOption, print_json
from lorakit.cli.progress import progress_bar
from lorakit.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def _size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ConfigError(f"--size {value!r}: write WIDTHxHEIGHT, e.g. --size 512x768")
    return int(width), int(height)


def generate(
    prompt: Annotated[
        str,
        typer.Option(
            "--prompt", "-p", help="Prompt; <lora:name:w> tags apply LoRAs (<lora:name:te:unet>, lbw= as in A1111)."
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option(help="Base model: a diffusers folder or a .safetensors checkpoint (default: embedded)"),
    ] = None,
    lora: Annotated[
        list[str] | None, typer.Option(help="LoRA file and weights: FILE, FILE:W or FILE:W:TE_W (repeatable).")
    ] = None,
    lora_dir: Annotated[Path | None, typer.Option(help="Folder where <lora:name:w> names are looked up.")] = None,
    negative: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 20,
    cfg: Annotated[float | None, typer.Option(help="Guidance scale (default 7; FLUX 3.5).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT (default: the model's).")] = None,
    sampler: Annotated[
        str | None, typer.Option(help="euler, euler_a, ddim, dpm++_2m, dpm++_2m_karras, unipc, heun, lms, pndm.")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="Architecture of --model when it cannot be detected.")] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Single-file models: folder with the tokenizers (tokenizer/, tokenizer_2/).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Single-file models: a diffusers folder giving configs and missing parts.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps...")] = "cpu",
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path("lorakit.png"),
    json: JsonOption = False,
) -> None:
    """Generate an image with LoRAs applied; the PNG carries A1111 infotext (prompt, settings, Lora hashes).

    Examples:
        lorakit generate --prompt "a red circle" -o out.png
        lorakit generate --model sd15.safetensors --prompt "a cat <lora:ink:0.8>" --lora-dir loras --steps 25
        lorakit generate --model ./sdxl --prompt "a cat" --lora style.safetensors:0.7 --sampler dpm++_2m
    """
    import torch

    from lorakit.generate.infotext import write_png
    from lorakit.generate.run import GenerateConfig, generate_image, parse_lora_option, resolve_loras
    from lorakit.models import load_pipeline

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ConfigError(f"--dtype {dtype!r}: use fp32, fp16 or bf16")
    settings = GenerateConfig(
        prompt=prompt,
        negative=negative,
        steps=steps,
        cfg=cfg,
        seed=seed,
        size=_size(size),
        sampler=sampler,
        loras=tuple(parse_lora_option(v) for v in lora or ()),
        lora_dir=lora_dir,
    )
    resolve_loras(settings)  # prompt syntax and LoRA names fail before the model is loaded
    loaded = load_pipeline(model, arch=arch, dtype=dtypes[dtype], device=device, config=config, tokenizer=tokenizer)
    model_hash = _model_hash(model)
    with progress_bar(unit="step", disable=json) as bar:
        task = bar.add_task("denoising", total=steps)
        result = generate_image(
            loaded, settings, model_hash=model_hash, on_step=lambda done, total: bar.update(task, completed=done)
        )
    write_png(result.image, output, result.infotext)
    if json:
        print_json(
            {
                "output": str(output),
                "arch": loaded.arch,
                "infotext": result.infotext,
                "loras": {k: list(v) for k, v in result.loras.items()},
            }
        )
        return
    _print_result(output, loaded.arch, loaded.arch_reason, result)


def _model_hash(model: Path | None) -> str | None:
    if model is None or not model.is_file():
        return None
    from lorakit.formats.hashes import auto_v2

    return auto_v2(model).lower()  # A1111 writes the first 10 hex of the file's sha256, lower case


def _print_result(output: Path, arch: str, reason: str, result) -> None:
    console = Console()
    console.print(f"wrote {output} ({result.image.size[0]}x{result.image.size[1]}, {arch}: {reason})")
    if result.loras:
        table = Table(title="LoRAs applied")
        for col in ("name", "weight", "text encoder", "hash", "targets"):
            table.add_column(col)
        for name, (weight, te, short, count) in result.loras.items():
            table.add_row(name, f"{weight:g}", f"{te:g}", short, str(count))
        console.print(table)
    console.print(result.infotext, markup=False, highlight=False)
