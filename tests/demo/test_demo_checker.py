"""The checker's accuracy on ground truth: the project's renders and, as an independent oracle, PIL drawings."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lorakit.demo import checker, shapes

ALL_SHAPES = (*shapes.SHAPES, shapes.CONCEPT_SHAPE)


def test_exact_on_procedural_renders():
    specs = shapes.sample_specs(160, 5, shapes=ALL_SHAPES)
    score = checker.score_specs([shapes.render(s) for s in specs], specs)
    assert (score.shape, score.colour, score.both, score.background) == (1.0, 1.0, 1.0, 1.0)


def test_robust_to_pixel_noise():
    specs = shapes.sample_specs(120, 6, shapes=ALL_SHAPES)
    rng = np.random.default_rng(0)
    noisy = [np.clip(shapes.render(s) + rng.normal(0, 0.04, (32, 32, 3)), 0, 1) for s in specs]
    assert checker.score_specs(noisy, specs).both >= 0.97


def _pil_draw(shape: str, colour: str, background: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """The same scene drawn by PIL's own primitives (ellipse, rectangle, polygon), not by the project's geometry."""
    to255 = lambda rgb: tuple(round(c * 255) for c in rgb)  # noqa: E731
    img = Image.new("RGB", (32, 32), to255(shapes.BACKGROUNDS[background]))
    draw = ImageDraw.Draw(img)
    fill = to255(shapes.COLOURS[colour])
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        w, h = x1 - x0, y1 - y0
        draw.rectangle((x0 + w / 3, y0, x1 - w / 3, y1), fill=fill)
        draw.rectangle((x0, y0 + h / 3, x1, y1 - h / 3), fill=fill)
    return np.asarray(img)


def test_independent_pil_drawings():
    rng = random.Random(7)
    total = right = 0
    for _ in range(120):
        shape, colour = rng.choice(ALL_SHAPES), rng.choice(sorted(shapes.COLOURS))
        extent = rng.randint(12, 22)
        x0, y0 = rng.randint(2, 30 - extent), rng.randint(2, 30 - extent)
        image = _pil_draw(shape, colour, rng.choice(sorted(shapes.BACKGROUNDS)), (x0, y0, x0 + extent, y0 + extent))
        found = checker.detect(image)
        total += 1
        right += found.shape == shape and found.colour == colour
    assert right / total >= 0.95


def test_concept_and_style_scores():
    cross = [shapes.render(s) for s in shapes.sample_specs(20, 8, shapes=(shapes.CONCEPT_SHAPE,))]
    plain = [shapes.render(s) for s in shapes.sample_specs(20, 8)]
    styled = [shapes.render(s) for s in shapes.sample_specs(20, 8, style=True)]
    assert checker.concept_score(cross) == 1.0 and checker.concept_score(plain) == 0.0
    assert checker.style_score(styled) == 1.0 and checker.style_score(plain) == 0.0


def test_empty_image_has_no_shape():
    found = checker.detect(np.full((32, 32, 3), 0.5, dtype=np.float32))
    assert found.shape is None and found.colour is None and found.background == "gray"


def test_uint8_input_and_bad_shape():
    spec = shapes.ShapeSpec("triangle", "green", background="white")
    as_uint8 = (shapes.render(spec) * 255).round().astype(np.uint8)
    assert checker.detect(as_uint8).shape == "triangle"
    with pytest.raises(ValueError, match="one spec per image"):
        checker.score_specs([as_uint8], [])
