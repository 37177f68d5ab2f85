"""An FP8 KV cache for precision rules on `:kv_cache` (PLAN_SPEC.md §7).

    - at: "**:kv_cache"
      dtype: fp8_e4m3        # FP8 KV cache, a scale per KV head

`apply_kv_cache_precision(model, pmap, run, report)` finds every `KVCache` of the model
(the built-in models hold one per attention module, `layers.N.attn.kv_cache`) whose
holder's path wins a `kv_cache` rule with an FP8 dtype, calibrates a scale per KV head for
keys and for values by running `run(model)` once (the unplanned model on the example
inputs), and switches those caches to FP8 storage (`KVCache.to_fp8`). It runs before the
model is traced, so the traced graphs write and read FP8 caches and the `rope_kvcache` and
`attention` passes hand the scales to their kernels.

The numbers (the same in the eager model, the fused kernels and `formats.quantize_*` with
the scale passed in): a key or value x of KV head h is stored as
`fp8(clamp(x / s[h], -fmax, fmax))`, rounded to nearest even, and read back as
`code * s[h]`; fmax is 448 (e4m3) or 57344 (e5m2).

The scale. `s[h] = amax[h] / fmax` rounded UP to a power of two, amax[h] the largest |x|
of head h written during the calibration run (1 where it is 0). The rounding is the
headroom, between 1x and 2x: values up to `fmax * s[h]` (at least amax) on text the
calibration never saw are still represented. It costs no precision: a floating-point
format's relative step is the same in every binade, so moving the range up only pushes the
very smallest values (below `2^-6 * s` for e4m3) one binade further into the subnormals.
And it makes every scale operation exact: `x / s`, `code * s` into bfloat16 (an FP8 code
times a power of two is a bfloat16 value), and the attention kernel's folding of the key
scale into the score scale and of the value scale into the output.

`emulate: true` keeps the cache in the compute dtype and stores `code * s[h]` there: the
same numbers, no bytes saved (what a device without FP8 runs for accuracy studies).

`kv_saturation(model, run)` is the fraction of the values written to FP8 caches during
`run(model)` that saturated (|x / s| > fmax): run it on the evaluation text.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from planlang import names
from planlang.selectors import Selector

from ..models.llama import KVCache
from .formats import format_max

# The smallest and largest power-of-two exponent a scale may have (float32 normals).
_MIN_EXP, _MAX_EXP = -126, 127


def kv_caches(model: nn.Module) -> list[tuple[str, KVCache]]:
    """(holder path, cache) for every KVCache in the model; the holder is the module that
    owns it (`layers.0.attn` for `layers.0.attn.kv_cache`), the path precision rules name."""
    if type(model).__name__ == "PlannedModel" and isinstance(getattr(model, "_modules", {}).get("model"), nn.Module):
        model = model._modules["model"]
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, KVCache):
            out.append((name.rsplit(".", 1)[0] if "." in name else "", mod))
    return out


def pow2_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """amax / fmax rounded up to a power of two (float32, elementwise); 1 where amax is 0
    (or not finite)."""
    raw = amax.detach().float() / fmax
    mant, exp = torch.frexp(raw)  # raw = mant * 2^exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp).clamp(_MIN_EXP, _MAX_EXP)
    scale = torch.ldexp(torch.ones_like(raw), exp)
    return torch.where((raw > 0) & torch.isfinite(raw), scale, torch.ones_like(raw))


@torch.no_grad()
def calibrate(model: nn.Module, caches: list[KVCache], run: Callable[[nn.Module], Any]) -> dict:
    """Run `run(model)` once with an observer on `caches`; returns {cache: (k_amax, v_amax)}
    (float32 [Hkv]) for every cache that was written."""
    amax: dict = {}

    def observe(cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        ka = k.detach().float().abs().amax(dim=(0, 2, 3))
        va = v.detach().float().abs().amax(dim=(0, 2, 3))
        if cache in amax:
            ka, va = torch.maximum(amax[cache][0], ka), torch.maximum(amax[cache][1], va)
        amax[cache] = (ka, va)

    for c in caches:
        c.observer = observe
    try:
        run(model)
    finally:
        for c in caches:
            c.observer = None
    return amax


def _summary(values: list[torch.Tensor]) -> dict:
    if not values:
        return {}
    all_ = torch.cat([v.float().flatten().cpu() for v in values])
    return {"min": all_.min().item(), "max": all_.max().item(), "median": all_.median().item()}


@torch.no_grad()
def apply_kv_cache_precision(model: nn.Module, pmap, run: Callable[[nn.Module], Any], report=None) -> dict:
    """Switch every KV cache whose holder wins an FP8 `kv_cache` rule to FP8 storage with a
    scale per KV head calibrated on `run(model)` (the example inputs). Call it with the
    caches set up and before the model is traced.

    Returns, for the report: {"layers": n, "dtype": "fp8_e4m3" (or a comma-joined list when
    rules differ; None when no cache changed), "emulated": [paths], "places": [holder
    paths], "rules": {rule index: [paths]}, "scales": {"k": {min, max, median}, "v": ...,
    "per_layer": {path: {"k": [..], "v": [..]}}}, "scale_rule": str, "cache_bytes":
    {"before": int, "after": int}, "skipped": {path: why}}. Appends one line to
    `report.notes` when there is a report and something changed or was skipped."""
    out: dict = {"layers": 0, "dtype": None, "emulated": [], "places": [], "rules": {},
                 "scales": {"k": {}, "v": {}, "per_layer": {}},
                 "scale_rule": "amax / fmax per KV head over the example inputs, rounded up to a power of two",
                 "cache_bytes": {"before": 0, "after": 0}, "skipped": {}}
    if not pmap:
        return out
    chosen: list[tuple[str, KVCache, int, Any]] = []
    found = kv_caches(model)
    for path, cache in found:
        hit = pmap.rule_for(path, "kv_cache")
        if hit is None:
            continue
        index, rule = hit
        if rule.dtype not in names.FP8_DTYPES:
            if rule.dtype in names.BLOCK_DTYPES:
                out["skipped"][path] = f"{rule.dtype} KV caches are not supported; the cache keeps its dtype"
            continue  # a base dtype: the cache follows the model's dtype
        if not cache.ready:
            out["skipped"][path] = "the KV cache is not set up (setup_caches), so nothing is cached to quantize"
            continue
        chosen.append((path, cache, index, rule))
    if not found and any(r.dtype in names.FP8_DTYPES and Selector.parse(r.at).op == "kv_cache" for r in pmap.rules):
        out["skipped"]["(model)"] = ("the model holds no planlang KVCache (a Hugging Face model's cache lives "
                                     "outside it): the FP8 KV cache applies to the built-in models only")
    amax = calibrate(model, [c for _, c, _, _ in chosen], run) if chosen else {}
    dtypes, ks, vs = set(), [], []
    for path, cache, index, rule in chosen:
        if cache not in amax:
            out["skipped"][path] = "the example inputs never wrote this cache: no scale could be calibrated"
            continue
        fmax = format_max(rule.dtype)
        k_scale, v_scale = pow2_scale(amax[cache][0], fmax), pow2_scale(amax[cache][1], fmax)
        before = cache.k_cache.numel() * cache.k_cache.element_size() * 2
        cache.to_fp8(rule.dtype, k_scale, v_scale, emulate=rule.emulate)
        out["cache_bytes"]["before"] += before
        out["cache_bytes"]["after"] += cache.k_cache.numel() * cache.k_cache.element_size() * 2
        out["layers"] += 1
        out["places"].append(path)
        out["rules"].setdefault(index, []).append(path)
        if rule.emulate:
            out["emulated"].append(path)
        out["scales"]["per_layer"][path] = {"k": k_scale.tolist(), "v": v_scale.tolist()}
        dtypes.add(rule.dtype)
        ks.append(k_scale)
        vs.append(v_scale)
    out["dtype"] = ", ".join(sorted(dtypes)) or None
    out["scales"]["k"], out["scales"]["v"] = _summary(ks), _summary(vs)
    notes = getattr(report, "notes", None)
    if notes is not None and (out["layers"] or out["skipped"]):
        line = "precision: KV cache"
        if out["layers"]:
            emu = f", {len(out['emulated'])} emulated" if out["emulated"] else ""
            line += (f" in {out['dtype']} in {out['layers']} layer(s){emu}, a scale per KV head calibrated on the "
                     f"example inputs (K {out['scales']['k']['min']:.3g}..{out['scales']['k']['max']:.3g}, "
                     f"V {out['scales']['v']['min']:.3g}..{out['scales']['v']['max']:.3g}); "
                     f"{out['cache_bytes']['before']} -> {out['cache_bytes']['after']} bytes")
        if out["skipped"]:
            line += "; skipped: " + "; ".join(f"{p}: {why}" for p, why in sorted(out["skipped"].items()))
        notes.append(line)
    return out


@torch.no_grad()
def kv_saturation(model: nn.Module, run: Callable[[nn.Module], Any]) -> float:
    """The fraction of the keys and values written to FP8 caches during `run(model)` whose
    |x / scale| exceeded the format's largest value (they were stored as ±fmax). Runs the
    model eagerly (a planned model is unwrapped to its unplanned module, which shares the
    caches); 0.0 when no cache is FP8 or nothing was written."""
    if type(model).__name__ == "PlannedModel" and isinstance(getattr(model, "_modules", {}).get("model"), nn.Module):
        model = model._modules["model"]
    caches = [c for _, c in kv_caches(model) if c.fp8 is not None]
    if not caches:
        return 0.0
    counts: dict = {"saturated": None, "total": 0}

    def observe(cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        for x, scale in ((k, cache.k_scale), (v, cache.v_scale)):
            over = ((x.detach().float() / scale.view(1, -1, 1, 1)).abs() > cache.fmax).sum()
            counts["saturated"] = over if counts["saturated"] is None else counts["saturated"] + over
            counts["total"] += x.numel()

    for c in caches:
        c.observer = observe
    try:
        run(model)
    finally:
        for c in caches:
            c.observer = None
    if not counts["total"]:
        return 0.0
    return counts["saturated"].item() / counts["total"]


def kv_cache_rule_note(summary: Optional[dict]) -> str:
    """A one-line description of what `apply_kv_cache_precision` did, for a rule's report
    entry (empty when it changed nothing)."""
    if not summary or not summary.get("layers"):
        return ""
    emu = " (emulated: the cache keeps the compute dtype)" if summary["emulated"] else ""
    return (f"KV cache in {summary['dtype']}{emu}, a scale per KV head (power of two) calibrated on the example "
            f"inputs; written by the cache-write kernel, read by the attention kernel")
