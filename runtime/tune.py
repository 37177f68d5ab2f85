"""`planlang tune`: search plans on the hardware at hand and write the best as an ordinary,
reviewable plan file (docs/tune.md).

1. **Space.** Derived from the model and the target: every subset of the fusion kinds that
   find sites in this model, bucket sets, every compile mode, capture on/off, every
   precision preset, offload only when the model does not fit the device. `--space FILE`
   replaces any axis. Buckets only vary where graphs are captured, so the size is
   fusions x compile x precision x offload x (bucket sets + 1).
2. **Pruning.** Every candidate is a `Plan`, linted with the validator (and, once per
   precision/memory setting, with the model): errors, and warnings other than "no Triton
   on this target", mean it never runs. The roofline model `explain` and `bench` use
   (`predict.predict_decode`) ranks the rest.
3. **Measuring.** A fresh copy of the model per candidate, `apply`, the accuracy gate against
   the unplanned model on the shipped evaluation text (`accuracy.compare`), then decode
   steps at `--context` per scored batch size with the bench machinery, beside the
   unplanned model (and torch.compile reduce-overhead on a GPU) timed in the same run.
4. **Search.** Start from the best-predicted candidate of each precision setting (the
   roofline knows least about low-precision kernels and nothing about their accuracy),
   then coordinate descent from the best that passed the gate: the neighbours (one axis
   changed, one fusion kind toggled) the roofline does not predict to be more than
   `prune_margin` slower are measured most promising first (5% bands of the prediction,
   the cheapest trial first within a band); a neighbour at
   least 1% better becomes the centre. It stops at a local optimum, at `--budget`, or
   at a quarter of the space.
5. **Records.** optuna with SQLite storage: one study per model identity, target, device,
   driver, torch, triton and planlang versions, context and scored batch sizes; one trial
   per measured candidate. A restarted run reuses every finished record and measures only
   what is missing.

The score of a candidate is the geometric mean, over the scored batch sizes, of its decode
step time over the unplanned model's, both measured in the same run (lower is better).
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import datetime as _dt
import difflib
import gc
import hashlib
import itertools
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from planlang import __version__, names
from planlang.diagnostics import Diagnostic
from planlang.loader import PLAN_SUFFIXES, LoadedPlan, name_from_stem
from planlang.plan import Graphs, Plan
from planlang.source import SourceError
from planlang.writer import atomic_write, format_plan

from .kernels.backend import PDL_ENV, pdl_status

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2

# Fusion kinds the search varies: the graph-site kinds (sampling is the generation loop,
# which a decode step does not time; add it to the written plan by hand).
SEARCH_KINDS = tuple(k for k in names.FUSION_KINDS if k != "sampling")
PRECISIONS = ("none",) + names.PRESETS          # "none": the model's own dtypes
# Lint warnings a candidate may carry and still be written: inherent to the target.
ACCEPTED_WARNINGS = ("PL208",)                  # no Triton on the target: the reference runs
DEFAULT_MAX_ERROR = 0.05                        # when neither --max-error nor --min-agreement is given
DEFAULT_PRUNE_MARGIN = 0.15
IMPROVE = 0.01                                  # a move of the search needs a 1% better score
SPACE_KEYS = ("fusions", "fusion_kinds", "buckets", "compile", "capture", "precision", "offload", "pdl",
              "prune_margin")
_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8_weight_only": 1, "fp8_dynamic": 1,
          "mxfp8": 1 + 1 / 32, "nvfp4": 0.5 + 1 / 16, "mxfp4": 0.5 + 1 / 32}
_QUANT_ACTIVATIONS = ("fp8_dynamic", "mxfp8", "nvfp4", "mxfp4")  # one more kernel per linear


class TuneError(Exception):
    """tune could not run or found nothing: the message (and hint) say why; `code` is the
    exit status (2: usage or unreadable input, 1: nothing passed / nothing measured)."""

    def __init__(self, message: str, hint: Optional[str] = None, code: int = EXIT_USAGE):
        self.message, self.hint, self.code = message, hint, code
        super().__init__(message + (f" (hint: {hint})" if hint else ""))


# ============================================================================= the space

@dataclass(frozen=True)
class BucketSet:
    """A bucket set as the plan writes it: `pow2:A..B` or a list."""

    sizes: tuple[int, ...]
    spec: Optional[str] = None  # "pow2:1..16" when written so

    @property
    def label(self) -> str:
        return self.spec or "[" + ", ".join(map(str, self.sizes)) + "]"

    def value(self):
        return self.spec if self.spec else list(self.sizes)

    def bucket_for(self, batch: int) -> int:
        return next((b for b in self.sizes if b >= batch), batch)


def pow2_set(lo: int, hi: int) -> BucketSet:
    sizes, b = [], lo
    while b <= hi:
        sizes.append(b)
        b *= 2
    return BucketSet(tuple(sizes), f"pow2:{lo}..{hi}")


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def default_bucket_sets(batches: Sequence[int]) -> list[BucketSet]:
    """Three bucket sets holding every scored batch size: powers of two up to the largest
    (rounded up to a power of two), the same to four times that, and 1.5x steps."""
    top = _next_pow2(max(batches))
    scored = set(batches)

    def holding(bs: BucketSet) -> BucketSet:
        if scored <= set(bs.sizes):
            return bs
        return BucketSet(tuple(sorted(set(bs.sizes) | scored)))
    fine = sorted({v for p in range(top.bit_length()) for v in (1 << p, 3 << p >> 1) if 1 <= v <= top})
    sets = [holding(pow2_set(1, top)), holding(pow2_set(1, 4 * top)), holding(BucketSet(tuple(fine))),
            holding(pow2_set(1, 16 * top))]
    out: list[BucketSet] = []
    for s in sets:
        if s.sizes not in [o.sizes for o in out]:
            out.append(s)
    return out[:3]


@dataclass(frozen=True)
class Candidate:
    """One point of the space; `document()` is the plan it stands for."""

    fusions: tuple[str, ...]
    capture: str
    buckets: Optional[BucketSet]          # only with capture: cuda_graph
    compile: str
    precision: str                        # "none" or a preset
    offload: Optional[str] = None         # a selector of layers offloaded to the host
    pdl: str = "auto"                     # graphs.pdl

    @property
    def key(self) -> str:
        # pdl joins the key only off its default, so records of earlier studies still match
        return (f"fusions={'+'.join(self.fusions) or '-'};capture={self.capture};"
                f"buckets={self.buckets.label if self.buckets else '-'};compile={self.compile};"
                f"precision={self.precision};offload={self.offload or '-'}"
                + (f";pdl={self.pdl}" if self.pdl != "auto" else ""))

    def max_batch(self, batches: Sequence[int]) -> int:
        return max([*batches, *(self.buckets.sizes if self.buckets else ())])

    def document(self, name: str, target: str, batches: Sequence[int]) -> dict:
        doc: dict[str, Any] = {"planlang": 1, "name": name, "target": target}
        if self.fusions:
            doc["fusions"] = list(self.fusions)
        graphs: dict[str, Any] = {"capture": self.capture}
        if self.buckets is not None:
            graphs["buckets"] = self.buckets.value()
        if self.pdl != "auto":
            graphs["pdl"] = self.pdl
        doc["graphs"] = graphs
        doc["compile"] = {"mode": self.compile}
        if self.precision != "none":
            doc["precision"] = {"preset": self.precision}
        if self.offload:
            doc["memory"] = {"offload": [{"at": self.offload, "to": "cpu", "prefetch": 1}]}
        doc["limits"] = {"max_batch": self.max_batch(batches)}
        return doc

    def plan(self, name: str, target: str, batches: Sequence[int]) -> Plan:
        return Plan.model_validate(self.document(name, target, batches))


@dataclass
class Space:
    """The axes of the search; each a list of values."""

    fusions: list[tuple[str, ...]]
    buckets: list[BucketSet]
    compile: list[str]
    capture: list[str]
    precision: list[str]
    offload: list[Optional[str]]
    pdl: list[str] = field(default_factory=lambda: ["auto"])
    fusion_kinds: tuple[str, ...] = ()          # the kinds the default fusion axis takes subsets of
    prune_margin: Optional[float] = DEFAULT_PRUNE_MARGIN
    from_file: tuple[str, ...] = ()             # axes the --space file replaced
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        per_capture = sum(len(self.buckets) if c == "cuda_graph" else 1 for c in self.capture)
        return (len(self.fusions) * len(self.compile) * len(self.precision) * len(self.offload) * len(self.pdl)
                * per_capture)

    def candidates(self) -> Iterable[Candidate]:
        for prec, fus, cap, comp, off, pdl in itertools.product(self.precision, self.fusions, self.capture,
                                                               self.compile, self.offload, self.pdl):
            for bs in (self.buckets if cap == "cuda_graph" else [None]):
                yield Candidate(fus, cap, bs, comp, prec, off, pdl)

    def describe(self) -> list[tuple[str, int, str]]:
        def src(axis):
            return " (--space)" if axis in self.from_file else ""
        if self.fusion_kinds and "fusions" not in self.from_file:
            fus = f"every subset of {', '.join(self.fusion_kinds)}" + \
                  (" (the kinds that find sites in this model)" if "fusion_kinds" not in self.from_file else " (--space)")
        else:
            fus = "; ".join(_fusions_label(f, self.fusion_kinds) for f in self.fusions) + src("fusions")
        rows = [("fusions", len(self.fusions), fus),
                ("capture", len(self.capture), ", ".join(self.capture) + src("capture")),
                ("buckets", len(self.buckets), "; ".join(b.label for b in self.buckets)
                 + " (varied with cuda_graph only)" + src("buckets")),
                ("compile", len(self.compile), ", ".join(self.compile) + src("compile")),
                ("precision", len(self.precision), ", ".join(self.precision) + src("precision")),
                ("offload", len(self.offload), ", ".join(o or "none" for o in self.offload) + src("offload")),
                ("pdl", len(self.pdl), ", ".join(self.pdl) + src("pdl"))]
        return rows

    def size_formula(self) -> str:
        per_capture = " + ".join(f"{len(self.buckets)}" if c == "cuda_graph" else "1" for c in self.capture)
        return (f"{len(self.fusions)} fusions x {len(self.compile)} compile x {len(self.precision)} precision"
                + (f" x {len(self.offload)} offload" if len(self.offload) > 1 else "")
                + (f" x {len(self.pdl)} pdl" if len(self.pdl) > 1 else "")
                + f" x ({per_capture}) capture/buckets = {self.size}")


def _fusions_label(f: Sequence[str], all_kinds: Sequence[str] = ()) -> str:
    if not f:
        return "none"
    if all_kinds and set(f) == set(all_kinds):
        return "all"
    if all_kinds and len(all_kinds) - len(f) <= 2 and set(f) < set(all_kinds):
        return "all but " + ", ".join(k for k in all_kinds if k not in f)
    return ", ".join(f)


def _ordered(kinds: Iterable[str]) -> tuple[str, ...]:
    s = set(kinds)
    return tuple(k for k in names.FUSION_KINDS if k in s)


def all_subsets(kinds: Sequence[str]) -> list[tuple[str, ...]]:
    kinds = _ordered(kinds)
    out = []
    for r in range(len(kinds), -1, -1):
        out.extend(itertools.combinations(kinds, r))
    return out


def default_space(site_kinds: Sequence[str], batches: Sequence[int], *, fits: bool, n_layers: int,
                  model_dtype: Optional[str]) -> Space:
    """The space `tune` searches when no --space file replaces an axis."""
    precision = [p for p in PRECISIONS if not (p == model_dtype == "bf16")]  # bf16 on a bf16 model is "none"
    notes = []
    if model_dtype == "bf16":
        notes.append("precision bf16 is left out: the model runs in bf16 already (it is the same as none)")
    offload: list[Optional[str]] = [None]
    if not fits:
        offload.append(f"layers[{n_layers // 2}:{n_layers}]")
        notes.append(f"the model does not fit the device: offloading layers[{n_layers // 2}:{n_layers}] is searched")
    return Space(fusions=all_subsets(site_kinds), buckets=default_bucket_sets(batches),
                 compile=list(names.COMPILE_MODES), capture=list(names.CAPTURE_MODES), precision=precision,
                 offload=offload, fusion_kinds=_ordered(site_kinds), notes=notes)


# ----------------------------------------------------------------------------- --space FILE

def read_space_file(path: str | Path) -> tuple[dict, Any]:
    """The --space file's document and source map; TuneError (exit 2) for unreadable files."""
    from planlang.yaml_reader import read_yaml
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise TuneError(f"--space {path}: no such file") from None
    except IsADirectoryError:
        raise TuneError(f"--space {path}: is a directory, not a YAML file") from None
    except OSError as exc:
        raise TuneError(f"--space {path}: cannot read ({exc.strerror})") from None
    try:
        doc, source = read_yaml(data, str(p))
    except SourceError as exc:
        where = f"{p}:{exc.span.line}:{exc.span.column}" if exc.span else str(p)
        raise TuneError(f"{where}: {exc.message}", exc.hint) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise TuneError(f"{p}: a search space is a mapping of axes (keys: {', '.join(SPACE_KEYS)})",
                        "e.g.  compile: [none, default]")
    return doc, source


def apply_space_file(space: Space, doc: dict, source, file: str, site_kinds: Sequence[str]) -> Space:
    """Replace the axes the file names; every problem is a TuneError naming file:line:col."""
    def where(path, key=False) -> str:
        if source is None:
            return file
        span = source.key(path) if key else source.value(path)
        return f"{file}:{span.line}:{span.column}" if span else file

    def fail(path, msg, hint=None, key=False):
        raise TuneError(f"{where(path, key)}: {msg}", hint)

    def str_list(key, allowed, noun):
        value = doc[key]
        if not isinstance(value, list) or not value:
            fail((key,), f"'{key}' must be a non-empty list of {noun}s", f"e.g. {key}: [{allowed[0]}]")
        out = []
        for i, v in enumerate(value):
            if not isinstance(v, str) or v not in allowed:
                guess = difflib.get_close_matches(str(v), allowed, n=1) if isinstance(v, str) else []
                fail((key, i), f"unknown {noun} {v!r}",
                     f"did you mean '{guess[0]}'?" if guess else f"one of: {', '.join(allowed)}")
            if v in out:
                fail((key, i), f"{noun} {v!r} is listed twice")
            out.append(v)
        return out

    new = dataclasses.replace(space, notes=list(space.notes))
    replaced = []
    for key in doc:
        if key not in SPACE_KEYS:
            guess = difflib.get_close_matches(str(key), SPACE_KEYS, n=1)
            fail((key,), f"unknown key '{key}' in the search space",
                 f"did you mean '{guess[0]}'?" if guess else f"known keys: {', '.join(SPACE_KEYS)}", key=True)
    if "fusions" in doc and "fusion_kinds" in doc:
        fail(("fusion_kinds",), "give 'fusions' (a list of subsets) or 'fusion_kinds' (every subset of these), not both",
             key=True)

    def kinds_of(value, path) -> tuple[str, ...]:
        if not isinstance(value, list):
            fail(path, "a fusion subset is a list of fusion kinds", "e.g. [qkv, swiglu], or [] for none")
        for j, k in enumerate(value):
            if k == "sampling":
                fail(path + (j,), "sampling is not searched: it is the generation loop, which a decode step does not time",
                     "add `sampling` to the written plan by hand")
            if not isinstance(k, str) or k not in SEARCH_KINDS:
                guess = difflib.get_close_matches(str(k), SEARCH_KINDS, n=1)
                fail(path + (j,), f"unknown fusion kind {k!r}",
                     f"did you mean '{guess[0]}'?" if guess else f"one of: {', '.join(SEARCH_KINDS)}")
            if k not in site_kinds:
                fail(path + (j,), f"fusion '{k}' finds no site in this model",
                     f"kinds that find sites: {', '.join(site_kinds) or 'none'}")
        if len(set(value)) != len(value):
            fail(path, "a fusion kind is listed twice in one subset")
        return _ordered(value)

    if "fusions" in doc:
        value = doc["fusions"]
        if not isinstance(value, list) or not value:
            fail(("fusions",), "'fusions' must be a non-empty list of fusion subsets",
                 "e.g. fusions: [[], [qkv, swiglu]]")
        subsets = []
        for i, item in enumerate(value):
            s = kinds_of(item, ("fusions", i))
            if s in subsets:
                fail(("fusions", i), "this fusion subset is listed twice")
            subsets.append(s)
        new.fusions, new.fusion_kinds = subsets, _ordered({k for s in subsets for k in s})
        replaced.append("fusions")
    if "fusion_kinds" in doc:
        kinds = kinds_of(doc["fusion_kinds"], ("fusion_kinds",))
        new.fusions, new.fusion_kinds = all_subsets(kinds), kinds
        replaced.append("fusion_kinds")
    if "compile" in doc:
        new.compile = str_list("compile", names.COMPILE_MODES, "compile mode")
        replaced.append("compile")
    if "capture" in doc:
        new.capture = str_list("capture", names.CAPTURE_MODES, "capture mode")
        replaced.append("capture")
    if "precision" in doc:
        new.precision = str_list("precision", PRECISIONS, "precision preset")
        replaced.append("precision")
    if "pdl" in doc:
        if isinstance(doc["pdl"], list):  # bare on/off, read as in a plan's graphs.pdl
            doc = {**doc, "pdl": [names.pdl_word(v) for v in doc["pdl"]]}
        new.pdl = str_list("pdl", names.PDL_MODES, "pdl mode")
        replaced.append("pdl")
    if "buckets" in doc:
        value = doc["buckets"]
        if not isinstance(value, list) or not value:
            fail(("buckets",), "'buckets' must be a non-empty list of bucket sets",
                 'e.g. buckets: ["pow2:1..16", [1, 4, 16]]')
        sets = []
        for i, item in enumerate(value):
            if not isinstance(item, (list, str)):
                fail(("buckets", i), "a bucket set is a list of batch sizes or 'pow2:A..B'",
                     'e.g. [1, 2, 4] or "pow2:1..64"')
            try:
                g = Graphs.model_validate({"buckets": item})
            except Exception as exc:  # pydantic ValidationError: say what the plan schema says
                msg = getattr(exc, "errors", lambda: [{"msg": str(exc)}])()[0]["msg"]
                fail(("buckets", i), f"invalid bucket set: {msg}", 'e.g. [1, 2, 4] or "pow2:1..64"')
            bs = BucketSet(tuple(g.buckets), g.buckets_spec)
            if bs.sizes in [s.sizes for s in sets]:
                fail(("buckets", i), "this bucket set is listed twice")
            sets.append(bs)
        new.buckets = sets
        replaced.append("buckets")
    if "offload" in doc:
        value = doc["offload"]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            fail(("offload",), "'offload' must be a non-empty list: none, or selectors of layers to offload",
                 'e.g. offload: [none, "layers[8:16]"]')
        new.offload = [None if v == "none" else v for v in value]
        replaced.append("offload")
    if "prune_margin" in doc:
        v = doc["prune_margin"]
        if v == "none" or v is None:
            new.prune_margin = None
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and math.isfinite(v):
            new.prune_margin = float(v)
        else:
            fail(("prune_margin",), f"prune_margin must be a number >= 0 or none, found {v!r}",
                 "0.15 measures neighbours predicted at most 15% slower; none measures every neighbour")
    new.from_file = tuple(replaced)
    return new


# ============================================================================= lint

@dataclass
class Lint:
    ok: bool
    diagnostics: list[Diagnostic]

    @property
    def reason(self) -> str:
        bad = [d for d in self.diagnostics if d.severity == "error" or
               (d.severity == "warning" and d.code not in ACCEPTED_WARNINGS)]
        return "; ".join(f"{d.severity}[{d.code}] {d.message}" for d in bad[:2])


def _candidate_source(plan: Plan, name: str):
    """The plan's YAML text read back, so diagnostics carry places (for the model checks)."""
    from planlang.writer import write_yaml
    from planlang.yaml_reader import read_yaml
    doc, source = read_yaml(write_yaml(plan.to_document()), name)
    return source


class Linter:
    """Lint every candidate: the validator against the target (and the device present, when
    --target names another), and once per precision/memory setting the model checks."""

    def __init__(self, target: str, device_target: str, catalog, model_spec: Optional[str], trust_pickle: bool,
                 batches: Sequence[int]):
        self.target, self.here, self.catalog = target, device_target, catalog
        self.model_spec, self.trust_pickle, self.batches = model_spec, trust_pickle, batches
        self._model_cache: dict[str, list[Diagnostic]] = {}

    def __call__(self, cand: Candidate) -> Lint:
        from planlang.validate import validate
        plan = cand.plan("candidate", self.target, self.batches)
        diags = validate(plan, None, target=self.target, catalog=self.catalog)
        if self.here != self.target:
            diags += [d for d in validate(plan, None, target=self.here, catalog=self.catalog) if d.code != "PL203"]
        if not any(d.severity == "error" for d in diags):
            diags += self._model(cand, plan)
        bad = [d for d in diags if d.severity == "error" or (d.severity == "warning" and d.code not in ACCEPTED_WARNINGS)]
        return Lint(not bad, diags)

    def _model(self, cand: Candidate, plan: Plan) -> list[Diagnostic]:
        """lint --model's checks; they read precision, memory and limits (fusions select
        the whole model), so one run per setting serves every candidate."""
        key = json.dumps([cand.precision, cand.offload, plan.limits.model_dump()], sort_keys=True)
        if key not in self._model_cache:
            from .models.checkpoint import ModelLoadError
            from .modelcheck import model_diagnostics
            source = _candidate_source(plan, "candidate.yaml")
            loaded = LoadedPlan(plan, "candidate.yaml", source)
            try:
                diags = model_diagnostics(loaded, self.model_spec, target=self.target, catalog=self.catalog,
                                          trust_pickle=self.trust_pickle)
            except ModelLoadError as exc:
                diags = [Diagnostic("PL100", f"model checks could not load the model: {exc.message}")]
            self._model_cache[key] = diags
        return self._model_cache[key]


# ============================================================================= prediction

@dataclass
class Hardware:
    """What the roofline needs about the device (measured once per study, then reused)."""

    bandwidth_gbs: float
    launch_us: float
    tflops: float
    eager_us: float = 25.0
    cuda_graphs: bool = False  # whether compile modes that capture CUDA graphs do so here


def _model_dtype(model) -> Optional[str]:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return None
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtypes.pop())


def predict(cand: Candidate, cfg, hw: Hardware, batches: Sequence[int], context: int,
            model_dtype: Optional[str]) -> dict[int, float]:
    """Predicted ms of one decode step per scored batch size (`predict.predict_decode`),
    with what tune adds: a compile mode lets Inductor fuse the elementwise chains
    (RMSNorm, RoPE) as the fusions would; compile modes that capture CUDA graphs count as
    graphs; a batch runs padded to its bucket; quantized activations cost a kernel per
    linear; weights count in the preset's bytes."""
    from .predict import predict_decode
    fusions = set(cand.fusions)
    if cand.compile != "none":
        fusions |= {"rmsnorm_residual", "rope_kvcache"}
    planlang_graphs = cand.capture == "cuda_graph"
    graphs = planlang_graphs or (hw.cuda_graphs and cand.compile in names.GRAPH_CAPTURING_COMPILE_MODES)
    wb = _BYTES.get(cand.precision, _BYTES.get(model_dtype or "bf16", 2)) if cand.precision != "none" \
        else _BYTES.get(model_dtype or "bf16", 2)
    out = {}
    for b in batches:
        rows = cand.buckets.bucket_for(b) if planlang_graphs and cand.buckets else b
        p = predict_decode(cfg, fusions, wb, rows, context, hw.bandwidth_gbs, hw.tflops, hw.launch_us, graphs,
                           eager_us=hw.eager_us)
        ms = p.ms
        if cand.precision in _QUANT_ACTIVATIONS:
            ms += 7 * cfg.n_layers * (hw.launch_us if graphs else hw.eager_us) * 1e-3
        out[b] = ms
    return out


def geomean(values: Iterable[float]) -> float:
    vals = list(values)
    return math.exp(sum(math.log(max(v, 1e-12)) for v in vals) / len(vals))


def trial_cost(cand: Candidate) -> float:
    """Relative wall time of measuring a candidate (compiling dominates), for ordering."""
    c = 1.0
    if cand.compile in ("default", "reduce-overhead"):
        c += 3.0
    elif cand.compile != "none":
        c += 8.0
    if cand.capture == "cuda_graph" and cand.buckets:
        c += 0.05 * len(cand.buckets.sizes)
    if cand.precision != "none":
        c += 0.2
    return c


# ============================================================================= identity

def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        line = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
        if line:
            return line
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        v = torch._C._cuda_getDriverVersion()  # the CUDA driver API version, e.g. 12080
        return f"CUDA driver API {v // 1000}.{(v % 1000) // 10}"
    except Exception:
        return "unknown"


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """Device name, driver and software versions: what a record is only valid for."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        cc = f"{props.major}.{props.minor}"
        driver = _driver_version()
    else:
        name = f"cpu: {platform.processor() or platform.machine() or 'unknown'} ({os.cpu_count()} cores)"
        cc, driver = None, "none"
    return {"device": name, "compute_capability": cc, "driver": driver, "torch": torch.__version__,
            "triton": _triton_version(), "cuda": torch.version.cuda, "python": platform.python_version()}


def model_identity(lm) -> dict:
    """The model's name, config and a hash of its weights (shape, dtype, the first 64 Ki
    elements and the float64 sum of every parameter), so a retrained checkpoint under the
    same name is another model."""
    h = hashlib.sha256()
    seen = set()
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            flat = p.detach().reshape(-1)
            head = flat[: 1 << 16].float().cpu().contiguous()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{flat.double().sum().item():.17g}".encode())
            h.update(ctypes.string_at(head.data_ptr(), head.numel() * head.element_size()))
    return {"source": lm.source, "kind": lm.kind, "name": lm.name, "config": lm.config,
            "dtype": str(next(lm.model.parameters()).dtype), "weights_sha256": h.hexdigest()}


def study_key(identity: dict, env: dict, target: str, context: int, batches: Sequence[int]) -> str:
    """The records' key: a hash of everything a measured number depends on."""
    payload = {"model": identity, "target": target, "device": env["device"], "driver": env["driver"],
               "torch": env["torch"], "triton": env["triton"], "cuda": env.get("cuda"),
               "planlang": __version__, "context": context, "batches": sorted(batches)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ============================================================================= records

def _optuna():
    try:
        import optuna
    except ImportError as exc:
        raise TuneError(f"`planlang tune` keeps its records with optuna, which is not importable ({exc})",
                        "pip install 'planlang[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class TrialResult:
    """One measured candidate, as the records keep it."""

    key: str
    status: str                           # ok | rejected | error
    reason: str = ""
    latency_ms: dict = field(default_factory=dict)      # batch -> ms
    baseline_ms: dict = field(default_factory=dict)     # contender -> {batch: ms}
    accuracy: dict = field(default_factory=dict)
    score: Optional[float] = None
    predicted_ms: dict = field(default_factory=dict)
    apply_s: Optional[float] = None
    seconds: Optional[float] = None
    trial: Optional[int] = None
    run: str = ""
    reused: bool = False                  # from the records of an earlier run

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Records:
    """The trials of one study in optuna's SQLite storage: a trial per measured candidate,
    its numbers as user attributes; COMPLETE (value = score) when timed, PRUNED when it
    was rejected by the gate or could not be applied, FAIL when abandoned (budget,
    interruption) or left RUNNING by a killed run (those are measured again)."""

    def __init__(self, path: Path, key: str, meta: dict):
        optuna = _optuna()
        self.optuna = optuna
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path.resolve()}"
        try:
            self.storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
            self.study = optuna.create_study(study_name=f"planlang-tune-{key}", storage=self.storage,
                                             direction="minimize", load_if_exists=True)
        except Exception as exc:  # sqlalchemy / optuna errors on an unreadable or foreign file
            raise TuneError(f"--storage {path}: cannot open the records ({type(exc).__name__}: {exc})",
                            "pass --storage with a new file, or delete the broken one") from None
        self.key = key
        if "meta" not in self.study.user_attrs:
            self.study.set_user_attr("meta", json.loads(json.dumps(meta, default=str)))
        self.run = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()

    def remember(self, name: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """A figure of this study's model and machine (the hardware figures, the fusion kinds
        that find sites) as the first run found it, so every run of the study ranks alike;
        (value, whether it came from the records)."""
        if name in self.study.user_attrs:
            return self.study.user_attrs[name], True
        value = compute()
        self.study.set_user_attr(name, value)
        return value, False

    def recover(self) -> int:
        """Mark RUNNING trials of runs that are gone (killed) as FAIL."""
        n = 0
        for t in self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.RUNNING,)):
            pid, host = t.user_attrs.get("pid"), t.user_attrs.get("host")
            if host == self.host and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
                continue  # another tune on this machine is measuring it now
            try:
                self.storage.set_trial_user_attr(t._trial_id, "abandoned", "its run ended before it finished")
            except AttributeError:
                pass  # the reason is a courtesy; the state below is what counts
            self.study.tell(t.number, state=self.optuna.trial.TrialState.FAIL)
            n += 1
        return n

    def finished(self) -> dict[str, TrialResult]:
        """Finished records by candidate key (the latest when there are several)."""
        TS = self.optuna.trial.TrialState
        out = {}
        for t in self.study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED)):
            data = t.user_attrs.get("result")
            if not isinstance(data, dict) or "key" not in data or "status" not in data:
                continue
            r = TrialResult(**{k: v for k, v in data.items() if k in TrialResult.__dataclass_fields__})
            r.latency_ms = {int(k): v for k, v in r.latency_ms.items()}
            r.baseline_ms = {n: {int(k): v for k, v in d.items()} for n, d in r.baseline_ms.items()}
            r.predicted_ms = {int(k): v for k, v in r.predicted_ms.items()}
            r.trial, r.reused = t.number, True
            out[r.key] = r
        return out

    def start(self, cand: Candidate, doc: dict):
        trial = self.study.ask()
        trial.set_user_attr("candidate", cand.key)
        trial.set_user_attr("plan", doc)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", self.host)
        trial.set_user_attr("run", self.run)
        return trial

    def finish(self, trial, result: TrialResult) -> None:
        result.trial, result.run = trial.number, self.run
        trial.set_user_attr("result", json.loads(json.dumps(result.to_json(), default=str)))
        if result.status == "ok":
            self.study.tell(trial, result.score)
        else:
            self.study.tell(trial, state=self.optuna.trial.TrialState.PRUNED)

    def abandon(self, trial, why: str) -> None:
        try:
            trial.set_user_attr("abandoned", why)
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
        except Exception:
            pass  # the storage is gone too; the next run marks it as stale


# ============================================================================= measuring

class Stop(Exception):
    """The search ends here (budget or the quarter-of-the-space cap)."""


class Abandon(Exception):
    """The current trial ran past the budget's hard deadline."""


class DeviceLost(Exception):
    """A CUDA error that leaves the context unusable (an illegal address, a launch
    failure): nothing more can be measured in this process."""


def _sticky_cuda_error(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False  # recoverable: the memory is freed with the candidate
    text = str(exc)
    return "CUDA error" in text or "cudaError" in text or "CUBLAS_STATUS_EXECUTION_FAILED" in text


@dataclass
class Gate:
    max_error: Optional[float]
    min_agreement: Optional[float]

    def check(self, acc: dict) -> str:
        """'' when the accuracy passes, else why not."""
        why = []
        if self.max_error is not None and not acc["rel_error"] <= self.max_error:
            why.append(f"relative error {acc['rel_error']:.3g} > --max-error {self.max_error:g}")
        if self.min_agreement is not None and not acc["top1_agreement"] >= self.min_agreement:
            why.append(f"top-1 agreement {acc['top1_agreement']:.4f} < --min-agreement {self.min_agreement:g}")
        return "; ".join(why)

    def describe(self) -> str:
        parts = []
        if self.max_error is not None:
            parts.append(f"relative logit error <= {self.max_error:g}")
        if self.min_agreement is not None:
            parts.append(f"top-1 agreement >= {self.min_agreement:g}")
        return " and ".join(parts)


class Bench:
    """The model, its same-run baselines and the measurement of one candidate."""

    def __init__(self, ref, device: torch.device, batches: Sequence[int], context: int, reps: int,
                 tokens: torch.Tensor, chunk: int, max_batch: int, max_seq: int):
        self.ref, self.device, self.batches, self.context, self.reps = ref, device, list(batches), context, reps
        self.tokens, self.chunk = tokens, chunk
        self.vocab = ref.config.vocab_size
        self.max_batch, self.max_seq = max_batch, max_seq
        self.baselines: dict[str, dict[int, float]] = {}
        self._ref_logits: dict = {}

    def time_batch(self, fn, batch: int) -> float:
        """ms of one decode step at `batch` rows and `context` positions (bench's way)."""
        from .bench import decode_step, fill_cache, time_ms
        fill_cache(fn, batch, self.context, self.vocab, self.device)
        return time_ms(decode_step(fn, batch, self.context, self.vocab, self.device), self.device, reps=self.reps,
                       warmup=5 if self.device.type == "cuda" else 2)

    def time_decode(self, fn) -> dict[int, float]:
        return {b: self.time_batch(fn, b) for b in self.batches}

    def measure_baselines(self, compile_baseline: bool) -> None:
        self.baselines["eager"] = self.time_decode(self.ref)
        if compile_baseline:
            torch._dynamo.reset()
            compiled = torch.compile(self.ref, mode="reduce-overhead", dynamic=False)
            self.baselines["compile(reduce-overhead)"] = self.time_decode(compiled)
            del compiled
            self.cleanup()

    def ref_logits_fn(self):
        from .accuracy import logits_fn_for
        inner = logits_fn_for(self.ref)

        def cached(ids):  # the same chunks of the same tokens every trial: run the reference once
            key = (ids.data_ptr(), tuple(ids.shape))
            if key not in self._ref_logits:
                self._ref_logits[key] = inner(ids).detach().clone()
            return self._ref_logits[key]
        return cached

    def cleanup(self) -> None:
        torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            except RuntimeError:
                pass  # a lost context: the caller stops the search

    def measure(self, cand: Candidate, plan: Plan, gate: Gate, check_deadline: Callable[[str], None]) -> TrialResult:
        from .accuracy import compare, logits_fn_for
        from .apply import ApplyError, apply, default_inputs
        t0 = time.perf_counter()
        model = copy.deepcopy(self.ref)  # apply changes the model it is given
        planned = None
        try:
            model.setup_caches(self.max_batch, self.max_seq)
            try:
                # traced on a chunk of the accuracy text's shape, which the cache fill shares:
                # the graphs compiled here serve both
                planned = apply(model, plan, default_inputs(model, self.device, 1, self.chunk), device=self.device,
                                max_batch=self.max_batch, max_seq_len=self.max_seq)
            except ApplyError as exc:
                why = "; ".join(f"{d.code} {d.message}" for d in exc.diagnostics[:2])
                return TrialResult(cand.key, "error", f"apply: {why}", seconds=time.perf_counter() - t0)
            apply_s = time.perf_counter() - t0
            check_deadline("after apply")
            cand_fn = logits_fn_for(planned)
            # chunks with the strides of the traced example and the cache fill (a [1, T] slice keeps
            # the text's strides, and Dynamo guards on them): one compiled graph serves all three
            acc = compare(self.ref_logits_fn(), lambda ids: cand_fn(ids.clone(memory_format=torch.contiguous_format)),
                          self.tokens, chunk=self.chunk).to_json()
            why = gate.check(acc)
            if why:
                return TrialResult(cand.key, "rejected", why, accuracy=acc, apply_s=apply_s,
                                   seconds=time.perf_counter() - t0)
            check_deadline("after the accuracy check")
            lat = {}
            for b in self.batches:
                lat[b] = self.time_batch(planned, b)
                check_deadline(f"after timing batch {b}")
            score = geomean(lat[b] / self.baselines["eager"][b] for b in self.batches)
            return TrialResult(cand.key, "ok", latency_ms=lat, accuracy=acc, score=score,
                               baseline_ms={k: dict(v) for k, v in self.baselines.items()},
                               apply_s=apply_s, seconds=time.perf_counter() - t0)
        except (Abandon, DeviceLost, KeyboardInterrupt):
            raise
        except Exception as exc:  # a kernel that fails to compile, out of memory, ...: this candidate fails
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            if self.device.type == "cuda" and _sticky_cuda_error(exc):
                raise DeviceLost(f"{type(exc).__name__}: {msg}") from None
            return TrialResult(cand.key, "error", f"{type(exc).__name__}: {msg}", seconds=time.perf_counter() - t0)
        finally:
            del planned, model
            self.cleanup()


# ============================================================================= search

@dataclass
class SearchState:
    results: dict[str, TrialResult]
    measured: int = 0


def neighbours(c: Candidate, space: Space) -> list[Candidate]:
    """Candidates one step away: one axis changed (one fusion kind toggled where the fusion
    axis holds such a subset, else any other subset of the axis)."""
    out = []
    for p in space.precision:
        if p != c.precision:
            out.append(dataclasses.replace(c, precision=p))
    near = [f for f in space.fusions if len(set(f) ^ set(c.fusions)) == 1]
    for f in near or [f for f in space.fusions if f != c.fusions]:
        out.append(dataclasses.replace(c, fusions=f))
    for cap in space.capture:
        if cap == c.capture:
            continue
        if cap == "cuda_graph":
            out.extend(dataclasses.replace(c, capture=cap, buckets=bs) for bs in space.buckets)
        else:
            out.append(dataclasses.replace(c, capture=cap, buckets=None))
    if c.capture == "cuda_graph":
        out.extend(dataclasses.replace(c, buckets=bs) for bs in space.buckets if bs != c.buckets)
    out.extend(dataclasses.replace(c, compile=m) for m in space.compile if m != c.compile)
    out.extend(dataclasses.replace(c, offload=o) for o in space.offload if o != c.offload)
    out.extend(dataclasses.replace(c, pdl=m) for m in space.pdl if m != c.pdl)
    return out


def search(order: list[Candidate], valid: dict[str, Candidate], predicted: dict[str, float], space: Space,
           evaluate: Callable[[Candidate], TrialResult], passes: Callable[[TrialResult], bool],
           cost: Callable[[Candidate], float] = lambda c: trial_cost(c)) -> Optional[TrialResult]:
    """The walk described in the module docstring; `evaluate` raises Stop to end it.
    Returns the best passing result (or None)."""
    rank = {c.key: i for i, c in enumerate(order)}
    best: Optional[TrialResult] = None
    rejected_precision: set[str] = set()   # precision settings the gate turned down ...
    passed_precision: set[str] = set()     # ... unless one of their candidates passed

    def run(c: Candidate) -> TrialResult:
        nonlocal best
        r = evaluate(c)
        if passes(r):
            passed_precision.add(c.precision)
            if best is None or r.score < best.score:
                best = r
        elif r.status == "rejected":
            rejected_precision.add(c.precision)
        return r

    def doubtful(c: Candidate) -> bool:
        return c.precision in rejected_precision and c.precision not in passed_precision

    try:
        # 1. the best-predicted candidate of each precision setting
        firsts: dict[str, Candidate] = {}
        for c in order:
            firsts.setdefault(c.precision, c)
        first_keys = {c.key for c in firsts.values()}
        for c in firsts.values():
            run(c)
        # none passed: on down the ranking, settings the gate turned down last
        if best is None:
            for c in sorted(order, key=lambda c: (doubtful(c), rank[c.key])):
                if c.key in first_keys:
                    continue
                run(c)
                if best is not None:
                    break
        if best is None:
            return None
        # 2. coordinate descent from the best
        centre = best
        tried: set[str] = set(first_keys)
        while True:
            cc = valid[centre.key]
            nbrs = []
            for n in neighbours(cc, space):
                if n.key not in valid or n.key in tried or doubtful(n):
                    continue
                if space.prune_margin is not None and predicted[n.key] > predicted[cc.key] * (1 + space.prune_margin):
                    continue
                nbrs.append(valid[n.key])
            # most promising first, in 5% bands of the prediction; cheapest first within a band
            nbrs.sort(key=lambda n: (round(math.log(predicted[n.key] / predicted[cc.key]) / math.log(1.05)),
                                     cost(n), rank[n.key]))
            moved = False
            for n in nbrs:
                if doubtful(n):
                    continue
                tried.add(n.key)
                r = run(n)
                if passes(r) and r.score < centre.score * (1 - IMPROVE):
                    centre, moved = r, True
                    break
            if not moved:
                break
    except Stop:
        pass
    return best


def pdl_second_look(best: Candidate, space: Space, device_launches_pdl: bool) -> Optional[Candidate]:
    """The winner with `pdl: off`, to measure once more after the search, or None. PDL is a
    launch setting the roofline does not model, so the default space does not search it;
    where `auto` launches with PDL (sm_90+), the winner's twin without PDL is one cheap
    trial (a measured 0.94-0.98x on an H100 for llama-1b decode, but it depends on the
    kernels' chain). A --space file that names `pdl` searches it like any other axis."""
    if not device_launches_pdl or "pdl" in space.from_file or best.pdl != "auto":
        return None
    return dataclasses.replace(best, pdl="off")


def plain_candidate(cands: Iterable[Candidate]) -> Optional[Candidate]:
    """The candidate that changes nothing (no fusion, graph, compile, precision, offload), if
    the space holds it: the unplanned model's twin."""
    return next((c for c in cands if not c.fusions and c.capture == "none" and c.compile == "none"
                 and c.precision == "none" and not c.offload and c.pdl == "auto"), None)


# ============================================================================= the command

@dataclass
class TuneResult:
    """What `tune` found: the space, every trial, the best, and where it was written."""

    ok: bool
    model: str
    device: str
    target: str
    env: dict
    space: dict
    gate: str
    hardware: dict
    baselines: dict
    trials: list[dict]
    best: Optional[dict]
    output: Optional[str]
    storage: str
    study: str
    measured: int
    reused: int
    cap: int
    stopped: str
    setup_s: float
    search_s: float
    notes: list[str] = field(default_factory=list)
    error: Optional[str] = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _device(name: Optional[str]) -> torch.device:
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise TuneError(f"--device {name}: not a device", "use cpu or cuda") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise TuneError(f"--device {name}: no CUDA device here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise TuneError(f"{name}={v!r} is not an integer") from None


def _console(stderr: bool):
    from rich.console import Console
    return Console(stderr=stderr, width=int(os.environ.get("COLUMNS", "0") or 0) or 140, highlight=False)


def tune(model: Optional[str], output: str | Path, *, target: Optional[str] = None, budget_min: float = 5.0,
         max_error: Optional[float] = None, min_agreement: Optional[float] = None,
         space: Optional[str | Path | dict] = None, storage: Optional[str | Path] = None,
         batches: Sequence[int] = (1, 16), context: int = 128, device: Optional[str] = None, seed: int = 0,
         trust_pickle: bool = False, reps: Optional[int] = None, eval_tokens: Optional[int] = None,
         eval_chunk: Optional[int] = None, max_trials: Optional[int] = None, json_output: bool = False,
         console=None) -> TuneResult:
    """Search plans for `model` on this machine and write the best to `output`.

    Raises TuneError (with the exit status in `.code`) for bad input, and when no candidate
    passes the gate or the budget ends before one is measured; the records stay for a rerun.
    Knobs for tests and scripts: `reps` (timed decode steps; CPU runs a tenth of them),
    `eval_tokens`/`eval_chunk` (the accuracy text), `max_trials` (a cap below the quarter of
    the space); the environment variables PLANLANG_TUNE_REPS, PLANLANG_TUNE_EVAL_TOKENS,
    PLANLANG_TUNE_EVAL_CHUNK and PLANLANG_TUNE_MAX_TRIALS set the same from the CLI.
    """
    from planlang.hardware import load_catalog
    from .commands import device_target, measure_kernel_cost_us
    from .models.checkpoint import ModelLoadError, load_model

    t_start = time.perf_counter()
    out_console = console or _console(stderr=json_output)
    err_console = _console(stderr=True)
    # -- arguments (before anything slow)
    if not (budget_min > 0 and math.isfinite(budget_min)):
        raise TuneError(f"--budget {budget_min:g}: the budget is a positive number of minutes")
    if max_error is not None and not (max_error >= 0 and math.isfinite(max_error)):
        raise TuneError(f"--max-error {max_error:g}: must be a number >= 0")
    if min_agreement is not None and not (0 <= min_agreement <= 1):
        raise TuneError(f"--min-agreement {min_agreement:g}: must lie between 0 and 1")
    batches = sorted(set(batches or (1, 16)))
    if any(b < 1 for b in batches):
        raise TuneError(f"--batch {min(batches)}: batch sizes are >= 1")
    if context < 1:
        raise TuneError(f"--context {context}: must be >= 1")
    output = Path(output)
    if output.suffix not in PLAN_SUFFIXES:
        raise TuneError(f"-o {output}: a plan file ends in .yaml, .yml or .plan")
    if not output.parent.is_dir():
        raise TuneError(f"-o {output}: the folder {output.parent} does not exist")
    reps = reps if reps is not None else _env_int("PLANLANG_TUNE_REPS", None)
    eval_tokens = eval_tokens if eval_tokens is not None else _env_int("PLANLANG_TUNE_EVAL_TOKENS", None)
    eval_chunk = eval_chunk if eval_chunk is not None else _env_int("PLANLANG_TUNE_EVAL_CHUNK", None)
    max_trials = max_trials if max_trials is not None else _env_int("PLANLANG_TUNE_MAX_TRIALS", None)
    gate = Gate(max_error if (max_error is not None or min_agreement is not None) else DEFAULT_MAX_ERROR,
                min_agreement)
    space_doc = space_source = None
    space_file = None
    if isinstance(space, dict):
        space_doc, space_file = space, "<space>"
    elif space is not None:
        space_doc, space_source = read_space_file(space)
        space_file = str(space)
    if space_doc is not None:  # every problem but "finds no site" before the model loads
        apply_space_file(default_space(SEARCH_KINDS, batches, fits=True, n_layers=2, model_dtype=None),
                         space_doc, space_source, space_file, SEARCH_KINDS)
    _optuna()
    dev = _device(device)
    torch.manual_seed(seed)
    catalog = load_catalog()
    here = device_target(dev)
    target_id = here
    if target:
        t = catalog.get(target)
        if t is None:
            guess = catalog.suggest(target)
            raise TuneError(f"--target {target}: unknown target",
                            f"did you mean '{guess}'?" if guess else "see `planlang targets`")
        target_id = t.id
    notes: list[str] = []
    if target_id != here:
        notes.append(f"--target {target_id} differs from the device present ({here}): candidates are linted for both "
                     "and measured here")
    tgt = catalog.get(target_id)

    # -- the model
    try:
        lm = load_model(model, trust_pickle=trust_pickle, device=dev)
    except ModelLoadError as exc:
        raise TuneError(f"{exc.path + ': ' if exc.path else ''}{exc.message}", exc.hint) from None
    ref = lm.model.eval()
    if not hasattr(ref, "setup_caches"):
        raise TuneError(f"{lm.source}: tune times decode steps of causal language models with a static cache "
                        "(built-in models and planlang checkpoints)", "export the model with `planlang export`")
    cfg = ref.config
    # Chunks of the accuracy text as long as the cache fill of bench (`context` positions),
    # so both run on one compiled shape.
    chunk = eval_chunk or min(512, max(32, context))
    n_tokens = eval_tokens or ((8 if dev.type == "cuda" else 2) * chunk + 1)
    chunk = min(chunk, n_tokens - 1)
    from .accuracy import eval_tokens as _eval_tokens
    tokens = _eval_tokens(dev, max_tokens=n_tokens)
    max_batch = max(batches)
    max_seq = max(context + 16, chunk + 16)
    model_dtype = _model_dtype(ref)

    # -- records
    env = environment(dev)
    identity = model_identity(lm)
    key = study_key(identity, env, target_id, context, batches)
    db = Path(storage) if storage else (output.parent / ".planlang" / "tune.db")
    records = Records(db, key, {"model": identity, "env": env, "target": target_id, "context": context,
                                "batches": batches})
    stale = records.recover()
    if stale:
        notes.append(f"{stale} trial(s) left running by an interrupted run are measured again")
    done = records.finished()

    # -- the space: which fusion kinds find sites here (traced once per study)
    site_kinds = records.remember("site_kinds", lambda: find_site_kinds(ref, dev, max_batch, max_seq))[0]
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in ref.parameters()}.values())
    mem_gb = (torch.cuda.get_device_properties(dev).total_memory / 1e9 if dev.type == "cuda"
              else (tgt.memory_gb if tgt else 64.0))
    fits = weight_bytes * 2.2 < mem_gb * 1e9 * 0.9  # the reference and one candidate side by side
    sp = default_space(site_kinds, batches, fits=fits, n_layers=cfg.n_layers, model_dtype=model_dtype)
    if space_doc is not None:
        sp = apply_space_file(sp, space_doc, space_source, space_file, site_kinds)
    cands = list(sp.candidates())
    cap = max(1, sp.size // 4)
    if max_trials is not None:
        cap = max(1, min(cap, max_trials))

    # -- hardware figures and predictions
    def measure_hw() -> Hardware:
        from .bench import copy_bandwidth_gbs
        bw = copy_bandwidth_gbs(dev, size=(1 << 30) if dev.type == "cuda" else (1 << 27))
        launch = measure_kernel_cost_us(dev, bw) if dev.type == "cuda" else (tgt.launch_us if tgt else 5.0)
        tf = (tgt.tflops.get("bf16") or tgt.tflops.get("fp32")) if tgt else 1.0
        return Hardware(round(bw, 1), round(launch, 3), tf or 1.0, eager_us=25.0, cuda_graphs=dev.type == "cuda")
    saved, hw_reused = records.remember("hardware", lambda: dataclasses.asdict(measure_hw()))
    hw = Hardware(**saved)
    linter = Linter(target_id, here, catalog, model, trust_pickle, batches)
    lint = {c.key: linter(c) for c in cands}
    valid = {c.key: c for c in cands if lint[c.key].ok}
    cap = max(1, min(cap, len(valid)))  # never more than lint lets through
    pred = {c.key: predict(c, cfg, hw, batches, context, model_dtype) for c in valid.values()}
    pscore = {k: geomean(v.values()) for k, v in pred.items()}
    order = sorted(valid.values(), key=lambda c: (round(pscore[c.key], 9), trial_cost(c), -len(c.fusions), c.key))

    # -- print the space
    _print_space(err_console if json_output else out_console, lm.source, target_id, env, sp, len(valid), cap,
                 gate, budget_min, order[:5], pscore, notes + sp.notes, db, len(done))
    if not valid:
        raise TuneError("no candidate of the space passes lint on this target", _lint_hint(lint), EXIT_ERRORS)

    # -- baselines (same run), then the search
    bench = Bench(ref, dev, batches, context, reps or (50 if dev.type == "cuda" else 30), tokens, chunk,
                  max(max_batch, max((c.max_batch(batches) for c in valid.values()), default=1)), max_seq)
    with torch.no_grad():
        ref.setup_caches(bench.max_batch, max_seq)
        bench.measure_baselines(compile_baseline=dev.type == "cuda")
    setup_s = time.perf_counter() - t_start
    budget_s = budget_min * 60
    t_search = time.perf_counter()
    deadline = t_search + budget_s
    hard_deadline = deadline + max(30.0, 0.1 * budget_s)
    state = SearchState(results={})
    stopped = ["the search reached a local optimum"]

    def passes(r: TrialResult) -> bool:
        return r.status == "ok" and not gate.check(r.accuracy)

    def check_deadline(where: str) -> None:
        if time.perf_counter() > hard_deadline:
            raise Abandon(f"past the budget's hard deadline {where}")

    progress = _progress(err_console)
    task = progress.add_task("starting", total=budget_s)

    def show(note: str = "") -> None:
        best = min((r for r in state.results.values() if passes(r)), key=lambda r: r.score, default=None)
        text = (f"{state.measured} measured, {sum(r.reused for r in state.results.values())} from records; "
                + (f"best {best.score:.3f}x eager's time ({_short(valid[best.key])})" if best else "no passing plan yet")
                + (f"; {note}" if note else ""))
        progress.update(task, completed=min(budget_s, time.perf_counter() - t_search), description=text)

    def evaluate(c: Candidate) -> TrialResult:
        if c.key in state.results:
            return state.results[c.key]
        old = done.get(c.key)
        if old is not None and not (old.status == "rejected" and not gate.check(old.accuracy)):
            # a record of an earlier run (a rejection that would pass the current gate is measured again)
            if old.status == "ok" and gate.check(old.accuracy):
                old = dataclasses.replace(old, status="rejected", reason=gate.check(old.accuracy))
            old.predicted_ms = pred[c.key]
            state.results[c.key] = old
            show()
            return old
        if len(state.results) >= cap:  # records of earlier runs count: they were measured too
            stopped[0] = f"measured the cap of {cap} candidate(s)"
            raise Stop()
        if time.perf_counter() > deadline:
            stopped[0] = f"the budget of {budget_min:g} min ran out"
            raise Stop()
        plan = c.plan("candidate", target_id, batches)
        trial = records.start(c, c.document(name_from_stem(output.stem), target_id, batches))
        show(f"measuring {_short(c)}")
        try:
            r = bench.measure(c, plan, gate, check_deadline)
        except Abandon as exc:
            records.abandon(trial, str(exc))
            stopped[0] = f"the budget of {budget_min:g} min ran out mid-trial (trial abandoned, measured again next run)"
            raise Stop() from None
        except DeviceLost as exc:
            # recorded as an error (not retried: a candidate that breaks the device would again)
            r = TrialResult(c.key, "error", f"{exc} (the CUDA context was lost: the search stopped)",
                            predicted_ms=pred[c.key])
            records.finish(trial, r)
            state.measured += 1
            state.results[c.key] = r
            stopped[0] = f"a CUDA error left the device unusable while measuring {_short(c)}; run tune again to go on"
            raise Stop() from None
        except BaseException:
            records.abandon(trial, "interrupted")
            raise
        r.predicted_ms = pred[c.key]
        records.finish(trial, r)
        state.measured += 1
        state.results[c.key] = r
        show()
        return r

    def one_more(c: Candidate) -> tuple[Optional[TrialResult], str]:
        """A trial after the search, within the cap and budget: (result, "") or, when they
        stop it, (None, why); the search's own reason for stopping stays the one reported."""
        why_stopped = stopped[0]
        try:
            return evaluate(c), ""
        except Stop:
            why, stopped[0] = stopped[0], why_stopped
            return None, why

    def second_look(best: Optional[TrialResult]) -> Optional[TrialResult]:
        if best is None:
            return None
        if os.environ.get(PDL_ENV, "").strip():
            notes.append(f"{PDL_ENV} is set: it overrides every plan's graphs.pdl, so pdl is not compared")
            return best
        twin = pdl_second_look(valid[best.key], sp, dev.type == "cuda" and pdl_status(dev)[0])
        if twin is None or not linter(twin).ok:
            return best
        valid[twin.key] = twin
        pred[twin.key] = pred[best.key]
        r, why = one_more(twin)
        if r is None:
            notes.append(f"pdl: the winner was not measured with pdl off ({why})")
            return best
        better = passes(r) and r.score < best.score * (1 - IMPROVE)
        notes.append(f"pdl: the winner measured {r.score:.3f}x eager's time with pdl off against {best.score:.3f}x with "
                     f"auto (PDL on): {'off' if better else 'auto'} is written" if r.status == "ok" else
                     f"pdl: the winner with pdl off did not run ({r.reason}); auto is written")
        return r if better else best

    def plain_look(best: Optional[TrialResult]) -> Optional[TrialResult]:
        """A winner slower than eager: the candidate that changes nothing is measured too
        (within the cap and budget), so the written plan is never knowingly slower."""
        if best is None or best.score <= 1:
            return best
        plain = plain_candidate(valid.values())
        if plain is None or plain.key == best.key:
            return best
        r, _ = one_more(plain)
        if r is None:
            return best
        if passes(r) and r.score < best.score:
            notes.append(f"no candidate measured beat the unplanned model (best {best.score:.2f}x its time): the "
                         "plan written changes nothing")
            return r
        return best

    with progress:
        best = plain_look(second_look(search(order, valid, pscore, sp, evaluate, passes)))
        show("done")
    search_s = time.perf_counter() - t_search

    # -- result
    trials = sorted(state.results.values(), key=lambda r: (r.trial if r.trial is not None else 1 << 30))
    result = TuneResult(
        ok=best is not None, model=lm.source, device=env["device"], target=target_id, env=env,
        space={"axes": {name: {"count": n, "values": desc} for name, n, desc in sp.describe()},
               "size": sp.size, "formula": sp.size_formula(), "valid": len(valid), "cap": cap,
               "prune_margin": sp.prune_margin},
        gate=gate.describe(), hardware={**dataclasses.asdict(hw), "from_records": hw_reused},
        baselines={k: {str(b): v for b, v in d.items()} for k, d in bench.baselines.items()},
        trials=[_trial_row(r, valid.get(r.key), passes(r), sp.fusion_kinds) for r in trials],
        best=None, output=None, storage=str(db), study=records.study.study_name, measured=state.measured,
        reused=sum(r.reused for r in trials), cap=cap, stopped=stopped[0], setup_s=setup_s, search_s=search_s,
        notes=notes + sp.notes)
    if best is None:
        ran = [r for r in trials]
        if not ran:
            result.error = (f"the budget of {budget_min:g} min ended before any candidate was measured "
                            f"(setup took {setup_s:.0f} s)")
        else:
            result.error = f"no candidate passed the accuracy gate ({gate.describe()}) among {len(ran)} measured"
        _report(out_console, result, json_output)
        hint = ("raise --budget; finished trials are kept and the next run goes on from them" if not ran
                else "loosen --max-error / --min-agreement, or narrow the space to precisions that keep accuracy")
        raise TuneError(result.error, hint, EXIT_ERRORS)
    if best.score > 1:
        result.notes.append(f"the best plan is {best.score:.2f}x slower than the unplanned model on this device")
    cand = valid[best.key]
    plan_doc = cand.document(name_from_stem(output.stem), target_id, batches)
    plan_doc["provenance"] = _provenance(best, env, lm.source, identity, context, batches, result, records)
    plan = Plan.model_validate(plan_doc)
    text = format_plan(plan, "plan" if output.suffix == ".plan" else "yaml")
    _check_written(text, output, target_id, catalog)
    try:
        atomic_write(output, text)
    except OSError as exc:
        raise TuneError(f"cannot write {output}: {exc.strerror or exc}") from None
    result.best = {**_trial_row(best, cand, True, sp.fusion_kinds), "plan": plan.to_document()}
    result.output = str(output)
    _report(out_console, result, json_output)
    return result


def find_site_kinds(model, device: torch.device, max_batch: int, max_seq: int) -> list[str]:
    """The fusion kinds that find at least one site in the model (one trace)."""
    from .apply import PASSES, capture, default_inputs, find_sites
    plan = Plan.model_validate({"planlang": 1, "fusions": [{"kind": k, "required": False} for k in SEARCH_KINDS]})
    model.setup_caches(max_batch, max_seq)
    with torch.no_grad():
        views = capture(model, default_inputs(model, device))
    sites = find_sites(views, plan)
    return [k for i, k in enumerate(SEARCH_KINDS) if k in PASSES and sites.get(i)]


def _lint_hint(lint: dict[str, Lint]) -> str:
    reasons: dict[str, int] = {}
    for l in lint.values():
        reasons[l.reason] = reasons.get(l.reason, 0) + 1
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:2]
    return "; ".join(f"{n} candidate(s): {r}" for r, n in top) + " (narrow the space with --space)"


def _provenance(best: TrialResult, env: dict, model: str, identity: dict, context: int, batches, result: TuneResult,
                records: Records) -> dict:
    acc = best.accuracy
    base = {}
    for name, d in best.baseline_ms.items():
        short = "eager" if name == "eager" else "compile_reduce_overhead"
        for b, ms in d.items():
            base[f"{short}_b{b}"] = round(ms, 4)
    prov = {
        "tool": f"planlang tune {__version__}",
        "model": model,
        "model_sha256": identity["weights_sha256"][:16],
        "device": env["device"],
        "driver": env["driver"],
        "torch": env["torch"],
        "triton": env["triton"] or "none",
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "context": context,
        "measured": {str(b): round(ms, 4) for b, ms in sorted(best.latency_ms.items())},
        "error": float(f"{acc['rel_error']:.4g}"),
        "agreement": float(f"{acc['top1_agreement']:.4g}"),
        "baseline": base,
        "speedup_vs_eager": float(f"{1 / best.score:.4g}"),
        "gate": result.gate,
        "trials": f"{result.measured + result.reused} measured of {result.space['size']} candidates "
                  f"({result.space['valid']} lint-clean)",
        "study": f"{records.study.study_name} trial {best.trial}",
    }
    return prov


def _check_written(text: str, path: Path, target: str, catalog) -> None:
    """The plan about to be written must read back and lint clean (the accepted warnings
    aside); checked before the file is replaced."""
    from planlang.loader import read_document
    from planlang.validate import validate
    doc, source = read_document(path, data=text.encode("utf-8"))
    plan, diags = Plan.from_document(doc, source)
    if plan is not None:
        diags += validate(plan, source, target=target, catalog=catalog)
    bad = [d for d in diags if d.severity == "error" or (d.severity == "warning" and d.code not in ACCEPTED_WARNINGS)]
    if plan is None or bad:
        raise TuneError(f"internal error: the plan for {path} does not lint clean: "
                        + "; ".join(f"{d.code} {d.message}" for d in bad[:3]), code=EXIT_ERRORS)


# ============================================================================= output

def _short(c: Candidate, kinds: Sequence[str] = ()) -> str:
    fus = _fusions_label(c.fusions, kinds or SEARCH_KINDS) if c.fusions else "no fusions"
    graphs = f"graphs {c.buckets.label}" if c.capture == "cuda_graph" and c.buckets else "no graphs"
    parts = [fus, graphs, f"compile {c.compile}"]
    if c.precision != "none":
        parts.append(c.precision)
    if c.offload:
        parts.append(f"offload {c.offload}")
    if c.pdl != "auto":
        parts.append(f"pdl {c.pdl}")
    return ", ".join(parts)


def _trial_row(r: TrialResult, c: Optional[Candidate], passed: bool, kinds: Sequence[str]) -> dict:
    status = "passed" if passed else r.status
    if r.status == "ok" and not passed:
        status = "rejected"
    return {"trial": r.trial, "candidate": r.key, "summary": _short(c, kinds) if c else r.key,
            "status": status, "reason": r.reason, "score": r.score,
            "latency_ms": {str(b): v for b, v in r.latency_ms.items()},
            "predicted_ms": {str(b): v for b, v in r.predicted_ms.items()},
            "rel_error": r.accuracy.get("rel_error"), "top1_agreement": r.accuracy.get("top1_agreement"),
            "apply_s": r.apply_s, "seconds": r.seconds, "from_records": r.reused}


def _progress(console):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("[bold]tune[/bold]"), BarColumn(), TextColumn("{task.percentage:>3.0f}% of budget"),
                    TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=False)


def _print_space(con, model, target, env, sp: Space, n_valid, cap, gate: Gate, budget_min, top, pscore, notes, db,
                 n_records) -> None:
    from rich.table import Table
    con.print(f"[bold]planlang tune[/bold] {model} on {env['device']} (target {target}; torch {env['torch']}, "
              f"triton {env['triton']}, driver {env['driver']})")
    t = Table(title="search space", show_header=True)
    t.add_column("axis")
    t.add_column("values", justify="right")
    t.add_column("what")
    for name, n, desc in sp.describe():
        t.add_row(name, str(n), desc)
    con.print(t)
    con.print(f"space size: {sp.size_formula()} candidates", soft_wrap=True)
    con.print(f"{n_valid} pass lint; at most {cap} will be measured (a quarter of the space or less); "
              + (f"roofline prune margin {sp.prune_margin:g}" if sp.prune_margin is not None else "no roofline pruning"),
              soft_wrap=True)
    con.print(f"gate: {gate.describe()}; budget {budget_min:g} min; records {db} ({n_records} finished trial(s))",
              soft_wrap=True)
    if top:
        con.print("best predicted: " + "; ".join(f"{_short(c, sp.fusion_kinds)} ({pscore[c.key]:.3f} ms)" for c in top[:3]))
    for n in notes:
        con.print(f"  note: {n}")


def _report(con, r: TuneResult, json_output: bool) -> None:
    if json_output:
        print(json.dumps(r.to_json(), indent=2, default=str))
        return
    from rich.table import Table
    batches = sorted({int(b) for d in r.baselines.values() for b in d})
    t = Table(title=f"trials ({r.measured} measured, {r.reused} from records; {r.stopped})")
    for col in ("#", "status", "candidate", *(f"ms b{b}" for b in batches), "score", "rel err", "agree", "note"):
        t.add_column(col, justify="left" if col in ("status", "candidate", "note") else "right", overflow="fold")
    best_trial = r.best["trial"] if r.best else None
    for row in r.trials:
        status = row["status"] + (" *best*" if row["trial"] == best_trial and best_trial is not None else "")
        if row["from_records"]:
            status += " (rec)"
        style = {"passed": "", "rejected": "yellow", "error": "red"}.get(row["status"], "")
        t.add_row(str(row["trial"]), f"[{style}]{status}[/{style}]" if style else status, row["summary"],
                  *(f"{row['latency_ms'][str(b)]:.3f}" if str(b) in row["latency_ms"] else "-" for b in batches),
                  f"{row['score']:.3f}" if row["score"] is not None else "-",
                  f"{row['rel_error']:.2e}" if row["rel_error"] is not None else "-",
                  f"{row['top1_agreement']:.4f}" if row["top1_agreement"] is not None else "-",
                  row["reason"])
    con.print(t)
    base = "; ".join(f"{name} " + ", ".join(f"b{b} {ms:.3f} ms" for b, ms in d.items()) for name, d in r.baselines.items())
    con.print(f"baselines (same run): {base}")
    con.print(f"setup {r.setup_s:.0f} s, search {r.search_s:.0f} s; records: {r.storage} (study {r.study})")
    if r.best:
        lat = ", ".join(f"b{b} {ms:.3f} ms" for b, ms in r.best["latency_ms"].items())
        speed = (f"{1 / r.best['score']:.2f}x faster than" if r.best["score"] <= 1 else
                 f"{r.best['score']:.2f}x slower than")
        con.print(f"[bold]best[/bold]: {r.best['summary']}: {lat}, {speed} the unplanned model; wrote {r.output}",
                  soft_wrap=True)



def cmd_tune(args) -> int:
    """`planlang tune MODEL -o PLAN ...` (planlang.cli parses the arguments)."""
    try:
        tune(args.model, args.output, target=args.target, budget_min=args.budget, max_error=args.max_error,
             min_agreement=args.min_agreement, space=args.space, storage=args.storage,
             batches=args.batch or (1, 16), context=args.context, device=args.device, seed=args.seed,
             trust_pickle=args.trust_pickle, json_output=args.format == "json")
    except TuneError as exc:
        from .commands import _note_failure
        print(f"planlang tune: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"   = hint: {exc.hint}", file=sys.stderr)
        _note_failure(exc.message, exc.hint)
        return exc.code
    return EXIT_OK
