"""lycoris-lora as the oracle for files its network writes: every kind reads with the deltas lycoris applies.

Each case wraps the tiny UNet with ``create_lycoris`` (every Linear and Conv2d), fills every adapter tensor with
random values (lycoris zeroes one side at init, which would make the comparison vacuous), saves with the network's
own ``save_weights``, reads the file with lorakit and compares the UNet's output under lycoris (multiplier 1) with the
UNet whose weights lorakit patched. The same file written back as kohya must read to identical tensors.
"""

from __future__ import annotations

import pytest
import torch
from dialect_models import apply_to, tiny_unet, unet_inputs

from lorakit.core.patches import FullPatch, Ia3Patch, LohaPatch, LokrPatch, LoraPatch
from lorakit.formats.lora_io import load_lora, module_shapes, save_lora

torch.set_num_threads(1)
lycoris = pytest.importorskip("lycoris")

CASES = {
    "locon": ("lora", {}, LoraPatch),
    "locon-tucker": ("lora", {"use_tucker": True}, LoraPatch),
    "loha": ("loha", {}, LohaPatch),
    "loha-tucker": ("loha", {"use_tucker": True}, LohaPatch),
    "lokr": ("lokr", {"factor": 4}, LokrPatch),
    "lokr-full": ("lokr", {"factor": 4, "full_matrix": True}, LokrPatch),
    "dora-rows": ("lora", {"dora_wd": True}, LoraPatch),
    "dora-columns": ("lora", {"dora_wd": True, "wd_on_output": False}, LoraPatch),
    "full": ("full", {}, FullPatch),
    "ia3": ("ia3", {}, Ia3Patch),
    "norms": ("lora", {"train_norm": True}, (LoraPatch, FullPatch)),  # w_norm / b_norm on GroupNorm, LayerNorm
}


def _lycoris_file(path, algo: str, options: dict) -> torch.Tensor:
    """Write a random lycoris network on the tiny UNet to ``path``; return the UNet's output under it."""
    unet = tiny_unet()
    targets = lycoris.LycorisNetwork.TARGET_REPLACE_MODULE
    wrapped = ["Linear", "Conv2d"] + (["GroupNorm", "LayerNorm"] if options.get("train_norm") else [])
    lycoris.LycorisNetwork.apply_preset({"target_module": wrapped})  # a class-wide setting
    try:
        network = lycoris.create_lycoris(
            unet, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=2, conv_alpha=3.0, algo=algo, **options
        )
    finally:
        lycoris.LycorisNetwork.apply_preset({"target_module": targets})
    network.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in network.named_parameters():
            value = torch.randn(param.shape, generator=g)
            param.copy_(value.abs() + 0.5 if "dora_scale" in name else value * 0.3)
        x, t, enc = unet_inputs()
        out = unet(x, t, enc).sample
    network.save_weights(str(path), torch.float32, None)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_network_file_reads_with_its_deltas(tmp_path, case):
    algo, options, kind = CASES[case]
    want = _lycoris_file(tmp_path / "ly.safetensors", algo, options)
    lora = load_lora(tmp_path / "ly.safetensors", modules={"unet": tiny_unet()})
    assert lora.dialect == "lycoris"
    norms = bool(options.get("train_norm"))
    assert len(lora.patches) == len([s for s in module_shapes(tiny_unet()).values() if norms or len(s) >= 2])
    assert all(isinstance(p, kind) for p in lora.patches.values())
    mine = apply_to(tiny_unet(), lora.for_component("unet"))
    x, t, enc = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(mine(x, t, enc).sample, want, atol=2e-5, rtol=1e-5)

    # Written back as kohya (LyCORIS suffixes kept), the same tensors come back.
    save_lora(lora, tmp_path / "k.safetensors", dialect="kohya")
    again = load_lora(tmp_path / "k.safetensors", modules={"unet": tiny_unet()})
    assert again.dialect == "kohya" and set(again.patches) == set(lora.patches)
    for target, patch in lora.patches.items():
        got = again.patches[target]
        assert type(got) is type(patch) and got.scale == patch.scale
        for name, tensor in patch.tensors().items():
            assert torch.equal(got.tensors()[name].flatten(), tensor.flatten()), (target, name)
