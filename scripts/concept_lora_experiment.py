"""Teach the embedded tiny base model a new concept with a LoRA, and measure it with the checker.

The concept is the thick cross, absent from pretraining, named by a trigger word ("a red zkx on the left, gray
background"). A rank-8 LoRA on the UNet's attention projections (lorakit.core.attach_lora) trains on 16 rendered
images with prior preservation: images the base model generates for ordinary prompts (256, two thirds of every batch
of 24) are mixed in with their prompts, so that prompts without the trigger keep their meaning. Then:

- concept score (fraction of trigger prompts in which the checker finds a cross) at LoRA weights 0, 0.5 and 1.0;
- prompts without the trigger: checker score (shape and colour right) at weight 0 and 1.0, and the mean absolute pixel
  change between the two.

Example::

    nice -n 5 python scripts/concept_lora_experiment.py                 # the thick cross, trigger "zkx"
    nice -n 5 python scripts/concept_lora_experiment.py --kind style    # the teal palette, "in qvz style"
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from lorakit.core import LoraConfig, attach_lora
from lorakit.demo import shapes
from lorakit.demo.checker import concept_score, score_specs, style_score
from lorakit.demo.evaluate import generate_images, heldout_specs

TRIGGER = "zkx"
STYLE_PHRASE = "in qvz style"
ATTENTION = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$"


def concept_specs(count: int, seed: int) -> list[shapes.ShapeSpec]:
    """Large thick crosses in every colour, position and background (small ones do not survive the tiny VAE)."""
    specs = shapes.sample_specs(count, seed, shapes=(shapes.CONCEPT_SHAPE,))
    return [dataclasses.replace(s, size="large") for s in specs]


def task(kind: str):
    """(specs for a seed, caption of a spec, score of images) for the concept or the style."""
    if kind == "concept":
        return (
            concept_specs,
            lambda s, rng=None, keep=1.0: shapes.caption_for(s, rng, keep=keep, shape_word=TRIGGER),
            concept_score,
        )

    def styled(count: int, seed: int) -> list[shapes.ShapeSpec]:
        return shapes.sample_specs(count, seed, style=True)

    return (
        styled,
        lambda s, rng=None, keep=1.0: shapes.caption_for(s, rng, keep=keep, style_phrase=STYLE_PHRASE),
        style_score,
    )


def encode(pipe, images: np.ndarray) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [-1, 1] -> scaled latent means ``[N, 4, 8, 8]``."""
    with torch.no_grad():
        return pipe.vae.encode(torch.from_numpy(images)).latent_dist.mean * pipe.vae.config.scaling_factor


def embed(pipe, captions: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(
        captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def prior_set(pipe, count: int, seed: int):
    """Images the base model draws for ordinary prompts, with those prompts (prior preservation)."""
    specs = shapes.sample_specs(count, seed)
    prompts = [shapes.caption_for(s) for s in specs]
    images = generate_images(pipe, prompts, seed=seed, steps=20, guidance=4.0)
    pixels = np.stack(images).transpose(0, 3, 1, 2) * 2 - 1
    return encode(pipe, pixels.astype(np.float32)), specs


def train(pipe, args) -> tuple[object, list[float]]:
    from diffusers import DDPMScheduler

    make_specs, caption, _ = task(args.kind)
    concepts = make_specs(args.images, args.seed)
    concept_latents = encode(pipe, shapes.render_batch(concepts))
    prior_latents, prior_specs = prior_set(pipe, args.prior_images, args.seed + 1)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(args.seed)
    handle = attach_lora(pipe.unet, LoraConfig(rank=args.rank, targets=args.targets), name="concept")
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng, gen, losses = random.Random(args.seed), torch.Generator().manual_seed(args.seed), []
    n_concept = max(1, round(args.batch * (1 - args.prior_share)))
    for step in range(args.steps):
        ci = [rng.randrange(len(concepts)) for _ in range(n_concept)]
        pi = [rng.randrange(len(prior_specs)) for _ in range(args.batch - n_concept)]
        captions = [caption(concepts[i], rng, keep=0.7) for i in ci]
        # Empty captions on prior images only: guidance extrapolates from the unconditional prediction, so it must
        # stay the base model's (never the concept's), or every prompt changes with the LoRA.
        captions += ["" if rng.random() < 0.15 else shapes.caption_for(prior_specs[i], rng, keep=0.7) for i in pi]
        latents = torch.cat([concept_latents[ci], prior_latents[pi]])
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen)
        pred = pipe.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=embed(pipe, captions)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps} loss {np.mean(losses[-50:]):.4f}", flush=True)
    return handle, losses


def measure(pipe, handle, args) -> dict:
    """Concept score at each weight, and how prompts without the trigger change."""
    make_specs, caption, score = task(args.kind)
    specs = make_specs(args.eval_images, args.seed + 7)
    prompts = [caption(s) for s in specs]
    plain_specs = heldout_specs(args.eval_images)
    plain_prompts = [shapes.caption_for(s) for s in plain_specs]
    result: dict = {"concept": {}, "plain": {}, "rows": []}
    plain_images = {}
    with torch.no_grad():
        for weight in (0.0, 0.5, 1.0):
            handle.set_weight(weight)
            images = generate_images(pipe, prompts, seed=args.seed + 11, steps=args.eval_steps)
            result["concept"][weight] = score(images)
            result["rows"].append(images[:16])
            if weight in (0.0, 1.0):
                plain_images[weight] = generate_images(pipe, plain_prompts, seed=args.seed + 13, steps=args.eval_steps)
                result["plain"][weight] = score_specs(plain_images[weight], plain_specs).both
                result["plain_bleed"] = score(plain_images[weight])  # the concept where it was not asked for
    result["rows"] += [plain_images[0.0][:16], plain_images[1.0][:16]]
    change = np.mean([np.abs(a - b).mean() for a, b in zip(plain_images[0.0], plain_images[1.0])])
    result["plain_pixel_change"] = float(change)
    handle.set_weight(1.0)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers folder (default: the embedded model)")
    p.add_argument("--kind", choices=("concept", "style"), default="concept")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default=ATTENTION, help="regex of the UNet modules that get a LoRA")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=24, help="concept images and prior images per step")
    p.add_argument("--prior-share", type=float, default=0.667, help="share of each batch taken by prior images")
    p.add_argument("--images", type=int, default=16, help="concept training images")
    p.add_argument("--prior-images", type=int, default=256)
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=None, help="PNG: trigger prompts at weights 0, 0.5, 1, then plain at 0 and 1")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lorakit.models import load_pipeline

    pipe = load_pipeline(args.model).pipe  # None: the embedded model
    t0 = time.time()
    handle, losses = train(pipe, args)
    train_s = time.time() - t0
    result = measure(pipe, handle, args)
    print(
        f"train {train_s:.0f} s ({args.steps} steps, incl. {args.prior_images} prior images), "
        f"measure {time.time() - t0 - train_s:.0f} s"
    )
    if args.grid:
        from score_tiny import save_grid

        save_grid([im for row in result["rows"] for im in row], args.grid)
    for w, s in result["concept"].items():
        print(f"{args.kind} score at weight {w}: {s:.0%}")
    print(
        f"prompts without the trigger: checker score {result['plain'][0.0]:.0%} at weight 0, "
        f"{result['plain'][1.0]:.0%} at weight 1; mean pixel change {result['plain_pixel_change']:.4f}; "
        f"{args.kind} seen in {result['plain_bleed']:.0%} of them at weight 1"
    )


if __name__ == "__main__":
    main()
