"""lorakit's adapter math checked against the lycoris-lora package, the reference for LyCORIS file semantics.

Each test builds a lycoris module on a real layer, fills every parameter with random values (lycoris zeroes one side at
init, which would make any comparison vacuous), reads the tensors back through the module's own ``state_dict`` (the
file's key names), maps them onto a lorakit patch, and compares lorakit's result with what lycoris computes.

The oracle is the dW lycoris's own ``forward`` applies. ``get_diff_weight`` / ``get_merged_weight`` are used directly
only where they agree with it: in lycoris-lora 4.1.3, LoHa and LoKr ``get_weight`` already include ``alpha / r`` and
``get_diff_weight`` multiplies by it again, so those two squared the scale whenever ``alpha != r``
(``test_module_api_at_unit_scale`` pins the case where both readings coincide).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorakit.core.patches import (
    DoraMagnitude,
    FullPatch,
    Ia3Patch,
    LohaPatch,
    LokrPatch,
    LoraPatch,
    Patch,
    apply_patches,
)

lyco = pytest.importorskip("lycoris.modules")  # lycoris-lora is a dev dependency, the oracle
torch.set_num_threads(1)

# File key (as lycoris writes it) -> lorakit patch field.
_FIELDS = {
    "lora_up.weight": "up",
    "lora_down.weight": "down",
    "lora_mid.weight": "mid",
    "hada_w1_a": "w1a",
    "hada_w1_b": "w1b",
    "hada_w2_a": "w2a",
    "hada_w2_b": "w2b",
    "hada_t1": "t1",
    "hada_t2": "t2",
    "lokr_w1": "w1",
    "lokr_w1_a": "w1a",
    "lokr_w1_b": "w1b",
    "lokr_w2": "w2",
    "lokr_w2_a": "w2a",
    "lokr_w2_b": "w2b",
    "lokr_t2": "t2",
}
_KINDS = {
    "locon": (lyco.LoConModule, LoraPatch),
    "loha": (lyco.LohaModule, LohaPatch),
    "lokr": (lyco.LokrModule, LokrPatch),
}


def _layer(out: int, inp: int, k: int | None, seed: int, bias: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias) if k is None else nn.Conv2d(inp, out, k, padding=k // 2, bias=bias)


def _fill(module: nn.Module, seed: int) -> None:
    """Random values in every parameter; a DoRA magnitude stays positive, as a norm would be."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            v = torch.randn(p.shape, generator=g)
            p.copy_(v.abs() + 0.5 if name == "dora_scale" else v * 0.5)


def _build(kind: str, layer: nn.Module, seed: int = 0, **kw) -> tuple[nn.Module, Patch]:
    """A filled lycoris module of ``kind`` on ``layer`` and the lorakit patch read from its state dict."""
    module_cls, patch_cls = _KINDS[kind]
    module = module_cls("t", layer, 1.0, **kw)
    _fill(module, seed)
    sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
    assert set(sd) <= set(_FIELDS) | {"alpha", "dora_scale"}, f"unmapped lycoris keys: {set(sd) - set(_FIELDS)}"
    fields = {_FIELDS[k]: v for k, v in sd.items() if k in _FIELDS}
    dora = DoraMagnitude.from_shape(sd["dora_scale"], layer.weight.shape) if "dora_scale" in sd else None
    return module, patch_cls(**fields, alpha=float(sd["alpha"]), dora=dora)


def _lycoris_delta(module: nn.Module) -> torch.Tensor:
    """dW exactly as lycoris's rebuild-mode ``forward`` computes it at multiplier 1 (scale applied once)."""
    with torch.no_grad():
        if isinstance(module, lyco.LoConModule):
            return module.make_weight() * module.scale
        return module.get_weight(module.shape) * module.scalar


def _lycoris_forward(module: nn.Module, layer: nn.Module, x: torch.Tensor, multiplier: float) -> torch.Tensor:
    module.multiplier = multiplier
    module.apply_to()
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        module.restore()


def _call(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    params = {"weight": weight} if layer.bias is None else {"weight": weight, "bias": layer.bias}
    with torch.no_grad():
        return torch.func.functional_call(layer, params, (x,))


def _input(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    if isinstance(layer, nn.Linear):
        return torch.randn(5, layer.in_features, generator=g)
    return torch.randn(2, layer.in_channels, 7, 7, generator=g)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32 comparison relative to the tensor's own magnitude (products of random factors reach ~1e2)."""
    expected = expected.to(torch.float32)
    torch.testing.assert_close(
        actual.to(torch.float32), expected, rtol=rtol, atol=rtol * max(1.0, expected.abs().max().item())
    )


# (kind, out, in, kernel or None for Linear, lycoris options). Each id names what the case exercises.
ADDITIVE = [
    pytest.param("locon", 24, 40, None, dict(lora_dim=4, alpha=2.0), id="locon-linear"),
    pytest.param("locon", 24, 16, 1, dict(lora_dim=4, alpha=8.0), id="locon-conv1x1"),
    pytest.param("locon", 20, 12, 3, dict(lora_dim=3, alpha=1.5), id="locon-conv3x3"),
    pytest.param("locon", 20, 12, 3, dict(lora_dim=3, alpha=5.0, use_tucker=True), id="locon-conv3x3-tucker"),
    pytest.param("locon", 24, 40, None, dict(lora_dim=4, alpha=2.0, rs_lora=True), id="locon-linear-rslora"),
    pytest.param("loha", 24, 40, None, dict(lora_dim=4, alpha=2.0), id="loha-linear"),
    pytest.param("loha", 16, 24, 1, dict(lora_dim=3, alpha=1.0, use_tucker=True), id="loha-conv1x1"),
    pytest.param("loha", 20, 12, 3, dict(lora_dim=4, alpha=3.0), id="loha-conv3x3"),
    pytest.param("loha", 20, 12, 3, dict(lora_dim=3, alpha=1.0, use_tucker=True), id="loha-conv3x3-tucker"),
    pytest.param("loha", 24, 40, None, dict(lora_dim=4, alpha=2.0, rs_lora=True), id="loha-linear-rslora"),
    pytest.param("lokr", 64, 48, None, dict(lora_dim=2, alpha=1.0), id="lokr-linear-w1-w2ab"),
    pytest.param(
        "lokr",
        64,
        48,
        None,
        dict(lora_dim=2, alpha=3.0, decompose_both=True, factor=8),
        id="lokr-linear-both-factored-f8",
    ),
    pytest.param(
        "lokr",
        128,
        16,
        None,
        dict(lora_dim=4, alpha=2.0, decompose_both=True, unbalanced_factorization=True),
        id="lokr-linear-w1ab-w2full",
    ),
    pytest.param("lokr", 32, 32, None, dict(lora_dim=8, alpha=2.0), id="lokr-linear-both-full-scale1"),
    pytest.param(
        "lokr", 48, 32, None, dict(lora_dim=2, alpha=4.0, full_matrix=True, factor=4), id="lokr-linear-full-matrix-f4"
    ),
    pytest.param("lokr", 32, 48, 1, dict(lora_dim=2, alpha=1.0, factor=4), id="lokr-conv1x1-f4"),
    pytest.param("lokr", 32, 48, 3, dict(lora_dim=2, alpha=1.5), id="lokr-conv3x3-w2ab-flat"),
    pytest.param(
        "lokr",
        32,
        48,
        3,
        dict(lora_dim=2, alpha=1.5, use_tucker=True, decompose_both=True, factor=2),
        id="lokr-conv3x3-tucker-t2",
    ),
    pytest.param("lokr", 16, 8, 3, dict(lora_dim=8, alpha=2.0, factor=2), id="lokr-conv3x3-w2full"),
]


@pytest.mark.parametrize(("kind", "out", "inp", "k", "opts"), ADDITIVE)
def test_delta_matches_lycoris(kind: str, out: int, inp: int, k: int | None, opts: dict) -> None:
    layer = _layer(out, inp, k, seed=1)
    module, patch = _build(kind, layer, seed=2, **opts)
    _close(patch.delta(layer.weight.shape), _lycoris_delta(module))


@pytest.mark.parametrize(("kind", "out", "inp", "k", "opts"), ADDITIVE)
def test_forward_matches_lycoris_at_strength(kind: str, out: int, inp: int, k: int | None, opts: dict) -> None:
    """Strength is lycoris's multiplier: its rebuild forward at 0.7 equals the layer run with ``W + 0.7 * dW``."""
    layer = _layer(out, inp, k, seed=3, bias=True)
    module, patch = _build(kind, layer, seed=4, **opts)
    x = _input(layer)
    expected = _lycoris_forward(module, layer, x, 0.7)
    _close(_call(layer, apply_patches(layer.weight, [(patch, 0.7)]), x), expected, rtol=1e-4)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv3d], ids=["conv1d", "conv3d"])
def test_locon_tucker_mid_any_conv_rank(conv: type[nn.Module]) -> None:
    """A Tucker ``lora_mid`` carries as many kernel axes as the conv: 1 for Conv1d, 3 for Conv3d."""
    layer = conv(12, 20, 3, bias=False)
    module, patch = _build("locon", layer, seed=14, lora_dim=3, alpha=2.0, use_tucker=True)
    assert patch.mid is not None and patch.mid.dim() == layer.weight.dim()
    _close(patch.delta(layer.weight.shape), _lycoris_delta(module))


def test_dora_zero_row_stays_finite() -> None:
    """A row that is zero in ``W + dW`` stays zero, as in lycoris (eps in the norm), rather than turning NaN."""
    layer = _layer(8, 12, None, seed=15)
    module, _ = _build("locon", layer, seed=16, lora_dim=2, alpha=2.0, weight_decompose=True)
    with torch.no_grad():
        layer.weight[0] = 0
        module.lora_up.weight[0] = 0
    sd = module.state_dict()
    patch = LoraPatch(
        up=sd["lora_up.weight"].detach(),
        down=sd["lora_down.weight"].detach(),
        alpha=2.0,
        dora=DoraMagnitude.from_shape(sd["dora_scale"].detach(), layer.weight.shape),
    )
    with torch.no_grad():
        expected = module.get_merged_weight(multiplier=1)[0]
    merged = layer.weight + patch.effect(layer.weight)
    assert torch.isfinite(merged).all() and not merged[0].any()
    _close(merged, expected)


def test_lokr_scale_follows_lycoris() -> None:
    """Scale 1 exactly when both factors are full (lycoris then stores ``alpha = r``), else ``alpha / r``."""
    m, p = _build("lokr", _layer(32, 32, None, 0), lora_dim=8, alpha=2.0)
    assert (m.use_w1, m.use_w2, m.scale, p.scale) == (True, True, 1.0, 1.0)
    m, p = _build(
        "lokr", _layer(128, 16, None, 0), lora_dim=4, alpha=2.0, decompose_both=True, unbalanced_factorization=True
    )
    assert not m.use_w1 and m.use_w2 and p.rank == 4 and p.scale == pytest.approx(m.scale) == 0.5
    m, p = _build("lokr", _layer(32, 48, 3, 0), lora_dim=2, alpha=1.5, use_tucker=True)
    assert p.t2 is not None and p.rank == 2 and p.scale == pytest.approx(m.scale) == 0.75


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("k", [None, 3], ids=["linear", "conv3x3"])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out", "in"])
def test_dora_matches_lycoris(kind: str, k: int | None, wd_on_out: bool) -> None:
    """DoRA at strength 1: ``W + effect(W)`` is lycoris's weight_decompose of ``W + dW``, on either norm axis."""
    out, inp = (32, 48)
    layer = _layer(out, inp, k, seed=5, bias=True)
    opts = dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=wd_on_out)
    if kind == "lokr":
        opts |= dict(decompose_both=True, factor=4)
    module, patch = _build(kind, layer, seed=6, **opts)
    w = layer.weight.detach()
    stored = tuple(patch.dora.magnitude.shape)
    assert patch.dora.axis == ("out" if wd_on_out else "in")
    assert stored == ((out, 1) if wd_on_out else (1, inp)) + ((1, 1) if k else ())
    with torch.no_grad():
        expected = module.apply_weight_decompose(w + _lycoris_delta(module), 1)
    assert not torch.allclose(expected, w + _lycoris_delta(module), rtol=1e-3)  # the magnitude really acts
    _close(w + patch.effect(w), expected)
    x = _input(layer)
    _close(_call(layer, apply_patches(w, [(patch, 1.0)]), x), _lycoris_forward(module, layer, x, 1.0), rtol=1e-4)


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
def test_module_api_at_unit_scale(kind: str, dora: bool) -> None:
    """With ``alpha = r`` lycoris's get_diff_weight / get_merged_weight (multiplier 1) are the forward's; both match."""
    layer = _layer(24, 32, 3, seed=7)
    opts = dict(lora_dim=2, alpha=2.0, weight_decompose=dora, wd_on_out=True)
    if kind == "lokr":
        opts |= dict(decompose_both=True, factor=4)
    module, patch = _build(kind, layer, seed=8, **opts)
    w = layer.weight.detach()
    with torch.no_grad():
        diff = module.get_diff_weight(multiplier=1, shape=w.shape)[0]
        merged = module.get_merged_weight(multiplier=1, shape=w.shape)[0]
    _close(patch.delta(w.shape), diff)
    _close(w + patch.effect(w), merged)


@pytest.mark.parametrize("on_input", [False, True], ids=["out", "in"])
@pytest.mark.parametrize("k", [None, 3], ids=["linear", "conv3x3"])
@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_ia3_matches_lycoris(on_input: bool, k: int | None, strength: float) -> None:
    layer = _layer(12, 20, k, seed=9)
    module = lyco.IA3Module("t", layer, 1.0, train_on_input=on_input)
    _fill(module, 10)
    sd = module.state_dict()
    patch = Ia3Patch(weight=sd["weight"].detach().clone(), on_input=bool(sd["on_input"]))
    with torch.no_grad():
        expected = module.get_merged_weight(multiplier=strength)[0]
    _close(apply_patches(layer.weight, [(patch, strength)]), expected)


@pytest.mark.parametrize("k", [None, 3], ids=["linear", "conv3x3"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_full_diff_matches_lycoris(k: int | None, strength: float) -> None:
    layer = _layer(12, 20, k, seed=11, bias=True)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    module = lyco.FullModule("t", layer, 1.0)
    _fill(module, 12)  # before apply_to, module.weight/bias hold the difference itself
    module.apply_to()  # folds the base in; from here state_dict reports diff = weight - base, as in a file
    sd = module.state_dict()
    patch = FullPatch(diff=sd["diff"].clone(), diff_b=sd["diff_b"].clone())
    with torch.no_grad():
        weight, bias = module.get_merged_weight(multiplier=strength, shape=w.shape)
    _close(apply_patches(w, [(patch, strength)]), weight)
    _close(b + strength * patch.bias_effect(), bias)


@pytest.mark.parametrize("norm", [nn.LayerNorm(24), nn.GroupNorm(4, 24)], ids=["layernorm", "groupnorm"])
def test_norm_diff_matches_lycoris(norm: nn.Module) -> None:
    """LyCORIS ``norm`` (``w_norm``, ``b_norm``) is a full difference on the norm's weight and bias."""
    module = lyco.NormModule("t", norm, 1.0)
    _fill(module, 13)
    sd = module.state_dict()
    patch = FullPatch(diff=sd["w_norm"].clone(), diff_b=sd["b_norm"].clone())
    with torch.no_grad():
        weight, bias = module.get_merged_weight(multiplier=1)
    _close(norm.weight + patch.delta(norm.weight.shape), weight)
    _close(norm.bias + patch.bias_effect(), bias)


_DIMS = st.sampled_from([4, 6, 8, 12, 16, 24, 32])


@settings(max_examples=20, deadline=None)
@given(
    out=_DIMS,
    inp=_DIMS,
    rank=st.integers(1, 6),
    alpha=st.floats(0.25, 16.0),
    k=st.sampled_from([None, 1, 3]),
    tucker=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_loha_random_shapes(out, inp, rank, alpha, k, tucker, seed) -> None:
    layer = _layer(out, inp, k, seed)
    module, patch = _build("loha", layer, seed, lora_dim=rank, alpha=alpha, use_tucker=tucker)
    _close(patch.delta(layer.weight.shape), _lycoris_delta(module))


# Wider dims and low ranks, so most draws factor a side (small dims make lycoris fall back to two full factors).
_LOKR_DIMS = st.sampled_from([16, 24, 32, 48, 64, 96, 128])


@settings(max_examples=20, deadline=None)
@given(
    out=_LOKR_DIMS,
    inp=_LOKR_DIMS,
    rank=st.integers(1, 4),
    alpha=st.floats(0.25, 16.0),
    k=st.sampled_from([None, 1, 3]),
    tucker=st.booleans(),
    both=st.booleans(),
    factor=st.sampled_from([-1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_lokr_random_shapes(out, inp, rank, alpha, k, tucker, both, factor, seed) -> None:
    layer = _layer(out, inp, k, seed)
    module, patch = _build(
        "lokr", layer, seed, lora_dim=rank, alpha=alpha, use_tucker=tucker, decompose_both=both, factor=factor
    )
    _close(patch.delta(layer.weight.shape), _lycoris_delta(module))
