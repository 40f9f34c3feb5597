"""Dataset configuration: frozen dataclasses that map one-to-one onto a TOML dataset file.

A TOML dataset file holds the ``DatasetConfig`` fields at the top level and one ``[[folders]]`` table per folder with
the ``FolderConfig`` fields::

    resolution = 512
    flip = true

    [[folders]]
    path = "train/10_dog"        # relative paths are relative to the TOML file
    trigger = "sks dog"
    keep_tokens = 1
    shuffle_caption = true

    [[folders]]
    path = "reg"                 # regularization (prior preservation) images, as kohya's reg_data_dir
    is_reg = true
    class_tokens = "dog"

An unknown key is an error that names the key and the file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["DatasetConfig", "FolderConfig", "load_dataset_config", "IMAGE_EXTENSIONS", "CAPTION_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
"""Image files that are used (any case)."""
CAPTION_EXTENSIONS = (".txt", ".caption")
"""Caption files that are read: ``caption_extension`` first, then the other one."""


@dataclass(frozen=True)
class FolderConfig:
    """One folder of images and how its captions are made.

    ``path`` is either a folder of images, or a kohya parent folder whose ``N_tokens`` subfolders hold the images
    (``N`` repeats; ``tokens`` is the caption of an image that has no caption file). Every subfolder of a parent
    uses this folder's caption options.
    """

    path: str
    """Folder of images, or a parent of ``N_tokens`` subfolders."""
    repeats: int | None = None
    """Times each image is seen per epoch; None takes ``N`` from an ``N_tokens`` folder name, else 1."""
    class_tokens: str | None = None
    """Caption of an image without a caption file; None takes ``tokens`` from an ``N_tokens`` folder name."""
    caption_extension: str = ".txt"
    """Caption file read first; the other suffix (``.caption`` or ``.txt``) is read when this one is missing or
    empty. When both have text, this one wins (and ``lorakit dataset check`` warns if they differ)."""
    caption_separator: str = ","
    """Separator between the tags of a caption."""
    keep_tokens: int = 0
    """Leading tags that stay in place (never shuffled or dropped)."""
    shuffle_caption: bool = False
    """Shuffle the tags after the first ``keep_tokens`` each time an image is seen."""
    caption_dropout_rate: float = 0.0
    """Probability that an image is trained with an empty caption (unconditional)."""
    tag_dropout_rate: float = 0.0
    """Probability that each tag after the first ``keep_tokens`` is left out."""
    trigger: str | None = None
    """Word(s) put first in every caption of this folder (moved to the front, never duplicated)."""
    is_reg: bool = False
    """Regularization (prior preservation) images, as kohya's ``reg_data_dir``: mixed into the batches with their
    captions, balanced each epoch to as many sightings as the training images have (see ``ImageSet.copies``)."""

    def __post_init__(self) -> None:
        if not str(self.path):
            raise ConfigError("folder path is empty; give the folder of images")
        if self.repeats is not None and self.repeats < 1:
            raise ConfigError(f"{self.path}: repeats must be at least 1, not {self.repeats}")
        if self.caption_extension not in CAPTION_EXTENSIONS:
            raise ConfigError(
                f"{self.path}: caption_extension must be one of {', '.join(CAPTION_EXTENSIONS)}, "
                f"not {self.caption_extension!r}"
            )
        if not self.caption_separator:
            raise ConfigError(f"{self.path}: caption_separator is empty; use ',' for comma-separated tags")
        if self.keep_tokens < 0:
            raise ConfigError(f"{self.path}: keep_tokens must be 0 or more, not {self.keep_tokens}")
        for name in ("caption_dropout_rate", "tag_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{self.path}: {name} must be in [0, 1], not {value}")
        if self.trigger is not None and not self.trigger.strip():
            raise ConfigError(f"{self.path}: trigger is empty; leave it out or give a word")


@dataclass(frozen=True)
class DatasetConfig:
    """Which folders make the dataset, and how images become training samples."""

    folders: tuple[FolderConfig, ...]
    """The folders; at least one."""
    resolution: int = 512
    """Training resolution: every bucket's area is at most ``resolution ** 2``."""
    enable_buckets: bool = True
    """Aspect-ratio bucketing; False resizes and crops every image to ``resolution x resolution``."""
    min_bucket_reso: int = 256
    """Smallest bucket side in pixels."""
    max_bucket_reso: int | None = None
    """Largest bucket side in pixels; None means ``max(1024, 2 * resolution)`` (1024 at 512, 2048 at 1024: wide
    buckets such as 1344 x 768 exist at SDXL's resolution)."""
    bucket_reso_steps: int = 64
    """Bucket sides are multiples of this (64 keeps latents a multiple of 8)."""
    bucket_no_upscale: bool = False
    """Keep images smaller than ``resolution ** 2`` at their own size (rounded down to the step) instead of
    upscaling them to a full-size bucket."""
    random_crop: bool = False
    """Crop a random window of the resized image instead of its centre (refused by the latent cache)."""
    flip: bool = False
    """Mirror each image left-right with probability 1/2, decided per (seed, epoch, image)."""

    def __post_init__(self) -> None:
        folders = tuple(self.folders) if not isinstance(self.folders, tuple) else self.folders
        object.__setattr__(self, "folders", folders)
        if not folders:
            raise ConfigError("a dataset needs at least one folder; add a [[folders]] table with a path")
        if self.bucket_reso_steps < 8 or self.bucket_reso_steps % 8:
            raise ConfigError(f"bucket_reso_steps must be a positive multiple of 8, not {self.bucket_reso_steps}")
        step = self.bucket_reso_steps
        if self.resolution < step:
            raise ConfigError(f"resolution {self.resolution} is below bucket_reso_steps {step}; use at least {step}")
        if self.min_bucket_reso < step or self.min_bucket_reso % step:
            raise ConfigError(
                f"min_bucket_reso must be a multiple of {step} and at least {step}, not {self.min_bucket_reso}"
            )
        top = self.max_bucket
        if top % step or top < self.min_bucket_reso:
            raise ConfigError(
                f"max_bucket_reso must be a multiple of {step} and at least min_bucket_reso "
                f"({self.min_bucket_reso}), not {top}"
            )
        if self.enable_buckets and top < self.resolution // step * step:
            raise ConfigError(f"max_bucket_reso {top} is below resolution {self.resolution}; raise max_bucket_reso")

    @property
    def max_bucket(self) -> int:
        """The largest bucket side in effect (``max_bucket_reso``, or its default for this resolution)."""
        if self.max_bucket_reso is not None:
            return self.max_bucket_reso
        step = self.bucket_reso_steps
        return max(1024, 2 * self.resolution) // step * step

    @classmethod
    def for_folder(cls, path: str | Path, **options: Any) -> DatasetConfig:
        """A dataset of one folder: ``options`` are split between ``FolderConfig`` and ``DatasetConfig`` fields."""
        folder_names = {f.name for f in fields(FolderConfig)}
        dataset_names = {f.name for f in fields(cls)} - {"folders"}
        unknown = set(options) - folder_names - dataset_names
        if unknown:
            raise ConfigError(f"unknown dataset option(s): {', '.join(sorted(unknown))}")
        folder = FolderConfig(path=str(path), **{k: v for k, v in options.items() if k in folder_names})
        return cls(folders=(folder,), **{k: v for k, v in options.items() if k in dataset_names})

    def with_options(self, **options: Any) -> DatasetConfig:
        """A copy with some ``DatasetConfig`` fields replaced (e.g. a --resolution flag over the file)."""
        return replace(self, **options)


def load_dataset_config(path: str | Path, **overrides: Any) -> DatasetConfig:
    """Read a TOML dataset file into a ``DatasetConfig``.

    Args:
        path: the TOML file. Relative folder paths in it are taken relative to the file's folder.
        overrides: ``DatasetConfig`` fields that replace the file's values (None values are ignored).

    Raises:
        InputError: the file is missing or unreadable.
        ConfigError: invalid TOML, an unknown key (named with the file), a wrong type or an out-of-range value.
    """
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{file}: no such dataset file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{file}: cannot read the dataset file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc}); fix the syntax") from None
    values = _table_values(raw, DatasetConfig, file, where="top level", skip={"folders"})
    folder_tables = raw.get("folders")
    if not isinstance(folder_tables, list) or not folder_tables:
        raise ConfigError(f'{file}: no [[folders]] table; add one with path = "your/images"')
    folders = []
    for number, table in enumerate(folder_tables, 1):
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: folders entry {number} is not a table; write it as [[folders]]")
        folder_values = _table_values(table, FolderConfig, file, where=f"[[folders]] number {number}")
        if "path" not in folder_values:
            raise ConfigError(f'{file}: [[folders]] number {number} has no path; add path = "your/images"')
        folder_path = Path(folder_values["path"])
        folder_values["path"] = str(folder_path if folder_path.is_absolute() else file.parent / folder_path)
        folders.append(_build(FolderConfig, folder_values, file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _build(DatasetConfig, {**values, "folders": tuple(folders)}, file)


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "int | None": (int,),
    "str | None": (str,),
}


def _table_values(table: dict, cls: type, file: Path, *, where: str, skip: frozenset | set = frozenset()) -> dict:
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in known or key in ("folders",):
            choices = ", ".join(sorted(set(known) - {"folders"}))
            raise ConfigError(f"{file}: unknown key {key!r} at {where}; known keys: {choices}")
        allowed = _TYPES.get(str(known[key].type), ())
        bad_bool = isinstance(value, bool) and bool not in allowed
        if allowed and (not isinstance(value, allowed) or bad_bool):
            raise ConfigError(f"{file}: {key} at {where} must be {known[key].type}, not {value!r}")
        values[key] = float(value) if str(known[key].type) == "float" else value
    return values


def _build(cls: type, values: dict, file: Path) -> Any:
    try:
        return cls(**values)
    except (ConfigError, TypeError) as exc:  # TypeError: an override that is not a field
        raise ConfigError(f"{file}: {exc}") from None
