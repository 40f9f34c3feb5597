"""The per-architecture step against diffusers: the noisy input the denoiser sees, the target, SDXL's time ids."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from lorakit.models.tiny import build_tiny_pipeline
from lorakit.train.config import TrainingConfig
from lorakit.train.data import Sample
from lorakit.train.tasks import task_for


def _samples(n: int, size: int = 32) -> list[Sample]:
    return [
        Sample(
            key=f"{i}",
            pixels=torch.zeros(3, size, size),
            caption="red circle",
            original_size=(48 + i, 40),
            crop_top_left=(i, 2 * i),
            target_size=(size, size),
        )
        for i in range(n)
    ]


def _latents(task, n=3):
    return torch.randn(n, task.vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("arch", "prediction"), [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")])
def test_diffusion_input_and_target_match_diffusers(arch, prediction):
    pipe = build_tiny_pipeline(arch)
    task = task_for(pipe, arch, TrainingConfig())
    assert task.prediction == prediction  # read from the pipeline's scheduler
    latents = _latents(task)
    draws = task.draw(latents, 0, 0, range(3))
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    expected_target = (
        ddpm.get_velocity(latents, draws.noise, draws.timesteps) if prediction == "v_prediction" else draws.noise
    )
    seen = {}

    def predict(noisy, t, cond, samples):
        seen["noisy"], seen["t"] = noisy, t
        return expected_target  # a perfect denoiser: the loss must be zero

    task.predict = predict
    loss = task.loss(latents, task.encode_text(["a"] * 3), _samples(3), draws)
    torch.testing.assert_close(seen["noisy"], ddpm.add_noise(latents, draws.noise, draws.timesteps))
    assert torch.equal(seen["t"], draws.timesteps)
    assert float(loss.abs().max()) == 0.0


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_flow_input_and_target_match_diffusers(arch):
    pipe = build_tiny_pipeline(arch)
    task = task_for(pipe, arch, TrainingConfig(flow_shift=3.0))
    latents = _latents(task)
    draws = task.draw(latents, 0, 0, range(3))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    seen = {}

    def predict(noisy, sigmas, cond, samples):
        seen["noisy"], seen["sigmas"] = noisy, sigmas
        return draws.noise - latents

    task.predict = predict
    loss = task.loss(latents, {}, _samples(3), draws)
    # FlowMatchEulerDiscreteScheduler's static shift of the drawn u
    ref_sigmas = sched.sigmas.new_tensor([3.0 * u / (1 + 2.0 * u) for u in draws.timesteps.tolist()])
    torch.testing.assert_close(seen["sigmas"], ref_sigmas)
    # the training scripts' noisy input: (1 - sigma) x0 + sigma eps (test_noise ties it to scheduler.scale_noise)
    ref_noisy = torch.stack([(1 - s) * latents[i] + s * draws.noise[i] for i, s in enumerate(ref_sigmas)])
    torch.testing.assert_close(seen["noisy"], ref_noisy)
    assert float(loss.abs().max()) == 0.0


def test_sdxl_time_ids_are_diffusers_add_time_ids_of_each_sample():
    pipe = build_tiny_pipeline("sdxl")
    task = task_for(pipe, "sdxl", TrainingConfig())
    samples = _samples(2)
    captured = {}
    real_forward = task.denoiser.forward

    def spy(*args, **kwargs):
        captured.update(kwargs["added_cond_kwargs"])
        return real_forward(*args, **kwargs)

    task.denoiser.forward = spy
    latents = _latents(task, 2)
    task.loss(latents, task.encode_text(["a", "b"]), samples, task.draw(latents, 0, 0, range(2)))
    for i, s in enumerate(samples):
        ref = pipe._get_add_time_ids(
            s.original_size,
            s.crop_top_left,
            s.target_size,
            torch.float32,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        torch.testing.assert_close(captured["time_ids"][i], ref[0])
    assert captured["text_embeds"].shape == (2, pipe.text_encoder_2.config.projection_dim)


def test_min_snr_refused_for_flow_and_wrong_prediction_refused():
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="does not fit flux"):
        task_for(build_tiny_pipeline("flux"), "flux", TrainingConfig(), "epsilon")
    task = task_for(build_tiny_pipeline("sd3"), "sd3", TrainingConfig(min_snr_gamma=5.0))
    latents = _latents(task, 1)
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        task.loss(latents, {}, _samples(1), task.draw(latents, 0, 0, [0]))
