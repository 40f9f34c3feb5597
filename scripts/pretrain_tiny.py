"""Pretrain lorakit's embedded tiny text-to-image model on the procedural shapes set and write it as a diffusers folder.

Three phases, each resumable from checkpoints in ``--work`` (kept outside the package):

1. ``vae``: an AutoencoderKL (block_out 16/32/64, 4x8x8 latents of a 32 px image) learns to reconstruct rendered shapes.
2. ``latents``: a fixed set of images is rendered and encoded once (posterior mean and log-variance are cached).
3. ``unet``: UNet2DConditionModel + CLIP text encoder learn epsilon-prediction on the cached latents (DDPM, 10% caption
   dropout, EMA 0.999), with captions whose optional phrases are dropped at random.

Then the EMA weights are written in fp16 with the tokenizer files and a DDIM scheduler config. Every batch is drawn from
``(seed, phase, step)``, so a resumed run sees the same batches as an uninterrupted one.

Example::

    nice -n 5 python scripts/pretrain_tiny.py --work /tmp/tiny-pretrain --max-minutes 50
    python scripts/pretrain_tiny.py --work /tmp/tiny-pretrain --export-only   # write the folder from the checkpoint
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorakit.demo import shapes
from lorakit.demo.tokenizer import EOS, write_tokenizer_files

MAX_TOKENS = 32
PACKAGE_FOLDER = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "models" / "tiny_sd"


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=32,
        layers_per_block=1,
        block_out_channels=(16, 32, 64),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )


def unet_config() -> dict:
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def text_config(tok_info: dict) -> dict:
    return dict(
        vocab_size=tok_info["vocab_size"],
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=64,
        bos_token_id=tok_info["bos_token_id"],
        eos_token_id=tok_info["eos_token_id"],
        pad_token_id=tok_info["eos_token_id"],
    )


SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def log(work: Path, text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    with open(work / "log.txt", "a") as f:
        f.write(line + "\n")


def write_tokenizer(work: Path, seed: int) -> dict:
    folder = work / "tokenizer"
    if (folder / "info.json").exists():
        return json.loads((folder / "info.json").read_text())
    texts = [shapes.caption_for(s) for s in shapes.sample_specs(4000, seed)]
    info = write_tokenizer_files(folder, texts)
    special = {"bos_token": "<|startoftext|>", "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "info.json").write_text(json.dumps(info))
    return info


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float = 0.999) -> None:
    d = min(decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the model closely
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)


def lr_at(step: int, total: int, peak: float = 1e-3) -> float:
    """Linear warm-up over 100 steps, then a cosine decay to a tenth of the peak at ``total``."""
    import math

    if step < 100:
        return peak * (step + 1) / 100
    progress = min(1.0, (step - 100) / max(1, total - 100))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _generic_image(rng: random.Random) -> np.ndarray:
    """1-3 axis-aligned rectangles or ellipses of random colours and boxes on a random background, [H, W, 3]."""
    n = shapes.IMAGE_SIZE * 4
    grid = (np.arange(n) + 0.5) / 4
    img = np.broadcast_to(np.array([rng.random() for _ in range(3)]), (n, n, 3)).copy()
    for _ in range(rng.randint(1, 3)):
        w, h = rng.uniform(3, 24), rng.uniform(3, 24)
        left, top = rng.uniform(0, shapes.IMAGE_SIZE - w), rng.uniform(0, shapes.IMAGE_SIZE - h)
        kind = rng.choice(("square", "circle"))
        hit = shapes.shape_coverage(kind, (grid[None, :] - left) / w, (grid[:, None] - top) / h)
        img[hit] = [rng.random() for _ in range(3)]
    return img.reshape(shapes.IMAGE_SIZE, 4, shapes.IMAGE_SIZE, 4, 3).mean(axis=(1, 3))


def vae_images(rng: random.Random, count: int) -> np.ndarray:
    """A VAE batch ``[N, 3, H, W]`` in [-1, 1]: half pretraining images, half generic ones.

    An image autoencoder is general-purpose: it must also reconstruct what the text-to-image model never saw (new
    shapes, new background colours), or a LoRA could not teach those. The generic half (random rectangles and
    ellipses in random colours) gives it that range without showing it the demo's concept or style.
    """
    out = [shapes.render(shapes.sample_spec(rng)) if i % 2 == 0 else _generic_image(rng) for i in range(count)]
    return (np.stack(out).transpose(0, 3, 1, 2) * 2 - 1).astype(np.float32)


def train_vae(args, work: Path, deadline: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt, step = work / "vae.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    t0, last_save = time.time(), time.time()
    while step < args.vae_steps and time.time() < deadline:
        rng = random.Random(f"vae-{args.seed}-{step}")
        x = torch.from_numpy(vae_images(rng, 32))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss_rec = F.mse_loss(rec, x)
        loss = loss_rec + 1e-7 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)  # without it, loss spikes late in training
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps)
        opt.step()
        step += 1
        if step % args.log_every == 0:
            rate = (time.time() - t0) / args.log_every
            t0 = time.time()
            log(
                work,
                f"vae step {step}/{args.vae_steps} rec {loss_rec.item():.5f} {rate:.2f}s/step "
                f"eta {rate * (args.vae_steps - step) / 60:.1f} min",
            )
        if time.time() - last_save > 120 or step == args.vae_steps:
            save(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
            last_save = time.time()
    save(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
    return vae, step >= args.vae_steps


def cache_latents(args, work: Path, vae) -> dict:
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    specs = shapes.sample_specs(args.images, args.seed + 1)
    means, logvars = [], []
    with torch.no_grad():
        for i in range(0, len(specs), 256):
            post = vae.encode(torch.from_numpy(shapes.render_batch(specs[i : i + 256]))).latent_dist
            means.append(post.mean)
            logvars.append(post.logvar)
    mean, logvar = torch.cat(means), torch.cat(logvars)
    scale = 1.0 / float(mean.std())
    cache = {"mean": mean, "logvar": logvar, "scale": scale, "specs": [s.__dict__ for s in specs]}
    save(path, cache)
    posterior_std = float(logvar.mul(0.5).exp().mean())
    log(work, f"cached {len(specs)} latents, std {1 / scale:.4f}, mean posterior std {posterior_std:.4f}")
    return cache


def build_unet_text(tok_info: dict, seed: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
    text = CLIPTextModel(CLIPTextConfig(**text_config(tok_info)))
    return unet, text


def unet_batch(args, cache: dict, specs: list, tokenizer, step: int):
    rng = random.Random(f"unet-{args.seed}-{step}")
    idx = torch.tensor([rng.randrange(len(specs)) for _ in range(args.batch)])
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    mean, logvar = cache["mean"][idx], cache["logvar"][idx]
    latents = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)) * cache["scale"]
    captions = ["" if rng.random() < 0.1 else shapes.caption_for(specs[i], rng, keep=0.7) for i in idx.tolist()]
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)
    return latents, ids.input_ids, noise, t


def train_unet(args, work: Path, tok_info: dict, cache: dict, deadline: float):
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(work / "tokenizer"), local_files_only=True)
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"})
    unet, text = build_unet_text(tok_info, args.seed)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ckpt, step = work / "unet.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        for m, k in ((unet, "unet"), (text, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text"), (opt, "opt")):
            m.load_state_dict(state[k])
        step = state["step"]
    specs = [shapes.ShapeSpec(**{**s, "jitter": tuple(s["jitter"])}) for s in cache["specs"]]

    def checkpoint():
        modules = {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text, "opt": opt}
        save(ckpt, {**{k: m.state_dict() for k, m in modules.items()}, "step": step})

    t0, last_save, running = time.time(), time.time(), 0.0
    while step < args.unet_steps and time.time() < deadline:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps)
        latents, ids, noise, t = unet_batch(args, cache, specs, tokenizer, step)
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, step)
        ema_update(ema_text, text, step)
        step += 1
        running = 0.98 * running + 0.02 * loss.item() if running else loss.item()
        if step % args.log_every == 0:
            rate = (time.time() - t0) / args.log_every
            t0 = time.time()
            log(
                work,
                f"unet step {step}/{args.unet_steps} loss {running:.4f} {rate:.2f}s/step "
                f"eta {rate * (args.unet_steps - step) / 60:.1f} min",
            )
        if time.time() - last_save > 180:
            checkpoint()
            last_save = time.time()
    checkpoint()
    return step


def export(args, work: Path, tok_info: dict, cache: dict, out: Path) -> None:
    import shutil

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vae = AutoencoderKL(**vae_config(), scaling_factor=cache["scale"])
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True)["model"])
    unet, text = build_unet_text(tok_info, args.seed)
    state = torch.load(work / "unet.pt", weights_only=True)
    unet.load_state_dict(state["ema_unet"])
    text.load_state_dict(state["ema_text"])
    tokenizer = CLIPTokenizer.from_pretrained(str(work / "tokenizer"), local_files_only=True)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the project's own files, byte for byte
        shutil.copyfile(work / "tokenizer" / name, staging / "tokenizer" / name)
    (staging / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)  # load from vocab.json + merges.txt
    for path in staging.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # save_pretrained writes 0600; package data must be readable
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(work, f"exported step {state['step']} to {out} ({size / 1e6:.2f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/lorakit-tiny-pretrain"), help="checkpoint folder")
    p.add_argument("--out", type=Path, default=PACKAGE_FOLDER, help="diffusers folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--images", type=int, default=16384, help="images rendered and encoded for the UNet phase")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--max-minutes", type=float, default=1e9, help="stop (with a checkpoint) after this long")
    p.add_argument("--export-only", action="store_true", help="write the folder from the latest checkpoint")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.max_minutes * 60
    tok_info = write_tokenizer(work, args.seed)
    if args.export_only:
        export(args, work, tok_info, torch.load(work / "latents.pt", weights_only=False), args.out)
        return
    vae, vae_done = train_vae(args, work, deadline)
    if not vae_done:
        log(work, "time budget spent during the VAE phase; run again to continue")
        return
    vae.eval()
    cache = cache_latents(args, work, vae)
    step = train_unet(args, work, tok_info, cache, deadline)
    export(args, work, tok_info, cache, args.out)
    more = "" if step >= args.unet_steps else " (run again to go on)"
    log(work, f"done at UNet step {step}/{args.unet_steps}{more}")


if __name__ == "__main__":
    main()
