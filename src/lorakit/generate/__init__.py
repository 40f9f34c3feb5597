"""Run pipelines with LoRAs applied: the apply API, prompt syntax ``<lora:name:w>``, infotext, ``generate_image``.

Importing this package does not import diffusers; the functions that need it import it.
"""

from __future__ import annotations

from lorakit.generate.apply import ApplyReport, LoraHandle, apply_lora, lora_components
from lorakit.generate.infotext import Infotext, format_infotext, parse_infotext, read_png_infotext, write_png
from lorakit.generate.prompt import LoraRef, format_lora_tag, parse_prompt, resolve_lora
from lorakit.generate.run import GenerateConfig, GenerateResult, LoraUse, generate_image, parse_lora_option

__all__ = [
    "ApplyReport",
    "GenerateConfig",
    "GenerateResult",
    "Infotext",
    "LoraHandle",
    "LoraRef",
    "LoraUse",
    "apply_lora",
    "format_infotext",
    "format_lora_tag",
    "generate_image",
    "lora_components",
    "parse_infotext",
    "parse_lora_option",
    "parse_prompt",
    "read_png_infotext",
    "resolve_lora",
    "write_png",
]
