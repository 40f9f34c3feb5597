"""File hashes as Civitai, AUTOMATIC1111 and kohya sd-scripts compute them.

Definitions (checked against the public sources of Civitai's model scanner ``HashTask.cs`` and kohya sd-scripts
``library/train_util.py``):

- SHA256: of the whole file. Civitai shows it in upper-case hex.
- AutoV1 (Civitai): sha256 of the 0x10000 bytes at offset 0x100000, first 8 hex digits, upper case; Civitai gives
  none for files under 2 MiB (0x200000 bytes). AUTOMATIC1111's legacy ``model_hash`` reads the same window but with
  no minimum size (for a file under 1 MiB it hashes nothing) and prints lower case: ``a1111_model_hash``.
- AutoV2: the first 10 hex digits of SHA256.
- AutoV3: sha256 of everything after the 8-byte header length and the header, i.e. of the data section of a
  safetensors file. kohya writes the same value in lower case as ``sshs_model_hash``, and as ``"0x" + hex`` in
  ``modelspec.hash_sha256``. Civitai compares it ignoring case.
- CRC32: Civitai prints the 4 bytes of the CRC in little-endian order ("hello world" -> ``85114A0D``; the usual
  big-endian form is ``0D4A1185``).
- ``sshs_legacy_hash`` (kohya): AutoV1's window, lower case, no minimum size, but taken from the file kohya would
  have written with only its ``ss_*`` metadata (before adding ``sshs_*`` and modelspec keys), not from the file as it
  is. ``sshs_legacy_hash`` rebuilds that file virtually.

BLAKE3, which Civitai also lists, is not in Python's standard library and is left out.
Every function streams the file in 1 MiB chunks; none reads a whole file into memory.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from lorakit.formats.dtypes import layout_key
from lorakit.formats.safetensors_header import TensorEntry, encode_header
from lorakit.formats.safetensors_reader import SafetensorsReader, open_input

PathLike = str | os.PathLike[str]

CHUNK_BYTES = 1 << 20
AUTOV1_OFFSET = 0x100000
AUTOV1_LENGTH = 0x10000
AUTOV1_MIN_FILE_BYTES = 0x200000


@dataclass(frozen=True)
class FileHashes:
    """Every hash of one file, computed in one pass (the Civitai forms: upper-case hex).

    Attributes:
        size: file size in bytes.
        sha256: sha256 of the whole file.
        auto_v1: AutoV1, or None for a file under 2 MiB.
        auto_v2: AutoV2, the first 10 digits of ``sha256``.
        auto_v3: AutoV3, or None when the file does not start with a plausible safetensors header length.
        crc32: CRC32 with its bytes in Civitai's (little-endian) order.
    """

    size: int
    sha256: str
    auto_v1: str | None
    auto_v2: str
    auto_v3: str | None
    crc32: str


def _chunks(file: BinaryIO, start: int = 0, stop: int | None = None) -> Iterator[memoryview]:
    """Yield the file's bytes in [start, stop) chunk by chunk; each chunk is only valid until the next."""
    buffer = memoryview(bytearray(CHUNK_BYTES))
    file.seek(start)
    position = start
    while stop is None or position < stop:
        wanted = CHUNK_BYTES if stop is None else min(CHUNK_BYTES, stop - position)
        count = file.readinto(buffer[:wanted])
        if not count:
            return
        yield buffer[:count]
        position += count


def _data_start(file: BinaryIO, size: int) -> int | None:
    """Where a safetensors data section starts, or None when the first 8 bytes cannot be a header length."""
    if size < 8:
        return None
    file.seek(0)
    start = 8 + int.from_bytes(file.read(8), "little")
    return start if start <= size else None


def _crc32_hex(crc: int) -> str:
    # Civitai formats .NET's Crc32.GetCurrentHash(), which returns the CRC's bytes little end first.
    return crc.to_bytes(4, "little").hex().upper()


def file_hashes(path: PathLike) -> FileHashes:
    """Compute SHA256, AutoV1, AutoV2, AutoV3 and CRC32 of a file in one streaming pass.

    Args:
        path: any file; AutoV3 is meaningful for safetensors files only.

    Returns:
        The hashes, in Civitai's upper-case form.

    Raises:
        InputError: the file is missing or unreadable.
    """
    with open_input(path) as file:
        size = os.fstat(file.fileno()).st_size
        data_start = _data_start(file, size)
        whole, data = hashlib.sha256(), hashlib.sha256()
        crc = 0
        window = bytearray()
        position = 0
        for chunk in _chunks(file):
            end = position + len(chunk)
            whole.update(chunk)
            crc = zlib.crc32(chunk, crc)
            if data_start is not None and end > data_start:
                data.update(chunk[max(0, data_start - position) :])
            low, high = max(position, AUTOV1_OFFSET), min(end, AUTOV1_OFFSET + AUTOV1_LENGTH)
            if low < high:
                window += chunk[low - position : high - position]
            position = end
    sha = whole.hexdigest().upper()
    return FileHashes(
        size=size,
        sha256=sha,
        auto_v1=hashlib.sha256(window).hexdigest()[:8].upper() if size >= AUTOV1_MIN_FILE_BYTES else None,
        auto_v2=sha[:10],
        auto_v3=data.hexdigest().upper() if data_start is not None else None,
        crc32=_crc32_hex(crc),
    )


def _sha256_range(path: PathLike, start: int = 0, stop: int | None = None) -> str:
    with open_input(path) as file:
        digest = hashlib.sha256()
        for chunk in _chunks(file, start, stop):
            digest.update(chunk)
    return digest.hexdigest()


def sha256(path: PathLike) -> str:
    """sha256 of the whole file, upper-case hex (Civitai's SHA256)."""
    return _sha256_range(path).upper()


def auto_v2(path: PathLike) -> str:
    """Civitai AutoV2: the first 10 hex digits of the file's sha256, upper case."""
    return sha256(path)[:10]


def auto_v1(path: PathLike) -> str | None:
    """Civitai AutoV1: first 8 hex of the sha256 of bytes [0x100000, 0x110000), upper case; None under 2 MiB."""
    if os.path.getsize(path) < AUTOV1_MIN_FILE_BYTES:
        return None
    return a1111_model_hash(path).upper()


def a1111_model_hash(path: PathLike) -> str:
    """AUTOMATIC1111's legacy ``model_hash`` (also sd-webui-additional-networks' legacy hash) of a file as it is.

    First 8 lower-case hex digits of the sha256 of the up to 0x10000 bytes at offset 0x100000, whatever the file's
    size (a file under 1 MiB hashes no bytes: ``e3b0c442``).
    """
    return _sha256_range(path, AUTOV1_OFFSET, AUTOV1_OFFSET + AUTOV1_LENGTH)[:8]


def auto_v3(path: PathLike) -> str | None:
    """Civitai AutoV3: sha256 of the data section (after the 8-byte length and the header), upper case.

    Returns:
        The hash, or None when the file cannot be a safetensors file (shorter than 8 bytes, or its header length
        runs past the end). The header itself is not validated, as Civitai does not validate it either.
    """
    with open_input(path) as file:
        start = _data_start(file, os.fstat(file.fileno()).st_size)
    return None if start is None else _sha256_range(path, start).upper()


def sshs_model_hash(path: PathLike) -> str:
    """kohya's ``sshs_model_hash`` of a safetensors file: AutoV3 in lower case.

    Raises:
        FileFormatError: the file is not a valid safetensors file.
    """
    with SafetensorsReader(path) as reader:
        start = reader.data_offset
    return _sha256_range(path, start)


def crc32(path: PathLike) -> str:
    """CRC32 of the whole file in Civitai's form: upper-case hex of the CRC's bytes in little-endian order."""
    with open_input(path) as file:
        crc = 0
        for chunk in _chunks(file):
            crc = zlib.crc32(chunk, crc)
    return _crc32_hex(crc)


def sshs_legacy_hash(path: PathLike) -> str:
    """kohya's ``sshs_legacy_hash`` of a safetensors file, as kohya computes it when saving.

    kohya (``precalculate_safetensors_hashes``) serialises the tensors with only the ``ss_*`` metadata and hashes
    the 0x10000 bytes at offset 0x100000 of that buffer (first 8 lower-case hex). This rebuilds that buffer
    virtually: the header as safetensors would write it with the ``ss_*`` metadata only, followed by the tensors in
    safetensors' data order, read from this file wherever they sit in it. When the window reaches into the header
    (headers over about 1 MiB), kohya's own value depended on safetensors' unordered metadata; this uses sorted keys.

    Raises:
        FileFormatError: the file is not a valid safetensors file.
    """
    with SafetensorsReader(path) as reader:
        training = {key: value for key, value in reader.metadata.items() if key.startswith("ss_")}
        stored = sorted(reader.header.entries, key=lambda e: layout_key(e.dtype, e.name))
        moved, offset = [], 0
        for entry in stored:
            moved.append(TensorEntry(entry.name, entry.dtype, entry.shape, offset, offset + entry.nbytes))
            offset += entry.nbytes
        header = encode_header(moved, training)
        window_end = AUTOV1_OFFSET + AUTOV1_LENGTH
        digest = hashlib.sha256(header[AUTOV1_OFFSET:window_end])
        for entry in moved:
            start = len(header) + entry.begin  # where the tensor sits in the virtual file
            low, high = max(AUTOV1_OFFSET, start), min(window_end, start + entry.nbytes)
            if low < high:
                digest.update(reader.read_raw(entry.name, low - start, high - start))
    return digest.hexdigest()[:8]
