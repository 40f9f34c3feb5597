"""``lorakit dataset check``: everything wrong with a dataset, and its aspect buckets, without changing anything.

On top of what indexing finds (folder names, corrupt images, caption files, stray files) the check reports:

- tiny images: smaller than one bucket step (an error), or upscaled more than 2x to reach their bucket (a warning);
  with ``bucket_no_upscale``, images that train below ``min_bucket_reso``;
- heavy crops: more than 20% of the resized image cut away to fit its bucket;
- exact duplicates (same sha256) and near duplicates (difference hashes at most 4 bits apart; up to 5,000 images);
- images that share a caption file (``a.png`` and ``a.jpg`` both read ``a.txt``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import InputError
from lorakit.train.data.config import DatasetConfig
from lorakit.train.data.folders import Problem, error_at, warning_at
from lorakit.train.data.imageset import ImageItem, index_dataset

__all__ = ["BucketRow", "DatasetReport", "check_dataset"]

NEAR_DUPLICATE_BITS = 4
"""Difference hashes this close (of 64 bits) are near duplicates: re-encodes, resizes, small edits."""
NEAR_DUPLICATE_MAX_IMAGES = 5000
"""Above this many images the quadratic near-duplicate scan is skipped (exact duplicates are still found)."""
MAX_UPSCALE = 2.0
"""An image enlarged more than this to reach its bucket is reported as tiny."""
MAX_CROP_FRACTION = 0.2
"""An image losing more than this fraction of its resized area to the crop is reported."""


@dataclass(frozen=True)
class BucketRow:
    """One aspect bucket of the dataset.

    Attributes:
        width, height: the bucket's size in pixels.
        images: images in it.
        per_epoch: samples per epoch in it (repeats counted).
    """

    width: int
    height: int
    images: int
    per_epoch: int


@dataclass
class DatasetReport:
    """The result of ``check_dataset``.

    Attributes:
        folders: the configured folders.
        resolution: the training resolution checked against.
        images: usable images found.
        per_epoch: samples per epoch (repeats counted).
        problems: every problem, errors first, then by path.
        buckets: the aspect buckets, by size.
    """

    folders: list[str]
    resolution: int
    images: int
    per_epoch: int
    problems: list[Problem] = field(default_factory=list)
    buckets: list[BucketRow] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)


def check_dataset(config: DatasetConfig, progress=None) -> DatasetReport:
    """Check a dataset without writing anything.

    Args:
        config: the dataset (folders and bucket settings).
        progress: optional callable ``progress(done, total)`` called after each image is read.

    Returns:
        The problems (errors: training would refuse the dataset; warnings: it trains, maybe not as meant) and the
        bucket preview.

    Raises:
        InputError: a configured folder does not exist (nothing to check).
    """
    for folder in config.folders:
        if not Path(folder.path).is_dir():
            what = "is a file, not a folder" if Path(folder.path).exists() else "does not exist"
            raise InputError(f"{folder.path}: the dataset folder {what}; give the folder that holds the images")
    items, problems = index_dataset(config, progress)
    problems += _size_problems(items, config)
    problems += _duplicate_problems(items)
    problems += _shared_caption_problems(items)
    problems.sort(key=lambda p: (p.severity != "error", p.path, p.problem))
    counts: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    for item in items:
        counts[item.bucket][0] += 1
        counts[item.bucket][1] += item.subset.repeats
    buckets = [BucketRow(w, h, n, e) for (w, h), (n, e) in sorted(counts.items())]
    return DatasetReport(
        folders=[f.path for f in config.folders],
        resolution=config.resolution,
        images=len(items),
        per_epoch=sum(item.subset.repeats for item in items),
        problems=problems,
        buckets=buckets,
    )


def _size_problems(items: list[ImageItem], config: DatasetConfig) -> list[Problem]:
    problems = []
    step = config.bucket_reso_steps
    for item in items:
        (w, h), (rw, rh), (bw, bh) = item.size, item.plan.resized, item.bucket
        upscale = max(rw / w, rh / h)
        if min(w, h) < step:
            problems.append(error_at(item.path, f"tiny image ({w}x{h}, under {step} px)", "use a larger version"))
        elif upscale > MAX_UPSCALE:
            problems.append(
                warning_at(
                    item.path,
                    f"small image ({w}x{h}) enlarged {upscale:.1f}x to {rw}x{rh}: it will look soft",
                    f"use a version of at least {rw}x{rh}, or train at a lower resolution",
                )
            )
        elif config.bucket_no_upscale and min(bw, bh) < config.min_bucket_reso:
            problems.append(
                warning_at(
                    item.path,
                    f"small image ({w}x{h}) trains at {bw}x{bh} (no upscale)",
                    f"use a version of at least {config.min_bucket_reso} px on its short side",
                )
            )
        cropped = 1 - (bw * bh) / (rw * rh)
        if cropped > MAX_CROP_FRACTION:
            problems.append(
                warning_at(
                    item.path,
                    f"{cropped:.0%} cropped away to fit the {bw}x{bh} bucket",
                    "crop it to a less extreme aspect ratio yourself",
                )
            )
    return problems


def _duplicate_problems(items: list[ImageItem]) -> list[Problem]:
    problems = []
    first_by_hash: dict[str, ImageItem] = {}
    for item in items:
        first = first_by_hash.setdefault(item.sha256, item)
        if first is not item:
            problems.append(warning_at(item.path, f"exact duplicate of {first.key}", "remove one of the two"))
    unique = list(first_by_hash.values())
    if len(unique) > NEAR_DUPLICATE_MAX_IMAGES:
        return problems
    for i, a in enumerate(unique):
        for b in unique[i + 1 :]:
            distance = (a.dhash ^ b.dhash).bit_count()
            if distance <= NEAR_DUPLICATE_BITS:
                problems.append(
                    warning_at(
                        b.path,
                        f"near duplicate of {a.key} ({distance} of 64 hash bits differ)",
                        "remove one unless the difference matters",
                    )
                )
    return problems


def _shared_caption_problems(items: list[ImageItem]) -> list[Problem]:
    by_stem: dict[str, list[ImageItem]] = defaultdict(list)
    for item in items:
        by_stem[str(item.path.with_suffix(""))].append(item)
    problems = []
    for group in by_stem.values():
        if len(group) > 1:
            names = ", ".join(i.path.name for i in group)
            problems.append(
                warning_at(
                    group[0].path.with_suffix(".txt"),
                    f"{names} share one caption name",
                    "rename the images so each has its own caption file",
                )
            )
    return problems
