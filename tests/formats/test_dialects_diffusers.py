"""diffusers 0.42 as the oracle for the kohya and diffusers dialects on a tiny SD1-layout pipeline built in code.

A file lorakit writes must load in diffusers (``lora_state_dict`` + ``load_lora_into_unet`` / ``_text_encoder``, what
``load_lora_weights`` runs) with every adapter placed, and the merged weights must equal ``W + (alpha / r) B A`` as
lorakit computes it. The other way round, a file diffusers saves from a PEFT-trained UNet must read in lorakit with
the deltas and strength PEFT computes.
"""

from __future__ import annotations

import pytest
import torch
from dialect_models import apply_to, random_lora, tables_of, tiny_text_encoder, tiny_unet, unet_inputs

from lorakit.core.patches import apply_patches
from lorakit.formats.canonical import Target
from lorakit.formats.lora_io import load_lora, save_lora

torch.set_num_threads(1)
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

PIPE = diffusers.StableDiffusionPipeline


class _TinyPipeline(diffusers.loaders.StableDiffusionLoraLoaderMixin):
    """Just the parts of a StableDiffusionPipeline that ``load_lora_weights`` touches (no tokenizer, VAE...)."""

    hf_device_map = None

    def __init__(self) -> None:
        self.unet, self.text_encoder = tiny_unet(), tiny_text_encoder()

    @property
    def components(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def _load_with_diffusers(folder, name):
    """A fresh UNet and text encoder with the file loaded by diffusers' own ``load_lora_weights``."""
    pipe = _TinyPipeline()
    pipe.load_lora_weights(str(folder), weight_name=name, adapter_name="x")
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


@pytest.fixture
def unhandled(monkeypatch):
    """Keys diffusers reports as unexpected or missing while loading into the UNet (it only logs them)."""
    seen: list = []

    def record(incompatible, adapter_name):
        for kind in ("unexpected_keys", "missing_keys"):
            seen.extend(k for k in getattr(incompatible, kind, None) or () if ".lora_" in k)

    monkeypatch.setattr(diffusers.loaders.peft, "_maybe_warn_for_unhandled_keys", record)
    return seen


def _check_merged(models, lora) -> None:
    """Every adapted layer of diffusers' models, merged, equals lorakit's patched weight; no target is missing."""
    originals = {"unet": tiny_unet(), "text_encoder": tiny_text_encoder()}
    placed = set()
    for component, model in models.items():
        for name, layer in model.named_modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            layer.merge(adapter_names=["x"])
            module = name.replace(".base_layer", "")
            target = Target(component, module)
            assert target in lora.patches, f"diffusers adapted {target}, which the file does not hold"
            weight = originals[component].get_submodule(module).weight
            want = apply_patches(weight, [(lora.patches[target], 1.0)])
            torch.testing.assert_close(layer.base_layer.weight, want, atol=2e-5, rtol=1e-5, msg=str(target))
            placed.add(target)
    assert placed == set(lora.patches), f"not loaded by diffusers: {sorted(map(str, set(lora.patches) - placed))}"


def _tables():
    return tables_of(unet=tiny_unet(), text_encoder=tiny_text_encoder())


def _sd1_lora(alphas_for):
    """LoRA on every UNet conv/linear and text-encoder linear, ranks 1-3, alpha chosen per module."""
    lora = random_lora(_tables(), skip=lambda c, n, s: len(s) < 2 or "embedding" in n)
    for target, patch in list(lora.patches.items()):
        lora.patches[target] = type(patch)(up=patch.up, down=patch.down, alpha=alphas_for(target))
    return lora


def _attention_or_text(target: Target) -> bool:
    return target.component == "text_encoder" or ".transformer_blocks." in target.module


def test_kohya_file_loads_in_diffusers_at_lorakit_strength(tmp_path, unhandled):
    # diffusers 0.42 reads per-module kohya alphas right for convs, resnets and projections but mangles the names of
    # attention and text-encoder alphas (they fall back to the common alpha); vary alphas where it reads them.
    lora = _sd1_lora(lambda t: 2.0 if _attention_or_text(t) else (0.5 if "conv" in t.module else 3.0))
    save_lora(lora, tmp_path / "k.safetensors", dialect="kohya")
    _check_merged(_load_with_diffusers(tmp_path, "k.safetensors"), lora)
    assert unhandled == []


def test_diffusers_file_loads_at_lorakit_strength_with_any_alphas(tmp_path, unhandled):
    alphas = iter([0.5, 2.0, 3.0, 7.0] * 100)
    lora = _sd1_lora(lambda t: next(alphas))
    save_lora(lora, tmp_path / "d.safetensors", dialect="diffusers")
    _check_merged(_load_with_diffusers(tmp_path, "d.safetensors"), lora)
    assert unhandled == []


def test_diffusers_rejects_alpha_keys_in_its_own_form(tmp_path):
    # Why the diffusers writer puts alphas in lora_adapter_metadata: .alpha keys make diffusers refuse the file.
    from safetensors.torch import save_file

    from lorakit.formats.lora_io import to_state_dict

    lora = _sd1_lora(lambda t: 2.0)
    tensors, _ = to_state_dict(lora, "diffusers")
    tensors["unet.conv_in.alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        _load_with_diffusers(tmp_path, "a.safetensors")


def _peft_trained_unet():
    """A UNet with a PEFT LoRA as diffusers training scripts add it, with rank and alpha patterns and random B."""
    unet = tiny_unet()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"],
        rank_pattern={"to_k": 2},
        alpha_pattern={"proj_in": 3, "conv1": 1},
    )
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return unet, config


def _peft_deltas(unet):
    out = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, BaseTunerLayer):
            out[name.replace(".base_layer", "")] = layer.get_delta_weight("default")
    return out


@pytest.mark.parametrize("with_metadata", [True, False])
def test_file_saved_by_diffusers_reads_with_peft_deltas(tmp_path, with_metadata):
    from peft import get_peft_model_state_dict

    unet, config = _peft_trained_unet()
    extra = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()} if with_metadata else {}
    PIPE.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet), **extra)
    lora = load_lora(tmp_path / "pytorch_lora_weights.safetensors", modules={"unet": tiny_unet()})
    assert lora.dialect == "diffusers"
    deltas = _peft_deltas(unet)
    assert {t.module for t in lora.patches} == set(deltas)
    for module, delta in deltas.items():
        patch = lora.patches[Target("unet", module)]
        if with_metadata:
            torch.testing.assert_close(patch.delta(delta.shape), delta, atol=1e-6, rtol=1e-5)
        else:
            # Without lora_adapter_metadata the file carries no alpha: alpha = r, as diffusers itself loads it.
            assert patch.scale == 1.0


def test_diffusers_roundtrip_through_lorakit_keeps_peft_outputs(tmp_path):
    """diffusers' file -> lorakit -> kohya file -> diffusers gives the PEFT-trained UNet's outputs back."""
    from peft import get_peft_model_state_dict

    unet, _ = _peft_trained_unet()
    PIPE.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    lora = load_lora(tmp_path / "pytorch_lora_weights.safetensors", modules={"unet": tiny_unet()})
    save_lora(lora, tmp_path / "d2.safetensors", dialect="diffusers")
    again = _load_with_diffusers(tmp_path, "d2.safetensors")["unet"]
    x, t, enc = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, enc).sample, unet(x, t, enc).sample, atol=1e-5, rtol=1e-5)


def test_old_diffusers_processor_keys_read(tmp_path):
    """Attention-processor files (``processor.to_q_lora.down.weight``, ``lora_linear_layer``) place like new ones."""
    lora = _sd1_lora(lambda t: None)
    old = {}
    for target, patch in lora.patches.items():
        if target.component == "unet" and ".attn1." in target.module:
            head, _, part = target.module.rpartition(".")
            part = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora"}.get(part)
            if part is None:  # to_out.0
                head, part = head.rsplit(".", 1)[0], "to_out_lora"
            old[f"unet.{head}.processor.{part}.down.weight"] = patch.down
            old[f"unet.{head}.processor.{part}.up.weight"] = patch.up
        elif target.component == "text_encoder" and ".mlp." in target.module:
            old[f"text_encoder.text_model.{target.module}.lora_linear_layer.down.weight"] = patch.down
            old[f"text_encoder.text_model.{target.module}.lora_linear_layer.up.weight"] = patch.up
    back = load_lora(old, modules=_tables())
    assert back.dialect == "diffusers_old"
    assert len(back.patches) == len(old) // 2
    for target, patch in back.patches.items():
        assert torch.equal(patch.delta(), lora.patches[target].delta())


def test_strength_is_linear_and_once(tmp_path):
    """lorakit's file at diffusers' adapter weight 0.5 equals lorakit's own apply at strength 0.5."""
    lora = _sd1_lora(lambda t: 2.0)
    save_lora(lora, tmp_path / "k.safetensors", dialect="kohya")
    models = _load_with_diffusers(tmp_path, "k.safetensors")
    unet = models["unet"]
    unet.set_adapters(["x"], weights=[0.5])
    mine = apply_to(tiny_unet(), lora.for_component("unet"), strength=0.5)
    x, t, enc = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, enc).sample, mine(x, t, enc).sample, atol=2e-5, rtol=1e-5)
