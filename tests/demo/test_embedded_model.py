"""The shipped tiny base model: complete, small, packaged, loads offline, generates, and draws what it is told."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.models.embedded import EMBEDDED_COMPONENTS, embedded_model_path

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]


def test_folder_is_complete_small_and_fp16():
    from safetensors import safe_open

    folder = embedded_model_path()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {c for c in EMBEDDED_COMPONENTS} <= set(index)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    for weights in folder.glob("*/*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, weights


def test_package_data_covers_every_shipped_file():
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lorakit"]
    package = ROOT / "src" / "lorakit"
    for path in embedded_model_path().rglob("*"):
        if path.is_file():
            rel = path.relative_to(package).as_posix()
            assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel


@pytest.fixture(scope="module")
def pipe():
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"  # any attempt to reach a hub fails instead of waiting
    from lorakit.models.embedded import load_embedded_pipeline

    return load_embedded_pipeline()


def test_loads_offline_and_generates(pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32 and pipe.tokenizer.model_max_length == 32
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    out = pipe(
        ["a large red circle in the center, black background"] * 2,
        height=32,
        width=32,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    images = np.asarray(out.images)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert images.std() > 0.05  # a picture, not a flat field


@pytest.mark.slow
def test_base_model_draws_held_out_prompts(pipe):
    from lorakit.demo.evaluate import score_pipeline

    score, _ = score_pipeline(pipe, 32, steps=10, guidance=4.0)
    assert score.both >= 0.8, f"shape {score.shape:.0%} colour {score.colour:.0%} both {score.both:.0%}"
