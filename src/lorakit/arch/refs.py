"""Small value types shared by the name maps: a weight in original naming and a module in diffusers naming."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["SWAP_HALVES", "TRANSPOSE", "DiffusersRef", "OriginalRef", "Rows"]

Rows = tuple[int, int]
"""Output rows ``[start, stop)`` of a fused weight."""

SWAP_HALVES = "swap_halves"
"""The original stores the two row halves in the other order (``[shift; scale]`` where diffusers has ``[scale; shift]``,
the final AdaLN modulation of FLUX and SD3): a LoRA's B (or a delta's rows) must be swapped the same way."""

TRANSPOSE = "transpose"
"""The original stores the weight transposed (OpenCLIP ``text_projection`` is used as ``x @ P``; a Linear computes
``W x``)."""


class OriginalRef(NamedTuple):
    """A weight in an original (LDM / SGM / BFL / SD3 / OpenCLIP) checkpoint, relative to the component prefix.

    Attributes:
        module: the original module path, e.g. ``double_blocks.0.img_attn.qkv`` or ``input_blocks.1.1.proj_in``. For
            weights that are bare parameters it is the parameter path (``positional_embedding``); for OpenCLIP's fused
            attention it is ``...attn.in_proj`` (the tensor is ``...attn.in_proj_weight``).
        param: what follows ``module`` in the weight key: ``.weight``, ``.scale`` (FLUX RMSNorm), ``_weight``
            (OpenCLIP ``in_proj_weight``) or ``""`` (bare parameter).
        rows: the output rows of the original tensor that hold this module's weight, or None for all of it.
        transform: None when the rows are stored as diffusers stores them, else ``swap_halves`` or ``transpose``.
    """

    module: str
    param: str = ".weight"
    rows: Rows | None = None
    transform: str | None = None

    @property
    def key(self) -> str:
        """The weight's key, relative to the component prefix (``double_blocks.0.img_attn.qkv.weight``)."""
        return self.module + self.param

    @property
    def bias_key(self) -> str | None:
        """The bias key beside the weight, or None where the original has no bias slot (norm scales, bare params)."""
        if self.param == ".weight":
            return self.module + ".bias"
        if self.param == "_weight":
            return self.module + "_bias"
        return None


class DiffusersRef(NamedTuple):
    """A module in diffusers / transformers naming, the inverse of ``OriginalRef``.

    Attributes:
        component: ``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2`` or ``text_encoder_3``.
        module: the module name as in ``lorakit.arch.tables`` (without ``.weight``).
        rows: the rows of the *original* tensor that belong to this module, or None for all of it.
        transform: as in ``OriginalRef``.
    """

    component: str
    module: str
    rows: Rows | None = None
    transform: str | None = None
