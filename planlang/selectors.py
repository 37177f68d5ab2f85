"""Selectors: the names a plan uses for places in a model (PLAN_SPEC.md §3).

A selector is matched against the dotted module paths that `model.named_modules()` yields
(the root module is the empty path ""). Grammar, by example:

    layers.*.mlp          `*` is one segment          **            zero or more segments
    layers.*.attn.w{q,k}  `{a,b}` alternatives        layers[16:32] layers.16 … layers.31
    layers[0,2,4]         a list of indices           layers[-4:]   counts from the end
    layers.*.mlp:linear   an op suffix                re:layers\\.\\d+\\.mlp   whole-path regex

Besides matching, this module decides, without a model, whether a later rule's selector
covers an earlier one's and whether two selectors can select a common place. Both are
exact language-inclusion checks over segment sequences (see `_Alphabet`); they answer
None only where the selectors alone cannot tell (`re:`, negative indices, `*` inside a
name like `w*`).

Pure Python: this module never imports torch.
"""
from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

from planlang.names import OP_KINDS

__all__ = [
    "Selector",
    "SelectorError",
    "covers",
    "list_lengths",
    "overlaps",
    "regex_dot_before_digit",
    "resolve",
]

# Bounds that keep every operation fast on hostile input: above them a slice is checked
# numerically after a regex pre-filter, brace expansion is refused, and covers/overlaps
# answer None rather than take unbounded time or memory.
_MAX_REGEX_INTS = 512
_MAX_EXPANSIONS = 4096
_MAX_INT_WITNESSES = 100_000

_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
# Characters with a meaning in the selector grammar, or that a user might expect to be glob
# syntax; none may appear inside a plain name.
_SPECIAL = set(".{}[],*:?")


class SelectorError(Exception):
    """A selector that cannot be parsed or used.

    `offset` is the 0-based character offset of the offending part inside the selector
    text, `length` its width (at least 1 unless the selector is empty), `hint` one line
    saying what to write instead (or None).
    """

    def __init__(self, message: str, offset: int = 0, length: int = 1,
                 hint: str | None = None, text: str | None = None):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.length = length
        self.hint = hint
        self.text = text

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------
# Segment patterns ("atoms") and the integer sets of slices and index lists


@dataclass(frozen=True)
class _IndexItem:
    """One item of `name[...]`: a single index (`stop` unused) or a slice."""

    is_slice: bool
    start: int | None
    stop: int | None = None
    step: int | None = None

    @functools.cached_property
    def needs_model(self) -> bool:
        # Negative numbers count from the end of the list, and a negative step starts at
        # its end when the start is left out or lies past it: all need the list's length.
        values = (self.start, self.stop, self.step) if self.is_slice else (self.start,)
        return any(v is not None and v < 0 for v in values)

    def contains(self, k: int, length: int | None) -> bool:
        """Whether index `k` is taken; `length` is needed only when `needs_model`."""
        if self.needs_model:
            if length is None:
                return False
            if not self.is_slice:
                return self.start + length == k if self.start < 0 else self.start == k
            return k in range(*slice(self.start, self.stop, self.step).indices(length))
        if not self.is_slice:
            return k == self.start
        start, step = self.start or 0, self.step or 1
        return k >= start and (self.stop is None or k < self.stop) and (k - start) % step == 0


@dataclass(frozen=True)
class _IntSet:
    """The indices a bracket selects, a union of its items."""

    items: tuple[_IndexItem, ...]

    @functools.cached_property
    def needs_model(self) -> bool:
        return any(item.needs_model for item in self.items)

    def contains(self, k: int, length: int | None = None) -> bool:
        return any(item.contains(k, length) for item in self.items)

    def finite_members(self) -> list[int] | None:
        """The members, when static and at most `_MAX_REGEX_INTS` of them; else None."""
        if self.needs_model:
            return None
        members: set[int] = set()
        for item in self.items:
            if not item.is_slice:
                members.add(item.start)
                continue
            if item.stop is None:
                return None
            span = range(item.start or 0, item.stop, item.step or 1)
            if len(members) + len(span) > _MAX_REGEX_INTS:
                return None
            members.update(span)
        return sorted(members)

    def static_part(self) -> "_IntSet":
        return _IntSet(tuple(item for item in self.items if not item.needs_model))


class _Star2:
    """`**`: zero or more segments."""

    def __repr__(self) -> str:
        return "**"

    def __reduce__(self) -> str:
        return "STAR2"  # copies and unpickling give back the one instance `is` tests against


STAR2 = _Star2()


@dataclass(frozen=True)
class _Atom:
    """A pattern for exactly one segment.

    kind: "any" (`*`), "lits" (a finite set of names), "ints" (indices from a bracket),
    "glob" (a name with `*` inside, like `w*`), "none" (matches nothing; used only when
    under-approximating).
    """

    kind: str
    lits: frozenset[str] = frozenset()
    ints: _IntSet | None = None
    glob: re.Pattern | None = None
    glob_floor: frozenset[str] = frozenset()  # names the glob surely matches (`*` as "")
    offset: int = 0  # where the atom was written, for "needs a model" errors

    def matches(self, segment: str, length: int | None = None) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "lits":
            return segment in self.lits
        if self.kind == "ints":
            return (_CANONICAL_INT.fullmatch(segment) is not None
                    and self.ints.contains(int(segment), length))
        if self.kind == "glob":
            return self.glob.fullmatch(segment) is not None
        return False

    def regex(self) -> tuple[str, bool]:
        """A regex for `.segment`, and whether a match must be confirmed exactly."""
        if self.kind == "any":
            return r"\.[^.]+", False
        if self.kind == "lits":
            return r"\.(?:" + "|".join(map(re.escape, sorted(self.lits))) + ")", False
        if self.kind == "glob":
            return r"\." + self.glob.pattern, False
        if self.kind == "ints":
            exact = _int_set_regex(self.ints)
            if exact is not None:
                return r"\.(?:" + exact + ")", False
            return r"\.(?:0|[1-9][0-9]*)", True
        return r"(?!)", False


def _int_set_regex(ints: _IntSet) -> str | None:
    """An exact regex for the decimal names of a static index set, where one is simple:
    a short finite set, or open-ended slices with step 1. None otherwise."""
    members = ints.finite_members()
    if members is not None:
        return "|".join(map(str, members))
    if ints.needs_model:
        return None
    pieces = []
    for item in ints.items:
        if not item.is_slice:
            pieces.append(str(item.start))
        elif item.stop is None and (item.step or 1) == 1:
            pieces.append(_at_least_regex(item.start or 0))
        else:
            return None
    return "|".join(pieces)


def _at_least_regex(low: int) -> str:
    """A regex for the canonical decimal names of the integers >= `low`."""
    digits = str(low)
    n = len(digits)
    alternatives = [digits, f"[1-9][0-9]{{{n},}}"]  # `low` itself, or more digits
    for i, d in enumerate(digits):  # same length: equal up to i, greater at i
        if d != "9":
            alternatives.append(f"{digits[:i]}[{int(d) + 1}-9]" + "[0-9]" * (n - i - 1))
    return "|".join(alternatives)


_ANY = _Atom("any")
_NONE = _Atom("none")
_ALL_INTS = _Atom("ints", ints=_IntSet((_IndexItem(True, 0, None, 1),)))

Token = Union[_Star2, _Atom]


# --------------------------------------------------------------------------------------
# Parsing


def _error(message: str, offset: int, length: int = 1, hint: str | None = None) -> SelectorError:
    return SelectorError(message, offset, max(length, 0), hint)


def _split_op(text: str) -> tuple[str, str | None, int]:
    """Split `path:op`; returns the path text, the op (or None) and the op's offset.

    For plain selectors the op is after the last `:` outside brackets and braces; for
    `re:` selectors only a final `:<known op kind>` counts, since a regex may hold `:`.
    """
    if text.startswith("re:"):
        m = re.search(r":([A-Za-z_]+)\Z", text)
        if m and m.start() > 3 and m.group(1) in OP_KINDS:
            return text[:m.start()], m.group(1), m.start(1)
        return text, None, -1
    depth, colon = 0, -1
    for i, ch in enumerate(text):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth = max(depth - 1, 0)
        elif ch == ":" and depth == 0:
            colon = i
    if colon < 0:
        return text, None, -1
    return text[:colon], text[colon + 1:], colon + 1


def _check_op(op: str, offset: int) -> None:
    if op in OP_KINDS:
        return
    if not op:
        raise _error("empty op suffix after ':'", offset - 1, 1,
                     hint="write an op kind after ':' (" + ", ".join(OP_KINDS)
                          + "), or drop the ':'")
    if ":" in op:
        bad = op.index(":")
        raise _error("unexpected ':' in selector", offset + bad, 1,
                     hint="only one op suffix is allowed, at the end: PATH:OP")
    import difflib  # only a misspelt op kind gets here
    close = difflib.get_close_matches(op, OP_KINDS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "op kinds are " + ", ".join(OP_KINDS)
    raise _error(f"unknown op kind '{op}' in selector suffix", offset, len(op), hint=hint)


def _split_segments(text: str) -> list[tuple[str, int]]:
    """Split on `.` outside braces and brackets, checking that they balance and don't nest."""
    segments, start = [], 0
    brace, bracket = -1, -1  # offset of the open `{` / `[`, or -1
    for i, ch in enumerate(text):
        if ch == "{":
            if brace >= 0 or bracket >= 0:
                raise _error("'{' inside braces or brackets", i, 1,
                             hint="alternatives do not nest: write {a,b,c}")
            brace = i
        elif ch == "}":
            if brace < 0:
                raise _error("'}' without a matching '{'", i, 1)
            brace = -1
        elif ch == "[":
            if brace >= 0 or bracket >= 0:
                raise _error("'[' inside braces or brackets", i, 1,
                             hint="write name[16:32] or name[0,2,4]")
            bracket = i
        elif ch == "]":
            if bracket < 0:
                raise _error("']' without a matching '['", i, 1)
            bracket = -1
        elif ch == "." and brace < 0 and bracket < 0:
            segments.append((text[start:i], start))
            start = i + 1
    if brace >= 0:
        raise _error("unclosed '{'", brace, 1, hint="close the alternatives with '}'")
    if bracket >= 0:
        raise _error("unclosed '['", bracket, 1, hint="close the index with ']'")
    segments.append((text[start:], start))
    return segments


def _parse_int(text: str, offset: int) -> int | None:
    """An integer, or None for an empty (left out) slice bound."""
    stripped = text.strip()
    if not stripped:
        return None
    if not _INT_TEXT.fullmatch(stripped):
        raise _error(f"'{stripped}' is not an integer", offset + text.index(stripped[0]),
                     len(stripped), hint="indices and slice bounds are integers: name[16:32]")
    return int(stripped)


def _parse_index_item(item: str, offset: int) -> _IndexItem:
    if not item.strip():
        raise _error("empty index", offset, max(len(item), 1),
                     hint="write an index or a slice: name[0,2,4] or name[16:32]")
    if ":" not in item:
        return _IndexItem(False, _parse_int(item, offset))
    parts = item.split(":")
    if len(parts) > 3:
        raise _error("a slice has at most three parts, start:stop:step", offset, len(item))
    bounds, at = [], offset
    for part in parts:
        bounds.append(_parse_int(part, at))
        at += len(part) + 1
    start, stop = bounds[0], bounds[1]
    step = bounds[2] if len(bounds) == 3 else None
    if step == 0:
        step_at = offset + len(parts[0]) + len(parts[1]) + 2
        raise _error("slice step cannot be zero", step_at, len(parts[2]),
                     hint="leave the step out for every index, or write 2 for every other one")
    _check_not_empty(start, stop, step, item, offset)
    return _IndexItem(True, start, stop, step)


def _check_not_empty(start: int | None, stop: int | None, step: int | None,
                     item: str, offset: int) -> None:
    """Refuse a slice that selects nothing in every model (`[3:1]`, `[4:4]`, `[-1:-3]`)."""
    if start is None or stop is None or (start < 0) != (stop < 0):
        return  # open ends, or a sign mix: the answer depends on the list's length
    forward = step is None or step > 0
    if (forward and start < stop) or (not forward and start > stop):
        return
    if forward:
        hint = (f"slices stop before their end index, as in Python: write [{start}:{start + 1}] "
                f"or [{start}] for index {start}" if start == stop else
                f"slices count up, as in Python: write [{stop}:{start}] or [{stop}:{start + 1}]")
    else:
        hint = "a negative step counts down: the start must be above the stop"
    raise _error(f"slice [{item.strip()}] selects nothing", offset, len(item), hint=hint)


def _parse_index(text: str, offset: int) -> _IntSet:
    """The inside of `[...]`: comma-separated indices and slices."""
    if not text.strip():
        raise _error("empty brackets", offset - 1, 2,
                     hint="write an index or a slice: name[0,2,4] or name[16:32]")
    items, at = [], offset
    for item in text.split(","):
        items.append(_parse_index_item(item, at))
        at += len(item) + 1
    return _IntSet(tuple(items))


def _parse_body(body: str, offset: int) -> _Atom:
    """A segment's name part: plain text, `{a,b}` alternatives and `*` wildcards."""
    parts: list[object] = []  # str: literal text; list[str]: alternatives; None: a `*`
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "*":
            parts.append(None)
            i += 1
        elif ch == "{":
            close = body.index("}", i)
            parts.append(_parse_alternatives(body[i + 1:close], offset + i + 1))
            i = close + 1
        else:
            j = i
            while j < len(body) and body[j] not in "*{":
                _check_name_char(body[j], offset + j)
                j += 1
            parts.append(body[i:j])
            i = j
    if parts == [None]:
        return _ANY
    if any(part is None for part in parts):
        return _glob_atom(parts, offset, len(body))
    return _literal_atom(parts, offset, len(body))


def _check_name_char(ch: str, offset: int) -> None:
    if ch.isspace():
        raise _error("whitespace in selector", offset, 1,
                     hint="module names hold no spaces; remove it")
    if ch == ",":
        raise _error("',' outside braces", offset, 1, hint="write alternatives as {a,b}")
    if ch == "?":
        raise _error("'?' is not selector syntax", offset, 1,
                     hint="use {a,b} alternatives, `*` for a whole segment, or re:")
    if ch in _SPECIAL:
        raise _error(f"unexpected '{ch}' in selector", offset, 1)


def _parse_alternatives(inner: str, offset: int) -> list[str]:
    if not inner:
        raise _error("empty braces", offset - 1, 2, hint="write alternatives as {a,b}")
    alternatives, at = [], offset
    for alt in inner.split(","):
        for j, ch in enumerate(alt):
            if ch == ".":
                raise _error("alternatives cannot hold '.'", at + j, 1,
                             hint="braces choose inside one segment: write a.{b,c}, "
                                  "or one rule per path, or re:")
            if ch == "*":
                raise _error("'*' inside braces", at + j, 1,
                             hint="write * outside the braces; it matches any name")
            _check_name_char(ch, at + j)
        alternatives.append(alt)
        at += len(alt) + 1
    return alternatives


def _expand(parts: list[object], offset: int, length: int) -> frozenset[str]:
    """Every name the parts spell, with each `*` taken as empty."""
    choices = [[""] if p is None else [p] if isinstance(p, str) else p for p in parts]
    if math.prod(len(c) for c in choices) > _MAX_EXPANSIONS:
        raise _error("too many alternatives in one segment", offset, length,
                     hint="use `*` or re: instead")
    return frozenset("".join(combo) for combo in itertools.product(*choices))


def _literal_atom(parts: list[object], offset: int, length: int) -> _Atom:
    names = _expand(parts, offset, length)
    if "" in names:
        raise _error("an empty alternative leaves the segment empty", offset, length,
                     hint="every alternative must name something: {a,b}")
    return _Atom("lits", lits=names)


def _glob_atom(parts: list[object], offset: int, length: int) -> _Atom:
    pieces = []
    for part in parts:
        if part is None:
            pieces.append("[^.]*")
        elif isinstance(part, str):
            pieces.append(re.escape(part))
        else:
            pieces.append("(?:" + "|".join(map(re.escape, part)) + ")")
    # Segments are never empty, so "" is no name the glob surely matches.
    floor = _expand(parts, offset, length) - {""}
    return _Atom("glob", glob=re.compile("".join(pieces)), glob_floor=floor)


def _parse_segment(seg: str, offset: int) -> list[Token]:
    if seg == "**":
        return [STAR2]
    if "**" in seg:
        at = seg.index("**")
        raise _error("'**' must be a whole segment", offset + at, 2,
                     hint="write a.**.b (zero or more segments), or * inside a name")
    bracket = seg.find("[")
    if bracket < 0:
        return [_parse_body(seg, offset)]
    close = seg.index("]", bracket)
    if bracket == 0:
        raise _error("an index needs the list's name before it", offset, close + 1,
                     hint="write layers[16:32], not layers.[16:32]")
    if close != len(seg) - 1:
        raise _error("text after ']'", offset + close + 1, len(seg) - close - 1,
                     hint="an index ends its segment: write layers[0].mlp")
    ints = _parse_index(seg[bracket + 1:close], offset + bracket + 1)
    return [_parse_body(seg[:bracket], offset), _Atom("ints", ints=ints, offset=offset + bracket)]


def _parse_path(text: str) -> tuple[Token, ...]:
    tokens: list[Token] = []
    for seg, offset in _split_segments(text):
        if not seg:
            at = offset if offset < len(text) and text[offset] == "." else max(offset - 1, 0)
            raise _error("empty segment", at, 1,
                         hint="segments are separated by one '.'; `**` matches any number of them")
        for tok in _parse_segment(seg, offset):
            # `**.**` means `**`; keeping both would let the regex backtrack over every way
            # of splitting the same segments between them.
            if not (tok is STAR2 and tokens and tokens[-1] is STAR2):
                tokens.append(tok)
    return tuple(tokens)


def _compile_regex(pattern: str, offset: int) -> re.Pattern:
    if not pattern:
        raise _error("empty regular expression after 're:'", max(offset - 1, 0), 1,
                     hint="write re:<python regex>, matched against the whole module path")
    try:
        return re.compile(pattern)
    except re.error as exc:
        pos = exc.pos if exc.pos is not None else 0
        at = offset + min(pos, len(pattern) - 1)
        raise _error(f"invalid regular expression: {exc.msg}", at, 1,
                     hint="re: takes a Python regular expression") from None


# --------------------------------------------------------------------------------------
# The Selector


class Selector:
    """A parsed selector. Build with `Selector.parse(text)`; instances are immutable.

    Attributes: `text` (as written), `path_text` (without the op suffix), `op` (the op
    kind, or None), `is_regex` (a `re:` selector), `needs_model` (negative indices: matching
    needs the lengths of the model's lists).
    """

    __slots__ = ("text", "path_text", "op", "is_regex", "needs_model", "_tokens", "_user_re",
                 "_re", "_re_desc", "_exact", "_first_dynamic")

    def __init__(self, text: str):
        # Private: use Selector.parse, which caches.
        self.text = text
        path_text, op, op_offset = _split_op(text)
        if op is not None:
            _check_op(op, op_offset)
        self.path_text, self.op = path_text, op
        self.is_regex = path_text.startswith("re:")
        self._tokens: tuple[Token, ...] | None = None
        self._user_re = self._re = self._re_desc = None
        self._exact = False
        self._first_dynamic = -1
        if self.is_regex:
            self._user_re = _compile_regex(path_text[3:], 3)
        else:
            if not path_text:
                raise _error("empty selector" if op is None else "empty path before the op suffix",
                             0, 0 if not text else 1,
                             hint="`**` selects every module; `**:" + (op or "linear")
                                  + "` every op of a kind")
            self._tokens = _parse_path(path_text)
            self._compile()
        self.needs_model = self._first_dynamic >= 0

    def _compile(self) -> None:
        pieces = []
        for tok in self._tokens:
            if tok is STAR2:
                pieces.append(r"(?:\.[^.]+)*")
                continue
            piece, exact = tok.regex()
            pieces.append(piece)
            self._exact |= exact
            if tok.kind == "ints" and tok.ints.needs_model and self._first_dynamic < 0:
                self._first_dynamic = tok.offset
        # Paths are matched as "." + path so every segment, `**` included, owns its dot.
        self._re = re.compile("".join(pieces))
        self._re_desc = re.compile("".join(pieces) + r"(?:\.[^.]+)*")

    @staticmethod
    def parse(text: str) -> "Selector":
        """Parse `text` (cached); raises SelectorError with the offending offset."""
        if not isinstance(text, str):
            raise SelectorError(f"a selector is text, not {type(text).__name__}", 0, 0,
                                hint="quote it: \"layers.*\"")
        try:
            return _parse_cached(text)
        except SelectorError as exc:
            exc.text = text
            raise

    # -- matching ------------------------------------------------------------------

    def matches(self, path: str, list_lengths: Mapping[str, int] | None = None) -> bool:
        """Whether this selector names the module at `path` ("" is the root module).

        `list_lengths` maps the dotted path of each ModuleList ("layers",
        "model.layers") to its length; negative indices need it and raise SelectorError
        ("needs a model") without it. A path whose list is not in the mapping is not
        taken by a negative index. The op suffix plays no part here.
        """
        if self._user_re is not None:
            return self._user_re.fullmatch(path) is not None
        return self._match(path, list_lengths, descend=False)

    def selects(self, path: str, list_lengths: Mapping[str, int] | None = None) -> bool:
        """Whether a rule with this selector covers `path`: it matches the path or one of
        its ancestors (a rule covers the modules it names and all their descendants)."""
        if self._user_re is not None:
            return any(self._user_re.fullmatch(p) is not None for p in _ancestors_and_self(path))
        return self._match(path, list_lengths, descend=True)

    def _match(self, path: str, lengths: Mapping[str, int] | None, descend: bool) -> bool:
        if self.needs_model and lengths is None:
            raise SelectorError(
                "negative indices count from the end of the model's list: this selector "
                "needs a model", self._first_dynamic, 1, text=self.text,
                hint="pass list_lengths, or use resolve() with the model's module names")
        dotted = "." + path if path else ""
        regex = self._re_desc if descend else self._re
        if regex.fullmatch(dotted) is None:
            return False
        if not self._exact:
            return True
        return _nfa_match(self._tokens, path.split(".") if path else [], lengths, descend)

    # Immutable: copies are the selector itself, and pickling re-parses the text.
    def __copy__(self) -> "Selector":
        return self

    def __deepcopy__(self, memo: dict) -> "Selector":
        return self

    def __reduce__(self):
        return (Selector.parse, (self.text,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Selector) and other.text == self.text

    def __hash__(self) -> int:
        return hash(("Selector", self.text))

    def __repr__(self) -> str:
        return f"Selector({self.text!r})"

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> Selector:
    return Selector(text)


def _coerce(selector: Union[Selector, str]) -> Selector:
    return selector if isinstance(selector, Selector) else Selector.parse(selector)


def _ancestors_and_self(path: str) -> Iterable[str]:
    """"", then each ancestor of `path` from the top, then `path` itself."""
    yield ""
    if not path:
        return
    dot = path.find(".")
    while dot >= 0:
        yield path[:dot]
        dot = path.find(".", dot + 1)
    yield path


def _closure(tokens: Sequence[Token], states: Iterable[int]) -> frozenset[int]:
    """Add the states reachable by skipping `**` (it may match zero segments)."""
    out = set()
    for i in states:
        while i not in out:
            out.add(i)
            if i < len(tokens) and tokens[i] is STAR2:
                i += 1
            else:
                break
    return frozenset(out)


def _nfa_match(tokens: Sequence[Token], segs: list[str], lengths: Mapping[str, int] | None,
               descend: bool) -> bool:
    """Exact matching, segment by segment; negative indices look up their list's length."""
    end = len(tokens)
    if STAR2 not in tokens:
        # The common case (`layers[16:]`, `model.layers[-4:].mlp`): one token a segment.
        if len(segs) < end or (len(segs) > end and not descend):
            return False
        return all(tok.matches(segs[k], _list_length(tok, segs, k, lengths))
                   for k, tok in enumerate(tokens))
    states = _closure(tokens, [0])
    for k, seg in enumerate(segs):
        nxt = []
        for i in states:
            if i == end:
                if descend:
                    nxt.append(end)
                continue
            tok = tokens[i]
            if tok is STAR2:
                nxt.append(i)
            elif tok.matches(seg, _list_length(tok, segs, k, lengths)):
                nxt.append(i + 1)
        states = _closure(tokens, nxt)
        if not states:
            return False
    return end in states


def _list_length(tok: _Atom, segs: list[str], k: int,
                 lengths: Mapping[str, int] | None) -> int | None:
    if tok.kind != "ints" or lengths is None or not tok.ints.needs_model:
        return None
    return lengths.get(".".join(segs[:k]))


# --------------------------------------------------------------------------------------
# Resolving against a model's module names


_INDEX_SEGMENT = re.compile(r"(?:^|\.)(0|[1-9][0-9]*)(?=\.|$)")


def list_lengths(module_names: Iterable[str]) -> dict[str, int]:
    """The length of every list in a model, from its module names: for each prefix whose
    children are named by integers, the largest such integer plus one."""
    lengths: dict[str, int] = {}
    for name in module_names:
        for m in _INDEX_SEGMENT.finditer(name):
            prefix, index = name[:max(m.start(1) - 1, 0)], int(m.group(1))
            if lengths.get(prefix, 0) <= index:
                lengths[prefix] = index + 1
    return lengths


def resolve(selector: Union[Selector, str], module_names: Sequence[str]) -> list[str]:
    """The names in `module_names` that the selector matches, in their given (model)
    order. Negative indices resolve against list lengths computed from the names."""
    sel = _coerce(selector)
    lengths = list_lengths(module_names) if sel.needs_model else None
    return [name for name in module_names if sel.matches(name, lengths)]


# --------------------------------------------------------------------------------------
# Deciding coverage and overlap without a model
#
# Each selector (without `re:`) is a sequence of segment patterns and `**`, i.e. a regular
# expression over segments. The segment alphabet is infinite, but the finitely many atoms
# of two selectors only distinguish finitely many classes of segments; `_Alphabet` finds a
# witness segment for each class. Inclusion and intersection are then decided by subset
# construction over those classes. A rule selects descendants too, so both languages get
# a final "any further segments" loop.


class _Undecidable(Exception):
    pass


class _Alphabet:
    """Witness segments, one per class of segments that the given atoms tell apart."""

    def __init__(self, atoms: Sequence[_Atom]):
        if any(a.kind == "glob" or (a.kind == "ints" and a.ints.needs_model) for a in atoms):
            raise _Undecidable
        names = set().union(*(a.lits for a in atoms if a.kind == "lits")) if atoms else set()
        witnesses = {n for n in names if not _CANONICAL_INT.fullmatch(n)}
        other = "\x00"
        while other in witnesses:
            other += "\x00"
        witnesses.add(other)  # every name no atom spells out and that is not an index
        int_points = {int(n) for n in names if _CANONICAL_INT.fullmatch(n)}
        witnesses.update(str(n) for n in self._int_witnesses(atoms, int_points))
        signatures: dict[tuple[bool, ...], str] = {}
        for w in sorted(witnesses):
            signatures.setdefault(tuple(a.matches(w) for a in atoms), w)
        self.witnesses = list(signatures.values())

    @staticmethod
    def _int_witnesses(atoms: Sequence[_Atom], points: set[int]) -> list[int]:
        # Between consecutive breakpoints every slice is either wholly in or out of range,
        # so membership depends only on the index modulo the steps' lcm.
        breaks, period = {0}, 1
        for p in points:
            breaks.update((p, p + 1))
        for atom in atoms:
            if atom.kind != "ints":
                continue
            for item in atom.ints.items:
                if not item.is_slice:
                    breaks.update((item.start, item.start + 1))
                    continue
                breaks.add(item.start or 0)
                if item.stop is not None:
                    breaks.add(item.stop)
                period = math.lcm(period, item.step or 1)
                if period > _MAX_INT_WITNESSES:
                    raise _Undecidable
        bounds = sorted(breaks)
        if len(bounds) * period > _MAX_INT_WITNESSES:
            raise _Undecidable
        out = []
        for lo, hi in zip(bounds, bounds[1:] + [None]):
            count = period if hi is None else min(period, hi - lo)
            out.extend(range(lo, lo + count))
        return out


class _Automaton:
    """The selected-with-descendants language of one token sequence over class ids."""

    def __init__(self, tokens: Sequence[Token], alphabet: _Alphabet):
        self.tokens = tokens
        self.end = len(tokens)
        self.classes = [None if t is STAR2 else
                        frozenset(c for c, w in enumerate(alphabet.witnesses) if t.matches(w))
                        for t in tokens]
        self.start = _closure(tokens, [0])

    def step(self, states: frozenset[int], cls: int) -> frozenset[int]:
        nxt = []
        for i in states:
            if i == self.end or self.tokens[i] is STAR2:
                nxt.append(i)  # descendants, or `**` taking one more segment
            elif cls in self.classes[i]:
                nxt.append(i + 1)
        return _closure(self.tokens, nxt)

    def accepts(self, states: frozenset[int]) -> bool:
        return self.end in states


def _product_search(a: Sequence[Token], b: Sequence[Token], goal) -> bool:
    """Breadth-first search over pairs of state sets; True when `goal(acc_a, acc_b)` holds
    at some reachable pair (with a's set non-empty)."""
    atoms = [t for t in itertools.chain(a, b) if t is not STAR2]
    alphabet = _Alphabet(atoms)
    auto_a, auto_b = _Automaton(a, alphabet), _Automaton(b, alphabet)
    start = (auto_a.start, auto_b.start)
    seen, queue = {start}, [start]
    while queue:
        sa, sb = queue.pop()
        if goal(auto_a.accepts(sa), auto_b.accepts(sb)):
            return True
        for cls in range(len(alphabet.witnesses)):
            pair = (auto_a.step(sa, cls), auto_b.step(sb, cls))
            if pair[0] and pair not in seen:
                seen.add(pair)
                queue.append(pair)
    return False


def _includes(later: Sequence[Token], earlier: Sequence[Token]) -> bool:
    return not _product_search(earlier, later, lambda in_e, in_l: in_e and not in_l)


def _intersects(a: Sequence[Token], b: Sequence[Token]) -> bool:
    return _product_search(a, b, lambda in_a, in_b: in_a and in_b)


def _approximate(sel: Selector, upper: bool) -> tuple[Token, ...]:
    """A model-free stand-in: `upper` selects at least what `sel` can, else at most."""
    if sel.is_regex:
        return (STAR2,) if upper else (_NONE,)
    out = []
    for tok in sel._tokens:
        if tok is not STAR2 and tok.kind == "glob":
            floor = _Atom("lits", lits=tok.glob_floor) if tok.glob_floor else _NONE
            tok = _ANY if upper else floor
        elif tok is not STAR2 and tok.kind == "ints" and tok.ints.needs_model:
            static = tok.ints.static_part()
            tok = _ALL_INTS if upper else (_Atom("ints", ints=static) if static.items else _NONE)
        out.append(tok)
    return tuple(out)


def _op_covers(later: str | None, earlier: str | None) -> bool:
    return later is None or later == earlier


def _ops_meet(a: str | None, b: str | None) -> bool:
    return a is None or b is None or a == b


def covers(later: Union[Selector, str], earlier: Union[Selector, str]) -> bool | None:
    """Whether every place the earlier rule selects (modules with their descendants, and
    its op kind) is also selected by the later one, in every model. None when only a model
    can tell (`re:` selectors, negative indices, `*` inside a name). Text is parsed first
    and may raise SelectorError."""
    later, earlier = _coerce(later), _coerce(earlier)
    if not _op_covers(later.op, earlier.op):
        return False
    try:
        if _includes(_approximate(later, upper=False), _approximate(earlier, upper=True)):
            return True
        if not _includes(_approximate(later, upper=True), _approximate(earlier, upper=False)):
            return False
    except _Undecidable:
        return None
    return None


def overlaps(a: Union[Selector, str], b: Union[Selector, str]) -> bool | None:
    """Whether some place (module path with descendants, and op kind) can be selected by
    both, in some model. None when only a model can tell (as for `covers`)."""
    a, b = _coerce(a), _coerce(b)
    if not _ops_meet(a.op, b.op):
        return False
    try:
        if _intersects(_approximate(a, upper=False), _approximate(b, upper=False)):
            return True
        if not _intersects(_approximate(a, upper=True), _approximate(b, upper=True)):
            return False
    except _Undecidable:
        return None
    return None


# --------------------------------------------------------------------------------------
# Lint help


def regex_dot_before_digit(selector: Union[Selector, str]) -> list[int]:
    """For a `re:` selector, the offsets (in the selector text) of each unescaped `.`
    directly followed by a digit outside character classes: `re:layers.1.mlp` also
    matches `layers11mlp`-like paths, which is rarely meant. [] for other selectors."""
    sel = _coerce(selector)
    if not sel.is_regex:
        return []
    pattern, base = sel.path_text[3:], 3
    found, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
        elif ch == "[":
            in_class = True
            # A `]` right after `[` or `[^` is a literal member, not the class's end.
            if pattern[i + 1:i + 2] == "^":
                i += 1
            if pattern[i + 1:i + 2] == "]":
                i += 1
        elif ch == "." and pattern[i + 1:i + 2] in tuple("0123456789"):
            found.append(base + i)
        i += 1
    return found


def outline(names: list[str], most: int = 8) -> str:
    """A short picture of a model's module tree from `named_modules()` names, for hints:
    the top-level children (a numbered list as `layers[0..15]`) and what the first item of
    each list holds, e.g. `embed, layers[0..15], norm, lm_head; layers.0: attn, mlp`."""
    def children(prefix: str) -> list[str]:
        depth = prefix.count(".") + 1 if prefix else 0
        out: list[str] = []
        for n in names:
            if n and (not prefix or n.startswith(prefix + ".")):
                part = n.split(".")[depth] if len(n.split(".")) > depth else None
                if part is not None and part not in out:
                    out.append(part)
        return out

    top, shown, lists = children(""), [], []
    for child in top:
        kids = children(child)
        if kids and all(k.isdigit() for k in kids):
            shown.append(f"{child}[0..{max(int(k) for k in kids)}]")
            lists.append(f"{child}.{kids[0]}: {', '.join(children(f'{child}.{kids[0]}')[:most])}")
        else:
            shown.append(child)
    text = ", ".join(shown[:most]) + (" ..." if len(shown) > most else "")
    return text + ("; " + "; ".join(lists) if lists else "")
