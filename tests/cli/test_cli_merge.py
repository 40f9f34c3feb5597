"""lorakit merge / resize / extract / bake: results checked against dense references, error paths exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "ops"))  # tiny checkpoints shared with the bake tests
from ckpt_models import expected_weights, random_lora, write_single_file  # noqa: E402

from lorakit.arch import module_table  # noqa: E402
from lorakit.cli.main import main  # noqa: E402
from lorakit.core.patches import LoraPatch  # noqa: E402
from lorakit.formats.canonical import LoraFile, Target  # noqa: E402
from lorakit.formats.checkpoint import Checkpoint  # noqa: E402
from lorakit.formats.lora_io import load_lora, save_lora  # noqa: E402
from lorakit.ops.bake import _to_diffusers  # noqa: E402

torch.set_num_threads(1)
MODULES = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k"),
    ("unet", "mid_block.attentions.0.proj_out"),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
]


def _full_size_lora(path: Path, seed: int, rank: int) -> Path:
    """A small kohya SD1 LoRA on four real-size modules (so its names and shapes need no --model)."""
    g = torch.Generator().manual_seed(seed)
    patches = {}
    for component, module in MODULES:
        out, inp, *k = module_table("sd1", component)[module]
        patches[Target(component, module)] = LoraPatch(
            up=torch.randn(out, rank, *([1] * len(k)), generator=g),
            down=torch.randn(rank, inp, *k, generator=g) * 0.1,
            alpha=rank / 2,
        )
    save_lora(LoraFile(patches=patches, arch="sd1"), path, dialect="kohya")
    return path


def _deltas(path: Path) -> dict[Target, torch.Tensor]:
    lora = load_lora(path, arch="sd1")
    return {t: p.delta() for t, p in lora.patches.items()}


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_merge_concat_is_the_exact_weighted_sum(tmp_path, capsys):
    a, b = _full_size_lora(tmp_path / "a.safetensors", 0, 4), _full_size_lora(tmp_path / "b.safetensors", 1, 2)
    out = tmp_path / "m.safetensors"
    assert main(["merge", f"{a}:0.7", f"{b}:-0.4", "-o", str(out), "--json"]) == 0
    report = _json(capsys)
    assert report["worst_error"] == 0.0 and len(report["modules"]) == 4
    da, db, merged = _deltas(a), _deltas(b), _deltas(out)
    for target in da:
        torch.testing.assert_close(merged[target], 0.7 * da[target] - 0.4 * db[target], rtol=1e-3, atol=1e-5)
    assert json.loads(load_lora(out, arch="sd1").metadata["lorakit.merge"])["method"] == "concat"


def test_merge_svd_reports_energy_and_blocks_apply(tmp_path, capsys):
    a, b = _full_size_lora(tmp_path / "a.safetensors", 0, 4), _full_size_lora(tmp_path / "b.safetensors", 1, 4)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(b), "--method", "svd", "--rank", "2", "-o", str(out), "--blocks", "MIDD"]) == 0
    text = capsys.readouterr().out
    assert "energy kept" in text and "worst relative error" in text
    merged = load_lora(out, arch="sd1")
    # MIDD zeroes IN01 (down_blocks.0.attentions.0) and keeps M00 and BASE
    assert Target(*MODULES[0]) not in merged.patches
    assert Target(*MODULES[2]) in merged.patches and Target(*MODULES[3]) in merged.patches
    assert all(p.rank == 2 for p in merged.patches.values())


def test_merge_bad_blocks_count_names_the_accepted_counts(tmp_path, capsys):
    a = _full_size_lora(tmp_path / "a.safetensors", 0, 2)
    assert main(["merge", str(a), "-o", str(tmp_path / "m.safetensors"), "--blocks", "1,0,1"]) == 2
    assert "17 or 26" in capsys.readouterr().err


def test_resize_fixed_and_dynamic(tmp_path, capsys):
    a = _full_size_lora(tmp_path / "a.safetensors", 0, 8)
    assert main(["resize", str(a), "--rank", "3", "-o", str(tmp_path / "r.safetensors"), "--json"]) == 0
    report = _json(capsys)
    assert {m["rank_out"] for m in report["modules"]} == {3}
    assert all(0 < m["energy_kept"] < 1 for m in report["modules"])
    assert main(["resize", str(a), "--dynamic", "fro=0.999999", "-o", str(tmp_path / "d.safetensors"), "--json"]) == 0
    assert {m["rank_out"] for m in _json(capsys)["modules"]} == {8}
    assert main(["resize", str(a), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "exactly one of --rank and --dynamic" in capsys.readouterr().err
    assert main(["resize", str(a), "--dynamic", "energy=3", "-o", str(tmp_path / "x.safetensors")]) == 2


def test_bake_cli_single_file(tmp_path, capsys):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    lora = random_lora("sd1", seed=0, kinds=1)  # plain LoRAs: a kohya file holds them exactly
    with Checkpoint.open(base, arch="sd1") as ckpt:
        save_lora(
            lora, tmp_path / "l.safetensors", dialect="kohya", modules={c: ckpt.shapes(c) for c in ckpt.components()}
        )
    out = tmp_path / "out.safetensors"
    assert (
        main(
            [
                "bake",
                "--model",
                str(base),
                f"{tmp_path / 'l.safetensors'}:0.6",
                "-o",
                str(out),
                "--arch",
                "sd1",
                "--json",
            ]
        )
        == 0
    )
    report = _json(capsys)
    assert report["matched"] == len(lora.patches) and report["unmatched"] == []
    want = expected_weights("sd1", [(lora, 0.6)])
    with Checkpoint.open(out, arch="sd1") as ckpt:
        for component, table in want.items():
            for module, w in table.items():
                ref = ckpt.weight_ref(component, module)
                got = _to_diffusers(ckpt.read(ref.key), ref.transform)
                torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


def test_extract_cli(tmp_path, capsys):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    lora = random_lora("sd1", seed=0, kinds=1)
    tuned = write_single_file(tmp_path / "tuned.safetensors", "sd1", weights=expected_weights("sd1", [(lora, 1.0)]))
    out = tmp_path / "x.safetensors"
    assert (
        main(
            [
                "extract",
                "--base",
                str(base),
                "--tuned",
                str(tuned),
                "--rank",
                "2",
                "--conv-rank",
                "2",
                "-o",
                str(out),
                "--arch",
                "sd1",
                "--json",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    report = _json(capsys)
    assert report["worst_error"] < 1e-3 and report["modules_written"] == len(lora.patches)


def _fitting_lora(tmp_path: Path, base: Path) -> Path:
    with Checkpoint.open(base, arch="sd1") as ckpt:
        modules = {c: ckpt.shapes(c) for c in ckpt.components()}
    save_lora(random_lora("sd1", seed=0, kinds=1), tmp_path / "l.safetensors", dialect="kohya", modules=modules)
    return tmp_path / "l.safetensors"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file"),
        ("wrong-arch", "does not fit the sdxl checkpoint"),
        ("output-is-input", "is also an input"),
        ("unwritable", "cannot create a file there"),
        ("no-folder", "does not exist"),
    ],
)
def test_bake_error_paths_exit_2_and_leave_nothing(tmp_path, capsys, case, message):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    lora = str(_fitting_lora(tmp_path, base))
    out = str(tmp_path / "out.safetensors")
    sd1 = ["--model", str(base), lora, "--arch", "sd1", "-o"]
    args = {
        "missing": ["--model", str(tmp_path / "nope.safetensors"), lora, "-o", out],
        "wrong-arch": ["--model", str(write_single_file(tmp_path / "xl.safetensors", "sdxl")), lora, "-o", out],
        "output-is-input": [*sd1, str(base)],
        "unwritable": [*sd1, "/proc/lorakit_out.safetensors"],  # not writable even for root
        "no-folder": [*sd1, str(tmp_path / "no" / "o.safetensors")],
    }[case]
    if case == "wrong-arch":
        args += ["--arch", "sdxl"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert main(["bake", *args]) == 2
    # (the tiny models' construction may print library warnings first)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[transformers]")]
    assert len(err) == 1 and err[0].startswith("lorakit: error:") and message in err[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_failing_writer_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    base = write_single_file(tmp_path / "base.safetensors", "sd1")
    lora = random_lora("sd1", seed=0, kinds=1)
    with Checkpoint.open(base, arch="sd1") as ckpt:
        save_lora(
            lora, tmp_path / "l.safetensors", dialect="kohya", modules={c: ckpt.shapes(c) for c in ckpt.components()}
        )
    from lorakit.ops import bake_io

    real, written = bake_io._os_write, {"bytes": 0}

    def disk_full(fd, data):
        written["bytes"] += len(data)
        if written["bytes"] > 20_000:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(bake_io, "_os_write", disk_full)
    out = tmp_path / "out.safetensors"
    assert main(["bake", "--model", str(base), str(tmp_path / "l.safetensors"), "-o", str(out), "--arch", "sd1"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "l.safetensors"]
