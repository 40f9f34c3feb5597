"""Which base models lorakit knows: architectures, their variants, components and bundled tables.

An *architecture* (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3``) is what a LoRA file is for (``LoraFile.arch``). A
*variant* is one released model of it whose module set differs (FLUX.1 dev has a guidance embedder, schnell has not;
SD3 medium, SD3.5 medium and SD3.5 large differ in width, depth and dual attention). Every architecture has a default
variant, so callers that only know the architecture still get a table.

Each (variant, component) names a *table*: a generated data file in ``data/`` and the config it was built from in
``configs/``. Text encoders are shared between architectures, so their tables are named after the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ARCHS",
    "DEFAULT_VARIANT",
    "TABLES",
    "VARIANTS",
    "TableSpec",
    "VariantInfo",
    "arch_of",
    "resolve_variant",
    "table_name",
]


@dataclass(frozen=True)
class TableSpec:
    """One generated module table and the model class it was built from.

    Attributes:
        library: ``diffusers`` or ``transformers``.
        class_name: the model class, e.g. ``UNet2DConditionModel`` or ``CLIPTextModelWithProjection``.
        source: the public model repository whose config the table reproduces (for the record only).
    """

    library: str
    class_name: str
    source: str


@dataclass(frozen=True)
class VariantInfo:
    """One released model.

    Attributes:
        arch: the architecture family (``sd1`` ... ``sd3``).
        components: component name -> table name, in diffusers pipeline order.
        resolution: native training resolution in pixels.
        prediction: what the denoiser predicts (``epsilon``, ``v_prediction``, ``flow``).
    """

    arch: str
    components: dict[str, str]
    resolution: int
    prediction: str


TABLES: dict[str, TableSpec] = {
    "sd1-unet": TableSpec("diffusers", "UNet2DConditionModel", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd2-unet": TableSpec("diffusers", "UNet2DConditionModel", "stabilityai/stable-diffusion-2-1"),
    "sdxl-unet": TableSpec("diffusers", "UNet2DConditionModel", "stabilityai/stable-diffusion-xl-base-1.0"),
    "flux-dev-transformer": TableSpec("diffusers", "FluxTransformer2DModel", "black-forest-labs/FLUX.1-dev"),
    "flux-schnell-transformer": TableSpec("diffusers", "FluxTransformer2DModel", "black-forest-labs/FLUX.1-schnell"),
    "sd3-medium-transformer": TableSpec(
        "diffusers", "SD3Transformer2DModel", "stabilityai/stable-diffusion-3-medium-diffusers"
    ),
    "sd3.5-medium-transformer": TableSpec(
        "diffusers", "SD3Transformer2DModel", "stabilityai/stable-diffusion-3.5-medium"
    ),
    "sd3.5-large-transformer": TableSpec(
        "diffusers", "SD3Transformer2DModel", "stabilityai/stable-diffusion-3.5-large"
    ),
    "clip-l": TableSpec("transformers", "CLIPTextModel", "openai/clip-vit-large-patch14"),
    "clip-l-proj": TableSpec("transformers", "CLIPTextModelWithProjection", "openai/clip-vit-large-patch14"),
    "openclip-h": TableSpec("transformers", "CLIPTextModel", "stabilityai/stable-diffusion-2-1 (text_encoder)"),
    "openclip-bigg": TableSpec(
        "transformers", "CLIPTextModelWithProjection", "stabilityai/stable-diffusion-xl-base-1.0 (text_encoder_2)"
    ),
    "t5-xxl": TableSpec("transformers", "T5EncoderModel", "google/t5-v1_1-xxl (FLUX.1 text_encoder_2)"),
}
"""Every bundled table: ``data/<name>.json.gz`` built from ``configs/<name>.json``."""

_SD3_TEXT = {"text_encoder": "clip-l-proj", "text_encoder_2": "openclip-bigg", "text_encoder_3": "t5-xxl"}
_FLUX_TEXT = {"text_encoder": "clip-l", "text_encoder_2": "t5-xxl"}

VARIANTS: dict[str, VariantInfo] = {
    "sd1": VariantInfo("sd1", {"unet": "sd1-unet", "text_encoder": "clip-l"}, 512, "epsilon"),
    # SD2.1 768-v: the UNet is identical for the 512 epsilon model; only the scheduler differs.
    "sd2": VariantInfo("sd2", {"unet": "sd2-unet", "text_encoder": "openclip-h"}, 768, "v_prediction"),
    "sdxl": VariantInfo(
        "sdxl", {"unet": "sdxl-unet", "text_encoder": "clip-l", "text_encoder_2": "openclip-bigg"}, 1024, "epsilon"
    ),
    "flux-dev": VariantInfo("flux", {"transformer": "flux-dev-transformer", **_FLUX_TEXT}, 1024, "flow"),
    "flux-schnell": VariantInfo("flux", {"transformer": "flux-schnell-transformer", **_FLUX_TEXT}, 1024, "flow"),
    "sd3-medium": VariantInfo("sd3", {"transformer": "sd3-medium-transformer", **_SD3_TEXT}, 1024, "flow"),
    "sd3.5-medium": VariantInfo("sd3", {"transformer": "sd3.5-medium-transformer", **_SD3_TEXT}, 1024, "flow"),
    "sd3.5-large": VariantInfo("sd3", {"transformer": "sd3.5-large-transformer", **_SD3_TEXT}, 1024, "flow"),
}
"""Every known released model, keyed by variant name."""

DEFAULT_VARIANT: dict[str, str] = {
    "sd1": "sd1",
    "sd2": "sd2",
    "sdxl": "sdxl",
    "flux": "flux-dev",
    "sd3": "sd3-medium",
}
"""The variant used when only the architecture is known. FLUX.1 dev is a superset of schnell's modules."""

ARCHS: tuple[str, ...] = tuple(DEFAULT_VARIANT)
"""Architecture families, as ``LoraFile.arch`` names them."""


def resolve_variant(arch: str) -> str:
    """An architecture or variant name -> a variant name.

    Raises:
        KeyError: the name is neither.
    """
    if arch in VARIANTS:
        return arch
    if arch in DEFAULT_VARIANT:
        return DEFAULT_VARIANT[arch]
    known = sorted(set(ARCHS) | set(VARIANTS))
    raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(known)}")


def arch_of(arch: str) -> str:
    """An architecture or variant name -> its architecture family (``flux-schnell`` -> ``flux``)."""
    return VARIANTS[resolve_variant(arch)].arch


def table_name(arch: str, component: str) -> str:
    """The table for one component of an architecture or variant.

    Raises:
        KeyError: unknown architecture, or the model has no such component.
    """
    info = VARIANTS[resolve_variant(arch)]
    try:
        return info.components[component]
    except KeyError:
        raise KeyError(f"{arch} has no component {component!r}; it has {', '.join(info.components)}") from None
