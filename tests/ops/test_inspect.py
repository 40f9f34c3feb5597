"""inspect: kinds, ranks and alphas per block, sizes, trigger words, training facts, hashes, non-finite values."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from lorakit.arch.tables import module_table
from lorakit.core.patches import LohaPatch, LoraPatch
from lorakit.errors import TargetError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import save_lora, to_state_dict
from lorakit.ops.inspect import inspect_lora

torch.set_num_threads(1)

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # LBW block IN01
MID = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"  # M00
CONV = "up_blocks.3.resnets.2.conv2"  # OUT11, 3x3


def _sd1_lora() -> LoraFile:
    t = module_table("sd1", "unet")
    g = torch.Generator().manual_seed(0)
    patches = {
        Target("unet", ATTN): LoraPatch(
            up=torch.randn(320, 8, generator=g), down=torch.randn(8, 320, generator=g), alpha=4.0
        ),
        Target("unet", MID): LohaPatch(
            w1a=torch.randn(1280, 2, generator=g),
            w1b=torch.randn(2, 5120, generator=g),
            w2a=torch.randn(1280, 2, generator=g),
            w2b=torch.randn(2, 5120, generator=g),
            alpha=1.0,
        ),
        Target("unet", CONV): LoraPatch(
            up=torch.randn(320, 4, 1, 1, generator=g), down=torch.randn(4, *t[CONV][1:], generator=g), alpha=None
        ),
    }
    return LoraFile(patches=patches)


METADATA = {
    "ss_tag_frequency": json.dumps({"10_cat": {"cat": 12, " orange": 4, "sofa": 2}, "5_dog": {"cat": 1, "dog": 7}}),
    "modelspec.trigger_phrase": "mycat",
    "ss_sd_model_name": "v1-5-pruned.safetensors",
    "ss_steps": "1200",
    "ss_resolution": "(512, 512)",
    "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
    "ss_training_started_at": "0",
    "ss_base_model_version": "sd_v1",
}


@pytest.fixture
def sd1_file(tmp_path):
    tensors, meta = to_state_dict(_sd1_lora(), "kohya", arch="sd1")
    del tensors["lora_unet_up_blocks_3_resnets_2_conv2.alpha"]  # no alpha: alpha = rank, shown as such
    path = tmp_path / "cat.safetensors"
    save_file(tensors, str(path), metadata={**meta, **METADATA})  # written by safetensors itself
    return path, tensors


def test_report_blocks_kinds_sizes_and_metadata(sd1_file):
    path, tensors = sd1_file
    report = inspect_lora(path)
    assert report.dialect == "kohya" and report.arch == "sd1" and "metadata" in report.arch_reason
    assert report.kinds == {"lora": 1, "loha": 1, "locon": 1} and report.targets == 3
    rows = {r.block: r for r in report.blocks}
    assert set(rows) == {"IN01", "M00", "OUT11"}
    assert rows["IN01"].ranks == [8] and rows["IN01"].alphas == [4.0]
    assert rows["OUT11"].kinds == ["locon"] and rows["OUT11"].alphas == [None]
    assert rows["M00"].kinds == ["loha"] and rows["M00"].ranks == [2]
    assert report.tensors == len(tensors) and report.parameters == sum(t.numel() for t in tensors.values())
    assert report.size == path.stat().st_size and report.dtypes == {"F32": len(tensors)}
    assert report.trigger_phrase == "mycat"
    assert report.top_tags[:3] == [("cat", 13), ("dog", 7), ("orange", 4)]
    facts = dict(report.training)
    assert facts["base model"] == "v1-5-pruned.safetensors" and facts["steps"] == "1200"
    assert facts["optimizer"].endswith("AdamW8bit") and facts["resolution"] == "(512, 512)"
    assert facts["started"] == "1970-01-01 00:00:00 UTC"
    assert report.nonfinite == [] and report.skipped_keys == [] and report.coverage is None


def test_hashes_match_hashlib_and_stale_embedded_hash_is_flagged(sd1_file, tmp_path):
    path, tensors = sd1_file
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    report = inspect_lora(path)
    assert report.hashes["sha256"] == hashlib.sha256(raw).hexdigest().upper()
    assert report.hashes["autov2"] == report.hashes["sha256"][:10]
    assert report.hashes["autov3"] == hashlib.sha256(raw[header_end:]).hexdigest().upper()
    assert report.embedded_hashes == []
    good = hashlib.sha256(raw[header_end:]).hexdigest()
    for stored, stale in ((good, False), ("0" * 64, True)):
        other = tmp_path / f"{stale}.safetensors"
        save_file(tensors, str(other), metadata={"sshs_model_hash": stored, "modelspec.hash_sha256": "0x" + stored})
        checks = inspect_lora(other).embedded_hashes
        assert [c.key for c in checks] == ["sshs_model_hash", "modelspec.hash_sha256"]
        assert all(c.stale == stale for c in checks)


def test_nonfinite_values_are_counted_per_tensor(sd1_file, tmp_path):
    _, tensors = sd1_file
    bad = dict(tensors)
    up = next(k for k in bad if k.endswith("lora_up.weight"))
    bad[up] = bad[up].clone()
    bad[up].view(-1)[:3] = float("nan")
    bad[up].view(-1)[5] = float("-inf")
    down = next(k for k in bad if k.endswith("lora_down.weight"))
    bad[down] = bad[down].half()
    bad[down].view(-1)[0] = float("inf")
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    found = {n.key: n for n in inspect_lora(path).nonfinite}
    assert set(found) == {up, down}
    assert (found[up].nan, found[up].posinf, found[up].neginf) == (3, 0, 1)
    assert (found[down].nan, found[down].posinf) == (0, 1) and found[down].total == bad[down].numel()


def test_coverage_against_an_arch_and_refusal_of_another(sd1_file):
    path, _ = sd1_file
    report = inspect_lora(path, arch="sd1")
    assert report.coverage.matched_percent == 100.0 and len(report.coverage.matched) == 3
    assert "metadata" in report.arch_reason
    with pytest.raises(TargetError, match="is a LoRA for sd1"):
        inspect_lora(path, arch="sdxl")


def test_unknown_keys_are_listed_not_raised(sd1_file, tmp_path):
    _, tensors = sd1_file
    path = tmp_path / "extra.safetensors"
    save_file({**tensors, "emb_params": torch.zeros(2, 768)}, str(path), metadata={"ss_base_model_version": "sd_v1"})
    report = inspect_lora(path)
    assert report.skipped_keys == ["emb_params"] and report.targets == 3


def test_peft_folder_is_inspected(tmp_path):
    lora = LoraFile(
        patches={t: p for t, p in _sd1_lora().patches.items() if isinstance(p, LoraPatch) and p.down.dim() == 2}
    )
    folder = save_lora(lora, tmp_path / "adapter", dialect="peft", arch="sd1")
    report = inspect_lora(folder, arch="sd1")
    assert report.dialect == "peft" and report.targets == 1 and report.hashes == {}
    assert report.coverage.matched_percent == 100.0
