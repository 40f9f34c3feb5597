"""Round trips: reading what each writer wrote gives the same tensors and the same effective delta.

Hypothesis draws the adapter kind (LoRA, Tucker LoCon, LoHa with and without Tucker, LoKr, full, (IA)^3, DoRA per row
or column), the layer (linear, 1x1 and 3x3 conv), rank, alpha and dtype. kohya and ComfyUI hold every kind and must
give the tensors back bit for bit; diffusers and PEFT hold LoRA (a Tucker LoCon folds into a plain one) and must
give the same effect.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.core.patches import DoraMagnitude, FullPatch, Ia3Patch, LohaPatch, LokrPatch, LoraPatch, Patch
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import load_lora, save_lora, to_state_dict

torch.set_num_threads(1)

# A UNet-shaped table (diffusers names, full resnet layout so the LDM names of ComfyUI are real) and a CLIP encoder
# in transformers 5 naming.
TABLES = {
    "unet": {
        "conv_in": (8, 4, 3, 3),
        "time_embedding.linear_1": (32, 8),
        "down_blocks.0.resnets.0.conv1": (8, 8, 3, 3),
        "down_blocks.0.resnets.0.time_emb_proj": (8, 32),
        "down_blocks.0.resnets.0.conv_shortcut": (8, 4, 1, 1),
        "down_blocks.0.attentions.0.proj_in": (8, 8, 1, 1),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (8, 12),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": (64, 8),
        "down_blocks.0.downsamplers.0.conv": (8, 8, 3, 3),
        "mid_block.resnets.0.conv1": (8, 8, 3, 3),
        "up_blocks.0.resnets.0.conv1": (8, 16, 3, 3),
        "up_blocks.0.resnets.1.conv1": (8, 16, 3, 3),
        "up_blocks.0.upsamplers.0.conv": (8, 8, 3, 3),
        "conv_out": (4, 8, 3, 3),
    },
    "text_encoder": {
        "encoder.layers.0.self_attn.q_proj": (12, 12),
        "encoder.layers.0.mlp.fc1": (24, 12),
    },
}
MODULES = [(c, n) for c, t in TABLES.items() for n in t]
KINDS = ["lora", "tucker", "loha", "loha_tucker", "lokr", "full", "ia3"]


def _rand(draw, *shape: int, positive: bool = False) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return t.abs() + 0.5 if positive else t


def _lokr(draw, shape, rank):
    out, inp, *kernel = shape
    a = 2 if out % 2 == 0 else 1
    b = 2 if inp % 2 == 0 else 1
    if draw(st.booleans()):
        w2 = dict(w2a=_rand(draw, out // a, rank), w2b=_rand(draw, rank, inp // b, *kernel))
    else:
        w2 = dict(w2=_rand(draw, out // a, inp // b, *kernel))
    return LokrPatch(w1=_rand(draw, a, b), **w2)


def _base_patch(draw, kind: str, shape: tuple[int, ...], rank: int) -> Patch:
    out, inp, *kernel = shape
    k = tuple(kernel)
    if kind == "lora" or (kind == "tucker" and not any(s > 1 for s in k)):
        return LoraPatch(up=_rand(draw, out, rank, *(1,) * len(k)), down=_rand(draw, rank, inp, *k))
    if kind == "tucker":
        return LoraPatch(
            up=_rand(draw, out, rank, 1, 1), down=_rand(draw, rank, inp, 1, 1), mid=_rand(draw, rank, rank, *k)
        )
    if kind == "loha" or (kind == "loha_tucker" and not k):
        flat = inp * (k[0] * k[1] if k else 1)
        return LohaPatch(
            w1a=_rand(draw, out, rank),
            w1b=_rand(draw, rank, flat),
            w2a=_rand(draw, out, rank),
            w2b=_rand(draw, rank, flat),
        )
    if kind == "loha_tucker":
        return LohaPatch(
            w1a=_rand(draw, rank, out),
            w1b=_rand(draw, rank, inp),
            t1=_rand(draw, rank, rank, *k),
            w2a=_rand(draw, rank, out),
            w2b=_rand(draw, rank, inp),
            t2=_rand(draw, rank, rank, *k),
        )
    if kind == "lokr":
        return _lokr(draw, shape, rank)
    if kind == "full":
        bias = _rand(draw, out) if draw(st.booleans()) else None
        return FullPatch(diff=_rand(draw, *shape), diff_b=bias)
    on_input = draw(st.booleans())
    return Ia3Patch(weight=_rand(draw, inp if on_input else out), on_input=on_input)


@st.composite
def patches(draw, kinds=tuple(KINDS), dora: bool = True):
    component, module = draw(st.sampled_from(MODULES))
    shape = TABLES[component][module]
    kind = draw(st.sampled_from(kinds))
    base = _base_patch(draw, kind, shape, draw(st.integers(1, 4)))
    alpha = draw(st.one_of(st.none(), st.sampled_from([0.25, 1.0, 3.0, 16.0]), st.floats(0.01, 64.0)))
    magnitude = None
    if dora and not isinstance(base, Ia3Patch) and draw(st.booleans()):
        rows = draw(st.booleans())
        ones = (1,) * (len(shape) - 1)
        magnitude = (
            DoraMagnitude(_rand(draw, shape[0], *ones, positive=True), "out")
            if rows
            else DoraMagnitude(_rand(draw, 1, shape[1], *ones[1:], positive=True), "in")
        )
    fields = {k: v for k, v in vars(base).items() if k not in ("alpha", "dora")}
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    fields = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in fields.items()}
    if magnitude is not None:
        magnitude = DoraMagnitude(magnitude.magnitude.to(dtype), magnitude.axis)
    return Target(component, module), type(base)(**fields, alpha=alpha, dora=magnitude)


def _weight(target: Target) -> torch.Tensor:
    return torch.randn(TABLES[target.component][target.module], generator=torch.Generator().manual_seed(7))


def _same_patch(got: Patch, want: Patch) -> None:
    assert type(got) is type(want)
    assert got.scale == want.scale
    got_t, want_t = got.tensors(), want.tensors()
    assert set(got_t) == set(want_t)
    for name, tensor in want_t.items():
        assert got_t[name].dtype == tensor.dtype, name
        assert torch.equal(got_t[name].flatten(), tensor.flatten()), name
    if want.dora is not None:
        assert got.dora.axis == want.dora.axis


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("dialect", ["kohya", "comfy"])
@SETTINGS
@given(items=st.lists(patches(), min_size=1, max_size=4, unique_by=lambda item: item[0]))
def test_kohya_and_comfy_give_every_kind_back_bit_for_bit(dialect, items):
    lora = LoraFile(patches=dict(items))
    tensors, metadata = to_state_dict(lora, dialect, modules=TABLES)
    back = load_lora(tensors, metadata=metadata, modules=TABLES)
    assert back.dialect == dialect and set(back.patches) == set(lora.patches)
    for target, patch in lora.patches.items():
        _same_patch(back.patches[target], patch)
        weight = _weight(target)
        assert torch.equal(back.patches[target].effect(weight), patch.effect(weight))


def _lora_only(items):
    """PEFT holds DoRA per output row only, for all modules of a component or none."""
    out = {}
    for target, patch in items:
        dora = patch.dora if patch.dora is not None and patch.dora.axis == "out" else None
        out[target] = LoraPatch(up=patch.up, down=patch.down, mid=patch.mid, alpha=patch.alpha, dora=dora)
    for component in {t.component for t in out}:
        mine = [t for t in out if t.component == component]
        if any(out[t].dora is not None for t in mine) and not all(out[t].dora is not None for t in mine):
            for t in mine:
                out[t] = LoraPatch(up=out[t].up, down=out[t].down, mid=out[t].mid, alpha=out[t].alpha)
    return out


@pytest.mark.parametrize("dialect", ["diffusers", "peft"])
@SETTINGS
@given(items=st.lists(patches(kinds=("lora", "tucker")), min_size=1, max_size=4, unique_by=lambda item: item[0]))
def test_diffusers_and_peft_give_the_same_effect_back(dialect, items):
    lora = LoraFile(patches=_lora_only(items))
    if dialect == "peft" and len(lora.components()) > 1:
        lora = LoraFile(patches={t: p for t, p in lora.patches.items() if t.component == lora.components()[0]})
    tensors, metadata = to_state_dict(lora, dialect, modules=TABLES)
    back = load_lora(tensors, metadata=metadata, modules=TABLES)
    assert set(back.patches) == set(lora.patches)
    for target, patch in lora.patches.items():
        got = back.patches[target]
        assert got.scale == pytest.approx(patch.scale, rel=1e-12)
        weight = _weight(target)
        want = patch.effect(weight)
        # A Tucker core is folded into down in fp32 and stored in the patch's dtype: one rounding of that dtype.
        eps = torch.finfo(patch.down.dtype).eps if patch.mid is not None else 1e-6
        torch.testing.assert_close(got.effect(weight), want, atol=64 * eps * float(want.abs().max()), rtol=16 * eps)
        if patch.mid is None:
            assert torch.equal(got.up, patch.up) and torch.equal(got.down, patch.down)


@SETTINGS
@given(
    items=st.lists(patches(kinds=("lora",), dora=False), min_size=1, max_size=3, unique_by=lambda item: item[0]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_dtype_casts_weights_but_keeps_alpha_exact(tmp_path_factory, items, dtype):
    lora = LoraFile(patches=dict(items))
    path = tmp_path_factory.mktemp("cast") / "k.safetensors"
    save_lora(lora, path, dialect="kohya", dtype=dtype, modules=TABLES)
    back = load_lora(path, modules=TABLES)
    for target, patch in lora.patches.items():
        got = back.patches[target]
        assert got.up.dtype == dtype and got.scale == patch.scale


def test_same_lora_gives_the_same_bytes(tmp_path):
    lora = LoraFile(
        patches={
            Target("unet", "conv_in"): LoraPatch(up=torch.ones(8, 2, 1, 1), down=torch.ones(2, 4, 3, 3), alpha=1.5)
        },
        metadata={"ss_output_name": "x", "sshs_model_hash": "stale"},
    )
    first = save_lora(lora, tmp_path / "a.safetensors", modules=TABLES).read_bytes()
    second = save_lora(lora, tmp_path / "b.safetensors", modules=TABLES).read_bytes()
    assert first == second
    back = load_lora(tmp_path / "a.safetensors", modules=TABLES)
    assert back.metadata["sshs_model_hash"] != "stale"  # a fresh hash of the new bytes, not the input's


def test_diffusers_network_alpha_keys_and_unprefixed_names_read():
    """``<component>.<module>.alpha`` keys (diffusers' network_alphas) set the strength; bare names find their table."""
    down, up = torch.ones(2, 4, 3, 3), torch.ones(8, 2, 1, 1)
    tensors = {
        "unet.conv_in.lora_A.weight": down,
        "unet.conv_in.lora_B.weight": up,
        "unet.conv_in.alpha": torch.tensor(0.5),
        "encoder.layers.0.mlp.fc1.lora_A.weight": torch.ones(3, 12),
        "encoder.layers.0.mlp.fc1.lora_B.weight": torch.ones(24, 3),
    }
    lora = load_lora(tensors, modules=TABLES)
    assert lora.patches[Target("unet", "conv_in")].scale == 0.25
    assert lora.patches[Target("text_encoder", "encoder.layers.0.mlp.fc1")].scale == 1.0
