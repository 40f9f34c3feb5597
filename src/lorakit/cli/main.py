"""The ``lorakit`` command: one typer app, one error boundary.

A ``LorakitError`` (bad input the user can fix) prints one line and exits 2; set LORAKIT_DEBUG=1 for the traceback.
Anything else is a bug and exits 1 with its traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from lorakit.cli import bake, convert, demo, extract, generate, meta, train
from lorakit.cli import dataset as dataset_cmd
from lorakit.cli import inspect as inspect_cmd
from lorakit.cli import merge as merge_cmd
from lorakit.errors import LorakitError

app = typer.Typer(
    name="lorakit",
    help="LoRA toolkit: train, apply, merge, resize, extract, convert and inspect LoRAs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """LoRA toolkit: train, apply, merge, resize, extract, convert and inspect LoRAs."""


demo.register(app)
dataset_cmd.register(app)
inspect_cmd.register(app)
merge_cmd.register(app)
extract.register(app)
bake.register(app)
convert.register(app)
meta.register(app)
generate.register(app)
train.register(app)


_DIFFUSION_EXTRA = {"diffusers", "transformers", "accelerate", "PIL", "prodigyopt", "tokenizers"}
"""Packages of the ``diffusion`` extra: the core install (inspect, convert, merge...) works without them."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 bug, 2 user error)."""
    try:
        code = app(args=argv, standalone_mode=False)
    except LorakitError as err:
        if os.environ.get("LORAKIT_DEBUG") == "1":
            raise
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in _DIFFUSION_EXTRA or os.environ.get("LORAKIT_DEBUG") == "1":
            raise
        print(
            f"lorakit: error: this command needs {err.name}, which is not installed; "
            "install the diffusion extra: pip install 'lorakit[diffusion]'",
            file=sys.stderr,
        )
        return 2
    except typer.Exit as ex:
        return ex.exit_code
    except typer.Abort:
        print("lorakit: aborted", file=sys.stderr)
        return 130
    except Exception as err:  # click's usage errors carry their own exit code
        code = getattr(err, "exit_code", None)
        if code is not None and hasattr(err, "show"):
            err.show()
            return code
        raise
    # typer.Exit(code) raised by a command comes back as the return value without standalone mode
    return code if isinstance(code, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
