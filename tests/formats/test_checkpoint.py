"""Checkpoint: single files in original names and diffusers folders (sharded too) map every weight of the model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "ops"))  # the tiny checkpoints live beside the bake tests
from ckpt_models import diffusers_weights, write_folder, write_single_file  # noqa: E402

from lorakit.errors import FileFormatError, InputError, UnsafeFileError  # noqa: E402
from lorakit.formats.checkpoint import Checkpoint  # noqa: E402
from lorakit.formats.safetensors_reader import SafetensorsReader  # noqa: E402
from lorakit.formats.safetensors_writer import write_file  # noqa: E402
from lorakit.ops.bake import _to_diffusers  # noqa: E402

torch.set_num_threads(1)


def _check_all_weights(ckpt: Checkpoint, arch: str) -> int:
    seen = 0
    for component, table in diffusers_weights(arch).items():
        shapes = ckpt.shapes(component)
        for module, weight in table.items():
            ref = ckpt.weight_ref(component, module)
            if ref is None:
                continue
            stored = ckpt.read(ref.key)
            got = _to_diffusers(stored if ref.rows is None else stored[ref.rows[0] : ref.rows[1]], ref.transform)
            assert shapes[module] == tuple(weight.shape) == ref.shape
            assert torch.equal(got, weight), f"{component}.{module}"
            assert ckpt.weight_keys(component, module) == [(ref.key, ref.rows)]
            seen += 1
    return seen


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "flux", "sd3"])
def test_single_file_maps_every_module_including_fused_rows(tmp_path, arch):
    path = write_single_file(tmp_path / "m.safetensors", arch)
    with Checkpoint.open(path, arch=arch) as ckpt:
        assert ckpt.layout == "single-file" and ckpt.arch == arch
        seen = _check_all_weights(ckpt, arch)
        # every module of the tiny model that the architecture's tables know is found
        assert seen == sum(len(ckpt.shapes(c)) for c in ckpt.components())
        assert seen > 30


def test_fused_rows_are_scaled_to_the_stored_tensor(tmp_path):
    path = write_single_file(tmp_path / "flux.safetensors", "flux")
    with Checkpoint.open(path, arch="flux") as ckpt:
        refs = [
            ckpt.weight_ref("transformer", f"single_transformer_blocks.0.{m}")
            for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        ]
        rows = ckpt.shape(refs[0].key)[0]
        hidden = ckpt.shape(refs[0].key)[1]
        assert [r.rows for r in refs] == [
            (0, hidden),
            (hidden, 2 * hidden),
            (2 * hidden, 3 * hidden),
            (3 * hidden, rows),
        ]
        sd2 = write_single_file(tmp_path / "sd2.safetensors", "sd2")
    with Checkpoint.open(sd2, arch="sd2") as ckpt:
        ref = ckpt.weight_ref("text_encoder", "text_model.encoder.layers.1.self_attn.v_proj")
        assert ref.key == "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
        assert ref.rows == (2 * ref.shape[0], 3 * ref.shape[0])
        # transformers 5 spelling (no text_model.) finds the same weight
        assert ckpt.weight_ref("text_encoder", "encoder.layers.1.self_attn.v_proj") == ref


@pytest.mark.parametrize("sharded", [False, True])
def test_diffusers_folder(tmp_path, sharded):
    if sharded:
        from lorakit.models.tiny import build_tiny_pipeline

        build_tiny_pipeline("sd1", seed=0).save_pretrained(tmp_path / "m", max_shard_size="1MB")
        assert list((tmp_path / "m" / "unet").glob("*.index.json"))
        path = tmp_path / "m"
    else:
        path = write_folder(tmp_path / "m", "sd1")
    with Checkpoint.open(path, arch="sd1") as ckpt:
        assert ckpt.layout == "diffusers" and ckpt.components() == ["unet", "text_encoder"]
        assert _check_all_weights(ckpt, "sd1") == len(ckpt.shapes("unet")) + len(ckpt.shapes("text_encoder"))
        assert any(k.startswith("vae/") for k in ckpt.keys())
        assert len(ckpt.files()) > (3 if sharded else 2)


def test_opening_reads_headers_only(tmp_path, monkeypatch):
    path = write_single_file(tmp_path / "m.safetensors", "sd1")

    def boom(self, key):
        raise AssertionError("tensor data read while opening")

    monkeypatch.setattr(SafetensorsReader, "get", boom)
    with Checkpoint.open(path, arch="sd1") as ckpt:
        assert ckpt.shapes("unet")["conv_in"] == (32, 4, 3, 3)


def test_architecture_is_detected_with_the_reason(tmp_path):
    tensors = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(320, 320, 1, 1),
    }
    write_file(tmp_path / "sd1.safetensors", tensors)
    with Checkpoint.open(tmp_path / "sd1.safetensors") as ckpt:
        assert ckpt.arch == "sd1" and "768" in ckpt.arch_reason
        assert ckpt.weight_keys("unet", "down_blocks.0.attentions.0.proj_in") == [
            ("model.diffusion_model.input_blocks.1.1.proj_in.weight", None)
        ]


def test_unknown_architecture_asks_for_arch(tmp_path):
    write_file(tmp_path / "x.safetensors", {"some.weight": torch.zeros(2, 2)})
    with pytest.raises(FileFormatError, match="pass --arch"):
        Checkpoint.open(tmp_path / "x.safetensors")


def test_bad_paths(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        Checkpoint.open(tmp_path / "missing.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileFormatError, match="model_index.json"):
        Checkpoint.open(tmp_path / "folder")
    torch.save({"state_dict": {"a.weight": torch.zeros(2)}}, tmp_path / "m.ckpt")
    with pytest.raises(UnsafeFileError, match="allow-pickle"):
        Checkpoint.open(tmp_path / "m.ckpt", arch="sd1")
    with Checkpoint.open(tmp_path / "m.ckpt", arch="sd1", allow_pickle=True) as ckpt:
        assert ckpt.keys() == ["a.weight"] and torch.equal(ckpt.read("a.weight"), torch.zeros(2))
