"""Semantic validation: every rule of the spec that a schema cannot express.

One function per rule family; each takes a `Check` (the plan, where it was written, the
target) and yields diagnostics. `validate` runs them all. Checks that need a model live in
the runtime (`planlang.runtime.modelcheck`) and are added by `lint --model`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from . import hardware, names
from .diagnostics import Diagnostic, at
from .plan import Plan
from .selectors import Selector, SelectorError, covers, overlaps, regex_dot_before_digit
from .source import SourceMap, Span


@dataclass
class Check:
    plan: Plan
    source: Optional[SourceMap]
    target: Optional[hardware.Target]          # None: no hardware checks
    target_path: tuple = ("target",)
    catalog: Optional[hardware.Catalog] = None
    selectors: dict = field(default_factory=dict)  # path -> Selector (parsed ones)

    def diag(self, path, code, message, **kw) -> Diagnostic:
        return at(self.source, path, code, message, **kw)

    @property
    def is_cuda(self) -> bool:
        return self.target is not None and self.target.compute_capability is not None


# ----------------------------------------------------------------------------- target

@dataclass
class TargetResolution:
    target: Optional[hardware.Target]
    diagnostics: list[Diagnostic]
    how: str


def resolve_target(plan: Plan, source: Optional[SourceMap], catalog: hardware.Catalog,
                   override: Optional[str] = None, detect: Callable = hardware.detect) -> TargetResolution:
    """The target lint checks against: `--target`, else the plan's, where `auto` means the
    GPU found without importing torch, else no hardware checks (a note says so)."""
    name = override or plan.target
    if name == "auto":
        found = detect()
        if found is None:
            return TargetResolution(None, [at(source, ("target",), "PL204",
                                              "target auto: no GPU found, so no hardware checks",
                                              hint="pass --target to check against a target, e.g. --target h100")],
                                    "auto: nothing detected")
        name = found.target_id
        how = f"auto: {found.name} ({found.how})"
    else:
        how = "--target" if override else "plan"
    target = catalog.get(name)
    if target is None:
        guess = catalog.suggest(name)
        hint = f"did you mean '{guess}'?" if guess else "see `planlang targets`"
        if override:
            return TargetResolution(None, [Diagnostic("PL203", f"unknown target '{name}' (from --target)",
                                                      file=source.file if source else "<plan>", hint=hint)], how)
        return TargetResolution(None, [at(source, ("target",), "PL203", f"unknown target '{name}'", hint=hint)], how)
    return TargetResolution(target, [], how)


# ----------------------------------------------------------------------------- selectors

def _selector_span(check: Check, path, err: SelectorError) -> Diagnostic:
    d = check.diag(path, "PL110", f"invalid selector: {err.message}", hint=err.hint)
    if d.span is not None and d.source_line is not None:
        col = d.span.column
        if d.source_line[col - 1: col] in "\"'":
            col += 1  # quoted in the file
        start = col + err.offset
        d.span = Span(d.span.line, start, d.span.line, start + max(1, err.length))
    return d


def _selectors(check: Check) -> Iterator[tuple[tuple, str]]:
    plan = check.plan
    for i, f in enumerate(plan.fusions):
        yield ("fusions", i, "at"), f.at
    for i, r in enumerate(plan.precision.rules):
        yield ("precision", "rules", i, "at"), r.at
    for i, r in enumerate(plan.memory.offload):
        yield ("memory", "offload", i, "at"), r.at
    for i, r in enumerate(plan.memory.recompute):
        yield ("memory", "recompute", i, "at"), r.at
    for i, r in enumerate(plan.parallel.styles):
        yield ("parallel", "styles", i, "at"), r.at


def check_selectors(check: Check) -> Iterator[Diagnostic]:
    for path, text in _selectors(check):
        try:
            sel = Selector.parse(text)
        except SelectorError as err:
            yield _selector_span(check, path, err)
            continue
        check.selectors[path] = sel
        for offset in regex_dot_before_digit(sel):
            d = check.diag(path, "PL308", f"in '{text}' the '.' before a digit matches any character",
                           hint="escape it (\\.) to match a literal dot, e.g. layers\\.1\\.")
            if d.span is not None and d.source_line is not None:
                col = d.span.column + (1 if d.source_line[d.span.column - 1: d.span.column] in "\"'" else 0)
                d.span = Span(d.span.line, col + offset, d.span.line, col + offset + 1)
            yield d


def _shadowed(check: Check, section: tuple, count: int, what: str) -> Iterator[Diagnostic]:
    """Warn on a rule whose selector a later rule of the same section covers: it never wins."""
    for i in range(count):
        earlier = check.selectors.get(section + (i, "at"))
        if earlier is None:
            continue
        for j in range(i + 1, count):
            later = check.selectors.get(section + (j, "at"))
            if later is not None and covers(later, earlier) is True:
                yield check.diag(section + (i, "at"), "PL302",
                                 f"{what} at '{earlier.text}' never wins: the later rule at '{later.text}' "
                                 f"(line {_line(check, section + (j, 'at'))}) covers every place it selects",
                                 hint="the last matching rule wins; move this rule after it, or drop it")
                break


def _line(check: Check, path) -> str:
    span = check.source.value(path) if check.source else None
    return str(span.line) if span else "?"


# ----------------------------------------------------------------------------- sections

def check_fusions(check: Check) -> Iterator[Diagnostic]:
    fusions = check.plan.fusions
    for i, f in enumerate(fusions):
        if f.kind == "sampling" and f.at != "**":
            yield check.diag(("fusions", i, "at"), "PL303",
                             "sampling applies to the generation loop and takes no 'at'",
                             hint="remove `at` from the sampling fusion")
    for i, a in enumerate(fusions):
        for j in range(i + 1, len(fusions)):
            b = fusions[j]
            if a.kind != b.kind:
                continue
            sa, sb = check.selectors.get(("fusions", i, "at")), check.selectors.get(("fusions", j, "at"))
            if sa is None or sb is None:
                continue
            if overlaps(sa, sb) is not False:
                yield check.diag(("fusions", j), "PL301",
                                 f"fusion '{b.kind}' appears twice over overlapping places "
                                 f"('{sa.text}' at line {_line(check, ('fusions', i))}, and '{sb.text}')",
                                 hint="give each site one rule: narrow the selectors so they do not overlap")
    if check.target is not None and check.plan.fusions and not check.target.triton:
        yield check.diag(("fusions",), "PL208",
                         f"target {check.target.id} has no Triton: fusions run their PyTorch reference",
                         hint="fused kernels need a CUDA target")
    if check.plan.mode == "training":
        for i, f in enumerate(fusions):
            if f.kind in ("rope_kvcache", "sampling"):
                yield check.diag(("fusions", i), "PL315", f"fusion '{f.kind}' does nothing in training mode",
                                 hint="it fuses the KV-cache write / the generation loop of inference",
                                 severity="warning")


def check_graphs(check: Check) -> Iterator[Diagnostic]:
    g = check.plan.graphs
    if g.capture == "cuda_graph" and check.target is not None and not check.target.cuda_graphs:
        yield check.diag(("graphs", "capture"), "PL202",
                         f"cuda_graph capture needs a CUDA target; target {check.target.id} has none",
                         hint="use capture: none here, or target a GPU")
    t = check.target
    if g.pdl == "on" and t is not None and (t.cc is None or t.cc < (9, 0)):
        has = f"has {hardware.cc_text(t.compute_capability)}" if t.cc else "is not a CUDA GPU"
        yield check.diag(("graphs", "pdl"), "PL210",
                         f"pdl: on needs {hardware.format_cc('9.0')} or newer; target {t.id} {has}",
                         hint="use pdl: auto (PDL wherever the device has it), or target h100")
    mb = check.plan.limits.max_batch
    if mb is not None:
        for i, b in enumerate(g.buckets):
            if b > mb:
                yield check.diag(("graphs", "buckets", i) if g.buckets_spec is None else ("graphs", "buckets"),
                                 "PL304", f"bucket {b} is above limits.max_batch ({mb}): its graph is never used",
                                 hint=f"end the buckets at {mb}, or raise limits.max_batch")
                break
    if g.capture == "cuda_graph":
        prev = 0
        for i, b in enumerate(g.buckets):
            worst = prev + 1  # the smallest batch that runs on bucket b
            if (b - worst) / b > 0.5:
                yield check.diag(("graphs", "buckets", i) if g.buckets_spec is None else ("graphs", "buckets"),
                                 "PL402", f"a batch of {worst} runs padded to bucket {b}: "
                                 f"{b - worst} of {b} rows ({100 * (b - worst) // b}%) are padding",
                                 hint=f"add a bucket between {prev or 1} and {b}, e.g. {max(worst, (prev + b) // 2)}")
            prev = b


def check_compile(check: Check) -> Iterator[Diagnostic]:
    c = check.plan.compile
    if check.plan.graphs.capture == "cuda_graph" and c.mode in names.GRAPH_CAPTURING_COMPILE_MODES:
        yield check.diag(("compile", "mode"), "PL401",
                         f"compile mode '{c.mode}' captures CUDA graphs itself, and graphs.capture is cuda_graph: "
                         "planlang captures, and compiles without graphs",
                         hint=f"write mode: {'max-autotune-no-cudagraphs' if c.mode == 'max-autotune' else 'default'}")


# What every planlang GEMM kernel accumulates in (runtime/kernels, runtime/passes/precision.py);
# `precision.accumulate` states it, and no other value changes what runs.
RUNTIME_ACCUMULATE = "fp32"


def check_precision(check: Check) -> Iterator[Diagnostic]:
    p = check.plan.precision
    t = check.target
    if p.accumulate != RUNTIME_ACCUMULATE:
        yield check.diag(("precision", "accumulate"), "PL317",
                         f"accumulate: {p.accumulate} is not honoured: planlang's GEMMs always accumulate "
                         f"in {RUNTIME_ACCUMULATE}",
                         hint=f"write accumulate: {RUNTIME_ACCUMULATE}, or leave it out")
    if p.default is not None and t is not None:
        cap = hardware.dtype_support(t, p.default)
        if not cap.ok:
            yield check.diag(("precision", "default"), "PL201", cap.reason, hint=cap.hint)
    if p.preset is not None:
        for rule in _preset_rules(check):
            yield from _rule_dtype(check, rule, ("precision", "preset"), preset=True)
    for i, rule in enumerate(p.rules):
        path = ("precision", "rules", i)
        yield from _rule_options(check, rule, path)
        yield from _rule_dtype(check, rule, path + ("dtype",))
    yield from _shadowed(check, ("precision", "rules"), len(p.rules), "precision rule")


def _preset_rules(check: Check):
    from .plan import preset_rules
    return preset_rules(check.plan.precision.preset)


def _rule_options(check: Check, rule, path) -> Iterator[Diagnostic]:
    quantized = rule.dtype in names.FP8_DTYPES + names.BLOCK_DTYPES
    if rule.scaling is not None and not quantized:
        yield check.diag(path + ("scaling",), "PL310", f"scaling applies to fp8 and block formats, not {rule.dtype}",
                         hint="remove `scaling`")
    if rule.dtype in names.BLOCK_DTYPES and rule.scaling not in (None, "block"):
        yield check.diag(path + ("scaling",), "PL310",
                         f"{rule.dtype} always scales in its own blocks of {names.FORMAT_BLOCK[rule.dtype]}",
                         hint="remove `scaling`, or write scaling: block")
    if rule.block_size is not None:
        if rule.dtype in names.BLOCK_DTYPES:
            yield check.diag(path + ("block_size",), "PL310",
                             f"{rule.dtype} has a fixed block of {names.FORMAT_BLOCK[rule.dtype]}",
                             hint="remove `block_size`")
        elif rule.effective_scaling() != "block":
            yield check.diag(path + ("block_size",), "PL310", "block_size needs scaling: block",
                             hint="add scaling: block, or remove block_size")
    if rule.activations is not None and rule.activations != "keep" and not quantized:
        yield check.diag(path + ("activations",), "PL310",
                         f"activations: {rule.activations} quantizes a GEMM input; {rule.dtype} is not a quantized format",
                         hint="remove `activations`")
    if rule.activations == "per_block" and rule.dtype in names.FP8_DTYPES and rule.effective_scaling() != "block":
        yield check.diag(path + ("activations",), "PL310", "per_block activations with fp8 need scaling: block",
                         hint="add scaling: block (groups of block_size along the input dimension)")


def _rule_dtype(check: Check, rule, path, preset: bool = False) -> Iterator[Diagnostic]:
    low = rule.dtype in names.FP8_DTYPES + names.BLOCK_DTYPES
    src = f"preset {check.plan.precision.preset}" if preset else None
    if check.plan.mode == "training" and low and not rule.emulate:
        yield check.diag(path, "PL306", f"{rule.dtype} is not supported in training yet"
                         + (f" ({src})" if src else ""),
                         hint="train in bf16, or add emulate: true to study the format's accuracy")
    t = check.target
    if t is None:
        return
    cap = hardware.dtype_support(t, rule.dtype, emulate=rule.emulate)
    if not cap.ok:
        yield check.diag(path, "PL201", cap.reason + (f" ({src})" if src else ""), hint=cap.hint)
        return
    if rule.emulate:
        yield check.diag(path, "PL205", f"{rule.dtype} runs emulated (quantize-dequantize) at '{rule.at}'",
                         hint="for accuracy studies; it is not faster")
        return
    if low and rule.dtype in names.FP8_DTYPES:
        note = hardware.scaling_support(t, rule.dtype, rule.effective_scaling(), rule.effective_activations())
        if not note.ok:
            yield check.diag(path, "PL201", note.reason, hint=note.hint)
        elif getattr(note, "note", None):
            yield check.diag(path, "PL206", note.note)


def check_memory(check: Check) -> Iterator[Diagnostic]:
    m = check.plan.memory
    if check.plan.mode == "inference":
        for i, r in enumerate(m.recompute):
            yield check.diag(("memory", "recompute", i), "PL305",
                             "recompute applies in training mode; in inference it does nothing",
                             hint="remove it, or set mode: training")
    for i, r in enumerate(m.recompute):
        if r.policy == "full" and r.save:
            yield check.diag(("memory", "recompute", i, "save"), "PL315",
                             "save is read by policy: selective only; policy full recomputes everything",
                             hint="remove `save`, or write policy: selective", severity="warning")
    if check.target is not None and check.target.compute_capability is None:
        for i, r in enumerate(m.offload):
            yield check.diag(("memory", "offload", i), "PL315",
                             f"offload to cpu on target {check.target.id} moves nothing: the model is already in host memory",
                             hint="offload is for GPU targets", severity="warning")
    yield from _shadowed(check, ("memory", "offload"), len(m.offload), "offload rule")
    yield from _shadowed(check, ("memory", "recompute"), len(m.recompute), "recompute rule")


def check_parallel(check: Check) -> Iterator[Diagnostic]:
    par = check.plan.parallel
    if par.tensor > 1 and check.target is not None and not (check.is_cuda or check.target.is_cpu):
        yield check.diag(("parallel", "tensor"), "PL209",
                         f"tensor parallelism runs on NCCL (CUDA) or gloo (CPU); target {check.target.id} has neither")
    if par.tensor == 1 and (par.sequence or par.styles):
        yield check.diag(("parallel",), "PL315", "parallel styles and sequence do nothing at tensor: 1",
                         hint="set tensor to the number of GPUs to split over", severity="warning")
    yield from _shadowed(check, ("parallel", "styles"), len(par.styles), "parallel style")


RULE_FAMILIES = (check_selectors, check_fusions, check_graphs, check_compile, check_precision,
                 check_memory, check_parallel)


def validate(plan: Plan, source: Optional[SourceMap] = None, *, target: Optional[str] = None,
             catalog: Optional[hardware.Catalog] = None, detect: Callable = hardware.detect) -> list[Diagnostic]:
    """All diagnostics of a schema-valid plan against its target (or `target`, overriding)."""
    catalog = catalog or hardware.load_catalog()
    res = resolve_target(plan, source, catalog, target, detect)
    diags = list(res.diagnostics)
    check = Check(plan, source, res.target, catalog=catalog)
    for family in RULE_FAMILIES:
        diags.extend(family(check))
    return diags
