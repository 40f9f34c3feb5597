"""Name map of the VAE between diffusers (``AutoencoderKL``) and the original LDM single-file layout.

The module tables of ``lorakit.arch`` cover what LoRAs touch (denoisers, text encoders); a single-file checkpoint also
holds the VAE under ``first_stage_model.`` (``vae.`` in some ComfyUI files). The rules are structural, so they hold for
any number of blocks: the decoder's ``up_blocks.i`` is LDM's ``up.(n-1-i)``, resnets are ``block.j``, the mid block's
resnets are ``block_1`` / ``block_2`` and its attention is ``attn_1`` with 1x1 convs where diffusers has Linear layers.
"""

from __future__ import annotations

import re

__all__ = ["VAE_PREFIXES", "vae_to_original"]

VAE_PREFIXES = ("first_stage_model.", "vae.")
"""Prefixes of the VAE in single-file checkpoints (A1111 / Stability; some ComfyUI files)."""

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_TOP = {"conv_norm_out": "norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}


def _inner(rest: str, up: bool, num_up: int) -> str | None:
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", rest)
    if m and m.group(4) in _RESNET:
        index = int(m.group(2))
        block = num_up - 1 - index if up else index
        return f"{m.group(1)}.{block}.block.{m.group(3)}.{_RESNET[m.group(4)]}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", rest)
    if m:
        return f"down.{m.group(1)}.downsample.conv"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", rest)
    if m:
        return f"up.{num_up - 1 - int(m.group(1))}.upsample.conv"
    m = re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)", rest)
    if m and m.group(2) in _RESNET:
        return f"mid.block_{int(m.group(1)) + 1}.{_RESNET[m.group(2)]}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)", rest)
    if m:
        return f"mid.attn_1.{_ATTN[m.group(1)]}"
    return _TOP.get(rest)


def vae_to_original(name: str, num_up_blocks: int) -> str | None:
    """The LDM name of one diffusers VAE parameter (``decoder.up_blocks.0.resnets.1.conv1.weight`` ->
    ``decoder.up.3.block.1.conv1.weight`` for 4 up blocks), or None for a name outside the layout."""
    module, _, leaf = name.rpartition(".")
    if module in ("quant_conv", "post_quant_conv"):
        return name
    side, _, rest = module.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    inner = _inner(rest, side == "decoder", num_up_blocks)
    return None if inner is None else f"{side}.{inner}.{leaf}"
