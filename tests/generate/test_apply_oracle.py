"""lorakit's run-time application against diffusers ``load_lora_weights`` + ``set_adapters`` on the same files.

File dialects: kohya for SD1 and SDXL (what A1111 users have). diffusers' kohya FLUX converter hard-codes the
full-size widths (3072) when it splits ``qkv``, so it cannot load a tiny FLUX kohya file, and it loads nothing from a
kohya SD3 file: FLUX and SD3 use diffusers-format files for the comparison, and a separate test shows lorakit's FLUX
kohya file applies exactly like its diffusers-format twin. diffusers applies no LoRA to the T5 encoders.
"""

from __future__ import annotations

import pytest
import torch
from lora_pipelines import generate, random_lora

from lorakit.formats.lora_io import save_lora
from lorakit.generate import apply_lora, lora_components
from lorakit.models import build_tiny_pipeline

CASES = [
    ("sd1", "kohya", ("unet", "text_encoder")),
    ("sdxl", "kohya", ("unet", "text_encoder", "text_encoder_2")),
    ("flux", "diffusers", ("transformer", "text_encoder")),
    ("sd3", "diffusers", ("transformer", "text_encoder", "text_encoder_2")),
]


def _files(tmp_path, pipe, arch, dialect, components):
    paths = []
    for seed, name in ((1, "first"), (2, "second")):
        lora = random_lora(pipe, arch, seed, components=components, rank=4 if seed == 1 else 8)
        paths.append(save_lora(lora, tmp_path / f"{name}.safetensors", dialect=dialect, modules=lora_components(pipe)))
    return paths


@pytest.mark.parametrize(("arch", "dialect", "components"), CASES)
def test_two_loras_match_diffusers(tmp_path, arch, dialect, components):
    pipe = build_tiny_pipeline(arch)
    first, second = _files(tmp_path, pipe, arch, dialect, components)
    base = generate(pipe)
    a = apply_lora(pipe, first, weight=0.7)
    b = apply_lora(pipe, second, weight=-0.4)
    ours = generate(pipe)
    a.remove()
    b.remove()
    assert (generate(pipe) == base).all()

    pipe.load_lora_weights(first, adapter_name="first")
    pipe.load_lora_weights(second, adapter_name="second")
    pipe.set_adapters(["first", "second"], [0.7, -0.4])
    theirs = generate(pipe)
    assert abs(ours - base).max() > 0.05  # the LoRAs change the image...
    torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), atol=2e-5, rtol=0)  # ...alike


def test_separate_text_encoder_weight_matches_diffusers(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    path = save_lora(random_lora(pipe, "sd1", 3), tmp_path / "l.safetensors", modules=lora_components(pipe))
    handle = apply_lora(pipe, path, weight=0.8, text_encoder_weight=0.3)
    ours = generate(pipe)
    handle.remove()
    pipe.load_lora_weights(path, adapter_name="l")
    pipe.set_adapters(["l"], [{"unet": 0.8, "text_encoder": 0.3}])
    torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(generate(pipe)), atol=2e-5, rtol=0)


def test_flux_kohya_file_applies_like_its_diffusers_twin(tmp_path):
    pipe = build_tiny_pipeline("flux")
    lora = random_lora(pipe, "flux", 4, components=("transformer", "text_encoder"))
    kohya = save_lora(lora, tmp_path / "k.safetensors", modules=lora_components(pipe))
    twin = save_lora(lora, tmp_path / "d.safetensors", dialect="diffusers", modules=lora_components(pipe))
    handle = apply_lora(pipe, kohya, weight=0.9)
    ours = generate(pipe)
    handle.remove()
    pipe.load_lora_weights(twin, adapter_name="d")
    pipe.set_adapters(["d"], [0.9])
    torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(generate(pipe)), atol=2e-5, rtol=0)
