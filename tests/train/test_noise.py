"""Objective math against diffusers: add_noise, get_velocity, compute_snr, flow-matching sigmas and densities."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from lorakit.train.noise import (
    add_noise,
    draw_flow_u,
    dynamic_shift,
    flow_noisy,
    min_snr_weights,
    offset_noise,
    sample_generator,
    shift_sigmas,
    snr,
    velocity,
)


@pytest.fixture(scope="module")
def ddpm() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, 4, 6, 6, generator=g)
    noise = torch.randn(5, 4, 6, 6, generator=g)
    t = torch.tensor([0, 1, 250, 777, 999])
    return x0, noise, t


def test_add_noise_and_velocity_match_diffusers(ddpm):
    x0, noise, t = _batch()
    torch.testing.assert_close(add_noise(x0, noise, t, ddpm.alphas_cumprod), ddpm.add_noise(x0, noise, t))
    torch.testing.assert_close(velocity(x0, noise, t, ddpm.alphas_cumprod), ddpm.get_velocity(x0, noise, t))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_training_script(ddpm, prediction):
    _, _, t = _batch()
    ref_snr = compute_snr(ddpm, t)
    torch.testing.assert_close(snr(t, ddpm.alphas_cumprod), ref_snr)
    # train_text_to_image_lora.py: mse_loss_weights = min(snr, gamma) / snr, with / (snr + 1) for v-prediction
    gamma = 5.0
    ref = torch.stack([ref_snr, gamma * torch.ones_like(ref_snr)], dim=1).min(dim=1)[0]
    ref = ref / (ref_snr + 1) if prediction == "v_prediction" else ref / ref_snr
    torch.testing.assert_close(min_snr_weights(t, ddpm.alphas_cumprod, gamma, prediction), ref)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_shifted_sigmas_match_flow_match_scheduler(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    u = torch.linspace(1.0, 1 / 1000, 1000)  # the unshifted training sigmas
    torch.testing.assert_close(shift_sigmas(u, shift), sched.sigmas[:1000])


def test_dynamic_shift_matches_scheduler_time_shift():
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    seq_len = 1024
    shift = dynamic_shift(seq_len)
    mu = math.log(shift)
    # FluxPipeline's calculate_shift gives mu; the scheduler applies exp(mu) / (exp(mu) + (1 / t - 1))
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert mu == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    u = torch.linspace(0.05, 0.95, 10)
    torch.testing.assert_close(shift_sigmas(u, shift), sched.time_shift(mu, 1.0, u))


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_flow_density_matches_diffusers(scheme):
    """The same normal / uniform draws map to the same u as diffusers' compute_density_for_timestep_sampling."""
    seed = 3
    ours = [draw_flow_u(scheme, torch.Generator().manual_seed(seed), mean=0.2, std=0.8, mode_scale=1.29)]
    torch.manual_seed(seed)
    ref = compute_density_for_timestep_sampling(
        scheme if scheme != "uniform" else "none", 1, logit_mean=0.2, logit_std=0.8, mode_scale=1.29
    )
    assert ours[0] == pytest.approx(float(ref[0]), rel=1e-6)


def test_flow_noisy_is_the_scheduler_scale_noise():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    x0, noise, _ = _batch(1)
    idx = torch.tensor([0, 100, 500, 900, 999])
    sigmas = sched.sigmas[idx]
    ref = torch.stack(
        [sched.scale_noise(x0[i : i + 1], sched.timesteps[idx[i]][None], noise[i : i + 1])[0] for i in range(5)]
    )
    torch.testing.assert_close(flow_noisy(x0, noise, sigmas), ref)


def test_sample_generators_are_independent_and_repeatable():
    a = torch.randn(8, generator=sample_generator(0, 3, 1))
    assert torch.equal(a, torch.randn(8, generator=sample_generator(0, 3, 1)))
    others = [sample_generator(0, 3, 2), sample_generator(0, 4, 1), sample_generator(1, 3, 1)]
    for g in others:
        assert not torch.equal(a, torch.randn(8, generator=g))


def test_offset_noise_is_constant_per_channel():
    off = offset_noise(4, 4, 0.1, torch.Generator().manual_seed(0))
    assert off.shape == (4, 1, 1, 1)
    assert off.abs().max() < 1.0 and off.abs().min() > 0
