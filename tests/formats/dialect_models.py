"""Tiny base models and random LoRAs for the dialect tests (a plain module: see formats_helpers.py for why).

The diffusers / transformers models are built in code from tiny configs (a 52k-parameter SD-layout UNet with cross
attention, resnets with shortcuts, down- and upsamplers; a 2-layer CLIP text encoder; a 1+1-block FLUX transformer),
cached per process, and copied by each test that changes them.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from lorakit.core.patches import LoraPatch, Patch, apply_patches
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import module_shapes

torch.set_num_threads(1)


@functools.cache
def _unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()


@functools.cache
def _sdxl_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    # SDXL's layout in small: no attention in the first down / last up block, added time + text embedding.
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=2,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=30,
    ).eval()


def _clip_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=12,
        intermediate_size=24,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=50,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


@functools.cache
def _text_encoder_2() -> nn.Module:
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(4)
    return CLIPTextModelWithProjection(_clip_config(projection_dim=6)).eval()


@functools.cache
def _text_encoder() -> nn.Module:
    from transformers import CLIPTextModel

    torch.manual_seed(1)
    return CLIPTextModel(_clip_config()).eval()


@functools.cache
def _flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(2)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=6,
        pooled_projection_dim=5,
        axes_dims_rope=(2, 2),
    ).eval()


def tiny_unet() -> nn.Module:
    """A fresh copy of the tiny SD-layout UNet."""
    return copy.deepcopy(_unet())


def tiny_sdxl_unet() -> nn.Module:
    """A fresh copy of the tiny SDXL-layout UNet."""
    return copy.deepcopy(_sdxl_unet())


def tiny_text_encoder_2() -> nn.Module:
    """A fresh copy of the tiny CLIP encoder with projection, like SDXL's second (keeps ``text_model.``)."""
    return copy.deepcopy(_text_encoder_2())


def tiny_text_encoder() -> nn.Module:
    """A fresh copy of the tiny CLIP text encoder (transformers 5 names: no ``text_model.`` level)."""
    return copy.deepcopy(_text_encoder())


def tiny_flux() -> nn.Module:
    """A fresh copy of the tiny FLUX transformer (hidden 8, one double and one single block)."""
    return copy.deepcopy(_flux())


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 12, generator=g)


def random_lora(
    tables: dict[str, dict[str, tuple[int, ...]]],
    *,
    seed: int = 0,
    alphas=(0.5, 2.0, 3.0),
    skip=lambda component, name, shape: len(shape) < 2,
) -> LoraFile:
    """A LoRA on every weight of the given tables with ranks 1-3 and alphas cycling through ``alphas``."""
    g = torch.Generator().manual_seed(seed)
    patches: dict[Target, Patch] = {}
    for component, table in tables.items():
        for j, (name, shape) in enumerate(table.items()):
            if skip(component, name, shape):
                continue
            rank = 1 + j % 3
            down = torch.randn(rank, *shape[1:], generator=g) * 0.5
            up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g) * 0.5
            patches[Target(component, name)] = LoraPatch(up=up, down=down, alpha=float(alphas[j % len(alphas)]))
    return LoraFile(patches=patches)


def apply_to(model: nn.Module, patches: dict[str, Patch], strength: float = 1.0) -> nn.Module:
    """A copy of ``model`` with each named module's weight (and bias) patched by lorakit's own math."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, patch in patches.items():
            module = out.get_submodule(name)
            module.weight.copy_(apply_patches(module.weight, [(patch, strength)]))
            if patch.bias_effect() is not None:
                module.bias.add_(patch.bias_effect() * strength)
    return out


def tables_of(**models: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> module table of each model."""
    return {component: module_shapes(model) for component, model in models.items()}
