"""Which base model a file is for, from its keys, their shapes and (as a fallback) its metadata.

Works on any key set: a LoRA in any dialect (kohya ``lora_unet_input_blocks_4_1_...``, diffusers ``unet.down_blocks``,
BFL ``double_blocks.0.img_attn.qkv``, XLabs, LyCORIS), a single-file checkpoint or a diffusers state dict. Keys are
compared with dots turned into underscores, so flattened kohya names and dotted names match the same rules. Shapes
give widths: the input width of a module from a full weight (``[out, in, ...]``) or a down factor (``lora_down``,
``lora_A``, ``hada_w*_b``: ``[r, in, ...]``).

The decisive widths: the cross-attention input of the UNet's ``attn2.to_k`` / ``to_v`` (768 SD1, 1024 SD2, 2048
SDXL), the hidden width of a DiT block (3072 FLUX, 1536 SD3 / SD3.5 medium, 2432 SD3.5 large) and the width of a text
encoder (768 CLIP-L, 1024 OpenCLIP-H, 1280 OpenCLIP-bigG). Names settle the rest: FLUX and SD3 block names, SDXL's
size embedding and deep transformer stacks, SD1's 1x1-conv ``proj_in`` (SD2 and SDXL use Linear).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Detection", "detect", "detect_arch"]

_DOWN = ("lora_down", "lora_a_", "lora_a.", "hada_w1_b", "hada_w2_b", "_down_weight", ".down.")
_UP = ("lora_up", "lora_b_", "lora_b.", "hada_w1_a", "hada_w2_a", "_up_weight", ".up.")
_OTHER_ADAPTER = ("hada_", "lokr_", "lora_mid", "oft_", "dora_scale", "magnitude")
_UNET = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
_FLUX = (
    "double_blocks",
    "single_blocks",
    "single_transformer_blocks",
    "img_attn",
    "txt_attn",
    "img_mlp",
    "txt_mod",
    "img_mod",
    "guidance_in",
    "vector_in",
)
_SD3 = ("joint_blocks", "context_block", "x_block", "y_embedder")
_DIT_WIDTH = (
    "attn_to_q",
    "attn_to_k",
    "attn_to_v",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "ff_net_0_proj",
    "attn_qkv",
    "attn_to_out_0",
    "norm1_linear",
)
_CLIP_WIDTH = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "mlp_fc1", "in_proj", "mlp_c_fc")
_T5 = ("selfattention", "densereludense", "t5xxl", "lora_te3", "text_encoder_3")
_SD_CTX = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT = {768: "CLIP-L", 1024: "OpenCLIP-H", 1280: "OpenCLIP-bigG"}
_BLOCK_INDEX = re.compile(r"(?:joint_blocks|transformer_blocks)_(\d+)_")


@dataclass(frozen=True)
class Detection:
    """The outcome of ``detect``.

    Attributes:
        arch: ``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3``, or None when the keys do not tell.
        variant: the released model when the keys tell it (``flux-dev``, ``sd3.5-large``...), else None.
        reason: one line for the user: the evidence, or why there is none.
    """

    arch: str | None
    variant: str | None
    reason: str


@dataclass
class _Evidence:
    keys: list[str]
    in_dims: dict[str, int]
    ranks: dict[str, int]

    def first(self, tokens: Sequence[str], *, without: Sequence[str] = ()) -> str | None:
        """The first key containing any of ``tokens`` and none of ``without``."""
        return next((k for k in self.keys if any(t in k for t in tokens) and not any(w in k for w in without)), None)

    def widths(self, tokens: Sequence[str], *, within: Sequence[str] = (), without: Sequence[str] = ()) -> set[int]:
        """Input widths of keys containing one of ``tokens`` (and one of ``within`` if given, none of ``without``)."""
        return {
            dim
            for k, dim in self.in_dims.items()
            if any(t in k for t in tokens)
            and (not within or any(w in k for w in within))
            and not any(w in k for w in without)
        }


def _input_width(key: str, shape: Sequence[int]) -> int | None:
    """The module's input width from a full weight or a down factor; None for up factors, biases and scalars."""
    if len(shape) < 2 or any(t in key for t in _UP):
        return None
    if any(t in key for t in _DOWN):
        return int(shape[1])
    # other adapter tensors (LoKr factors, Tucker cores, OFT blocks, DoRA scales) say nothing about the width
    if any(t in key for t in _OTHER_ADAPTER):
        return None
    return int(shape[1])


def _gather(keys_shapes: Mapping[str, Sequence[int]]) -> _Evidence:
    keys, dims, ranks = [], {}, {}
    for key, shape in keys_shapes.items():
        flat = key.lower().replace(".", "_")
        keys.append(flat)
        width = _input_width(key.lower(), tuple(shape))
        if width is not None:
            dims[flat], ranks[flat] = width, len(shape)
    return _Evidence(keys, dims, ranks)


def _flux_variant(ev: _Evidence) -> str | None:
    if ev.first(("guidance_in", "guidance_embedder")):
        return "flux-dev"
    # a full transformer has its time embedder; without a guidance embedder beside it, it is schnell
    if ev.first(("time_in_in_layer_weight", "timestep_embedder_linear_1_weight"), without=("lora",)):
        return "flux-schnell"
    return None


def _sd3_variant(ev: _Evidence, widths: set[int]) -> str | None:
    blocks = [int(m.group(1)) for k in ev.keys if (m := _BLOCK_INDEX.search(k))]
    if 2432 in widths or (blocks and max(blocks) >= 24):
        return "sd3.5-large"
    if ev.first(("x_block_attn2", "attn2_to_", "attn2_qkv"), without=_UNET) or ev.first(("ln_q", "norm_added_q")):
        return "sd3.5-medium"
    if ev.first(("x_block_attn_qkv_weight", "attn_add_q_proj_weight"), without=("lora",)):
        return "sd3-medium"  # a full SD3 checkpoint without the 3.5 models' qk norm
    return None


def _by_flux_names(ev: _Evidence) -> Detection | None:
    key = ev.first(_FLUX, without=_UNET)
    if key is None:
        return None
    return Detection("flux", _flux_variant(ev), f"FLUX block names ({key})")


def _by_sd3_names(ev: _Evidence) -> Detection | None:
    key = ev.first(_SD3, without=_UNET)
    if key is None:
        return None
    widths = ev.widths(_DIT_WIDTH, without=_UNET)
    return Detection("sd3", _sd3_variant(ev, widths), f"SD3 joint-block names ({key})")


def _by_dit_width(ev: _Evidence) -> Detection | None:
    """diffusers-named DiT blocks (``transformer_blocks.N`` outside a UNet): FLUX and SD3 differ in width."""
    key = ev.first(("transformer_blocks",), without=_UNET)
    if key is None:
        return None
    widths = ev.widths(_DIT_WIDTH, within=("transformer_blocks",), without=_UNET)
    if 3072 in widths:
        return Detection("flux", _flux_variant(ev), f"transformer blocks of width 3072 ({key})")
    if widths & {1536, 2432}:
        width = max(widths & {1536, 2432})
        return Detection("sd3", _sd3_variant(ev, widths), f"transformer blocks of width {width} ({key})")
    return Detection(None, None, f"transformer blocks of unknown width {sorted(widths)} ({key})")


_DEEP = re.compile(r"(?:attentions_\d+|input_blocks_\d+_1|output_blocks_\d+_1|middle_block_1)_transformer_blocks_[1-9]")


def _sdxl_hint(ev: _Evidence) -> str | None:
    """A name only SDXL's UNet or encoder pair has, or None."""
    if key := ev.first(("label_emb", "add_embedding")):
        return f"size embedding ({key})"
    if key := next((k for k in ev.keys if _DEEP.search(k)), None):
        return f"a stack of several transformer blocks ({key})"
    if 1280 in ev.widths(_CLIP_WIDTH, without=_UNET):
        return "an OpenCLIP-bigG text encoder (width 1280)"
    return None


def _sd1_or_sd2(ev: _Evidence) -> Detection | None:
    """Without cross-attention widths: SD1's ``proj_in`` is a 1x1 conv, SD2's a Linear; or the text encoder's width."""
    proj_in = {ev.ranks[k] for k in ev.ranks if "proj_in" in k and any(u in k for u in _UNET)}
    if proj_in == {4}:
        return Detection("sd1", "sd1", "UNet with 1x1-conv proj_in (SD2 and SDXL use Linear)")
    text = ev.widths(_CLIP_WIDTH, without=_UNET)
    if text == {768}:
        return Detection("sd1", "sd1", "UNet with a CLIP-L text encoder (width 768)")
    if text == {1024} or proj_in == {2}:
        what = "an OpenCLIP-H text encoder (width 1024)" if text == {1024} else "Linear proj_in and no SDXL names"
        return Detection("sd2", "sd2", f"UNet with {what}")
    return None


def _by_unet(ev: _Evidence) -> Detection | None:
    key = ev.first(_UNET)
    if key is None:
        return None
    ctx = ev.widths(("attn2_to_k", "attn2_to_v"), within=_UNET)
    if len(ctx) == 1 and ctx <= set(_SD_CTX):
        arch = _SD_CTX[next(iter(ctx))]
        return Detection(arch, arch, f"UNet cross-attention width {next(iter(ctx))} on attn2.to_k/to_v")
    if ctx:
        return Detection(None, None, f"UNet with unknown cross-attention widths {sorted(ctx)} (an SDXL refiner?)")
    if hint := _sdxl_hint(ev):
        return Detection("sdxl", "sdxl", f"UNet with {hint}")
    return _sd1_or_sd2(ev) or Detection(None, None, f"a UNet without width clues ({key})")


def _by_text_encoders(ev: _Evidence) -> Detection | None:
    """Text-encoder-only files: the encoder widths (and T5) narrow it down; some sets fit several models."""
    widths = ev.widths(_CLIP_WIDTH, without=_UNET) & set(_TEXT)
    t5 = ev.first(_T5)
    names = " + ".join([_TEXT[w] for w in sorted(widths)] + (["T5"] if t5 else []))
    if 1024 in widths:
        return Detection("sd2", "sd2", f"text encoder {names}")
    if t5 and 1280 in widths:
        return Detection("sd3", None, f"text encoders {names}")
    if widths == {768, 1280}:
        return Detection("sdxl", "sdxl", f"text encoders {names} (SD3 without T5 would look the same)")
    if widths == {768} and not t5:
        return Detection("sd1", "sd1", "a CLIP-L text encoder only (SDXL, FLUX and SD3 have one too)")
    if names:
        return Detection(None, None, f"text encoders {names} fit several models")
    return None


_RULES: tuple[Callable[[_Evidence], Detection | None], ...] = (
    _by_flux_names,
    _by_sd3_names,
    _by_dit_width,
    _by_unet,
    _by_text_encoders,
)

_META_ARCH = (
    # (metadata value prefix, arch, variant); more specific prefixes first
    ("stable-diffusion-xl", "sdxl", "sdxl"),
    ("stable-diffusion-v1", "sd1", "sd1"),
    ("stable-diffusion-v2", "sd2", "sd2"),
    ("stable-diffusion-3.5-large", "sd3", "sd3.5-large"),
    ("stable-diffusion-3.5-medium", "sd3", "sd3.5-medium"),
    ("stable-diffusion-3-medium", "sd3", "sd3-medium"),
    ("stable-diffusion-3", "sd3", None),
    ("flux-1-dev", "flux", "flux-dev"),
    ("flux-1-schnell", "flux", "flux-schnell"),
    ("flux", "flux", None),
    ("sdxl", "sdxl", "sdxl"),
    ("sd_v1", "sd1", "sd1"),
    ("sd_v2", "sd2", "sd2"),
    ("sd3", "sd3", None),
)


def _from_metadata(metadata: Mapping[str, str] | None) -> Detection | None:
    """kohya ``ss_base_model_version`` / ``ss_v2`` and modelspec ``modelspec.architecture``, if present."""
    if not metadata:
        return None
    for field in ("modelspec.architecture", "ss_base_model_version"):
        value = metadata.get(field, "").lower()
        for prefix, arch, variant in _META_ARCH:
            if value.startswith(prefix):
                return Detection(arch, variant, f"metadata {field}={metadata[field]}")
    if metadata.get("ss_v2", "").lower() == "true":
        return Detection("sd2", "sd2", "metadata ss_v2=True")
    return None


def _merge(keys: Detection | None, meta: Detection | None) -> Detection:
    """Keys win over metadata (metadata is often copied or wrong); metadata fills what keys leave open."""
    if keys is not None and keys.arch is not None:
        if meta is None:
            return keys
        if meta.arch != keys.arch:
            return Detection(keys.arch, keys.variant, f"{keys.reason}; {meta.reason} disagrees, keys win")
        if keys.variant is None and meta.variant is not None:
            return Detection(keys.arch, meta.variant, f"{keys.reason}; variant from {meta.reason}")
        return keys
    if meta is not None:
        return Detection(meta.arch, meta.variant, meta.reason + (f" (keys: {keys.reason})" if keys else ""))
    return keys or Detection(None, None, "no key names a known base model")


def detect(keys_shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None) -> Detection:
    """The base model a set of keys belongs to.

    Args:
        keys_shapes: key -> tensor shape, for every tensor of a file (a LoRA in any dialect, a checkpoint, a
            diffusers state dict). Module names without suffixes work too, with full weight shapes.
        metadata: the safetensors header metadata, used when the keys do not decide (and reported when it
            disagrees with them).

    Returns:
        A ``Detection``; ``arch`` is None when nothing decides, with the reason.
    """
    evidence = _gather(keys_shapes)
    from_keys = next((d for rule in _RULES if (d := rule(evidence)) is not None), None)
    return _merge(from_keys, _from_metadata(metadata))


def detect_arch(
    keys_shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None
) -> tuple[str | None, str]:
    """``(arch, reason)``: the short form of ``detect``."""
    found = detect(keys_shapes, metadata)
    return found.arch, found.reason
