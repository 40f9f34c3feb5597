"""Optimizers (AdamW, 8-bit AdamW, Prodigy, Lion) and learning-rate schedules with warmup.

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), per parameter ``p`` with gradient ``g``::

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * wd) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

Schedules are multipliers of the peak rate at optimizer step ``s`` (``w`` warmup steps, ``T`` steps in all):
warmup ``s / w`` for ``s < w``, then constant 1, linear ``(T - s) / (T - w)`` or cosine
``(1 + cos(pi * (s - w) / (T - w))) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from lorakit.errors import ConfigError
from lorakit.train.config import OptimizerConfig

__all__ = ["Lion", "build_optimizer", "build_schedule", "schedule_factor"]


class Lion(torch.optim.Optimizer):
    """Lion: sign of an interpolated momentum as the update; one state tensor per parameter (AdamW keeps two).

    Use a learning rate 3-10x smaller and a weight decay 3-10x larger than with AdamW.
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0
    ) -> None:
        if lr <= 0:
            raise ConfigError(f"Lion: lr must be positive, not {lr}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                p.mul_(1 - lr * wd)
                update = m.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-lr)
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def _prodigy(groups: list[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ConfigError("optimizer.name = 'prodigy' needs the prodigyopt package: pip install prodigyopt") from None
    # Prodigy estimates the step size itself: lr is a multiplier, 1.0 as its authors recommend.
    return Prodigy(
        groups,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        decouple=True,
        use_bias_correction=True,
        safeguard_warmup=config.warmup_steps > 0,
    )


def _adamw8bit(groups: list[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "optimizer.name = 'adamw8bit' needs bitsandbytes (CUDA only): pip install bitsandbytes, or choose adamw"
        ) from None
    return bnb.optim.AdamW8bit(
        groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )


def build_optimizer(groups: list[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.name`` over parameter groups (``{"params": [...], "lr": ...}``; a group without
    ``lr`` gets ``config.lr``).

    Raises:
        ConfigError: the optimizer needs a package that is not installed.
    """
    groups = [{**g, "lr": g.get("lr", config.lr)} for g in groups if g["params"]]
    if config.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
    if config.name == "lion":
        return Lion(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.name == "prodigy":
        return _prodigy(groups, config)
    return _adamw8bit(groups, config)


def schedule_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ConfigError(f"unknown schedule {schedule!r}; choose constant, linear or cosine")


def build_schedule(
    optimizer: torch.optim.Optimizer, config: OptimizerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying ``schedule_factor`` to every group's peak rate; its state_dict is its step count."""

    def factor(step: int) -> float:
        return schedule_factor(
            step, schedule=config.schedule, warmup_steps=config.warmup_steps, total_steps=total_steps
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
