"""The apply API on tiny pipelines: block weights against a dense reference, handles, fuse, strictness, removal."""

from __future__ import annotations

import re

import pytest
import torch
from lora_pipelines import canonical_name, generate, random_lora, state_of

from lorakit.core.layer import AdaptedLayer
from lorakit.core.patches import LoraPatch
from lorakit.errors import AdapterError, ConfigError, TargetError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.generate import apply_lora, lora_components
from lorakit.models import build_tiny_pipeline


def _sd_block(component: str, name: str) -> str | None:
    """SD1's LDM block of a diffusers module, written out independently of lorakit (3 slots per level)."""
    if component.startswith("text_encoder"):
        return "BASE"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", name):
        return f"IN{3 * int(m[1]) + int(m[3]) + 1:02d}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", name):
        return f"IN{3 * int(m[1]) + 3:02d}"
    if name.startswith("mid_block."):
        return "M00"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", name):
        return f"OUT{3 * int(m[1]) + int(m[3]):02d}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.", name):
        return f"OUT{3 * int(m[1]) + 2:02d}"
    return None


BLOCKS = {
    "BASE": 0.25,
    "IN01": 0.0,
    "IN02": 1.5,
    "IN04": -0.5,
    "IN05": 2.0,
    "M00": 0.5,
    "OUT00": 0.75,
    "OUT01": 0.0,
    "OUT02": 1.25,
    "OUT03": -1.0,
    "OUT04": 0.3,
    "OUT05": 3.0,
}


def _dense_reference(lora: LoraFile, weight: float, blocks: dict[str, float]):
    """A fresh pipeline with ``W + weight * m_block * (alpha / r) * up @ down`` written into its weights."""
    pipe = build_tiny_pipeline("sd1")
    models = lora_components(pipe)
    hit = set()
    with torch.no_grad():
        for component, model in models.items():
            for name, module in model.named_modules():
                target = Target(component, canonical_name(component, model, name))
                patch = lora.patches.get(target)
                if patch is None:
                    continue
                block = _sd_block(component, name)
                hit.add(name.split(".")[0] + (".resnets" if "resnets" in name else ".attn" if "attn" in name else ""))
                factor = weight * blocks.get(block, 1.0) * patch.alpha / patch.rank
                delta = (patch.up.flatten(1) @ patch.down.flatten(1)).reshape(module.weight.shape)
                module.weight += factor * delta
    return pipe, hit


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
def test_block_weights_match_a_dense_reference(mode):
    pipe = build_tiny_pipeline("sd1")
    lora = random_lora(pipe, "sd1", 5)
    reference, hit = _dense_reference(lora, 0.8, BLOCKS)
    assert {"down_blocks.resnets", "down_blocks.attn", "mid_block.resnets", "up_blocks.resnets"} <= hit
    handle = apply_lora(pipe, lora, weight=0.8, blocks=BLOCKS, mode=mode)
    expected = generate(reference)
    torch.testing.assert_close(torch.from_numpy(generate(pipe)), torch.from_numpy(expected), atol=2e-5, rtol=0)
    handle.set_blocks(None)  # every block back to 1: a different image
    assert abs(generate(pipe) - expected).max() > 1e-3


def test_lbw_spec_equals_the_same_dict():
    pipe = build_tiny_pipeline("sd1")
    lora = random_lora(pipe, "sd1", 6)
    spec = "0.5,1,0,1,0.25,1,1,2,1,1,0,1,1,1,1,1,1"  # BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03..OUT11
    handle = apply_lora(pipe, lora, blocks=spec)
    by_spec = generate(pipe)
    handle.set_blocks({"BASE": 0.5, "IN02": 0.0, "IN05": 0.25, "M00": 2.0, "OUT05": 0.0})
    assert (generate(pipe) == by_spec).all()
    with pytest.raises(ConfigError, match="17 or 26"):
        handle.set_blocks("1,2,3")


def test_handles_weights_switches_and_removal_restore_bit_for_bit():
    pipe = build_tiny_pipeline("sd1")
    before = state_of(pipe)
    base = generate(pipe)
    a = apply_lora(pipe, random_lora(pipe, "sd1", 7), weight=0.6, name="a")
    b = apply_lora(pipe, random_lora(pipe, "sd1", 8), weight=0.4, name="b", mode="fused")
    both = generate(pipe)
    a.set_weight(0.0)
    b.set_weight(0.0)
    torch.testing.assert_close(torch.from_numpy(generate(pipe)), torch.from_numpy(base), atol=1e-6, rtol=0)
    a.set_weight(0.6)
    b.set_weight(0.4)
    torch.testing.assert_close(torch.from_numpy(generate(pipe)), torch.from_numpy(both), atol=1e-6, rtol=0)
    a.disable()
    b.disable()
    assert abs(generate(pipe) - base).max() < 1e-6
    a.enable()
    b.enable()
    b.unfuse()
    a.fuse()
    a.set_blocks({"M00": 0.0})
    fused_blocks = generate(pipe)
    a.unfuse()
    torch.testing.assert_close(torch.from_numpy(generate(pipe)), torch.from_numpy(fused_blocks), atol=2e-5, rtol=0)
    a.remove()
    b.remove()
    after = state_of(pipe)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, AdaptedLayer) for c in lora_components(pipe).values() for m in c.modules())
    assert (generate(pipe) == base).all()


def test_a_name_is_used_once_per_pipeline():
    pipe = build_tiny_pipeline("sd1")
    apply_lora(pipe, random_lora(pipe, "sd1", 1), name="x")
    with pytest.raises(AdapterError):
        apply_lora(pipe, random_lora(pipe, "sd1", 2), name="x")


def test_unmatched_targets_are_an_error_or_a_report():
    pipe = build_tiny_pipeline("sd1")
    lora = random_lora(pipe, "sd1", 9)
    lora.patches[Target("unet", "down_blocks.7.attentions.0.proj_in")] = LoraPatch(
        up=torch.zeros(4, 2), down=torch.zeros(2, 4)
    )
    lora.patches[Target("transformer", "single_transformer_blocks.0.proj_mlp")] = LoraPatch(
        up=torch.zeros(4, 2), down=torch.zeros(2, 4)
    )
    with pytest.raises(TargetError, match=r"2 of \d+ targets match no module.*down_blocks\.7.*proj_mlp"):
        apply_lora(pipe, lora)
    assert not any(isinstance(m, AdaptedLayer) for m in pipe.unet.modules())  # nothing half-applied
    handle = apply_lora(pipe, lora, strict=False)
    assert sorted(handle.report.unmatched) == [
        "transformer.single_transformer_blocks.0.proj_mlp",
        "unet.down_blocks.7.attentions.0.proj_in",
    ]
    assert handle.report.matched["unet"] > 0 and handle.report.matched["text_encoder"] > 0


def test_row_slices_of_one_weight_are_stacked_exactly():
    pipe = build_tiny_pipeline("flux")
    module = "transformer_blocks.0.attn.to_q"
    out = pipe.transformer.get_submodule(module).weight.shape[0]
    whole = random_lora(pipe, "flux", 10, components=("transformer",))
    patch = whole.patches[Target("transformer", module)]
    sliced = LoraFile(patches=dict(whole.patches), arch="flux")
    del sliced.patches[Target("transformer", module)]
    half = out // 2
    # the upper half carries the patch's rows, the lower half gets a patch of a different rank and alpha
    sliced.patches[Target("transformer", module, (0, half))] = LoraPatch(
        up=patch.up[:half], down=patch.down, alpha=patch.alpha
    )
    sliced.patches[Target("transformer", module, (half, out))] = LoraPatch(
        up=patch.up[half:] * 2, down=patch.down, alpha=patch.alpha / 2
    )
    h = apply_lora(pipe, whole)
    expected = generate(pipe)
    h.remove()
    apply_lora(pipe, sliced)
    torch.testing.assert_close(torch.from_numpy(generate(pipe)), torch.from_numpy(expected), atol=2e-6, rtol=0)


def test_a_bare_module_takes_a_lora_as_its_unet():
    pipe = build_tiny_pipeline("sd1")
    lora = random_lora(pipe, "sd1", 11, components=("unet",))
    unet = pipe.unet
    handle = apply_lora(unet, lora, weight=0.5, arch="sd1", blocks={"M00": 0.0})
    assert handle.report.matched == {"unet": len(lora.patches)}
    handle.remove()


def test_bad_mode_is_a_config_error():
    pipe = build_tiny_pipeline("sd1")
    with pytest.raises(ConfigError, match="dynamic, fused"):
        apply_lora(pipe, random_lora(pipe, "sd1", 1), mode="merged")
