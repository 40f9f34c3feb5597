"""Architecture detection from keys, shapes and metadata; block ids."""

from __future__ import annotations

import pytest
import torch

from lorakit.arch import (
    VARIANTS,
    arch_of,
    block_ids,
    block_of,
    checkpoint_prefix,
    detect,
    detect_arch,
    module_info,
    module_table,
    original_map,
    tables,
)

torch.set_num_threads(1)

RANK = 4
# What each variant's key sets can tell: a LoRA cannot show FLUX dev vs schnell or SD3 medium vs 3.5 medium
# without attn2, so only the full-model key sets are asked for the variant.
LORA_VARIANT = {"flux-dev": None, "flux-schnell": None, "sd3-medium": None}


def _diffusers_state(variant: str) -> dict[str, tuple[int, ...]]:
    info = VARIANTS[variant]
    return {f"{c}.{m}.weight": s for c in info.components for m, s in module_table(variant, c).items()}


def _single_file_state(variant: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for component in VARIANTS[variant].components:
        table = module_table(variant, component)
        for module, ref in original_map(variant, component).items():
            shape = table[module]
            if ref.rows is not None:
                shape = (ref.rows[1], *shape[1:])  # grows to the fused size; the largest member wins
            key = checkpoint_prefix(variant, component) + ref.key
            out[key] = max(out.get(key, shape), shape)
    return out


def _lora(names: dict[str, tuple[int, ...]], prefix: str, flatten: bool) -> dict[str, tuple[int, ...]]:
    """LoRA factors (kohya ``lora_down``/``lora_up`` when flattened, PEFT ``lora_A``/``lora_B`` otherwise)."""
    out = {}
    for name, shape in names.items():
        path = prefix + (name.replace(".", "_") if flatten else name)
        down, up = (".lora_down.weight", ".lora_up.weight") if flatten else (".lora_A.weight", ".lora_B.weight")
        out[path + down] = (RANK, shape[1], *shape[2:])
        out[path + up] = (shape[0], RANK, *([1] * (len(shape) - 2)))
        if flatten:
            out[path + ".alpha"] = ()
    return out


def _linear_and_conv(variant: str, component: str) -> dict[str, tuple[int, ...]]:
    """What a LoRA trainer targets: Linear and Conv2d modules, and only the blocks of a DiT (as real LoRAs do)."""
    return {
        m: i.shape
        for m, i in module_info(variant, component).items()
        if i.kind in ("linear", "conv") and (component != "transformer" or "transformer_blocks" in m)
    }


def _kohya(variant: str) -> dict[str, tuple[int, ...]]:
    """kohya naming: diffusers names for the SD1/SD2 UNet, original names for SDXL / FLUX / SD3, te1/te2 prefixes."""
    info = VARIANTS[variant]
    denoiser = "unet" if "unet" in info.components else "transformer"
    table = _linear_and_conv(variant, denoiser)
    if arch_of(variant) in ("sd1", "sd2"):
        keys = _lora(table, "lora_unet_", True)
    else:
        fused: dict[str, tuple[int, ...]] = {}
        for module, ref in original_map(variant, denoiser).items():
            if module in table:
                rows = ref.rows[1] if ref.rows else table[module][0]
                fused[ref.module] = max(fused.get(ref.module, (0,)), (rows, *table[module][1:]))
        keys = _lora(fused, "lora_unet_", True)
    text = [c for c in info.components if c.startswith("text_encoder")]
    for i, component in enumerate(text, start=1):
        te = "lora_te_" if len(text) == 1 else f"lora_te{i}_"
        keys |= _lora(_linear_and_conv(variant, component), te, True)
    return keys


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_models_detected_with_variant(variant: str) -> None:
    for state in (_diffusers_state(variant), _single_file_state(variant)):
        found = detect(state)
        assert (found.arch, found.variant) == (arch_of(variant), variant), found.reason


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loras_detected(variant: str) -> None:
    denoiser = "unet" if "unet" in VARIANTS[variant].components else "transformer"
    peft = _lora(_linear_and_conv(variant, denoiser), f"{denoiser}.", False)
    for keys in (_kohya(variant), peft):
        found = detect(keys)
        assert found.arch == arch_of(variant), found.reason
        assert found.variant == LORA_VARIANT.get(variant, variant), found.reason


def test_attention_only_loras() -> None:
    """The common case: q/k/v/out of the attentions only, no text encoder."""
    for variant in ("sd1", "sd2", "sdxl"):
        attn = {m: s for m, s in module_table(variant, "unet").items() if ".attn" in m}
        assert detect_arch(_lora(attn, "lora_unet_", True))[0] == variant
    # self-attention only in SD1: no cross-attention width and no proj_in, so nothing decides; metadata then does
    attn1 = {m: s for m, s in module_table("sd1", "unet").items() if ".attn1." in m}
    keys = _lora(attn1, "unet.", False)
    assert detect_arch(keys)[0] is None
    arch, reason = detect_arch(keys, {"ss_base_model_version": "sd_v1"})
    assert arch == "sd1" and "ss_base_model_version" in reason
    # with proj_in: SD1's is a 1x1 conv
    proj = {m: s for m, s in module_table("sd1", "unet").items() if ".attn1." in m or m.endswith("proj_in")}
    assert detect_arch(_lora(proj, "unet.", False))[0] == "sd1"


def test_metadata_fills_and_loses() -> None:
    flux_lora = _lora(_linear_and_conv("flux", "transformer"), "transformer.", False)
    found = detect(flux_lora, {"modelspec.architecture": "flux-1-schnell/lora"})
    assert (found.arch, found.variant) == ("flux", "flux-schnell")
    assert detect(flux_lora).variant is None
    guidance = {"transformer.time_text_embed.guidance_embedder.linear_1.lora_A.weight": (4, 256)}
    assert detect(flux_lora | guidance).variant == "flux-dev"  # only dev has a guidance embedder to adapt
    found = detect(flux_lora, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert found.arch == "flux" and "keys win" in found.reason
    assert detect({}, {"ss_v2": "True"}).arch == "sd2"
    assert detect({}, {"modelspec.architecture": "stable-diffusion-3.5-large/lora"}).variant == "sd3.5-large"


def test_text_encoder_only_and_unknown() -> None:
    bigg = {m: s for m, s in module_table("sdxl", "text_encoder_2").items() if m.endswith("q_proj")}
    clip = {m: s for m, s in module_table("sdxl", "text_encoder").items() if m.endswith("q_proj")}
    keys = _lora(clip, "lora_te1_", True) | _lora(bigg, "lora_te2_", True)
    assert detect_arch(keys)[0] == "sdxl"
    openclip_h = {m: s for m, s in module_table("sd2", "text_encoder").items() if m.endswith("fc1")}
    assert detect_arch(_lora(openclip_h, "lora_te_", True))[0] == "sd2"
    assert detect_arch({}) == (None, "no key names a known base model")
    assert detect_arch({"foo.lora_down.weight": (4, 10)})[0] is None
    refiner = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 1280)}
    found = detect(refiner)
    assert found.arch is None and "1280" in found.reason


def test_block_ids() -> None:
    assert block_of("sdxl", "unet", "down_blocks.1.attentions.0.proj_in") == "IN04"
    assert block_of("sd1", "unet", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k") == "IN02"
    assert block_of("sd1", "unet", "mid_block.resnets.1.conv2") == "M00"
    assert block_of("sd1", "unet", "up_blocks.3.attentions.2.proj_out") == "OUT11"
    assert block_of("sd1", "unet", "time_embedding.linear_1") == "TIME"
    assert block_of("sd1", "unet", "conv_out") == "OUT"
    assert block_of("sd1", "text_encoder", "encoder.layers.0.mlp.fc1") == "BASE"
    assert block_of("flux", "transformer", "single_transformer_blocks.37.proj_out") == "S37"
    assert block_of("flux", "transformer", "transformer_blocks.0.attn.to_q") == "D00"
    assert block_of("flux", "transformer", "x_embedder") == "IN"
    assert block_of("flux", "text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q") == "T5"
    assert block_of("sd3", "transformer", "transformer_blocks.5.ff.net.2") == "J05"
    assert tables.block_of("sd3", "text_encoder_2", "text_projection") == "CLIP-G"
    lbw26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
    assert [b for b in block_ids("sd1") if b in lbw26] == lbw26
    assert len(block_ids("flux")) == 61  # CLIP, T5, IN, D00-D18, S00-S37, OUT
    assert [b for b in block_ids("sdxl") if b.startswith("IN")] == [f"IN{i:02d}" for i in range(9)]
    with pytest.raises(KeyError):
        block_of("sd1", "unet", "no.such.module")
