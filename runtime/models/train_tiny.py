"""Train `builtin:llama-tiny-trained`: the registry's byte-level Llama on Python's standard
library, which every machine with Python has, so nothing is downloaded.

    python -m planlang.runtime.models.train_tiny [--steps N] [--out DIR] [--device cuda]

Corpus: the `.py` files under the running Python's stdlib folder, in sorted order of their
relative paths, skipping test folders, `site-packages`, `encodings` (codec tables) and the
held-out files below, taken whole until `--corpus-mb` is reached. Held out: the files
`HELD_OUT` of the stdlib, whose text (as one Python version had them) ships as
`data/llama_tiny_trained_eval.txt`, since the stdlib differs between Python versions.

Training: fixed seeds (weights drawn by `init_random_weights`, batches by a seeded CPU
generator from the corpus bytes, so the data order is fixed for a given corpus), AdamW,
linear warm-up then cosine decay to a tenth of the peak, bf16 autocast on CUDA (float32 on
the CPU). GPU kernels may still differ in the last bits from run to run.

Writes `llama_tiny_trained.safetensors` (bf16, the dtype the model runs in) and
`llama_tiny_trained.json` (config, command, corpus, Python version, steps, losses, held-out
accuracy) to `--out` (default: this package's `data/` folder), and prints the held-out
accuracy. `--time-budget S` lowers the step count after the first steps when the run would
take longer than S seconds; the recorded command carries the steps actually run, and it
reproduces the run, since the warm-up and the data order do not depend on the step count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..accuracy import EVAL_TEXT, eval_tokens, logits_fn_for, score
from .checkpoint import export_safetensors
from .llama import Transformer
from .registry import BUILTIN_MODELS, DATA_DIR, init_random_weights

NAME = "llama-tiny-trained"
WEIGHTS_FILE = "llama_tiny_trained.safetensors"
RECORD_FILE = "llama_tiny_trained.json"
HELD_OUT = ("colorsys.py", "graphlib.py", "heapq.py", "textwrap.py")
SKIPPED_DIRS = ("test", "tests", "idle_test", "site-packages", "encodings", "__pycache__")
EVAL_CHUNK = 256


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path, max_bytes: int) -> list[Path]:
    """The training files: stdlib `.py` files in sorted relative-path order, without the
    skipped folders and the held-out files, whole files until `max_bytes` is reached."""
    chosen, total = [], 0
    candidates = sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix())
    for path in candidates:
        rel = path.relative_to(root)
        if any(part in SKIPPED_DIRS for part in rel.parts[:-1]) or rel.as_posix() in HELD_OUT:
            continue
        if not path.is_file():
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def write_eval_text(root: Path, dest: Path = EVAL_TEXT) -> Path:
    """Write the held-out evaluation text: the `HELD_OUT` files of `root`, concatenated."""
    text = b"".join((root / name).read_bytes() for name in HELD_OUT)
    dest.write_bytes(text)
    return dest


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` down to `peak / 10`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m planlang.runtime.models.train_tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--corpus-mb", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--out", type=Path, default=DATA_DIR)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: fewer steps when the measured step time says the run would take longer")
    p.add_argument("--eval-tokens", type=int, default=None, help="score only the first N held-out bytes (quick checks)")
    p.add_argument("--write-eval-text", action="store_true",
                   help=f"(re)write {EVAL_TEXT.name} from this Python's stdlib first")
    return p


def _command(args, steps: int) -> str:
    parts = ["python -m planlang.runtime.models.train_tiny", f"--steps {steps}", f"--batch {args.batch}",
             f"--seq-len {args.seq_len}", f"--lr {args.lr:g}", f"--warmup {args.warmup}",
             f"--weight-decay {args.weight_decay:g}", f"--corpus-mb {args.corpus_mb:g}", f"--seed {args.seed}"]
    if args.eval_tokens is not None:
        parts.append(f"--eval-tokens {args.eval_tokens}")
    return " ".join(parts)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = stdlib_dir()
    if args.write_eval_text:
        write_eval_text(root)
    files = corpus_files(root, int(args.corpus_mb * 2**20))
    corpus = b"".join(p.read_bytes() for p in files)
    held = EVAL_TEXT.read_bytes()
    print(f"corpus: {len(files)} files, {len(corpus)} bytes from {root} (Python {platform.python_version()}); "
          f"held out: {len(held)} bytes", flush=True)

    torch.manual_seed(args.seed)
    config = BUILTIN_MODELS[NAME]()
    model = Transformer(config).to(device)
    init_random_weights(model, args.seed, "cpu")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if device.type == "cuda" else {}))
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1)
    amp = device.type == "cuda"
    steps, losses = args.steps, []
    t0 = time.perf_counter()
    step = 0
    while step < steps:
        starts = torch.randint(0, len(corpus) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = data[(starts[:, None] + offsets).to(device)].long()
        x, y = batch[:, :-1], batch[:, 1:]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, config.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
        step += 1
        if args.time_budget is not None and step in (10, 40):  # steps 11..40 time the steady state
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step == 10:
                t_warm = time.perf_counter()
                continue
            per_step = (time.perf_counter() - t_warm) / 30
            fit = int((args.time_budget - (t_warm - t0)) / per_step)
            if fit < steps:
                print(f"{per_step * 1e3:.1f} ms/step: {fit} steps fit the {args.time_budget:.0f} s budget "
                      f"(asked {steps})", flush=True)
                steps = max(fit, args.warmup + 1)
        if step % 250 == 0 or step == steps:
            recent = torch.stack(losses[-50:]).float().mean().item()
            print(f"step {step}/{steps}  loss {recent:.4f}  lr {lr_at(step - 1, steps, args.lr, args.warmup):.2e}  "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0
    final_loss = torch.stack(losses[-50:]).float().mean().item()

    model.eval()
    tokens = eval_tokens(device, max_tokens=args.eval_tokens)
    fp32 = score(logits_fn_for(model), tokens, chunk=EVAL_CHUNK)
    model = model.to(torch.bfloat16)
    model.init_rope(config.max_seq_len, device)
    bf16 = score(logits_fn_for(model), tokens, chunk=EVAL_CHUNK)
    print(f"held-out: fp32 {fp32.summary()}", flush=True)
    print(f"held-out: bf16 {bf16.summary()}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    weights = export_safetensors(model, args.out / WEIGHTS_FILE, name=NAME)
    record = {
        "name": NAME,
        "config": config.to_dict(),
        "parameters": config.num_parameters(),
        "command": _command(args, steps),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "corpus": {
            "source": "the .py files of Python's standard library (sysconfig stdlib path), sorted by relative path",
            "root": str(root),
            "skipped_dirs": list(SKIPPED_DIRS), "held_out": list(HELD_OUT), "max_bytes": int(args.corpus_mb * 2**20),
            "files": len(files), "bytes": len(corpus), "sha256": _sha256(corpus),
            "first": files[0].relative_to(root).as_posix(), "last": files[-1].relative_to(root).as_posix(),
            "paths": [p.relative_to(root).as_posix() for p in files],
        },
        "training": {
            "steps": steps, "batch": args.batch, "seq_len": args.seq_len, "tokens_seen": steps * args.batch * args.seq_len,
            "epochs": steps * args.batch * args.seq_len / len(corpus),
            "optimizer": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
            "schedule": f"linear warm-up {args.warmup} steps, cosine to lr/10", "grad_clip": 1.0,
            "precision": "bf16 autocast, float32 weights" if amp else "float32", "seed": args.seed,
            "seconds": round(train_s, 1), "final_loss": final_loss,
        },
        "eval": {
            "text": EVAL_TEXT.name, "bytes": len(held), "scored_bytes": tokens.shape[1], "sha256": _sha256(held),
            "chunk": EVAL_CHUNK,
            "fp32": fp32.to_json(), "bf16": bf16.to_json(),
        },
        "weights": {"file": WEIGHTS_FILE, "dtype": "bfloat16", "bytes": weights.stat().st_size,
                    "sha256": _sha256(weights.read_bytes())},
    }
    (args.out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {weights} and {args.out / RECORD_FILE}; trained {steps} steps in {train_s:.1f} s on {record['device']}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
