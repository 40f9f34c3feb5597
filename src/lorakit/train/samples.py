"""Sample images during training, made from the saved file by the code that generates with LoRAs.

The adapter being trained is switched off and the file just written is applied by ``lorakit.generate`` (the same
path as ``lorakit generate --lora FILE``), so a sample shows what users will get from that file, fp16 rounding
included, not what the training graph computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.train.config import SampleConfig
from lorakit.train.network import TrainedNetwork

__all__ = ["draw_samples"]


@contextlib.contextmanager
def _trained_adapter_off(network: TrainedNetwork) -> Iterator[None]:
    modules = network.modules()
    was_training = {name: m.training for name, m in modules.items()}
    for handle in network.handles.values():
        handle.disable()
    for module in modules.values():
        module.eval()
    try:
        yield
    finally:
        for handle in network.handles.values():
            handle.enable()
        for name, module in modules.items():
            module.train(was_training[name])


def draw_samples(
    pipe: Any,
    network: TrainedNetwork,
    lora_path: Path,
    config: SampleConfig,
    folder: Path,
    step: int,
    *,
    arch: str,
    default_size: int,
) -> list[Path]:
    """Draw ``config.prompts`` with the LoRA file at ``lora_path``; returns the PNGs written (with infotext)."""
    from PIL.PngImagePlugin import PngInfo

    from lorakit.generate.run import GenerateConfig, LoraUse, generate_image
    from lorakit.models.loading import LoadedPipeline

    folder.mkdir(parents=True, exist_ok=True)
    size = (config.width or default_size, config.height or default_size)
    loaded = LoadedPipeline(pipe, arch, "training", "training")
    written = []
    with _trained_adapter_off(network):
        for i, prompt in enumerate(config.prompts):
            settings = GenerateConfig(
                prompt=prompt,
                steps=config.steps,
                cfg=config.guidance_scale,
                seed=config.seed + i,
                size=size,
                loras=(LoraUse(lora_path),),
            )
            result = generate_image(loaded, settings)
            info = PngInfo()
            info.add_text("parameters", result.infotext)
            path = folder / f"step{step:06d}-{i:02d}.png"
            temp = path.with_name(path.name + ".tmp")
            result.image.save(temp, format="PNG", pnginfo=info)
            temp.replace(path)
            written.append(path)
    return written
