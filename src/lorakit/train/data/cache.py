"""Latent and text-embedding caches, in memory or in a folder the caller chooses.

A latent is stored under a key made of everything that changes it: the image file's sha256, its original size, the
bucket, the crop, the flip, the encoder's identity string (given by the trainer, e.g. the VAE's file hash and dtype)
and the version of lorakit's image pipeline. Changing the image or any of these gives a new key, so a stale latent
is never used; a damaged cache file is encoded again.

Flip is cached per variant (two latents per image at most). Random crop is refused: every epoch crops differently,
so a cache would hold many variants and save nothing; ``LatentCache`` raises ``ConfigError`` when the dataset uses it.

A text embedding is stored under sha256(identity, caption): shuffled or dropped-out captions are separate entries.

On disk each entry is one small safetensors file ``<key>.safetensors``, written atomically; nothing is kept in
memory in that mode. The folder must not be inside a dataset folder (training never writes there).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from lorakit.errors import ConfigError, FileFormatError, InputError
from lorakit.formats.safetensors_io import read_file
from lorakit.formats.safetensors_writer import write_file
from lorakit.train.data.imageset import ImageSet, Sample

__all__ = ["LatentCache", "TextEmbeddingCache", "PIPELINE_VERSION"]

_SINGLE = "_tensor"  # the entry name when encode returns one tensor rather than a mapping
PIPELINE_VERSION = "lorakit-image-1"
"""Changes whenever resizing or cropping changes, so latents made by an older pipeline are not reused."""


class _Store:
    """Entries (dicts of tensors) by key, in memory or one safetensors file each in a folder."""

    def __init__(self, folder: str | Path | None, forbidden: Iterable[Path] = ()) -> None:
        self.folder = Path(folder).resolve() if folder is not None else None
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        if self.folder is None:
            return
        for root in forbidden:
            root = Path(root).resolve()
            if self.folder == root or root in self.folder.parents:
                raise ConfigError(
                    f"{self.folder}: the cache folder is inside the dataset folder {root}; "
                    "choose a folder outside it (training never writes into the dataset)"
                )
        self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.folder is None:
            return self.memory.get(key)
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            tensors, _ = read_file(path)
        except (FileFormatError, InputError):
            return None  # a damaged entry (an interrupted disk, a copy gone wrong): encode it again
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        if self.folder is None:
            self.memory[key] = tensors
        else:
            write_file(self.folder / f"{key}.safetensors", tensors, metadata)

    def __len__(self) -> int:
        if self.folder is None:
            return len(self.memory)
        return sum(1 for _ in self.folder.glob("*.safetensors"))


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()


class LatentCache:
    """Latents of training samples, encoded once per (image content, view, encoder).

    Args:
        encode: the trainer's encoder: float32 pixels ``[B, 3, H, W]`` in [-1, 1] -> latents ``[B, C, H/f, W/f]``
            (scaled as the denoiser expects).
        identity: a string that changes whenever the encoder's output would (VAE file hash, dtype, scaling).
        folder: a cache folder, or None to keep the latents in memory.
        images: the dataset; when given, random crop and a cache folder inside a dataset folder are refused.

    Attributes:
        encoded: how many images were encoded (cache misses) so far.
    """

    def __init__(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        identity: str,
        folder: str | Path | None = None,
        images: ImageSet | None = None,
    ) -> None:
        if not identity:
            raise ConfigError("the latent cache needs an identity string for the encoder (e.g. the VAE's hash)")
        forbidden: list[Path] = []
        if images is not None:
            if images.config.random_crop:
                raise ConfigError(
                    "random_crop and the latent cache do not mix: each epoch crops differently, so "
                    "cached latents would be wrong; turn off random_crop or the latent cache"
                )
            forbidden = [Path(f.path) for f in images.config.folders]
        self.encode = encode
        self.identity = identity
        self.encoded = 0
        self._store = _Store(folder, forbidden)

    def key(self, sample: Sample) -> str:
        """The cache key of a sample's latent (hex sha256)."""
        if not sample.sha256:
            raise ConfigError(f"{sample.key}: the sample has no content hash; make it with ImageSet.sample")
        return _digest(
            PIPELINE_VERSION,
            self.identity,
            sample.sha256,
            sample.original_size,
            sample.target_size,
            sample.crop_top_left,
            sample.flipped,
        )

    def latents(self, samples: list[Sample]) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` of a batch (one bucket), encoding only the samples not cached yet."""
        keys = [self.key(s) for s in samples]
        found = {k: e["latent"] for k in dict.fromkeys(keys) if (e := self._store.get(k)) is not None}
        first_missing: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in found:
                first_missing.setdefault(k, i)
        missing = list(first_missing.values())
        if missing:
            pixels = torch.stack([samples[i].pixels for i in missing])
            with torch.no_grad():
                out = self.encode(pixels)
            if not isinstance(out, torch.Tensor) or out.shape[0] != len(missing):
                raise ValueError(
                    f"encode returned {type(out).__name__} of shape {getattr(out, 'shape', None)}; "
                    f"expected a tensor with {len(missing)} rows"
                )
            for row, i in enumerate(missing):
                latent = out[row].detach().to("cpu").clone()
                self._store.put(
                    keys[i],
                    {"latent": latent},
                    {"image_sha256": samples[i].sha256, "identity": self.identity, "key": samples[i].key},
                )
                found[keys[i]] = latent
            self.encoded += len(missing)
        return torch.stack([found[k] for k in keys])

    def precompute(self, images: ImageSet, batch_size: int = 1, progress=None) -> int:
        """Encode every view training can ask for (centre crop, and its mirror when ``flip`` is on) up front, so the
        encoder can leave memory before training. Returns how many were encoded."""
        if images.config.random_crop:
            raise ConfigError("random_crop cannot be precomputed; turn off random_crop or the latent cache")
        views = [(i, flip) for i in range(len(images)) for flip in ((False, True) if images.config.flip else (False,))]
        views.sort(key=lambda v: images.items[v[0]].bucket)  # batches of one bucket each
        before = self.encoded
        for start in range(0, len(views), batch_size):
            chunk = views[start : start + batch_size]
            groups: dict[tuple[int, int], list[Sample]] = {}
            for index, flip in chunk:
                groups.setdefault(images.items[index].bucket, []).append(images.view_sample(index, flip=flip))
            for group in groups.values():
                self.latents(group)
            if progress is not None:
                progress(min(start + batch_size, len(views)), len(views))
        return self.encoded - before

    def __len__(self) -> int:
        return len(self._store)


class TextEmbeddingCache:
    """Text-encoder outputs per caption, encoded once per (caption, encoder).

    Args:
        encode: the trainer's encoder: a list of B captions -> a tensor with B rows, or a mapping of names to such
            tensors (e.g. SDXL's hidden states and pooled embedding).
        identity: a string that changes whenever the encoders' output would (their hashes, dtype, clip skip).
        folder: a cache folder, or None to keep the embeddings in memory.
        images: the dataset; when given, a cache folder inside a dataset folder is refused.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], torch.Tensor | Mapping[str, torch.Tensor]],
        *,
        identity: str,
        folder: str | Path | None = None,
        images: ImageSet | None = None,
    ) -> None:
        if not identity:
            raise ConfigError("the text-embedding cache needs an identity string for the text encoders")
        forbidden = [Path(f.path) for f in images.config.folders] if images is not None else []
        self.encode = encode
        self.identity = identity
        self.encoded = 0
        self._store = _Store(folder, forbidden)

    def key(self, caption: str) -> str:
        """The cache key of a caption's embedding (hex sha256)."""
        return _digest(self.identity, caption)

    def embeddings(self, captions: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
        """Embeddings of a batch of captions, stacked on a new first axis (a dict when ``encode`` returns one)."""
        keys = [self.key(c) for c in captions]
        found = {k: e for k in dict.fromkeys(keys) if (e := self._store.get(k)) is not None}
        missing = list(dict.fromkeys(c for c, k in zip(captions, keys) if k not in found))
        if missing:
            with torch.no_grad():
                out = self.encode(missing)
            outputs = {_SINGLE: out} if isinstance(out, torch.Tensor) else dict(out)
            for name, value in outputs.items():
                if value.shape[0] != len(missing):
                    raise ValueError(f"encode returned {name} with {value.shape[0]} rows for {len(missing)} captions")
            for row, caption in enumerate(missing):
                entry = {name: value[row].detach().to("cpu").clone() for name, value in outputs.items()}
                self._store.put(self.key(caption), entry, {"identity": self.identity, "caption": caption})
                found[self.key(caption)] = entry
            self.encoded += len(missing)
        names = list(found[keys[0]])
        stacked = {name: torch.stack([found[k][name] for k in keys]) for name in names}
        return stacked[_SINGLE] if names == [_SINGLE] else stacked

    def __len__(self) -> int:
        return len(self._store)
