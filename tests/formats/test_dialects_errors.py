"""Bad input: every key a reader cannot place is an error that lists the keys and says what to do, in one line."""

from __future__ import annotations

import pytest
import torch

from lorakit.core.patches import LohaPatch, LoraPatch
from lorakit.errors import FileFormatError, LorakitError, UnsafeFileError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import load_lora, to_state_dict

torch.set_num_threads(1)

TABLES = {"unet": {"down_blocks.0.attentions.0.proj_in": (8, 8), "conv_in": (8, 4, 3, 3)}}


def _kohya(name: str, out: int = 8, inp: int = 8) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_down.weight": torch.ones(2, inp),
        f"{name}.lora_up.weight": torch.ones(out, 2),
        f"{name}.alpha": torch.tensor(1.0),
    }


def test_keys_of_an_unknown_dialect_are_listed_in_one_line():
    tensors = {f"model.layers.{i}.weight": torch.ones(2) for i in range(5)}
    with pytest.raises(FileFormatError) as err:
        load_lora(tensors)
    message = str(err.value)
    assert "\n" not in message
    assert "5 of 5 keys are in no LoRA dialect" in message and "model.layers.0.weight" in message
    assert "and 2 more" in message and "skip_unknown" in message


def test_kohya_without_a_module_table_says_to_pass_arch_or_modules():
    tensors = {
        "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.ones(8, 2, 1, 1),
    }
    with pytest.raises(FileFormatError, match=r"unet module names are unknown.*pass arch= or modules="):
        load_lora(tensors)


def test_unplaced_keys_fail_or_are_skipped_and_listed():
    tensors = {
        **_kohya("lora_unet_down_blocks_0_attentions_0_proj_in"),
        **_kohya("lora_unet_no_such_module"),
        "lora_unet_conv_in.hada_w9": torch.ones(1),
    }
    with pytest.raises(FileFormatError, match="lora_unet_no_such_module") as err:
        load_lora(tensors, modules=TABLES)
    assert "\n" not in str(err.value)
    lora = load_lora(tensors, modules=TABLES, skip_unknown=True)
    assert set(lora.patches) == {Target("unet", "down_blocks.0.attentions.0.proj_in")}
    assert lora.skipped == sorted([*_kohya("lora_unet_no_such_module"), "lora_unet_conv_in.hada_w9"])


def test_mixed_and_unsupported_kinds_name_the_module():
    mixed = {**_kohya("lora_unet_conv_in"), "lora_unet_conv_in.hada_w1_a": torch.ones(8, 1)}
    with pytest.raises(FileFormatError, match="lora_unet_conv_in: tensors of several adapter kinds"):
        load_lora(mixed, modules=TABLES)
    oft = {"lora_unet_conv_in.oft_blocks": torch.ones(2, 4, 4), "lora_unet_conv_in.alpha": torch.tensor(1.0)}
    with pytest.raises(FileFormatError, match="OFT.* not supported"):
        load_lora(oft, modules=TABLES)
    broken = {
        "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.ones(8, 3, 1, 1),
    }
    with pytest.raises(FileFormatError, match="lora_unet_conv_in: .*rank"):
        load_lora(broken, modules=TABLES)
    incomplete = {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3)}
    with pytest.raises(FileFormatError, match="incomplete"):
        load_lora(incomplete, modules=TABLES)


def test_a_module_spelled_twice_is_refused():
    tensors = {
        **_kohya("lora_unet_down_blocks_0_attentions_0_proj_in"),
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(2, 8),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(8, 2),
    }
    with pytest.raises(FileFormatError, match="two adapters for unet.down_blocks.0.attentions.0.proj_in"):
        load_lora(tensors, modules=TABLES)


def test_ambiguous_kohya_names_are_refused_not_guessed():
    tables = {"unet": {"a.b_c": (8, 8), "a_b.c": (8, 8)}}
    with pytest.raises(FileFormatError, match=r"lora_unet_a_b_c: .* fits several modules \['a.b_c', 'a_b.c'\]"):
        load_lora(_kohya("lora_unet_a_b_c"), modules=tables)


def test_empty_pickled_and_unknown_writer_inputs(tmp_path):
    with pytest.raises(FileFormatError, match="holds no tensors"):
        load_lora({})
    torch.save({"x": torch.ones(1)}, tmp_path / "lora.pt")
    with pytest.raises(UnsafeFileError):
        load_lora(tmp_path / "lora.pt")
    lora = LoraFile(patches={Target("unet", "conv_in"): LoraPatch(up=torch.ones(8, 1), down=torch.ones(1, 4, 3, 3))})
    with pytest.raises(LorakitError, match="unknown dialect 'a1111'"):
        to_state_dict(lora, "a1111")


def test_writers_refuse_what_their_dialect_cannot_hold():
    loha = LoraFile(
        patches={
            Target("unet", "conv_in"): LohaPatch(
                w1a=torch.ones(8, 1), w1b=torch.ones(1, 36), w2a=torch.ones(8, 1), w2b=torch.ones(1, 36)
            )
        }
    )
    with pytest.raises(LorakitError, match="unet.conv_in: a LohaPatch cannot be written as diffusers"):
        to_state_dict(loha, "diffusers")
    flux = LoraFile(
        patches={
            Target("transformer", "transformer_blocks.0.attn.to_q"): LoraPatch(
                up=torch.ones(8, 1), down=torch.ones(1, 8)
            )
        }
    )
    with pytest.raises(LorakitError, match="needs its original module names: pass arch="):
        to_state_dict(flux, "kohya")


def test_a_lora_for_another_model_does_not_fit_and_says_so():
    wrong = _kohya("lora_unet_down_blocks_0_attentions_0_proj_in", out=16, inp=8)
    with pytest.raises(FileFormatError, match=r"does not fit unet.down_blocks.0.attentions.0.proj_in.*another model"):
        load_lora(wrong, modules=TABLES)
    assert load_lora(wrong, modules=TABLES, skip_unknown=True).skipped == sorted(wrong)
    flux = {
        "transformer": {
            **{f"transformer_blocks.0.attn.to_{p}": (8, 8) for p in "qkv"},
            "single_transformer_blocks.0.proj_out": (8, 40),
        }
    }
    fused = _kohya("lora_unet_double_blocks_0_img_attn_qkv", out=30, inp=8)  # 3 x 8 rows expected
    with pytest.raises(FileFormatError, match="does not fit transformer.transformer_blocks.0.attn.to_q"):
        load_lora(fused, modules=flux)
