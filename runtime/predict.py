"""The roofline cost model that `explain`, `bench` and `tune` share.

A decode step is a list of kernels. Each kernel costs the larger of its bytes over the
memory bandwidth and its FLOPs over the dtype's rate; inside a CUDA graph each launch adds
`launch_us` (the target's figure, or the per-kernel cost measured on the device:
`commands.measure_kernel_cost_us`, real one-row GEMVs replayed in a graph minus their
bytes, which counts a kernel's ramp-up and tail as well as its launch). Eager runs pay a Python
and launch overhead per op instead (`eager_us`). Weights count in the dtypes the plan
gives them.
"""
from __future__ import annotations

from dataclasses import dataclass

_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1, "mxfp8": 1 + 1 / 32,
          "nvfp4": 0.5 + 1 / 16, "mxfp4": 0.5 + 1 / 32}

# Kernels one layer launches at decode, by whether each fusion is on (counted from the
# built-in model's graph): fused, unfused.
_KERNELS = {"rmsnorm_residual": (2, 12), "qkv": (1, 3), "swiglu": (1, 4), "rope_kvcache": (1, 16),
            "attention": (1, 14)}  # decode attention merges its splits in the kernel
_FIXED = 2  # o projection and down projection

# Above one row the linears run as skinny tl.dot GEMMs (2..16 rows) or cuBLAS, which stream
# the weights slower than the one-row GEMVs that `measure_gemv_model` (and the catalog's
# bandwidth) describe. Fit on the H100 (2026-12-08, plans/tuned_h100.yaml, PDL on, one
# `planlang bench` of every bucket): buckets 2..12 took 1.25-1.27x the one-row roofline
# with that run's measured figures, so weights stream at 0.78 of the one-row rate there.
# Before this term the predictions were 20-27% under the measured times at 2..16 rows.
SKINNY_STREAM = 0.78


@dataclass
class Prediction:
    batch: int
    ms: float
    bytes: float
    flops: float
    launches: int
    bound: str


def predict_decode(cfg, fusions: set, weight_dtype_bytes: float, batch: int, context: int,
                   bandwidth_gbs: float, tflops: float, launch_us: float, graphs: bool,
                   eager_us: float = 25.0, linear_weight_bytes: float | None = None,
                   weight_bandwidth_gbs: float | None = None) -> Prediction:
    """Predicted time of one decode step of a Llama-style model (`cfg` a ModelConfig).
    `weight_bandwidth_gbs`: the rate one-row GEMVs stream weights at (measured on the
    device, `commands.measure_gemv_model`); the copy bandwidth when not given. Above one
    row the weights stream at SKINNY_STREAM of that rate."""
    d, L, hd = cfg.dim, cfg.n_layers, cfg.head_dim
    q, kv, f, v = cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.ffn_dim, cfg.vocab_size
    linear_params = L * (d * (q + 2 * kv) + q * d + 3 * d * f)
    head_params = v * d
    wbytes = linear_weight_bytes if linear_weight_bytes is not None else linear_params * weight_dtype_bytes
    wbytes += head_params * 2  # the LM head (and tied embedding) stay in bf16
    kv_bytes = 2 * L * kv * context * batch * 2
    act_bytes = batch * L * (8 * d + 4 * f) * 2
    total = wbytes + kv_bytes + act_bytes
    flops = 2 * batch * (linear_params + head_params) + 4 * batch * L * cfg.n_heads * hd * context
    w_rate = (weight_bandwidth_gbs or bandwidth_gbs) * (SKINNY_STREAM if batch > 1 else 1.0)
    t_mem = (wbytes / w_rate + (kv_bytes + act_bytes) / bandwidth_gbs) / 1e9
    t_flop = flops / (tflops * 1e12)
    per_layer = sum(k[0] if name in fusions else k[1] for name, k in _KERNELS.items()) + _FIXED
    if batch == 1 and {"rmsnorm_residual", "qkv", "swiglu"} <= set(fusions):
        per_layer -= 2  # both norms run in the prologue of the QKV and gate/up GEMVs (passes/prologue.py)
    if {"rope_kvcache", "attention"} <= set(fusions):
        per_layer -= 1  # rope and the cache write run in the decode attention kernel (passes/rope_attention.py)
    launches = L * per_layer + 4
    overhead = launches * (launch_us if graphs else eager_us) * 1e-6
    t = max(t_mem, t_flop) + overhead
    return Prediction(batch, t * 1e3, total, flops, launches, "memory" if t_mem >= t_flop else "compute")


@dataclass
class Figures:
    """The device figures a prediction uses, and where they came from ("catalog" off the
    device, "measured" by bench / tune / `bench --format json` on it)."""
    bandwidth_gbs: float  # memory bandwidth (the copy bandwidth when measured)
    launch_us: float  # cost of one kernel in a CUDA graph beyond its bytes
    tflops: float
    weight_bandwidth_gbs: float | None = None  # the rate GEMVs stream weights at, when measured
    source: str = "catalog"


def plan_weight_bytes(plan) -> float:
    """Bytes per weight element of a plan's GEMMs (1 when any rule puts them in FP8 or a
    block format, else 2): what bench and explain count for the linears."""
    low = {r.dtype for r in plan.precision_rules()}
    return 1.0 if any(d.startswith(("fp8", "mx", "nv")) for d in low) else 2.0


def plan_decode_ms(plan, cfg, batch: int, context: int, figures: Figures, on_cuda: bool = True,
                   linear_weight_bytes: float | None = None) -> Prediction:
    """The predicted decode step of `plan` on a Llama-style model at `batch` rows (run on
    its bucket: the smallest that holds it) and `context`, with `figures`. The one
    prediction `planlang bench` prints beside its measurements and `planlang explain
    --model` prints per bucket. CUDA graphs count where the plan captures them on CUDA."""
    graphs = plan.graphs.capture == "cuda_graph" and on_cuda
    rows = batch
    if graphs:
        rows = next((b for b in sorted(plan.graphs.buckets) if b >= batch), batch)
    kinds = {f.kind for f in plan.fusions}
    return predict_decode(cfg, kinds, plan_weight_bytes(plan), rows, context, figures.bandwidth_gbs,
                          figures.tflops, figures.launch_us, graphs, linear_weight_bytes=linear_weight_bytes,
                          weight_bandwidth_gbs=figures.weight_bandwidth_gbs)


def figures_from_bench(data: dict, fp8: bool) -> Figures:
    """Figures measured by `planlang bench --format json` (its copy bandwidth and the
    GEMV fit for bf16 or FP8 weights); raises ValueError naming what is missing."""
    try:
        bw = float(data["copy_bandwidth_gbs"])
        fit = (data.get("gemv_models") or {}).get("fp8" if fp8 else "bf16")
        launch = float(fit["kernel_us"]) if fit else float(data["launch_us"])
        stream = float(fit["stream_gbs"]) if fit else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not the JSON of `planlang bench --format json` (missing or bad {exc})") from None
    tflops = float(data.get("tflops") or 100.0)
    return Figures(bw, launch, tflops, stream, source="measured")
