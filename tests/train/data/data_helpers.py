"""Procedural images and folder hashing for the dataset tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image


def make_image(path: Path, width: int, height: int, seed: int = 0, **save_args) -> Path:
    """Seeded random blobs (a 5x5 colour grid, smoothly enlarged) plus noise: distinct seeds, distinct pictures."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8))
    base = np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = np.clip(base + rng.integers(-20, 20, size=(height, width, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save_args)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def folder_hash(root: Path) -> str:
    """sha256 over every entry under ``root``: relative path, kind, bytes and modification time."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}|{path.is_dir()}|{stat.st_mtime_ns}|".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def kohya_dataset(root: Path) -> Path:
    """A small kohya-style parent: 3_dog (4 images, two buckets, some captions) and 1_cat (2 images, none)."""
    sizes = [(64, 64), (96, 64), (64, 64), (96, 64)]
    for i, (w, h) in enumerate(sizes):
        make_image(root / "3_dog" / f"d{i}.png", w, h, seed=i)
    write(root / "3_dog" / "d0.txt", "a dog, red collar, sitting, grass, sunny")
    write(root / "3_dog" / "d1.txt", "a dog, running, beach")
    make_image(root / "1_cat" / "c0.jpg", 64, 96, seed=10, quality=95)
    make_image(root / "1_cat" / "c1.webp", 64, 64, seed=11)
    return root
