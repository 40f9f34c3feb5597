"""Training with regularization (prior preservation) folders: reg images in the batches, prior_loss_weight, metadata.

Oracle for the weighting: the step loss is linear in the reg images' weight, so with the same batch and draws,
``L(w) = L(0) + w * (L(1) - L(0))`` must hold for the loss the trainer computes with ``prior_loss_weight = w``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from train_helpers import tiny_config
from train_shapes import make_shapes

from lorakit.errors import ConfigError
from lorakit.formats.safetensors_io import read_file
from lorakit.models.tiny import build_tiny_pipeline
from lorakit.train.config import TrainingConfig
from lorakit.train.loop import Trainer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg")
    make_shapes(root / "train" / "2_shp", count=4, trigger="shp")
    make_shapes(root / "reg" / "1_shape", count=6)
    return root


def _config(folders, out, **training):
    config = tiny_config(folders / "train", out, training={"steps": 2, **training})
    dataset = {k: v for k, v in config.dataset.items() if k != "path"}
    dataset["folders"] = [{"path": str(folders / "train")}, {"path": str(folders / "reg"), "is_reg": True}]
    return replace(config, dataset=dataset)


def _first_batch_loss(folders, out, prior):
    trainer = Trainer(_config(folders, out, prior_loss_weight=prior), pipe=build_tiny_pipeline("sd1"), arch="sd1")
    batch = next(b for b in trainer.loader.batches(0) if any(s.is_reg for s in b) and not all(s.is_reg for s in b))
    return float(trainer._forward(batch, 0, len(batch))), batch


def test_prior_loss_weight_scales_the_reg_images_loss(folders, tmp_path):
    zero, batch = _first_batch_loss(folders, tmp_path / "a", 0.0)
    one, _ = _first_batch_loss(folders, tmp_path / "b", 1.0)
    three, _ = _first_batch_loss(folders, tmp_path / "c", 3.0)
    assert one > zero > 0
    torch.testing.assert_close(three, zero + 3 * (one - zero), rtol=1e-5, atol=1e-7)


def test_run_with_reg_folder_records_it(folders, tmp_path):
    config = _config(folders, tmp_path / "out", prior_loss_weight=0.5)
    trainer = Trainer(config, pipe=build_tiny_pipeline("sd1"), arch="sd1")
    assert trainer.loader.steps_per_epoch == 4  # 8 training + 8 balanced reg sightings, batches of 4
    result = trainer.run()
    _, meta = read_file(result.output)
    assert meta["ss_num_train_images"] == "8" and meta["ss_num_reg_images"] == "8"
    assert meta["ss_prior_loss_weight"] == "0.5"


def test_negative_prior_loss_weight_is_refused():
    with pytest.raises(ConfigError, match="prior_loss_weight"):
        TrainingConfig(prior_loss_weight=-1.0)
