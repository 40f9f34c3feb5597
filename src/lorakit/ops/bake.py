"""Bake LoRAs into a base-model checkpoint: ``W' = W + sum_i w_i * m_i(target) * D_i(W)``, tensor by tensor.

The checkpoint is streamed: each stored tensor is read, patched in fp32 (every effect taken against the same base
``W``, as ``lorakit.core.patches.apply_patches`` does) and cast once to its own dtype (or ``dtype``), then written;
tensors no LoRA touches are copied through. Peak memory is a few times the largest tensor, never the model.

Output: a single file for a single-file input (same keys, same metadata plus ``lorakit.baked``, hash fields of the
old bytes dropped), a diffusers folder for a folder (configs, tokenizers and schedulers copied). Written atomically;
inputs are never modified. Targets that match no weight of the checkpoint are an error listing them unless
``allow_missing``; the report lists them either way.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.arch.refs import SWAP_HALVES, TRANSPOSE
from lorakit.core.patches import Patch
from lorakit.errors import FileFormatError, TargetError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.checkpoint import Checkpoint, WeightRef
from lorakit.formats.dialects.fused import take_rows
from lorakit.formats.safetensors_writer import TensorSource, check_output_path
from lorakit.ops.algebra import delta_shape, plain_lora
from lorakit.ops.bake_io import check_folder_output, prefetched, write_direct, write_folder
from lorakit.ops.blocks import parse_block_weights

__all__ = ["BakeReport", "Contribution", "bake_checkpoint", "bake_files", "load_for_checkpoint", "plan_bake"]

_STALE_META = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
"""Header fields that hash the old bytes: wrong after a bake, so dropped."""

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Contribution:
    """One patch's share in one stored tensor.

    Attributes:
        target: the LoRA target it comes from.
        patch: the patch (for a row-sliced target, the whole fused patch; ``patch_rows`` picks its rows).
        strength: LoRA weight times block multiplier.
        rows: rows of the stored tensor it changes, or None for all.
        patch_rows: rows of the patch's delta that belong to this target (``Target.rows``), or None.
        transform: how the stored tensor differs from the diffusers form (``swap_halves``, ``transpose``).
    """

    target: Target
    patch: Patch
    strength: float
    rows: tuple[int, int] | None
    patch_rows: tuple[int, int] | None
    transform: str | None


@dataclass
class BakeReport:
    """What a bake did.

    Attributes:
        output: the file or folder written.
        layout: ``single-file`` or ``diffusers``.
        arch: the checkpoint's architecture and why.
        loras: per LoRA: name, weight, targets, matched.
        matched: targets baked.
        unmatched: ``target: reason`` for every target left out.
        tensors_changed: stored tensors that changed.
        tensors_copied: stored tensors copied through.
        dtype: the output dtype (``as input`` when unchanged).
    """

    output: str
    layout: str
    arch: str
    arch_reason: str
    loras: list[dict] = field(default_factory=list)
    matched: int = 0
    unmatched: list[str] = field(default_factory=list)
    tensors_changed: int = 0
    tensors_copied: int = 0
    dtype: str = "as input"


def _unmatched_reason(ckpt: Checkpoint, target: Target, patch: Patch) -> tuple[WeightRef | None, str | None]:
    if target.component not in ckpt.components():
        return None, f"the checkpoint has no {target.component}"
    ref = ckpt.weight_ref(target.component, target.module)
    if ref is None:
        return None, "no such weight in the checkpoint"
    if target.rows is not None and not patch.additive and take_rows(patch, torch.arange(*target.rows)) is None:
        return None, f"a {type(patch).__name__} with DoRA cannot be restricted to part of a fused weight"
    if patch.additive:
        shape = (patch.up.shape[0], *patch.down.shape[1:]) if plain_lora(patch) else delta_shape(patch)
        rows = (target.rows[1] - target.rows[0]) if target.rows else int(shape[0])
        need = ref.shape
        size = rows * math.prod(shape[1:])
        if rows != need[0] or size != math.prod(need):
            return None, f"delta of shape {tuple(shape)} does not fit the weight {need}: a LoRA for another model"
    return ref, None


def plan_bake(
    ckpt: Checkpoint, loras: Sequence[tuple[str, LoraFile, float]], multiplier: Callable[[Target], float] | None = None
) -> tuple[dict[str, list[Contribution]], BakeReport]:
    """Match every LoRA target to a stored tensor; nothing is read but headers.

    Args:
        ckpt: the opened checkpoint.
        loras: (name, lora, weight) triples.
        multiplier: per-target factor on top of the weights (block weights).

    Returns:
        Stored key -> its contributions, and a report with the matched and unmatched targets.
    """
    plan: dict[str, list[Contribution]] = {}
    report = BakeReport(output="", layout=ckpt.layout, arch=ckpt.arch, arch_reason=ckpt.arch_reason)
    for name, lora, weight in loras:
        matched = 0
        for target, patch in lora.patches.items():
            ref, reason = _unmatched_reason(ckpt, target, patch)
            if ref is None:
                report.unmatched.append(f"{name}: {target}: {reason}")
                continue
            strength = weight * (multiplier(target) if multiplier else 1.0)
            matched += 1
            if strength == 0.0:
                continue
            plan.setdefault(ref.key, []).append(
                Contribution(target, patch, strength, ref.rows, target.rows, ref.transform)
            )
            bias = patch.bias_effect() is not None
            if bias and ref.transform is None and target.rows is None:
                bias_key = _bias_key(ckpt, ref)
                if bias_key is not None:
                    plan.setdefault(bias_key, []).append(Contribution(target, patch, strength, ref.rows, None, "bias"))
        report.matched += matched
        report.loras.append({"name": name, "weight": weight, "targets": len(lora.patches), "matched": matched})
    return plan, report


def _bias_key(ckpt: Checkpoint, ref: WeightRef) -> str | None:
    if not ref.key.endswith("weight"):
        return None
    key = ref.key[: -len("weight")] + "bias"
    return key if ckpt.has(key) else None


def _to_diffusers(w: torch.Tensor, transform: str | None) -> torch.Tensor:
    if transform == TRANSPOSE:
        return w.t()
    if transform == SWAP_HALVES:
        return torch.cat(w.chunk(2, dim=0)[::-1])
    return w


def _effect(c: Contribution, base: torch.Tensor) -> torch.Tensor:
    """The full-strength change of the rows ``c`` covers, in the stored form, fp32."""
    if c.transform == "bias":
        return c.patch.bias_effect().to(torch.float32)
    w = _to_diffusers(base, c.transform)
    patch = c.patch
    if c.patch_rows is not None:
        if patch.additive:
            full = patch.delta()
            d = full.flatten(1)[c.patch_rows[0] : c.patch_rows[1]].reshape(w.shape)
            return _to_diffusers(d, c.transform)
        patch = take_rows(patch, torch.arange(*c.patch_rows))
    d = patch.delta(w.shape) if patch.additive else patch.effect(w.to(torch.float32))
    # both transforms are their own inverse
    return _to_diffusers(d, c.transform)


_CHUNK_BYTES = 1 << 21
"""Rows are patched in blocks of about this many fp32 bytes: the block stays in cache from the read through the GEMM
to the cast, where whole-tensor passes would stream the tensor through memory three times (4x slower here)."""


def _baked_plain(
    stored: torch.Tensor, contributions: Sequence[Contribution], dtype: torch.dtype, in_place: bool
) -> torch.Tensor:
    """``baked_tensor`` for plain LoRAs only, block by block of rows: one ``addmm`` per LoRA and block."""
    rows = stored.shape[0]
    flat = stored.reshape(rows, -1)
    # each block is read into fp32 before it is written back, so the result may overwrite the input
    result = stored if in_place and dtype == stored.dtype else torch.empty(stored.shape, dtype=dtype)
    flat_out = result.view(rows, -1)
    factors = []
    for c in contributions:
        start, stop = c.rows or (0, rows)
        up = c.patch.up.flatten(1).to(torch.float32)
        factors.append((start, stop, up, c.patch.down.flatten(1).to(torch.float32), c.strength * c.patch.scale))
    step = max(1, _CHUNK_BYTES // (4 * flat.shape[1]))
    block = torch.empty(min(step, rows), flat.shape[1], dtype=torch.float32)
    for begin in range(0, rows, step):
        end = min(begin + step, rows)
        view = block[: end - begin]
        view.copy_(flat[begin:end])
        for start, stop, up, down, alpha in factors:
            lo, hi = max(begin, start), min(end, stop)
            if lo < hi:
                view[lo - begin : hi - begin].addmm_(up[lo - start : hi - start], down, alpha=alpha)
        flat_out[begin:end].copy_(view)
    return result


def _is_plain(c: Contribution, stored: torch.Tensor) -> bool:
    patch = c.patch
    if not plain_lora(patch) or c.patch_rows is not None or c.transform is not None:
        return False
    rows = (c.rows[1] - c.rows[0]) if c.rows else stored.shape[0]
    return patch.up.shape[0] == rows and patch.down[0].numel() * rows == stored[:rows].numel()


def baked_tensor(
    stored: torch.Tensor, contributions: Sequence[Contribution], dtype: torch.dtype, *, in_place: bool = False
) -> torch.Tensor:
    """``W + sum_c s_c * D_c(W)`` over one stored tensor, accumulated in fp32 and cast once to ``dtype``.

    Every effect is taken against the stored ``W`` (not the partly patched one), as ``apply_patches`` does. With
    ``in_place`` the result may be written into ``stored`` (a tensor the caller owns and no longer needs): no second
    tensor of its size is allocated.
    """
    if stored.is_contiguous() and all(_is_plain(c, stored) for c in contributions):
        return _baked_plain(stored, contributions, dtype, in_place)
    out = stored.to(torch.float32, copy=True)
    for c in contributions:
        # row slices of a contiguous tensor are contiguous views: updates land in ``out``
        view = out if c.rows is None else out[c.rows[0] : c.rows[1]]
        base = stored if c.rows is None else stored[c.rows[0] : c.rows[1]]
        view.add_(_effect(c, base).reshape(view.shape), alpha=c.strength)
    return out.to(dtype)


def _source(
    ckpt: Checkpoint,
    key: str,
    contributions: list[Contribution] | None,
    dtype: torch.dtype | None,
    tick: Callable[[], None],
) -> TensorSource:
    stored_dtype = ckpt.dtype(key)
    out_dtype = dtype if (dtype is not None and stored_dtype.is_floating_point) else stored_dtype

    def produce() -> torch.Tensor:
        tensor = ckpt.read(key)
        if contributions:
            tensor = baked_tensor(tensor, contributions, out_dtype, in_place=True)  # ``read`` gave a fresh tensor
        elif tensor.dtype != out_dtype:
            tensor = tensor.to(out_dtype)
        tick()
        return tensor

    return TensorSource(ckpt.stored_name(key), out_dtype, ckpt.shape(key), produce)


def _metadata(ckpt: Checkpoint, loras: Sequence[tuple[str, LoraFile, float]], blocks: str | None) -> dict[str, str]:
    meta = {k: v for k, v in ckpt.metadata.items() if k not in _STALE_META}
    note = {"loras": [{"name": n, "weight": w} for n, _, w in loras], "blocks": blocks}
    meta["lorakit.baked"] = json.dumps(note, sort_keys=True)
    return meta


def bake_checkpoint(
    ckpt: Checkpoint,
    loras: Sequence[tuple[str, LoraFile, float]],
    output: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    blocks: str | None = None,
    allow_missing: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
    progress: Progress | None = None,
) -> BakeReport:
    """Bake LoRAs into a checkpoint and write the result.

    Args:
        ckpt: the opened base checkpoint (``Checkpoint.open``); not modified.
        loras: (name, lora, weight) triples; weights may be negative.
        output: a ``.safetensors`` file for a single-file input, a new folder for a diffusers folder.
        dtype: output dtype of floating-point tensors; None keeps each tensor's own.
        blocks: an LBW block-weight spec (``lorakit.ops.blocks``) applied to every LoRA.
        allow_missing: bake what matches and report the rest instead of refusing.
        inputs: the LoRA files, so that the output cannot overwrite one.
        progress: called as ``progress(done, total)`` after each stored tensor.

    Returns:
        The report (coverage, tensors changed and copied).

    Raises:
        TargetError: targets match no weight (unless ``allow_missing``); the message lists them.
        OutputError: the output is an input, exists (folder), or cannot be written; nothing partial is left.
    """
    multiplier = parse_block_weights(blocks, ckpt.arch) if blocks else None
    plan, report = plan_bake(ckpt, loras, multiplier)
    if report.unmatched and not allow_missing:
        shown = "; ".join(report.unmatched[:5]) + (
            f"; ... {len(report.unmatched) - 5} more" if len(report.unmatched) > 5 else ""
        )
        raise TargetError(
            f"{len(report.unmatched)} LoRA targets match nothing in {ckpt.path}: {shown}. Pass "
            f"--allow-missing to bake the rest"
        )
    total = len(ckpt.keys())
    done = itertools.count(1)
    lock = threading.Lock()

    def tick() -> None:  # called from the read-ahead threads
        with lock:
            count = next(done)
            if progress is not None:
                progress(count, total)

    sources = {key: _source(ckpt, key, plan.get(key), dtype, tick) for key in ckpt.keys()}
    all_inputs = [ckpt.path, *inputs]
    threads = torch.get_num_threads()
    # The per-block GEMMs are small (rank-wide): a second intra-op thread only adds synchronisation (9x slower than
    # one thread on a busy 2-core machine, measured); the read-ahead threads patch whole tensors in parallel instead.
    torch.set_num_threads(1)
    try:
        if ckpt.layout == "single-file":
            with prefetched(list(sources.values())) as ordered:
                write_direct(output, ordered, _metadata(ckpt, loras, blocks), inputs=all_inputs)
        else:
            files = {file: [sources[k] for k in keys] for file, keys in ckpt.files().items()}
            write_folder(ckpt.path, files, _file_metadata, Path(output), all_inputs)
    finally:
        torch.set_num_threads(threads)
    report.output = str(output)
    report.tensors_changed = len(plan)
    report.tensors_copied = total - len(plan)
    report.dtype = "as input" if dtype is None else str(dtype).removeprefix("torch.")
    return report


def _file_metadata(file: Path) -> dict[str, str] | None:
    from lorakit.formats.safetensors_reader import SafetensorsReader

    with SafetensorsReader(file) as reader:
        meta = reader.metadata
    return meta or None


def load_for_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint, *, skip_unknown: bool = False) -> LoraFile:
    """Read a LoRA file for a checkpoint: names placed with the checkpoint's own module shapes and architecture."""
    from lorakit.formats.lora_io import load_lora

    modules = {c: ckpt.shapes(c) for c in ckpt.components()}
    return load_lora(path, arch=ckpt.variant, modules=modules, skip_unknown=skip_unknown)


def bake_files(
    model: str | os.PathLike[str],
    loras: Sequence[tuple[str | os.PathLike[str], float]],
    output: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    blocks: str | None = None,
    allow_missing: bool = False,
    arch: str | None = None,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> BakeReport:
    """Open a checkpoint, read the LoRA files for it and bake them (``bake_checkpoint``).

    The output is checked before anything is read; a LoRA whose keys do not fit the checkpoint (another base
    model) is an error naming both files.
    """
    paths = [Path(p) for p, _ in loras]
    with Checkpoint.open(model, arch=arch, allow_pickle=allow_pickle) as ckpt:
        if ckpt.layout == "single-file":
            check_output_path(output, [model, *paths])
        else:
            check_folder_output(Path(output), [model, *paths])
        read = []
        for path, weight in loras:
            try:
                lora = load_for_checkpoint(path, ckpt, skip_unknown=allow_missing)
            except FileFormatError as err:
                raise FileFormatError(
                    f"{path}: does not fit the {ckpt.arch} checkpoint {ckpt.path} (a LoRA for "
                    f"another base model?): {err}"
                ) from None
            read.append((Path(path).name, lora, weight))
        report = bake_checkpoint(
            ckpt, read, output, dtype=dtype, blocks=blocks, allow_missing=allow_missing, inputs=paths, progress=progress
        )
        for (_, lora, _), entry in zip(read, report.loras, strict=True):
            report.unmatched.extend(f"{entry['name']}: {key}: key not placed" for key in lora.skipped)
        return report
