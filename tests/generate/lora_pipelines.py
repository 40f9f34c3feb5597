"""Random LoRAs for tiny pipelines and a seeded 2-step generation (a plain module, imported by the tests here)."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.patches import LoraPatch
from lorakit.formats.canonical import LoraFile, Target
from lorakit.generate import lora_components

_LINEAR_HINTS = ("attn", "proj", "mlp", "ff", "SelfAttention", "DenseReluDense", "norm1.linear")


def adaptable(pipe, components=None):
    """(component, runtime module name, module) for every Linear of attention / MLP and every resnet conv."""
    for component, model in lora_components(pipe).items():
        if components is not None and component not in components:
            continue
        for name, module in model.named_modules():
            if name.endswith(".base_layer") or ".adapters." in name:
                continue  # the wrapped layer of an applied LoRA: its plain name is the wrapper's
            module = getattr(module, "base_layer", module)
            linear = isinstance(module, nn.Linear) and any(h in name for h in _LINEAR_HINTS)
            conv = isinstance(module, nn.Conv2d) and "resnets" in name
            if linear or conv:
                yield component, name, module


def canonical_name(component: str, model: nn.Module, name: str) -> str:
    """LoRA files name CLIP modules with ``text_model.``; transformers 5's CLIPTextModel has no such level."""
    if component.startswith("text_encoder") and name.startswith(("encoder.layers", "embeddings", "final_layer")):
        return "text_model." + name
    return name


def random_lora(pipe, arch: str, seed: int, *, rank: int = 4, components=None, scale: float = 0.3) -> LoraFile:
    """A LoRA on every adaptable module (alpha = rank / 2, so the file's alpha matters)."""
    generator = torch.Generator().manual_seed(seed)
    patches = {}
    models = lora_components(pipe)
    for component, name, module in adaptable(pipe, components):
        weight = module.weight
        down = torch.randn(rank, *weight.shape[1:], generator=generator) * scale
        up = torch.randn(weight.shape[0], rank, *([1] * (weight.dim() - 2)), generator=generator) * scale
        target = Target(component, canonical_name(component, models[component], name))
        patches[target] = LoraPatch(up=up, down=down, alpha=rank / 2)
    return LoraFile(patches=patches, arch=arch)


def generate(pipe, seed: int = 0, prompt: str = "a photo of a red cat"):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=generator, output_type="np").images


def state_of(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of the adaptable components, cloned (for bit-for-bit comparisons)."""
    out = {}
    for component, model in lora_components(pipe).items():
        out.update({f"{component}.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out
