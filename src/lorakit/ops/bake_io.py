"""Writing baked checkpoints fast: a direct-I/O streaming writer with a writer thread, read-ahead and patching on two
worker threads, folder output.

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


def _nbytes(source: TensorSource) -> int:
    return torch.Size(source.shape).numel() * torch.empty((), dtype=source.dtype).element_size()


@contextlib.contextmanager
def prefetched(
    sources: Sequence[TensorSource], workers: int = 2, budget: int = 64 << 20
) -> Iterator[list[TensorSource]]:
    """The same sources in the writer's layout order, produced ahead on ``workers`` threads.

    Reading and patching the next tensors overlaps writing the current one, and two workers patch two tensors at
    once (torch and file I/O release the GIL; each GEMM stays single-threaded, the tensors are the parallel unit).
    Tensors are started ahead while the bytes in flight stay under ``budget``, and always ``workers`` of them so
    that no worker idles; memory stays a few of the largest tensors.
    """
    order = sorted(sources, key=lambda s: layout_key(dtype_name(s.dtype), s.name))
    sizes = [_nbytes(s) for s in order]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorakit-bake")
    futures: dict[int, Future[torch.Tensor]] = {}
    state = {"next": 0, "ahead": 0}  # next index to submit; bytes submitted and not yet taken

    def get(index: int) -> torch.Tensor:
        while state["next"] < len(order) and (
            state["next"] <= index + workers or state["ahead"] + sizes[state["next"]] <= budget
        ):
            futures[state["next"]] = pool.submit(order[state["next"]].produce)
            state["ahead"] += sizes[state["next"]]
            state["next"] += 1
        state["ahead"] -= sizes[index]
        return futures.pop(index).result()

    try:
        yield [TensorSource(s.name, s.dtype, s.shape, functools.partial(get, i)) for i, s in enumerate(order)]
    finally:
        # wait: a worker must not read from a checkpoint the caller is about to close
        pool.shutdown(wait=True, cancel_futures=True)


class _Staged:
    """Bytes gathered in aligned buffers and written in whole aligned blocks, by a writer thread.

    Two buffers: while one is being written (``O_DIRECT`` writes wait for the disk), the caller fills the other.
    Writes stay in order: a buffer is handed over only after the previous write finished.
    """

    def __init__(self, fd: int, target: Path) -> None:
        self.fd, self.target = fd, target
        self.buffers = [mmap.mmap(-1, _STAGE) for _ in range(2)]  # anonymous maps are page aligned
        self.views = [memoryview(b) for b in self.buffers]
        self.current = 0
        self.filled = 0
        self.total = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-write")
        self.pending: Future[None] | None = None

    def add(self, data: memoryview | bytes) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            take = min(len(data), _STAGE - self.filled)
            self.views[self.current][self.filled : self.filled + take] = data[:take]
            self.filled += take
            data = data[take:]
            if self.filled == _STAGE:
                self._hand_over(_STAGE)

    def _hand_over(self, size: int) -> None:
        self._wait()
        self.pending = self.pool.submit(self._write, self.views[self.current], size)
        self.total += size
        self.current = 1 - self.current
        self.filled = 0

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def _write(self, view: memoryview, size: int) -> None:
        done = 0
        while done < size:
            try:
                # a context manager, so that an exception's traceback cannot keep the buffer exported
                with view[done:size] as chunk:
                    done += _os_write(self.fd, chunk)
            except OSError as exc:
                raise OutputError(
                    f"{self.target}: writing failed ({exc.strerror}); free disk space or choose another folder"
                ) from None

    def finish(self) -> int:
        """Write the tail (padded to the alignment, then cut back) and return the file size."""
        tail = self.filled
        if tail:
            padded = -(-tail // _ALIGN) * _ALIGN
            self.views[self.current][tail:padded] = bytes(padded - tail)
            self._hand_over(padded)
            self.total -= padded - tail
        self._wait()
        os.ftruncate(self.fd, self.total)
        return self.total

    def close(self) -> None:
        """Stop the writer (after its current write) and free the buffers; safe to call twice."""
        self.pool.shutdown(wait=True)
        self.pending = None
        for view, buffer in zip(self.views, self.buffers, strict=True):
            view.release()
            buffer.close()
        self.views, self.buffers = [], []


def _entries(sources: Sequence[TensorSource]) -> list[TensorEntry]:
    entries, offset = [], 0
    for s in sources:
        nbytes = _nbytes(s)
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
        staged.close()  # the writer thread stops before its file descriptor is closed
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
