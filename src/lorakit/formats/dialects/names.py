"""Every spelling a LoRA file may use for the modules of one component, built forward from the known names.

kohya flattens a module path by replacing each ``.`` with ``_``; module names contain ``_`` themselves
(``transformer_blocks``, ``to_q``), so the flat name cannot be turned back by string rules. Instead the flat name of
every known module is computed and looked up. The same index holds the other spellings of a module: the
``text_model.`` level that transformers 4 had in CLIP text encoders (and real files still carry), and the names of the
original checkpoints (SDXL's LDM UNet, FLUX's BFL transformer with fused ``qkv`` weights) that the architecture tables
map onto diffusers names, each with the output rows it covers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lorakit.errors import AdapterError, FileFormatError

__all__ = [
    "SWAP_HALVES",
    "ComponentNames",
    "ForeignMap",
    "ModuleShapes",
    "Part",
    "Spelling",
    "clip_spellings",
    "flat",
    "is_clip_encoder",
]

ModuleShapes = Mapping[str, tuple[int, ...]]
"""diffusers module name (no ``.weight``) -> weight shape, for one component."""

ForeignMap = Mapping[str, Sequence["Part"]]
"""Original-checkpoint module name -> the diffusers modules its weight stacks, in row order (one for a plain rename)."""

CLIP_PREFIX = "text_model."
_CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm")
"""First parts of CLIP text-model names below ``text_model.`` (``text_projection`` sits beside it, not below)."""


def clip_spellings(name: str) -> tuple[str, str] | None:
    """A CLIP module name with and without transformers 4's ``text_model.`` level, or None if it has no such level."""
    bare = name.removeprefix(CLIP_PREFIX)
    return (CLIP_PREFIX + bare, bare) if bare.startswith(_CLIP_TOP) else None


def flat(name: str) -> str:
    """kohya's spelling of a dotted module path: every ``.`` becomes ``_``."""
    return name.replace(".", "_")


def is_clip_encoder(names: Iterable[str]) -> bool:
    """Whether module names are a transformers CLIP text encoder's (which real files spell with ``text_model.``)."""
    return any(n.startswith(("encoder.layers.", "text_model.encoder.layers.")) for n in names)


SWAP_HALVES = "swap_halves"
"""The original stores the module's two row halves in the other order (FLUX / SD3 final AdaLN modulation)."""


@dataclass(frozen=True)
class Part:
    """One diffusers module covered by a spelled name.

    Attributes:
        module: the diffusers module name.
        rows: the rows of the spelled (fused) weight that hold this module, or None for all of them.
        transform: None, or ``swap_halves`` when the spelled weight holds the module's row halves swapped.
    """

    module: str
    rows: tuple[int, int] | None = None
    transform: str | None = None


@dataclass(frozen=True)
class Spelling:
    """How a writer spells one diffusers module: the name, the module's place in it, and all parts of that name."""

    name: str
    parts: tuple[Part, ...]

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


_AMBIGUOUS: tuple[Part, ...] = ()


class ComponentNames:
    """Known modules of one component, looked up by any of their spellings (dotted or kohya-flat).

    Args:
        component: the component (``unet``, ``text_encoder``...).
        modules: its module table, diffusers name -> weight shape.
        foreign: original-checkpoint names -> the diffusers modules they stack, with their rows (``lorakit.arch``).
        write_foreign: writers spell modules by their ``foreign`` names (SDXL kohya, FLUX kohya) instead of diffusers'.
    """

    def __init__(
        self, component: str, modules: ModuleShapes, foreign: ForeignMap | None = None, *, write_foreign: bool = False
    ) -> None:
        self.component = component
        self.modules = dict(modules)
        self.write_foreign = write_foreign and bool(foreign)
        self._dotted: dict[str, tuple[Part, ...]] = {}
        self._flat: dict[str, tuple[Part, ...]] = {}
        self._clashes: dict[str, set[str]] = {}
        self._spelling: dict[str, Spelling] = {}
        self.clip = is_clip_encoder(self.modules)
        for name in self.modules:
            self._add(name, (Part(name),))
            spellings = clip_spellings(name) if self.clip else None
            if spellings is not None:
                # Tables and live models differ in transformers' text_model. level; files use both spellings.
                self._add(spellings[1] if name == spellings[0] else spellings[0], (Part(name),))
        for name, parts in (foreign or {}).items():
            parts = tuple(parts)
            self._add(name, parts)
            if self.write_foreign:
                for part in parts:
                    self._spelling[part.module] = Spelling(name, parts)

    def _add(self, dotted: str, parts: tuple[Part, ...]) -> None:
        self._dotted.setdefault(dotted, parts)
        key = flat(dotted)
        known = self._flat.get(key)
        if known is not None and known != parts:
            # Two different modules flatten to the same kohya name: refuse to guess between them.
            self._clashes.setdefault(key, set()).update({p.module for p in known + parts})
            self._flat[key] = _AMBIGUOUS
        elif known is None:
            self._flat[key] = parts

    def lookup(self, name: str, *, flat_name: bool) -> tuple[Part, ...] | None:
        """The parts a spelled name stands for, or None if no known module is spelled that way.

        Raises:
            FileFormatError: the flat name fits two different modules.
        """
        parts = (self._flat if flat_name else self._dotted).get(name)
        if parts is _AMBIGUOUS:
            raise FileFormatError(
                f"the {self.component} name {name!r} fits several modules "
                f"{sorted(self._clashes[name])}; the flattened name is ambiguous for this model, "
                f"so the file cannot say which one it means"
            )
        return parts

    def spell(self, module: str, *, clip_prefix: bool = True) -> Spelling:
        """How kohya-style writers name ``module``.

        Its foreign (possibly fused) name when this component writes those; else the diffusers name, with
        transformers 4's ``text_model.`` level for CLIP encoders when ``clip_prefix`` (A1111 and ComfyUI look for it).

        Raises:
            AdapterError: writing foreign names and ``module`` has none.
        """
        spelling = self._spelling.get(module)
        if spelling is not None:
            return spelling
        if self.write_foreign and module in self.modules:
            raise AdapterError(
                f"{self.component}.{module} has no name in the original checkpoint's layout, so "
                f"this dialect cannot hold it; write the diffusers dialect instead"
            )
        spellings = clip_spellings(module) if clip_prefix and self.clip else None
        return Spelling(spellings[0] if spellings else module, (Part(module),))
