"""``lorakit dataset check``: tables, JSON, exit codes (0 clean or warnings, 1 errors, 2 unreadable), no writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.cli.main import main


def _image(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((width, height), Image.Resampling.BICUBIC).save(path)


def _snapshot(root: Path) -> dict:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def clean(tmp_path):
    root = tmp_path / "train"
    for i, (w, h) in enumerate([(512, 512), (640, 384), (520, 520)]):
        _image(root / "5_sks dog" / f"{i}.png", w, h, seed=i)
        (root / "5_sks dog" / f"{i}.txt").write_text(f"a dog, pose {i}")
    return root


def _run(capsys, *args):
    code = main(["dataset", "check", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clean_folder_exits_0_with_buckets(clean, capsys):
    code, out, _ = _run(capsys, clean)
    assert code == 0
    assert "aspect buckets" in out and "640 x 384" in out and "512 x 512" in out
    assert "0 error(s), 0 warning(s)" in out and "problems" not in out


def test_warnings_alone_exit_0(clean, capsys):
    _image(clean / "5_sks dog" / "small.png", 128, 128, seed=9)
    code, out, _ = _run(capsys, clean)
    assert code == 0 and "enlarged" in out and "1 warning(s)" in out


def test_errors_exit_1_and_are_listed_with_fixes(clean, capsys):
    broken = clean / "5_sks dog" / "0.png"
    broken.write_bytes(broken.read_bytes()[:100])
    _image(clean / "10 cat" / "c.png", 512, 512, seed=7)
    before = _snapshot(clean)
    code, out, _ = _run(capsys, clean)
    assert code == 1
    assert "not a readable image" in out and "rename it to 10_cat" in out and "2 error(s)" in out
    assert _snapshot(clean) == before


def test_json(clean, capsys):
    _image(clean / "5_sks dog" / "small.png", 128, 128, seed=9)
    code, out, _ = _run(capsys, clean, "--json", "--resolution", "256")
    assert code == 0
    report = json.loads(out)
    assert report["resolution"] == 256 and report["images"] == 4 and report["per_epoch"] == 20
    assert report["errors"] == 0 and report["warnings"] == len(report["problems"])
    assert {tuple(b[k] for k in ("width", "height")) for b in report["buckets"]} <= {(256, 256), (320, 192)}
    assert sum(b["images"] for b in report["buckets"]) == 4


def test_config_file(clean, tmp_path, capsys):
    toml = tmp_path / "data.toml"
    toml.write_text('resolution = 512\n[[folders]]\npath = "train"\ntrigger = "sks"\n')
    code, out, _ = _run(capsys, "--config", toml)
    assert code == 0 and "15 samples per epoch" in out
    toml.write_text('resolution = 512\n[[folders]]\npath = "train"\ntriger = "sks"\n')
    code, _, err = _run(capsys, "--config", toml)
    assert code == 2 and "unknown key 'triger'" in err and "data.toml" in err


def test_unreadable_inputs_exit_2(tmp_path, capsys):
    code, _, err = _run(capsys, tmp_path / "missing")
    assert code == 2 and "does not exist" in err
    code, _, err = _run(capsys)
    assert code == 2 and "give a dataset folder" in err


def test_help_has_an_example():
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "lorakit", "dataset", "check", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "lorakit dataset check train/" in out.stdout
