"""The engine: adapter kinds and their delta math, adapter layers, attaching adapters to any nn.Module.

Tensors only: this package imports torch and nothing heavier.
"""

from lorakit.core.config import LoraConfig
from lorakit.core.model import (
    AdapterHandle,
    adapter_patches,
    adapter_state_dict,
    adapters,
    adapters_disabled,
    attach_lora,
    attach_patches,
    detach,
    fuse,
    load_adapter_state_dict,
    unfuse,
)
from lorakit.core.patches import (
    DoraMagnitude,
    FullPatch,
    Ia3Patch,
    LohaPatch,
    LokrPatch,
    LoraPatch,
    Patch,
    apply_patches,
)

__all__ = [
    "AdapterHandle",
    "DoraMagnitude",
    "FullPatch",
    "Ia3Patch",
    "LohaPatch",
    "LokrPatch",
    "LoraConfig",
    "LoraPatch",
    "Patch",
    "adapter_patches",
    "adapter_state_dict",
    "adapters",
    "adapters_disabled",
    "apply_patches",
    "attach_lora",
    "attach_patches",
    "detach",
    "fuse",
    "load_adapter_state_dict",
    "unfuse",
]
