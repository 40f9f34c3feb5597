"""Shared helpers of the training tests: a tiny run's config and a fixed-draw evaluation loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorakit.core.model import adapters_disabled
from lorakit.train.config import TrainConfig, config_from_dict
from lorakit.train.loop import Trainer


def tiny_config(data: Path, output: Path, **tables: dict[str, Any]) -> TrainConfig:
    """A run on 32 px images: rank 4, AdamW 3e-3, batch 4, fp32 saves; ``tables`` update the sections."""
    base: dict[str, dict[str, Any]] = {
        "dataset": {
            "path": str(data),
            "resolution": 32,
            "min_bucket_reso": 32,
            "max_bucket_reso": 64,
            "bucket_reso_steps": 32,
        },
        "network": {"rank": 4},
        "optimizer": {"lr": 3e-3},
        "training": {"steps": 30, "batch_size": 4, "seed": 0},
        "save": {"output_dir": str(output), "dtype": "fp32"},
    }
    for name, values in tables.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base)


@torch.no_grad()
def eval_loss(trainer: Trainer, *, adapter: bool, rounds: int = 4) -> float:
    """Mean loss over every image with fixed noise and timesteps, with the trained adapter on or off."""
    images = trainer.images
    samples = [images.view_sample(i) for i in range(len(images))]
    task = trainer.task
    # the run released the VAE and text encoders once their outputs were cached: read the caches
    latents = trainer.latent_cache.latents(samples)
    cond = trainer._conditioning(samples)
    total = 0.0
    for r in range(rounds):
        draws = task.draw(latents, 1234, r, range(len(samples)))
        if adapter:
            total += float(task.loss(latents, cond, samples, draws).mean())
        else:
            with adapters_disabled(task.denoiser):
                total += float(task.loss(latents, cond, samples, draws).mean())
    return total / rounds


def lora_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.network.named_parameters()}
