"""What one training step computes for each architecture: latents, text conditioning and the per-sample loss.

SD1/SD2 (UNet, epsilon or v-prediction), SDXL (UNet with pooled text and micro-conditioning ``time_ids`` =
original size + crop top-left + target size), FLUX (packed 2x2 latent patches, position ids, guidance embedding,
flow matching with a resolution-dependent shift) and SD3 (flow matching, timesteps 0-1000).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lorakit.errors import ConfigError
from lorakit.train.config import TrainingConfig
from lorakit.train.noise import (
    add_noise,
    draw_flow_u,
    dynamic_shift,
    flow_noisy,
    min_snr_weights,
    offset_noise,
    sample_generator,
    shift_sigmas,
    velocity,
)

__all__ = ["DENOISER", "TEXT_ENCODERS", "DiffusionTask", "task_for"]

DENOISER = {"sd1": "unet", "sd2": "unet", "sdxl": "unet", "flux": "transformer", "sd3": "transformer"}
"""The component the LoRA trains, per architecture."""
TEXT_ENCODERS = {
    "sd1": ("text_encoder",),
    "sd2": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
    "flux": ("text_encoder",),
    "sd3": ("text_encoder", "text_encoder_2"),
}
"""CLIP text encoders that may carry a LoRA (T5 never does: too large to be worth it)."""


@dataclass
class StepDraws:
    """The random draws of one forward pass: noise [b, ...] and a timestep (or flow level u) per sample."""

    noise: Tensor
    timesteps: Tensor
    """Long timesteps for diffusion, float ``u`` in (0, 1) for flow matching."""


class DiffusionTask:
    """Base: encode images and captions, draw noise, compute the per-sample loss [b] of the denoiser."""

    flow = False

    def __init__(self, pipe: Any, arch: str, training: TrainingConfig, prediction: str) -> None:
        self.pipe, self.arch, self.training = pipe, arch, training
        self.prediction = prediction
        self.denoiser = getattr(pipe, DENOISER[arch])
        self.vae = pipe.vae
        self.num_timesteps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
        self.alphas_cumprod: Tensor | None = None

    # --- encoders -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """``pixels`` [b, 3, H, W] in [-1, 1] -> scaled latents [b, c, H/f, W/f] (fp32).

        The posterior mean, not a sample: caches and uncached runs then give the same latents bit for bit.
        """
        vae = self.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def encode_text(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """Captions -> the denoiser's text conditioning (with gradients when the text encoders train)."""
        embeds, _ = self.pipe.encode_prompt(list(captions), self.denoiser.device, 1, False)
        return {"encoder_hidden_states": embeds}

    # --- noise ----------------------------------------------------------------------------------------------------
    def draw(self, latents: Tensor, seed: int, forward_pass: int, indices: Sequence[int]) -> StepDraws:
        """Noise and timesteps for each sample from its own generator (see ``noise.sample_generator``)."""
        t = self.training
        noises, steps = [], []
        for index in indices:
            g = sample_generator(seed, forward_pass, index)
            noise = torch.randn(latents.shape[1:], generator=g)
            if t.noise_offset:
                noise = noise + offset_noise(latents.shape[1], latents.ndim - 1, t.noise_offset, g)
            noises.append(noise)
            if self.flow:
                steps.append(
                    draw_flow_u(t.timestep_sampling, g, mean=t.logit_mean, std=t.logit_std, mode_scale=t.mode_scale)
                )
            else:
                steps.append(int(torch.randint(0, self.num_timesteps, (), generator=g)))
        dtype = torch.float32 if self.flow else torch.long
        return StepDraws(torch.stack(noises).to(latents.device), torch.tensor(steps, dtype=dtype))

    # --- loss -----------------------------------------------------------------------------------------------------
    def loss(self, latents: Tensor, cond: dict[str, Tensor], samples: Sequence[Any], draws: StepDraws) -> Tensor:
        """Per-sample loss [b]: the mean squared error of the prediction, weighted by min-SNR when asked."""
        if self.alphas_cumprod is None:
            from diffusers import DDPMScheduler

            self.alphas_cumprod = DDPMScheduler.from_config(self.pipe.scheduler.config).alphas_cumprod
        ac, t = self.alphas_cumprod, draws.timesteps
        noisy = add_noise(latents, draws.noise, t, ac)
        pred = self.predict(noisy.to(self.denoiser.dtype), t.to(latents.device), cond, samples).float()
        target = velocity(latents, draws.noise, t, ac) if self.prediction == "v_prediction" else draws.noise
        per_sample = ((pred - target) ** 2).flatten(1).mean(1)
        gamma = self.training.min_snr_gamma
        if gamma is not None:
            per_sample = per_sample * min_snr_weights(t, ac, gamma, self.prediction).to(per_sample.device)
        return per_sample

    def predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor], samples: Sequence[Any]) -> Tensor:
        return self.denoiser(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


class SdxlTask(DiffusionTask):
    def encode_text(self, captions: Sequence[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(captions), device=self.denoiser.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor], samples: Sequence[Any]) -> Tensor:
        # micro-conditioning: (original h, w), (crop top, left), (target h, w) of each image, as SDXL was trained
        time_ids = torch.tensor(
            [[*s.original_size, *s.crop_top_left, *s.target_size] for s in samples],
            dtype=noisy.dtype,
            device=noisy.device,
        )
        added = {"text_embeds": cond["text_embeds"].to(noisy.dtype), "time_ids": time_ids}
        return self.denoiser(
            noisy, t, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype), added_cond_kwargs=added
        ).sample


class FlowTask(DiffusionTask):
    """Flow matching: ``x = (1 - sigma) x_0 + sigma eps``, target ``eps - x_0``."""

    flow = True

    def sigmas(self, u: Tensor, latents: Tensor) -> Tensor:
        shift = self.training.flow_shift
        if shift is None:
            config = self.pipe.scheduler.config
            if config.get("use_dynamic_shifting", False):
                seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
                shift = dynamic_shift(
                    seq_len,
                    base_seq_len=config.get("base_image_seq_len", 256),
                    max_seq_len=config.get("max_image_seq_len", 4096),
                    base_shift=config.get("base_shift", 0.5),
                    max_shift=config.get("max_shift", 1.15),
                )
            else:
                shift = float(config.get("shift", 1.0))
        return shift_sigmas(u, shift)

    def loss(self, latents: Tensor, cond: dict[str, Tensor], samples: Sequence[Any], draws: StepDraws) -> Tensor:
        if self.training.min_snr_gamma is not None:
            raise ConfigError(
                "training.min_snr_gamma applies to epsilon and v-prediction, not flow matching; "
                "remove it for FLUX and SD3"
            )
        sigmas = self.sigmas(draws.timesteps, latents).to(latents.device)
        noisy = flow_noisy(latents, draws.noise, sigmas)
        pred = self.predict(noisy.to(self.denoiser.dtype), sigmas, cond, samples).float()
        target = draws.noise - latents
        return ((pred - target) ** 2).flatten(1).mean(1)


class FluxTask(FlowTask):
    def encode_text(self, captions: Sequence[str]) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            list(captions), None, device=self.denoiser.device, num_images_per_prompt=1
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, noisy: Tensor, sigmas: Tensor, cond: dict[str, Tensor], samples: Sequence[Any]) -> Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)  # FLUX text positions are 0
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.training.guidance_scale, device=noisy.device, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=packed,
            timestep=sigmas.to(noisy.dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_projections"].to(noisy.dtype),
            encoder_hidden_states=text.to(noisy.dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample
        # back to [b, c, h, w]: the inverse of the 2x2 packing
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class Sd3Task(FlowTask):
    def encode_text(self, captions: Sequence[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(captions),
            None,
            None,
            device=self.denoiser.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, noisy: Tensor, sigmas: Tensor, cond: dict[str, Tensor], samples: Sequence[Any]) -> Tensor:
        return self.denoiser(
            hidden_states=noisy,
            timestep=(sigmas * self.num_timesteps).to(noisy.dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            pooled_projections=cond["pooled_projections"].to(noisy.dtype),
        ).sample


def task_for(pipe: Any, arch: str, training: TrainingConfig, prediction: str = "auto") -> DiffusionTask:
    """The task of ``arch`` over ``pipe``; ``prediction`` auto reads the scheduler (flow for FLUX and SD3).

    Raises:
        ConfigError: unknown architecture, or a prediction type the architecture does not train with.
    """
    if arch not in DENOISER:
        raise ConfigError(f"cannot train architecture {arch!r}; lorakit trains {', '.join(DENOISER)}")
    flow = arch in ("flux", "sd3")
    if prediction == "auto":
        prediction = "flow" if flow else pipe.scheduler.config.get("prediction_type", "epsilon")
    if (prediction == "flow") != flow or prediction not in ("epsilon", "v_prediction", "flow"):
        raise ConfigError(
            f"model.prediction = {prediction!r} does not fit {arch}: use "
            f"{'flow' if flow else 'epsilon or v_prediction'}"
        )
    cls = {"sdxl": SdxlTask, "flux": FluxTask, "sd3": Sd3Task}.get(arch, DiffusionTask)
    return cls(pipe, arch, training, prediction)
