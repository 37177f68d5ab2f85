"""The RMSNorm folded into the next GEMV (`planlang::rmsnorm_gemm`) against the norm kernel and
the GEMV run apart, at Llama-3.2-1B's decode shapes (batch 1), on the GPU.

    python benchmarks/bench_norm_gemm.py [--out norm_gemm.json] [--sweep]

Each case is a CUDA graph of 16 layers' worth of calls on distinct weights (so the weights
stream from HBM, as in a decode step), replayed 20 times after warm-up; times are per call
(us), from CUDA events around the replays. Cases: the QKV GEMV (3072 x 2048), the fused
gate/up GEMV (2 x 8192 x 2048) and the LM head (128256 x 2048, once a step), in bf16 and
with FP8 e4m3 weights (channel scales). `--sweep` also times the fused kernel at other
rows-per-program (block_n) to set the defaults (`qkv.norm_gemv_config`,
`fp8_linear.norm_gemv_fit`). The last line is the headline: fused over unfused, per case.
"""
import argparse
import json
import sys

import torch

from planlang.runtime.bench import graph_time_us
from planlang.runtime.kernels import fp8_linear as fp8_mod
from planlang.runtime.kernels import norm_gemm as ng
from planlang.runtime.kernels import qkv as qkv_mod
from planlang.runtime.kernels import rmsnorm_residual as norm_mod
from planlang.runtime.kernels import swiglu as swiglu_mod
from planlang.runtime.precision.formats import quantize_fp8

D, LAYERS, REPS = 2048, 16, 20
DEVICE = "cuda"


def graph_us(fn, calls: int) -> float:
    """Per-call time of `fn` (which makes `calls` calls) captured in one CUDA graph: one sample
    of REPS back-to-back replays after 3 warm-up replays."""
    if DEVICE != "cuda":  # --smoke: the interpreter, no timing
        fn()
        return 0.0
    return graph_time_us([fn], reps=1, inner=REPS, warmup=3, count=calls)


def weights(n_rows: int, layers: int, fp8: bool):
    out = []
    for _ in range(layers):
        w = (torch.randn(n_rows, D, device=DEVICE) * D ** -0.5).to(torch.bfloat16)
        if fp8:
            q = quantize_fp8(w.float(), "fp8_e4m3", "channel")
            out.append((q.data, q.scale.float().reshape(-1).contiguous()))
        else:
            out.append((w, None))
    return out


def run_case(name: str, n_rows: int, act, fp8: bool, layers: int, sweep: bool) -> list[dict]:
    x = torch.randn(1, 1, D, device=DEVICE).to(torch.bfloat16)
    r = torch.randn(1, 1, D, device=DEVICE).to(torch.bfloat16)
    g = torch.rand(D, device=DEVICE).to(torch.bfloat16) + 0.5
    ws = weights(n_rows, layers, fp8)
    tiles = 2 if act else 1
    n_out = n_rows // tiles

    def unfused():
        for w, s in ws:
            _, h = norm_mod.rmsnorm_residual(x, r, g, 1e-5)
            ng._gemm(h, w, s, None, 0, act)

    def fused():
        for w, s in ws:
            ng.rmsnorm_gemm(x, r, g, 1e-5, 0.0, w, s, None, 0, act)

    rows = [dict(case=name, variant="norm kernel + GEMV", us=graph_us(unfused, layers)),
            dict(case=name, variant="rmsnorm_gemm (default)", us=graph_us(fused, layers))]
    if sweep:
        sbuf = torch.empty_like(x)
        for block_n in (1, 2, 4, 8, 16, 32):
            if block_n * tiles > 64:
                continue
            elems = (2048 if tiles == 1 else 8192) if fp8 else 4096  # weight elements an iteration, as tuned
            block_k = max(16, min(D, elems // (block_n * tiles)))
            prologue = norm_mod.NormPrologue(r, g, 1e-5, 0.0, sbuf)
            if fp8:
                cfg = fp8_mod.Fp8GemvConfig(block_n, block_k, 1, 4, 1, True)

                def call(cfg=cfg):
                    for w, s in ws:
                        out = torch.empty(n_out, dtype=x.dtype, device=DEVICE)
                        fp8_mod._launch_gemv(x.reshape(-1), s, fp8_mod._X_NONE, w, s, "channel", 0, None, act,
                                             out, cfg, prologue)
            else:
                cfg = qkv_mod.GemvConfig(block_n, block_k, 1, 8, 1)

                def call(cfg=cfg):
                    for w, _ in ws:
                        if act:
                            swiglu_mod.swiglu_gemv_triton(x, w, act, config=cfg, norm=prologue)
                        else:
                            qkv_mod.gemv_triton(x, w, config=cfg, norm=prologue)
            try:
                rows.append(dict(case=name, variant=f"sweep block_n={block_n} block_k={block_k}",
                                 us=graph_us(call, layers)))
            except Exception as exc:  # a config that does not compile or fit
                rows.append(dict(case=name, variant=f"sweep block_n={block_n}", error=f"{type(exc).__name__}: {exc}"))
    for row in rows:
        print(f"{row['case']:<22} {row['variant']:<34} {row.get('us', float('nan')):8.2f} us  {row.get('error', '')}",
              flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="norm_gemm.json")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), no timing")
    args = parser.parse_args()
    global D, LAYERS, DEVICE
    scale = 1
    if args.smoke:
        D, LAYERS, DEVICE, scale = 64, 2, "cpu", 64
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for fp8 in (False, True):
        tag = "fp8" if fp8 else "bf16"
        rows += run_case(f"qkv 3072 {tag}", 3072 // scale, None, fp8, LAYERS, args.sweep)
        rows += run_case(f"gate_up 2x8192 {tag}", 2 * 8192 // scale, "silu", fp8, LAYERS, args.sweep)
    rows += run_case("lm_head 128256 bf16", 128256 // scale, None, False, 1, args.sweep)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    heads = []
    for case in dict.fromkeys(r["case"] for r in rows):
        base = next(r["us"] for r in rows if r["case"] == case and r["variant"].startswith("norm kernel"))
        new = next(r["us"] for r in rows if r["case"] == case and r["variant"].startswith("rmsnorm_gemm"))
        heads.append(f"{case}: {base / new:.2f}x" if new else f"{case}: ran")
    print("fused over unfused (higher is better): " + ", ".join(heads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
