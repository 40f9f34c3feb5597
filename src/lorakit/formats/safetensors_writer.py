"""Write a safetensors file atomically, streaming one tensor at a time.

The header is computed from names, dtypes and shapes known in advance, so the tensors themselves can be produced one
by one (``TensorSource.produce``) while the file is written: a bake or extract never holds the whole output in memory.

Same tensors and metadata give the same bytes: tensors are laid out as safetensors lays them out (widest dtype
first, then by name) and metadata keys are sorted. With at most one metadata key the file is byte-identical to
``safetensors.torch.save_file``'s; with more, only the order of the metadata keys differs (safetensors writes them in
hash-map order).

The file is written to a hidden temporary file in the target folder, flushed and fsynced, then renamed onto the final
name: a reader never sees half a file, and a failure (including a producer raising) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from lorakit.errors import OutputError
from lorakit.formats.dtypes import dtype_name, layout_key
from lorakit.formats.safetensors_header import METADATA_KEY, TensorEntry, encode_header

PathLike = str | os.PathLike[str]

_HEX_PLACEHOLDER = "0" * 64


@dataclass(frozen=True)
class TensorSource:
    """A tensor to write: its name, dtype and shape up front, its values on demand.

    Attributes:
        name: the tensor's key in the file.
        dtype: its dtype; ``produce`` must return exactly this dtype.
        shape: its shape; ``produce`` must return exactly this shape.
        produce: called once, when the writer reaches this tensor; may compute it (a merge, a bake) on the spot.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSource:
        """A source for a tensor that is already in memory."""
        return cls(name=name, dtype=tensor.dtype, shape=tuple(tensor.shape), produce=lambda: tensor)


@dataclass(frozen=True)
class WrittenFile:
    """What ``write_file`` wrote.

    Attributes:
        path: the final file.
        size: its size in bytes.
        data_sha256: lower-case sha256 of the data section (= kohya ``sshs_model_hash``, Civitai AutoV3 in lower
            case), or None when it was not asked for.
    """

    path: Path
    size: int
    data_sha256: str | None


def check_output_path(path: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """Check that ``path`` can be written without touching an input; call it before any long computation.

    Args:
        path: the output file.
        inputs: files the output must not overwrite (the inputs of the operation).

    Returns:
        ``path`` as a Path.

    Raises:
        OutputError: ``path`` is a folder or one of ``inputs``, or its folder is missing or not writable.
    """
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; name the output file")
    if not folder.is_dir():
        raise OutputError(f"{target}: the folder {folder} does not exist; create it or choose another output")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{target}: the folder {folder} is not writable; choose another output folder")
    for source in inputs:
        if _same_file(target, Path(source)):
            raise OutputError(
                f"{target}: is also an input ({source}); write to a new file, lorakit never modifies its inputs"
            )
    return target


def _same_file(a: Path, b: Path) -> bool:
    # samefile also catches hard links and symlinks; realpath covers paths that do not exist yet.
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def write_file(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor] | Iterable[TensorSource],
    metadata: Mapping[str, str] | None = None,
    *,
    inputs: Iterable[PathLike] = (),
    hash_fields: Mapping[str, str] | None = None,
    hash_data: bool = False,
) -> WrittenFile:
    """Write a safetensors file atomically, producing tensors one at a time.

    Args:
        path: the output file; replaced atomically if it exists.
        tensors: a mapping of names to tensors, or ``TensorSource``s whose ``produce`` is called one at a time in
            the file's data order (widest dtype first, then by name), so at most one produced tensor is alive.
        metadata: string-to-string header metadata; None writes no ``__metadata__``.
        inputs: the operation's input files; writing onto any of them is refused.
        hash_fields: metadata keys to fill with the sha256 of the data section once it is written, each mapped to
            a template in which ``{sha256}`` stands for the lower-case hex digest, e.g.
            ``{"sshs_model_hash": "{sha256}", "modelspec.hash_sha256": "0x{sha256}"}`` (what kohya writes).
        hash_data: compute ``WrittenFile.data_sha256`` even without ``hash_fields``.

    Returns:
        The path, size and (if asked for) data-section hash of the file written.

    Raises:
        OutputError: the output is an input, its folder is missing or read-only, or writing failed (disk full).
        ValueError: a name repeats or is ``__metadata__``, a dtype has no safetensors name, a produced tensor does
            not match its declared dtype or shape, or a hash field is misused.
        TypeError: metadata is not a string-to-string mapping.
    """
    sources = _sources_in_layout_order(tensors)
    final_metadata = _metadata_with_placeholders(metadata, hash_fields)
    target = check_output_path(path, inputs)
    entries = _layout(sources)
    header = encode_header(entries, final_metadata)
    hasher = hashlib.sha256() if (hash_data or hash_fields) else None

    with atomic_file(target) as (file, _):
        _write(file, header, target)
        for source in sources:
            _write_tensor(file, source, hasher.update if hasher is not None else None, target)
        digest = hasher.hexdigest() if hasher is not None else None
        if hash_fields and digest is not None:
            _rewrite_header(file, header, entries, final_metadata, hash_fields, digest, target)
    return WrittenFile(path=target, size=len(header) + (entries[-1].end if entries else 0), data_sha256=digest)


@contextlib.contextmanager
def atomic_file(target: Path, mode: str = "wb") -> Iterator[tuple[BinaryIO, Path]]:
    """Write ``target`` through a hidden temporary file beside it: yields ``(file, temp_path)``.

    When the block ends normally the file is fsynced and renamed onto ``target`` (and the folder synced); when it
    raises, the temporary file is removed, so a failed or killed write never leaves a partial file under the final name.
    """
    fd, temp = create_temp(target)
    try:
        with os.fdopen(fd, mode) as file:
            yield file, temp
            _finish(file, target)
        _rename(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    sync_folder(target.parent)


def _sources_in_layout_order(tensors: Mapping[str, torch.Tensor] | Iterable[TensorSource]) -> list[TensorSource]:
    if isinstance(tensors, Mapping):
        sources = [TensorSource.of(name, tensor) for name, tensor in tensors.items()]
    else:
        sources = list(tensors)
    seen: set[str] = set()
    for source in sources:
        if not isinstance(source.name, str) or source.name == METADATA_KEY or not _is_utf8(source.name):
            raise ValueError(f"tensor name {source.name!r} cannot be stored; rename the tensor")
        if source.name in seen:
            raise ValueError(f"tensor name {source.name!r} appears twice; every tensor needs its own name")
        seen.add(source.name)
        if not all(type(dim) is int and dim >= 0 for dim in source.shape):
            raise ValueError(f"tensor {source.name!r}: shape {source.shape} is not a tuple of non-negative ints")
        dtype_name(source.dtype)  # raises ValueError for a dtype safetensors cannot store
    return sorted(sources, key=lambda s: layout_key(dtype_name(s.dtype), s.name))


def _is_utf8(text: str) -> bool:
    # Lone surrogates (from os.fsencode round trips, broken JSON) cannot be written as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata_with_placeholders(
    metadata: Mapping[str, str] | None, hash_fields: Mapping[str, str] | None
) -> dict[str, str] | None:
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map strings to strings; convert numbers and lists with str() or json.dumps()")
    if metadata is not None and not all(_is_utf8(k) and _is_utf8(v) for k, v in metadata.items()):
        raise ValueError("metadata holds a string that is not valid Unicode (a lone surrogate); clean it first")
    if not hash_fields:
        return None if metadata is None else dict(metadata)
    result = dict(metadata or {})
    for key, template in hash_fields.items():
        if key in result:
            raise ValueError(f"metadata key {key!r} is both given and a hash field; give it once")
        if "{sha256}" not in template:
            raise ValueError(f"hash field {key!r}: template {template!r} has no {{sha256}}")
        # A placeholder of the digest's length keeps the header length, so it can be patched in place.
        result[key] = template.replace("{sha256}", _HEX_PLACEHOLDER)
    return result


def _layout(sources: list[TensorSource]) -> list[TensorEntry]:
    entries = []
    offset = 0
    for source in sources:
        name = dtype_name(source.dtype)
        nbytes = torch.Size(source.shape).numel() * torch.empty((), dtype=source.dtype).element_size()
        entries.append(TensorEntry(source.name, name, tuple(source.shape), offset, offset + nbytes))
        offset += nbytes
    return entries


def create_temp(target: Path, *, direct: bool = False) -> tuple[int, Path]:
    """Create a hidden temporary file beside ``target``; returns its descriptor and path.

    Same folder as the target, so the final rename is atomic (never across file systems). os.open with 0o666 lets the
    umask decide the final permissions, as for any new file (mkstemp would force 0o600). ``direct`` asks for
    ``O_DIRECT`` (the caller then writes aligned blocks) and falls back to the page cache where the file system
    refuses it (tmpfs).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = target.with_name(f".{target.name[:180]}.{secrets.token_hex(6)}.tmp")
        try:
            if direct and hasattr(os, "O_DIRECT"):
                try:
                    return os.open(temp, flags | os.O_DIRECT, 0o666), temp
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"{target}: cannot create a file there ({exc.strerror}); choose another folder") from None
    raise OutputError(f"{target}: cannot find a free temporary name in {target.parent}; clean up .tmp files there")


def _write_failed(target: Path, exc: OSError) -> OutputError:
    return OutputError(f"{target}: writing failed ({exc.strerror}); free disk space or choose another folder")


def _write(file: BinaryIO, data: bytes | memoryview, target: Path) -> None:
    try:
        file.write(data)
    except OSError as exc:
        raise _write_failed(target, exc) from None


def _write_tensor(
    file: BinaryIO, source: TensorSource, hash_update: Callable[[memoryview], object] | None, target: Path
) -> None:
    tensor = source.produce()
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != source.dtype or tuple(tensor.shape) != source.shape:
        got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"tensor {source.name!r}: produced {got}, declared {source.dtype} {source.shape}")
    data = tensor_bytes(tensor)
    _write(file, data, target)
    if hash_update is not None:
        hash_update(data)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a tensor as safetensors stores them (C order, little endian), without copying when possible.

    Args:
        tensor: any tensor; a non-contiguous or non-CPU one is copied first.

    Returns:
        A memoryview over the tensor's bytes; keep the tensor alive while using it.
    """
    flat = tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _rewrite_header(
    file: BinaryIO,
    header: bytes,
    entries: list[TensorEntry],
    metadata: dict[str, str] | None,
    hash_fields: Mapping[str, str],
    digest: str,
    target: Path,
) -> None:
    filled = dict(metadata or {})
    for key, template in hash_fields.items():
        filled[key] = template.replace("{sha256}", digest)
    new_header = encode_header(entries, filled)
    if len(new_header) != len(header):  # hex digits encode as themselves, so this cannot change the length
        raise AssertionError("hash fields changed the header length")
    file.seek(0)
    _write(file, new_header, target)
    file.seek(0, os.SEEK_END)


def _finish(file: BinaryIO, target: Path) -> None:
    try:
        file.flush()
        os.fsync(file.fileno())
    except OSError as exc:
        raise _write_failed(target, exc) from None


def _rename(temp: Path, target: Path) -> None:
    try:
        os.replace(temp, target)
    except OSError as exc:
        raise OutputError(f"{target}: cannot replace it ({exc.strerror}); check the file's permissions") from None


def sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename in it persists."""
    # Persist the rename itself; some file systems (and Windows) cannot open a folder, which only costs durability.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
