"""Bad input: each mistake gives a LorakitError that names what is wrong, and leaves the model as it was."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import TINY_CONVS, TINY_LINEARS, build_tiny, tiny_input
from lorakit import errors
from lorakit.core import (
    DoraMagnitude,
    FullPatch,
    LoraConfig,
    LoraPatch,
    adapter_state_dict,
    attach_lora,
    attach_patches,
    detach,
    fuse,
    load_adapter_state_dict,
)
from lorakit.core.attach import registry
from lorakit.core.layer import AdaptedLayer
from lorakit.errors import AdapterError, LorakitError, ShapeError, TargetError

ALL = TINY_LINEARS + TINY_CONVS


def lora(out_f: int, in_f: int, rank: int = 2, kernel: tuple[int, ...] = ()) -> LoraPatch:
    up = torch.randn(out_f, rank, *[1] * len(kernel))
    return LoraPatch(up=up, down=torch.randn(rank, in_f, *kernel), alpha=rank)


def good_patches(model) -> dict[str, LoraPatch]:
    return {"blocks.0.to_q": lora(12, 6), "conv_in": lora(8, 3, kernel=(3, 3))}


def assert_untouched(model, saved) -> None:
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert not registry(model)
    now = model.state_dict()
    assert list(now) == list(saved) and all(torch.equal(now[k], v) for k, v in saved.items())


@pytest.fixture
def model():
    return build_tiny(0)


def test_every_error_is_a_lorakit_error():
    for name in (
        "TargetError",
        "ShapeError",
        "AdapterError",
        "FileFormatError",
        "UnsafeFileError",
        "OutputError",
        "InputError",
    ):
        assert issubclass(getattr(errors, name), LorakitError)


@pytest.mark.parametrize("targets", [r"nothing_\d+", r"blocks\.1\..*", r"conv_in\.weight"])
def test_regex_matching_nothing_names_the_pattern(model, targets):
    saved = model.state_dict()
    with pytest.raises(TargetError, match=re.escape(repr(targets))) as err:
        attach_lora(model, LoraConfig(targets=targets))
    assert isinstance(err.value, LorakitError)
    assert "conv_in" in str(err.value)  # the candidates are shown, so the user sees the real names
    assert_untouched(model, saved)


def test_list_matching_nothing_names_the_list(model):
    with pytest.raises(TargetError, match=r"to_k.*to_out"):
        attach_lora(model, LoraConfig(targets=["to_k", "to_out"]))


def test_list_entry_matching_nothing_unless_allow_missing(model):
    saved = model.state_dict()
    with pytest.raises(TargetError, match=r"\['to_k'\]") as err:
        attach_lora(model, LoraConfig(targets=["to_q", "to_k", "proj"]))
    assert "to_q" not in str(err.value).split("match no")[0]  # only the missing entry is blamed
    assert_untouched(model, saved)
    handle = attach_lora(model, LoraConfig(targets=["to_q", "to_k", "proj"], allow_missing=True))
    assert sorted(handle.modules) == ["blocks.0.to_q", "proj"]


def test_only_kxk_convs_without_conv_rank_is_a_target_error(model):
    with pytest.raises(TargetError):
        attach_lora(model, LoraConfig(targets=["conv_in", "conv_mid"]), name="style")
    assert "style" not in registry(model)
    attach_lora(model, LoraConfig(targets=["to_q"]), name="style")  # the name is free again


@pytest.mark.parametrize(
    "target,patch,shapes",
    [
        ("blocks.0.to_q", lora(12, 7), [(12, 2), (2, 7), (12, 6)]),  # wrong in_features
        ("blocks.0.to_q", lora(11, 6), [(11, 2), (2, 6), (12, 6)]),  # wrong out_features
        ("blocks.0.ff", lora(12, 6), [(12, 2), (2, 6), (5, 12)]),  # the patch of another layer
        ("conv_in", lora(8, 3, kernel=(5, 5)), [(8, 2, 1, 1), (2, 3, 5, 5), (8, 3, 3, 3)]),  # wrong kernel
        ("conv_mid", lora(8, 3, kernel=(3, 3)), [(8, 2, 1, 1), (2, 3, 3, 3), (8, 8, 3, 3)]),  # wrong in_channels
        ("proj", lora(6, 8, kernel=(3, 3)), [(6, 2, 1, 1), (2, 8, 3, 3), (6, 8, 1, 1)]),  # a 3x3 LoRA on a 1x1 conv
    ],
    ids=["linear-in", "linear-out", "linear-other", "conv-kernel", "conv-in", "conv-1x1"],
)
def test_lora_that_does_not_fit_names_module_and_shapes(model, target, patch, shapes):
    saved = model.state_dict()
    with pytest.raises(ShapeError) as err:
        attach_patches(model, {**good_patches(model), target: patch})
    message = str(err.value)
    assert target in message
    for shape in shapes:
        assert str(shape) in message, (shape, message)
    assert_untouched(model, saved)  # checked before anything changed, even the good patches


def test_transposed_full_diff_is_refused(model):
    with pytest.raises(ShapeError, match=r"blocks\.0\.to_q.*\(6, 12\).*\(12, 6\)"):
        attach_patches(model, {"blocks.0.to_q": FullPatch(diff=torch.randn(6, 12))})


def test_other_patch_kinds_that_do_not_fit(model):
    with pytest.raises(ShapeError, match=r"blocks\.0\.to_q.*\(12, 5\).*\(12, 6\)"):
        attach_patches(model, {"blocks.0.to_q": FullPatch(diff=torch.randn(12, 5))})
    with pytest.raises(ShapeError, match="blocks.0.to_v"):  # a bias difference for a layer without bias
        attach_patches(model, {"blocks.0.to_v": FullPatch(diff=torch.randn(12, 6), diff_b=torch.randn(12))})
    bad_dora = LoraPatch(up=torch.randn(12, 2), down=torch.randn(2, 6), dora=DoraMagnitude(torch.ones(7), "out"))
    with pytest.raises(ShapeError, match="blocks.0.to_q"):
        attach_patches(model, {"blocks.0.to_q": bad_dora})
    assert_untouched(model, build_tiny(0).state_dict())


def test_rank_disagreement_inside_a_patch():
    with pytest.raises(ShapeError, match="rank"):
        LoraPatch(up=torch.randn(12, 3), down=torch.randn(2, 6))


def test_unknown_patch_target_strict_and_not(model):
    patches = {**good_patches(model), "blocks.0.to_k": lora(12, 6), "unet.nothing": lora(3, 3)}
    saved = model.state_dict()
    with pytest.raises(TargetError, match=r"blocks\.0\.to_k.*unet\.nothing") as err:
        attach_patches(model, patches)
    assert "strict=False" in str(err.value)
    assert_untouched(model, saved)
    handle = attach_patches(model, patches, strict=False)
    assert handle.unmatched == ["blocks.0.to_k", "unet.nothing"]
    assert sorted(handle.modules) == ["blocks.0.to_q", "conv_in"]


def test_duplicate_adapter_name(model):
    attach_lora(model, LoraConfig(targets=["to_q"]), name="style")
    with pytest.raises(AdapterError, match="'style'"):
        attach_lora(model, LoraConfig(targets=["to_v"]), name="style")
    with pytest.raises(AdapterError, match="'style'"):
        attach_patches(model, good_patches(model), name="style")
    assert [n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)] == ["blocks.0.to_q"]
    handle = attach_patches(model, good_patches(model), name="style", replace=True)
    assert sorted(handle.modules) == ["blocks.0.to_q", "conv_in"]
    assert list(registry(model)) == ["style"]


@pytest.mark.parametrize("name", ["train", "to", "forward", "a.b", ""])
def test_names_a_module_dict_cannot_hold(model, name):
    saved = model.state_dict()
    with pytest.raises(AdapterError, match="cannot name an adapter"):
        attach_lora(model, LoraConfig(targets=["to_q"]), name=name)
    with pytest.raises(AdapterError, match="cannot name an adapter"):
        attach_patches(model, good_patches(model), name=name)
    assert_untouched(model, saved)


@pytest.mark.parametrize("how", ["remove", "detach-one", "detach-all"])
def test_removed_handle_cannot_be_used(model, how):
    handle = attach_patches(model, good_patches(model), name="style")
    other = attach_lora(model, LoraConfig(targets=["to_v"]), name="other")
    if how == "remove":
        handle.remove()
    else:
        detach(model, "style" if how == "detach-one" else None)
    x = tiny_input(0)
    calls = [
        lambda: handle.set_weight(0.5),
        lambda: handle.weight,
        lambda: handle.enabled,
        handle.enable,
        handle.disable,
        handle.fuse,
        handle.remove,
        lambda: handle.set_multipliers({"conv_in": 0.5}),
        lambda: adapter_state_dict(model, "style"),
    ]
    for call in calls:
        with pytest.raises(AdapterError, match="style"):
            call()
    with pytest.raises(AdapterError, match="style"):
        detach(model, "style")
    with pytest.raises(AdapterError, match="style"):
        fuse(model, ["style"])
    with torch.no_grad():
        model(x)  # the model still runs
    if how == "detach-all":
        with pytest.raises(AdapterError):
            other.set_weight(2.0)
    else:
        other.set_weight(2.0)


def test_load_state_dict_that_does_not_fit(model):
    attach_lora(model, LoraConfig(rank=2, targets=["to_q", "proj"]), name="style")
    sd = adapter_state_dict(model, "style")
    missing = {k: v for k, v in sd.items() if not k.startswith("proj.")}
    with pytest.raises(AdapterError, match="missing.*proj"):
        load_adapter_state_dict(model, "style", missing)
    with pytest.raises(AdapterError, match="unexpected.*conv_in"):
        load_adapter_state_dict(model, "style", {**sd, "conv_in.lora_A": torch.zeros(2, 3, 3, 3)})
    wrong = {**sd, "blocks.0.to_q.lora_A": torch.zeros(3, 6)}
    with pytest.raises(AdapterError, match=r"blocks\.0\.to_q\.lora_A.*\(3, 6\).*\(2, 6\)"):
        load_adapter_state_dict(model, "style", wrong)
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        load_adapter_state_dict(model, "nope", sd)


def test_bad_config_values_are_refused_on_construction():
    for kwargs in ({"rank": 0}, {"conv_rank": 0}, {"dropout": 1.0}, {"alpha": -1.0}, {"conv_alpha": 0.0}):
        with pytest.raises(ValueError):
            LoraConfig(**kwargs)
