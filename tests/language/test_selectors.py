"""Selectors (PLAN_SPEC.md §3): matching, errors with their offsets, and the model-free
covers/overlaps decisions that lint's precedence and fusion-overlap checks rely on."""
from __future__ import annotations

import copy
import itertools
import os
import pickle
import re
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from planlang.names import OP_KINDS
from planlang.selectors import (
    Selector,
    SelectorError,
    covers,
    list_lengths,
    overlaps,
    regex_dot_before_digit,
    resolve,
)


def _llama_names(n_layers: int = 16) -> list[str]:
    """Module names of the built-in Llama-like model, in `named_modules()` order."""
    names = ["", "embed", "layers"]
    for i in range(n_layers):
        p = f"layers.{i}"
        names += [p, f"{p}.attn", f"{p}.attn.wq", f"{p}.attn.wk", f"{p}.attn.wv", f"{p}.attn.wo",
                  f"{p}.attn_norm", f"{p}.mlp", f"{p}.mlp.w1", f"{p}.mlp.w2", f"{p}.mlp.w3",
                  f"{p}.mlp_norm"]
    return names + ["norm", "lm_head"]


def _hf_names(n_layers: int = 4) -> list[str]:
    """Module names of a Hugging Face Llama (LlamaForCausalLM)."""
    names = ["", "model", "model.embed_tokens", "model.layers"]
    for i in range(n_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                  f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj", f"{p}.mlp",
                  f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj", f"{p}.mlp.down_proj", f"{p}.mlp.act_fn",
                  f"{p}.input_layernorm", f"{p}.post_attention_layernorm"]
    return names + ["model.norm", "model.rotary_emb", "lm_head"]


LLAMA = _llama_names()
HF = _hf_names()


def _layers(indices, suffix: str = "", prefix: str = "layers") -> list[str]:
    return [f"{prefix}.{i}{suffix}" for i in indices]


# ------------------------------------------------------------------------------------
# Matching, construct by construct


@pytest.mark.parametrize("text, expected", [
    ("*", ["embed", "layers", "norm", "lm_head"]),
    ("layers.*", _layers(range(16))),
    ("layers.*.mlp", _layers(range(16), ".mlp")),
    ("layers.0.attn.wq", ["layers.0.attn.wq"]),
    ("**.wq", _layers(range(16), ".attn.wq")),
    ("**.norm", ["norm"]),  # `**` matches zero segments; `attn_norm` is another name
    ("layers.**.w2", _layers(range(16), ".mlp.w2")),
    ("layers.*.{attn_norm,mlp_norm}",
     [p for i in range(16) for p in (f"layers.{i}.attn_norm", f"layers.{i}.mlp_norm")]),
    ("layers.*.attn.w{q,k,v}",
     [f"layers.{i}.attn.w{x}" for i in range(16) for x in "qkv"]),
    ("layers.3.{attn,mlp}.{wq,w1}", ["layers.3.attn.wq", "layers.3.mlp.w1"]),
    ("layers.*.*_norm",  # `*` inside a name
     [p for i in range(16) for p in (f"layers.{i}.attn_norm", f"layers.{i}.mlp_norm")]),
    ("layers[4:8]", _layers(range(4, 8))),
    ("layers[0:16:4].mlp", _layers([0, 4, 8, 12], ".mlp")),
    ("layers[12:]", _layers(range(12, 16))),
    ("layers[:2].attn", _layers([0, 1], ".attn")),
    ("layers[1::5]", _layers([1, 6, 11])),
    ("layers[0,2,4]", _layers([0, 2, 4])),
    ("layers[0:2,9]", _layers([0, 1, 9])),
    ("layers[ 3 , 5 ]", _layers([3, 5])),
    ("layers[14:99]", _layers([14, 15])),
    ("layers[99]", []),
    ("re:layers\\.1\\d\\.mlp", _layers(range(10, 16), ".mlp")),
    ("re:layers", ["layers"]),  # the regex must match the whole path
    ("re:(embed|lm_head)", ["embed", "lm_head"]),
])
def test_selector_matches_exactly_the_expected_llama_modules(text, expected):
    assert resolve(text, LLAMA) == expected


@pytest.mark.parametrize("text, expected", [
    ("model.layers.*.self_attn.{q,k,v}_proj",
     [f"model.layers.{i}.self_attn.{x}_proj" for i in range(4) for x in "qkv"]),
    ("model.layers[2:].mlp", _layers([2, 3], ".mlp", "model.layers")),
    ("**.mlp.*_proj",
     [f"model.layers.{i}.mlp.{x}_proj" for i in range(4) for x in ("gate", "up", "down")]),
    ("**.*layernorm",
     [f"model.layers.{i}.{x}" for i in range(4)
      for x in ("input_layernorm", "post_attention_layernorm")]),
    ("model.layers[-1].self_attn", ["model.layers.3.self_attn"]),
    ("*.norm", ["model.norm"]),
])
def test_selector_matches_hugging_face_module_names(text, expected):
    assert resolve(text, HF) == expected


def test_double_star_matches_every_module_and_the_root():
    assert resolve("**", LLAMA) == LLAMA
    assert Selector.parse("**").matches("")
    assert not Selector.parse("*").matches("")


def test_resolve_keeps_model_order_not_selector_order():
    assert resolve("{norm,embed}", LLAMA) == ["embed", "norm"]
    assert resolve("layers[5,1]", LLAMA) == _layers([1, 5])


@pytest.mark.parametrize("text, expected", [
    ("layers[-1]", [15]),
    ("layers[-2:]", [14, 15]),
    ("layers[:-14]", [0, 1]),
    ("layers[-4:-2]", [12, 13]),
    ("layers[0,-1]", [0, 15]),
    ("layers[::-1]", list(range(16))),
    ("layers[-1::-5]", [0, 5, 10, 15]),  # 15, 10, 5, 0 as a set
    ("layers[5::-2]", [1, 3, 5]),
    ("layers[-99]", []),
])
def test_negative_indices_count_from_the_end_of_the_models_list(text, expected):
    assert resolve(text, LLAMA) == _layers(expected)


def test_negative_indices_use_each_lists_own_length():
    names = ["a", "a.0", "a.1", "b", "b.0", "b.1", "b.2"]
    assert resolve("*[-1]", names) == ["a.1", "b.2"]
    assert list_lengths(names) == {"a": 2, "b": 3}


def test_list_lengths_reads_nested_and_hugging_face_lists():
    lengths = list_lengths(HF + ["blocks.0.experts.0", "blocks.0.experts.7"])
    assert lengths == {"model.layers": 4, "blocks": 1, "blocks.0.experts": 8}


def test_negative_index_without_a_model_raises_needs_a_model():
    sel = Selector.parse("layers[-2:].mlp")
    assert sel.needs_model
    with pytest.raises(SelectorError, match="needs a model") as info:
        sel.matches("layers.15.mlp")
    assert info.value.offset == len("layers")


def test_negative_index_with_list_lengths_matches_and_ignores_unknown_lists():
    sel = Selector.parse("layers[-2:].mlp")
    assert sel.matches("layers.15.mlp", list_lengths={"layers": 16})
    assert not sel.matches("layers.13.mlp", list_lengths={"layers": 16})
    assert not sel.matches("layers.15.mlp", list_lengths={"model.layers": 16})
    assert Selector.parse("model.layers[-1]").matches("model.layers.31", {"model.layers": 32})


def test_slices_match_only_canonical_decimal_indices():
    sel = Selector.parse("layers[0:16]")
    assert sel.matches("layers.7")
    assert not sel.matches("layers.07")
    assert not sel.matches("layers.x")
    assert not Selector.parse("layers[16:]").matches("layers.016")
    assert Selector.parse("layers[16:]").matches("layers.123456")


def test_a_literal_digit_segment_matches_like_an_index():
    assert resolve("layers.{1,3}", LLAMA) == resolve("layers[1,3]", LLAMA) == _layers([1, 3])


def test_selects_covers_the_module_and_its_descendants():
    sel = Selector.parse("layers.*")
    assert sel.selects("layers.3")
    assert sel.selects("layers.3.mlp.w1")
    assert not sel.selects("layers")
    assert not sel.selects("")
    assert not sel.selects("norm")
    assert Selector.parse("**").selects("")
    assert Selector.parse("re:layers\\.3").selects("layers.3.mlp")
    assert not Selector.parse("re:layers\\.3").selects("layers.33")
    assert Selector.parse("layers[-1]").selects("layers.15.attn.wq", {"layers": 16})


def test_selects_with_step_slices_checks_the_index_exactly():
    sel = Selector.parse("layers[1::2]")
    assert sel.selects("layers.11.mlp")
    assert not sel.selects("layers.10.mlp")
    assert not sel.selects("layers.1x.mlp")


# ------------------------------------------------------------------------------------
# Op suffixes


@pytest.mark.parametrize("text, path_text, op", [
    ("layers.*.mlp:linear", "layers.*.mlp", "linear"),
    ("**:norm", "**", "norm"),
    ("**:kv_cache", "**", "kv_cache"),
    ("layers[16:32]", "layers[16:32]", None),  # a colon inside brackets is a slice
    ("layers[16:32]:linear", "layers[16:32]", "linear"),
    ("layers[::2]:qk", "layers[::2]", "qk"),
    ("re:layers\\.\\d+:linear", "re:layers\\.\\d+", "linear"),
    ("re:(?:a|b)", "re:(?:a|b)", None),  # `:` inside a regex is no op suffix
    ("re:a:b", "re:a:b", None),  # only a final known op kind is an op suffix
])
def test_op_suffix_is_split_from_the_path(text, path_text, op):
    sel = Selector.parse(text)
    assert (sel.text, sel.path_text, sel.op) == (text, path_text, op)
    assert sel.is_regex == text.startswith("re:")


def test_op_suffix_does_not_change_which_modules_match():
    assert resolve("layers.*.mlp:linear", LLAMA) == resolve("layers.*.mlp", LLAMA)


def test_every_op_kind_is_accepted_as_a_suffix():
    for op in OP_KINDS:
        assert Selector.parse(f"**:{op}").op == op


# ------------------------------------------------------------------------------------
# Errors, each at its offset


@pytest.mark.parametrize("text, offset, length, message", [
    ("", 0, 0, "empty selector"),
    (":linear", 0, 1, "empty path"),
    ("layers..mlp", 7, 1, "empty segment"),
    (".layers", 0, 1, "empty segment"),
    ("layers.", 6, 1, "empty segment"),
    ("layers.*.attn.{wq,wk", 14, 1, "unclosed '{'"),
    ("layers.wq}", 9, 1, "'}' without"),
    ("layers[0:4", 6, 1, "unclosed '['"),
    ("layers]", 6, 1, "']' without"),
    ("a{b{c}}", 3, 1, "inside braces"),
    ("layers[a:b]", 7, 1, "'a' is not an integer"),
    ("layers[0:x]", 9, 1, "'x' is not an integer"),
    ("layers[1.5]", 7, 3, "not an integer"),
    ("layers[0:4:0]", 11, 1, "step cannot be zero"),
    ("layers[3:1]", 7, 3, "selects nothing"),
    ("layers[4:4]", 7, 3, "selects nothing"),
    ("layers[-1:-3]", 7, 5, "selects nothing"),
    ("layers[1:3:-1]", 7, 6, "selects nothing"),
    ("layers[1:2:3:4]", 7, 7, "at most three parts"),
    ("layers[]", 6, 2, "empty brackets"),
    ("layers[0,,2]", 9, 1, "empty index"),
    ("layers.[0:2]", 7, 5, "needs the list's name"),
    ("layers[0]x", 9, 1, "text after ']'"),
    ("re:layers(\\d", 9, 1, "invalid regular expression"),
    ("re:layers\\.[0-9", 11, 1, "invalid regular expression"),
    ("re:", 2, 1, "empty regular expression"),
    ("layers.*:lnear", 9, 5, "unknown op kind 'lnear'"),
    ("**:", 2, 1, "empty op suffix"),
    ("a:b:linear", 1, 1, "unexpected ':'"),
    ("a**b", 1, 2, "'**' must be a whole segment"),
    ("layers.**x", 7, 2, "'**' must be a whole segment"),
    ("***", 0, 2, "'**' must be a whole segment"),
    ("layers.{a.b,c}", 9, 1, "cannot hold '.'"),
    ("layers.{}", 7, 2, "empty braces"),
    ("layers.{,}", 7, 3, "empty alternative"),
    ("layers.{a,*}", 10, 1, "'*' inside braces"),
    ("layers .mlp", 6, 1, "whitespace"),
    ("a,b", 1, 1, "',' outside braces"),
    ("w?", 1, 1, "'?' is not selector syntax"),
])
def test_bad_selector_is_reported_at_its_offset(text, offset, length, message):
    with pytest.raises(SelectorError) as info:
        Selector.parse(text)
    err = info.value
    assert message in err.message
    assert (err.offset, err.length) == (offset, length)
    assert err.text == text
    assert str(err) == err.message


def test_unknown_op_suffix_suggests_the_closest_op_kind():
    with pytest.raises(SelectorError) as info:
        Selector.parse("**:nrom")
    assert "did you mean 'norm'" in info.value.hint


def test_unknown_op_suffix_far_from_any_kind_lists_the_kinds():
    with pytest.raises(SelectorError) as info:
        Selector.parse("**:zzzzzz")
    assert "linear" in info.value.hint and "kv_cache" in info.value.hint


def test_empty_slice_hint_shows_the_slice_that_was_probably_meant():
    with pytest.raises(SelectorError) as info:
        Selector.parse("layers[32:16]")
    assert "[16:32]" in info.value.hint


def test_invalid_regex_offset_points_into_the_pattern():
    text = "re:layers\\.(?P<x>\\d+\\.mlp"
    with pytest.raises(SelectorError) as info:
        Selector.parse(text)
    assert text[info.value.offset] == "("


def test_a_selector_that_is_not_text_is_an_error():
    with pytest.raises(SelectorError, match="is text"):
        Selector.parse(3)


def test_selectors_survive_copy_and_pickle():
    sel = Selector.parse("layers.**.mlp[1::2]:linear")
    for other in (copy.deepcopy(sel), pickle.loads(pickle.dumps(sel))):
        assert other == sel and other.op == "linear"
        assert other.matches("layers.0.mlp.3") and not other.matches("layers.0.mlp.2")
        assert covers(other, "layers.mlp[3]:linear") is True


def test_parse_is_cached_and_selectors_compare_by_text():
    assert Selector.parse("layers.*.mlp") is Selector.parse("layers.*.mlp")
    assert Selector.parse("**") == Selector.parse("**")
    assert len({Selector.parse("**"), Selector.parse("**"), Selector.parse("*")}) == 2


# ------------------------------------------------------------------------------------
# covers(later, earlier) and overlaps(a, b)


@pytest.mark.parametrize("later, earlier, expected", [
    ("**", "layers.*", True),
    ("layers.*", "**", False),
    ("layers.*", "layers.*", True),
    ("layers.*", "layers.3.mlp", True),  # descendants are covered
    ("layers.*", "layers", False),
    ("layers.3.mlp", "layers.*", False),
    ("layers[0:16]", "layers[0:8]", True),
    ("layers[0:8]", "layers[0:16]", False),
    ("layers[0:4:2]", "layers[0,2]", True),
    ("layers[0,2]", "layers[0:4:2]", True),
    ("layers[0,2]", "layers[0:4]", False),
    ("layers[16:]", "layers[16:32]", True),
    ("layers[16:32]", "layers[16:]", False),
    ("layers[0::2]", "layers[0::4]", True),
    ("layers[0::4]", "layers[0::2]", False),
    ("layers[1::2]", "layers[3::4]", True),
    ("layers.*", "layers[4:8]", True),
    ("layers[0:100]", "layers.*", False),
    ("layers.{0,1}", "layers[0:2]", True),
    ("*", "{a,b}", True),
    ("{a,b}", "*", False),
    ("{a,b,c}", "{a,b}", True),
    ("**.wq", "layers.*.attn.wq", True),
    ("layers.*.attn.wq", "**.wq", False),
    ("**.attn", "layers.*.attn.wq", True),
    ("*.*.attn", "layers.*.attn", True),
    ("layers.**", "layers.*", True),
    ("layers.*", "layers.**", False),  # layers.** also takes `layers` itself
    ("**.**", "**", True),
    # op suffixes: no op takes every op; the same op; different ops never
    ("layers.*", "layers.*.mlp:linear", True),
    ("**:linear", "layers.*.mlp:linear", True),
    ("layers.*.mlp:linear", "layers.*.mlp", False),
    ("**:norm", "layers.*:linear", False),
    # undecidable without a model
    ("re:layers\\..*", "layers.*", None),
    ("layers.*", "re:layers\\.\\d+", None),
    ("layers[0:8]", "layers[-4:]", None),
    ("layers[-4:]", "layers[12:]", None),
    # ... unless the answer holds for every model all the same
    ("**", "re:layers\\.\\d+", True),
    ("**", "layers[-1]", True),
    ("layers.*.mlp", "layers[0,-1].attn", False),
    ("layers.*.mlp", "layers[-1].attn", None),  # an empty list would make it vacuously true
    ("layers.*.attn", "layers.*.attn.w*", True),
    ("layers.*.attn.w*", "layers.*.attn.wq", None),
    ("**:linear", "re:x", False),
    # the uncovered place may lie deeper than either selector is long
    ("*.a", "**.a.a[0:2]", False),  # c.c.a.a.0
    ("*.a", "**.*.a.a[0:2]", False),  # c.c.a.a.0 again
    ("*.a", "a.**.a.a[0:2]", False),  # a.c.a.a.0
    ("*.a", "{a,b}.a.**.a[0:2]", True),
])
def test_covers_truth_table(later, earlier, expected):
    assert covers(later, earlier) is expected


@pytest.mark.parametrize("a, b, expected", [
    ("**", "layers.*", True),
    ("layers.*", "norm", False),
    ("layers.*", "layers.3.mlp", True),
    ("layers.3", "layers.*.mlp", True),  # layers.3.mlp is in both
    ("layers.*.attn", "layers.*.mlp", False),
    ("layers[0:8]", "layers[8:16]", False),
    ("layers[0:9]", "layers[8:16]", True),
    ("layers[0::2]", "layers[1::2]", False),
    ("layers[0::2]", "layers[3::3]", True),  # 6
    ("layers[0,2]", "layers[1:2]", False),
    ("{a,b}", "*", True),
    ("{a,b}", "{c,d}", False),
    ("**.wq", "layers.*.attn", True),
    ("layers.*:linear", "layers.*:norm", False),
    ("layers.*:linear", "**", True),
    ("layers.*.mlp:linear", "layers.3:linear", True),
    ("re:layers\\.3", "layers.*", None),
    ("layers[-1]", "layers[0]", None),
    ("layers[-1]", "norm", False),
    ("layers[0,-1]", "layers[0]", True),
    ("layers.*.attn.w*", "layers.*", True),
    ("layers.*.attn.w*", "layers.*.mlp", False),
    ("layers.*.attn.w*", "layers.*.attn.wq", None),
    # a common place may lie below where both selectors end
    ("a.a[0:2]", "**.b[1,3]", True),  # a.a.0.b.1
    ("a.b.c.d", "**.w.x.y.z", True),  # a.b.c.d.w.x.y.z
    ("a.b.c.d", "b.**.z", False),
])
def test_overlaps_truth_table(a, b, expected):
    assert overlaps(a, b) is expected
    assert overlaps(b, a) is expected


def test_overlaps_finds_a_common_place_deeper_than_either_selector():
    # `a.a[0:2]` takes a.a.0 and all below it; `**.b[1,3]` takes a.a.0.b.1 itself.
    a, b = Selector.parse("a.a[0:2]"), Selector.parse("**.b[1,3]")
    assert a.selects("a.a.0.b.1") and b.selects("a.a.0.b.1")
    assert not any(a.selects(p) and b.selects(p)
                   for p in ("a.a.0", "a.a.0.b", "a.a.1.b", "b.1", "a.b.1", "a.a.b.1"))
    assert overlaps(a, b) is True and overlaps(b, a) is True
    assert covers(a, b) is False and covers(b, a) is False


def test_covers_and_overlaps_accept_parsed_selectors():
    assert covers(Selector.parse("**"), Selector.parse("layers.*")) is True
    assert overlaps(Selector.parse("norm"), "embed") is False


def test_covers_checks_huge_and_periodic_slices_without_enumerating_them():
    assert covers("layers[0:1000000000]", "layers[999999990:]") is False
    assert covers("layers[::6]", "layers[0::2]") is False
    assert covers("layers[0::2]", "layers[::6]") is True
    assert overlaps("layers[1::6]", "layers[4::9]") is True  # 13
    assert overlaps("layers[0::6]", "layers[4::9]") is False  # 4 + 9j is never even and 0 mod 3


# ------------------------------------------------------------------------------------
# Lint help


@pytest.mark.parametrize("text, offsets", [
    ("re:layers.1.mlp", [9]),
    ("re:layers\\.1\\.mlp", []),
    ("re:layers[.1]\\.2", []),  # inside a character class `.` is a plain dot
    ("re:a[].]x.5", [9]),  # `]` right after `[` is a member of the class
    ("re:layers\\d.2", [11]),
    ("layers.1.mlp", []),  # not a regex
])
def test_regex_dot_before_digit_finds_the_unescaped_dots(text, offsets):
    assert regex_dot_before_digit(text) == offsets
    for offset in offsets:
        assert text[offset] == "." and text[offset + 1].isdigit()


# ------------------------------------------------------------------------------------
# Speed


def test_parse_and_match_ten_thousand_paths_is_fast():
    names = (["", "model", "model.layers"] +
             [f"model.layers.{i}.{s}" for i in range(1000) for s in
              ("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
               "self_attn.o_proj", "mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
               "input_layernorm")])[:10_000]
    texts = ["**.mlp", "model.layers.*.self_attn.{q,k,v}_proj", "model.layers[16:]",
             "model.layers[0:500:3].mlp"]
    best = float("inf")
    for attempt in range(3):  # best of three, so a busy machine does not fail the test
        _drop_parse_cache()
        start = time.perf_counter()
        for text in texts:
            sel = Selector.parse(text)
            found = [n for n in names if sel.matches(n)]
        best = min(best, (time.perf_counter() - start) / len(texts))
    assert len(found) == 167
    assert best < 0.05, f"{best * 1e3:.1f} ms per selector over 10k paths"


def _drop_parse_cache():
    from planlang import selectors
    selectors._parse_cached.cache_clear()


# ------------------------------------------------------------------------------------
# Properties over random glob selectors, checked against references
#
# Each random segment comes with a reference predicate, so matching is checked against an
# independent, obviously correct matcher, and covers/overlaps against an exhaustive search
# over paths (at any depth: a common or uncovered place may lie deeper than either
# selector is long, as `a.a[0:2]` and `**.b[1,3]` share only `a.a.0.b.1` and below).

NAMES = ("a", "b", "c")
INDICES = ("0", "1", "2", "3", "5")
UNIVERSE = [".".join(p) for n in range(5) for p in itertools.product(NAMES + INDICES, repeat=n)]
# One segment per class that the predicates of SEGMENTS tell apart: any other name acts
# as "c", and any index from 8 up as "8" or "9" (by parity).
CLASSES = NAMES + tuple(str(k) for k in range(10))
OPS = ("linear", "norm", "qk")  # stand-ins: a rule without an op takes all of them
# PLANLANG_SELECTOR_EXAMPLES=3000 searches harder (minutes); the default keeps the file fast.
PROPERTY_EXAMPLES = int(os.environ.get("PLANLANG_SELECTOR_EXAMPLES", "120"))


def _is_index(seg: str) -> bool:
    return re.fullmatch(r"0|[1-9][0-9]*", seg) is not None


def _in_slice(seg: str, start: int, stop: int | None, step: int) -> bool:
    if not _is_index(seg):
        return False
    k = int(seg)
    return k >= start and (stop is None or k < stop) and (k - start) % step == 0


SEGMENTS = [  # (text, [reference predicate per segment, or "**"])
    ("a", [lambda s: s == "a"]),
    ("b", [lambda s: s == "b"]),
    ("1", [lambda s: s == "1"]),
    ("*", [lambda s: True]),
    ("**", ["**"]),
    ("{a,b}", [lambda s: s in ("a", "b")]),
    ("{b,2}", [lambda s: s in ("b", "2")]),
    ("a[0:2]", [lambda s: s == "a", lambda s: _in_slice(s, 0, 2, 1)]),
    ("a[1:]", [lambda s: s == "a", lambda s: _in_slice(s, 1, None, 1)]),
    ("a[::2]", [lambda s: s == "a", lambda s: _in_slice(s, 0, None, 2)]),
    ("*[1::2]", [lambda s: True, lambda s: _in_slice(s, 1, None, 2)]),
    ("b[1,3]", [lambda s: s == "b", lambda s: s in ("1", "3")]),
    ("b[4:]", [lambda s: s == "b", lambda s: _in_slice(s, 4, None, 1)]),
    ("a[3:8:2]", [lambda s: s == "a", lambda s: _in_slice(s, 3, 8, 2)]),
]


def _glob(text: str) -> tuple[str, tuple, str | None]:
    """The strategy's value for a selector written with SEGMENTS, for explicit examples."""
    path, _, op = text.rpartition(":")
    if op not in OPS:  # the colon of a slice
        path, op = text, None
    table = dict(SEGMENTS)
    return text, tuple(p for seg in path.split(".") for p in table[seg]), op


@st.composite
def glob_selectors(draw):
    parts = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3)
                 .filter(lambda ps: sum(len(p) for _, p in ps) <= 4))
    op = draw(st.sampled_from((None,) + OPS))
    text = ".".join(t for t, _ in parts) + (f":{op}" if op else "")
    preds = [p for _, ps in parts for p in ps]
    return text, tuple(preds), op


def _reference_matches(preds, segs, i: int = 0, k: int = 0) -> bool:
    """Plain backtracking: does preds[i:] match segs[k:]?"""
    if i == len(preds):
        return k == len(segs)
    if preds[i] == "**":
        return _reference_matches(preds, segs, i + 1, k) or (
            k < len(segs) and _reference_matches(preds, segs, i, k + 1))
    return k < len(segs) and preds[i](segs[k]) and _reference_matches(preds, segs, i + 1, k + 1)


def _reference_selects(preds, segs) -> bool:
    """A rule takes a path when it matches the path or one of its ancestors."""
    return any(_reference_matches(preds, segs[:k]) for k in range(len(segs) + 1))


def _state(preds, segs) -> tuple[frozenset[int], bool]:
    """All that decides, for every extension of the path, whether the rule takes it: which
    prefixes of `preds` match the path (each pattern takes whole segments, so `preds`
    match path + rest iff some prefix matches the path and the remainder the rest), and
    whether the rule takes the path already."""
    matched = frozenset(i for i in range(len(preds) + 1) if _reference_matches(preds[:i], segs))
    return matched, _reference_selects(preds, segs)


def _some_path(a_preds, b_preds, goal) -> bool:
    """Whether some path makes `goal(a takes it, b takes it)` true. Breadth first over
    paths of CLASSES; a path that leaves both rules in a state an earlier path did has
    the same answers for all its extensions, so it is dropped, and the search ends."""
    seen: set = set()
    frontier: list[list[str]] = [[]]
    while frontier:
        grown = []
        for segs in frontier:
            key = (_state(a_preds, segs), _state(b_preds, segs))
            if key in seen:
                continue
            seen.add(key)
            if goal(key[0][1], key[1][1]):
                return True
            grown.extend(segs + [c] for c in CLASSES)
        frontier = grown
    return False


def _ops(op: str | None) -> set[str]:
    return set(OPS) if op is None else {op}


def _reference_covers(later, earlier) -> bool:
    """Every (path, op) the earlier rule takes, the later one takes too."""
    return _ops(earlier[2]) <= _ops(later[2]) and not _some_path(
        earlier[1], later[1], lambda in_earlier, in_later: in_earlier and not in_later)


def _reference_overlaps(a, b) -> bool:
    """Some (path, op) is taken by both rules."""
    return bool(_ops(a[2]) & _ops(b[2])) and _some_path(
        a[1], b[1], lambda in_a, in_b: in_a and in_b)


PROPERTY_SETTINGS = settings(max_examples=PROPERTY_EXAMPLES, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(glob_selectors())
def test_matching_agrees_with_a_reference_matcher(selector):
    text, preds, _ = selector
    sel = Selector.parse(text)
    selected: dict[str, bool] = {}
    for path in UNIVERSE:  # parents come before their children
        expected = _reference_matches(preds, path.split(".") if path else [])
        assert sel.matches(path) == expected, path
        parent = path.rpartition(".")[0] if path else None
        selected[path] = expected or (parent is not None and selected[parent])
        assert sel.selects(path) == selected[path], path


@PROPERTY_SETTINGS
@given(glob_selectors(), glob_selectors())
@example(later=_glob("*.a"), earlier=_glob("**.a.a[0:2]"))  # uncovered: c.c.a.a.0
def test_covers_is_exact(later, earlier):
    result = covers(Selector.parse(later[0]), Selector.parse(earlier[0]))
    assert result is not None
    assert result == _reference_covers(later, earlier)


@PROPERTY_SETTINGS
@given(glob_selectors(), glob_selectors())
@example(a=_glob("a.a[0:2]"), b=_glob("**.b[1,3]"))  # shared from a.a.0.b.1 down
@example(a=_glob("a.a.b[1,3]"), b=_glob("**.a[0:2].*"))  # shared from a.a.b.1.a.0.c down
def test_overlaps_is_exact(a, b):
    a_sel, b_sel = Selector.parse(a[0]), Selector.parse(b[0])
    result = overlaps(a_sel, b_sel)
    assert result is not None
    assert result == _reference_overlaps(a, b)
    assert overlaps(b_sel, a_sel) == result


def test_outline_pictures_a_module_tree_for_hints():
    from planlang.selectors import outline
    names = ["", "embed", "layers", *[f"layers.{i}{s}" for i in range(16) for s in ("", ".attn", ".attn.q", ".mlp")],
             "norm", "lm_head"]
    assert outline(names) == "embed, layers[0..15], norm, lm_head; layers.0: attn, mlp"
    assert outline(["", "a", "b"]) == "a, b"
    assert outline([""]) == ""
