"""check: one line per problem, nothing reported for a good file."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from lorakit.arch.tables import module_table
from lorakit.core.patches import LoraPatch
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import to_state_dict
from lorakit.ops.check import SHOWN, check_files

torch.set_num_threads(1)

SDXL_MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # (640, 2048)


def _sdxl_tensors() -> dict[str, torch.Tensor]:
    shape = module_table("sdxl", "unet")[SDXL_MODULE]
    g = torch.Generator().manual_seed(0)
    lora = LoraFile(
        patches={
            Target("unet", SDXL_MODULE): LoraPatch(
                up=torch.randn(shape[0], 4, generator=g), down=torch.randn(4, shape[1], generator=g), alpha=1.0
            )
        }
    )
    return to_state_dict(lora, "kohya", arch="sdxl")[0]


KEY = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
META = {"ss_base_model_version": "sdxl_base_v1-0"}


def test_good_file_has_no_problem(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file(_sdxl_tensors(), str(path), metadata=META)
    [result] = check_files([path])
    assert result.ok and result.problems == []


def test_every_kind_of_problem_gives_its_line(tmp_path):
    tensors = _sdxl_tensors()
    bad = dict(tensors)
    bad[f"{KEY}.lora_up.weight"] = bad[f"{KEY}.lora_up.weight"].clone()
    bad[f"{KEY}.lora_up.weight"][0, 0] = float("nan")
    bad["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v.lora_down.weight"] = torch.zeros(4, 768)
    bad["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v.lora_up.weight"] = torch.zeros(640, 4)
    bad["something_else"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path), metadata={**META, "sshs_model_hash": "0" * 64})
    [result] = check_files([path])
    text = "\n".join(result.problems)
    assert "non-finite values: " + f"{KEY}.lora_up.weight: 1 NaN" in text
    # attn2.to_v of SDXL takes 2048 inputs: a 768-wide down fits no module (an SD1 tensor in an SDXL file)
    assert "3 keys that fit no module" in text and "something_else" in text and "attn2_to_v" in text
    assert "stale hash: sshs_model_hash" in text
    assert len(result.problems) == 3 and not result.ok


def test_diffusers_names_with_a_wrong_width_are_a_shape_problem(tmp_path):
    tensors = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight": torch.zeros(4, 768),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight": torch.zeros(640, 4),
    }
    path = tmp_path / "d.safetensors"
    save_file(tensors, str(path), metadata=META)
    [result] = check_files([path])
    assert len(result.problems) == 1 and "attn2" in result.problems[0] and not result.ok


def test_wrong_architecture_missing_file_and_damaged_file(tmp_path):
    good = tmp_path / "xl.safetensors"
    save_file(_sdxl_tensors(), str(good), metadata=META)
    damaged = tmp_path / "cut.safetensors"
    damaged.write_bytes(good.read_bytes()[:-10])
    results = check_files([good, tmp_path / "missing.safetensors", damaged], arch="sd1")
    assert results[0].problems[0].startswith("is a LoRA for sdxl") and "not for sd1" in results[0].problems[0]
    assert results[1].problems == ["no such file; check the path"]
    assert len(results[2].problems) == 1 and "truncated" in results[2].problems[0]
    assert check_files([good], arch="sdxl")[0].ok


def test_many_nonfinite_tensors_are_summed_up(tmp_path):
    tensors = {
        f"lora_te_text_model_encoder_layers_0_mlp_fc{i}.lora_up.weight": torch.full((2, 1), float("inf"))
        for i in range(SHOWN + 5)
    }
    path = tmp_path / "inf.safetensors"
    save_file(tensors, str(path))
    problems = check_files([path])[0].problems
    nonfinite = [p for p in problems if "non-finite" in p]
    assert len(nonfinite) == SHOWN + 1 and nonfinite[-1] == "... and 5 more tensors with non-finite values"
