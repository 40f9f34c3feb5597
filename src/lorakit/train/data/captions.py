"""Captions: reading caption files, and the per-epoch caption an image is trained with.

A caption is a list of tags separated by ``caption_separator`` (a comma). Each time an image is seen, in this order:

1. caption dropout: with probability ``caption_dropout_rate`` the caption is empty (trigger included);
2. the first ``keep_tokens`` tags stay in place; each later tag is dropped with probability ``tag_dropout_rate``;
3. the later tags are shuffled when ``shuffle_caption`` is on;
4. the trigger is put first; a tag equal to the trigger is removed elsewhere, so it is never duplicated. The
   trigger is not counted in ``keep_tokens`` (it always stays first).

Every random choice comes from ``rng_for(seed, epoch, key, copy)``: the same seed, epoch and image give the same
caption on every run and every machine.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from lorakit.errors import InputError
from lorakit.train.data.config import CAPTION_EXTENSIONS, FolderConfig

__all__ = ["rng_for", "split_tags", "read_caption", "caption_files", "epoch_caption"]


def rng_for(seed: int, epoch: int, key: str, copy: int = 0, purpose: str = "") -> random.Random:
    """A random generator that depends only on its arguments (sha256, not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{seed}\0{epoch}\0{key}\0{copy}\0{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Tags of a caption, stripped, empty ones left out: ``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def caption_files(image: Path, preferred: str = ".txt") -> list[Path]:
    """The caption files that exist for ``image``, the ``preferred`` extension first."""
    order = [preferred] + [ext for ext in CAPTION_EXTENSIONS if ext != preferred]
    return [image.with_suffix(ext) for ext in order if image.with_suffix(ext).is_file()]


def read_caption(path: Path) -> str:
    """A caption file's text on one line (UTF-8, a BOM ignored; line breaks become the separator's space).

    Raises:
        InputError: the file cannot be read or is not UTF-8.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: the caption is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the caption ({exc.strerror or exc})") from None
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def epoch_caption(caption: str, options: FolderConfig, rng: random.Random) -> str:
    """The caption for one sighting of an image (see the module docstring for the order of operations).

    Args:
        caption: the image's caption (from its file, or the folder's class tokens).
        options: the folder's caption options.
        rng: this sighting's generator (``rng_for(seed, epoch, key, copy)``).

    Returns:
        The tags joined with ``", "`` (or the separator followed by a space).
    """
    # Draw every random number in a fixed order whatever the options, so one option does not shift another's draws.
    dropped = rng.random() < options.caption_dropout_rate
    if dropped:
        return ""
    sep = options.caption_separator
    tags = split_tags(caption, sep)
    trigger = options.trigger.strip() if options.trigger else None
    if trigger is not None:
        tags = [t for t in tags if t != trigger]
    head, tail = tags[: options.keep_tokens], tags[options.keep_tokens :]
    if options.tag_dropout_rate > 0:
        tail = [t for t in tail if rng.random() >= options.tag_dropout_rate]
    if options.shuffle_caption:
        rng.shuffle(tail)
    if trigger is not None:
        head = [trigger] + head
    return (sep.strip() + " " if sep.strip() else sep).join(head + tail)
