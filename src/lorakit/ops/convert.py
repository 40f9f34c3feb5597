"""``convert``: rewrite a LoRA in another dialect, exactly, and optionally prove it by reading the output back.

    result = convert_lora("style.safetensors", "style_diffusers.safetensors", "diffusers", verify=True)
    result.max_error   # largest |dW_out - dW_in| over every target, in fp32

Nothing is dropped: a key the reader cannot place is an error (``convert`` never skips silently), and a patch the
target dialect cannot hold (LoHa in diffusers) is an error naming the target.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.core.patches import Patch
from lorakit.errors import ConfigError, FileFormatError, OutputError
from lorakit.formats.canonical import LoraFile
from lorakit.formats.checkpoint import model_shapes
from lorakit.formats.dialects.detect import family_of
from lorakit.formats.lora_io import DIALECTS, load_lora, save_lora
from lorakit.formats.safetensors_writer import check_output_path
from lorakit.ops.coverage import detect_file_arch, require_same_arch

__all__ = ["ConvertResult", "convert_lora", "effect_error"]


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert_lora`` did.

    Attributes:
        source: the input.
        output: the file (or PEFT folder) written.
        dialect_in: the input's dialect as read.
        dialect_out: the dialect written.
        arch: the architecture used to spell the names (None for a custom model).
        targets: how many targets were written.
        verified: whether the output was read back and compared.
        max_error: largest absolute difference of an effective delta, output against input (None unless verified).
        max_relative_error: ``max_error`` of a target over that target's largest |delta| (None unless verified).
    """

    source: str
    output: str
    dialect_in: str
    dialect_out: str
    arch: str | None
    targets: int
    verified: bool
    max_error: float | None = None
    max_relative_error: float | None = None


def _check_peft_output(out: Path, source: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file; a PEFT adapter is a folder, name a folder")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: the folder {out.parent} does not exist; create it or choose another output")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: the folder {out.parent} is not writable; choose another output folder")
    real_out, real_src = os.path.realpath(out), os.path.realpath(source)
    if real_src == real_out or real_src.startswith(real_out + os.sep):
        raise OutputError(
            f"{out}: holds the input ({source}); write to a new folder, lorakit never modifies its inputs"
        )


def _effect(patch: Patch, shape: tuple[int, ...] | None, seed: int) -> torch.Tensor:
    if patch.additive:
        return patch.delta()
    if shape is None:
        raise FileFormatError(
            "a weight-dependent patch (DoRA, (IA)^3) needs the module's shape to be compared; pass arch="
        )
    # the change depends on the base weight: compare both on the same random weight
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return patch.effect(weight)


def effect_error(before: LoraFile, after: LoraFile, arch: str | None = None) -> tuple[float, float]:
    """Largest absolute and relative difference of the effective deltas of two LoRAs with the same targets.

    Args:
        before: the reference.
        after: the LoRA to compare (e.g. ``before`` written in another dialect and read back).
        arch: architecture whose tables give module shapes for weight-dependent patches.

    Raises:
        FileFormatError: the target sets differ (the message names a few).
    """
    missing, extra = set(before.patches) - set(after.patches), set(after.patches) - set(before.patches)
    if missing or extra:
        names = ", ".join(str(t) for t in sorted(missing | extra)[:3])
        raise FileFormatError(f"the output has {len(extra)} targets the input lacks and lacks {len(missing)}: {names}")
    from lorakit.formats.dialects.context import ModelInfo

    info = ModelInfo({}, arch or before.arch)
    worst = worst_relative = 0.0
    for index, (target, patch) in enumerate(before.patches.items()):
        table = info.table(target.component) if info.arch else None
        shape = tuple(table[target.module]) if table and target.module in table and target.rows is None else None
        want, got = _effect(patch, shape, index), _effect(after.patches[target], shape, index)
        error = float((want - got.reshape(want.shape)).abs().max()) if want.numel() else 0.0
        scale = float(want.abs().max()) if want.numel() else 0.0
        worst = max(worst, error)
        worst_relative = max(worst_relative, error / scale if scale > 0 else (0.0 if error == 0 else float("inf")))
    return worst, worst_relative


def convert_lora(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dialect: str,
    *,
    verify: bool = False,
    arch: str | None = None,
    dtype: torch.dtype | None = None,
    model: str | os.PathLike[str] | None = None,
) -> ConvertResult:
    """Read a LoRA in any dialect and write it in ``dialect``, atomically.

    Args:
        source: the input file (or PEFT folder).
        output: the output file, or for ``peft`` the adapter folder.
        dialect: ``kohya``, ``diffusers``, ``peft`` or ``comfy``.
        verify: read the output back and compare every effective delta with the input's.
        arch: the architecture or variant, when the file does not tell it (needed to spell kohya names of SDXL,
            FLUX and SD3, which follow the original checkpoint).
        dtype: cast weights to this dtype (alphas keep their exact value).
        model: a base model (single-file checkpoint or diffusers folder) whose own module names and shapes place the
            keys: for LoRAs of models whose widths differ from the released ones (the embedded tiny model).

    Returns:
        What was written, and with ``verify`` the largest difference found (0 for an exact conversion).

    Raises:
        ConfigError: unknown dialect.
        TargetError: the file is for another architecture than ``arch``.
        OutputError: the output is the input, its folder is missing or read-only, or writing failed.
        FileFormatError, InputError, UnsafeFileError: the input cannot be read, or a key cannot be placed.
        AdapterError: a patch has no form in the target dialect.
    """
    if dialect not in DIALECTS:
        raise ConfigError(f"unknown dialect {dialect!r}; --to takes one of {', '.join(DIALECTS)}")
    src, out = Path(source), Path(output)
    if dialect == "peft":
        _check_peft_output(out, src)
    else:
        check_output_path(out, [src])
    arch, modules = model_shapes(model, arch)
    if arch is not None:
        family, reason = detect_file_arch(src)
        require_same_arch(str(src), family, reason, family_of(arch), f"--arch {arch}")
    lora = load_lora(src, arch=arch, modules=modules)
    save_lora(lora, out, dialect=dialect, arch=arch, dtype=dtype, modules=modules)
    result = ConvertResult(str(src), str(out), lora.dialect, dialect, arch or lora.arch, len(lora.patches), verify)
    if not verify:
        return result
    back = load_lora(out, arch=arch or lora.arch, modules=modules)
    error, relative = effect_error(lora, back, arch)
    return ConvertResult(**{**result.__dict__, "max_error": error, "max_relative_error": relative})
