"""The trained LoRA: which modules of which components get adapters, and the result as a canonical LoraFile."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.model import AdapterHandle, adapter_patches, attach_lora
from lorakit.formats.canonical import LoraFile, Target
from lorakit.train.config import NetworkConfig
from lorakit.train.tasks import DENOISER, TEXT_ENCODERS

__all__ = ["ADAPTER_NAME", "TrainedNetwork", "attach_network", "target_regex"]

ADAPTER_NAME = "trained"

_ATTENTION = r".*\.(attn[12]?)\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
"""UNet self/cross attention (attn1, attn2); FLUX/SD3 joint attention with its context projections."""
_MLP = (
    r".*\.(ff|ff_context)\.net\.(0\.proj|2)"  # feed-forward of UNet and DiT transformer blocks
    r"|.*attentions\.\d+\.(proj_in|proj_out)"  # UNet Transformer2D in/out projections (kohya trains them too)
    r"|.*single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
)  # FLUX single blocks: MLP and fused output
_TEXT_ATTENTION = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)"
_TEXT_MLP = r".*mlp\.(fc1|fc2)"


def target_regex(preset: str, text: bool = False) -> str:
    """The module-name regex of a target preset (attention, attention-mlp, all) for a denoiser or a text encoder."""
    if preset == "all":
        return r".*"
    attention, mlp = (_TEXT_ATTENTION, _TEXT_MLP) if text else (_ATTENTION, _MLP)
    return attention if preset == "attention" else f"{attention}|{mlp}"


class TrainedNetwork:
    """The adapters being trained, per component, with their parameter groups and their canonical form."""

    def __init__(self, pipe: Any, arch: str, handles: dict[str, AdapterHandle], config: NetworkConfig) -> None:
        self.pipe, self.arch, self.handles, self.config = pipe, arch, handles, config

    def modules(self) -> dict[str, nn.Module]:
        return {c: getattr(self.pipe, c) for c in self.handles}

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable tensors as ``component.module...lora_A`` in a fixed order (optimizer, state, all-reduce)."""
        out = []
        for component, module in self.modules().items():
            out += [(f"{component}.{n}", p) for n, p in module.named_parameters() if p.requires_grad]
        return out

    def param_groups(self, lr: float) -> list[dict]:
        """One group for the denoiser at ``lr``, one for the text encoders at ``text_encoder_lr``."""
        denoiser = DENOISER[self.arch]
        groups = [{"params": [p for n, p in self.named_parameters() if n.startswith(denoiser + ".")], "lr": lr}]
        text = [p for n, p in self.named_parameters() if not n.startswith(denoiser + ".")]
        if text:
            te_lr = self.config.text_encoder_lr if self.config.text_encoder_lr is not None else lr
            groups.append({"params": text, "lr": te_lr})
        return groups

    def lora_file(self, metadata: dict[str, str]) -> LoraFile:
        """The current adapters as a LoraFile keyed by component + diffusers module name (detached views of the
        live tensors: write it before the next step)."""
        patches = {}
        for component, module in self.modules().items():
            for name, patch in adapter_patches(module, ADAPTER_NAME).items():
                patches[Target(component, name)] = patch.to("cpu")
        return LoraFile(patches=dict(sorted(patches.items())), metadata=metadata, dialect="kohya", arch=self.arch)

    def trainable_count(self) -> int:
        return sum(p.numel() for _, p in self.named_parameters())


def attach_network(pipe: Any, arch: str, config: NetworkConfig, seed: int) -> TrainedNetwork:
    """Freeze the pipeline and attach fresh LoRAs (A Kaiming-uniform from ``seed``, B zero) to the denoiser and,
    with ``train_text_encoder``, to the CLIP text encoders."""
    components = [DENOISER[arch]]
    if config.train_text_encoder:
        components += [c for c in TEXT_ENCODERS[arch] if getattr(pipe, c, None) is not None]
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", DENOISER[arch]):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
    torch.manual_seed(seed)  # the A factors' init
    handles = {}
    for component in components:
        text = component != DENOISER[arch]
        lora = LoraConfig(
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            targets=target_regex(config.targets, text),
            conv_rank=config.conv_rank if config.targets == "all" else None,
            conv_alpha=config.conv_alpha,
        )
        handles[component] = attach_lora(getattr(pipe, component), lora, ADAPTER_NAME)
    return TrainedNetwork(pipe, arch, handles, config)
