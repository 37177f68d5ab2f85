"""Checks and explanations that need a model but not a run: `lint --model` and
`explain --model`. Built-in models are built on the `meta` device (shapes, no memory), so
this is fast even for billion-parameter models."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from planlang import names
from planlang.diagnostics import Diagnostic, at
from planlang.selectors import Selector, SelectorError, outline, resolve

from .models.checkpoint import ModelLoadError, load_model
from .models.llama import Transformer
from .models.registry import BUILTIN_MODELS

_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1, "mxfp8": 1 + 1 / 32,
          "nvfp4": 0.5 + 1 / 16, "mxfp4": 0.5 + 1 / 32}
_TORCH_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def shape_model(spec: Optional[str], trust_pickle: bool = False) -> nn.Module:
    """The model `spec` names; built-ins on the meta device (no weights needed for lint)."""
    spec = (spec or "").strip()
    if spec.startswith("builtin:") and spec[8:] in BUILTIN_MODELS and not BUILTIN_MODELS[spec[8:]].weights:
        entry = BUILTIN_MODELS[spec[8:]]
        with torch.device("meta"):
            model = Transformer(entry())
        return model.to(dtype=entry.dtype)
    return load_model(spec or None, trust_pickle=trust_pickle, device="cpu").model


_HEADS: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def op_of(model: nn.Module, name: str, module: nn.Module) -> Optional[str]:
    """The op kind of a module for `:op` selectors (spec §3). The LM head is the one
    precision rules leave alone (`passes.precision.lm_head_paths`, found once per model)."""
    if isinstance(module, nn.Linear):
        if model not in _HEADS:
            from .passes.precision import lm_head_paths
            _HEADS[model] = lm_head_paths(model)
        return "lm_head" if name in _HEADS[model] else "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    cls = type(module).__name__.lower()
    if "norm" in cls:
        return "norm"
    if "cache" in cls:
        return "kv_cache"
    return None


def _winners(model: nn.Module, rules, mod_names, ops) -> dict[str, int]:
    """For each (module, op) leaf the index of the last rule that takes it."""
    out = {}
    for i, rule in enumerate(rules):
        sel = Selector.parse(rule.at)
        for n in mod_names:
            if ops.get(n) is None:
                continue
            if sel.op is not None and sel.op != ops[n]:
                continue
            if sel.selects(n):
                out[n] = i
    return out


def model_diagnostics(loaded, model_spec: str, *, target: Optional[str], catalog, trust_pickle=False) -> list[Diagnostic]:
    """lint --model: selectors that name nothing, rules that never win, GEMM shapes the
    dtype's kernel cannot take, tensor-parallel divisibility, and memory fit."""
    plan, src = loaded.plan, loaded.source
    diags: list[Diagnostic] = []
    try:
        model = shape_model(model_spec, trust_pickle)
    except ModelLoadError as exc:
        return [Diagnostic("PL100", f"{exc.path or model_spec}: {exc.message}", file=str(exc.path or model_spec),
                           hint=exc.hint)]
    mods = dict(model.named_modules())
    mod_names = list(mods)
    ops = {n: op_of(model, n, m) for n, m in mods.items()}

    def check(path, text, required=True):
        try:
            hits = resolve(Selector.parse(text), mod_names)
        except SelectorError:
            return []
        sel = Selector.parse(text)
        if sel.op is not None:
            hits = [h for h in mod_names if ops.get(h) == sel.op and sel.selects(h)] or \
                   ([] if sel.op not in ("qk", "pv", "attention", "softmax", "act", "matmul") else hits)
        if not hits:
            diags.append(at(src, path, "PL309" if required else "PL312",
                            f"'{text}' names no {'module' if sel.op is None else sel.op} of this model",
                            hint=f"the model's modules: {outline(mod_names)}"))
        return hits

    for i, f in enumerate(plan.fusions):
        if f.kind != "sampling":
            check(("fusions", i, "at"), f.at, f.required)
    rules = plan.precision_rules()
    n_preset = len(rules) - len(plan.precision.rules)
    for i, r in enumerate(plan.precision.rules):
        check(("precision", "rules", i, "at"), r.at)
    for i, r in enumerate(plan.memory.offload):
        check(("memory", "offload", i, "at"), r.at)
    for i, r in enumerate(plan.parallel.styles):
        check(("parallel", "styles", i, "at"), r.at)
    # precedence with the model: a rule that wins nowhere
    win = _winners(model, rules, mod_names, ops)
    winners = set(win.values())
    for i, r in enumerate(plan.precision.rules):
        if (n_preset + i) not in winners and any(d.code == "PL309" and d.line == (src.value(("precision", "rules", i, "at")) or d).line for d in diags) is False:
            later = [j for j in range(n_preset + i + 1, len(rules))]
            if later:
                diags.append(at(src, ("precision", "rules", i, "at"), "PL302",
                                f"precision rule at '{r.at}' wins nowhere in this model: later rules take all its places",
                                hint="the last matching rule wins; reorder or drop it"))
    # GEMM shapes for low-precision kernels
    for name, i in win.items():
        rule = rules[i]
        m = mods[name]
        if isinstance(m, nn.Linear) and rule.dtype in names.FP8_DTYPES + names.BLOCK_DTYPES and not rule.emulate:
            block = rule.effective_block_size() or 16
            need = max(16, block if rule.effective_scaling() == "block" else 16)
            for dim_name, dim in (("in_features", m.in_features), ("out_features", m.out_features)):
                if dim % need:
                    path = ("precision", "rules", i - n_preset, "dtype") if i >= n_preset else ("precision", "preset")
                    diags.append(at(src, path, "PL313", f"{name}: {dim_name} {dim} is not a multiple of {need}, "
                                    f"which {rule.dtype} GEMMs need", hint=f"exclude {name} from this rule"))
    # tensor parallel divisibility
    tp = plan.parallel.tensor
    cfg = getattr(model, "config", None)
    if tp > 1 and cfg is not None:
        get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
        for label, key in (("query heads", "n_heads"), ("KV heads", "n_kv_heads"), ("FFN width", "ffn_dim"),
                           ("vocabulary", "vocab_size")):
            v = get(key) or get({"n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
                                 "ffn_dim": "intermediate_size"}.get(key, key))
            if v and v % tp and not (key == "n_kv_heads" and tp % v == 0):
                diags.append(at(src, ("parallel", "tensor"), "PL307", f"tensor: {tp} does not divide the {label} ({v})",
                                hint=f"use a degree that divides {v}"))
    # memory fit
    # the target: --target, else the plan's own (`auto` names none off the device)
    named = target if target and target != "auto" else (plan.target if plan.target != "auto" else None)
    if named and catalog is not None and plan.limits.max_seq_len and plan.limits.max_batch:
        t = catalog.get(named)
        if t is not None and t.memory_gb:
            need = predicted_memory(model, plan, rules, win, mods)
            total = sum(need.values())
            if total > t.memory_gb * 1e9 * 0.95:
                parts = ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in need.items())
                diags.append(at(src, ("limits",), "PL207", f"needs {total / 1e9:.1f} GB ({parts}); "
                                f"target {t.id} has {t.memory_gb:g} GB", hint="lower limits, offload layers, or split with parallel.tensor"))
    if plan.memory.offload and catalog is not None:
        t = catalog.get(target if target and target != "auto" else plan.target)
        if t is not None:
            from .memory.offload import offload_diagnostics
            diags += offload_diagnostics(model, plan, src, t)
    return diags


def predicted_memory(model, plan, rules, win, mods) -> dict[str, float]:
    """Bytes of weights (in the dtypes the rules give), KV cache and graph pools."""
    default = plan.precision.default
    weights = 0.0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        owner = name.rpartition(".")[0]
        rule = rules[win[owner]] if owner in win else None
        dt = rule.dtype if rule is not None else (default or _TORCH_DTYPE_NAME.get(p.dtype, "bf16"))
        weights += p.numel() * _BYTES.get(dt, 2)
    cfg = getattr(model, "config", None)
    cache = 0.0
    if isinstance(cfg, object) and hasattr(cfg, "n_layers"):
        kv_dt = next((r.dtype for r in rules if Selector.parse(r.at).op == "kv_cache"), default or "bf16")
        cache = (2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * plan.limits.max_seq_len * plan.limits.max_batch
                 * _BYTES.get(kv_dt, 2)) / max(plan.parallel.tensor, 1)
        weights /= max(plan.parallel.tensor, 1)
    pools = 0.0
    if plan.graphs.capture == "cuda_graph" and hasattr(cfg, "dim"):
        # activations of the largest bucket at decode, held once by the shared pool
        pools = plan.graphs.buckets[-1] * (cfg.vocab_size + 8 * cfg.dim + 2 * cfg.ffn_dim) * 4
    return {"weights": weights, "kv_cache": cache, "graph_pools": pools}


def linear_weight_bytes(model: nn.Module, plan, resolved: Optional[tuple[dict, dict, dict]] = None) -> float:
    """Bytes of the model's GEMM weights but the LM head's, each in the dtype of the last
    precision rule that takes it (else the plan's default, else its own dtype): what a
    decode step streams for its linears. `resolved`: (modules, ops, winners) where the
    caller has them already."""
    rules = plan.precision_rules()
    if resolved is None:
        mods = dict(model.named_modules())
        ops = {n: op_of(model, n, m) for n, m in mods.items()}
        resolved = mods, ops, _winners(model, rules, list(mods), ops)
    mods, ops, win = resolved
    total = 0.0
    for name, m in mods.items():
        if ops[name] != "linear":
            continue
        rule = rules[win[name]] if name in win else None
        dt = rule.dtype if rule is not None else (plan.precision.default or _TORCH_DTYPE_NAME.get(m.weight.dtype, "bf16"))
        total += m.weight.numel() * _BYTES.get(dt, 2)
    return total


def decode_predictions(model: nn.Module, plan, figures, context: int, on_cuda: bool,
                       resolved: Optional[tuple[dict, dict, dict]] = None) -> list[dict]:
    """The roofline's decode step per bucket of the plan (one row: batch 1 without graph
    buckets), for Llama-style models (built-ins, planlang checkpoints); [] otherwise.
    `resolved` as for `linear_weight_bytes`."""
    from .predict import plan_decode_ms
    cfg = getattr(model, "config", None)
    if not all(hasattr(cfg, k) for k in ("dim", "n_layers", "head_dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")):
        return []
    batches = list(plan.graphs.buckets) if plan.graphs.capture == "cuda_graph" else [1]
    lw = linear_weight_bytes(model, plan, resolved)
    out = []
    for b in batches:
        p = plan_decode_ms(plan, cfg, b, context, figures, on_cuda, linear_weight_bytes=lw)
        out.append({"batch": b, "ms": p.ms, "launches": p.launches, "bytes": p.bytes, "bound": p.bound})
    return out


def catalog_figures(target_record, dtype: str = "bf16"):
    """Figures from the catalog's record of the target (no measurement)."""
    from .predict import Figures
    tf = target_record.tflops.get(dtype) or target_record.tflops.get("fp32") or 1.0
    return Figures(target_record.memory_bandwidth_gbs, target_record.launch_us, tf, None, source="catalog")


def explain_with_model(data: dict, loaded, model_spec: str, target, catalog, *, trust_pickle=False, context=128,
                       figures=None) -> dict:
    """explain --model: the places each rule takes, the shape checks, the predicted memory
    and the predicted decode step per bucket (with `figures` measured by bench, else the
    catalog's figures for the target)."""
    plan = loaded.plan
    model = shape_model(model_spec, trust_pickle)
    mods = dict(model.named_modules())
    mod_names = list(mods)
    ops = {n: op_of(model, n, m) for n, m in mods.items()}
    places = []
    for i, f in enumerate(plan.fusions):
        if f.kind == "sampling":
            places.append("sampling: the generation loop")
            continue
        hits = resolve(Selector.parse(f.at), mod_names)
        places.append(f"fusion {f.kind} at '{f.at}': {len(hits)} module(s) in scope; sites are found by tracing at apply"
                      if hits else f"fusion {f.kind} at '{f.at}': names no module of this model "
                      f"({'PL309: apply refuses it' if f.required else 'PL312: optional, apply skips it'})")
    rules = plan.precision_rules()
    win = _winners(model, rules, mod_names, ops)
    by_rule: dict[int, list[str]] = {}
    for n, i in win.items():
        by_rule.setdefault(i, []).append(n)
    for i, r in enumerate(rules):
        hits = by_rule.get(i, [])
        shown = ", ".join(hits[:3]) + (f" … (+{len(hits) - 3})" if len(hits) > 3 else "")
        places.append(f"precision '{r.at}' -> {r.dtype}: {len(hits)} place(s) {shown}")
    for r in plan.memory.offload:
        hits = resolve(Selector.parse(r.at), mod_names)
        places.append(f"offload '{r.at}': {len(hits)} module(s)" if hits else
                      f"offload '{r.at}': names no module of this model (PL309: apply refuses it)")
    data["places"] = places
    predictions = []
    if plan.limits.max_seq_len and plan.limits.max_batch:
        mem = predicted_memory(model, plan, rules, win, mods)
        predictions.append("memory: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in mem.items()))
    # `target`: the resolved catalog record (explain), or a target's id or alias
    record = target if hasattr(target, "memory_bandwidth_gbs") else (
        catalog.get(target) if (catalog is not None and target) else None)
    if figures is None and record is not None:
        figures = catalog_figures(record)
    if plan.mode == "training":
        predictions.append("decode step: not predicted for a training plan (the roofline models inference decode)")
    elif figures is not None:
        on_cuda = record is None or bool(record.compute_capability)
        steps = decode_predictions(model, plan, figures, context, on_cuda, resolved=(mods, ops, win))
        if steps:
            how = (f"{figures.source} figures: {figures.bandwidth_gbs:.0f} GB/s, {figures.launch_us:.2f} us a kernel"
                   + (f", weights streamed at {figures.weight_bandwidth_gbs:.0f} GB/s"
                      if figures.weight_bandwidth_gbs else ""))
            predictions.append(f"decode step at context {context} ({how}): "
                               + ", ".join(f"batch {r['batch']} {r['ms']:.3f} ms" for r in steps))
            data["decode_predictions"] = {"context": context, "figures": figures.__dict__, "rows": steps}
    if predictions:
        data["predictions"] = predictions
    return data
