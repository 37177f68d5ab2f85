"""Canonical printing of a plan in either syntax, and atomic writes.

`fmt` prints what the file wrote (its own document, `extends` kept, nothing merged),
normalised: sections in the spec's order, defaults that were not written left out, fusion
kinds without options written short.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import yaml

from .plan import Plan
from .source import SourceMap


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def _quoted(value: str) -> str:
    """A double-quoted YAML scalar; characters YAML may not hold raw are escaped."""
    text = json.dumps(value, ensure_ascii=False)
    return "".join(c if c.isprintable() or c in "\t" else
                   (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}") for c in text)


def _scalar(value) -> str:
    """A scalar as YAML that reads back as the same value inside flow collections too:
    words stay bare, other strings (selectors with `*`, `[`, `:` ...) are double-quoted."""
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and yaml.safe_load(value) == value:
            return value
        return _quoted(value)
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        # YAML 1.1 (PyYAML) reads a float only with a dot in the mantissa: 1e-06 is a string.
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    return str(value)


def _flow(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return _scalar(value)


def _block(value, indent: int, path: tuple = ()) -> list[tuple[tuple, str]]:
    """(document path, text) of each line."""
    pad = " " * indent
    lines = []
    for key, v in value.items():
        here = path + (key,)
        if isinstance(v, dict) and v and any(isinstance(x, (dict, list)) for x in v.values()):
            lines.append((here, f"{pad}{_scalar(key)}:"))
            lines.extend(_block(v, indent + 2, here))
        elif isinstance(v, list) and any(isinstance(x, dict) for x in v):
            lines.append((here, f"{pad}{_scalar(key)}:"))
            for i, item in enumerate(v):
                lines.append((here + (i,), f"{pad}  - {_flow(item)}"))
        elif isinstance(v, dict) and len(v) > 3:
            lines.append((here, f"{pad}{_scalar(key)}:"))
            lines.extend(_block(v, indent + 2, here))
        else:
            lines.append((here, f"{pad}{_scalar(key)}: {_flow(v)}"))
    return lines


def yaml_lines(doc: dict) -> list[tuple[tuple, str]]:
    """The canonical YAML lines of a canonical document, each with the path it stands for."""
    return _block(doc, 0)


def write_yaml(doc: dict) -> str:
    """The canonical YAML text of a canonical document."""
    return "\n".join(text for _, text in yaml_lines(doc)) + "\n"


def format_plan(plan: Plan, to: str, source: "SourceMap | None" = None, syntax: str = "yaml") -> str:
    """The canonical text of `plan` in `to` ("yaml" or "plan"). With the `source` map of
    the file it was read from (written in `syntax`), the file's comments are kept
    (planlang/comments.py); should the commented text not read back to the same document,
    the text without comments is returned instead (the caller can compare)."""
    doc = plan.to_document()
    if to == "plan":
        from .text_writer import text_lines
        lines = text_lines(doc)
    else:
        lines = yaml_lines(doc)
    plain = "\n".join(text for _, text in lines) + "\n"
    if source is None or not source.text:
        return plain
    from .comments import attach, extract
    found = extract(source.text, syntax)
    if not found:
        return plain
    text = "\n".join(attach(lines, found, source)) + "\n"
    return text if _reads_back(text, to, doc) else plain


def _reads_back(text: str, to: str, doc: dict) -> bool:
    try:
        if to == "plan":
            from .text_reader import read_text
            got = read_text(text, "<fmt>")[0]
        else:
            from .yaml_reader import read_yaml
            got = read_yaml(text, "<fmt>")[0]
    except Exception:
        return False
    return got == doc


def atomic_write(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
        except FileNotFoundError:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
