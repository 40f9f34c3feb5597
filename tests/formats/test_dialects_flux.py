"""FLUX: kohya's fused BFL names, diffusers' split names, XLabs processors, ComfyUI; q/k/v split and fused exactly.

The tiny FLUX transformer (hidden 8, one double and one single block) gives a module table whose BFL names come from
``lorakit.arch``; diffusers' own converters (kohya -> diffusers, XLabs -> diffusers) are the oracle for the deltas.
"""

from __future__ import annotations

import pytest
import torch
from dialect_models import random_lora, tables_of, tiny_flux

from lorakit.core.patches import LokrPatch, LoraPatch
from lorakit.errors import AdapterError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.dialects.fused import fuse_patches, split_patch
from lorakit.formats.dialects.names import Part
from lorakit.formats.lora_io import load_lora, save_lora, to_state_dict

torch.set_num_threads(1)
diffusers = pytest.importorskip("diffusers")

BLOCK = "transformer_blocks.0.attn."
SINGLE = "single_transformer_blocks.0."


@pytest.fixture(scope="module")
def tables():
    return tables_of(transformer=tiny_flux())


def _diffusers_deltas(path) -> dict[str, torch.Tensor]:
    """module -> B @ A as diffusers' FLUX loader converts the file (scales folded into the factors)."""
    state = diffusers.FluxPipeline.lora_state_dict(str(path))
    state = state[0] if isinstance(state, tuple) else state
    out = {}
    for key, down in state.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            out[module] = state[key.replace("lora_A", "lora_B")].float() @ down.float()
    return out


def test_kohya_fused_names_roundtrip_exactly(tables):
    lora = random_lora(tables, alphas=(2.0, 0.5, 3.0))
    tensors, _ = to_state_dict(lora, "kohya", modules=tables)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in tensors
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in tensors
    assert not any("to_q" in k for k in tensors)
    back = load_lora(tensors, modules=tables)
    assert back.arch == "flux" and set(back.patches) == set(lora.patches)
    for target, patch in lora.patches.items():
        torch.testing.assert_close(back.patches[target].delta(), patch.delta(), atol=1e-6, rtol=1e-6)


def test_kohya_file_matches_diffusers_converter(tmp_path, tables):
    # diffusers' converter hardcodes the full-size linear1 split (3072 x 3 + 12288): leave single blocks' q/k/v and
    # MLP input out of this tiny comparison; everything else, fused img/txt qkv and the swapped final norm included.
    lora = random_lora(
        tables,
        alphas=(2.0, 0.5, 3.0),
        skip=lambda c, n, s: len(s) < 2 or n.startswith(SINGLE + "attn.to_") or "proj_mlp" in n,
    )
    # diffusers 0.42 also drops the alpha of final_layer.* ("TODO: alphas" in its converter): keep scale 1 there.
    for module in ("proj_out", "norm_out.linear"):
        patch = lora.patches[Target("transformer", module)]
        lora.patches[Target("transformer", module)] = LoraPatch(up=patch.up, down=patch.down, alpha=patch.rank)
    save_lora(lora, tmp_path / "flux.safetensors", dialect="kohya", modules=tables)
    theirs = _diffusers_deltas(tmp_path / "flux.safetensors")
    assert set(theirs) == {t.module for t in lora.patches}
    for target, patch in lora.patches.items():
        torch.testing.assert_close(patch.delta(), theirs[target.module], atol=1e-5, rtol=1e-5, msg=str(target))


def test_split_keeps_a_and_alpha_and_fuse_inverts_it():
    g = torch.Generator().manual_seed(0)
    fused = LoraPatch(up=torch.randn(24, 3, generator=g), down=torch.randn(3, 8, generator=g), alpha=1.5)
    parts = (Part("q", (0, 8)), Part("k", (8, 16)), Part("v", (16, 24)))
    pieces = split_patch(fused, parts)
    for part, piece in zip(parts, pieces, strict=True):
        assert piece.rank == 3 and piece.alpha == 1.5 and piece.down is fused.down
        torch.testing.assert_close(piece.delta(), fused.delta()[part.rows[0] : part.rows[1]])
    again = fuse_patches(list(zip(parts, pieces, strict=True)))
    assert torch.equal(again.up, fused.up) and torch.equal(again.down, fused.down) and again.alpha == 1.5


@pytest.mark.parametrize("alphas", [(1.0, 2.0, 3.0), (4.0, 8.0, 12.0)], ids=["scales-differ", "scales-agree"])
def test_fusing_separate_loras_is_exact_with_the_strength_kept(alphas):
    g = torch.Generator().manual_seed(1)
    ranks = (1, 2, 3)
    parts = (Part("q", (0, 8)), Part("k", (8, 16)), Part("v", (16, 24)))
    pieces = [
        LoraPatch(up=torch.randn(8, r, generator=g), down=torch.randn(r, 8, generator=g), alpha=a)
        for r, a in zip(ranks, alphas, strict=True)
    ]
    fused = fuse_patches(list(zip(parts, pieces, strict=True)))
    assert fused.rank == sum(ranks)
    if len({a / r for a, r in zip(alphas, ranks, strict=True)}) == 1:
        assert fused.alpha == pytest.approx(sum(ranks) * alphas[0] / ranks[0])  # alpha' = R * (alpha / r)
    else:
        assert fused.alpha == sum(ranks)  # scale folded into B
    want = torch.cat([p.delta() for p in pieces])
    torch.testing.assert_close(fused.delta(), want, atol=1e-6, rtol=1e-6)


def test_missing_parts_fuse_as_zero_rows(tables):
    g = torch.Generator().manual_seed(2)
    lora = LoraFile(
        patches={
            Target("transformer", BLOCK + "to_q"): LoraPatch(
                up=torch.randn(8, 2, generator=g), down=torch.randn(2, 8, generator=g), alpha=1.0
            ),
            Target("transformer", BLOCK + "to_v"): LoraPatch(
                up=torch.randn(8, 2, generator=g), down=torch.randn(2, 8, generator=g), alpha=4.0
            ),
        }
    )
    back = load_lora(to_state_dict(lora, "kohya", modules=tables)[0], modules=tables)
    assert set(back.patches) == {Target("transformer", BLOCK + p) for p in ("to_q", "to_k", "to_v")}
    assert back.patches[Target("transformer", BLOCK + "to_k")].delta().abs().max() == 0
    for target, patch in lora.patches.items():
        torch.testing.assert_close(back.patches[target].delta(), patch.delta(), atol=1e-6, rtol=1e-6)


def test_lokr_on_fused_qkv_stays_fused_on_row_targets(tables):
    g = torch.Generator().manual_seed(3)
    patch = LokrPatch(w1=torch.randn(3, 2, generator=g), w2=torch.randn(8, 4, generator=g))
    tensors = {
        f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v for k, v in {"lokr_w1": patch.w1, "lokr_w2": patch.w2}.items()
    }
    lora = load_lora(tensors, modules=tables)
    assert {t.rows for t in lora.patches} == {(0, 8), (8, 16), (16, 24)}
    assert all(p is next(iter(lora.patches.values())) for p in lora.patches.values())
    again = to_state_dict(lora, "kohya", modules=tables)[0]
    assert set(again) == set(tensors) and all(torch.equal(again[k], v) for k, v in tensors.items())
    with pytest.raises(AdapterError, match="part of a fused weight"):
        to_state_dict(lora, "diffusers", modules=tables)


def test_xlabs_file_reads_as_diffusers_converts_it(tmp_path, tables):
    g = torch.Generator().manual_seed(4)
    shapes = {
        "double_blocks.0.processor.qkv_lora1": (24, 8),
        "double_blocks.0.processor.proj_lora1": (8, 8),
        "double_blocks.0.processor.qkv_lora2": (24, 8),
        "double_blocks.0.processor.proj_lora2": (8, 8),
        "single_blocks.0.processor.qkv_lora": (24, 8),
        "single_blocks.0.processor.proj_lora": (8, 40),
    }
    tensors = {}
    for name, (out, inp) in shapes.items():
        tensors[f"{name}.down.weight"] = torch.randn(2, inp, generator=g)
        tensors[f"{name}.up.weight"] = torch.randn(out, 2, generator=g)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "xlabs.safetensors")
    lora = load_lora(tmp_path / "xlabs.safetensors", modules=tables)
    assert lora.dialect == "xlabs" and lora.arch == "flux"
    theirs = _diffusers_deltas(tmp_path / "xlabs.safetensors")
    assert {t.module for t in lora.patches} == set(theirs)
    for target, patch in lora.patches.items():
        torch.testing.assert_close(patch.delta(), theirs[target.module], atol=1e-6, rtol=1e-6)


def test_diffusers_split_names_and_comfy_agree_with_kohya(tables):
    lora = random_lora(tables, alphas=(2.0, 0.5))
    kohya = load_lora(to_state_dict(lora, "kohya", modules=tables)[0], modules=tables)
    for dialect in ("diffusers", "comfy"):
        tensors, metadata = to_state_dict(kohya, dialect, modules=tables)
        if dialect == "comfy":
            assert "diffusion_model.single_blocks.0.linear1.lora_up.weight" in tensors
        back = load_lora(tensors, metadata=metadata, modules=tables)
        for target, patch in lora.patches.items():
            torch.testing.assert_close(back.patches[target].delta(), patch.delta(), atol=1e-6, rtol=1e-6)


def test_lora_a_on_bfl_names_splits_like_kohya(tables):
    """BFL's own LoRAs put lora_A / lora_B on the original fused names; they split exactly like kohya's."""
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(2, 8, generator=g), torch.randn(56, 2, generator=g)
    lora = load_lora(
        {"single_blocks.0.linear1.lora_A.weight": down, "single_blocks.0.linear1.lora_B.weight": up}, modules=tables
    )
    assert [t.module for t in lora.patches] == [SINGLE + p for p in ("attn.to_k", "attn.to_q", "attn.to_v", "proj_mlp")]
    fused = torch.cat(
        [
            lora.patches[Target("transformer", SINGLE + p)].delta()
            for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        ]
    )
    torch.testing.assert_close(fused, up @ down)


def test_kohya_style_keys_on_diffusers_names_read(tables):
    """``lora_transformer_<diffusers name>`` (kohya-style keys some FLUX trainers write) place like diffusers names."""
    lora = random_lora({"transformer": {k: v for k, v in tables["transformer"].items() if k.startswith(SINGLE)}})
    tensors = {}
    for target, patch in lora.patches.items():
        flat = "lora_transformer_" + target.module.replace(".", "_")
        tensors.update(
            {
                f"{flat}.lora_down.weight": patch.down,
                f"{flat}.lora_up.weight": patch.up,
                f"{flat}.alpha": torch.tensor(patch.alpha),
            }
        )
    back = load_lora(tensors, modules=tables)
    assert set(back.patches) == set(lora.patches)
    for target, patch in lora.patches.items():
        assert back.patches[target].scale == patch.scale
