"""What readers and writers know about the base model: module tables per component and the architecture.

The module names of a component come from the caller (``modules=``, taken from a concrete model) or, when absent,
from the architecture tables in ``lorakit.arch``; the original-checkpoint names (SDXL LDM, FLUX BFL, SD3) come from
``lorakit.arch`` name maps. Everything else in ``dialects`` asks this object, so a reader never guesses a name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lorakit.errors import AdapterError
from lorakit.formats.dialects import archmaps
from lorakit.formats.dialects.names import ComponentNames, ModuleShapes

__all__ = ["DENOISERS", "KOHYA_PREFIXES", "ModelInfo"]

DENOISERS = ("unet", "transformer")

KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
"""kohya's component prefixes (none is a prefix of another). ``lora_transformer_`` is the kohya-style spelling some
FLUX trainers use with diffusers' (split) module names."""

# kohya's text-encoder prefix -> diffusers component. Only FLUX differs: its T5 is kohya's te3 (beside CLIP-L as te1)
# but diffusers' text_encoder_2. Reading accepts every prefix whatever the architecture, so a wrong guess of it
# cannot drop an encoder.
_TE_READ = {
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}
_TE_READ_FLUX = {**_TE_READ, "lora_te3_": "text_encoder_2"}
_TE_WRITE = {
    None: {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
    "flux": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"},
    "sd1": {"text_encoder": "lora_te_"},
    "sd2": {"text_encoder": "lora_te_"},
}


_SHARED_NAMES: dict[tuple[int, str, bool], tuple[ModuleShapes, ComponentNames]] = {}


def _build_names(component: str, table: ModuleShapes, write_foreign: bool) -> ComponentNames:
    foreign = archmaps.foreign_names(component, table)
    return ComponentNames(component, table, foreign, write_foreign=write_foreign)


@dataclass
class ModelInfo:
    """The base model as far as the file's dialect needs it.

    Attributes:
        modules: component -> module table given by the caller (take precedence over the architecture's tables).
        arch: the architecture family (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3``) or None.
        variant: the released model whose tables to use (``flux-schnell``); None means the family's default.
    """

    modules: Mapping[str, ModuleShapes] = field(default_factory=dict)
    arch: str | None = None
    variant: str | None = None
    _cache: dict[tuple[str, bool], ComponentNames | None] = field(default_factory=dict, repr=False)

    def table(self, component: str) -> ModuleShapes | None:
        """The module table of ``component``: the caller's, else the architecture's, else None."""
        if component in self.modules:
            return self.modules[component]
        return archmaps.module_table(self.variant or self.arch, component)

    def names(self, component: str, *, write_foreign: bool = False) -> ComponentNames | None:
        """The spellings index of ``component``, or None when its modules are unknown."""
        key = (component, write_foreign)
        if key not in self._cache:
            table = self.table(component)
            if table is None:
                self._cache[key] = None
            elif isinstance(table, MappingProxyType):
                # a bundled table (read-only, one object per table): its index is built once per process
                shared = _SHARED_NAMES.get((id(table), *key))
                if shared is None or shared[0] is not table:
                    shared = (table, _build_names(component, table, write_foreign))
                    _SHARED_NAMES[(id(table), *key)] = shared
                self._cache[key] = shared[1]
            else:
                self._cache[key] = _build_names(component, table, write_foreign)
        return self._cache[key]

    def denoiser(self) -> str:
        """``unet`` for SD 1/2/XL, ``transformer`` for FLUX and SD3 (or whichever the caller's tables hold)."""
        if self.arch in ("flux", "sd3"):
            return "transformer"
        if self.arch in ("sd1", "sd2", "sdxl"):
            return "unet"
        return "transformer" if "transformer" in self.modules and "unet" not in self.modules else "unet"

    def kohya_component(self, prefix: str) -> str | None:
        """The diffusers component of a kohya prefix (``lora_te2_`` -> ``text_encoder_2``), None if it has none."""
        if prefix == "lora_unet_":
            return self.denoiser()
        if prefix == "lora_transformer_":
            return "transformer"
        return (_TE_READ_FLUX if self.arch == "flux" else _TE_READ).get(prefix)

    def kohya_prefix(self, component: str, components: set[str]) -> str:
        """The kohya prefix writers use for ``component`` (``lora_te_`` for a single encoder, else ``lora_te1_``...).

        Args:
            component: the component to spell.
            components: every component the file holds (with no architecture, one encoder means ``lora_te_``).

        Raises:
            AdapterError: the architecture has no such encoder.
        """
        if component in DENOISERS:
            return "lora_unet_"
        if self.arch is None and component == "text_encoder":
            several = bool(components & {"text_encoder_2", "text_encoder_3"}) or "text_encoder_2" in self.modules
            return "lora_te1_" if several else "lora_te_"
        prefix = _TE_WRITE.get(self.arch, _TE_WRITE[None]).get(component)
        if prefix is None:
            raise AdapterError(f"{self.arch} has no {component}, so kohya has no prefix for it; pass the right arch=")
        return prefix
