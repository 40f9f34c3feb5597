"""Batches in a deterministic, resumable order; a batch never mixes buckets.

An epoch is every training image ``repeats`` times, plus as many regularization sightings (``ImageSet.copies``).
The sightings are grouped by bucket; with ``shuffle`` each bucket's sightings are shuffled and cut into batches (the
last batch of a bucket may be short), then the batches are shuffled, all from a generator seeded by (seed, epoch).
So the epoch's order depends on nothing else, and a run stopped after batch ``k`` resumes at batch ``k`` with the
same batches as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

from lorakit.errors import ConfigError
from lorakit.train.data.captions import rng_for
from lorakit.train.data.imageset import ImageSet, Sample

__all__ = ["BatchLoader"]

Sighting = tuple[int, int]
"""(image index, copy number within the epoch)."""


class BatchLoader:
    """Deterministic batches of ``Sample``s, one bucket per batch.

    Args:
        images: the dataset.
        batch_size: samples per batch (a bucket's last batch may hold fewer).
        seed: seed of the order, crops, flips and captions.
        shuffle: shuffle per epoch; False keeps bucket order, then image order.

    Attributes:
        steps_per_epoch: batches per epoch (the same every epoch).
        epoch: the epoch of the next batch (after ``load_state_dict``, where to resume).
        step: index within ``epoch`` of the next batch.
    """

    def __init__(self, images: ImageSet, batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
        if not len(images):
            raise ConfigError("the dataset has no images; nothing to batch")
        self.images = images
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._by_bucket: dict[tuple[int, int], list[Sighting]] = {}
        self.copies = images.copies()  # repeats, and regularization images balanced to the training images
        for index, (item, count) in enumerate(zip(images.items, self.copies)):
            if count:
                self._by_bucket.setdefault(item.bucket, []).extend((index, copy) for copy in range(count))
        self._by_bucket = dict(sorted(self._by_bucket.items()))
        self.steps_per_epoch = sum(math.ceil(len(s) / batch_size) for s in self._by_bucket.values())
        self.epoch = 0
        self.step = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def plan(self, epoch: int) -> list[list[Sighting]]:
        """The epoch's batches as lists of (image index, copy), without loading any image."""
        rng = rng_for(self.seed, epoch, "", 0, "order")
        batches = []
        for sightings in self._by_bucket.values():
            order = list(sightings)
            if self.shuffle:
                rng.shuffle(order)
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[Sample]]:
        """The batches of ``epoch`` from index ``start``; deterministic in (seed, epoch).

        ``state_dict()`` taken after receiving a batch resumes right after it.
        """
        if not 0 <= start <= self.steps_per_epoch:
            raise ConfigError(f"start {start} is outside the epoch's {self.steps_per_epoch} batches")
        plan = self.plan(epoch)
        for step in range(start, len(plan)):
            batch = [self.images.sample(i, seed=self.seed, epoch=epoch, copy=c) for i, c in plan[step]]
            self.epoch, self.step = epoch, step + 1
            if self.step == self.steps_per_epoch:
                self.epoch, self.step = epoch + 1, 0
            yield batch

    def resume(self) -> Iterator[list[Sample]]:
        """The rest of the current epoch, from the position restored by ``load_state_dict``."""
        return self.batches(self.epoch, self.step)

    def fingerprint(self) -> str:
        """sha256 over what fixes the order: image keys, contents, repeats, buckets, batch size and options."""
        config = self.images.config
        parts = [f"{self.batch_size}|{self.shuffle}|{config.flip}|{config.random_crop}"]
        parts += [
            f"{it.key}|{it.sha256}|{n}|{it.bucket}|{it.caption}|{it.subset.options.is_reg}"
            for it, n in zip(self.images.items, self.copies)
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is: plain data (JSON-safe) for a training state."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``; the next batch is then ``next(self.resume())``.

        Raises:
            ConfigError: the state was saved with another seed, batch size or dataset.
        """
        for name in ("seed", "batch_size", "shuffle"):
            if state.get(name) != getattr(self, name):
                raise ConfigError(
                    f"the saved data order used {name}={state.get(name)!r}, this run "
                    f"{getattr(self, name)!r}; resume with the same setting"
                )
        if state.get("fingerprint") != self.fingerprint():
            raise ConfigError(
                "the dataset changed since the training state was saved (images, captions, repeats "
                "or buckets); restore it, or start a new run instead of resuming"
            )
        step = int(state["step"])
        if not 0 <= step <= self.steps_per_epoch:
            raise ConfigError(f"the saved step {step} is outside the epoch's {self.steps_per_epoch} batches")
        self.epoch, self.step = int(state["epoch"]), step
