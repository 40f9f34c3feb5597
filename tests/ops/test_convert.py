"""convert: exact between dialects (diffusers' own kohya conversion as the oracle), verify, and its error paths."""

from __future__ import annotations

import errno
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from lorakit.arch.tables import module_table
from lorakit.errors import ConfigError, FileFormatError, InputError, OutputError, TargetError
from lorakit.formats.lora_io import load_lora
from lorakit.formats.safetensors_io import read_file
from lorakit.ops.convert import convert_lora

torch.set_num_threads(1)

UNET = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj",
)
TE = ("text_model.encoder.layers.0.mlp.fc1", "text_model.encoder.layers.11.self_attn.out_proj")


def _kohya_sd1(path, seed=0):
    """A kohya SD1 file written with safetensors itself, ranks 2-4, alphas 1-3."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (prefix, component, module) in enumerate(
        [("lora_unet_", "unet", m) for m in UNET] + [("lora_te_", "text_encoder", m) for m in TE]
    ):
        out, inp = module_table("sd1", component)[module]
        key = prefix + module.replace(".", "_")
        rank = 2 + i % 3
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, inp, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, rank, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(float(1 + i % 3))
    save_file(tensors, str(path))
    return path


def _diffusers_deltas(path) -> dict[str, torch.Tensor]:
    """Dense deltas by diffusers' own reading of a kohya file (its ``lora_state_dict`` conversion)."""
    from diffusers import StableDiffusionPipeline

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    deltas = {}
    for key in state:
        if not key.endswith("down.weight"):
            continue
        base = key.removesuffix(".down.weight")
        # diffusers gives the old processor names: attn.processor.to_out_lora (UNet), self_attn.to_out_lora (CLIP)
        module = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", base)
        module = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", module)
        module = re.sub(r"self_attn\.to_out_lora$", "self_attn.out_proj", module)
        module = re.sub(r"self_attn\.to_([qkv])_lora$", r"self_attn.\1_proj", module)
        module = module.removesuffix(".lora_linear_layer").removesuffix(".lora")
        alpha = alphas.get(key + ".alpha", alphas.get(module + ".alpha"))
        down, up = state[key], state[base + ".up.weight"]
        deltas[module] = alpha / down.shape[0] * (up @ down)
    return deltas


@pytest.mark.parametrize("dialect", ["diffusers", "comfy", "kohya", "peft"])
def test_conversion_keeps_the_deltas_diffusers_reads_from_the_input(tmp_path, dialect):
    pytest.importorskip("diffusers")
    source = _kohya_sd1(tmp_path / "in.safetensors")
    out = tmp_path / ("out" if dialect == "peft" else "out.safetensors")
    result = convert_lora(source, out, dialect, verify=True, arch="sd1")
    assert result.verified and result.max_error == 0.0 and result.targets == len(UNET) + len(TE)
    back = load_lora(out, arch="sd1")
    want = _diffusers_deltas(source)
    assert {str(t) for t in back.patches} == set(want)
    for target, patch in back.patches.items():
        torch.testing.assert_close(patch.delta(), want[str(target)], rtol=1e-5, atol=1e-5)


def test_dtype_cast_reports_the_rounding_error(tmp_path):
    source = _kohya_sd1(tmp_path / "in.safetensors")
    result = convert_lora(source, tmp_path / "h.safetensors", "diffusers", verify=True, dtype=torch.float16)
    assert 0 < result.max_relative_error < 2e-3
    assert {t.dtype for t in read_file(tmp_path / "h.safetensors")[0].values()} == {torch.float16}


def test_error_paths(tmp_path, monkeypatch):
    source = _kohya_sd1(tmp_path / "in.safetensors")
    with pytest.raises(OutputError, match="is also an input"):
        convert_lora(source, source, "kohya")
    with pytest.raises(ConfigError, match="unknown dialect 'a1111'"):
        convert_lora(source, tmp_path / "o.safetensors", "a1111")
    with pytest.raises(InputError, match="no such file"):
        convert_lora(tmp_path / "missing.safetensors", tmp_path / "o.safetensors", "kohya")
    with pytest.raises(TargetError, match="is a LoRA for sd1"):
        convert_lora(source, tmp_path / "o.safetensors", "kohya", arch="sdxl")
    with pytest.raises(OutputError, match="does not exist"):
        convert_lora(source, tmp_path / "nowhere" / "o.safetensors", "kohya")
    with pytest.raises(OutputError, match="holds the input"):
        convert_lora(source, tmp_path, "peft")
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as root, chmod cannot make a folder read-only
    for dialect, name in (("kohya", "o.safetensors"), ("peft", "adapter")):
        with pytest.raises(OutputError, match="not writable"):
            convert_lora(source, tmp_path / name, dialect)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_unknown_keys_are_refused_not_dropped(tmp_path):
    source = _kohya_sd1(tmp_path / "in.safetensors")
    tensors, _ = read_file(source)
    save_file({**tensors, "mystery.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(FileFormatError, match="mystery.weight"):
        convert_lora(tmp_path / "x.safetensors", tmp_path / "o.safetensors", "diffusers")
    assert not (tmp_path / "o.safetensors").exists()


def test_disk_full_leaves_no_output(tmp_path, monkeypatch):
    source = _kohya_sd1(tmp_path / "in.safetensors")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(OutputError, match="free disk space"):
        convert_lora(source, tmp_path / "full.safetensors", "comfy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
