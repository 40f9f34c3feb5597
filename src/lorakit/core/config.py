"""Configuration of a trainable LoRA: a frozen dataclass, checked on construction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.errors import ConfigError

__all__ = ["LoraConfig"]


@dataclass(frozen=True)
class LoraConfig:
    """How to add a trainable LoRA to a model.

    ``y = W x + (alpha / r) * B A x`` (or ``alpha / sqrt(r)`` with rank-stabilised scaling).
    """

    rank: int = 16
    """Rank ``r`` of the Linear adapters (rows of ``A``)."""
    alpha: float | None = None
    """Scale numerator; None means ``alpha = rank`` (scale 1), a default that trains (dim 4 / alpha 1 barely does)."""
    targets: str | Sequence[str] = r".*"
    """A string is a regex matched against the full module name; a list matches exact names or dotted suffixes."""
    exclude: str | Sequence[str] | None = None
    """Modules to leave alone, with the same rules as ``targets``."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    conv_rank: int | None = None
    """Rank of k x k Conv2d adapters (LoCon); None leaves k x k convs out. 1x1 convs use ``rank``."""
    conv_alpha: float | None = None
    """Alpha of the k x k Conv2d adapters; None means ``alpha = conv_rank``."""
    conv_tucker: bool = False
    """Factor k x k conv adapters as 1x1 down, k x k ``mid`` core, 1x1 up (Tucker LoCon)."""
    allow_missing: bool = False
    """With a list of targets, tolerate entries that match no module (each one must match otherwise)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be at least 1, not {self.rank}")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise ConfigError(f"conv_rank must be at least 1, not {self.conv_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), not {self.dropout}")
        for name in ("alpha", "conv_alpha"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, not {value}")

    def rank_alpha(self, kernel_numel: int) -> tuple[int, float] | None:
        """Rank and alpha for a layer whose kernel has ``kernel_numel`` elements, or None to skip the layer."""
        if kernel_numel > 1:
            if self.conv_rank is None:
                return None
            return self.conv_rank, float(self.conv_alpha if self.conv_alpha is not None else self.conv_rank)
        return self.rank, float(self.alpha if self.alpha is not None else self.rank)
