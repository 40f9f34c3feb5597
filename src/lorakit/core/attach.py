"""Finding layers and attaching named adapters to any nn.Module.

handle = attach_lora(model, LoraConfig(rank=8, targets=["to_q", "to_v"]), name="style")
handle.set_weight(0.7)          # one float: O(1), nothing rebuilt
with adapters_disabled(model):  # the base model's output
    ...
detach(model)                   # the original modules back, bit for bit
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from lorakit.core.adapters import Adapter, AdapterState, LoraAdapter, PatchAdapter
from lorakit.core.config import LoraConfig
from lorakit.core.layer import SUPPORTED_LAYERS, AdaptedLayer
from lorakit.core.patches import LoraPatch, Patch
from lorakit.errors import AdapterError, ShapeError, TargetError

__all__ = ["adapted_layers", "match_modules", "plain_name", "replace_module"]

_REGISTRY = "_lorakit_adapters"


def plain_name(name: str) -> str:
    """A module name as it was before wrapping (``x.base_layer`` -> ``x``)."""
    return name.replace(".base_layer", "")


def _matches(name: str, pattern: str | Sequence[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def match_modules(
    model: nn.Module,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None = None,
    *,
    kinds: tuple[type, ...] = SUPPORTED_LAYERS,
    allow_missing: bool = False,
) -> list[str]:
    """Names of the modules of ``kinds`` that match ``targets`` and not ``exclude``.

    A string is a regex matched against the full module name; a list matches exact names or dotted suffixes.

    Raises:
        TargetError: nothing matched, or (for a list, unless ``allow_missing``) one entry matched nothing.
    """
    names = [
        plain_name(n)
        for n, m in model.named_modules()
        if isinstance(m, kinds) and not isinstance(m, AdaptedLayer) and ".adapters." not in n
    ]
    found = [n for n in names if _matches(n, targets) and not (exclude and _matches(n, exclude))]
    kind_names = "/".join(k.__name__ for k in kinds)
    if not found:
        sample = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise TargetError(
            f"targets {targets!r} match no {kind_names} module of {type(model).__name__} "
            f"({len(names)} candidates, e.g. {sample or 'none'}); check the names or the regex"
        )
    if not isinstance(targets, str) and not allow_missing:
        missing = [p for p in targets if not any(n == p or n.endswith("." + p) for n in found)]
        if missing:
            raise TargetError(
                f"target entries {missing} match no {kind_names} module of {type(model).__name__}; "
                f"fix them or pass allow_missing=True"
            )
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """Every wrapped layer with its plain (pre-wrapping) name."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield plain_name(name), module


def registry(model: nn.Module) -> dict[str, AdapterState]:
    """The named adapters of a model (shared states), created on first use."""
    reg = model.__dict__.get(_REGISTRY)
    if reg is None:
        reg = {}
        model.__dict__[_REGISTRY] = reg
    return reg


def wrap(model: nn.Module, name: str) -> AdaptedLayer:
    """The AdaptedLayer at ``name``, wrapping the plain layer there on first use."""
    module = model.get_submodule(name)
    if isinstance(module, AdaptedLayer):
        return module
    layer = AdaptedLayer(module)
    replace_module(model, name, layer)
    return layer


def check_adapter_name(name: str) -> None:
    """Refuse a name that cannot key the layers' ``nn.ModuleDict`` (empty, dotted, or a Module attribute)."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise AdapterError(
            f"{name!r} cannot name an adapter: use a non-empty name without dots that is not an "
            f"nn.Module attribute (such as 'train' or 'to'), e.g. 'style' or 'lora_1'"
        )


def new_state(model: nn.Module, name: str, weight: float, replace: bool) -> AdapterState:
    check_adapter_name(name)
    reg = registry(model)
    if name in reg and not replace:
        raise AdapterError(
            f"adapter {name!r} is already attached to this model; remove it first or choose another name"
        )
    if name in reg:
        remove_adapter(model, name)
    state = AdapterState(name, weight)
    reg[name] = state
    return state


def remove_adapter(model: nn.Module, name: str) -> None:
    """Remove one adapter from every layer; a layer left with none goes back to the original module."""
    reg = registry(model)
    if name not in reg:
        raise AdapterError(f"no adapter named {name!r} on this model (attached: {sorted(reg) or 'none'})")
    for layer_name, layer in list(adapted_layers(model)):
        if name in layer.adapters:
            layer.remove(name)
        if not layer.adapters:
            layer.unfuse()
            replace_module(model, layer_name, layer.base_layer)
    del reg[name]


def check_lora_fits(layer: nn.Module, patch: LoraPatch, where: str) -> None:
    """Refuse a LoRA whose factors do not fit ``layer`` (names the module and both shapes)."""
    weight_shape = tuple(layer.weight.shape)
    out_f, in_f, *kernel = weight_shape
    down_ok = patch.down.shape[1] == in_f and (
        patch.mid is not None or tuple(patch.down.shape[2:]) in (tuple(kernel), ()) or not kernel
    )
    if patch.up.shape[0] != out_f or not down_ok or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
        raise ShapeError(
            f"adapter for {where}: up {tuple(patch.up.shape)} / down {tuple(patch.down.shape)} do not "
            f"fit the layer's weight {weight_shape}; the LoRA was made for another model"
        )


def check_patch_fits(layer: nn.Module, patch: Patch, where: str) -> None:
    """Refuse any patch whose effect cannot be applied to ``layer``'s weight, computed on the meta device."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ShapeError(f"adapter for {where}: the module {type(layer).__name__} has no weight to patch")
    if isinstance(patch, LoraPatch) and isinstance(layer, SUPPORTED_LAYERS):
        check_lora_fits(layer, patch, where)
    meta = patch.to("meta")
    try:
        effect = meta.effect(weight.to("meta"))
    except (RuntimeError, ShapeError) as err:
        raise ShapeError(f"adapter for {where}: {err}; the layer's weight is {tuple(weight.shape)}") from None
    if tuple(effect.shape) != tuple(weight.shape):
        raise ShapeError(
            f"adapter for {where}: delta {tuple(effect.shape)} does not fit the weight {tuple(weight.shape)}"
        )
    db = meta.bias_effect()
    bias = getattr(layer, "bias", None)
    if db is not None and (bias is None or db.numel() != bias.numel()):
        raise ShapeError(
            f"adapter for {where}: a bias difference of {db.numel()} values for a layer with "
            f"{'no bias' if bias is None else f'{bias.numel()} bias values'}"
        )


def adapter_for(state: AdapterState, patch: Patch) -> Adapter:
    """The module that carries ``patch``: a low-rank LoRA path where possible, else the weight path."""
    if isinstance(patch, LoraPatch) and patch.dora is None:
        return LoraAdapter.from_patch(state, patch)
    return PatchAdapter(state, patch)


def fresh_lora(state: AdapterState, layer: nn.Module, config: LoraConfig) -> Adapter | None:
    kernel = math.prod(layer.weight.shape[2:])
    rank_alpha = config.rank_alpha(kernel)
    if rank_alpha is None:
        return None
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return None
    rank, alpha = rank_alpha
    return LoraAdapter.fresh(
        state, layer, rank, alpha, dropout=config.dropout, use_rslora=config.use_rslora, tucker=config.conv_tucker
    )


def patches_to_layers(model: nn.Module, patches: Mapping[str, Patch], strict: bool) -> tuple[dict, list[str]]:
    """Pair patch targets with modules; returns ({name: module}, unmatched target names)."""
    modules = dict(model.named_modules())
    paired, unmatched = {}, []
    for target in patches:
        module = modules.get(target)
        if module is None:
            module = modules.get(target + ".base_layer")
        if isinstance(module, AdaptedLayer):
            module = module.base_layer
        if module is None:
            unmatched.append(target)
        else:
            paired[target] = module
    if unmatched and strict:
        shown = ", ".join(unmatched[:8]) + (f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else "")
        raise TargetError(
            f"{len(unmatched)} of {len(patches)} adapter targets are not modules of "
            f"{type(model).__name__}: {shown}; pass strict=False to apply the rest"
        )
    return paired, unmatched
