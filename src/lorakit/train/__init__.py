"""Training LoRAs for SD1/SD2/SDXL/FLUX/SD3: ``train(load_config("train.toml"))`` writes a kohya-format LoRA.

Datasets, buckets, captions and caches live in ``lorakit.train.data``; the loop, optimizers, schedules, training
states and saving here. Importing this package does not import diffusers (the loop does when it runs).
"""

from lorakit.train.config import TrainConfig, config_from_dict, load_config
from lorakit.train.loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "config_from_dict", "load_config", "train"]
