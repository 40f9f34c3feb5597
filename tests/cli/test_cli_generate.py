"""``lorakit generate`` end to end on a tiny SD1 diffusers folder: PNG, infotext, LoRAs from options and prompt."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.cli.main import main
from lorakit.core.patches import LoraPatch
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import save_lora
from lorakit.generate import apply_lora, read_png_infotext
from lorakit.models import build_tiny_pipeline


def _addnet_hash(path) -> str:
    """sha256 of the safetensors data section, first 12 hex: A1111's LoRA short hash, computed here by hand."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + header_len :]).hexdigest()[:12]


@pytest.fixture(scope="module")
def model_and_loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    pipe = build_tiny_pipeline("sd1")
    pipe.save_pretrained(root / "model")
    (root / "loras").mkdir()
    generator = torch.Generator().manual_seed(0)
    for name in ("Style", "extra"):
        patches = {}
        for module in (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            "mid_block.attentions.0.proj_in",
            "up_blocks.1.resnets.0.conv1",
        ):
            weight = pipe.unet.get_submodule(module).weight
            patches[Target("unet", module)] = LoraPatch(
                up=torch.randn(weight.shape[0], 2, *([1] * (weight.dim() - 2)), generator=generator),
                down=torch.randn(2, *weight.shape[1:], generator=generator),
                alpha=1.0,
            )
        save_lora(LoraFile(patches=patches, arch="sd1"), root / "loras" / f"{name}.safetensors")
    return root


def test_generate_writes_a_png_with_a1111_infotext(model_and_loras, capsys):
    root = model_and_loras
    out = root / "out.png"
    extra = root / "loras" / "extra.safetensors"
    code = main(
        [
            "generate",
            "--model",
            str(root / "model"),
            "--prompt",
            "a red cat <lora:style:0.8>",
            "--lora-dir",
            str(root / "loras"),
            "--lora",
            f"{extra}:0.5",
            "--steps",
            "2",
            "--size",
            "32x32",
            "--seed",
            "7",
            "--sampler",
            "euler_a",
            "--cfg",
            "5",
            "-o",
            str(out),
            "--json",
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "sd1"
    info = read_png_infotext(out)
    assert info.prompt == "a red cat <lora:style:0.8> <lora:extra:0.5>"
    assert info.params["Steps"] == "2" and info.params["Sampler"] == "Euler a" and info.params["Seed"] == "7"
    assert info.params["Size"] == "32x32" and info.params["CFG scale"] == "5"
    assert info.lora_hashes() == {
        "extra": _addnet_hash(extra),
        "style": _addnet_hash(root / "loras" / "Style.safetensors"),
    }

    # the same image from the library by hand: the CLI applied both LoRAs at their weights, and left none behind
    from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(root / "model", local_files_only=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    apply_lora(pipe, root / "loras" / "Style.safetensors", weight=0.8)
    apply_lora(pipe, extra, weight=0.5)
    expected = pipe(
        "a red cat",
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("a cat <lora:stlye:1>", "no LoRA named 'stlye'.*did you mean Style"), ("a cat <lora:style:x>", "not a number")],
)
def test_prompt_errors_exit_2_with_one_line(model_and_loras, capsys, prompt, message):
    root = model_and_loras
    code = main(
        [
            "generate",
            "--model",
            str(root / "model"),
            "--prompt",
            prompt,
            "--lora-dir",
            str(root / "loras"),
            "--steps",
            "1",
            "--size",
            "32x32",
            "-o",
            str(root / "bad.png"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err)
    assert not (root / "bad.png").exists()


def test_bad_size_and_sampler_are_errors(model_and_loras, capsys):
    root = model_and_loras
    base = ["generate", "--model", str(root / "model"), "--prompt", "a", "--steps", "1", "-o", str(root / "x.png")]
    assert main([*base, "--size", "32by32"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert main([*base, "--size", "32x32", "--sampler", "magic"]) == 2
    assert "euler_a" in capsys.readouterr().err


def test_default_model_without_the_embedded_one_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from lorakit.models import embedded

    monkeypatch.setattr(embedded, "embedded_model_path", lambda: tmp_path / "missing")
    assert main(["generate", "--prompt", "a", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "missing" in err and not (tmp_path / "x.png").exists()


def test_default_model_is_the_embedded_one(tmp_path, capsys):
    out = tmp_path / "e.png"
    assert main(["generate", "--prompt", "a red circle", "--steps", "2", "-o", str(out)]) == 0
    info = read_png_infotext(out)
    assert info.prompt == "a red circle" and info.params["Steps"] == "2"
