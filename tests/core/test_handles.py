"""Handles on models that are copied, pickled, fused, and carry several trainable adapters."""

import copy
import io

import torch
from torch import nn

from lorakit.core import LoraConfig, adapters, attach_lora, fuse

torch.set_num_threads(1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def _randomise_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()


def test_second_adapter_keeps_the_first_trainable():
    model = _model()
    attach_lora(model, LoraConfig(rank=2), name="first")
    attach_lora(model, LoraConfig(rank=3), name="second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".first." in n for n in trainable) and any(".second." in n for n in trainable)
    assert all(".adapters." in n for n in trainable)


def test_set_weight_on_a_fused_adapter_refuses_the_weights():
    model = _model()
    handle = attach_lora(model, LoraConfig(rank=2), name="style")
    _randomise_b(model)
    x = torch.randn(5, 6)
    handle.set_weight(0.25)
    dynamic = model(x)
    handle.set_weight(1.0)
    fuse(model)
    handle.set_weight(0.25)
    torch.testing.assert_close(model(x), dynamic, rtol=1e-5, atol=1e-6)


def test_models_with_adapters_pickle_and_deep_copy():
    model = _model()
    attach_lora(model, LoraConfig(rank=2), name="style")
    _randomise_b(model)
    fuse(model)
    x = torch.randn(5, 6)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        torch.testing.assert_close(other(x), model(x))
        # the copy's handle steers the copy, not the original
        adapters(other)["style"].set_weight(0.0)
        assert not torch.allclose(other(x), model(x))
        adapters(other)["style"].set_weight(1.0)
        torch.testing.assert_close(other(x), model(x))
