"""extract: from (base, base + a known rank-r delta) the LoRA reproduces the delta; randomized within 1% of exact."""

from __future__ import annotations

import hashlib

import pytest
import torch
from ckpt_models import diffusers_weights, module_kinds, write_folder, write_single_file

from lorakit.errors import ConfigError, OutputError
from lorakit.formats.canonical import Target
from lorakit.formats.checkpoint import Checkpoint
from lorakit.formats.lora_io import load_lora
from lorakit.ops.extract import extract_lora, extract_to_file, randomized_svd

torch.set_num_threads(1)
RANK = 3


def _tuned_weights(arch: str, noise: float = 0.0, text: bool = True):
    """Base weights plus a known rank-3 delta on every Linear / conv (text encoders too when ``text``)."""
    g = torch.Generator().manual_seed(11)
    weights = diffusers_weights(arch)
    deltas = {}
    for component, table in module_kinds(arch).items():
        if component != "unet" and not text:
            continue
        for module, shape in table.items():
            out, inp, *k = shape
            b = torch.randn(out, RANK, generator=g)
            a = torch.randn(RANK, inp * (k[0] * k[1] if k else 1), generator=g)
            delta = (b @ a).reshape(shape) * 0.05 + noise * torch.randn(shape, generator=g)
            weights[component][module] = weights[component][module] + delta
            deltas[Target(component, module)] = delta
    return weights, deltas


def test_extract_reproduces_a_known_low_rank_delta_across_layouts(tmp_path):
    base = write_folder(tmp_path / "base", "sd1")  # a diffusers folder ...
    weights, deltas = _tuned_weights("sd1")
    tuned = write_single_file(tmp_path / "tuned.safetensors", "sd1", weights=weights)  # ... against LDM names
    out = tmp_path / "lora.safetensors"
    result = extract_to_file(
        base, tuned, out, rank=RANK, conv_rank=RANK, method="exact", arch="sd1", dtype=torch.float32
    )
    assert result.components == {
        "unet": len(module_kinds("sd1")["unet"]),
        "text_encoder": len(module_kinds("sd1")["text_encoder"]),
    }
    assert result.worst_error < 1e-4
    with Checkpoint.open(base, arch="sd1") as ckpt:
        lora = load_lora(out, arch="sd1", modules={c: ckpt.shapes(c) for c in ckpt.components()})
    assert lora.metadata["ss_network_dim"] == str(RANK) and "lorakit.extract" in lora.metadata
    assert set(lora.patches) == set(deltas)
    for target, delta in deltas.items():
        got = lora.patches[target].delta(delta.shape)
        assert lora.patches[target].rank == RANK
        torch.testing.assert_close(got, delta, rtol=1e-4, atol=2e-5, msg=str(target))


def test_unchanged_text_encoder_is_left_out(tmp_path):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    weights, _ = _tuned_weights("sd1", text=False)
    tuned = write_single_file(tmp_path / "tuned.safetensors", "sd1", weights=weights)
    with Checkpoint.open(base, arch="sd1") as a, Checkpoint.open(tuned, arch="sd1") as b:
        result = extract_lora(a, b, rank=RANK, conv_rank=None)
    assert set(result.components) == {"unet"}
    assert any(u.startswith("text_encoder.") for u in result.unchanged)
    # conv_rank None leaves k x k convs out; 1x1 convs (SD1 proj_in) take the linear rank
    assert Target("unet", "conv_in") not in result.lora.patches
    assert Target("unet", "down_blocks.0.attentions.0.proj_in") in result.lora.patches


def test_randomized_is_within_one_percent_of_exact(tmp_path):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    weights, _ = _tuned_weights("sd1", noise=0.002)
    tuned = write_single_file(tmp_path / "tuned.safetensors", "sd1", weights=weights)
    with Checkpoint.open(base, arch="sd1") as a, Checkpoint.open(tuned, arch="sd1") as b:
        exact = extract_lora(a, b, rank=RANK, conv_rank=RANK, method="exact")
        fast = extract_lora(a, b, rank=RANK, conv_rank=RANK, method="randomized", seed=1)
    errors = {m.target: m.error for m in exact.modules}
    assert len(errors) > 50
    for m in fast.modules:
        assert m.error <= errors[m.target] * 1.01 + 1e-7, m.target
        assert m.error >= errors[m.target] - 1e-6  # exact is optimal (Eckart-Young)


def test_randomized_svd_matches_exact_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, generator=g))
    v, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    s = torch.logspace(0, -4, 200)
    matrix = (u[:, :200] * s) @ v.T
    u_fast, s_fast, vh_fast = randomized_svd(matrix, 10, generator=torch.Generator().manual_seed(1))
    assert u_fast.shape == (300, 10) and vh_fast.shape == (10, 200)
    torch.testing.assert_close(s_fast, s[:10], rtol=5e-3, atol=1e-6)
    error = torch.linalg.matrix_norm(matrix - (u_fast * s_fast) @ vh_fast)
    optimal = s[10:].norm()  # Eckart-Young
    assert optimal <= error <= 1.01 * optimal


def test_same_seed_same_bytes(tmp_path):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    weights, _ = _tuned_weights("sd1", noise=0.001)
    tuned = write_single_file(tmp_path / "tuned.safetensors", "sd1", weights=weights)
    digests = set()
    for name in ("a", "b"):
        extract_to_file(base, tuned, tmp_path / f"{name}.safetensors", rank=2, arch="sd1", seed=5)
        digests.add(hashlib.sha256((tmp_path / f"{name}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_errors(tmp_path):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    other = write_single_file(tmp_path / "xl.safetensors", "sdxl")
    with pytest.raises(OutputError, match="also an input"):
        extract_to_file(base, other, base, rank=2, arch="sd1")
    with Checkpoint.open(base, arch="sd1") as a, Checkpoint.open(other, arch="sdxl") as b:
        with pytest.raises(ConfigError, match="one architecture"):
            extract_lora(a, b, rank=2)
    with Checkpoint.open(base, arch="sd1") as a:
        with pytest.raises(ConfigError, match="randomized or exact"):
            extract_lora(a, a, rank=2, method="fast")
    with pytest.raises(ConfigError, match="nothing to extract"):
        extract_to_file(base, base.with_name("base.safetensors"), tmp_path / "o.safetensors", rank=2, arch="sd1")
