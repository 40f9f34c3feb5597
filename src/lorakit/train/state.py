"""Training states: everything ``--resume`` needs to continue a run as if it had never stopped.

A state is a folder ``NAME-state-step000100/`` holding ``adapter.safetensors`` (the trainable tensors in fp32, by
name) and ``trainer.pt`` (optimizer and schedule state, RNG states, step and data position). ``trainer.pt`` holds
only tensors and plain data and is read with ``torch.load(weights_only=True)``, which runs no pickled code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, FileFormatError, InputError
from lorakit.formats.safetensors_io import load_any, write_file

__all__ = ["TrainState", "find_state", "load_state", "prune_states", "save_state", "state_dir"]

STATE_VERSION = 1
_ADAPTER = "adapter.safetensors"
_TRAINER = "trainer.pt"
_INFO = "state.json"


@dataclass
class TrainState:
    """A snapshot after optimizer step ``step``."""

    step: int
    adapter: dict[str, torch.Tensor]
    """Trainable tensors by ``TrainedNetwork.named_parameters`` name."""
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    loader: dict[str, Any]
    rng: dict[str, Any]
    """``torch`` (CPU generator state) and ``cuda`` (per-device states) when present."""
    fingerprint: str
    """What must match to resume: architecture, network and optimizer settings, batch sizes, seed."""
    extra: dict[str, Any]
    """Loss history and the like (plain data)."""


def state_dir(output_dir: Path, name: str, step: int) -> Path:
    return output_dir / f"{name}-state-step{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(folder: Path, state: TrainState) -> Path:
    """Write ``state`` to ``folder`` (a fresh folder is filled, then renamed into place)."""
    temp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    write_file(
        temp / _ADAPTER,
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.adapter.items()},
        {"step": str(state.step)},
    )
    torch.save({"optimizer": state.optimizer, "schedule": state.schedule, "rng": state.rng}, temp / _TRAINER)
    info = {
        "version": STATE_VERSION,
        "step": state.step,
        "loader": state.loader,
        "fingerprint": state.fingerprint,
        "extra": state.extra,
    }
    (temp / _INFO).write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temp, folder)
    return folder


def load_state(folder: Path) -> TrainState:
    """Read a state written by ``save_state``.

    Raises:
        InputError: the folder is missing or incomplete.
        FileFormatError: a file in it is damaged or of another version.
    """
    if not folder.is_dir() or not all((folder / f).is_file() for f in (_ADAPTER, _TRAINER, _INFO)):
        raise InputError(
            f"{folder}: not a training state (expected {_ADAPTER}, {_TRAINER} and {_INFO}); give a "
            f"NAME-state-stepNNNNNN folder or the output folder that holds them"
        )
    try:
        info = json.loads((folder / _INFO).read_text(encoding="utf-8"))
        trainer = torch.load(folder / _TRAINER, map_location="cpu", weights_only=True)
    except (json.JSONDecodeError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise FileFormatError(f"{folder}: damaged training state ({err}); resume from an earlier one") from None
    if info.get("version") != STATE_VERSION:
        raise FileFormatError(f"{folder}: training state version {info.get('version')} is not {STATE_VERSION}")
    adapter, _ = load_any(folder / _ADAPTER)
    return TrainState(
        step=int(info["step"]),
        adapter={k: v.clone() for k, v in adapter.items()},
        optimizer=trainer["optimizer"],
        schedule=trainer["schedule"],
        loader=info["loader"],
        rng=trainer["rng"],
        fingerprint=info["fingerprint"],
        extra=info.get("extra", {}),
    )


def _states_in(folder: Path, name: str | None = None) -> list[Path]:
    pattern = f"{name}-state-step*" if name else "*-state-step*"
    return sorted(
        (p for p in folder.glob(pattern) if p.is_dir() and not p.name.endswith(".partial")),
        key=lambda p: int(p.name.rsplit("step", 1)[1]),
    )


def find_state(path: str | Path, name: str | None = None) -> Path:
    """``path`` itself when it is a state folder, else the latest state inside it.

    Raises:
        InputError: nothing to resume from there.
    """
    folder = Path(path)
    if (folder / _INFO).is_file():
        return folder
    states = _states_in(folder, name) if folder.is_dir() else []
    if not states:
        raise InputError(
            f"{folder}: no training state to resume from; states are saved with save.every_steps "
            f"(--save-every) as NAME-state-stepNNNNNN folders"
        )
    return states[-1]


def prune_states(folder: Path, name: str, keep: int) -> None:
    """Delete all but the ``keep`` latest states of run ``name``."""
    for old in _states_in(folder, name)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def check_fingerprint(saved: str, current: str, folder: Path) -> None:
    if saved != current:
        raise ConfigError(
            f"{folder}: the training state was made with other settings ({saved}); this run has "
            f"{current}; resume with the same model, network, optimizer, batch and seed settings"
        )
