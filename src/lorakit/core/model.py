"""The public face of the engine: attach named adapters to a model and steer them through a handle."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lorakit.core.adapters import LoraAdapter
from lorakit.core.attach import (
    adapted_layers,
    adapter_for,
    check_patch_fits,
    fresh_lora,
    match_modules,
    new_state,
    patches_to_layers,
    registry,
    remove_adapter,
    wrap,
)
from lorakit.core.config import LoraConfig
from lorakit.core.layer import AdaptedLayer
from lorakit.core.patches import Patch
from lorakit.errors import AdapterError

__all__ = [
    "AdapterHandle",
    "adapter_patches",
    "adapter_state_dict",
    "adapters",
    "adapters_disabled",
    "attach_lora",
    "attach_patches",
    "detach",
    "fuse",
    "load_adapter_state_dict",
    "unfuse",
]


@dataclass
class AdapterHandle:
    """One named adapter on a model: change its weight, switch it, fuse it, remove it.

    ``set_weight`` is a single assignment shared by every layer (O(1) for the whole model) while the adapter is
    dynamic; a fused adapter's layers are recomputed from the kept original weights.
    """

    model: nn.Module
    name: str
    modules: list[str] = field(default_factory=list)
    """Plain names of the modules this adapter acts on."""
    unmatched: list[str] = field(default_factory=list)
    """Targets that matched no module (only with strict=False)."""

    @property
    def _state(self):
        state = registry(self.model).get(self.name)
        if state is None:
            raise AdapterError(f"adapter {self.name!r} was removed from this model")
        return state

    @property
    def weight(self) -> float:
        return self._state.weight

    @property
    def enabled(self) -> bool:
        return self._state.enabled

    def set_weight(self, weight: float) -> None:
        """Set the strength ``s`` in ``W + s * dW``."""
        self._state.weight = float(weight)
        self._refuse_if_fused()

    def enable(self) -> None:
        self._state.enabled = True
        self._refuse_if_fused()

    def disable(self) -> None:
        self._state.enabled = False
        self._refuse_if_fused()

    def set_multipliers(self, multipliers: Mapping[str, float]) -> None:
        """Per-module factors on top of the weight (block weights); modules not named keep theirs."""
        _ = self._state  # raises AdapterError once the adapter is removed
        for name, layer in adapted_layers(self.model):
            if name in multipliers and self.name in layer.adapters:
                layer.adapters[self.name].multiplier = float(multipliers[name])
                if self.name in layer.fused:
                    layer.refuse()

    def fuse(self) -> None:
        fuse(self.model, [self.name])

    def remove(self) -> None:
        remove_adapter(self.model, self.name)

    def _refuse_if_fused(self) -> None:
        if self._state.fused_in:
            for _, layer in adapted_layers(self.model):
                if self.name in layer.fused:
                    layer.refuse()


def attach_lora(
    model: nn.Module, config: LoraConfig, name: str = "default", *, weight: float = 1.0, replace: bool = False
) -> AdapterHandle:
    """Add a new trainable LoRA to every matching Linear/Conv2d; freeze everything else.

    Only adapter parameters require grad afterwards. Returns the handle, whose ``modules`` lists what was targeted.
    """
    found = match_modules(model, config.targets, config.exclude, allow_missing=config.allow_missing)
    state = new_state(model, name, weight, replace)
    for param_name, p in model.named_parameters():
        if ".adapters." not in param_name:  # freeze the base model; other adapters keep their own setting
            p.requires_grad_(False)
    targeted = []
    for module_name in found:
        layer = model.get_submodule(module_name)
        if isinstance(layer, AdaptedLayer):  # already carries another adapter: size the new one on the base layer
            layer = layer.base_layer
        adapter = fresh_lora(state, layer, config)
        if adapter is not None:
            wrap(model, module_name).add(name, adapter)
            targeted.append(module_name)
    if not targeted:
        del registry(model)[name]
        match_modules(model, "(?!)")  # raises the "matches nothing" error with the candidates listed
    return AdapterHandle(model, name, targeted)


def attach_patches(
    model: nn.Module,
    patches: Mapping[str, Patch],
    name: str = "default",
    *,
    weight: float = 1.0,
    strict: bool = True,
    replace: bool = False,
) -> AdapterHandle:
    """Attach frozen patches (from a file, a merge...) keyed by module name.

    Every patch is checked against its layer's shapes before anything is changed. With ``strict`` (the default) a
    target that is not a module of ``model`` is an error listing them; otherwise the handle reports them.
    """
    paired, unmatched = patches_to_layers(model, patches, strict)
    for target, module in paired.items():
        check_patch_fits(module, patches[target], target)
    state = new_state(model, name, weight, replace)
    for target in paired:
        wrap(model, target).add(name, adapter_for(state, patches[target]))
    return AdapterHandle(model, name, list(paired), unmatched)


def adapters(model: nn.Module) -> dict[str, AdapterHandle]:
    """Handles for the adapters attached to ``model``, by name."""
    names: dict[str, list[str]] = {n: [] for n in registry(model)}
    for layer_name, layer in adapted_layers(model):
        for n in layer.adapters:
            names.setdefault(n, []).append(layer_name)
    return {n: AdapterHandle(model, n, mods) for n, mods in names.items()}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: dynamic adapters are switched off and fused ones unfused, then all is put back."""
    states = registry(model)
    saved = {n: s.enabled for n, s in states.items()}
    fused = {name: set(layer.fused) for name, layer in adapted_layers(model)}
    try:
        for s in states.values():
            s.enabled = False
        for _, layer in adapted_layers(model):
            layer.unfuse()
        yield
    finally:
        for n, s in states.items():
            s.enabled = saved[n]
        for name, layer in adapted_layers(model):
            if fused.get(name):
                layer.fuse(sorted(fused[name]))


def fuse(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Fold adapters into the base weights (fp32 accumulation, one cast); keep the originals for unfuse.

    Raises:
        AdapterError: a name in ``names`` is not attached (nothing is fused then).
    """
    unknown = [n for n in names or () if n not in registry(model)]
    if unknown:
        raise AdapterError(
            f"cannot fuse {unknown}: no such adapter on this model (attached: {sorted(registry(model)) or 'none'})"
        )
    for _, layer in adapted_layers(model):
        layer.fuse(None if names is None else list(names))


def unfuse(model: nn.Module) -> None:
    """Restore every fused weight bit for bit; adapters go back to dynamic mode."""
    for _, layer in adapted_layers(model):
        layer.unfuse()


def detach(model: nn.Module, name: str | None = None) -> None:
    """Remove one adapter, or all of them; with all removed the model is the original, bit for bit."""
    for n in [name] if name is not None else list(registry(model)):
        remove_adapter(model, n)


def adapter_patches(model: nn.Module, name: str) -> dict[str, Patch]:
    """One adapter as canonical patches keyed by plain module name (what the file writers take)."""
    if name not in registry(model):
        raise AdapterError(f"no adapter named {name!r} on this model (attached: {sorted(registry(model)) or 'none'})")
    return {mod: layer.adapters[name].to_patch() for mod, layer in adapted_layers(model) if name in layer.adapters}


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The tensors of one adapter: ``{module}.lora_A``/``lora_B``/``lora_mid``/``alpha`` for LoRA, ``{module}.<field>``
    for other kinds. Detached clones, safe to save.

    Raises:
        AdapterError: no adapter ``name`` is attached.
    """
    if name not in registry(model):
        raise AdapterError(f"no adapter named {name!r} on this model (attached: {sorted(registry(model)) or 'none'})")
    out: dict[str, Tensor] = {}
    for mod, layer in adapted_layers(model):
        adapter = layer.adapters[name] if name in layer.adapters else None
        if isinstance(adapter, LoraAdapter):
            for key in ("lora_A", "lora_B", "lora_mid"):
                value = getattr(adapter, key)
                if value is not None:
                    out[f"{mod}.{key}"] = value.detach().clone()
            out[f"{mod}.alpha"] = torch.tensor(adapter.to_patch().alpha)
        elif adapter is not None:
            out.update({f"{mod}.{k}": v.detach().clone() for k, v in adapter.to_patch().tensors().items()})
    return out


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, name: str, state_dict: Mapping[str, Tensor]) -> None:
    """Copy LoRA tensors saved by ``adapter_state_dict`` into the attached adapter ``name`` (resume training).

    Raises:
        AdapterError: a key is missing or left over, or the adapter is not attached.
    """
    expected = adapter_state_dict(model, name)
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise AdapterError(f"state dict does not fit adapter {name!r}: missing {missing[:5]}, unexpected {extra[:5]}")
    for mod, layer in adapted_layers(model):
        adapter = layer.adapters[name] if name in layer.adapters else None
        if not isinstance(adapter, LoraAdapter):
            continue
        for key in ("lora_A", "lora_B", "lora_mid"):
            param = getattr(adapter, key)
            if param is not None:
                value = state_dict[f"{mod}.{key}"]
                check_lora_fits_param(param, value, f"{mod}.{key}")
                param.copy_(value)


def check_lora_fits_param(param: Tensor, value: Tensor, key: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise AdapterError(f"{key}: saved shape {tuple(value.shape)} does not match the adapter's {tuple(param.shape)}")
