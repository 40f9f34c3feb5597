"""Block weights: LBW notation parsed per architecture, ids checked against lorakit.arch.blocks, presets, errors."""

from __future__ import annotations

import pytest

from lorakit.arch import block_ids, block_of
from lorakit.errors import ConfigError
from lorakit.formats.canonical import Target
from lorakit.ops.blocks import block_forms, parse_block_weights


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "flux"])
def test_every_form_lists_real_block_ids_in_model_order(arch):
    ids = block_ids(arch)
    for ordered in block_forms(arch).values():
        assert [i for i in ids if i in ordered] == ordered


def test_sd1_17_values_map_to_the_lbw_blocks():
    spec = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4,1.5,1.6,1.7"
    weights = parse_block_weights(spec, "sd1")
    # hand-checked against the LDM numbering: down_blocks.0.attentions.0 is input_blocks.1 (IN01)
    assert weights.multiplier(Target("text_encoder", "text_model.encoder.layers.0.mlp.fc1")) == 0.1
    assert weights.multiplier(Target("unet", "down_blocks.0.attentions.0.proj_in")) == 0.2
    assert weights.multiplier(Target("unet", "down_blocks.0.attentions.1.proj_in")) == 0.3
    assert weights.multiplier(Target("unet", "down_blocks.1.attentions.0.proj_in")) == 0.4  # IN04
    assert weights.multiplier(Target("unet", "mid_block.attentions.0.proj_in")) == 0.8
    assert weights.multiplier(Target("unet", "up_blocks.1.attentions.0.proj_in")) == 0.9  # OUT03
    assert weights.multiplier(Target("unet", "up_blocks.3.attentions.2.proj_in")) == 1.7  # OUT11
    # the 17-value form has no IN00 / time embedding: they keep 1
    assert weights.multiplier(Target("unet", "conv_in")) == 1.0
    assert weights.multiplier(Target("unet", "time_embedding.linear_1")) == 1.0


def test_sdxl_12_and_20_and_flux_61():
    xl = parse_block_weights("1,0,0,0,0,0.5,0,0,0,0,0,2", "sdxl")
    assert block_of("sdxl", "unet", "mid_block.attentions.0.proj_in") == "M00"
    assert xl.multiplier(Target("unet", "mid_block.attentions.0.proj_in")) == 0.5
    assert xl.multiplier(Target("unet", "up_blocks.1.attentions.2.proj_in")) == 2.0  # OUT05
    assert xl.multiplier(Target("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1")) == 1.0
    assert parse_block_weights(",".join(["0"] * 20), "sdxl").block_multiplier("IN00") == 0.0
    values = ["0"] * 61
    values[3 + 7] = "0.7"  # D07
    flux = parse_block_weights(",".join(values), "flux")
    assert flux.multiplier(Target("transformer", "transformer_blocks.7.attn.to_q")) == 0.7
    assert flux.multiplier(Target("transformer", "single_transformer_blocks.7.attn.to_q")) == 0.0


def test_presets():
    midd = parse_block_weights("midd", "sd1")
    assert [midd.block_multiplier(b) for b in ("BASE", "IN02", "IN05", "M00", "OUT06", "OUT07")] == [1, 0, 1, 1, 1, 0]
    none = parse_block_weights("NONE", "sdxl")
    assert none.block_multiplier("BASE") == 1 and none.block_multiplier("M00") == 0
    assert parse_block_weights("ALL0.5", "flux").block_multiplier("S37") == 0.5
    outall = parse_block_weights("OUTALL", "sd2")
    assert outall.block_multiplier("OUT03") == 1 and outall.block_multiplier("IN08") == 0


@pytest.mark.parametrize(
    ("spec", "arch", "message"),
    [
        ("1,1,1", "sd1", "17 or 26"),
        ("1,1,1", "sdxl", "12 or 20"),
        ("1,1,1", "flux", "61"),
        ("MIDD", "flux", "unknown preset"),
        ("1,x,1", "sd1", "not a list of numbers"),
        ("ALL", "sd3", "no block-weight notation"),
    ],
)
def test_errors_name_the_accepted_counts(spec, arch, message):
    with pytest.raises(ConfigError, match=message):
        parse_block_weights(spec, arch)


def test_a_module_outside_the_architecture_is_a_clear_error():
    with pytest.raises(ConfigError, match="not a module of sd1"):
        parse_block_weights("ALL", "sd1").multiplier(Target("unet", "blocks.0.to_q"))
