"""convert --model: a LoRA of the embedded model (widths no released model has) converts with the model's own shapes,
and the diffusers file it writes loads in diffusers with the strength lorakit applies (diffusers as the oracle)."""

from __future__ import annotations

import torch

from lorakit.core.patches import LoraPatch
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.checkpoint import Checkpoint
from lorakit.formats.lora_io import save_lora
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
