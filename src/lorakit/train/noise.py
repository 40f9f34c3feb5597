"""Noise, timesteps, targets and loss weights of the training objectives.

Diffusion (SD1/SD2/SDXL), with ``a_t`` the cumulative product of ``1 - beta`` at timestep ``t``::

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps  target eps (epsilon) or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
    SNR(t) = a_t / (1 - a_t)                  min-SNR weight min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v)

Flow matching (FLUX, SD3), with noise level ``sigma`` in (0, 1)::

    x_sigma = (1 - sigma) x_0 + sigma eps              target eps - x_0
    sigma = shift u / (1 + (shift - 1) u)               u drawn uniform, logit-normal or from the SD3 "mode" density

Every sample draws its noise and timestep from its own generator seeded by (seed, forward pass, index in the global
batch), so a run gives the same draws whether it is resumed, split across processes or batched differently.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "add_noise",
    "draw_flow_u",
    "dynamic_shift",
    "flow_noisy",
    "min_snr_weights",
    "offset_noise",
    "sample_generator",
    "shift_sigmas",
    "snr",
    "velocity",
]

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def sample_generator(seed: int, forward_pass: int, index: int) -> torch.Generator:
    """A CPU generator for one sample of one forward pass: independent streams from a hashed (splitmix) seed."""
    x = (seed * _MIX[0] + forward_pass * _MIX[1] + index * _MIX[2]) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * _MIX[1]) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
    return torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF)


def _expand(values: Tensor, like: Tensor) -> Tensor:
    """``values`` [b] -> [b, 1, 1, ...] to broadcast over ``like``."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """``sqrt(a_t) x_0 + sqrt(1 - a_t) eps``; ``timesteps`` [b] long, ``alphas_cumprod`` [T]."""
    a = alphas_cumprod.to(torch.float32)[timesteps.cpu()]
    return _expand(a.sqrt(), x0) * x0 + _expand((1 - a).sqrt(), x0) * noise


def velocity(x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The v-prediction target ``sqrt(a_t) eps - sqrt(1 - a_t) x_0``."""
    a = alphas_cumprod.to(torch.float32)[timesteps.cpu()]
    return _expand(a.sqrt(), x0) * noise - _expand((1 - a).sqrt(), x0) * x0


def snr(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio ``a_t / (1 - a_t)`` [b], in fp32."""
    a = alphas_cumprod.to(torch.float32)[timesteps.cpu()]
    return a / (1 - a)


def min_snr_weights(timesteps: Tensor, alphas_cumprod: Tensor, gamma: float, prediction: str) -> Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023) [b]: ``min(SNR, gamma) / SNR`` for epsilon,
    ``min(SNR, gamma) / (SNR + 1)`` for v-prediction (whose loss already carries a factor SNR + 1)."""
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction == "v_prediction" else clipped / s


def offset_noise(channels: int, ndim: int, offset: float, generator: torch.Generator) -> Tensor:
    """Noise-offset term: ``offset * n`` with one normal value per channel, shaped [c, 1, 1...] to add to eps."""
    return offset * torch.randn(channels, *([1] * (ndim - 1)), generator=generator)


def draw_flow_u(
    scheme: str, generator: torch.Generator, *, mean: float = 0.0, std: float = 1.0, mode_scale: float = 1.29
) -> float:
    """One draw of ``u`` in (0, 1): uniform, logit-normal ``sigmoid(N(mean, std))``, or the SD3 paper's mode density
    ``1 - u - s (cos^2(pi u / 2) - 1 + u)`` over a uniform ``u``."""
    if scheme == "logit_normal":
        return float(torch.sigmoid(torch.randn((), generator=generator) * std + mean))
    u = float(torch.rand((), generator=generator))
    if scheme == "mode":
        return 1.0 - u - mode_scale * (math.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    return u


def shift_sigmas(u: Tensor, shift: float) -> Tensor:
    """The shifted noise level ``shift u / (1 + (shift - 1) u)`` (FlowMatchEulerDiscreteScheduler's static shift)."""
    return shift * u / (1 + (shift - 1) * u)


def dynamic_shift(
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift ``exp(mu)``, ``mu`` linear in the packed image sequence length from
    ``base_shift`` at ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (what FLUX pipelines use at inference)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = image_seq_len * slope + base_shift - slope * base_seq_len
    return math.exp(mu)


def flow_noisy(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """``(1 - sigma) x_0 + sigma eps`` with ``sigmas`` [b]."""
    s = _expand(sigmas, x0)
    return (1 - s) * x0 + s * noise
