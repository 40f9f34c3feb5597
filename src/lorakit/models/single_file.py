"""Single-file checkpoints (A1111 / ComfyUI layout) <-> diffusers pipelines, with configs bundled in lorakit.

Loading builds every component on the meta device from a config (bundled full-size configs for the detected
architecture, or the component configs of a diffusers folder given as ``config``), then assigns the tensors read one
by one from the file under their original names (``lorakit.formats.checkpoint`` and ``lorakit.arch`` name maps,
fused ``qkv`` rows sliced out). Buffers that are computed, not stored (position ids, rotary tables), come from the
constructor. Anything the model has and the file lacks is an error that lists it; nothing is downloaded.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.arch import checkpoint_prefix, load_config, original_map, reverse_map
from lorakit.arch.refs import SWAP_HALVES, TRANSPOSE
from lorakit.errors import FileFormatError
from lorakit.models.loading import LoadedPipeline
from lorakit.models.parts import build_pipeline, find_tokenizers, load_component_from_folder
from lorakit.models.vae_names import VAE_PREFIXES, vae_to_original

__all__ = ["load_single_file", "pipeline_to_original"]

_DENOISER = {"sd1": "unet", "sd2": "unet", "sdxl": "unet", "flux": "transformer", "sd3": "transformer"}
_TEXT = {
    "sd1": ("text_encoder",),
    "sd2": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
    "flux": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
}


def _bundled(name: str) -> dict:
    return json.loads(resources.files("lorakit.models").joinpath("configs", name).read_text())


def _bias_key(key: str) -> str | None:
    return key[: -len("weight")] + "bias" if key.endswith("weight") else None


def _transform(tensor: torch.Tensor, transform: str | None) -> torch.Tensor:
    if transform == SWAP_HALVES:
        half = tensor.shape[0] // 2
        return torch.cat([tensor[half:], tensor[:half]])
    if transform == TRANSPOSE:
        return tensor.T.contiguous()
    return tensor


def _model_on_meta(kind: str, config: dict | Any) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if kind == "diffusers":
            import diffusers

            return getattr(diffusers, config["_class_name"]).from_config(config)
        import transformers

        if isinstance(config, dict):
            settings = dict(config)
            config = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
        return getattr(transformers, config.architectures[0])(config)


def _fit(tensor: torch.Tensor, param: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(param.shape):
        if tensor.numel() != param.numel():  # 1x1 conv vs Linear (VAE attention) differ only in shape
            raise FileFormatError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(param.shape)}; the checkpoint is for another model (pass --arch or config)"
            )
        tensor = tensor.reshape(param.shape)
    return tensor


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], missing: list[str], what: str, dtype) -> None:
    params = dict(model.named_parameters())
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    missing.extend(f"{what}.{n}" for n in params if n not in tensors)
    tie = getattr(model, "tie_weights", None)
    if tie is not None:
        tie()  # T5 shares its embedding: encoder.embed_tokens follows shared


def _read_denoiser_or_text(ckpt: Any, component: str, model: nn.Module, dtype, missing: list[str]) -> None:
    tensors = {}
    keys = set(ckpt.keys())
    for name, param in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        ref = ckpt.weight_ref(component, module) if module else None
        if ref is None:
            continue
        # a module has one weight-like tensor (weight, RMSNorm scale, positional embedding) and maybe a bias
        key = _bias_key(ref.key) if leaf == "bias" else ref.key
        if key is None or key not in keys:
            continue
        tensor = ckpt.read(key)
        if ref.rows is not None:
            tensor = tensor[ref.rows[0] : ref.rows[1]]
        tensors[name] = _fit(_transform(tensor, ref.transform), param, key, ckpt.path)
    _assign(model, tensors, missing, component, dtype)


def _read_vae(ckpt: Any, model: nn.Module, dtype, missing: list[str]) -> bool:
    keys = set(ckpt.keys())
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        return False
    num_up = len(model.config.block_out_channels)
    tensors = {}
    for name, param in model.named_parameters():
        original = vae_to_original(name, num_up)
        if original is not None and prefix + original in keys:
            tensors[name] = _fit(ckpt.read(prefix + original), param, prefix + original, ckpt.path)
    _assign(model, tensors, missing, "vae", dtype)
    return True


def _configs(arch: str, variant: str, config: Path | None) -> dict[str, tuple[str, Any]]:
    """component -> (kind, config) from the config folder, else bundled."""
    from lorakit.models.parts import folder_configs

    if config is not None:
        return folder_configs(config, (_DENOISER[arch], *_TEXT[arch], "vae"))
    out: dict[str, tuple[str, Any]] = {_DENOISER[arch]: ("diffusers", load_config(variant, _DENOISER[arch]))}
    for component in _TEXT[arch]:
        out[component] = ("transformers", load_config(variant, component))
    out["vae"] = ("diffusers", _bundled(f"vae-{arch}.json"))
    return out


def load_single_file(
    path: Path, *, arch: str | None, dtype: torch.dtype, config: Any = None, tokenizer: Any = None
) -> LoadedPipeline:
    """Load a single-file checkpoint as a pipeline (see the module docstring); ``load_pipeline`` is the entry point.

    Raises:
        FileFormatError: an unknown architecture, a partial file (the message lists the missing weights), missing
            tokenizers (the message says what to pass).
    """
    from lorakit.formats.checkpoint import Checkpoint

    config_dir = None if config is None else Path(config)
    with Checkpoint.open(path, arch=arch) as ckpt:
        family, variant = ckpt.arch, ckpt.variant
        tokenizers = find_tokenizers(path, family, Path(tokenizer) if tokenizer else None, config_dir)
        configs = _configs(family, variant, config_dir)
        components: dict[str, nn.Module] = {}
        missing: list[str] = []
        absent: list[str] = []
        for component, (kind, cfg) in configs.items():
            model = _model_on_meta(kind, cfg)
            if component == "vae":
                found = _read_vae(ckpt, model, dtype, missing)
            else:
                found = component in ckpt.components()
                if found:
                    _read_denoiser_or_text(ckpt, component, model, dtype, missing)
            if not found:
                absent.append(component)
            components[component] = model.eval()
    _fill_absent(absent, components, config_dir, dtype, path)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise FileFormatError(
            f"{path}: is a partial {family} checkpoint: {len(missing)} weights missing ({shown}); use the complete file"
        )
    pipe = build_pipeline(family, components, tokenizers, _scheduler(family, config_dir))
    return LoadedPipeline(pipe, family, ckpt.arch_reason, str(path))


def _fill_absent(absent: list[str], components: dict[str, nn.Module], config_dir: Path | None, dtype, path) -> None:
    """Components the file does not hold (FLUX files often hold only the transformer) come from the config folder."""
    still = []
    for component in absent:
        loaded = None if config_dir is None else load_component_from_folder(config_dir, component, dtype)
        if loaded is None:
            still.append(component)
        else:
            components[component] = loaded
    if still:
        raise FileFormatError(
            f"{path}: holds no weights for {', '.join(still)}; pass config=DIR (--config), a "
            f"diffusers folder of the same model that has them"
        )


def _scheduler(arch: str, config_dir: Path | None) -> Any:
    import diffusers

    if config_dir is not None and (config_dir / "scheduler").is_dir():
        raw = json.loads(next((config_dir / "scheduler").glob("*.json")).read_text())
    else:
        raw = _bundled(f"scheduler-{arch}.json")
    return getattr(diffusers, raw["_class_name"]).from_config(raw)


def pipeline_to_original(pipe: Any, arch: str) -> dict[str, torch.Tensor]:
    """A pipeline's denoiser, text encoders and VAE as one single-file state dict in original names.

    Fused original weights (FLUX ``qkv`` / ``linear1``, OpenCLIP ``in_proj``) are stacked from their members in row
    order. The inverse of ``load_single_file``; used to write test checkpoints and to export to A1111 / ComfyUI.
    """
    out: dict[str, torch.Tensor] = {}
    for component in (_DENOISER[arch], *_TEXT[arch]):
        model = getattr(pipe, component)
        out.update(_component_to_original(model, arch, component))
    vae = pipe.vae
    num_up = len(vae.config.block_out_channels)
    for name, param in vae.named_parameters():
        original = vae_to_original(name, num_up)
        if original is not None:
            is_attn = ".attn_1." in original and original.endswith("weight") and param.dim() == 2
            value = param.detach()[..., None, None] if is_attn else param.detach()
            out[VAE_PREFIXES[0] + original] = value.clone()
    return out


def _live(model: nn.Module, module: str) -> nn.Module | None:
    names = dict(model.named_modules())
    if module in names:
        return names[module]
    short = module[len("text_model.") :] if module.startswith("text_model.") else None
    return names.get(short) if short else None


def _component_to_original(model: nn.Module, arch: str, component: str) -> dict[str, torch.Tensor]:
    prefix = checkpoint_prefix(arch, component)
    out: dict[str, torch.Tensor] = {}
    members = reverse_map(arch, component)
    for original, refs in members.items():
        first = original_map(arch, component)[refs[0].module]
        parts = [(_live(model, r.module), r) for r in refs]
        if any(m is None for m, _ in parts):
            continue
        key = prefix + first.key
        weights = [_transform(m.weight.detach(), r.transform) for m, r in parts]
        out[key] = torch.cat(weights) if len(weights) > 1 else weights[0].clone()
        biases = [getattr(m, "bias", None) for m, _ in parts]
        bias_key = _bias_key(key)
        if bias_key and all(isinstance(b, torch.Tensor) for b in biases):
            biases = [_transform(b.detach(), r.transform) for b, (_, r) in zip(biases, parts, strict=True)]
            out[bias_key] = torch.cat(biases) if len(biases) > 1 else biases[0].clone()
    return out
