"""Network and loop options on a tiny SD1 run: text-encoder LoRA with its own lr, LoCon, checkpointing, optimizers,
and the state and log files."""

from __future__ import annotations

import pytest
import torch
from train_helpers import lora_tensors, tiny_config
from train_shapes import make_shapes

from lorakit.errors import FileFormatError
from lorakit.formats.lora_io import load_lora
from lorakit.formats.safetensors_io import read_file
from lorakit.models.tiny import build_tiny_pipeline
from lorakit.train.logs import LossLog
from lorakit.train.loop import Trainer
from lorakit.train.state import load_state


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("opts") / "data", count=4)


def _trainer(data, out, **tables):
    tables["training"] = {"steps": 2, "batch_size": 2, **tables.get("training", {})}
    return Trainer(tiny_config(data, out, **tables), pipe=build_tiny_pipeline("sd1"), arch="sd1")


def test_text_encoder_lora_trains_with_its_own_learning_rate(data, tmp_path):
    trainer = _trainer(data, tmp_path, network={"train_text_encoder": True, "text_encoder_lr": 1e-3})
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [3e-3, 1e-3]
    assert trainer.text_cache is None  # a trained text encoder cannot be cached
    result = trainer.run()
    trained = lora_tensors(trainer)
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if k.startswith("text_encoder.") and "lora_B" in k)
    tensors, meta = read_file(result.output)
    assert any(k.startswith("lora_te_") for k in tensors) and meta["ss_network_train_unet_only"] == "False"
    lora = load_lora(result.output, arch="sd1", modules=trainer.network.modules())
    assert lora.components() == ["unet", "text_encoder"]


def test_locon_puts_adapters_on_convs(data, tmp_path):
    trainer = _trainer(data, tmp_path, network={"targets": "all", "conv_rank": 2, "conv_alpha": 1})
    result = trainer.run()
    tensors, meta = read_file(result.output)
    conv_downs = [v for k, v in tensors.items() if k.endswith("lora_down.weight") and v.ndim == 4 and v.shape[-1] == 3]
    assert conv_downs and all(v.shape[0] == 2 for v in conv_downs)
    assert meta["ss_network_args"] == '{"conv_alpha": 1, "conv_dim": 2}'


def test_gradient_checkpointing_gives_the_same_training(data, tmp_path):
    plain = _trainer(data, tmp_path / "a")
    plain.run()
    checkpointed = _trainer(data, tmp_path / "b", training={"gradient_checkpointing": True})
    assert checkpointed.task.denoiser.is_gradient_checkpointing
    checkpointed.run()
    a, b = lora_tensors(plain), lora_tensors(checkpointed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("name", "lr"), [("lion", 3e-4), ("prodigy", 1.0)])
def test_other_optimizers_train(data, tmp_path, name, lr):
    trainer = _trainer(data, tmp_path, optimizer={"name": name, "lr": lr})
    before = lora_tensors(trainer)
    result = trainer.run()
    after = lora_tensors(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert read_file(result.output)[1]["ss_optimizer"] == name


def test_state_refuses_pickled_code(data, tmp_path):
    trainer = _trainer(data, tmp_path)
    trainer.run()
    state = next(tmp_path.glob("lora-state-step*"))
    torch.save({"optimizer": {}, "schedule": {}, "rng": {"torch": object()}}, state / "trainer.pt")
    with pytest.raises(FileFormatError, match="damaged training state"):
        load_state(state)


def test_loss_log_resume_drops_later_rows_and_plots(tmp_path):
    log = LossLog(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.add(step, 0, 1.0 / step, 1e-3, step * 0.1)
    log.close()
    again = LossLog(tmp_path, resume_step=3, tensorboard=False)
    again.add(4, 0, 0.2, 1e-3, 0.4)
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    png = again.plot()
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (640, 360)
        # the loss line is drawn: dark blue pixels exist
        assert any(colour == (20, 60, 160) for _, colour in image.convert("RGB").getcolors(1 << 20))


def test_samples_come_from_the_saved_file_and_leave_training_alone(data, tmp_path):
    from lorakit.generate import read_png_infotext

    plain = _trainer(data, tmp_path / "a")
    plain.run()
    sampled = _trainer(
        data, tmp_path / "b", save={"every_steps": 1}, sample={"prompts": ["red circle"], "every_steps": 1, "steps": 2}
    )
    result = sampled.run()
    assert [p.name for p in result.samples] == ["step000001-00.png", "step000002-00.png"]
    info = read_png_infotext(result.samples[0])
    assert info.prompt == "red circle <lora:lora-step000001:1>" and list(info.lora_hashes()) == ["lora-step000001"]
    a, b = lora_tensors(plain), lora_tensors(sampled)
    assert all(torch.equal(a[k], b[k]) for k in a)  # sampling consumed no training randomness


def test_mixed_precision_on_cpu_is_a_config_error(data, tmp_path):
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a GPU"):
        _trainer(data, tmp_path, training={"mixed_precision": "bf16"})


def test_saves_every_epoch(data, tmp_path):
    # 4 images, batch 2: two steps per epoch
    trainer = _trainer(data, tmp_path, training={"steps": 5}, save={"every_epochs": 1})
    result = trainer.run()
    assert [p.name for p in result.saves] == [
        "lora-epoch0001.safetensors",
        "lora-epoch0002.safetensors",
        "lora.safetensors",
    ]
    assert read_file(result.saves[0])[1]["ss_steps"] == "2"
