"""Measuring the demo's two LoRAs with the checker, applied through ``lorakit.generate.apply_lora``.

Every setting draws the same number of prompts with the same seeds, so two settings differ only by the LoRA weights:

- concept prompts (the trigger word names the shape) at concept weights 0, 0.5 and 1: the concept score is the
  fraction of images in which the checker finds the thick cross;
- style prompts (the style phrase replaces the background) without and with the style LoRA: the style score is the
  fraction of images on the teal palette;
- held-out prompts of the pretraining distribution (no trigger) with no LoRA, the concept LoRA and the style LoRA at
  weight 1: the checker score (shape and colour right) and the mean absolute pixel change from the base images;
- concept-in-style prompts without LoRAs and with both at weight 1: both scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.demo import datasets, shapes
from lorakit.demo.checker import concept_score, score_specs, style_score
from lorakit.demo.evaluate import generate_images, heldout_specs

__all__ = ["CONCEPT_TARGET", "PLAIN_TOLERANCE", "Scores", "TargetCheck", "check_targets", "evaluate"]

CONCEPT_TARGET = 0.70
"""Concept score the concept LoRA must reach at weight 1."""
PLAIN_TOLERANCE = 0.10
"""Largest change of the checker score on prompts without a trigger."""


@dataclass
class Scores:
    """What the checker measured (fractions in [0, 1]; pixel changes on the [0, 1] scale)."""

    prompts: int
    """Prompts per setting."""
    concept: dict[str, float] = field(default_factory=dict)
    """Concept score by concept LoRA weight ("0", "0.5", "1")."""
    style: dict[str, float] = field(default_factory=dict)
    """Style score without ("base") and with ("lora") the style LoRA."""
    plain: dict[str, float] = field(default_factory=dict)
    """Checker score on prompts without a trigger: "base", "concept" and "style" (each LoRA at weight 1)."""
    plain_pixel_change: dict[str, float] = field(default_factory=dict)
    """Mean absolute pixel change from the base images on those prompts, per LoRA."""
    combined: dict[str, float] = field(default_factory=dict)
    """Concept-in-style prompts: "base_concept", "base_style" (no LoRA) and "concept", "style" (both LoRAs at 1)."""


@dataclass
class TargetCheck:
    """One target of the demo, measured."""

    name: str
    value: str
    goal: str
    met: bool


SETTINGS = (
    ("concept 0", "concept", 0.0, 0.0),
    ("concept 0.5", "concept", 0.5, 0.0),
    ("concept 1", "concept", 1.0, 0.0),
    ("style base", "style", 0.0, 0.0),
    ("style lora", "style", 0.0, 1.0),
    ("plain base", "plain", 0.0, 0.0),
    ("plain concept", "plain", 1.0, 0.0),
    ("plain style", "plain", 0.0, 1.0),
    ("combined base", "combined", 0.0, 0.0),
    ("combined both", "combined", 1.0, 1.0),
)
"""(key, prompt set, concept weight, style weight) of every measured setting."""


def evaluate(
    pipe: Any,
    concept_file: Path,
    style_file: Path,
    config: Any,
    progress: Callable[[int, int], None] | None = None,
) -> Scores:
    """Apply both LoRAs to ``pipe`` (weights switched per setting), generate, score, and remove them again.

    Args:
        pipe: the base pipeline.
        concept_file, style_file: the trained LoRA files.
        config: the ``MissionConfig`` (seed, eval_prompts, sample_steps, guidance).
        progress: called with (images done, images) after each batch.
    """
    from lorakit.generate import apply_lora

    n, seed = config.eval_prompts, config.seed
    concept_specs = datasets.concept_specs(n, seed + 7)
    plain_specs = heldout_specs(n)
    prompts = {
        "concept": [datasets.concept_caption(s) for s in concept_specs],
        "style": [datasets.style_caption(s) for s in datasets.style_specs(n, seed + 8)],
        "plain": [shapes.caption_for(s) for s in plain_specs],
        "combined": [datasets.concept_caption(s, style=True) for s in concept_specs],
    }
    total = len(SETTINGS) * n
    images: dict[str, list[np.ndarray]] = {}
    concept = apply_lora(pipe, concept_file, weight=0.0, name="demo_concept")
    style = apply_lora(pipe, style_file, weight=0.0, name="demo_style")
    try:
        for k, (key, prompt_set, concept_weight, style_weight) in enumerate(SETTINGS):
            concept.set_weight(concept_weight)
            style.set_weight(style_weight)
            done = k * n

            def report(count: int, _: int, done: int = done) -> None:
                if progress is not None:
                    progress(done + count, total)

            images[key] = generate_images(
                pipe,
                prompts[prompt_set],
                seed=seed + 11,
                steps=config.sample_steps,
                guidance=config.guidance,
                batch=64,
                progress=report,
            )
    finally:
        concept.remove()
        style.remove()
    return _score(images, plain_specs)


def _pixel_change(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(x - y).mean() for x, y in zip(a, b)]))


def _score(images: dict[str, list[np.ndarray]], plain_specs: list[shapes.ShapeSpec]) -> Scores:
    return Scores(
        prompts=len(plain_specs),
        concept={w: concept_score(images[f"concept {w}"]) for w in ("0", "0.5", "1")},
        style={"base": style_score(images["style base"]), "lora": style_score(images["style lora"])},
        plain={k: score_specs(images[f"plain {k}"], plain_specs).both for k in ("base", "concept", "style")},
        plain_pixel_change={k: _pixel_change(images["plain base"], images[f"plain {k}"]) for k in ("concept", "style")},
        combined={
            "base_concept": concept_score(images["combined base"]),
            "base_style": style_score(images["combined base"]),
            "concept": concept_score(images["combined both"]),
            "style": style_score(images["combined both"]),
        },
    )


def check_targets(scores: Scores) -> list[TargetCheck]:
    """The demo's targets: the concept rises with the weight and reaches 70% at 1; prompts without a trigger stay
    within 10 points of the base model with either LoRA; with both LoRAs both scores beat the base model's."""
    c, p, m = scores.concept, scores.plain, scores.combined

    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    return [
        TargetCheck(
            "concept score rises with the weight",
            f"{pct(c['0'])} -> {pct(c['0.5'])} -> {pct(c['1'])}",
            "non-decreasing, and higher at 1 than at 0",
            c["0"] <= c["0.5"] <= c["1"] and c["1"] > c["0"],
        ),
        TargetCheck(
            "style score with the style LoRA",
            f"{pct(scores.style['base'])} -> {pct(scores.style['lora'])}",
            "above the base model's",
            scores.style["lora"] > scores.style["base"],
        ),
        TargetCheck("concept score at weight 1", pct(c["1"]), f">= {pct(CONCEPT_TARGET)}", c["1"] >= CONCEPT_TARGET),
        *(
            TargetCheck(
                f"prompts without a trigger, {name} LoRA",
                f"{pct(p['base'])} -> {pct(p[name])}",
                f"within {100 * PLAIN_TOLERANCE:.0f} points of the base",
                abs(p[name] - p["base"]) <= PLAIN_TOLERANCE + 1e-9,
            )
            for name in ("concept", "style")
        ),
        TargetCheck(
            "both LoRAs: concept and style scores",
            f"concept {pct(m['base_concept'])} -> {pct(m['concept'])}, style {pct(m['base_style'])} -> "
            f"{pct(m['style'])}",
            "both above the base model's",
            m["concept"] > m["base_concept"] and m["style"] > m["base_style"],
        ),
    ]
