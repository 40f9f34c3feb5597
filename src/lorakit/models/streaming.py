"""Load a model component of a diffusers folder tensor by tensor: peak memory is the model plus one tensor.

``from_pretrained`` of diffusers and transformers reads a whole weight file into a state dict and then casts it, so
loading the fp16 files of a folder in fp32 holds both at once: an SD1.5-size folder (4.3 GB in fp32) peaks at
6.1 GB. Here the model is built on the meta device from its config, and each stored tensor is read with plain reads
(``SafetensorsReader``), cast, and put in place on its own.

Only when the files map one to one onto the model's parameters and persistent buffers, with the same shapes;
anything else (old key names, tied weights, modules kept in fp32 at half precision, ``.bin`` or variant files) is
left to ``from_pretrained`` (``stream_component`` returns None).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["stream_component"]

_WEIGHTS = ("diffusion_pytorch_model", "model")


def weight_files(folder: Path) -> list[Path] | None:
    """The safetensors files of a component folder (one file, or the shards its index names), or None."""
    for stem in _WEIGHTS:
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [folder / s for s in shards]
            return files if all(f.is_file() for f in files) else None
    return None


def _build_on_meta(folder: Path) -> nn.Module:
    from lorakit.models.single_file import _model_on_meta

    raw = json.loads((folder / "config.json").read_text())
    if "_class_name" in raw:
        return _model_on_meta("diffusers", raw)
    from transformers import AutoConfig

    return _model_on_meta("transformers", AutoConfig.from_pretrained(folder, local_files_only=True))


def stream_component(folder: str | Path, dtype: torch.dtype) -> nn.Module | None:
    """A component (UNet, transformer, VAE, text encoder) with its weights from ``folder``, in ``dtype``, in eval
    mode; None when the folder is not one this loader handles exactly (then use ``from_pretrained``)."""
    from lorakit.formats.safetensors_reader import SafetensorsReader

    folder = Path(folder)
    files = weight_files(folder)
    if files is None or not (folder / "config.json").is_file():
        return None
    model = _build_on_meta(folder)
    if dtype != torch.float32 and getattr(model, "_keep_in_fp32_modules", None):
        return None  # some modules stay fp32 at half precision: from_pretrained knows which
    if getattr(model, "_tied_weights_keys", None):
        return None
    wanted = model.state_dict(keep_vars=True)
    readers = [SafetensorsReader(f) for f in files]
    try:
        stored = {key: reader for reader in readers for key in reader.keys()}
        if stored.keys() != wanted.keys():
            return None
        if any(tuple(stored[k].shape(k)) != tuple(wanted[k].shape) for k in wanted):
            return None
        scratch = torch.empty(max(r.entry(k).nbytes for k, r in stored.items()), dtype=torch.uint8)
        for key, reader in stored.items():
            _put(model, key, reader.get(key, scratch), dtype)
        del scratch
    finally:
        for reader in readers:
            reader.close()
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return model.eval()


def _put(model: nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    path, _, leaf = key.rpartition(".")
    owner = model.get_submodule(path) if path else model
    # a copy in any case: ``tensor`` is a view of the reused scratch buffer
    tensor = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = tensor
