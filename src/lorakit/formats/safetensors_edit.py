"""Rewrite a safetensors file's metadata without touching its tensor bytes.

The data section (everything after the header) is copied byte for byte, with the tensors' offsets unchanged, so
Civitai's AutoV3 and kohya's ``sshs_model_hash`` (both the sha256 of that section) stay the same. Only the header
changes. The copy streams in 1 MiB chunks into a temporary file in the target folder, which is fsynced and renamed
onto the final name, as ``write_file`` does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from lorakit.formats.safetensors_header import TensorEntry, encode_header
from lorakit.formats.safetensors_reader import SafetensorsReader
from lorakit.formats.safetensors_writer import (
    PathLike,
    WrittenFile,
    _metadata_with_placeholders,
    _write,
    atomic_file,
    check_output_path,
)

__all__ = ["rewrite_metadata"]

_CHUNK = 1 << 20


def rewrite_metadata(
    source: PathLike,
    output: PathLike,
    metadata: Mapping[str, str] | None,
    *,
    hash_fields: Mapping[str, str] | None = None,
    late_fields: Mapping[str, Callable[[str], str]] | None = None,
) -> WrittenFile:
    """Write ``source``'s tensors, byte for byte and at the same offsets, under a new metadata map.

    Args:
        source: a valid safetensors file (its header is validated first).
        output: the new file; an output equal to ``source`` is refused.
        metadata: the new ``__metadata__`` (replaces the old one entirely); None writes none.
        hash_fields: keys to fill with the data section's sha256, each mapped to a template with ``{sha256}``
            (``{"sshs_model_hash": "{sha256}", "modelspec.hash_sha256": "0x{sha256}"}``).
        late_fields: keys whose value is computed from the finished temporary file (called with its path) before
            it is renamed, e.g. ``sshs_legacy_hash``; each value must keep the length of its placeholder in
            ``metadata`` (the header is patched in place).

    Returns:
        The path, size and data-section sha256 (lower case) of the file written.

    Raises:
        OutputError: the output is the input, its folder is missing or read-only, or writing failed.
        InputError, FileFormatError: the source is missing, unreadable or not a valid safetensors file.
        ValueError: a late field's value changed length.
    """
    target = check_output_path(output, [source])
    with SafetensorsReader(source) as reader:
        entries = sorted(reader.header.entries, key=lambda e: (e.begin, e.end))
        final = _metadata_with_placeholders(metadata, hash_fields)
        header = encode_header(entries, final)
        with atomic_file(target, "w+b") as (file, temp):
            _write(file, header, target)
            digest = _copy_data(reader, file, target)
            filled = dict(final or {})
            for key, template in (hash_fields or {}).items():
                filled[key] = template.replace("{sha256}", digest)
            _patch_header(file, header, entries, filled if final is not None else None, target)
            if late_fields:
                file.flush()
                for key, compute in late_fields.items():
                    filled[key] = compute(str(temp))
                _patch_header(file, header, entries, filled, target)
    return WrittenFile(path=target, size=len(header) + reader.file_size - reader.data_offset, data_sha256=digest)


def _copy_data(reader: SafetensorsReader, file: BinaryIO, target: Path) -> str:
    """Copy the data section as it is on disk (gaps and order included) and return its sha256."""
    digest = hashlib.sha256()
    with open(reader.path, "rb", buffering=0) as source:
        source.seek(reader.data_offset)
        buffer = memoryview(bytearray(_CHUNK))
        while count := source.readinto(buffer):
            digest.update(buffer[:count])
            _write(file, buffer[:count], target)
    return digest.hexdigest()


def _patch_header(
    file: BinaryIO, header: bytes, entries: Sequence[TensorEntry], metadata: dict[str, str] | None, target: Path
) -> None:
    new_header = encode_header(entries, metadata)
    if len(new_header) != len(header):
        raise ValueError("a filled-in metadata value changed the header's length; keep each placeholder's length")
    file.seek(0)
    _write(file, new_header, target)
    file.seek(0, os.SEEK_END)
