"""Low-rank algebra from factors against dense torch.linalg.svd references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.core.lowrank import concat_factors, factor_svd, pick_rank, truncate
from lorakit.errors import ShapeError

torch.set_num_threads(1)


def _factors(out, inp, r, seed, kernel=()):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g), torch.randn(r, inp, *kernel, generator=g)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(2, 40), inp=st.integers(2, 40), r=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_singular_values_match_dense_svd(out, inp, r, seed):
    up, down = _factors(out, inp, r, seed)
    dense = up.double() @ down.double()
    ref = torch.linalg.svdvals(dense)
    got = factor_svd(up, down)
    k = min(r, out, inp)
    torch.testing.assert_close(got.S[:k], ref[:k], rtol=1e-9, atol=1e-9 * float(ref[0]))
    rebuilt = got.U @ torch.diag(got.S) @ got.Vh
    torch.testing.assert_close(rebuilt, dense, rtol=1e-9, atol=1e-9 * float(ref[0]))


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(4, 40),
    inp=st.integers(4, 40),
    r=st.integers(2, 12),
    k=st.integers(1, 14),
    seed=st.integers(0, 10_000),
)
def test_truncation_error_is_the_discarded_energy(out, inp, r, k, seed):
    up, down = _factors(out, inp, r, seed)
    dense = up.double() @ down.double()
    s = torch.linalg.svdvals(dense)
    new_up, new_down, error = truncate(factor_svd(up, down), k)
    kept = min(k, min(r, out, inp))
    assert new_up.shape[1] == kept  # never more than exist, never an index error
    expected = float((s[kept:] ** 2).sum() / (s**2).sum()) ** 0.5
    actual = float((new_up @ new_down - dense).norm() / dense.norm())
    assert error == pytest.approx(expected, abs=1e-7)
    assert actual == pytest.approx(expected, abs=1e-7)


def test_concat_is_the_weighted_sum_of_deltas():
    parts = []
    dense = torch.zeros(16, 24, 3, 3)
    for i, (r, coef) in enumerate([(4, 0.7), (8, -0.3), (2, 1.25)]):
        up, down = _factors(16, 24, r, i, kernel=(3, 3))
        parts.append((up, down, coef))
        dense += coef * (up @ down.flatten(1)).reshape(16, 24, 3, 3)
    up, down = concat_factors(parts)
    assert up.shape == (16, 14) and down.shape == (14, 24, 3, 3)
    torch.testing.assert_close((up @ down.flatten(1)).reshape(dense.shape), dense, rtol=1e-5, atol=1e-5)


def test_concat_refuses_mixed_kernels():
    a = _factors(8, 8, 2, 0, kernel=(3, 3))
    b = _factors(8, 8, 2, 1, kernel=(1, 1))
    with pytest.raises(ShapeError, match="different input shapes"):
        concat_factors([(*a, 1.0), (*b, 1.0)])


def test_pick_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert pick_rank(s, rank=2) == 2
    assert pick_rank(s, rank=99) == 4
    assert pick_rank(s, ratio=4.0) == 3  # keeps s >= 1
    energy = (s**2).cumsum(0) / (s**2).sum()
    assert pick_rank(s, fro=float(energy[1])) == 2  # exactly reaching the target keeps that many
    assert pick_rank(s, fro=float(energy[1]) + 1e-6) == 3
    assert pick_rank(s, cumulative=0.5) == 1  # 4 / 7.5 > 0.5
    assert pick_rank(s, fro=0.99, max_rank=2) == 2
    assert pick_rank(torch.zeros(3, dtype=torch.float64), fro=0.9) == 1
    with pytest.raises(ValueError):
        pick_rank(s, rank=2, fro=0.9)
