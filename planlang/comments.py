"""Comments kept through `fmt`: read them from a plan's text, put them back into its
canonical form.

Readers drop comments (a document has none), so `fmt` takes them from the source text
itself. Each comment is anchored to a document path: a comment on a line of its own
belongs to the next line that holds a key or value (its path comes from the reader's
source map), a comment after a value to that line's path. The writers say which path each
line they print stands for, and every comment goes back before (or after) the first line
of its path. A path the canonical form leaves out (a default written explicitly, a shape
written long) hands its comments to the next line that is printed; comments after the last
line stay at the end. Nothing is dropped. Both syntaxes start comments with `#`, so
comments survive a conversion too (at the granularity of the target's lines: a `.plan`
line stands for a whole section's statement). Comments above the first key are the file's
header and stay on top.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .source import Path, SourceMap

Line = tuple[Optional[Path], str]  # (the path a printed line stands for, its text)


@dataclass(frozen=True)
class Comment:
    text: str                 # "# ..." as written, stripped
    line: int                 # 1-based line it was written on
    trailing: bool            # after a value on the same line


def _comment_start(line: str, syntax: str) -> int:
    """Column (0-based) where a comment starts on `line`, or -1. YAML: a `#` at the start or
    after whitespace, outside quotes; the text form: a `#` outside a double-quoted string."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in ('"', "'") if syntax == "yaml" else c == '"':
            quote = c
        elif c == "#" and (syntax != "yaml" or i == 0 or line[i - 1] in " \t"):
            return i
        i += 1
    return -1


def extract(text: str, syntax: str) -> list[Comment]:
    out = []
    for n, line in enumerate(text.split("\n"), start=1):  # the readers' lines (not str.splitlines's)
        line = line.rstrip("\r")
        col = _comment_start(line, syntax)
        if col >= 0:
            out.append(Comment(line[col:].rstrip(), n, trailing=bool(line[:col].strip())))
    return out


def _line_paths(source: SourceMap) -> dict[int, Path]:
    """For each source line that starts a key or value: the shortest such path (the
    outermost entry written there), the first by column among equals."""
    best: dict[int, tuple[int, int, int, Path]] = {}
    for is_value, spans in ((0, source.keys), (1, source.values)):
        for path, span in spans.items():
            if not path:
                continue
            key = source.keys.get(path)
            if is_value and key is not None and key.line != span.line:
                continue  # a block collection: its first line is its first child's
            rank = (is_value, len(path), span.column)
            cur = best.get(span.line)
            if cur is None or rank < cur[:3]:
                best[span.line] = (*rank, path)
    return {line: p for line, (_, _, _, p) in best.items()}


def attach(lines: Sequence[Line], comments: Sequence[Comment], source: SourceMap) -> list[str]:
    """`lines` with `comments` put back where their paths are printed (see the module
    docstring)."""
    if not comments:
        return [text for _, text in lines]
    where = _line_paths(source)
    content = sorted(where)
    printed: dict[Path, int] = {}
    for i, (path, _) in enumerate(lines):
        if path is not None:
            printed.setdefault(tuple(path), i)

    def index_of(path: Path) -> Optional[int]:
        while path:
            if path in printed:
                return printed[path]
            path = path[:-1]
        return None

    def from_line(n: int) -> Optional[int]:
        """The printed line of the first source line at or after n whose path is printed."""
        for ln in content:
            if ln >= n:
                i = index_of(where[ln])
                if i is not None:
                    return i
        return None

    before: dict[int, list[str]] = {}
    after: dict[int, list[str]] = {}
    head: list[str] = []
    tail: list[str] = []
    for c in comments:
        if content and c.line < content[0]:
            head.append(c.text)  # the file's header stays on top, wherever its next key goes
            continue
        i = index_of(where[c.line]) if c.trailing and c.line in where else None
        if i is not None:
            after.setdefault(i, []).append(c.text)
            continue
        i = from_line(c.line + (1 if c.trailing else 0))
        if i is None:
            tail.append(c.text)
        else:
            before.setdefault(i, []).append(c.text)
    out = list(head)
    for i, (_, text) in enumerate(lines):
        pad = text[:len(text) - len(text.lstrip())]
        trailing = after.get(i, [])
        # one comment fits after a line; more (entries a line folds together) go above it
        out.extend(pad + c for c in [*before.get(i, ()), *trailing[:-1]])
        out.append(text + ("  " + trailing[-1] if trailing else ""))
    out.extend(tail)
    return out
