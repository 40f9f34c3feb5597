"""inspect, check, convert and meta on the command line: tables, JSON, exit codes and one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lorakit.arch.tables import module_table
from lorakit.cli.main import main

torch.set_num_threads(1)

MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
KEY = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"


@pytest.fixture
def xl(tmp_path):
    out, inp = module_table("sdxl", "unet")[MODULE]
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "xl.safetensors"
    save_file(
        {
            f"{KEY}.lora_down.weight": torch.randn(4, inp, generator=g),
            f"{KEY}.lora_up.weight": torch.randn(out, 4, generator=g),
            f"{KEY}.alpha": torch.tensor(2.0),
        },
        str(path),
        metadata={
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_output_dir": "/home/a/out",
            "modelspec.trigger_phrase": "zzz",
        },
    )
    return path


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_table_and_json(xl, capsys):
    code, out, _ = _run(capsys, "inspect", xl, "--arch", "sdxl")
    assert code == 0 and "rank and alpha per block" in out and "IN04" in out and "zzz" in out
    assert "coverage of sdxl: 1 of 1 targets match (100.0%)" in out
    code, out, _ = _run(capsys, "inspect", xl, "--json")
    report = json.loads(out)
    assert code == 0 and report["arch"] == "sdxl" and report["dialect"] == "kohya"
    assert report["blocks"] == [{"block": "IN04", "modules": 1, "kinds": ["lora"], "ranks": [4], "alphas": [2.0]}]
    assert report["hashes"]["autov3"] and report["nonfinite"] == []


def test_check_exit_codes_and_lines(xl, tmp_path, capsys):
    code, out, _ = _run(capsys, "check", xl)
    assert code == 0 and out.strip() == f"{xl}: ok"
    bad = tmp_path / "bad.safetensors"
    save_file(
        {f"{KEY}.lora_down.weight": torch.full((4, 2048), float("nan")), f"{KEY}.lora_up.weight": torch.zeros(640, 4)},
        str(bad),
        metadata={"ss_base_model_version": "sdxl_base_v1-0"},
    )
    code, out, _ = _run(capsys, "check", xl, bad, tmp_path / "missing.safetensors", "--arch", "sd1")
    lines = out.strip().splitlines()
    assert code == 1
    assert lines[0].startswith(f"{xl}: is a LoRA for sdxl") and "not for sd1" in lines[0]
    assert any(line.startswith(f"{bad}: non-finite values: {KEY}.lora_down.weight: 8192 NaN") for line in lines)
    assert lines[-1] == f"{tmp_path / 'missing.safetensors'}: no such file; check the path"
    code, out, _ = _run(capsys, "check", xl, bad, "--json")
    results = json.loads(out)
    assert code == 1 and [r["ok"] for r in results] == [True, False]


def test_convert_and_its_errors(xl, tmp_path, capsys, monkeypatch):
    out_file = tmp_path / "d.safetensors"
    code, out, _ = _run(capsys, "convert", xl, "-o", out_file, "--to", "diffusers", "--verify", "--json")
    assert code == 0 and json.loads(out)["max_error"] == 0.0 and out_file.exists()
    cases = [
        (("convert", xl, "-o", xl, "--to", "kohya"), "is also an input"),
        (("convert", xl, "-o", tmp_path / "o.safetensors", "--to", "a1111"), "unknown dialect 'a1111'"),
        (("convert", tmp_path / "nope.safetensors", "-o", tmp_path / "o.safetensors", "--to", "kohya"), "no such file"),
        (("convert", xl, "-o", tmp_path / "o.safetensors", "--to", "kohya", "--arch", "sd1"), "is a LoRA for sdxl"),
        (("convert", xl, "-o", tmp_path / "o.safetensors", "--to", "kohya", "--dtype", "fp8"), "--dtype fp8"),
    ]
    for args, message in cases:
        code, _, err = _run(capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    monkeypatch.setattr("os.access", lambda path, mode: not mode & os.W_OK)  # root ignores chmod
    code, _, err = _run(capsys, "convert", xl, "-o", tmp_path / "o.safetensors", "--to", "comfy")
    assert code == 2 and "not writable" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_meta_and_its_errors(xl, tmp_path, capsys, monkeypatch):
    out_file = tmp_path / "m.safetensors"
    code, out, _ = _run(capsys, "meta", xl, "-o", out_file, "--set", "modelspec.title=T", "--strip-paths", "--json")
    result = json.loads(out)
    assert code == 0 and result["path_keys"] == ["ss_output_dir"] and result["set_keys"] == ["modelspec.title"]
    code, out, _ = _run(capsys, "inspect", out_file, "--json")
    assert json.loads(out)["hashes"]["autov3"] == result["auto_v3"]
    for args, message in [
        (("meta", xl, "-o", xl, "--strip"), "is also an input"),
        (("meta", tmp_path / "nope.safetensors", "-o", out_file), "no such file"),
        (("meta", xl, "-o", out_file, "--set", "novalue"), "write KEY=VALUE"),
    ]:
        code, _, err = _run(capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    monkeypatch.setattr("os.access", lambda path, mode: not mode & os.W_OK)  # root ignores chmod
    code, _, err = _run(capsys, "meta", xl, "-o", tmp_path / "n.safetensors", "--strip")
    assert code == 2 and "not writable" in err


def test_inspect_errors_are_one_line(xl, tmp_path, capsys):
    for args, message in [
        (("inspect", tmp_path / "nope.safetensors"), "no such file"),
        (("inspect", xl, "--arch", "sd1"), "is a LoRA for sdxl"),
        (("inspect", xl, "--arch", "sd9"), "unknown architecture 'sd9'"),
    ]:
        code, _, err = _run(capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
