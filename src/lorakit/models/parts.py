"""Pieces of a pipeline from local folders: tokenizers, component configs and weights, and assembling the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import FileFormatError

__all__ = ["build_pipeline", "find_tokenizers", "folder_configs", "load_component_from_folder"]

_TOKENIZERS = {
    "sd1": ("tokenizer",),
    "sd2": ("tokenizer",),
    "sdxl": ("tokenizer", "tokenizer_2"),
    "flux": ("tokenizer", "tokenizer_2"),
    "sd3": ("tokenizer", "tokenizer_2", "tokenizer_3"),
}
_T5_TOKENIZER = {("flux", "tokenizer_2"), ("sd3", "tokenizer_3")}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


def _is_tokenizer_dir(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _tokenizer_dirs(root: Path, names: tuple[str, ...]) -> dict[str, Path] | None:
    """``root/<name>`` for each name, or ``root`` itself when only one tokenizer is needed and it is one."""
    found = {n: root / n for n in names if _is_tokenizer_dir(root / n)}
    if len(found) == len(names):
        return found
    if len(names) == 1 and _is_tokenizer_dir(root):
        return {names[0]: root}
    return None


def find_tokenizers(checkpoint: Path, arch: str, given: Path | None, config: Path | None) -> dict[str, Any]:
    """Load the tokenizers a single-file checkpoint needs (it holds none), offline.

    Looked for in ``given`` (``--tokenizer``), then next to the checkpoint (``tokenizer/``, ``tokenizer_2/``...), then
    in the config folder.

    Raises:
        FileFormatError: none found; the message names the folders needed and the option to pass.
    """
    from transformers import CLIPTokenizer, T5Tokenizer

    names = _TOKENIZERS[arch]
    places = [p for p in (given, checkpoint.parent, config) if p is not None]
    for place in places:
        dirs = _tokenizer_dirs(place, names)
        if dirs is not None:
            out = {}
            for name, folder in dirs.items():
                cls = T5Tokenizer if (arch, name) in _T5_TOKENIZER else CLIPTokenizer
                out[name] = cls.from_pretrained(folder, local_files_only=True)
            return out
    needed = ", ".join(f"{n}/" for n in names)
    raise FileFormatError(
        f"{checkpoint}: a single-file checkpoint holds no tokenizers; pass --tokenizer DIR, a folder "
        f"with {needed} (a diffusers model folder of {arch} has them), or put them next to the file"
    )


def folder_configs(folder: Path, components: tuple[str, ...]) -> dict[str, tuple[str, Any]]:
    """Component configs from a diffusers folder: component -> (``diffusers`` | ``transformers``, config).

    Raises:
        FileFormatError: a component folder or its config.json is missing.
    """
    from transformers import AutoConfig

    out: dict[str, tuple[str, Any]] = {}
    for component in components:
        path = folder / component / "config.json"
        if not path.is_file():
            raise FileFormatError(
                f"{folder}: has no {component}/config.json; --config must be a diffusers folder of "
                f"the same architecture"
            )
        raw = json.loads(path.read_text())
        if "_class_name" in raw:
            out[component] = ("diffusers", raw)
        else:
            out[component] = ("transformers", AutoConfig.from_pretrained(folder / component, local_files_only=True))
    return out


def load_component_from_folder(folder: Path, component: str, dtype: torch.dtype) -> nn.Module | None:
    """A component with its weights from a diffusers folder, or None when the folder has no weights for it."""
    sub = folder / component
    if not sub.is_dir() or not any(sub.glob("*.safetensors")) and not any(sub.glob("*.safetensors.index.json")):
        return None
    from lorakit.models.streaming import stream_component

    streamed = stream_component(sub, dtype)
    if streamed is not None:
        return streamed
    raw = json.loads((sub / "config.json").read_text())
    if "_class_name" in raw:
        import diffusers

        cls = getattr(diffusers, raw["_class_name"])
    else:
        import transformers

        cls = getattr(transformers, raw["architectures"][0])
    return cls.from_pretrained(sub, dtype=dtype, local_files_only=True).eval()


def build_pipeline(arch: str, components: dict[str, nn.Module], tokenizers: dict[str, Any], scheduler: Any) -> Any:
    """Assemble the diffusers pipeline of an architecture from its parts."""
    import diffusers

    parts = {**components, **tokenizers, "scheduler": scheduler}
    if arch in ("sd1", "sd2"):
        return diffusers.StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    cls = {
        "sdxl": diffusers.StableDiffusionXLPipeline,
        "flux": diffusers.FluxPipeline,
        "sd3": diffusers.StableDiffusion3Pipeline,
    }[arch]
    return cls(**parts)
