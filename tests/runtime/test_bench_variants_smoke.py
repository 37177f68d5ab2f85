"""benchmarks/bench_variants.py --smoke on the CPU: every (batch, variant) gets a row, the
interleaved rounds are all there, each variant's logits are finite and match the unplanned
model's, and the variables a variant set are gone from the environment afterwards."""
import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_variants.py"
spec = importlib.util.spec_from_file_location("bench_variants", SCRIPT)
bench_variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_variants)


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The PyTorch reference path, as tests/runtime/test_commands.py runs whole models."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PLANLANG_PDL", raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_smoke_times_every_variant_and_restores_the_environment(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert bench_variants.main(["--smoke", "--out", str(out)]) == 0
    assert "PLANLANG_PDL" not in os.environ
    r = json.loads(out.read_text())
    assert {(row["batch"], row["variant"]) for row in r["rows"]} == {(1, "base"), (1, "pdl"), (2, "base"), (2, "pdl")}
    assert all(len(row["rounds_ms"]) == 2 and row["ms"] > 0 and row["x_floor"] > 0 for row in r["rows"])
    assert all(row["ratio"] == 1.0 for row in r["rows"] if row["variant"] == "base")
    checks = r["plans"][0]["checks"]
    assert len(checks) == 4
    assert all(c["finite"] and c["caches_kept"] and c["rel_vs_unplanned"] < 0.05 for c in checks), checks
    assert r["plans"][0]["variants"]["pdl"]["env"] == {"PLANLANG_PDL": "1"}
    assert "base" in capsys.readouterr().out


def test_a_variant_is_a_name_and_environment_variables():
    assert bench_variants.parse_variant("base:") == ("base", {})
    assert bench_variants.parse_variant("b:A=1, B=0") == ("b", {"A": "1", "B": "0"})
    for bad in ("nocolon", ":A=1", "x:A"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_variants.parse_variant(bad)


def test_the_environment_is_restored(monkeypatch):
    monkeypatch.setenv("PLANLANG_X", "shell")
    monkeypatch.delenv("PLANLANG_Y", raising=False)
    with bench_variants.environment({"PLANLANG_Y": "1"}, {"PLANLANG_X", "PLANLANG_Y"}):
        assert os.environ["PLANLANG_Y"] == "1" and "PLANLANG_X" not in os.environ  # unset: the default
    assert os.environ["PLANLANG_X"] == "shell" and "PLANLANG_Y" not in os.environ
