"""The `planlang` command line (spec §11, §12): exit codes, the three output formats, the
caret under the exact span, `fmt` (canonical, check, atomic write, conversion), `explain`,
`targets`, `detect`, `--target`, `--hardware` and `extends`.

Most runs are in-process (`planlang.cli.main` with capsys); a few are real subprocesses,
which is what a user and CI see. No bad input may ever print a Python traceback.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import planlang
from planlang import cli

from tests.cli_run import run  # noqa: F401 (used by the tests below)
from planlang.diagnostics import CODES
from planlang.hardware import load_catalog
from planlang.plan import Plan
from planlang.text_reader import read_text
from planlang.yaml_reader import read_yaml

ROOT = Path(__file__).resolve().parents[2]
PLANS = ROOT / "plans"
INVALID = Path(__file__).parent / "invalid"
CORPUS = sorted(INVALID.iterdir())
DIAG_KEYS = {"code", "severity", "message", "file", "line", "column", "hint"}
HEADER = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<sev>error|warning|note)\[(?P<code>PL\d{3})\]: ")


def run_process(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "planlang.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- lint exit codes

def test_lint_of_a_clean_plan_exits_0(capsys):
    rc, out, err = run(capsys, "lint", PLANS / "h100_decode.yaml")
    assert rc == 0
    assert "error" not in out
    assert "0 error(s)" in err


def test_lint_of_a_plan_with_an_error_exits_1(capsys):
    rc, out, _ = run(capsys, "lint", INVALID / "04_fp8_on_a100.yaml")
    assert rc == 1
    assert "error[PL201]" in out


def test_lint_of_a_missing_file_exits_2(capsys, tmp_path):
    missing = tmp_path / "no_such_plan.yaml"
    rc, out, err = run(capsys, "lint", missing)
    assert rc == 2
    assert "error[PL100]" in out and "no such file" in out


def test_lint_of_a_directory_exits_2(capsys, tmp_path):
    folder = tmp_path / "plans.yaml"
    folder.mkdir()
    rc, out, _ = run(capsys, "lint", folder)
    assert rc == 2 and "PL100" in out


def test_an_unreadable_plan_among_good_ones_still_exits_2(capsys, tmp_path):
    rc, _, _ = run(capsys, "lint", PLANS / "h100_decode.yaml", tmp_path / "gone.plan")
    assert rc == 2


@pytest.mark.parametrize("args", [
    [],                                            # no command
    ["lint"],                                      # no plan
    ["frobnicate"],                                # unknown command
    ["lint", "plans/h100_decode.yaml", "--format", "xml"],
    ["fmt", "plans/h100_decode.yaml", "--check", "--write"],
    ["lint", "plans/h100_decode.yaml", "--no-such-option"],
], ids=["nothing", "lint-no-plan", "unknown-command", "bad-format", "check-and-write", "bad-option"])
def test_bad_usage_exits_2(capsys, args):
    rc, out, err = run(capsys, *args)
    assert rc == 2
    assert "usage" in (out + err).lower()


def test_strict_makes_warnings_fail(capsys):
    plan = INVALID / "27_recompute_in_inference.yaml"  # PL305, a warning, and nothing worse
    rc, out, _ = run(capsys, "lint", plan)
    assert rc == 0 and "warning[PL305]" in out and "error[" not in out
    rc, _, _ = run(capsys, "lint", "--strict", plan)
    assert rc == 1


def test_notes_never_fail_not_even_with_strict(capsys):
    plan = INVALID / "50_emulated_nvfp4.yaml"  # PL205, a note, and nothing else
    for extra in ([], ["--strict"]):
        rc, out, _ = run(capsys, "lint", *extra, plan)
        assert rc == 0
        assert "note[PL205]" in out and "warning[" not in out and "error[" not in out


# ----------------------------------------------------------------------------- JSON

def lint_json(capsys, *args) -> tuple[int, dict]:
    rc, out, _ = run(capsys, "lint", "--format", "json", *args)
    return rc, json.loads(out)  # the whole of stdout is one object


def test_json_is_one_object_with_the_spec_keys(capsys):
    rc, data = lint_json(capsys, INVALID / "04_fp8_on_a100.yaml")
    assert rc == 1
    assert set(data) == {"ok", "diagnostics"} and data["ok"] is False
    (d,) = [d for d in data["diagnostics"] if d["code"] == "PL201"]
    assert set(d) == DIAG_KEYS
    assert (d["severity"], d["line"], d["column"]) == ("error", 7, 14)
    assert d["file"].endswith("04_fp8_on_a100.yaml")
    assert "sm_89" in d["message"] and d["hint"]


def test_json_of_a_clean_plan_is_ok(capsys):
    rc, data = lint_json(capsys, PLANS / "h100_decode.yaml")
    assert rc == 0 and data == {"ok": True, "diagnostics": []}


def test_json_ok_follows_strict(capsys):
    plan = INVALID / "27_recompute_in_inference.yaml"
    assert lint_json(capsys, plan)[1]["ok"] is True
    rc, data = lint_json(capsys, "--strict", plan)
    assert rc == 1 and data["ok"] is False


def test_json_alias_prints_the_same_as_format_json(capsys):
    plan = INVALID / "24_shadowed_rule.yaml"
    rc1, long = run(capsys, "lint", "--format", "json", plan)[:2]
    rc2, short = run(capsys, "lint", "--json", plan)[:2]
    assert rc1 == rc2 and long == short
    assert json.loads(short)["diagnostics"][0]["code"] == "PL302"


def test_json_for_an_unreadable_file_is_still_json(capsys, tmp_path):
    rc, data = lint_json(capsys, tmp_path / "missing.yaml")
    assert rc == 2 and data["ok"] is False
    assert [d["code"] for d in data["diagnostics"]] == ["PL100"]


def test_every_diagnostic_in_the_corpus_has_a_known_code_and_severity(capsys):
    rc, data = lint_json(capsys, *CORPUS)
    assert rc == 2  # 46_not_utf8.yaml cannot be read
    assert data["diagnostics"]
    for d in data["diagnostics"]:
        assert set(d) == DIAG_KEYS
        assert d["code"] in CODES and d["severity"] in ("error", "warning", "note")
        assert d["line"] >= 1 and d["column"] >= 1


# ----------------------------------------------------------------------------- SARIF

def lint_sarif(capsys, *args) -> tuple[int, dict]:
    rc, out, _ = run(capsys, "lint", "--format", "sarif", *args)
    return rc, json.loads(out)


def check_sarif_structure(doc: dict) -> None:
    assert doc["version"] == "2.1.0"
    assert "sarif" in doc.get("$schema", "")
    (sarif_run,) = doc["runs"]
    driver = sarif_run["tool"]["driver"]
    assert driver["name"] == "planlang"
    rule_ids = [r["id"] for r in driver["rules"]]
    assert len(set(rule_ids)) == len(rule_ids)
    for rule in driver["rules"]:
        assert rule["id"] in CODES and rule["shortDescription"]["text"]
    for result in sarif_run["results"]:
        assert result["ruleId"] in rule_ids
        if "ruleIndex" in result:
            assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["level"] in ("error", "warning", "note")
        assert result["message"]["text"]
        loc = result["locations"][0]["physicalLocation"]
        assert isinstance(loc["artifactLocation"]["uri"], str) and loc["artifactLocation"]["uri"]
        assert loc["region"]["startLine"] >= 1 and loc["region"]["startColumn"] >= 1


def test_sarif_has_the_required_structure(capsys):
    plans = [INVALID / "04_fp8_on_a100.yaml", INVALID / "27_recompute_in_inference.yaml",
             INVALID / "50_emulated_nvfp4.yaml", INVALID / "39_text_fp8_on_a100.plan"]
    rc, doc = lint_sarif(capsys, *plans)
    assert rc == 1
    check_sarif_structure(doc)
    results = doc["runs"][0]["results"]
    assert {r["level"] for r in results} == {"error", "warning", "note"}
    fp8 = [r for r in results if r["ruleId"] == "PL201" and r["locations"][0]["physicalLocation"]
           ["artifactLocation"]["uri"].endswith("04_fp8_on_a100.yaml")]
    assert fp8 and fp8[0]["locations"][0]["physicalLocation"]["region"]["startLine"] == 7
    assert fp8[0]["locations"][0]["physicalLocation"]["region"]["startColumn"] == 14


def test_sarif_of_a_clean_plan_has_no_results(capsys):
    rc, doc = lint_sarif(capsys, PLANS / "h100_decode.yaml")
    assert rc == 0
    check_sarif_structure(doc)
    assert doc["runs"][0]["results"] == []


def test_sarif_of_the_whole_corpus_has_the_required_structure(capsys):
    rc, doc = lint_sarif(capsys, *CORPUS)
    assert rc == 2
    check_sarif_structure(doc)
    assert len(doc["runs"][0]["results"]) >= len(CORPUS)


# The parts of the SARIF 2.1.0 schema (sarif-schema-2.1.0.json, OASIS) that a consumer such
# as GitHub code scanning relies on, written out here so the check needs no network.
SARIF_MINIMAL_SCHEMA = {
    "type": "object",
    "required": ["version", "runs"],
    "properties": {
        "$schema": {"type": "string"},
        "version": {"const": "2.1.0"},
        "runs": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["tool"],
            "properties": {
                "tool": {"type": "object", "required": ["driver"], "properties": {
                    "driver": {"type": "object", "required": ["name"], "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "version": {"type": "string"},
                        "rules": {"type": "array", "uniqueItems": True, "items": {
                            "type": "object", "required": ["id"], "properties": {
                                "id": {"type": "string"},
                                "shortDescription": {"type": "object", "required": ["text"]},
                                "defaultConfiguration": {"type": "object", "properties": {
                                    "level": {"enum": ["none", "note", "warning", "error"]}}},
                            }}},
                    }},
                }},
                "results": {"type": "array", "items": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {
                        "ruleId": {"type": "string"},
                        "ruleIndex": {"type": "integer", "minimum": -1},
                        "level": {"enum": ["none", "note", "warning", "error"]},
                        "message": {"type": "object", "anyOf": [{"required": ["text"]}, {"required": ["id"]}],
                                    "properties": {"text": {"type": "string"}}},
                        "locations": {"type": "array", "items": {"type": "object", "properties": {
                            "physicalLocation": {"type": "object", "properties": {
                                "artifactLocation": {"type": "object", "properties": {
                                    "uri": {"type": "string", "format": "uri-reference"},
                                    "uriBaseId": {"type": "string"}}},
                                "region": {"type": "object", "properties": {
                                    "startLine": {"type": "integer", "minimum": 1},
                                    "startColumn": {"type": "integer", "minimum": 1},
                                    "endLine": {"type": "integer", "minimum": 1},
                                    "endColumn": {"type": "integer", "minimum": 1}}},
                            }},
                        }}},
                    },
                }},
            },
        }},
    },
}


def test_sarif_validates_against_the_schema(capsys):
    jsonschema = pytest.importorskip("jsonschema")
    rc, doc = lint_sarif(capsys, *CORPUS)
    jsonschema.validate(doc, SARIF_MINIMAL_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the schema can fail
        jsonschema.validate({**doc, "version": "2.0.0"}, SARIF_MINIMAL_SCHEMA)


# ----------------------------------------------------------------------------- text output

def caret_targets(text: str) -> list[tuple[str, str]]:
    """(code, the source text above its carets) for every diagnostic that shows a caret line."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        m = HEADER.match(line)
        if not m or i + 2 >= len(lines):
            continue
        src = re.match(r"^   (\d+) \| (.*)$", lines[i + 1])
        caret = re.match(r"^   ( +) \| ( *)(\^+)$", lines[i + 2])
        if not (src and caret):
            continue
        assert src.group(1) == m.group("line")
        assert len(caret.group(1)) == len(src.group(1))  # the bars line up
        start = len(caret.group(2))
        assert start == int(m.group("col")) - 1  # the carets start at the reported column
        found.append((m.group("code"), src.group(2)[start:start + len(caret.group(3))]))
    return found


@pytest.mark.parametrize("plan, code, under", [
    ("04_fp8_on_a100.yaml", "PL201", "fp8_e4m3"),
    ("39_text_fp8_on_a100.plan", "PL201", "fp8_e4m3"),
    ("02_unknown_fusion_kind.yaml", "PL108", "swiglo"),
    ("38_text_unknown_kind.plan", "PL108", "qvk"),
    ("07_unknown_target.yaml", "PL203", "h1000"),
    ("16_bad_selector_bracket.yaml", "PL110", "["),
    ("37_text_unknown_statement.plan", "PL101", "fuze"),
    ("10_duplicate_key.yaml", "PL102", "target"),
    ("12_python_tag.yaml", "PL103", "!!python/object:os.system x"),
])
def test_text_output_puts_the_carets_under_the_exact_span(capsys, plan, code, under):
    rc, out, _ = run(capsys, "lint", INVALID / plan)
    assert rc == 1
    assert (code, under) in caret_targets(out), out


def test_text_output_is_rustc_style(capsys):
    _, out, _ = run(capsys, "lint", INVALID / "04_fp8_on_a100.yaml")
    lines = out.splitlines()
    assert lines[0].endswith("04_fp8_on_a100.yaml:7:14: error[PL201]: fp8_e4m3 needs compute capability "
                             "8.9 (sm_89) or newer; target a100-80gb has 8.0 (sm_80)")
    assert lines[1] == "   7 |       dtype: fp8_e4m3"
    assert lines[2] == "     |              ^^^^^^^^"
    assert lines[3].startswith("   = hint: ")


def test_every_caret_in_the_corpus_lines_up(capsys):
    _, out, _ = run(capsys, "lint", *CORPUS)
    assert len(caret_targets(out)) >= 40


# ----------------------------------------------------------------------------- fmt

MESSY_YAML = """\
# a header comment fmt keeps on top
limits: {max_batch: 8,   max_seq_len: 2048}
target: h100
planlang: 1
fusions:
  - qkv
  - {at: "layers.*.attn", kind: attention, softcap: 30.0}
graphs:
  buckets: [1, 2, 4, 8]
  capture: cuda_graph
"""

CANONICAL_YAML = """\
planlang: 1
target: h100
fusions:
  - qkv
  - {kind: attention, softcap: 30.0, at: "layers.*.attn"}
graphs:
  capture: cuda_graph
  buckets: [1, 2, 4, 8]
limits: {max_seq_len: 2048, max_batch: 8}
"""

CANONICAL_PLAN = """\
planlang 1
target h100

fuse qkv
fuse attention(softcap=30.0) at layers.*.attn

capture cuda_graph buckets 1,2,4,8
limits max_seq_len 2048 max_batch 8
"""


def _uncommented(text: str) -> str:
    """The text without its comment lines (fmt keeps a file's comments)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("#"))


def test_fmt_prints_canonical_yaml(capsys, tmp_path):
    rc, out, _ = run(capsys, "fmt", write(tmp_path / "messy.yaml", MESSY_YAML))
    assert rc == 0 and out == "# a header comment fmt keeps on top\n" + CANONICAL_YAML


COMMENTED_YAML = """\
# header
planlang: 1
target: h100
# the fusions
fusions:
  - qkv            # one GEMM
  # soft-capped, as Gemma-2
  - {kind: attention, softcap: 30.0}
compile:
  mode: none   # written, so kept
graphs: {buckets: [1, 2], capture: cuda_graph}  # two buckets
limits: {max_batch: 2}
# the end
"""


def test_fmt_keeps_every_comment_beside_what_it_was_written_at(capsys, tmp_path):
    rc, out, _ = run(capsys, "fmt", write(tmp_path / "c.yaml", COMMENTED_YAML))
    assert rc == 0
    assert out == """\
# header
planlang: 1
target: h100
# the fusions
fusions:
  - qkv  # one GEMM
  # soft-capped, as Gemma-2
  - {kind: attention, softcap: 30.0}
graphs:  # two buckets
  capture: cuda_graph
  buckets: [1, 2]
compile: {mode: none}  # written, so kept
limits: {max_batch: 2}
# the end
"""
    again = write(tmp_path / "again.yaml", out)
    assert run(capsys, "fmt", "--check", again)[0] == 0  # a fixed point, comments included
    rc, text, _ = run(capsys, "fmt", "--to", "plan", again)
    assert rc == 0
    assert [line for line in text.splitlines() if "#" in line] == [
        # a .plan line stands for its section: the comment above the second fusion goes above the first
        "# header", "# the fusions", "# soft-capped, as Gemma-2", "fuse qkv  # one GEMM",
        "capture cuda_graph buckets 1,2  # two buckets", "compile none  # written, so kept", "# the end"]
    back = write(tmp_path / "again.plan", text)
    assert run(capsys, "fmt", "--check", back)[0] == 0


def test_a_hash_inside_a_quoted_value_is_not_a_comment(capsys, tmp_path):
    text = 'planlang: 1\nprovenance: {note: "a#b"}\nfusions:\n  - {kind: qkv, at: "layers.*.attn"}  # real\n'
    rc, out, _ = run(capsys, "fmt", write(tmp_path / "q.yaml", text))
    assert rc == 0 and out.count("#") == 2 and '"a#b"' in out
    assert '  - {kind: qkv, at: "layers.*.attn"}  # real\n' in out


def test_every_shipped_plan_is_in_canonical_form_with_its_comments(capsys):
    for plan in sorted(PLANS.iterdir()):
        assert run(capsys, "fmt", "--check", plan)[0] == 0, plan


def test_fmt_prints_canonical_plan_text(capsys, tmp_path):
    messy = "# comment\n  planlang   1\ncapture cuda_graph   buckets 1, 2,4 ,8\n\n\ntarget h100\n" \
            "limits max_batch 8 max_seq_len 2048\nfuse qkv\nfuse attention( softcap = 30.0 ) at layers.*.attn\n"
    rc, out, _ = run(capsys, "fmt", write(tmp_path / "messy.plan", messy))
    assert rc == 0 and out == "# comment\n" + CANONICAL_PLAN


def test_fmt_output_is_a_fixed_point(capsys, tmp_path):
    for plan in sorted(PLANS.iterdir()):
        rc, once, _ = run(capsys, "fmt", plan)
        assert rc == 0
        again = write(tmp_path / plan.name, once)
        assert run(capsys, "fmt", again)[1] == once
        assert run(capsys, "fmt", "--check", again)[0] == 0


def test_fmt_check_exits_1_on_a_non_canonical_file(capsys, tmp_path):
    rc, out, err = run(capsys, "fmt", "--check", write(tmp_path / "messy.yaml", MESSY_YAML))
    assert rc == 1 and "not in canonical form" in err and out == ""


def test_fmt_check_exits_0_on_a_canonical_file(capsys, tmp_path):
    assert run(capsys, "fmt", "--check", write(tmp_path / "ok.yaml", CANONICAL_YAML))[0] == 0
    assert run(capsys, "fmt", "--check", write(tmp_path / "ok.plan", CANONICAL_PLAN))[0] == 0


def test_fmt_write_rewrites_the_file_in_canonical_form(capsys, tmp_path):
    path = write(tmp_path / "messy.yaml", MESSY_YAML)
    rc, out, _ = run(capsys, "fmt", "--write", path)
    assert rc == 0 and out == ""
    assert path.read_text() == "# a header comment fmt keeps on top\n" + CANONICAL_YAML
    assert sorted(p.name for p in tmp_path.iterdir()) == ["messy.yaml"]


def test_fmt_write_to_plan_writes_the_text_form_beside_it(capsys, tmp_path):
    path = write(tmp_path / "messy.yaml", MESSY_YAML)
    assert run(capsys, "fmt", "--write", "--to", "plan", path)[0] == 0
    assert (tmp_path / "messy.plan").read_text() == "# a header comment fmt keeps on top\n" + CANONICAL_PLAN
    assert path.read_text() == MESSY_YAML  # the source stays as it was


def _fail_replace(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_fmt_write_failing_midway_leaves_the_original_and_no_temp_file(capsys, tmp_path, monkeypatch):
    path = write(tmp_path / "messy.yaml", MESSY_YAML)
    monkeypatch.setattr(os, "replace", _fail_replace)
    rc = cli.main(["fmt", "--write", str(path)])
    capsys.readouterr()
    assert rc == 2
    assert path.read_text() == MESSY_YAML
    assert sorted(p.name for p in tmp_path.iterdir()) == ["messy.yaml"]


def test_fmt_write_failure_is_reported_with_exit_2(capsys, tmp_path, monkeypatch):
    path = write(tmp_path / "messy.yaml", MESSY_YAML)
    monkeypatch.setattr(os, "replace", _fail_replace)
    rc = cli.main(["fmt", "--write", str(path)])
    _, err = capsys.readouterr()
    assert rc == 2 and "No space left on device" in err


def test_fmt_to_plan_converts_and_reads_back_as_the_same_plan(capsys):
    for plan in sorted(PLANS.glob("*.yaml")):
        rc, out, _ = run(capsys, "fmt", "--to", "plan", plan)
        assert rc == 0
        original = Plan.from_document(*read_yaml(plan.read_bytes()))[0]
        converted = Plan.from_document(*read_text(out))[0]
        assert converted == original, plan.name


def test_fmt_to_yaml_converts_the_text_form(capsys):
    plan = PLANS / "gemma2_decode.plan"
    rc, out, _ = run(capsys, "fmt", "--to", "yaml", plan)
    assert rc == 0 and _uncommented(out).startswith("planlang: 1\nname: gemma2_decode\n")
    assert Plan.from_document(*read_yaml(out))[0] == Plan.from_document(*read_text(plan.read_text()))[0]


def test_fmt_keeps_extends_and_prints_only_the_file_itself(capsys):
    rc, out, _ = run(capsys, "fmt", PLANS / "h100_fp8_decode.yaml")
    assert rc == 0
    assert "extends: h100_decode.yaml" in out and "fusions" not in out


def test_fmt_of_an_invalid_plan_exits_1_without_output(capsys):
    rc, out, err = run(capsys, "fmt", INVALID / "02_unknown_fusion_kind.yaml")
    assert rc == 1 and out == "" and "PL108" in err


def test_fmt_of_a_missing_file_exits_2(capsys, tmp_path):
    rc, out, err = run(capsys, "fmt", tmp_path / "missing.plan")
    assert rc == 2 and "PL100" in err


# ----------------------------------------------------------------------------- explain, targets, detect

def test_explain_text_shows_each_section_and_the_expanded_preset(capsys):
    rc, out, _ = run(capsys, "explain", PLANS / "h100_fp8_decode.yaml")
    assert rc == 0
    assert out.startswith("plan h100_fp8_decode (inference) on h100-sxm")
    for section in ("fusions:", "graphs:", "compile:", "precision:", "memory:", "parallel:", "limits:"):
        assert f"\n{section}\n" in out
    assert "preset fp8_weight_only expands to 1 rule(s)" in out
    assert "'**:linear' -> fp8_e4m3, channel scales" in out
    assert "bucket [1, 2, 4, 8, 16, 32, 64]" in out  # from the base plan, through extends


def test_explain_json(capsys):
    rc, out, _ = run(capsys, "explain", "--json", PLANS / "gemma2_decode.plan")
    assert rc == 0
    data = json.loads(out)
    assert {"plan", "mode", "target", "sections", "diagnostics"} <= set(data)
    assert data["plan"] == "gemma2_decode" and data["target"]["id"] == "h100-sxm"
    assert any("tensor parallel over 2" in line for line in data["sections"]["parallel"])
    assert data["diagnostics"] == []


def test_explain_reports_errors_and_exits_1(capsys):
    rc, out, _ = run(capsys, "explain", "--target", "a100-80gb", PLANS / "h100_fp8_decode.yaml")
    assert rc == 1 and "error[PL201]" in out


def test_explain_of_a_missing_file_exits_2(capsys, tmp_path):
    assert run(capsys, "explain", tmp_path / "missing.yaml")[0] == 2


def test_targets_lists_the_catalog(capsys):
    rc, out, _ = run(capsys, "targets")
    assert rc == 0 and "h100-sxm" in out and "b200" in out
    rc, out, _ = run(capsys, "targets", "--json")
    ids = {t["id"] for t in json.loads(out)}
    assert {"cpu", "a100-40gb", "a100-80gb", "l40s", "rtx4090", "h100-pcie", "h100-sxm", "h200",
            "b200", "rtx5090"} <= ids


def test_detect_names_a_target(capsys):
    rc, out, _ = run(capsys, "detect")
    assert rc == 0 and ":" in out
    rc, out, _ = run(capsys, "detect", "--json")
    data = json.loads(out)
    assert rc == 0 and {"target", "name", "how", "compute_capability"} <= set(data)
    assert data["target"] in {t.id for t in load_catalog()}


# ----------------------------------------------------------------------------- --target, --hardware

def test_fp8_plan_linted_for_an_a100_fails_with_pl201(capsys):
    rc, data = lint_json(capsys, "--target", "a100-80gb", PLANS / "h100_fp8_decode.yaml")
    assert rc == 1
    assert "PL201" in {d["code"] for d in data["diagnostics"]}
    assert run(capsys, "lint", PLANS / "h100_fp8_decode.yaml")[0] == 0  # fine on its own target


def test_unknown_target_option_is_a_usage_error(capsys):
    # a bad argument exits 2, as docs/diagnostics.md says, with the PL203 diagnostic
    rc, out, _ = run(capsys, "lint", "--target", "h1000", PLANS / "h100_decode.yaml")
    assert rc == 2 and "PL203" in out and "h1000" in out


MY_GPUS = """\
- id: my-ada
  aliases: [mine]
  name: My Ada card
  vendor: nvidia
  arch: ada
  compute_capability: 8.9
  memory_gb: 24
  memory_bandwidth_gbs: 1000
  tflops: {bf16: 150, fp8_e4m3: 300}
  cuda_graphs: true
  triton: true
  launch_us: 3
- id: my-ampere
  name: My Ampere card
  vendor: nvidia
  arch: ampere
  compute_capability: 8.6
  memory_gb: 24
  memory_bandwidth_gbs: 900
  tflops: {bf16: 70}
  cuda_graphs: true
  triton: true
  launch_us: 3
"""


def test_hardware_file_adds_targets_usable_with_target(capsys, tmp_path):
    hw = write(tmp_path / "gpus.yaml", MY_GPUS)
    plan = PLANS / "h100_fp8_decode.yaml"
    assert run(capsys, "lint", "--target", "my-ada", plan)[0] == 2  # unknown without the file: a bad argument
    rc, out, _ = run(capsys, "lint", "--hardware", hw, "--target", "my-ada", plan)
    assert rc == 0, out
    assert run(capsys, "lint", "--hardware", hw, "--target", "mine", plan)[0] == 0  # the alias
    rc, data = lint_json(capsys, "--hardware", hw, "--target", "my-ampere", plan)
    assert rc == 1 and [d["code"] for d in data["diagnostics"]] == ["PL201"]
    rc, out, _ = run(capsys, "targets", "--json", "--hardware", hw)
    assert {"my-ada", "my-ampere"} <= {t["id"] for t in json.loads(out)}


def test_bad_hardware_file_is_a_pl130_at_its_place(capsys, tmp_path):
    hw = write(tmp_path / "gpus.yaml", "- id: broken\n  compute_capability: [8, 9]\n")
    rc, data = lint_json(capsys, "--hardware", hw, PLANS / "h100_decode.yaml")
    assert rc != 0
    assert data["ok"] is False and {d["code"] for d in data["diagnostics"]} == {"PL130"}
    assert all(d["file"].endswith("gpus.yaml") for d in data["diagnostics"])


def test_missing_hardware_file_exits_2_for_targets_and_explain(capsys, tmp_path):
    missing = tmp_path / "missing.yaml"
    assert run(capsys, "targets", "--hardware", missing)[0] == 2
    assert run(capsys, "explain", "--hardware", missing, PLANS / "h100_decode.yaml")[0] == 2


def test_missing_hardware_file_exits_2_for_lint(capsys, tmp_path):
    assert run(capsys, "lint", "--hardware", tmp_path / "missing.yaml", PLANS / "h100_decode.yaml")[0] == 2


# ----------------------------------------------------------------------------- extends

BASE = """\
planlang: 1
name: base
target: h100
fusions: [rmsnorm_residual, qkv, swiglu]
graphs: {capture: cuda_graph, buckets: [1, 2, 4, 8], warmup: 5}
precision: {default: bf16, accumulate: fp32}
limits: {max_seq_len: 4096, max_batch: 8}
"""

CHILD = """\
planlang: 1
name: child
extends: ../base/base.yaml
fusions: [attention]
graphs: {buckets: [1, 2, 4]}
precision: {preset: fp8_weight_only}
"""


def test_extends_merges_mappings_and_replaces_lists(capsys, tmp_path, monkeypatch):
    write(tmp_path / "base" / "base.yaml", BASE)
    child = write(tmp_path / "plans" / "child.yaml", CHILD)
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run(capsys, "lint", child)
    assert rc == 0, out
    plan = planlang.load(child)
    assert plan.name == "child" and plan.target == "h100"              # from the base
    assert [f.kind for f in plan.fusions] == ["attention"]              # lists replace
    assert plan.graphs.capture == "cuda_graph" and plan.graphs.warmup == 5  # mappings merge...
    assert plan.graphs.buckets == [1, 2, 4]                             # ...key by key
    assert plan.precision.default == "bf16" and plan.precision.preset == "fp8_weight_only"
    rc, out, _ = run(capsys, "explain", "--json", child)
    data = json.loads(out)
    assert rc == 0 and data["target"]["id"] == "h100-sxm"
    assert any("[1, 2, 4]" in line for line in data["sections"]["graphs"])


def test_extends_from_the_text_form(capsys, tmp_path, monkeypatch):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.plan", 'planlang 1\nextends "base.yaml"\nfuse none\n')
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "lint", child)[0] == 0
    plan = planlang.load(child)
    assert plan.fusions == [] and plan.graphs.buckets == [1, 2, 4, 8]


def test_extends_cycle_is_pl112(capsys, tmp_path, monkeypatch):
    a = write(tmp_path / "a.yaml", "planlang: 1\nextends: b.yaml\n")
    write(tmp_path / "b.yaml", "planlang: 1\nextends: a.yaml\n")
    monkeypatch.chdir(tmp_path)
    rc, data = lint_json(capsys, a)
    assert rc == 1
    assert "PL112" in {d["code"] for d in data["diagnostics"]}


SECRET = "hunter2-do-not-print"


def test_extends_climbing_out_of_the_tree_is_pl111_and_reads_nothing(capsys, tmp_path, monkeypatch):
    write(tmp_path / "outside.yaml", f"planlang: 1\nname: {SECRET}\nfusion: [oops]\n")
    child = write(tmp_path / "project" / "plans" / "child.yaml", "planlang: 1\nextends: ../../outside.yaml\n")
    monkeypatch.chdir(tmp_path / "project")
    rc, data = lint_json(capsys, child)
    assert rc == 1
    (d,) = data["diagnostics"]
    assert (d["code"], d["line"], d["column"]) == ("PL111", 2, 10)
    assert SECRET not in json.dumps(data)


def test_extends_with_an_absolute_path_is_pl111(capsys, tmp_path, monkeypatch):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", f"planlang: 1\nextends: {tmp_path / 'base.yaml'}\n")
    monkeypatch.chdir(tmp_path)
    rc, data = lint_json(capsys, child)
    assert rc == 1 and [d["code"] for d in data["diagnostics"]] == ["PL111"]


def test_extends_through_a_symlink_out_of_the_tree_is_pl111(capsys, tmp_path, monkeypatch):
    write(tmp_path / "outside.yaml", f"planlang: 1\nname: {SECRET}\n")
    project = tmp_path / "project"
    child = write(project / "child.yaml", "planlang: 1\nextends: link.yaml\n")
    try:
        (project / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    except OSError:
        pytest.skip("no symlinks here")
    monkeypatch.chdir(project)
    rc, data = lint_json(capsys, child)
    assert rc == 1 and [d["code"] for d in data["diagnostics"]] == ["PL111"]
    assert SECRET not in json.dumps(data)


def test_extends_of_a_missing_base_is_pl113(capsys, tmp_path, monkeypatch):
    child = write(tmp_path / "child.yaml", "planlang: 1\nextends: nowhere.yaml\n")
    monkeypatch.chdir(tmp_path)
    rc, data = lint_json(capsys, child)
    assert rc == 1 and [d["code"] for d in data["diagnostics"]] == ["PL113"]


def test_errors_of_the_base_are_reported_in_the_base(capsys, tmp_path, monkeypatch):
    write(tmp_path / "base.yaml", "planlang: 1\nfusions: [qkv, swiglo]\n")
    child = write(tmp_path / "child.yaml", "planlang: 1\nextends: base.yaml\n")
    monkeypatch.chdir(tmp_path)
    rc, data = lint_json(capsys, child)
    assert rc == 1
    pl108 = [d for d in data["diagnostics"] if d["code"] == "PL108"]
    assert pl108 and pl108[0]["file"].endswith("base.yaml") and pl108[0]["line"] == 2


# ----------------------------------------------------------------------------- no tracebacks

@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_no_command_shows_a_traceback_on_the_invalid_corpus(capsys, path, monkeypatch):
    monkeypatch.chdir(INVALID)
    for args in (["lint", path.name], ["lint", "--format", "sarif", path.name], ["fmt", path.name],
                 ["fmt", "--to", "plan", path.name], ["fmt", "--check", path.name], ["explain", path.name],
                 ["explain", "--json", path.name]):
        rc, _, _ = run(capsys, *args)  # `run` asserts no traceback
        assert rc in (0, 1, 2)


def test_subprocess_lint_exit_codes():
    ok = run_process("lint", "plans/h100_decode.yaml")
    assert ok.returncode == 0, ok.stderr
    bad = run_process("lint", "--format", "sarif", INVALID / "04_fp8_on_a100.yaml")
    assert bad.returncode == 1
    check_sarif_structure(json.loads(bad.stdout))
    usage = run_process("lint")
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_subprocess_whole_corpus_has_no_traceback():
    proc = run_process("lint", *CORPUS)
    assert proc.returncode == 2  # 46_not_utf8.yaml is unreadable
    assert "Traceback" not in proc.stdout + proc.stderr
    headers = [line for line in proc.stdout.splitlines() if HEADER.match(line)]
    assert len(headers) >= len(CORPUS)


def test_subprocess_fmt_to_plan():
    proc = run_process("fmt", "--to", "plan", "plans/h100_decode.yaml")
    assert proc.returncode == 0 and _uncommented(proc.stdout).startswith("planlang 1\nplan h100_decode on h100\n")


def test_infinite_option_is_refused_not_a_traceback(capsys, tmp_path):
    plan = write(tmp_path / "inf.yaml", "planlang: 1\ntarget: h100\nfusions: [{kind: attention, softcap: .inf}]\n")
    rc, out, _ = run(capsys, "lint", plan)
    assert rc == 1 and "PL105" in out
    rc, _, _ = run(capsys, "fmt", "--to", "plan", plan)
    assert rc == 1


def test_lone_surrogate_in_the_text_form_is_no_traceback(tmp_path):
    plan = write(tmp_path / "sur.plan", 'planlang 1\nprovenance device "\\ud800"\n')
    proc = run_process("fmt", plan)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode in (0, 1)


def test_tensor_parallel_on_the_cpu_target_is_allowed(capsys, tmp_path):
    plan = write(tmp_path / "tp_cpu.yaml", "planlang: 1\ntarget: cpu\nparallel: {tensor: 2}\n")
    rc, out, _ = run(capsys, "lint", plan)
    assert rc == 0, out


def test_fmt_shows_the_caret_of_a_syntax_error(capsys):
    rc, _, err = run(capsys, "fmt", INVALID / "37_text_unknown_statement.plan")
    assert rc == 1
    assert ("PL101", "fuze") in caret_targets(err), err


def test_a_list_as_fusion_kind_is_a_diagnostic(capsys, tmp_path):
    rc, out, _ = run(capsys, "lint", write(tmp_path / "kind.yaml", "planlang: 1\nfusions: [{kind: [qkv]}]\n"))
    assert rc == 1 and ("PL105" in out or "PL108" in out)


def test_an_internal_error_is_one_line_with_exit_3_and_its_traceback_on_request(capsys, monkeypatch):
    def broken(args):
        raise KeyError("a planlang bug")
    monkeypatch.setitem(cli.COMMANDS, "targets", broken)
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(["targets"]) == 3
    err = capsys.readouterr().err
    assert "planlang targets: internal error: KeyError: 'a planlang bug'" in err
    assert "PLANLANG_TRACEBACK=1" in err and "Traceback" not in err
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(KeyError):
        cli.main(["targets"])


def test_lint_says_a_folder_or_a_model_is_not_a_plan_and_what_to_pass(capsys, tmp_path):
    rc, out, _ = run(capsys, "lint", tmp_path)
    assert rc == 2 and "is a folder, not a plan file" in out and "*.yaml" in out
    rc, out, _ = run(capsys, "lint", "builtin:llama-tiny")
    assert rc == 2 and "a model, not a plan file" in out and "--model" in out


def test_fmt_checks_several_plans_but_prints_only_one(capsys, tmp_path):
    good = write(tmp_path / "ok.yaml", CANONICAL_YAML)
    messy = write(tmp_path / "messy.yaml", MESSY_YAML)
    assert run(capsys, "fmt", "--check", good, good)[0] == 0
    rc, _, err = run(capsys, "fmt", "--check", good, messy)
    assert rc == 1 and "messy.yaml: not in canonical form" in err
    rc, _, err = run(capsys, "fmt", good, messy)
    assert rc == 2 and "--check or --write" in err


def test_a_model_given_twice_is_a_usage_error_and_once_as_an_option_is_the_argument(capsys):
    rc, _, err = run(capsys, "apply", "plans/quickstart.yaml", "builtin:sinks-tiny", "--model", "builtin:llama-tiny")
    assert rc == 2 and "two models" in err
    args = cli.build_parser("tune").parse_args(["tune", "-o", "x.yaml", "--model", "builtin:llama-1b"])
    assert cli._reconcile_model(args) is None and args.model == "builtin:llama-1b"
    args = cli.build_parser("bench").parse_args(["bench", "a.yaml", "--model", "builtin:llama-1b"])
    assert cli._reconcile_model(args) is None and args.plans == ["a.yaml", "builtin:llama-1b"]


def test_type_and_bound_errors_say_what_was_expected_and_found(capsys, tmp_path):
    rc, out, _ = run(capsys, "lint", write(tmp_path / "p.yaml", "planlang: 1\nname: 5\nlimits: {max_batch: 0}\n"))
    assert rc == 1
    assert "name must be a string, found 5" in out and "limits.max_batch must be greater than 0, found 0" in out
    assert "input should" not in out.lower()
