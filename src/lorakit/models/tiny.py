"""Tiny diffusers pipelines with random weights, for tests, examples and benchmarks of the apply/train code.

Each pipeline has the real architecture's layout (module names are a subset of the full-size model's, so LoRA name
maps, block ids and diffusers' own loaders all apply) at tiny widths: a 2-step 32 px generation takes well under a
second on one CPU thread. Everything is built in code (tokenizers included) and seeded: the same seed gives the same
weights bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.models.tokenizers import CLIP_MAX_LENGTH, clip_tokenizer, t5_tokenizer

__all__ = ["TINY_ARCHS", "build_tiny_pipeline"]

TINY_ARCHS = ("sd1", "sd2", "sdxl", "flux", "sd3")
"""Architectures that ``build_tiny_pipeline`` knows."""


def _clip_text(tokenizer: Any, seed: int, *, hidden: int = 32, projection: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # the encoder must agree with the tokenizer: vocabulary size, sequence length and the special ids
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act=act,
        projection_dim=projection or hidden,
    )
    torch.manual_seed(seed)
    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_cls(config).eval()


def _t5_text(tokenizer: Any, seed: int, *, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (the T5-XXL of FLUX and SD3): wi_0 / wi_1
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _vae(seed: int, *, latent_channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if flow:
        # FLUX and SD3 VAEs have no quant convs and shift the latents
        kwargs = {"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0609, "scaling_factor": 1.5}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **kwargs,
    ).eval()


def _unet(seed: int, *, xl: bool = False, sd2: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if xl:
        # SDXL layout: no attention in the first down block; 2 transformer layers deeper; size/crop embedding
        return UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,
            norm_num_groups=8,
        ).eval()
    # SD1/SD2 layout: attention in the first down block and the last up block, none in the deepest pair
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()


def _sd(seed: int, sd2: bool) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = clip_tokenizer()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=_vae(seed + 1),
        text_encoder=_clip_text(tok, seed + 2, act="gelu" if sd2 else "quick_gelu"),
        tokenizer=tok,
        unet=_unet(seed, sd2=sd2),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(seed: int) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok = clip_tokenizer()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 1),
        text_encoder=_clip_text(tok, seed + 2),
        text_encoder_2=_clip_text(tok, seed + 3, projection=32, act="gelu"),
        tokenizer=tok,
        tokenizer_2=clip_tokenizer(),
        unet=_unet(seed, xl=True),
        scheduler=scheduler,
    )


def _flux(seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    # latent_channels 1 -> 4 packed channels (2x2 patches), as FLUX packs 16 into 64
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    tok = clip_tokenizer()
    t5 = t5_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, latent_channels=1, flow=True),
        text_encoder=_clip_text(tok, seed + 2),
        tokenizer=tok,
        text_encoder_2=_t5_text(t5, seed + 3),
        tokenizer_2=t5,
        transformer=transformer,
    )


def _sd3(seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
    ).eval()
    tok = clip_tokenizer()
    t5 = t5_tokenizer(max_length=256)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, flow=True),
        text_encoder=_clip_text(tok, seed + 2, projection=32),
        tokenizer=tok,
        text_encoder_2=_clip_text(tok, seed + 3, projection=32, act="gelu"),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_text(t5, seed + 4, d_model=64),
        tokenizer_3=t5,
    )


def build_tiny_pipeline(arch: str, *, seed: int = 0) -> Any:
    """A complete diffusers pipeline of one architecture with tiny random components (fp32, CPU).

    Widths: UNet/transformer hidden 32-64, CLIP hidden 32 (2 layers), T5 d_model 32-64, VAE (8, 16) with a 2x
    downsample, so 32 px images use 16 x 16 latents. Tokenizers are built in code (CLIP: 77 tokens; T5: Unigram).

    Args:
        arch: ``sd1``, ``sd2``, ``sdxl``, ``flux`` or ``sd3``.
        seed: seeds every component (each its own offset), so equal seeds give bit-identical pipelines.

    Returns:
        ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``FluxPipeline`` or ``StableDiffusion3Pipeline``.

    Raises:
        ConfigError: unknown architecture.
    """
    builders = {
        "sd1": lambda: _sd(seed, False),
        "sd2": lambda: _sd(seed, True),
        "sdxl": lambda: _sdxl(seed),
        "flux": lambda: _flux(seed),
        "sd3": lambda: _sd3(seed),
    }
    if arch not in builders:
        raise ConfigError(f"no tiny pipeline for architecture {arch!r}: use one of {', '.join(TINY_ARCHS)}")
    state = torch.random.get_rng_state()
    try:
        pipe = builders[arch]()
    finally:
        # building must not disturb the caller's random stream
        torch.random.set_rng_state(state)
    pipe.set_progress_bar_config(disable=True)
    return pipe
