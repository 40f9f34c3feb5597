"""Data side of training: lorakit's sample pipeline vs the diffusers LoRA example's image pipeline, same images.

Peer: diffusers' train_text_to_image_lora.py transforms (Resize shorter side to the resolution, bilinear; CenterCrop;
RandomHorizontalFlip; ToTensor; Normalize(0.5, 0.5)) written with PIL + numpy, as torchvision is not installed.
Floor: decoding the file alone (PIL open + load).
Usage: python bench_data.py [--images 20] [--size 1024x768] [--resolution 512]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorakit.train.data import BatchLoader, DatasetConfig, LatentCache, load_dataset


def make_images(root: Path, count: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(count):
        grid = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8))
        img = grid.resize((width, height), Image.Resampling.BICUBIC)
        img.save(root / f"{i:03d}.jpg", quality=92)
        (root / f"{i:03d}.txt").write_text(f"a photo, tag{i}, tag{i + 1}")


def peer_sample(path: Path, resolution: int, rng: random.Random) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1) - 0.5) / 0.5


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "10_sks"
        make_images(root, args.images, width, height)
        paths = sorted(root.glob("*.jpg"))
        n = len(paths)
        config = DatasetConfig.for_folder(root, resolution=args.resolution, flip=True, shuffle_caption=True)
        index_s = timed(lambda: load_dataset(config), 1)
        images = load_dataset(config)
        loader = BatchLoader(images, 1, seed=0)
        plan = loader.plan(0)[:n]

        def lorakit_epoch():
            for i, copy in [b[0] for b in plan]:
                images.sample(i, seed=0, epoch=0, copy=copy).pixels

        rng = random.Random(0)
        lk = timed(lorakit_epoch) / n
        peer = timed(lambda: [peer_sample(p, args.resolution, rng) for p in paths]) / n
        floor = timed(lambda: [Image.open(p).load() for p in paths]) / n
        vae = lambda x: torch.nn.functional.avg_pool2d(x, 8)  # noqa: E731
        cache = LatentCache(vae, identity="bench", folder=Path(tmp) / "cache", images=images)
        cache.precompute(images, batch_size=4)
        batches = [b for b in loader.batches(0)][:n]
        hit = timed(lambda: [cache.latents(b) for b in batches]) / n
    print(f"{n} JPEG images {width}x{height}, resolution {args.resolution}, torch threads 1")
    print(f"{'step':<38}{'ms/image':>10}{'vs peer':>10}{'vs floor':>10}")
    for name, value in [
        ("lorakit sample (bucket, crop, flip)", lk),
        ("peer (diffusers example transforms)", peer),
        ("floor: JPEG decode only", floor),
        ("lorakit latent cache hit (disk)", hit),
        ("lorakit load_dataset (index+check)", index_s / n),
    ]:
        print(f"{name:<38}{value * 1e3:>10.2f}{value / peer:>10.2f}{value / floor:>10.2f}")


if __name__ == "__main__":
    main()
