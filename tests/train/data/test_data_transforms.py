"""Pixels: crop, flip and scaling against numpy slices of the file; EXIF orientation; corrupt images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import make_image
from PIL import Image

from lorakit.errors import InputError
from lorakit.train.data import DatasetConfig, load_dataset
from lorakit.train.data.buckets import BucketPlan
from lorakit.train.data.transforms import crop_for, open_rgb, read_image, to_tensor


def _array(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1


def test_centre_crop_without_resize_is_a_slice(tmp_path):
    # 512 x 540 goes to the 512 x 512 bucket with scale 1: the tensor is rows 14..526 of the file
    path = make_image(tmp_path / "d" / "a.png", 512, 540, seed=1)
    images = load_dataset(DatasetConfig.for_folder(tmp_path / "d", resolution=512))
    item = images.items[0]
    assert item.plan == BucketPlan((512, 512), (512, 540), 512 / 512 - 512 / 540)
    sample = images.view_sample(0)
    expected = torch.from_numpy(_array(path)[14:526]).permute(2, 0, 1)
    torch.testing.assert_close(sample.pixels, expected, rtol=0, atol=1e-6)
    assert sample.crop_top_left == (14, 0) and sample.original_size == (540, 512) and sample.target_size == (512, 512)
    flipped = images.view_sample(0, flip=True)
    torch.testing.assert_close(flipped.pixels, expected.flip(-1), rtol=0, atol=1e-6)


def test_flipped_crop_is_reported_in_the_mirrored_image(tmp_path):
    path = make_image(tmp_path / "a.png", 100, 60, seed=2)
    plan = BucketPlan((64, 48), (100, 60), 0.0)
    top_left = (5, 30)
    plain = to_tensor(open_rgb(path), plan, top_left, flip=False)
    torch.testing.assert_close(plain, torch.from_numpy(_array(path)[5:53, 30:94]).permute(2, 0, 1), rtol=0, atol=1e-6)
    mirrored = to_tensor(open_rgb(path), plan, top_left, flip=True)
    # the same window, mirrored = the window at left 100 - 30 - 64 = 6 of the mirrored image
    mirrored_file = torch.from_numpy(_array(path)[:, ::-1].copy()).permute(2, 0, 1)
    torch.testing.assert_close(mirrored, mirrored_file[:, 5:53, 6:70], rtol=0, atol=1e-6)


def test_random_crop_stays_inside():
    import random

    plan = BucketPlan((64, 64), (80, 70), 0.0)
    rng = random.Random(0)
    seen = {crop_for(plan, rng) for _ in range(500)}
    assert all(0 <= t <= 6 and 0 <= left <= 16 for t, left in seen) and len(seen) > 50
    assert crop_for(plan, None) == (3, 8)


def test_resize_downscale_averages(tmp_path):
    # a 2x2 checkerboard of 0/255 averaged 2x down is flat grey
    pixels = np.indices((128, 128)).sum(axis=0) % 2 * 255
    path = tmp_path / "c.png"
    Image.fromarray(np.repeat(pixels[..., None], 3, axis=2).astype(np.uint8)).save(path)
    out = to_tensor(open_rgb(path), BucketPlan((64, 64), (64, 64), 0.0), (0, 0), flip=False)
    torch.testing.assert_close(out, torch.full_like(out, 127.5 / 127.5 - 1), atol=1 / 127.5, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    image = Image.fromarray(np.zeros((40, 80, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(path, exif=exif)
    assert read_image(path).size == (40, 80)
    assert open_rgb(path).size == (40, 80)


def test_modes_are_converted(tmp_path):
    grey = tmp_path / "g.png"
    Image.fromarray(np.full((64, 64), 200, dtype=np.uint8)).save(grey)
    rgba = tmp_path / "a.png"
    Image.fromarray(np.full((64, 64, 4), 100, dtype=np.uint8)).save(rgba)
    for path in (grey, rgba):
        out = to_tensor(open_rgb(path), BucketPlan((64, 64), (64, 64), 0.0), (0, 0), flip=False)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.webp"])
def test_truncated_images_fail_with_the_file_name(tmp_path, name):
    path = make_image(tmp_path / name, 64, 64, seed=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=name):
        read_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("hello")
    with pytest.raises(InputError, match="not a readable image"):
        read_image(path)


def test_content_hash_and_near_duplicate_hash(tmp_path):
    a = make_image(tmp_path / "a.png", 128, 96, seed=5)
    Image.open(a).save(tmp_path / "b.jpg", quality=90)
    c = make_image(tmp_path / "c.png", 128, 96, seed=6)
    ha, hb, hc = (read_image(p) for p in (a, tmp_path / "b.jpg", c))
    import hashlib

    assert ha.sha256 == hashlib.sha256(a.read_bytes()).hexdigest()
    assert ha.sha256 != hb.sha256
    assert bin(ha.dhash ^ hb.dhash).count("1") <= 6
    assert bin(ha.dhash ^ hc.dhash).count("1") > 12


@pytest.mark.parametrize("orientation", [1, 6])
def test_reduced_jpeg_decode_matches_full_decode(tmp_path, orientation):
    path = tmp_path / "big.jpg"
    source = Image.open(make_image(tmp_path / "big.png", 1600, 1200, seed=12))
    exif = source.getexif()
    exif[0x0112] = orientation
    source.save(path, quality=95, exif=exif)
    size = read_image(path).size
    assert size == ((1600, 1200) if orientation == 1 else (1200, 1600))
    plan = BucketPlan((320, 256), (341, 256), 0.0) if orientation == 1 else BucketPlan((256, 320), (256, 341), 0.0)
    fast = to_tensor(open_rgb(path, at_least=plan.resized), plan, (0, 10) if orientation == 1 else (10, 0), False)
    full = to_tensor(open_rgb(path), plan, (0, 10) if orientation == 1 else (10, 0), False)
    assert fast.shape == full.shape == (3, plan.bucket[1], plan.bucket[0])
    assert (fast - full).abs().mean() < 0.02
