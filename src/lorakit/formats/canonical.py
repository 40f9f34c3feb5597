"""The canonical model: one in-memory form for every LoRA dialect.

A loaded file is a ``LoraFile``: an ordered mapping from ``Target`` (a weight of the base model in diffusers' own module
naming for its component, plus an optional row slice of a fused weight) to a ``Patch`` from ``lorakit.core``, with the
header metadata, the dialect it came from and the architecture it is for. Readers build it, writers consume it, and
everything in between (convert, merge, resize, bake) works on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.core.patches import Patch

__all__ = ["COMPONENTS", "LoraFile", "Target"]

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
"""Component names as diffusers pipelines call them."""


@dataclass(frozen=True, order=True)
class Target:
    """A weight of the base model: ``component`` + diffusers ``module`` name (without ``.weight``).

    ``rows`` selects output rows ``[start, stop)`` of a fused weight (FLUX ``qkv`` and ``linear1`` in BFL naming, SD2's
    ``in_proj_weight``) when the patch covers only part of it.
    """

    component: str
    module: str
    rows: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown component {self.component!r}; expected one of {COMPONENTS}")

    def __str__(self) -> str:
        sliced = f"[{self.rows[0]}:{self.rows[1]}]" if self.rows else ""
        return f"{self.component}.{self.module}{sliced}"


@dataclass
class LoraFile:
    """A LoRA in canonical form.

    Attributes:
        patches: target -> patch, in a stable order (sorted by target when written).
        metadata: the safetensors header's ``__metadata__`` (string to string), kept as read.
        dialect: where it came from (``kohya``, ``diffusers``, ``peft``, ``lycoris``, ``comfy``, ``xlabs``...).
        arch: the architecture it is for (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3``), or None if unknown.
        arch_reason: why that architecture was chosen (shown by ``inspect``).
        skipped: keys the reader could not place, only filled when the caller allowed skipping.
    """

    patches: dict[Target, Patch] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    dialect: str = "unknown"
    arch: str | None = None
    arch_reason: str = ""
    skipped: list[str] = field(default_factory=list)

    def components(self) -> list[str]:
        """The components this LoRA touches, in diffusers order."""
        present = {t.component for t in self.patches}
        return [c for c in COMPONENTS if c in present]

    def for_component(self, component: str) -> dict[str, Patch]:
        """Patches of one component keyed by module name (only unsliced targets; see ``Target.rows``)."""
        return {t.module: p for t, p in self.patches.items() if t.component == component and t.rows is None}
