"""Optimizers and schedules against references: a numpy Lion, torch AdamW, diffusers' get_scheduler."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler

from lorakit.errors import ConfigError
from lorakit.train.config import OptimizerConfig
from lorakit.train.optim import Lion, build_optimizer, build_schedule, schedule_factor


def _lion_reference(p, grads, lr, b1, b2, wd):
    """Lion written from the paper's Algorithm 1 in float64 numpy."""
    p, m = p.astype(np.float64).copy(), np.zeros_like(p, dtype=np.float64)
    for g in grads:
        c = b1 * m + (1 - b1) * g
        p = p - lr * (np.sign(c) + wd * p)
        m = b2 * m + (1 - b2) * g
    return p


def test_lion_matches_the_paper_update():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(5)]
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = Lion([param], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    for g in grads:
        param.grad = torch.from_numpy(g)
        opt.step()
    ref = _lion_reference(p0, grads, 0.01, 0.9, 0.99, 0.1)
    np.testing.assert_allclose(param.detach().numpy(), ref, rtol=0, atol=1e-6)


def test_adamw_groups_are_wired_like_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    ra, rb = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    config = OptimizerConfig(lr=1e-2, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-7)
    ours = build_optimizer([{"params": [a]}, {"params": [b], "lr": 1e-3}], config)
    ref = torch.optim.AdamW(
        [{"params": [ra]}, {"params": [rb], "lr": 1e-3}], lr=1e-2, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-7
    )
    for step in range(3):
        g1, g2 = torch.randn(3), torch.randn(2)
        for p, g in ((a, g1), (b, g2), (ra, g1), (rb, g2)):
            p.grad = g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a, ra) and torch.equal(b, rb)


def test_lion_and_prodigy_minimise_a_quadratic():
    for name, lr in (("lion", 0.05), ("prodigy", 1.0)):
        torch.manual_seed(0)
        x = torch.nn.Parameter(torch.randn(16) * 3)
        opt = build_optimizer([{"params": [x]}], OptimizerConfig(name=name, lr=lr, weight_decay=0.0))
        start = float((x.detach() ** 2).sum())
        for _ in range(200):
            opt.zero_grad()
            (x**2).sum().backward()
            opt.step()
        assert float((x.detach() ** 2).sum()) < 0.05 * start, name


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_is_a_clear_error():
    x = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        build_optimizer([{"params": [x]}], OptimizerConfig(name="adamw8bit"))


@pytest.mark.parametrize(
    ("ours", "theirs"), [("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")]
)
@pytest.mark.parametrize("warmup", [0, 7])
def test_schedules_match_diffusers_get_scheduler(ours, theirs, warmup):
    total = 40
    x = torch.nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([x], lr=1.0)
    ref = get_scheduler(theirs, ref_opt, num_warmup_steps=warmup, num_training_steps=total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(opt, OptimizerConfig(schedule=ours, warmup_steps=warmup), total)
    for step in range(total):
        assert sched.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12), step
        assert schedule_factor(step, schedule=ours, warmup_steps=warmup, total_steps=total) == pytest.approx(
            ref.get_last_lr()[0], abs=1e-12
        )
        ref_opt.step()
        opt.step()
        ref.step()
        sched.step()
