"""Writing baked checkpoints fast: a direct-I/O streaming writer, read-ahead on a worker thread, folder output.

Why not ``lorakit.formats.safetensors_writer.write_file``: it writes through the page cache, and on the machines this
runs on (virtual disks) buffered writes of a multi-gigabyte file are throttled to about 0.3 GB/s while the same bytes
written with ``O_DIRECT`` from an aligned buffer go at about 2 GB/s (measured: 2 GB in 6.4 s buffered, 0.9 s direct).
``write_direct`` produces the very same bytes as ``write_file`` (same layout order, same header encoding; a test
compares them) through an aligned staging buffer, and falls back to buffered writes where the file system refuses
``O_DIRECT`` (tmpfs). It is atomic in the same way: a hidden temporary file in the target folder, fsync, rename.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from lorakit.errors import OutputError
from lorakit.formats.dtypes import dtype_name, layout_key
from lorakit.formats.safetensors_header import TensorEntry, encode_header
from lorakit.formats.safetensors_writer import TensorSource, check_output_path, create_temp, sync_folder, tensor_bytes

__all__ = ["check_folder_output", "prefetched", "write_direct", "write_folder"]

_os_write = os.write
"""The system call, by a name tests can replace to simulate a full disk."""
_ALIGN = 4096
_STAGE = 8 << 20
"""Staging buffer: 8 MiB, a multiple of the alignment O_DIRECT needs (offset, size and address)."""


@contextlib.contextmanager
def prefetched(sources: Sequence[TensorSource], depth: int = 1) -> Iterator[list[TensorSource]]:
    """The same sources in the writer's layout order, each produced on a worker thread ``depth`` tensors ahead.

    Reading and patching the next tensor overlaps writing the current one (torch and file I/O release the GIL), at
    the cost of ``depth`` more tensors alive.
    """
    order = sorted(sources, key=lambda s: layout_key(dtype_name(s.dtype), s.name))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-bake")
    futures: dict[int, Future[torch.Tensor]] = {}
    submitted = [0]

    def get(index: int) -> torch.Tensor:
        while submitted[0] <= min(index + depth, len(order) - 1):
            futures[submitted[0]] = pool.submit(order[submitted[0]].produce)
            submitted[0] += 1
        return futures.pop(index).result()

    try:
        yield [TensorSource(s.name, s.dtype, s.shape, functools.partial(get, i)) for i, s in enumerate(order)]
    finally:
        # wait: a worker must not read from a checkpoint the caller is about to close
        pool.shutdown(wait=True, cancel_futures=True)


class _Staged:
    """Bytes gathered in an aligned buffer and written in whole aligned blocks."""

    def __init__(self, fd: int, target: Path) -> None:
        self.fd, self.target = fd, target
        self.buffer = mmap.mmap(-1, _STAGE)  # anonymous maps are page aligned
        self.view = memoryview(self.buffer)
        self.filled = 0
        self.total = 0

    def add(self, data: memoryview | bytes) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            take = min(len(data), _STAGE - self.filled)
            self.view[self.filled : self.filled + take] = data[:take]
            self.filled += take
            data = data[take:]
            if self.filled == _STAGE:
                self._flush(_STAGE)

    def _flush(self, size: int) -> None:
        done = 0
        while done < size:
            try:
                # a context manager, so that an exception's traceback cannot keep the buffer exported
                with self.view[done:size] as chunk:
                    done += _os_write(self.fd, chunk)
            except OSError as exc:
                raise OutputError(
                    f"{self.target}: writing failed ({exc.strerror}); free disk space or choose another folder"
                ) from None
        self.total += size
        self.filled = 0

    def finish(self) -> int:
        """Write the tail (padded to the alignment, then cut back) and return the file size."""
        tail = self.filled
        if tail:
            padded = -(-tail // _ALIGN) * _ALIGN
            self.view[tail:padded] = bytes(padded - tail)
            self._flush(padded)
            self.total -= padded - tail
        os.ftruncate(self.fd, self.total)
        return self.total

    def close(self) -> None:
        self.view.release()
        self.buffer.close()


def _entries(sources: Sequence[TensorSource]) -> list[TensorEntry]:
    entries, offset = [], 0
    for s in sources:
        nbytes = torch.Size(s.shape).numel() * torch.empty((), dtype=s.dtype).element_size()
        entries.append(TensorEntry(s.name, dtype_name(s.dtype), tuple(s.shape), offset, offset + nbytes))
        offset += nbytes
    return entries


def write_direct(
    path: str | os.PathLike[str],
    sources: Sequence[TensorSource],
    metadata: dict[str, str] | None,
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> int:
    """Write a safetensors file with the bytes ``write_file`` would write, atomically, via direct I/O.

    Args:
        path: the output file.
        sources: the tensors; produced one at a time in layout order.
        metadata: header metadata.
        inputs: files the output may not overwrite.

    Returns:
        The file size.

    Raises:
        OutputError: the output is an input, its folder is missing or read-only, or writing failed.
        ValueError: a produced tensor differs from its declared dtype or shape.
    """
    target = check_output_path(path, inputs)
    ordered = sorted(sources, key=lambda s: layout_key(dtype_name(s.dtype), s.name))
    header = encode_header(_entries(ordered), metadata)
    fd, temp = create_temp(target, direct=True)
    staged = _Staged(fd, target)
    try:
        staged.add(header)
        for source in ordered:
            tensor = source.produce()
            if tensor.dtype != source.dtype or tuple(tensor.shape) != tuple(source.shape):
                raise ValueError(
                    f"tensor {source.name!r}: produced {tensor.dtype} {tuple(tensor.shape)}, declared "
                    f"{source.dtype} {source.shape}"
                )
            staged.add(tensor_bytes(tensor))
        size = staged.finish()
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, target)
        sync_folder(target.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    finally:
        staged.close()
    return size


def check_folder_output(target: Path, inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse a folder output that overlaps an input or exists; its parent must be writable."""
    for source in inputs:
        a, b = os.path.realpath(target), os.path.realpath(source)
        if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
            raise OutputError(
                f"{target}: overlaps the input {source}; write to a new folder, lorakit never modifies its inputs"
            )
    if target.exists():
        raise OutputError(f"{target}: already exists; remove it or choose a new folder")
    check_output_path(target.parent / (target.name + ".check"))  # the parent exists and is writable


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5")


def write_folder(
    source: Path,
    files: dict[Path, list[TensorSource]],
    metadata: Callable[[Path], dict | None],
    target: Path,
    inputs: Sequence[str | os.PathLike[str]],
) -> None:
    """Write a diffusers folder into a hidden sibling folder, then rename it into place.

    Args:
        source: the input folder (its non-weight files are copied).
        files: each input weight file and the sources of its tensors (written to the same relative path).
        metadata: a file's header metadata.
        target: the new folder.
        inputs: paths the output may not overlap.
    """
    check_folder_output(target, inputs)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        temp.mkdir()
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            if path.is_dir() or path in files or path.name.endswith(_WEIGHT_SUFFIXES):
                continue  # other weight files (fp16 variants, .bin) would be stale beside the baked ones
            (temp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, temp / rel)
        for file, sources in files.items():
            out = temp / file.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            with prefetched(sources) as ordered:
                write_direct(out, ordered, metadata(file))
        os.rename(temp, target)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise OutputError(f"{target}: writing failed ({exc.strerror}); free disk space or choose another folder")
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
