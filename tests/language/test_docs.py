"""The docs say what the code does.

docs/language.md: every fenced ```yaml / ```plan block that starts with `planlang` lints
with no error and no warning for its target (`h100` where it names none); a ```yaml block
followed at once by a ```plan block is the same plan in the two syntaxes; the table of
text-form statements names every statement of the grammar.

docs/diagnostics.md: a `## PLxxx: title` heading for every code of `planlang.diagnostics.CODES`
(title as in the table), no code that is not in it; each bad example (a block whose first
line is `# expect: PLxxx at L:C`) produces that code there, and the ```text block after it
is exactly what lint prints for it; each fixed plan (a block starting with `planlang`) lints
without errors; each ```console block is what running its `$ planlang ...` lines prints.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import planlang
from planlang import cli
from planlang.diagnostics import CODES, render_text
from planlang.loader import load_with_source
from planlang.text_reader import statement_keywords
from planlang.validate import validate

DOCS = Path(__file__).resolve().parents[2] / "docs"
LANGUAGE = DOCS / "language.md"
DIAGNOSTICS = DOCS / "diagnostics.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
EXPECT = re.compile(r"# expect: (PL\d{3}) at (\d+):(\d*)")
HEADING = re.compile(r"^## (PL\d{3}): (.+?)\s*$", re.M)


@dataclass
class Block:
    lang: str
    text: str
    start: int  # offset of the fence in the document
    end: int


def blocks(text: str) -> list[Block]:
    return [Block(m.group(1), m.group(2), m.start(), m.end()) for m in FENCE.finditer(text)]


def no_detect():
    return None  # off the device: the same answer on every machine


def lint(path: Path, cwd: Path, target: str | None = None):
    """Diagnostics of the plan at `path`, as `planlang lint` gives them off the device."""
    loaded = load_with_source(path, cwd=cwd)
    diags = list(loaded.diagnostics)
    if loaded.plan is not None:
        diags += validate(loaded.plan, loaded.source, target=target, detect=no_detect)
    return loaded, diags


def plan_name(text: str) -> str | None:
    m = re.search(r"^name: *([A-Za-z_][\w.\-]*)", text, re.M) or re.search(r"^plan +([A-Za-z_][\w.\-]*)", text, re.M)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- language.md

@pytest.fixture(scope="module")
def language_doc() -> str:
    if not LANGUAGE.exists():
        pytest.fail("docs/language.md is missing")
    return LANGUAGE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def language_examples(language_doc, tmp_path_factory):
    """Every plan of docs/language.md written to one folder (so `extends` between them
    resolves): [(block, path)], and the yaml/plan pairs [(yaml path, plan path)]."""
    folder = tmp_path_factory.mktemp("language_examples")
    plans = [b for b in blocks(language_doc) if b.lang in ("yaml", "plan") and b.text.startswith("planlang")]
    written, pairs, stems = [], [], {}
    for i, block in enumerate(plans):
        previous = plans[i - 1] if i else None
        paired = (previous is not None and block.lang == "plan" and previous.lang == "yaml"
                  and language_doc[previous.end:block.start].strip() == "")
        stem = written[-1][1].stem if paired else (plan_name(block.text) or f"example_{i}")
        path = folder / f"{stem}.{block.lang}"
        assert path.name not in stems, f"two examples would be {path.name}: name them apart"
        stems[path.name] = block
        path.write_text(block.text, encoding="utf-8")
        written.append((block, path))
        if paired:
            pairs.append((written[-2][1], path))
    return folder, written, pairs


def test_language_doc_has_examples_in_both_syntaxes(language_examples):
    _, written, pairs = language_examples
    assert sum(p.suffix == ".yaml" for _, p in written) >= 10
    assert sum(p.suffix == ".plan" for _, p in written) >= 10
    assert len(pairs) >= 9


def test_every_plan_in_the_language_doc_lints_clean(language_examples):
    folder, written, _ = language_examples
    for block, path in written:
        loaded = load_with_source(path, cwd=folder)
        assert loaded.plan is not None, (path.name, [(d.code, d.message) for d in loaded.diagnostics])
        target = None if "target" in (loaded.merged or {}) else "h100"
        _, diags = lint(path, folder, target)
        bad = [(d.code, d.line, d.message) for d in diags if d.severity != "note"]
        assert bad == [], f"{path.name}:\n{block.text}"


def test_side_by_side_examples_are_the_same_plan(language_examples):
    _, _, pairs = language_examples
    for yaml_path, plan_path in pairs:
        assert planlang.load(yaml_path) == planlang.load(plan_path), (yaml_path.name, plan_path.name)


def test_language_doc_covers_every_section(language_doc):
    for section in ("fusions", "graphs", "compile", "precision", "memory", "parallel", "limits",
                    "provenance", "extends"):
        assert re.search(rf"^##+ .*`?{section}`?", language_doc, re.M), section
    for preset in planlang.names.PRESETS:
        assert f"`{preset}`" in language_doc, preset


def test_fusion_table_names_every_fusion_kind(language_doc):
    section = language_doc[language_doc.index("### `fusions`"):language_doc.index("### `graphs`")]
    rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \|", section, re.M)}
    assert set(planlang.names.FUSION_KINDS) <= rows, set(planlang.names.FUSION_KINDS) - rows


def test_text_form_table_names_every_statement(language_doc):
    table = language_doc[language_doc.index("## The text form"):]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    starts = {re.match(r"\| `([a-z_]+)", row).group(1) for row in rows}
    assert set(statement_keywords()) <= starts, set(statement_keywords()) - starts


# ----------------------------------------------------------------------------- diagnostics.md

@pytest.fixture(scope="module")
def diagnostics_doc() -> str:
    if not DIAGNOSTICS.exists():
        pytest.fail("docs/diagnostics.md is missing")
    return DIAGNOSTICS.read_text(encoding="utf-8")


def sections(doc: str) -> dict[str, tuple[str, str]]:
    """code -> (title, body of its section)."""
    marks = list(HEADING.finditer(doc))
    out = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(doc)
        nxt = doc.find("\n## ", m.end())
        end = min(end, nxt if nxt != -1 else len(doc))
        assert m.group(1) not in out, f"{m.group(1)} has two headings"
        out[m.group(1)] = (m.group(2), doc[m.end():end])
    return out


def test_every_code_has_its_heading_with_its_title(diagnostics_doc):
    found = sections(diagnostics_doc)
    assert sorted(found) == sorted(CODES), set(CODES) ^ set(found)
    for code, (title, _) in found.items():
        assert title == CODES[code][1], (code, title)


def test_the_doc_names_no_unknown_code(diagnostics_doc):
    named = set(re.findall(r"PL\d{3}", diagnostics_doc))
    assert named - set(CODES) == set()


def test_every_section_says_its_severity_and_how_to_fix(diagnostics_doc):
    for code, (_, body) in sections(diagnostics_doc).items():
        assert f"**{CODES[code][0]}**" in body, f"{code}: say its severity in bold"
        assert re.search(r"\*\*Fix", body), f"{code}: no **Fix** paragraph"


def _section_files(body: str, folder: Path) -> None:
    """Blocks whose first line is `# file: NAME` are written as NAME (for console runs)."""
    for block in blocks(body):
        m = re.match(r"# file: (\S+)\n", block.text)
        if m:
            (folder / m.group(1)).write_text(block.text, encoding="utf-8")


def test_bad_examples_produce_their_code_and_the_printed_output(diagnostics_doc, tmp_path, monkeypatch):
    checked = 0
    for code, (_, body) in sections(diagnostics_doc).items():
        folder = tmp_path / code
        folder.mkdir()
        _section_files(body, folder)
        monkeypatch.chdir(folder)  # lint `NAME` as a user would, so the output shows NAME
        found = blocks(body)
        for i, block in enumerate(found):
            m = EXPECT.match(block.text)
            if block.lang not in ("yaml", "plan") or not m:
                continue
            assert m.group(1) == code, f"the example under {code} expects {m.group(1)}"
            output = found[i + 1] if i + 1 < len(found) and found[i + 1].lang == "text" else None
            name = output.text.split(":", 1)[0] if output else f"bad.{block.lang}"
            path = Path(name)
            path.write_text(block.text, encoding="utf-8")
            _, diags = lint(path, Path("."))
            line, col = int(m.group(2)), m.group(3)
            hits = [d for d in diags if d.code == code and d.line == line and (not col or d.column == int(col))]
            assert hits, (code, [(d.code, d.line, d.column) for d in diags])
            if output is not None:
                shown = render_text([d for d in diags if d.code == code])
                assert output.text.rstrip("\n") == shown, f"{code}: the doc shows\n{output.text}\nlint prints\n{shown}"
            checked += 1
    assert checked >= 35


def test_plans_of_the_diagnostics_doc_lint_without_errors_without_a_model(diagnostics_doc, tmp_path):
    """The fixed plans, and the examples of codes that need a model (clean without one)."""
    checked = 0
    for code, (_, body) in sections(diagnostics_doc).items():
        folder = tmp_path / code
        folder.mkdir()
        for i, block in enumerate(blocks(body)):
            if block.lang not in ("yaml", "plan") or not block.text.startswith("planlang"):
                continue
            path = folder / f"{plan_name(block.text) or f'fixed_{i}'}.{block.lang}"
            path.write_text(block.text, encoding="utf-8")
            loaded = load_with_source(path, cwd=folder)
            target = None if "target" in (loaded.merged or {}) else "h100"
            _, diags = lint(path, folder, target)
            errors = [(d.code, d.message) for d in diags if d.severity == "error" or d.code == code]
            assert errors == [], f"{code}: {path.name} gets {errors}"
            checked += 1
    assert checked >= 30


def test_console_examples_print_what_the_doc_shows(diagnostics_doc, tmp_path, monkeypatch, capsys):
    checked = 0
    for code, (_, body) in sections(diagnostics_doc).items():
        folder = tmp_path / code
        folder.mkdir()
        _section_files(body, folder)
        monkeypatch.chdir(folder)
        for block in blocks(body):
            if block.lang != "console":
                continue
            for command, expected in re.findall(r"^\$ planlang (.+)\n((?:(?!\$ ).*\n?)*)", block.text, re.M):
                try:
                    rc = cli.main(command.split())
                except SystemExit as exc:
                    rc = exc.code
                out, err = capsys.readouterr()
                assert (out + err).rstrip("\n") == expected.rstrip("\n"), f"{code}: $ planlang {command}"
                assert rc != 0
                checked += 1
    assert checked >= 2
