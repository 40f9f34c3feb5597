"""Generate images for procedural prompts with a pipeline and score them with the checker.

The held-out prompts are drawn with :data:`HELDOUT_SEED`, a seed the pretraining script never uses, from the same
caption grammar as the pretraining set (full captions: size, colour, shape, position, background).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lorakit.demo.checker import SpecScore, score_specs
from lorakit.demo.shapes import IMAGE_SIZE, ShapeSpec, caption_for, sample_specs

__all__ = ["HELDOUT_SEED", "generate_images", "heldout_specs", "score_pipeline"]

HELDOUT_SEED = 20261129
"""Seed of the held-out prompts (pretraining draws its images from seeds 0 and 1)."""


def heldout_specs(count: int, seed: int = HELDOUT_SEED) -> list[ShapeSpec]:
    """``count`` specs of the pretraining distribution drawn with the held-out seed."""
    return sample_specs(count, seed)


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    batch: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """Generate one 32 x 32 image per prompt, deterministically.

    Args:
        pipe: a StableDiffusionPipeline (e.g. the embedded model); its progress bar is switched off.
        prompts: one prompt per image.
        seed: image ``i`` of batch ``k`` uses the generator seeded with ``seed + k``.
        steps: sampling steps of the pipeline's scheduler.
        guidance: classifier-free guidance scale.
        batch: prompts per pipeline call.
        progress: called with (images done, total) after each batch.

    Returns:
        ``[H, W, 3]`` float arrays in [0, 1].
    """
    pipe.set_progress_bar_config(disable=True)
    images: list[np.ndarray] = []
    for k, start in enumerate(range(0, len(prompts), batch)):
        chunk = list(prompts[start : start + batch])
        out = pipe(
            chunk,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed + k),
            output_type="np",
        )
        images.extend(np.asarray(im, dtype=np.float32) for im in out.images)
        if progress is not None:
            progress(len(images), len(prompts))
    return images


def score_pipeline(
    pipe: Any, count: int = 64, *, seed: int = HELDOUT_SEED, steps: int = 20, guidance: float = 4.0, batch: int = 32
) -> tuple[SpecScore, list[np.ndarray]]:
    """Score a pipeline on ``count`` held-out prompts: does each image show the prompted shape and colour?

    Returns:
        The score and the generated images.
    """
    specs = heldout_specs(count, seed)
    images = generate_images(
        pipe, [caption_for(s) for s in specs], seed=seed, steps=steps, guidance=guidance, batch=batch
    )
    return score_specs(images, specs), images
