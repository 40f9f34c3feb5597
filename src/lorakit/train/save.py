"""Writing the trained LoRA: a kohya-format safetensors file with the metadata A1111, ComfyUI and Civitai read.

``ss_*`` keys as kohya's sd-scripts write them (network, training and dataset settings, ``ss_tag_frequency``),
``modelspec.*`` (Stability's model spec: architecture, resolution, trigger phrase, prediction type), and the
``sshs_model_hash`` / ``sshs_legacy_hash`` pair computed over what was written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.formats.hashes import sshs_legacy_hash
from lorakit.formats.lora_io import to_state_dict
from lorakit.formats.safetensors_writer import write_file
from lorakit.train.config import TrainConfig

__all__ = ["RunFacts", "lora_metadata", "write_lora"]

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}
"""kohya's ``ss_base_model_version`` per architecture."""
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "flux": "flux-1-dev",
    "sd3": "stable-diffusion-3-medium",
}
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunFacts:
    """What the metadata records beyond the config: the model, the data and where the run is."""

    arch: str
    prediction: str
    model_source: str
    """Where the base model came from (a path, or "embedded")."""
    dataset_dirs: dict[str, dict[str, int]]
    """folder name -> {"n_repeats", "img_count"}."""
    tag_frequency: dict[str, dict[str, int]]
    num_images: int
    steps_per_epoch: int
    world_size: int = 1
    started_at: float = 0.0
    resolution: int = 512
    """The dataset's training resolution (bucket area resolution x resolution)."""
    num_reg_images: int = 0
    """Regularization images per epoch (kohya's ``ss_num_reg_images``)."""


def _shown_path(path: str, absolute: bool) -> str:
    """A path as recorded: only its last part unless absolute paths were asked for (they leak user names)."""
    return str(Path(path).resolve()) if absolute else Path(path).name


def _dataset_metadata(facts: RunFacts) -> dict[str, str]:
    # folder names only (kohya writes the same): the full paths would leak the user's directory layout
    return {
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs, sort_keys=True),
        "ss_tag_frequency": json.dumps(facts.tag_frequency, sort_keys=True),
        "ss_num_train_images": str(facts.num_images),
        "ss_num_reg_images": str(facts.num_reg_images),
        "ss_num_batches_per_epoch": str(facts.steps_per_epoch),
    }


def _network_metadata(config: TrainConfig) -> dict[str, str]:
    net = config.network
    alpha = net.alpha if net.alpha is not None else net.rank
    args: dict[str, Any] = {}
    if net.targets == "all" and net.conv_rank is not None:
        args = {
            "conv_dim": net.conv_rank,
            "conv_alpha": net.conv_alpha if net.conv_alpha is not None else net.conv_rank,
        }
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(net.rank),
        "ss_network_alpha": f"{float(alpha):g}",
        "ss_network_dropout": f"{net.dropout:g}",
        "ss_network_args": json.dumps(args, sort_keys=True) if args else "null",
        "ss_network_train_unet_only": str(not net.train_text_encoder),
        "ss_lorakit_targets": net.targets,
    }


def _training_metadata(config: TrainConfig, facts: RunFacts, step: int) -> dict[str, str]:
    t, opt = config.training, config.optimizer
    per_epoch = max(1, facts.steps_per_epoch)
    return {
        "ss_steps": str(step),
        "ss_epoch": str(-(-step * t.gradient_accumulation // per_epoch)),
        "ss_max_train_steps": str(t.steps),
        "ss_learning_rate": f"{opt.lr:g}",
        "ss_unet_lr": f"{opt.lr:g}",
        "ss_text_encoder_lr": f"{(config.network.text_encoder_lr or opt.lr):g}",
        "ss_optimizer": opt.name,
        "ss_lr_scheduler": opt.schedule,
        "ss_lr_warmup_steps": str(opt.warmup_steps),
        "ss_max_grad_norm": f"{opt.max_grad_norm or 0:g}",
        "ss_batch_size_per_device": str(t.batch_size),
        "ss_total_batch_size": str(t.batch_size * t.gradient_accumulation * facts.world_size),
        "ss_gradient_accumulation_steps": str(t.gradient_accumulation),
        "ss_gradient_checkpointing": str(t.gradient_checkpointing),
        "ss_mixed_precision": t.mixed_precision,
        "ss_seed": str(t.seed),
        "ss_min_snr_gamma": f"{t.min_snr_gamma:g}" if t.min_snr_gamma is not None else "None",
        "ss_noise_offset": f"{t.noise_offset:g}" if t.noise_offset else "None",
        "ss_prior_loss_weight": f"{t.prior_loss_weight:g}",
        "ss_cache_latents": str(t.cache_latents),
    }


def lora_metadata(config: TrainConfig, facts: RunFacts, step: int, *, finished: bool) -> dict[str, str]:
    """The header metadata of a save at optimizer step ``step`` (the hashes are added by ``write_lora``)."""
    resolution = facts.resolution
    now = time.time()
    absolute = config.save.absolute_paths
    meta = {
        "ss_output_name": config.save.name,
        "ss_sd_model_name": _shown_path(facts.model_source, absolute)
        if facts.model_source != "embedded"
        else "embedded",
        "ss_base_model_version": BASE_MODEL_VERSION[facts.arch],
        "ss_v2": str(facts.arch == "sd2"),
        "ss_v_parameterization": str(facts.prediction == "v_prediction"),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_training_started_at": f"{facts.started_at:.3f}",
        "ss_training_finished_at": f"{now:.3f}" if finished else "None",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCH[facts.arch]}/lora",
        "modelspec.title": f"{config.save.name} (step {step})",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        "modelspec.prediction_type": {"v_prediction": "v", "flow": "rectified_flow"}.get(facts.prediction, "epsilon"),
    }
    if config.save.trigger:
        meta["modelspec.trigger_phrase"] = config.save.trigger
    meta.update(_network_metadata(config))
    meta.update(_training_metadata(config, facts, step))
    meta.update(_dataset_metadata(facts))
    return meta


def write_lora(
    lora: Any, path: Path, metadata: Mapping[str, str], *, arch: str, dtype: str, modules: Mapping[str, nn.Module]
) -> Path:
    """Write ``lora`` (a LoraFile) in the kohya dialect with ``metadata`` and both kohya hashes, atomically.

    ``sshs_legacy_hash`` covers the tensors and the ``ss_*`` metadata only, so it is computed from a first write and
    the file written again with it (a LoRA is small; both writes are atomic).
    """
    tensors, meta = to_state_dict(lora, "kohya", arch=arch, modules=modules, dtype=SAVE_DTYPES[dtype])
    meta.update(metadata)
    hash_fields = {"sshs_model_hash": "{sha256}", "modelspec.hash_sha256": "0x{sha256}"}
    write_file(path, tensors, meta, hash_fields=hash_fields)
    meta["sshs_legacy_hash"] = sshs_legacy_hash(path)
    write_file(path, tensors, meta, hash_fields=hash_fields)
    return path
