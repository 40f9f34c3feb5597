"""Resume: an interrupted run continued with --resume gives the same LoRA, bit for bit (CPU); NaN stops cleanly."""

from __future__ import annotations

import pytest
import torch
from train_helpers import lora_tensors, tiny_config
from train_shapes import make_shapes

from lorakit.errors import ConfigError, InputError
from lorakit.formats.safetensors_io import read_file
from lorakit.models.tiny import build_tiny_pipeline
from lorakit.train.loop import Trainer, TrainingDiverged, train

SETTINGS = {
    # dropout draws from the global RNG, accumulation and a warmup + cosine schedule have state: all must resume
    "network": {"rank": 4, "dropout": 0.1},
    "optimizer": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 2},
    "training": {"steps": 6, "batch_size": 2, "gradient_accumulation": 2, "noise_offset": 0.05},
    "save": {"every_steps": 2},
}


class Interrupt(Exception):
    pass


def _stop_at(step_to_stop: int):
    def progress(step, total, loss, smooth):
        if step == step_to_stop:
            raise Interrupt

    return progress


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path):
    data = make_shapes(tmp_path / "data", count=7)
    straight = Trainer(tiny_config(data, tmp_path / "a", **SETTINGS), pipe=build_tiny_pipeline("sd1"), arch="sd1")
    full = straight.run()

    config = tiny_config(data, tmp_path / "b", **SETTINGS)
    with pytest.raises(Interrupt):  # Ctrl-C after step 5: the latest state is step 4
        train(config, pipe=build_tiny_pipeline("sd1"), arch="sd1", progress=_stop_at(5))
    resumed = Trainer(config, pipe=build_tiny_pipeline("sd1"), arch="sd1")
    state = resumed.resume_from(tmp_path / "b")
    assert state.name == "lora-state-step000004"
    second = resumed.run()

    ours, theirs = lora_tensors(resumed), lora_tensors(straight)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert second.losses == full.losses[-len(second.losses) :]
    a, _ = read_file(full.output)
    b, _ = read_file(second.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "b" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 7)]  # no step logged twice


def test_resume_refuses_other_settings_and_missing_states(tmp_path):
    data = make_shapes(tmp_path / "data", count=4)
    config = tiny_config(data, tmp_path / "out", training={"steps": 2, "batch_size": 2}, save={"every_steps": 1})
    train(config, pipe=build_tiny_pipeline("sd1"), arch="sd1")
    other = tiny_config(data, tmp_path / "out", network={"rank": 2}, training={"steps": 3, "batch_size": 2})
    with pytest.raises(ConfigError, match="other settings"):
        train(other, pipe=build_tiny_pipeline("sd1"), arch="sd1", resume=tmp_path / "out")
    with pytest.raises(InputError, match="no training state"):
        train(config, pipe=build_tiny_pipeline("sd1"), arch="sd1", resume=tmp_path / "data")


def test_nan_loss_stops_and_keeps_the_last_good_save(tmp_path):
    data = make_shapes(tmp_path / "data", count=4)
    config = tiny_config(data, tmp_path / "out", training={"steps": 10, "batch_size": 2}, save={"every_steps": 2})
    trainer = Trainer(config, pipe=build_tiny_pipeline("sd1"), arch="sd1")
    real_loss = trainer.task.loss

    def poisoned(*args):
        loss = real_loss(*args)
        return loss * float("nan") if trainer.step >= 5 else loss

    trainer.task.loss = poisoned
    with pytest.raises(TrainingDiverged, match=r"step 6: the loss is nan.*lora-step000004\.safetensors"):
        trainer.run()
    out = tmp_path / "out"
    assert not (out / "lora.safetensors").exists()
    tensors, meta = read_file(out / "lora-step000004.safetensors")
    assert meta["ss_steps"] == "4" and all(torch.isfinite(t).all() for t in tensors.values())
    assert not list(out.glob("*step000006*"))


def test_output_inside_the_dataset_is_refused(tmp_path):
    from lorakit.errors import OutputError

    data = make_shapes(tmp_path / "data", count=2)
    config = tiny_config(data, data / "out", training={"steps": 1, "batch_size": 1})
    with pytest.raises(OutputError, match="inside the dataset folder"):
        train(config, pipe=build_tiny_pipeline("sd1"), arch="sd1")
    assert not (data / "out").exists()
