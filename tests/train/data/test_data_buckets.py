"""Aspect buckets against an independent brute-force computation of kohya's rules, and the published SD1.5 list."""

from __future__ import annotations

import math
import random

import pytest

from lorakit.train.data.buckets import BucketChooser, make_bucket_resolutions

# The buckets kohya sd-scripts makes for --resolution 512 (min 256, max 1024, step 64): every width from 256 to 1024
# with the tallest height that fits the area, capped at 1024 and kept when at least 256.
KOHYA_512 = [
    (256, 832),
    (256, 896),
    (256, 960),
    (256, 1024),
    (320, 704),
    (320, 768),
    (384, 640),
    (448, 576),
    (512, 512),
    (576, 448),
    (640, 384),
    (704, 320),
    (768, 320),
    (832, 256),
    (896, 256),
    (960, 256),
    (1024, 256),
]


def brute_force_buckets(resolution, min_size, max_size, step):
    """Every grid point (w, h) inside the area that cannot grow by one step along one of its axes, plus the square."""
    area = resolution * resolution
    sides = range(min_size, max_size + 1, step)
    out = set()
    for w in sides:
        for h in sides:
            if w * h > area:
                continue
            h_full = h + step > max_size or w * (h + step) > area
            w_full = w + step > max_size or (w + step) * h > area
            if h_full or w_full:
                out.add((w, h))
    square = math.isqrt(area) // step * step
    return sorted(out | {(square, square)})


def test_sd15_list():
    assert make_bucket_resolutions(512) == KOHYA_512


@pytest.mark.parametrize(
    ("resolution", "min_size", "max_size", "step"),
    [
        (512, 256, 1024, 64),
        (768, 256, 1024, 64),
        (1024, 256, 2048, 64),
        (1024, 512, 1536, 64),
        (640, 320, 960, 32),
        (576, 256, 1024, 64),
        (64, 32, 128, 16),
    ],
)
def test_bucket_list_matches_brute_force(resolution, min_size, max_size, step):
    buckets = make_bucket_resolutions(resolution, min_size, max_size, step)
    assert buckets == brute_force_buckets(resolution, min_size, max_size, step)
    assert all(w * h <= resolution**2 and w % step == 0 and h % step == 0 for w, h in buckets)


def test_choice_is_nearest_aspect_and_covers_the_bucket():
    chooser = BucketChooser(1024, 256, 2048, 64)
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(64, 4000), rng.randint(64, 4000)
        plan = chooser.choose(w, h)
        aspect = w / h
        best = min(abs(bw / bh - aspect) for bw, bh in chooser.resolutions)
        assert abs(plan.bucket[0] / plan.bucket[1] - aspect) == best
        assert plan.resized[0] >= plan.bucket[0] and plan.resized[1] >= plan.bucket[1]
        # one side fits exactly; the other keeps the aspect ratio up to rounding
        assert plan.bucket[0] == plan.resized[0] or plan.bucket[1] == plan.resized[1]
        assert abs(plan.resized[0] / plan.resized[1] - aspect) < 1.0 / min(plan.resized) * (1 + aspect)


def test_exact_bucket_size_is_kept():
    plan = BucketChooser(512).choose(640, 384)
    assert plan.bucket == plan.resized == (640, 384) and plan.ar_error == 0


def test_no_upscale_keeps_small_images_small():
    chooser = BucketChooser(512, no_upscale=True)
    plan = chooser.choose(300, 200)
    assert plan.resized == (300, 200) and plan.bucket == (256, 192)
    plan = chooser.choose(200, 200)
    assert plan.bucket == (192, 192)  # below min_bucket_reso: not upscaled
    rng = random.Random(1)
    for _ in range(300):
        w, h = rng.randint(64, 3000), rng.randint(64, 3000)
        plan = chooser.choose(w, h)
        assert plan.bucket[0] % 64 == 0 and plan.bucket[1] % 64 == 0
        assert plan.bucket[0] <= plan.resized[0] < plan.bucket[0] + 64 or plan.resized[0] == plan.bucket[0]
        assert plan.bucket[1] <= plan.resized[1]
        if w * h <= 512 * 512:
            assert plan.resized == (w, h)
        else:
            assert plan.resized[0] <= w and plan.resized[1] <= h
            assert plan.resized[0] * plan.resized[1] <= 512**2 * 1.01
            assert plan.bucket[0] * plan.bucket[1] <= 512**2


def test_no_upscale_large_image_rounding():
    # 2000 x 1000 into 512^2: width 724.08 -> 704 gives 704 x 320 (ratio 2.2); height 362.04 -> 320 gives 640 x 320
    # (ratio 2.0), the better ratio, so the image is resized to 640 x 320.
    plan = BucketChooser(512, no_upscale=True).choose(2000, 1000)
    assert plan.resized == (640, 320) and plan.bucket == (640, 320)
    # 1000 x 900: width 539.7 -> 512 gives 512 x 448 (1.143); height 485.7 -> 448 gives 448 x 448 (1.0); the width
    # rule is nearer 1.111, so 512 x round(460.8) = 512 x 461, cropped to 512 x 448.
    plan = BucketChooser(512, no_upscale=True).choose(1000, 900)
    assert plan.resized == (512, 461) and plan.bucket == (512, 448)


def test_no_upscale_too_small():
    with pytest.raises(ValueError, match="smaller than one bucket step"):
        BucketChooser(512, no_upscale=True).choose(40, 500)


def test_buckets_off_uses_the_square():
    plan = BucketChooser(512, enable=False).choose(1000, 500)
    assert plan.bucket == (512, 512) and plan.resized == (1024, 512)
