"""``check``: find everything wrong with LoRA files, one line per problem.

Problems: the file cannot be read (damaged, lying header, a pickle), keys no dialect places, adapter tensors
inconsistent with each other or with the modules they target (shapes checked against the detected architecture's
tables, or the model given), NaN or inf values, embedded hashes that no longer match the bytes, a LoRA made for
another architecture than the model given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.formats.canonical import LoraFile
from lorakit.formats.lora_io import load_lora
from lorakit.ops.coverage import ModelTables, coverage, load_for_model, model_for_arch
from lorakit.ops.finite import scan_nonfinite
from lorakit.ops.inspect import model_tables, stored_hashes

__all__ = ["CheckResult", "check_files", "check_lora"]

SHOWN = 20
"""Problems of one kind listed one per line before the rest are summed up in one more line."""


@dataclass
class CheckResult:
    """The problems of one file (empty when it is fine)."""

    path: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


def _without_path(message: str, path: str) -> str:
    return message.removeprefix(f"{path}: ")


def _listed(lines: list[str], what: str) -> list[str]:
    if len(lines) <= SHOWN:
        return lines
    return [*lines[:SHOWN], f"... and {len(lines) - SHOWN} more {what}"]


def _shape_problems(lora: LoraFile, against: ModelTables | None) -> list[str]:
    model = against
    if model is None and lora.arch is not None:
        model = model_for_arch(lora.arch)
    if model is None:
        return []
    report = coverage(lora, model)
    lines = [f"{u.target}: {u.reason} in {model.name}" for u in report.unmatched]
    return _listed(lines, "targets that do not fit")


def _read(path: Path, against: ModelTables | None, problems: list[str]) -> LoraFile | None:
    try:
        if against is not None:
            return load_for_model(path, against)
        return load_lora(path, skip_unknown=True)
    except LorakitError as exc:
        problems.append(_without_path(str(exc), str(path)))
        return None


def check_lora(path: str | os.PathLike[str], against: ModelTables | None = None) -> CheckResult:
    """Check one LoRA file (or PEFT folder).

    Args:
        path: the file.
        against: the base model's tables (``model_for_arch``, ``model_for_checkpoint``), or None to check shapes
            against the architecture the file is detected to be for.

    Returns:
        The problems found, one line each, without the file name.
    """
    source = Path(path)
    result = CheckResult(str(source))
    if not source.exists():
        result.problems.append("no such file; check the path")
        return result
    lora = _read(source, against, result.problems)
    if lora is not None:
        if lora.skipped:
            more = len(lora.skipped) - 3
            shown = ", ".join(lora.skipped[:3]) + (f" and {more} more" if more > 0 else "")
            result.problems.append(f"{len(lora.skipped)} keys that fit no module or dialect lorakit knows: {shown}")
        result.problems += _shape_problems(lora, against)
        if source.is_file():
            result.problems += _hash_problems(source, lora)
    try:
        found = scan_nonfinite(source)
    except LorakitError:
        found = []  # an unreadable file is already reported by _read
    result.problems += _listed([f"non-finite values: {item}" for item in found], "tensors with non-finite values")
    return result


def _hash_problems(path: Path, lora: LoraFile) -> list[str]:
    if not any(k in lora.metadata for k in ("sshs_model_hash", "modelspec.hash_sha256", "sshs_legacy_hash")):
        return []
    from lorakit.formats.hashes import auto_v3

    return [
        f"stale hash: {c.key} is {c.stored} but the file's bytes give {c.actual}; refresh it with lorakit meta"
        for c in stored_hashes(path, lora.metadata, auto_v3(path))
        if c.stale
    ]


def check_files(
    paths: Sequence[str | os.PathLike[str]],
    *,
    model: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[CheckResult]:
    """Check several files against the same model (or each against its detected architecture).

    Args:
        paths: LoRA files or PEFT folders.
        model: a base-model checkpoint; a LoRA for another architecture is a problem.
        arch: an architecture or variant to check against (or the checkpoint's, with ``model``).
        progress: called with the number of files checked so far, after each file.

    Raises:
        LorakitError: the model itself cannot be read, or ``arch`` is unknown (before any file is checked).
    """
    against = model_tables(model, arch)
    results = []
    for path in paths:
        results.append(check_lora(path, against))
        if progress is not None:
            progress(len(results))
    return results
