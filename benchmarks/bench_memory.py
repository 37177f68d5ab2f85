"""The memory schedule on one GPU, builtin:llama-1b, all in one run:

    python benchmarks/bench_memory.py --out results/       # writes memory.json beside the table

  0. pinned host-to-device bandwidth (1 GiB from pinned memory, median of 20) and the
     device copy bandwidth, both measured here;
  a. decode (batch 1, context 128) with all 16 layers offloaded, prefetch 1 (and 2): step
     time against the PCIe floor, offloaded bytes / pinned H2D bandwidth; eager, and
     replayed from a CUDA graph captured by the bucket runner;
  b. prefill of batch 8 x 2048 tokens with a quarter of the layers (layers[12:16])
     offloaded, against no offload;
  c. a training step at batch 4 x 2048 tokens (BF16 compute, FP32 masters, AdamW, chunked
     cross-entropy): no plan, selective recompute of every layer saving [linear], full
     recompute, and every layer offloaded (host AdamW): step time, peak memory and its
     parts (weights, gradients, optimizer state, activations of the layers).

The memory schedule is installed with the calls `apply` makes for the memory section
(`prepare_offload`, `Offload.arm`, `apply_recompute`) on the model called directly (eager),
without tracing it for fusions: the steps timed are the same, and the GPU run stays short.
The tests run the same schedule through `apply`, Dynamo, Inductor and CUDA graphs.
Each section runs in its own try/except: a failure is printed and recorded, the rest go on.
The last line is the headline.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from planlang.plan import Plan
from planlang.runtime.apply import Report
from planlang.runtime.bench import copy_bandwidth_gbs, decode_step, fill_cache, time_ms
from planlang.runtime.memory.offload import prepare_offload
from planlang.runtime.memory.recompute import apply_recompute
from planlang.runtime.models.registry import build_builtin
from planlang.runtime.passes.graphs import BucketRunner
from planlang.runtime.train import MIB, Trainer, free_device, lm_batch, measure, selected_modules

GiB = 1 << 30


def plan_of(doc: dict) -> Plan:
    plan, diags = Plan.from_document({"planlang": 1, **doc})
    assert plan is not None, diags
    return plan


def h2d_bandwidth_gbs(device: torch.device, size: int = GiB, reps: int = 20) -> float:
    """Pinned host-to-device copy of `size` bytes: bytes / median time, GB/s."""
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del src, dst
    return size / statistics.median(times) / 1e9


def schedule(model, doc: dict, device):
    """The memory section of the plan `doc`, installed as `apply` installs it."""
    plan = plan_of(doc)
    report = Report(plan.name or "plan", str(device), "eager")
    offload = prepare_offload(model, plan, device, report, None) if plan.memory.offload else None
    if plan.memory.recompute:
        apply_recompute(model, plan, report, None)
    if offload is not None:
        offload.arm()
    return plan, offload, report


def section_decode(r: dict, device, model_name: str, h2d: float) -> None:
    model = build_builtin(model_name, device=device)
    cfg = model.config
    context, reps = 128, 30
    model.setup_caches(1, 256)
    fill_cache(model, 1, context, cfg.vocab_size, device)
    base = time_ms(decode_step(model, 1, context, cfg.vocab_size, device), device, reps=reps)
    rows = {"no offload (eager)": {"ms": base}}
    for prefetch in (1, 2):
        plan, off, report = schedule(model, {"memory": {"offload": [{"at": "layers.*", "prefetch": prefetch}]}}, device)
        st = off.stats()
        floor = st["layer_bytes"] / (h2d * 1e9) * 1e3
        ms = time_ms(decode_step(model, 1, context, cfg.vocab_size, device), device, reps=reps)
        rows[f"offload all, prefetch {prefetch} (eager)"] = {"ms": ms, "floor_ms": floor, "x_floor": ms / floor,
                                                            "ring_mib": st["ring_bytes"] / MIB,
                                                            "offloaded_mib": st["layer_bytes"] / MIB}
        if prefetch == 1:
            runner = BucketRunner(model, [1], device, cfg.vocab_size)
            cap = runner.capture(start_pos=context)
            assert runner.graphs, cap.failed
            ms = time_ms(decode_step(runner, 1, context, cfg.vocab_size, device), device, reps=reps)
            rows["offload all, prefetch 1 (CUDA graph)"] = {"ms": ms, "floor_ms": floor, "x_floor": ms / floor,
                                                            "ring_mib": st["ring_bytes"] / MIB,
                                                            "offloaded_mib": st["layer_bytes"] / MIB}
            del runner
        off.close()
    r["decode"] = {"batch": 1, "context": context, "rows": rows,
                   "what": "one decode step, CUDA events around each call, median of 30"}
    del model
    free_device(device)


def section_prefill(r: dict, device, model_name: str) -> None:
    model = build_builtin(model_name, device=device)
    cfg = model.config
    batch, seq = 8, 2048
    model.setup_caches(batch, seq)
    toks = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(2)).to(device)
    pos = torch.arange(seq, device=device)

    def run():
        with torch.no_grad():
            model(toks, pos)
    base = time_ms(run, device, reps=7, warmup=2)
    plan, off, report = schedule(model, {"memory": {"offload": [{"at": "layers[12:16]", "prefetch": 1}]}}, device)
    st = off.stats()
    ms = time_ms(run, device, reps=7, warmup=2)
    off.close()
    again = time_ms(run, device, reps=7, warmup=2)  # the baseline once more, to see the drift
    r["prefill"] = {"batch": batch, "tokens": seq, "offloaded": "layers[12:16]", "no_offload_ms": base,
                    "no_offload_again_ms": again, "offload_ms": ms, "ratio": ms / min(base, again),
                    "ring_mib": st["ring_bytes"] / MIB, "offloaded_mib": st["layer_bytes"] / MIB}
    del model
    free_device(device)


TRAIN = {
    "no plan": None,
    "selective [linear]": {"mode": "training", "memory": {"recompute": [
        {"at": "layers.*", "policy": "selective", "save": ["linear"]}]}},
    # the same policy through PyTorch's SAC dispatch mode (kv_cache keeps nothing: it only
    # takes the rule off planlang's linear-only path), to show what that path saves
    "selective [linear] (SAC)": {"mode": "training", "memory": {"recompute": [
        {"at": "layers.*", "policy": "selective", "save": ["linear", "kv_cache"]}]}},
    "full": {"mode": "training", "memory": {"recompute": [{"at": "layers.*", "policy": "full"}]}},
    "offload all": {"mode": "training", "memory": {"offload": [{"at": "layers.*", "prefetch": 1}]}},
}


def section_train(r: dict, device, model_name: str, batch: int, seq: int, steps: int, only=None) -> None:
    out = r.setdefault("train", {"batch": batch, "seq": seq, "steps": steps, "runs": {}})
    for name, doc in TRAIN.items():
        if only and name not in only:
            continue
        try:
            model = build_builtin(model_name, device=device)
            data = lm_batch(model.config.vocab_size, batch, seq, device)
            off = None
            paths = selected_modules(model, None)
            if doc is not None:
                plan, off, report = schedule(model, doc, device)
            trainer = Trainer(model, model, offload=off)
            out["runs"][name] = measure(trainer, data, steps, device, paths)
            trainer.close()
            if off is not None:
                off.close()
            del trainer, model, off
        except Exception as exc:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            out["runs"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        free_device(device)
        print(f"train {name}: {json.dumps(out['runs'][name], default=str)[:400]}", flush=True)
    base = out["runs"].get("no plan", {})
    ratios = {}
    for name, run in out["runs"].items():
        if name == "no plan" or "error" in run or "error" in base or not base:
            continue
        mb, mr = base["memory_mib"], run["memory_mib"]
        state = ("weights", "gradients", "optimizer")
        ratios[name] = {
            "step_time": run["step_ms"] / base["step_ms"],
            "activations": (mr["activations"] / mb["activations"]) if mb.get("activations") else None,
            "weights+gradients+optimizer": sum(mr[k] for k in state) / sum(mb[k] for k in state),
            "peak": mr["peak"] / mb["peak"] if mb.get("peak") else None,
        }
    out["ratios"] = ratios


def table(r: dict) -> str:
    lines = [f"device {r['device']}, torch {r['torch']}, triton {r['triton']}; pinned H2D {r['h2d_gbs']:.1f} GB/s, "
             f"device copy {r['d2d_gbs']:.0f} GB/s"]
    if "decode" in r and "rows" in r["decode"]:
        lines.append(f"(a) decode, batch 1, context {r['decode']['context']} (ms per step; floor = offloaded bytes / H2D)")
        for name, row in r["decode"]["rows"].items():
            extra = (f"  floor {row['floor_ms']:.2f} ms  x{row['x_floor']:.3f}  ring {row['ring_mib']:.0f} MiB of "
                     f"{row['offloaded_mib']:.0f} MiB" if "floor_ms" in row else "")
            lines.append(f"    {name:40s} {row['ms']:8.2f}{extra}")
    if "prefill" in r and "offload_ms" in r["prefill"]:
        p = r["prefill"]
        lines.append(f"(b) prefill {p['batch']} x {p['tokens']}: no offload {p['no_offload_ms']:.1f} ms "
                     f"(again {p['no_offload_again_ms']:.1f}), {p['offloaded']} offloaded {p['offload_ms']:.1f} ms: "
                     f"x{p['ratio']:.3f}")
    if "train" in r:
        t = r["train"]
        lines.append(f"(c) training step, batch {t['batch']} x {t['seq']} (MiB; step ms median of {t['steps']})")
        lines.append(f"    {'':26s} {'step ms':>9s} {'peak':>8s} {'weights':>8s} {'grads':>8s} {'optim':>8s} "
                     f"{'activ.':>8s} {'rest':>8s}")
        for name, run in t["runs"].items():
            if "error" in run:
                lines.append(f"    {name:26s} {run['error']}")
                continue
            m = run["memory_mib"]
            cell = lambda k: f"{m[k]:8.0f}" if m.get(k) is not None else "     n/a"  # noqa: E731
            lines.append(f"    {name:26s} {run['step_ms']:9.1f} " + " ".join(cell(k) for k in
                         ("peak", "weights", "gradients", "optimizer", "activations", "rest")))
        for name, ra in t.get("ratios", {}).items():
            act = f"activations x{ra['activations']:.3f}" if ra["activations"] is not None else ""
            lines.append(f"    {name:26s} step time x{ra['step_time']:.3f}  {act}  "
                         f"weights+grads+optimizer x{ra['weights+gradients+optimizer']:.3f}")
    head = []
    if "decode" in r and "rows" in r["decode"]:
        row = r["decode"]["rows"].get("offload all, prefetch 1 (eager)")
        if row:
            head.append(f"decode all-offloaded x{row['x_floor']:.3f} floor")
    if "prefill" in r and "ratio" in r["prefill"]:
        head.append(f"prefill quarter-offloaded x{r['prefill']['ratio']:.3f}")
    ra = r.get("train", {}).get("ratios", {})
    for name, key in (("selective [linear]", "activations"), ("full", "activations"),
                      ("offload all", "weights+gradients+optimizer")):
        if name in ra and ra[name].get(key) is not None:
            head.append(f"{name}: {key} x{ra[name][key]:.2f} at step time x{ra[name]['step_time']:.2f}")
    lines.append("headline: " + "; ".join(head))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for memory.json")
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--sections", default="decode,prefill,train")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=2048)
    ap.add_argument("--train-steps", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_memory: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    r = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton_version,
         "model": f"builtin:{args.model}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    r["h2d_gbs"] = h2d_bandwidth_gbs(device)
    r["d2d_gbs"] = copy_bandwidth_gbs(device)
    print(f"pinned H2D {r['h2d_gbs']:.1f} GB/s, device copy {r['d2d_gbs']:.0f} GB/s", flush=True)
    sections = args.sections.split(",")
    for name in sections:
        t0 = time.perf_counter()
        try:
            if name == "decode":
                section_decode(r, device, args.model, r["h2d_gbs"])
            elif name == "prefill":
                section_prefill(r, device, args.model)
            elif name == "train":
                section_train(r, device, args.model, args.train_batch, args.train_seq, args.train_steps)
        except Exception as exc:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            r[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            free_device(device)
        print(f"section {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        (out / "memory.json").write_text(json.dumps(r, indent=2, default=str))
    text = table(r)
    (out / "memory.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    gc.collect()
    sys.exit(main())
