"""FP8 linears against planlang's bf16 linears and torch._scaled_mm, on one GPU.

    python benchmarks/bench_fp8.py --out results/fp8.json [--tune] [--jobs 12]

Shapes: the linears of Llama-3.2-1B (dim 2048, FFN 8192): qkv (3072, 2048), o (2048, 2048),
gate/up fused with SiLU (16384, 2048 -> 8192 outputs), down (2048, 8192), at M = 1, 4, 16
(decode) and 2048 (prefill). Per shape and M:
  - bf16: planlang's `qkv.linear` / `swiglu.swiglu_linear` on the bf16 weight;
  - fp8 (channel scales) and fp8 block-128: `fp8_linear`, the default dispatch;
  - dynamic per_token: `fp8_linear_dynamic` through the Triton kernels and through
    torch._scaled_mm (quantization included in both);
  - M = 2048: "upcast+cuBLAS" (wq.to(bf16) per call, cuBLAS, output times the scale), the
    dequantize-then-cuBLAS alternative (its rounding differs: bf16 output before the scale).
Time per call: N back-to-back calls captured in one CUDA graph, replayed, divided by N; the
calls cycle through enough copies of the weight (>= 256 MiB in all) that each reads its
weight from HBM, not L2, as a decode step does. TB/s counts the weight bytes (and scales) of
one call. Copy bandwidth (1 GiB device-to-device copy_, read + written, median of 20) is
measured in the same run. Correctness: max |out - reference| / max |reference| on the GPU.
BENCH_FP8_M1=skinny limits the one-row sweep to the skinny tensor-core kernel (and the
config the dispatch picks today). `--tune` sweeps the kernels' configs per shape and M and prints the best as FP8_TUNED
entries; `--jobs` compiles the Triton variants in that many processes first (Triton's cache
is shared), so the timing pass finds them compiled. The last line is the headline: the
decode step's linears (16 layers, M = 1), fp8 over bf16.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback

import torch

from planlang.runtime.bench import graph_time_us
from planlang.runtime.kernels import fp8_linear as fp8
from planlang.runtime.kernels import qkv as qkv_mod
from planlang.runtime.kernels import swiglu as swiglu_mod
from planlang.runtime.kernels.fp8_linear import Fp8GemmConfig, Fp8GemvConfig

SHAPES = [  # name, weight rows N (both halves for gate/up), K, act
    ("qkv", 3072, 2048, None),
    ("o", 2048, 2048, None),
    ("gate_up", 16384, 2048, "silu"),
    ("down", 2048, 8192, None),
]
MS = [1, 4, 16, 2048]
LAYERS = 16
ROTATE_BYTES = 256 << 20  # weights cycled per graph: more than the H100's 50 MB L2
E4M3 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------- timing
# Median of 15 replays, each timed alone after one warm-up replay; the first two calls compile
# eagerly first; where capture fails, the eager loop is timed instead.
GRAPH_TIMING = dict(reps=15, warmup=1, eager_first=2, eager_fallback=True)


def copy_bandwidth_tbs() -> float:
    """The floors' copy bandwidth (1 GiB device copy, median of 20), TB/s."""
    from planlang.runtime.bench import copy_bandwidth_gbs
    return copy_bandwidth_gbs(torch.device("cuda")) / 1e3


# ----------------------------------------------------------------------------- weights
def quantize(w: torch.Tensor, scaling: str = "channel", block_size: int = 128):
    fmax = torch.finfo(E4M3).max
    if scaling == "channel":
        s = w.abs().amax(1).clamp_min(1e-12) / fmax
        full = s[:, None]
    else:
        n, k = w.shape
        s = w.abs().view(n, k // block_size, block_size).amax(-1).clamp_min(1e-12) / fmax
        full = s.repeat_interleave(block_size, 1)
    return (w / full).clamp(-fmax, fmax).to(E4M3), s.float().contiguous()


class ShapeData:
    """One shape's tensors: x per M, `copies` of the fp8 (channel, block-128) and bf16 weights."""

    def __init__(self, n: int, k: int, act, copies: int, device="cuda"):
        gen = torch.Generator(device=device).manual_seed(n * 7 + k)
        w = torch.randn(n, k, device=device, generator=gen) * k ** -0.5
        self.n, self.k, self.act = n, k, act
        self.wq, self.s = quantize(w)
        self.wq_b, self.s_b = quantize(w, "block", 128)
        self.w16 = fp8.dequantize_weight_reference(self.wq, self.s).to(torch.bfloat16)
        self.copies = copies
        self.fp8 = [(self.wq.clone(), self.s.clone()) for _ in range(copies)]
        self.fp8_block = [(self.wq_b.clone(), self.s_b.clone()) for _ in range(copies)]
        self.bf16 = [self.w16.clone() for _ in range(max(1, copies // 2))]
        self.x = {m: torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16) for m in MS}


def copies_for(n: int, k: int) -> int:
    return max(2, min(64, math.ceil(ROTATE_BYTES / (n * k))))


# ----------------------------------------------------------------------------- variants
def variant_calls(d: ShapeData, m: int, variant: str, config=None) -> list:
    """The list of calls (one per weight copy, at least 20) that a timing captures."""
    x = d.x[m]
    act = d.act
    n_calls = max(20, d.copies)

    def cyc(ws):
        return [ws[i % len(ws)] for i in range(n_calls)]

    if variant == "bf16":
        if act:
            return [lambda w=w: swiglu_mod.swiglu_linear(x, w, act) for w in cyc(d.bf16)]
        return [lambda w=w: qkv_mod.linear(x, w) for w in cyc(d.bf16)]
    if variant in ("fp8", "fp8_cfg"):
        return [lambda w=w, s=s: fp8.fp8_linear_triton(x, w, s, act=act, config=config) for w, s in cyc(d.fp8)]
    if variant == "fp8_block":
        return [lambda w=w, s=s: fp8.fp8_linear_triton(x, w, s, block_size=128, act=act, config=config)
                for w, s in cyc(d.fp8_block)]
    if variant in ("dyn_triton", "dyn_scaled_mm"):
        use = variant == "dyn_scaled_mm"  # forced either way; the default dispatch picks by M
        return [lambda w=w, s=s: fp8.fp8_linear_dynamic_triton(x, w, s, act_mode="per_token", act=act,
                                                               use_scaled_mm=use, config=config)
                for w, s in cyc(d.fp8)]
    if variant == "upcast_cublas":
        def call(w, s):
            y = torch.nn.functional.linear(x, w.to(torch.bfloat16)).float() * s
            if act:
                return swiglu_mod.act_mul_triton(y.to(torch.bfloat16), act)
            return y.to(torch.bfloat16)
        return [lambda w=w, s=s: call(w, s) for w, s in cyc(d.fp8)]
    raise ValueError(variant)


def reference(d: ShapeData, m: int, variant: str) -> torch.Tensor:
    x = d.x[m]
    if variant == "fp8_block":
        return fp8.fp8_linear_reference(x, d.wq_b, d.s_b, block_size=128, act=d.act)
    if variant.startswith("dyn"):
        return fp8.fp8_linear_dynamic_reference(x, d.wq, d.s, act_mode="per_token", act=d.act)
    return fp8.fp8_linear_reference(x, d.wq, d.s, act=d.act)


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def weight_bytes(d: ShapeData, variant: str) -> int:
    if variant == "bf16":
        return d.n * d.k * 2
    s = d.s_b if variant == "fp8_block" else d.s
    return d.n * d.k + s.numel() * 4


# ----------------------------------------------------------------------------- sweeps
def sweep_configs(n: int, k: int, act, m: int) -> list:
    """Candidate configs of the kernel that M rows take (the --tune sweep); each family also
    times one candidate with the other fp8 conversion (fast_cvt flipped) for comparison."""
    tiles = 2 if act else 1
    n_out = n // tiles
    out = []
    if m == 1 and os.environ.get("BENCH_FP8_M1") == "skinny":  # only the skinny family (and today's config)
        out = [c for c in [fp8._pick_config(1, torch.empty(n, k, device="meta"), act, torch.device("cuda"))]]
        for (block_n, w_as_a), block_k, split, stages in itertools.product(
                ((32, False), (64, True), (128, True)), (128, 256), (1, 2, 4), (3, 4)):
            if k // split >= block_k:
                out.append(Fp8GemmConfig(16, block_n, block_k, split, 4, stages, 1, w_as_a, True))
        return out
    if m == 1:
        for block_k, block_n, split, warps in itertools.product((512, 1024, 2048), (1, 2, 4, 8, 16), (1, 2, 4),
                                                                 (4, 8)):
            elems = block_k * block_n * tiles
            if block_k > k or not 2048 <= elems <= 16384 or warps * 32 * 16 > elems:
                continue
            if split > 1 and (k // split < block_k or math.ceil(n_out / block_n) >= 264):
                continue
            out.append(Fp8GemvConfig(block_n, block_k, split, warps, 1, True))
        for block_n, block_k, stages in itertools.product((4, 8), (512, 1024), (2, 3)):
            if block_n * block_k * tiles <= 16384:
                out.append(Fp8GemvConfig(block_n, block_k, 1, 4, stages, True))
        out.append(Fp8GemvConfig(4, 1024 // tiles, 1, 4, 1, True, fast_cvt=True))
        # the skinny tensor-core kernel at one row (x padded to 16 rows): its loads are
        # pipelined through shared memory, which the CUDA-core GEMV's are not
        for (block_n, w_as_a), block_k, split, stages in itertools.product(
                ((32, False), (64, True), (128, True)), (128, 256), (1, 2, 4), (3, 4)):
            if k // split >= block_k:
                out.append(Fp8GemmConfig(16, block_n, block_k, split, 4, stages, 1, w_as_a, True))
    elif m <= 16:
        for (block_n, w_as_a), block_k, split in itertools.product(
                ((32, False), (64, False), (64, True), (128, True)), (128, 256), (1, 2, 4)):
            if k // split >= block_k:
                out.append(Fp8GemmConfig(16, block_n, block_k, split, 4, 3, 1, w_as_a, True))
        out.append(Fp8GemmConfig(16, 32, 256, 4 if n_out <= 4096 else 1, 4, 3, 1, False, True, fast_cvt=False))
    else:
        for (bm, bn, bk, warps), stages, w_as_a in itertools.product(
                ((128, 128, 64, 8), (128, 256, 64, 8), (256, 128, 64, 8), (128, 64, 64, 4)), (3, 4), (False, True)):
            if tiles == 2 and bn == 256:
                continue
            out.append(Fp8GemmConfig(bm, bn, bk, 1, warps, stages, 8, w_as_a, True))
        out.append(Fp8GemmConfig(128, 128 if tiles == 1 else 64, 64, 1, 8 if tiles == 1 else 4, 3, 8, False, True,
                                 fast_cvt=False))
    return out


def all_cases(tune: bool, ms=MS) -> list:
    """Every (shape index, M, variant, config) that the run times, in a fixed order."""
    cases = []
    for si, (_, n, k, act) in enumerate(SHAPES):
        for m in ms:
            for variant in ("bf16", "fp8", "fp8_block", "dyn_triton", "dyn_scaled_mm"):
                cases.append((si, m, variant, None))
            if m > 16:
                cases.append((si, m, "upcast_cublas", None))
            if tune:
                cases += [(si, m, "fp8_cfg", c) for c in sweep_configs(n, k, act, m)]
    return cases


# ----------------------------------------------------------------------------- workers
def _warm_worker(args):
    """Compile the Triton variants of some cases (one call each, one weight copy)."""
    indices, tune, ms = args
    cases = all_cases(tune, ms)
    data = {}
    failed = 0
    for i in indices:
        si, m, variant, cfg = cases[i]
        if variant in ("bf16", "upcast_cublas"):
            pass  # compiled by the timing pass (few kernels)
        try:
            if si not in data:
                _, n, k, act = SHAPES[si]
                data[si] = ShapeData(n, k, act, 1)
            variant_calls(data[si], m, variant, cfg)[0]()
        except Exception:
            failed += 1
    torch.cuda.synchronize()
    return failed


def warm_in_parallel(tune: bool, jobs: int, ms) -> None:
    n = len(all_cases(tune, ms))
    # Spread each shape's cases over the workers (a worker builds the tensors of the shapes it meets).
    parts = [(list(range(j, n, jobs)), tune, ms) for j in range(jobs)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(jobs) as pool:
        failed = sum(pool.map(_warm_worker, parts))
    print(f"# compiled {n} cases in {jobs} processes in {time.time() - t0:.0f} s ({failed} failed)", flush=True)


# ----------------------------------------------------------------------------- main
def run(tune: bool, jobs: int, ms) -> dict:
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, python=platform.python_version(),
               capability=".".join(map(str, torch.cuda.get_device_capability())))
    env["copy_tbs"] = copy_bandwidth_tbs()
    print(f"# {env}", flush=True)
    if jobs > 1:
        warm_in_parallel(tune, jobs, ms)
    cases = all_cases(tune, ms)
    rows, best = [], {}
    data = {}
    for si, m, variant, cfg in cases:
        name, n, k, act = SHAPES[si]
        if si not in data:
            data.clear()
            torch.cuda.empty_cache()
            data[si] = ShapeData(n, k, act, copies_for(n, k))
        d = data[si]
        cfg_name = (cfg.name(m) if isinstance(cfg, Fp8GemmConfig) else cfg.name()) if cfg else None
        row = dict(shape=name, n=n, k=k, m=m, variant=variant, config=cfg_name)
        try:
            calls = variant_calls(d, m, variant, cfg)
            out = calls[0]()
            if variant != "bf16":
                row["max_rel_err"] = max_rel_err(out, reference(d, m, variant))
            row["us"] = graph_time_us(calls, **GRAPH_TIMING)
            row["tbs"] = weight_bytes(d, variant) / (row["us"] * 1e-6) / 1e12
            if variant in ("fp8", "fp8_block", "dyn_triton", "dyn_scaled_mm"):
                kw = dict(act=act, scaling="block" if variant == "fp8_block" else "channel",
                          block_size=128 if variant == "fp8_block" else 0,
                          act_mode="per_token" if variant.startswith("dyn") else "keep")
                row["kernel"] = fp8.fp8_kernel_name(m, n, k, **kw)
                if variant == "dyn_scaled_mm":
                    row["kernel"] = "quantize_per_token+scaled_mm_rowwise (forced)"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        if variant == "fp8_cfg" and "us" in row and row.get("max_rel_err", 1) < 2e-2:
            key = (name, m)
            if key not in best or row["us"] < best[key][0]:
                best[key] = (row["us"], cfg)
        if variant != "fp8_cfg":
            print(json.dumps(row), flush=True)
    return dict(env=env, rows=rows, best={f"{k[0]}@{k[1]}": dict(us=v[0], config=repr(v[1])) for k, v in best.items()})


def table(result: dict) -> str:
    env = result["env"]
    by = {}
    for r in result["rows"]:
        if r["variant"] != "fp8_cfg":
            by[(r["shape"], r["m"], r["variant"])] = r
    lines = [f"device {env['device']} (sm_{env['capability']}), torch {env['torch']}, triton {env['triton']}, "
             f"copy {env['copy_tbs']:.2f} TB/s",
             "| shape | M | bf16 us | fp8 us (TB/s) | fp8/bf16 | fp8 block128 us (TB/s) | dyn Triton us | "
             "dyn scaled_mm us | upcast+cuBLAS us | max rel err fp8 / block / dyn / scaled_mm | fp8 kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def us(r):
        return f"{r['us']:.2f}" if r and "us" in r else ("err" if r and "error" in r else "-")

    def err(r):
        return f"{r['max_rel_err']:.1e}" if r and "max_rel_err" in r else "-"

    step = {"bf16": 0.0, "fp8": 0.0, "fp8_block": 0.0, "dyn_triton": 0.0}
    for name, n, k, act in SHAPES:
        for m in sorted({r["m"] for r in result["rows"]}):
            g = {v: by.get((name, m, v)) for v in ("bf16", "fp8", "fp8_block", "dyn_triton", "dyn_scaled_mm",
                                                    "upcast_cublas")}
            if not any(g.values()):
                continue
            f, b = g["fp8"], g["bf16"]
            ratio = f"{f['us'] / b['us']:.2f}" if f and b and "us" in f and "us" in b else "-"
            tb = lambda r: f" ({r['tbs']:.2f})" if r and "tbs" in r else ""  # noqa: E731
            lines.append(f"| {name} | {m} | {us(b)} | {us(f)}{tb(f)} | {ratio} | "
                         f"{us(g['fp8_block'])}{tb(g['fp8_block'])} "
                         f"| {us(g['dyn_triton'])} | {us(g['dyn_scaled_mm'])} | {us(g['upcast_cublas'])} | "
                         f"{err(f)} / {err(g['fp8_block'])} / {err(g['dyn_triton'])} / {err(g['dyn_scaled_mm'])} | "
                         f"{(f or {}).get('kernel', '-')} |")
            if m == 1:
                for v in step:
                    if g[v] and "us" in g[v]:
                        step[v] += g[v]["us"] * LAYERS
    if result.get("best"):
        lines.append("\nbest swept configs (FP8_TUNED candidates):")
        for key, v in sorted(result["best"].items()):
            lines.append(f"  {key}: {v['us']:.2f} us  {v['config']}")
    fp8_bytes = sum(n * k for _, n, k, _ in SHAPES) * LAYERS
    lines.append(f"\ndecode step linears (M=1, {LAYERS} layers, no LM head): bf16 {step['bf16'] / 1000:.3f} ms, "
                 f"fp8 {step['fp8'] / 1000:.3f} ms, fp8 block128 {step['fp8_block'] / 1000:.3f} ms, dynamic per_token "
                 f"{step['dyn_triton'] / 1000:.3f} ms; fp8 weight bytes at copy bandwidth "
                 f"{fp8_bytes / (env['copy_tbs'] * 1e12) * 1000:.3f} ms")
    if step["bf16"] and step["fp8"]:
        lines.append(f"headline: decode linears fp8 / bf16 = {step['fp8'] / step['bf16']:.3f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="fp8_bench.json")
    ap.add_argument("--tune", action="store_true", help="sweep kernel configs per shape and M")
    ap.add_argument("--jobs", type=int, default=1, help="processes that compile the Triton variants first")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="row counts, comma-separated")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    ms = [int(v) for v in args.ms.split(",")]
    result = run(args.tune, args.jobs, ms)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
