"""Knowledge of base models: module tables, name maps, block ids and architecture detection.

Standard library only (no torch, diffusers or transformers at run time): the tables are bundled generated data,
loaded on first use.

- ``tables``: ``module_table(arch, component)`` -> module name -> weight shape; kinds, parameter counts, configs.
- ``names``: ``to_original`` / ``from_original`` between diffusers names and single-file checkpoint names.
- ``blocks``: ``block_of(arch, component, module)`` -> block id (``IN04``, ``D07``...).
- ``detect``: ``detect(keys_shapes, metadata)`` -> which base model a file is for.
"""

from lorakit.arch.blocks import block_ids, block_of
from lorakit.arch.detect import Detection, detect, detect_arch
from lorakit.arch.names import checkpoint_prefix, from_original, original_map, reverse_map, to_original
from lorakit.arch.refs import DiffusersRef, OriginalRef
from lorakit.arch.registry import ARCHS, DEFAULT_VARIANT, VARIANTS, arch_of, resolve_variant
from lorakit.arch.tables import (
    ModuleInfo,
    components,
    load_config,
    module_info,
    module_kind,
    module_table,
    normalize_module_name,
    parameter_count,
    to_runtime_name,
)

__all__ = [
    "ARCHS",
    "DEFAULT_VARIANT",
    "VARIANTS",
    "Detection",
    "DiffusersRef",
    "ModuleInfo",
    "OriginalRef",
    "arch_of",
    "block_ids",
    "block_of",
    "checkpoint_prefix",
    "components",
    "detect",
    "detect_arch",
    "from_original",
    "load_config",
    "module_info",
    "module_kind",
    "module_table",
    "normalize_module_name",
    "original_map",
    "parameter_count",
    "resolve_variant",
    "reverse_map",
    "to_original",
    "to_runtime_name",
]
