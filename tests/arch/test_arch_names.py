"""Name maps against diffusers' own single-file converters (``diffusers.loaders.single_file_utils``).

Each converter gets a fake checkpoint keyed by original names (from our maps) whose tensors are tagged: tensor ``t``
row ``r`` holds ``t * 100_000 + r``, one column (two dimensions where a converter transposes). Every tensor the
converter returns then says which original rows it came from, and that must be where our map says.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorakit.arch import (
    VARIANTS,
    DiffusersRef,
    OriginalRef,
    checkpoint_prefix,
    from_original,
    module_info,
    original_map,
    reverse_map,
    to_original,
)
from lorakit.arch.refs import SWAP_HALVES, TRANSPOSE

torch.set_num_threads(1)

su = pytest.importorskip("diffusers.loaders.single_file_utils")

ALL = [(v, c) for v, info in VARIANTS.items() for c in info.components]


def _fake(variant: str, component: str, extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A tagged checkpoint of one component in original naming, with the single-file prefix, biases included."""
    prefix = checkpoint_prefix(variant, component)
    info = module_info(variant, component)
    rows: dict[str, int] = {}
    for name, ref in original_map(variant, component).items():
        keys = [ref.key] + ([ref.bias_key] if info[name].bias and ref.bias_key else [])
        for key in keys:
            rows[key] = max(rows.get(key, 0), ref.rows[1] if ref.rows else info[name].shape[0])
    fake = {}
    for tag, (key, n) in enumerate(sorted(rows.items()), start=1):
        column = tag * 100_000 + torch.arange(n, dtype=torch.float64)
        # the transposed projection needs a real second dimension to tell rows from columns
        width = info["text_projection"].shape[1] if key == "text_projection" else 1
        fake[prefix + key] = column[:, None].expand(n, width).contiguous()
    fake.update(extra or {})
    return fake


def _expected(fake: dict[str, torch.Tensor], prefix: str, ref: OriginalRef, bias: bool) -> torch.Tensor:
    source = fake[prefix + (ref.bias_key if bias else ref.key)]
    if ref.rows is not None:
        source = source[ref.rows[0] : ref.rows[1]]
    if ref.transform == SWAP_HALVES:
        first, second = source.chunk(2)
        source = torch.cat([second, first])
    if ref.transform == TRANSPOSE:
        source = source.T
    return source


def _check(
    variant: str, component: str, fake: dict[str, torch.Tensor], converted: dict, ignore: set[str] | None = None
) -> None:
    """Every converted weight/bias came from where our map says; every table weight was produced."""
    prefix = checkpoint_prefix(variant, component)
    forward = original_map(variant, component)
    seen = set()
    for key, value in converted.items():
        if ignore and key in ignore:
            continue
        module, _, param = key.rpartition(".")
        assert module in forward, f"{key}: converter output not in our table"
        ref = forward[module]
        expected = _expected(fake, prefix, ref, bias=param == "bias")
        value = value.reshape(expected.shape) if value.numel() == expected.numel() else value
        assert torch.equal(value, expected), f"{key} <- {ref}"
        seen.add(module)
    assert seen == set(forward)


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_unet_matches_convert_ldm_unet_checkpoint(variant: str) -> None:
    fake = _fake(variant, "unet")
    config = {"layers_per_block": 2}
    if variant == "sdxl":
        config["addition_embed_type"] = "text_time"
    _check(variant, "unet", fake, su.convert_ldm_unet_checkpoint(dict(fake), config))


@pytest.mark.parametrize("variant", ["flux-dev", "flux-schnell"])
def test_flux_matches_diffusers_converter(variant: str) -> None:
    fake = _fake(variant, "transformer")
    assert next(iter(fake)).startswith("model.diffusion_model.")
    _check(variant, "transformer", fake, su.convert_flux_transformer_checkpoint_to_diffusers(dict(fake)))


@pytest.mark.parametrize("variant", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_sd3_matches_diffusers_converter(variant: str) -> None:
    pos = {"model.diffusion_model.pos_embed": torch.zeros(1, 1, 1)}  # a buffer in diffusers, not in our tables
    fake = _fake(variant, "transformer", pos)
    converted = su.convert_sd3_transformer_checkpoint_to_diffusers(dict(fake))
    _check(variant, "transformer", fake, converted, ignore={"pos_embed.pos_embed"})
    assert from_original(variant, "model.diffusion_model.pos_embed") == []


@pytest.mark.parametrize(("variant", "hidden"), [("sd2", 1024), ("sdxl", 1280)])
def test_openclip_matches_convert_open_clip_checkpoint(variant: str, hidden: int) -> None:
    component = "text_encoder" if variant == "sd2" else "text_encoder_2"
    prefix = checkpoint_prefix(variant, component)
    extra = {}
    if variant == "sd2":
        # SD2 files carry a projection and a 24th layer the 23-layer CLIPTextModel does not use; diffusers skips them
        extra = {prefix + "text_projection": torch.zeros(hidden, hidden)}
        extra[prefix + "transformer.resblocks.23.ln_1.weight"] = torch.zeros(hidden)
    fake = _fake(variant, component, extra)
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))
    _check(variant, component, fake, su.convert_open_clip_checkpoint(model, dict(fake), prefix=prefix))
    if variant == "sd2":
        assert from_original(variant, prefix + "transformer.resblocks.23.ln_1.weight") == []


@pytest.mark.parametrize(
    ("variant", "component", "convert"),
    [
        ("sd1", "text_encoder", lambda ckpt: su.convert_ldm_clip_checkpoint(ckpt)),
        ("sdxl", "text_encoder", lambda ckpt: su.convert_ldm_clip_checkpoint(ckpt)),
        ("sd3", "text_encoder", lambda c: su.convert_ldm_clip_checkpoint(c, "text_encoders.clip_l.transformer.")),
        ("sd3", "text_encoder_2", lambda c: su.convert_ldm_clip_checkpoint(c, "text_encoders.clip_g.transformer.")),
        ("sd3", "text_encoder_3", lambda ckpt: su.convert_sd3_t5_checkpoint_to_diffusers(ckpt)),
    ],
)
def test_hf_style_encoders_match_diffusers(variant: str, component: str, convert) -> None:
    fake = _fake(variant, component)
    _check(variant, component, fake, convert(dict(fake)))


@pytest.mark.parametrize(("variant", "component"), ALL)
def test_forward_map_inverts(variant: str, component: str) -> None:
    """from_original(to_original(m)) gives m back, with the full prefix, relative, as a module path and as a bias."""
    prefix = checkpoint_prefix(variant, component)
    claimed: dict[tuple[str, tuple[int, int] | None], str] = {}
    for module, ref in original_map(variant, component).items():
        assert claimed.setdefault((ref.key, ref.rows), module) == module, "two modules claim the same weight"
        back = DiffusersRef(component, module, ref.rows, ref.transform)
        assert back in from_original(variant, prefix + ref.key)
        assert back in from_original(variant, ref.module, component=component)
        if ref.bias_key:
            assert back in from_original(variant, prefix + ref.bias_key)


@pytest.mark.parametrize(("variant", "component"), ALL)
def test_fused_members_tile_their_weight(variant: str, component: str) -> None:
    for original, members in reverse_map(variant, component).items():
        if len(members) == 1:
            assert members[0].rows is None, original
            continue
        stops = [0] + [m.rows[1] for m in members]
        assert [m.rows[0] for m in members] == stops[:-1], original


def test_documented_examples() -> None:
    assert to_original("flux", "transformer", "transformer_blocks.0.attn.to_k") == OriginalRef(
        "double_blocks.0.img_attn.qkv", rows=(3072, 6144)
    )
    assert to_original("flux", "transformer", "single_transformer_blocks.3.proj_mlp").rows == (9216, 21504)
    assert to_original("flux", "transformer", "transformer_blocks.2.attn.norm_added_q").key == (
        "double_blocks.2.txt_attn.norm.query_norm.scale"
    )
    assert to_original("flux", "transformer", "norm_out.linear").transform == SWAP_HALVES
    assert to_original("sdxl", "unet", "down_blocks.1.attentions.0.proj_in").module == "input_blocks.4.1.proj_in"
    assert to_original("sdxl", "unet", "up_blocks.1.upsamplers.0.conv").module == "output_blocks.5.2.conv"
    assert to_original("sd1", "unet", "up_blocks.0.upsamplers.0.conv").module == "output_blocks.2.1.conv"
    assert to_original("sd1", "unet", "down_blocks.2.downsamplers.0.conv").module == "input_blocks.9.0.op"
    assert to_original("sd1", "unet", "mid_block.resnets.1.time_emb_proj").module == "middle_block.2.emb_layers.1"
    assert to_original("sdxl", "unet", "add_embedding.linear_2").module == "label_emb.0.2"
    sd2_v = to_original("sd2", "text_encoder", "encoder.layers.3.self_attn.v_proj")  # transformers 5 form accepted
    assert sd2_v == OriginalRef("transformer.resblocks.3.attn.in_proj", "_weight", (2048, 3072))
    last = to_original("sd3", "transformer", "transformer_blocks.23.norm1_context.linear")
    assert last.transform == SWAP_HALVES
    assert to_original("sd3", "transformer", "transformer_blocks.22.norm1_context.linear").transform is None
    assert checkpoint_prefix("sdxl", "text_encoder_2") == "conditioner.embedders.1.model."


def test_from_original_forms_and_ambiguity() -> None:
    qkv = from_original("flux", "double_blocks.0.img_attn.qkv")
    assert [r.module for r in qkv] == [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    assert from_original("flux", "diffusion_model.double_blocks.0.img_attn.qkv.bias") == qkv
    in_proj = from_original("sdxl", "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
    assert [r.rows for r in in_proj] == [(0, 1280), (1280, 2560), (2560, 3840)]
    assert [r.module.rsplit(".", 1)[1] for r in in_proj] == ["q_proj", "k_proj", "v_proj"]
    assert from_original("sd1", "model.diffusion_model.no_such_block.weight") == []
    with pytest.raises(LookupError, match="component="):
        from_original("sd3", "text_model.encoder.layers.0.mlp.fc1.weight")
    te2 = from_original("sd3", "text_model.encoder.layers.0.mlp.fc1.weight", component="text_encoder_2")
    assert te2 == [DiffusersRef("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1")]
    with pytest.raises(KeyError, match="not a module"):
        to_original("sd1", "unet", "no.such.module")
