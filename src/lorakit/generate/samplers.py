"""Sampler names (A1111's, in CLI spelling) mapped to diffusers schedulers, built from the pipeline's own config."""

from __future__ import annotations

from typing import Any

from lorakit.errors import ConfigError

__all__ = ["FLOW_SAMPLERS", "SAMPLERS", "set_sampler"]

SAMPLERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", "Euler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", "Euler a", {}),
    "ddim": ("DDIMScheduler", "DDIM", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", "DPM++ 2M", {}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", "UniPC", {}),
    "heun": ("HeunDiscreteScheduler", "Heun", {}),
    "lms": ("LMSDiscreteScheduler", "LMS", {}),
    "pndm": ("PNDMScheduler", "PLMS", {}),
}
"""CLI name -> (diffusers scheduler class, A1111 sampler label, extra config) for SD1 / SD2 / SDXL."""

FLOW_SAMPLERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", "Euler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", "Heun", {}),
}
"""The same for flow-matching models (FLUX, SD3)."""

_FLOW = ("flux", "sd3")


def set_sampler(pipe: Any, name: str | None, arch: str) -> str:
    """Swap the pipeline's scheduler for the named sampler (config carried over); returns the A1111 label.

    Args:
        pipe: a diffusers pipeline.
        name: a key of ``SAMPLERS`` (``FLOW_SAMPLERS`` for FLUX / SD3), or None to keep the pipeline's own.
        arch: the architecture.

    Raises:
        ConfigError: a sampler this architecture does not have (the message lists those it has).
    """
    import diffusers

    table = FLOW_SAMPLERS if arch in _FLOW else SAMPLERS
    if name is None:
        current = type(pipe.scheduler).__name__
        for cls_name, label, extra in table.values():
            if cls_name == current and not extra:
                return label
        return current
    key = name.lower().replace(" ", "_")
    if key not in table:
        raise ConfigError(f"--sampler {name!r}: {arch} samples with {', '.join(table)}")
    cls_name, label, extra = table[key]
    scheduler_cls = getattr(diffusers, cls_name)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **extra)
    return label
