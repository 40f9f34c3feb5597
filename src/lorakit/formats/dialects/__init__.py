"""LoRA key dialects: kohya, diffusers / PEFT (and older diffusers forms), PEFT folders, LyCORIS, ComfyUI, XLabs.

One small module per dialect; the public entry points are in ``lorakit.formats.lora_io``.
"""
