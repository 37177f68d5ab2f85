"""A/B of runtime variants: one plan's decode step under several kernel settings, interleaved.

    python benchmarks/bench_variants.py PLAN [PLAN ...] --variant base: --variant pdl:PLANLANG_PDL=1 \
        [--variant NAME:ENV=VAL[,ENV=VAL...]] [--model builtin:llama-1b] [--batch 1 --batch 16] \
        [--context 128] [--rounds 7] [--reps 30] [--profile] [--out variants.json]
    python benchmarks/bench_variants.py --smoke        # CPU, builtin:llama-tiny, a few seconds

A variant is a name and environment variables that planlang's kernels read when they are
launched (or a pass reads at apply time), e.g. PLANLANG_PDL=1. The script never interprets
them: it sets them in os.environ around everything it does with that variant (building and
applying the plan, which captures the CUDA graphs, filling the cache, timing, profiling) and
restores the environment afterwards. A variable that some variant sets is unset for the
variants that do not name it, so `base:` means planlang's defaults even when the shell
exports one of them.

Per (plan, variant) the model is loaded and the plan applied once, and all variants of a
plan stay alive together. Then per batch, for `--rounds` rounds, every variant is timed
once (the order rotates each round); a timing is the median of `--reps` decode steps at
position `--context`, CUDA events around each (planlang.runtime.bench.time_ms, as
`planlang bench` times). Run-to-run GPU drift (clocks, temperature, neighbours) lands on
all variants alike. Per (plan, batch, variant): the median over rounds, the minimum, the
ratio to the first variant (medians, and the median of per-round ratios, which cancels
drift best), and x floor (step_bytes / the copy bandwidth measured in this run).

Why every variant has its own model (not several plans applied to one): a planned model
shares its base model's modules, so its KV-cache tensors are the base model's
(`model.layers[i].attn.kv_cache.k_cache`), and a captured CUDA graph holds their addresses.
`setup_caches` (called by `apply` when the caches do not fit the plan's limits, and by the
`precision.default` cast) and `restore_caches` / `KVCache.to_fp8` (an FP8 KV-cache rule)
allocate new cache tensors and drop the old ones; on a shared model, applying variant B
could free the memory variant A's graphs replay into. With one model per variant nothing
touches a model's caches after its graphs are captured; the script checks that the cache
addresses are unchanged at the end, and that each variant's logits are finite and match
the unplanned model's (computed before any plan is applied) and the first variant's.
The price is memory: one model copy and one cache per variant (llama-1b with
h100_decode's limits, 64 x 4096 positions: about 11 GiB a variant).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from planlang.loader import load_with_source
from planlang.runtime.apply import ApplyError, apply
from planlang.runtime.bench import copy_bandwidth_gbs, decode_step, fill_cache, step_bytes, time_ms
from planlang.runtime.commands import _triton_version, profile_step
from planlang.runtime.models.checkpoint import load_model
from planlang.runtime.predict import plan_weight_bytes

ROOT = Path(__file__).resolve().parents[1]
SMOKE = dict(plans=[str(ROOT / "plans" / "h100_decode.yaml")], model="builtin:llama-tiny", device="cpu",
             variant=[("base", {}), ("pdl", {"PLANLANG_PDL": "1"})], batch=[1, 2], rounds=2, reps=3, context=16)


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, rest = text.partition(":")
    if not name.strip() or not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME:ENV=VAL[,ENV=VAL...] (NAME: for none)")
    env = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not ENV=VAL")
        env[key.strip()] = val.strip()
    return name.strip(), env


@contextlib.contextmanager
def environment(env: dict, unset: set):
    """os.environ with `env` set and the other names in `unset` removed; restored after."""
    keys = set(env) | set(unset)
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        if k in env:
            os.environ[k] = env[k]
        else:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cache_ptrs(model) -> list[int]:
    return [t.data_ptr() for b in model.layers for t in (b.attn.kv_cache.k_cache, b.attn.kv_cache.v_cache)]


def bench_plan(loaded, args, device, bw, keys) -> tuple[list[dict], dict]:
    plan, vocab, pname = loaded.plan, None, loaded.plan.name or "plan"
    variants, ref, out = [], {}, {"plan": pname, "variants": {}}
    for name, env in args.variant:
        with environment(env, keys):
            model = load_model(args.model, device=device).model.eval()
            vocab = model.config.vocab_size
            model.setup_caches(max(args.batch), args.context + 8)
            if not ref:  # the unplanned model's logits, before any plan touches anything
                for b in args.batch:
                    fill_cache(model, b, args.context, vocab, device)
                    ref[b] = decode_step(model, b, args.context, vocab, device)().float().cpu()
            planned = apply(model, plan, source=loaded.source, device=device)
        variants.append(dict(name=name, env=env, model=model, planned=planned, ptrs=cache_ptrs(model)))
        out["variants"][name] = {"env": env, "graphs": planned.report.graphs, "notes": planned.report.notes}
        print(f"{pname} / {name} {env or ''}: applied; graphs {planned.report.graphs or 'none'}"
              + "".join(f"\n    note: {n}" for n in planned.report.notes if "graphs" in n), file=sys.stderr, flush=True)
    rows, n = [], len(variants)
    for b in args.batch:
        steps = {}
        for v in variants:
            with environment(v["env"], keys):
                fill_cache(v["planned"], b, args.context, vocab, device)
                steps[v["name"]] = decode_step(v["planned"], b, args.context, vocab, device)
        times = {v["name"]: [] for v in variants}
        for r in range(args.rounds):
            for v in variants[r % n:] + variants[:r % n]:
                with environment(v["env"], keys):
                    times[v["name"]].append(time_ms(steps[v["name"]], device, reps=args.reps, warmup=3))
        floor = step_bytes(variants[0]["model"], b, args.context) / (bw * 1e9) * 1e3
        base = times[variants[0]["name"]]
        for v in variants:
            t = times[v["name"]]
            med = statistics.median(t)
            rows.append(dict(plan=pname, batch=b, variant=v["name"], env=v["env"], ms=med, min_ms=min(t),
                             ratio=med / statistics.median(base),
                             ratio_paired=statistics.median(x / y for x, y in zip(t, base)),
                             spread_pct=(max(t) - min(t)) / med * 100, x_floor=med / floor, floor_ms=floor,
                             rounds_ms=t))
    if args.profile:
        out["profile"] = {}
        for v in variants:
            with environment(v["env"], keys):
                fill_cache(v["planned"], 1, args.context, vocab, device)
                step = decode_step(v["planned"], 1, args.context, vocab, device)
                out["profile"][v["name"]] = profile_step(step, device)
    checks = out["checks"] = []
    # random weights: an FP8 / block-format plan moves the logits by ~15% (top-1 kept), bf16 by ~2%
    tol = args.tol if args.tol is not None else (0.05 if plan_weight_bytes(plan) >= 2 else 0.25)
    for b in args.batch:
        first = None
        for v in variants:
            with environment(v["env"], keys):
                fill_cache(v["planned"], b, args.context, vocab, device)
                got = decode_step(v["planned"], b, args.context, vocab, device)().float().cpu()
            first = got if first is None else first
            rel = ((got - ref[b]).norm() / ref[b].norm()).item()
            checks.append(dict(batch=b, variant=v["name"], finite=bool(torch.isfinite(got).all()),
                               max_abs_vs_first=(got - first).abs().max().item(),
                               max_abs_vs_unplanned=(got - ref[b]).abs().max().item(), rel_vs_unplanned=rel, tol=tol,
                               top1_vs_unplanned=(got.argmax(-1) == ref[b].argmax(-1)).float().mean().item(),
                               caches_kept=cache_ptrs(v["model"]) == v["ptrs"]))
    variants.clear()
    return rows, out


def print_table(result: dict) -> None:
    print(f"bench_variants: {result['model']} on {result['device']} (torch {result['torch']}, triton "
          f"{result['triton']}), {result['date']}; copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s; "
          f"context {result['context']}, {result['rounds']} rounds x median of {result['reps']} steps")
    head = (f"{'plan':<18} {'batch':>5} {'variant':<16} {'ms':>9} {'min':>9} {'ratio':>7} {'paired':>7} "
            f"{'spread':>7} {'x floor':>8}")
    print(head + "\n" + "-" * len(head))
    for r in result["rows"]:
        print(f"{r['plan']:<18} {r['batch']:>5} {r['variant']:<16} {r['ms']:>9.4f} {r['min_ms']:>9.4f} "
              f"{r['ratio']:>7.3f} {r['ratio_paired']:>7.3f} {r['spread_pct']:>6.1f}% {r['x_floor']:>8.2f}")
    for p in result["plans"]:
        for c in p["checks"]:
            print(f"check {p['plan']} batch {c['batch']} {c['variant']}: finite {c['finite']}, max|d| vs first "
                  f"{c['max_abs_vs_first']:.3e}, vs unplanned {c['max_abs_vs_unplanned']:.3e} (rel "
                  f"{c['rel_vs_unplanned']:.2e}, top-1 {c['top1_vs_unplanned']:.3f}), caches kept {c['caches_kept']}")
        for name, prof in p.get("profile", {}).items():
            print(f"\nprofile {p['plan']} / {name}, batch 1 (us per step):")
            for k in prof[:15]:
                print(f"  {k['us_per_step']:>9.1f}  x{k['calls_per_step']:<5.1f} {k['kernel'][:100]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plans", nargs="*")
    ap.add_argument("--variant", action="append", type=parse_variant,
                    help="NAME:ENV=VAL[,ENV=VAL...]; the first is the base")
    ap.add_argument("--model", default="builtin:llama-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", action="append", type=int)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tol", type=float, default=None,
                    help="largest relative logit error vs the unplanned model (default 0.05 for bf16 plans, "
                         "0.25 for plans with FP8 or block-format linears)")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of each variant at batch 1")
    ap.add_argument("--smoke", action="store_true",
                    help="the CPU configuration: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()))
    ap.add_argument("--out", default="variants.json")
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    args.batch = sorted(set(args.batch or [1, 16]))
    args.variant = args.variant or [("base", {})]
    if not args.plans:
        ap.error("name at least one plan (or --smoke)")
    if len({n for n, _ in args.variant}) != len(args.variant):
        ap.error("variant names must differ")
    device = torch.device(args.device)
    keys = {k for _, env in args.variant for k in env}
    # each variant compiles its own graphs of the same forward: room for all of them (apply asks for 64)
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, 16 * len(args.variant) * len(args.batch))
    bw = copy_bandwidth_gbs(device)  # before the models take the memory
    result = {"model": args.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "triton": _triton_version(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "copy_bandwidth_gbs": bw,
              "context": args.context, "rounds": args.rounds, "reps": args.reps,
              "shell_env": {k: os.environ[k] for k in sorted(keys) if k in os.environ},
              "variants": [{"name": n, "env": e} for n, e in args.variant], "rows": [], "plans": []}
    for path in args.plans:
        loaded = load_with_source(path)
        if loaded.plan is None:
            print(f"{path}: " + "; ".join(d.message for d in loaded.diagnostics), file=sys.stderr)
            return 1
        try:
            rows, out = bench_plan(loaded, args, device, bw, keys)
        except ApplyError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 1
        result["rows"] += rows
        result["plans"].append(out)
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out}")
    bad = [c for p in result["plans"] for c in p["checks"]
           if not (c["finite"] and c["caches_kept"] and c["rel_vs_unplanned"] <= c["tol"])]
    for c in bad:
        print(f"bench_variants: check failed: {c}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
