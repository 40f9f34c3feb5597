"""SDXL (LDM names), SD3 (joint blocks) and ComfyUI names, placed through ``lorakit.arch``'s tables and name maps.

SDXL is checked against diffusers on a tiny SDXL-layout pipeline (its loader maps kohya's LDM block numbers from the
UNet config); SD3 and ComfyUI, which diffusers does not read from kohya / ComfyUI keys, against the real module tables
(names and shapes only: rank-1 tensors keep the files small) and round trips.
"""

from __future__ import annotations

import pytest
import torch
from dialect_models import random_lora, tables_of, tiny_sdxl_unet, tiny_text_encoder, tiny_text_encoder_2

from lorakit.arch.tables import module_table
from lorakit.core.patches import LoraPatch, apply_patches
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import load_lora, save_lora, to_state_dict

torch.set_num_threads(1)
diffusers = pytest.importorskip("diffusers")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402


class _TinyXLPipeline(diffusers.loaders.StableDiffusionXLLoraLoaderMixin):
    """The parts of a StableDiffusionXLPipeline that ``load_lora_weights`` touches."""

    hf_device_map = None

    def __init__(self) -> None:
        self.unet, self.text_encoder, self.text_encoder_2 = tiny_sdxl_unet(), tiny_text_encoder(), tiny_text_encoder_2()

    @property
    def components(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}


def _sdxl_tables():
    return tables_of(unet=tiny_sdxl_unet(), text_encoder=tiny_text_encoder(), text_encoder_2=tiny_text_encoder_2())


def _lora_on(table_items, seed=0, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    patches = {}
    for target, shape in table_items:
        patches[target] = LoraPatch(
            up=torch.randn(shape[0], 1, *([1] * (len(shape) - 2)), generator=g),
            down=torch.randn(1, *shape[1:], generator=g),
            alpha=alpha,
        )
    return LoraFile(patches=patches)


def test_sdxl_kohya_ldm_names_load_in_diffusers(tmp_path):
    tables = _sdxl_tables()
    lora = random_lora(tables, alphas=(2.0,), skip=lambda c, n, s: len(s) < 2 or (c != "unet" and "_embedding" in n))
    save_lora(lora, tmp_path / "xl.safetensors", dialect="kohya", arch="sdxl", modules=tables)
    back = load_lora(tmp_path / "xl.safetensors", modules=tables)
    assert back.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert back.arch == "sdxl" and set(back.patches) == set(lora.patches)
    keys = set(to_state_dict(lora, "kohya", arch="sdxl", modules=tables)[0])
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    assert "lora_unet_label_emb_0_0.lora_up.weight" in keys
    assert "lora_te2_text_projection.lora_up.weight" in keys

    pipe = _TinyXLPipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name="xl.safetensors", adapter_name="x")
    originals = {"unet": tiny_sdxl_unet(), "text_encoder": tiny_text_encoder(), "text_encoder_2": tiny_text_encoder_2()}
    placed = set()
    for component, model in pipe.components.items():
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge(adapter_names=["x"])
                target = Target(component, name.replace(".base_layer", ""))
                want = apply_patches(
                    originals[component].get_submodule(target.module).weight, [(lora.patches[target], 1.0)]
                )
                torch.testing.assert_close(layer.base_layer.weight, want, atol=2e-5, rtol=1e-5, msg=str(target))
                placed.add(target)
    assert placed == set(lora.patches)


def test_sdxl_real_names_place_without_a_model():
    """A real SDXL kohya file: the architecture follows from the LDM names, the tables from lorakit.arch."""
    unet, te2 = module_table("sdxl", "unet"), module_table("sdxl", "text_encoder_2")
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    lora = _lora_on(
        [
            (Target("unet", module), unet[module]),
            (
                Target("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj"),
                te2["text_model.encoder.layers.0.self_attn.q_proj"],
            ),
        ]
    )
    tensors, _ = to_state_dict(lora, "kohya", arch="sdxl")
    assert sorted(tensors)[0].startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.")
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in tensors
    back = load_lora(tensors)  # no metadata: the widths tell SDXL (cross-attention 2048)
    assert back.arch == "sdxl" and "2048" in back.arch_reason
    assert set(back.patches) == set(lora.patches)


def test_sd3_joint_blocks_split_and_fuse_exactly():
    table = module_table("sd3", "transformer")
    parts = [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
    g = torch.Generator().manual_seed(1)
    down = torch.randn(2, table[parts[0]][1], generator=g)
    patches = {
        Target("transformer", p): LoraPatch(up=torch.randn(table[p][0], 2, generator=g), down=down, alpha=1.0)
        for p in parts
    }
    patches[Target("transformer", "transformer_blocks.0.ff.net.2")] = LoraPatch(
        up=torch.randn(1536, 1, generator=g), down=torch.randn(1, 6144, generator=g), alpha=4.0
    )
    lora = LoraFile(patches=patches)
    tensors, _ = to_state_dict(lora, "kohya", arch="sd3")
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (3 * 1536, 2)
    assert "lora_unet_joint_blocks_0_x_block_mlp_fc2.alpha" in tensors
    back = load_lora(tensors)
    assert back.arch == "sd3" and set(back.patches) == set(patches)
    for target, patch in patches.items():
        got = back.patches[target]
        assert torch.equal(got.up, patch.up) and torch.equal(got.down, patch.down) and got.alpha == patch.alpha
    # diffusers names, and back to kohya: the same bytes.
    diffusers_form, metadata = to_state_dict(back, "diffusers")
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in diffusers_form
    again = load_lora(diffusers_form, metadata=metadata, arch="sd3")
    kohya_again, _ = to_state_dict(again, "kohya")
    assert set(kohya_again) == set(tensors) and all(torch.equal(kohya_again[k], v) for k, v in tensors.items())


def test_sd3_t5_is_te3_and_flux_t5_is_te3_too():
    t5 = "encoder.block.0.layer.0.SelfAttention.q"
    for arch, component in (("sd3", "text_encoder_3"), ("flux", "text_encoder_2")):
        lora = _lora_on([(Target(component, t5), module_table(arch, component)[t5])])
        tensors, _ = to_state_dict(lora, "kohya", arch=arch)
        assert next(iter(tensors)).startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q.")
        assert set(load_lora(tensors, arch=arch).patches) == set(lora.patches)


@pytest.mark.parametrize(
    ("metadata", "arch"),
    [
        ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        ({"ss_base_model_version": "sd_v1"}, "sd1"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
        ({"modelspec.architecture": "Flux.1-dev/lora"}, "flux"),
    ],
)
def test_architecture_from_metadata(metadata, arch):
    table = module_table(arch, "text_encoder")
    name = next(n for n in table if n.endswith("self_attn.q_proj"))
    lora = _lora_on([(Target("text_encoder", name), table[name])])
    tensors, _ = to_state_dict(lora, "kohya", arch=arch)
    back = load_lora(tensors, metadata=metadata)
    assert back.arch == arch and "metadata" in back.arch_reason
    assert set(back.patches) == set(lora.patches)


def test_sd1_width_tells_the_architecture():
    table = module_table("sd1", "unet")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors, _ = to_state_dict(_lora_on([(Target("unet", name), table[name])]), "kohya")
    back = load_lora(tensors)
    assert back.arch == "sd1" and "768" in back.arch_reason


def test_comfy_sd1_uses_ldm_and_clip_names():
    unet, te = module_table("sd1", "unet"), module_table("sd1", "text_encoder")
    lora = _lora_on(
        [
            (Target("unet", "up_blocks.1.attentions.2.proj_out"), unet["up_blocks.1.attentions.2.proj_out"]),
            (Target("text_encoder", "text_model.encoder.layers.3.mlp.fc1"), te["text_model.encoder.layers.3.mlp.fc1"]),
        ]
    )
    tensors, _ = to_state_dict(lora, "comfy", arch="sd1")
    assert "diffusion_model.output_blocks.5.1.proj_out.lora_up.weight" in tensors
    assert "text_encoders.clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.lora_up.weight" in tensors
    back = load_lora(tensors, arch="sd1")
    assert back.dialect == "comfy" and set(back.patches) == set(lora.patches)
