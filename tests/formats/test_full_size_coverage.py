"""Full size: a LoRA on every Linear (and, for the UNets, every conv as LoCon) of each architecture, written in each
dialect and read back, maps 100% onto the architecture's module tables with every shape checked.

The tables are the real models' (generated from diffusers / transformers on the meta device), so this covers every
name rule of every dialect at the real widths: SDXL's LDM block numbers, FLUX's fused qkv / linear1 slices, SD3's
joint blocks, the text encoders' prefixes (T5 as te3 / t5xxl). Rank-1 factors keep it small; the deltas are
compared through random probes, so no dense full-size matrix is formed.
"""

from __future__ import annotations

import functools

import pytest
import torch

from lorakit.arch import registry, tables
from lorakit.core.patches import LoraPatch
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import load_lora, save_lora, to_state_dict
from lorakit.ops.coverage import coverage, model_for_arch

torch.set_num_threads(1)

VARIANTS = tuple(registry.VARIANTS)
FILE_DIALECTS = ("kohya", "diffusers", "comfy")


@functools.cache
def full_lora(variant: str) -> LoraFile:
    """Rank-1 LoRA on every linear and conv module of every component, random factors, alpha 0.5."""
    g = torch.Generator().manual_seed(0)
    patches = {}
    for component in registry.VARIANTS[variant].components:
        for module, info in tables.module_info(variant, component).items():
            if info.kind not in ("linear", "conv"):
                continue
            shape = info.shape
            up = torch.randn(shape[0], 1, *([1] * (len(shape) - 2)), generator=g)
            patches[Target(component, module)] = LoraPatch(
                up=up, down=torch.randn(1, *shape[1:], generator=g), alpha=0.5
            )
    return LoraFile(patches=patches)


def _expected_count(variant: str) -> int:
    return sum(
        1
        for c in registry.VARIANTS[variant].components
        for info in tables.module_info(variant, c).values()
        if info.kind in ("linear", "conv")
    )


def _assert_full_and_exact(back: LoraFile, variant: str) -> None:
    lora = full_lora(variant)
    report = coverage(back, model_for_arch(variant))
    assert not report.unmatched and not report.skipped_keys
    assert report.matched_percent == 100.0 and len(report.matched) == _expected_count(variant)
    assert report.untouched == 0 and report.modules_percent == 100.0
    assert set(back.patches) == set(lora.patches)
    g = torch.Generator().manual_seed(1)
    for target, patch in back.patches.items():
        # Same delta, compared through random probes (no dense out x in matrix): fused q/k/v and linear1 come
        # back as block-diagonal factors of the summed rank, so the factors differ while dW must not.
        want = lora.patches[target]
        probe = torch.randn(want.down[0].numel(), 2, generator=g, dtype=torch.float64)
        assert torch.allclose(_apply(patch, probe), _apply(want, probe), rtol=1e-6, atol=1e-6), target


def _apply(patch: LoraPatch, probe: torch.Tensor) -> torch.Tensor:
    """``dW_flat @ probe`` from the factors."""
    return patch.scale * (patch.up.flatten(1).double() @ (patch.down.flatten(1).double() @ probe))


@pytest.mark.parametrize("dialect", FILE_DIALECTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_dialect_maps_fully_onto_the_real_tables(variant, dialect):
    tensors, metadata = to_state_dict(full_lora(variant), dialect, arch=variant)
    # no arch given: the architecture comes from what the writer put in the file
    back = load_lora(
        tensors,
        metadata=metadata,
        arch=None if variant == registry.DEFAULT_VARIANT.get(registry.arch_of(variant)) else variant,
    )
    assert back.arch == registry.arch_of(variant)
    _assert_full_and_exact(back, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_folders_map_fully_onto_the_real_tables(variant, tmp_path):
    folder = save_lora(full_lora(variant), tmp_path / "adapter", dialect="peft", arch=variant)
    back = load_lora(folder, arch=variant)
    _assert_full_and_exact(back, variant)
