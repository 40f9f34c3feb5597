"""Aspect-ratio buckets, computed as kohya sd-scripts computes them.

Buckets are (width, height) pairs, multiples of ``step``, with area at most ``resolution ** 2``:

- the square ``floor(resolution / step) * step``;
- for each width ``w`` from ``min_size`` to ``max_size`` in steps: ``h = min(max_size, floor(area / w / step) * step)``,
  kept (with its transpose) when ``h >= min_size``.

An image goes to the bucket whose aspect ratio is nearest its own (the first such bucket in sorted order), is resized
so that it covers the bucket (scale = bucket side / image side on the tighter axis, rounded half up), then cropped.

With ``no_upscale``, an image whose area is at most ``resolution ** 2`` keeps its size; a larger one is scaled down to
that area, with the width or the height rounded to the step, whichever keeps the aspect ratio better. Its bucket is
its size rounded down to the step: small images stay small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BucketPlan", "make_bucket_resolutions", "BucketChooser"]


@dataclass(frozen=True)
class BucketPlan:
    """Where one image goes.

    Attributes:
        bucket: (width, height) of the training tensor.
        resized: (width, height) the image is resized to before cropping; covers ``bucket``.
        ar_error: bucket aspect ratio minus the image's.
    """

    bucket: tuple[int, int]
    resized: tuple[int, int]
    ar_error: float


def make_bucket_resolutions(
    resolution: int, min_size: int = 256, max_size: int = 1024, step: int = 64
) -> list[tuple[int, int]]:
    """The predefined buckets for a square ``resolution``, sorted by (width, height).

    Example: ``make_bucket_resolutions(512)`` gives (256, 1024), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (768, 320), (1024, 256).
    """
    max_area = resolution * resolution
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


class BucketChooser:
    """Chooses a bucket and resize for each image size.

    Args:
        resolution: training resolution; bucket areas are at most ``resolution ** 2``.
        min_size, max_size, step: bucket side limits and step.
        no_upscale: keep images below the full area at their own size.
        enable: False sends every image to the square ``resolution`` bucket.
    """

    def __init__(
        self,
        resolution: int,
        min_size: int = 256,
        max_size: int = 1024,
        step: int = 64,
        *,
        no_upscale: bool = False,
        enable: bool = True,
    ) -> None:
        self.resolution = resolution
        self.step = step
        self.no_upscale = no_upscale and enable
        self.enable = enable
        self.max_area = resolution * resolution
        if enable:
            self.resolutions = make_bucket_resolutions(resolution, min_size, max_size, step)
        else:
            self.resolutions = [(resolution, resolution)]
        self._ratios = [w / h for w, h in self.resolutions]

    def choose(self, width: int, height: int) -> BucketPlan:
        """The bucket and resized size for an image of ``width`` x ``height`` pixels."""
        if self.no_upscale:
            return self._choose_no_upscale(width, height)
        aspect = width / height
        if (width, height) in self.resolutions:
            bucket = (width, height)
        else:
            errors = [abs(r - aspect) for r in self._ratios]
            bucket = self.resolutions[errors.index(min(errors))]
        # Scale so the image covers the bucket: fit the axis that is tighter.
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        resized = (max(resized[0], bucket[0]), max(resized[1], bucket[1]))
        return BucketPlan(bucket, resized, bucket[0] / bucket[1] - aspect)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.step

    def _choose_no_upscale(self, width: int, height: int) -> BucketPlan:
        aspect = width / height
        if width * height > self.max_area:
            scaled_w = math.sqrt(self.max_area * aspect)
            scaled_h = self.max_area / scaled_w
            w_rounded = self._round(scaled_w)
            h_for_w = self._round(w_rounded / aspect)
            h_rounded = self._round(scaled_h)
            w_for_h = self._round(h_rounded * aspect)
            err_w = abs(w_rounded / h_for_w - aspect) if h_for_w else math.inf
            err_h = abs(w_for_h / h_rounded - aspect) if h_rounded else math.inf
            if err_w < err_h:
                resized = (w_rounded, int(w_rounded / aspect + 0.5))
            else:
                resized = (int(h_rounded * aspect + 0.5), h_rounded)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        if bucket[0] == 0 or bucket[1] == 0:
            raise ValueError(f"an image of {width}x{height} is smaller than one bucket step ({self.step} px)")
        return BucketPlan(bucket, resized, bucket[0] / bucket[1] - aspect)
