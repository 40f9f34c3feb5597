"""The procedural image set: deterministic by seed, exact geometry, captions from the grammar."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lorakit.demo import shapes


def test_same_seed_same_specs_and_images():
    a, b = shapes.sample_specs(20, 3), shapes.sample_specs(20, 3)
    assert a == b
    assert a != shapes.sample_specs(20, 4)
    np.testing.assert_array_equal(shapes.render_batch(a), shapes.render_batch(b))


def test_render_range_and_colours():
    spec = shapes.ShapeSpec("square", "red", "large", "center", "gray")
    img = shapes.render(spec)
    assert img.shape == (32, 32, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img[16, 16], shapes.COLOURS["red"], atol=1e-6)
    np.testing.assert_allclose(img[0, 0], shapes.BACKGROUNDS["gray"], atol=1e-6)
    batch = shapes.render_batch([spec])
    assert batch.shape == (1, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1


def test_coverage_area_matches_geometry():
    # Area of each shape over its unit box, from a fine grid: pi/4, 1, 1/2, 5/9 (arms one third wide).
    g = (np.arange(400) + 0.5) / 400
    u, v = np.meshgrid(g, g)
    areas = {name: shapes.shape_coverage(name, u, v).mean() for name in (*shapes.SHAPES, shapes.CONCEPT_SHAPE)}
    assert areas["circle"] == pytest.approx(np.pi / 4, abs=2e-3)
    assert areas["square"] == pytest.approx(1.0)
    assert areas["triangle"] == pytest.approx(0.5, abs=2e-3)
    assert areas["cross"] == pytest.approx(5 / 9, abs=3e-3)


def test_position_moves_the_shape():
    left = shapes.render(shapes.ShapeSpec("circle", "blue", "small", "left", "black"))
    right = shapes.render(shapes.ShapeSpec("circle", "blue", "small", "right", "black"))
    cols_left = np.nonzero(left.max(axis=(0, 2)) > 0.5)[0]
    cols_right = np.nonzero(right.max(axis=(0, 2)) > 0.5)[0]
    assert cols_left.mean() < 12 < 20 < cols_right.mean()


def test_captions():
    spec = shapes.ShapeSpec("triangle", "yellow", "small", "top", "white")
    assert shapes.caption_for(spec) == "a small yellow triangle at the top, white background"
    styled = shapes.caption_for(spec, shape_word="zkx", style_phrase="in teal")
    assert styled == "a small yellow zkx at the top, in teal"
    short = {shapes.caption_for(spec, random.Random(i), keep=0.0) for i in range(5)}
    assert short == {"a yellow triangle"}


def test_pretraining_distribution_leaves_out_the_concept_and_the_style():
    specs = shapes.sample_specs(500, 1)
    assert {s.shape for s in specs} == set(shapes.SHAPES)
    assert {s.background for s in specs} == set(shapes.BACKGROUNDS)
    assert all(s.shape != shapes.CONCEPT_SHAPE and s.background != shapes.STYLE_NAME for s in specs)


def test_bad_spec_raises():
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.ShapeSpec("star", "red")
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.ShapeSpec("circle", "mauve")
