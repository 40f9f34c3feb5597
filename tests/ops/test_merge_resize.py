"""merge_loras and resize_lora against dense references (torch.linalg.svd) and PEFT's svd combination."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.core.patches import FullPatch, LohaPatch, LoraPatch
from lorakit.errors import LorakitError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.ops.merge import merge_loras
from lorakit.ops.resize import resize_lora

torch.set_num_threads(1)

SHAPES = {"a.to_q": (24, 16), "a.to_k": (24, 16), "b.conv": (12, 8, 3, 3), "b.proj": (12, 8, 1, 1)}


def _lora(rank: int, alpha: float, seed: int, modules=SHAPES) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    patches = {}
    for name, (out, inp, *k) in modules.items():
        up = torch.randn(out, rank, *([1] * len(k)), generator=g)
        down = torch.randn(rank, inp, *k, generator=g) / inp**0.5
        patches[Target("unet", name)] = LoraPatch(up=up, down=down, alpha=alpha)
    return LoraFile(patches=patches, arch="sd1")


def _dense(lora: LoraFile, target: Target, shape) -> torch.Tensor:
    return lora.patches[target].delta(torch.Size(shape)).double()


def _weighted_sum(inputs, target, shape):
    return sum(w * _dense(lora, target, shape) for lora, w in inputs if target in lora.patches)


def test_concat_merge_is_exact_for_mixed_ranks_and_negative_weights():
    inputs = [(_lora(4, 2.0, 0), 0.8), (_lora(8, 8.0, 1), -0.5), (_lora(2, 1.0, 2), 1.3)]
    result = merge_loras(inputs, method="concat")
    for target, patch in result.lora.patches.items():
        shape = SHAPES[target.module]
        assert patch.rank == 14
        torch.testing.assert_close(
            patch.delta(torch.Size(shape)).double(), _weighted_sum(inputs, target, shape), rtol=1e-5, atol=1e-5
        )
    assert result.worst_error == 0.0


@settings(max_examples=15, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 8), min_size=2, max_size=3),
    rank=st.integers(1, 10),
    weights=st.lists(st.floats(-1.5, 1.5).filter(lambda w: abs(w) > 0.05), min_size=3, max_size=3),
)
def test_svd_merge_error_is_the_discarded_energy(ranks, rank, weights):
    inputs = [(_lora(r, r / 2, i), w) for i, (r, w) in enumerate(zip(ranks, weights))]
    result = merge_loras(inputs, method="svd", rank=rank)
    for report in result.modules:
        target = next(t for t in result.lora.patches if str(t) == report.target)
        shape = SHAPES[target.module]
        exact = _weighted_sum(inputs, target, shape)
        s = torch.linalg.svdvals(exact.flatten(1))
        k = min(rank, sum(ranks))
        expected = float(((s[k:] ** 2).sum() / (s**2).sum()) ** 0.5)
        merged = result.lora.patches[target].delta(torch.Size(shape)).double()
        actual = float((merged - exact).norm() / exact.norm())
        assert report.error == pytest.approx(expected, abs=1e-5)
        assert actual == pytest.approx(expected, abs=1e-5)


def test_mixed_kinds_merge_through_their_deltas():
    g = torch.Generator().manual_seed(3)
    loha = LohaPatch(
        w1a=torch.randn(24, 2, generator=g),
        w1b=torch.randn(2, 16, generator=g),
        w2a=torch.randn(24, 2, generator=g),
        w2b=torch.randn(2, 16, generator=g),
        alpha=1.0,
    )
    target = Target("unet", "a.to_q")
    inputs = [(_lora(4, 4.0, 0, {"a.to_q": (24, 16)}), 0.7), (LoraFile(patches={target: loha}, arch="sd1"), 0.4)]
    exact = _weighted_sum(inputs, target, (24, 16))
    concat = merge_loras(inputs, method="concat")
    assert isinstance(concat.lora.patches[target], FullPatch)
    torch.testing.assert_close(concat.lora.patches[target].delta().double(), exact, rtol=1e-5, atol=1e-5)
    svd = merge_loras(inputs, method="svd", rank=3)
    s = torch.linalg.svdvals(exact)
    expected = float(((s[3:] ** 2).sum() / (s**2).sum()) ** 0.5)
    assert svd.modules[0].error == pytest.approx(expected, abs=1e-5)


def test_merge_refuses_other_architectures_and_unknown_methods():
    other = _lora(2, 2.0, 1)
    other.arch = "sdxl"
    with pytest.raises(LorakitError, match="different architectures"):
        merge_loras([(_lora(2, 2.0, 0), 1.0), (other, 1.0)])
    with pytest.raises(LorakitError, match="needs --rank"):
        merge_loras([(_lora(2, 2.0, 0), 1.0)], method="svd")


@pytest.mark.parametrize("rank", [1, 3, 8, 50])
def test_resize_error_is_the_discarded_energy_and_never_overflows(rank):
    lora = _lora(8, 4.0, 5)
    result = resize_lora(lora, rank=rank)
    for target, patch in result.lora.patches.items():
        shape = SHAPES[target.module]
        exact = _dense(lora, target, shape)
        s = torch.linalg.svdvals(exact.flatten(1))
        k = min(rank, 8)
        assert patch.rank == k
        expected = float(((s[k:] ** 2).sum() / (s**2).sum()) ** 0.5)
        actual = float((patch.delta(torch.Size(shape)).double() - exact).norm() / exact.norm())
        assert actual == pytest.approx(expected, abs=1e-5)
    assert lora.patches[Target("unet", "a.to_q")].rank == 8  # the input is untouched


def test_resize_dynamic_fro_keeps_the_asked_energy():
    lora = _lora(16, 16.0, 6, {"a.to_q": (64, 64)})
    result = resize_lora(lora, fro=0.9)
    report = result.modules[0]
    assert report.energy_kept >= 0.9 - 1e-9
    smaller = resize_lora(lora, rank=report.rank_out - 1).modules[0]
    assert smaller.energy_kept < 0.9


def test_svd_merge_agrees_with_peft_add_weighted_adapter():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 24))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), adapter_name="x")
    model.add_adapter("y", LoraConfig(r=6, lora_alpha=3, target_modules=["0"]))
    layer = model.base_model.model[0]
    files = []
    for name in ("x", "y"):
        torch.nn.init.normal_(layer.lora_B[name].weight)
        up, down = layer.lora_B[name].weight.detach().clone(), layer.lora_A[name].weight.detach().clone()
        patch = LoraPatch(up=up, down=down, alpha=float(layer.lora_alpha[name]))
        files.append(LoraFile(patches={Target("unet", "0"): patch}))
    model.add_weighted_adapter(["x", "y"], [0.6, -0.9], "merged", combination_type="svd", svd_rank=5)
    peft_delta = layer.get_delta_weight("merged").double()
    ours = merge_loras([(files[0], 0.6), (files[1], -0.9)], method="svd", rank=5)
    torch.testing.assert_close(
        ours.lora.patches[Target("unet", "0")].delta().double(), peft_delta, rtol=1e-4, atol=1e-5
    )
