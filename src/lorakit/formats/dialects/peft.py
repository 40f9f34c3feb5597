"""PEFT adapter folders: ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``) beside
``adapter_config.json`` (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``use_dora``).

A folder holds one model's adapter. diffusers keeps a pipeline's adapters in one folder per component (``unet/``,
``text_encoder/``); the reader accepts either, and the writer makes the second form when the LoRA has several
components. The component of a single folder is its name when that is a component's, else found from the modules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit.errors import FileFormatError, InputError, OutputError
from lorakit.formats.canonical import COMPONENTS, LoraFile
from lorakit.formats.dialects.context import ModelInfo
from lorakit.formats.dialects.diffusers import plain_patches, read_diffusers
from lorakit.formats.dialects.grouped import ReadOutcome
from lorakit.formats.dialects.peft_config import config_for, peft_lora_tensors
from lorakit.formats.safetensors_io import read_file, write_file
from lorakit.formats.safetensors_writer import atomic_file

__all__ = [
    "CONFIG_NAME",
    "PEFT_PREFIX",
    "WEIGHTS_NAME",
    "claims_peft",
    "is_peft_folder",
    "read_peft",
    "read_peft_folder",
    "write_peft_folder",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def claims_peft(key: str) -> bool:
    """Whether a key is in PEFT's saved form."""
    return key.startswith(PEFT_PREFIX)


def is_peft_folder(path: Path) -> bool:
    """A folder with an adapter, or with component subfolders that have one."""
    if not path.is_dir():
        return False
    return (path / CONFIG_NAME).is_file() or any((path / c / CONFIG_NAME).is_file() for c in COMPONENTS)


def read_peft(
    tensors: Mapping[str, Tensor], info: ModelInfo, config: Mapping[str, Any], component: str | None
) -> ReadOutcome:
    """Read PEFT keys (prefix stripped) with the adapter's config for the alphas."""
    stripped = {k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
    outcome = read_diffusers(stripped, info, {None: config}, default_component=component, prefixed=False)
    # Report the keys as the file spells them.
    outcome.unplaced = {PEFT_PREFIX + k: why for k, why in outcome.unplaced.items()}
    return outcome


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{folder / CONFIG_NAME}: not valid JSON ({exc}); fix or regenerate it") from None
    except OSError as exc:
        raise InputError(f"{folder / CONFIG_NAME}: cannot be read ({exc.strerror})") from None
    if not isinstance(config, dict):
        raise FileFormatError(f"{folder / CONFIG_NAME}: is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FileFormatError(f"{folder}: a PEFT {peft_type} adapter; lorakit reads PEFT LoRA adapters only")
    if config.get("lora_bias"):
        raise FileFormatError(f"{folder}: LoRA with a bias (lora_bias) is not supported")
    return config


def _guess_component(folder: Path, tensors: Mapping[str, Tensor], info: ModelInfo) -> str | None:
    if folder.name in COMPONENTS:
        return folder.name
    modules = {k[len(PEFT_PREFIX) :].split(".lora_")[0] for k in tensors}
    for component in COMPONENTS:
        names = info.names(component)
        if names is not None and all(names.lookup(m, flat_name=False) for m in modules):
            return component
    return None


def read_peft_folder(folder: Path, info: ModelInfo) -> tuple[ReadOutcome, dict[str, str]]:
    """Read a PEFT adapter folder (or a folder of component subfolders).

    Returns:
        The outcome and a metadata map holding each adapter config as JSON (``peft.<component>``).
    """
    folders = (
        [folder]
        if (folder / CONFIG_NAME).is_file()
        else [folder / c for c in COMPONENTS if (folder / c / CONFIG_NAME).is_file()]
    )
    outcome, metadata = ReadOutcome(), {}
    for sub in folders:
        weights = sub / WEIGHTS_NAME
        if not weights.is_file():
            raise InputError(
                f"{sub}: has {CONFIG_NAME} but no {WEIGHTS_NAME} (a pickled adapter_model.bin is "
                f"not read: convert it to safetensors)"
            )
        config = _read_config(sub)
        tensors, _ = read_file(weights)
        component = _guess_component(sub, tensors, info)
        part = read_peft(tensors, info, config, component)
        outcome.patches.update(part.patches)
        outcome.unplaced.update(part.unplaced)
        metadata[f"peft.{component or info.denoiser()}"] = json.dumps(config, sort_keys=True)
    return outcome, metadata


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    try:
        with atomic_file(path) as (file, _):
            file.write((json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror}); choose another folder") from None


def write_peft_folder(lora: LoraFile, folder: Path, info: ModelInfo, dtype: torch.dtype | None = None) -> list[Path]:
    """Write a PEFT adapter folder (one subfolder per component when there are several).

    Returns:
        The adapter folders written.
    """
    components = lora.components()
    if not components:
        raise OutputError(f"{folder}: the LoRA holds no patches; nothing to write")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; a PEFT adapter is a folder, name a folder")
    if not folder.parent.is_dir():
        raise OutputError(f"{folder}: the folder {folder.parent} does not exist; create it first")
    written = []
    folder.mkdir(exist_ok=True)  # several components: one subfolder each inside it
    for component in components:
        target = folder if len(components) == 1 else folder / component
        target.mkdir(exist_ok=True)
        patches = plain_patches(lora, component)
        tensors = {}
        for module, patch in patches.items():
            for suffix, tensor in peft_lora_tensors(patch).items():
                cast = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                tensors[f"{PEFT_PREFIX}{module}.{suffix}"] = cast.contiguous()
        table = info.table(component)
        config = config_for(patches, list(table) if table is not None else None)
        config.update(
            {
                "base_model_name_or_path": None,
                "task_type": None,
                "inference_mode": True,
                "revision": None,
                "modules_to_save": None,
            }
        )
        write_file(target / WEIGHTS_NAME, tensors, {"format": "pt"})
        _write_json(target / CONFIG_NAME, config)
        written.append(target)
    return written
