"""Tiny base checkpoints on disk (single-file in original names, diffusers folders) and random LoRAs for them.

Single files are written straight from the diffusers state dicts through ``lorakit.arch.to_original`` (the forward
map; the code under test reads them back through the reverse map), fused weights (OpenCLIP ``in_proj``, FLUX ``qkv``
and ``linear1``) assembled by concatenating the members' rows.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.arch import checkpoint_prefix, normalize_module_name, original_map, reverse_map
from lorakit.arch.refs import SWAP_HALVES, TRANSPOSE
from lorakit.core.patches import DoraMagnitude, LohaPatch, LokrPatch, LoraPatch, Patch
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.safetensors_writer import write_file

torch.set_num_threads(1)


@functools.cache
def _pipeline(arch: str):
    from lorakit.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(arch, seed=0)


def components(arch: str) -> dict[str, nn.Module]:
    """The tiny pipeline's LoRA-able components (denoiser and text encoders), shared: do not modify."""
    pipe = _pipeline(arch)
    names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def table_name(arch: str, module: str, component: str) -> str:
    """transformers 5 CLIP names -> the table (``text_model.``) form."""
    return normalize_module_name(arch, component, module)


def diffusers_weights(arch: str, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, Tensor]]:
    """component -> {table-form module name: weight} for every module with a weight (the reference side)."""
    out: dict[str, dict[str, Tensor]] = {}
    for component, model in components(arch).items():
        weights = {}
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if isinstance(w, Tensor):
                weights[table_name(arch, name, component)] = w.detach().to(dtype).clone()
        out[component] = weights
    return out


def _fused(members: tuple, tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([tensors[m.module] for m in members])


def original_state(arch: str, weights: dict[str, dict[str, Tensor]], biases: bool = True) -> dict[str, Tensor]:
    """A single-file state dict in original names from diffusers-form weights (and the live models' biases)."""
    out: dict[str, Tensor] = {}
    models = components(arch)
    for component, table in weights.items():
        prefix = checkpoint_prefix(arch, component)
        fwd = original_map(arch, component)
        rev = reverse_map(arch, component)
        live = {table_name(arch, n, component): m for n, m in models[component].named_modules()}
        for module, w in table.items():
            if module not in fwd:
                out[prefix + "unmapped." + module + ".weight"] = w.contiguous()  # copied through as it is
                continue
            ref = fwd[module]
            if ref.rows is not None:
                if rev[ref.module][0].module != module:
                    continue  # a fused weight is written once, by its first member
                tensor = _fused(rev[ref.module], table)
                bias = [getattr(live[m.module], "bias", None) for m in rev[ref.module]]
                bias = torch.cat([b.detach() for b in bias]) if all(b is not None for b in bias) else None
            else:
                tensor = w.t() if ref.transform == TRANSPOSE else w
                if ref.transform == SWAP_HALVES:
                    tensor = torch.cat(tensor.chunk(2)[::-1])
                bias = getattr(live[module], "bias", None)
                bias = None if bias is None or ref.transform else bias.detach()
            out[prefix + ref.key] = tensor.contiguous()
            if biases and bias is not None and ref.bias_key is not None:
                out[prefix + ref.bias_key] = bias.to(w.dtype).contiguous()
    return out


def write_single_file(
    path: Path, arch: str, dtype: torch.dtype = torch.float32, weights: dict[str, dict[str, Tensor]] | None = None
) -> Path:
    """An A1111-style single file: denoiser and encoders in original names plus a VAE tensor copied verbatim."""
    state = original_state(arch, weights or diffusers_weights(arch, dtype))
    state["first_stage_model.decoder.conv_in.weight"] = torch.arange(24, dtype=dtype).reshape(2, 3, 2, 2)
    write_file(path, state, {"modelspec.title": "tiny", "sshs_model_hash": "0" * 64})
    return path


def write_folder(path: Path, arch: str) -> Path:
    """The tiny pipeline saved as a diffusers folder (safetensors)."""
    _pipeline(arch).save_pretrained(path)
    return path


def module_kinds(arch: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> {table-form module: weight shape} for Linear / Conv2d modules (what LoRAs target)."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for component, model in components(arch).items():
        out[component] = {
            table_name(arch, n, component): tuple(m.weight.shape)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear | nn.Conv2d)
        }
    return out


def _patch(kind: int, shape: tuple[int, ...], g: torch.Generator) -> Patch:
    out, inp, *k = shape
    r = 2
    if kind == 0:
        return LoraPatch(
            up=torch.randn(out, r, *([1] * len(k)), generator=g),
            down=torch.randn(r, inp, *k, generator=g) * 0.3,
            alpha=1.0,
        )
    if kind == 1 and not k:
        return LohaPatch(
            w1a=torch.randn(out, r, generator=g),
            w1b=torch.randn(r, inp, generator=g) * 0.3,
            w2a=torch.randn(out, r, generator=g),
            w2b=torch.randn(r, inp, generator=g) * 0.3,
            alpha=3.0,
        )
    if kind == 2 and not k and out % 2 == 0 and inp % 2 == 0:
        return LokrPatch(
            w1=torch.randn(2, 2, generator=g),
            w2a=torch.randn(out // 2, r, generator=g),
            w2b=torch.randn(r, inp // 2, generator=g) * 0.3,
            alpha=1.0,
        )
    mag = torch.rand(out, generator=g) + 0.5
    return LoraPatch(
        up=torch.randn(out, r, *([1] * len(k)), generator=g),
        down=torch.randn(r, inp, *k, generator=g) * 0.3,
        alpha=2.0,
        dora=DoraMagnitude(mag.reshape(out, *([1] * (len(k) + 1))) if k else mag, "out"),
    )


def random_lora(arch: str, *, seed: int = 0, every: int = 3, kinds: int = 4, arch_name: str | None = None) -> LoraFile:
    """A LoRA on every ``every``-th Linear/Conv module of each component, kinds cycling LoRA/LoHa/LoKr/DoRA."""
    g = torch.Generator().manual_seed(seed)
    patches: dict[Target, Patch] = {}
    for component, table in module_kinds(arch).items():
        known = original_map(arch, component)
        for j, (module, shape) in enumerate(table.items()):
            if j % every == seed % every and module in known:
                patches[Target(component, module)] = _patch(j % kinds, shape, g)
    return LoraFile(patches=patches, dialect="lorakit", arch=arch_name or arch, arch_reason="test")


def expected_weights(
    arch: str, loras: list[tuple[LoraFile, float]], multiplier=None, dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, Tensor]]:
    """Dense reference: ``W + sum_i w_i m(t) D_i(W)`` per module in fp32 from ``dtype`` weights, cast once back."""
    base = {c: {m: w.float() for m, w in t.items()} for c, t in diffusers_weights(arch, dtype).items()}
    out: dict[str, dict[str, Tensor]] = {}
    for component, table in base.items():
        out[component] = {}
        for module, w in table.items():
            acc = w.clone()
            for lora, weight in loras:
                patch = lora.patches.get(Target(component, module))
                if patch is not None:
                    m = multiplier(Target(component, module)) if multiplier else 1.0
                    acc += weight * m * patch.effect(w)
            out[component][module] = acc.to(dtype)
    return out


def model_index(path: Path) -> dict:
    return json.loads((path / "model_index.json").read_text())
