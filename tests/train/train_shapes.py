"""A small procedural dataset: PIL-drawn coloured shapes with captions, written to a folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "cross")


def _draw(shape: str, colour: tuple[int, int, int], size: int, offset: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    lo, hi = size // 5 + offset, size - size // 5 + offset
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=colour)
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=colour)
    else:
        mid, w = (lo + hi) // 2, max(2, size // 8)
        draw.rectangle([lo, mid - w, hi, mid + w], fill=colour)
        draw.rectangle([mid - w, lo, mid + w, hi], fill=colour)
    return image


def make_shapes(folder: Path, count: int = 8, size: int = 32, trigger: str = "") -> Path:
    """Write ``count`` PNGs with ``.txt`` captions ("red circle, shape") into ``folder``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(count):
        colour, shape = names[i % len(names)], SHAPES[i % len(SHAPES)]
        _draw(shape, COLOURS[colour], size, (i % 3) - 1).save(folder / f"img{i:02d}.png")
        caption = f"{colour} {shape}, shape" if not trigger else f"{trigger}, {colour} {shape}"
        (folder / f"img{i:02d}.txt").write_text(caption, encoding="utf-8")
    return folder


def folder_digest(folder: Path) -> str:
    """sha256 over every file's relative path, size, mtime and bytes (a changed or added file changes it)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*")):
        stat = path.stat()
        h.update(f"{path.relative_to(folder)}|{path.is_dir()}|{stat.st_mtime_ns}".encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()
