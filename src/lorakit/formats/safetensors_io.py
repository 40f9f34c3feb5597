"""Load and save tensor files: safetensors safely and streaming, pickled checkpoints only on request.

This module is the entry point of the bytes-on-disk layer; the pieces live in ``safetensors_header`` (validation),
``safetensors_reader`` (tensor-by-tensor reads) and ``safetensors_writer`` (atomic streaming writes).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import FileFormatError, UnsafeFileError
from lorakit.formats.safetensors_header import MAX_HEADER_BYTES, Header, TensorEntry
from lorakit.formats.safetensors_reader import SafetensorsReader, open_input
from lorakit.formats.safetensors_writer import (
    TensorSource,
    WrittenFile,
    check_output_path,
    tensor_bytes,
    write_file,
)

__all__ = [
    "PICKLE_SUFFIXES",
    "Header",
    "SafetensorsReader",
    "TensorEntry",
    "TensorSource",
    "WrittenFile",
    "check_output_path",
    "load_any",
    "looks_like_safetensors",
    "read_file",
    "tensor_bytes",
    "write_file",
]

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
"""File suffixes that usually hold a pickle (torch.save); unpickling can run arbitrary code."""

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80


def read_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a whole safetensors file (for small files such as LoRAs; use the reader for checkpoints).

    The tensors are views of a private, copy-on-write map of the file (``SafetensorsReader.read_all``): nothing is
    copied until used, and writing to a tensor never changes the file.

    Args:
        path: the safetensors file.

    Returns:
        The tensors in header order, and the metadata (empty when the file has none).

    Raises:
        InputError: the file is missing or unreadable.
        FileFormatError: the file is not a valid safetensors file.
    """
    with SafetensorsReader(path) as reader:
        return reader.read_all(), reader.metadata


def looks_like_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether a file starts like a safetensors file (a sane header length, then ``{``), whatever its suffix.

    Args:
        path: the file to sniff.

    Returns:
        True if the first 9 bytes look like a safetensors header; the header is not validated.

    Raises:
        InputError: the file is missing or unreadable.
    """
    with open_input(path) as file:
        head = file.read(9)
        size = os.fstat(file.fileno()).st_size
    if len(head) < 9:
        return False
    header_size = int.from_bytes(head[:8], "little")
    return 2 <= header_size <= min(MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{"


def load_any(
    path: str | os.PathLike[str], *, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load the tensors of a safetensors file, or of a pickled checkpoint if the caller opts in.

    A file that looks like safetensors is read as safetensors whatever its suffix. Anything else would be unpickled,
    and unpickling can run code hidden in the file, so it is refused unless ``allow_pickle`` is set; even then it
    goes through ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.

    Args:
        path: a ``.safetensors`` file, or a ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` pickle.
        allow_pickle: load pickled files (with ``weights_only=True``).

    Returns:
        The tensors and the metadata (always empty for pickles). A pickle's top-level ``"state_dict"`` is unwrapped;
        its non-tensor entries (``epoch``, ``global_step``...) are not weights and are left out.

    Raises:
        UnsafeFileError: the file is a pickle and ``allow_pickle`` is False.
        FileFormatError: the file is damaged, holds objects other than tensors, or holds no tensors.
        InputError: the file is missing or unreadable.
    """
    file = Path(path)
    if file.suffix.lower() == ".safetensors" or looks_like_safetensors(file):
        return read_file(file)
    if not _looks_like_pickle(file):
        raise FileFormatError(f"{file}: is neither a safetensors file nor a torch checkpoint; check the file")
    if not allow_pickle:
        raise UnsafeFileError(
            f"{file}: is a pickled checkpoint, and unpickling can run code hidden in it; convert it to .safetensors, "
            "or pass allow_pickle=True (--allow-pickle) to load it with torch.load(weights_only=True)"
        )
    return _load_pickle(file), {}


def _looks_like_pickle(path: Path) -> bool:
    # torch.save writes a zip archive (since torch 1.6) or a raw pickle (older files and _use_new_zipfile=False).
    with open_input(path) as file:
        head = file.read(4)
    return path.suffix.lower() in PICKLE_SUFFIXES or head == _ZIP_MAGIC or head[:1] == bytes([_PICKLE_PROTOCOL])


def _first_sentence(text: str, limit: int = 160) -> str:
    sentence = text.strip().split(". ")[0].replace("\n", " ")
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def _refused_reason(exc: pickle.UnpicklingError) -> str:
    # torch's message is several paragraphs; the line naming the refused global is the useful part.
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            return _first_sentence(line.split("WeightsUnpickler error:", 1)[1])
    return "it is not made of tensors and plain containers"


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FileFormatError(
            f"{path}: holds objects other than tensors, which weights_only loading refuses ({_refused_reason(exc)}); "
            "convert it to .safetensors with the tool that made it"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise FileFormatError(
            f"{path}: cannot be read as a torch checkpoint ({_first_sentence(str(exc))}); download it again"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise FileFormatError(f"{path}: holds a {type(loaded).__name__}, not a mapping of names to tensors")
    tensors = {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise FileFormatError(f"{path}: holds no tensors; check that it is a model or LoRA file")
    return tensors
