"""The `.plan` text form: text -> (document, SourceMap).

The grammar (`grammar/planlang.lark`) says where values go; this module turns the parse tree
into the same *document* the YAML reader gives (see `planlang.source`), one method per
statement, and records the span of every value and keyword so the schema reports problems
at the exact word. Values are not checked here: the schema knows the vocabulary and says
"did you mean". Syntax errors become `SourceError("PL101", ...)` in words, never a lark
exception.
"""
from __future__ import annotations

import difflib
import functools
import importlib.resources
import json
import re
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from .source import Path, SourceError, SourceMap, Span

# Top-level keys in the canonical order (document contract); kept here so that reading a
# `.plan` file does not need the schema's imports.
TOP_LEVEL_ORDER = ("planlang", "name", "target", "mode", "extends", "fusions", "graphs", "compile",
                   "precision", "memory", "parallel", "limits", "provenance")


@functools.lru_cache(maxsize=1)
def grammar_text() -> str:
    """The text of `grammar/planlang.lark` (package data of `planlang.grammar`)."""
    return (importlib.resources.files("planlang.grammar") / "planlang.lark").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def keywords() -> tuple[str, ...]:
    """Every keyword of the grammar, in the order the grammar first uses it."""
    rules = re.sub(r"//[^\n]*", "", grammar_text())  # examples in comments are not keywords
    found = re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"', rules)
    return tuple(dict.fromkeys(found))


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    # LALR with the contextual lexer: a plan parses in a millisecond or two, and a word is a
    # keyword only where the grammar allows that keyword (`dtype default` vs a selector).
    return Lark(grammar_text(), parser="lalr", lexer="contextual", propagate_positions=True,
                keep_all_tokens=True, maybe_placeholders=False)


@functools.lru_cache(maxsize=1)
def statement_keywords() -> tuple[str, ...]:
    """The keywords a statement may start with, in grammar order."""
    accepted = _parser().parse_interactive("").accepts()
    words = {_literal(name) for name in accepted} - {None}
    return tuple(k for k in keywords() if k in words)


@functools.lru_cache(maxsize=None)
def _literal(terminal: str) -> str | None:
    """The word a keyword terminal stands for ('FUSE' -> 'fuse'); None for other terminals."""
    for term in _parser().terminals:
        if term.name == terminal and term.pattern.type == "str":
            return term.pattern.value
    return None


def read_text(text: str, file: str = "<plan>") -> tuple[dict, SourceMap]:
    """Parse the `.plan` text form into a document and the spans of everything written in it.

    Raises `SourceError` (PL101 syntax, PL102 duplicate) and nothing else for any input.
    """
    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first line
    source = SourceMap(file=file, text=text)
    tree = _parse(text if text.endswith("\n") else text + "\n")
    builder = _Builder(source)
    for statement in tree.children:
        if isinstance(statement, Tree):
            getattr(builder, statement.data)(statement)
    doc = {key: builder.doc[key] for key in TOP_LEVEL_ORDER if key in builder.doc}
    doc.update({k: v for k, v in builder.doc.items() if k not in doc})
    return doc, source


# ----------------------------------------------------------------------------- parsing

def _parse(text: str) -> Tree:
    parser = _parser()
    interactive = parser.parse_interactive(text)
    previous: Token | None = None
    current: Token | None = None
    try:
        for token in interactive.iter_parse():
            previous, current = current, token
            _refuse_glued_keyword(token, previous, text, interactive)
        return interactive.feed_eof(current)
    except UnexpectedInput as exc:
        # A token the parser refused is `current`; one the lexer could not fit comes after it.
        before = previous if isinstance(exc, UnexpectedToken) and exc.token is current else current
        raise _syntax_error(exc, text, before, _accepts(interactive, exc)) from None
    except LarkError as exc:  # nothing else is expected, but no lark error may escape
        raise SourceError("PL101", f"cannot parse the plan: {exc}", None, None) from None


def _accepts(interactive, exc: UnexpectedInput) -> set[str]:
    try:
        return set(interactive.accepts())
    except LarkError:
        return set(getattr(exc, "expected", None) or getattr(exc, "allowed", None) or ())


def _refuse_glued_keyword(token: Token, previous: Token | None, text: str, interactive) -> None:
    """`fuser` would lex as `fuse r`, `prefetch1` as `prefetch 1`: a keyword must end a word."""
    word = _literal(token.type)
    if word is None or not word[0].isalpha():
        return
    end = token.end_pos
    if end >= len(text) or text[end].isspace() or text[end] in "#,=()":
        return
    whole = re.match(r"[^\s#,=()]+", text[token.start_pos:]).group(0)
    span = Span(token.line, token.column, token.line, token.column + len(whole))
    rest = whole[len(word):]
    if not (rest[0].isalpha() or rest[0] == "_"):  # `prefetch1`, `at**`, `extends"base.plan"`
        raise SourceError("PL101", f"missing space after '{word}'", span, f"did you mean '{word} {rest}'?")
    if _at_statement_start(previous):
        raise _unknown_statement(whole, span)
    guess = difflib.get_close_matches(whole, _keyword_names(interactive.accepts()), n=1, cutoff=0.6)
    hint = f"did you mean '{guess[0] if guess else word + ' ' + rest}'?"
    raise SourceError("PL101", f"unknown word '{_short(whole)}'{_after(previous)}", span, hint)


def _at_statement_start(previous: Token | None) -> bool:
    return previous is None or previous.type == "_NL"


def _unknown_statement(word: str, span: Span) -> SourceError:
    starts = statement_keywords()
    guess = difflib.get_close_matches(word, starts, n=1, cutoff=0.6)
    hint = f"did you mean '{guess[0]}'?" if guess else "a statement starts with one of: " + ", ".join(starts)
    return SourceError("PL101", f"unknown statement '{_short(word)}'", span, hint)


# ----------------------------------------------------------------------------- syntax errors in words

# What the grammar's named terminals are, in words (keywords are quoted as written).
_TERMINAL_WORDS = {
    "SELECTOR": "a selector",
    "NUMBER": "a number",
    "WORD": "a name",
    "STRING": "a quoted string",
    "POW2_RANGE": "pow2:A..B",
    "_NL": "end of line",
    "$END": "end of file",
}
_PUNCTUATION_WORDS = {",": "','", "(": "'('", ")": "')'", "=": "'='", "{": "'{'", "}": "'}'", ":": "':'"}


def _keyword_names(terminals) -> list[str]:
    words = [_literal(t) for t in terminals]
    return [w for w in keywords() if w in words]


def _describe_expected(terminals: set[str]) -> str:
    terminals = {t for t in terminals if not t.startswith("__") and t != "COMMENT"}
    if "SELECTOR" in terminals:
        terminals.discard("STRING")  # a selector may be quoted: "a selector" says it
    if {"WORD", "NUMBER", "STRING"} <= terminals:
        terminals -= {"WORD", "NUMBER", "STRING"}
        terminals.add("VALUE")
    named = [word for name, word in (("VALUE", "a value"), *_TERMINAL_WORDS.items())
             if name in terminals and name not in ("_NL", "$END")]
    literals = [_literal(t) for t in terminals]
    named += [f"'{k}'" for k in keywords() if k in literals]
    named += [w for p, w in _PUNCTUATION_WORDS.items() if p in literals]
    named += [_TERMINAL_WORDS[t] for t in ("_NL", "$END") if t in terminals]
    if not named:
        return "nothing more"
    if len(named) == 1:
        return named[0]
    return ", ".join(named[:-1]) + " or " + named[-1]


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _after(previous: Token | None) -> str:
    if previous is None or previous.type == "_NL":
        return ""
    return f" after '{_short(str(previous))}'" if previous.type != "STRING" else f" after {_short(str(previous))}"


def _syntax_error(exc: UnexpectedInput, text: str, previous: Token | None, expected: set[str]) -> SourceError:
    found, span, start = _found(exc, text)
    if isinstance(exc, UnexpectedCharacters) and (text[start].isspace() or not text[start].isprintable()):
        # a no-break space pasted from a web page, a stray control character
        return SourceError("PL101", f"unexpected character U+{ord(text[start]):04X}",
                           Span.point(span.line, span.column),
                           "words are separated by plain spaces or tabs; retype this one")
    if _at_statement_start(previous) and found not in ("end of line", "end of file"):
        word = re.match(r"[^\s#]*", text[start:]).group(0) or text[start]
        return _unknown_statement(word, Span(span.line, span.column, span.line, span.column + len(word)))
    if isinstance(exc, UnexpectedCharacters) and text[start] == '"':
        return SourceError("PL101", "a quoted string is not closed on its line", span,
                           'end it with " (write \\" for a quote inside it)')
    message = f"expected {_describe_expected(expected)}{_after(previous)}, found {found}"
    hint = _hint(found, start, previous, expected, text) or _example_hint(text, start)
    return SourceError("PL101", message, span, hint)


def _found(exc: UnexpectedInput, text: str) -> tuple[str, Span, int]:
    """What stands where the error is, in words; its span; its offset in the text."""
    if isinstance(exc, UnexpectedToken):
        token = exc.token
        if token.type in ("_NL", "$END"):
            line = getattr(token, "line", None) or text.count("\n")
            column = getattr(token, "column", None) or 1
            return _TERMINAL_WORDS[token.type], Span.point(line, column), token.start_pos or len(text)
        span = Span(token.line, token.column, token.end_line, token.end_column)
        shown = _short(str(token)) if token.type == "STRING" else f"'{_short(str(token))}'"
        return shown, span, token.start_pos
    if not isinstance(exc, UnexpectedCharacters):  # UnexpectedEOF: the text always ends a line
        line = text.count("\n")
        return "end of file", Span.point(max(line, 1), 1), len(text)
    start = exc.pos_in_stream
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    if text[start] == '"':  # an unterminated string
        return '"', Span.point(line, column), start
    run = re.match(r"[^\s#,=(){}:]+|.", text[start:]).group(0)
    return f"'{_short(run)}'", Span(line, column, line, column + len(run)), start


def _hint(found: str, start: int, previous: Token | None, expected: set[str], text: str) -> str | None:
    # A value glued to the one before it (`layers.*.{wq,wk}`, `2025-01-01`) wanted quotes.
    glued = previous is not None and previous.end_pos == start and not found.endswith(("of line", "of file"))
    if glued and previous.type in ("SELECTOR", "WORD", "NUMBER"):
        whole = re.match(r"[^\s#]+", text[previous.start_pos:]).group(0)
        return f"a value holding spaces, '#', '=' or ',' is written in double quotes: {json.dumps(whole)}"
    if found.startswith("'") and found[1:2].isalpha():
        word = found[1:-1]
        names = _keyword_names(expected)
        guess = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
        if guess:
            return f"did you mean '{guess[0]}'?"
        prefixes = [k for k in names if word.startswith(k) and len(word) > len(k)]  # `tocpu`
        if prefixes:
            keyword = max(prefixes, key=len)
            return f"did you mean '{keyword} {word[len(keyword):]}'?"
    return None


@functools.lru_cache(maxsize=1)
def _examples() -> dict[tuple[str, ...], str]:
    """Statement keyword(s) -> the example the grammar gives beside (or above) the rule."""
    examples: dict[tuple[str, ...], str] = {}
    above = None
    for line in grammar_text().splitlines():
        rule = re.match(r'\w+:\s*"(\w+)"(?:\s+"(\w+)")?[^/]*(?://\s*(.*))?$', line)
        if rule:
            first, second, beside = rule.groups()
            example = re.sub(r"\s{2,}\(.*\)$", "", beside or above or "").strip()
            if example.startswith(first + " "):
                examples.setdefault((first,), example)  # the grammar lists the main form first
                if second:
                    examples.setdefault((first, second), example)
        above = line[2:].strip() if line.startswith("//") else None
    return examples


def _example_hint(text: str, offset: int) -> str | None:
    """For an error inside a statement: how that statement is written."""
    line_start = text.rfind("\n", 0, offset) + 1
    words = text[line_start:].split("\n", 1)[0].split()
    examples = _examples()
    for key in (tuple(words[:2]), tuple(words[:1])):
        if key in examples:
            return f"for example: {examples[key]}"
    return None


# ----------------------------------------------------------------------------- values

def _span(item: Token | Tree) -> Span:
    if isinstance(item, Token):
        return Span(item.line, item.column, item.end_line, item.end_column)
    meta = item.meta
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _string(token: Token) -> str:
    try:
        value = json.loads(token, strict=False)  # JSON escapes; a raw tab is kept
    except ValueError as exc:
        raise SourceError("PL101", f"invalid escape in a quoted string ({exc.msg})", _span(token),
                          'quoted strings use JSON escapes: \\" \\\\ \\n \\t \\uXXXX') from None
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise SourceError("PL101", "a quoted string holds a lone surrogate (\\ud800-\\udfff), which is not text",
                          _span(token), "write the character itself, or a surrogate pair")
    return value


def _number(text: str, token: Token | None = None) -> int | float:
    if len(text) > 64:
        raise SourceError("PL101", f"number with {len(text)} characters is too long",
                          _span(token) if token is not None else None, "numbers in a plan are short")
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    return float(text)


def _token_value(token: Token) -> Any:
    if token.type == "NUMBER":
        return _number(token, token)
    if token.type == "STRING":
        return _string(token)
    if token.type == "WORD" and token in ("true", "false"):
        return token == "true"
    return str(token)


def _scalar(tree: Tree) -> tuple[Any, Span]:
    """A `scalar`, `selector` or `key` tree -> its value and span."""
    token = tree.children[0]
    return _token_value(token), _span(token)


def _trees(tree: Tree, *names: str) -> list[Tree]:
    return [c for c in tree.children if isinstance(c, Tree) and (not names or c.data in names)]


def _keyword(tree: Tree, word: str) -> Token | None:
    for child in tree.children:
        if isinstance(child, Token) and child == word and _literal(child.type) == word:
            return child
    return None


# ----------------------------------------------------------------------------- the document

class _Builder:
    """Builds the document statement by statement (one method per grammar rule)."""

    def __init__(self, source: SourceMap):
        self.doc: dict = {}
        self.source = source
        self.first: dict[Any, Span] = {}  # what was given where, to refuse it twice
        self.emptied: dict[Path, tuple[str, Span]] = {}  # lists cleared with `none`

    # -- bookkeeping

    def _once(self, what: Any, span: Span, label: str) -> None:
        if what in self.first:
            line = self.first[what].line
            raise SourceError("PL102", f"duplicate {label} (first given at line {line})", span,
                              "remove one of them")
        self.first[what] = span

    def _record(self, path: Path, value_span: Span, key_span: Span | None = None) -> None:
        self._once(path, key_span or value_span, f"'{path[-1]}'")
        self.source.values[path] = value_span
        if key_span is not None:
            self.source.keys[path] = key_span

    def _section(self, path: Path, statement: Tree, keyword: Token, empty=dict):
        """The mapping or list at `path`, made (and given the statement's span) on first use."""
        self.source.values.setdefault((), _span(statement))
        node = self.doc
        for depth, key in enumerate(path):
            last = depth == len(path) - 1
            if key not in node:
                node[key] = empty() if last else {}
                self.source.values[path[: depth + 1]] = _span(statement)
                self.source.keys[path[: depth + 1]] = _span(keyword)
            node = node[key]
        return node

    def _set(self, path: Path, scalar: Tree, keyword: Token | Tree | None, statement: Tree) -> None:
        value, span = _scalar(scalar)
        self._record(path, span, _span(keyword) if keyword is not None else None)
        self._section(path[:-1], statement, statement.children[0])[path[-1]] = value

    def _statement_once(self, statement: Tree) -> None:
        keyword = statement.children[0]
        self._once(("statement", statement.data), _span(keyword), f"'{keyword}' statement")

    def _flag(self, item: dict, path: Path, flag: Tree) -> None:
        """`fullgraph` alone is true; `fullgraph false` says so."""
        keyword = flag.children[0]
        values = _trees(flag, "scalar")
        if values:
            value, span = _scalar(values[0])
        else:
            value, span = True, _span(keyword)
        self._record(path, span, _span(keyword))
        item[path[-1]] = value

    def _clauses(self, item: dict, path: Path, tree: Tree, rules: dict[str, str]) -> None:
        """Clauses `KEYWORD value` -> item[key]; `rules` maps clause rule -> document key."""
        for clause in _trees(tree):
            key = rules.get(clause.data)
            if key is None:
                continue
            if clause.data.endswith("_flag"):
                self._flag(item, path + (key,), clause)
                continue
            value, span = _scalar(_trees(clause, "scalar")[0])
            self._record(path + (key,), span, _span(clause.children[0]))
            item[key] = value

    def _empty(self, path: Path, statement: Tree, empty) -> None:
        """`fuse none` and the like: the empty list (or mapping) at `path`."""
        words = " ".join(str(c) for c in statement.children)
        none = statement.children[-1]
        self._once(("none",) + path, _span(none), f"'{words}'")
        if self._section(path, statement, statement.children[0], empty=empty):
            first_entry = self.source.values[path].line
            raise _conflict(words, first_entry, _span(none))
        self.emptied[path] = (words, _span(none))

    def _entry(self, path: Path, span: Span) -> None:
        """An entry is about to join the list (or mapping) at `path`: refuse it after `none`."""
        if path in self.emptied:
            words, none_span = self.emptied[path]
            raise _conflict(words, none_span.line, span)

    def _list_item(self, path: Path, statement: Tree) -> tuple[list, int]:
        self._entry(path, _span(statement))
        items = self._section(path, statement, statement.children[0], empty=list)
        index = len(items)
        self.source.values[path + (index,)] = _span(statement)
        self.source.keys[path + (index,)] = _span(statement.children[0])
        return items, index

    # -- the plan itself

    def version(self, t: Tree) -> None:
        self._set(("planlang",), t.children[1], t.children[0], t)

    def plan(self, t: Tree) -> None:
        self._statement_once(t)
        self._set(("name",), t.children[1], t.children[0], t)
        for clause in _trees(t, "plan_on", "plan_for"):
            key = "target" if clause.data == "plan_on" else "mode"
            self._set((key,), clause.children[1], clause.children[0], t)

    def target(self, t: Tree) -> None:
        self._set(("target",), t.children[1], t.children[0], t)

    def mode(self, t: Tree) -> None:
        self._set(("mode",), t.children[1], t.children[0], t)

    def extends(self, t: Tree) -> None:
        self._set(("extends",), t.children[1], t.children[0], t)

    # -- fusions

    def fuse_none(self, t: Tree) -> None:
        self._empty(("fusions",), t, list)

    def fuse(self, t: Tree) -> None:
        self._entry(("fusions",), _span(t))
        fusions = self._section(("fusions",), t, t.children[0], empty=list)
        clauses = _trees(t, "at_clause", "optional_clause")
        for item_tree in _trees(t, "fusion_item"):
            index = len(fusions)
            path = ("fusions", index)
            kind, kind_span = _scalar(item_tree.children[0])
            self.source.values[path] = _span(item_tree)
            self.source.values[path + ("kind",)] = kind_span
            self.source.keys[path + ("kind",)] = kind_span
            item: dict = {"kind": kind}
            for option in _trees(item_tree, "option"):
                self._option(item, path, option)
            for clause in clauses:
                if clause.data == "at_clause":
                    value, span = _scalar(clause.children[1])
                    self._record(path + ("at",), span, _span(clause.children[0]))
                    item["at"] = value
                else:
                    self._record(path + ("required",), _span(clause), _span(clause))
                    item["required"] = False
            written_long = clauses or _keyword(item_tree, "(") is not None
            fusions.append(item if written_long else kind)

    def _option(self, item: dict, path: Path, option: Tree) -> None:
        name, value_tree = option.children[0], option.children[2]
        key = str(name)
        if value_tree.data == "call":  # sliding_window(4096) -> {sliding_window: 4096}
            inner_name = str(value_tree.children[0])
            inner, inner_span = _scalar(value_tree.children[2])
            value: Any = {inner_name: inner}
            self.source.values[path + (key, inner_name)] = inner_span
            self.source.keys[path + (key, inner_name)] = _span(value_tree.children[0])
            span = _span(value_tree)
        else:
            value, span = _scalar(value_tree.children[0])
        self._record(path + (key,), span, _span(name))
        item[key] = value

    # -- graphs, compile, limits

    def capture(self, t: Tree) -> None:
        self._statement_once(t)
        graphs = self._section(("graphs",), t, t.children[0])
        mode = _trees(t, "scalar")
        if mode:
            self._set(("graphs", "capture"), mode[0], t.children[0], t)
        for clause in _trees(t, "buckets_clause"):
            self._buckets(graphs, clause)
        self._clauses(graphs, ("graphs",), t, {"over_max_clause": "over_max", "warmup_clause": "warmup",
                                                "pdl_clause": "pdl"})

    def _buckets(self, graphs: dict, clause: Tree) -> None:
        keyword = clause.children[0]
        path = ("graphs", "buckets")
        written = _trees(clause, "buckets")
        if not written:  # `buckets` alone: the empty list (the schema says it is empty)
            self._record(path, _span(keyword), _span(keyword))
            graphs["buckets"] = []
            return
        tree = written[0]
        first = tree.children[0]
        if isinstance(first, Token):  # pow2:A..B stays the string written (document contract)
            self._record(path, _span(first), _span(keyword))
            graphs["buckets"] = str(first)
            return
        scalars = _trees(tree, "scalar")
        self._record(path, _span(tree), _span(keyword))
        if len(scalars) == 1 and scalars[0].children[0].type == "STRING":
            graphs["buckets"] = _scalar(scalars[0])[0]  # buckets "pow2:1..64"
            return
        values = []
        for i, scalar in enumerate(scalars):
            value, span = _scalar(scalar)
            self.source.values[path + (i,)] = span
            values.append(value)
        graphs["buckets"] = values

    def compile(self, t: Tree) -> None:
        self._statement_once(t)
        section = self._section(("compile",), t, t.children[0])
        mode = _trees(t, "scalar")
        if mode:
            self._set(("compile", "mode"), mode[0], t.children[0], t)
        self._clauses(section, ("compile",), t, {"fullgraph_flag": "fullgraph", "dynamic_flag": "dynamic"})

    def limits(self, t: Tree) -> None:
        section = self._section(("limits",), t, t.children[0])
        self._clauses(section, ("limits",), t,
                      {"max_seq_len_clause": "max_seq_len", "max_batch_clause": "max_batch"})

    # -- precision

    def dtype_default(self, t: Tree) -> None:
        self._section(("precision",), t, t.children[0])
        scalars = _trees(t, "scalar")
        self._set(("precision", "default"), scalars[0], t.children[1], t)
        if len(scalars) > 1:
            self._set(("precision", "accumulate"), scalars[1], _keyword(t, "accumulate"), t)

    def dtype_accumulate(self, t: Tree) -> None:
        self._section(("precision",), t, t.children[0])
        self._set(("precision", "accumulate"), t.children[2], t.children[1], t)

    def dtype_preset(self, t: Tree) -> None:
        self._section(("precision",), t, t.children[0])
        self._set(("precision", "preset"), t.children[2], t.children[1], t)

    def dtype_rule(self, t: Tree) -> None:
        self._section(("precision",), t, t.children[0])
        rules, index = self._list_item(("precision", "rules"), t)
        path = ("precision", "rules", index)
        at, at_span = _scalar(t.children[1])
        dtype, dtype_span = _scalar(t.children[3])
        self._record(path + ("at",), at_span)
        self._record(path + ("dtype",), dtype_span)
        rule = {"at": at, "dtype": dtype}
        self._clauses(rule, path, t, {"scaling_clause": "scaling", "block_size_clause": "block_size",
                                      "activations_clause": "activations", "emulate_flag": "emulate"})
        rules.append(rule)

    def dtype_none(self, t: Tree) -> None:
        self._section(("precision",), t, t.children[0])
        self._empty(("precision", "rules"), t, list)

    # -- memory

    def offload(self, t: Tree) -> None:
        self._memory_rule(t, "offload", {"to_clause": "to", "prefetch_clause": "prefetch"})

    def recompute(self, t: Tree) -> None:
        self._memory_rule(t, "recompute", {"policy_clause": "policy"})

    def offload_none(self, t: Tree) -> None:
        self._section(("memory",), t, t.children[0])
        self._empty(("memory", "offload"), t, list)

    def recompute_none(self, t: Tree) -> None:
        self._section(("memory",), t, t.children[0])
        self._empty(("memory", "recompute"), t, list)

    def _memory_rule(self, t: Tree, key: str, clauses: dict[str, str]) -> None:
        self._section(("memory",), t, t.children[0])
        rules, index = self._list_item(("memory", key), t)
        path = ("memory", key, index)
        at, at_span = _scalar(t.children[1])
        self._record(path + ("at",), at_span)
        rule = {"at": at}
        self._clauses(rule, path, t, clauses)
        for save in _trees(t, "save_clause"):
            self._save(rule, path + ("save",), save)
        rules.append(rule)

    def _save(self, rule: dict, path: Path, clause: Tree) -> None:
        scalars = _trees(clause, "scalar")
        span = _span(clause.children[1])  # `save none`: the empty list
        if scalars:
            span = Span(span.line, span.column, _span(scalars[-1]).end_line, _span(scalars[-1]).end_column)
        self._record(path, span, _span(clause.children[0]))
        ops = []
        for i, scalar in enumerate(scalars):
            value, value_span = _scalar(scalar)
            self.source.values[path + (i,)] = value_span
            ops.append(value)
        rule["save"] = ops

    # -- parallel

    def parallel_tensor(self, t: Tree) -> None:
        section = self._section(("parallel",), t, t.children[0])
        self._set(("parallel", "tensor"), t.children[2], t.children[1], t)
        for flag in _trees(t, "sequence_flag"):
            self._flag(section, ("parallel", "sequence"), flag)

    def parallel_sequence(self, t: Tree) -> None:
        section = self._section(("parallel",), t, t.children[0])
        self._flag(section, ("parallel", "sequence"), t.children[1])

    def parallel_style_none(self, t: Tree) -> None:
        self._section(("parallel",), t, t.children[0])
        self._empty(("parallel", "styles"), t, list)

    def parallel_style(self, t: Tree) -> None:
        self._section(("parallel",), t, t.children[0])
        styles, index = self._list_item(("parallel", "styles"), t)
        path = ("parallel", "styles", index)
        at, at_span = _scalar(t.children[2])
        style, style_span = _scalar(t.children[3])
        self._record(path + ("at",), at_span)
        self._record(path + ("style",), style_span, _span(t.children[1]))
        styles.append({"at": at, "style": style})

    # -- provenance

    def provenance_none(self, t: Tree) -> None:
        self._empty(("provenance",), t, dict)

    def provenance(self, t: Tree) -> None:
        self._entry(("provenance",), _span(t))
        section = self._section(("provenance",), t, t.children[0])
        key_tree, value_tree = t.children[1], t.children[2]
        key = _key(key_tree)
        path = ("provenance", key)
        if value_tree.data == "mapping":
            self._record(path, _span(value_tree), _span(key_tree))
            mapping: dict = {}
            for pair in _trees(value_tree, "pair"):
                sub = _key(pair.children[0])
                value, span = _scalar(pair.children[2])
                self._record(path + (sub,), span, _span(pair.children[0]))
                mapping[sub] = value
            section[key] = mapping
        else:
            value, span = _scalar(value_tree)
            self._record(path, span, _span(key_tree))
            section[key] = value


def _conflict(words: str, line: int, span: Span) -> SourceError:
    return SourceError("PL102", f"'{words}' and entries of the same list (the other given at line {line})",
                       span, "write the entries, or `none`, not both")


def _key(tree: Tree) -> str:
    """A provenance key: a word, a quoted string, or a number kept as written ("16")."""
    token = tree.children[0]
    return _string(token) if token.type == "STRING" else str(token)
