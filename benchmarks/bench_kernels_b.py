"""Fused attention and sampling kernels against their PyTorch counterparts, on one GPU.

    python benchmarks/bench_kernels_b.py --out results/kernels_b.json [--sweep] [--quick] [--cases PAT,PAT]

Cases (llama-1b attention shapes: 32 query heads, 8 KV heads, head dim 64; bf16):
- decode: one new token per row over a static cache of 4096 positions, batch {1, 4, 16},
  context {128, 1024, 4096}; ours with soft-cap 50 (and without) against
  F.scaled_dot_product_attention without soft-cap over exactly the context's keys
  (enable_gqa where this torch has it, else K/V expanded beforehand, untimed);
- prefill: 2048 tokens from position 0, causal, against SDPA is_causal;
- sampling over a 128256-word vocabulary, batch {1, 16}: ours (the path split_chunks picks:
  the split path at these batches) against torch.softmax + torch.topk + torch.multinomial
  (top-k), sort + cumsum + multinomial (top-p), and softmax + multinomial (no filter); the
  note gives the one-program-per-row kernel's time too (chunks=1). Sweeps of the split
  path (rows `sampling_sweep`) set its heuristic from measurements: at batch 1 its chunk
  count and rounds (SPLIT_PROGRAMS, the default rounds), and at batch 64, where the row
  kernel is the default, a few chunk counts (SPLIT_MAX_BATCH).

Times are GPU medians of CUDA-graph replays (triton.testing.do_bench_cudagraph), so launch
overhead is excluded on both sides; falls back to triton.testing.do_bench. Every case runs
in its own try/except: one failure prints its error and the rest go on. Each case's rows
are printed as it finishes and the JSON is rewritten after every case, so a run cut short
by a time limit keeps what it measured; the cases issue 3's targets name (decode at batch 1
and context 4096, sampling at batch 1 with top-k and top-p) run first. `--cases` runs only the cases whose name contains
one of the comma-separated patterns (names: "decode b=1 ctx=4096", "sampling b=1 top_k",
"prefill 2048", ...). `--sweep` also
times a few decode configurations (block_n, num_warps, splits) to help pick defaults.
The last line is the headline: the worst decode ratio, soft-capped ours over SDPA
(target <= 1.2).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import traceback

import torch
import torch.nn.functional as F

from planlang.runtime.kernels import attention as attn_mod
from planlang.runtime.kernels import sampling as samp_mod

HQ, HKV, HEAD_DIM = 32, 8, 64
CACHE_LEN = 4096
VOCAB = 128256


def bench_ms(fn) -> float:
    """Median GPU milliseconds of fn, replayed from a CUDA graph where possible."""
    import triton.testing

    fn()  # compile and warm up before any capture
    torch.cuda.synchronize()
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def sdpa_gqa(q, k, v, is_causal):
    """SDPA with grouped heads: enable_gqa where supported, else K/V already expanded by the caller."""
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    except TypeError:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _supports_enable_gqa() -> bool:
    try:
        x = torch.zeros(1, 2, 1, 16, device="cuda", dtype=torch.bfloat16)
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------ attention
def decode_case(batch: int, context: int, rows: list, sweep: bool):
    dtype, dev = torch.bfloat16, "cuda"
    q = torch.randn(batch, 1, HQ, HEAD_DIM, device=dev, dtype=dtype)
    k_cache = torch.randn(batch, HKV, CACHE_LEN, HEAD_DIM, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    pos = torch.tensor([context - 1], device=dev)
    scale = HEAD_DIM ** -0.5

    # SDPA sees exactly the filled keys, laid out [B, H, S, D]: its best case.
    q_sdpa = q.transpose(1, 2).contiguous()
    k_ctx = k_cache[:, :, :context].contiguous()
    v_ctx = v_cache[:, :, :context].contiguous()
    if not GQA:
        k_ctx = k_ctx.repeat_interleave(HQ // HKV, dim=1)
        v_ctx = v_ctx.repeat_interleave(HQ // HKV, dim=1)
    t_sdpa = bench_ms(lambda: sdpa_gqa(q_sdpa, k_ctx, v_ctx, is_causal=False))

    out = attn_mod.attention_triton(q, k_cache, v_cache, pos, scale=scale, softcap=50.0)
    groups = HQ // HKV if GQA else 1  # expand for the float32 check if SDPA did not get expanded K/V
    ref = F.scaled_dot_product_attention(q_sdpa.float(), k_ctx.float().repeat_interleave(groups, 1),
                                         v_ctx.float().repeat_interleave(groups, 1))
    t_cap = bench_ms(lambda: attn_mod.attention_triton(q, k_cache, v_cache, pos, scale=scale, softcap=50.0))
    t_plain = bench_ms(lambda: attn_mod.attention_triton(q, k_cache, v_cache, pos, scale=scale))
    # soft-cap 50 barely moves these logits (|s| << 50): the outputs must agree with SDPA.
    err = (out.float().transpose(1, 2) - ref).abs().max().item()
    rows.append(dict(case="decode", batch=batch, context=context, ours_softcap_ms=t_cap, ours_ms=t_plain,
                     torch_ms=t_sdpa, ratio=t_cap / t_sdpa, max_abs_err=err,
                     splits=attn_mod.decode_num_splits(batch, HKV, CACHE_LEN, 64, q.device)))
    if batch == 1 and context >= 1024:  # the one case past 1.2x: the split sizes beside the default
        for block_n, min_chunk in ((128, 128), (64, 64), (64, 128)):
            t = bench_ms(lambda: attn_mod.attention_triton(q, k_cache, v_cache, pos, scale=scale, softcap=50.0,
                                                           block_n=block_n, min_chunk=min_chunk))
            rows.append(dict(case="decode_variant", batch=batch, context=context, block_n=block_n,
                             min_chunk=min_chunk, ours_softcap_ms=t, torch_ms=t_sdpa, ratio=t / t_sdpa))
        # The fused merge one split a step (as before its tiled form) against the default tile.
        t = bench_ms(lambda: attn_mod.attention_triton(q, k_cache, v_cache, pos, scale=scale, softcap=50.0,
                                                       merge_splits=1))
        rows.append(dict(case="decode_variant", batch=batch, context=context, merge_splits=1,
                         ours_softcap_ms=t, torch_ms=t_sdpa, ratio=t / t_sdpa))
    if sweep:
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for splits in (None, "x2", "half"):
                    auto = attn_mod.decode_num_splits(batch, HKV, CACHE_LEN, block_n, q.device)
                    n = auto if splits is None else (auto * 2 if splits == "x2" else max(1, auto // 2))
                    try:
                        t = bench_ms(lambda: attn_mod.attention_triton(
                            q, k_cache, v_cache, pos, scale=scale, softcap=50.0,
                            block_n=block_n, num_warps=warps, num_splits=n))
                        rows.append(dict(case="decode_sweep", batch=batch, context=context, block_n=block_n,
                                         num_warps=warps, splits=n, ours_softcap_ms=t, torch_ms=t_sdpa, ratio=t / t_sdpa))
                    except Exception as exc:  # a configuration that does not compile is skipped
                        rows.append(dict(case="decode_sweep", batch=batch, context=context, block_n=block_n,
                                         num_warps=warps, splits=n, error=f"{type(exc).__name__}: {exc}"))


def prefill_case(tokens: int, rows: list, sweep: bool):
    dtype, dev = torch.bfloat16, "cuda"
    q = torch.randn(1, tokens, HQ, HEAD_DIM, device=dev, dtype=dtype)
    k_cache = torch.randn(1, HKV, tokens, HEAD_DIM, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    pos = torch.arange(tokens, device=dev)
    scale = HEAD_DIM ** -0.5
    q_sdpa = q.transpose(1, 2).contiguous()
    k_s, v_s = (k_cache, v_cache) if GQA else (k_cache.repeat_interleave(HQ // HKV, 1), v_cache.repeat_interleave(HQ // HKV, 1))
    t_sdpa = bench_ms(lambda: sdpa_gqa(q_sdpa, k_s, v_s, is_causal=True))
    t_plain = bench_ms(lambda: attn_mod.attention_triton(q, k_cache, v_cache, pos, scale=scale))
    t_cap = bench_ms(lambda: attn_mod.attention_triton(q, k_cache, v_cache, pos, scale=scale, softcap=50.0))
    ref = sdpa_gqa(q_sdpa, k_s, v_s, is_causal=True).transpose(1, 2)
    err = (attn_mod.attention_triton(q, k_cache, v_cache, pos, scale=scale).float() - ref.float()).abs().max().item()
    rows.append(dict(case="prefill", batch=1, context=tokens, ours_softcap_ms=t_cap, ours_ms=t_plain,
                     torch_ms=t_sdpa, ratio=t_plain / t_sdpa, max_abs_err=err))
    if sweep:
        for block_m, block_n, warps, stages in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3)):
            try:
                t = bench_ms(lambda: attn_mod.attention_triton(q, k_cache, v_cache, pos, scale=scale, block_m=block_m,
                                                               block_n=block_n, num_warps=warps, num_stages=stages))
                rows.append(dict(case="prefill_sweep", context=tokens, block_m=block_m, block_n=block_n,
                                 num_warps=warps, num_stages=stages, ours_ms=t, torch_ms=t_sdpa, ratio=t / t_sdpa))
            except Exception as exc:
                rows.append(dict(case="prefill_sweep", block_m=block_m, block_n=block_n, num_warps=warps,
                                 num_stages=stages, error=f"{type(exc).__name__}: {exc}"))


# ------------------------------------------------------------------------------ sampling
def lm_like_logits(batch: int, dtype=torch.float32) -> torch.Tensor:
    """A broad bulk with a handful of strong tokens per row, like a language model's logits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(batch, VOCAB, device="cuda", generator=g) * 2.5
    strong = torch.randint(0, VOCAB, (batch, 20), device="cuda", generator=g)
    logits.scatter_add_(1, strong, torch.full((batch, 20), 9.0, device="cuda"))
    return logits.to(dtype)


def torch_top_k(logits, temperature, k):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    values, indices = torch.topk(probs, k, dim=-1)
    return indices.gather(1, torch.multinomial(values, 1)).squeeze(1)


def torch_top_p(logits, temperature, p):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return order.gather(1, torch.multinomial(sorted_probs, 1)).squeeze(1)


def torch_plain(logits, temperature):
    return torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1).squeeze(1)


SAMPLING_FILTERS = {"top_k": dict(top_k=50), "top_p": dict(top_p=0.9), "top_k+top_p": dict(top_k=50, top_p=0.9),
                    "none": {}}
SPLIT_SWEEP_CHUNKS = {1: (32, 64, 128, 256, 512), 64: (2, 4, 8)}  # batch -> chunk counts to time
SPLIT_SWEEP_ROUNDS = (1, 2, 3)  # at batch 1, with the default chunk count


def sampling_case(batch: int, filters: str, dtype, rows: list, sweep_split: bool = False):
    logits = lm_like_logits(batch, dtype)
    seed = torch.tensor([1234], device="cuda")
    offset = torch.tensor([0], device="cuda")
    settings = SAMPLING_FILTERS[filters]

    def ours_with(**knobs):
        return bench_ms(lambda: samp_mod.sample_triton(logits, temperature=0.8, seed=seed, offset=offset,
                                                       **settings, **knobs))

    ours = ours_with()  # the path split_chunks picks
    row_kernel = ours_with(chunks=1)
    if filters == "top_k":
        base = bench_ms(lambda: torch_top_k(logits, 0.8, 50))
    elif filters == "none":
        base = bench_ms(lambda: torch_plain(logits, 0.8))
    else:  # top_p, and top_k + top_p, against the sort-based top-p (the costlier half)
        base = bench_ms(lambda: torch_top_p(logits, 0.8, 0.9))
    dname = str(dtype).replace("torch.", "")
    rows.append(dict(case="sampling", batch=batch, filters=filters, dtype=dname,
                     chunks=samp_mod.split_chunks(batch, VOCAB), ours_ms=ours, row_kernel_ms=row_kernel,
                     torch_ms=base, ratio=ours / base))
    if sweep_split:
        default_rounds = 2
        configs = [(c, default_rounds) for c in SPLIT_SWEEP_CHUNKS[batch]]
        if batch == 1 and filters != "none":  # without filters there are no rounds
            configs += [(samp_mod.split_chunks(batch, VOCAB), r) for r in SPLIT_SWEEP_ROUNDS if r != default_rounds]
        for chunks, rounds in configs:
            try:
                t = ours_with(chunks=chunks, rounds=rounds)
                rows.append(dict(case="sampling_sweep", batch=batch, filters=filters, dtype=dname, chunks=chunks,
                                 rounds=rounds, ours_ms=t, torch_ms=base, ratio=t / base))
            except Exception as exc:  # one configuration failing must not stop the sweep
                rows.append(dict(case="sampling_sweep", batch=batch, filters=filters, chunks=chunks, rounds=rounds,
                                 error=f"{type(exc).__name__}: {exc}"))


# ------------------------------------------------------------------------------ driver
def print_table(rows: list, header: bool = True) -> None:
    """Times in microseconds. ratio: decode = ours with soft-cap / SDPA without; prefill =
    ours without soft-cap / SDPA; sampling = ours / torch."""
    if header:
        print("times in us; ratio: decode = ours+cap / SDPA, prefill = ours / SDPA, sampling = ours / torch")
        head = f"{'case':<14} {'batch':>5} {'ctx/filter':>12} {'ours':>9} {'ours+cap':>9} {'torch':>9} {'ratio':>6}  note"
        print(head)
        print("-" * len(head))
    for r in rows:
        where = str(r.get("context", r.get("filters", "")))
        if "error" in r:
            print(f"{r['case']:<14} {r.get('batch', ''):>5} {where:>12}  ERROR {r['error']}")
            continue
        note = ""
        if r["case"] == "decode_sweep":
            note = f"block_n={r['block_n']} warps={r['num_warps']} splits={r['splits']}"
        elif r["case"] == "decode_variant":
            note = ", ".join(f"{k}={r[k]}" for k in ("block_n", "min_chunk", "merge_splits") if k in r)
        elif r["case"] == "prefill_sweep":
            note = f"block_m={r['block_m']} block_n={r['block_n']} warps={r['num_warps']} stages={r['num_stages']}"
        elif "max_abs_err" in r:
            note = f"max|err|={r['max_abs_err']:.2e}"
        elif r["case"] == "sampling":
            path = f"split, {r['chunks']} chunks" if r["chunks"] > 1 else "row kernel"
            note = f"{r['dtype']}; {path}; row kernel {1000 * r['row_kernel_ms']:.1f} us"
        elif r["case"] == "sampling_sweep":
            note = f"{r['dtype']}; chunks={r['chunks']} rounds={r['rounds']}"
        us = [1000 * r.get(key, float("nan")) for key in ("ours_ms", "ours_softcap_ms", "torch_ms")]
        print(f"{r['case']:<14} {r.get('batch', ''):>5} {where:>12} "
              f"{us[0]:>9.1f} {us[1]:>9.1f} {us[2]:>9.1f} {r['ratio']:>6.2f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="kernels_b.json", help="where to write the JSON results")
    parser.add_argument("--sweep", action="store_true", help="also time decode/prefill kernel configurations")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases (batch 1 and 16, context 128 and 4096) and no sampling sweeps")
    parser.add_argument("--cases", default="", help="comma-separated name patterns: run only matching cases")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels_b needs a CUDA GPU")

    global GQA
    GQA = _supports_enable_gqa()
    batches = (1, 16) if args.quick else (1, 4, 16)
    contexts = (128, 4096) if args.quick else (128, 1024, 4096)
    rows: list = []
    cases = [(f"decode b={b} ctx={c}", decode_case, (b, c, rows, args.sweep)) for b in batches for c in contexts]
    cases.append(("prefill 2048", prefill_case, (2048, rows, args.sweep)))
    for b in (1, 16):
        for filters in ("top_k", "top_p", "top_k+top_p", "none"):
            cases.append((f"sampling b={b} {filters}", sampling_case,
                          (b, filters, torch.float32, rows, b == 1 and not args.quick)))
        cases.append((f"sampling b={b} top_k bf16", sampling_case, (b, "top_k", torch.bfloat16, rows)))
    for filters in ("top_k", "top_p", "none"):  # where the row kernel is the default: is it still the better one?
        cases.append((f"sampling b=64 {filters}", sampling_case, (64, filters, torch.float32, rows, not args.quick)))
    # What issue 3's targets name runs first, so a run cut short by a time limit has it.
    first = ("decode b=1 ctx=4096", "sampling b=1 top_k", "sampling b=1 top_p")
    cases.sort(key=lambda c: first.index(c[0]) if c[0] in first else len(first))
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    if patterns:
        cases = [c for c in cases if any(p in c[0] for p in patterns)]
        if not cases:
            raise SystemExit(f"bench_kernels_b: no case matches --cases {args.cases!r}")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                sdpa_gqa="enable_gqa" if GQA else "expanded")
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        pass
    print(f"device: {meta['device']}  torch {torch.__version__}  triton {meta.get('triton', '?')}  "
          f"SDPA GQA: {'enable_gqa' if GQA else 'expanded K/V'}", flush=True)
    for name, fn, fargs in cases:
        before = len(rows)
        try:
            fn(*fargs)
        except Exception as exc:  # one failure must not stop the rest
            traceback.print_exc()
            rows.append(dict(case=name, error=f"{type(exc).__name__}: {exc}", torch_ms=float("nan"), ratio=float("nan")))
        print(f"-- {name}", flush=True)
        print_table(rows[before:], header=False)
        with open(args.out, "w") as f:  # rewritten after every case: a cut-short run keeps its rows
            json.dump(dict(meta=meta, rows=rows), f, indent=2, default=str)

    print_table(rows)
    decode = [r["ratio"] for r in rows if r["case"] == "decode" and "error" not in r]
    sampling = [r["ratio"] for r in rows if r["case"] == "sampling" and "error" not in r]
    worst = max(decode) if decode else math.nan
    print(f"wrote {args.out}; sampling ours/torch worst {max(sampling) if sampling else math.nan:.2f}")
    print(f"headline: decode with soft-cap / SDPA without, worst over the grid = {worst:.2f}x (target <= 1.2)")


GQA = True

if __name__ == "__main__":
    main()
