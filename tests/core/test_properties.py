"""Property tests of the engine: round trips that must be exact, and the algebra of strength."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_CONVS, TINY_LINEARS, build_tiny, tiny_input
from lorakit.core import (
    DoraMagnitude,
    LoraConfig,
    LoraPatch,
    adapter_state_dict,
    adapters_disabled,
    attach_lora,
    attach_patches,
    detach,
    fuse,
    load_adapter_state_dict,
    unfuse,
)
from lorakit.core.attach import adapted_layers
from lorakit.core.layer import AdaptedLayer

ALL = TINY_LINEARS + TINY_CONVS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FEW = settings(max_examples=25, deadline=None)

seeds = st.integers(0, 2**16)
strengths = st.floats(-2.0, 2.0, allow_nan=False).filter(lambda s: abs(s) > 0.05)  # visible even in bf16
target_sets = st.lists(st.sampled_from(ALL), min_size=1, max_size=len(ALL), unique=True)
ranks = st.integers(1, 5)


def random_patches(model, targets, rank, seed, *, dtype=torch.float32, dora=False) -> dict[str, LoraPatch]:
    """Seeded random LoRA patches fitting ``model``'s layers (DoRA on the Linears when asked)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in targets:
        layer = model.get_submodule(name)
        layer = layer.base_layer if isinstance(layer, AdaptedLayer) else layer
        out_f, in_f, *kernel = layer.weight.shape
        up = torch.randn(out_f, rank, *[1] * len(kernel), generator=gen) * 0.3
        down = torch.randn(rank, in_f, *kernel, generator=gen) * 0.3
        mag = None
        if dora and not kernel:
            mag = DoraMagnitude((torch.rand(out_f, generator=gen) + 0.5).to(dtype), "out")
        out[name] = LoraPatch(up=up.to(dtype), down=down.to(dtype), alpha=rank * 1.5, dora=mag)
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_bits(model, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(saved)
    for k, v in saved.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def plain_params(model) -> dict[str, torch.Tensor]:
    """The base model's own parameters, by their original names (adapter tensors left out)."""
    return {k.replace(".base_layer", ""): v for k, v in model.named_parameters() if ".adapters." not in k}


def layer_outputs(model, seed) -> dict[str, torch.Tensor]:
    """Each adapted layer run on its own fixed random input (so nonlinear layers between do not matter)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in adapted_layers(model):
        base = layer.base_layer
        if isinstance(base, torch.nn.Conv2d):
            x = torch.randn(2, base.in_channels, 6, 6, generator=gen)
        else:
            x = torch.randn(3, base.in_features, generator=gen)
        out[name] = layer(x.to(base.weight.dtype))
    return out


@FEW
@given(
    seed=seeds,
    targets=target_sets,
    rank=ranks,
    dtype=st.sampled_from(DTYPES),
    weight=strengths,
    dora=st.booleans(),
    rounds=st.integers(1, 3),
)
def test_fuse_then_unfuse_is_bitwise_identity(seed, targets, rank, dtype, weight, dora, rounds):
    model = build_tiny(seed % 7, dtype)
    saved = snapshot(model)
    handle = attach_patches(
        model, random_patches(model, targets, rank, seed, dtype=dtype, dora=dora), "p", weight=weight
    )
    params = {k: v.detach().clone() for k, v in plain_params(model).items()}
    for _ in range(rounds):
        fuse(model)
        assert any(not torch.equal(plain_params(model)[k], params[k]) for k in params)
        handle.set_weight(weight * 0.5)  # recomputed from the kept original, never stacked
        unfuse(model)
        for k, v in plain_params(model).items():
            assert torch.equal(v, params[k]), k
    detach(model)
    assert_same_bits(model, saved)


@FEW
@given(seed=seeds, targets=target_sets, rank=ranks, weight=strengths, dora=st.booleans())
def test_dynamic_equals_fused(seed, targets, rank, weight, dora):
    model, x = build_tiny(seed % 5), tiny_input(seed % 3)
    attach_patches(model, random_patches(model, targets, rank, seed, dora=dora), "p", weight=weight)
    with torch.no_grad():
        dynamic = model(x)
        fuse(model)
        fused = model(x)
    scale = max(1.0, dynamic.abs().max().item())
    torch.testing.assert_close(fused, dynamic, atol=2e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_equals_fused_low_precision(dtype):
    model, x = build_tiny(2, dtype), tiny_input(2, dtype)
    attach_patches(model, random_patches(model, ALL, 4, 3, dtype=dtype), "p", weight=0.8)
    with torch.no_grad():
        dynamic = model(x).float()
        fuse(model)
        fused = model(x).float()
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(fused, dynamic, atol=tol * max(1.0, dynamic.abs().max().item()), rtol=0.05)


@FEW
@given(
    seed=seeds, targets=target_sets, rank=ranks, dtype=st.sampled_from(DTYPES), dora=st.booleans(), fused=st.booleans()
)
def test_weight_zero_is_the_base_model_exactly(seed, targets, rank, dtype, dora, fused):
    model, x = build_tiny(seed % 5, dtype), tiny_input(seed % 3, dtype)
    with torch.no_grad():
        base = model(x)
    handle = attach_patches(model, random_patches(model, targets, rank, seed, dtype=dtype, dora=dora), "p")
    handle.set_weight(0.0)
    if fused:
        fuse(model)
    with torch.no_grad():
        assert torch.equal(model(x), base)


@FEW
@given(
    seed=seeds, targets=target_sets, rank=ranks, dtype=st.sampled_from(DTYPES), fused=st.booleans(), two=st.booleans()
)
def test_detach_restores_original_modules_and_bits(seed, targets, rank, dtype, fused, two):
    model = build_tiny(seed % 5, dtype)
    modules = dict(model.named_modules())
    saved = snapshot(model)
    attach_patches(model, random_patches(model, targets, rank, seed, dtype=dtype), "p", weight=0.9)
    if two:
        attach_lora(model, LoraConfig(rank=rank, conv_rank=rank, targets=ALL), "trainable")
    if fused:
        fuse(model)
    detach(model)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    now = dict(model.named_modules())
    assert list(now) == list(modules)
    assert all(now[k] is v for k, v in modules.items())
    assert_same_bits(model, saved)


@FEW
@given(seed=seeds, targets=target_sets, rank=ranks, s=st.floats(-3.0, 3.0, allow_nan=False), dora=st.booleans())
def test_set_weight_acts_linearly(seed, targets, rank, s, dora):
    model = build_tiny(seed % 5)
    handle = attach_patches(model, random_patches(model, targets, rank, seed, dora=dora), "p")
    with torch.no_grad():
        with adapters_disabled(model):
            base = layer_outputs(model, seed)
        one = layer_outputs(model, seed)
        handle.set_weight(s)
        at_s = layer_outputs(model, seed)
    for name in base:
        expected = base[name] + s * (one[name] - base[name])
        scale = max(1.0, one[name].abs().max().item())
        torch.testing.assert_close(at_s[name], expected, atol=1e-5 * scale * max(1.0, abs(s)), rtol=1e-5)


@FEW
@given(seed=seeds, targets=target_sets, rank=ranks, fused=st.booleans(), weight=strengths)
def test_enable_disable_and_context_restore(seed, targets, rank, fused, weight):
    model, x = build_tiny(seed % 5), tiny_input(seed % 3)
    with torch.no_grad():
        base = model(x)
    handle = attach_patches(model, random_patches(model, targets, rank, seed), "p", weight=weight)
    other = attach_patches(model, random_patches(model, targets[:1], rank, seed + 1), "q", weight=0.5)
    if fused:
        handle.fuse()
    with torch.no_grad():
        before = model(x)
        with adapters_disabled(model):
            assert torch.equal(model(x), base)
            assert not handle.enabled and not other.enabled
        assert handle.enabled and other.enabled and handle.weight == weight
        assert torch.equal(model(x), before)
        handle.disable()
        other.disable()
        assert torch.equal(model(x), base)
        handle.enable()
        other.enable()
        assert torch.equal(model(x), before)


@FEW
@given(
    seed=seeds,
    targets=target_sets,
    rank=ranks,
    conv_rank=st.one_of(st.none(), ranks),
    rslora=st.booleans(),
    tucker=st.booleans(),
)
def test_adapter_state_dict_round_trip(seed, targets, rank, conv_rank, rslora, tucker):
    config = LoraConfig(
        rank=rank,
        alpha=2.0,
        conv_rank=conv_rank,
        targets=targets,
        use_rslora=rslora,
        conv_tucker=tucker,
        allow_missing=True,
    )
    if conv_rank is None and not any(math.prod(build_tiny().get_submodule(t).weight.shape[2:]) == 1 for t in targets):
        return  # only 3x3 convs targeted and conv_rank None: nothing to attach (tested in test_errors)
    src, x = build_tiny(seed % 5), tiny_input(seed % 3)
    attach_lora(src, config, "trainable")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for n, p in src.named_parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)  # as if trained
    sd = adapter_state_dict(src, "trainable")
    dst = build_tiny(seed % 5)
    attach_lora(dst, config, "trainable")
    load_adapter_state_dict(dst, "trainable", sd)
    again = adapter_state_dict(dst, "trainable")
    assert list(again) == list(sd)
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    # The state dict is a copy: changing it does not touch the model.
    next(iter(sd.values())).add_(1.0)
    assert all(torch.equal(adapter_state_dict(src, "trainable")[k], again[k]) for k in again)


@pytest.mark.parametrize("tucker", [False, True])
def test_only_adapter_params_train_and_gradients_flow(tucker):
    model, x = build_tiny(1), tiny_input(1)
    model.train()
    handle = attach_lora(model, LoraConfig(rank=3, conv_rank=2, targets=ALL, conv_tucker=tucker), "trainable")
    assert sorted(handle.modules) == sorted(ALL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.trainable.lora_" in n for n in trainable)
    assert any(n.endswith("lora_mid") for n in trainable) == tucker
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
        elif n.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:  # with B zero, nothing flows back to A (or the Tucker core) yet
            assert p.grad is None or p.grad.abs().sum() == 0, n
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.fill_(0.05)
    model.zero_grad()
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


@FEW
@given(seed=seeds, rank=ranks, dtype=st.sampled_from(DTYPES), rslora=st.booleans(), tucker=st.booleans())
def test_fresh_adapter_is_kaiming_a_zero_b_and_leaves_output_unchanged(seed, rank, dtype, rslora, tucker):
    torch.manual_seed(seed)
    model, x = build_tiny(seed % 5, dtype), tiny_input(seed % 3, dtype)
    with torch.no_grad():
        base = model(x)
    attach_lora(model, LoraConfig(rank=rank, conv_rank=rank, targets=ALL, use_rslora=rslora, conv_tucker=tucker))
    with torch.no_grad():
        assert torch.equal(model(x), base)
    for name, layer in adapted_layers(model):
        adapter = layer.adapters["default"]
        a, b = adapter.lora_A, adapter.lora_B
        assert torch.count_nonzero(b) == 0
        # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in * kh * kw of A.
        bound = 1.0 / math.sqrt(math.prod(a.shape[1:]))
        assert a.abs().max() <= bound and torch.unique(a).numel() >= 0.9 * a.numel(), name  # random, not constant
        if a.numel() >= 100:  # U(-b, b) has std b / sqrt(3) = 0.577 b
            assert 0.45 * bound < a.std() < 0.7 * bound, name
