"""``meta``: edit a LoRA's header metadata without touching its tensor bytes.

    edit_metadata("style.safetensors", "style_clean.safetensors", set_values={"modelspec.title": "Style"},
                  strip_paths=True)

The tensors are copied byte for byte at the same offsets (``lorakit.formats.safetensors_edit``), so AutoV3 and
``sshs_model_hash`` are unchanged; the hashes a file embeds (``sshs_model_hash``, ``modelspec.hash_sha256``,
``sshs_legacy_hash``, whose value depends on the ``ss_*`` metadata) are recomputed when present, so an edited file
never carries a stale hash.
"""

from __future__ import annotations

import json
import ntpath
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, InputError
from lorakit.formats.safetensors_reader import SafetensorsReader

__all__ = ["MetaResult", "edit_metadata", "strip_paths_in"]

_DATA_HASHES = {"sshs_model_hash": "{sha256}", "modelspec.hash_sha256": "0x{sha256}"}
_LEGACY = "sshs_legacy_hash"
_WINDOWS_ABS = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")
_EMBEDDED_PATH = re.compile(r"(?<![\w.:/\\])(?:[A-Za-z]:[\\/]|/|\\\\)(?:[^\s\"'<>|\\/]+[\\/])+([^\s\"'<>|\\/]*)")
"""An absolute POSIX or Windows path inside a longer text (group 1: its last part). Not after a word character,
a dot, a colon or a slash, so ``1/2``, ``./x`` and ``https://host/x`` are left alone."""


@dataclass(frozen=True)
class MetaResult:
    """What ``edit_metadata`` did.

    Attributes:
        source: the input file.
        output: the file written.
        set_keys: keys given a value.
        removed_keys: keys the input had and the output has not.
        path_keys: ``ss_*`` keys whose value had an absolute path cut to its last part.
        refreshed: embedded hash key -> its value in the output.
        auto_v3: Civitai AutoV3 of the output, the same as the input's (the tensor bytes are untouched).
    """

    source: str
    output: str
    set_keys: list[str] = field(default_factory=list)
    removed_keys: list[str] = field(default_factory=list)
    path_keys: list[str] = field(default_factory=list)
    refreshed: dict[str, str] = field(default_factory=dict)
    auto_v3: str = ""


def _is_absolute(text: str) -> bool:
    return text.startswith("/") or bool(_WINDOWS_ABS.match(text))


def _last_part(text: str) -> str:
    return ntpath.basename(text.rstrip("/\\")) if _WINDOWS_ABS.match(text) else os.path.basename(text.rstrip("/"))


def _strip_value(value: Any) -> Any:
    if isinstance(value, str):
        if _is_absolute(value):
            return _last_part(value)
        return _EMBEDDED_PATH.sub(lambda m: m.group(1) or "", value)
    if isinstance(value, list):
        return [_strip_value(v) for v in value]
    if isinstance(value, dict):
        # dataset folders are keys too (ss_tag_frequency, ss_dataset_dirs)
        return {_strip_value(k): _strip_value(v) for k, v in value.items()}
    return value


def strip_paths_in(text: str) -> str:
    """Cut every absolute path in a metadata value to its last part (a JSON value is walked, keys included)."""
    if text[:1] in "{[":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if parsed is not None:
            stripped = _strip_value(parsed)
            return text if stripped == parsed else json.dumps(stripped, ensure_ascii=False)
    return _strip_value(text)


def _edited(
    metadata: dict[str, str], set_values: Mapping[str, str], strip_paths: bool, strip: bool
) -> tuple[dict[str, str], list[str]]:
    result = {} if strip else dict(metadata)
    changed = []
    if strip_paths:
        for key, value in result.items():
            if key.startswith("ss_") and (new := strip_paths_in(value)) != value:
                result[key] = new
                changed.append(key)
    for key, value in set_values.items():
        if not key or not isinstance(value, str):
            raise ConfigError(f"--set {key}={value!r}: give KEY=VALUE with a non-empty key and a text value")
        result[key] = value
    return result, sorted(changed)


def edit_metadata(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    set_values: Mapping[str, str] | None = None,
    strip_paths: bool = False,
    strip: bool = False,
) -> MetaResult:
    """Write ``source`` to ``output`` with edited metadata and the same tensor bytes.

    Order of edits: ``strip`` (drop every key), then ``strip_paths``, then ``set_values``; then the embedded hashes
    still present are recomputed for the new file.

    Args:
        source: a safetensors file.
        output: the new file (never the input).
        set_values: keys to set (added or replaced).
        strip_paths: cut absolute paths in ``ss_*`` values (``ss_output_dir``, the folders inside
            ``ss_datasets`` / ``ss_tag_frequency`` JSON) to their last part, so the file no longer tells the
            trainer's folder layout.
        strip: drop all metadata (``set_values`` still apply).

    Returns:
        What changed, the refreshed hashes and the AutoV3 (unchanged).

    Raises:
        InputError: the source is missing or a folder (a PEFT adapter has no kohya metadata to edit).
        OutputError: the output is the input, or cannot be written.
        FileFormatError: the source is not a valid safetensors file.
    """
    from lorakit.formats.hashes import sshs_legacy_hash
    from lorakit.formats.safetensors_edit import rewrite_metadata

    src = Path(source)
    if src.is_dir():
        raise InputError(f"{src}: is a folder; meta edits one .safetensors file")
    with SafetensorsReader(src) as reader:
        before = reader.metadata
    after, path_keys = _edited(before, set_values or {}, strip_paths, strip)
    hashes = {k: t for k, t in _DATA_HASHES.items() if k in after}
    for key in hashes:
        del after[key]  # refilled from the copied bytes
    late = {}
    if _LEGACY in after:
        after[_LEGACY] = "0" * 8  # the same length as the hash, patched in once the file exists
        late[_LEGACY] = sshs_legacy_hash
    # no __metadata__ at all when nothing is left (what --strip asks for), rather than an empty map
    metadata = after if after or hashes else None
    written = rewrite_metadata(src, output, metadata, hash_fields=hashes, late_fields=late)
    with SafetensorsReader(written.path) as final:
        now = final.metadata
    refreshed = {k: now[k] for k in (*_DATA_HASHES, _LEGACY) if k in now}
    return MetaResult(
        str(src),
        str(written.path),
        sorted((set_values or {}).keys()),
        sorted(set(before) - set(now)),
        path_keys,
        refreshed,
        (written.data_sha256 or "").upper(),
    )
