"""diffusers / PEFT keys: ``<component>.<module>.lora_A.weight`` / ``lora_B.weight``, and the older diffusers forms.

Alphas come from ``<component>.<module>.alpha`` keys (diffusers' ``network_alphas``) or from the header key
``lora_adapter_metadata`` (the PEFT ``LoraConfig`` of each component as JSON, keys prefixed ``unet.``...); without
either, alpha = rank. The writer stores alphas in ``lora_adapter_metadata``: diffusers 0.42 refuses a diffusers-form
file that carries ``.alpha`` keys ("Invalid LoRA checkpoint"), and without alphas it would load every module at
scale 1.

Older diffusers files (attention processors) are renamed to this form first: ``processor.to_q_lora.down.weight``,
``lora_linear_layer.up.weight``, ``.lora.down.weight``. The same reader serves ai-toolkit's FLUX files and BFL's
control LoRAs (``lora_A`` on original names, looked up through the architecture's name map).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lorakit.core.patches import LoraPatch
from lorakit.errors import AdapterError, FileFormatError, ShapeError
from lorakit.formats.canonical import COMPONENTS, LoraFile
from lorakit.formats.dialects.context import ModelInfo
from lorakit.formats.dialects.grouped import ReadOutcome, place_patch
from lorakit.formats.dialects.names import CLIP_PREFIX, Part, clip_spellings, is_clip_encoder
from lorakit.formats.dialects.peft_config import (
    alpha_from_config,
    config_for,
    dora_from_peft,
    peft_lora_tensors,
    plain_lora_for_peft,
)

__all__ = ["METADATA_KEY", "claims_diffusers", "normalize_old_key", "read_diffusers", "write_diffusers"]

METADATA_KEY = "lora_adapter_metadata"

_SUFFIXES = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_magnitude_vector.weight",
    "lora_magnitude_vector",
    "alpha",
    "lora_B.bias",
)
_OLD_MARKERS = ("_lora.down.", "_lora.up.", ".lora_linear_layer.", ".lora.down.", ".lora.up.", ".processor.")

# Old attention-processor names -> module names. Text encoders name q/k/v/out q_proj... where the UNet has to_q...
_OLD_ATTN = re.compile(r"\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight(\.alpha)?$")
_OLD_LAYER = re.compile(r"\.(?:lora_linear_layer|lora)\.(down|up)\.weight(\.alpha)?$")
_TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DENOISER_ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_SIDE = {"down": "lora_A.weight", "up": "lora_B.weight"}


def claims_diffusers(key: str) -> bool:
    """Whether a key is in a diffusers / PEFT form (component prefix, ``lora_A``/``lora_B``, or an old form)."""
    if key.startswith("base_model.model."):
        return False
    if any(key.startswith(c + ".") for c in COMPONENTS):
        return True
    return (
        ".lora_A." in key
        or ".lora_B." in key
        or key.endswith(".lora_magnitude_vector")
        or any(m in key for m in _OLD_MARKERS)
    )


def normalize_old_key(key: str) -> str:
    """An old diffusers key in today's form.

    ``...attn1.processor.to_q_lora.down.weight`` -> ``...attn1.to_q.lora_A.weight``.
    """
    key = key.replace(".processor.", ".")
    if m := _OLD_ATTN.search(key):
        table = _TE_ATTN if key.startswith("text_encoder") or ".self_attn." in key else _DENOISER_ATTN
        tail = ".alpha" if m.group(3) else "." + _SIDE[m.group(2)]
        return key[: m.start()] + "." + table[m.group(1)] + tail
    if m := _OLD_LAYER.search(key):
        tail = ".alpha" if m.group(2) else "." + _SIDE[m.group(1)]
        return key[: m.start()] + tail
    return key


def _split(key: str, prefixed: bool) -> tuple[str | None, str, str] | None:
    """(component or None, module, suffix) of a normalised key."""
    component = next((c for c in COMPONENTS if key.startswith(c + ".")), None) if prefixed else None
    rest = key[len(component) + 1 :] if component else key
    for suffix in _SUFFIXES:
        if rest.endswith("." + suffix):
            return component, rest[: -len(suffix) - 1], suffix
    return None


def guess_component(module: str, info: ModelInfo) -> str:
    """The component of a module named without a prefix: the one table that has it, else by its first name part."""
    found = [c for c in COMPONENTS if (n := info.names(c)) is not None and n.lookup(module, flat_name=False)]
    if len(found) == 1:
        return found[0]
    if module.startswith((CLIP_PREFIX, "encoder.", "embeddings.", "final_layer_norm")):
        return "text_encoder"
    if module.startswith(
        (
            "transformer_blocks.",
            "single_transformer_blocks.",
            "double_blocks.",
            "single_blocks.",
            "joint_blocks.",
            "x_embedder",
            "context_embedder",
        )
    ):
        return "transformer"
    return info.denoiser()


def component_configs(metadata: Mapping[str, str]) -> dict[str | None, dict[str, Any]]:
    """``lora_adapter_metadata`` split per component (None: fields without a component prefix).

    Raises:
        FileFormatError: the value is not a JSON object.
    """
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"header key {METADATA_KEY} is not valid JSON ({exc}); remove it or fix it") from None
    if not isinstance(fields, dict):
        raise FileFormatError(f"header key {METADATA_KEY} is not a JSON object")
    out: dict[str | None, dict[str, Any]] = {}
    for key, value in fields.items():
        component = next((c for c in COMPONENTS if key.startswith(c + ".")), None)
        out.setdefault(component, {})[key[len(component) + 1 :] if component else key] = value
    return out


def read_diffusers(
    tensors: Mapping[str, Tensor],
    info: ModelInfo,
    configs: Mapping[str | None, Mapping[str, Any]],
    *,
    default_component: str | None = None,
    prefixed: bool = True,
) -> ReadOutcome:
    """Read diffusers / PEFT keys.

    Args:
        tensors: the keys this dialect claimed (old forms included).
        info: module tables and architecture.
        configs: PEFT ``LoraConfig`` fields per component (None applies to all), for alphas.
        default_component: the component of keys without a prefix (a PEFT folder's model), else guessed.
        prefixed: keys may start with a component name (diffusers); False for PEFT, whose keys are module paths.
    """
    outcome = ReadOutcome()
    groups: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, tensor in tensors.items():
        split = _split(normalize_old_key(key) if prefixed else key, prefixed)
        if split is None:
            outcome.unplaced[key] = "unknown tensor suffix"
            continue
        component, module, suffix = split
        component = component or default_component or guess_component(module, info)
        groups.setdefault((component, module), {})[suffix] = (key, tensor)
    for (component, module), parts in groups.items():
        keys = [k for k, _ in parts.values()]
        if "lora_B.bias" in parts:
            outcome.unplaced.update(dict.fromkeys(keys, "LoRA with a bias (lora_bias) is not supported"))
            continue
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            outcome.unplaced.update(dict.fromkeys(keys, "lora_A or lora_B missing"))
            continue
        names = info.names(component)
        found = names.lookup(module, flat_name=False) if names is not None else (Part(module),)
        if found is None:
            outcome.unplaced.update(dict.fromkeys(keys, f"no {component} module named {module!r}"))
            continue
        try:
            patch = _patch(parts, module, component, configs)
            outcome.patches.update(place_patch(component, found, patch, names.modules if names else None))
        except FileFormatError as exc:  # inconsistent tensors or another model's shapes
            outcome.unplaced.update(dict.fromkeys(keys, str(exc)))
    return outcome


def _patch(
    parts: dict[str, tuple[str, Tensor]], module: str, component: str, configs: Mapping[str | None, Mapping[str, Any]]
) -> LoraPatch:
    down, up = parts["lora_A.weight"][1], parts["lora_B.weight"][1]
    rank = int(down.shape[0])
    if "alpha" in parts:
        alpha: float | None = float(parts["alpha"][1].double().item())
    else:
        config = configs.get(component) or configs.get(None) or {}
        alpha = alpha_from_config(config, module, rank) if config else None
    magnitude = parts.get("lora_magnitude_vector") or parts.get("lora_magnitude_vector.weight")
    dora = dora_from_peft(magnitude[1]) if magnitude is not None else None
    try:
        return LoraPatch(up=up, down=down, alpha=alpha, dora=dora)
    except ShapeError as exc:
        raise FileFormatError(f"{component}.{module}: {exc}") from None


def plain_patches(lora: LoraFile, component: str) -> dict[str, LoraPatch]:
    """The component's patches as PEFT LoRAs, by module name.

    Raises:
        AdapterError: a patch is on a row slice or of a kind PEFT's LoRA cannot hold, or only some use DoRA.
    """
    out = {}
    for target, patch in lora.patches.items():
        if target.component != component:
            continue
        if target.rows is not None:
            raise AdapterError(f"{target}: a patch on part of a fused weight has no diffusers/PEFT form; write kohya")
        out[target.module] = plain_lora_for_peft(patch, str(target))
    with_dora = sum(p.dora is not None for p in out.values())
    if 0 < with_dora < len(out):
        # PEFT's use_dora is one switch per adapter: a module without a magnitude would get one.
        raise AdapterError(
            f"{component}: {with_dora} of {len(out)} modules use DoRA, but PEFT (and diffusers) "
            f"apply DoRA to every module of an adapter or none; write the kohya dialect instead"
        )
    return out


def write_diffusers(lora: LoraFile, info: ModelInfo) -> tuple[dict[str, Tensor], dict[str, str]]:
    """diffusers tensors and header metadata (``lora_adapter_metadata`` with every component's alphas)."""
    tensors: dict[str, Tensor] = {}
    config: dict[str, Any] = {}
    for component in lora.components():
        patches = plain_patches(lora, component)
        table = info.table(component)
        known = list(table) if table is not None else list(patches)
        clip = is_clip_encoder(known)
        for module, patch in patches.items():
            # CLIP modules keep transformers 4's text_model. level: diffusers strips it for models without it.
            spellings = clip_spellings(module) if clip else None
            name = spellings[0] if spellings else module
            for suffix, tensor in peft_lora_tensors(patch).items():
                tensors[f"{component}.{name}.{suffix}"] = tensor
        fields = config_for(patches, known, clip=clip)
        config.update({f"{component}.{k}": v for k, v in fields.items()})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return tensors, metadata
