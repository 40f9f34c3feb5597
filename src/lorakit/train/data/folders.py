"""Folder layout: which folders hold training images, with what repeats, and what is wrong with their names.

A configured folder is read in one of two ways:

- an image folder: the images in it (not in its subfolders). If its own name is ``N_tokens``, ``N`` is its repeats and
  ``tokens`` its class tokens unless the configuration gives them;
- a kohya parent folder (it has at least one ``N_tokens`` subfolder): the images of every ``N_tokens`` subfolder,
  with ``N`` repeats and ``tokens`` as the caption of images without a caption file. Images directly in the parent
  and image subfolders with other names would be ignored by kohya without a word; here they are errors.

Nothing here writes anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from lorakit.train.data.config import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, FolderConfig

__all__ = ["Problem", "error_at", "warning_at", "Subset", "scan_folder", "parse_repeat_folder", "list_images"]

_REPEAT_NAME = re.compile(r"^(\d+)_(.*)$")
_NEAR_REPEAT_NAME = re.compile(r"^(\d+)\s*[\s\-.,]\s*(.+)$")
_TRAILING_REPEAT = re.compile(r"^(.+?)[_\s\-](\d+)$")
_UNSUPPORTED_IMAGES = {".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jfif", ".svg", ".psd"}
_IGNORED_FILES = {".ds_store", "thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset.

    Attributes:
        severity: ``"error"`` (training refuses the dataset) or ``"warning"`` (it trains, maybe not as meant).
        path: the file or folder concerned.
        problem: what is wrong, one line.
        fix: what to do, one line.
    """

    severity: str
    path: str
    problem: str
    fix: str


@dataclass(frozen=True)
class Subset:
    """A folder whose images are used, with its settings resolved.

    Attributes:
        folder: the folder holding the images.
        name: the folder's name (the key of ``ss_tag_frequency``).
        options: the folder's options with ``repeats`` and ``class_tokens`` resolved from its name when not given.
    """

    folder: Path
    name: str
    options: FolderConfig

    @property
    def repeats(self) -> int:
        return self.options.repeats or 1


def error_at(path: Path | str, problem: str, fix: str) -> Problem:
    """An error: training refuses the dataset."""
    return Problem("error", str(path), problem, fix)


def warning_at(path: Path | str, problem: str, fix: str) -> Problem:
    """A warning: the dataset trains, maybe not as meant."""
    return Problem("warning", str(path), problem, fix)


def parse_repeat_folder(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` -> ``(10, "sks dog")``; None when the name does not start with ``N_``."""
    match = _REPEAT_NAME.match(name)
    return (int(match.group(1)), match.group(2).strip()) if match else None


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (png, jpg, jpeg, webp in any case), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_folder(config: FolderConfig) -> tuple[list[Subset], list[Problem]]:
    """The subsets a configured folder stands for, and the problems of its layout (file level problems included).

    Args:
        config: the configured folder.

    Returns:
        The subsets (possibly none) and the problems found.
    """
    root = Path(config.path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        return [], [error_at(root, f"the dataset folder {what}", "give the folder that holds the images")]
    children = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in children if p.is_dir()]
    repeat_dirs = [d for d in subdirs if parse_repeat_folder(d.name) is not None]
    if repeat_dirs:
        return _scan_parent(root, config, subdirs)
    problems = _subfolder_problems(subdirs, parent_mode=False)
    if not list_images(root):
        if not any(p.severity == "error" for p in problems):
            parents = [d for d in subdirs if any(parse_repeat_folder(c.name) for c in d.iterdir() if c.is_dir())]
            fix = (
                f"give the folder {parents[0]} instead: it holds the N_name folders"
                if parents
                else "put the images here, or in N_name subfolders such as 10_dog"
            )
            problems.append(error_at(root, "no images (png, jpg, jpeg, webp) in the folder", fix))
        return [], problems + _file_problems(root)
    return [_subset(root, config)], problems + _file_problems(root)


def _scan_parent(root: Path, config: FolderConfig, subdirs: list[Path]) -> tuple[list[Subset], list[Problem]]:
    problems: list[Problem] = []
    if list_images(root):
        problems.append(
            error_at(
                root,
                f"{len(list_images(root))} image(s) directly in a parent of N_name folders",
                f"move them into an N_name subfolder (e.g. 1_{root.name}); they would not be used",
            )
        )
    problems += _subfolder_problems(subdirs, parent_mode=True)
    subsets = []
    for folder in subdirs:
        parsed = parse_repeat_folder(folder.name)
        if parsed is None:
            continue
        problems += _repeat_name_problems(folder, *parsed)
        problems += _file_problems(folder)
        nested = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and _has_images(p))
        problems += [
            warning_at(p, "images in a subfolder of a repeat folder are not used", "move them up, or into N_name")
            for p in nested
        ]
        if parsed[0] >= 1 and list_images(folder):
            subsets.append(_subset(folder, config, parsed))
        elif parsed[0] >= 1:
            problems.append(warning_at(folder, "no images in this folder", "add images or remove it"))
    return subsets, problems


def _subset(folder: Path, config: FolderConfig, parsed: tuple[int, str] | None = None) -> Subset:
    parsed = parsed if parsed is not None else parse_repeat_folder(folder.name)
    repeats, tokens = parsed if parsed is not None else (None, None)
    options = replace(
        config,
        path=str(folder),
        repeats=config.repeats if config.repeats is not None else (repeats or 1),
        class_tokens=config.class_tokens if config.class_tokens is not None else (tokens or None),
    )
    return Subset(folder=folder, name=folder.name, options=options)


def _repeat_name_problems(folder: Path, repeats: int, tokens: str) -> list[Problem]:
    name = folder.name
    if repeats == 0:
        return [
            error_at(
                folder,
                "0 repeats: the images would never be used",
                f"rename it to 1_{tokens or 'name'} or more repeats",
            )
        ]
    problems = []
    if name.split("_", 1)[0].startswith("0"):
        problems.append(
            warning_at(
                folder,
                f"leading zero: read as {repeats} repeats",
                f"rename it to {repeats}_{tokens} if that is not what you meant",
            )
        )
    if not tokens:
        problems.append(
            warning_at(
                folder,
                "no class tokens after N_: images without a caption file get an empty caption",
                f"rename it to {repeats}_<token class>, e.g. {repeats}_sks dog",
            )
        )
    return problems


def _subfolder_problems(subdirs: list[Path], *, parent_mode: bool) -> list[Problem]:
    problems = []
    for folder in subdirs:
        if parse_repeat_folder(folder.name) is not None or not _has_images(folder):
            continue
        near = _NEAR_REPEAT_NAME.match(folder.name)
        trailing = _TRAILING_REPEAT.match(folder.name)
        if near:
            fix = f"rename it to {int(near.group(1))}_{near.group(2)} (an underscore after the repeat count)"
            problems.append(error_at(folder, "looks like a repeat folder but is not named N_name", fix))
        elif trailing and trailing.group(2).isdigit():
            fix = f"rename it to {int(trailing.group(2))}_{trailing.group(1)} (the repeat count comes first)"
            problems.append(error_at(folder, "the repeat count is at the end of the name", fix))
        elif parent_mode:
            problems.append(
                error_at(
                    folder,
                    "image folder without a repeat count: it would be ignored",
                    f"rename it to N_name, e.g. 1_{_tokens_guess(folder.name)}",
                )
            )
        else:
            problems.append(
                warning_at(
                    folder,
                    "images in a subfolder are not used",
                    f"rename it to N_name (e.g. 1_{_tokens_guess(folder.name)}) to train it",
                )
            )
    return problems


def _tokens_guess(name: str) -> str:
    # "x_dog" -> "dog": drop a non-numeric prefix the user probably meant as the repeat count.
    head, _, rest = name.partition("_")
    return rest if rest and not head.isdigit() and len(head) <= 2 else name


def _has_images(folder: Path) -> bool:
    try:
        return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir() if p.is_file())
    except OSError:
        return False


def _file_problems(folder: Path) -> list[Problem]:
    """Non-image files, unsupported images and captions without an image in ``folder``."""
    problems = []
    stems = {p.stem for p in list_images(folder)}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if not path.is_file() or path.name.startswith(".") or path.name.lower() in _IGNORED_FILES:
            continue
        if suffix in IMAGE_EXTENSIONS:
            continue
        if suffix in CAPTION_EXTENSIONS:
            if path.stem not in stems:
                problems.append(
                    warning_at(
                        path,
                        "caption file without an image of the same name",
                        "rename it to match its image, or remove it",
                    )
                )
        elif suffix in _UNSUPPORTED_IMAGES:
            problems.append(warning_at(path, f"{suffix} images are not used", "convert it to PNG or JPEG"))
        elif suffix == ".npz":
            problems.append(
                warning_at(
                    path,
                    "a latent cache left by another trainer (not used)",
                    "delete it, or keep caches outside the dataset folder",
                )
            )
        else:
            problems.append(
                warning_at(path, "not an image or caption file (not used)", "move it out of the dataset folder")
            )
    return problems
