"""Lean activations: the same gradients, bit for bit, with less kept for the backward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.models.tiny import build_tiny_pipeline
from lorakit.train.config import NetworkConfig
from lorakit.train.lean import lean_activations
from lorakit.train.network import attach_network


def _unet_with_lora(arch: str, targets: str):
    pipe = build_tiny_pipeline(arch)
    network = attach_network(pipe, arch, NetworkConfig(rank=4, targets=targets, conv_rank=2), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in network.named_parameters():  # B starts at zero: make every factor count
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pipe.unet, network


def _inputs(unet, arch: str):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g, requires_grad=True)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if arch == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(
                2,
                unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim,
                generator=g,
            ),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
        }
    return x, torch.tensor([10, 700]), text, kwargs


def _step(unet, network, arch, saved: list[int] | None = None):
    """Gradients of the LoRA factors and of the input latents after one loss; with ``saved``, the bytes kept for
    the backward pass (each storage once)."""
    x, t, text, kwargs = _inputs(unet, arch)
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = unet(x, t, text, return_dict=False, **kwargs)[0]
    (out.square().mean() + out.mean()).backward()
    if saved is not None:
        saved.append(sum(storages.values()))
    grads = {name: p.grad.clone() for name, p in network.named_parameters()}
    network_grads_zero(network)
    return grads, x.grad


def network_grads_zero(network):
    for _, p in network.named_parameters():
        p.grad = None


@pytest.mark.parametrize(
    ("arch", "targets", "kept"),
    # with LoCon on every conv, the adapters need the conv inputs anyway: only the GEGLUs save
    [("sd1", "attention", 0.85), ("sdxl", "attention-mlp", 0.9), ("sd1", "all", 1.0)],
)
def test_gradients_are_the_same_bits_and_less_is_kept(arch, targets, kept):
    torch.manual_seed(0)
    unet, network = _unet_with_lora(arch, targets)
    plain_bytes, lean_bytes = [], []
    want, want_x = _step(unet, network, arch, plain_bytes)
    handle = lean_activations(unet)
    convs = sum(isinstance(m, nn.Conv2d) for m in unet.modules())
    assert len(handle) >= convs  # every stock conv, plus the GEGLUs
    got, got_x = _step(unet, network, arch, lean_bytes)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert torch.equal(want_x, got_x)
    assert lean_bytes[0] < kept * plain_bytes[0]
    handle.remove()
    assert all("forward" not in m.__dict__ for m in unet.modules())
    again, _ = _step(unet, network, arch)
    assert all(torch.equal(want[n], again[n]) for n in want)


def test_under_bf16_autocast_gradients_match():
    """Autocast runs the convolution in bf16 either way; the lean one casts as autocast would."""
    torch.manual_seed(0)
    unet, network = _unet_with_lora("sd1", "attention")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_x = _step(unet, network, "sd1")
        handle = lean_activations(unet)
        got, got_x = _step(unet, network, "sd1")
    handle.remove()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert torch.equal(want_x, got_x)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 5, 3, padding=1),
        nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2),
        nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),  # falls back to the stock forward
        nn.Conv2d(3, 5, 3, padding="same"),  # falls back too
    ],
)
def test_a_frozen_conv_gives_the_stock_input_gradient(conv):
    conv.requires_grad_(False)
    x = torch.randn(2, conv.in_channels, 9, 9, requires_grad=True)
    conv(x).square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    handle = lean_activations(nn.Sequential(conv))
    conv(x).square().sum().backward()
    assert torch.equal(want, x.grad)
    handle.remove()


def test_a_conv_that_trains_is_left_to_autograd():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    handle = lean_activations(conv)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    conv(x).sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    handle.remove()


def test_training_restores_a_given_pipeline(tmp_path):
    from train_helpers import tiny_config
    from train_shapes import make_shapes

    from lorakit.train.loop import train

    pipe = build_tiny_pipeline("sd1")
    config = tiny_config(make_shapes(tmp_path / "data", count=4), tmp_path / "out", training={"steps": 1})
    train(config, pipe=pipe, arch="sd1")
    assert all("forward" not in m.__dict__ for m in pipe.unet.modules())
