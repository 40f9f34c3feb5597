"""Name maps between diffusers / transformers module names and original single-file checkpoint names.

Forward (``to_original``): one diffusers module -> one weight of the original checkpoint, possibly a row slice of a
fused weight (FLUX ``qkv`` / ``linear1``, SD3 ``qkv``, OpenCLIP ``in_proj_weight``) or stored with its halves swapped
or transposed (see ``OriginalRef``). Backward (``from_original``): built by inverting the forward map over the whole
module table, never by string rules, so every name a table holds round-trips and nothing else is guessed.

Original names are relative to the component's prefix in a single-file checkpoint (``checkpoint_prefix``), so the
same map serves an A1111 checkpoint (``model.diffusion_model.input_blocks...``), a BFL FLUX file (no prefix) and the
LDM/BFL-named module paths of kohya LoRAs (``lora_unet_input_blocks_4_1_...`` once un-flattened by ``formats``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType

from lorakit.arch.names_dit import flux_to_original, sd3_to_original
from lorakit.arch.names_text import openclip_to_original, text_to_original
from lorakit.arch.names_unet import unet_to_original
from lorakit.arch.refs import DiffusersRef, OriginalRef
from lorakit.arch.registry import VARIANTS, arch_of, resolve_variant
from lorakit.arch.tables import module_table, normalize_module_name

__all__ = [
    "CHECKPOINT_PREFIXES",
    "checkpoint_prefix",
    "from_original",
    "original_map",
    "reverse_map",
    "to_original",
]

_DENOISER = ("model.diffusion_model.", "diffusion_model.")
CHECKPOINT_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "sd1": {"unet": _DENOISER, "text_encoder": ("cond_stage_model.transformer.",)},
    "sd2": {"unet": _DENOISER, "text_encoder": ("cond_stage_model.model.",)},
    "sdxl": {
        "unet": _DENOISER,
        "text_encoder": ("conditioner.embedders.0.transformer.",),
        "text_encoder_2": ("conditioner.embedders.1.model.",),
    },
    "flux": {
        "transformer": _DENOISER,
        "text_encoder": ("text_encoders.clip_l.transformer.",),
        "text_encoder_2": ("text_encoders.t5xxl.transformer.",),
    },
    "sd3": {
        "transformer": _DENOISER,
        "text_encoder": ("text_encoders.clip_l.transformer.",),
        "text_encoder_2": ("text_encoders.clip_g.transformer.",),
        "text_encoder_3": ("text_encoders.t5xxl.transformer.",),
    },
}
"""Per architecture and component, the key prefixes of single-file checkpoints; the first is what A1111 / ComfyUI /
Stability files use (BFL's own FLUX file has no prefix: its keys are the relative names), ``diffusion_model.`` is
ComfyUI's LoRA form."""

_OPENCLIP = {("sd2", "text_encoder"), ("sdxl", "text_encoder_2")}
"""Encoders stored in OpenCLIP naming; all others are stored as transformers state dicts."""

_Forward = Callable[[str, Mapping[str, tuple[int, ...]]], OriginalRef]


def _forward(arch: str, component: str) -> _Forward:
    family = arch_of(arch)
    if component == "unet":
        return unet_to_original
    if component == "transformer":
        return flux_to_original if family == "flux" else sd3_to_original
    return openclip_to_original if (family, component) in _OPENCLIP else text_to_original


def checkpoint_prefix(arch: str, component: str) -> str:
    """The key prefix of a component in a single-file checkpoint (``model.diffusion_model.`` for an SD UNet)."""
    return CHECKPOINT_PREFIXES[arch_of(arch)][component][0]


@functools.cache
def _original_map(variant: str, component: str) -> Mapping[str, OriginalRef]:
    table = module_table(variant, component)
    forward = _forward(variant, component)
    return MappingProxyType({name: forward(name, table) for name in table})


def original_map(arch: str, component: str) -> Mapping[str, OriginalRef]:
    """Every module of a component -> its original weight (cached, read-only, in table order)."""
    return _original_map(resolve_variant(arch), component)


def to_original(arch: str, component: str, module: str) -> OriginalRef:
    """The original weight holding a diffusers module's weight.

    Args:
        arch: architecture or variant (``sdxl``, ``flux-schnell``...).
        component: ``unet``, ``transformer`` or a text encoder.
        module: diffusers / transformers module name, without ``.weight``; text encoder names in either transformers
            form.

    Returns:
        E.g. ``to_original("flux", "transformer", "transformer_blocks.0.attn.to_k")`` is
        ``OriginalRef("double_blocks.0.img_attn.qkv", ".weight", rows=(3072, 6144))``.

    Raises:
        KeyError: the module is not in the component's table.
    """
    name = normalize_module_name(arch, component, module)
    try:
        return original_map(arch, component)[name]
    except KeyError:
        raise KeyError(f"{module!r} is not a module of {arch} {component}") from None


@functools.cache
def _reverse_map(variant: str, component: str) -> Mapping[str, tuple[DiffusersRef, ...]]:
    reverse: dict[str, list[DiffusersRef]] = {}
    for name, ref in _original_map(variant, component).items():
        reverse.setdefault(ref.module, []).append(DiffusersRef(component, name, ref.rows, ref.transform))
    # Table order is module creation order (CLIP builds k before q): present fused members by their rows.
    return MappingProxyType({k: tuple(sorted(v, key=lambda r: r.rows or (0, 0))) for k, v in reverse.items()})


def reverse_map(arch: str, component: str) -> Mapping[str, tuple[DiffusersRef, ...]]:
    """Original module -> the diffusers modules it holds, in row order (one, or the members of a fused weight)."""
    return _reverse_map(resolve_variant(arch), component)


_PARAM_SUFFIXES = (".weight", ".bias", "_weight", "_bias", ".scale")


def _lookup(relative: str, reverse: Mapping[str, tuple[DiffusersRef, ...]]) -> tuple[DiffusersRef, ...]:
    if relative in reverse:
        return reverse[relative]
    for suffix in _PARAM_SUFFIXES:
        if relative.endswith(suffix) and relative[: -len(suffix)] in reverse:
            return reverse[relative[: -len(suffix)]]
    return ()


def _split_prefix(arch: str, key: str) -> tuple[str | None, str]:
    """(component, relative key) for a key with a known prefix, else (None, key)."""
    best: tuple[str | None, str] = (None, key)
    longest = 0
    for component, prefixes in CHECKPOINT_PREFIXES[arch_of(arch)].items():
        for prefix in prefixes:
            if key.startswith(prefix) and len(prefix) > longest:
                best, longest = (component, key[len(prefix) :]), len(prefix)
    return best


def from_original(arch: str, key: str, component: str | None = None) -> list[DiffusersRef]:
    """The diffusers modules that an original checkpoint key (or original module path) belongs to.

    Args:
        arch: architecture or variant.
        key: a full single-file key (``conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight``),
            a key relative to the component prefix (``double_blocks.0.img_attn.qkv.weight``) or an original module
            path (``input_blocks.4.1.proj_in``). Weight, bias and ``scale`` suffixes are all accepted.
        component: which component a relative key belongs to; needed only where two components share relative
            names (SD3's two CLIP encoders).

    Returns:
        One ``DiffusersRef`` for a plain weight; for a fused weight one per member, in row order, each with the rows
        it occupies. Empty when the key is not part of the known model (e.g. SD2's unused 24th OpenCLIP layer,
        ``logit_scale``, buffers such as SD3's ``pos_embed``).

    Raises:
        LookupError: a relative key matches several components and ``component`` was not given.
    """
    variant = resolve_variant(arch)
    prefixed, relative = _split_prefix(variant, key)
    if prefixed is not None:
        if component is not None and component != prefixed:
            return []
        return list(_lookup(relative, _reverse_map(variant, prefixed)))
    candidates = [component] if component is not None else list(VARIANTS[variant].components)
    hits = {c: refs for c in candidates if (refs := _lookup(relative, _reverse_map(variant, c)))}
    if len(hits) > 1:
        raise LookupError(f"{key!r} names a module in {', '.join(hits)} of {arch}: pass component= to choose")
    return list(next(iter(hits.values()), ()))
