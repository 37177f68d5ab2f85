"""Fuzzing the readers and validation: whatever the input, planlang answers with its own
errors (`SourceError` from a reader, diagnostics from loading and validation), never with
another exception.

- random bytes -> `read_yaml`; random and grammar-shaped text -> `read_text`;
- random YAML-like documents (real plan keys and words mixed with junk) -> `Plan.from_document`
  -> `validate` -> `explain_plan`;
- mutations (delete, insert, replace, swap and duplicate lines) of every plan in `plans/` and
  `tests/language/spec_examples/`, written to files -> `load_with_source` -> `validate` ->
  the three renderers;
- an alias bomb is refused with PL103 at once, and a file over 1 MiB with PL100.

`PLANLANG_FUZZ_EXAMPLES` sets the examples per test (default 150, for CI);
`benchmarks/fuzz_readers.py` runs 10,000 each.
"""
from __future__ import annotations

import collections
import contextlib
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from planlang import names
from planlang.diagnostics import CODES, Diagnostic, render_json, render_sarif, render_text
from planlang.explain import explain_plan
from planlang.hardware import load_catalog
from planlang.loader import load_with_source
from planlang.plan import SECTION_ORDER, Plan
from planlang.source import SourceError
from planlang.text_reader import keywords, read_text
from planlang.validate import resolve_target, validate
from planlang.yaml_reader import MAX_BYTES, read_yaml

from .strategies import document as valid_document
from .strategies import selector as valid_selector

EXAMPLES = int(os.environ.get("PLANLANG_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])

ROOT = Path(__file__).resolve().parents[2]
SEEDS = sorted([*(ROOT / "plans").iterdir(), *(Path(__file__).parent / "spec_examples").iterdir()])
TARGETS = [None, "h100", "a100-80gb", "cpu", "b200", "rtx5090", "no-such-gpu"]
CATALOG = load_catalog()

# Cases run per test, read by benchmarks/fuzz_readers.py for its table.
CASES: collections.Counter = collections.Counter()


def count() -> None:
    CASES[sys._getframe(1).f_code.co_name] += 1


# Bugs the fuzzers found that are reported and await a fix in the language code. Each has a
# deterministic strict-xfail test below; a fuzz case that dies of exactly one of these (the
# exception type raised in that function of that file) is skipped instead of failing, so
# the fuzzers keep hunting for new bugs. Remove an entry when its xfail test starts passing.
KNOWN_BUGS: set = set()


# Cases skipped per known bug, for the benchmark's report.
KNOWN_BUG_HITS: collections.Counter = collections.Counter()


def known_bug(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    code = tb.tb_frame.f_code
    signature = (type(exc).__name__, Path(code.co_filename).name, code.co_name)
    if signature in KNOWN_BUGS:
        KNOWN_BUG_HITS[signature] += 1
        return True
    return False


@contextlib.contextmanager
def tolerate_known_bugs():
    """Turns an exception listed in KNOWN_BUGS into a skipped case (hypothesis.reject);
    anything else, a failed assertion included, still fails the test."""
    try:
        yield
    except (AssertionError, SourceError):
        raise
    except Exception as exc:
        if known_bug(exc):
            reject()
        raise


def no_detect():
    return None  # lint off the device: `target: auto` finds nothing, the same on every machine


def check_diagnostics(diags) -> None:
    """Diagnostics are well formed and every renderer takes them."""
    for d in diags:
        assert isinstance(d, Diagnostic)
        assert d.code in CODES and d.severity in ("error", "warning", "note")
        assert d.line >= 1 and d.column >= 1
        assert isinstance(d.message, str) and d.message
    render_text(diags)
    render_json(diags, ok=False)
    render_sarif(diags, "fuzz")


def validate_everywhere(plan: Plan, source=None) -> None:
    """validate and explain against several targets: diagnostics only."""
    for target in TARGETS:
        diags = validate(plan, source, target=target, catalog=CATALOG, detect=no_detect)
        check_diagnostics(diags)
        res = resolve_target(plan, source, CATALOG, target, no_detect)
        explain_plan(plan, res.target, res.how)


# ----------------------------------------------------------------------------- readers

@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_to_read_yaml_raise_only_source_errors(data):
    count()
    with tolerate_known_bugs():
        try:
            read_yaml(data, "fuzz.yaml")
        except SourceError as exc:
            assert exc.code in CODES


YAML_PIECES = ["planlang", ":", " ", "\n", "  ", "- ", "[", "]", "{", "}", ",", "&a", "*a", "!!", "!!python/tuple",
               "<<", "'", '"', "#", "---", "...", "|", ">", "?", "%YAML 1.2", "\t", "1", "-1", "0x1f", "1e400",
               ".nan", "~", "null", "yes", "2025-01-01", "\\u", "\ufeff", "\x00", "é", "fusions", "qkv"]


@FUZZ
@given(st.lists(st.one_of(st.sampled_from(YAML_PIECES), st.text(max_size=4)), max_size=60).map("".join))
def test_yaml_shaped_text_to_read_yaml_raises_only_source_errors(text):
    count()
    with tolerate_known_bugs():
        try:
            doc, source = read_yaml(text, "fuzz.yaml")
        except SourceError as exc:
            assert exc.code in CODES
            return
        Plan.from_document(doc, source)


TEXT_WORDS = sorted(set(keywords()) | set(names.FUSION_KINDS) | set(names.DTYPES) | set(names.OP_KINDS)
                    | {"h100", "cpu", "pow2:1..64", "pow2:3..1", "layers.*.mlp:linear", "**:norm", "layers[16:32]",
                       '"layers.*.attn.{wq,wk,wv}"', "re:layers\\.1", "sliding_window", "true", "false", "none"})
TEXT_PUNCT = [" ", " ", " ", "\n", "\n", ",", "=", "(", ")", "{", "}", ":", '"', "#", "\t", "\r\n", "1", "2.5",
              "-3", "1e999", '"\\ud800"', '"\\x"', "\\", "é", "\x00"]


@FUZZ
@given(st.lists(st.one_of(st.sampled_from(TEXT_WORDS), st.sampled_from(TEXT_PUNCT), st.text(max_size=3)),
                max_size=50).map("".join))
def test_grammar_shaped_text_to_read_text_raises_only_source_errors(text):
    count()
    with tolerate_known_bugs():
        try:
            doc, source = read_text(text, "fuzz.plan")
        except SourceError as exc:
            assert exc.code in CODES
            return
        plan, diags = Plan.from_document(doc, source)
        check_diagnostics(diags)
        if plan is not None:
            validate_everywhere(plan, source)


@FUZZ
@given(st.text(max_size=300))
def test_random_text_to_read_text_raises_only_source_errors(text):
    count()
    with tolerate_known_bugs():
        try:
            read_text(text, "fuzz.plan")
        except SourceError as exc:
            assert exc.code in CODES


def test_a_huge_number_in_the_yaml_form_is_a_diagnostic():
    with pytest.raises(SourceError) as info:
        read_yaml("planlang: " + "9" * 5000 + "\n")
    assert info.value.code == "PL105"


def test_a_huge_number_in_the_text_form_is_a_source_error():
    with pytest.raises(SourceError):
        read_text("planlang " + "9" * 5000 + "\n")


@pytest.mark.parametrize("doc, where", [
    ({"planlang": 1, "Target": "h100"}, ("Target",)),
    ({"planlang": 1, "function-x": 1}, ("function-x",)),
    ({"planlang": 1, "graphs": {"Capture": "none"}}, ("graphs", "Capture")),
    ({"planlang": 1, "graphs": {"str": "none"}}, ("graphs", "str")),
])
def test_an_unknown_key_of_any_spelling_is_pl104_at_the_key(doc, where):
    text = yaml.safe_dump(doc, sort_keys=False)
    _, source = read_yaml(text)
    plan, diags = Plan.from_document(doc, source)
    assert plan is None and [d.code for d in diags] == ["PL104"]
    assert diags[0].span == source.keys[where]
    assert repr(where[-1]) in diags[0].message or f"'{where[-1]}'" in diags[0].message


@pytest.mark.parametrize("fusion", [{"kind": ["qkv"]}, {"kind": {"a": 1}}, {"kind": ["qkv"], "bogus": 1}])
def test_a_fusion_kind_that_is_not_a_name_is_a_diagnostic(fusion):
    plan, diags = Plan.from_document({"planlang": 1, "fusions": [fusion]})
    assert plan is None and {d.code for d in diags} <= {"PL105", "PL108", "PL104"} and diags


# ----------------------------------------------------------------------------- documents

PLAN_KEYS = sorted(set(SECTION_ORDER) | {"kind", "at", "required", "capture", "buckets", "over_max", "warmup",
                                        "mode", "fullgraph", "dynamic", "default", "accumulate", "preset", "rules",
                                        "dtype", "scaling", "block_size", "activations", "emulate", "offload",
                                        "recompute", "to", "prefetch", "policy", "save", "tensor", "sequence",
                                        "styles", "style", "max_seq_len", "max_batch", "sliding_window",
                                        *(o for opts in names.FUSION_OPTIONS.values() for o in opts)})
WORDS = sorted(set(names.FUSION_KINDS) | set(names.DTYPES) | set(names.OP_KINDS) | set(names.COMPILE_MODES)
               | set(names.PRESETS) | set(names.PARALLEL_STYLES) | set(names.SCALINGS) | set(names.ACTIVATION_QUANT)
               | set(names.CAPTURE_MODES) | set(names.MODES) | set(names.ATTENTION_MASKS) | set(names.ACTIVATIONS)
               | {"h100", "auto", "cpu", "a100-80gb", "b200", "pow2:1..64", "pow2:0..8", "cuda_graph", "causal"})
SELECTORS = st.one_of(valid_selector, st.sampled_from(["**", "layers[-4:]", "layers[::0]", "re:(", "re:layers\\.1.x",
                                                       "a..b", "**.**", "{a}", "x:nope", "", " ", "layers[1:x]"]))
scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(WORDS), SELECTORS,
)
key = st.one_of(st.sampled_from(PLAN_KEYS), st.text(max_size=8))
junk = st.recursive(scalar, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(key, children, max_size=4)), max_leaves=25)
junk_document = st.fixed_dictionaries(
    {"planlang": st.one_of(st.just(1), st.just(1), scalar)},
    optional={k: junk for k in SECTION_ORDER if k != "planlang"})


@st.composite
def damaged_document(draw):
    """A valid document with one subtree (or one key) replaced by junk."""
    doc = draw(valid_document)
    node, path = doc, []
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        k = draw(st.sampled_from(sorted(node, key=str))) if isinstance(node, dict) else \
            draw(st.integers(0, len(node) - 1))
        path.append(k)
        node = node[k]
    if not path:
        return doc
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and draw(st.booleans()):
        parent[draw(key)] = parent.pop(path[-1])  # a misspelt or unknown key
    else:
        parent[path[-1]] = draw(junk)
    return doc


def with_source(doc):
    """The document written as YAML and read back, for diagnostics with real spans (None when
    the junk has no YAML form that reads back)."""
    try:
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
        return read_yaml(text, "fuzz.yaml")
    except (SourceError, yaml.YAMLError, ValueError):
        return None


@FUZZ
@given(st.one_of(junk, junk_document, damaged_document(), valid_document))
def test_random_documents_give_diagnostics_only(doc):
    count()
    with tolerate_known_bugs():
        plan, diags = Plan.from_document(doc)
        check_diagnostics(diags)
        if plan is not None:
            validate_everywhere(plan)
        read = with_source(doc)
        if read is not None:
            plan, diags = Plan.from_document(*read)
            check_diagnostics(diags)
            if plan is not None:
                validate_everywhere(plan, read[1])


# ----------------------------------------------------------------------------- mutated plan files

@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    """Copies of the seed plans side by side, so `extends` between them resolves."""
    folder = tmp_path_factory.mktemp("fuzz_seeds")
    for path in SEEDS:
        shutil.copy(path, folder / path.name)
    return folder


INSERTS = st.one_of(
    st.sampled_from([":", " ", "\n", "  ", "-", "[", "]", "{", "}", ",", "*", "**", ".", "#", '"', "'", "=", "(",
                     ")", "&a ", "*a", "!!str ", "0", "9" * 12, "-1", "1.5", "..", "layers", "extends: ",
                     "extends ", "../", "/etc/passwd", "none", "fuse ", "dtype ", "re:", "\t", "\ufeff"]),
    st.text(max_size=6),
).map(lambda s: s.encode("utf-8", "surrogatepass"))


@st.composite
def mutated(draw):
    """(file name, bytes): a seed plan after one to four random edits."""
    seed = draw(st.sampled_from(SEEDS))
    data = seed.read_bytes()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "insert", "replace", "swap", "duplicate", "bytes"]))
        n = len(data)
        i = draw(st.integers(0, n))
        if op == "delete" and n:
            data = data[:i] + data[i + draw(st.integers(1, 8)):]
        elif op == "insert":
            data = data[:i] + draw(INSERTS) + data[i:]
        elif op == "replace" and n:
            data = data[:i] + draw(INSERTS) + data[i + 1:]
        elif op == "bytes":
            data = data[:i] + draw(st.binary(min_size=1, max_size=3)) + data[i:]
        elif op in ("swap", "duplicate"):
            lines = data.split(b"\n")
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            if op == "swap":
                lines[a], lines[b] = lines[b], lines[a]
            else:
                lines.insert(b, lines[a])
            data = b"\n".join(lines)
    return "m_" + seed.name, data


@FUZZ
@given(mutated())
def test_mutated_plans_give_diagnostics_only(seed_dir, case):
    count()
    with tolerate_known_bugs():
        name, data = case
        path = seed_dir / name
        path.write_bytes(data)
        loaded = load_with_source(path, cwd=seed_dir)
        check_diagnostics(loaded.diagnostics)
        if loaded.plan is None:
            assert any(d.severity == "error" for d in loaded.diagnostics)
            return
        for target in TARGETS:
            check_diagnostics(validate(loaded.plan, loaded.source, target=target, catalog=CATALOG,
                                       detect=no_detect))


@pytest.mark.parametrize("seed", SEEDS, ids=lambda p: p.name)
def test_every_seed_is_valid_before_mutation(seed_dir, seed):
    loaded = load_with_source(seed_dir / seed.name, cwd=seed_dir)
    assert loaded.plan is not None, [(d.code, d.message) for d in loaded.diagnostics]


# ----------------------------------------------------------------------------- resource bounds

def billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = ["planlang: 1", "provenance:", f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def cpu_seconds_under(limit: float):
    """The block takes less than `limit` seconds of this process's CPU time. The collector
    is paused: after thousands of fuzz cases its pauses, not the code under test, can
    take a second."""
    gc.collect()
    gc.disable()
    start = time.process_time()
    try:
        yield
    finally:
        spent = time.process_time() - start
        gc.enable()
    assert spent < limit, f"took {spent:.2f} s of CPU"


def test_an_alias_bomb_is_refused_with_pl103_at_once(tmp_path):
    text = billion_laughs()  # 9**9 (387 million) leaves once expanded
    # About 0.1 s; expanding the bomb would take hours and gigabytes.
    with cpu_seconds_under(1.0), pytest.raises(SourceError) as info:
        read_yaml(text, "bomb.yaml")
    assert info.value.code == "PL103"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with cpu_seconds_under(1.0):
        loaded = load_with_source(path, cwd=tmp_path)
    assert loaded.plan is None and [d.code for d in loaded.diagnostics] == ["PL103"]


def test_a_few_aliases_are_fine():
    doc, _ = read_yaml("planlang: 1\nprovenance:\n  a: &x 3\n  b: *x\n")
    assert doc["provenance"] == {"a": 3, "b": 3}


def big_plan(size: int, suffix: str) -> bytes:
    head = b"planlang: 1\n" if suffix == ".yaml" else b"planlang 1\n"
    filler = b"# " + b"x" * 78 + b"\n"
    body = head + filler * ((size - len(head)) // len(filler))
    return body + b"#" * (size - len(body) - 1) + b"\n" if size > len(body) else body


@pytest.mark.parametrize("suffix", [".yaml", ".plan"])
def test_a_file_over_1_mib_is_refused_with_pl100(tmp_path, suffix):
    path = tmp_path / f"big{suffix}"
    path.write_bytes(big_plan(MAX_BYTES + 1, suffix))
    assert path.stat().st_size == MAX_BYTES + 1
    with cpu_seconds_under(0.5):  # refused from its size, not parsed
        loaded = load_with_source(path, cwd=tmp_path)
    assert loaded.plan is None
    (d,) = loaded.diagnostics
    assert d.code == "PL100" and "1 MiB" in d.message
    with pytest.raises(SourceError) as info:
        read_yaml(path.read_bytes())
    assert info.value.code == "PL100"


def test_a_file_of_exactly_1_mib_is_read(tmp_path):
    path = tmp_path / "limit.yaml"
    path.write_bytes(big_plan(MAX_BYTES, ".yaml"))
    assert path.stat().st_size == MAX_BYTES
    loaded = load_with_source(path, cwd=tmp_path)
    assert loaded.plan is not None, [d.message for d in loaded.diagnostics]
