"""What a plan will do, section by section, before any model is touched.

`explain_plan` returns plain data (so `--format json` and the text view print the same
thing); with a model, the runtime adds the places each rule takes and the predictions.
"""
from __future__ import annotations

from typing import Any, Optional

from . import hardware, names
from .plan import Plan
from .validate import RUNTIME_ACCUMULATE


def _fusion_line(f) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in f.options().items())
    what = {
        "rmsnorm_residual": "x + r and the RMSNorm after it -> one pass over the activations",
        "qkv": "the three projections of one input -> one GEMM on the concatenated weight",
        "swiglu": "gate and up projections -> one GEMM on [W1; W3] with the activation-multiply fused",
        "rope_kvcache": "rotary embedding of q and k plus the KV-cache write -> one kernel",
        "attention": "attention with its soft-cap/sink/mask epilogue -> one kernel",
        "sampling": "temperature, top-k/top-p and the draw -> one kernel in the generation loop",
        "linear": "every other linear -> the fastest GEMM/GEMV for its shape (Triton GEMV at decode)",
    }[f.kind]
    where = "" if f.kind == "sampling" else f" at '{f.at}'"
    req = "" if f.required else " (optional)"
    return f"{f.kind}{'(' + opts + ')' if opts else ''}{where}{req}: {what}"


def explain_plan(plan: Plan, target: Optional[hardware.Target], target_how: str) -> dict[str, Any]:
    """The resolved plan (presets expanded, extends merged, target resolved) and, per
    section, what it does on the target."""
    t = target
    out: dict[str, Any] = {
        "plan": plan.name,
        "mode": plan.mode,
        "target": {"id": t.id, "name": t.name, "how": target_how} if t else {"id": None, "how": target_how},
        "sections": {},
    }
    s = out["sections"]
    s["fusions"] = [_fusion_line(f) for f in plan.fusions] or ["none: the model's own kernels run"]
    g = plan.graphs
    if g.capture == "cuda_graph":
        s["graphs"] = [f"one CUDA graph per bucket {g.buckets}, sharing one memory pool; "
                       f"a batch runs on the smallest bucket that holds it, padded",
                       f"batches above {g.buckets[-1]}: {'run eagerly' if g.over_max == 'eager' else 'an error'}",
                       f"{g.warmup} warm-up runs before capture"]
    else:
        s["graphs"] = ["no capture: every step launches its kernels from Python"]
    s["graphs"].append({"auto": "kernels launch with Programmatic Dependent Launch where the device has it (sm_90+)",
                        "on": "kernels launch with Programmatic Dependent Launch (sm_90+)",
                        "off": "no Programmatic Dependent Launch"}[g.pdl])
    c = plan.compile
    if c.mode == "none":
        s["compile"] = ["not compiled"]
    else:
        mode = c.mode
        if g.capture == "cuda_graph" and mode in names.GRAPH_CAPTURING_COMPILE_MODES:
            mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
            s["compile"] = [f"torch.compile mode '{c.mode}' runs as '{mode}': planlang captures the graphs"]
        else:
            s["compile"] = [f"torch.compile(mode='{mode}', fullgraph={c.fullgraph}, dynamic={c.dynamic})"]
    p = plan.precision
    rules = plan.precision_rules()
    unhonoured = "" if p.accumulate == RUNTIME_ACCUMULATE else f" (accumulate: {p.accumulate} is not honoured, PL317)"
    prec = [f"default dtype: {p.default or 'the model’s own'}; GEMMs accumulate in {RUNTIME_ACCUMULATE}{unhonoured}"]
    if p.preset:
        prec.append(f"preset {p.preset} expands to {len(rules) - len(p.rules)} rule(s), placed before the plan's own")
    for r in rules:
        bits = [r.dtype]
        if r.effective_scaling():
            bits.append(f"{r.effective_scaling()} scales" + (f" (blocks of {r.effective_block_size()})"
                                                             if r.effective_block_size() else ""))
        if r.dtype in names.FP8_DTYPES + names.BLOCK_DTYPES:
            bits.append("weight-only, activations kept" if r.effective_activations() == "keep"
                        else f"activations {r.effective_activations()}")
        if r.emulate:
            bits.append("emulated (quantize-dequantize)")
        prec.append(f"'{r.at}' -> {', '.join(bits)}")
    if len(rules) > 1:
        prec.append("where rules overlap, the last one wins")
    s["precision"] = prec
    m = plan.memory
    mem = []
    for r in m.offload:
        mem.append(f"offload '{r.at}' to pinned host memory, prefetch {r.prefetch} layer(s) ahead "
                   f"(device holds {r.prefetch + 1} layer buffers)")
    for r in m.recompute:
        if plan.mode == "inference":
            mem.append(f"recompute '{r.at}': ignored in inference")
        elif r.policy == "full":
            mem.append(f"recompute '{r.at}': checkpoint, everything recomputed in backward")
        else:
            mem.append(f"recompute '{r.at}': keep outputs of {r.save or 'nothing'}, recompute the rest")
    s["memory"] = mem or ["everything stays on the device; nothing recomputed"]
    par = plan.parallel
    if par.tensor > 1:
        styles = [f"'{st.at}' {st.style}" for st in par.styles] or ["styles inferred from the model"]
        s["parallel"] = [f"tensor parallel over {par.tensor} processes (torch.distributed, "
                         f"{'NCCL' if t is None or t.compute_capability else 'gloo'})"
                         + (", sequence-parallel norms" if par.sequence else ""), *styles]
    else:
        s["parallel"] = ["one device"]
    lim = plan.limits
    s["limits"] = [f"max_seq_len {lim.max_seq_len or 'the model’s'}, max_batch {lim.max_batch or g.buckets[-1]}"]
    if t is not None:
        s["target"] = [f"{t.name}: {t.memory_gb} GB at {t.memory_bandwidth_gbs} GB/s, host link {t.host_link_gbs} GB/s, "
                       f"{'compute capability ' + t.compute_capability if t.compute_capability else 'no CUDA'}"]
    return out


def render_explain(data: dict[str, Any]) -> str:
    t = data["target"]
    head = f"plan {data['plan']} ({data['mode']}) on {t['id'] or 'no target'} [{t['how']}]"
    lines = [head]
    for section, items in data["sections"].items():
        lines.append(f"\n{section}:")
        lines.extend(f"  - {item}" for item in items)
    for extra in ("places", "predictions"):
        if extra in data:
            lines.append(f"\n{extra}:")
            for item in data[extra]:
                lines.append(f"  - {item}")
    return "\n".join(lines)
