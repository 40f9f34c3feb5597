"""The lorakit command: the demo runs and reports real checks; user errors exit 2 on one line."""

import json
import subprocess
import sys

import pytest

from lorakit.cli.main import main
from lorakit.errors import LorakitError


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=300)


def test_demo_json_reports_learning_and_exact_round_trips():
    out = _run("demo", "--steps", "60", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["losses"][-1] < report["losses"][0] / 5
    rows = {(r["learned"], r["loha"]): r for r in report["rows"]}
    assert rows[(0.0, 0.0)]["from_base"] == 0.0
    assert rows[(1.0, 0.0)]["to_target"] < rows[(0.0, 0.0)]["to_target"]
    assert report["unfuse_exact"] and report["detach_exact"]
    assert report["fused_vs_dynamic"] < 1e-5


def test_demo_prints_tables():
    out = _run("demo", "--steps", "20")
    assert out.returncode == 0, out.stderr
    assert "outputs by adapter weight" in out.stdout and "engine checks" in out.stdout


def test_user_error_is_one_line_and_exit_2(monkeypatch, capsys):
    from lorakit.cli import main as cli_main

    def boom(**_):
        raise LorakitError("bad.safetensors: key x does not fit; use another file")

    monkeypatch.setattr("lorakit.demo.engine.run_engine_demo", boom)
    assert cli_main.main(["demo", "--steps", "1", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lorakit: error: bad.safetensors: key x does not fit; use another file"]


def test_usage_error_exits_2():
    assert main(["demo", "--no-such-option"]) == 2


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_help(args):
    out = _run(*args)
    assert out.returncode == 0 and "demo" in out.stdout
