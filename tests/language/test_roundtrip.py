"""YAML -> text -> YAML and text -> YAML -> text are identities on the Plan."""
from hypothesis import HealthCheck, given, settings

from planlang.plan import Plan
from planlang.text_reader import read_text
from planlang.writer import format_plan
from planlang.yaml_reader import read_yaml

from .strategies import document


def plan_of(doc):
    plan, diags = Plan.from_document(doc)
    assert plan is not None, [(d.code, d.message) for d in diags]
    return plan


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document)
def test_yaml_to_text_to_yaml_is_identity(doc):
    plan = plan_of(doc)
    yaml_text = format_plan(plan, "yaml")
    from_yaml = plan_of(read_yaml(yaml_text)[0])
    assert from_yaml == plan
    text = format_plan(from_yaml, "plan")
    from_text = plan_of(read_text(text)[0])
    assert from_text == plan
    assert format_plan(from_text, "yaml") == yaml_text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document)
def test_text_to_yaml_to_text_is_identity(doc):
    text = format_plan(plan_of(doc), "plan")
    plan = plan_of(read_text(text)[0])
    back = plan_of(read_yaml(format_plan(plan, "yaml"))[0])
    assert back == plan
    assert format_plan(back, "plan") == text


def test_canonical_documents_remember_only_what_was_written():
    plan = plan_of({"planlang": 1, "graphs": {"capture": "none"}})
    assert plan.to_document() == {"planlang": 1, "graphs": {"capture": "none"}}
