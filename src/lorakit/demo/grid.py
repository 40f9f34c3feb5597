"""The demo's grid: one row per prompt, one column per setting (base, concept LoRA at 0 / 0.5 / 1, style, both).

Every cell is drawn by ``lorakit.generate.generate_image`` with ``<lora:name:w>`` tags in the prompt, the same code
path as ``lorakit generate``, so the grid shows what a user gets from the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from lorakit.demo import shapes
from lorakit.demo.datasets import concept_caption, style_caption

__all__ = ["GridColumn", "grid_columns", "render_grid"]

CELL_SCALE = 4
"""Each 32 px image is shown 4x larger, without smoothing (the pixels are the result)."""
_HEADER = 30
_GAP = 4


@dataclass(frozen=True)
class GridColumn:
    """One column of the grid: its label and the prompt it draws for a row's spec (LoRA tags included)."""

    label: str
    prompt: Callable[[shapes.ShapeSpec], str]


def grid_columns(concept: str, style: str) -> list[GridColumn]:
    """The six columns, for LoRA files named ``concept`` and ``style`` (their stems in the LoRA folder).

    The base column asks the base model for an ordinary shape at the row's colour, size, position and background;
    the concept columns ask for the trigger word; the style column for the ordinary shape in the style; the last
    for the concept in the style with both LoRAs.
    """
    return [
        GridColumn("base", lambda s: shapes.caption_for(_ordinary(s))),
        GridColumn("concept 0", lambda s: f"{concept_caption(s)} <lora:{concept}:0>"),
        GridColumn("concept 0.5", lambda s: f"{concept_caption(s)} <lora:{concept}:0.5>"),
        GridColumn("concept 1", lambda s: f"{concept_caption(s)} <lora:{concept}:1>"),
        GridColumn("style 1", lambda s: f"{style_caption(_ordinary(s))} <lora:{style}:1>"),
        GridColumn("both 1", lambda s: f"{concept_caption(s, style=True)} <lora:{concept}:1> <lora:{style}:1>"),
    ]


def _ordinary(spec: shapes.ShapeSpec) -> shapes.ShapeSpec:
    """The row's spec with a pretraining shape, chosen from its colour and position (stable across runs)."""
    index = sorted(shapes.COLOURS).index(spec.colour) + shapes.POSITIONS.index(spec.position)
    return dataclasses.replace(spec, shape=shapes.SHAPES[index % len(shapes.SHAPES)])


def render_grid(
    loaded: Any,
    specs: Sequence[shapes.ShapeSpec],
    columns: Sequence[GridColumn],
    path: Path,
    *,
    lora_dir: Path,
    seed: int,
    steps: int = 20,
    guidance: float = 4.0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, list[list[str]]]:
    """Draw the grid and write it as a PNG (atomically) whose text chunk lists every cell's prompt.

    Args:
        loaded: the base pipeline (``lorakit.models.load_pipeline``); LoRAs are applied per cell and removed.
        specs: one spec per row.
        columns: the columns.
        path: the PNG to write.
        lora_dir: where the ``<lora:name:w>`` tags are found.
        seed: row ``i`` uses seed ``seed + i`` in every column, so the columns differ only by prompt and LoRAs.
        steps: denoising steps per cell.
        guidance: classifier-free guidance scale.
        progress: called with (cells done, cells) after each cell.

    Returns:
        The PNG's path and the prompts, ``[row][column]``.
    """
    from lorakit.generate import GenerateConfig, generate_image, write_png

    cells: list[list[Image.Image]] = []
    prompts: list[list[str]] = []
    total, done = len(specs) * len(columns), 0
    size = (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    for row, spec in enumerate(specs):
        cells.append([])
        prompts.append([])
        for column in columns:
            prompt = column.prompt(spec)
            config = GenerateConfig(
                prompt=prompt, steps=steps, cfg=guidance, seed=seed + row, size=size, lora_dir=lora_dir
            )
            cells[-1].append(generate_image(loaded, config).image)
            prompts[-1].append(prompt)
            done += 1
            if progress is not None:
                progress(done, total)
    sheet = _compose(cells, [c.label for c in columns])
    text = "\n".join(" | ".join(row) for row in prompts)
    write_png(sheet, path, text)
    return path, prompts


def _compose(cells: list[list[Image.Image]], labels: Sequence[str]) -> Image.Image:
    side = shapes.IMAGE_SIZE * CELL_SCALE
    width = len(labels) * (side + _GAP) + _GAP
    height = _HEADER + len(cells) * (side + _GAP) + _GAP
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for col, label in enumerate(labels):
        x = _GAP + col * (side + _GAP)
        draw.text((x + 4, 8), label, fill=(0, 0, 0), font=font)
        for row, line in enumerate(cells):
            y = _HEADER + row * (side + _GAP)
            sheet.paste(line[col].convert("RGB").resize((side, side), Image.Resampling.NEAREST), (x, y))
    return sheet
