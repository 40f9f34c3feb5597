"""An analytic detector for the procedural shapes: what shape, which colour, on which background.

No training and no weights: the background is the median of the border pixels, the shape is the largest connected
region that differs from it by more than half the region's own contrast, its colour is the nearest named colour to
the region's median, and its kind is the template (circle, square, triangle, cross; see
:func:`lorakit.demo.shapes.shape_coverage`) that, stretched over the region's bounding box, overlaps the region best
(intersection over union). The same geometry draws the images, so on ground-truth renders the detector is exact; on
generated images it measures whether the model drew the prompted thing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lorakit.demo.shapes import BACKGROUNDS, COLOURS, CONCEPT_SHAPE, SHAPES, STYLE_BACKGROUND, STYLE_NAME, ShapeSpec
from lorakit.demo.shapes import shape_coverage as _coverage

__all__ = ["Detection", "SpecScore", "concept_score", "detect", "score_specs", "style_score"]

FOREGROUND_DIFF = 0.25
"""A pixel belongs to the shape when a channel differs from the background by more than this (RGB in [0, 1])."""
MIN_PIXELS = 6
"""Smaller regions count as no shape at all."""
_TEMPLATES = (*SHAPES, CONCEPT_SHAPE)


@dataclass
class Detection:
    """What :func:`detect` saw in one image."""

    shape: str | None
    """Best-fitting template, or None when no region of at least :data:`MIN_PIXELS` pixels stands out."""
    colour: str | None
    """Nearest name in :data:`lorakit.demo.shapes.COLOURS` to the region's median colour."""
    background: str
    """Nearest of the pretraining backgrounds and the style palette's background."""
    pixels: int
    """Size of the detected region."""
    ious: dict[str, float] = field(default_factory=dict)
    """Overlap of the region with each template over its bounding box."""


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean ``[H, W]`` mask (breadth-first; images are 32 x 32)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _template_ious(region: np.ndarray) -> dict[str, float]:
    """IoU of ``region`` with each template stretched over the region's bounding box (4x4 samples per pixel)."""
    ys, xs = np.nonzero(region)
    top, left = ys.min(), xs.min()
    height, width = ys.max() - top + 1, xs.max() - left + 1
    h, w = region.shape
    sub = (np.arange(4) + 0.5) / 4
    py = ((np.arange(h)[:, None] + sub[None, :]).reshape(-1) - top) / height
    px = ((np.arange(w)[:, None] + sub[None, :]).reshape(-1) - left) / width
    v, u = np.meshgrid(py, px, indexing="ij")
    ious = {}
    for name in _TEMPLATES:
        cover = _coverage(name, u, v).reshape(h, 4, w, 4).mean(axis=(1, 3)) > 0.5
        union = np.logical_or(cover, region).sum()
        ious[name] = float(np.logical_and(cover, region).sum() / union) if union else 0.0
    return ious


def _nearest(rgb: np.ndarray, table: dict[str, tuple[float, float, float]]) -> str:
    return min(table, key=lambda name: float(np.sum((rgb - np.asarray(table[name])) ** 2)))


def detect(image: np.ndarray) -> Detection:
    """Detect the shape in one image.

    Args:
        image: ``[H, W, 3]`` RGB in [0, 1] (float) or [0, 255] (uint8).

    Returns:
        A :class:`Detection`.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {img.shape}")
    if np.asarray(image).dtype == np.uint8:
        img = img / 255.0
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    background = _nearest(bg, {**BACKGROUNDS, STYLE_NAME: STYLE_BACKGROUND})
    diff = np.abs(img - bg).max(axis=-1)
    region = _largest_region(diff > FOREGROUND_DIFF)
    if region.any():
        # Half the shape's own contrast, like the renderer's coverage > 0.5: blur then widens no shape's outline.
        half = 0.5 * np.percentile(diff[region], 90)
        if half > FOREGROUND_DIFF:
            region = _largest_region(diff > half)
    pixels = int(region.sum())
    if pixels < MIN_PIXELS:
        return Detection(None, None, background, pixels)
    core = region & (diff > 2 * FOREGROUND_DIFF)  # skip anti-aliased edge pixels, which mix in the background
    colour = _nearest(np.median(img[core if core.sum() >= 3 else region], axis=0), COLOURS)
    ious = _template_ious(region)
    return Detection(max(ious, key=ious.get), colour, background, pixels, ious)


@dataclass
class SpecScore:
    """How often images show what their specs asked for."""

    count: int
    shape: float
    """Fraction with the right shape."""
    colour: float
    """Fraction with the right colour."""
    both: float
    """Fraction with the right shape and colour: the headline score."""
    background: float
    """Fraction with the right background."""
    misses: list[tuple[ShapeSpec, Detection]] = field(default_factory=list)
    """The images that were wrong in shape or colour, with what was seen."""


def score_specs(images: Sequence[np.ndarray], specs: Sequence[ShapeSpec]) -> SpecScore:
    """Score images against the specs they were drawn or generated from."""
    if len(images) != len(specs) or not specs:
        raise ValueError(f"need one spec per image, got {len(images)} images and {len(specs)} specs")
    shape = colour = both = background = 0
    misses = []
    for image, spec in zip(images, specs):
        d = detect(image)
        shape += d.shape == spec.shape
        colour += d.colour == spec.colour
        background += d.background == spec.background
        ok = d.shape == spec.shape and d.colour == spec.colour
        both += ok
        if not ok:
            misses.append((spec, d))
    n = len(specs)
    return SpecScore(n, shape / n, colour / n, both / n, background / n, misses)


def concept_score(images: Sequence[np.ndarray]) -> float:
    """Fraction of images in which the concept shape (the thick cross) is detected."""
    return sum(detect(im).shape == CONCEPT_SHAPE for im in images) / max(1, len(images))


def style_score(images: Sequence[np.ndarray]) -> float:
    """Fraction of images whose background is the style palette's."""
    return sum(detect(im).background == STYLE_NAME for im in images) / max(1, len(images))
