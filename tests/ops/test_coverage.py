"""Coverage of a LoRA against architectures, concrete models and checkpoints: shapes checked, reasons given."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lorakit.arch.tables import module_table
from lorakit.core.patches import LohaPatch, LoraPatch
from lorakit.errors import TargetError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import save_lora
from lorakit.ops.coverage import (
    coverage,
    detect_file_arch,
    load_for_model,
    model_for_arch,
    model_for_checkpoint,
    model_for_modules,
    patch_misfit,
)

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parents[1] / "formats"))
from dialect_models import tiny_text_encoder, tiny_unet  # noqa: E402


def _lora(shapes: dict[Target, tuple[int, ...]], rank: int = 2, seed: int = 0) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    patches = {}
    for target, shape in shapes.items():
        patches[target] = LoraPatch(
            up=torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g),
            down=torch.randn(rank, *shape[1:], generator=g),
            alpha=1.0,
        )
    return LoraFile(patches=patches)


SD1_MODULES = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.3.attentions.2.proj_out",
)


def _sd1_lora() -> LoraFile:
    table = module_table("sd1", "unet")
    te = module_table("sd1", "text_encoder")
    shapes = {Target("unet", m): table[m] for m in SD1_MODULES}
    shapes[Target("text_encoder", "text_model.encoder.layers.0.mlp.fc1")] = te["text_model.encoder.layers.0.mlp.fc1"]
    return _lora(shapes)


def test_arch_tables_match_every_target_and_count_blocks_in_lbw_notation():
    report = coverage(_sd1_lora(), model_for_arch("sd1"))
    assert report.matched_percent == 100.0 and not report.unmatched and len(report.matched) == 4
    touched = {b.block: b.touched for b in report.blocks if b.touched}
    # LoRA Block Weight ids: down_blocks.0 attention = input block 1, mid = M00, last up attention = output block 11
    assert touched == {"BASE": 1, "IN01": 1, "M00": 1, "OUT11": 1}
    linears_and_convs = sum(
        1
        for c in ("unet", "text_encoder")
        for m, s in module_table("sd1", c).items()
        if len(s) >= 2 and not m.endswith("_embedding")
    )
    assert report.untouched + 4 == linears_and_convs
    assert report.modules_percent == pytest.approx(100 * 4 / linears_and_convs)


def test_wrong_shape_missing_module_and_component_are_reported():
    table = module_table("sd1", "unet")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # (320, 768)
    lora = _lora(
        {
            Target("unet", name): (320, 1024),
            Target("unet", "down_blocks.9.nothing"): (4, 4),
            Target("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"): (8, 8),
            Target("unet", SD1_MODULES[0]): table[SD1_MODULES[0]],
        }
    )
    report = coverage(lora, model_for_arch("sd1"))
    reasons = {u.target: u.reason for u in report.unmatched}
    assert reasons[f"unet.{name}"].startswith("wrong shape") and "(320, 768)" in reasons[f"unet.{name}"]
    assert reasons["unet.down_blocks.9.nothing"] == "no such module"
    assert reasons["text_encoder_2.text_model.encoder.layers.0.mlp.fc1"] == "no such component"
    assert report.matched == [f"unet.{SD1_MODULES[0]}"] and report.matched_percent == 25.0


def test_shape_check_agrees_with_applying_the_delta_to_the_real_weight():
    """The meta-device check against torch itself: fits exactly when the dense delta can be added to the weight."""
    unet = tiny_unet()
    model = model_for_modules({"unet": unet})
    g = torch.Generator().manual_seed(1)
    for name, shape in model.tables["unet"].items():
        if len(shape) < 2:
            continue
        for wrong in (False, True):
            in_shape = (shape[1] + 1, *shape[2:]) if wrong else shape[1:]
            patch = LohaPatch(
                w1a=torch.randn(shape[0], 2, generator=g),
                w1b=torch.randn(2, *in_shape, generator=g),
                w2a=torch.randn(shape[0], 2, generator=g),
                w2b=torch.randn(2, *in_shape, generator=g),
            )
            weight = unet.get_submodule(name).weight
            try:
                _ = weight + patch.delta().reshape(weight.shape)
                fits = True
            except RuntimeError:
                fits = False
            assert (patch_misfit(patch, shape) is None) == fits, name


def test_concrete_model_without_text_model_level_and_generic_blocks(tmp_path):
    te = tiny_text_encoder()  # transformers 5 CLIPTextModel: no ``text_model.`` level
    unet = tiny_unet()
    model = model_for_modules({"unet": unet, "text_encoder": te})
    lora = _lora(
        {
            Target("text_encoder", "text_model.encoder.layers.1.self_attn.k_proj"): (12, 12),
            Target("unet", "down_blocks.0.attentions.0.proj_in"): tuple(
                unet.down_blocks[0].attentions[0].proj_in.weight.shape
            ),
        }
    )
    report = coverage(lora, model)
    assert report.matched_percent == 100.0
    blocks = {b.block for b in report.blocks if b.touched}
    assert blocks == {"text_encoder:encoder.layers.1", "unet:down_blocks.0"}
    adaptable = sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for part in (unet, te) for m in part.modules())
    assert sum(b.touched + b.untouched for b in report.blocks) == adaptable


def test_pipeline_components_are_accepted():
    class Pipe:
        components = {"unet": tiny_unet(), "scheduler": object(), "text_encoder": tiny_text_encoder()}

    model = model_for_modules(Pipe())
    assert set(model.tables) == {"unet", "text_encoder"} and model.concrete


def test_sd1_file_against_sdxl_is_refused_with_what_it_is_for(tmp_path):
    path = save_lora(_sd1_lora(), tmp_path / "sd1.safetensors", dialect="kohya", arch="sd1")
    assert detect_file_arch(path)[0] == "sd1"
    with pytest.raises(TargetError, match=r"is a LoRA for sd1 \(.*\), not for sdxl"):
        load_for_model(path, model_for_arch("sdxl"))
    lora = load_for_model(path, model_for_arch("sd1"))
    assert coverage(lora, model_for_arch("sd1")).matched_percent == 100.0


def test_kohya_keys_of_a_tiny_model_place_with_its_own_names(tmp_path):
    unet = tiny_unet()
    tables = {"unet": {k: v for k, v in model_for_modules({"unet": unet}).tables["unet"].items() if len(v) >= 2}}
    lora = _lora({Target("unet", m): s for m, s in list(tables["unet"].items())[:6]})
    path = save_lora(lora, tmp_path / "tiny.safetensors", dialect="kohya", modules={"unet": unet})
    model = model_for_modules({"unet": unet})
    back = load_for_model(path, model)
    assert set(back.patches) == set(lora.patches) and not back.skipped
    assert coverage(back, model).matched_percent == 100.0


def _tiny_diffusers_folder(folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
            }
        )
    )
    for name, part in (("unet", tiny_unet()), ("text_encoder", tiny_text_encoder())):
        (folder / name).mkdir()
        save_file(
            {k: v.contiguous() for k, v in part.state_dict().items()},
            str(folder / name / ("diffusion_pytorch_model.safetensors" if name == "unet" else "model.safetensors")),
        )


def test_checkpoint_folder_tables_come_from_its_header(tmp_path):
    pytest.importorskip("lorakit.formats.checkpoint")
    _tiny_diffusers_folder(tmp_path / "base")
    model = model_for_checkpoint(tmp_path / "base", arch="sd1")
    unet = tiny_unet()
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            assert model.tables["unet"][name] == tuple(module.weight.shape)
            assert model.kinds["unet"][name] in ("linear", "conv")
    name = "down_blocks.0.attentions.0.proj_in"
    lora = _lora({Target("unet", name): tuple(unet.get_submodule(name).weight.shape)})
    assert coverage(lora, model).matched == [f"unet.{name}"]
    loaded = load_for_model(save_lora(lora, tmp_path / "l.safetensors", dialect="diffusers"), model)
    assert coverage(loaded, model).matched_percent == 100.0


def test_lora_for_another_arch_than_the_checkpoint_is_refused(tmp_path):
    pytest.importorskip("lorakit.formats.checkpoint")
    _tiny_diffusers_folder(tmp_path / "base")
    model = model_for_checkpoint(tmp_path / "base", arch="sd1")
    table = module_table("sdxl", "unet")
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    path = save_lora(_lora({Target("unet", module): table[module]}), tmp_path / "xl.safetensors", arch="sdxl")
    with pytest.raises(TargetError, match=rf"is a LoRA for sdxl \(.*\), not for sd1 \({tmp_path / 'base'}\)"):
        load_for_model(path, model)
