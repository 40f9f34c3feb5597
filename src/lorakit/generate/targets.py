"""Place canonical LoRA targets on the modules of live pipeline components.

Two gaps between a LoRA's targets and a running model are closed here: transformers 5's ``CLIPTextModel`` has no
``text_model.`` level in its module names while LoRA files (made with transformers 4) have it, and a target may cover
only some output rows of a weight (a fused ``qkv`` the reader could not split because the base model was unknown):
the row targets of one module are stacked into one exact patch on the whole weight (zero rows where none is given).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from lorakit.core.patches import Patch
from lorakit.formats.canonical import Target
from lorakit.formats.dialects.fused import fuse_patches
from lorakit.formats.dialects.names import Part

__all__ = ["place_targets", "runtime_name"]

_CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm")


def runtime_name(module: str, model: nn.Module, names: Mapping[str, nn.Module]) -> str | None:
    """The name of ``module`` in the live ``model`` (either CLIP naming accepted), or None if it has no such module."""
    if module in names:
        return module
    if module.startswith("text_model.") and module[len("text_model.") :] in names:
        return module[len("text_model.") :]
    if module.startswith(_CLIP_TOP) and f"text_model.{module}" in names:
        return f"text_model.{module}"
    return None


def _plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module names as the model had them before adapters were attached (no wrapper internals)."""
    return {n: m for n, m in model.named_modules() if not n.endswith(".base_layer") and ".adapters." not in n}


def _out_rows(module: nn.Module) -> int:
    base = getattr(module, "base_layer", module)
    return int(base.weight.shape[0])


def _stack_rows(items: list[tuple[Target, Patch]], total: int) -> Patch:
    """One patch on a whole weight from patches on row ranges of it; gaps are zero rows."""
    parts: list[tuple[Part, Patch | None]] = []
    cursor = 0
    for target, patch in sorted(items, key=lambda item: item[0].rows):
        start, stop = target.rows
        if start > cursor:
            parts.append((Part("", (cursor, start)), None))
        parts.append((Part(target.module, (start, stop)), patch))
        cursor = stop
    if cursor < total:
        parts.append((Part("", (cursor, total)), None))
    return fuse_patches(parts)


def place_targets(
    patches: Mapping[Target, Patch], components: Mapping[str, nn.Module]
) -> tuple[dict[str, dict[str, tuple[Target, Patch]]], list[str]]:
    """Pair each target with a live module.

    Args:
        patches: the LoRA's patches by canonical target.
        components: diffusers component name -> live module.

    Returns:
        ``(placed, unmatched)``: component -> runtime module name -> (target, patch), and the targets that match no
        module (``component.module`` strings; row targets that do not tile a weight count as unmatched).
    """
    placed: dict[str, dict[str, tuple[Target, Patch]]] = {}
    sliced: dict[tuple[str, str], list[tuple[Target, Patch]]] = {}
    unmatched: list[str] = []
    names_of = {c: _plain_modules(m) for c, m in components.items()}
    for target, patch in patches.items():
        names = names_of.get(target.component)
        live = None if names is None else runtime_name(target.module, components[target.component], names)
        if live is None:
            unmatched.append(str(target))
        elif target.rows is None:
            placed.setdefault(target.component, {})[live] = (target, patch)
        else:
            sliced.setdefault((target.component, live), []).append((target, patch))
    for (component, live), items in sliced.items():
        total = _out_rows(names_of[component][live])
        rows = sorted(t.rows for t, _ in items)
        overlapping = any(a[1] > b[0] for a, b in zip(rows, rows[1:], strict=False)) or rows[-1][1] > total
        if overlapping:
            unmatched.extend(str(t) for t, _ in items)
            continue
        whole = Target(component, items[0][0].module)
        placed.setdefault(component, {})[live] = (whole, _stack_rows(items, total))
    return placed, unmatched
