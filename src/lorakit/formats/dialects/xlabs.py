"""XLabs FLUX LoRAs (x-flux): ``double_blocks.N.processor.qkv_lora1.down.weight`` and friends, no alpha.

x-flux adds LoRA processors beside the BFL weights: in double block ``N``, ``qkv_lora1`` / ``proj_lora1`` act on the
image stream's ``img_attn.qkv`` / ``img_attn.proj`` and ``qkv_lora2`` / ``proj_lora2`` on the text stream's
``txt_attn``; in single block ``N``, ``qkv_lora`` adds to the q, k and v rows of ``linear1`` (not its MLP rows) and
``proj_lora`` to ``linear2``. Its ``LoRALinearLayer`` scales by ``network_alpha / rank``, which the files do not store:
scale 1, as x-flux and diffusers load them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from lorakit.core.patches import LoraPatch
from lorakit.errors import FileFormatError, ShapeError
from lorakit.formats.dialects.context import ModelInfo
from lorakit.formats.dialects.grouped import ReadOutcome, place_patch

__all__ = ["claims_xlabs", "read_xlabs"]

_KEY = re.compile(
    r"(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\."
    r"(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)\.(down|up)\.weight"
)
_TARGET = {
    ("double_blocks", "qkv_lora1"): "img_attn.qkv",
    ("double_blocks", "proj_lora1"): "img_attn.proj",
    ("double_blocks", "qkv_lora2"): "txt_attn.qkv",
    ("double_blocks", "proj_lora2"): "txt_attn.proj",
    ("single_blocks", "qkv_lora"): "linear1",
    ("single_blocks", "proj_lora"): "linear2",
}


def claims_xlabs(key: str) -> bool:
    """Whether a key is an XLabs processor LoRA's."""
    return ".processor.qkv_lora" in key or ".processor.proj_lora" in key


def read_xlabs(tensors: Mapping[str, Tensor], info: ModelInfo) -> ReadOutcome:
    """Read XLabs keys onto the diffusers FLUX transformer (q/k/v split exactly)."""
    outcome = ReadOutcome()
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        target = _TARGET.get((m.group(1), m.group(3))) if m else None
        if m is None or target is None:
            outcome.unplaced[key] = "not an XLabs FLUX processor key"
            continue
        groups.setdefault(f"{m.group(1)}.{m.group(2)}.{target}", {})[m.group(4)] = (key, tensor)
    names = info.names("transformer")
    for original, sides in groups.items():
        keys = [k for k, _ in sides.values()]
        if set(sides) != {"down", "up"}:
            outcome.unplaced.update(dict.fromkeys(keys, "down or up missing"))
            continue
        found = names.lookup(original, flat_name=False) if names is not None else None
        if found is None:
            why = (
                "the FLUX transformer's modules are unknown (pass arch='flux' or modules=)"
                if names is None
                else f"no FLUX module {original!r}"
            )
            outcome.unplaced.update(dict.fromkeys(keys, why))
            continue
        up, down = sides["up"][1], sides["down"][1]
        # qkv_lora on a single block covers linear1's q, k and v rows only: drop the MLP part.
        found = tuple(p for p in found if p.rows is None or p.rows[1] <= up.shape[0])
        try:
            patch = LoraPatch(up=up, down=down)
            outcome.patches.update(place_patch("transformer", found, patch, names.modules))
        except (ShapeError, FileFormatError) as exc:  # inconsistent tensors or another model's shapes
            outcome.unplaced.update(dict.fromkeys(keys, f"{original}: {exc}"))
    return outcome
