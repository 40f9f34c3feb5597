"""Which architecture a LoRA file is for: the caller's word, else its metadata, else its key names and shapes.

The evidence rules live in ``lorakit.arch.detect``; this module only orders them for reading LoRA files. Metadata
comes first here (kohya's ``ss_base_model_version``, modelspec's ``modelspec.architecture``): a LoRA's keys often name
just a few modules (one text encoder, a handful of attention layers), and the trainer that wrote the file knew the
base model. One kohya fact the generic rules do not use: numbered encoder prefixes (``lora_te1_``, ``lora_te2_``)
exist only for models with several encoders, so they rule out SD 1/2.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from lorakit.errors import LorakitError

__all__ = ["detect_arch", "family_of"]

_NUMBERED_ENCODERS = ("lora_te1_", "lora_te2_", "lora_te3_")


def family_of(arch: str) -> str:
    """An architecture or variant name (``flux-schnell``) -> its family (``flux``).

    Raises:
        LorakitError: the name is neither.
    """
    from lorakit.arch.registry import arch_of

    try:
        return arch_of(arch)
    except KeyError as exc:
        raise LorakitError(str(exc).strip("'\"")) from None


def detect_arch(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], arch: str | None = None
) -> tuple[str | None, str | None, str]:
    """The architecture family of a LoRA, the released variant when known, and why.

    Args:
        tensors: the file's tensors (only names and shapes are looked at).
        metadata: the header metadata.
        arch: the caller's answer, which wins (an architecture or a variant name).

    Returns:
        ``(family or None, variant or None, reason)``.
    """
    if arch is not None:
        family = family_of(arch)
        return family, None if arch == family else arch, "given by the caller"
    from lorakit.arch.detect import detect

    if metadata:
        found = detect({}, metadata)
        if found.arch is not None:
            return found.arch, found.variant, found.reason
    found = detect({key: tuple(t.shape) for key, t in tensors.items()})
    if found.arch in ("sd1", "sd2") and any(k.startswith(_NUMBERED_ENCODERS) for k in tensors):
        return None, None, f"{found.reason}, but kohya's numbered encoder prefixes mean a model with several"
    return found.arch, found.variant, found.reason
