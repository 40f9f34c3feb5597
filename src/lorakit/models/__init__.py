"""Base models: tiny pipelines built in code, and pipelines loaded from local files (never a hub download).

``build_tiny_pipeline(arch, seed=0)`` builds a complete tiny diffusers pipeline; ``load_pipeline(path)`` opens a
diffusers folder or a single-file checkpoint with configs bundled in lorakit (``None``: the embedded tiny model).
Importing this package does not import diffusers; the functions do.
"""

from __future__ import annotations

from lorakit.models.loading import LoadedPipeline, load_pipeline
from lorakit.models.tiny import TINY_ARCHS, build_tiny_pipeline

__all__ = ["TINY_ARCHS", "LoadedPipeline", "build_tiny_pipeline", "load_pipeline"]
