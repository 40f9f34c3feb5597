"""The embedded tiny base model: a Stable Diffusion-layout pipeline shipped inside lorakit, loaded offline.

It draws 32 x 32 images of coloured shapes (circle, square, triangle in red, green, blue or yellow, small or large,
centred or to one side, on black, gray or white) from prompts such as ``"a large red circle on the left, black
background"``. Components: AutoencoderKL (4 x 8 x 8 latents), UNet2DConditionModel (cross-attention dim 64), a
2-layer CLIP text encoder and a CLIP tokenizer whose vocabulary was learnt from the captions, a DDIM scheduler.
``scripts/pretrain_tiny.py`` regenerates the weights from a seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorakit.errors import InputError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["EMBEDDED_COMPONENTS", "embedded_model_path", "load_embedded_pipeline"]

EMBEDDED_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")
"""Component folders of the shipped diffusers folder."""


def embedded_model_path() -> Path:
    """The shipped diffusers folder inside the installed package."""
    return Path(__file__).resolve().parent / "tiny_sd"


def load_embedded_pipeline(dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load the embedded tiny base model, offline.

    Args:
        dtype: dtype of the returned pipeline (the weights are stored in fp16 and cast on load).

    Returns:
        A ``StableDiffusionPipeline`` on the CPU with no safety checker; generate at ``height=width=32``.

    Raises:
        InputError: the shipped folder is missing a component (a broken install).
    """
    folder = embedded_model_path()
    missing = [c for c in EMBEDDED_COMPONENTS if not (folder / c).is_dir()]
    if missing or not (folder / "model_index.json").is_file():
        raise InputError(
            f"{folder}: the embedded model is incomplete (missing {', '.join(missing) or 'model_index.json'}); "
            "reinstall lorakit or run scripts/pretrain_tiny.py to write it"
        )
    from diffusers import StableDiffusionPipeline  # lazy: keeps `import lorakit` light

    return StableDiffusionPipeline.from_pretrained(
        folder,
        dtype=dtype,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
