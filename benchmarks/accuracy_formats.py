"""Accuracy of each number format on the trained built-in model (docs/ACCURACY.md).

    python benchmarks/accuracy_formats.py [--tokens N] [--device cpu|cuda] [--out FILE.json]

Every row applies one precision plan to `builtin:llama-tiny-trained` (bf16) and compares
it with the unplanned bf16 model over the shipped evaluation text (held-out Python
source): top-1 agreement, KL of the next-token distributions, perplexity. A `**:linear`
rule takes every linear but the LM head, 28 GEMMs (the last column counts those the plan
changed). FP8 rules run
planlang's FP8 kernels where the device has them (the Triton interpreter on a CPU under
TRITON_INTERPRET=1 is too slow for the whole text, so on a CPU they run emulated, which
computes the same numbers: tests/runtime/test_precision.py checks that); MX and NVFP4 run
emulated everywhere (no native GEMM on the lent hardware).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

FORMATS = {
    # name: (precision rules, needs FP8 hardware for the real kernels)
    "fp8_e4m3 weights (channel)": ([{"at": "**:linear", "dtype": "fp8_e4m3"}], True),
    "fp8_e4m3 weights + activations per token": ([{"at": "**:linear", "dtype": "fp8_e4m3",
                                                   "activations": "per_token"}], True),
    "fp8_e4m3 weights (block 128)": ([{"at": "**:linear", "dtype": "fp8_e4m3", "scaling": "block"}], True),
    "fp8_e5m2 weights (channel)": ([{"at": "**:linear", "dtype": "fp8_e5m2"}], True),
    "fp8_e4m3 KV cache": ([{"at": "**:kv_cache", "dtype": "fp8_e4m3"}], True),
    "mxfp8 weights + activations": ([{"at": "**:linear", "dtype": "mxfp8", "activations": "per_block"}], False),
    "nvfp4 weights": ([{"at": "**:linear", "dtype": "nvfp4"}], False),
    "nvfp4 weights + activations": ([{"at": "**:linear", "dtype": "nvfp4", "activations": "per_block"}], False),
    "mxfp4 weights": ([{"at": "**:linear", "dtype": "mxfp4"}], False),
}


def plan_for(rules: list[dict], emulate: bool):
    from planlang.plan import Plan
    rules = [dict(r, emulate=True) if emulate else r for r in rules]
    return Plan.model_validate({"planlang": 1, "target": "auto", "precision": {"rules": rules},
                                "limits": {"max_batch": 1, "max_seq_len": 256}})


def measure(name: str, tokens: int, device: torch.device, chunk: int = 256) -> dict:
    from planlang.runtime.accuracy import compare, eval_tokens, logits_fn_for
    from planlang.runtime.apply import apply
    from planlang.runtime.models.registry import build_builtin
    rules, fp8 = FORMATS[name]
    native = device.type == "cuda" and fp8 and torch.cuda.get_device_capability(device) >= (8, 9)
    model = build_builtin("llama-tiny-trained", device=device)
    model.setup_caches(1, chunk)
    ids = eval_tokens(device, max_tokens=tokens)
    ref_fn = logits_fn_for(model)
    with torch.no_grad():
        ref = {i: ref_fn(c) for i, c in enumerate(ids.split(chunk, dim=1))}  # before the plan touches the caches
    order = iter(range(len(ref)))
    planned = apply(model, plan_for(rules, emulate=not native), device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        res = compare(lambda c: ref[next(order)], logits_fn_for(planned), ids, chunk=chunk)
    out = res.to_json()
    # `**:linear` takes every linear but the LM head: 28 of llama-tiny-trained's 29 (issue 10)
    out.update(format=name, kernels="planlang fp8 kernels" if native else "emulated (quantize-dequantize)",
               gemms=len(planned.report.precision), seconds=round(time.perf_counter() - t0, 2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: the whole text)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", action="append", help="run only these rows (names as in the table)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.only or FORMATS:
        r = measure(name, args.tokens, device)
        rows.append(r)
        print(f"| {name} | {r['kernels']} | {r['top1_agreement']:.4f} | {r['kl']:.2e} | "
              f"{r['ppl_reference']:.4f} -> {r['ppl_candidate']:.4f} ({(r['ppl_candidate'] / r['ppl_reference'] - 1) * 100:+.2f}%) "
              f"| {r['tokens']} | {r['gemms']} GEMMs |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
