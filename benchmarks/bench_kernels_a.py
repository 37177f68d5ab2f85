"""Benchmark of the fused kernels rmsnorm_residual, qkv, swiglu and rope_kvcache on one GPU.

    python benchmarks/bench_kernels_a.py --out results/kernels_a.json

Measures, with CUDA events and medians:
  1. device copy bandwidth: a 1 GiB device-to-device `copy_`, bytes read + written;
  2. rmsnorm_residual at 16384 x 4096 bf16 as a share of that bandwidth (bytes: read x, r, w,
     write s, h), against the eager and the torch.compile'd reference, plus a sweep of the
     kernel's rows-per-program and warps for tuning;
  3. fused QKV against three separate linears and fused SwiGLU against the unfused MLP input
     at Llama-3.2-1B shapes (D 2048, q 2048, k/v 512 each, FFN 8192), decode M in {1, 4, 16}
     and prefill M 2048. Small shapes are timed as CUDA-graph replays (no launch overhead)
     cycling through enough weight copies that L2 cannot hold them (as in a real decode,
     where every layer's weights stream from HBM); plus a sweep of skinny-GEMM configs;
  4. rope_kvcache against its reference (decode and prefill).
Each case runs in its own try/except: a failure is printed and recorded, the rest go on.
Prints a table; the last line is the headline ratio. Writes everything as JSON to --out.
"""
import argparse
import json
import math
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from planlang.runtime.kernels import qkv as qkv_mod
    from planlang.runtime.kernels import rmsnorm_residual as norm_mod
    from planlang.runtime.kernels import rope_kvcache as rope_mod
    from planlang.runtime.kernels import swiglu as swiglu_mod
except ImportError:  # planlang not installed: run from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from runtime.kernels import qkv as qkv_mod
    from runtime.kernels import rmsnorm_residual as norm_mod
    from runtime.kernels import rope_kvcache as rope_mod
    from runtime.kernels import swiglu as swiglu_mod
SkinnyConfig = qkv_mod.SkinnyConfig

GiB = 1 << 30
D, Q_SIZE, KV_SIZE, FFN = 2048, 2048, 512, 8192  # Llama-3.2-1B
HQ, HKV, HEAD = 32, 8, 64
DECODE_M = (1, 4, 16)
PREFILL_M = 2048
NORM_ROWS, NORM_HIDDEN = 16384, 4096
COPY_BYTES = GiB


# ----------------------------------------------------------------------------- timing
def time_events(fn, iters: int, warmup: int = 5) -> float:
    """Median milliseconds of fn() over `iters` runs, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph(fns, iters: int) -> float:
    """Median milliseconds per call of the callables `fns`, captured once each, in order,
    into one CUDA graph and replayed `iters` times: launch overhead is gone."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return time_events(graph.replay, iters, warmup=3) / len(fns)


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2 ** 20) or 50 * 2 ** 20)


def copies_beyond_l2(bytes_per_copy: int) -> int:
    """How many weight copies to cycle through so that L2 cannot serve them: 3x L2."""
    return max(1, min(32, math.ceil(3 * l2_bytes() / max(1, bytes_per_copy))))


# ----------------------------------------------------------------------------- results
class Results:
    """The table rows, the JSON record and the errors, gathered case by case."""

    def __init__(self):
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.meta: dict = {}

    def add(self, case: str, variant: str, ms: float, nbytes: int = 0, base_ms: float = None, **extra):
        row = {"case": case, "variant": variant, "us": ms * 1e3}
        if nbytes:
            row["GBps"] = nbytes / (ms * 1e-3) / 1e9
            if self.meta.get("copy_GBps"):
                row["pct_copy"] = 100.0 * row["GBps"] / self.meta["copy_GBps"]
        if base_ms:
            row["speedup"] = base_ms / ms
        row.update(extra)
        self.rows.append(row)
        print(_format_row(row), flush=True)
        return row

    def run(self, case: str, fn):
        """Run one case; on failure print and record the error and go on."""
        try:
            fn()
        except Exception as exc:  # one broken case must not lose the others
            print(f"!! {case}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
            self.errors.append({"case": case, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


HEADER = f"{'case':<34} {'variant':<30} {'us':>10} {'GB/s':>9} {'%copy':>7} {'speedup':>8}"


def _format_row(row: dict) -> str:
    def num(key, fmt):
        return format(row[key], fmt) if key in row else "-"
    return (f"{row['case']:<34} {row['variant']:<30} {num('us', '10.2f')} {num('GBps', '9.1f')} "
            f"{num('pct_copy', '7.1f')} {num('speedup', '8.2f')}")


# ----------------------------------------------------------------------------- cases
def bench_copy(res: Results, iters: int) -> None:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_events(lambda: dst.copy_(src), iters)
    res.meta["copy_GBps"] = 2 * COPY_BYTES / (ms * 1e-3) / 1e9
    res.add(f"copy {COPY_BYTES / GiB:g} GiB d2d", "tensor.copy_", ms, 2 * COPY_BYTES)


def bench_rmsnorm(res: Results, iters: int, sweep: bool) -> None:
    m, n, dtype = NORM_ROWS, NORM_HIDDEN, torch.bfloat16
    x = torch.randn(m, n, device="cuda", dtype=dtype)
    r = torch.randn(m, n, device="cuda", dtype=dtype)
    w = torch.randn(n, device="cuda", dtype=dtype)
    nbytes = (4 * m * n + n) * x.element_size()  # read x, r, w; write s, h
    case = f"rmsnorm_residual {m}x{n} bf16"
    eager = time_events(lambda: norm_mod.rmsnorm_residual_reference(x, r, w, 1e-5), iters)
    res.add(case, "eager reference", eager, nbytes)

    def compiled_case():
        compiled = torch.compile(norm_mod.rmsnorm_residual_reference, dynamic=False)
        res.add(case, "torch.compile reference", time_events(lambda: compiled(x, r, w, 1e-5), iters),
                nbytes, eager)

    res.run(case + " compile", compiled_case)
    ms = time_events(lambda: norm_mod.rmsnorm_residual(x, r, w, 1e-5), iters)
    res.meta["rmsnorm_residual_pct_copy"] = res.add(case, "triton (heuristic)", ms, nbytes, eager).get("pct_copy")
    if not sweep:
        return
    for rows in (1, 2, 4):
        for warps in (4, 8, 16):
            def one(rows=rows, warps=warps):
                fn = lambda: norm_mod.rmsnorm_residual_triton(x, r, w, 1e-5, rows_per_program=rows, num_warps=warps)
                res.add(case, f"sweep rows={rows} warps={warps}", time_events(fn, iters), nbytes, eager,
                        rows_per_program=rows, num_warps=warps)
            res.run(f"{case} sweep {rows}/{warps}", one)


def _cfg(c: SkinnyConfig) -> str:
    return f"bn{c.block_n} bk{c.block_k} split{c.split_k} w{c.num_warps} st{c.num_stages}"


def _weights(rows: int, cols: int, copies: int, dtype=torch.bfloat16):
    return [torch.randn(rows, cols, device="cuda", dtype=dtype) * cols ** -0.5 for _ in range(copies)]


def bench_qkv(res: Results, m: int, iters: int) -> None:
    case = f"qkv M={m} D={D} q={Q_SIZE} kv={KV_SIZE}"
    wbytes = (Q_SIZE + 2 * KV_SIZE) * D * 2
    copies = copies_beyond_l2(wbytes) if m <= 16 else 1
    x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
    parts = [[_weights(n, D, 1)[0] for n in (Q_SIZE, KV_SIZE, KV_SIZE)] for _ in range(copies)]
    fused = [qkv_mod.build_w_qkv(*p)[0] for p in parts]
    unfused_fns = [lambda p=p: [F.linear(x, w) for w in p] for p in parts]
    fused_fns = [lambda w=w: qkv_mod.qkv_linear(x, w, Q_SIZE, KV_SIZE) for w in fused]
    timer = (lambda fns: time_graph(fns, iters)) if m <= 16 else (lambda fns: time_events(fns[0], iters))
    nbytes = wbytes + m * (D + Q_SIZE + 2 * KV_SIZE) * 2
    base = timer(unfused_fns)
    res.add(case, "3 x F.linear (unfused)", base, nbytes, copies=copies)
    res.add(case, "one GEMM on [Wq;Wk;Wv]", timer(fused_fns), nbytes, base, copies=copies)
    if m <= 16:
        one_gemm = [lambda w=w: F.linear(x, w) for w in fused]
        res.add(case, "cuBLAS on [Wq;Wk;Wv]", timer(one_gemm), nbytes, base, copies=copies)


def bench_swiglu(res: Results, m: int, iters: int) -> None:
    case = f"swiglu M={m} D={D} F={FFN}"
    wbytes = 2 * FFN * D * 2
    copies = copies_beyond_l2(wbytes) if m <= 16 else 1
    x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
    pairs = [(_weights(FFN, D, 1)[0], _weights(FFN, D, 1)[0]) for _ in range(copies)]
    fused = [swiglu_mod.build_w13(w1, w3) for w1, w3 in pairs]
    unfused_fns = [lambda p=p: F.silu(F.linear(x, p[0])) * F.linear(x, p[1]) for p in pairs]
    fused_fns = [lambda w=w: swiglu_mod.swiglu_linear(x, w, "silu") for w in fused]
    timer = (lambda fns: time_graph(fns, iters)) if m <= 16 else (lambda fns: time_events(fns[0], iters))
    nbytes = wbytes + m * (D + FFN) * 2
    base = timer(unfused_fns)
    res.add(case, "silu(x W1) * (x W3) (unfused)", base, nbytes, copies=copies)
    res.add(case, "swiglu_linear (fused)", timer(fused_fns), nbytes, base, copies=copies)


def bench_skinny_sweep(res: Results, iters: int) -> None:
    """Skinny-GEMM configs at decode shapes of Llama-3.2-1B, for tuning `skinny_config`."""
    shapes = {"qkv": (Q_SIZE + 2 * KV_SIZE, D), "o_proj": (D, Q_SIZE), "down": (D, FFN)}
    configs = [SkinnyConfig(bn, bk, sk, nw, ns) for bn in (16, 32, 64) for bk in (128, 256)
               for sk in (1, 2, 4) for nw in (4,) for ns in (3, 4)]
    for m in (1, 16):
        for name, (n, k) in shapes.items():
            copies = copies_beyond_l2(n * k * 2)
            ws = _weights(n, k, copies)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nbytes = n * k * 2
            case = f"skinny {name} M={m} N={n} K={k}"
            base = time_graph([lambda w=w: F.linear(x, w) for w in ws], iters)
            res.add(case, "cuBLAS", base, nbytes, copies=copies)
            heur = time_graph([lambda w=w: qkv_mod.linear(x, w) for w in ws], iters)
            res.add(case, f"triton {_cfg(qkv_mod.skinny_config(n, k, 2, x.device))}", heur, nbytes, base)
            best = None
            for cfg in configs:
                try:
                    ms = time_graph([lambda w=w, c=cfg: qkv_mod.linear_triton(x, w, config=c) for w in ws], iters)
                except Exception as exc:  # a config that does not fit (shared memory) is skipped
                    res.errors.append({"case": f"{case} {cfg}", "error": f"{type(exc).__name__}: {exc}"})
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            if best:
                res.add(case, f"best {_cfg(best[1])}", best[0], nbytes, base, best_config=best[1].__dict__)


def bench_rope(res: Results, iters: int) -> None:
    for b, t in ((16, 1), (1, PREFILL_M)):
        case = f"rope_kvcache B={b} T={t}"
        fused = torch.randn(b, t, (HQ + 2 * HKV) * HEAD, device="cuda", dtype=torch.bfloat16)
        q = fused[..., : HQ * HEAD].view(b, t, HQ, HEAD)
        k = fused[..., HQ * HEAD: (HQ + HKV) * HEAD].view(b, t, HKV, HEAD)
        v = fused[..., (HQ + HKV) * HEAD:].view(b, t, HKV, HEAD)
        cos, sin = torch.randn(4096, HEAD, device="cuda"), torch.randn(4096, HEAD, device="cuda")
        kc = torch.zeros(b, HKV, 4096, HEAD, device="cuda", dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        pos = torch.arange(t, device="cuda") + 7
        nbytes = 2 * b * t * (HQ + 2 * HKV) * HEAD * 2  # read q, k, v; write q_rot, k_rot, k, v
        timer = (lambda fn: time_graph([fn], iters)) if t == 1 else (lambda fn: time_events(fn, iters))
        base = timer(lambda: rope_mod.rope_kvcache_reference(q, k, v, cos, sin, kc, vc, pos))
        res.add(case, "reference (torch ops)", base, nbytes)
        res.add(case, "triton (one launch)", timer(lambda: rope_mod.rope_kvcache(q, k, v, cos, sin, kc, vc, pos)),
                nbytes, base)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions (median)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tuning sweeps")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    res = Results()
    res.meta.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    l2_bytes=l2_bytes())
    print(f"{res.meta['device']}  torch {torch.__version__}  triton {triton.__version__}\n{HEADER}")
    res.run("copy", lambda: bench_copy(res, args.iters))
    res.run("rmsnorm_residual", lambda: bench_rmsnorm(res, args.iters, not args.no_sweep))
    for m in (*DECODE_M, PREFILL_M):
        res.run(f"qkv M={m}", lambda m=m: bench_qkv(res, m, args.iters))
        res.run(f"swiglu M={m}", lambda m=m: bench_swiglu(res, m, args.iters))
    res.run("rope_kvcache", lambda: bench_rope(res, args.iters))
    if not args.no_sweep:
        res.run("skinny sweep", lambda: bench_skinny_sweep(res, args.iters))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": res.meta, "rows": res.rows, "errors": res.errors}, indent=2,
                                   default=str))
    print(f"\n{len(res.rows)} measurements, {len(res.errors)} errors; JSON in {args.out}")
    pct = res.meta.get("rmsnorm_residual_pct_copy")
    headline = f"{pct:.1f}% of copy bandwidth" if pct is not None else "not measured"
    print(f"rmsnorm_residual {NORM_ROWS}x{NORM_HIDDEN} bf16: {headline} (target >= 85%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
