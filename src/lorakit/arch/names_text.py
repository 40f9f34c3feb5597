"""Text encoders: transformers module names -> names inside original checkpoints.

Two storage styles exist:

- ``hf``: the checkpoint stores the transformers (4) state dict under a prefix, so names are unchanged. SD1's CLIP-L
  (``cond_stage_model.transformer.``), SDXL's first encoder (``conditioner.embedders.0.transformer.``) and all of
  SD3's and FLUX's encoders in ComfyUI-style files (``text_encoders.clip_l.transformer.`` ...).
- ``openclip``: the OpenCLIP module tree (SD2 under ``cond_stage_model.model.``, SDXL's bigG under
  ``conditioner.embedders.1.model.``). Its attention keeps q, k and v fused in ``attn.in_proj_weight`` (rows
  ``[0:h]``, ``[h:2h]``, ``[2h:3h]``), its position embedding and text projection are bare parameters, and the
  projection is stored transposed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lorakit.arch.refs import TRANSPOSE, OriginalRef

__all__ = ["openclip_to_original", "text_to_original"]

_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_TOP = {
    "text_model.embeddings.token_embedding": OriginalRef("token_embedding"),
    "text_model.embeddings.position_embedding": OriginalRef("positional_embedding", param=""),
    "text_model.final_layer_norm": OriginalRef("ln_final"),
    "text_projection": OriginalRef("text_projection", param="", transform=TRANSPOSE),
}


def openclip_to_original(module: str, table: Mapping[str, tuple[int, ...]]) -> OriginalRef:
    """The OpenCLIP name of a transformers CLIP text-model module (relative to ``...model.``).

    Args:
        module: a table name, e.g. ``text_model.encoder.layers.3.self_attn.k_proj``.
        table: the encoder's module table (the hidden size gives the ``in_proj`` row slices).

    Raises:
        KeyError: the name is not a CLIP text-model module.
    """
    if module in _TOP:
        return _TOP[module]
    m = _LAYER.fullmatch(module)
    if m is None:
        raise KeyError(module)
    layer, part = m.group(1), m.group(2)
    base = f"transformer.resblocks.{layer}."
    if part in _QKV:
        hidden = table[module][0]
        slot = _QKV.index(part)
        return OriginalRef(base + "attn.in_proj", param="_weight", rows=(slot * hidden, (slot + 1) * hidden))
    return OriginalRef(base + _LAYER_PARTS[part])


def text_to_original(module: str, table: Mapping[str, tuple[int, ...]]) -> OriginalRef:
    """The name in an ``hf``-style checkpoint: the table name itself.

    Raises:
        KeyError: the module is not in the table.
    """
    if module not in table:
        raise KeyError(module)
    return OriginalRef(module)
