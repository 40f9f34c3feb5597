"""The training loop: ``train(config)`` trains a LoRA and writes it, its states, samples and loss log.

    result = train(load_config("train.toml"))
    result.output            # NAME.safetensors (kohya format, full metadata)

One optimizer step: ``gradient_accumulation`` forward passes over global batches of ``batch_size x processes``
images (each process takes its share), the loss ``sum_i w_i * mse_i / N`` over the N images of the step (``w_i``:
the min-SNR weight, times ``prior_loss_weight`` for regularization images), gradients summed over processes (DDP's
all-reduce), clipped, and one optimizer and schedule step. Noise and timesteps come from per-image generators (see
``noise.sample_generator``), so a resumed run or a run on more processes sees the same draws as one uninterrupted
process.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.train.config import TrainConfig
from lorakit.train.lean import LeanHandle, lean_activations
from lorakit.train.logs import LossLog
from lorakit.train.network import TrainedNetwork, attach_network
from lorakit.train.optim import build_optimizer, build_schedule
from lorakit.train.save import RunFacts, lora_metadata, write_lora
from lorakit.train.setup import (
    Processes,
    dataset_config,
    enable_checkpointing,
    fill_caches,
    load_base,
    make_caches,
    precision,
    processes,
    refuse_output_in_dataset,
)
from lorakit.train.state import (
    TrainState,
    check_fingerprint,
    find_state,
    load_state,
    prune_states,
    rng_state,
    save_state,
    set_rng_state,
    state_dir,
)
from lorakit.train.tasks import DiffusionTask, task_for

__all__ = ["TrainResult", "TrainingDiverged", "train"]

Progress = Callable[[int, int, float, float], None]
"""``progress(step, total_steps, loss, smoothed_loss)`` after each optimizer step."""


class TrainingDiverged(LorakitError):
    """The loss became NaN or infinite; the run stopped and kept its last good save."""


@dataclass
class TrainResult:
    """What a run produced."""

    output: Path
    """The final LoRA file."""
    arch: str
    steps: int
    losses: list[float]
    """Loss of every optimizer step of this run (resumed runs: from the resumed step on)."""
    saves: list[Path] = field(default_factory=list)
    states: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    loss_csv: Path | None = None
    loss_png: Path | None = None
    trainable_params: int = 0
    seconds: float = 0.0
    seconds_per_step: float = 0.0


class Trainer:
    """One run: set up by ``__init__``, trained by ``run``."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        base_dir: Path | None = None,
        pipe: Any = None,
        arch: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config, self.progress = config, progress
        self.procs: Processes = processes()
        self.autocast = precision(config.training.mixed_precision, self.procs.device)
        self.pipe, self.arch, self.source = load_base(config, pipe, arch, base_dir)
        output = Path(config.save.output_dir)
        self.output_dir = output if output.is_absolute() or base_dir is None else base_dir / output
        self._load_data(base_dir)
        self._prepare_model()
        self.optimizer = build_optimizer(self.network.param_groups(config.optimizer.lr), config.optimizer)
        self.schedule = build_schedule(self.optimizer, config.optimizer, config.training.steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast == torch.float16 else None
        self.step, self.started = 0, time.time()
        self.result = TrainResult(
            output=self.output_dir / f"{config.save.name}.safetensors",
            arch=self.arch,
            steps=0,
            losses=[],
            trainable_params=self.network.trainable_count(),
        )

    # --- setup --------------------------------------------------------------------------------------------------
    def _load_data(self, base_dir: Path | None) -> None:
        from lorakit.train.data import BatchLoader, load_dataset

        t = self.config.training
        self.images = load_dataset(dataset_config(self.config.dataset, base_dir))
        refuse_output_in_dataset(self.output_dir, self.images)
        # every process walks the same global batches and takes its share, so N processes see what one would
        self.loader = BatchLoader(self.images, t.batch_size * self.procs.world, seed=t.seed)
        self.facts = RunFacts(
            arch="",
            prediction="",
            model_source="",
            num_images=self.images.num_samples,
            dataset_dirs=self._dataset_dirs(),
            tag_frequency=self.images.tag_frequency(),
            steps_per_epoch=self.loader.steps_per_epoch,
            world_size=self.procs.world,
            resolution=int(self.images.config.resolution),
            num_reg_images=self.images.num_reg_samples,
        )

    def _dataset_dirs(self) -> dict[str, dict[str, int]]:
        dirs: dict[str, dict[str, int]] = {}
        for item in self.images.items:
            entry = dirs.setdefault(item.subset.name, {"n_repeats": item.subset.repeats, "img_count": 0})
            entry["img_count"] += 1
        return dirs

    def _prepare_model(self) -> None:
        config, device = self.config, self.procs.device
        pipe = self.pipe
        self.lean: list[LeanHandle] = []
        if self.autocast is not None:  # frozen weights in half precision, as the diffusers scripts do; VAE stays fp32
            for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).to(self.autocast)
        pipe.to(device)
        self.task: DiffusionTask = task_for(pipe, self.arch, config.training, config.model.prediction)
        self.facts.arch, self.facts.prediction, self.facts.model_source = self.arch, self.task.prediction, self.source
        self.network: TrainedNetwork = attach_network(pipe, self.arch, config.network, config.training.seed)
        for component, module in self.network.modules().items():
            module.train()
            if config.training.gradient_checkpointing:
                enable_checkpointing(module)
            if config.training.lean_activations:
                self.lean.append(lean_activations(module))
        identity = f"{self.arch}|{self.source}|{next(pipe.vae.parameters()).dtype}"
        self.latent_cache, self.text_cache = make_caches(config, self.task, self.images, identity)
        fill_caches(
            pipe, self.images, self.latent_cache, self.text_cache, keep=bool(config.sample.prompts), device=device
        )

    def fingerprint(self) -> str:
        c = self.config
        parts = {
            "arch": self.arch,
            "network": repr(c.network),
            "optimizer": repr(c.optimizer),
            "batch": [c.training.batch_size, c.training.gradient_accumulation, self.procs.world],
            "seed": c.training.seed,
            "prediction": self.task.prediction,
        }
        return json.dumps(parts, sort_keys=True)

    # --- one step -----------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[list[Any]]:
        while True:
            yield from self.loader.resume()

    def _conditioning(self, samples: list[Any]) -> dict[str, torch.Tensor]:
        captions = [s.caption for s in samples]
        if self.text_cache is not None:
            cond = self.text_cache.embeddings(captions)
            cond = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
            return {k: v.to(self.procs.device) for k, v in cond.items()}
        return self.task.encode_text(captions)

    def _latents(self, samples: list[Any]) -> torch.Tensor:
        if self.latent_cache is not None:
            return self.latent_cache.latents(samples).to(self.procs.device)
        return self.task.encode_images(torch.stack([s.pixels for s in samples]))

    def _forward(self, batch: list[Any], forward_pass: int, count: int) -> torch.Tensor:
        """This process's share of one global batch: the summed weighted loss / ``count``, backpropagated."""
        rank, world = self.procs.rank, self.procs.world
        indices = list(range(rank, len(batch), world))
        mine = [batch[i] for i in indices]
        if not mine:
            return torch.zeros((), device=self.procs.device)
        latents = self._latents(mine)
        draws = self.task.draw(latents, self.config.training.seed, forward_pass, indices)
        autocast = (
            torch.autocast(self.procs.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with autocast:
            cond = self._conditioning(mine)
            per_sample = self.task.loss(latents, cond, mine, draws)
        prior = self.config.training.prior_loss_weight
        if prior != 1.0 and any(s.is_reg for s in mine):
            weights = [prior if s.is_reg else 1.0 for s in mine]
            per_sample = per_sample * torch.tensor(weights, device=per_sample.device, dtype=per_sample.dtype)
        loss = per_sample.sum() / count
        # a NaN is caught after the step's losses are summed over processes, so that every process stops together
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def _optimizer_step(self, batches: Iterator[list[Any]]) -> float:
        t = self.config.training
        chunk = [next(batches) for _ in range(t.gradient_accumulation)]
        count = sum(len(b) for b in chunk)
        total = torch.zeros((), device=self.procs.device)
        for k, batch in enumerate(chunk):
            total += self._forward(batch, self.step * t.gradient_accumulation + k, count)
        params = [p for _, p in self.network.named_parameters()]
        self._reduce_grads(params)
        loss = float(self.procs.all_reduce_sum(total.float().reshape(1))[0])
        if not math.isfinite(loss):
            self._diverged(loss)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.optimizer.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.optimizer.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.procs.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.procs.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _diverged(self, loss: float) -> None:
        last = self.result.saves[-1] if self.result.saves else None
        kept = f"the last good save is {last}" if last else "nothing was saved yet (set save.every_steps)"
        raise TrainingDiverged(
            f"step {self.step + 1}: the loss is {loss}; training stopped and {kept}. Lower "
            f"optimizer.lr, keep max_grad_norm on, or use mixed_precision = 'bf16' instead of "
            f"fp16; --resume from a state continues from before the failure"
        )

    # --- run ----------------------------------------------------------------------------------------------------
    def resume_from(self, path: str | Path) -> Path:
        """Restore a training state (a state folder, or the output folder's latest) before ``run``."""
        folder = find_state(path, self.config.save.name)
        state = load_state(folder)
        check_fingerprint(state.fingerprint, self.fingerprint(), folder)
        params = dict(self.network.named_parameters())
        if set(params) != set(state.adapter):
            raise LorakitError(
                f"{folder}: the saved adapter has other tensors than this run's network; resume with "
                f"the same network settings"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state.adapter[name])
        self.optimizer.load_state_dict(state.optimizer)
        self.schedule.load_state_dict(state.schedule)
        self.loader.load_state_dict(state.loader)
        set_rng_state(state.rng)
        self.step = state.step
        self.started = float(state.extra.get("started_at", self.started))
        return folder

    def run(self) -> TrainResult:
        """Train to ``training.steps``; saves on the way and at the end. Raises TrainingDiverged on a NaN loss."""
        config, result = self.config, self.result
        self.facts.started_at = self.started
        main = self.procs.rank == 0
        log = LossLog(self.output_dir, resume_step=self.step) if main else None
        batches = self._batches()
        begun, first_step = time.perf_counter(), self.step
        try:
            while self.step < config.training.steps:
                epoch_before = self.loader.epoch
                loss = self._optimizer_step(batches)
                self.step += 1
                result.losses.append(loss)
                if log is not None:
                    log.add(
                        self.step, self.loader.epoch, loss, self.schedule.get_last_lr()[0], time.perf_counter() - begun
                    )
                    if self.progress is not None:
                        self.progress(self.step, config.training.steps, loss, log.smoothed_loss)
                self._maybe_save(epoch_before, log)
        finally:
            if log is not None:
                log.close()
            for handle in self.lean:  # a pipeline passed in gets its own forwards back
                handle.remove()
        if main:
            self._save(result.output, final=True)
            self._save_state(log)  # so that a finished run can be continued with more steps
            result.loss_csv, result.loss_png = log.path, log.plot()
            self._samples(result.output, final=True)
        result.steps = self.step
        result.seconds = time.perf_counter() - begun
        result.seconds_per_step = result.seconds / max(1, self.step - first_step)
        return result

    def _maybe_save(self, epoch_before: int, log: LossLog | None) -> None:
        save, step = self.config.save, self.step
        if step >= self.config.training.steps:
            return  # the final save follows
        by_step = save.every_steps is not None and step % save.every_steps == 0
        epoch = self.loader.epoch
        by_epoch = save.every_epochs is not None and epoch > epoch_before and epoch % save.every_epochs == 0
        if (by_step or by_epoch) and self.procs.rank == 0:
            suffix = f"step{step:06d}" if by_step else f"epoch{epoch:04d}"
            path = self._save(self.output_dir / f"{save.name}-{suffix}.safetensors", final=False)
            self._save_state(log)
            self._samples(path, final=False)

    def _save(self, path: Path, *, final: bool) -> Path:
        meta = lora_metadata(self.config, self.facts, self.step, finished=final)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_lora(
            self.network.lora_file({}),
            path,
            meta,
            arch=self.arch,
            dtype=self.config.save.dtype,
            modules=self.network.modules(),
        )
        self.result.saves.append(path)
        return path

    def _save_state(self, log: LossLog | None) -> None:
        state = TrainState(
            step=self.step,
            adapter={n: p for n, p in self.network.named_parameters()},
            optimizer=self.optimizer.state_dict(),
            schedule=self.schedule.state_dict(),
            loader=self.loader.state_dict(),
            rng=rng_state(),
            fingerprint=self.fingerprint(),
            extra={"started_at": self.started},
        )
        folder = save_state(state_dir(self.output_dir, self.config.save.name, self.step), state)
        prune_states(self.output_dir, self.config.save.name, self.config.save.keep_states)
        self.result.states.append(folder)

    def _samples(self, lora_path: Path, *, final: bool) -> None:
        sample = self.config.sample
        due = final or (sample.every_steps is not None and self.step % sample.every_steps == 0)
        if not sample.prompts or not due:
            return
        from lorakit.train.samples import draw_samples

        folder = self.output_dir / "samples"
        resolution = int(self.images.config.resolution)
        self.result.samples += draw_samples(
            self.pipe, self.network, lora_path, sample, folder, self.step, arch=self.arch, default_size=resolution
        )


def train(
    config: TrainConfig,
    *,
    base_dir: Path | None = None,
    resume: str | Path | None = None,
    pipe: Any = None,
    arch: str | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train a LoRA as ``config`` says and write it to ``save.output_dir``.

    Args:
        config: the run (see ``lorakit.train.config``).
        base_dir: folder that relative dataset paths are relative to (the config file's folder).
        resume: a training state folder, or an output folder whose latest state to continue from.
        pipe: a diffusers pipeline to train on instead of loading ``model.path`` (with ``arch``).
        arch: the architecture of ``pipe``.
        progress: called after each optimizer step with (step, steps, loss, smoothed loss).

    Returns:
        A ``TrainResult``: the final file, saves, states, samples, losses and timings.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (the last good save is kept and named).
        ConfigError, InputError, FileFormatError: bad settings, data or model (one-line messages).
    """
    trainer = Trainer(config, base_dir=base_dir, pipe=pipe, arch=arch, progress=progress)
    if resume is not None:
        trainer.resume_from(resume)
    return trainer.run()
