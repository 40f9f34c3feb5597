"""The demo's training data: what the two LoRAs learn, written as kohya folders of PNG images and .txt captions.

- the concept: large thick crosses (absent from pretraining) in every colour, position and background, captioned
  with the trigger word in place of the shape's name: ``"a large red zkx on the left, gray background"``;
- the style: the pretraining shapes on the teal palette (absent from pretraining), captioned with a style phrase in
  place of the background: ``"a small blue circle at the top, in qvz style"``;
- regularization (prior preservation) images: what the base model itself draws for ordinary prompts, with those
  prompts, so that prompts without a trigger keep their meaning (``is_reg`` folders of ``lorakit train``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lorakit.demo import shapes
from lorakit.demo.evaluate import generate_images

__all__ = [
    "STYLE_PHRASE",
    "TRIGGER",
    "concept_caption",
    "concept_specs",
    "style_caption",
    "style_specs",
    "write_folder",
    "write_reg_folder",
    "write_spec_folder",
]

TRIGGER = "zkx"
"""The concept's trigger word (a made-up word: the base model's tokenizer has no meaning for it)."""
STYLE_PHRASE = "in qvz style"
"""The style's trigger phrase; it takes the place of the background phrase."""


def concept_specs(count: int, seed: int) -> list[shapes.ShapeSpec]:
    """``count`` large thick crosses (small ones do not survive the tiny VAE's 4x downsampling)."""
    specs = shapes.sample_specs(count, seed, shapes=(shapes.CONCEPT_SHAPE,))
    return [dataclasses.replace(s, size="large") for s in specs]


def style_specs(count: int, seed: int) -> list[shapes.ShapeSpec]:
    """``count`` pretraining shapes on the style palette's background."""
    return shapes.sample_specs(count, seed, style=True)


def concept_caption(spec: shapes.ShapeSpec, *, style: bool = False) -> str:
    """The concept's caption: the trigger word names the shape (with ``style``, the style phrase too)."""
    return shapes.caption_for(spec, shape_word=TRIGGER, style_phrase=STYLE_PHRASE if style else None)


def style_caption(spec: shapes.ShapeSpec) -> str:
    """The style's caption: the style phrase replaces the background."""
    return shapes.caption_for(spec, style_phrase=STYLE_PHRASE)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` floats in [0, 1] -> uint8."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_folder(folder: Path, images: Sequence[np.ndarray], captions: Sequence[str]) -> Path:
    """Write ``000.png`` + ``000.txt``, ... into ``folder`` (created; a kohya ``N_name`` folder).

    Args:
        folder: the image folder.
        images: ``[H, W, 3]`` float arrays in [0, 1].
        captions: one caption per image.

    Returns:
        ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(images) - 1)))
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        stem = folder / f"{i:0{width}d}"
        Image.fromarray(_to_uint8(image)).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def write_spec_folder(
    folder: Path, specs: Sequence[shapes.ShapeSpec], caption: Callable[[shapes.ShapeSpec], str]
) -> Path:
    """Render ``specs`` exactly (see :func:`lorakit.demo.shapes.render`) and write them with their captions."""
    return write_folder(folder, [shapes.render(s) for s in specs], [caption(s) for s in specs])


def write_reg_folder(
    folder: Path,
    pipe: Any,
    count: int,
    seed: int,
    *,
    steps: int = 20,
    guidance: float = 4.0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Regularization images: the base model's own images for ``count`` ordinary prompts, with those prompts.

    Images sampled from the base model (not procedural renders) are what prior preservation needs: the LoRA is
    trained to give the base model's own answer to prompts without the trigger, so its change to them is pushed
    towards zero. Renders would teach the ground truth instead and move those prompts wherever the base model
    falls short of it.
    """
    specs = shapes.sample_specs(count, seed)
    prompts = [shapes.caption_for(s) for s in specs]
    images = generate_images(pipe, prompts, seed=seed, steps=steps, guidance=guidance, batch=32, progress=progress)
    return write_folder(folder, images, prompts)
