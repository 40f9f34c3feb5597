"""Read and write LoRA files in every dialect: the public entry points of ``lorakit.formats``.

    lora = load_lora("style.safetensors", arch="sdxl")           # any dialect, detected from the keys
    save_lora(lora, "style_diffusers.safetensors", dialect="diffusers")
    tensors, metadata = to_state_dict(lora, "kohya")

Readers turn each dialect's keys into the canonical ``LoraFile`` (diffusers module names, one patch per target);
writers turn it back. A key that cannot be placed is an error listing the keys, unless ``skip_unknown`` (then
``LoraFile.skipped`` lists them). Round trips are exact: reading what a writer wrote gives the same effective deltas.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.core.patches import Patch
from lorakit.errors import FileFormatError, LorakitError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.dialects.comfy import claims_comfy, read_comfy, write_comfy
from lorakit.formats.dialects.context import ModelInfo
from lorakit.formats.dialects.detect import detect_arch, family_of
from lorakit.formats.dialects.diffusers import (
    METADATA_KEY,
    claims_diffusers,
    component_configs,
    plain_patches,
    read_diffusers,
    write_diffusers,
)
from lorakit.formats.dialects.grouped import ReadOutcome
from lorakit.formats.dialects.kohya import claims_kohya, claims_lycoris, read_kohya, read_lycoris, write_kohya
from lorakit.formats.dialects.names import ModuleShapes
from lorakit.formats.dialects.peft import (
    CONFIG_NAME,
    PEFT_PREFIX,
    claims_peft,
    is_peft_folder,
    read_peft,
    read_peft_folder,
    write_peft_folder,
)
from lorakit.formats.dialects.peft_config import config_for, peft_lora_tensors
from lorakit.formats.dialects.xlabs import claims_xlabs, read_xlabs
from lorakit.formats.safetensors_io import load_any, write_file

__all__ = ["DIALECTS", "load_lora", "module_shapes", "save_lora", "to_state_dict"]

DIALECTS = ("kohya", "diffusers", "peft", "comfy")
"""Dialects lorakit writes. It reads these and LyCORIS (``lycoris_``), XLabs FLUX and old diffusers files too."""

PEFT_CONFIG_KEY = "peft_adapter_config"
"""Metadata key under which ``to_state_dict(..., "peft")`` returns (and ``load_lora`` takes) the adapter config."""

_STALE = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", METADATA_KEY, PEFT_CONFIG_KEY)
"""Metadata a writer must not carry over: hashes of the old bytes, the old dialect's alpha table."""

ModulesArg = Mapping[str, ModuleShapes | nn.Module] | None

_MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "flux": "flux-1-dev",
    "flux-dev": "flux-1-dev",
    "flux-schnell": "flux-1-schnell",
    "sd3": "stable-diffusion-3-medium",
    "sd3-medium": "stable-diffusion-3-medium",
    "sd3.5-medium": "stable-diffusion-3.5-medium",
    "sd3.5-large": "stable-diffusion-3.5-large",
}
"""modelspec ``architecture`` values (Stability's model spec), written with ``/lora`` so readers know the base model."""


def module_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape for every submodule of ``model`` that owns a ``weight`` (a module table).

    Args:
        model: a concrete model (a diffusers UNet, a transformers text encoder...).
    """
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if name and isinstance(getattr(module, "weight", None), Tensor)
    }


def _tables(modules: ModulesArg) -> dict[str, ModuleShapes]:
    if not modules:
        return {}
    return {c: module_shapes(m) if isinstance(m, nn.Module) else dict(m) for c, m in modules.items()}


_Reader = Callable[[Mapping[str, Tensor], ModelInfo, Mapping[str, str]], ReadOutcome]


def _read_peft_keys(tensors: Mapping[str, Tensor], info: ModelInfo, metadata: Mapping[str, str]) -> ReadOutcome:
    config = json.loads(metadata[PEFT_CONFIG_KEY]) if PEFT_CONFIG_KEY in metadata else {}
    return read_peft(tensors, info, config, None)


_READERS: tuple[tuple[str, Callable[[str], bool], _Reader], ...] = (
    ("peft", claims_peft, _read_peft_keys),
    ("kohya", claims_kohya, lambda t, info, _: read_kohya(t, info)),
    ("lycoris", claims_lycoris, lambda t, info, _: read_lycoris(t, info)),
    ("xlabs", claims_xlabs, lambda t, info, _: read_xlabs(t, info)),
    ("comfy", claims_comfy, lambda t, info, _: read_comfy(t, info)),
    ("diffusers", claims_diffusers, lambda t, info, meta: read_diffusers(t, info, component_configs(meta))),
)
"""Dialects in the order they claim keys (XLabs before ComfyUI: both may start with ``diffusion_model.``)."""


def _sample(keys: list[str], count: int = 3) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f" and {len(keys) - count} more" if len(keys) > count else "")


_PLACEMENT = ("module", "does not fit", "unknown prefix")
"""Reasons that mean "wrong or unknown base model" rather than "damaged or unsupported tensors"."""


def _unplaced_error(where: str, unplaced: dict[str, str], total: int) -> FileFormatError:
    keys = sorted(unplaced)
    unknown = [k for k in keys if unplaced[k] == "unknown dialect"]
    if len(unknown) == len(keys):
        return FileFormatError(
            f"{where}: {len(keys)} of {total} keys are in no LoRA dialect lorakit reads: "
            f"{_sample(keys)}; check that this is a LoRA file (not a checkpoint or an embedding), "
            f"or pass skip_unknown=True to skip them"
        )
    reasons = Counter(unplaced.values()).most_common(2)
    why = "; ".join(f"{n} x {reason}" for reason, n in reasons)
    if any(marker in reason for reason, _ in reasons for marker in _PLACEMENT):
        fix = "pass arch= or modules= for the base model the LoRA was made for"
    else:
        fix = "the file is damaged or holds an adapter kind lorakit cannot read; export it again"
    return FileFormatError(
        f"{where}: {len(keys)} of {total} keys cannot be placed ({why}): {_sample(keys)}; {fix}, "
        f"or pass skip_unknown=True to skip them"
    )


def _read_tensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], info: ModelInfo, where: str
) -> tuple[dict[Target, Patch], dict[str, str], list[str]]:
    """Route every key to the first dialect that claims it and read each dialect's share."""
    shares: dict[str, dict[str, Tensor]] = {}
    unplaced: dict[str, str] = {}
    for key, tensor in tensors.items():
        name = next((n for n, claims, _ in _READERS if claims(key)), None)
        if name is None:
            unplaced[key] = "unknown dialect"
        else:
            shares.setdefault(name, {})[key] = tensor
    patches: dict[Target, Patch] = {}
    for name, _, read in _READERS:
        if name not in shares:
            continue
        outcome = read(shares[name], info, metadata)
        unplaced.update(outcome.unplaced)
        for target, patch in outcome.patches.items():
            if target in patches:
                raise FileFormatError(
                    f"{where}: two adapters for {target} (the file spells one module twice, e.g. in "
                    f"two dialects); keep one"
                )
            patches[target] = patch
    dialects = sorted(shares, key=lambda n: -len(shares[n]))
    return patches, unplaced, dialects


def _sorted(patches: dict[Target, Patch]) -> dict[Target, Patch]:
    return dict(sorted(patches.items(), key=lambda item: (item[0].component, item[0].module, item[0].rows or ())))


def _dialect_label(dialects: list[str], tensors: Mapping[str, Tensor]) -> str:
    if not dialects:
        return "unknown"
    if dialects == ["diffusers"] and any(m in k for k in tensors for m in ("_lora.", ".lora_linear_layer.", ".lora.")):
        return "diffusers_old"
    return "+".join(dialects)


def load_lora(
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    modules: ModulesArg = None,
    arch: str | None = None,
    skip_unknown: bool = False,
) -> LoraFile:
    """Read a LoRA in any dialect into canonical form.

    Args:
        source: a ``.safetensors`` file, a PEFT adapter folder (or its ``adapter_config.json``), or a state dict.
        metadata: header metadata for a state dict (for a file: entries that override the file's).
        modules: component -> module table (``{name: weight shape}``) or the model itself, for the base model the
            LoRA is for. Needed to place kohya names (which cannot be inverted by string rules) when the
            architecture's bundled tables do not apply (custom or tiny models); it wins over ``arch``'s tables.
        arch: the architecture or variant (``sd1``, ``sdxl``, ``flux-schnell``...); else detected from metadata,
            key names and shapes.
        skip_unknown: skip keys that cannot be placed (listed in ``LoraFile.skipped``) instead of raising.

    Returns:
        The ``LoraFile``: patches by target (sorted), metadata, dialect, architecture and why.

    Raises:
        FileFormatError: keys of an unknown dialect, keys no module of the base model fits, inconsistent tensors.
        InputError: the file is missing or unreadable.
        UnsafeFileError: the file is a pickle.
    """
    tables = _tables(modules)
    if isinstance(source, Mapping):
        tensors, meta, where = dict(source), dict(metadata or {}), "state dict"
    else:
        path = Path(source)
        folder = path.parent if path.name == CONFIG_NAME else path
        if is_peft_folder(folder):
            return _load_peft_folder(folder, dict(metadata or {}), tables, arch, skip_unknown)
        tensors, meta = load_any(path)
        meta.update(metadata or {})
        where = str(path)
    if not tensors:
        raise FileFormatError(f"{where}: holds no tensors; check that it is a LoRA file")
    family, variant, reason = detect_arch(tensors, meta, arch)
    info = ModelInfo(tables, family, variant)
    patches, unplaced, dialects = _read_tensors(tensors, meta, info, where)
    if unplaced and not skip_unknown:
        raise _unplaced_error(where, unplaced, len(tensors))
    return LoraFile(
        patches=_sorted(patches),
        metadata=meta,
        dialect=_dialect_label(dialects, tensors),
        arch=family,
        arch_reason=reason,
        skipped=sorted(unplaced),
    )


def _load_peft_folder(
    folder: Path, meta: dict[str, str], tables: dict[str, ModuleShapes], arch: str | None, skip_unknown: bool
) -> LoraFile:
    family, reason = (family_of(arch), "given by the caller") if arch else (None, "unknown: a PEFT folder")
    info = ModelInfo(tables, family, arch)
    outcome, config_meta = read_peft_folder(folder, info)
    if outcome.unplaced and not skip_unknown:
        raise _unplaced_error(str(folder), outcome.unplaced, len(outcome.unplaced) + len(outcome.patches))
    return LoraFile(
        patches=_sorted(outcome.patches),
        metadata={**config_meta, **meta},
        dialect="peft",
        arch=family,
        arch_reason=reason,
        skipped=sorted(outcome.unplaced),
    )


def _model_info(lora: LoraFile, arch: str | None, modules: ModulesArg) -> ModelInfo:
    family = family_of(arch) if arch else lora.arch
    return ModelInfo(_tables(modules), family, arch or family)


def _cast(tensors: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Cast float tensors to ``dtype``; alphas stay as written (their exact value is the strength)."""
    if dtype is None:
        return {k: v.contiguous() for k, v in tensors.items()}
    return {
        k: (v if k.endswith(".alpha") or not v.is_floating_point() else v.to(dtype)).contiguous()
        for k, v in tensors.items()
    }


def to_state_dict(
    lora: LoraFile,
    dialect: str = "kohya",
    *,
    arch: str | None = None,
    modules: ModulesArg = None,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and header metadata of ``lora`` in one dialect.

    Args:
        lora: the LoRA.
        dialect: ``kohya`` (SD 1/2 diffusers names, SDXL LDM names, FLUX / SD3 original fused names; an ``alpha``
            per module), ``diffusers`` (alphas in ``lora_adapter_metadata``, which diffusers honours), ``comfy``, or
            ``peft`` (one component; the adapter config as JSON under the ``peft_adapter_config`` metadata key).
        arch: the architecture or variant, when ``lora.arch`` is unknown or to override it.
        modules: component -> module table or model, for custom or tiny base models.
        dtype: cast weights to this dtype (alphas keep their exact value).

    Returns:
        ``(tensors, metadata)``; metadata carries the LoRA's own over, minus hashes of the old bytes, plus
        ``modelspec.architecture`` when the architecture is known and the metadata does not say it yet.

    Raises:
        AdapterError: a patch has no form in that dialect (e.g. LoHa in diffusers); the message names the target.
        LorakitError: unknown dialect.
    """
    if dialect not in DIALECTS:
        raise LorakitError(f"unknown dialect {dialect!r}; lorakit writes {', '.join(DIALECTS)}")
    info = _model_info(lora, arch, modules)
    metadata = {k: v for k, v in lora.metadata.items() if k not in _STALE and not k.startswith("peft.")}
    spec = _MODELSPEC_ARCH.get(info.variant or info.arch or "")
    if spec and "modelspec.architecture" not in metadata:
        # Record the base model: a LoRA's keys alone often cannot tell it (a few modules, or a custom model).
        metadata.update({"modelspec.architecture": f"{spec}/lora", "modelspec.sai_model_spec": "1.0.0"})
    if dialect == "kohya":
        tensors = write_kohya(lora, info)
    elif dialect == "comfy":
        tensors = write_comfy(lora, info)
    elif dialect == "diffusers":
        tensors, extra = write_diffusers(lora, info)
        metadata.update(extra)
    else:
        tensors, config = _peft_state(lora, info)
        metadata[PEFT_CONFIG_KEY] = json.dumps(config, sort_keys=True)
    return _cast(tensors, dtype), metadata


def _peft_state(lora: LoraFile, info: ModelInfo) -> tuple[dict[str, Tensor], dict[str, Any]]:
    components = lora.components()
    if len(components) != 1:
        raise LorakitError(
            f"a PEFT state dict holds one model's adapter, this LoRA has {components}; save a PEFT "
            f"folder (save_lora(..., dialect='peft')), which gets one subfolder per component"
        )
    patches = plain_patches(lora, components[0])
    tensors = {f"{PEFT_PREFIX}{m}.{s}": t for m, p in patches.items() for s, t in peft_lora_tensors(p).items()}
    table = info.table(components[0])
    return tensors, config_for(patches, list(table) if table is not None else None)


def save_lora(
    lora: LoraFile,
    path: str | os.PathLike[str],
    *,
    dialect: str = "kohya",
    arch: str | None = None,
    dtype: torch.dtype | None = None,
    modules: ModulesArg = None,
) -> Path:
    """Write ``lora`` in one dialect, atomically.

    Args:
        lora: the LoRA.
        path: the ``.safetensors`` file, or for ``peft`` the adapter folder (one subfolder per component when the
            LoRA has several).
        dialect: see ``to_state_dict``.
        arch: the architecture or variant, when ``lora.arch`` is unknown or to override it.
        dtype: cast weights to this dtype (alphas keep their exact value).
        modules: component -> module table or model, for custom or tiny base models.

    Returns:
        The path written.
    """
    target = Path(path)
    if dialect == "peft":
        folder_info = _model_info(lora, arch, modules)
        write_peft_folder(lora, target, folder_info, dtype)
        return target
    tensors, metadata = to_state_dict(lora, dialect, arch=arch, modules=modules, dtype=dtype)
    hash_fields = {"sshs_model_hash": "{sha256}"} if dialect == "kohya" else None
    write_file(target, tensors, metadata, hash_fields=hash_fields)
    return target
