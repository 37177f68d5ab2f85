"""The `planlang` command line (spec §12).

Exit status: 0 no errors; 1 errors (warnings too with --strict); 2 the command could not
run (usage, unreadable file). Bad input never shows a traceback. The runtime (and torch)
is imported only inside the commands that run a model.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Optional, Sequence

from . import __version__

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
TRACEBACK_ENV = "PLANLANG_TRACEBACK"  # set to 1: an internal error shows its traceback


class UsageError(Exception):
    """The command could not run: exit 2 with this message."""


def _at_least(least: int):
    """An argparse `type=` for an integer of at least `least`: a bad value is a usage error
    naming the argument (argparse adds "argument --batch:"), never a traceback later."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


POSITIVE, NON_NEGATIVE = _at_least(1), _at_least(0)

# What `bench --against` takes: runtime/commands.py's BASELINES (a test checks they agree).
BENCH_BASELINES = {
    "eager": "the unplanned model",
    "compile": "torch.compile(mode='reduce-overhead')",
    "torchao-fp8": "torchao FP8 weights and activations, compiled",
    "torchao-fp8-wo": "torchao FP8 weights only, compiled",
}


def _add_format(p: argparse.ArgumentParser, choices=("text", "json")) -> None:
    p.add_argument("--format", choices=choices, default="text", help="output format")
    p.add_argument("--json", dest="format", action="store_const", const="json", help="short for --format json")


MODEL_HELP = ("builtin:NAME (llama-tiny, gemma2-tiny, sinks-tiny, llama-tiny-trained, llama-1b, llama-8b), a "
              "planlang .pt or .safetensors checkpoint, or a Hugging Face model folder (default: builtin:llama-tiny)")


def _model_option(p: argparse.ArgumentParser) -> None:
    """`--model M`, the same as the positional MODEL (lint and explain take only --model)."""
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as MODEL")


def _lint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plans", nargs="+", metavar="PLAN")
    p.add_argument("--target", help="check against this target instead of the plan's")
    p.add_argument("--model", help="also check selectors and shapes against a model (imports torch)")
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p.add_argument("--hardware", action="append", default=[], metavar="FILE", help="extra hardware targets (YAML)")
    p.add_argument("--trust-pickle", action="store_true", help=argparse.SUPPRESS)
    _add_format(p, ("text", "json", "sarif"))


def _fmt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plans", nargs="+", metavar="PLAN", help="one plan; several with --check or --write")
    p.add_argument("--to", choices=("yaml", "plan"), help="output syntax (default: the file's own)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 when the file is not canonical")
    g.add_argument("--write", action="store_true", help="rewrite the file (atomically)")
    _add_format(p)


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("--model", help="list the places each rule takes in this model, and predictions (imports torch)")
    p.add_argument("--target", help="explain for this target instead of the plan's")
    p.add_argument("--hardware", action="append", default=[], metavar="FILE", help="extra hardware targets (YAML)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled whole module (runs code)")
    p.add_argument("--context", type=POSITIVE, default=128, help="decode context for predictions")
    p.add_argument("--calibration", metavar="BENCH_JSON",
                   help="predict with the figures a `planlang bench --format json` run measured "
                        "(copy bandwidth, per-kernel cost, GEMV streaming rate) instead of the catalog's")
    _add_format(p)


def _apply_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    _model_option(p)
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled whole module (runs code)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--max-error", type=float, help="fail when the relative output error exceeds this")
    p.add_argument("--min-agreement", type=float, help="fail when top-1 agreement falls below this")
    p.add_argument("--eval-tokens", type=NON_NEGATIVE, default=1024, metavar="N",
                   help="tokens of the evaluation text scored for accuracy (0: none)")
    p.add_argument("--nproc", type=POSITIVE, metavar="N", help="run on N processes of this host (torchrun), for parallel.tensor N")
    p.add_argument("--batch", type=POSITIVE, default=1, help="rows of the random prompt (default 1)")
    p.add_argument("--context", type=POSITIVE, default=128, help="context of the run: the prompt is min(CONTEXT, 64) tokens, then 4 decode steps (default 128)")
    p.add_argument("--hardware", action="append", default=[], metavar="FILE", help="extra hardware targets (YAML)")
    _add_format(p)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plans", nargs="+", metavar="PLAN... [MODEL]", help="plan files, then the model: " + MODEL_HELP)
    _model_option(p)
    p.add_argument("--against", default="eager,compile", metavar="BASELINE,...",
                   help="baselines timed beside the plans, comma-separated (default: eager,compile): "
                        + "; ".join(f"{k} ({v})" for k, v in BENCH_BASELINES.items()))
    p.add_argument("--context", type=POSITIVE, default=128, help="decode context (tokens in the cache)")
    p.add_argument("--prefill", type=NON_NEGATIVE, default=2048, help="prefill length to time (0: none)")
    p.add_argument("--batch", type=POSITIVE, action="append", help="batch sizes (default: the plans' buckets, else 1)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--plot", metavar="PNG", help='latency per batch size, per contender (needs pip install "planlang[plot]")')
    p.add_argument("--profile", action="store_true", help="time per kernel of one planned decode step")
    p.add_argument("--eval-tokens", type=NON_NEGATIVE, default=512, metavar="N",
                   help="tokens of the evaluation text scored for each plan's accuracy (0: none)")
    p.add_argument("--nproc", type=POSITIVE, metavar="N", help="run on N processes of this host (torchrun), for parallel.tensor N")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled whole module (runs code)")
    _add_format(p)


def _tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    _model_option(p)
    p.add_argument("-o", "--output", required=True, metavar="PLAN", help="the plan file to write (.yaml or .plan)")
    p.add_argument("--target", help="lint candidates for this target too (default: the device present)")
    p.add_argument("--budget", type=float, default=5.0, metavar="MIN", help="minutes of search (default 5)")
    p.add_argument("--max-error", type=float, help="reject candidates whose relative logit error exceeds this")
    p.add_argument("--min-agreement", type=float, help="reject candidates whose top-1 agreement falls below this")
    p.add_argument("--space", metavar="FILE", help="a YAML file that narrows or widens the search space")
    p.add_argument("--storage", metavar="DB", help="the trial records (SQLite; default .planlang/tune.db)")
    p.add_argument("--batch", type=POSITIVE, action="append", help="decode batch sizes to score (default: 1 and 16)")
    p.add_argument("--context", type=POSITIVE, default=128, help="decode context (tokens in the cache)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--seed", type=int, default=0, help="torch's seed for the trials (default 0)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled whole module (runs code)")
    _add_format(p)


def _train_step_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    _model_option(p)
    p.add_argument("--batch", type=POSITIVE, default=2, help="sequences per step (default 2)")
    p.add_argument("--seq", type=POSITIVE, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=POSITIVE, default=3, help="steps timed (after one warm-up step)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled whole module (runs code)")
    _add_format(p)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("output", metavar="OUT", help="the file to write: OUT.pt (torch.save, read with weights_only) "
                   "or OUT.safetensors (tensors, and the config in the metadata)")
    _add_format(p)


def _targets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hardware", action="append", default=[], metavar="FILE")
    _add_format(p)


# Each command's one-line help and its arguments, in the order `planlang --help` lists them.
SUBCOMMANDS = {
    "lint": ("check plans against the spec and a hardware target", _lint_arguments),
    "fmt": ("print a plan in canonical form, or convert it", _fmt_arguments),
    "explain": ("what a plan does, section by section", _explain_arguments),
    "apply": ("apply a plan to a model, check numerics, time it, report", _apply_arguments),
    "bench": ("time planned models against eager and torch.compile", _bench_arguments),
    "tune": ("search plans on this hardware and write the best", _tune_arguments),
    "train-step": ("one training step with and without the plan: peak memory and time", _train_step_arguments),
    "export": ("write a built-in model as a planlang checkpoint (.pt or .safetensors)", _export_arguments),
    "targets": ("the hardware catalog", _targets_arguments),
    "detect": ("what this machine is", _add_format),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole command line, or with `command` only that command's subparser: a run of one
    command parses the same and skips building the nine others (~3 ms of argparse)."""
    parser = argparse.ArgumentParser(prog="planlang", description="Declarative optimization plans for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"planlang {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments) in SUBCOMMANDS.items():
        if command is None or name == command:
            add_arguments(sub.add_parser(name, help=help_text))
    return parser


# ----------------------------------------------------------------------------- commands

def _catalog(files: Sequence[str]):
    from .diagnostics import Diagnostic
    from .hardware import HardwareFileError, load_catalog
    try:
        return load_catalog(files), []
    except HardwareFileError as exc:
        diags = []
        for e in exc.diagnostics:
            f = getattr(e, "file", None) or (files[0] if files else "<hardware>")
            diags.append(Diagnostic("PL130", e.message, "", str(f), e.span, e.hint))
        return None, diags


def cmd_lint(args) -> int:
    from .diagnostics import has_errors, render_json, render_sarif, render_text, sort_key
    from .loader import load_with_source
    from .validate import validate

    catalog, diags = _catalog(args.hardware)
    unreadable = catalog is None  # a bad --hardware file: the command cannot run
    if catalog is not None and args.target and catalog.get(args.target) is None:
        unreadable = True  # a bad argument, like a missing file: exit 2 (each plan reports PL203)
    for path in args.plans:
        loaded = load_with_source(path)
        diags.extend(loaded.diagnostics)
        if any(d.code == "PL100" for d in loaded.diagnostics):
            unreadable = True
        if loaded.plan is None or catalog is None:
            continue
        diags.extend(validate(loaded.plan, loaded.source, target=args.target, catalog=catalog))
        if args.model and not has_errors(diags):
            from planlang.runtime.modelcheck import model_diagnostics
            diags.extend(model_diagnostics(loaded, args.model, target=args.target, catalog=catalog,
                                           trust_pickle=args.trust_pickle))
    diags.sort(key=sort_key)
    ok = not has_errors(diags, strict=args.strict)
    if args.format == "json":
        print(render_json(diags, ok))
    elif args.format == "sarif":
        print(render_sarif(diags, __version__))
    else:
        if diags:
            print(render_text(diags))
        n_err = sum(d.severity == "error" for d in diags)
        n_warn = sum(d.severity == "warning" for d in diags)
        print(f"{len(args.plans)} plan(s): {n_err} error(s), {n_warn} warning(s)", file=sys.stderr)
    if unreadable:
        return EXIT_USAGE
    return EXIT_OK if ok else EXIT_ERRORS


def cmd_fmt(args) -> int:
    from pathlib import Path

    if len(args.plans) > 1 and not (args.check or args.write):
        raise UsageError(f"{len(args.plans)} plans: fmt prints one plan; check or rewrite several with --check or "
                         "--write")
    worst = EXIT_OK
    for plan_path in args.plans:
        code = _fmt_one(Path(plan_path), args)
        worst = code if code == EXIT_USAGE or worst == EXIT_OK else worst
    return worst


def _fmt_one(path, args) -> int:
    from .diagnostics import render_text
    from .loader import read_document
    from .plan import Plan
    from .source import SourceError
    from .writer import atomic_write, format_plan

    try:
        doc, source = read_document(path)
    except SourceError as exc:
        from .loader import _source_error, _text_of
        print(render_text([_source_error(exc, str(path), _text_of(path))]), file=sys.stderr)
        return EXIT_USAGE if exc.code == "PL100" else EXIT_ERRORS
    plan, diags = Plan.from_document(doc, source)
    if plan is None:
        print(render_text(diags), file=sys.stderr)
        return EXIT_ERRORS
    own = "plan" if path.suffix == ".plan" else "yaml"
    to = args.to or own
    text = format_plan(plan, to, source, own)  # the file's comments kept (planlang/comments.py)
    from .comments import extract
    lost = len(extract(source.text, own)) - len(extract(text, to))
    if lost > 0:  # format_plan fell back to the text without comments: never silently
        print(f"planlang fmt: warning: {path}: {lost} comment(s) could not be placed in the canonical form and "
              "are left out", file=sys.stderr)
        if args.write:
            print(f"planlang fmt: {path} not written, so that no comment is lost (please report the file)",
                  file=sys.stderr)
            return EXIT_ERRORS
    if args.check:
        current = path.read_text(encoding="utf-8")
        same = current == (text if to == own else format_plan(plan, own, source, own))
        if not same:
            print(f"{path}: not in canonical form (run `planlang fmt --write {path}`)", file=sys.stderr)
        return EXIT_OK if same else EXIT_ERRORS
    if args.write:
        out = path if to == own else path.with_suffix(".plan" if to == "plan" else ".yaml")
        try:
            atomic_write(out, text)
        except OSError as exc:
            raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
        print(f"wrote {out}", file=sys.stderr)
        return EXIT_OK
    sys.stdout.write(text)
    return EXIT_OK


def _calibration(path: str, plan):
    """The figures a bench JSON measured, for the plan's weight dtype (UsageError if unreadable)."""
    import json

    from planlang.runtime.predict import figures_from_bench, plan_weight_bytes
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return figures_from_bench(data, fp8=plan_weight_bytes(plan) == 1.0)
    except OSError as exc:
        raise UsageError(f"--calibration {path}: {exc.strerror or exc}") from None
    except (ValueError, AttributeError) as exc:
        raise UsageError(f"--calibration {path}: {exc}; write one with "
                         f"`planlang bench PLAN MODEL --format json > {path}`") from None


def cmd_explain(args) -> int:
    import json

    from .diagnostics import has_errors, render_text, sort_key
    from .explain import explain_plan, render_explain
    from .loader import load_with_source
    from .validate import resolve_target, validate

    catalog, diags = _catalog(args.hardware)
    if catalog is None:
        print(render_text(diags), file=sys.stderr)
        return EXIT_USAGE
    loaded = load_with_source(args.plan)
    if loaded.plan is None:
        print(render_text(loaded.diagnostics), file=sys.stderr)
        return EXIT_USAGE if any(d.code == "PL100" for d in loaded.diagnostics) else EXIT_ERRORS
    diags = validate(loaded.plan, loaded.source, target=args.target, catalog=catalog)
    res = resolve_target(loaded.plan, loaded.source, catalog, args.target)
    data = explain_plan(loaded.plan, res.target, res.how)
    if args.model:
        try:
            from planlang.runtime.modelcheck import explain_with_model
            from planlang.runtime.models.checkpoint import ModelLoadError
        except ImportError as exc:
            raise UsageError(f"--model needs the runtime (torch): {exc}. "
                             "Install it with `pip install planlang[runtime]`") from None
        figures = _calibration(args.calibration, loaded.plan) if args.calibration else None
        try:
            data = explain_with_model(data, loaded, args.model, res.target, catalog,
                                      trust_pickle=args.trust_pickle, context=args.context, figures=figures)
        except ModelLoadError as exc:
            print(f"planlang explain: error: --model {exc.path or args.model}: {exc.message}", file=sys.stderr)
            if exc.hint:
                print(f"   = hint: {exc.hint}", file=sys.stderr)
            return EXIT_USAGE
    data["diagnostics"] = [d.to_json() for d in diags]
    if args.format == "json":
        print(json.dumps(data, indent=2, default=str))
    else:
        print(render_explain(data))
        if diags:
            print("\n" + render_text(sorted(diags, key=sort_key)))
    return EXIT_ERRORS if has_errors(diags) else EXIT_OK


def cmd_targets(args) -> int:
    import json

    from .diagnostics import render_text
    catalog, diags = _catalog(args.hardware)
    if catalog is None:
        print(render_text(diags), file=sys.stderr)
        return EXIT_USAGE
    rows = list(catalog)
    if args.format == "json":
        print(json.dumps([t.model_dump() for t in rows], indent=2, default=str))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table
    table = Table(title="planlang targets")
    for col in ("id", "aliases", "name", "cc", "memory GB", "HBM GB/s", "host GB/s", "SMs", "bf16 TFLOP/s", "low precision"):
        table.add_column(col)
    for t in rows:
        low = [d for d in t.tflops if d.startswith(("fp8", "mx", "nv"))]
        def num(v):
            return "-" if v is None else f"{v:g}"
        table.add_row(t.id, ", ".join(t.aliases), t.name, t.compute_capability or "-", num(t.memory_gb),
                      num(t.memory_bandwidth_gbs), num(t.host_link_gbs), str(t.sm_count or "-"),
                      num(t.tflops.get("bf16")), ", ".join(low) or "-")
    Console(width=200).print(table)
    return EXIT_OK


def cmd_detect(args) -> int:
    import json

    from .hardware import detect
    found = detect(use_torch=True)
    data = {"target": found.target_id if found else "cpu", "name": found.name if found else "no GPU found",
            "how": found.how if found else "no nvidia-smi, NVML or CUDA device",
            "compute_capability": found.compute_capability if found else None}
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        cc = f", compute capability {data['compute_capability']}" if data["compute_capability"] else ""
        print(f"{data['target']}: {data['name']}{cc} ({data['how']})")
    return EXIT_OK


def _runtime_command(name: str):
    def run(args) -> int:
        try:
            from planlang.runtime.commands import COMMANDS
        except ImportError as exc:
            raise UsageError(f"`planlang {name}` needs the runtime (torch): {exc}. "
                             "Install it with `pip install planlang[runtime]`") from None
        return COMMANDS[name](args)
    return run


COMMANDS = {
    "lint": cmd_lint, "fmt": cmd_fmt, "explain": cmd_explain, "targets": cmd_targets, "detect": cmd_detect,
    "apply": _runtime_command("apply"), "bench": _runtime_command("bench"),
    "tune": _runtime_command("tune"), "export": _runtime_command("export"),
    "train-step": _runtime_command("train-step"),
}


# Commands that only read plans: short runs in which start-up (pydantic, PyYAML, the plan
# model classes) allocates nearly every object, and all of them live until exit. The cyclic
# collector would walk that heap again and again, and once more at interpreter shutdown,
# freeing nothing; so it pauses while such a command runs and, when `main` is the program
# (no argv given: the console script, `python -m planlang.cli`), the heap is frozen before
# exit (`gc.freeze`). Together that is about a tenth of `planlang lint`'s time. Commands
# that reach the runtime (torch, a model) run with the collector as it was.
#
# Such a program also skips pydantic's plugin scan, which reads the entry points of every
# installed distribution (a few ms) to find plugins that observe validation: the models are
# planlang's own, and no plugin changes what lint reports. A PYDANTIC_DISABLE_PLUGINS the
# user set is kept.
_LANGUAGE_COMMANDS = ("lint", "fmt", "explain", "targets")


def main(argv: Optional[Sequence[str]] = None) -> int:
    collecting = gc.isenabled()
    gc.disable()
    language = False
    try:
        given = list(argv) if argv is not None else sys.argv[1:]
        parser = build_parser(given[0] if given and given[0] in SUBCOMMANDS else None)
        args = parser.parse_args(given)
        args.argv = given
        problem = _reconcile_model(args)
        if problem:
            print(f"planlang {args.command}: error: {problem}", file=sys.stderr)
            return EXIT_USAGE
        language = args.command in _LANGUAGE_COMMANDS and not getattr(args, "model", None)
        if language and argv is None:  # the program, not a caller's `main([...])`
            os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
        if collecting and not language:
            gc.enable()
        return _run(parser, args)
    finally:
        if language and argv is None:
            gc.freeze()
        if collecting:
            gc.enable()


def _our_dirs() -> tuple[str, ...]:
    """The folders of planlang's own modules (the runtime may live beside the language)."""
    import importlib.util
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    spec = importlib.util.find_spec("planlang.runtime")
    if spec is not None and spec.submodule_search_locations:
        dirs += [os.path.abspath(d) for d in spec.submodule_search_locations]
    return tuple(d + os.sep for d in dirs)


def _plain_warnings():
    """planlang's own warnings print as one line (`planlang: warning: ...`), not with the
    source line Python's default shows; other libraries' keep their form."""
    import warnings
    original, ours = warnings.showwarning, _our_dirs()

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(ours):
            print(f"planlang: warning: {message}", file=file or sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)
    warnings.showwarning = show
    return original


def _reconcile_model(args: argparse.Namespace) -> Optional[str]:
    """`--model M` where a command takes MODEL as an argument: the same model, or an error."""
    option = getattr(args, "model_option", None)
    if option is None:
        return None
    if args.command == "bench":
        from .loader import PLAN_SUFFIXES
        if args.plans and not args.plans[-1].endswith(PLAN_SUFFIXES):
            if args.plans[-1] != option:
                return f"two models: {args.plans[-1]} and --model {option}"
        else:
            args.plans.append(option)
        return None
    if getattr(args, "model", None) not in (None, option):
        return f"two models: {args.model} and --model {option}"
    args.model = option
    return None


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    restore = None
    if args.command not in _LANGUAGE_COMMANDS or getattr(args, "model", None):
        restore = _plain_warnings()
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"planlang {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # a bug of ours (or an unforeseen input): one line, not a traceback
        if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
            raise
        print(f"planlang {args.command}: internal error: {type(exc).__name__}: {exc}\n"
              f"  hint: this is a planlang bug, please report it with the command; {TRACEBACK_ENV}=1 shows "
              "the traceback", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if restore is not None:
            import warnings
            warnings.showwarning = restore


if __name__ == "__main__":
    sys.exit(main())
