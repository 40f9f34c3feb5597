"""Open a base-model checkpoint without loading it: single-file (A1111 / ComfyUI / BFL) or a diffusers folder.

Only headers are read when a checkpoint is opened; tensors are read one at a time with plain reads (no memory map,
whose pages would count in the process's memory), so walking a 24 GB FLUX file costs the largest tensor in memory.

Every weight is addressed two ways:

- by its *stored key*: a single-file key as written (``model.diffusion_model.input_blocks.1.1.proj_in.weight``), or
  for a diffusers folder ``<component>/<key>`` (``unet/down_blocks.0.attentions.0.proj_in.weight``);
- by its *module*: the diffusers module name of a component (``down_blocks.0.attentions.0.proj_in``), the naming of
  LoRA targets. ``weight_ref`` goes from a module to its stored key, with the row slice of a fused original weight
  (FLUX ``qkv`` / ``linear1``, SD3 ``qkv``, OpenCLIP ``in_proj_weight``) and how the original stores it.

Single-file names go through the ``lorakit.arch`` name maps. Fused row slices are taken from the map and scaled to
the stored tensor, so a down-sized model with the same block layout (tests, tiny models) maps exactly too.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.arch import VARIANTS, arch_of, detect, normalize_module_name, original_map, resolve_variant, reverse_map
from lorakit.arch.names import CHECKPOINT_PREFIXES
from lorakit.arch.refs import TRANSPOSE
from lorakit.errors import FileFormatError, InputError, UnsafeFileError
from lorakit.formats.safetensors_io import load_any, looks_like_safetensors
from lorakit.formats.safetensors_reader import SafetensorsReader

__all__ = ["Checkpoint", "WeightRef"]

_PIPELINE_ARCH = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
}
"""Pipeline classes in ``model_index.json`` that name the architecture on their own (SD1 and SD2 share one)."""


@dataclass(frozen=True)
class WeightRef:
    """Where a diffusers module's weight is stored.

    Attributes:
        key: the stored key (see the module docstring).
        rows: output rows ``[start, stop)`` of the stored tensor that hold this module, or None for all of it.
        transform: None, ``swap_halves`` (stored ``[shift; scale]``) or ``transpose`` (stored transposed).
        shape: the module's weight shape in diffusers form (the slice's shape for a fused weight).
    """

    key: str
    rows: tuple[int, int] | None
    transform: str | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Stored:
    file: Path
    name: str


class Checkpoint:
    """A base-model checkpoint opened for streaming; see the module docstring."""

    def __init__(
        self,
        path: Path,
        layout: str,
        stored: dict[str, _Stored],
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, torch.dtype],
        metadata: dict[str, str],
    ) -> None:
        self.path = path
        self.layout = layout
        self.metadata = metadata
        """The single file's header metadata (empty for folders)."""
        self._stored = stored
        self._shapes = shapes
        self._dtypes = dtypes
        self._readers: dict[Path, SafetensorsReader] = {}
        self._open_lock = threading.Lock()
        self._tensors: dict[str, torch.Tensor] | None = None
        self._refs: dict[str, dict[str, WeightRef]] = {}
        self.arch = ""
        self.variant = ""
        self.arch_reason = ""

    # -- opening -----------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, arch: str | None = None, allow_pickle: bool = False) -> Checkpoint:
        """Open a checkpoint, reading headers only.

        Args:
            path: a single-file checkpoint (``.safetensors``; a pickled ``.ckpt`` only with ``allow_pickle``) or a
                diffusers folder (``model_index.json`` + component folders, sharded or not).
            arch: the architecture or variant; detected from keys, shapes and metadata when None.
            allow_pickle: load a pickled checkpoint with ``torch.load(weights_only=True)`` (whole file in memory).

        Raises:
            InputError: the path is missing.
            FileFormatError: not a checkpoint, or an architecture that cannot be told (pass ``arch``).
            UnsafeFileError: a pickle without ``allow_pickle``.
        """
        source = Path(path)
        if not source.exists():
            raise InputError(f"{source}: no such file or folder; check the path")
        if source.is_dir():
            ckpt = cls._open_folder(source)
        else:
            ckpt = cls._open_file(source, allow_pickle)
        try:
            ckpt._set_arch(arch)
        except BaseException:
            ckpt.close()
            raise
        return ckpt

    @classmethod
    def _open_file(cls, path: Path, allow_pickle: bool) -> Checkpoint:
        if path.suffix.lower() == ".safetensors" or looks_like_safetensors(path):
            reader = SafetensorsReader(path)
            stored = {k: _Stored(path, k) for k in reader.keys()}
            shapes = {k: reader.shape(k) for k in stored}
            dtypes = {k: reader.dtype(k) for k in stored}
            ckpt = cls(path, "single-file", stored, shapes, dtypes, reader.metadata)
            ckpt._readers[path] = reader
            return ckpt
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path}: is not a safetensors file; a pickled checkpoint can run code when loaded: "
                f"convert it to .safetensors or pass --allow-pickle"
            )
        tensors, _ = load_any(path, allow_pickle=True)
        stored = {k: _Stored(path, k) for k in tensors}
        ckpt = cls(
            path,
            "single-file",
            stored,
            {k: tuple(t.shape) for k, t in tensors.items()},
            {k: t.dtype for k, t in tensors.items()},
            {},
        )
        ckpt._tensors = tensors
        return ckpt

    @classmethod
    def _open_folder(cls, folder: Path) -> Checkpoint:
        if not (folder / "model_index.json").is_file():
            raise FileFormatError(
                f"{folder}: is a folder without model_index.json, not a diffusers model; name the "
                f"checkpoint file or the diffusers folder"
            )
        stored: dict[str, _Stored] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, torch.dtype] = {}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            for file in _weight_files(sub):
                with SafetensorsReader(file) as reader:
                    for name in reader.keys():
                        key = f"{sub.name}/{name}"
                        stored[key] = _Stored(file, name)
                        shapes[key], dtypes[key] = reader.shape(name), reader.dtype(name)
        if not stored:
            raise FileFormatError(f"{folder}: holds no .safetensors weights; convert the model's .bin files first")
        return cls(folder, "diffusers", stored, shapes, dtypes, {})

    def _set_arch(self, arch: str | None) -> None:
        if arch is not None:
            self.variant, self.arch, self.arch_reason = resolve_variant(arch), arch_of(arch), "given by the caller"
            return
        keys = {k.replace("/", "."): s for k, s in self._shapes.items()}
        found = detect(keys, self.metadata)
        if found.arch is None and self.layout == "diffusers":
            found = _from_model_index(self.path) or found
        if found.arch is None:
            raise FileFormatError(
                f"{self.path}: cannot tell the base model ({found.reason}); pass --arch (sd1, sd2, sdxl, flux, sd3)"
            )
        self.arch, self.arch_reason = found.arch, found.reason
        self.variant = found.variant or resolve_variant(found.arch)

    # -- names -------------------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every stored tensor key, in file order (folders: component by component)."""
        return list(self._stored)

    def has(self, key: str) -> bool:
        """Whether a stored key exists."""
        return key in self._stored

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of one key, from the header."""
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of one key, from the header."""
        return self._dtypes[key]

    def files(self) -> dict[Path, list[str]]:
        """The weight files and the stored keys each holds (one file for a single-file checkpoint)."""
        out: dict[Path, list[str]] = {}
        for key, where in self._stored.items():
            out.setdefault(where.file, []).append(key)
        return out

    def stored_name(self, key: str) -> str:
        """The key's name inside its file (without the ``<component>/`` of folders)."""
        return self._stored[key].name

    def components(self) -> list[str]:
        """The architecture's components that this checkpoint holds weights of, in pipeline order."""
        return [c for c in VARIANTS[self.variant].components if self._refs_of(c)]

    def shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        """Diffusers module name -> weight shape (diffusers form) for every weight of a component; header only."""
        return {m: ref.shape for m, ref in self._refs_of(component).items()}

    def weight_ref(self, component: str, module: str) -> WeightRef | None:
        """Where a module's weight is stored, or None when the checkpoint does not hold it."""
        refs = self._refs_of(component)
        if module in refs:
            return refs[module]
        try:
            return refs.get(normalize_module_name(self.variant, component, module))
        except KeyError:
            return None

    def weight_keys(self, component: str, module: str) -> list[tuple[str, tuple[int, int] | None]]:
        """The stored key(s) of a module's weight and the row slice it occupies; empty when absent."""
        ref = self.weight_ref(component, module)
        return [] if ref is None else [(ref.key, ref.rows)]

    def _refs_of(self, component: str) -> dict[str, WeightRef]:
        if component not in self._refs:
            if component not in VARIANTS[self.variant].components:
                self._refs[component] = {}
            elif self.layout == "diffusers":
                self._refs[component] = self._folder_refs(component)
            else:
                self._refs[component] = self._single_file_refs(component)
        return self._refs[component]

    def _folder_refs(self, component: str) -> dict[str, WeightRef]:
        refs = {}
        head = f"{component}/"
        for key, shape in self._shapes.items():
            if key.startswith(head) and key.endswith(".weight"):
                module = normalize_module_name(self.variant, component, key[len(head) : -len(".weight")])
                refs[module] = WeightRef(key, None, None, shape)
        return refs

    def _component_prefix(self, component: str) -> str | None:
        prefixes = CHECKPOINT_PREFIXES[self.arch][component]
        for prefix in prefixes:
            if any(k.startswith(prefix) for k in self._stored):
                return prefix
        # BFL's own FLUX / SD3 files store the transformer without a prefix
        if component == "transformer" and any(k.startswith(("double_blocks.", "joint_blocks.")) for k in self._stored):
            return ""
        return None

    def _single_file_refs(self, component: str) -> dict[str, WeightRef]:
        prefix = self._component_prefix(component)
        if prefix is None:
            return {}
        if component == "unet":
            self._check_unet_layout(prefix)
        refs = {}
        members = reverse_map(self.variant, component)
        for module, ref in original_map(self.variant, component).items():
            key = prefix + ref.key
            if key not in self._shapes:
                continue
            stored = self._shapes[key]
            rows = None if ref.rows is None else _scaled_rows(ref.rows, members[ref.module], stored[0], key)
            shape = stored if rows is None else (rows[1] - rows[0], *stored[1:])
            if ref.transform == TRANSPOSE:
                shape = tuple(reversed(shape))
            refs[module] = WeightRef(key, rows, ref.transform, tuple(shape))
        return refs

    def _check_unet_layout(self, prefix: str) -> None:
        """The LDM numbering depends on the resnets per block; the maps know the released layout (2 per block)."""
        ops = sorted(
            int(k[len(prefix) :].split(".")[1])
            for k in self._stored
            if k.startswith(prefix + "input_blocks.") and ".0.op." in k
        )
        if ops and ops[0] != 3:
            raise FileFormatError(
                f"{self.path}: its UNet has a block layout lorakit's name maps do not know "
                f"(first downsampler at input_blocks.{ops[0]}); convert it to a diffusers folder"
            )

    # -- data --------------------------------------------------------------------------------------------------

    def read(self, key: str) -> torch.Tensor:
        """Read one stored tensor (a fresh tensor owning its memory; bounded by its own size)."""
        if key not in self._stored:
            raise KeyError(f"{self.path}: has no tensor {key!r}")
        if self._tensors is not None:
            return self._tensors[key].clone()  # the caller owns what it gets, as with a file read
        where = self._stored[key]
        with self._open_lock:  # two read-ahead threads may ask for the same new file at once
            reader = self._readers.get(where.file)
            if reader is None:
                reader = self._readers[where.file] = SafetensorsReader(where.file)
        return reader.get(where.name)

    def close(self) -> None:
        """Close every open file."""
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.layout}, {self.arch}, {len(self._stored)} tensors)"


def _weight_files(sub: Path) -> list[Path]:
    """The safetensors files of one component folder: the shards of an index, else the single weight file."""
    indexes = sorted(sub.glob("*.safetensors.index.json"))
    if indexes:
        index = _plain_variant(indexes, sub)
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise FileFormatError(f"{index}: is not a valid shard index ({exc}); download the model again") from None
        missing = [s for s in shards if not (sub / s).is_file()]
        if missing:
            raise FileFormatError(f"{index}: names shards that are missing ({', '.join(missing)}); download them")
        return [sub / s for s in shards]
    files = sorted(sub.glob("*.safetensors"))
    return [_plain_variant(files, sub)] if files else []


def _plain_variant(files: list[Path], sub: Path) -> Path:
    """One weight file per folder: the plain one when fp16 / other variants sit beside it."""
    if len(files) == 1:
        return files[0]
    plain = [f for f in files if f.name.count(".") == min(g.name.count(".") for g in files)]
    if len(plain) != 1:
        raise FileFormatError(f"{sub}: holds several weight files ({', '.join(f.name for f in files)}); keep one")
    return plain[0]


def _scaled_rows(rows: tuple[int, int], members: tuple, stored_rows: int, key: str) -> tuple[int, int]:
    """A member's rows in the stored fused tensor: the map's rows, scaled when the model is smaller."""
    full = max(m.rows[1] for m in members)
    if full == stored_rows:
        return rows
    start, stop = rows[0] * stored_rows, rows[1] * stored_rows
    if start % full or stop % full:
        raise FileFormatError(
            f"{key}: a fused weight of {stored_rows} rows cannot be split like the released "
            f"model's {full}; the checkpoint is for another model"
        )
    return start // full, stop // full


def _from_model_index(folder: Path):
    from lorakit.arch.detect import Detection

    try:
        name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    except (ValueError, AttributeError):
        return None
    arch = _PIPELINE_ARCH.get(name)
    if arch is None and name == "StableDiffusionPipeline":
        return _sd1_or_sd2_folder(folder)
    return None if arch is None else Detection(arch, None, f"model_index.json _class_name={name}")


def _sd1_or_sd2_folder(folder: Path):
    """SD1 and SD2 share a pipeline class; SD2's UNet projects into attention with Linear layers, SD1's with 1x1 convs.

    This names models whose widths match neither release (the embedded tiny model, small research models) by layout.
    """
    from lorakit.arch.detect import Detection

    try:
        linear = bool(json.loads((folder / "unet" / "config.json").read_text()).get("use_linear_projection", False))
    except (OSError, ValueError, AttributeError):
        return None
    arch = "sd2" if linear else "sd1"
    return Detection(arch, None, f"StableDiffusionPipeline folder, UNet use_linear_projection={linear}: {arch} layout")


def model_shapes(
    path: str | os.PathLike[str] | None, arch: str | None = None
) -> tuple[str | None, dict[str, dict[str, tuple[int, ...]]] | None]:
    """The architecture and per-component module shapes of a base model, read from headers only.

    For LoRAs of models whose widths no released model has (the embedded tiny model, research models): their keys
    are placed by the model's own names and shapes instead of the bundled full-size tables.

    Args:
        path: a single-file checkpoint or a diffusers folder; None gives ``(arch, None)``.
        arch: the architecture when it cannot be detected.

    Returns:
        ``(arch, {component: {module: shape}})``, or ``(arch, None)`` without a path.
    """
    if path is None:
        return arch, None
    with Checkpoint.open(path, arch=arch) as ckpt:
        return ckpt.arch, {c: ckpt.shapes(c) for c in ckpt.components()}
