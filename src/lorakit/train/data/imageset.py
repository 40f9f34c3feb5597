"""The indexed dataset: every image with its caption, bucket and content hash, and the samples made from it.

``load_dataset`` reads each configured folder once (every image is decoded to catch corrupt files before training,
and hashed for the caches), refuses a dataset with errors, and never writes anything.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from lorakit.errors import ConfigError, InputError
from lorakit.train.data.buckets import BucketChooser, BucketPlan
from lorakit.train.data.captions import caption_files, epoch_caption, read_caption, rng_for, split_tags
from lorakit.train.data.config import DatasetConfig
from lorakit.train.data.folders import Problem, Subset, error_at, list_images, scan_folder, warning_at
from lorakit.train.data.transforms import DecodedImage, crop_for, open_rgb, read_image, to_tensor

__all__ = ["ImageItem", "Sample", "ImageSet", "load_dataset", "index_dataset"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageItem:
    """One image of the dataset.

    Attributes:
        key: stable id: the path relative to its configured folder, with '/' separators (``"10_dog/a.png"``).
        path: the image file.
        subset: the folder it belongs to (repeats, caption options).
        caption: its caption before any per-epoch change (file text, or the folder's class tokens, or "").
        caption_source: the caption file used, ``"class tokens"``, or ``"none"``.
        sha256: sha256 of the file's bytes.
        size: (width, height), upright.
        plan: its bucket and resize.
        dhash: 64-bit difference hash, for near-duplicate checks.
    """

    key: str
    path: Path
    subset: Subset
    caption: str
    caption_source: str
    sha256: str
    size: tuple[int, int]
    plan: BucketPlan
    dhash: int

    @property
    def bucket(self) -> tuple[int, int]:
        """(width, height) of this image's training tensor."""
        return self.plan.bucket


class Sample:
    """One image as it is trained at one step.

    The pixels are decoded on first access: a batch whose latents are all cached never decodes an image.

    Attributes:
        key: the image's ``ImageItem.key``.
        pixels: float32 ``[3, H, W]`` in [-1, 1], resized, cropped and flipped for this epoch.
        caption: the caption for this epoch (shuffle, keep tokens, dropout, trigger applied).
        original_size: (h, w) of the image file (SDXL ``original_size``).
        crop_top_left: (top, left) of the crop in the resized image, measured in the flipped image when flipped
            (SDXL ``crops_coords_top_left``).
        target_size: (h, w) of ``pixels`` (SDXL ``target_size``).
        flipped: whether the image was mirrored.
        sha256: the image file's sha256 (latent cache key).
        copy: which repeat of the image in the epoch this is (0 for the first).
        is_reg: a regularization image (its loss is weighted by ``training.prior_loss_weight``).
    """

    __slots__ = (
        "key",
        "_pixels",
        "_load",
        "caption",
        "original_size",
        "crop_top_left",
        "target_size",
        "flipped",
        "sha256",
        "copy",
        "is_reg",
    )

    def __init__(
        self,
        key: str,
        pixels: torch.Tensor | None,
        caption: str,
        original_size: tuple[int, int],
        crop_top_left: tuple[int, int],
        target_size: tuple[int, int],
        flipped: bool = False,
        sha256: str = "",
        copy: int = 0,
        *,
        load: Callable[[], torch.Tensor] | None = None,
        is_reg: bool = False,
    ) -> None:
        if pixels is None and load is None:
            raise ValueError("a Sample needs pixels or a function that loads them")
        self.key, self._pixels, self._load, self.caption = key, pixels, load, caption
        self.original_size, self.crop_top_left, self.target_size = original_size, crop_top_left, target_size
        self.flipped, self.sha256, self.copy = flipped, sha256, copy
        self.is_reg = is_reg

    @property
    def pixels(self) -> torch.Tensor:
        if self._pixels is None:
            self._pixels = self._load()
            self._load = None
        return self._pixels

    @property
    def loaded(self) -> bool:
        """Whether the pixels have been decoded."""
        return self._pixels is not None

    def __repr__(self) -> str:
        return (
            f"Sample(key={self.key!r}, caption={self.caption!r}, target_size={self.target_size}, "
            f"crop_top_left={self.crop_top_left}, flipped={self.flipped}, copy={self.copy})"
        )


class ImageSet:
    """The images of a dataset, in a stable order (configured folder, subfolder, file name).

    Attributes:
        config: the dataset configuration.
        items: the images.
        problems: warnings found while indexing (a dataset with errors is refused).
    """

    def __init__(self, config: DatasetConfig, items: list[ImageItem], problems: list[Problem] | None = None) -> None:
        self.config = config
        self.items = items
        self.problems = problems or []

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_samples(self) -> int:
        """Training images per epoch, repeats counted (regularization images not included)."""
        return sum(item.subset.repeats for item in self.items if not item.subset.options.is_reg)

    @property
    def num_reg_samples(self) -> int:
        """Regularization images per epoch after balancing (see :meth:`copies`)."""
        return sum(n for item, n in zip(self.items, self.copies()) if item.subset.options.is_reg)

    def copies(self) -> list[int]:
        """Sightings per epoch of each item: its repeats for a training image; for regularization images, kohya's
        balance, so that they are seen as often as the training images in all.

        The regularization images are taken in order with their own repeats until they reach the training count
        ``N``; if they fall short, further rounds add one sighting per image, in order, until ``N`` is reached.
        Regularization images beyond ``N`` are not used (as in kohya's sd-scripts).

        Raises:
            ConfigError: the dataset has regularization images but no training image.
        """
        train = self.num_samples
        out = [0 if item.subset.options.is_reg else item.subset.repeats for item in self.items]
        reg = [i for i, item in enumerate(self.items) if item.subset.options.is_reg]
        if reg and not train:
            raise ConfigError("the dataset has only regularization (is_reg) folders; add a folder of training images")
        seen, first_round = 0, True
        while reg and seen < train:
            for i in reg:
                step = self.items[i].subset.repeats if first_round else 1
                out[i] += step
                seen += step
                if seen >= train:
                    break
            first_round = False
        return out

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """(width, height) -> images per epoch in that bucket (repeats and balanced reg images counted), sorted."""
        counts: Counter[tuple[int, int]] = Counter()
        for item, n in zip(self.items, self.copies()):
            counts[item.bucket] += n
        return dict(sorted(counts.items()))

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Tag counts per folder in kohya's ``ss_tag_frequency`` shape: ``{folder name: {tag: images with it}}``.

        Each image counts once (repeats are not counted, as kohya does); the trigger counts as a tag of every image
        of its folder.
        """
        result: dict[str, dict[str, int]] = {}
        for item in self.items:
            options = item.subset.options
            tags = split_tags(item.caption, options.caption_separator)
            if options.trigger:
                tags = [options.trigger.strip()] + [t for t in tags if t != options.trigger.strip()]
            counts = result.setdefault(item.subset.name, {})
            for tag in dict.fromkeys(tags):
                counts[tag] = counts.get(tag, 0) + 1
        return result

    def caption(self, index: int, *, seed: int, epoch: int, copy: int = 0) -> str:
        """The caption of image ``index`` for one sighting; deterministic in (seed, epoch, key, copy)."""
        item = self.items[index]
        return epoch_caption(item.caption, item.subset.options, rng_for(seed, epoch, item.key, copy, "caption"))

    def view(self, index: int, *, seed: int, epoch: int, copy: int = 0) -> tuple[tuple[int, int], bool]:
        """Crop (top, left) in the resized image before flipping, and whether the sighting is flipped."""
        item = self.items[index]
        rng = rng_for(seed, epoch, item.key, copy, "view")
        flip = self.config.flip and rng.random() < 0.5
        top_left = crop_for(item.plan, rng if self.config.random_crop else None)
        return top_left, flip

    def sample(self, index: int, *, seed: int, epoch: int, copy: int = 0) -> Sample:
        """Image ``index`` as trained in ``epoch`` (its ``copy``-th repeat); deterministic in its arguments."""
        top_left, flip = self.view(index, seed=seed, epoch=epoch, copy=copy)
        caption = self.caption(index, seed=seed, epoch=epoch, copy=copy)
        return self.view_sample(index, top_left=top_left, flip=flip, caption=caption, copy=copy)

    def view_sample(
        self,
        index: int,
        *,
        top_left: tuple[int, int] | None = None,
        flip: bool = False,
        caption: str | None = None,
        copy: int = 0,
    ) -> Sample:
        """Image ``index`` cropped at ``top_left`` (None: centre) and mirrored if ``flip``; ``caption`` defaults to
        the image's own caption."""
        item = self.items[index]
        top_left = crop_for(item.plan, None) if top_left is None else top_left
        top, left = top_left
        if flip:  # report the crop as seen in the mirrored image, where the left edge is now the right one
            left = item.plan.resized[0] - left - item.plan.bucket[0]
        return Sample(
            key=item.key,
            pixels=None,
            caption=item.caption if caption is None else caption,
            original_size=(item.size[1], item.size[0]),
            crop_top_left=(top, left),
            target_size=(item.plan.bucket[1], item.plan.bucket[0]),
            flipped=flip,
            sha256=item.sha256,
            copy=copy,
            is_reg=item.subset.options.is_reg,
            load=partial(to_tensor_from_file, item.path, item.plan, top_left, flip),
        )


def to_tensor_from_file(path: Path, plan: BucketPlan, top_left: tuple[int, int], flip: bool) -> torch.Tensor:
    """Decode ``path`` and make its training tensor (see ``transforms.to_tensor``)."""
    return to_tensor(open_rgb(path, at_least=plan.resized), plan, top_left, flip)


def bucket_chooser(config: DatasetConfig) -> BucketChooser:
    """The bucket chooser for a dataset configuration."""
    return BucketChooser(
        config.resolution,
        config.min_bucket_reso,
        config.max_bucket,
        config.bucket_reso_steps,
        no_upscale=config.bucket_no_upscale,
        enable=config.enable_buckets,
    )


def index_dataset(config: DatasetConfig, progress=None) -> tuple[list[ImageItem], list[Problem]]:
    """Index every image of the dataset and collect its problems; raises nothing for a bad image.

    Args:
        config: the dataset.
        progress: optional callable ``progress(done, total)`` called after each image.
    """
    chooser = bucket_chooser(config)
    problems: list[Problem] = []
    subsets: list[tuple[Path, Subset]] = []
    for folder in config.folders:
        root = Path(folder.path).resolve()
        found, folder_problems = scan_folder(replace(folder, path=str(root)))
        problems += folder_problems
        subsets += [(root, subset) for subset in found]
    jobs = [(root, subset, path) for root, subset in subsets for path in list_images(subset.folder)]
    items: list[ImageItem] = []
    seen: dict[str, Path] = {}
    for done, (root, subset, path) in enumerate(jobs, 1):
        item = _index_image(root, subset, path, chooser, problems)
        if item is not None and item.key in seen:
            problems.append(
                error_at(
                    path,
                    f"the same key {item.key!r} as {seen[item.key]}",
                    "give the configured folders different names",
                )
            )
        elif item is not None:
            items.append(item)
            seen[item.key] = path
        if progress is not None:
            progress(done, len(jobs))
    return items, problems


def _index_image(
    root: Path, subset: Subset, path: Path, chooser: BucketChooser, problems: list[Problem]
) -> ImageItem | None:
    try:
        decoded: DecodedImage = read_image(path)
    except InputError as exc:
        problems.append(_problem_from(exc, path))
        return None
    try:
        plan = chooser.choose(*decoded.size)
    except ValueError as exc:
        problems.append(error_at(path, str(exc), "remove it or use a larger version"))
        return None
    caption, source = _caption_of(path, subset, problems)
    # The key includes the configured folder's own name: "train/10_dog/a.png", or "10_dog/a.png" for that folder.
    key = path.relative_to(root.parent).as_posix() if path.is_relative_to(root.parent) else path.name
    return ImageItem(key, path, subset, caption, source, decoded.sha256, decoded.size, plan, decoded.dhash)


def _problem_from(exc: InputError, path: Path) -> Problem:
    # Errors read "<path>: <problem>; <fix>": split them into the table's columns.
    problem, _, fix = str(exc).removeprefix(f"{path}: ").rpartition("; ")
    return error_at(path, problem or fix, fix if problem else "fix or remove the file")


def _caption_of(path: Path, subset: Subset, problems: list[Problem]) -> tuple[str, str]:
    options = subset.options
    files = caption_files(path, options.caption_extension)
    texts = []
    for file in files:
        try:
            texts.append(read_caption(file))
        except InputError as exc:
            problems.append(_problem_from(exc, file))
            texts.append("")
    used = next((i for i, text in enumerate(texts) if text), None)
    if len(files) == 2 and texts[0] and texts[1] and texts[0] != texts[1]:
        problems.append(
            warning_at(files[1], f"differs from {files[0].name}, which is used", "remove one of the two caption files")
        )
    if used is not None:
        return texts[used], files[used].name
    fallback = options.class_tokens or ""
    if files:
        what = "empty caption file" + (f": the class tokens '{fallback}' are used" if fallback else "")
        problems.append(warning_at(files[0], what, "write the caption or remove the file"))
    elif not fallback and not options.trigger:
        problems.append(
            warning_at(
                path,
                "no caption file and no class tokens: empty caption",
                f"write {path.with_suffix(options.caption_extension).name}, or name the folder N_tokens",
            )
        )
    return fallback, ("class tokens" if fallback else "none")


def load_dataset(config: DatasetConfig, progress=None) -> ImageSet:
    """Index the dataset's folders, check them, and return the images; never writes into the folders.

    Args:
        config: the dataset.
        progress: optional callable ``progress(done, total)`` called after each image.

    Raises:
        InputError: a folder is missing or has no usable image, an image is corrupt, a folder is misnamed; the
            message names the first problem and the count of others (``lorakit dataset check`` lists them all).
    """
    items, problems = index_dataset(config, progress)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise InputError(f"{first.path}: {first.problem}; {first.fix}{more}; run `lorakit dataset check` for a list")
    if not items:
        raise InputError(f"{', '.join(f.path for f in config.folders)}: no usable images in the dataset")
    if problems:  # one line, not one per image: the check command lists them all
        first = problems[0]
        log.warning(
            "%d dataset warning(s), first: %s: %s; run `lorakit dataset check` for the list",
            len(problems),
            first.path,
            first.problem,
        )
    return ImageSet(config, items, problems)
