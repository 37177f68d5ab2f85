"""The invalid-plan corpus: each file in invalid/ names, in its first line, the diagnostic
code it must produce and where (`# expect: PL104 at 3:1`; a missing column means any)."""
import re
from pathlib import Path

import pytest

from planlang.diagnostics import CODES
from planlang.loader import load_with_source
from planlang.validate import validate

CORPUS = sorted((Path(__file__).parent / "invalid").iterdir())
EXPECT = re.compile(rb"# expect: (PL\d{3}) at (\d+):(\d*)")


def diagnostics_of(path):
    loaded = load_with_source(path, cwd=path.parent)
    diags = list(loaded.diagnostics)
    if loaded.plan is not None:
        diags += validate(loaded.plan, loaded.source, detect=lambda: None)
    return diags


def test_corpus_is_large_and_covers_both_syntaxes():
    assert len(CORPUS) >= 40
    assert any(p.suffix == ".plan" for p in CORPUS) and any(p.suffix == ".yaml" for p in CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_invalid_plan_reports_expected_code_at_expected_place(path):
    m = EXPECT.match(path.read_bytes())
    assert m, f"{path.name} lacks its '# expect:' line"
    code, line, col = m.group(1).decode(), int(m.group(2)), m.group(3)
    assert code in CODES
    diags = diagnostics_of(path)
    found = [(d.code, d.line, d.column) for d in diags]
    hits = [d for d in diags if d.code == code and d.line == line and (not col or d.column == int(col))]
    assert hits, f"expected {code} at {line}:{col or '*'}, got {found}"
    assert all(d.file.endswith(path.name) for d in hits)
