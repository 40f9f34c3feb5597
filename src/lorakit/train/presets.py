"""Presets: sensible settings per base model, and memory tiers that trade speed for VRAM.

A preset is ``ARCH`` or ``ARCH-TIER`` (``sdxl-8gb``). The tier picks gradient checkpointing, the 8-bit optimizer
and caching; the base picks rank, learning rate and resolution. A config file's own values override the preset.
"""

from __future__ import annotations

from typing import Any

from lorakit.errors import ConfigError

__all__ = ["PRESETS", "preset_tables"]

_BASES: dict[str, dict[str, Any]] = {
    "sd1.5": {
        "model": {"arch": "sd1"},
        "dataset": {"resolution": 512},
        "network": {"rank": 16, "alpha": 16, "targets": "attention-mlp"},
        "optimizer": {"name": "adamw", "lr": 1e-4, "schedule": "cosine", "warmup_steps": 50},
        "training": {"steps": 1500, "batch_size": 1, "min_snr_gamma": 5.0},
    },
    "sdxl": {
        "model": {"arch": "sdxl"},
        "dataset": {"resolution": 1024},
        "network": {"rank": 16, "alpha": 16, "targets": "attention-mlp"},
        "optimizer": {"name": "adamw", "lr": 1e-4, "schedule": "cosine", "warmup_steps": 50},
        "training": {"steps": 1500, "batch_size": 1, "min_snr_gamma": 5.0},
    },
    "flux": {
        "model": {"arch": "flux", "prediction": "flow"},
        "dataset": {"resolution": 1024},
        "network": {"rank": 16, "alpha": 16, "targets": "attention-mlp"},
        "optimizer": {"name": "adamw", "lr": 1e-4, "schedule": "constant", "warmup_steps": 20},
        "training": {"steps": 1000, "batch_size": 1, "timestep_sampling": "logit_normal", "guidance_scale": 1.0},
    },
}

_LOW = {
    "training": {"gradient_checkpointing": True, "cache_latents": True, "cache_text": True, "mixed_precision": "auto"},
    "optimizer": {"name": "adamw8bit"},
}
_MID = {
    "training": {"gradient_checkpointing": True, "cache_latents": True, "cache_text": True, "mixed_precision": "auto"}
}
_HIGH = {
    "training": {"gradient_checkpointing": False, "cache_latents": True, "cache_text": True, "mixed_precision": "auto"}
}

_TIERS: dict[str, dict[str, dict[str, Any]]] = {
    "sd1.5": {"6gb": _LOW, "8gb": _MID, "12gb": _HIGH},
    "sdxl": {"8gb": _LOW, "12gb": _MID, "24gb": _HIGH},
    "flux": {"16gb": _LOW, "24gb": _MID, "48gb": _HIGH},
}

PRESETS: tuple[str, ...] = tuple([*_BASES, *(f"{b}-{t}" for b, tiers in _TIERS.items() for t in tiers)])
"""Every preset name."""


def preset_tables(name: str) -> dict[str, dict[str, Any]]:
    """The config tables of preset ``name`` (``sd1.5``, ``sdxl-8gb``...), as nested dicts ready to merge under a file.

    Raises:
        ConfigError: unknown preset (the message lists them).
    """
    base, _, tier = name.partition("-") if name.count("-") == 1 else (name, "", "")
    if base not in _BASES or (tier and tier not in _TIERS[base]):
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    tables = {k: dict(v) for k, v in _BASES[base].items()}
    for key, values in (_TIERS[base][tier] if tier else {}).items():
        tables.setdefault(key, {}).update(values)
    return tables
