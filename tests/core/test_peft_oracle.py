"""PEFT is the oracle for the layer math: the same base model and the same A, B, alpha give the same outputs.

PEFT wraps a copy of the tiny model (``get_peft_model`` on a plain nn.Module), its factors are set to seeded random
values, and the very same tensors go into lorakit (``attach_patches`` with ``LoraPatch`` or ``attach_lora`` plus
``load_adapter_state_dict``). Outputs agree at fp32 ``atol=1e-5``.

Multi-adapter weighting: PEFT's ``LoraLayer.set_scale(name, w)`` sets ``scaling = w * alpha / r`` (what diffusers'
``set_adapters(weights=...)`` does), and with ``set_adapter([a, b])`` the forward is
``base(x) + sum_i scaling_i B_i A_i x``: the delta ``sum_i w_i * scale_i * B_i A_i``, lorakit's ``sum_i s_i dW_i``.
``add_weighted_adapter(..., combination_type="cat")`` builds one adapter with ``A = cat(w_i * scale_i * A_i)``,
``B = cat(B_i)`` and scale 1: the same sum, computed another way, used as a second oracle.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig as PeftConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from conftest import TINY_CONVS, TINY_LINEARS, build_tiny, tiny_input
from lorakit.core import (
    DoraMagnitude,
    LoraConfig,
    LoraPatch,
    adapter_state_dict,
    attach_lora,
    attach_patches,
    fuse,
    load_adapter_state_dict,
    unfuse,
)

ATOL = 1e-5
ALL = TINY_LINEARS + TINY_CONVS
PREFIX = "base_model.model."


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def peft_layers(pm, name: str) -> dict[str, LoraLayer]:
    return {n.removeprefix(PREFIX): m for n, m in pm.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


@torch.no_grad()
def randomize(pm, name: str, seed: int) -> dict[str, LoraPatch]:
    """Seeded random A and B in PEFT's adapter ``name``; the same tensors as lorakit patches (alpha = scale * r)."""
    gen = torch.Generator().manual_seed(seed)
    patches = {}
    for mod, layer in peft_layers(pm, name).items():
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        a.copy_(torch.randn(a.shape, generator=gen) * 0.3)
        b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
        r = layer.r[name]
        patches[mod] = LoraPatch(up=b.clone(), down=a.clone(), alpha=layer.scaling[name] * r)
    return patches


def make_peft(base, targets, r=3, alpha=5.0, name="default", **kw):
    pm = get_peft_model(
        copy.deepcopy(base), PeftConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw), adapter_name=name
    )
    return pm.eval()


@pytest.mark.parametrize(
    "target",
    ["blocks.0.to_q", "blocks.0.to_v", "proj", "conv_in", "conv_mid"],
    ids=["linear", "linear-nobias", "conv1x1", "conv3x3-stride-pad", "conv3x3-nobias"],
)
def test_single_layer_matches_peft(target):
    base, x = build_tiny(1), tiny_input(1)
    pm = make_peft(base, [target])
    patches = randomize(pm, "default", seed=2)
    ours = copy.deepcopy(base)
    attach_patches(ours, patches, "default")
    with torch.no_grad():
        ref = pm(x)
        assert not torch.allclose(ref, base(x), atol=1e-3)  # the adapter does something
        close(ours(x), ref)
        # The dense delta agrees with PEFT's own get_delta_weight too.
        close(
            patches[target].delta(base.get_submodule(target).weight.shape),
            pm.get_submodule(PREFIX + target).get_delta_weight("default"),
        )


def test_every_layer_kind_at_once_via_attach_lora():
    """A trainable lorakit LoRA loaded with PEFT's factors through the state-dict API gives PEFT's outputs."""
    base, x = build_tiny(3), tiny_input(3)
    pm = make_peft(base, ALL, r=4, alpha=2.0)
    randomize(pm, "default", seed=4)
    ours = copy.deepcopy(base)
    handle = attach_lora(ours, LoraConfig(rank=4, alpha=2.0, conv_rank=4, conv_alpha=2.0, targets=ALL))
    assert sorted(handle.modules) == sorted(ALL)
    sd = adapter_state_dict(ours, "default")
    for mod, layer in peft_layers(pm, "default").items():
        sd[f"{mod}.lora_A"] = layer.lora_A["default"].weight.detach().clone()
        sd[f"{mod}.lora_B"] = layer.lora_B["default"].weight.detach().clone()
    load_adapter_state_dict(ours, "default", sd)
    with torch.no_grad():
        close(ours(x), pm(x))


@pytest.mark.parametrize("rank", [2, 9])
def test_rslora_scaling_matches_peft(rank):
    base, x = build_tiny(5), tiny_input(5)
    pm = make_peft(base, ALL, r=rank, alpha=3.0, use_rslora=True)
    assert math.isclose(pm.get_submodule(PREFIX + "proj").scaling["default"], 3.0 / math.sqrt(rank))
    patches = randomize(pm, "default", seed=6)
    ours = copy.deepcopy(base)
    attach_lora(ours, LoraConfig(rank=rank, alpha=3.0, conv_rank=rank, conv_alpha=3.0, targets=ALL, use_rslora=True))
    sd = adapter_state_dict(ours, "default")
    for mod, p in patches.items():
        sd[f"{mod}.lora_A"], sd[f"{mod}.lora_B"] = p.down, p.up
    load_adapter_state_dict(ours, "default", sd)
    with torch.no_grad():
        close(ours(x), pm(x))
        # The rsLoRA scale is exported as the equivalent plain alpha: the patches give the same model.
        exported = copy.deepcopy(base)
        attach_patches(exported, patches, "default")
        close(exported(x), pm(x))


def _two_adapter_peft(base):
    """PEFT with adapter "first" (rank 2) on the Linears and the 1x1 conv, "second" (rank 3) on every layer."""
    pm = make_peft(base, TINY_LINEARS + ["proj"], r=2, alpha=4.0, name="first")
    pm.add_adapter("second", PeftConfig(r=3, lora_alpha=1.5, target_modules=ALL))
    pm.eval()
    return pm, randomize(pm, "first", seed=7), randomize(pm, "second", seed=8)


@pytest.mark.parametrize("weights", [(0.7, -1.3), (1.0, 1.0), (0.0, 2.5)])
def test_several_adapters_with_weights_match_peft(weights):
    wa, wb = weights
    base, x = build_tiny(9), tiny_input(9)
    pm, pa, pb = _two_adapter_peft(base)
    pm.base_model.set_adapter(["first", "second"])
    for layer in (m for m in pm.modules() if isinstance(m, LoraLayer)):
        layer.set_scale("first", wa)  # scaling = w * alpha / r, as diffusers' set_adapters does
        layer.set_scale("second", wb)
    ours = copy.deepcopy(base)
    attach_patches(ours, pa, "first", weight=wa)
    hb = attach_patches(ours, pb, "second")
    hb.set_weight(wb)
    with torch.no_grad():
        ref = pm(x)
        close(ours(x), ref)
        fuse(ours)
        close(ours(x), ref)
        unfuse(ours)
        close(ours(x), ref)


def test_several_adapters_match_peft_cat_combination():
    wa, wb = 0.6, -0.9
    base, x = build_tiny(10), tiny_input(10)
    pm, pa, pb = _two_adapter_peft(base)
    pm.add_weighted_adapter(["first", "second"], [wa, wb], "ab", combination_type="cat")
    pm.set_adapter("ab")
    ours = copy.deepcopy(base)
    attach_patches(ours, pa, "first", weight=wa)
    attach_patches(ours, pb, "second", weight=wb)
    with torch.no_grad():
        close(ours(x), pm(x))


@pytest.mark.parametrize("seed", [11, 12])
def test_fused_matches_peft_merged_and_dynamic(seed):
    base, x = build_tiny(seed), tiny_input(seed)
    pm = make_peft(base, ALL, r=3, alpha=6.0)
    patches = randomize(pm, "default", seed=seed + 100)
    ours = copy.deepcopy(base)
    handle = attach_patches(ours, patches, "default")
    with torch.no_grad():
        dynamic_peft = pm(x)
        dynamic = ours(x)
        pm.merge_adapter()
        merged_peft = pm(x)
        handle.fuse()
        fused = ours(x)
        close(dynamic, dynamic_peft)
        close(fused, merged_peft)
        close(fused, dynamic)
        # The fused weights are PEFT's merged weights.
        for mod in ALL:
            close(ours.get_submodule(mod).base_layer.weight, pm.get_submodule(PREFIX + mod).base_layer.weight)


def test_fuse_unfuse_round_trips_stay_on_peft():
    base, x = build_tiny(13), tiny_input(13)
    pm = make_peft(base, ALL, r=2, alpha=2.0)
    patches = randomize(pm, "default", seed=14)
    ours = copy.deepcopy(base)
    handle = attach_patches(ours, patches, "default")
    with torch.no_grad():
        ref = pm(x)
        pm.merge_adapter()
        merged = pm(x)
        pm.unmerge_adapter()
        for i in range(4):
            handle.fuse()
            close(ours(x), merged)
            unfuse(ours)
            close(ours(x), ref)
        close(pm(x), ref)
        handle.set_weight(0.5)
        handle.fuse()
        handle.set_weight(1.0)  # a fused adapter's weight change recomputes from the kept original
        close(ours(x), merged)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("blocks.0.to_q", id="linear"),
        pytest.param("blocks.0.to_v", id="linear-nobias"),
        pytest.param("proj", id="conv1x1"),
        pytest.param("conv_in", id="conv3x3-stride-pad"),
        pytest.param("conv_mid", id="conv3x3-nobias"),
    ],
)
def test_dora_row_axis_matches_peft(target):
    """LoraPatch + DoraMagnitude(m, "out") equals PEFT's use_dora layer with the same A, B and magnitude vector."""
    base, x = build_tiny(15), tiny_input(15)
    pm = make_peft(base, [target], r=3, alpha=4.0, use_dora=True)
    patches = randomize(pm, "default", seed=16)
    layer = pm.get_submodule(PREFIX + target)
    mag = layer.lora_magnitude_vector["default"].weight
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        mag.copy_(mag * (1.0 + 0.5 * torch.rand(mag.shape, generator=gen)))  # not the initial norms
    patch = patches[target]
    dora = LoraPatch(
        up=patch.up, down=patch.down, alpha=patch.alpha, dora=DoraMagnitude(mag.detach().flatten().clone(), "out")
    )
    ours = copy.deepcopy(base)
    handle = attach_patches(ours, {target: dora}, "default")
    with torch.no_grad():
        ref = pm(x)
        assert not torch.allclose(ref, base(x), atol=1e-3)
        close(ours(x), ref)
        pm.merge_adapter()
        merged = pm(x)
        handle.fuse()
        close(ours(x), merged)
        close(ours.get_submodule(target).base_layer.weight, layer.base_layer.weight)
        unfuse(ours)
        close(ours(x), ref)
