"""BatchLoader: deterministic order, one bucket per batch, repeats, resume mid-epoch, dataset folder untouched."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from data_helpers import folder_hash, kohya_dataset, make_image

from lorakit.errors import ConfigError
from lorakit.train.data import BatchLoader, DatasetConfig, load_dataset

SMALL = dict(resolution=64, bucket_reso_steps=16, min_bucket_reso=32, max_bucket_reso=128)


def _dataset(root, **options):
    return load_dataset(DatasetConfig.for_folder(root, **{**SMALL, **options}))


def _summary(batch):
    return [(s.key, s.copy, s.caption, s.crop_top_left, s.flipped, s.target_size) for s in batch]


@pytest.fixture
def data_root(tmp_path):
    return kohya_dataset(tmp_path / "train")


def test_same_seed_same_batches_and_pixels(data_root):
    options = dict(flip=True, random_crop=True, shuffle_caption=True)
    first = list(BatchLoader(_dataset(data_root, **options), 2, seed=3).batches(1))
    second = list(BatchLoader(_dataset(data_root, **options), 2, seed=3).batches(1))
    assert [_summary(b) for b in first] == [_summary(b) for b in second]
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            assert torch.equal(x.pixels, y.pixels)


def test_order_changes_with_epoch_and_seed(data_root):
    images = _dataset(data_root)
    loader = BatchLoader(images, 1, seed=0)
    orders = [[b[0].key + str(b[0].copy) for b in loader.batches(e)] for e in range(3)]
    other = [b[0].key + str(b[0].copy) for b in BatchLoader(images, 1, seed=1).batches(0)]
    assert orders[0] != orders[1] or orders[1] != orders[2]
    assert other != orders[0]


def test_batches_never_mix_buckets_and_honour_repeats(data_root):
    images = _dataset(data_root)
    loader = BatchLoader(images, 3, seed=0)
    batches = list(loader.batches(0))
    assert len(batches) == loader.steps_per_epoch
    seen = Counter()
    for batch in batches:
        assert len({s.pixels.shape for s in batch}) == 1
        assert len({s.target_size for s in batch}) == 1
        seen.update(s.key for s in batch)
    expected = {item.key: item.subset.repeats for item in images.items}
    assert dict(seen) == expected
    assert expected["train/3_dog/d0.png"] == 3 and expected["train/1_cat/c0.jpg"] == 1
    # per bucket: ceil(count / batch): 64x64 has d0,d2 (x3) + c1 = 7 -> 3; 80x48 d1,d3 (x3) = 6 -> 2; 48x80 c0 -> 1
    assert images.bucket_counts() == {(48, 80): 1, (64, 64): 7, (80, 48): 6}
    assert loader.steps_per_epoch == 3 + 2 + 1


def test_no_shuffle_keeps_bucket_then_image_order(data_root):
    images = _dataset(data_root)
    keys = [s.key for b in BatchLoader(images, 2, seed=0, shuffle=False).batches(0) for s in b]
    order = {item.key: i for i, item in enumerate(images.items)}
    buckets = [images.items[order[k]].bucket for k in keys]
    assert buckets == sorted(buckets)


def test_resume_half_way_gives_the_same_remaining_batches(data_root):
    options = dict(flip=True, random_crop=True, shuffle_caption=True, tag_dropout_rate=0.3)
    full = BatchLoader(_dataset(data_root, **options), 2, seed=7)
    expected = list(full.batches(2))
    run = BatchLoader(_dataset(data_root, **options), 2, seed=7)
    it = run.batches(2)
    half = len(expected) // 2
    for _ in range(half):
        next(it)
    state = run.state_dict()
    assert state["epoch"] == 2 and state["step"] == half

    fresh = BatchLoader(_dataset(data_root, **options), 2, seed=7)
    fresh.load_state_dict(state)
    rest = list(fresh.resume())
    assert [_summary(b) for b in rest] == [_summary(b) for b in expected[half:]]
    for a, b in zip(rest, expected[half:]):
        assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(a, b))
    assert fresh.state_dict()["epoch"] == 3 and fresh.state_dict()["step"] == 0


def test_resume_refuses_another_seed_or_a_changed_dataset(data_root):
    loader = BatchLoader(_dataset(data_root), 2, seed=0)
    state = loader.state_dict()
    with pytest.raises(ConfigError, match="seed"):
        BatchLoader(_dataset(data_root), 2, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="batch_size"):
        BatchLoader(_dataset(data_root), 3, seed=0).load_state_dict(state)
    make_image(data_root / "3_dog" / "d9.png", 64, 64, seed=99)
    with pytest.raises(ConfigError, match="dataset changed"):
        BatchLoader(_dataset(data_root), 2, seed=0).load_state_dict(state)


def test_bad_batch_size_and_start(data_root):
    with pytest.raises(ConfigError):
        BatchLoader(_dataset(data_root), 0, seed=0)
    loader = BatchLoader(_dataset(data_root), 2, seed=0)
    with pytest.raises(ConfigError):
        list(loader.batches(0, start=loader.steps_per_epoch + 1))


def test_sdxl_conditioning_values(data_root):
    images = _dataset(data_root, flip=True)
    for batch in BatchLoader(images, 4, seed=0).batches(0):
        for sample in batch:
            item = next(i for i in images.items if i.key == sample.key)
            assert sample.original_size == (item.size[1], item.size[0])
            assert sample.target_size == tuple(sample.pixels.shape[1:])
            top, left = sample.crop_top_left
            assert 0 <= top <= item.plan.resized[1] - sample.target_size[0]
            assert 0 <= left <= item.plan.resized[0] - sample.target_size[1]


def test_loading_and_iterating_never_writes_into_the_dataset(data_root):
    before = folder_hash(data_root)
    images = _dataset(data_root, flip=True, shuffle_caption=True)
    loader = BatchLoader(images, 2, seed=0)
    for epoch in range(2):
        for _ in loader.batches(epoch):
            pass
    images.tag_frequency()
    assert folder_hash(data_root) == before
