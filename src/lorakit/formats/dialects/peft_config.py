"""PEFT ``LoraConfig`` fields <-> per-module alphas, and PEFT's tensor layout for LoRA and DoRA.

PEFT stores one ``r`` and ``lora_alpha`` per adapter plus ``rank_pattern`` / ``alpha_pattern`` for modules that differ.
A pattern key matches a module name when ``re.match(rf"(.*\\.)?({key})$", name)`` succeeds, first key first
(``peft.utils.other.get_pattern_key``); ``^name`` pins one module exactly. With ``use_rslora`` the scale is
``alpha / sqrt(r)`` instead of ``alpha / r``. diffusers writes the same fields, prefixed by the component
(``unet.lora_alpha``), as JSON in the header key ``lora_adapter_metadata``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lorakit.core.patches import DoraMagnitude, LoraPatch, Patch
from lorakit.errors import AdapterError
from lorakit.formats.dialects.names import CLIP_PREFIX, clip_spellings

__all__ = [
    "alpha_from_config",
    "config_for",
    "dora_from_peft",
    "pattern_value",
    "peft_lora_tensors",
    "plain_lora_for_peft",
]


def pattern_value(patterns: Mapping[str, Any], name: str) -> Any | None:
    """The value of the first pattern that matches ``name`` as PEFT matches it, or None."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error:
            continue
    return None


def alpha_from_config(config: Mapping[str, Any], module: str, rank: int) -> float | None:
    """The canonical alpha (scale = alpha / rank) PEFT gives ``module`` under ``config``, or None if it says nothing.

    Args:
        config: ``LoraConfig`` fields (``lora_alpha``, ``alpha_pattern``, ``use_rslora``...).
        module: the module name as PEFT sees it (no component prefix). A CLIP name is also tried with and without
            transformers 4's ``text_model.`` level, since the patterns were written against one of the two.
        rank: the module's rank, read from its tensors.
    """
    patterns = config.get("alpha_pattern") or {}
    bare = module.removeprefix(CLIP_PREFIX)
    alpha = next(
        (v for name in (module, bare, CLIP_PREFIX + bare) if (v := pattern_value(patterns, name)) is not None), None
    )
    if alpha is None:
        alpha = config.get("lora_alpha")
    if alpha is None:
        return None
    if config.get("use_rslora"):
        # PEFT scales by alpha / sqrt(r); the canonical alpha gives the same scale over r.
        return float(alpha) * math.sqrt(rank)
    return float(alpha)


def _most_common(values: list[Any]) -> Any:
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


_OPTIONAL_CLIP = r"(?:text_model\.)?"


def _regex(name: str, clip: bool) -> str:
    """A regex for exactly one module name; CLIP names below ``text_model.`` match with or without that level."""
    spellings = clip_spellings(name) if clip else None
    return _OPTIONAL_CLIP + re.escape(spellings[1]) if spellings else re.escape(name)


def _pattern(name: str, clip: bool) -> str:
    """A PEFT rank / alpha pattern for exactly one module (``^`` anchors it at the start)."""
    return "^" + _regex(name, clip)


def _target_modules(names: list[str], known: list[str], clip: bool) -> list[str] | str:
    """Names PEFT matches exactly: a list, unless a name is a dotted suffix of another module (then a regex)."""
    # every dotted suffix of every module name, so the check is linear, not names x modules
    suffixes = {other.split(".", i)[-1] for other in set(known) | set(names) for i in range(1, other.count(".") + 1)}
    if clip or any(name in suffixes for name in names):
        return "(?:" + "|".join(_regex(n, clip) for n in names) + ")"
    return names


def config_for(
    patches: Mapping[str, LoraPatch], known_modules: list[str] | None = None, *, clip: bool = False
) -> dict[str, Any]:
    """``LoraConfig`` fields under which PEFT rebuilds exactly these LoRAs (ranks and scales).

    Args:
        patches: module name -> plain LoRA patch.
        known_modules: every module of the model, to keep ``target_modules`` from matching more than listed.
        clip: the modules are a CLIP text encoder's, whose live names may lack transformers 4's ``text_model.``
            level (diffusers strips it from the keys, not from the patterns): patterns then accept both forms.

    Returns:
        ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``, ``use_dora``,
        ``use_rslora`` (False: alphas are written in the plain ``alpha / r`` convention).
    """
    names = sorted(patches)
    ranks = {n: patches[n].rank for n in names}
    alphas = {n: float(patches[n].alpha) if patches[n].alpha is not None else float(ranks[n]) for n in names}
    r = _most_common(list(ranks.values()))
    lora_alpha = _most_common(list(alphas.values()))
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {_pattern(n, clip): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {_pattern(n, clip): v for n, v in alphas.items() if v != lora_alpha},
        "target_modules": _target_modules(names, known_modules or [], clip),
        "use_dora": any(p.dora is not None for p in patches.values()),
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "peft_type": "LORA",
    }


def plain_lora_for_peft(patch: Patch, where: str) -> LoraPatch:
    """The patch in a form PEFT's LoRA layer holds: no Tucker core, DoRA only per output row.

    A Tucker LoCon folds exactly into a plain one: ``down'[m, i, k] = sum_n mid[m, n, k] down[n, i]``.

    Raises:
        AdapterError: the patch is not a LoRA, or its DoRA is normalised per input column.
    """
    if not isinstance(patch, LoraPatch):
        raise AdapterError(
            f"{where}: a {type(patch).__name__} cannot be written as diffusers/PEFT lora_A/lora_B; "
            f"write the kohya dialect (LyCORIS keys) instead"
        )
    if patch.dora is not None and patch.dora.axis != "out":
        raise AdapterError(
            f"{where}: DoRA normalised per input column has no PEFT form (PEFT normalises per output "
            f"row); write the kohya dialect instead"
        )
    if patch.mid is None:
        return patch
    mid = patch.mid.to(torch.float32)
    down = torch.einsum("m n ..., n i -> m i ...", mid, patch.down.to(torch.float32).flatten(1))
    return LoraPatch(up=patch.up, down=down.to(patch.down.dtype), alpha=patch.alpha, dora=patch.dora)


def peft_lora_tensors(patch: LoraPatch) -> dict[str, Tensor]:
    """``lora_A.weight``, ``lora_B.weight`` and ``lora_magnitude_vector`` as PEFT stores them.

    PEFT keeps a conv layer's magnitude as ``[1, out, 1, 1]`` (its norm is transposed) and a linear one's as ``[out]``.
    """
    out = {"lora_A.weight": patch.down, "lora_B.weight": patch.up}
    if patch.dora is not None:
        magnitude = patch.dora.magnitude.reshape(-1)
        out["lora_magnitude_vector"] = (
            magnitude.reshape(1, -1, *([1] * (patch.down.dim() - 2))) if patch.down.dim() > 2 else magnitude
        )
    return out


def dora_from_peft(magnitude: Tensor) -> DoraMagnitude:
    """PEFT's magnitude (``[out]`` or conv ``[1, out, 1, 1]``) is always per output row."""
    return DoraMagnitude(magnitude.reshape(-1), "out")
