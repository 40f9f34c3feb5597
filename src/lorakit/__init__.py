"""lorakit: LoRA toolkit for diffusion models and any PyTorch model.

``import lorakit`` stays light: it imports torch and nothing heavier (no diffusers, no transformers).
"""

from lorakit.errors import LorakitError

__version__ = "0.1.0"

__all__ = ["LorakitError", "__version__"]
