"""The commands of `planlang` that run a model: apply, export (bench and tune come with
their issues). The language CLI (`planlang.cli`) imports this module lazily."""
from __future__ import annotations

import contextvars
import functools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from planlang.diagnostics import Diagnostic, at, has_errors, render_text, sort_key
from planlang.loader import load_with_source

from .apply import ApplyError, apply
from .models.checkpoint import ModelLoadError, export_checkpoint, export_safetensors, load_model

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2


def _device(name: Optional[str]) -> torch.device:
    """The device `--device` names (default: CUDA when present); one that is not a device,
    or not here, exits with status 2 and says what to pass instead."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SystemExit(_usage(f"--device {name}: not a device planlang runs models on",
                                hint="pass cpu, cuda or cuda:N"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(_usage(f"--device {name}: no CUDA device here", hint="pass cpu, or run on a machine with a GPU"))
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(_usage(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                                hint=f"pass cuda:0 .. cuda:{torch.cuda.device_count() - 1}"))
    return dev


# With --json, what a command refused or failed on, for the JSON object `json_on_failure`
# prints (stderr still gets the text).
_FAILURES: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("planlang_failures", default=None)


def _note_failure(message: Optional[str] = None, hint: Optional[str] = None, diagnostics=()) -> None:
    got = _FAILURES.get()
    if got is None:
        return
    if message:
        got.append({"severity": "error", "message": message, "hint": hint})
    got.extend(d.to_json() for d in diagnostics)


def print_diagnostics(diags) -> None:
    """Diagnostics to stderr as text (and into --json's failure object)."""
    diags = sorted(diags, key=sort_key)
    print(render_text(diags), file=sys.stderr)
    _note_failure(diagnostics=diags)


def json_on_failure(cmd):
    """A command with --json prints one JSON object also when it fails before its result:
    {"ok": false, "exit": N, "diagnostics": [...]} on stdout, as lint's JSON has them."""
    @functools.wraps(cmd)
    def run(args) -> int:
        if getattr(args, "format", None) != "json":
            return cmd(args)
        failures: list = []
        token = _FAILURES.set(failures)
        out = sys.stdout = _Watched(sys.stdout)
        code = EXIT_USAGE
        try:
            code = cmd(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
            raise
        finally:
            _FAILURES.reset(token)
            sys.stdout = out.inner
            if code and failures and not out.wrote:  # a command that printed its result said it all
                print(json.dumps({"ok": False, "exit": code, "diagnostics": failures}, indent=2))
        return code
    return run


class _Watched:
    """A stream that remembers whether anything was written to it."""

    def __init__(self, inner):
        self.inner, self.wrote = inner, False

    def write(self, text):
        self.wrote = self.wrote or bool(text)
        return self.inner.write(text)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _usage(msg: str, hint: Optional[str] = None) -> int:
    print(f"planlang: error: {msg}", file=sys.stderr)
    if hint:
        print(f"   = hint: {hint}", file=sys.stderr)
    _note_failure(msg, hint)
    return EXIT_USAGE


def device_target(device: torch.device) -> str:
    """The catalog id of the device present (what `target: auto` means at apply time)."""
    if device.type != "cuda":
        return "cpu"
    from planlang.hardware import load_catalog, match_gpu
    props = torch.cuda.get_device_properties(device)
    target, _ = match_gpu(props.name, f"{props.major}.{props.minor}", props.total_memory / 1e9, catalog=load_catalog())
    return target.id if target is not None else "h100"


def _model_error(exc: ModelLoadError) -> int:
    msg = f"{exc.path + ': ' if exc.path else ''}{exc.message}"
    print(f"planlang: error: {msg}", file=sys.stderr)
    if exc.hint:
        print(f"   = hint: {exc.hint}", file=sys.stderr)
    _note_failure(msg, exc.hint)
    return EXIT_USAGE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of fn() in ms (device-synchronized)."""
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _run_steps(model, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Logits of a prefill and `steps` greedy decode steps (positions as device tensors)."""
    out = []
    with torch.no_grad():
        logits = model(prompt, torch.arange(prompt.shape[1], device=prompt.device))
        out.append(logits[:, -1].float())
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps):
            pos = torch.tensor([prompt.shape[1] + i], device=prompt.device)
            logits = model(tok, pos)
            out.append(logits[:, -1].float())
            tok = logits[:, -1].argmax(-1, keepdim=True)
    return out


def _hf_causal_lm(model) -> bool:
    """A Hugging Face causal LM (transformers' PreTrainedModel with a generation head)."""
    return hasattr(model, "get_output_embeddings") and hasattr(getattr(model, "config", None), "vocab_size") \
        and hasattr(model, "generate")


def _hf_steps(model, cache_len: int, device: torch.device):
    """`_run_steps` for a Hugging Face causal LM: prefill and greedy decode steps over a fresh
    `transformers.StaticCache` of `cache_len` positions per call (the model's cache argument
    is `past_key_values`, or `cache` in transformers releases that renamed it)."""
    import inspect

    import transformers
    params = inspect.signature(model.forward).parameters
    key = "past_key_values" if "past_key_values" in params else "cache"
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    def steps_of(m, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
        cache = transformers.StaticCache(config=cfg, max_cache_len=cache_len)
        if hasattr(cache, "early_initialization"):  # allocate now, not inside a traced call
            cache.early_initialization(prompt.shape[0], cfg.num_key_value_heads, head_dim, dtype, device)
        out = []
        with torch.no_grad():
            logits = m(input_ids=prompt, use_cache=True, **{key: cache}).logits
            out.append(logits[:, -1].float())
            tok = logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(steps):
                logits = m(input_ids=tok, use_cache=True, **{key: cache}).logits
                out.append(logits[:, -1].float())
                tok = logits[:, -1].argmax(-1, keepdim=True)
        return out
    return steps_of


def refuse_on_device(loaded, device: torch.device, command: str) -> Optional[int]:
    """At run time the device present is the target: print what it cannot run and return
    the exit status, or None when the plan can run here."""
    from planlang.hardware import load_catalog
    from planlang.validate import resolve_target, validate
    here = device_target(device)
    diags = validate(loaded.plan, loaded.source, target=here)
    if loaded.plan.target not in ("auto", here):
        diags = [d for d in diags if d.code != "PL203"]
        # the plan's own target must still be one the catalog knows (lint says the same)
        diags += [d for d in resolve_target(loaded.plan, loaded.source, load_catalog()).diagnostics
                  if d.code == "PL203"]
    if not has_errors(diags):
        return None
    print_diagnostics(diags)
    print(f"planlang {command}: the plan cannot run on this device ({here})", file=sys.stderr)
    if here == "cpu" and any(d.code == "PL202" and d.severity == "error" for d in diags):
        print(f"   = hint: `planlang bench` runs it here with graph capture skipped; to apply it on the CPU, "
              f"write a plan with `extends: {Path(loaded.file).name}` and `graphs: {{capture: none}}`",
              file=sys.stderr)
    return EXIT_ERRORS


def _distributed(args, plans=()) -> Optional[int]:
    """`--nproc N`: start N ranks with torchrun and return the job's status; None when
    this process runs the command itself (alone, or as one rank of a job). A plan whose
    `parallel.tensor` is not N is refused first (PL307), before any process starts."""
    from .parallel.launch import maybe_launch
    nproc = getattr(args, "nproc", None)
    if nproc and nproc > 1:
        bad = []
        for loaded in plans:
            tensor = loaded.plan.parallel.tensor
            if tensor != nproc:
                written = loaded.source is not None and ("parallel", "tensor") in loaded.source.values
                msg = (f"--nproc {nproc} starts {nproc} processes, but the plan's parallel.tensor is {tensor}"
                       + ("" if written else " (the default: the plan has no parallel section)"))
                hint = f"write `parallel: {{tensor: {nproc}}}` in the plan, or drop --nproc"
                bad.append(at(loaded.source, ("parallel", "tensor"), "PL307", msg, hint=hint) if written
                           else Diagnostic("PL307", msg, file=loaded.file, hint=hint))
        if bad:
            print_diagnostics(bad)
            return EXIT_ERRORS
    return maybe_launch(getattr(args, "argv", None), nproc)


def _rank_device(args) -> torch.device:
    from .parallel.launch import init_distributed, rank_device
    device = rank_device(_device(args.device))
    init_distributed(device)
    return device


def cmd_apply(args) -> int:
    loaded = load_with_source(args.plan)
    if loaded.plan is None:
        print_diagnostics(loaded.diagnostics)
        return EXIT_USAGE if any(d.code == "PL100" for d in loaded.diagnostics) else EXIT_ERRORS
    code = _distributed(args, [loaded])
    if code is not None:
        return code
    plan = loaded.plan
    device = _rank_device(args)
    target = plan.target if plan.target != "auto" else device_target(device)
    # At apply time the device present is the target: refuse what it cannot run.
    refused = refuse_on_device(loaded, device, "apply")
    if refused is not None:
        return refused
    try:
        lm = load_model(args.model, trust_pickle=args.trust_pickle, device=device)
    except ModelLoadError as exc:
        return _model_error(exc)
    model = lm.model.eval()
    builtin = hasattr(model, "setup_caches")
    if not builtin and not _hf_causal_lm(model):
        return _usage(f"{lm.source}: `planlang apply` drives causal language models (built-in, planlang "
                      "checkpoints, Hugging Face causal LMs); use the Python API with example_inputs for others")
    vocab = model.config.vocab_size
    batch, prompt_len, steps = args.batch, min(args.context, 64), 4
    gen = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    reps = 5 if device.type == "cpu" else 20
    if builtin:
        def size_caches(chunk: int = 0):  # the decode steps, the evaluation text's chunks, the plan's limits
            model.setup_caches(max(batch, plan.limits.max_batch or 1),
                               max(prompt_len + steps + 1, chunk, plan.limits.max_seq_len or 0))
        run_steps, example = _run_steps, None
    else:  # a Hugging Face model decodes over a transformers.StaticCache (what attention fuses on)
        def size_caches(chunk: int = 0):
            pass
        run_steps = _hf_steps(model, prompt_len + steps + 1, device)
        example = lambda m: run_steps(m, prompt, 1)  # noqa: E731 (what apply traces: prefill and a decode step)
    size_caches()

    ref = run_steps(model, prompt, steps)
    t_ref = _time_ms(lambda: run_steps(model, prompt, steps), device, reps)
    reference = ReferenceLogits(model, device, getattr(args, "eval_tokens", 1024))
    size_caches(getattr(reference, "chunk", 0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        planned = apply(model, plan, example, source=loaded.source, device=device)
    except ApplyError as exc:
        print_diagnostics(exc.diagnostics)
        return EXIT_ERRORS
    apply_s = time.perf_counter() - t0
    got = run_steps(planned, prompt, steps)
    t_plan = _time_ms(lambda: run_steps(planned, prompt, steps), device, reps)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    ref_all, got_all = torch.cat(ref), torch.cat(got)
    rel = ((got_all - ref_all).norm() / ref_all.norm()).item()
    max_abs = (got_all - ref_all).abs().max().item()
    agree = (got_all.argmax(-1) == ref_all.argmax(-1)).float().mean().item()
    acc = reference.against(planned)
    # the gates read the evaluation text when there is one, else the decode steps
    gate_rel, gate_agree = (acc["rel_error"], acc["top1_agreement"]) if acc else (rel, agree)
    result = {
        "plan": plan.name, "model": lm.source, "device": str(device), "target": target,
        "report": planned.report.to_json(),
        "numerics": {"rel_error": rel, "max_abs_error": max_abs, "top1_agreement": agree,
                     "steps": f"prefill {prompt_len} tokens + {steps} decode steps, batch {batch}"},
        "time_ms": {"unplanned": t_ref, "planned": t_plan, "speedup": t_ref / t_plan if t_plan else None,
                    "what": f"prefill {prompt_len} + {steps} decode steps, eager Python loop, median of {reps}"},
        "apply_s": apply_s, "peak_memory_mib": peak, "accuracy": acc,
    }
    failed = []
    if args.max_error is not None and gate_rel > args.max_error:
        failed.append(f"relative error {gate_rel:.3g} exceeds --max-error {args.max_error}")
    if args.min_agreement is not None and gate_agree < args.min_agreement:
        failed.append(f"top-1 agreement {gate_agree:.3f} is below --min-agreement {args.min_agreement}")
    result["ok"] = not failed
    result["failures"] = failed
    if args.format == "json":
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_apply(result)
    for f in failed:
        print(f"planlang apply: {f}", file=sys.stderr)
    return EXIT_ERRORS if failed else EXIT_OK


class ReferenceLogits:
    """The unplanned model's logits on the evaluation text, computed once BEFORE any plan
    is applied (a plan may change state the unplanned module shares, e.g. an FP8 KV cache),
    and replayed for every comparison."""

    def __init__(self, model, device: torch.device, max_tokens: int):
        from .accuracy import compare, eval_tokens, logits_fn_for
        self.tokens = None
        if not max_tokens or model.config.vocab_size < 256:
            return
        self.tokens = eval_tokens(device, max_tokens=max_tokens)
        self.chunk = min(256, self.tokens.shape[1])
        if hasattr(model, "setup_caches") and not model.caches_fit(1, self.chunk):
            model.setup_caches(max(1, getattr(model, "max_batch", 1)), max(self.chunk, getattr(model, "max_seq_len", 0)))
        fn, self._store = logits_fn_for(model), {}

        def memo(ids):
            key = (tuple(ids.shape), tuple(ids.flatten().tolist()))
            if key not in self._store:
                self._store[key] = fn(ids).detach()
            return self._store[key]
        self.fn = memo
        with torch.no_grad():
            compare(memo, memo, self.tokens, chunk=self.chunk)  # fills the store: one pass

    def against(self, planned) -> Optional[dict]:
        """Logit error, KL, top-1 agreement and perplexities of `planned` (runtime/accuracy.py);
        with an FP8 KV cache, also the fraction of cached values that saturated on the text."""
        if self.tokens is None:
            return None
        from .accuracy import compare, logits_fn_for
        with torch.no_grad():
            out = compare(self.fn, logits_fn_for(planned), self.tokens, chunk=self.chunk).to_json()
            if getattr(planned, "kv_cache", None):
                from .precision.kv_cache import kv_saturation
                chunks = self.tokens.split(self.chunk, dim=1)
                out["kv_saturation"] = kv_saturation(
                    planned, lambda m: [m(c, torch.arange(c.shape[1], device=c.device)) for c in chunks])
        return out


def restore_caches(model) -> None:
    """Undo what a plan did to state the unplanned model shares (FP8 KV caches), so the
    next contender of a bench starts from the model as loaded."""
    from .precision.kv_cache import kv_caches
    for _, cache in kv_caches(model):
        cache.to_compute_dtype()


def _print_apply(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console(width=120)
    rep = r["report"]
    con.print(f"[bold]planlang apply[/bold] {r['plan']} -> {r['model']} on {r['device']} "
              f"(target {r['target']}; kernels: {rep['backend']})")
    table = Table(show_lines=False)
    for col in ("rule", "at", "places", "kernel"):
        table.add_column(col, overflow="fold")
    for rule in rep["rules"]:
        places = rule["places"]
        shown = ", ".join(places[:4]) + (f" … (+{len(places) - 4})" if len(places) > 4 else "")
        err = rule.get("error")
        err_text = (f"\nGEMM output error {err['rel_error']:.2e} over {err['gemms']} (worst {err['worst'][0]}: "
                    f"{err['worst'][1]:.2e})") if err else ""
        table.add_row(f"{rule['section']}[{rule['index']}] {rule['what']}", rule["at"],
                      f"{len(places)}: {shown}" + (f"\n[yellow]{rule['note']}[/yellow]" if rule["note"] else "")
                      + err_text, rule["kernel"])
    con.print(table)
    for note in rep["notes"]:
        con.print(f"  note: {note}")
    n, t = r["numerics"], r["time_ms"]
    con.print(f"numerics ({n['steps']}): relative error {n['rel_error']:.3e}, max abs {n['max_abs_error']:.3e}, "
              f"top-1 agreement {n['top1_agreement']:.3f}")
    if r.get("accuracy"):
        a = r["accuracy"]
        con.print(f"accuracy on the evaluation text ({a['tokens']} tokens, chunks of {a['chunk']}): "
                  f"logit error {a['rel_error']:.3e}, KL {a['kl']:.3e}, top-1 agreement {a['top1_agreement']:.4f}, "
                  f"perplexity {a['ppl_reference']:.4f} -> {a['ppl_candidate']:.4f} "
                  f"({(a['ppl_candidate'] / a['ppl_reference'] - 1) * 100:+.2f}%)"
                  + (f"; FP8 KV cache: {a['kv_saturation'] * 100:.3f}% of values saturated" if "kv_saturation" in a else ""))
    con.print(f"time ({t['what']}): unplanned {t['unplanned']:.2f} ms, planned {t['planned']:.2f} ms "
              f"({speed_words(t['unplanned'], t['planned'])}); apply took {r['apply_s']:.1f} s"
              + (f"; peak memory {r['peak_memory_mib']:.0f} MiB" if r["peak_memory_mib"] else ""))
    if "cpu" in r["device"] and t["planned"] > t["unplanned"]:
        con.print("  (on the CPU the fused kernels run their PyTorch references, which are for correctness: "
                  "time a plan on a GPU)")


def cmd_export(args) -> int:
    out = Path(args.output)
    if out.is_dir():
        return _usage(f"cannot write {args.output}: it is a folder", hint=f"name the file, e.g. {out / 'model.pt'}")
    if not out.parent.is_dir():
        return _usage(f"cannot write {args.output}: the folder {out.parent} does not exist",
                      hint="create it first, or write to an existing folder")
    writers = {".pt": export_checkpoint, ".pth": export_checkpoint, ".safetensors": export_safetensors}
    if out.suffix not in writers:
        return _usage(f"cannot write {args.output}: export writes .pt (torch.save) or .safetensors files, not "
                      f"'{out.suffix or '(no suffix)'}'", hint=f"e.g. {out.with_suffix('.pt').name} or "
                      f"{out.with_suffix('.safetensors').name}")
    if out.suffix == ".safetensors":
        try:
            import safetensors  # noqa: F401
        except ImportError:
            return _usage("writing .safetensors needs the safetensors package, which is not installed",
                          hint='pip install "planlang[runtime]", or write a .pt file')
    try:
        lm = load_model(args.model)
    except ModelLoadError as exc:
        return _model_error(exc)
    try:
        path = writers[out.suffix](lm.model, args.output, name=lm.name)
    except TypeError as exc:
        return _usage(f"cannot export {lm.source}: {exc}", hint="export writes built-in models and planlang checkpoints")
    except (OSError, RuntimeError) as exc:  # torch.save reports an unwritable place as a RuntimeError
        return _usage(f"cannot write {args.output}: {exc}", hint="check the folder exists and is writable")
    print(f"wrote {path} ({lm.source})")
    return EXIT_OK


def _split_plans_model(items: list[str]) -> tuple[list[str], Optional[str]]:
    """`bench PLAN... [MODEL]`: the last item is the model when it is not a plan file."""
    from planlang.loader import PLAN_SUFFIXES
    if items and not items[-1].endswith(PLAN_SUFFIXES):
        return items[:-1], items[-1]
    return items, None


def cmd_bench(args) -> int:
    from .bench import Row, copy_bandwidth_gbs, decode_step, fill_cache, step_bytes, time_ms
    from .modelcheck import linear_weight_bytes
    from .predict import Figures, plan_decode_ms, plan_weight_bytes
    from planlang.hardware import load_catalog

    # What can be refused without measuring anything is refused first (before ranks start).
    against = [a.strip() for a in args.against.split(",") if a.strip()]
    unknown = [a for a in against if a not in BASELINES]
    if unknown:
        return _usage(f"--against takes {', '.join(BASELINES)}, not {', '.join(unknown)}")
    if any(a.startswith("torchao") for a in against):
        try:
            import torchao  # noqa: F401
        except ImportError:
            return _usage("--against torchao-*: torchao is not installed", hint="pip install torchao")
    if args.plot:
        try:
            _pyplot()
        except ImportError:
            return _usage(f"--plot {args.plot}: drawing the plot needs matplotlib, which is not installed",
                          hint='pip install "planlang[plot]"')
        if not Path(args.plot).parent.is_dir():
            return _usage(f"--plot {args.plot}: the folder {Path(args.plot).parent} does not exist",
                          hint="create it first, or write the plot to an existing folder")
    plan_files, model_spec = _split_plans_model(args.plans)
    if not plan_files and not against:
        return _usage("nothing to bench: no plan file, and --against names no baseline",
                      hint="give one or more plans (PLAN... [MODEL]), or baselines with --against eager,compile")
    plans = []
    for f in plan_files:
        loaded = load_with_source(f)
        if loaded.plan is None:
            print_diagnostics(loaded.diagnostics)
            return EXIT_USAGE if any(d.code == "PL100" for d in loaded.diagnostics) else EXIT_ERRORS
        plans.append(loaded)
    code = _distributed(args, plans)
    if code is not None:
        return code
    device = _rank_device(args)
    try:
        lm = load_model(model_spec, trust_pickle=args.trust_pickle, device=device)
    except ModelLoadError as exc:
        return _model_error(exc)
    model = lm.model.eval()
    if not hasattr(model, "setup_caches"):
        return _usage(f"{lm.source}: bench drives built-in models and planlang checkpoints")
    cfg = model.config
    buckets = sorted({b for p in plans for b in (p.plan.graphs.buckets if p.plan.graphs.capture == "cuda_graph" else [1])}
                     | set(args.batch or []))
    if args.batch:
        buckets = sorted(set(args.batch))
    buckets = buckets or [1]  # baselines alone, without plans to give buckets
    context = args.context
    prefill = args.prefill
    max_seq = max(context + 8, prefill + 8)
    model.setup_caches(max(buckets), max_seq)
    bw = copy_bandwidth_gbs(device)
    catalog = load_catalog()
    target = catalog.get(device_target(device))
    launch_us = measure_kernel_cost_us(device, bw) if device.type == "cuda" else (target.launch_us if target else 5.0)
    gemv_models = {}  # weight bytes per element -> (per-kernel cost us, streaming GB/s), measured once each
    rows: list[Row] = []
    notes = []
    profiles: dict[str, list] = {}
    accuracy: dict[str, dict] = {}
    reference = ReferenceLogits(model, device, getattr(args, "eval_tokens", 512))
    model.setup_caches(max(buckets), max_seq)
    reps = 50 if device.type == "cuda" else 3
    catalog_bw = target.memory_bandwidth_gbs if target else None
    prefill_rows: list[Row] = []  # after the decode rows, in the same contender order
    if prefill:
        toks = torch.randint(0, cfg.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(2)).to(device)
        pos = torch.arange(prefill, device=device)

    def decode_rows(name, fn, fill_fn, predicted=None):
        for b in buckets:
            _reset_peak(device)
            fill_cache(fill_fn, b, context, cfg.vocab_size, device)
            ms = time_ms(decode_step(fn, b, context, cfg.vocab_size, device), device, reps=reps)
            nbytes = step_bytes(model, b, context)
            floor = nbytes / (bw * 1e9) * 1e3
            pred = predicted(b) if predicted else None
            rows.append(Row(name, b, ms, b / ms * 1e3, ms / floor, pred,
                            {"floor_ms": floor, "catalog_floor_ms": nbytes / (catalog_bw * 1e9) * 1e3 if catalog_bw else None},
                            _peak_mib(device)))
            # a line per row as it lands, so a run cut short by a time limit still says something
            guess = f", predicted {pred:.3f} ms ({(pred - ms) / ms:+.0%})" if pred else ""
            print(f"bench: {name} batch {b}: {ms:.3f} ms ({ms / floor:.2f}x floor, floor {floor:.3f} ms{guess})",
                  file=sys.stderr, flush=True)

    def prefill_row(name, fn):
        """Time one prefill of `--prefill` tokens at batch 1 through `fn`."""
        def run():
            with torch.no_grad():
                fn(toks, pos)
        _reset_peak(device)
        ms = time_ms(run, device, reps=max(3, reps // 5), warmup=2)
        prefill_rows.append(Row(name, 1, ms, prefill / ms * 1e3, None, None, {"prefill_tokens": prefill},
                                _peak_mib(device)))
        print(f"bench: {name} prefill {prefill}: {ms:.3f} ms ({prefill / ms * 1e3:.0f} tokens/s)",
              file=sys.stderr, flush=True)

    def torchao_rows():
        for name in (a for a in against if a.startswith("torchao")):
            torch._dynamo.reset()
            peer = torchao_fp8(model, weight_only=name.endswith("-wo"))
            compiled = compile_reduce_overhead(peer)
            decode_rows(f"{name}+compile(reduce-overhead)", compiled, peer)
            del peer, compiled
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if "eager" in against:
        decode_rows("eager", model, model)
        if prefill:
            prefill_row("eager", model)
    if "compile" in against:
        torch._dynamo.reset()
        compiled = compile_reduce_overhead(model)
        decode_rows("compile(reduce-overhead)", compiled, model)
        if prefill:
            # compiled afresh for the one prefill shape, so the decode buckets' recompiles
            # do not count against dynamo's cache limit (which would fall back to eager)
            torch._dynamo.reset()
            compiled = compile_reduce_overhead(model)
            prefill_row("compile(reduce-overhead)", compiled)
        del compiled
        torch._dynamo.reset()
    # The plans before torchao, whose compile is the slowest part of a run: a run cut short
    # by a time limit has the plans' rows beside eager and compile.
    pdl_lines: dict = {}  # per plan: whether its kernels launch with PDL (graphs.pdl, PLANLANG_PDL)
    for loaded in plans:
        plan = loaded.plan
        restore_caches(model)
        torch._dynamo.reset()
        # the caches apply sizes for the plan, but never smaller than the buckets timed here
        cache_batch = max([*buckets, plan.limits.max_batch or max(plan.graphs.buckets)])
        # no longer than needed (the CPU references read it all): the bench's steps, the
        # accuracy check's chunks, the plan's limit
        chunk = reference.chunk if reference.tokens is not None else 0
        cache_len = max(max_seq, chunk, plan.limits.max_seq_len or 0)
        try:
            planned = apply(model, plan, source=loaded.source, device=device, max_batch=cache_batch,
                            max_seq_len=cache_len)
        except ApplyError as exc:
            print_diagnostics(exc.diagnostics)
            return EXIT_ERRORS
        if plan.graphs.capture == "cuda_graph" and device.type != "cuda":
            notes.append(f"{plan.name}: CUDA graphs skipped on {device.type}")
        pdl_lines[plan.name] = _pdl_line(device, plan.graphs.pdl)
        wb = plan_weight_bytes(plan)
        tf = (target.tflops.get("bf16") if target else None) or 100.0
        if device.type == "cuda" and wb not in gemv_models:
            gemv_models[wb] = measure_gemv_model(device, bw, fp8=wb == 1.0)
        cost, stream = gemv_models.get(wb, (launch_us, None))
        # the one prediction explain prints too (predict.plan_decode_ms), with this run's figures
        figures = Figures(bw, cost, tf, stream, source="measured" if device.type == "cuda" else "catalog")
        lw = linear_weight_bytes(model, plan)
        pred = (lambda b, plan=plan, figures=figures, lw=lw: plan_decode_ms(
            plan, cfg, b, context, figures, device.type == "cuda", linear_weight_bytes=lw).ms)
        decode_rows(f"plan {plan.name}", planned, planned, pred)
        saved = low_precision_saving(model, planned.report.precision)
        if saved:
            for r in rows:
                if r.contender == f"plan {plan.name}":
                    r.extra["plan_floor_ms"] = (step_bytes(model, r.batch, context) - saved) / (bw * 1e9) * 1e3
        notes.extend(f"{plan.name}: {n}" for n in planned.report.notes)
        acc = reference.against(planned)
        if acc is not None:
            accuracy[plan.name] = acc
        model.setup_caches(max(buckets), max_seq)
        if args.profile:
            profiles[plan.name] = profile_step(decode_step(planned, buckets[0], context, cfg.vocab_size, device), device)
            for p in profiles[plan.name][:12]:  # as it lands, like the rows
                print(f"bench: profile {plan.name} batch {buckets[0]}: {p['us_per_step']:9.1f} us "
                      f"{p['calls_per_step']:5.0f}x {p['kernel'][:90]}", file=sys.stderr, flush=True)
        if prefill:
            prefill_row(f"plan {plan.name}", planned)
    torchao_rows()
    rows.extend(prefill_rows)
    result = {"model": lm.source, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "triton": _triton_version(), "context": context,
              "pdl": pdl_lines, "copy_bandwidth_gbs": bw, "catalog_bandwidth_gbs": target.memory_bandwidth_gbs if target else None,
              "launch_us": launch_us, "tflops": (target.tflops.get("bf16") if target else None) or 100.0,
              "gemv_models": {("fp8" if k == 1.0 else "bf16"): {"kernel_us": v[0], "stream_gbs": v[1]}
                              for k, v in gemv_models.items()}, "rows": [r.__dict__ for r in rows], "notes": notes, "profile": profiles,
              "accuracy": accuracy}
    if args.format == "json":
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_bench(result)
    if args.plot:
        try:
            _plot(result, args.plot)
        except OSError as exc:
            return _usage(f"--plot {args.plot}: cannot write it: {exc.strerror or exc}")
        print(f"bench: wrote {args.plot}", file=sys.stderr)
    return EXIT_OK


BASELINES = ("eager", "compile", "torchao-fp8", "torchao-fp8-wo")


def compile_reduce_overhead(model):
    """The compile baseline as a PyTorch user writes it: torch.compile in reduce-overhead
    mode (CUDA graphs on CUDA), static shapes."""
    return torch.compile(model, mode="reduce-overhead", dynamic=False)


def torchao_fp8(model, weight_only: bool):
    """The peer a PyTorch user picks for FP8: torchao on a copy of the model, every linear
    but the LM head, row-wise dynamic activations + FP8 weights (or FP8 weights only)."""
    import copy
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow,
                                      quantize_)
    from .passes.precision import lm_head_paths
    peer = copy.deepcopy(model)
    heads = lm_head_paths(peer)
    config = Float8WeightOnlyConfig() if weight_only else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(peer, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn not in heads)
    return peer


def low_precision_saving(model, precision: dict) -> int:
    """Bytes one decode step no longer reads because GEMM weights are stored in FP8
    (the report's per-GEMM dtypes; FP8 halves a bf16 weight, scales are negligible)."""
    mods = dict(model.named_modules())
    saved = 0
    for path, info in precision.items():
        w = getattr(mods.get(path), "weight", None)
        if w is not None and info["dtype"].startswith("fp8") and info["kernel"].startswith("fp8"):
            saved += w.numel() * (w.element_size() - 1)
    return saved


def profile_step(step, device: torch.device, steps: int = 10) -> list[dict]:
    """Time per kernel of one step (torch.profiler, averaged over `steps` steps)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(3):
        step()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0))
        if device.type == "cuda" and dev_us <= 0:
            continue
        rows.append({"kernel": ev.key, "us_per_step": (dev_us if device.type == "cuda" else ev.cpu_time_total) / steps,
                     "calls_per_step": ev.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:40]


def measure_launch_us(device: torch.device, n: int = 200) -> float:
    """Cost of one tiny kernel inside a replayed CUDA graph, in microseconds."""
    x = torch.zeros(1, device=device)
    for _ in range(3):
        x.add_(1)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(device)
    with torch.cuda.stream(s):
        x.add_(1)
    torch.cuda.current_stream(device).wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(n):
            x.add_(1)
    from .bench import time_ms
    return time_ms(g.replay, device, reps=20) * 1e3 / n


def measure_kernel_cost_us(device: torch.device, bandwidth_gbs: float, n: int = 32) -> float:
    """What one real decode kernel costs beyond its bytes inside a replayed CUDA graph, in
    microseconds: `n` one-row GEMVs on distinct 2048 x 2048 bf16 weights (planlang's own
    `linear`, 8 MiB each, 256 MiB in all, so none is served from L2), time per kernel minus
    its bytes over the copy bandwidth. A real kernel pays its ramp-up and tail as well as
    the launch, about twice what an empty kernel shows; the roofline uses this figure. Falls
    back to `measure_launch_us` when the GEMV cannot be captured."""
    try:
        from .kernels import qkv  # noqa: F401  (registers planlang::linear)
        k = 2048
        ws = [torch.randn(k, k, device=device, dtype=torch.bfloat16) for _ in range(n)]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        outs = [torch.ops.planlang.linear(x, w, None) for w in ws]  # compile and warm up
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = [torch.ops.planlang.linear(x, w, None) for w in ws]
        from .bench import time_ms
        per_kernel_ms = time_ms(g.replay, device, reps=20) / n
        bytes_ms = k * k * 2 / (bandwidth_gbs * 1e9) * 1e3
        del ws, outs, g
        return max((per_kernel_ms - bytes_ms) * 1e3, measure_launch_us(device))
    except Exception:  # a kernel that cannot be captured here: the empty-kernel figure
        return measure_launch_us(device)


def measure_gemv_model(device: torch.device, bandwidth_gbs: float, fp8: bool = False) -> tuple[float, float]:
    """(per-kernel cost in us, weight streaming rate in GB/s) of planlang's one-row GEMVs in
    a replayed CUDA graph, fit as time = cost + bytes / rate over two weight shapes (2048 x
    2048 and 16384 x 2048, bf16 `linear`, or with `fp8` e4m3 weights and channel scales
    through `fp8_linear`), each cycled over enough copies to stream from HBM. The rate is
    capped at the copy bandwidth and the cost at least the empty-kernel launch. Falls back
    to (`measure_kernel_cost_us`, the copy bandwidth) where a GEMV cannot be captured."""
    try:
        from .bench import time_ms
        from .kernels import qkv  # noqa: F401  (registers planlang::linear)
        points = []
        for n in (2048, 16384):
            k = 2048
            copies = max(4, (256 << 20) // (n * k * (1 if fp8 else 2)))
            x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
            if fp8:
                from .kernels.fp8_linear import fp8_linear
                ws = [(torch.randn(n, k, device=device) * 0.05).to(torch.float8_e4m3fn) for _ in range(copies)]
                sc = torch.rand(n, device=device) + 0.5
                calls = [lambda w=w: fp8_linear(x, w, sc, None) for w in ws]
            else:
                ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
                calls = [lambda w=w: torch.ops.planlang.linear(x, w, None) for w in ws]
            outs = [c() for c in calls]  # compile and warm up
            torch.cuda.synchronize(device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs = [c() for c in calls]
            points.append((n * k * (1 if fp8 else 2), time_ms(g.replay, device, reps=20) / copies * 1e-3))
            del ws, outs, g
        (b1, t1), (b2, t2) = points
        rate = min((b2 - b1) / max(t2 - t1, 1e-12), bandwidth_gbs * 1e9)
        cost = max((t1 - b1 / rate) * 1e6, measure_launch_us(device))
        return cost, rate / 1e9
    except Exception:
        return measure_kernel_cost_us(device, bandwidth_gbs), bandwidth_gbs


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> Optional[float]:
    """Peak memory allocated on the device since `_reset_peak` (everything alive counts: the
    model, the caches, a compiled graph's pool), in MiB; None off CUDA, where it is not tracked."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def _pdl_line(device, mode: str = "auto") -> str:
    """Whether a plan's kernels launch with PDL here (its `graphs.pdl`, or PLANLANG_PDL when
    set) and why: a switch that moves the timings, so every result records it. The measured
    GEMV and launch figures are taken with the default (auto)."""
    from planlang.runtime.kernels.backend import pdl_mode, pdl_status
    try:
        with pdl_mode(mode):
            return pdl_status(device)[1]
    except ValueError as exc:  # a bad PLANLANG_PDL value: bench fails on it later, with the hint
        return str(exc)


def _print_bench(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console(width=160)
    con.print(f"[bold]planlang bench[/bold] {r['model']} on {r['device']} (torch {r['torch']}, triton {r['triton']}), "
              f"decode at context {r['context']}; copy bandwidth {r['copy_bandwidth_gbs']:.0f} GB/s measured"
              + (f", {r['catalog_bandwidth_gbs']:.0f} GB/s catalog" if r['catalog_bandwidth_gbs'] else "")
              + f"; per-kernel cost in a graph {r['launch_us']:.2f} us"
              + "".join(f"; plan {name}: {line}" for name, line in (r.get("pdl") or {}).items()))
    for kind, m in (r.get("gemv_models") or {}).items():
        con.print(f"  {kind} GEMVs in a graph (the roofline's figures): {m['kernel_us']:.2f} us a kernel, "
                  f"weights streamed at {m['stream_gbs']:.0f} GB/s")
    t = Table()
    for col in ("contender", "batch", "ms", "tokens/s", "floor ms", "x floor", "catalog floor ms", "fp8 floor ms",
                "predicted ms", "pred. error", "peak MiB"):
        t.add_column(col, justify="right" if col != "contender" else "left")
    for row in r["rows"]:
        floor = row["extra"].get("floor_ms")
        cat_floor = row["extra"].get("catalog_floor_ms")
        pred = row["predicted_ms"]
        peak = row.get("peak_memory_mib")
        err = f"{(pred - row['ms']) / row['ms'] * 100:+.0f}%" if pred else ""
        name = row["contender"] + (f" (prefill {row['extra']['prefill_tokens']})" if "prefill_tokens" in row["extra"] else "")
        t.add_row(name, str(row["batch"]), f"{row['ms']:.3f}", f"{row['tokens_s']:.0f}",
                  f"{floor:.3f}" if floor else "", f"{row['floor_ratio']:.2f}" if row["floor_ratio"] else "",
                  f"{cat_floor:.3f}" if cat_floor else "",
                  f"{row['extra']['plan_floor_ms']:.3f}" if "plan_floor_ms" in row["extra"] else "",
                  f"{pred:.3f}" if pred else "", err, f"{peak:.0f}" if peak is not None else "")
    con.print(t)
    for n in r["notes"]:
        con.print(f"  note: {n}")
    for name, a in r.get("accuracy", {}).items():
        con.print(f"  accuracy of plan {name} against the unplanned model ({a['tokens']} tokens of the "
                  f"evaluation text): logit error {a['rel_error']:.2e}, KL {a['kl']:.2e}, "
                  f"top-1 agreement {a['top1_agreement']:.4f}, perplexity {a['ppl_reference']:.3f} -> "
                  f"{a['ppl_candidate']:.3f}")
    for name, prof in r.get("profile", {}).items():
        pt = Table(title=f"profile: plan {name}, one decode step at batch {r['rows'][0]['batch']}")
        for col in ("kernel", "us/step", "calls/step"):
            pt.add_column(col, justify="left" if col == "kernel" else "right", overflow="fold")
        for p in prof[:25]:
            pt.add_row(p["kernel"][:90], f"{p['us_per_step']:.1f}", f"{p['calls_per_step']:.1f}")
        con.print(pt)
    dec = [x for x in r["rows"] if "prefill_tokens" not in x["extra"]]
    base = {x["batch"]: x["ms"] for x in dec if x["contender"].startswith("compile")}
    best = {}
    for x in dec:
        if x["contender"].startswith("plan"):
            best[x["batch"]] = min(best.get(x["batch"], 1e9), x["ms"])
    if base and best:
        b1 = min(best)
        con.print(f"headline: batch {b1}: best plan {best[b1]:.3f} ms vs compile(reduce-overhead) "
                  f"{base.get(b1, float('nan')):.3f} ms: {speed_words(base.get(b1, float('nan')), best[b1])}")


def speed_words(base_ms: float, ms: float) -> str:
    """'2.05x faster' or '2.20x slower' (never 'faster' for a ratio below 1)."""
    if not (base_ms > 0 and ms > 0):
        return "no ratio"
    return f"{base_ms / ms:.2f}x faster" if base_ms >= ms else f"{ms / base_ms:.2f}x slower"


def _pyplot():
    """matplotlib's pyplot drawing to files (the Agg backend); ImportError without matplotlib
    (the `plot` extra), which `bench --plot` refuses before it measures anything."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot(r: dict, path: str) -> None:
    """Decode latency per batch size, a line per contender, written to `path` (PNG)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(x["contender"] for x in r["rows"] if "prefill_tokens" not in x["extra"]):
        pts = [(x["batch"], x["ms"]) for x in r["rows"] if x["contender"] == name and "prefill_tokens" not in x["extra"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("ms per decode step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _late(module: str, name: str):
    """A command whose module is imported only when it runs (tune pulls in optuna)."""
    def run(args) -> int:
        import importlib
        return getattr(importlib.import_module(f"planlang.runtime.{module}"), name)(args)
    return run


COMMANDS = {
    "apply": json_on_failure(cmd_apply),
    "export": cmd_export,
    "bench": json_on_failure(cmd_bench),
    "tune": json_on_failure(_late("tune", "cmd_tune")),
    "train-step": json_on_failure(_late("train", "cmd_train_step")),
}
