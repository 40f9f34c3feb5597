"""Streaming component loading: the same modules as from_pretrained, or None where it does not apply exactly."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.formats.safetensors_io import read_file, write_file
from lorakit.models import TINY_ARCHS, build_tiny_pipeline, load_pipeline
from lorakit.models.streaming import stream_component

_MODELS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _reference(folder, dtype):
    raw = json.loads((folder / "config.json").read_text())
    if "_class_name" in raw:
        import diffusers

        cls = getattr(diffusers, raw["_class_name"])
    else:
        import transformers

        cls = getattr(transformers, raw["architectures"][0])
    return cls.from_pretrained(folder, dtype=dtype, local_files_only=True)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
def test_every_component_equals_from_pretrained(tmp_path, arch, stored):
    build_tiny_pipeline(arch).to(stored).save_pretrained(tmp_path / "m")
    streamed = 0
    for name in _MODELS:
        folder = tmp_path / "m" / name
        if not folder.is_dir():
            continue
        got = stream_component(folder, torch.float32)
        want = _reference(folder, torch.float32)
        if got is None:  # only T5 (tied embedding) is left to from_pretrained
            assert type(want).__name__ == "T5EncoderModel", name
            continue
        streamed += 1
        assert type(got) is type(want) and not got.training
        a, b = got.state_dict(), want.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (name, key)
        assert all(not t.is_meta for t in got.parameters())
    assert streamed >= 3


def test_a_folder_it_cannot_map_exactly_goes_to_from_pretrained(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    pipe.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"
    tensors, _ = read_file(weights)
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    renamed = {}
    for key, value in tensors.items():  # the old attention names diffusers still converts on load
        for new_name, old_name in old.items():
            key = key.replace(new_name, old_name)
        renamed[key] = value.clone()
    assert renamed.keys() != tensors.keys()
    weights.unlink()
    write_file(weights, renamed)
    assert stream_component(tmp_path / "m" / "vae", torch.float32) is None
    assert stream_component(tmp_path / "m" / "unet", torch.float32) is not None
    loaded = load_pipeline(tmp_path / "m")  # the VAE through from_pretrained, the rest streamed
    for key, value in pipe.vae.state_dict().items():
        assert torch.equal(loaded.pipe.vae.state_dict()[key], value), key


def test_half_precision_keeps_from_pretrained_rules(tmp_path):
    """Asked for fp16, a component with modules kept in fp32 is left to from_pretrained; others stream in fp16."""
    build_tiny_pipeline("sd1").save_pretrained(tmp_path / "m")
    got = stream_component(tmp_path / "m" / "unet", torch.float16)
    assert got is not None and all(p.dtype == torch.float16 for p in got.parameters())
    want = _reference(tmp_path / "m" / "unet", torch.float16)
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
