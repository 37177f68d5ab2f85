"""The YAML form: bytes -> (document, SourceMap), read safely.

A safe composer builds the node tree (no tags are constructed, so no object is ever
created from the file); we turn nodes into plain data ourselves, which lets us keep the
line and column of every key and value, refuse duplicate keys, and bound how far aliases
expand (an alias bomb is refused after a few thousand nodes, in microseconds).
"""
from __future__ import annotations

import yaml

from .source import SourceError, SourceMap, Span

MAX_BYTES = 1 << 20
MAX_NODES = 20_000  # far above any real plan; an alias bomb reaches it at once

_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp")}


def decode(data: bytes | str, file: str) -> str:
    """Bytes of a plan file -> text, refusing oversized and non-UTF-8 input (PL100)."""
    if isinstance(data, str):
        if len(data.encode("utf-8", "surrogatepass")) > MAX_BYTES:
            raise SourceError("PL100", f"{file} is larger than 1 MiB", None,
                              "a plan is a few hundred lines; split it with `extends`")
        return data
    if len(data) > MAX_BYTES:
        raise SourceError("PL100", f"{file} is larger than 1 MiB ({len(data)} bytes)", None,
                          "a plan is a few hundred lines; split it with `extends`")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SourceError("PL100", f"{file} is not UTF-8 (byte 0x{data[exc.start]:02x})",
                          Span.point(line, col), "save the plan as UTF-8") from None
    return text.removeprefix("\ufeff")


def _span(node) -> Span:
    s, e = node.start_mark, node.end_mark
    return Span(s.line + 1, s.column + 1, e.line + 1, e.column + 1)


class _Builder:
    def __init__(self, source: SourceMap):
        self.source = source
        self.count = 0
        self._scalar = yaml.constructor.SafeConstructor()

    def build(self, node, path):
        self.count += 1
        if self.count > MAX_NODES:
            raise SourceError("PL103", f"the document expands to more than {MAX_NODES} nodes "
                              "(an alias bomb?)", _span(node),
                              "write the plan out without anchors and aliases")
        self.source.values[path] = _span(node)
        if isinstance(node, yaml.MappingNode):
            if node.tag != _TAG + "map":
                raise self._tag_error(node)
            out: dict = {}
            first: dict = {}
            for knode, vnode in node.value:
                if knode.tag == _TAG + "merge":
                    raise SourceError("PL103", "YAML merge keys (<<) are not supported",
                                      _span(knode), "write the keys out, or use `extends`")
                if not isinstance(knode, yaml.ScalarNode):
                    raise SourceError("PL105", "a key must be a plain word", _span(knode), None)
                key = self.scalar(knode)
                if not isinstance(key, str):
                    key = str(key) if path[:1] == ("provenance",) else key
                    if not isinstance(key, str):
                        raise SourceError("PL105", f"key {knode.value!r} is not a name",
                                          _span(knode), "keys are words such as `fusions`")
                if key in out:
                    line = first[key].line
                    raise SourceError("PL102", f"duplicate key '{key}' (first given at line {line})",
                                      _span(knode), "remove one of them")
                first[key] = _span(knode)
                self.source.keys[path + (key,)] = _span(knode)
                out[key] = self.build(vnode, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                raise self._tag_error(node)
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        return self.scalar(node)

    def scalar(self, node):
        if node.tag not in _SCALAR_TAGS:
            raise self._tag_error(node)
        if node.tag == _TAG + "timestamp":
            return node.value  # dates stay the text written (provenance dates)
        if node.tag == _TAG + "str":
            return node.value
        try:
            return self._scalar.construct_object(node)
        except Exception:
            raise SourceError("PL105", f"cannot read {node.value!r}", _span(node), None) from None

    @staticmethod
    def _tag_error(node) -> SourceError:
        return SourceError("PL103", f"YAML tag {node.tag!r} is not allowed in a plan",
                           _span(node), "plans hold plain mappings, lists, strings and numbers")


def read_yaml(data: bytes | str, file: str = "<plan>") -> tuple[object, SourceMap]:
    """Parse the YAML form; raises SourceError with the place of the first problem."""
    text = decode(data, file)
    source = SourceMap(file=file, text=text)
    try:
        nodes = list(yaml.compose_all(text, Loader=_SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        span = Span.point(mark.line + 1, mark.column + 1) if mark else None
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        if "found undefined alias" in problem or "found undefined tag" in problem:
            raise SourceError("PL103", problem + context, span, None) from None
        raise SourceError("PL101", f"YAML syntax error: {problem}{context}", span,
                          "check the indentation and the `key: value` form around here") from None
    except yaml.YAMLError as exc:
        raise SourceError("PL101", f"YAML syntax error: {exc}", None, None) from None
    except RecursionError:
        raise SourceError("PL101", "the document is nested too deeply", None, None) from None
    if len(nodes) > 1:
        raise SourceError("PL101", "a plan file holds one YAML document, found several",
                          _span(nodes[1]), "remove the `---` separators")
    if not nodes or nodes[0] is None:
        return {}, source
    try:
        doc = _Builder(source).build(nodes[0], ())
    except RecursionError:
        raise SourceError("PL101", "the document is nested too deeply", None, None) from None
    return doc, source
