"""Options shared by several commands, and output helpers."""

from __future__ import annotations

import dataclasses
import json as _json
from typing import Annotated, Any

import typer

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")]


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def print_json(result: Any) -> None:
    """Print a result object (a dataclass or plain data) as JSON on stdout."""
    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
    print(_json.dumps(data, indent=2, default=_default))
