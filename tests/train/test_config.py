"""TOML mapping, presets and flag overrides of the training config."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError, InputError
from lorakit.train.config import TrainConfig, config_from_dict, load_config
from lorakit.train.presets import PRESETS, preset_tables

TOML = """
preset = "sdxl-8gb"

[model]
path = "base"

[dataset]
path = "images"
resolution = 768

[network]
rank = 8
targets = "all"
conv_rank = 4

[optimizer]
lr = 2e-4
betas = [0.9, 0.99]

[training]
steps = 300

[sample]
prompts = ["a dog", "a cat"]
"""


def test_toml_maps_onto_the_dataclasses_and_the_preset_fills_the_rest(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(TOML)
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert config.model.path == "base" and config.model.arch == "sdxl"  # arch from the preset
    assert config.network.rank == 8 and config.network.conv_rank == 4 and config.network.alpha == 16  # preset alpha
    assert config.optimizer.name == "adamw8bit" and config.optimizer.betas == (0.9, 0.99)
    assert config.training.steps == 300 and config.training.gradient_checkpointing  # the 8gb tier
    assert config.dataset == {"path": "images", "resolution": 768}
    assert config.sample.prompts == ("a dog", "a cat")


def test_flags_override_the_file_and_a_new_data_source_replaces_the_old(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(TOML)
    config = load_config(
        path, {"training.steps": 5, "network.rank": 2, "dataset.config": "d.toml", "optimizer.lr": None}
    )
    assert config.training.steps == 5 and config.network.rank == 2
    assert config.optimizer.lr == 2e-4  # None keeps the file's value
    assert config.dataset == {"config": "d.toml", "resolution": 768}


def test_alpha_defaults_to_rank_in_the_lora_config():
    config = config_from_dict({"network": {"rank": 8}})
    assert config.network.alpha is None  # means alpha = rank (scale 1); checked in test_metadata too


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"network": {"rnak": 8}}, r"unknown key\(s\) \['rnak'\] in \[network\]"),
        ({"netwrok": {}}, r"unknown table\(s\) \['netwrok'\]"),
        ({"network": {"rank": 0}}, "network.rank must be at least 1"),
        ({"optimizer": {"name": "sgd"}}, "optimizer.name = 'sgd' is not one of"),
        ({"training": {"mixed_precision": "fp8"}}, "training.mixed_precision"),
        ({"save": {"name": "a/b"}}, "plain file name"),
        ({"preset": "sd9"}, "unknown preset 'sd9'"),
        ({"network": "x"}, "must be a table"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_missing_and_broken_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[network\nrank = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


CHECKPOINTING = {"sd1.5-6gb", "sd1.5-8gb", "sdxl-8gb", "sdxl-12gb", "flux-16gb", "flux-24gb"}
EIGHT_BIT = {"sd1.5-6gb", "sdxl-8gb", "flux-16gb"}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_a_valid_config(name):
    tables = preset_tables(name)
    config = config_from_dict({"preset": name})
    assert config.model.arch == tables["model"]["arch"]
    assert config.training.gradient_checkpointing == (name in CHECKPOINTING)
    assert (config.optimizer.name == "adamw8bit") == (name in EIGHT_BIT)
    assert config.training.cache_latents and config.network.alpha == config.network.rank
