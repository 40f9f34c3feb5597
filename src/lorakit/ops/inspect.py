"""``inspect``: everything a LoRA file says about itself, and how it fits a base model.

    report = inspect_lora("style.safetensors", arch="sdxl")
    report.dialect, report.arch, report.blocks, report.hashes, report.nonfinite, report.coverage

Reads the header for sizes and dtypes, the canonical form for kinds, ranks and alphas, the metadata for trigger words
and training facts, and streams the file once for its hashes and once for non-finite values.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lorakit.core.patches import FullPatch, Ia3Patch, LohaPatch, LokrPatch, LoraPatch, Patch
from lorakit.formats.canonical import LoraFile
from lorakit.formats.lora_io import load_lora
from lorakit.formats.safetensors_reader import SafetensorsReader
from lorakit.ops.coverage import (
    CoverageReport,
    ModelTables,
    block_name,
    coverage,
    load_for_model,
    model_for_arch,
    model_for_checkpoint,
)
from lorakit.ops.finite import NonFinite, scan_nonfinite, tensor_files

__all__ = ["BlockRow", "HashCheck", "InspectReport", "inspect_lora", "kind_of", "model_tables", "stored_hashes"]

TOP_TAGS = 10

_FACTS = (
    ("title", "modelspec.title"),
    ("author", "modelspec.author"),
    ("description", "modelspec.description"),
    ("base model", "ss_sd_model_name"),
    ("base model version", "ss_base_model_version"),
    ("architecture", "modelspec.architecture"),
    ("network", "ss_network_module"),
    ("network dim", "ss_network_dim"),
    ("network alpha", "ss_network_alpha"),
    ("network args", "ss_network_args"),
    ("steps", "ss_steps"),
    ("max steps", "ss_max_train_steps"),
    ("epoch", "ss_epoch"),
    ("epochs", "ss_num_epochs"),
    ("resolution", "ss_resolution"),
    ("resolution", "modelspec.resolution"),
    ("images", "ss_num_train_images"),
    ("batch size", "ss_total_batch_size"),
    ("optimizer", "ss_optimizer"),
    ("learning rate", "ss_learning_rate"),
    ("unet lr", "ss_unet_lr"),
    ("text encoder lr", "ss_text_encoder_lr"),
    ("scheduler", "ss_lr_scheduler"),
    ("mixed precision", "ss_mixed_precision"),
    ("noise offset", "ss_noise_offset"),
    ("seed", "ss_seed"),
    ("clip skip", "ss_clip_skip"),
    ("started", "ss_training_started_at"),
    ("finished", "ss_training_finished_at"),
    ("date", "modelspec.date"),
)
"""(label, metadata key) of the training facts ``inspect`` shows, in this order, when present."""


@dataclass(frozen=True)
class BlockRow:
    """Adapters of one block: how many modules, which kinds, ranks and alphas (None: no alpha, i.e. alpha = rank)."""

    block: str
    modules: int
    kinds: list[str]
    ranks: list[int]
    alphas: list[float | None]


@dataclass(frozen=True)
class HashCheck:
    """A hash the file carries in its metadata, and whether it still matches the bytes."""

    key: str
    stored: str
    actual: str

    @property
    def stale(self) -> bool:
        """The stored value does not match the file (metadata edited without refreshing it, or a damaged file)."""
        return self.stored.lower().removeprefix("0x") != self.actual.lower().removeprefix("0x")


@dataclass
class InspectReport:
    """What ``inspect_lora`` found. Hashes are Civitai's upper-case forms; sizes in bytes."""

    path: str
    dialect: str
    arch: str | None
    arch_reason: str
    kinds: dict[str, int]
    blocks: list[BlockRow]
    targets: int
    tensors: int
    parameters: int
    size: int
    dtypes: dict[str, int]
    trigger_phrase: str | None
    top_tags: list[tuple[str, int]]
    training: list[tuple[str, str]]
    hashes: dict[str, str | None]
    embedded_hashes: list[HashCheck]
    nonfinite: list[NonFinite]
    skipped_keys: list[str]
    coverage: CoverageReport | None = None
    metadata_keys: int = 0


def kind_of(patch: Patch) -> str:
    """A patch's kind as users name it: ``lora``, ``locon``, ``locon-tucker``, ``loha``, ``lokr``, ``ia3``, ``full``,
    with ``+dora`` when it carries a DoRA magnitude."""
    if isinstance(patch, LoraPatch):
        conv = patch.down.dim() > 2 and any(k > 1 for k in patch.down.shape[2:])
        name = "locon-tucker" if patch.mid is not None else "locon" if conv else "lora"
    elif isinstance(patch, LohaPatch):
        name = "loha"
    elif isinstance(patch, LokrPatch):
        name = "lokr"
    elif isinstance(patch, Ia3Patch):
        name = "ia3"
    elif isinstance(patch, FullPatch):
        name = "full"
    else:
        name = type(patch).__name__
    return name + ("+dora" if patch.dora is not None else "")


def model_tables(model: str | os.PathLike[str] | None, arch: str | None) -> ModelTables | None:
    """The model to check against: a checkpoint path (``--model``), else an architecture's tables (``--arch``)."""
    if model is not None:
        return model_for_checkpoint(model, arch=arch)
    return model_for_arch(arch) if arch is not None else None


def _blocks(lora: LoraFile) -> list[BlockRow]:
    rows: dict[str, list[Patch]] = {}
    for target, patch in lora.patches.items():
        rows.setdefault(block_name(lora.arch, target.component, target.module), []).append(patch)
    return [
        BlockRow(
            block,
            len(patches),
            sorted({kind_of(p) for p in patches}),
            sorted({p.rank for p in patches if p.rank is not None}),
            sorted({p.alpha for p in patches}, key=lambda a: (a is not None, a or 0.0)),
        )
        for block, patches in rows.items()
    ]


def _top_tags(metadata: dict[str, str]) -> list[tuple[str, int]]:
    try:
        per_folder = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    counts: Counter[str] = Counter()
    if isinstance(per_folder, dict):
        for tags in per_folder.values():
            if isinstance(tags, dict):
                counts.update({str(t).strip(): int(n) for t, n in tags.items() if isinstance(n, int | float)})
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_TAGS]


def _fact(key: str, value: str) -> str:
    if key in ("ss_training_started_at", "ss_training_finished_at"):
        try:
            stamp = _dt.datetime.fromtimestamp(float(value), tz=_dt.timezone.utc)
            return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")
        except (ValueError, OverflowError, OSError):
            return value
    return value if len(value) <= 200 else value[:197] + "..."


def _training(metadata: dict[str, str]) -> list[tuple[str, str]]:
    return [(label, _fact(key, metadata[key])) for label, key in _FACTS if metadata.get(key, "") not in ("", "None")]


def stored_hashes(path: Path, metadata: dict[str, str], auto_v3: str | None) -> list[HashCheck]:
    """The hashes kohya and modelspec embed in the header, each with the value the file's bytes give now."""
    from lorakit.formats.hashes import sshs_legacy_hash

    checks = []
    if "sshs_model_hash" in metadata and auto_v3 is not None:
        checks.append(HashCheck("sshs_model_hash", metadata["sshs_model_hash"], auto_v3.lower()))
    if "modelspec.hash_sha256" in metadata and auto_v3 is not None:
        checks.append(HashCheck("modelspec.hash_sha256", metadata["modelspec.hash_sha256"], "0x" + auto_v3.lower()))
    if "sshs_legacy_hash" in metadata:
        checks.append(HashCheck("sshs_legacy_hash", metadata["sshs_legacy_hash"], sshs_legacy_hash(path)))
    return checks


def _header_stats(path: Path) -> tuple[int, int, int, dict[str, int]]:
    tensors = parameters = size = 0
    dtypes: Counter[str] = Counter()
    for file in tensor_files(path):
        with SafetensorsReader(file) as reader:
            size += reader.file_size
            for entry in reader.header.entries:
                tensors += 1
                parameters += entry.nbytes // max(1, entry.torch_dtype.itemsize)
                dtypes[entry.dtype] += 1
    return tensors, parameters, size, dict(sorted(dtypes.items()))


def inspect_lora(
    path: str | os.PathLike[str], *, model: str | os.PathLike[str] | None = None, arch: str | None = None
) -> InspectReport:
    """Inspect a LoRA file (or PEFT folder), optionally against a base model.

    Args:
        path: the LoRA.
        model: a base-model checkpoint (single file or diffusers folder) to report coverage against.
        arch: an architecture or variant to report coverage against (its bundled tables), or the checkpoint's.

    Returns:
        The report. Keys no dialect places are listed in ``skipped_keys`` rather than raised.

    Raises:
        TargetError: the LoRA is for another architecture than the model; the message says which.
        InputError, FileFormatError, UnsafeFileError: the file is missing, damaged or a pickle.
    """
    source = Path(path)
    against = model_tables(model, arch)
    lora = load_for_model(source, against) if against is not None else load_lora(source, skip_unknown=True)
    tensors, parameters, size, dtypes = _header_stats(source)
    hashes: dict[str, str | None] = {}
    embedded: list[HashCheck] = []
    if source.is_file():
        from lorakit.formats.hashes import file_hashes

        found = file_hashes(source)
        hashes = {
            "sha256": found.sha256,
            "autov1": found.auto_v1,
            "autov2": found.auto_v2,
            "autov3": found.auto_v3,
            "crc32": found.crc32,
        }
        embedded = stored_hashes(source, lora.metadata, found.auto_v3)
    meta = lora.metadata
    return InspectReport(
        path=str(source),
        dialect=lora.dialect,
        arch=lora.arch,
        arch_reason=lora.arch_reason,
        kinds=dict(Counter(kind_of(p) for p in lora.patches.values())),
        blocks=_blocks(lora),
        targets=len(lora.patches),
        tensors=tensors,
        parameters=parameters,
        size=size,
        dtypes=dtypes,
        trigger_phrase=meta.get("modelspec.trigger_phrase") or None,
        top_tags=_top_tags(meta),
        training=_training(meta),
        hashes=hashes,
        embedded_hashes=embedded,
        nonfinite=scan_nonfinite(source),
        skipped_keys=list(lora.skipped),
        coverage=coverage(lora, against) if against is not None else None,
        metadata_keys=len(meta),
    )
