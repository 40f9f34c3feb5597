"""Module tables of the known base models: every module with a weight, its kind and weight shape.

The tables are generated data (``data/<table>.json.gz``, written by ``scripts/make_arch_tables.py`` from the real
diffusers / transformers classes built on the meta device), so reading them needs neither library: this module uses
the standard library only and loads a table the first time it is asked for.

Naming: diffusers module names for UNets and transformers (``down_blocks.0.attentions.0.proj_in``), transformers names
for text encoders in the transformers 4 form, with the ``text_model.`` level
(``text_model.encoder.layers.0.self_attn.q_proj``). transformers 5's ``CLIPTextModel`` drops that level while the
files people have keep it; ``normalize_module_name`` accepts either and returns the table form, ``to_runtime_name``
goes back to what a transformers 5 model calls the module.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

from lorakit.arch.registry import ARCHS, TABLES, VARIANTS, resolve_variant, table_name

__all__ = [
    "ARCHS",
    "ModuleInfo",
    "block_of",
    "components",
    "load_config",
    "module_info",
    "module_kind",
    "module_table",
    "normalize_module_name",
    "parameter_count",
    "table_info",
    "to_runtime_name",
]

_CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm")
"""First name parts of a CLIP text model below ``text_model.`` (a T5 ``encoder.`` is not one: see ``_is_clip``)."""


@dataclass(frozen=True)
class ModuleInfo:
    """One module of a base model.

    Attributes:
        shape: the weight shape (Linear ``(out, in)``, Conv2d ``(out, in, kh, kw)``, norm ``(channels,)``, embedding
            ``(num, dim)``).
        kind: ``linear``, ``conv``, ``norm``, ``embedding`` or ``other``.
        bias: whether the module has a bias (of shape ``(shape[0],)``).
    """

    shape: tuple[int, ...]
    kind: str
    bias: bool

    @property
    def parameter_count(self) -> int:
        """Weight plus bias elements."""
        return math.prod(self.shape) + (self.shape[0] if self.bias else 0)


@functools.cache
def table_info(table: str) -> Mapping[str, ModuleInfo]:
    """All modules of one bundled table by name (read-only, in the model's ``named_modules`` order).

    Raises:
        KeyError: no such table.
    """
    if table not in TABLES:
        raise KeyError(f"unknown module table {table!r}; known: {', '.join(TABLES)}")
    raw = resources.files("lorakit.arch").joinpath("data", f"{table}.json.gz").read_bytes()
    payload = json.loads(gzip.decompress(raw))
    modules = {name: ModuleInfo(tuple(shape), kind, bool(bias)) for name, kind, shape, bias in payload["modules"]}
    return MappingProxyType(modules)


def components(arch: str) -> list[str]:
    """The components of an architecture or variant, in pipeline order (``["unet", "text_encoder"]`` for sd1)."""
    return list(VARIANTS[resolve_variant(arch)].components)


def module_info(arch: str, component: str) -> Mapping[str, ModuleInfo]:
    """Modules of one component of an architecture (its default variant) or of a variant, as ``ModuleInfo``."""
    return table_info(table_name(arch, component))


@functools.cache
def _shape_table(table: str) -> Mapping[str, tuple[int, ...]]:
    return MappingProxyType({name: info.shape for name, info in table_info(table).items()})


def module_table(arch: str, component: str) -> Mapping[str, tuple[int, ...]]:
    """Module name (without ``.weight``) -> weight shape, for every module with a weight.

    Args:
        arch: an architecture (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3``: its default variant) or a variant
            (``flux-schnell``, ``sd3.5-large``...).
        component: ``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2`` or ``text_encoder_3``.

    Returns:
        A read-only mapping, cached: ``module_table("sd1", "unet")["conv_in"] == (320, 4, 3, 3)``.

    Raises:
        KeyError: unknown architecture or component.
    """
    return _shape_table(table_name(arch, component))


def module_kind(arch: str, component: str, module: str) -> str:
    """``linear``, ``conv``, ``norm``, ``embedding`` or ``other`` for one module.

    Raises:
        KeyError: the module is not in the table.
    """
    return module_info(arch, component)[module].kind


def parameter_count(arch: str, component: str) -> int:
    """Parameters of the modules in a table (weights and biases; buffers such as SD3's ``pos_embed`` excluded).

    Tied weights count twice: T5's ``encoder.embed_tokens`` shares ``shared``.
    """
    return sum(info.parameter_count for info in module_info(arch, component).values())


def _is_clip(arch: str, component: str) -> bool:
    return TABLES[table_name(arch, component)].class_name.startswith("CLIPTextModel")


def normalize_module_name(arch: str, component: str, module: str) -> str:
    """A module name in either transformers naming -> the table's (transformers 4) form.

    ``encoder.layers.0.mlp.fc1`` (transformers 5 ``CLIPTextModel``) and ``text_model.encoder.layers.0.mlp.fc1`` both
    give the latter. Names of other components come back unchanged.
    """
    if _is_clip(arch, component) and module.startswith(_CLIP_TOP):
        return "text_model." + module
    return module


def to_runtime_name(arch: str, component: str, module: str, *, has_text_model: bool | None = None) -> str:
    """A table name -> the name in a live transformers model.

    Args:
        arch: architecture or variant.
        component: the component.
        module: a table (transformers 4 form) name.
        has_text_model: whether the live CLIP model has a ``text_model`` submodule. None: as in transformers 5,
            where ``CLIPTextModelWithProjection`` keeps the level and ``CLIPTextModel`` drops it.
    """
    if not _is_clip(arch, component) or not module.startswith("text_model."):
        return module
    if has_text_model is None:
        has_text_model = TABLES[table_name(arch, component)].class_name == "CLIPTextModelWithProjection"
    return module if has_text_model else module[len("text_model.") :]


def load_config(arch: str, component: str) -> dict:
    """The bundled config the table was built from (a fresh dict: diffusers ``from_config`` / transformers kwargs).

    Diffusers configs carry ``_class_name``; transformers configs carry ``architectures`` and ``model_type``.
    """
    table = table_name(arch, component)
    text = resources.files("lorakit.arch").joinpath("configs", f"{table}.json").read_text()
    return json.loads(text)


def block_of(arch: str, component: str, module: str) -> str:
    """The block id of a module (``IN04``, ``M00``, ``D07``...); see ``lorakit.arch.blocks`` for the notation."""
    from lorakit.arch.blocks import block_of as _block_of  # blocks builds on names, which builds on this module

    return _block_of(arch, component, module)
