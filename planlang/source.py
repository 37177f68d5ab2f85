"""Where things are in a plan file: spans, and the map from document paths to spans.

Both readers (YAML and the `.plan` text form) turn bytes into a *document*: the plain
dict/list/scalar tree that a YAML safe loader would give for the YAML form of the plan.
Beside it they return a `SourceMap` that records, for every path into that tree, where the
value (and, for mapping entries, the key) was written. Validation works on documents and
reports problems at `source_map.value(path)`, so both syntaxes get the same diagnostics at
the right place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

PathItem = Union[str, int]
Path = tuple[PathItem, ...]


@dataclass(frozen=True)
class Span:
    """A 1-based line/column range in one file; `end_column` is exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int

    @classmethod
    def point(cls, line: int, column: int, width: int = 1) -> "Span":
        return cls(line, column, line, column + max(width, 1))


@dataclass
class SourceMap:
    """Spans of the values and keys of a document, keyed by their path.

    `value(path)` falls back to the nearest ancestor that has a span, so a diagnostic about
    a defaulted or derived value still points at the section that holds it.
    """

    file: str = "<plan>"
    text: str = ""
    values: dict[Path, Span] = field(default_factory=dict)
    keys: dict[Path, Span] = field(default_factory=dict)

    def value(self, path: Path) -> Span | None:
        path = tuple(path)
        while True:
            if path in self.values:
                return self.values[path]
            if not path:
                return None
            path = path[:-1]

    def key(self, path: Path) -> Span | None:
        """The span of the key of a mapping entry, else of its value."""
        path = tuple(path)
        if path in self.keys:
            return self.keys[path]
        return self.value(path)

    def locate(self, path: Path, key: bool = False) -> tuple[str, "Span | None", str | None]:
        """(file, span, source line) for a diagnostic about the value (or key) at `path`."""
        span = self.key(path) if key else self.value(path)
        return self.file, span, (self.line_text(span.line) if span else None)

    def line_text(self, line: int) -> str:
        lines = self.text.splitlines()
        if 1 <= line <= len(lines):
            return lines[line - 1]
        return ""


class SourceError(Exception):
    """A problem found while reading a file: raised by the readers, carries its place."""

    def __init__(self, code: str, message: str, span: Span | None, hint: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.span = span
        self.hint = hint


class LayeredSourceMap(SourceMap):
    """The source of a plan merged from `extends`: each path is found in the file that
    wrote it (the plan first, then its bases), else at the nearest place in the plan."""

    def __init__(self, layers: list[SourceMap]):
        super().__init__(file=layers[0].file, text=layers[0].text,
                         values=layers[0].values, keys=layers[0].keys)
        self.layers = layers

    def locate(self, path: Path, key: bool = False):
        path = tuple(path)
        for layer in self.layers:
            if path in layer.values:
                return layer.locate(path, key)
        return self.layers[0].locate(path, key)
