"""Tiny pipelines: each architecture builds offline, generates an image, and is deterministic by seed."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.models import TINY_ARCHS, build_tiny_pipeline


def _generate(pipe, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        "a photo of a red cat", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np"
    ).images


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_pipeline_generates(arch):
    pipe = build_tiny_pipeline(arch)
    image = _generate(pipe)
    assert image.shape == (1, 32, 32, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0


@pytest.mark.parametrize("arch", ["sd1", "flux"])
def test_tiny_pipeline_is_deterministic_by_seed(arch):
    a, b, c = build_tiny_pipeline(arch, seed=3), build_tiny_pipeline(arch, seed=3), build_tiny_pipeline(arch, seed=4)
    name = "unet" if arch == "sd1" else "transformer"
    sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert (_generate(a) == _generate(b)).all()


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    build_tiny_pipeline("sd1")
    assert torch.equal(torch.rand(3), expected)


def test_tokenizers_fit_the_encoders():
    pipe = build_tiny_pipeline("sd3")
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_3, pipe.text_encoder_3)):
        assert len(tok) == enc.config.vocab_size
    ids = pipe.tokenizer("a red cat").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) == 5  # bos, "a", "red", "cat", eos: the word list merges to whole-word tokens


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ConfigError, match="sd1, sd2"):
        build_tiny_pipeline("sd4")
