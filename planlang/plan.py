"""The plan model: pydantic v2 classes for every section of the language (PLAN_SPEC.md).

A plan is built from a *document* (the plain tree a reader returns) by `Plan.from_document`,
which turns every schema problem into a diagnostic at the offending value. `to_document`
gives the canonical document back (only what was written, normalised), which both writers
print.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from . import names
from .diagnostics import Diagnostic, at
from .source import SourceMap

FusionKind = Literal[names.FUSION_KINDS]  # type: ignore[valid-type]
Dtype = Literal[names.DTYPES]  # type: ignore[valid-type]
OpKind = Literal[names.OP_KINDS]  # type: ignore[valid-type]


# Empty defaults are `default_factory=lambda: []` (or `{}`), not `list` (`dict`): pydantic reads
# the signature of every factory, and a builtin's is parsed from its text signature, which
# costs `planlang lint` a few milliseconds at start-up.
class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=False, allow_inf_nan=False)


# ----------------------------------------------------------------------------- fusions

class SlidingWindow(Section):
    sliding_window: int = Field(gt=0)


class FusionRule(Section):
    """One item of `fusions`: a kind, its options, where (`at`) and whether it must match."""

    kind: FusionKind
    at: str = "**"
    required: bool = True
    # Options (names.FUSION_OPTIONS says which kind takes which). None = read from the model.
    eps: Optional[float] = Field(default=None, gt=0)
    act: Optional[Literal[names.ACTIVATIONS]] = None  # type: ignore[valid-type]
    softcap: Optional[float] = Field(default=None, gt=0)
    sink: Optional[bool] = None
    mask: Optional[Union[Literal[names.ATTENTION_MASKS], SlidingWindow]] = None  # type: ignore[valid-type]
    temperature: Optional[float] = Field(default=None, ge=0)
    top_k: Optional[int] = Field(default=None, gt=0)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _options_belong_to_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("kind"), str) and data["kind"] in names.FUSION_OPTIONS:
            allowed = names.FUSION_OPTIONS[data["kind"]]
            for key in data:
                if key in ("kind", "at", "required") or key in allowed:
                    continue
                if key in cls.model_fields:
                    takes = ", ".join(allowed) or "no options"
                    raise PydanticCustomError(
                        "PL115", "fusion '{kind}' takes no option '{key}'",
                        {"kind": data["kind"], "key": key, "loc": key,
                         "hint": f"'{data['kind']}' takes: {takes}"})
        return data

    def options(self) -> dict[str, Any]:
        """The options written for this rule (those left out are read from the model)."""
        out = {}
        for key in names.FUSION_OPTIONS[self.kind]:
            value = getattr(self, key)
            if value is not None:
                out[key] = value.model_dump() if isinstance(value, BaseModel) else value
        return out


# ----------------------------------------------------------------------------- graphs

_POW2 = re.compile(r"^pow2:(\d+)\.\.(\d+)$")


def expand_buckets(spec: str) -> list[int]:
    """`pow2:A..B` -> the powers of two from A to B (A and B themselves must be powers of two)."""
    m = _POW2.match(spec.strip())
    at_value = {"value_loc": "buckets"}
    if not m:
        raise PydanticCustomError("PL114", "bucket set '{spec}' is not a list of sizes or 'pow2:A..B'",
                                  {"spec": spec, "hint": "write e.g. [1, 2, 4, 8] or \"pow2:1..64\"", **at_value})
    lo, hi = int(m.group(1)), int(m.group(2))
    for v in (lo, hi):
        if v < 1 or v & (v - 1):
            raise PydanticCustomError("PL114", "{v} in '{spec}' is not a power of two",
                                      {"v": v, "spec": spec, "hint": "pow2 ranges run between powers of two, e.g. pow2:1..64",
                                       **at_value})
    if lo > hi:
        raise PydanticCustomError("PL114", "'{spec}' runs backwards", {"spec": spec, "hint": f"write pow2:{hi}..{lo}",
                                                                       **at_value})
    out, b = [], lo
    while b <= hi:
        out.append(b)
        b *= 2
    return out


class Graphs(Section):
    capture: Literal[names.CAPTURE_MODES] = "none"  # type: ignore[valid-type]
    buckets: list[int] = Field(default_factory=lambda: [1])
    buckets_spec: Optional[str] = Field(default=None, exclude=True, repr=False)
    over_max: Literal[names.OVER_MAX] = "eager"  # type: ignore[valid-type]
    warmup: int = Field(default=3, ge=0)
    pdl: Literal[names.PDL_MODES] = "auto"  # type: ignore[valid-type]

    @field_validator("pdl", mode="before")
    @classmethod
    def _pdl_words(cls, value: Any) -> Any:
        return names.pdl_word(value)

    @model_validator(mode="before")
    @classmethod
    def _read_buckets(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("buckets"), str):
            data = dict(data)
            data["buckets_spec"] = data["buckets"].strip()
            data["buckets"] = expand_buckets(data["buckets"])
        return data

    @field_validator("buckets")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v:
            raise PydanticCustomError("PL114", "the bucket list is empty", {"hint": "give at least one batch size, e.g. [1]"})
        for i, b in enumerate(v):
            if b < 1:
                raise PydanticCustomError("PL114", "bucket {b} is not a positive batch size", {"b": b, "loc": i, "hint": "buckets are batch sizes >= 1"})
            if i and b <= v[i - 1]:
                raise PydanticCustomError("PL114", "buckets must increase strictly: {b} follows {p}",
                                          {"b": b, "p": v[i - 1], "loc": i, "hint": "sort the list and drop repeats"})
        return v


class Compile(Section):
    mode: Literal[names.COMPILE_MODES] = "none"  # type: ignore[valid-type]
    fullgraph: bool = False
    dynamic: bool = False


# ----------------------------------------------------------------------------- precision

class PrecisionRule(Section):
    at: str
    dtype: Dtype
    scaling: Optional[Literal[names.SCALINGS]] = None  # type: ignore[valid-type]
    block_size: Optional[int] = Field(default=None, gt=0)
    activations: Optional[Literal[names.ACTIVATION_QUANT]] = None  # type: ignore[valid-type]
    emulate: bool = False

    def effective_scaling(self) -> Optional[str]:
        if self.dtype in names.FP8_DTYPES:
            return self.scaling or "channel"
        if self.dtype in names.BLOCK_DTYPES:
            return "block"
        return None

    def effective_block_size(self) -> Optional[int]:
        if self.dtype in names.BLOCK_DTYPES:
            return names.FORMAT_BLOCK[self.dtype]
        if self.effective_scaling() == "block":
            return self.block_size or names.DEFAULT_BLOCK_SIZE
        return None

    def effective_activations(self) -> str:
        return self.activations or "keep"


class Precision(Section):
    default: Optional[Literal[names.BASE_DTYPES]] = None  # type: ignore[valid-type]
    accumulate: Literal[names.ACCUMULATE_DTYPES] = "fp32"  # type: ignore[valid-type]
    preset: Optional[Literal[names.PRESETS]] = None  # type: ignore[valid-type]
    rules: list[PrecisionRule] = Field(default_factory=lambda: [])


def preset_rules(preset: Optional[str]) -> list[PrecisionRule]:
    """The rules a preset expands to; they go before the plan's own, so the plan's win."""
    linear = "**:linear"  # `linear` excludes the LM head by definition (spec §3)
    table = {
        None: [],
        "bf16": [PrecisionRule(at="**", dtype="bf16")],
        "fp8_weight_only": [PrecisionRule(at=linear, dtype="fp8_e4m3", scaling="channel", activations="keep")],
        "fp8_dynamic": [PrecisionRule(at=linear, dtype="fp8_e4m3", scaling="channel", activations="per_token")],
        "mxfp8": [PrecisionRule(at=linear, dtype="mxfp8", scaling="block", activations="per_block")],
        "nvfp4": [PrecisionRule(at=linear, dtype="nvfp4", scaling="block", activations="per_block")],
        "mxfp4": [PrecisionRule(at=linear, dtype="mxfp4", scaling="block", activations="per_block")],
    }
    return [r.model_copy() for r in table[preset]]


# ----------------------------------------------------------------------------- memory

class OffloadRule(Section):
    at: str
    to: Literal[names.OFFLOAD_TARGETS] = "cpu"  # type: ignore[valid-type]
    prefetch: int = Field(default=1, ge=0)


class RecomputeRule(Section):
    at: str
    policy: Literal[names.RECOMPUTE_POLICIES] = "selective"  # type: ignore[valid-type]
    save: list[OpKind] = Field(default_factory=lambda: [])


class Memory(Section):
    offload: list[OffloadRule] = Field(default_factory=lambda: [])
    recompute: list[RecomputeRule] = Field(default_factory=lambda: [])


class ParallelStyle(Section):
    at: str
    style: Literal[names.PARALLEL_STYLES]  # type: ignore[valid-type]


class Parallel(Section):
    tensor: int = Field(default=1, ge=1)
    sequence: bool = False
    styles: list[ParallelStyle] = Field(default_factory=lambda: [])


class Limits(Section):
    max_seq_len: Optional[int] = Field(default=None, gt=0)
    max_batch: Optional[int] = Field(default=None, gt=0)


ProvenanceValue = Union[str, int, float, bool, dict[str, Union[str, int, float, bool]]]


# ----------------------------------------------------------------------------- the plan

SECTION_ORDER = ("planlang", "name", "target", "mode", "extends", "fusions", "graphs", "compile",
                 "precision", "memory", "parallel", "limits", "provenance")


class Plan(Section):
    """A whole plan. Fields left out keep the spec's defaults; `model_fields_set` (and so
    `to_document`) remembers what the file wrote."""

    planlang: int
    name: Optional[str] = None
    target: str = "auto"
    mode: Literal[names.MODES] = "inference"  # type: ignore[valid-type]
    extends: Optional[str] = None
    fusions: list[FusionRule] = Field(default_factory=lambda: [])
    graphs: Graphs = Field(default_factory=Graphs)
    compile: Compile = Field(default_factory=Compile)
    precision: Precision = Field(default_factory=Precision)
    memory: Memory = Field(default_factory=Memory)
    parallel: Parallel = Field(default_factory=Parallel)
    limits: Limits = Field(default_factory=Limits)
    provenance: dict[str, ProvenanceValue] = Field(default_factory=lambda: {})

    @field_validator("planlang")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != names.LANGUAGE_VERSION:
            raise PydanticCustomError("PL107", "planlang {v} is not a language version this tool reads",
                                      {"v": v, "hint": f"this planlang reads version {names.LANGUAGE_VERSION}"})
        return v

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", v):
            raise PydanticCustomError("PL105", "name '{v}' is not an identifier",
                                      {"v": v, "hint": "use letters, digits, '_', '-' and '.', starting with a letter"})
        return v

    @model_validator(mode="before")
    @classmethod
    def _fusion_items(cls, data: Any) -> Any:
        # A bare kind string is short for {kind: <it>}.
        if isinstance(data, dict) and isinstance(data.get("fusions"), list):
            data = dict(data)
            data["fusions"] = [{"kind": f} if isinstance(f, str) else f for f in data["fusions"]]
        return data

    # -- views

    def precision_rules(self) -> list[PrecisionRule]:
        """The preset's rules followed by the plan's own: the order precedence reads."""
        return preset_rules(self.precision.preset) + list(self.precision.rules)

    @classmethod
    def from_document(cls, doc: Any, source: SourceMap | None = None) -> tuple[Optional["Plan"], list[Diagnostic]]:
        """Validate a document; returns the plan (None on errors) and the diagnostics."""
        if not isinstance(doc, dict):
            what = type(doc).__name__ if doc is not None else "nothing"
            return None, [at(source, (), "PL105", f"a plan is a mapping of sections, found {what}",
                             hint="start with `planlang: 1`")]
        try:
            return cls.model_validate(doc), []
        except ValidationError as exc:
            return None, [_diagnostic(err, doc, source) for err in _one_per_union(exc.errors(), doc)]

    def to_document(self) -> dict:
        """The canonical document: written keys only, in the spec's order, fusions short."""
        return _document(self)


# ----------------------------------------------------------------------------- canonical form

def _document(model: BaseModel) -> Any:
    if isinstance(model, FusionRule):
        out: dict[str, Any] = {"kind": model.kind}
        out.update(model.options())
        if model.at != "**":
            out["at"] = model.at
        if not model.required:
            out["required"] = False
        return out["kind"] if len(out) == 1 else out
    if isinstance(model, Graphs):
        out = {}
        for key in ("capture", "buckets", "over_max", "warmup", "pdl"):
            if key in model.model_fields_set:
                out[key] = model.buckets_spec if key == "buckets" and model.buckets_spec else getattr(model, key)
        return out
    out = {}
    order = SECTION_ORDER if isinstance(model, Plan) else tuple(type(model).model_fields)
    for key in order:
        if key not in model.model_fields_set:
            continue
        value = getattr(model, key)
        if isinstance(value, BaseModel):
            value = _document(value)
            if value == {} and key != "provenance":
                continue
        elif isinstance(value, list):
            value = [_document(v) if isinstance(v, BaseModel) else v for v in value]
        out[key] = value
    return out


# ----------------------------------------------------------------------------- errors -> diagnostics

_WHAT = {"int": "an integer", "float": "a number", "str": "a string", "string": "a string", "bool": "true or false",
         "list": "a list", "dict": "a mapping", "model": "a mapping"}
_BOUNDS = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "at least"),
           "less_than": ("lt", "less than"), "less_than_equal": ("le", "at most")}


def _expected(err: dict) -> str:
    t = err["type"]
    for key, word in _WHAT.items():
        if t.startswith(key + "_") or t == key + "_type":
            return word
    if t == "model_type" or t == "dict_type":
        return "a mapping"
    return ""


def _doc_get(doc: Any, loc: tuple) -> Any:
    cur = doc
    for item in loc:
        try:
            cur = cur[item]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def _is_union_tag(p) -> bool:
    return isinstance(p, str) and (p.startswith(("literal[", "function-")) or p[:1].isupper()
                                   or p in ("str", "int", "float", "bool", "list[int]"))


def _clean_loc(loc: tuple, doc: Any = None) -> tuple:
    """pydantic's error location as a document path: union member tags ('literal[...]',
    'SlidingWindow') are dropped, but a key the document really has stays, however it is
    spelt (a top-level `Target:` is a key, not a tag)."""
    out, cur = [], doc
    for p in loc:
        present = (isinstance(cur, dict) and p in cur) or (isinstance(cur, list) and isinstance(p, int)
                                                           and 0 <= p < len(cur))
        if present:
            cur = cur[p]
            out.append(p)
        elif not _is_union_tag(p):
            cur = None
            out.append(p)
    return tuple(out)


def _diagnostic(err: dict, doc: Any, source: SourceMap | None) -> Diagnostic:
    loc = _clean_loc(tuple(err["loc"]), doc)
    t = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if t.startswith("PL"):
        sub = ctx.get("loc", ctx.get("value_loc"))
        path = loc + ((sub,) if sub is not None else ())
        key = isinstance(ctx.get("loc"), str)  # an option name: point at the key
        return at(source, path, t, err["msg"], hint=ctx.get("hint"), key=key)
    where = ".".join(str(p) for p in loc) or "the plan"
    import difflib  # "did you mean" is asked only of plans with errors
    if t == "extra_forbidden":
        parent = _doc_get(doc, loc[:-1])
        known = _known_keys(loc[:-1], parent)
        bad = str(loc[-1])
        guess = difflib.get_close_matches(bad, known, n=1, cutoff=0.6)
        hint = f"did you mean '{guess[0]}'?" if guess else ("known keys: " + ", ".join(known) if known else None)
        section = ".".join(str(p) for p in loc[:-1]) or "the plan"
        return at(source, loc, "PL104", f"unknown key '{bad}' in {section}", hint=hint, key=True)
    if t == "missing":
        parent = loc[:-1]
        return at(source, parent, "PL106", f"missing required key '{loc[-1]}' in "
                  f"{'.'.join(str(p) for p in parent) or 'the plan'}",
                  hint="add `planlang: 1` at the top" if loc == ("planlang",) else f"add `{loc[-1]}: ...`",
                  key=False)
    if t in ("literal_error", "enum"):
        expected = ctx.get("expected", "")
        options = re.findall(r"'([^']*)'", expected)
        guess = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5) if isinstance(value, str) else []
        hint = f"did you mean '{guess[0]}'?" if guess else f"one of: {', '.join(options)}"
        field = str(loc[-1]) if loc else "value"
        noun = {"kind": "fusion kind", "dtype": "dtype", "default": "dtype", "accumulate": "dtype",
                "mode": "mode", "preset": "precision preset", "style": "parallel style",
                "capture": "capture mode", "scaling": "scaling", "activations": "activation scaling",
                "policy": "recompute policy", "act": "activation", "mask": "attention mask",
                "over_max": "over_max policy", "to": "offload destination"}.get(field, field)
        if isinstance(loc[-1], int) and len(loc) >= 2 and loc[-2] == "save":
            noun = "op kind"
        if loc[:1] == ("compile",) and field == "mode":
            noun = "compile mode"
        return at(source, loc, "PL108", f"unknown {noun} {value!r}", hint=hint)
    expected = _expected(err)
    if expected:
        shown = "nothing" if value is None else f"{value!r}"
        msg = f"{where} must be {expected}, found {shown}"
        if t == "model_type" and loc[:1] == ("fusions",):
            msg = f"{where}: a fusion is a kind name or a mapping with `kind`, found {shown}"
        return at(source, loc, "PL105", msg)
    if t in _BOUNDS and _BOUNDS[t][0] in err.get("ctx", {}):
        key, words = _BOUNDS[t]
        return at(source, loc, "PL105", f"{where} must be {words} {err['ctx'][key]}, found {value!r}")
    # the rest, in pydantic's words
    msg = err["msg"]
    return at(source, loc, "PL105", f"{where}: {msg[0].lower() + msg[1:]}" if msg else f"invalid value at {where}")


def _one_per_union(errors: list[dict], doc: Any) -> list[dict]:
    """A value that fits no member of a union (the attention mask) gets the errors of the
    member its shape was meant for, not one error per member."""
    out = []
    for err in errors:
        loc = err["loc"]
        if "mask" in loc:
            i = loc.index("mask")
            meant_mapping = isinstance(_doc_get(doc, _clean_loc(loc[: i + 1], doc)), dict)
            from_mapping = any(isinstance(p, str) and p == "SlidingWindow" for p in loc)
            if meant_mapping != from_mapping:
                continue
        out.append(err)
    # A misspelt required key reads better as one "unknown key, did you mean" than as that
    # plus "missing required key".
    import difflib
    extra = [e["loc"] for e in out if e["type"] == "extra_forbidden"]
    return [e for e in out if not (
        e["type"] == "missing" and any(x[:-1] == e["loc"][:-1] and isinstance(x[-1], str) and
                                       difflib.get_close_matches(str(e["loc"][-1]), [x[-1]], cutoff=0.6)
                                       for x in extra))]


_SECTION_MODELS = {"graphs": Graphs, "compile": Compile, "precision": Precision, "memory": Memory,
                   "parallel": Parallel, "limits": Limits}


def _known_keys(loc: tuple, parent: Any) -> list[str]:
    """Keys the schema accepts at `loc` (for "did you mean")."""
    if not loc:
        return list(Plan.model_fields)
    head = loc[0]
    if head == "fusions" and loc[-1] == "mask":
        return ["sliding_window"]
    if head == "fusions":
        kind = parent.get("kind") if isinstance(parent, dict) else None
        kind = kind if isinstance(kind, str) else None
        opts = names.FUSION_OPTIONS.get(kind, ())
        return ["kind", "at", "required", *opts]
    model = _SECTION_MODELS.get(head)
    if model is None:
        return []
    nested = {("precision", "rules"): PrecisionRule, ("memory", "offload"): OffloadRule,
              ("memory", "recompute"): RecomputeRule, ("parallel", "styles"): ParallelStyle}
    named = tuple(p for p in loc if isinstance(p, str))
    if named in nested:
        model = nested[named]
    return [k for k, f in model.model_fields.items() if not f.exclude]
