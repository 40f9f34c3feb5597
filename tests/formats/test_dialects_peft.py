"""PEFT as the oracle for PEFT adapter folders, both ways, on the tiny UNet.

A folder lorakit writes must load with ``PeftModel.from_pretrained`` and give the outputs of lorakit's own apply;
a folder PEFT saves (rank and alpha patterns, rsLoRA, DoRA on linears and convs) must read with PEFT's deltas.
"""

from __future__ import annotations

import json

import pytest
import torch
from dialect_models import apply_to, random_lora, tables_of, tiny_unet, unet_inputs

from lorakit.core.patches import DoraMagnitude, LoraPatch
from lorakit.errors import AdapterError
from lorakit.formats.canonical import LoraFile, Target
from lorakit.formats.lora_io import load_lora, save_lora, to_state_dict

torch.set_num_threads(1)
peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402


def _outputs(model):
    x, t, enc = unet_inputs()
    with torch.no_grad():
        return model(x, t, enc).sample


def _unet_lora(*, dora: bool = False, tucker: bool = False) -> LoraFile:
    tables = tables_of(unet=tiny_unet())
    lora = random_lora(tables, alphas=(0.5, 2.0, 3.0, 5.0))
    g = torch.Generator().manual_seed(9)
    for target, patch in list(lora.patches.items()):
        magnitude = None
        if dora:  # PEFT's use_dora covers every module of an adapter
            magnitude = DoraMagnitude(torch.rand(patch.up.shape[0], generator=g) + 0.5, "out")
        mid = None
        if tucker and target.module.endswith("conv2"):
            kernel = patch.down.shape[2:]
            mid = torch.randn(patch.rank, patch.rank, *kernel, generator=g)
            patch = LoraPatch(up=patch.up, down=patch.down[:, :, :1, :1].clone(), alpha=patch.alpha)
        lora.patches[target] = LoraPatch(up=patch.up, down=patch.down, mid=mid, alpha=patch.alpha, dora=magnitude)
    return lora


@pytest.mark.parametrize("dora", [False, True])
def test_folder_written_by_lorakit_loads_in_peft_with_same_outputs(tmp_path, dora):
    lora = _unet_lora(dora=dora, tucker=True)
    save_lora(lora, tmp_path / "adapter", dialect="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is dora and config["rank_pattern"] and config["alpha_pattern"]
    model = peft.PeftModel.from_pretrained(tiny_unet(), tmp_path / "adapter")
    layers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == len(lora.patches)
    mine = apply_to(tiny_unet(), lora.for_component("unet"))
    torch.testing.assert_close(_outputs(model), _outputs(mine), atol=2e-5, rtol=1e-5)


def test_folder_roundtrip_is_exact(tmp_path):
    lora = _unet_lora(dora=True)
    save_lora(lora, tmp_path / "adapter", dialect="peft")
    back = load_lora(tmp_path / "adapter", modules={"unet": tiny_unet()})
    assert back.dialect == "peft" and set(back.patches) == set(lora.patches)
    for target, patch in lora.patches.items():
        got = back.patches[target]
        assert torch.equal(got.up, patch.up) and torch.equal(got.down, patch.down)
        assert got.scale == patch.scale
        if patch.dora is not None:
            assert torch.equal(got.dora.magnitude.flatten(), patch.dora.magnitude.flatten())


@pytest.mark.parametrize(
    "options",
    [
        {"rank_pattern": {"to_k": 2}, "alpha_pattern": {"proj_in": 3}},
        {"use_rslora": True, "rank_pattern": {"conv1": 3}},
        {"use_dora": True},
    ],
    ids=["patterns", "rslora", "dora"],
)
def test_folder_saved_by_peft_reads_with_peft_deltas(tmp_path, options):
    unet = tiny_unet()
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["to_q", "to_k", "proj_in", "conv1", "ff.net.2"], **options
    )
    model = peft.get_peft_model(unet, config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(
                    torch.rand(param.shape, generator=g) + 0.2
                    if "magnitude" in name
                    else torch.randn(param.shape, generator=g) * 0.3
                )
    model.save_pretrained(tmp_path)
    lora = load_lora(tmp_path, modules={"unet": tiny_unet()})
    base = tiny_unet()
    for name, layer in model.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        module = name.removeprefix("base_model.model.").replace(".base_layer", "")
        patch = lora.patches[Target("unet", module)]
        weight = base.get_submodule(module).weight
        merged = layer.get_base_layer().weight.detach().clone()
        layer.merge(adapter_names=["default"])
        want = layer.get_base_layer().weight.detach() - merged
        layer.unmerge()
        torch.testing.assert_close(patch.effect(weight), want, atol=2e-6, rtol=1e-5, msg=module)


def test_state_dict_form_carries_its_config():
    lora = _unet_lora()
    tensors, metadata = to_state_dict(lora, "peft")
    assert all(k.startswith("base_model.model.") for k in tensors)
    back = load_lora(tensors, metadata=metadata, modules={"unet": tiny_unet()})
    for target, patch in lora.patches.items():
        assert back.patches[target].scale == pytest.approx(patch.scale)


def test_kinds_peft_cannot_hold_are_refused_by_name():
    from lorakit.core.patches import LohaPatch

    lora = LoraFile(
        patches={
            Target("unet", "conv_in"): LohaPatch(
                w1a=torch.ones(8, 1), w1b=torch.ones(1, 36), w2a=torch.ones(8, 1), w2b=torch.ones(1, 36)
            )
        }
    )
    with pytest.raises(AdapterError, match="unet.conv_in.*LohaPatch.*kohya"):
        to_state_dict(lora, "peft")
    column = LoraFile(
        patches={
            Target("unet", "conv_in"): LoraPatch(
                up=torch.ones(8, 1), down=torch.ones(1, 4, 3, 3), dora=DoraMagnitude(torch.ones(1, 4, 1, 1), "in")
            )
        }
    )
    with pytest.raises(AdapterError, match="per input column"):
        to_state_dict(column, "diffusers")
    mixed = _unet_lora()
    target = next(iter(mixed.patches))
    patch = mixed.patches[target]
    mixed.patches[target] = LoraPatch(up=patch.up, down=patch.down, dora=DoraMagnitude(torch.ones(patch.up.shape[0])))
    with pytest.raises(AdapterError, match="1 of .* modules use DoRA"):
        to_state_dict(mixed, "peft")
