"""`apply(model, plan)`: the fixed order in which a plan changes a model.

1. resolve every rule's selector against `named_modules()`; a required rule that names
   nothing fails here, before the model is touched;
2. trace the forward once (Dynamo) on example inputs and find every fusion's sites; a
   required fusion that finds no site fails here, still before the model is touched;
3. build fused weights once (the parts become views of them: no second copy);
4. rewrite each graph Dynamo hands us: fusion passes in `PASS_ORDER`, the precision pass,
   then each rope_kvcache merged into the attention that reads its queries
   (`passes/rope_attention.py`), then each norm folded into the GEMM that reads it
   (`passes/prologue.py`), then the compile section (Inductor, or the rewritten graph run as is);
5. report: for each rule, the places it took and the kernel that runs there.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from planlang.diagnostics import Diagnostic, at, has_errors, render_text
from planlang.plan import Plan
from planlang.selectors import Selector, SelectorError, outline
from planlang.source import SourceMap

from .kernels import attention as _attention_ops  # noqa: F401  (registers planlang:: ops)
from .kernels import qkv as _qkv_ops  # noqa: F401
from .kernels import rmsnorm_residual as _norm_ops  # noqa: F401
from .kernels import rope_kvcache as _rope_ops  # noqa: F401
from .kernels import sampling as _sampling_ops  # noqa: F401
from .kernels import swiglu as _swiglu_ops  # noqa: F401
from .kernels.backend import pdl_mode, pdl_status, pdl_support, triton_available
from .passes.fusions import PASSES, FusedWeights, Site, _all_passes, explain_misses

PASSES.update(_all_passes())
from .passes.linear import LinearPass  # noqa: E402

PASSES["linear"] = LinearPass()
from .passes.graph import GraphView, capture, find_tensor, model_tensors
from .passes.graphs import traced_call
from .passes.prologue import fold_norms
from .passes.rope_attention import fuse_rope_attention
from .parallel.tp import shard_model
from .passes.precision import TORCH_DTYPES, PrecisionMap, PrecisionPass, check_device, gemm_errors, rule_path

PASS_ORDER = ("rmsnorm_residual", "swiglu", "qkv", "rope_kvcache", "attention", "linear")


class ApplyError(Exception):
    """The plan cannot be applied to this model; `.diagnostics` say where and why."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = diagnostics
        super().__init__("\n" + render_text(diagnostics))  # as the CLI prints them: place, code, hint


@dataclass
class RuleReport:
    section: str
    index: int
    what: str                     # fusion kind, dtype, ...
    at: str
    places: list[str] = field(default_factory=list)
    kernel: str = ""
    note: str = ""
    error: Optional[dict] = None  # precision rules: relative error of the GEMM outputs they change


@dataclass
class Report:
    plan: str
    device: str
    backend: str
    rules: list[RuleReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    graphs: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)   # GEMM path -> {dtype, kernel}, where a rule changed it
    dtypes: dict = field(default_factory=dict)      # every GEMM and op kind -> the dtype it runs in

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        """The report as text: `print(planned.report)` (the CLI prints it as a table)."""
        lines = [f"plan {self.plan} on {self.device} ({self.backend})"]
        for r in self.rules:
            shown = ", ".join(r.places[:4]) + (f" ... (+{len(r.places) - 4})" if len(r.places) > 4 else "")
            lines.append(f"  {r.section}[{r.index}] {r.what}: {len(r.places)} place(s) {shown}; {r.kernel}"
                         + (f"; {r.note}" if r.note else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- example inputs

def is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "setup_caches") or hasattr(getattr(model, "config", None), "vocab_size") and \
        hasattr(model, "generate") and hasattr(model, "get_input_embeddings")


def default_inputs(model: nn.Module, device: torch.device, batch: int = 1, tokens: int = 4) -> Callable:
    """A callable that runs the model on token ids (built-in and HF causal LMs)."""
    vocab = model.config.vocab_size if not isinstance(model.config, dict) else model.config["vocab_size"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, tokens), generator=gen).to(device)
    if hasattr(model, "setup_caches"):
        pos = torch.arange(tokens, device=device)
        return lambda m: m(ids, pos)
    return lambda m: m(input_ids=ids)


# ----------------------------------------------------------------------------- the planned model

class PlannedModel(nn.Module):
    """The model with the plan applied: `forward` runs the rewritten graphs; `.model` is
    the original module (its weights shared), `.report` says what was done."""

    def __init__(self, model: nn.Module, plan: Plan, report: Report, forward_fn: Callable,
                 weights: FusedWeights, sampling: Optional[dict]):
        super().__init__()
        self.model = model
        self.plan = plan
        self.report = report
        self._forward = forward_fn
        self.fused_weights = weights
        self.sampling = sampling

    def forward(self, *args, **kwargs):
        with pdl_mode(self.plan.graphs.pdl):  # graphs.pdl for kernels launched eagerly or captured now
            return self._forward(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def sample_fn(self, temperature: float = 1.0, top_k=None, top_p=None, seed: int = 0):
        """The token sampler for `generate`: planlang's fused kernel when the plan has a
        `sampling` fusion (its options override the arguments), else None (the default)."""
        if self.sampling is None:
            return None
        from .kernels.sampling import sample
        opts = {"temperature": temperature, "top_k": top_k, "top_p": top_p, **self.sampling}
        state = {"step": 0}

        def draw(logits):
            state["step"] += 1
            return sample(logits, temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
                          seed=seed + state["step"])
        return draw


# ----------------------------------------------------------------------------- steps

def _fusion_rules(plan: Plan):
    return [(i, f) for i, f in enumerate(plan.fusions)]


def resolve_rules(model: nn.Module, plan: Plan, source: Optional[SourceMap]) -> tuple[dict, list[Diagnostic]]:
    """Step 1: the modules each rule's selector names (path -> list of names)."""
    names = [n for n, _ in model.named_modules()]
    found: dict[tuple, list[str]] = {}
    diags = []
    from planlang.selectors import resolve
    entries = [(("fusions", i, "at"), f.at, f.required, f.kind) for i, f in enumerate(plan.fusions) if f.kind != "sampling"]
    entries += [(("precision", "rules", i, "at"), r.at, True, r.dtype) for i, r in enumerate(plan.precision.rules)]
    entries += [(("memory", "offload", i, "at"), r.at, True, "offload") for i, r in enumerate(plan.memory.offload)]
    entries += [(("memory", "recompute", i, "at"), r.at, True, "recompute") for i, r in enumerate(plan.memory.recompute)]
    entries += [(("parallel", "styles", i, "at"), r.at, True, r.style) for i, r in enumerate(plan.parallel.styles)]
    for path, text, required, what in entries:
        try:
            hits = resolve(Selector.parse(text), names)
        except SelectorError as exc:
            diags.append(at(source, path, "PL110", f"invalid selector: {exc.message}", hint=exc.hint))
            continue
        found[path] = hits
        if not hits:
            code = "PL309" if required else "PL312"
            diags.append(at(source, path, code, f"'{text}' ({what}) names no module of this model",
                            hint=f"the model's modules: {outline(names)}"
                                 + ("; write required: false to allow a miss" if path[0] == "fusions" else "")))
    return found, diags


def selected(site: Site, selector: Selector) -> bool:
    return all(selector.selects(m) for m in site.members)


def find_sites(views: list[GraphView], plan: Plan) -> dict[int, list[Site]]:
    """Step 2: the sites each fusion rule takes, over all captured graphs (by rule index)."""
    out: dict[int, list[Site]] = {}
    for i, rule in enumerate(plan.fusions):
        if rule.kind not in PASSES:
            continue
        sel = Selector.parse(rule.at)
        seen = set()
        hits = []
        for view in views:
            for site in PASSES[rule.kind].find(view):
                if site.key not in seen and selected(site, sel):
                    seen.add(site.key)
                    hits.append(site)
        out[i] = hits
    return out


MAX_VARIANTS = 256  # rewrites of one Dynamo graph (one per module instance that shares it)


def _rewriting_backend(model: nn.Module, plan: Plan, weights: FusedWeights, kernels: dict, skipped: dict,
                       rewritten: dict, compile_mode: str):
    """Step 4: the torch.compile backend that rewrites each graph Dynamo hands it."""
    rules = [(i, f, Selector.parse(f.at)) for i, f in enumerate(plan.fusions) if f.kind in PASSES]

    def backend(gm, example_inputs):
        """One rewritten graph per set of parameters the graph is called with. Dynamo shares
        a graph between module instances whose code is the same (a block's code after a
        graph break runs for every block, its parameters as inputs), while the rewrite bakes
        the fused weights of the instance it saw: each new set of parameters and buffers
        (by storage) gets a rewrite of its own, built at its first call."""
        pristine = _copy_graph_module(gm)
        by_id = model_tensors(model)
        bound = [i for i, value in enumerate(example_inputs) if find_tensor(by_id, value) is not None]
        ends = (bound[0], bound[-1]) if bound else ()

        def name_of(t) -> Any:
            # By the parameter's object (stable while offload swaps its storage), else an
            # alias of it (GraphView's match), else its storage.
            hit = find_tensor(by_id, t)
            return hit[:2] if hit is not None else (t.data_ptr(), tuple(t.shape))

        def key_of(inputs) -> tuple:
            # The first and last parameter bound tell module instances apart (a shared graph
            # swaps all of them); two, not all: this runs on every call without a CUDA graph.
            return tuple(name_of(inputs[i]) for i in ends)

        variants = {key_of(example_inputs): rewrite_one(gm, example_inputs)}
        if not bound:
            return next(iter(variants.values()))

        def run(*args):
            fn = variants.get(key_of(args))
            if fn is None:
                if len(variants) >= MAX_VARIANTS:
                    raise RuntimeError(f"planlang: a graph was called with more than {MAX_VARIANTS} sets of "
                                       "parameters; hint: report it with the model (the planned forward cannot "
                                       "tell its modules apart)")
                fresh = _copy_graph_module(pristine)
                fn = variants[key_of(args)] = rewrite_one(fresh, list(args))
            return fn(*args)
        return run

    def rewrite_one(gm, example_inputs):
        view = GraphView(gm, list(example_inputs), model)
        _rewrite(view)
        if weights.precision:
            PrecisionPass().rewrite_graph(view, weights)
        for path in fuse_rope_attention(gm.graph):
            for i, rule, _ in rules:
                if rule.kind in ("rope_kvcache", "attention") and path in rewritten.get(i, ()):
                    kernels.setdefault(i, set()).add("rope_attention")
        for path in fold_norms(gm.graph):
            for i, rule, _ in rules:
                if rule.kind == "rmsnorm_residual" and path in rewritten.get(i, ()):
                    kernels.setdefault(i, set()).add("rmsnorm_gemm")
        remove_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
        if compile_mode == "none":
            return traced_call(gm, gm.forward)  # a failed capture can name its node (passes/graphs.py)
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx
        _declare_fused_buffers(gm)
        return compile_fx(gm, example_inputs, config_patches=list_mode_options(compile_mode))

    def _rewrite(view):
        for kind in PASS_ORDER:
            if kind not in PASSES:
                continue
            for i, rule, sel in rules:
                if rule.kind != kind:
                    continue
                for site in PASSES[kind].find(view):
                    if selected(site, sel):
                        done = PASSES[kind].rewrite(view, site, weights)
                        if done.startswith("skipped"):
                            skipped.setdefault(i, {})[site.path] = done
                        else:
                            kernels.setdefault(i, set()).add(done)
                            rewritten.setdefault(i, set()).add(site.path)
    return backend


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of gm's graph (sharing its attributes), and the metadata
    Dynamo and AOTAutograd read beside the graph."""
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for old, new in zip(gm.graph.nodes, out.graph.nodes):  # attributes a graph copy does not carry
        for name in ("_dynamo_source",):
            if hasattr(old, name):
                setattr(new, name, getattr(old, name))
    out.meta = dict(getattr(gm, "meta", {}))
    for name in ("_param_name_to_source", "_source_to_user_stacks"):
        if hasattr(gm, name):
            value = getattr(gm, name)
            setattr(out, name, dict(value) if isinstance(value, dict) else value)
    return out


def _declare_fused_buffers(gm) -> None:
    """AOTAutograd maps every parameter and buffer of a Dynamo graph back to the source
    Dynamo read it from (`_param_name_to_source`); the fused weights the passes registered
    on the graph module have none, and Inductor would refuse the graph. Each gets a
    constant source of its own name."""
    names = getattr(gm, "_param_name_to_source", None)
    if names is None:
        return
    from torch._dynamo.source import ConstantSource
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in names:
            names[n.target] = ConstantSource(n.target)


def remove_dead_code(graph) -> int:
    """Drop computations nothing uses any more (masks and tables the fused kernels made
    redundant). In-place ops (names ending in `_`), mutating custom ops and outputs stay."""
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node.users or node.op not in ("call_function", "call_method") or node.is_impure():
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            continue
        graph.erase_node(node)
        removed += 1
    return removed


def effective_compile_mode(plan: Plan) -> str:
    mode = plan.compile.mode
    if plan.graphs.capture == "cuda_graph" and mode in ("reduce-overhead", "max-autotune"):
        # planlang captures the graphs itself (spec §6).
        return "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
    return mode


def apply(model: nn.Module, plan: Plan, example_inputs: Any = None, *, source: Optional[SourceMap] = None,
          device: Optional[torch.device] = None, max_batch: Optional[int] = None,
          max_seq_len: Optional[int] = None) -> PlannedModel:
    """Apply `plan` to `model`; returns the planned model, whose `.report` lists every
    rule's places and kernels. Raises ApplyError, before changing the model, when a
    required rule matches nothing. Kernels compiled or captured here, and every call of
    the planned model, launch as `graphs.pdl` says."""
    plan, source = _as_plan(plan, source)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with pdl_mode(plan.graphs.pdl):
        return _apply(model, plan, example_inputs, source, device, max_batch, max_seq_len)


def _explain_trace_failure(model: nn.Module, run: Callable, exc: Exception) -> None:
    """The trace failed: when the model fails on its example inputs without Dynamo too, raise
    that error (the user's inputs), named as such, instead of Dynamo's fake-tensor trace."""
    try:
        with torch.no_grad():
            run(model)
    except Exception as eager:
        first = str(eager).strip().splitlines()[0] if str(eager).strip() else ""
        raise ValueError(f"apply: the model fails on its example inputs, without any plan: "
                         f"{type(eager).__name__}: {first} (hint: pass example_inputs as the model's forward "
                         "takes them: a tuple of its arguments)") from eager
    # the model runs without Dynamo: the failure is the trace's; the caller re-raises it


def _as_plan(plan: Any, source: Optional[SourceMap]) -> tuple[Plan, Optional[SourceMap]]:
    """A Plan, a plan file's path (read with its places, `extends` merged) or a plan
    document (dict); ApplyError for a file or document with errors, TypeError otherwise."""
    import os
    if isinstance(plan, Plan):
        return plan, source
    if isinstance(plan, (str, os.PathLike)):
        from planlang.loader import load_with_source
        loaded = load_with_source(plan)
        if loaded.plan is None or has_errors(loaded.diagnostics):
            raise ApplyError(loaded.diagnostics)
        return loaded.plan, loaded.source
    if isinstance(plan, dict):
        got, diags = Plan.from_document(plan, source)
        if got is None:
            raise ApplyError(diags)
        return got, source
    raise TypeError(f"apply: plan must be a Plan, a plan file's path or a plan document (dict), not "
                    f"{type(plan).__name__} (hint: planlang.load('plan.yaml'))")


def _apply(model, plan, example_inputs, source, device, max_batch, max_seq_len) -> PlannedModel:
    ok, why = triton_available(device)
    report = Report(plan=plan.name or "plan", device=str(device),
                    backend="triton" if ok else f"PyTorch reference (no Triton for {device.type})")

    found, diags = resolve_rules(model, plan, source)
    if plan.graphs.pdl == "on":
        can, reason = pdl_support(device)
        if not can:
            diags.append(at(source, ("graphs", "pdl"), "PL210", f"pdl: on cannot be honoured on {device}: {reason}",
                            hint="use pdl: auto (PDL wherever the device has it), or run on an sm_90+ GPU"))
    if device.type == "cuda":
        report.notes.append(f"kernels: {pdl_status(device)[1]}")
    pmap = PrecisionMap(model, plan)
    for i, msg, hint in check_device(pmap, device):
        diags.append(at(source, rule_path(plan, i), "PL201", msg, hint=hint))
    if any(d.severity == "error" for d in diags):
        raise ApplyError(diags)
    shard_model(model, plan, report, source)  # parallel.tensor: each rank's shard, before the trace
    _cast_default(model, plan, report)

    if hasattr(model, "setup_caches") and plan.mode != "training":
        mb = max_batch or plan.limits.max_batch or max(plan.graphs.buckets)
        sl = max_seq_len or plan.limits.max_seq_len or min(getattr(model.config, "max_seq_len", 2048), 4096)
        if not model.caches_fit(mb, sl):
            model.setup_caches(mb, sl)
    kv = None
    if example_inputs is None:
        if not hasattr(model, "config"):
            raise ApplyError([at(source, ("fusions",), "PL309",
                                 f"{type(model).__name__} is not a causal language model planlang knows; "
                                 "apply needs example_inputs to trace it",
                                 hint="pass example_inputs=(tensor, ...) to apply()")])
        run = default_inputs(model, device)
    elif callable(example_inputs):
        run = example_inputs
    else:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        run = lambda m: m(*args)  # noqa: E731

    errors = gemm_errors(model, pmap, run) if pmap and plan.mode != "training" else {}
    if pmap and plan.mode != "training" and any(Selector.parse(r.at).op == "kv_cache" for r in pmap.rules):
        from .precision.kv_cache import apply_kv_cache_precision
        kv = apply_kv_cache_precision(model, pmap, run, report)  # before the trace: it sees FP8 caches
    # eps and offsets must stay constants in the graph, or recompiled graphs lose the norms.
    torch._dynamo.config.specialize_float = True
    try:
        views = capture(model, run)
    except Exception as exc:
        _explain_trace_failure(model, run, exc)
        raise
    sites = find_sites(views, plan)
    for i, rule in enumerate(plan.fusions):
        if rule.kind == "sampling":
            continue
        if not sites.get(i):
            names = found.get(("fusions", i, "at"), [])
            msg = (f"fusion '{rule.kind}' found no site in the {len(names)} module(s) '{rule.at}' names"
                   if names else f"fusion '{rule.kind}': '{rule.at}' names no module")
            if names and rule.kind in PASSES:
                why = explain_misses(views, rule.kind, Selector.parse(rule.at).selects)
                if why:
                    shown = "; ".join(f"{p}: {r}" for p, r in list(why.items())[:3])
                    msg += f" ({shown}{' ...' if len(why) > 3 else ''})"
            diags.append(at(source, ("fusions", i), "PL309" if rule.required else "PL312", msg,
                            hint="write required: false to allow it, or narrow/widen `at`"))
    if any(d.severity == "error" for d in diags):
        raise ApplyError(diags)
    report.notes.extend(f"{d.severity}: {d.message}" for d in diags)

    mode = effective_compile_mode(plan)
    weights = FusedWeights(pmap if pmap else None, share=mode == "none")
    kernels: dict[int, set] = {}
    skipped: dict[int, dict] = {}
    rewritten: dict[int, set] = {}
    training = plan.mode == "training"
    sampling = None
    for i, rule in enumerate(plan.fusions):
        if rule.kind == "sampling":
            sampling = {k: v for k, v in rule.options().items()}
            report.rules.append(RuleReport("fusions", i, "sampling", "generate", ["generate"],
                                           "planlang::sample" if ok else "reference"))
    offload = None
    if plan.memory.offload:
        from .memory.offload import prepare_offload  # hooks installed before the trace sees the model
        offload = prepare_offload(model, plan, device, report, source)
    if plan.memory.recompute:
        from .memory.recompute import apply_recompute
        apply_recompute(model, plan, report, source)
    if training:
        forward = model.forward if mode == "none" else torch.compile(model, mode=mode)
        report.notes.append("training: fused kernels have no backward yet; the PyTorch reference runs")
    elif mode == "none" and not pmap and not any(r.kind in PASSES for r in plan.fusions):
        forward = model.forward  # nothing to rewrite: no Dynamo (its guards cost every call)
    else:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        backend = _rewriting_backend(model, plan, weights, kernels, skipped, rewritten, mode)
        forward = torch.compile(model, backend=backend, dynamic=plan.compile.dynamic or None,
                                fullgraph=plan.compile.fullgraph)
        with torch.no_grad():
            run(forward)  # compile now, so the first user call is not the slow one
    for i, rule in enumerate(plan.fusions):
        if rule.kind == "sampling":
            continue
        names = sorted(rewritten.get(i, set()) if not training else {s.path for s in sites.get(i, [])})
        kern = ", ".join(sorted(kernels.get(i, ()))) or "none"
        kern = f"planlang::{kern} ({'triton' if ok else 'reference'})" if not training else "reference (training)"
        lost = skipped.get(i, {})
        report.rules.append(RuleReport("fusions", i, rule.kind, rule.at, [p for p in names if p not in lost], kern,
                                       "; ".join(f"{p}: {why}" for p, why in sorted(lost.items()))))
    _report_precision(plan, pmap, weights, report, training, errors, kv)
    report.dtypes = _report_dtypes(model, report, kv, training)
    if mode != plan.compile.mode:
        report.notes.append(f"compile mode {plan.compile.mode} runs as {mode}: planlang captures the graphs")
    if mode != "none":
        report.notes.append(f"compiled with Inductor, mode {mode}")
    if not weights.share and weights.tensors:
        mib = sum(t.numel() * t.element_size() for t in weights.tensors.values()) / 2**20
        report.notes.append(f"fused weights: copies beside the model's parameters ({mib:.1f} MiB more), since "
                            "Inductor re-reads the parameters as Dynamo traced them; compile mode none shares them")
    if offload is not None:
        offload.arm()  # after fused weights exist, before graphs capture the copies
    forward = _capture_graphs(model, plan, forward, device, report)
    planned = PlannedModel(model, plan, report, forward, weights, sampling)
    planned.offload = offload
    planned.kv_cache = kv
    return planned


def _cast_default(model: nn.Module, plan: Plan, report: Report) -> None:
    """`precision.default`: the model's weights cast once (activations follow them)."""
    default = plan.precision.default
    if default is None:
        return
    if default == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        report.notes.append("precision: fp32 GEMMs run in tf32 (torch.backends.cuda.matmul.allow_tf32)")
    dtype = TORCH_DTYPES[default]
    have = next((p.dtype for p in model.parameters() if p.is_floating_point()), dtype)
    if have != dtype:
        model.to(dtype)
        if hasattr(model, "setup_caches") and getattr(model, "max_batch", 0):
            model.setup_caches(model.max_batch, model.max_seq_len)  # the caches follow the weights
        report.notes.append(f"precision: weights cast from {str(have).removeprefix('torch.')} to {default}")


# Op kinds that are not GEMMs, and what planlang does with a rule for them.
_OP_NOTES = {
    "norm": "planlang's norm kernels and the built-in models compute norms in fp32",
    "softmax": "planlang's attention kernels compute softmax in fp32",
    "qk": "no FP8 attention kernel yet: the score GEMM stays in the model's dtype",
    "pv": "no FP8 attention kernel yet: the value GEMM stays in the model's dtype",
    "kv_cache": "the KV cache stays in the model's dtype (an FP8 cache needs a built-in model's KVCache)",
    "embedding": "embeddings are gathered rows: they stay in the model's dtype",
    "act": "activations compute in fp32 inside the fused kernels",
    "matmul": "matmuls other than linears run as the model wrote them",
    "attention": "attention runs in the model's dtype with fp32 softmax",
}


def _report_dtypes(model: nn.Module, report: Report, kv: Optional[dict], training: bool) -> dict:
    """The dtype every GEMM (by module path) and every other op kind now runs in: a rule's
    dtype where one won (`report.precision`), else the model's own."""
    from .passes.precision import lm_head_paths
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    own = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        floating[0] if floating else torch.float32, str(floating[0]).removeprefix("torch.") if floating else "fp32")
    gemms = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            info = None if training else report.precision.get(name)
            gemms[name] = info["dtype"] if info else own
    cache = kv["dtype"] if kv and kv.get("layers") and not kv.get("emulated") else own
    return {"gemms": gemms, "lm_head": sorted(lm_head_paths(model)),
            "ops": {"norm": "fp32", "softmax": "fp32", "act": "fp32", "attention (qk, pv)": own,
                    "embedding": own, "kv_cache": cache, "residual stream": own}}


def _report_precision(plan: Plan, pmap: PrecisionMap, weights: FusedWeights, report: Report, training: bool,
                      errors: dict, kv: Optional[dict] = None) -> None:
    """One report entry per precision rule: the GEMMs it won and the kernel that runs there;
    for rules on other op kinds, what planlang does with them."""
    if not pmap:
        return
    for i, rule in enumerate(pmap.rules):
        where = rule_path(plan, i)
        log = weights.precision_log.get(i, {})
        op = Selector.parse(rule.at).op
        note = ""
        if training:
            note = "training: the rule is checked, GEMMs run in the compute dtype (fused kernels have no backward)"
        elif op == "kv_cache" and kv is not None:
            from .precision.kv_cache import kv_cache_rule_note
            note = kv_cache_rule_note(kv)
            log = {p: (rule.dtype, "rope_kvcache/attention (fp8 cache)", {}) for p in kv.get("rules", {}).get(i, [])}
        elif op in _OP_NOTES:
            note = _OP_NOTES[op]
        elif not log and rule.dtype in TORCH_DTYPES and TORCH_DTYPES[rule.dtype] == pmap.model_dtype:
            note = f"the model already runs in {rule.dtype}"
        elif not log:
            note = "won no GEMM (a later rule took its places, or no fusion/linear pass ran there)"
        kernels = sorted({k for _, k, _ in log.values()})
        report.rules.append(RuleReport(where[0] + ("." + where[1] if len(where) > 1 else ""), i,
                                       rule.dtype, rule.at, sorted(log), ", ".join(kernels) or "none", note,
                                       errors.get(i)))
    report.precision = {p: {"dtype": d, "kernel": k, "by_rows": rows} for i in sorted(weights.precision_log)
                        for p, (d, k, rows) in weights.precision_log[i].items()}


def _capture_graphs(model: nn.Module, plan: Plan, forward: Callable, device: torch.device, report: Report) -> Callable:
    """Step 5: the bucket runner around the planned forward (decode steps replay graphs)."""
    if plan.graphs.capture != "cuda_graph":
        return forward
    if device.type != "cuda":
        report.notes.append("graphs: capture skipped: CUDA graphs need a CUDA device; the planned forward runs eagerly")
        return forward
    if plan.mode == "training":
        report.notes.append("graphs: capture skipped in training mode")
        return forward
    from .passes.graphs import BucketRunner, CacheGraphRunner, CaptureError
    if not hasattr(model, "setup_caches"):  # the cache is an argument (Hugging Face): graphs per cache
        runner = CacheGraphRunner(forward, plan.graphs.buckets, device, plan.graphs.over_max, plan.graphs.warmup)
        report.graphs = {"buckets": list(runner.buckets), "capture": "per static cache, at its first decode step"}
        report.notes.append("graphs: the model takes its KV cache as an argument: a decode step called with "
                            "input_ids and a transformers.StaticCache (no other tensor argument: not generate(), "
                            "which passes positions and a mask) replays the graph captured for that cache at its "
                            "first decode step (no padding: such a cache has a fixed batch); other calls run eagerly")
        return runner
    vocab = model.config.vocab_size if not isinstance(model.config, dict) else model.config["vocab_size"]
    runner = BucketRunner(forward, plan.graphs.buckets, device, vocab, plan.graphs.over_max, plan.graphs.warmup)
    try:
        cap = runner.capture()
    except CaptureError as exc:
        report.notes.append(f"graphs: error: {exc}; the model runs eagerly")
        report.graphs = {"buckets": [], "failed": dict(runner.report.failed)}
        return forward
    report.graphs = {"buckets": sorted(runner.graphs), "capture_s": round(cap.capture_s, 3),
                     "pool_mib": round(cap.pool_mib, 1), "failed": cap.failed}
    for size, why in cap.failed.items():
        report.notes.append(f"graphs: error: bucket {size} not captured ({why}); batches on it run eagerly")
    return runner
