"""Generate lorakit's bundled module tables and model configs (``src/lorakit/arch/{data,configs}``).

For every table named in ``lorakit.arch.registry.TABLES`` this script

1. writes the model config below (the public ``config.json`` of the released model, shape-relevant fields and the
   ids a tokenizer needs) to ``src/lorakit/arch/configs/<table>.json``, so that later code can build the model offline;
2. builds the real diffusers / transformers class from that config on ``torch.device("meta")`` (no memory, no
   download, a second or two for all of them);
3. writes every module that carries a ``weight`` (Linear, Conv2d, norms, embeddings) with its kind, weight shape and
   whether it has a bias to ``src/lorakit/arch/data/<table>.json.gz`` (deterministic gzip: same input, same bytes).

Text encoder names use the transformers 4 form: ``CLIPTextModel`` in transformers 5 drops the ``text_model.`` level,
real-world checkpoints and LoRA files (made with transformers 4) keep it, so the script adds it back.

Run from the repository root with the dev environment (diffusers and transformers installed)::

    .venv/bin/python scripts/make_arch_tables.py            # regenerate everything
    .venv/bin/python scripts/make_arch_tables.py --check    # exit 1 if the bundled files are stale

Run it again after changing a config here or upgrading diffusers/transformers, and commit the result;
``tests/arch/test_arch_tables.py`` rebuilds the models from the bundled configs and fails on any difference.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
ARCH_DIR = ROOT / "src" / "lorakit" / "arch"
sys.path.insert(0, str(ROOT / "src"))

from lorakit.arch.registry import TABLES  # noqa: E402

_CLIP_IDS = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}
_CLIP_L = {
    "model_type": "clip_text_model",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    **_CLIP_IDS,
}
_SD_UNET_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
}
_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
}
_FLUX = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
_SD3 = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "sample_size": 128,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "sd1-unet": {
        **_UNET_COMMON,
        **_SD_UNET_BLOCKS,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "sample_size": 64,
    },
    "sd2-unet": {
        **_UNET_COMMON,
        **_SD_UNET_BLOCKS,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "sample_size": 96,
        "upcast_attention": True,
        "use_linear_projection": True,
        "dual_cross_attention": False,
        "only_cross_attention": False,
        "num_class_embeds": None,
    },
    "sdxl-unet": {
        **_UNET_COMMON,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
    },
    "flux-dev-transformer": {**_FLUX, "guidance_embeds": True},
    "flux-schnell-transformer": {**_FLUX, "guidance_embeds": False},
    "sd3-medium-transformer": {
        **_SD3,
        "caption_projection_dim": 1536,
        "num_attention_heads": 24,
        "num_layers": 24,
        "pos_embed_max_size": 192,
    },
    "sd3.5-medium-transformer": {
        **_SD3,
        "caption_projection_dim": 1536,
        "num_attention_heads": 24,
        "num_layers": 24,
        "pos_embed_max_size": 384,
        "qk_norm": "rms_norm",
        "dual_attention_layers": list(range(13)),
    },
    "sd3.5-large-transformer": {
        **_SD3,
        "caption_projection_dim": 2432,
        "num_attention_heads": 38,
        "num_layers": 38,
        "pos_embed_max_size": 192,
        "qk_norm": "rms_norm",
    },
    "clip-l": {"architectures": ["CLIPTextModel"], **_CLIP_L},
    "clip-l-proj": {"architectures": ["CLIPTextModelWithProjection"], **_CLIP_L},
    "openclip-h": {
        "architectures": ["CLIPTextModel"],
        **_CLIP_L,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
        "hidden_act": "gelu",
    },
    "openclip-bigg": {
        "architectures": ["CLIPTextModelWithProjection"],
        **_CLIP_L,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "projection_dim": 1280,
        "hidden_act": "gelu",
    },
    "t5-xxl": {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_ff": 10240,
        "d_kv": 64,
        "d_model": 4096,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "num_decoder_layers": 24,
        "num_heads": 64,
        "num_layers": 24,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "vocab_size": 32128,
    },
}
"""SD2 note: diffusers builds OpenCLIP-H with 23 layers (SD2 conditions on the penultimate layer; the 24th is
unused)."""


def build_model(table: str, config: dict[str, Any] | None = None) -> nn.Module:
    """The real diffusers/transformers model for ``table``, built on the meta device from ``config``."""
    config = CONFIGS[table] if config is None else config
    spec = TABLES[table]
    with torch.device("meta"):
        if spec.library == "diffusers":
            import diffusers

            cls = getattr(diffusers, spec.class_name)
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        import transformers

        cls = getattr(transformers, spec.class_name)
        config_cls = transformers.T5Config if spec.class_name.startswith("T5") else transformers.CLIPTextConfig
        kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
        return cls(config_cls(**kwargs))


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "norm" if "Norm" in type(module).__name__ else "other"


def module_entries(model: nn.Module) -> list[list[Any]]:
    """``[name, kind, weight shape, has bias]`` for every module with a weight, in ``named_modules`` order.

    Names get the transformers-4 ``text_model.`` level back when the model lacks it (transformers 5 CLIPTextModel).
    """
    prefix = "text_model." if type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model") else ""
    rows = []
    # remove_duplicate=False keeps T5's encoder.embed_tokens, which transformers 5 ties to ``shared``: checkpoints
    # carry both keys.
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not name:
            continue
        has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
        rows.append([prefix + name, _kind(module), list(weight.shape), has_bias])
    return rows


def _table_bytes(table: str, entries: list[list[Any]]) -> bytes:
    import diffusers
    import transformers

    payload = {
        "table": table,
        "library": TABLES[table].library,
        "class": TABLES[table].class_name,
        "built_with": {"diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "columns": ["name", "kind", "shape", "bias"],
        "modules": entries,
    }
    text = json.dumps(payload, separators=(",", ":")).encode()
    return gzip.compress(text, compresslevel=9, mtime=0)


def _config_bytes(table: str) -> bytes:
    return (json.dumps(CONFIGS[table], indent=2, sort_keys=True) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the bundled files instead of writing")
    args = parser.parse_args(argv)
    missing = set(TABLES) ^ set(CONFIGS)
    if missing:
        raise SystemExit(f"registry and script disagree on tables: {sorted(missing)}")
    stale = []
    for table in TABLES:
        files = {
            ARCH_DIR / "configs" / f"{table}.json": _config_bytes(table),
            ARCH_DIR / "data" / f"{table}.json.gz": _table_bytes(table, module_entries(build_model(table))),
        }
        for path, data in files.items():
            if args.check:
                if not path.exists() or path.read_bytes() != data:
                    stale.append(str(path.relative_to(ROOT)))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"{path.relative_to(ROOT)}: {len(data):,} bytes")
    if stale:
        print("stale: " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
