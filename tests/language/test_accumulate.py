"""`precision.accumulate` (issue 10): every planlang GEMM kernel accumulates in fp32, so a plan
that asks for another accumulation dtype is refused at the value (PL317), and explain
says what really runs."""
from __future__ import annotations

from pathlib import Path

import pytest

from planlang import names
from planlang.explain import explain_plan
from planlang.loader import load_with_source
from planlang.validate import RUNTIME_ACCUMULATE, validate

ROOT = Path(__file__).resolve().parents[2]


def lint(path: Path):
    loaded = load_with_source(path, cwd=path.parent)
    assert loaded.plan is not None, [(d.code, d.message) for d in loaded.diagnostics]
    return loaded, list(loaded.diagnostics) + validate(loaded.plan, loaded.source, detect=lambda: None)


@pytest.mark.parametrize("value", [v for v in names.ACCUMULATE_DTYPES if v != RUNTIME_ACCUMULATE])
def test_an_accumulate_the_runtime_does_not_run_is_an_error_at_the_value(tmp_path, value):
    path = tmp_path / "p.yaml"
    path.write_text(f"planlang: 1\ntarget: h100\nprecision:\n  accumulate: {value}\n", encoding="utf-8")
    _, diags = lint(path)
    hits = [d for d in diags if d.code == "PL317"]
    assert len(hits) == 1
    d = hits[0]
    assert (d.severity, d.line, d.column) == ("error", 4, 15)
    assert d.file.endswith("p.yaml")
    assert f"accumulate: {value}" in d.message and "fp32" in d.message
    assert "accumulate: fp32" in d.hint


def test_the_text_form_is_refused_at_the_value_too(tmp_path):
    path = tmp_path / "p.plan"
    path.write_text("planlang 1\nplan a on h100\ndtype accumulate bf16\n", encoding="utf-8")
    _, diags = lint(path)
    assert [(d.code, d.line, d.column) for d in diags if d.code == "PL317"] == [("PL317", 3, 18)]


@pytest.mark.parametrize("precision", ["precision: {accumulate: fp32}\n", "precision: {default: bf16}\n", ""])
def test_fp32_or_no_accumulate_lints_clean(tmp_path, precision):
    path = tmp_path / "p.yaml"
    path.write_text("planlang: 1\ntarget: h100\n" + precision, encoding="utf-8")
    _, diags = lint(path)
    assert [d for d in diags if d.code == "PL317"] == []


def test_the_shipped_plans_never_ask_for_another_accumulate():
    for path in sorted((ROOT / "plans").glob("*.yaml")):
        _, diags = lint(path)
        assert [d for d in diags if d.code == "PL317"] == [], path.name


def test_explain_says_gemms_accumulate_in_fp32_whatever_the_plan_asks(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("planlang: 1\ntarget: h100\nprecision: {accumulate: bf16}\n", encoding="utf-8")
    loaded = load_with_source(path, cwd=tmp_path)
    lines = explain_plan(loaded.plan, None, "test")["sections"]["precision"]
    assert "GEMMs accumulate in fp32" in lines[0]
    assert "accumulate: bf16 is not honoured" in lines[0]
    assert "accumulate in bf16" not in lines[0]
