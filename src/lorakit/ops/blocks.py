"""Block weights in the "LoRA Block Weight" (LBW) notation: one multiplier per block of the base model.

A spec is a comma-separated list of numbers or a preset name. The accepted lengths, with the block id each value
belongs to (ids as ``lorakit.arch.blocks.block_of`` gives them; ``BASE`` covers every text encoder):

- SD1 / SD2, 17 values (the LoRA form): ``BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03 .. OUT11``;
  26 values: ``BASE, IN00 .. IN11, M00, OUT00 .. OUT11``.
- SDXL, 12 values: ``BASE, IN04, IN05, IN07, IN08, M00, OUT00 .. OUT05``; 20 values: ``BASE, IN00 .. IN08, M00,
  OUT00 .. OUT08``.
- FLUX, 61 values: ``CLIP, T5, IN, D00 .. D18, S00 .. S37, OUT``.

Modules in a block the chosen form has no value for (the UNet's time embedding, its final norm and conv, blocks the
short forms leave out) keep multiplier 1.

Presets (``ALL``, ``NONE``, ``INS``, ``IND``, ``INALL``, ``MIDD``, ``OUTD``, ``OUTS``, ``OUTALL``, ``ALL0.5``) are the
17-value lists the LBW extension ships for SD1 / SD2:

    ALL    1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1     NONE   1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
    INS    1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0     IND    1,0,0,1,1,0,0,0,0,0,0,0,0,0,0,0,0
    INALL  1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0     MIDD   1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
    OUTD   1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0     OUTS   1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
    OUTALL 1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1     ALL0.5 0.5 everywhere

For SDXL (not written down by the extension; lorakit's choice, the same shallow / deep split on the 12-value form):
``INS`` = BASE, IN04, IN05; ``IND`` = BASE, IN07, IN08; ``INALL`` = BASE, IN04 .. IN08; ``MIDD`` = BASE, IN07, IN08,
M00, OUT00 .. OUT02; ``OUTD`` = BASE, OUT00 .. OUT02; ``OUTS`` = BASE, OUT03 .. OUT05; ``OUTALL`` = BASE, OUT00 ..
OUT05. For FLUX only ``ALL``, ``NONE`` (text encoders 1, the rest 0) and ``ALL0.5``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lorakit.arch import arch_of, block_of
from lorakit.errors import ConfigError
from lorakit.formats.canonical import Target

__all__ = ["BlockWeights", "block_forms", "parse_block_weights"]


def _ids(prefix: str, numbers: range) -> list[str]:
    return [f"{prefix}{n:02d}" for n in numbers]


_SD_FORMS = {
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", range(3, 12))],
    26: ["BASE", *_ids("IN", range(12)), "M00", *_ids("OUT", range(12))],
}
_SDXL_FORMS = {
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", range(6))],
    20: ["BASE", *_ids("IN", range(9)), "M00", *_ids("OUT", range(9))],
}
_FLUX_FORMS = {61: ["CLIP", "T5", "IN", *_ids("D", range(19)), *_ids("S", range(38)), "OUT"]}
_FORMS = {"sd1": _SD_FORMS, "sd2": _SD_FORMS, "sdxl": _SDXL_FORMS, "flux": _FLUX_FORMS}

_SD_PRESETS = {
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "NONE": "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}
_SDXL_PRESETS = {
    "ALL": ",".join(["1"] * 12),
    "NONE": "1" + ",0" * 11,
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 12),
}
_FLUX_PRESETS = {"ALL": ",".join(["1"] * 61), "NONE": "1,1" + ",0" * 59, "ALL0.5": ",".join(["0.5"] * 61)}
_PRESETS = {"sd1": _SD_PRESETS, "sd2": _SD_PRESETS, "sdxl": _SDXL_PRESETS, "flux": _FLUX_PRESETS}


@dataclass(frozen=True)
class BlockWeights:
    """A multiplier per block id, parsed from an LBW spec.

    Attributes:
        arch: the architecture family the spec is for.
        spec: the spec as given.
        weights: block id -> multiplier, for the ids of the form used; other ids keep 1.
    """

    arch: str
    spec: str
    weights: Mapping[str, float]

    def block_multiplier(self, block: str) -> float:
        """The multiplier of one block id (1 for ids the form has no value for)."""
        return float(self.weights.get(block, 1.0))

    def multiplier(self, target: Target) -> float:
        """The multiplier of one LoRA target, through the block its module lives in.

        Raises:
            ConfigError: the target's module is not a module of the architecture (block weights need a known model).
        """
        try:
            block = block_of(self.arch, target.component, target.module)
        except KeyError:
            raise ConfigError(
                f"--blocks: {target} is not a module of {self.arch}, so it has no block; drop --blocks "
                f"for LoRAs of custom models"
            ) from None
        return self.block_multiplier(block)

    def __call__(self, target: Target) -> float:
        return self.multiplier(target)


def block_forms(arch: str) -> dict[int, list[str]]:
    """The accepted value counts of an architecture and the block ids they cover, in order."""
    family = arch_of(arch)
    if family not in _FORMS:
        raise ConfigError(f"--blocks: no block-weight notation for {family}; it exists for sd1, sd2, sdxl and flux")
    return {n: list(ids) for n, ids in _FORMS[family].items()}


def parse_block_weights(spec: str, arch: str) -> BlockWeights:
    """Parse an LBW spec (numbers or a preset name) for an architecture.

    Args:
        spec: ``"1,0,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0"`` or a preset such as ``MIDD`` (case-insensitive).
        arch: architecture or variant (``sd1``, ``sdxl``, ``flux-schnell``...).

    Returns:
        The block weights; call ``multiplier(target)`` per LoRA target.

    Raises:
        ConfigError: a value is not a number, the count fits no form (the message lists the accepted counts), an
            unknown preset, or an architecture without a notation.
    """
    forms = block_forms(arch)
    family = arch_of(arch)
    text = spec.strip()
    presets = _PRESETS[family]
    if text.upper() in presets:
        text = presets[text.upper()]
    elif text and text[0].isalpha():
        raise ConfigError(
            f"--blocks: unknown preset {spec!r} for {family}; known: {', '.join(presets)}, or give "
            f"{_counts(forms)} numbers"
        )
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--blocks: {spec!r} is not a list of numbers separated by commas") from None
    if len(values) not in forms:
        raise ConfigError(
            f"--blocks: {len(values)} values given; {family} takes {_counts(forms)} values "
            f"({'; '.join(f'{n}: {ids[0]}, {ids[1]} .. {ids[-1]}' for n, ids in forms.items())})"
        )
    return BlockWeights(family, spec, dict(zip(forms[len(values)], values, strict=True)))


def _counts(forms: Mapping[int, list[str]]) -> str:
    return " or ".join(str(n) for n in forms)
