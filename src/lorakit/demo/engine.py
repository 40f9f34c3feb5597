"""The engine demo: train a LoRA on a small model, stack a second adapter, switch weights, fuse and unfuse.

Everything is measured, nothing is assumed: the LoRA learns a known low-rank change of a frozen model, and every
claim printed (weight 0 is the base model, fused equals dynamic, unfuse and detach are bit-exact) is checked on the
spot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lorakit.core import LohaPatch, LoraConfig, adapters_disabled, attach_lora, attach_patches, detach, fuse, unfuse

__all__ = ["EngineDemoReport", "run_engine_demo"]


@dataclass
class EngineDemoReport:
    """What the demo measured."""

    layers: int
    targeted: int
    trainable_params: int
    base_params: int
    losses: list[float]
    train_seconds: float
    rows: list[dict] = field(default_factory=list)
    """Per configuration: weights of the two adapters, distance to the target, change from the base model."""
    set_weight_us: float = 0.0
    fused_vs_dynamic: float = 0.0
    unfuse_exact: bool = False
    detach_exact: bool = False


def _model(width: int, depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    blocks = []
    for _ in range(depth):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(nn.Linear(16, width), nn.GELU(), *blocks, nn.Linear(width, 8))


def _teacher(model: nn.Module, rank: int, seed: int) -> nn.Module:
    """A copy of ``model`` whose hidden layers moved by a hidden rank-``rank`` change: what the LoRA must learn."""
    gen = torch.Generator().manual_seed(seed + 1)
    teacher = _model(model[0].out_features, (len(model) - 3) // 2, 0)
    teacher.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in teacher.modules():
            if isinstance(layer, nn.Linear) and layer.in_features == layer.out_features:
                b = torch.randn(layer.out_features, rank, generator=gen) / rank**0.5
                a = torch.randn(rank, layer.in_features, generator=gen) / layer.in_features**0.5
                layer.weight += 0.5 * b @ a
    return teacher


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _train(model: nn.Module, teacher: nn.Module, x: Tensor, steps: int, progress: Callable[[int, float], None]):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    target = teacher(x).detach()
    losses = []
    for step in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        progress(step + 1, losses[-1])
    return losses


def run_engine_demo(
    steps: int = 300,
    width: int = 64,
    depth: int = 6,
    seed: int = 0,
    progress: Callable[[int, float], None] = lambda step, loss: None,
) -> EngineDemoReport:
    """Run the demo and return its measurements.

    Args:
        steps: training steps of the LoRA.
        width: hidden width of the model.
        depth: hidden square Linear layers (the LoRA's targets).
        seed: seeds the model, the hidden change, the data and the second adapter.
        progress: called after each step with (step, loss).
    """
    model = _model(width, depth, seed)
    teacher = _teacher(model, rank=4, seed=seed)
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(seed + 2))
    base_out = model(x).detach()
    target = teacher(x).detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    square = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features == m.out_features]
    handle = attach_lora(model, LoraConfig(rank=4, targets=square), name="learned")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    losses = _train(model, teacher, x, steps, progress)
    train_seconds = time.perf_counter() - start

    gen = torch.Generator().manual_seed(seed + 3)
    loha = {
        n: LohaPatch(
            w1a=torch.randn(width, 2, generator=gen) * 0.5,
            w1b=torch.randn(2, width, generator=gen),
            w2a=torch.randn(width, 2, generator=gen) * 0.5,
            w2b=torch.randn(2, width, generator=gen),
            alpha=2.0,
        )
        for n in square[:2]
    }
    other = attach_patches(model, loha, name="loha")

    report = EngineDemoReport(
        len([m for m in model.modules() if isinstance(m, nn.Linear)]),
        len(handle.modules),
        trainable,
        sum(p.numel() for p in before.values()),
        losses,
        train_seconds,
    )
    with torch.no_grad():
        for w_learned, w_loha in [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]:
            handle.set_weight(w_learned)
            other.set_weight(w_loha)
            out = model(x)
            report.rows.append(
                {"learned": w_learned, "loha": w_loha, "to_target": _rel(out, target), "from_base": _rel(out, base_out)}
            )
        report.set_weight_us = _time_set_weight(handle, other)
        handle.set_weight(1.0)
        dynamic = model(x)
        fuse(model)
        report.fused_vs_dynamic = float((model(x) - dynamic).abs().max())
        unfuse(model)
        with adapters_disabled(model):
            report.unfuse_exact = torch.equal(model(x), base_out)
        detach(model)
        report.detach_exact = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return report


def _time_set_weight(*handles) -> float:
    start = time.perf_counter()
    for i in range(1000):
        for h in handles:
            h.set_weight(i % 3 / 2)
    return (time.perf_counter() - start) / (1000 * len(handles)) * 1e6
