"""The loss log: a CSV row per optimizer step (TensorBoard too when installed) and a loss plot drawn with Pillow."""

from __future__ import annotations

import csv
import math
from pathlib import Path

__all__ = ["LossLog", "plot_losses", "smoothed"]

COLUMNS = ("step", "epoch", "loss", "smoothed_loss", "lr", "seconds")


def smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the first values are not pulled towards zero)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


class LossLog:
    """Appends one row per step to ``loss.csv``; on resume the rows after the resumed step are dropped first."""

    def __init__(self, folder: Path, *, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path = folder / "loss.csv"
        self.rows: list[dict[str, float]] = []
        if resume_step and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as file:
                self.rows = [
                    {k: float(v) for k, v in r.items()}
                    for r in csv.DictReader(file)
                    if int(float(r["step"])) <= resume_step
                ]
        folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, COLUMNS)
            writer.writeheader()
            writer.writerows({k: _fmt(r[k]) for k in COLUMNS} for r in self.rows)
        self._avg = smoothed([r["loss"] for r in self.rows])[-1] if self.rows else None
        self._writer = _tensorboard(folder) if tensorboard else None

    @property
    def smoothed_loss(self) -> float:
        return float("nan") if self._avg is None else self._avg

    def add(self, step: int, epoch: int, loss: float, lr: float, seconds: float) -> None:
        losses = [r["loss"] for r in self.rows] + [loss]
        self._avg = smoothed(losses[-200:])[-1]  # the window keeps this O(1) per step; older terms weigh < 1e-9
        row = {"step": step, "epoch": epoch, "loss": loss, "smoothed_loss": self._avg, "lr": lr, "seconds": seconds}
        self.rows.append(row)
        with self.path.open("a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, COLUMNS).writerow({k: _fmt(row[k]) for k in COLUMNS})
        if self._writer is not None:
            self._writer.add_scalar("loss", loss, step)
            self._writer.add_scalar("lr", lr, step)

    def plot(self) -> Path:
        path = self.path.with_name("loss.png")
        plot_losses([r["loss"] for r in self.rows], path, steps=[int(r["step"]) for r in self.rows])
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _fmt(value: float) -> str:
    return f"{value:.8g}"


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the CSV has everything
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def plot_losses(losses: list[float], path: Path, *, steps: list[int] | None = None, size: tuple[int, int] = (640, 360)):
    """Draw raw losses (light) and their moving average (dark) against the step, with min/max labels, as a PNG."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 15, 15, height - 30
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    finite = [(s, v) for s, v in zip(steps or range(1, len(losses) + 1), losses) if math.isfinite(v)]
    if finite:
        xs = [s for s, _ in finite]
        ys = [v for _, v in finite]
        lo, hi = min(ys), max(ys)
        span_y = (hi - lo) or 1.0
        x0, span_x = xs[0], (xs[-1] - xs[0]) or 1

        def point(x: float, y: float) -> tuple[float, float]:
            return left + (x - x0) / span_x * (right - left), bottom - (y - lo) / span_y * (bottom - top)

        if len(finite) > 1:
            draw.line([point(x, y) for x, y in zip(xs, ys)], fill=(160, 190, 230), width=1)
            draw.line([point(x, y) for x, y in zip(xs, smoothed(ys))], fill=(20, 60, 160), width=2)
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 8), f"step {xs[0]}", fill="black")
        draw.text((right - 70, bottom + 8), f"step {xs[-1]}", fill="black")
    draw.text((width // 2 - 30, bottom + 8), "loss", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    image.save(temp, format="PNG")
    temp.replace(path)
    return path
