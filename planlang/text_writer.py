"""The canonical `.plan` text of a document: the inverse of `text_reader.read_text`.

Statements come in the order of PLAN_SPEC.md §9, a blank line between groups; consecutive
fusion kinds without options share one `fuse a, b, c` line; a value is quoted only where it
would not read back as itself (a selector holding `,` or a space, a word that is a keyword,
the strings "true" and "false").
"""
from __future__ import annotations

import functools
import json
import math
import re
from typing import Any, Callable

from . import names
from .text_reader import keywords

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")   # the grammar's WORD
_SELECTOR = re.compile(r'[^\s#=,"]+')              # the grammar's SELECTOR
_POW2 = re.compile(r"pow2:\d+\.\.\d+")              # the grammar's POW2_RANGE


@functools.lru_cache(maxsize=1)
def _reserved() -> frozenset[str]:
    # Words that would read back as a keyword or a boolean, not as the string written.
    # `none` is a keyword only right after a list statement's keyword (`fuse none`), so it
    # is quoted only there (kinds, selectors, keys, ops), and stays bare in `capture none`.
    return frozenset(keywords()) - {"none"} | {"true", "false"}


def _lines(doc: dict) -> list[str]:
    _known(doc, ("planlang", "name", "target", "mode", "extends", "fusions", "graphs", "compile",
                 "precision", "memory", "parallel", "limits", "provenance"), "the plan")
    groups = [
        _header(doc),
        _fusions(doc.get("fusions")),
        _graphs(doc.get("graphs")) + _compile(doc.get("compile")) + _limits(doc.get("limits")),
        _precision(doc.get("precision")),
        _memory(doc.get("memory")) + _parallel(doc.get("parallel")),
        _provenance(doc.get("provenance")),
    ]
    lines: list[str] = []
    for group in groups:
        if group:
            if lines:
                lines.append("")
            lines.extend(group)
    return lines


# The section each statement's first word writes (text_lines' paths).
_STATEMENT_KEY = {"planlang": "planlang", "plan": "name", "target": "target", "mode": "mode", "extends": "extends",
                  "fuse": "fusions", "capture": "graphs", "compile": "compile", "limits": "limits",
                  "dtype": "precision", "offload": "memory", "recompute": "memory", "parallel": "parallel",
                  "provenance": "provenance"}


def text_lines(doc: dict) -> list[tuple]:
    """The canonical text form's lines, each with the (top-level) path it stands for; None
    for the blank lines between groups."""
    out = []
    for line in _lines(doc):
        word = line.split(" ", 1)[0]
        out.append(((_STATEMENT_KEY[word],) if word in _STATEMENT_KEY else (out[-1][0] if out else None), line))
    return out


def write_text(doc: dict) -> str:
    """The canonical text form of a canonical document.

    `read_text(write_text(doc))[0] == doc` for every canonical document (a fusion kind with
    nothing else written is the bare string). Keys whose value is None are left out (None is
    every optional key's default). Raises ValueError for what the text form cannot say: an
    unknown key, a list or mapping where a value goes, a float that is not finite.
    """
    return "\n".join(_lines(doc)) + "\n"


# ----------------------------------------------------------------------------- values

def format_value(v: Any, head: bool = False) -> str:
    """One value as the reader reads it back: a number, a bare word, or a quoted string.

    `head`: the value stands right after a list statement's keyword, where `none` is a keyword.
    """
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v!r} has no text form (numbers are finite)")
        return repr(v)  # always has '.' or 'e', so it reads back as a float: 50.0, 1e-06
    if isinstance(v, str):
        if _WORD.fullmatch(v) and v not in _reserved() and not (head and v == "none"):
            return v
        return json.dumps(v, ensure_ascii=False)
    raise ValueError(f"{v!r} has no text form where a single value goes")


def format_selector(s: Any) -> str:
    """A selector, bare when it lexes as one bare selector, else in double quotes."""
    if not isinstance(s, str):
        raise ValueError(f"selector {s!r} is not a string")
    bare = (_SELECTOR.fullmatch(s) and s.isascii() and s.isprintable()
            and s not in _reserved() and s != "none")
    return s if bare else json.dumps(s, ensure_ascii=False)


def _key(k: Any) -> str:
    k = str(k)
    return k if _WORD.fullmatch(k) and k not in _reserved() and k != "none" else json.dumps(k, ensure_ascii=False)


def _known(mapping: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a mapping, found {mapping!r}")
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise ValueError(f"the text form has no way to write {', '.join(map(repr, unknown))} in {where}")


def _present(mapping: dict, key: str) -> bool:
    return mapping.get(key) is not None


def _clauses(mapping: dict, keys: tuple[str, ...], write: Callable[[Any], str] = format_value) -> str:
    """` key value` for each key present (the clause keyword is the document key)."""
    return "".join(f" {key} {write(mapping[key])}" for key in keys if _present(mapping, key))


def _flag(mapping: dict, key: str) -> str:
    """` fullgraph` for true, ` fullgraph false` for false (written out, so it reads back)."""
    if not _present(mapping, key):
        return ""
    v = mapping[key]
    return f" {key}" if v is True else f" {key} {format_value(v)}"


def _items(items: Any, write: Callable[[Any], str], where: str) -> list:
    if not isinstance(items, list):
        raise ValueError(f"{where} must be a list, found {items!r}")
    return [write(item) for item in items]


# ----------------------------------------------------------------------------- statements

def _header(doc: dict) -> list[str]:
    lines = []
    if _present(doc, "planlang"):
        lines.append(f"planlang {format_value(doc['planlang'])}")
    if _present(doc, "name"):
        line = f"plan {format_value(doc['name'])}"
        if _present(doc, "target"):
            line += f" on {format_value(doc['target'])}"
        if _present(doc, "mode"):
            line += f" for {format_value(doc['mode'])}"
        lines.append(line)
    else:
        lines += [f"{key} {format_value(doc[key])}" for key in ("target", "mode") if _present(doc, key)]
    if _present(doc, "extends"):
        lines.append(f"extends {json.dumps(doc['extends'], ensure_ascii=False)}"
                     if isinstance(doc["extends"], str) else f"extends {format_value(doc['extends'])}")
    return lines


def _fusions(fusions: Any) -> list[str]:
    if fusions is None:
        return []
    if fusions == []:
        return ["fuse none"]
    lines: list[str] = []
    run: list[str] = []  # consecutive bare kinds share a line
    for item in _items(fusions, lambda x: x, "fusions"):
        if isinstance(item, dict):
            if run:
                lines.append("fuse " + ", ".join(run))
                run = []
            lines.append("fuse " + _fusion_item(item))
        else:
            run.append(format_value(item, head=True))
    if run:
        lines.append("fuse " + ", ".join(run))
    return lines


def _fusion_item(item: dict) -> str:
    if "kind" not in item:
        raise ValueError(f"fusion item {item!r} has no kind")
    options = [k for k in item if k not in ("kind", "at", "required") and item[k] is not None]
    text = format_value(item["kind"], head=True)
    if options or not (_present(item, "at") or item.get("required") is False):
        # `kind()` keeps {kind: k} a mapping, so that document reads back unchanged
        text += "(" + ", ".join(f"{_option_name(k)}={_option_value(item[k])}" for k in options) + ")"
    if _present(item, "at"):
        text += f" at {format_selector(item['at'])}"
    if item.get("required") is False:
        text += " optional"
    elif item.get("required") not in (None, True):
        raise ValueError(f"fusion 'required' must be true or false, found {item['required']!r}")
    return text


def _option_name(name: Any) -> str:
    if not isinstance(name, str) or not _WORD.fullmatch(name):
        raise ValueError(f"fusion option {name!r} has no text form")
    return name


def _option_value(v: Any) -> str:
    if isinstance(v, dict):  # {sliding_window: 4096} -> sliding_window(4096)
        if len(v) != 1:
            raise ValueError(f"option value {v!r} has no text form (one key, as sliding_window(N))")
        (name, inner), = v.items()
        return f"{_option_name(name)}({format_value(inner)})"
    return format_value(v)


def _graphs(graphs: Any) -> list[str]:
    if graphs is None:
        return []
    _known(graphs, ("capture", "buckets", "over_max", "warmup", "pdl"), "graphs")
    line = "capture"
    if _present(graphs, "capture"):
        line += f" {format_value(graphs['capture'])}"
    if _present(graphs, "buckets"):
        line += " buckets" + _buckets(graphs["buckets"])
    line += _clauses(graphs, ("over_max", "warmup"))
    if _present(graphs, "pdl"):  # a bare word (on is reserved elsewhere, not after pdl)
        pdl = names.pdl_word(graphs["pdl"])
        line += f" pdl {pdl if pdl in names.PDL_MODES else format_value(pdl)}"
    return [line] if line != "capture" else []


def _buckets(buckets: Any) -> str:
    if isinstance(buckets, str):
        return " " + (buckets if _POW2.fullmatch(buckets) else json.dumps(buckets, ensure_ascii=False))
    for b in _items(buckets, lambda x: x, "graphs.buckets"):
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"bucket {b!r} has no text form (buckets are numbers)")
    return (" " + ",".join(format_value(b) for b in buckets)) if buckets else ""


def _compile(section: Any) -> list[str]:
    if section is None:
        return []
    _known(section, ("mode", "fullgraph", "dynamic"), "compile")
    line = "compile"
    if _present(section, "mode"):
        line += f" {format_value(section['mode'])}"
    line += _flag(section, "fullgraph") + _flag(section, "dynamic")
    return [line] if line != "compile" else []


def _limits(limits: Any) -> list[str]:
    if limits is None:
        return []
    _known(limits, ("max_seq_len", "max_batch"), "limits")
    clauses = _clauses(limits, ("max_seq_len", "max_batch"))
    return ["limits" + clauses] if clauses else []


def _precision(precision: Any) -> list[str]:
    if precision is None:
        return []
    _known(precision, ("default", "accumulate", "preset", "rules"), "precision")
    lines = []
    if _present(precision, "default"):
        lines.append(f"dtype default {format_value(precision['default'])}" + _clauses(precision, ("accumulate",)))
    elif _present(precision, "accumulate"):
        lines.append(f"dtype accumulate {format_value(precision['accumulate'])}")
    if _present(precision, "preset"):
        lines.append(f"dtype preset {format_value(precision['preset'])}")
    rules = precision.get("rules")
    if rules == []:
        lines.append("dtype none")
    elif rules is not None:
        lines += _items(rules, _precision_rule, "precision.rules")
    return lines


def _precision_rule(rule: Any) -> str:
    _known(rule, ("at", "dtype", "scaling", "block_size", "activations", "emulate"), "a precision rule")
    if not (_present(rule, "at") and _present(rule, "dtype")):
        raise ValueError(f"precision rule {rule!r} needs `at` and `dtype` in the text form")
    return (f"dtype {format_selector(rule['at'])} = {format_value(rule['dtype'])}"
            + _clauses(rule, ("scaling", "block_size", "activations")) + _flag(rule, "emulate"))


def _memory(memory: Any) -> list[str]:
    if memory is None:
        return []
    _known(memory, ("offload", "recompute"), "memory")
    lines = []
    for key, write in (("offload", _offload_rule), ("recompute", _recompute_rule)):
        rules = memory.get(key)
        if rules == []:
            lines.append(f"{key} none")
        elif rules is not None:
            lines += _items(rules, write, f"memory.{key}")
    return lines


def _offload_rule(rule: Any) -> str:
    _known(rule, ("at", "to", "prefetch"), "an offload rule")
    return f"offload {format_selector(rule.get('at'))}" + _clauses(rule, ("to", "prefetch"))


def _recompute_rule(rule: Any) -> str:
    _known(rule, ("at", "policy", "save"), "a recompute rule")
    line = f"recompute {format_selector(rule.get('at'))}" + _clauses(rule, ("policy",))
    if _present(rule, "save"):
        ops = _items(rule["save"], lambda op: format_value(op, head=True), "recompute save")
        line += " save " + (", ".join(ops) if ops else "none")
    return line


def _parallel(parallel: Any) -> list[str]:
    if parallel is None:
        return []
    _known(parallel, ("tensor", "sequence", "styles"), "parallel")
    lines = []
    if _present(parallel, "tensor"):
        lines.append(f"parallel tensor {format_value(parallel['tensor'])}" + _flag(parallel, "sequence"))
    elif _present(parallel, "sequence"):
        lines.append("parallel" + _flag(parallel, "sequence"))
    styles = parallel.get("styles")
    if styles == []:
        lines.append("parallel style none")
    elif styles is not None:
        lines += _items(styles, _style, "parallel.styles")
    return lines


def _style(style: Any) -> str:
    _known(style, ("at", "style"), "a parallel style")
    return f"parallel style {format_selector(style.get('at'))} {format_value(style.get('style'))}"


def _provenance(provenance: Any) -> list[str]:
    if provenance is None:
        return []
    _known(provenance, tuple(provenance) if isinstance(provenance, dict) else (), "provenance")
    if not provenance:
        return ["provenance none"]
    lines = []
    for key, v in provenance.items():
        if v is None:
            continue
        if isinstance(v, dict):
            pairs = ", ".join(f"{_key(k)}: {format_value(x)}" for k, x in v.items() if x is not None)
            lines.append(f"provenance {_key(key)} {{{pairs}}}")
        else:
            lines.append(f"provenance {_key(key)} {format_value(v)}")
    return lines
