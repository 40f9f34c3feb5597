"""kohya / A1111 (``lora_unet_...``, ``lora_te1_...``) and standalone LyCORIS (``lycoris_...``) keys.

The module part is the module path with every ``.`` replaced by ``_`` after a component prefix. SD 1/2 files use
diffusers UNet names; SDXL files use the original LDM names; FLUX and SD3 files use the original BFL / Stability names
with q, k and v fused (``lora_unet_double_blocks_0_img_attn_qkv``). Text encoders use transformers 4 names
(``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). Any LyCORIS kind may sit under these names.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from lorakit.formats.canonical import LoraFile
from lorakit.formats.dialects.context import DENOISERS, KOHYA_PREFIXES, ModelInfo
from lorakit.formats.dialects.grouped import ReadOutcome, read_grouped, write_grouped
from lorakit.formats.dialects.names import flat

__all__ = ["LYCORIS_PREFIX", "claims_kohya", "claims_lycoris", "read_kohya", "read_lycoris", "write_kohya"]

LYCORIS_PREFIX = "lycoris_"
"""LyCORIS's own wrapper names modules ``lycoris_<path>`` relative to the model it wrapped (the denoiser)."""


def claims_kohya(key: str) -> bool:
    """Whether a key is kohya's (``lora_unet_`` / ``lora_te*_`` prefix)."""
    return key.startswith(KOHYA_PREFIXES)


def claims_lycoris(key: str) -> bool:
    """Whether a key is standalone LyCORIS's (``lycoris_`` prefix)."""
    return key.startswith(LYCORIS_PREFIX)


def read_kohya(tensors: Mapping[str, Tensor], info: ModelInfo) -> ReadOutcome:
    """Read kohya keys into patches (see ``grouped.read_grouped``)."""

    def locate(module_key: str) -> tuple[str, str] | None:
        for prefix in KOHYA_PREFIXES:
            if module_key.startswith(prefix):
                component = info.kohya_component(prefix)
                return None if component is None else (component, module_key[len(prefix) :])
        return None

    return read_grouped(tensors, info, locate, flat_names=True)


def read_lycoris(tensors: Mapping[str, Tensor], info: ModelInfo) -> ReadOutcome:
    """Read ``lycoris_`` keys, placed on the denoiser (``unet`` or ``transformer``)."""

    def locate(module_key: str) -> tuple[str, str] | None:
        return info.denoiser(), module_key[len(LYCORIS_PREFIX) :]

    return read_grouped(tensors, info, locate, flat_names=True)


def write_kohya(lora: LoraFile, info: ModelInfo) -> dict[str, Tensor]:
    """kohya tensors: SD 1/2 in diffusers names, SDXL in LDM names, FLUX / SD3 in original fused names.

    Every module gets an ``alpha`` tensor, so the strength never depends on a reader's default.
    """
    components = set(lora.components())

    def key_of(component: str, name: str) -> str:
        return info.kohya_prefix(component, components) + flat(name)

    def write_foreign(component: str) -> bool:
        # kohya trains SD 1/2 on the diffusers UNet but SDXL on its own LDM UNet, FLUX / SD3 on the originals.
        return component == "transformer" or (component in DENOISERS and info.arch == "sdxl")

    return write_grouped(lora, info, key_of, write_foreign)
