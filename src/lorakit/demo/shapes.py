"""A procedural image set with captions: coloured shapes on plain backgrounds, drawn exactly and reproducibly.

Every image comes from a :class:`ShapeSpec` (shape, colour, size, position, background, optional style) and every
spec from ``(seed, index)``, so the same seed always gives the same images and captions. The pretraining set of the
embedded base model uses :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`, :data:`POSITIONS` and :data:`BACKGROUNDS`;
the thick cross (:data:`CONCEPT_SHAPE`) and the teal palette (:data:`STYLE_BACKGROUND`) are kept out of it so that a
LoRA has something new to teach.

Geometry is defined once in :func:`shape_coverage` over a shape's own box (u, v in [0, 1], v pointing down) and
shared by the renderer and the checker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "CONCEPT_SHAPE",
    "IMAGE_SIZE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "STYLE_BACKGROUND",
    "STYLE_NAME",
    "ShapeSpec",
    "caption_for",
    "render",
    "render_batch",
    "sample_spec",
    "sample_specs",
    "shape_coverage",
]

IMAGE_SIZE = 32
"""Side of every image in pixels."""
SHAPES = ("circle", "square", "triangle")
"""Shapes of the pretraining set."""
CONCEPT_SHAPE = "cross"
"""A thick plus sign: absent from pretraining, the demo's new concept (it survives the VAE's 4x downsampling)."""
COLOURS = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.92),
    "yellow": (0.95, 0.85, 0.10),
}
"""Shape colours, RGB in [0, 1]."""
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.50, 0.50, 0.50), "white": (0.95, 0.95, 0.95)}
"""Background colours of the pretraining set."""
STYLE_NAME = "teal"
"""The demo's style: a palette whose background is teal, never seen in pretraining."""
STYLE_BACKGROUND = (0.02, 0.42, 0.45)
"""Background colour of the style palette."""
SIZES = {"small": 14, "large": 22}
"""Extent of a shape's box in pixels."""
POSITIONS = ("center", "left", "right", "top", "bottom")
"""Where the shape's box sits."""
_POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_MARGIN = 2
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows."""

    shape: str
    """One of :data:`SHAPES` or :data:`CONCEPT_SHAPE`."""
    colour: str
    """A key of :data:`COLOURS`."""
    size: str = "large"
    """A key of :data:`SIZES`."""
    position: str = "center"
    """One of :data:`POSITIONS`."""
    background: str = "black"
    """A key of :data:`BACKGROUNDS`, or :data:`STYLE_NAME` for the style palette."""
    jitter: tuple[int, int, int] = (0, 0, 0)
    """Small offsets in pixels (dx, dy, d_extent) that make images of the same caption differ."""

    def __post_init__(self) -> None:
        if self.shape not in (*SHAPES, CONCEPT_SHAPE):
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.size not in SIZES or self.position not in POSITIONS:
            raise ValueError(f"unknown size or position {self.size!r}, {self.position!r}")
        if self.background not in BACKGROUNDS and self.background != STYLE_NAME:
            raise ValueError(f"unknown background {self.background!r}")

    def box(self) -> tuple[float, float, float]:
        """The shape's box as (left, top, extent) in pixels."""
        extent = SIZES[self.size] + self.jitter[2]
        free = (IMAGE_SIZE - extent) / 2 - _MARGIN
        dx, dy = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[self.position]
        left = (IMAGE_SIZE - extent) / 2 + dx * free + self.jitter[0]
        top = (IMAGE_SIZE - extent) / 2 + dy * free + self.jitter[1]
        return left, top, float(extent)

    def background_rgb(self) -> tuple[float, float, float]:
        return STYLE_BACKGROUND if self.background == STYLE_NAME else BACKGROUNDS[self.background]


def shape_coverage(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points of a shape's box lie inside the shape.

    Args:
        shape: a name from :data:`SHAPES` or :data:`CONCEPT_SHAPE`.
        u, v: coordinates inside the box, ``[0, 1]`` left to right and top to bottom (any equal shapes).

    Returns:
        A boolean array of the same shape; points outside ``[0, 1]^2`` are outside every shape.
    """
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return inside & ((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25)
    if shape == "square":
        return inside
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return inside & (np.abs(u - 0.5) <= v / 2)
    if shape == CONCEPT_SHAPE:  # arms one third of the extent wide
        return inside & ((np.abs(u - 0.5) <= 1 / 6) | (np.abs(v - 0.5) <= 1 / 6))
    raise ValueError(f"unknown shape {shape!r}")


def _alpha(spec: ShapeSpec) -> np.ndarray:
    """Anti-aliased coverage ``[H, W]`` in [0, 1], from a 4x supersampled grid."""
    n = IMAGE_SIZE * _SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / _SUPERSAMPLE
    left, top, extent = spec.box()
    u = (grid[None, :] - left) / extent
    v = (grid[:, None] - top) / extent
    hit = shape_coverage(spec.shape, np.broadcast_to(u, (n, n)), np.broadcast_to(v, (n, n)))
    return hit.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: ShapeSpec) -> np.ndarray:
    """Draw one image: float32 ``[H, W, 3]`` in [0, 1] (H = W = :data:`IMAGE_SIZE`).

    ``pixel = background * (1 - alpha) + colour * alpha`` with alpha the anti-aliased coverage.
    """
    alpha = _alpha(spec)[..., None]
    bg = np.asarray(spec.background_rgb(), dtype=np.float64)
    fg = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    return (bg * (1 - alpha) + fg * alpha).astype(np.float32)


def render_batch(specs: list[ShapeSpec]) -> np.ndarray:
    """Draw several images: float32 ``[N, 3, H, W]`` in [-1, 1], the layout a VAE takes."""
    out = np.stack([render(s) for s in specs]).transpose(0, 3, 1, 2)
    return out * 2 - 1


def sample_spec(rng: random.Random, *, shapes: tuple[str, ...] = SHAPES, style: bool = False) -> ShapeSpec:
    """Draw one spec of the pretraining distribution (or with the style palette's background)."""
    background = STYLE_NAME if style else rng.choice(sorted(BACKGROUNDS))
    jitter = (rng.randint(-1, 1), rng.randint(-1, 1), rng.randint(-1, 1))
    return ShapeSpec(
        shape=rng.choice(shapes),
        colour=rng.choice(sorted(COLOURS)),
        size=rng.choice(sorted(SIZES)),
        position=rng.choice(POSITIONS),
        background=background,
        jitter=jitter,
    )


def sample_specs(count: int, seed: int, **kwargs) -> list[ShapeSpec]:
    """``count`` specs, the same for the same seed (keyword arguments go to :func:`sample_spec`)."""
    rng = random.Random(seed)
    return [sample_spec(rng, **kwargs) for _ in range(count)]


def caption_for(
    spec: ShapeSpec,
    rng: random.Random | None = None,
    *,
    keep: float = 1.0,
    shape_word: str | None = None,
    style_phrase: str | None = None,
) -> str:
    """A caption such as ``"a large red circle on the left, black background"``.

    Args:
        spec: the image's spec.
        rng: with ``keep < 1``, each optional phrase (size, position, background) is kept with probability ``keep``,
            so short prompts like ``"a red circle"`` stay in the training distribution.
        keep: probability of keeping each optional phrase.
        shape_word: the word for the shape (a trigger word for the concept); default the shape's name.
        style_phrase: replaces the background phrase (a trigger for the style), e.g. ``"in tlstyle"``.
    """

    def kept() -> bool:
        return rng is None or keep >= 1 or rng.random() < keep

    words = ["a"]
    if kept():
        words.append(spec.size)
    words += [spec.colour, shape_word or spec.shape]
    text = " ".join(words)
    if kept():
        text += " " + _POSITION_PHRASES[spec.position]
    if style_phrase is not None:
        text += ", " + style_phrase
    elif kept():
        text += f", {spec.background} background"
    return text
