"""``lorakit meta``: edit a LoRA's metadata without touching its tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lorakit.cli.options import JsonOption, print_json
from lorakit.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("meta")(meta)


def _pairs(items: list[str]) -> dict[str, str]:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set modelspec.title=MyStyle")
        values[key] = value
    return values


def meta(
    source: Annotated[Path, typer.Argument(help="LoRA file (.safetensors).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (never the input).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE to set (repeat the option for several keys).")
    ] = None,
    strip_paths: Annotated[
        bool, typer.Option("--strip-paths", help="Cut absolute paths in ss_* values (output and dataset folders).")
    ] = False,
    strip: Annotated[bool, typer.Option("--strip", help="Drop all metadata (--set values still apply).")] = False,
    json: JsonOption = False,
) -> None:
    """Edit a LoRA's header metadata; the tensor bytes (and so AutoV3) stay the same and the embedded hashes are
    refreshed.

    Example: lorakit meta style.safetensors -o style_clean.safetensors --strip-paths --set modelspec.title=Style
    """
    from lorakit.ops.meta import edit_metadata

    result = edit_metadata(source, output, set_values=_pairs(set_ or []), strip_paths=strip_paths, strip=strip)
    if json:
        print_json(result)
        return
    console = Console()
    console.print(f"{result.source} -> {result.output}; AutoV3 {result.auto_v3} (tensor bytes unchanged)")
    for label, keys in (("set", result.set_keys), ("removed", result.removed_keys), ("paths cut", result.path_keys)):
        if keys:
            console.print(f"{label}: {', '.join(keys)}")
    for key, value in result.refreshed.items():
        console.print(f"refreshed {key} = {value}")
