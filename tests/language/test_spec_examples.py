"""Every example of PLAN_SPEC.md parses and lints clean for its target; the whole plans
(§2 and §9) with no warning either. The examples are kept in spec_examples/ (sections
wrapped into whole plans), and checked against the spec itself where it is present."""
import re
from pathlib import Path

import pytest

import planlang
from planlang.loader import load_with_source
from planlang.validate import validate

HERE = Path(__file__).parent / "spec_examples"
SPEC = Path(__file__).resolve().parents[3] / "shared" / "PLAN_SPEC.md"
EXAMPLES = sorted(HERE.iterdir())
WHOLE = {"s2_llama_decode.yaml", "s9_gemma2_decode.plan"}


def lint(path):
    loaded = load_with_source(path)
    assert loaded.plan is not None, [d.message for d in loaded.diagnostics]
    return loaded.diagnostics + validate(loaded.plan, loaded.source)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_spec_example_lints_without_errors(path):
    diags = lint(path)
    assert [d for d in diags if d.severity == "error"] == []


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_whole_spec_plans_lint_without_warnings(name):
    diags = lint(HERE / name)
    assert [(d.code, d.message) for d in diags if d.severity != "note"] == []


def test_examples_are_the_spec_verbatim():
    if not SPEC.exists():
        pytest.skip("PLAN_SPEC.md not beside the checkout")
    blocks = [b for lang, b in re.findall(r"```(\w*)\n(.*?)```", SPEC.read_text(), re.S)
              if lang == "yaml" or b.startswith("planlang 1")]
    texts = [p.read_text() for p in EXAMPLES]
    for block in blocks:
        assert any(block in t for t in texts), block[:60]


def test_yaml_and_text_examples_mean_the_same_as_their_conversion():
    from planlang.plan import Plan
    from planlang.text_reader import read_text
    from planlang.writer import format_plan
    from planlang.yaml_reader import read_yaml
    for path in EXAMPLES:
        plan = planlang.load(path)
        as_text = format_plan(plan, "plan")
        as_yaml = format_plan(plan, "yaml")
        back_text = Plan.from_document(read_text(as_text)[0])[0]
        back_yaml = Plan.from_document(read_yaml(as_yaml)[0])[0]
        assert back_text == plan, path.name
        assert back_yaml == plan, path.name
