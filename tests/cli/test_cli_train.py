"""``lorakit train`` through the CLI on the embedded tiny model: config file, flag overrides, resume, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lorakit.cli.main import main
from lorakit.formats.safetensors_io import read_file

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_shapes import make_shapes  # noqa: E402

CONFIG = """
[dataset]
path = "data"
resolution = 32
min_bucket_reso = 32
max_bucket_reso = 64
bucket_reso_steps = 32

[network]
rank = 4

[training]
steps = 2
batch_size = 2

[save]
output_dir = "{output}"
every_steps = 1
dtype = "fp32"
"""


@pytest.fixture()
def config_file(tmp_path):
    make_shapes(tmp_path / "data", count=4)
    path = tmp_path / "train.toml"
    path.write_text(CONFIG.format(output=tmp_path / "out"))
    return path


def test_train_from_a_config_file_with_flags_over_it_then_resume(config_file, tmp_path, capsys):
    code = main(["train", str(config_file), "--rank", "2", "--name", "shapes", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    out = tmp_path / "out" / "shapes.safetensors"
    assert result["output"] == str(out) and result["steps"] == 2 and result["arch"] == "sd1"
    _, meta = read_file(out)
    assert meta["ss_network_dim"] == "2" and meta["ss_sd_model_name"] == "tiny_sd"  # the folder name, no path

    code = main(
        [
            "train",
            str(config_file),
            "--rank",
            "2",
            "--name",
            "shapes",
            "--steps",
            "3",
            "--resume",
            str(tmp_path / "out"),
            "--json",
        ]
    )
    assert code == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["steps"] == 3 and len(resumed["losses"]) == 1  # only step 3 was trained


def test_user_errors_exit_2_with_one_line(config_file, tmp_path, capsys):
    assert main(["train", str(config_file), "--optimizer", "sgd"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error:") and "optimizer.name = 'sgd'" in err and err.count("\n") == 1
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert main(["train", str(config_file), "--data", str(tmp_path / "nowhere")]) == 2


def test_help_shows_examples(capsys):
    assert main(["train", "--help"]) == 0
    assert "lorakit train train.toml" in capsys.readouterr().out
