"""Full-size models from the bundled configs (on the meta device): every parameter has a place in a single file."""

from __future__ import annotations

import pytest

from lorakit.arch import from_original, normalize_module_name, original_map
from lorakit.arch.names import checkpoint_prefix
from lorakit.models.single_file import _configs, _model_on_meta
from lorakit.models.vae_names import vae_to_original


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "flux", "sd3"])
def test_every_parameter_maps_to_an_original_key(arch):
    unplaced = []
    for component, (kind, config) in _configs(arch, arch, None).items():
        model = _model_on_meta(kind, config)
        if component == "vae":
            num_up = len(model.config.block_out_channels)
            unplaced += [n for n, _ in model.named_parameters() if vae_to_original(n, num_up) is None]
            continue
        table = original_map(arch, component)
        for name, _ in model.named_parameters():
            module = name.rpartition(".")[0]
            if normalize_module_name(arch, component, module) not in table:
                unplaced.append(f"{component}.{name}")
    assert unplaced == []


def test_fused_members_come_back_from_original_keys():
    # the loader slices fused rows by the same maps: a FLUX qkv key names its three members in row order
    refs = from_original("flux", checkpoint_prefix("flux", "transformer") + "double_blocks.0.img_attn.qkv.weight")
    assert [r.module.rsplit(".", 1)[-1] for r in refs] == ["to_q", "to_k", "to_v"]
