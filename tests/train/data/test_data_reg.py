"""Regularization (prior preservation) folders: kohya's balance, batches that mix them in, TOML, training metadata.

Oracle for the balance: kohya sd-scripts' rule, written out by hand per case (reg images in order with their own
repeats until the training count is reached, then one more sighting each in further rounds; the rest unused).
"""

from __future__ import annotations

from collections import Counter

import pytest
from data_helpers import make_image, write

from lorakit.errors import ConfigError
from lorakit.train.data import BatchLoader, DatasetConfig, FolderConfig, load_dataset, load_dataset_config

SMALL = dict(resolution=32, bucket_reso_steps=32, min_bucket_reso=32, max_bucket_reso=64)


def _folder(root, count, caption, seed=0):
    for i in range(count):
        make_image(root / f"i{i}.png", 32, 32, seed=seed + i)
        write(root / f"i{i}.txt", f"{caption} {i}")
    return root


def _dataset(tmp_path, train, repeats, reg, reg_repeats=1):
    train_dir = _folder(tmp_path / f"{repeats}_zkx", train, "zkx")
    reg_dir = _folder(tmp_path / f"{reg_repeats}_shape", reg, "shape", seed=100)
    folders = (FolderConfig(str(train_dir)), FolderConfig(str(reg_dir), is_reg=True))
    return load_dataset(DatasetConfig(folders=folders, **SMALL))


@pytest.mark.parametrize(
    ("train", "repeats", "reg", "reg_repeats", "expected_reg"),
    [
        (2, 3, 4, 1, [2, 2, 1, 1]),  # 6 training sightings: one round of 4, then one more for the first two
        (2, 3, 10, 1, [1] * 6 + [0] * 4),  # more reg images than training sightings: the first 6, as kohya
        (4, 1, 2, 3, [3, 3]),  # the first round takes each image's own repeats whole (6 for 4, as kohya)
        (3, 2, 6, 1, [1] * 6),  # exact balance
    ],
)
def test_reg_images_balanced_as_kohya_does(tmp_path, train, repeats, reg, reg_repeats, expected_reg):
    images = _dataset(tmp_path, train, repeats, reg, reg_repeats)
    copies = images.copies()
    assert copies[:train] == [repeats] * train
    assert copies[train:] == expected_reg
    assert images.num_samples == train * repeats
    assert images.num_reg_samples == sum(expected_reg)


def test_batches_mix_reg_images_with_their_captions(tmp_path):
    images = _dataset(tmp_path, 4, 2, 8)
    loader = BatchLoader(images, 4, seed=0)
    batches = list(loader.batches(0))
    assert loader.steps_per_epoch == len(batches) == 4  # 8 training + 8 reg sightings in batches of 4
    seen = Counter(s.key for b in batches for s in b)
    assert sum(n for k, n in seen.items() if "zkx" in k) == 8
    assert sum(n for k, n in seen.items() if "shape" in k) == 8
    captions = {s.key: s.caption for b in batches for s in b}
    assert all(c.startswith("shape ") for k, c in captions.items() if "1_shape" in k)
    assert any(any("zkx" in s.key for s in b) and any("shape" in s.key for s in b) for b in batches)


def test_without_reg_nothing_changes(tmp_path):
    train_dir = _folder(tmp_path / "3_zkx", 2, "zkx")
    images = load_dataset(DatasetConfig.for_folder(train_dir, **SMALL))
    assert images.copies() == [3, 3] and images.num_reg_samples == 0
    assert BatchLoader(images, 2, seed=0).steps_per_epoch == 3


def test_only_reg_folders_is_an_error(tmp_path):
    reg_dir = _folder(tmp_path / "1_shape", 2, "shape")
    images = load_dataset(DatasetConfig.for_folder(reg_dir, is_reg=True, **SMALL))
    with pytest.raises(ConfigError, match="only regularization"):
        BatchLoader(images, 1, seed=0)


def test_toml_is_reg(tmp_path):
    _folder(tmp_path / "train" / "2_zkx", 2, "zkx")
    _folder(tmp_path / "reg" / "1_shape", 3, "shape", seed=50)
    file = write(
        tmp_path / "dataset.toml",
        "resolution = 32\nbucket_reso_steps = 32\nmin_bucket_reso = 32\nmax_bucket_reso = 64\n"
        '[[folders]]\npath = "train"\n[[folders]]\npath = "reg"\nis_reg = true\n',
    )
    config = load_dataset_config(file)
    assert [f.is_reg for f in config.folders] == [False, True]
    images = load_dataset(config)
    assert images.copies() == [2, 2, 2, 1, 1]
    bad = write(tmp_path / "bad.toml", '[[folders]]\npath = "reg"\nis_reg = "yes"\n')
    with pytest.raises(ConfigError, match="is_reg"):
        load_dataset_config(bad)
