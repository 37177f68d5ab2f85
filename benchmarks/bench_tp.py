"""Tensor-parallel decode on the GPUs of one host, every degree in one run (issue 13):

    torchrun --standalone --nproc-per-node 4 benchmarks/bench_tp.py --model builtin:llama-8b --out results/

For each degree d in `--degrees` (default 1, 2, 4, ... up to the processes started), ranks
0..d-1 form a process group (NCCL; NVLink multicast off: NCCL_NVLS_ENABLE=0 unless set),
load the model, split it with `shard_model(..., group=...)` and apply the plan (the
default: the decode fusions and CUDA graphs per bucket; `--plan FILE` for another, whose
`parallel.tensor` is set to d) exactly as `planlang apply` does; the other ranks wait.
Then, per bucket (`--batch`, default the plan's buckets):

  a. decode: the cache filled to `--context`, one step at that position replayed from the
     bucket runner's CUDA graph (its all-reduces and all-gather inside), CUDA events around
     each call, median of `--reps`; the slowest rank's median is the step time;
  b. collectives: one step's collectives alone, in the model's order and on its real
     message sizes ([B, 1, dim] all-reduces of the embedding, every attention output and
     down projection, the [B, 1, vocab/d] all-gather of the logits), captured in one CUDA
     graph and replayed (median of `--reps`);
  c. the per-rank floor: the bytes one rank's step must read (its weight shards once, its
     KV heads up to the context) over the copy bandwidth measured on its GPU in this run
     (1 GiB device-to-device, median of 20), plus (b);
  d. prefill of `--prefill` tokens at batch 1 (the planned forward, not graphed).

Reported per degree and bucket: step ms, tokens/s, speedup over degree 1 (same bucket),
the floor and step / floor. The issue's targets are printed with the measured values:
at batch 1, tensor 2 at least 1.6x and tensor 4 at least 2.5x faster than tensor 1, and
each within 1.3x of its floor. Rank 0 prints the table and writes `tp.json` under `--out`.

This script needs several CUDA GPUs; it has not run yet (no multi-GPU machine was lent
when it was written): the CPU tests (tests/runtime/test_parallel.py) check the splitting
it relies on, not these timings.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before NCCL starts: no NVLink multicast (SHARP) on these machines

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from planlang.loader import load_with_source  # noqa: E402
from planlang.plan import Plan  # noqa: E402
from planlang.runtime.apply import Report, apply  # noqa: E402
from planlang.runtime.bench import copy_bandwidth_gbs, decode_step, fill_cache, graph_time_us, time_ms  # noqa: E402
from planlang.runtime.models.checkpoint import load_model  # noqa: E402
from planlang.runtime.parallel import init_distributed, rank_device, shard_model  # noqa: E402

DEFAULT_PLAN = {"planlang": 1, "name": "tp_decode",
                "fusions": ["rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention"],
                "graphs": {"capture": "cuda_graph", "buckets": [1, 8]}}
TARGETS = {2: 1.6, 4: 2.5}   # speedup over tensor 1 at batch 1 (issue 13)
FLOOR_TARGET = 1.3


def plan_for(base: dict, degree: int, max_batch: int, max_seq: int) -> Plan:
    doc = {**base, "parallel": {**base.get("parallel", {}), "tensor": degree},
           "limits": {"max_batch": max_batch, "max_seq_len": max_seq}}
    if degree == 1:
        doc["parallel"] = {"tensor": 1}
    plan, diags = Plan.from_document(doc)
    if plan is None:
        raise SystemExit("bench_tp: the plan is invalid: " + "; ".join(d.message for d in diags))
    return plan


def rank_step_bytes(model, batch: int, context: int) -> float:
    """Bytes one rank's decode step reads: its weight shards once (an untied embedding only
    for the rows looked up), its KV heads up to `context`."""
    embed = model.embed.weight
    tied = model.lm_head.weight is embed
    seen, total = set(), 0.0
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is embed and not tied:
            total += batch * p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    for block in model.layers:
        cache = block.attn.kv_cache.k_cache
        # keys and values, the rank's heads, `context` positions of `batch` rows
        total += 2 * batch * cache.shape[1] * context * cache.shape[3] * cache.element_size()
    return total


def collectives_ms(info, model, batch: int, device, group, reps: int) -> float:
    """One decode step's collectives (the order and message sizes the split model runs),
    captured in one CUDA graph and replayed: median ms."""
    if info is None or info.world == 1:
        return 0.0
    mods = dict(model.named_modules())
    dtype = model.embed.weight.dtype
    dim = model.config.dim
    ops = []
    for kind, path in info.collectives:
        if kind == "all_reduce":
            ops.append(("all_reduce", torch.zeros(batch, 1, dim, dtype=dtype, device=device), None))
        else:  # all_gather of the logits (or another colwise output), [B, 1, local]
            m = mods[path]
            local = m.weight.shape[0] if hasattr(m, "out_features") else m.weight.shape[1]
            src = torch.zeros(batch, 1, local, dtype=dtype, device=device)
            ops.append(("all_gather", src, torch.zeros(info.world * batch, 1, local, dtype=dtype, device=device)))

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12

    def step():
        for kind, a, b in ops:
            if kind == "all_reduce":
                dist.all_reduce(a, group=group)
            else:
                gather(b, a, group=group)

    if device.type != "cuda":  # a CPU dry run (gloo): the collectives eagerly
        return time_ms(step, device, reps=reps, warmup=2)
    # median of `reps` replays, each timed alone, after 3 passes on a side stream and 5 replays
    return graph_time_us([step], reps=reps, side_warmup=3, warmup=5, device=device) / 1e3


def slowest(value: float, device, group) -> float:
    """The largest of the ranks' values (the step is as slow as its slowest rank)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def run_degree(args, base: dict, degree: int, rank: int, device, group, bw: float) -> dict:
    buckets = sorted(set(args.batch or base.get("graphs", {}).get("buckets", [1])))
    max_seq = max(args.context, args.prefill) + 16
    plan = plan_for(base, degree, max(buckets), max_seq)
    lm = load_model(args.model, device=device)
    model = lm.model.eval()
    model.setup_caches(max(buckets), max_seq)
    report = Report(plan.name or "plan", str(device), "triton")
    t0 = time.perf_counter()
    info = shard_model(model, plan, report, None, group=group)
    planned = apply(model, plan, device=device)
    apply_s = time.perf_counter() - t0
    cfg = model.config
    rows = []
    for b in buckets:
        fill_cache(planned, b, args.context, cfg.vocab_size, device)
        ms = time_ms(decode_step(planned, b, args.context, cfg.vocab_size, device), device, reps=args.reps)
        ms = slowest(ms, device, group)
        coll = slowest(collectives_ms(info, model, b, device, group, args.reps), device, group)
        mem_floor = rank_step_bytes(model, b, args.context) / (bw * 1e9) * 1e3
        floor = mem_floor + coll
        rows.append({"degree": degree, "batch": b, "ms": ms, "tokens_s": b / ms * 1e3, "collectives_ms": coll,
                     "memory_floor_ms": mem_floor, "floor_ms": floor, "x_floor": ms / floor})
    prefill_ms = None
    if args.prefill:
        gen = torch.Generator().manual_seed(2)
        toks = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=gen).to(device)
        pos = torch.arange(args.prefill, device=device)

        def pf():
            with torch.no_grad():
                planned(toks, pos)
        prefill_ms = slowest(time_ms(pf, device, reps=max(3, args.reps // 10), warmup=2), device, group)
    graphs = planned.report.graphs
    out = {"degree": degree, "apply_s": apply_s, "rows": rows, "prefill_ms": prefill_ms, "graphs": graphs,
           "collectives": [list(c) for c in info.collectives] if info else [],
           "notes": planned.report.notes, "places": info.places if info else {}}
    del planned, model, lm
    return out


def table(r: dict) -> str:
    bws = r["copy_bandwidth_gbs"]
    lines = [f"{r['model']} on {r['world']} x {r['device']} (torch {r['torch']}, NCCL {r['nccl']}), decode at "
             f"context {r['context']}; copy bandwidth per GPU {min(bws):.0f}..{max(bws):.0f} GB/s",
             f"{'degree':>6} {'batch':>5} {'ms':>8} {'tok/s':>8} {'speedup':>8} {'coll ms':>8} {'floor ms':>9} "
             f"{'x floor':>8}"]
    base = {row["batch"]: row["ms"] for d in r["degrees"] if d.get("degree") == 1 for row in d.get("rows", [])}
    for d in r["degrees"]:
        if "error" in d:
            lines.append(f"{d['degree']:>6} error: {d['error']}")
            continue
        for row in d["rows"]:
            sp = base.get(row["batch"], float("nan")) / row["ms"]
            row["speedup"] = sp
            lines.append(f"{row['degree']:>6} {row['batch']:>5} {row['ms']:>8.3f} {row['tokens_s']:>8.0f} {sp:>8.2f} "
                         f"{row['collectives_ms']:>8.3f} {row['floor_ms']:>9.3f} {row['x_floor']:>8.2f}")
        if d.get("prefill_ms"):
            lines.append(f"{d['degree']:>6} prefill {r['prefill']} tokens: {d['prefill_ms']:.2f} ms")

    def batch1(degree):
        return next((x for d in r["degrees"] if d.get("degree") == degree for x in d.get("rows", [])
                     if x["batch"] == 1 and "speedup" in x), None)
    for degree, want in TARGETS.items():
        row = batch1(degree)
        if row is None:
            lines.append(f"target tensor {degree}: not measured")
            continue
        ok = row["speedup"] >= want and row["x_floor"] <= FLOOR_TARGET
        lines.append(f"target tensor {degree}, batch 1: {row['speedup']:.2f}x over tensor 1 (want >= {want}), "
                     f"{row['x_floor']:.2f}x its floor (want <= {FLOOR_TARGET}): {'met' if ok else 'NOT met'}")
    top = max((d["degree"] for d in r["degrees"] if batch1(d.get("degree")) is not None), default=None)
    if top is not None:
        row = batch1(top)
        lines.append(f"headline: batch 1 at tensor {top} runs {row['speedup']:.2f}x faster than tensor 1, "
                     f"{row['x_floor']:.2f}x its per-rank floor")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:llama-8b")
    ap.add_argument("--plan", help="a plan file (its parallel.tensor is set per degree); "
                                   "default: the decode fusions and graphs")
    ap.add_argument("--degrees", help="comma-separated degrees (default 1, 2, 4, ... up to the processes started)")
    ap.add_argument("--batch", type=int, action="append", help="buckets to time (default: the plan's)")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=2048, help="prefill tokens at batch 1 (0: none)")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="process-group timeout, s (ranks wait while the others of a smaller degree run)")
    ap.add_argument("--out", help="folder for tp.json")
    ap.add_argument("--device", default="cuda", help="cuda; cpu is a dry run of the script itself (gloo, tiny models)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_tp: needs CUDA GPUs (run it under torchrun on a machine with several)", file=sys.stderr)
        return 2
    device = rank_device(torch.device(args.device))
    rank, world = init_distributed(device, timeout_s=args.timeout)
    if world == 1 and "WORLD_SIZE" not in os.environ:
        print("bench_tp: start it with torchrun --standalone --nproc-per-node N", file=sys.stderr)
    degrees = ([int(x) for x in args.degrees.split(",")] if args.degrees else
               [d for d in (1, 2, 4, 8, 16) if d <= world])
    if any(d > world for d in degrees):
        print(f"bench_tp: degrees {degrees} need {max(degrees)} processes; {world} started", file=sys.stderr)
        return 2
    base = DEFAULT_PLAN
    if args.plan:
        loaded = load_with_source(args.plan)
        if loaded.plan is None:
            print("bench_tp: " + "; ".join(d.message for d in loaded.diagnostics), file=sys.stderr)
            return 2
        base = loaded.plan.to_document()
    bw = copy_bandwidth_gbs(device)
    bws = [None] * world
    dist.all_gather_object(bws, bw) if world > 1 else bws.__setitem__(0, bw)
    cuda = device.type == "cuda"
    result = {"model": args.model, "world": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else "-",
              "context": args.context, "prefill": args.prefill, "copy_bandwidth_gbs": bws,
              "nvls": os.environ.get("NCCL_NVLS_ENABLE"), "degrees": []}
    for degree in degrees:
        group = dist.new_group(list(range(degree))) if world > 1 else None
        if rank < degree:
            try:
                result["degrees"].append(run_degree(args, base, degree, rank, device, group, bw))
            except Exception as exc:  # noqa: BLE001 - record it, go on with the next degree
                traceback.print_exc()
                result["degrees"].append({"degree": degree, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            torch._dynamo.reset()
            gc.collect()
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
        if rank == 0:
            print(json.dumps(result["degrees"][-1], default=str)[:2000], flush=True)
        if world > 1:
            dist.barrier()
    if rank == 0:
        text = table(result)
        print(text)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "tp.json").write_text(json.dumps(result, indent=2, default=str))
            (out / "tp.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
