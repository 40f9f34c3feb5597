"""Module tables against the real diffusers / transformers classes built on the meta device from the bundled configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lorakit.arch import (
    ARCHS,
    VARIANTS,
    components,
    load_config,
    module_info,
    module_kind,
    module_table,
    normalize_module_name,
    parameter_count,
    to_runtime_name,
)
from lorakit.arch.registry import TABLES
from lorakit.arch.tables import table_info

torch.set_num_threads(1)

# One (variant, component) per table, so each table is rebuilt once.
TABLE_OWNERS = {}
for _variant, _info in VARIANTS.items():
    for _component, _table in _info.components.items():
        TABLE_OWNERS.setdefault(_table, (_variant, _component))


def _build(variant: str, component: str) -> nn.Module:
    """The model from the bundled config, built here without the generator script (an independent path)."""
    config = load_config(variant, component)
    spec = TABLES[VARIANTS[variant].components[component]]
    with torch.device("meta"):
        if spec.library == "diffusers":
            import diffusers

            return getattr(diffusers, config.pop("_class_name")).from_config(config)
        import transformers

        config.pop("architectures")
        model_type = config.pop("model_type")
        config_cls = transformers.T5Config if model_type == "t5" else transformers.CLIPTextConfig
        return getattr(transformers, spec.class_name)(config_cls(**config))


def _live_weights(model: nn.Module) -> dict[str, tuple[tuple[int, ...], bool]]:
    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, torch.Tensor):
            out[name] = (tuple(weight.shape), isinstance(getattr(module, "bias", None), torch.Tensor))
    return out


@pytest.mark.parametrize("table", list(TABLE_OWNERS))
def test_table_matches_meta_model(table: str) -> None:
    variant, component = TABLE_OWNERS[table]
    model = _build(variant, component)
    live = {normalize_module_name(variant, component, n): v for n, v in _live_weights(model).items()}
    stored = {n: (i.shape, i.bias) for n, i in module_info(variant, component).items()}
    assert stored == live
    # and back: every table name resolves in the live model under its runtime name
    runtime = {to_runtime_name(variant, component, n) for n in stored}
    assert runtime == set(_live_weights(model))
    # parameter counts: every parameter belongs to a module with a weight (T5 counts its tied embedding twice)
    unique = sum(p.numel() for p in model.parameters())
    tied = module_info(variant, component).get("encoder.embed_tokens")
    assert parameter_count(variant, component) == unique + (tied.parameter_count if tied else 0)


@pytest.mark.parametrize(
    ("arch", "component", "params"),
    [
        ("sd1", "unet", 859_520_964),
        ("sd2", "unet", 865_910_724),
        ("sdxl", "unet", 2_567_463_684),
        ("flux", "transformer", 11_901_408_320),
        ("sd1", "text_encoder", 123_060_480),
    ],
)
def test_published_parameter_counts(arch: str, component: str, params: int) -> None:
    """Sizes people quote: SD1.5 UNet 860M, SDXL UNet 2.57B, FLUX.1 11.9B, CLIP-L text 123M."""
    assert parameter_count(arch, component) == params


def test_variants_differ_where_the_models_do() -> None:
    dev, schnell = module_table("flux-dev", "transformer"), module_table("flux-schnell", "transformer")
    assert set(dev) - set(schnell) == {
        "time_text_embed.guidance_embedder.linear_1",
        "time_text_embed.guidance_embedder.linear_2",
    }
    assert set(schnell) <= set(dev)
    medium, medium35 = module_table("sd3-medium", "transformer"), module_table("sd3.5-medium", "transformer")
    assert sum(".attn2.to_q" in n for n in medium35) == 13 and not any(".attn2." in n for n in medium)
    assert module_table("sd3.5-large", "transformer")["transformer_blocks.37.attn.to_q"] == (2432, 2432)
    # the last SD3 block only updates the image stream
    assert "transformer_blocks.23.attn.to_add_out" not in medium
    assert module_table("sd2", "unet")["down_blocks.0.attentions.0.proj_in"] == (320, 320)
    assert module_table("sd1", "unet")["down_blocks.0.attentions.0.proj_in"] == (320, 320, 1, 1)


def test_components_and_kinds() -> None:
    assert ARCHS == ("sd1", "sd2", "sdxl", "flux", "sd3")
    assert components("sdxl") == ["unet", "text_encoder", "text_encoder_2"]
    assert components("sd3") == ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3"]
    assert module_kind("sd1", "unet", "conv_in") == "conv"
    assert module_kind("sd1", "unet", "conv_norm_out") == "norm"
    assert module_kind("flux", "transformer", "transformer_blocks.0.attn.to_q") == "linear"
    assert module_kind("sd3", "text_encoder_3", "shared") == "embedding"
    with pytest.raises(KeyError, match="unknown architecture"):
        module_table("sd4", "unet")
    with pytest.raises(KeyError, match="has no component"):
        module_table("sd1", "transformer")


def test_text_encoder_naming_forms() -> None:
    """transformers 5 CLIPTextModel drops ``text_model.``; the tables keep the form real files use."""
    v5 = "encoder.layers.0.self_attn.q_proj"
    assert normalize_module_name("sd1", "text_encoder", v5) == "text_model." + v5
    assert normalize_module_name("sd1", "text_encoder", "text_model." + v5) == "text_model." + v5
    # a T5 name starts with "encoder." too and must stay as it is
    t5 = "encoder.block.0.layer.0.SelfAttention.q"
    assert normalize_module_name("flux", "text_encoder_2", t5) == t5
    assert to_runtime_name("sd1", "text_encoder", "text_model." + v5) == v5
    assert to_runtime_name("sdxl", "text_encoder_2", "text_model." + v5) == "text_model." + v5
    assert to_runtime_name("sd1", "text_encoder", "text_model." + v5, has_text_model=True) == "text_model." + v5


def test_tables_are_small_and_cached() -> None:
    assert table_info("sdxl-unet") is table_info("sdxl-unet")
    assert module_table("sdxl", "unet") is module_table("sdxl", "unet")
    with pytest.raises(TypeError):
        module_table("sd1", "unet")["conv_in"] = (1,)  # type: ignore[index]
    from importlib import resources

    data = resources.files("lorakit.arch").joinpath("data")
    assert sum(f.stat().st_size for f in data.iterdir()) < 2_000_000  # type: ignore[attr-defined]


def test_import_is_light() -> None:
    """``import lorakit.arch`` pulls in neither diffusers nor transformers and loads no table."""
    code = (
        "import sys, lorakit.arch; "
        "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad; "
        "from lorakit.arch.tables import table_info; assert table_info.cache_info().currsize == 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
