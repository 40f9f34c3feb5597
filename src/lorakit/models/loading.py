"""Open a base model from local files as a diffusers pipeline: never a hub download.

Three sources: nothing (the embedded tiny model shipped with lorakit), a diffusers folder (``model_index.json`` +
component folders) or a single-file checkpoint (A1111 / ComfyUI layout, see ``lorakit.models.single_file``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import FileFormatError, InputError

__all__ = ["LoadedPipeline", "arch_of_components", "load_pipeline"]


@dataclass
class LoadedPipeline:
    """A pipeline and where it came from.

    Attributes:
        pipe: the diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``FluxPipeline``,
            ``StableDiffusion3Pipeline``).
        arch: ``sd1``, ``sd2``, ``sdxl``, ``flux`` or ``sd3``.
        arch_reason: why that architecture (the detection evidence, or "given by the caller").
        source: the path it was loaded from (``embedded`` for the shipped model).
    """

    pipe: Any
    arch: str
    arch_reason: str
    source: str


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence diffusers' and transformers' loading bars and load reports (lorakit reports what matters)."""
    import diffusers
    import transformers

    levels = (diffusers.logging.get_verbosity(), transformers.logging.get_verbosity())
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def _offline() -> None:
    # belt and braces: even a code path we do not control must not reach for the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def arch_of_components(components: Mapping[str, Any]) -> str | None:
    """The architecture of a pipeline from its denoiser's class and config, or None for a bare module."""
    transformer = components.get("transformer")
    if transformer is not None:
        name = type(transformer).__name__
        return "flux" if "Flux" in name else "sd3" if "SD3" in name else None
    unet = components.get("unet")
    config = getattr(unet, "config", None)
    if config is None or not hasattr(config, "cross_attention_dim"):
        return None
    if getattr(config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    # SD1 and SD2 share a pipeline class: SD2 projects with Linear layers and attends to 1024-wide text
    sd2 = bool(getattr(config, "use_linear_projection", False)) or config.cross_attention_dim == 1024
    return "sd2" if sd2 else "sd1"


def _arch_of_pipe(pipe: Any, arch: str | None) -> tuple[str, str]:
    if arch is not None:
        return arch, "given by the caller"
    components = {n: getattr(pipe, n, None) for n in ("unet", "transformer")}
    found = arch_of_components({k: v for k, v in components.items() if v is not None})
    if found is None:
        raise FileFormatError(f"{type(pipe).__name__}: not a pipeline lorakit knows (sd1, sd2, sdxl, flux, sd3)")
    denoiser = "transformer" if components["transformer"] is not None else "unet"
    return found, f"{type(pipe).__name__} with a {type(components[denoiser]).__name__}"


def _load_embedded(dtype: torch.dtype) -> LoadedPipeline:
    from lorakit.models import embedded

    if not (embedded.embedded_model_path() / "model_index.json").is_file():
        raise InputError(
            f"{embedded.embedded_model_path()}: the embedded base model is missing from this lorakit install; "
            "reinstall lorakit, or pass --model PATH (a diffusers folder or a .safetensors checkpoint)"
        )
    pipe = embedded.load_embedded_pipeline(dtype=dtype)
    arch, reason = _arch_of_pipe(pipe, None)
    return LoadedPipeline(pipe, arch, reason, str(embedded.embedded_model_path()))


def _streamed_components(folder: Path, index: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The model components loaded tensor by tensor (``lorakit.models.streaming``), handed to ``from_pretrained``
    so that it loads only the rest (tokenizers, scheduler, and any component streaming does not handle)."""
    from lorakit.models.streaming import stream_component

    out = {}
    for name, entry in index.items():
        if name.startswith("_") or name == "safety_checker" or not isinstance(entry, list):
            continue
        if entry[0] in ("diffusers", "transformers") and (folder / name).is_dir():
            module = stream_component(folder / name, dtype)
            if module is not None:
                out[name] = module
    return out


def _load_folder(folder: Path, arch: str | None, dtype: torch.dtype) -> LoadedPipeline:
    from diffusers import DiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise FileFormatError(
            f"{folder}: is a folder without model_index.json, not a diffusers model; name a diffusers folder or a "
            f".safetensors checkpoint"
        )
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    index = (folder / "model_index.json").read_text()
    if '"safety_checker"' in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        kwargs.update(_streamed_components(folder, json.loads(index), dtype))
        pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"{folder}: is not a complete diffusers model ({first}); check the folder") from None
    found, reason = _arch_of_pipe(pipe, arch)
    return LoadedPipeline(pipe, found, reason, str(folder))


def load_pipeline(
    path: str | os.PathLike[str] | None = None,
    *,
    arch: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> LoadedPipeline:
    """Load a base model as a diffusers pipeline, offline.

    Args:
        path: None (the embedded tiny model), a diffusers folder, or a single-file ``.safetensors`` checkpoint.
        arch: the architecture (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3`` or a variant); detected when None.
        dtype: the dtype of every component.
        device: where the pipeline goes.
        config: single-file only: a diffusers folder whose component configs (and tokenizers) to use instead of the
            bundled full-size configs (a fine-tune with another layout, a down-sized model).
        tokenizer: single-file only: a folder holding the tokenizers (``tokenizer/``, ``tokenizer_2/``... or one
            tokenizer's files); by default looked for next to the checkpoint, then in ``config``.

    Returns:
        A ``LoadedPipeline`` with the pipeline, the architecture and the reason.

    Raises:
        InputError: the path is missing, or the embedded model is not installed.
        FileFormatError: not a model, a partial checkpoint (the message lists what is missing), or tokenizers that
            cannot be found (the message says what to pass).
    """
    _offline()
    source = None if path is None else Path(path)
    if source is not None and not source.exists():
        raise InputError(f"{source}: no such file or folder; check --model")
    with quiet_loading():
        if source is None:
            loaded = _load_embedded(dtype)
        elif source.is_dir():
            loaded = _load_folder(source, arch, dtype)
        else:
            from lorakit.models.single_file import load_single_file

            loaded = load_single_file(source, arch=arch, dtype=dtype, config=config, tokenizer=tokenizer)
    loaded.pipe.to(device)
    loaded.pipe.set_progress_bar_config(disable=True)
    return loaded
