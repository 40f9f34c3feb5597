"""--model for LoRAs of the embedded model (widths no released model has): convert, merge and resize place the keys by
the model's own shapes; the diffusers file convert writes loads in diffusers at lorakit's strength (the oracle), and
merge/resize match dense references."""

from __future__ import annotations

import torch

from lorakit.cli.main import main
from lorakit.core.patches import LoraPatch
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.checkpoint import Checkpoint
from lorakit.formats.lora_io import load_lora, save_lora
from lorakit.generate import apply_lora
from lorakit.models.embedded import embedded_model_path, load_embedded_pipeline
from lorakit.ops.convert import convert_lora

torch.set_num_threads(1)


def _unet_output(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 32, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(latents, 10, encoder_hidden_states=context).sample


def _random_lora(path, seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA on some attention projections of the embedded UNet; returns its dense deltas by module."""
    with Checkpoint.open(embedded_model_path()) as ckpt:
        shapes = ckpt.shapes("unet")
    g = torch.Generator().manual_seed(seed)
    modules = [m for m in shapes if m.endswith(("attn1.to_q", "attn2.to_v"))]
    patches = {
        Target("unet", m): LoraPatch(
            up=torch.randn(shapes[m][0], 3, generator=g), down=torch.randn(3, shapes[m][1], generator=g), alpha=1.5
        )
        for m in modules
    }
    save_lora(LoraFile(patches, arch="sd1"), path, dialect="kohya", modules={"unet": shapes})
    return {t.module: p.up @ p.down * (1.5 / 3) for t, p in patches.items()}


def test_merge_and_resize_take_the_model_for_custom_widths(tmp_path):
    a, b = _random_lora(tmp_path / "a.safetensors", 2), _random_lora(tmp_path / "b.safetensors", 3)
    model = str(embedded_model_path())
    merged = tmp_path / "m.safetensors"
    code = main(
        [
            "merge",
            f"{tmp_path / 'a.safetensors'}:0.6",
            f"{tmp_path / 'b.safetensors'}:-0.4",
            "-o",
            str(merged),
            "--model",
            model,
            "--dtype",
            "fp32",
        ]
    )
    assert code == 0
    with Checkpoint.open(model) as ckpt:
        shapes = ckpt.shapes("unet")
    got = load_lora(merged, arch="sd1", modules={"unet": shapes})
    for target, patch in got.patches.items():
        torch.testing.assert_close(
            patch.delta(shapes[target.module]), 0.6 * a[target.module] - 0.4 * b[target.module], atol=1e-5, rtol=1e-5
        )
    resized = tmp_path / "r.safetensors"
    assert main(["resize", str(merged), "--rank", "3", "-o", str(resized), "--model", model, "--dtype", "fp32"]) == 0
    for target, patch in load_lora(resized, arch="sd1", modules={"unet": shapes}).patches.items():
        dense = 0.6 * a[target.module] - 0.4 * b[target.module]
        u, s, vh = torch.linalg.svd(dense.double())
        best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young: the best rank-3 approximation
        torch.testing.assert_close(patch.delta(shapes[target.module]).double(), best, atol=1e-4, rtol=1e-4)


def test_embedded_model_lora_converts_with_model_shapes_and_loads_in_diffusers(tmp_path):
    model = embedded_model_path()
    with Checkpoint.open(model) as ckpt:
        assert ckpt.arch == "sd1" and "use_linear_projection" in ckpt.arch_reason
        shapes = ckpt.shapes("unet")
    g = torch.Generator().manual_seed(1)
    modules = [m for m in shapes if m.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_out.0"))]
    patches = {}
    for i, module in enumerate(modules):
        out, inp = shapes[module][:2]
        patches[Target("unet", module)] = LoraPatch(
            up=torch.randn(out, 4, generator=g) * 0.2, down=torch.randn(4, inp, generator=g) * 0.2, alpha=2.0 + i % 3
        )
    kohya = tmp_path / "tiny_kohya.safetensors"
    save_lora(LoraFile(patches, arch="sd1"), kohya, dialect="kohya", modules={"unet": shapes})

    converted = tmp_path / "tiny_diffusers.safetensors"
    result = convert_lora(kohya, converted, "diffusers", verify=True, model=model)
    assert result.targets == len(modules) and result.max_error == 0

    ours = load_embedded_pipeline()
    apply_lora(ours, kohya, weight=0.7)
    theirs = load_embedded_pipeline()
    theirs.load_lora_weights(str(tmp_path), weight_name=converted.name, adapter_name="x")
    theirs.set_adapters(["x"], [0.7])
    base = _unet_output(load_embedded_pipeline())
    expected, got = _unet_output(theirs), _unet_output(ours)
    assert (expected - base).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
