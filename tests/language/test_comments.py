"""fmt keeps comments: random plans in both syntaxes with comments dropped in at random
lines (own lines and after values) come out of fmt with every comment, reading back to the
same plan, and fmt of that is a fixed point."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planlang.comments import extract
from planlang.plan import Plan
from planlang.text_reader import read_text
from planlang.writer import format_plan
from planlang.yaml_reader import read_yaml

from .strategies import document

READ = {"yaml": read_yaml, "plan": read_text}


def _commented(text: str, spots: list[tuple[int, bool]]) -> str:
    lines = text.rstrip("\n").split("\n")  # not splitlines: a string may hold U+0085
    for n, (at, trailing) in enumerate(sorted(spots, reverse=True)):
        i = at % len(lines)
        if trailing and lines[i].strip():
            lines[i] += f"  # note {n}"
        else:
            pad = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
            lines.insert(i, f"{pad}# note {n}")
    return "\n".join(lines) + "\n"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document, st.lists(st.tuples(st.integers(0, 200), st.booleans()), min_size=1, max_size=6),
       st.sampled_from(["yaml", "plan"]), st.sampled_from(["yaml", "plan"]))
def test_fmt_keeps_every_comment_and_the_plan(doc, spots, syntax, to):
    plan, diags = Plan.from_document(doc)
    assert plan is not None, diags
    text = _commented(format_plan(plan, syntax), spots)
    got, source = READ[syntax](text, "<fuzz>")
    assert got == plan.to_document() or Plan.from_document(got)[0] == plan  # the comments changed nothing
    read_plan = Plan.from_document(got, source)[0]
    out = format_plan(read_plan, to, source, syntax)
    assert sorted(c.text for c in extract(out, to)) == sorted(c.text for c in extract(text, syntax))
    again, again_source = READ[to](out, "<out>")
    assert Plan.from_document(again)[0] == plan
    assert format_plan(Plan.from_document(again, again_source)[0], to, again_source, to) == out
