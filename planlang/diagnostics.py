"""Diagnostics: the one type every problem becomes, the code table, and the renderers
(text in the rustc/ruff style, JSON, SARIF 2.1.0)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .source import SourceMap, Span

SEVERITIES = ("error", "warning", "note")

# Every diagnostic code, once: (default severity, one-line title). docs/diagnostics.md
# documents each with a bad example and the fix; a test checks the two agree.
CODES: dict[str, tuple[str, str]] = {
    # PL1xx: reading, syntax and schema
    "PL100": ("error", "file cannot be read (missing, too large, not UTF-8)"),
    "PL101": ("error", "syntax error"),
    "PL102": ("error", "duplicate key or statement"),
    "PL103": ("error", "YAML anchors, aliases or tags refused"),
    "PL104": ("error", "unknown key"),
    "PL105": ("error", "wrong type or invalid value"),
    "PL106": ("error", "missing required key"),
    "PL107": ("error", "unsupported language version"),
    "PL108": ("error", "unknown name (fusion kind, dtype, mode, preset, ...)"),
    "PL110": ("error", "invalid selector"),
    "PL111": ("error", "extends points outside the project"),
    "PL112": ("error", "extends cycle"),
    "PL113": ("error", "extended plan not found or invalid"),
    "PL114": ("error", "invalid bucket set"),
    "PL115": ("error", "option not taken by this fusion kind"),
    "PL130": ("error", "invalid hardware file"),
    # PL2xx: hardware
    "PL201": ("error", "dtype not supported by the target"),
    "PL202": ("error", "CUDA graphs need a CUDA target"),
    "PL203": ("error", "unknown target"),
    "PL204": ("note", "no hardware checks (target auto, no GPU found)"),
    "PL205": ("note", "dtype emulated as quantize-dequantize"),
    "PL206": ("note", "kernel choice on this target"),
    "PL207": ("error", "does not fit the target's memory"),
    "PL208": ("warning", "Triton kernels unavailable on target: reference path runs"),
    "PL209": ("error", "tensor parallelism needs a CUDA target or the CPU"),
    "PL210": ("error", "pdl: on needs a target of sm_90 or newer"),
    # PL3xx: consistency
    "PL301": ("error", "same fusion kind twice over overlapping selectors"),
    "PL302": ("warning", "rule never wins"),
    "PL303": ("error", "sampling takes no 'at'"),
    "PL304": ("warning", "bucket above limits.max_batch"),
    "PL305": ("warning", "recompute does nothing in inference mode"),
    "PL306": ("error", "low-precision format in training needs emulate: true"),
    "PL307": ("error", "tensor-parallel degree does not divide the model"),
    "PL308": ("warning", "regular expression with an unescaped '.' before a digit"),
    "PL309": ("error", "rule matches nothing in the model"),
    "PL310": ("error", "option does not fit the precision rule"),
    "PL311": ("error", "fusion option disagrees with the model"),
    "PL312": ("warning", "optional rule matches nothing in the model"),
    "PL313": ("error", "GEMM shape does not fit the dtype's kernel"),
    "PL314": ("warning", "fused GEMM parts have different dtypes: fusion not made"),
    "PL315": ("warning", "setting has no effect"),
    "PL316": ("error", "offload cannot pin host memory"),
    "PL317": ("error", "accumulate dtype the runtime does not honour"),
    # PL4xx: performance hints
    "PL401": ("warning", "compile mode captures CUDA graphs alongside planlang's capture"),
    "PL402": ("warning", "bucket gap wastes more than half of the padded batch"),
    "PL403": ("warning", "offload prefetch cannot hide the copy"),
    "PL404": ("note", "predicted performance"),
}


@dataclass
class Diagnostic:
    code: str
    message: str
    severity: str = ""
    file: str = "<plan>"
    span: Span | None = None
    hint: str | None = None
    source_line: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.severity:
            self.severity = CODES[self.code][0]
        assert self.severity in SEVERITIES, self.severity

    @property
    def line(self) -> int:
        return self.span.line if self.span else 1

    @property
    def column(self) -> int:
        return self.span.column if self.span else 1

    def to_json(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "hint": self.hint,
        }


def at(source: SourceMap | None, path, code: str, message: str, *, hint: str | None = None,
       severity: str = "", key: bool = False, file: str | None = None) -> Diagnostic:
    """A diagnostic placed at the value (or key) at `path` of a document."""
    where, span, line_text = (source.locate(tuple(path), key) if source is not None
                              else ("<plan>", None, None))
    return Diagnostic(code, message, severity, file or where, span, hint, line_text)


def has_errors(diags: Iterable[Diagnostic], strict: bool = False) -> bool:
    failing = ("error", "warning") if strict else ("error",)
    return any(d.severity in failing for d in diags)


def sort_key(d: Diagnostic):
    return (d.file, d.line, d.column, d.code)


# ---------------------------------------------------------------------------- renderers

def render_text(diags: Iterable[Diagnostic], color: bool = False) -> str:
    out = []
    for d in diags:
        where = f"{d.file}:{d.line}:{d.column}" if d.span is not None else d.file  # no made-up place
        out.append(f"{where}: {d.severity}[{d.code}]: {d.message}")
        if d.span is not None and d.source_line is not None and d.source_line.strip():
            num = str(d.span.line)
            pad = " " * len(num)
            width = (d.span.end_column - d.span.column) if d.span.end_line == d.span.line else \
                len(d.source_line) - d.span.column + 1
            width = max(1, min(width, max(1, len(d.source_line) - d.span.column + 1)))
            out.append(f"   {num} | {d.source_line}")
            out.append(f"   {pad} | {' ' * (d.span.column - 1)}{'^' * width}")
        if d.hint:
            out.append(f"   = hint: {d.hint}")
    return "\n".join(out)


def render_json(diags: list[Diagnostic], ok: bool) -> str:
    import json  # the text format, lint's default, needs no json
    return json.dumps({"ok": ok, "diagnostics": [d.to_json() for d in diags]}, indent=2)


SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def render_sarif(diags: list[Diagnostic], tool_version: str) -> str:
    """SARIF 2.1.0 as GitHub code scanning accepts it: one run, rules from the code table."""
    import json
    used = sorted({d.code for d in diags})
    rules = [{
        "id": code,
        "name": code,
        "shortDescription": {"text": CODES[code][1]},
        "helpUri": f"https://planlang.dev/docs/diagnostics#{code.lower()}",
        "defaultConfiguration": {"level": CODES[code][0]},
    } for code in used]
    index = {code: i for i, code in enumerate(used)}
    results = []
    for d in diags:
        text = d.message + (f"\nhint: {d.hint}" if d.hint else "")
        region = {"startLine": d.line, "startColumn": d.column}
        if d.span is not None:
            region.update(endLine=d.span.end_line, endColumn=d.span.end_column)
        results.append({
            "ruleId": d.code,
            "ruleIndex": index[d.code],
            "level": d.severity,
            "message": {"text": text},
            "locations": [{"physicalLocation": {
                "artifactLocation": {"uri": d.file.replace("\\", "/"), "uriBaseId": "%SRCROOT%"},
                "region": region,
            }}],
        })
    doc = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "planlang",
                "version": tool_version,
                "informationUri": "https://planlang.dev",
                "rules": rules,
            }},
            "results": results,
        }],
    }
    return json.dumps(doc, indent=2)
