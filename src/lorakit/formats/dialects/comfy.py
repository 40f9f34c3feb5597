"""ComfyUI's generic LoRA keys: ``diffusion_model.<original name>.<suffix>`` and ``text_encoders.<enc>.transformer.``.

The denoiser is spelled in its original checkpoint's names (LDM for every UNet, BFL for FLUX, Stability for SD3), text
encoders in transformers 4 names under ComfyUI's encoder slot (``clip_l``, ``clip_g``, ``clip_h``, ``t5xxl``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from lorakit.errors import AdapterError
from lorakit.formats.canonical import LoraFile
from lorakit.formats.dialects.context import DENOISERS, ModelInfo
from lorakit.formats.dialects.grouped import ReadOutcome, read_grouped, write_grouped

__all__ = ["claims_comfy", "read_comfy", "write_comfy"]

DIFFUSION_PREFIX = "diffusion_model."
TEXT_PREFIX = "text_encoders."

# ComfyUI encoder slot -> diffusers component. Reading accepts every slot whatever the architecture (only FLUX's
# T5 differs); writing picks the slot of the architecture's encoder.
_SLOTS = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
_SLOTS_FLUX = {**_SLOTS, "t5xxl": "text_encoder_2"}
_WRITE: dict[str | None, dict[str, str]] = {
    None: {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
    "sd2": {"text_encoder": "clip_h"},
    "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}


def claims_comfy(key: str) -> bool:
    """Whether a key is ComfyUI's generic form."""
    return key.startswith((DIFFUSION_PREFIX, TEXT_PREFIX))


def read_comfy(tensors: Mapping[str, Tensor], info: ModelInfo) -> ReadOutcome:
    """Read ComfyUI keys into patches."""
    slots = _SLOTS_FLUX if info.arch == "flux" else _SLOTS

    def locate(module_key: str) -> tuple[str, str] | None:
        if module_key.startswith(DIFFUSION_PREFIX):
            return info.denoiser(), module_key[len(DIFFUSION_PREFIX) :]
        slot, _, rest = module_key[len(TEXT_PREFIX) :].partition(".")
        rest = rest.removeprefix("transformer.")
        component = slots.get(slot)
        return None if component is None else (component, rest)

    return read_grouped(tensors, info, locate, flat_names=False)


def write_comfy(lora: LoraFile, info: ModelInfo) -> dict[str, Tensor]:
    """ComfyUI tensors: the denoiser in original names (q/k/v fused where the original fuses them)."""
    slots = _WRITE.get(info.arch, _WRITE[None])

    def key_of(component: str, name: str) -> str:
        if component in DENOISERS:
            return DIFFUSION_PREFIX + name
        if component not in slots:
            raise AdapterError(f"{info.arch} has no {component}, so ComfyUI has no slot for it; pass the right arch=")
        return f"{TEXT_PREFIX}{slots[component]}.transformer.{name}"

    return write_grouped(lora, info, key_of, lambda component: component in DENOISERS)
