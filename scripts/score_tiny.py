"""Score the embedded tiny base model (or another diffusers folder) on held-out prompts with the checker.

A prompt counts as drawn when the checker finds the prompted shape in the prompted colour. Writes a contact sheet
of the images (a PNG grid) when ``--grid`` is given.

Example::

    python scripts/score_tiny.py --count 256 --steps 20 --guidance 4
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch

from lorakit.demo.evaluate import HELDOUT_SEED, score_pipeline


def save_grid(images: list[np.ndarray], path: str, columns: int = 16) -> None:
    from PIL import Image

    rows = (len(images) + columns - 1) // columns
    size = images[0].shape[0]
    sheet = np.ones((rows * (size + 2), columns * (size + 2), 3), dtype=np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * (size + 2) : r * (size + 2) + size, c * (size + 2) : c * (size + 2) + size] = im
    Image.fromarray((sheet.clip(0, 1) * 255).round().astype(np.uint8)).resize(
        (sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST
    ).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers folder (default: the embedded model)")
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=HELDOUT_SEED)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=None, help="write the images as a PNG grid here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lorakit.models import load_pipeline

    pipe = load_pipeline(args.model).pipe  # None: the embedded model
    t0 = time.time()
    score, images = score_pipeline(pipe, args.count, seed=args.seed, steps=args.steps, guidance=args.guidance)
    print(f"{score.count} held-out prompts, {args.steps} steps, guidance {args.guidance}, {time.time() - t0:.0f} s")
    print(
        f"shape {score.shape:.1%}  colour {score.colour:.1%}  shape+colour {score.both:.1%}  "
        f"background {score.background:.1%}"
    )
    confusions = Counter((s.shape, d.shape) for s, d in score.misses if d.shape != s.shape)
    print("shape confusions (asked, seen):", dict(confusions.most_common(6)))
    if args.grid:
        save_grid(images, args.grid)
        print("grid:", args.grid)


if __name__ == "__main__":
    main()
