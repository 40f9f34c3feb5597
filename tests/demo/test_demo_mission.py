"""The demo mission end to end at a reduced size: files, kohya layout, LoRA files, grid, report fields, targets.

The score targets need the full run (``lorakit demo``); here the pipeline's plumbing is checked: the dataset folders
are what ``lorakit train`` reads (and its TOML files load), the LoRA files are kohya files that lorakit's reader
places on the embedded UNet, the grid has one cell per (row, column), and the report holds every measured field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lorakit.demo.mission import STAGES, MissionConfig, prepare_output, run_mission
from lorakit.demo.mission_eval import Scores, check_targets
from lorakit.errors import ConfigError, OutputError

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def mission(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    calls: list[tuple[str, int, int]] = []
    report = run_mission(MissionConfig.quick(out, seed=0, steps=2), lambda *a: calls.append(a))
    return out, report, calls


@pytest.mark.slow
def test_writes_kohya_folders_with_captions(mission):
    out, _, _ = mission
    concept = sorted((out / "data" / "concept" / "1_zkx").glob("*.png"))
    style = sorted((out / "data" / "style" / "1_qvz style").glob("*.png"))
    reg = sorted((out / "data" / "reg" / "1_shape").glob("*.png"))
    assert len(concept) == len(style) == len(reg) == 4
    for png in concept:
        assert Image.open(png).size == (32, 32)
        assert " zkx " in png.with_suffix(".txt").read_text()
    assert all("in qvz style" in p.with_suffix(".txt").read_text() for p in style)
    assert all("zkx" not in p.with_suffix(".txt").read_text() for p in reg)


@pytest.mark.slow
def test_lora_files_are_kohya_and_trained_with_reg_images(mission):
    from lorakit.formats.safetensors_io import read_file
    from lorakit.train import load_config

    out, report, _ = mission
    assert [lora.name for lora in report.loras] == ["concept", "style"]
    for lora in report.loras:
        path = Path(lora.file)
        assert path == out / lora.name / f"{lora.name}.safetensors"
        assert lora.bytes == path.stat().st_size > 0
        tensors, meta = read_file(path)
        assert all(k.startswith("lora_unet_") for k in tensors)
        assert meta["ss_num_train_images"] == "4" and meta["ss_num_reg_images"] == "4"
        assert meta["modelspec.trigger_phrase"] == lora.trigger
        assert lora.train_images == 4 and lora.reg_images == 4 and lora.steps == 2
        config = load_config(out / f"{lora.name}.toml")  # the run can be repeated with `lorakit train`
        assert [f.get("is_reg", False) for f in config.dataset["folders"]] == [False, True]
        assert config.training.steps == 2


@pytest.mark.slow
def test_lora_file_loads_in_diffusers_as_lorakit_applies_it(mission):
    """Oracle: diffusers' own kohya loader on a fresh embedded pipeline gives the UNet output of lorakit's apply."""
    import torch

    from lorakit.generate import apply_lora
    from lorakit.models.embedded import load_embedded_pipeline

    _, report, _ = mission
    gen = torch.Generator().manual_seed(0)
    x, cond, t = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 8, 64, generator=gen), torch.tensor([100, 700])
    ours, theirs = load_embedded_pipeline(), load_embedded_pipeline()
    with torch.no_grad():
        base = ours.unet(x, t, encoder_hidden_states=cond).sample
        apply_lora(ours, report.loras[0].file, weight=1.0)
        mine = ours.unet(x, t, encoder_hidden_states=cond).sample
        theirs.load_lora_weights(report.loras[0].file)
        reference = theirs.unet(x, t, encoder_hidden_states=cond).sample
    assert (mine - base).abs().max() > 1e-4  # two training steps already moved the output
    torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_grid_has_one_cell_per_row_and_column(mission):
    from lorakit.demo.grid import CELL_SCALE

    out, report, _ = mission
    grid = Image.open(report.grid)
    assert Path(report.grid) == out / "grid.png"
    assert len(report.grid_prompts) == 1 and len(report.grid_prompts[0]) == 6
    assert grid.width >= 6 * 32 * CELL_SCALE and grid.height >= 32 * CELL_SCALE
    row = report.grid_prompts[0]
    assert "<lora:" not in row[0] and "<lora:concept:0.5>" in row[2]
    assert "<lora:concept:1>" in row[5] and "<lora:style:1>" in row[5]
    assert grid.info["parameters"].startswith(row[0])


@pytest.mark.slow
def test_report_json_holds_every_measure(mission):
    out, report, calls = mission
    data = json.loads((out / "report.json").read_text())
    assert set(data["scores"]["concept"]) == {"0", "0.5", "1"}
    assert set(data["scores"]["style"]) == {"base", "lora"}
    assert set(data["scores"]["plain"]) == {"base", "concept", "style"}
    assert set(data["scores"]["plain_pixel_change"]) == {"concept", "style"}
    assert set(data["scores"]["combined"]) == {"base_concept", "base_style", "concept", "style"}
    assert data["scores"]["prompts"] == 2
    assert len(data["targets"]) == 6 and data["all_targets_met"] == report.all_targets_met
    assert set(data["stage_seconds"]) == set(STAGES) and data["seconds"] > 0
    assert [lora["file"] for lora in data["loras"]] == [lora.file for lora in report.loras]
    last = {stage: (done, total) for stage, done, total in calls}
    assert set(last) == set(STAGES) and all(done == total > 0 for done, total in last.values())


@pytest.mark.slow
def test_cli_tables_print_the_report(mission, capsys):
    from lorakit.cli.demo import _print_mission

    _, report, _ = mission
    _print_mission(report)
    text = capsys.readouterr().out
    assert "trained LoRAs" in text and "checker scores" in text and "targets" in text and "grid.png" in text


def test_output_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds no demo report"):
        prepare_output(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_previous_demo_output_is_replaced(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "data" / "concept" / "4_zkx").mkdir(parents=True)
    (tmp_path / "data" / "concept" / "4_zkx" / "old.png").write_bytes(b"x")
    prepare_output(tmp_path)
    assert not (tmp_path / "data").exists() and (tmp_path / "report.json").exists()


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="images"):
        MissionConfig(images=0)
    with pytest.raises(ConfigError, match="lr"):
        MissionConfig(lr=0.0)


def _scores(concept, plain, combined, style=(0.0, 1.0)):
    return Scores(
        prompts=10,
        concept=dict(zip(("0", "0.5", "1"), concept)),
        style={"base": style[0], "lora": style[1]},
        plain=dict(zip(("base", "concept", "style"), plain)),
        plain_pixel_change={"concept": 0.0, "style": 0.0},
        combined=dict(zip(("base_concept", "base_style", "concept", "style"), combined)),
    )


def test_targets_are_judged_from_the_scores():
    good = check_targets(_scores((0.0, 0.1, 0.8), (0.9, 0.85, 0.95), (0.0, 0.0, 0.6, 0.9)))
    assert all(t.met for t in good)
    bad = {
        t.name: t.met for t in check_targets(_scores((0.0, 0.5, 0.4), (0.9, 0.7, 0.9), (0.0, 0.0, 0.6, 0.0), (0, 0)))
    }
    assert bad == {
        "concept score rises with the weight": False,
        "style score with the style LoRA": False,
        "concept score at weight 1": False,
        "prompts without a trigger, concept LoRA": False,
        "prompts without a trigger, style LoRA": True,
        "both LoRAs: concept and style scores": False,
    }
