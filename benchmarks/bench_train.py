"""LoRA training step: lorakit ``train`` against a diffusers + PEFT loop written the way diffusers'
train_text_to_image_lora.py trains, in one run, each side in its own subprocess.

    nice -n 10 .venv/bin/python benchmarks/bench_train.py --dir /tmp/bench_train

Same model (the embedded SD1-layout model shipped with lorakit: 4.2M-parameter UNet, its VAE and CLIP text encoder),
same images (16 drawn shapes), resolution, rank (LoRA on attention to_q/k/v/out.0, alpha = rank), AdamW, batch,
threads. The peer encodes every batch with the VAE and the text encoder, as the script does (its images are decoded
once up front, so image decoding does not count against it); lorakit runs with its latent and text caches on.
Reported: median seconds per optimizer step after warm-up, peak RSS, and peak RSS above the process's RSS after its
imports (what training itself holds: model, optimizer, activations). Floor: the step's flops (counted by torch's
FlopCounterMode on lorakit's step) over the machine's fp32 matmul rate (measured here on one thread).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_images(folder: Path, count: int, size: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    names = list(colours)
    for i in range(count):
        image = Image.new("RGB", (size, size), (235, 235, 235))
        draw = ImageDraw.Draw(image)
        lo, hi = size // 5 + i % 5, size - size // 5 - i % 3
        shape = ("circle", "square")[i % 2]
        (draw.ellipse if shape == "circle" else draw.rectangle)([lo, lo, hi, hi], fill=colours[names[i % 4]])
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"{names[i % 4]} {shape}")


def make_sd15_folder(folder: Path, seed: int = 0) -> Path:
    """An SD1.5-size diffusers folder with random weights (860M UNet, 84M VAE, 123M CLIP-L), built from the configs
    lorakit ships, saved in fp16 (2.1 GB); reused when it is there. The tokenizer is the embedded model's."""
    import shutil

    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import lorakit.models
    from lorakit.arch import load_config
    from lorakit.models.embedded import embedded_model_path

    configs = Path(lorakit.models.__file__).parent / "configs"
    temp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(load_config("sd1", "unet"))
    vae = AutoencoderKL.from_config(json.loads((configs / "vae-sd1.json").read_text()))
    settings = dict(load_config("sd1", "text_encoder"))
    settings.pop("model_type", None)
    settings.pop("architectures", None)
    text_encoder = CLIPTextModel(CLIPTextConfig(**settings))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        module.to(torch.float16).save_pretrained(temp / name)
    embedded = embedded_model_path()
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(embedded / name, temp / name)
    shutil.copy(embedded / "model_index.json", temp / "model_index.json")
    temp.rename(folder)
    return folder


def lorakit_config(args: argparse.Namespace, output: str, steps: int):
    """lorakit's run: one bucket at the benchmark size, LoRA on attention, AdamW 1e-4, fp16 saves."""
    from lorakit.train.config import config_from_dict

    return config_from_dict(
        {
            "model": {"path": args.model},
            "dataset": {
                "path": str(args.data),
                "resolution": args.size,
                "min_bucket_reso": args.size,
                "max_bucket_reso": args.size,
                "bucket_reso_steps": 32,
            },
            "network": {"rank": args.rank, "targets": "attention"},
            "optimizer": {"lr": 1e-4},
            "training": {
                "steps": steps,
                "batch_size": args.batch,
                "seed": 0,
                "gradient_checkpointing": args.checkpointing,
            },
            "save": {"output_dir": str(args.dir / output), "dtype": "fp16"},
        }
    )


# --- lorakit --------------------------------------------------------------------------------------------------------
def run_lorakit(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import diffusers  # noqa: F401  (imported before the baseline on both sides)
    import transformers  # noqa: F401

    from lorakit.train.loop import train

    base = rss_mb()
    config = lorakit_config(args, "out_lorakit", args.warmup + args.steps)
    stamps: list[float] = []
    result = train(config, progress=lambda step, total, loss, smooth: stamps.append(time.perf_counter()))
    times = [b - a for a, b in zip(stamps[args.warmup - 1 :], stamps[args.warmup :])]
    return {"step_s": statistics.median(times), "peak_mb": peak_mb(), "base_mb": base, "loss": result.losses[-1]}


# --- peer: diffusers + PEFT, as train_text_to_image_lora.py ----------------------------------------------------------
def _peer_setup(args: argparse.Namespace):
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from lorakit.models.embedded import embedded_model_path

    path = args.model or embedded_model_path()
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    fp32 = {"torch_dtype": torch.float32}
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **fp32)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **fp32)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **fp32)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    files = sorted(args.data.glob("*.png"))
    pixels = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
            for f in files
        ]
    )
    ids = tokenizer(
        [f.with_suffix(".txt").read_text() for f in files],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return scheduler, text_encoder, vae, unet, pixels, ids


def run_peer(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    import diffusers  # noqa: F401  (imported before the baseline on both sides)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    base = rss_mb()
    scheduler, text_encoder, vae, unet, pixels, ids = _peer_setup(args)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    generator = torch.Generator().manual_seed(0)
    unet.train()
    stamps = []
    for step in range(args.warmup + args.steps):
        pick = torch.randperm(len(pixels), generator=generator)[: args.batch]
        latents = vae.encode(pixels[pick]).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids[pick], return_dict=False)[0]
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())
    times = [b - a for a, b in zip(stamps[args.warmup - 1 :], stamps[args.warmup :])]
    return {"step_s": statistics.median(times), "peak_mb": peak_mb(), "base_mb": base, "loss": float(loss)}


# --- floor ----------------------------------------------------------------------------------------------------------
def run_floor(args: argparse.Namespace) -> dict:
    """Flops of one lorakit step (forward + backward of the UNet with LoRA) and this machine's matmul rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    from lorakit.train.loop import Trainer

    config = lorakit_config(args, "out_floor", 1)
    trainer = Trainer(config)
    with FlopCounterMode(display=False) as counter:
        trainer._optimizer_step(trainer._batches())
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(3):
        a @ b
    start, reps = time.perf_counter(), 40
    for _ in range(reps):
        a @ b
    rate = 2 * 512**3 * reps / (time.perf_counter() - start)
    return {"flops": counter.get_total_flops(), "rate": rate}


def _worker(args: argparse.Namespace) -> None:
    out = {"lorakit": run_lorakit, "peer": run_peer, "floor": run_floor}[args.worker](args)
    print("RESULT " + json.dumps(out))


def _spawn(args: argparse.Namespace, worker: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        worker,
        "--dir",
        str(args.dir),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--rank",
        str(args.rank),
        "--size",
        str(args.size),
        "--threads",
        str(args.threads),
    ]
    cmd += ["--checkpointing"] if args.checkpointing else []
    cmd += ["--model", args.model] if args.model else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{worker} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def _best(runs: list[dict]) -> dict:
    """Each figure's best over the runs of one side."""
    return {
        "step_s": min(r["step_s"] for r in runs),
        "peak_mb": min(r["peak_mb"] for r in runs),
        "above_mb": min(r["peak_mb"] - r["base_mb"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_train"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, alternating")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    parser.add_argument(
        "--sd15", action="store_true", help="an SD1.5-size model with random weights instead of the embedded one"
    )
    parser.add_argument("--model", help=argparse.SUPPRESS)  # set for the workers
    parser.add_argument("--worker", choices=["lorakit", "peer", "floor"])
    args = parser.parse_args()
    args.data = args.dir / "data"
    if args.worker:
        _worker(args)
        return
    if args.sd15:
        args.model = str(make_sd15_folder(args.dir / "sd15"))
    make_images(args.data, 16, args.size)
    # alternate the sides and keep each one's best run: other load on the machine hits both alike
    runs: dict[str, list[dict]] = {"peer": [], "lorakit": []}
    for round_ in range(args.rounds):
        for side in ("peer", "lorakit") if round_ % 2 == 0 else ("lorakit", "peer"):  # neither always goes first
            runs[side].append(_spawn(args, side))
    for side, results in runs.items():
        times = ", ".join(f"{r['step_s']:.3f}" for r in results)
        print(f"{side} runs, s/step: {times}")
    peer, ours = (_best(runs[side]) for side in ("peer", "lorakit"))
    floor = _spawn(args, "floor")
    floor_s = floor["flops"] / floor["rate"]
    print(
        f"LoRA training step, {'SD1.5-size model (random weights)' if args.sd15 else 'embedded SD1-layout model'}, "
        f"{args.size} px, batch {args.batch}, rank {args.rank}, "
        f"{args.threads} thread(s){', gradient checkpointing' if args.checkpointing else ''}"
    )
    print(f"floor: {floor['flops'] / 1e9:.2f} GFLOP per step / {floor['rate'] / 1e9:.1f} GFLOP/s = {floor_s:.3f} s")
    print(f"{'':24}{'s/step':>10}{'peak RSS MB':>14}{'above imports MB':>18}")
    for name, r in (("diffusers + PEFT", peer), ("lorakit (caches on)", ours)):
        print(f"{name:24}{r['step_s']:>10.3f}{r['peak_mb']:>14.0f}{r['above_mb']:>18.0f}")
    print(
        f"{'ratio lorakit / peer':24}{ours['step_s'] / peer['step_s']:>10.2f}{ours['peak_mb'] / peer['peak_mb']:>14.2f}"
        f"{ours['above_mb'] / peer['above_mb']:>18.2f}"
    )


if __name__ == "__main__":
    main()
