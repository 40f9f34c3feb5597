"""DatasetConfig and the TOML dataset file: one-to-one mapping, unknown keys, types, ranges."""

from __future__ import annotations

import pytest
from data_helpers import write

from lorakit.errors import ConfigError, InputError
from lorakit.train.data import DatasetConfig, FolderConfig, load_dataset_config

GOOD = """
resolution = 768
flip = true
bucket_no_upscale = true
max_bucket_reso = 1536

[[folders]]
path = "train/10_dog"
trigger = "sks dog"
keep_tokens = 1
shuffle_caption = true
caption_dropout_rate = 0.05
tag_dropout_rate = 0.1

[[folders]]
path = "/abs/reg"
repeats = 1
class_tokens = "dog"
caption_extension = ".caption"
"""


def test_toml_maps_one_to_one(tmp_path):
    file = write(tmp_path / "data.toml", GOOD)
    config = load_dataset_config(file)
    assert config == DatasetConfig(
        folders=(
            FolderConfig(
                path=str(tmp_path / "train/10_dog"),
                trigger="sks dog",
                keep_tokens=1,
                shuffle_caption=True,
                caption_dropout_rate=0.05,
                tag_dropout_rate=0.1,
            ),
            FolderConfig(path="/abs/reg", repeats=1, class_tokens="dog", caption_extension=".caption"),
        ),
        resolution=768,
        flip=True,
        bucket_no_upscale=True,
        max_bucket_reso=1536,
    )
    assert load_dataset_config(file, resolution=1024, flip=None).resolution == 1024


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("resolutoin = 512\n[[folders]]\npath='a'\n", r"data.toml: unknown key 'resolutoin' at top level"),
        ("[[folders]]\npath='a'\nrepeat = 3\n", r"data.toml: unknown key 'repeat' at \[\[folders\]\] number 1"),
        ("[[folders]]\npath='a'\n[[folders]]\npath='b'\nshuffle = true\n", r"unknown key 'shuffle'.*number 2"),
        ("resolution = '512'\n[[folders]]\npath='a'\n", r"resolution at top level must be int"),
        ("flip = 1\n[[folders]]\npath='a'\n", r"flip at top level must be bool"),
        ("resolution = true\n[[folders]]\npath='a'\n", r"resolution at top level must be int"),
        ("resolution = 512\n", r"no \[\[folders\]\] table"),
        ("[[folders]]\nrepeats = 2\n", r"has no path"),
        ("[[folders]]\npath='a'\nkeep_tokens = -1\n", r"data.toml: .*keep_tokens must be 0 or more"),
        ("resolution = 500\nbucket_reso_steps = 60\n[[folders]]\npath='a'\n", r"multiple of 8"),
        ("resolution = [512\n", r"not valid TOML"),
    ],
)
def test_toml_errors_name_the_key_and_file(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_dataset_config(write(tmp_path / "data.toml", text))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such dataset file"):
        load_dataset_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "options",
    [
        dict(repeats=0),
        dict(caption_extension=".md"),
        dict(keep_tokens=-2),
        dict(caption_dropout_rate=1.5),
        dict(tag_dropout_rate=-0.1),
        dict(trigger="  "),
        dict(caption_separator=""),
    ],
)
def test_folder_checks(options):
    with pytest.raises(ConfigError):
        FolderConfig(path="x", **options)


@pytest.mark.parametrize(
    "options",
    [
        dict(folders=()),
        dict(resolution=32),
        dict(min_bucket_reso=100),
        dict(max_bucket_reso=128),
        dict(bucket_reso_steps=12),
        dict(resolution=1024, max_bucket_reso=768),
    ],
)
def test_dataset_checks(options):
    options.setdefault("folders", (FolderConfig(path="x"),))
    with pytest.raises(ConfigError):
        DatasetConfig(**options)


def test_for_folder_splits_options():
    config = DatasetConfig.for_folder("x", resolution=1024, max_bucket_reso=2048, trigger="t", flip=True)
    assert config.resolution == 1024 and config.flip and config.folders[0].trigger == "t"
    assert config.with_options(resolution=512).resolution == 512
    with pytest.raises(ConfigError, match="unknown dataset option"):
        DatasetConfig.for_folder("x", resolutoin=512)
    assert DatasetConfig(folders=[FolderConfig(path="x")]).folders == (FolderConfig(path="x"),)


def test_default_max_bucket_follows_resolution():
    from lorakit.train.data.imageset import bucket_chooser

    assert DatasetConfig.for_folder("x").max_bucket == 1024
    sdxl = DatasetConfig.for_folder("x", resolution=1024)
    assert sdxl.max_bucket == 2048 and (1344, 768) in bucket_chooser(sdxl).resolutions
    assert DatasetConfig.for_folder("x", resolution=1024, max_bucket_reso=1024).max_bucket == 1024
