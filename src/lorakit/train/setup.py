"""Setting a run up: processes and device, precision, base model, dataset, caches."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, OutputError
from lorakit.train.config import TrainConfig

__all__ = [
    "Processes",
    "dataset_config",
    "enable_checkpointing",
    "fill_caches",
    "load_base",
    "make_caches",
    "precision",
    "processes",
    "refuse_output_in_dataset",
    "return_free_memory",
]

log = logging.getLogger(__name__)


@dataclass
class Processes:
    """This process's place among the training processes (one without ``accelerate launch``)."""

    rank: int
    world: int
    device: torch.device

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place (the gradient all-reduce of DDP, without the mean)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def processes() -> Processes:
    """The process group that ``accelerate launch`` (or torchrun) set up, through accelerate's state."""
    from accelerate import PartialState

    # without a GPU, accelerate sets up a multi-process group only when told it runs on CPU (gloo)
    state = PartialState(cpu=not torch.cuda.is_available())
    return Processes(rank=state.process_index, world=state.num_processes, device=state.device)


def precision(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``training.mixed_precision`` on ``device``; None is plain fp32.

    Raises:
        ConfigError: fp16 or bf16 asked for on a CPU.
    """
    if device.type != "cuda":
        if setting in ("fp16", "bf16"):
            raise ConfigError(f"training.mixed_precision = {setting!r} needs a GPU; on a CPU use 'auto' or 'no'")
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[setting]


def load_base(
    config: TrainConfig, pipe: Any = None, arch: str | None = None, base_dir: Path | None = None
) -> tuple[Any, str, str]:
    """The base pipeline (given, or loaded offline from ``model.path``, relative to ``base_dir``), its architecture
    and its source."""
    if pipe is not None:
        if arch is None:
            raise ConfigError("a pipeline passed to train() needs its architecture (arch='sd1', ...)")
        return pipe, arch, "given"
    from lorakit.models import load_pipeline

    path = config.model.path
    if path is not None and base_dir is not None and not Path(path).is_absolute():
        path = str(base_dir / path)
    loaded = load_pipeline(path, arch=config.model.arch)
    return loaded.pipe, loaded.arch, loaded.source


def dataset_config(table: Mapping[str, Any], base_dir: Path | None = None):
    """The [dataset] table as a DatasetConfig.

    ``config = "dataset.toml"`` reads a dataset file (the table's other keys override it); ``path = "folder"`` is one
    folder (its FolderConfig options beside it); ``[[dataset.folders]]`` lists several. Relative paths are taken
    relative to ``base_dir`` (the config file's folder).
    """
    from lorakit.train.data import DatasetConfig, FolderConfig, load_dataset_config

    base = base_dir or Path.cwd()

    def resolve(p: str) -> str:
        return str(p if Path(p).is_absolute() else base / p)

    values = dict(table)
    try:
        if "config" in values:
            return load_dataset_config(resolve(values.pop("config")), **values)
        if "path" in values:
            return DatasetConfig.for_folder(resolve(values.pop("path")), **values)
        folders = values.pop("folders", None)
        if not folders:
            raise ConfigError(
                '[dataset] needs path = "images/folder" (or config = "dataset.toml", or '
                "[[dataset.folders]] tables); --data sets it from the command line"
            )
        folder_configs = tuple(FolderConfig(**{**f, "path": resolve(f["path"])}) for f in folders)
        return DatasetConfig(folders=folder_configs, **values)
    except TypeError as err:
        raise ConfigError(f"[dataset]: {err}") from None


def _can_cache_text(config: TrainConfig) -> bool:
    """Text can be cached when the text encoders are frozen (captions may still change per epoch: cache misses)."""
    return config.training.cache_text and not config.network.train_text_encoder


def make_caches(config: TrainConfig, task: Any, images: Any, identity: str) -> tuple[Any, Any]:
    """The latent and text caches the config asks for (None where off or impossible)."""
    from lorakit.train.data import LatentCache, TextEmbeddingCache

    t = config.training
    latent = text = None
    if t.cache_latents and not images.config.random_crop:
        latent = LatentCache(
            task.encode_images, identity=f"{identity}|vae-mode", folder=_sub(t.cache_dir, "latents"), images=images
        )
    if _can_cache_text(config):
        text = TextEmbeddingCache(
            task.encode_text, identity=f"{identity}|text", folder=_sub(t.cache_dir, "text"), images=images
        )
    return latent, text


def _sub(folder: str | None, name: str) -> Path | None:
    return None if folder is None else Path(folder) / name


def fixed_captions(images: Any) -> list[str] | None:
    """Every caption training will use, when no caption changes between epochs (no shuffle or dropout); else None."""
    for item in images.items:
        o = item.subset.options
        if o.shuffle_caption or o.caption_dropout_rate or o.tag_dropout_rate:
            return None
    return sorted({images.caption(i, seed=0, epoch=0) for i in range(len(images))})


def return_free_memory() -> None:
    """Hand memory freed on the heap back to the system (glibc keeps it, so released components would still count
    in the process's memory); a no-op elsewhere."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def fill_caches(
    pipe: Any, images: Any, latent_cache: Any, text_cache: Any, *, keep: bool, device: torch.device
) -> None:
    """Fill the caches up front; then the frozen text encoders and the VAE leave memory unless ``keep`` (samples
    need them). Text first: the text encoders are gone before the VAE encoder's activations, the largest of the
    setup, arrive; images are encoded one at a time for the same reason."""
    captions = fixed_captions(images) if text_cache is not None else None
    if captions:
        for start in range(0, len(captions), 8):
            text_cache.embeddings(captions[start : start + 8])
        if not keep:
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                _release(pipe, name, device)
            return_free_memory()
    if latent_cache is not None:
        latent_cache.precompute(images, batch_size=1)
        if not keep:
            _release(pipe, "vae", device)
            return_free_memory()


def _release(pipe: Any, name: str, device: torch.device) -> None:
    """Free a component the run no longer needs: off the GPU, or (on a CPU) its weights dropped to the meta device,
    so its memory really goes (every view training can ask for is cached)."""
    module = getattr(pipe, name, None)
    if isinstance(module, torch.nn.Module):
        module.to("cpu" if device.type != "cpu" else "meta")


def refuse_output_in_dataset(output: Path, images: Any) -> None:
    """Refuse an output folder inside a dataset folder: training never writes into the dataset."""
    out = output.resolve()
    for folder in images.config.folders:
        root = Path(folder.path).resolve()
        if out == root or root in out.parents:
            raise OutputError(
                f"save.output_dir {output} is inside the dataset folder {folder.path}; training never "
                f"writes into the dataset: choose an output folder outside it"
            )


def enable_checkpointing(module: torch.nn.Module) -> None:
    """Gradient checkpointing on a diffusers model or a transformers text encoder."""
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
    elif hasattr(module, "gradient_checkpointing_enable"):  # transformers text encoders
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
