"""Parse, validate and encode the header of a safetensors file.

Layout of a safetensors file::

    [8 bytes: N, u64 little endian][N bytes: JSON header, space padded][data section]

The JSON header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) and may hold ``"__metadata__"``, a string-to-string map. The parser trusts nothing in it: every length
and offset is checked against the real file size before anything is allocated from it, so a lying header is a
``FileFormatError`` that names the file and the key, never a crash or a huge allocation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from lorakit.errors import FileFormatError
from lorakit.formats.dtypes import ITEM_SIZES, TORCH_DTYPES

MAX_HEADER_BYTES = 100_000_000
"""Largest header accepted (safetensors' own limit); real LoRA headers are kilobytes, big tag tables a few MB."""

METADATA_KEY = "__metadata__"

_DAMAGED = "the file is truncated or damaged; download or copy it again"
_NOT_SAFETENSORS = "it is not a safetensors file (or is damaged); check the file"
_CONTRADICTS = "the header contradicts itself: the file is damaged or its writer is broken; get a good copy"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it.

    Attributes:
        name: the tensor's key.
        dtype: safetensors dtype name, e.g. ``"F16"``.
        shape: the tensor's shape (``()`` for a scalar).
        begin: first byte, relative to the start of the data section.
        end: one past the last byte, relative to the start of the data section.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Number of bytes of the tensor's data."""
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the tensor."""
        return TORCH_DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header.

    Attributes:
        entries: the tensors, in the order the header lists them.
        metadata: the ``__metadata__`` map, or None when the header has none.
        header_size: N, the length of the JSON header in bytes (padding included).
        data_offset: where the data section starts in the file (``8 + N``).
    """

    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None
    header_size: int
    data_offset: int


def _short(text: str, limit: int = 120) -> str:
    """A key quoted on one line and cut short, so that a hostile key cannot flood the error message."""
    quoted = repr(text)
    return quoted if len(quoted) <= limit else quoted[: limit - 4] + "...'"


def header_error(name: str, problem: str, advice: str = _DAMAGED) -> FileFormatError:
    """Build the one-line error for a bad header: ``<file>: <problem>; <what to do>``.

    Args:
        name: the file, as the user named it.
        problem: what is wrong, naming the key where there is one.
        advice: what the user can do about it.

    Returns:
        The error, to be raised by the caller.
    """
    return FileFormatError(f"{name}: {problem}; {advice}")


def read_header(file: BinaryIO, file_size: int, name: str) -> Header:
    """Read and validate the header of an open safetensors file.

    Args:
        file: the file, opened in binary mode; its position is moved.
        file_size: the file's size in bytes (from ``os.fstat``), which every length is checked against.
        name: the file name to put in error messages.

    Returns:
        The validated header.

    Raises:
        FileFormatError: the file is too short, or the header is malformed or lies about the data.
    """
    if file_size < 8:
        raise header_error(name, f"is {file_size} bytes long, too short for a safetensors file", _NOT_SAFETENSORS)
    file.seek(0)
    header_size = int.from_bytes(read_exactly(file, 8, name), "little")
    if header_size < 2:
        raise header_error(name, f"header length is {header_size} bytes, too small to hold a header", _NOT_SAFETENSORS)
    if header_size > MAX_HEADER_BYTES:
        raise header_error(
            name, f"header length claims {header_size} bytes, over the {MAX_HEADER_BYTES} byte limit", _NOT_SAFETENSORS
        )
    if 8 + header_size > file_size:
        raise header_error(name, f"header length {header_size} runs past the end of the file ({file_size} bytes)")
    raw = read_exactly(file, header_size, name)
    parsed = _parse_json(raw, name)
    data_size = file_size - 8 - header_size
    return _validate(parsed, name, header_size, data_size)


def read_exactly(file: BinaryIO, size: int, name: str) -> bytes:
    """Read exactly ``size`` bytes from the current position.

    Args:
        file: an open binary file.
        size: how many bytes to read; the caller has checked it against the file size.
        name: the file name for the error message.

    Returns:
        The bytes.

    Raises:
        FileFormatError: the file ended early (it shrank while being read).
    """
    data = bytearray()
    while len(data) < size:
        # Unbuffered files may return fewer bytes than asked; only an empty read means the end.
        chunk = file.read(size - len(data))
        if not chunk:
            raise header_error(name, f"ended after {len(data)} of {size} expected bytes (did it change while read?)")
        data += chunk
    return bytes(data)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages ("array", not "list")."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a repeated key would let two readers see different tensors, so refuse it."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _parse_json(raw: bytes, name: str) -> dict[str, Any]:
    # Some writers pad with NUL bytes instead of spaces; that is harmless, so accept it.
    raw = raw.rstrip(b" \x00")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise header_error(name, f"header is not valid UTF-8 (byte {exc.start})", _NOT_SAFETENSORS) from None
    try:
        parsed = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise header_error(name, f"header lists key {_short(exc.key)} twice", _NOT_SAFETENSORS) from None
    except (ValueError, RecursionError) as exc:
        raise header_error(name, f"header is not valid JSON ({_short(str(exc), 80)})", _NOT_SAFETENSORS) from None
    if not isinstance(parsed, dict):
        raise header_error(name, f"header is a JSON {_json_type(parsed)}, not an object", _NOT_SAFETENSORS)
    return parsed


def _validate(parsed: dict[str, Any], name: str, header_size: int, data_size: int) -> Header:
    metadata = _validate_metadata(parsed.get(METADATA_KEY), name) if METADATA_KEY in parsed else None
    entries = tuple(
        _validate_entry(key, value, name, data_size) for key, value in parsed.items() if key != METADATA_KEY
    )
    _check_no_overlap(entries, name)
    return Header(entries=entries, metadata=metadata, header_size=header_size, data_offset=8 + header_size)


def _validate_metadata(value: Any, name: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise header_error(name, f"__metadata__ is a JSON {_json_type(value)}, not an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise header_error(
                name,
                f"metadata key {_short(key)} has a JSON {_json_type(item)} value, not a string",
                "the writer broke the safetensors format; re-save the file with a tool that writes string metadata",
            )
    return dict(value)


def _is_count(value: Any) -> bool:
    # bool is a subclass of int in Python; JSON true must not pass as a size.
    return type(value) is int and value >= 0


def _validate_entry(key: str, value: Any, name: str, data_size: int) -> TensorEntry:
    # The well-formed case in a few checks (a LoRA has thousands of entries); any doubt goes to the slow path,
    # which applies the same rules one by one and names the broken one.
    if type(value) is dict:
        dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
        if type(dtype) is str and dtype in TORCH_DTYPES and type(shape) is list and type(offsets) is list:
            if len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int:
                begin, end = offsets
                if 0 <= begin <= end <= data_size and all(type(dim) is int and dim >= 0 for dim in shape):
                    if end - begin == math.prod(shape) * ITEM_SIZES[dtype]:
                        return TensorEntry(name=key, dtype=dtype, shape=tuple(shape), begin=begin, end=end)
    return _validate_entry_slowly(key, value, name, data_size)


def _validate_entry_slowly(key: str, value: Any, name: str, data_size: int) -> TensorEntry:
    where = f"tensor {_short(key)}"
    if not isinstance(value, dict):
        raise header_error(name, f"{where} is a JSON {_json_type(value)}, not an object")
    dtype = value.get("dtype")
    if dtype is None:
        raise header_error(name, f"{where} has no dtype")
    if not isinstance(dtype, str) or dtype not in TORCH_DTYPES:
        known = " ".join(TORCH_DTYPES)
        raise header_error(
            name, f"{where} has unknown dtype {_short(str(dtype), 40)}", f"lorakit reads these dtypes: {known}"
        )
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise header_error(name, f"{where} has shape {_short(str(shape), 60)}, not a list of non-negative integers")
    offsets = value.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise header_error(name, f"{where} has data_offsets {_short(str(offsets), 60)}, not [begin, end]")
    begin, end = offsets
    if begin > end:
        raise header_error(name, f"{where} has data_offsets [{begin}, {end}] with begin after end")
    if end > data_size:
        raise header_error(name, f"{where} ends at byte {end} but the data section has only {data_size} bytes")
    expected = math.prod(shape) * ITEM_SIZES[dtype]
    if end - begin != expected:
        raise header_error(
            name, f"{where} spans {end - begin} bytes but {dtype} {shape} needs {expected}", _CONTRADICTS
        )
    return TensorEntry(name=key, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_no_overlap(entries: Sequence[TensorEntry], name: str) -> None:
    # Empty tensors own no bytes, so they may sit anywhere (safetensors puts them at the start).
    spans = sorted((e for e in entries if e.nbytes > 0), key=lambda e: (e.begin, e.end))
    for before, after in zip(spans, spans[1:]):
        if after.begin < before.end:
            raise header_error(
                name,
                f"tensors {_short(before.name, 60)} and {_short(after.name, 60)} overlap in the data section",
                _CONTRADICTS,
            )


def encode_header(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    """Encode a header as safetensors writes it: the 8-byte length, then compact JSON padded with spaces.

    ``__metadata__`` comes first with its keys sorted, then the tensors in the order given (callers pass the data
    order), so the same tensors and metadata always give the same bytes.

    Args:
        entries: the tensors, with their offsets, in data-section order.
        metadata: string-to-string metadata; None writes no ``__metadata__`` (an empty map writes ``{}``).

    Returns:
        ``len(json).to_bytes(8, "little") + json``, the JSON padded so the data section starts on an 8-byte boundary.
    """
    header: dict[str, Any] = {}
    if metadata is not None:
        header[METADATA_KEY] = {key: metadata[key] for key in sorted(metadata)}
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [entry.begin, entry.end],
        }
    # ensure_ascii=False and compact separators: the same bytes serde_json (inside safetensors) writes.
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text
