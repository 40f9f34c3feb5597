"""Reading images and turning them into training tensors: resize to cover the bucket, crop, flip, scale to [-1, 1].

Images are opened read-only with Pillow, their EXIF orientation applied (a phone photo trains upright) and converted
to RGB. Downscaling averages pixels (Pillow's BOX filter, like OpenCV's INTER_AREA that kohya uses); upscaling uses
Lanczos.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lorakit.errors import InputError
from lorakit.train.data.buckets import BucketPlan

__all__ = ["DecodedImage", "read_image", "open_rgb", "crop_for", "to_tensor", "difference_hash"]


@dataclass(frozen=True)
class DecodedImage:
    """An image file checked by decoding it fully.

    Attributes:
        sha256: lower-case sha256 of the file's bytes (the cache key of its content).
        size: (width, height) after the EXIF orientation is applied.
        dhash: 64-bit difference hash of its pixels, for near-duplicate detection.
    """

    sha256: str
    size: tuple[int, int]
    dhash: int


def read_image(path: Path) -> DecodedImage:
    """Read, hash and fully decode an image file (a truncated or corrupt file fails here, not mid-training).

    Raises:
        InputError: the file cannot be read, or is not a complete image.
    """
    data = _read_bytes(path)
    # A JPEG decodes at 1/8 scale here: every byte is still decoded, which is what catches damage, 8x faster.
    image, size = _decode(io.BytesIO(data), path, at_least=(64, 64))
    return DecodedImage(hashlib.sha256(data).hexdigest(), size, difference_hash(image))


def open_rgb(path: Path, at_least: tuple[int, int] | None = None) -> Image.Image:
    """The decoded RGB image, upright (EXIF orientation applied).

    Args:
        path: the image file.
        at_least: (width, height) the caller will resize to; a JPEG may then be decoded at a reduced scale
            (1/2, 1/4, 1/8) that is still at least this large, which is much faster for large photos.

    Raises:
        InputError: the file cannot be read, or is not a complete image.
    """
    return _decode(io.BytesIO(_read_bytes(path)), path, at_least)[0]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the image ({exc.strerror or exc}); check its permissions") from None


_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the picture by 90 degrees
# What Pillow raises on damaged files varies with the format and the damage.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error, ZeroDivisionError)


def _decode(stream: io.BytesIO, path: Path, at_least: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB image and its full upright (width, height), whatever scale a JPEG was decoded at."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd EXIF; a broken file still fails below
            image = Image.open(stream)
            orientation = image.getexif().get(_ORIENTATION, 1)
            swap = orientation in _SWAPS_AXES
            size = (image.height, image.width) if swap else image.size
            if at_least is not None and image.format == "JPEG":
                image.draft("RGB", (at_least[1], at_least[0]) if swap else at_least)
            image.load()
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            if image.mode != "RGB":
                image = image.convert("RGB")
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: not a readable image ({exc}); re-export it or remove it from the dataset") from None
    if size[0] < 1 or size[1] < 1:
        raise InputError(f"{path}: the image is empty; remove it from the dataset")
    return image, size


def difference_hash(image: Image.Image) -> int:
    """64-bit dHash: brightness gradients of a 9x8 grey thumbnail; near-identical pictures differ in few bits."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def crop_for(plan: BucketPlan, rng: random.Random | None) -> tuple[int, int]:
    """Top-left (top, left) of the bucket window in the resized image: centred, or random when ``rng`` is given."""
    extra_w = plan.resized[0] - plan.bucket[0]
    extra_h = plan.resized[1] - plan.bucket[1]
    if rng is None:
        return extra_h // 2, extra_w // 2
    return rng.randint(0, extra_h), rng.randint(0, extra_w)


def to_tensor(image: Image.Image, plan: BucketPlan, top_left: tuple[int, int], flip: bool) -> torch.Tensor:
    """Resize ``image`` to ``plan.resized``, crop the bucket at ``top_left``, mirror if ``flip``.

    Returns:
        float32 ``[3, bucket_h, bucket_w]`` in [-1, 1] (``x / 127.5 - 1``).
    """
    width, height = plan.resized
    if (width, height) != image.size:
        downscale = width * height < image.width * image.height
        method = Image.Resampling.BOX if downscale else Image.Resampling.LANCZOS
        image = image.resize((width, height), method)
    top, left = top_left
    image = image.crop((left, top, left + plan.bucket[0], top + plan.bucket[1]))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32)  # a fresh, writable array: no extra copy needed
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)
