"""The lorakit command: the engine demo runs and reports real checks; user errors exit 2 on one line.

The full demo mission (``lorakit demo``) is tested at a reduced size in tests/demo/test_demo_mission.py.
"""

import json
import subprocess
import sys

import pytest

from lorakit.cli.main import main
from lorakit.errors import LorakitError


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=300)


def test_demo_json_reports_learning_and_exact_round_trips():
    out = _run("demo", "--engine", "--steps", "60", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["losses"][-1] < report["losses"][0] / 5
    rows = {(r["learned"], r["loha"]): r for r in report["rows"]}
    assert rows[(0.0, 0.0)]["from_base"] == 0.0
    assert rows[(1.0, 0.0)]["to_target"] < rows[(0.0, 0.0)]["to_target"]
    assert report["unfuse_exact"] and report["detach_exact"]
    assert report["fused_vs_dynamic"] < 1e-5


def test_demo_prints_tables():
    out = _run("demo", "--engine", "--steps", "20")
    assert out.returncode == 0, out.stderr
    assert "outputs by adapter weight" in out.stdout and "engine checks" in out.stdout


def test_user_error_is_one_line_and_exit_2(monkeypatch, capsys):
    from lorakit.cli import main as cli_main

    def boom(**_):
        raise LorakitError("bad.safetensors: key x does not fit; use another file")

    monkeypatch.setattr("lorakit.demo.engine.run_engine_demo", boom)
    assert cli_main.main(["demo", "--engine", "--steps", "1", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lorakit: error: bad.safetensors: key x does not fit; use another file"]


def test_demo_refuses_a_folder_of_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "-o", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no demo report" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_demo_quick_json_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--steps", "1", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads((out / "report.json").read_text()) == report
    assert [lora["steps"] for lora in report["loras"]] == [1, 1]
    assert (out / "grid.png").is_file() and set(report["scores"]["concept"]) == {"0", "0.5", "1"}


def test_demo_help_names_the_mission_and_engine():
    out = _run("demo", "--help")
    assert out.returncode == 0
    assert "--engine" in out.stdout and "--quick" in out.stdout and "--output" in out.stdout


def test_usage_error_exits_2():
    assert main(["demo", "--no-such-option"]) == 2


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_help(args):
    out = _run(*args)
    assert out.returncode == 0 and "demo" in out.stdout


def test_a_missing_diffusion_extra_is_a_one_line_error(monkeypatch, capsys):
    import lorakit.cli.main as cli_main

    def needs_diffusers(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")

    monkeypatch.setattr(cli_main, "app", needs_diffusers)
    assert cli_main.main(["generate", "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lorakit[diffusion]" in err and "diffusers" in err


def test_other_missing_modules_stay_bugs(monkeypatch):
    import lorakit.cli.main as cli_main

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'lorakit.nothing'", name="lorakit.nothing")

    monkeypatch.setattr(cli_main, "app", broken)
    with pytest.raises(ModuleNotFoundError):
        cli_main.main(["inspect", "x"])
