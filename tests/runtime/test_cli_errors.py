"""Bad input to the commands that run a model: exit status 2, a message naming the argument
or the file, a hint, and never a traceback (spec §12)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planlang import cli

from tests.cli_run import run  # noqa: F401 (used by the tests below)

QUICK = "plans/quickstart.yaml"
TINY = "builtin:llama-tiny"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ----------------------------------------------------------------------------- models

def test_explain_with_an_unknown_builtin_model_names_it_and_the_known_ones(capsys):
    rc, out, err = run(capsys, "explain", QUICK, "--model", "builtin:nope")
    assert rc == 2
    assert "--model builtin:nope" in err and "llama-tiny" in err and "hint:" in err


@pytest.mark.parametrize("content", [b"this is not a checkpoint", b"PK\x03\x04truncated", None])
def test_explain_with_a_broken_or_missing_model_file_names_the_file(tmp_path, capsys, content):
    bad = tmp_path / "model.pt"
    if content is not None:
        bad.write_bytes(content)
    rc, out, err = run(capsys, "explain", QUICK, "--model", bad)
    assert rc == 2
    assert "--model" in err and "model.pt" in err


def test_explain_with_a_bad_model_shows_no_traceback_from_the_real_command():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "planlang.cli", "explain", QUICK, "--model", "builtin:nope"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "builtin:nope" in proc.stderr


# ----------------------------------------------------------------------------- export

def test_export_into_a_missing_folder_names_the_folder(tmp_path, capsys):
    target = tmp_path / "nonexistdir" / "x.pt"
    rc, out, err = run(capsys, "export", TINY, target)
    assert rc == 2
    assert str(target) in err and "does not exist" in err and "hint:" in err
    assert not target.parent.exists()


def test_export_onto_a_folder_asks_for_a_file_name(tmp_path, capsys):
    rc, out, err = run(capsys, "export", TINY, tmp_path)
    assert rc == 2
    assert "is a folder" in err and "hint:" in err


# ----------------------------------------------------------------------------- --device

@pytest.mark.parametrize("command", [["apply", QUICK, TINY], ["bench", QUICK, TINY, "--against", "eager"]])
def test_an_unknown_device_is_a_usage_error_naming_it(capsys, command):
    rc, out, err = run(capsys, *command, "--device", "foo")
    assert rc == 2
    assert "--device foo" in err and "cpu, cuda" in err


# ----------------------------------------------------------------------------- integers

@pytest.mark.parametrize("argv,argument", [
    (["apply", QUICK, TINY, "--batch", "0"], "--batch"),
    (["apply", QUICK, TINY, "--batch", "-1"], "--batch"),
    (["apply", QUICK, TINY, "--context", "0"], "--context"),
    (["apply", QUICK, TINY, "--eval-tokens", "-3"], "--eval-tokens"),
    (["bench", QUICK, TINY, "--batch", "0"], "--batch"),
    (["bench", QUICK, TINY, "--context", "-1"], "--context"),
    (["bench", QUICK, TINY, "--prefill", "-1"], "--prefill"),
    (["bench", QUICK, TINY, "--batch", "two"], "--batch"),
])
def test_a_count_out_of_range_is_refused_naming_the_argument(capsys, argv, argument):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert f"argument {argument}:" in err
    assert "must be at least" in err or "whole number" in err


# ----------------------------------------------------------------------------- bench

def test_bench_with_neither_plan_nor_baseline_says_there_is_nothing_to_time(capsys):
    rc, out, err = run(capsys, "bench", TINY, "--against", "")
    assert rc == 2
    assert "nothing to bench" in err and "--against" in err


def test_bench_without_a_plan_times_the_baselines_alone(capsys):
    import json
    rc, out, err = run(capsys, "bench", TINY, "--against", "eager", "--context", "8", "--prefill", "0",
                       "--eval-tokens", "0", "--json")
    assert rc == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["contender"], r["batch"]) for r in rows] == [("eager", 1)]


def test_bench_plot_without_matplotlib_is_refused_before_anything_is_measured(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    rc, out, err = run(capsys, "bench", QUICK, TINY, "--against", "eager", "--plot", tmp_path / "out.png")
    assert rc == 2
    assert "--plot" in err and 'pip install "planlang[plot]"' in err
    assert "bench: eager" not in err  # no row was measured
    assert not (tmp_path / "out.png").exists()


def test_bench_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "out.png"
    rc, out, err = run(capsys, "bench", QUICK, TINY, "--against", "eager", "--context", "8", "--prefill", "0",
                       "--eval-tokens", "0", "--plot", png)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_against_help_lists_every_baseline(capsys, monkeypatch):
    from planlang.runtime.commands import BASELINES
    assert tuple(cli.BENCH_BASELINES) == BASELINES
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no name broken at a hyphen
    rc, out, err = run(capsys, "bench", "--help")
    assert rc == 0
    against = out[out.index("\n  --against"):out.index("\n  --context")]
    assert all(name in against for name in BASELINES)
