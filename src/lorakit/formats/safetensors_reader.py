"""Read a safetensors file tensor by tensor with plain reads, or a small file all at once through a private map.

``get`` reads exactly one tensor's bytes into a fresh tensor, so peak memory is the largest tensor asked for, and the
tensor returned owns its memory (closing the file does not invalidate it): the way to stream a checkpoint, whose
mapped pages would all count in the process's memory once touched (5 GB for an SDXL checkpoint).

``read_all`` is for LoRA-sized files: it maps the file copy-on-write and returns views, so reading costs no copy and
no page is touched until a tensor's values are used (a conversion that only renames keys reads almost nothing).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from lorakit.errors import InputError
from lorakit.formats.safetensors_header import Header, TensorEntry, header_error, read_header


def open_input(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a file for binary reading, turning OS errors into a user-facing error.

    Args:
        path: the file to open.

    Returns:
        The open file, unbuffered (reads go straight into the caller's buffer).

    Raises:
        InputError: the file is missing, is a folder, or cannot be read.
    """
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a file; name the file inside it") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None


_SEEK_LOCK = threading.Lock()


def _pread_into(file: BinaryIO, view: memoryview, offset: int) -> int:
    """Read into ``view`` at ``offset`` without moving a shared file position, so that threads can read one file
    at once (the bake reads ahead on two). Where the system has no positional read, a lock serialises seek + read."""
    if hasattr(os, "preadv"):
        return os.preadv(file.fileno(), [view], offset)
    with _SEEK_LOCK:
        file.seek(offset)
        return file.readinto(view)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


class SafetensorsReader:
    """A safetensors file opened for reading, one tensor at a time.

    The header is read and validated when the reader is created (see ``safetensors_header``); tensor data is read
    only when asked for.

    Example:
        >>> with SafetensorsReader("lora.safetensors") as reader:  # doctest: +SKIP
        ...     for name, tensor in reader.items():
        ...         print(name, tensor.shape)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open ``path`` and validate its header.

        Args:
            path: the safetensors file.

        Raises:
            InputError: the file is missing or unreadable.
            FileFormatError: the file is not a valid safetensors file.
        """
        self.path = Path(path)
        self._file = open_input(path)
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            self._header: Header = read_header(self._file, self.file_size, str(path))
        except BaseException:
            self._file.close()
            raise
        self._entries: dict[str, TensorEntry] = {entry.name: entry for entry in self._header.entries}

    # -- header ------------------------------------------------------------------------------------------------

    @property
    def header(self) -> Header:
        """The validated header."""
        return self._header

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` map (a copy; empty when the file has none)."""
        return dict(self._header.metadata or {})

    @property
    def header_size(self) -> int:
        """N, the length of the JSON header in bytes."""
        return self._header.header_size

    @property
    def data_offset(self) -> int:
        """Where the data section starts in the file (``8 + N``)."""
        return self._header.data_offset

    def keys(self) -> list[str]:
        """The tensor names, in the order the header lists them."""
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, key: str) -> TensorEntry:
        """The header entry of one tensor.

        Raises:
            KeyError: the file has no tensor named ``key``.
        """
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{self.path}: has no tensor named {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of one tensor, without reading it."""
        return self.entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        """The torch dtype of one tensor, without reading it."""
        return self.entry(key).torch_dtype

    # -- data --------------------------------------------------------------------------------------------------

    def get(self, key: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor.

        Args:
            key: the tensor's name.
            scratch: a uint8 buffer to read into instead of a new tensor, at least the tensor's size: the result is
                a view of it, valid until the buffer is used again (reading a model to cast it tensor by tensor
                then reuses one buffer, so the memory freed between tensors leaves no holes).

        Returns:
            A CPU tensor with the file's dtype and shape, owning its memory (unless ``scratch`` is given).

        Raises:
            KeyError: no such tensor.
            FileFormatError: the file ended early (it was truncated after it was opened).
            ValueError: ``scratch`` is too small.
        """
        entry = self.entry(key)
        if scratch is None:
            buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        elif scratch.dtype != torch.uint8 or scratch.numel() < entry.nbytes:
            raise ValueError(f"scratch buffer of {scratch.numel()} {scratch.dtype} for {entry.nbytes} bytes of {key!r}")
        else:
            buffer = scratch[: entry.nbytes]
        self._read_into(buffer, self.data_offset + entry.begin, entry.name)
        # safetensors stores little-endian data, which is what torch uses on every platform it ships for.
        return buffer.view(entry.torch_dtype).reshape(entry.shape)

    def read_raw(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        """Read a byte range of one tensor's stored data, as it is on disk (for hashing and copying).

        Args:
            key: the tensor's name.
            start: first byte, relative to the tensor's data.
            stop: one past the last byte, relative to the tensor's data; None for the end of the tensor.

        Returns:
            The bytes, ``stop - start`` of them (clipped to the tensor).
        """
        entry = self.entry(key)
        stop = entry.nbytes if stop is None else min(stop, entry.nbytes)
        start = max(0, min(start, stop))
        buffer = torch.empty(stop - start, dtype=torch.uint8)
        self._read_into(buffer, self.data_offset + entry.begin + start, entry.name)
        return buffer.numpy().tobytes()

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, as views of a private (copy-on-write) mapping of the file (for small files such as LoRAs).

        Nothing is read until a tensor's values are used, so reading a LoRA to rename its keys (a conversion) costs
        no copy at all; pages read count once (they are the page cache's), and writing to a tensor changes a private
        copy, never the file. The mapping lives as long as any of the tensors. A tensor whose offset does not suit
        its dtype's alignment is copied out instead.

        Returns:
            name -> tensor, in header order.
        """
        mapped = torch.from_file(str(self.path), shared=False, size=self.file_size, dtype=torch.uint8)
        typed: dict[torch.dtype, torch.Tensor] = {}  # the mapping seen as each dtype, one view each
        tensors = {}
        for key, entry in self._entries.items():
            dtype = entry.torch_dtype
            start, size = self.data_offset + entry.begin, dtype.itemsize
            if start % size:
                raw = mapped[start : start + entry.nbytes].clone()  # a view would be misaligned for this dtype
                tensors[key] = raw.view(dtype).reshape(entry.shape)
                continue
            if dtype not in typed:
                typed[dtype] = mapped[: self.file_size - self.file_size % size].view(dtype)
            tensors[key] = typed[dtype].as_strided(entry.shape, _contiguous_strides(entry.shape), start // size)
        return tensors

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` in header order, reading one tensor at a time."""
        for key in self._entries:
            yield key, self.get(key)

    def _read_into(self, buffer: torch.Tensor, offset: int, key: str) -> None:
        view = memoryview(buffer.numpy()).cast("B")
        done = 0
        while done < len(view):
            count = _pread_into(self._file, view[done:], offset + done)
            if not count:
                raise header_error(
                    str(self.path),
                    f"tensor {key!r} is cut short at byte {offset + done} (the file shrank after it was opened)",
                )
            done += count

    # -- lifetime ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file. Tensors already read stay valid."""
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsReader({str(self.path)!r}, {len(self)} tensors)"
