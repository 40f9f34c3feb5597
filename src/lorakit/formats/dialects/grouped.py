"""Reading and writing the dialects whose keys are ``<module><sep><suffix>`` with LyCORIS suffixes.

kohya (``lora_unet_down_blocks_0...lora_up.weight``), standalone LyCORIS (``lycoris_...``) and ComfyUI
(``diffusion_model.input_blocks.1.1.proj_in.lora_up.weight``) differ only in how the module part is spelled; this
module does the rest: grouping a module's tensors, finding the modules they stand for, splitting fused weights into
their parts, and the reverse on writing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from lorakit.core.patches import Ia3Patch, Patch
from lorakit.errors import AdapterError, FileFormatError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.dialects.context import ModelInfo
from lorakit.formats.dialects.fused import fuse_patches, split_patch, swap_halves
from lorakit.formats.dialects.kinds import delta_shape, patch_from_parts, patch_to_parts, split_suffix
from lorakit.formats.dialects.names import SWAP_HALVES, ComponentNames, ModuleShapes, Part, Spelling

__all__ = ["MisfitError", "ReadOutcome", "place_patch", "read_grouped", "write_grouped"]

Locate = Callable[[str], tuple[str, str] | None]
"""Module part of a key -> (component, spelled module name), or None when the prefix is not this dialect's."""


@dataclass
class ReadOutcome:
    """What a dialect reader made of its keys."""

    patches: dict[Target, Patch] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)
    """Key -> why it could not be placed."""


class MisfitError(FileFormatError):
    """A patch whose shape does not fit the module it names (a LoRA for another model); readers report its keys."""


def _check_fit(component: str, parts: tuple[Part, ...], patch: Patch, table: ModuleShapes | None) -> None:
    """Refuse a patch that cannot fit the named weight (before a split would index out of range).

    Raises:
        MisfitError: the delta's rows or size differ from the module table's weight.
    """
    if table is None or any(p.module not in table for p in parts):
        return
    first = tuple(table[parts[0].module])
    rows = parts[-1].rows[1] if parts[-1].rows else first[0]
    tail = first[1:]
    if isinstance(patch, Ia3Patch):
        size, need = patch.weight.numel(), (tail[0] if patch.on_input and tail else rows)
    else:
        shape = delta_shape(patch if patch.dora is None else dataclasses.replace(patch, dora=None))
        size, need = (int(shape[0]), math.prod(shape)), (rows, rows * math.prod(tail))
    if size != need:
        names = "+".join(p.module for p in parts)
        raise MisfitError(
            f"a {type(patch).__name__} of size {size} does not fit {component}.{names} "
            f"({need} expected): the LoRA was made for another model; pass arch= or modules= for it"
        )


def place_patch(
    component: str, parts: tuple[Part, ...], patch: Patch, table: ModuleShapes | None = None
) -> dict[Target, Patch]:
    """Targets for a patch on a spelled weight: one module, a fused weight split into its parts, or row slices.

    Args:
        component: the component.
        parts: the modules the spelled weight stands for.
        patch: the patch read.
        table: the component's module table, to check the patch fits; None skips the check.

    Raises:
        MisfitError: the patch does not fit the weight (readers turn this into unplaced keys).
        FileFormatError: a swapped-halves weight carries a kind whose rows cannot be reordered (LoKr).
    """
    _check_fit(component, parts, patch, table)
    if len(parts) == 1 and parts[0].rows is None:
        part = parts[0]
        if part.transform == SWAP_HALVES:
            swapped = swap_halves(patch)
            if swapped is None:
                raise FileFormatError(
                    f"{component}.{part.module}: a {type(patch).__name__} on a weight stored with "
                    f"its row halves swapped cannot be converted exactly"
                )
            patch = swapped
        return {Target(component, part.module): patch}
    pieces = split_patch(patch, parts)
    if pieces is not None:
        return {Target(component, part.module): piece for part, piece in zip(parts, pieces, strict=True)}
    # Kinds that do not split (LoKr): the same patch on every part, each taking its rows of the fused delta.
    return {Target(component, part.module, part.rows): patch for part in parts}


def _weight_shape(names: ComponentNames, parts: tuple[Part, ...]) -> tuple[int, ...] | None:
    first = names.modules.get(parts[0].module)
    if first is None:
        return None
    if len(parts) == 1 and parts[0].rows is None:
        return tuple(first)
    return (parts[-1].rows[1], *first[1:])


def read_grouped(tensors: Mapping[str, Tensor], info: ModelInfo, locate: Locate, *, flat_names: bool) -> ReadOutcome:
    """Read keys of a module-keyed dialect.

    Args:
        tensors: the keys this dialect claimed.
        info: module tables and architecture.
        locate: splits a key's module part into component and spelled module name.
        flat_names: module parts have no dots (kohya, LyCORIS) rather than dotted paths (ComfyUI).
    """
    outcome = ReadOutcome()
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        split = split_suffix(key, flat_module=flat_names)
        if split is None:
            outcome.unplaced[key] = "unknown tensor suffix"
            continue
        groups.setdefault(split[0], {})[split[1]] = tensor
    for module_key, parts in groups.items():
        keys = [f"{module_key}.{s}" for s in parts]
        located = locate(module_key)
        if located is None:
            outcome.unplaced.update(dict.fromkeys(keys, "unknown prefix"))
            continue
        component, spelled = located
        names = info.names(component)
        if names is None:
            outcome.unplaced.update(
                dict.fromkeys(keys, f"the {component} module names are unknown (pass arch= or modules=)")
            )
            continue
        try:
            found = names.lookup(spelled, flat_name=flat_names)
        except FileFormatError as exc:
            raise FileFormatError(f"{module_key}: {exc}") from None
        if found is None:
            outcome.unplaced.update(dict.fromkeys(keys, f"no {component} module is spelled {spelled!r}"))
            continue
        try:
            patch = patch_from_parts(parts, module_key, _weight_shape(names, found))
            outcome.patches.update(place_patch(component, found, patch, names.modules))
        except FileFormatError as exc:  # a kind lorakit cannot hold, inconsistent tensors, another model's shapes
            outcome.unplaced.update(dict.fromkeys(keys, str(exc)))
    return outcome


def _component_names(lora: LoraFile, info: ModelInfo, component: str, write_foreign: bool) -> ComponentNames:
    names = info.names(component, write_foreign=write_foreign)
    if names is not None:
        return names
    if write_foreign:
        raise AdapterError(
            f"writing {component} in this dialect needs its original module names: pass arch= "
            f"(or modules=) so lorakit knows the base model"
        )
    # No table: the LoRA's own module names are all a plain (diffusers-named) writer needs.
    own = {t.module: () for t in lora.patches if t.component == component}
    return ComponentNames(component, own)


def _group_patch(spelling: Spelling, modules: dict[str, Patch], shared: list[Patch], where: str) -> Patch:
    if shared:
        if modules or any(p is not shared[0] for p in shared):
            raise AdapterError(f"{where}: holds both a fused patch and patches on its parts; merge them first")
        return shared[0]
    if not spelling.fused:
        patch = modules[spelling.parts[0].module]
        if spelling.parts[0].transform == SWAP_HALVES:
            swapped = swap_halves(patch)
            if swapped is None:
                raise AdapterError(f"{where}: a {type(patch).__name__} cannot be stored with its row halves swapped")
            patch = swapped
        return patch
    return fuse_patches([(part, modules.get(part.module)) for part in spelling.parts])


def write_grouped(
    lora: LoraFile,
    info: ModelInfo,
    key_of: Callable[[str, str], str],
    write_foreign: Callable[[str], bool],
    *,
    clip_prefix: bool = True,
) -> dict[str, Tensor]:
    """Tensors of a module-keyed dialect.

    Args:
        lora: the LoRA to write.
        info: module tables and architecture.
        key_of: (component, spelled module name) -> the key's module part.
        write_foreign: whether a component is spelled in its original checkpoint's names (fusing q/k/v).
        clip_prefix: spell CLIP text-encoder modules with transformers 4's ``text_model.`` level.
    """
    out: dict[str, Tensor] = {}
    for component in lora.components():
        names = _component_names(lora, info, component, write_foreign(component))
        groups: dict[str, tuple[Spelling, dict[str, Patch], list[Patch]]] = {}
        for target, patch in lora.patches.items():
            if target.component != component:
                continue
            spelling = names.spell(target.module, clip_prefix=clip_prefix)
            _, modules, shared = groups.setdefault(spelling.name, (spelling, {}, []))
            if target.rows is None:
                modules[target.module] = patch
            elif spelling.fused and any(p.module == target.module and p.rows == target.rows for p in spelling.parts):
                shared.append(patch)
            else:
                raise AdapterError(
                    f"{target}: a patch on rows {target.rows} has no place in this dialect; write the "
                    f"dialect it was read from"
                )
        for name, (spelling, modules, shared) in groups.items():
            key = key_of(component, name)
            patch = _group_patch(spelling, modules, shared, key)
            for suffix, tensor in patch_to_parts(patch).items():
                out[f"{key}.{suffix}"] = tensor
    return out
