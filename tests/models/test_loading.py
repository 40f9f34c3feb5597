"""load_pipeline: diffusers folders and single-file checkpoints (original names), offline, with clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from lorakit.errors import FileFormatError, InputError
from lorakit.formats.safetensors_io import write_file
from lorakit.models import TINY_ARCHS, build_tiny_pipeline, load_pipeline
from lorakit.models.single_file import pipeline_to_original


def _generate(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo of a red cat", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np"
    ).images


def _same_images(a, b, atol=0.0):
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=atol, rtol=0)


@pytest.mark.parametrize("arch", ["sd1", "flux"])
def test_diffusers_folder_loads_offline(tmp_path, arch):
    pipe = build_tiny_pipeline(arch)
    pipe.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(tmp_path / "model")
    assert loaded.arch == arch and loaded.source == str(tmp_path / "model")
    _same_images(_generate(loaded.pipe), _generate(pipe), atol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_single_file_round_trip(tmp_path, arch):
    """A checkpoint in original names from one pipeline; configs and tokenizers from a folder whose weights differ:
    the loaded pipeline must be the checkpoint's, not the folder's."""
    pipe = build_tiny_pipeline(arch, seed=0)
    build_tiny_pipeline(arch, seed=1).save_pretrained(tmp_path / "config")
    write_file(tmp_path / "model.safetensors", pipeline_to_original(pipe, arch), {})
    loaded = load_pipeline(tmp_path / "model.safetensors", arch=arch, config=tmp_path / "config")
    assert loaded.arch == arch
    loaded.pipe.scheduler = pipe.scheduler
    _same_images(_generate(loaded.pipe), _generate(pipe))


def test_single_file_writer_agrees_with_diffusers_from_single_file(tmp_path):
    """diffusers' own LDM converter reads lorakit's checkpoint into the same model (an independent name map)."""
    from diffusers import StableDiffusionPipeline

    pipe = build_tiny_pipeline("sd1")
    pipe.save_pretrained(tmp_path / "config")
    write_file(tmp_path / "model.safetensors", pipeline_to_original(pipe, "sd1"), {})
    theirs = StableDiffusionPipeline.from_single_file(
        tmp_path / "model.safetensors", config=str(tmp_path / "config"), local_files_only=True
    )
    theirs.scheduler = pipe.scheduler
    theirs.set_progress_bar_config(disable=True)
    _same_images(_generate(theirs), _generate(pipe))


def test_tokenizers_next_to_the_file_are_found(tmp_path):
    pipe = build_tiny_pipeline("sdxl")
    pipe.save_pretrained(tmp_path / "config")
    (tmp_path / "m").mkdir()
    write_file(tmp_path / "m" / "model.safetensors", pipeline_to_original(pipe, "sdxl"), {})
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tmp_path / "config" / name, tmp_path / "m" / name)
    shutil.rmtree(tmp_path / "config" / "tokenizer")
    shutil.rmtree(tmp_path / "config" / "tokenizer_2")
    loaded = load_pipeline(tmp_path / "m" / "model.safetensors", arch="sdxl", config=tmp_path / "config")
    assert loaded.pipe.tokenizer_2 is not None


def test_missing_tokenizers_say_what_to_pass(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    write_file(tmp_path / "model.safetensors", pipeline_to_original(pipe, "sd1"), {})
    with pytest.raises(FileFormatError, match="--tokenizer DIR.*tokenizer/"):
        load_pipeline(tmp_path / "model.safetensors", arch="sd1")


def test_partial_checkpoint_lists_what_is_missing(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    pipe.save_pretrained(tmp_path / "config")
    tensors = pipeline_to_original(pipe, "sd1")
    dropped = [k for k in tensors if "output_blocks.4.1" in k and k.endswith("proj_out.weight")]
    assert dropped
    for key in dropped:
        del tensors[key]
    write_file(tmp_path / "model.safetensors", tensors, {})
    with pytest.raises(FileFormatError, match=r"partial sd1 checkpoint: 2 weights missing.*up_blocks\.1\.attentions"):
        load_pipeline(tmp_path / "model.safetensors", arch="sd1", config=tmp_path / "config")


def test_a_tiny_file_against_the_bundled_full_size_config_is_a_shape_error(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    pipe.save_pretrained(tmp_path / "config")
    write_file(tmp_path / "model.safetensors", pipeline_to_original(pipe, "sd1"), {})
    with pytest.raises(FileFormatError, match="has shape .* the model needs"):
        load_pipeline(tmp_path / "model.safetensors", arch="sd1", tokenizer=tmp_path / "config")


def test_an_unknown_file_is_a_clear_error(tmp_path):
    write_file(tmp_path / "x.safetensors", {"foo.weight": torch.zeros(3, 3)}, {})
    with pytest.raises(FileFormatError, match="cannot tell the base model"):
        load_pipeline(tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="no such file"):
        load_pipeline(tmp_path / "missing.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileFormatError, match="model_index.json"):
        load_pipeline(tmp_path / "folder")


def test_no_path_loads_the_embedded_model_or_says_to_pass_one():
    import importlib.util

    if importlib.util.find_spec("lorakit.models.embedded") is None:
        with pytest.raises(InputError, match="--model"):
            load_pipeline(None)
        return
    loaded = load_pipeline(None)
    assert loaded.arch == "sd1" and _generate(loaded.pipe).shape == (1, 32, 32, 3)
