"""FLUX.1 and SD3 transformers: diffusers module names -> original (BFL / Stability) names.

Both originals fuse what diffusers keeps apart, so several diffusers modules map to row slices of one original weight:

- FLUX double block ``N``: ``img_attn.qkv`` = ``attn.to_q; to_k; to_v``, ``txt_attn.qkv`` = ``attn.add_q_proj;
  add_k_proj; add_v_proj`` (3 x 3072 rows each).
- FLUX single block ``N``: ``linear1`` = ``attn.to_q; to_k; to_v; proj_mlp`` (3 x 3072 + 12288 rows); ``linear2`` =
  ``proj_out`` unsliced (its input is the concatenated attention and MLP output).
- SD3 joint block ``N``: ``x_block.attn.qkv``, ``context_block.attn.qkv`` and (SD3.5 medium) ``x_block.attn2.qkv``.

Not plain copies either: the final AdaLN modulation (``norm_out.linear``, FLUX and SD3) and SD3's last
``norm1_context.linear`` (the context stream's final norm, an AdaLayerNormContinuous) are stored as
``[shift; scale]`` where diffusers has ``[scale; shift]`` (``transform="swap_halves"``). FLUX's RMSNorm weights are
called ``scale`` (``img_attn.norm.query_norm.scale``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lorakit.arch.refs import SWAP_HALVES, OriginalRef

__all__ = ["flux_to_original", "sd3_to_original"]

Table = Mapping[str, tuple[int, ...]]

_GROUPS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    # family -> (original fused module, its diffusers members in row order)
    "flux.double": (
        ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ),
    "flux.single": (("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),),
    "sd3": (
        ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    ),
}

_FLUX_DOUBLE: dict[str, object] = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": ("img_attn.norm.query_norm", ".scale"),
    "attn.norm_k": ("img_attn.norm.key_norm", ".scale"),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", ".scale"),
    "attn.norm_added_k": ("txt_attn.norm.key_norm", ".scale"),
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_FLUX_SINGLE: dict[str, object] = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": ("norm.query_norm", ".scale"),
    "attn.norm_k": ("norm.key_norm", ".scale"),
    "proj_out": "linear2",
}
_FLUX_TOP = {
    "x_embedder": OriginalRef("img_in"),
    "context_embedder": OriginalRef("txt_in"),
    "time_text_embed.timestep_embedder.linear_1": OriginalRef("time_in.in_layer"),
    "time_text_embed.timestep_embedder.linear_2": OriginalRef("time_in.out_layer"),
    "time_text_embed.text_embedder.linear_1": OriginalRef("vector_in.in_layer"),
    "time_text_embed.text_embedder.linear_2": OriginalRef("vector_in.out_layer"),
    "time_text_embed.guidance_embedder.linear_1": OriginalRef("guidance_in.in_layer"),
    "time_text_embed.guidance_embedder.linear_2": OriginalRef("guidance_in.out_layer"),
    "norm_out.linear": OriginalRef("final_layer.adaLN_modulation.1", transform=SWAP_HALVES),
    "proj_out": OriginalRef("final_layer.linear"),
}
_SD3_BLOCK: dict[str, object] = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_SD3_TOP = {
    "pos_embed.proj": OriginalRef("x_embedder.proj"),
    "time_text_embed.timestep_embedder.linear_1": OriginalRef("t_embedder.mlp.0"),
    "time_text_embed.timestep_embedder.linear_2": OriginalRef("t_embedder.mlp.2"),
    "time_text_embed.text_embedder.linear_1": OriginalRef("y_embedder.mlp.0"),
    "time_text_embed.text_embedder.linear_2": OriginalRef("y_embedder.mlp.2"),
    "context_embedder": OriginalRef("context_embedder"),
    "norm_out.linear": OriginalRef("final_layer.adaLN_modulation.1", transform=SWAP_HALVES),
    "proj_out": OriginalRef("final_layer.linear"),
}
_FLUX_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_SD3_BLOCK_RE = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def _fused(prefix: str, family: str, part: str, table: Table, out_prefix: str) -> OriginalRef | None:
    """The row slice of a fused original weight that holds diffusers module ``prefix + part``, or None."""
    for original, members in _GROUPS[family]:
        if part in members:
            start = sum(table[prefix + m][0] for m in members[: members.index(part)])
            stop = start + table[prefix + part][0]
            return OriginalRef(out_prefix + original, rows=(start, stop))
    return None


def _plain(parts: dict[str, object], part: str, out_prefix: str) -> OriginalRef:
    target = parts[part]
    if isinstance(target, tuple):
        return OriginalRef(out_prefix + target[0], param=target[1])
    return OriginalRef(out_prefix + str(target))


def flux_to_original(module: str, table: Table) -> OriginalRef:
    """The BFL name for a diffusers ``FluxTransformer2DModel`` module (relative to the checkpoint root).

    Raises:
        KeyError: the name is not a FLUX module this map knows.
    """
    if module in _FLUX_TOP:
        return _FLUX_TOP[module]
    m = _FLUX_BLOCK.fullmatch(module)
    if m is None:
        raise KeyError(module)
    double = m.group(1) == "transformer_blocks"
    prefix = f"{m.group(1)}.{m.group(2)}."
    out_prefix = f"{'double_blocks' if double else 'single_blocks'}.{m.group(2)}."
    family = "flux.double" if double else "flux.single"
    fused = _fused(prefix, family, m.group(3), table, out_prefix)
    return fused or _plain(_FLUX_DOUBLE if double else _FLUX_SINGLE, m.group(3), out_prefix)


def sd3_to_original(module: str, table: Table) -> OriginalRef:
    """The Stability (MMDiT) name for a diffusers ``SD3Transformer2DModel`` module (relative to the checkpoint root).

    Raises:
        KeyError: the name is not an SD3 module this map knows.
    """
    if module in _SD3_TOP:
        return _SD3_TOP[module]
    m = _SD3_BLOCK_RE.fullmatch(module)
    if m is None:
        raise KeyError(module)
    prefix, part = f"transformer_blocks.{m.group(1)}.", m.group(2)
    out_prefix = f"joint_blocks.{m.group(1)}."
    fused = _fused(prefix, "sd3", part, table, out_prefix)
    if fused is not None:
        return fused
    ref = _plain(_SD3_BLOCK, part, out_prefix)
    # The last block only updates the image stream: its context norm is a 2 x dim AdaLayerNormContinuous stored
    # [shift; scale] like the final norm, where the other blocks carry a 6 x dim AdaLayerNormZero in matching order.
    shape = table[module]
    if part == "norm1_context.linear" and shape[0] == 2 * shape[1]:
        return ref._replace(transform=SWAP_HALVES)
    return ref
