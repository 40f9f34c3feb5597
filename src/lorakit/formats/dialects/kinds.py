"""The per-module tensor names of kohya and LyCORIS files, and the patches they stand for.

kohya, LyCORIS (standalone and through kohya), ComfyUI and A1111 all name one module's tensors with the same suffixes:
``lora_up.weight`` / ``lora_down.weight`` (LoRA, LoCon), ``hada_w1_a``... (LoHa), ``lokr_w1``... (LoKr), ``weight`` +
``on_input`` ((IA)^3), ``diff`` / ``diff_b`` (full), ``w_norm`` / ``b_norm`` (norm layers), plus ``alpha`` and
``dora_scale``. This module turns one module's ``{suffix: tensor}`` into a ``Patch`` and back; the dialects only
decide how the module part of the key is spelled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lorakit.core.patches import DoraMagnitude, FullPatch, Ia3Patch, LohaPatch, LokrPatch, LoraPatch, Patch
from lorakit.errors import AdapterError, FileFormatError, ShapeError

__all__ = [
    "KNOWN_SUFFIXES",
    "UNSUPPORTED_SUFFIXES",
    "alpha_tensor",
    "delta_shape",
    "patch_from_parts",
    "patch_to_parts",
    "split_suffix",
]

_LORA = {"lora_up.weight": "up", "lora_down.weight": "down", "lora_mid.weight": "mid"}
_LOHA = {
    "hada_w1_a": "w1a",
    "hada_w1_b": "w1b",
    "hada_w2_a": "w2a",
    "hada_w2_b": "w2b",
    "hada_t1": "t1",
    "hada_t2": "t2",
}
_LOKR = {
    "lokr_w1": "w1",
    "lokr_w1_a": "w1a",
    "lokr_w1_b": "w1b",
    "lokr_w2": "w2",
    "lokr_w2_a": "w2a",
    "lokr_w2_b": "w2b",
    "lokr_t2": "t2",
}
_FULL = {"diff": "diff", "diff_b": "diff_b"}
_NORM = {"w_norm": "diff", "b_norm": "diff_b"}
_EXTRA = ("alpha", "dora_scale", "on_input", "weight")

KNOWN_SUFFIXES: tuple[str, ...] = tuple(
    sorted({*_LORA, *_LOHA, *_LOKR, *_FULL, *_NORM, *_EXTRA}, key=lambda s: (-len(s), s))
)
"""Every suffix lorakit reads, longest first (so ``lora_up.weight`` wins over ``weight``)."""

UNSUPPORTED_SUFFIXES: dict[str, str] = {
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "oft_blocks": "OFT/BOFT",
    "oft_diag": "OFT",
    "rescale": "OFT/BOFT",
    "lora_up.bias": "LoRA with a bias",
}
"""Suffixes of LyCORIS kinds that lorakit recognises but cannot represent (named in the error)."""


def split_suffix(key: str, *, flat_module: bool) -> tuple[str, str] | None:
    """Split ``<module>.<suffix>`` into its two parts.

    Args:
        key: a tensor name.
        flat_module: the module part has no dots (kohya ``lora_unet_down_blocks_0...``), so the suffix is everything
            after the first dot; otherwise (ComfyUI ``diffusion_model.input_blocks.1...``) the longest known suffix.

    Returns:
        ``(module, suffix)``, or None when no known or recognised-but-unsupported suffix ends the key.
    """
    if flat_module:
        module, dot, suffix = key.partition(".")
        if dot and (suffix in KNOWN_SUFFIXES or suffix in UNSUPPORTED_SUFFIXES):
            return module, suffix
        return None
    for suffix in (*KNOWN_SUFFIXES, *UNSUPPORTED_SUFFIXES):
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], suffix
    return None


def _alpha_of(parts: Mapping[str, Tensor]) -> float | None:
    alpha = parts.get("alpha")
    return None if alpha is None else float(alpha.to(torch.float64).item())


def _dora_of(parts: Mapping[str, Tensor], weight_shape: tuple[int, ...] | None, where: str) -> DoraMagnitude | None:
    magnitude = parts.get("dora_scale")
    if magnitude is None:
        return None
    if weight_shape is not None:
        return DoraMagnitude.from_shape(magnitude, torch.Size(weight_shape))
    # No module table: the stored shape alone says the axis ([out], [out, 1, ...] per row; [1, in, ...] per column).
    shape = tuple(magnitude.shape)
    if len(shape) == 1 or (shape[0] > 1 and math.prod(shape[1:]) == 1):
        return DoraMagnitude(magnitude, "out")
    if len(shape) >= 2 and shape[0] == 1 and math.prod(shape[2:]) == 1:
        return DoraMagnitude(magnitude, "in")
    raise FileFormatError(f"{where}.dora_scale: shape {shape} is neither per output row nor per input column")


def _fields(parts: Mapping[str, Tensor], table: Mapping[str, str]) -> dict[str, Tensor]:
    return {field: parts[suffix] for suffix, field in table.items() if suffix in parts}


def patch_from_parts(parts: Mapping[str, Tensor], where: str, weight_shape: tuple[int, ...] | None = None) -> Patch:
    """Build the patch that one module's tensors describe.

    Args:
        parts: suffix -> tensor for one module (``lora_up.weight``, ``alpha``...).
        where: the module's key prefix, for error messages.
        weight_shape: the base weight's shape when known (used for the DoRA axis).

    Returns:
        A ``LoraPatch``, ``LohaPatch``, ``LokrPatch``, ``Ia3Patch`` or ``FullPatch``.

    Raises:
        FileFormatError: the suffixes mix kinds, miss a required tensor, or belong to an unsupported kind.
    """
    names = set(parts)
    unsupported = sorted({UNSUPPORTED_SUFFIXES[s] for s in names if s in UNSUPPORTED_SUFFIXES})
    if unsupported:
        raise FileFormatError(
            f"{where}: {', '.join(unsupported)} adapters are not supported by lorakit "
            f"(keys {sorted(names)}); convert them with LyCORIS, or skip them with skip_unknown"
        )
    kinds = [t for t in (_LORA, _LOHA, _LOKR, _FULL, _NORM) if names & set(t)]
    if not kinds and "weight" in names and "on_input" in names:
        kinds = [{"weight": "weight"}]
    if len(kinds) != 1:
        found = "no adapter tensors" if not kinds else "tensors of several adapter kinds"
        raise FileFormatError(f"{where}: {found} among {sorted(names)}; the file is damaged or of an unknown kind")
    table = kinds[0]
    extra = names - set(table) - {"alpha", "dora_scale"} - ({"on_input"} if "weight" in table else set())
    if extra:
        raise FileFormatError(f"{where}: unexpected tensors {sorted(extra)} beside {sorted(names - extra)}")
    fields = _fields(parts, table)
    alpha = _alpha_of(parts)
    try:
        dora = _dora_of(parts, weight_shape, where)
        if table is _LORA:
            return LoraPatch(**fields, alpha=alpha, dora=dora)
        if table is _LOHA:
            return LohaPatch(**fields, alpha=alpha, dora=dora)
        if table is _LOKR:
            return LokrPatch(**fields, alpha=alpha, dora=dora)
        if "weight" in table:
            on_input = bool(parts["on_input"].reshape(-1)[0].item()) if "on_input" in parts else False
            return Ia3Patch(weight=parts["weight"], on_input=on_input, alpha=alpha, dora=dora)
        return FullPatch(**fields, alpha=alpha, dora=dora)
    except TypeError:
        raise FileFormatError(f"{where}: incomplete adapter, only {sorted(names)} present") from None
    except ShapeError as exc:  # the patch's own consistency checks: name the key
        raise FileFormatError(f"{where}: {exc}") from None


def alpha_tensor(alpha: float) -> Tensor:
    """Alpha as a 0-d tensor: fp32 as kohya writes it, fp64 only when fp32 would change the value (the strength)."""
    as32 = torch.tensor(alpha, dtype=torch.float32)
    return as32 if float(as32.item()) == float(alpha) else torch.tensor(alpha, dtype=torch.float64)


def delta_shape(patch: Patch) -> torch.Size:
    """Shape of a patch's delta, computed on the meta device (no memory, no arithmetic)."""
    if isinstance(patch, LoraPatch):
        # the common case, from the factors' shapes: the meta-device detour costs about 0.5 ms per patch
        up, down = patch.up.shape, patch.down.shape
        if patch.mid is None:
            return torch.Size((up[0], *down[1:]))
        return torch.Size((up[0], math.prod(down[1:]), *patch.mid.shape[2:]))
    changes = {
        f.name: getattr(patch, f.name).to("meta")
        for f in dataclasses.fields(patch)
        if isinstance(getattr(patch, f.name), Tensor)
    }
    meta = dataclasses.replace(patch, dora=None, **changes)
    if isinstance(meta, Ia3Patch):
        raise ValueError("(IA)^3 has no delta shape of its own")
    return meta.delta().shape


def _dora_tensor(patch: Patch) -> Tensor:
    """The magnitude in LyCORIS's stored shape: ``[out, 1, ...]`` per row, ``[1, in, ...]`` per column."""
    assert patch.dora is not None
    magnitude = patch.dora.magnitude
    if magnitude.dim() >= 2:
        return magnitude
    ndim = len(delta_shape(patch)) if not isinstance(patch, Ia3Patch) else 2
    shape = [1] * ndim
    shape[0 if patch.dora.axis == "out" else 1] = magnitude.numel()
    return magnitude.reshape(shape)


def patch_to_parts(patch: Patch) -> dict[str, Tensor]:
    """The suffix -> tensor map of one module, as kohya / LyCORIS write it.

    Alpha is always written for kinds that have a rank (``alpha = r`` when the patch has none), so the strength is
    explicit in the file and no reader has to guess a default.
    """
    if isinstance(patch, LoraPatch):
        out = {"lora_up.weight": patch.up, "lora_down.weight": patch.down}
        if patch.mid is not None:
            out["lora_mid.weight"] = patch.mid
    elif isinstance(patch, (LohaPatch, LokrPatch)):
        table = _LOHA if isinstance(patch, LohaPatch) else _LOKR
        out = {suffix: getattr(patch, field) for suffix, field in table.items() if getattr(patch, field) is not None}
    elif isinstance(patch, Ia3Patch):
        out = {"weight": patch.weight, "on_input": torch.tensor(int(patch.on_input))}
    elif isinstance(patch, FullPatch):
        # A 1-D difference can only belong to a norm layer, which LyCORIS names w_norm / b_norm.
        table = _NORM if patch.diff.dim() == 1 else _FULL
        out = {suffix: getattr(patch, field) for suffix, field in table.items() if getattr(patch, field) is not None}
    else:
        raise AdapterError(f"{type(patch).__name__} has no kohya/LyCORIS form")
    if patch.rank is not None:
        out["alpha"] = alpha_tensor(patch.alpha if patch.alpha is not None else float(patch.rank))
    elif patch.alpha is not None:
        out["alpha"] = alpha_tensor(patch.alpha)
    if patch.dora is not None:
        out["dora_scale"] = _dora_tensor(patch)
    return out
