"""`planlang train-step PLAN [MODEL]`: one training step of a causal language model with
and without the plan, in the same run: peak memory split into weights, gradients,
optimizer state, activations of the selected layers and the rest, and step time.

The step is a standard mixed-precision one: the model's parameters are the BF16 compute
copy (the model's own dtype), each with an FP32 master weight that AdamW updates (on the
device; on the host for parameters the plan offloads, `memory.offload`). Of the usual
choices this is the one whose memory the plan's numbers reward: autocast over FP32
parameters would keep FP32 weights and gradients (2 + 2 bytes more per parameter than BF16
ones) and save BF16 casts of the weights as activations, which recompute cannot drop.

The loss is cross-entropy computed in chunks of tokens through the LM head (`chunked_cross_entropy`):
the full-vocabulary logits of all tokens never exist at once, and the backward pass
recomputes each chunk's logits instead of keeping them.
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

from .memory.offload import adamw

MIB = 2 ** 20


# ----------------------------------------------------------------------------- chunked loss

class _ChunkedCE(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` (optionally soft-capped) against targets,
    one chunk of tokens at a time; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, softcap, ignore_index):
        n = hidden.shape[0]
        valid = (targets != ignore_index)
        count = valid.sum().clamp_min(1)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            logits = _logits(hidden[s:s + chunk], weight, softcap)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            t = targets[s:s + chunk]
            picked = logits.gather(1, t.clamp_min(0)[:, None])[:, 0]
            total += ((lse[s:s + chunk] - picked) * valid[s:s + chunk]).sum()
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse, count)
        ctx.chunk, ctx.softcap, ctx.ignore_index = chunk, softcap, ignore_index
        return total / count

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse, count = ctx.saved_tensors
        chunk, softcap = ctx.chunk, ctx.softcap
        scale = grad.float() / count
        gh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            logits = _logits(h, weight, softcap)
            t = targets[s:s + chunk]
            valid = (t != ctx.ignore_index)
            p = torch.exp(logits - lse[s:s + chunk, None])
            p.scatter_add_(1, t.clamp_min(0)[:, None], -valid[:, None].float())
            p *= (scale * valid.float())[:, None]
            if softcap is not None:  # d(cap * tanh(z / cap))/dz = 1 - tanh^2
                p *= 1 - (logits / softcap) ** 2
            del logits
            pc = p.to(weight.dtype)
            if gh is not None:
                gh[s:s + chunk] = pc @ weight
            if gw is not None:
                if pc.dtype == torch.float32:
                    gw.addmm_(pc.t(), h)
                else:
                    gw.add_(pc.t() @ h)  # the chunk's GEMM in the weight's dtype, summed in FP32
        return gh, (gw.to(weight.dtype) if gw is not None else None), None, None, None, None


def _logits(h: torch.Tensor, weight: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          softcap: Optional[float] = None, chunk: Optional[int] = None,
                          ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden [N, D] @ weight [V, D]^T` (soft-capped when
    `softcap`), computed `chunk` tokens at a time (default: about 256 MiB of FP32 logits)
    in the forward and again in the backward pass; gradients of the weight accumulate in
    FP32. Tokens whose target is `ignore_index` do not count."""
    vocab = weight.shape[0]
    chunk = chunk or max(1, min(hidden.shape[0], (64 * 2 ** 20) // max(vocab, 1)))
    return _ChunkedCE.apply(hidden, weight, targets, chunk, softcap, ignore_index)


# ----------------------------------------------------------------------------- the optimizer

class MixedAdamW:
    """AdamW over FP32 master weights of the given (device) parameters. An FP32 parameter is
    its own master; any other keeps an FP32 copy, gets `grad.float()` at the step and the
    rounded update after it. Parameters are stepped in buckets of about `bucket` elements,
    so only one bucket's FP32 gradients exist at a time."""

    def __init__(self, params: list[nn.Parameter], lr: float = 1e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, bucket: int = 1 << 26):
        self.params = params
        self.groups = []
        cur, n = [], 0
        for p in params:
            cur.append(p)
            n += p.numel()
            if n >= bucket:
                self.groups.append(cur)
                cur, n = [], 0
        if cur:
            self.groups.append(cur)
        hp = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.masters = [[p if p.dtype == torch.float32 else p.detach().float() for p in g] for g in self.groups]
        self.opts = [adamw(ms, ms[0].device.type, **hp) for ms in self.masters]

    @torch.no_grad()
    def step(self) -> None:
        for ps, ms, opt in zip(self.groups, self.masters, self.opts):
            live = [(p, m) for p, m in zip(ps, ms) if p.grad is not None]
            if not live:
                continue
            for p, m in live:
                if m is not p:
                    m.grad = p.grad.float()
                    p.grad = None
            opt.step()
            for p, m in live:
                if m is not p:
                    p.copy_(m)
                    m.grad = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def master_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for ps, ms in zip(self.groups, self.masters)
                   for p, m in zip(ps, ms) if m is not p)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for opt in self.opts for s in opt.state.values()
                   for t in s.values() if isinstance(t, torch.Tensor))


# ----------------------------------------------------------------------------- the step

def drop_caches(model: nn.Module) -> None:
    """Training runs without KV caches (attention sees the step's tokens only)."""
    for m in model.modules():
        if hasattr(m, "k_cache") and hasattr(m, "v_cache") and hasattr(m, "allocate"):
            m.k_cache = None
            m.v_cache = None
    if hasattr(model, "max_batch"):
        model.max_batch = model.max_seq_len = 0


class LMParts:
    """Where a causal LM's last hidden states and LM head are. Built-in models: the LM head
    module is set aside (an identity takes its place, and the final soft-cap moves into the
    loss) so the model's forward returns hidden states; `close()` puts them back. Hugging
    Face models: the decoder (`get_decoder()`) gives hidden states."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._restore: Optional[Callable] = None
        if hasattr(model, "setup_caches") and hasattr(model, "lm_head"):
            head, cap = model.lm_head, model.config.final_softcap
            model.lm_head = nn.Identity()
            model.config.final_softcap = None

            def restore():
                model.lm_head = head
                model.config.final_softcap = cap
            self._restore = restore
            self.head, self.softcap, self.decoder = head, cap, None
        else:
            self.head = model.get_output_embeddings()
            self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
            self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def hidden(self, forward: Callable, tokens: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            return forward(tokens)
        return self.decoder(input_ids=tokens, use_cache=False).last_hidden_state  # a cache would grow in recomputation

    def close(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None


def _unique_params(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
    return out


class Trainer:
    """One step: forward, loss, backward, optimizer step (device AdamW with FP32 masters;
    the host AdamW of `offload` for the parameters it streams). `loss(forward, batch)`
    defaults to the causal-LM chunked cross-entropy over `batch = (tokens, targets)`.
    `on_backward()` runs after the backward pass, before the optimizer steps."""

    def __init__(self, model: nn.Module, forward: Optional[Callable] = None, *, offload=None,
                 loss: Optional[Callable] = None, lr: float = 1e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, on_backward: Optional[Callable] = None):
        self.model = model
        self.forward = forward if forward is not None else model
        self.offload = offload if offload is not None and getattr(offload, "training", False) else None
        self.on_backward = on_backward
        self.lm = None
        modules = [model]
        if loss is None:
            drop_caches(model)
            self.lm = LMParts(model)
            modules.append(self.lm.head)
            loss = self._lm_loss
        self.loss = loss
        host = {id(p) for p in self.offload.params()} if self.offload is not None else set()
        hp = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.device_params = [p for p in _unique_params(modules) if id(p) not in host]
        self.opt = MixedAdamW(self.device_params, **hp)
        self.host_opt = self.offload.host_optimizer(**hp) if host else None
        model.train()

    def _lm_loss(self, forward, batch) -> torch.Tensor:
        tokens, targets = batch
        hidden = self.lm.hidden(forward, tokens)
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm.head.weight,
                                     targets.reshape(-1), softcap=self.lm.softcap)

    def backward(self, batch) -> torch.Tensor:
        """Forward and backward only (gradients stay where the step leaves them)."""
        loss = self.loss(self.forward, batch)
        loss.backward()
        return loss.detach()

    def step(self, batch) -> torch.Tensor:
        loss = self.backward(batch)
        if self.on_backward is not None:
            self.on_backward()
        self.opt.step()
        if self.host_opt is not None:
            self.host_opt.step()
        self.opt.zero_grad()
        return loss

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()


# ----------------------------------------------------------------------------- measuring

def selected_modules(model: nn.Module, plan) -> list[str]:
    """The layers whose activations the report counts: the modules the plan's memory rules
    take, else the model's `layers` (or its top-level children)."""
    from .memory.offload import _units_by_rule
    from .memory.recompute import recompute_units
    names = []
    if plan is not None:
        names = list(recompute_units(model, plan))
        names += [p for units in _units_by_rule(model, plan).values() for p, _ in units]
    if not names:
        layers = getattr(model, "layers", None)
        if isinstance(layers, nn.ModuleList):
            names = [f"layers.{i}" for i in range(len(layers))]
    order = [n for n, _ in model.named_modules()]
    return [n for n in order if n in set(names)]


class MemoryProbe:
    """Device memory at the first selected module's start and the last one's end of the
    forward pass (the difference is what the layers keep for the backward pass), and the
    gradients present after the backward pass."""

    def __init__(self, model: nn.Module, paths: list[str], device: torch.device):
        self.device = device
        self.before = self.after = None
        self.handles = []
        mods = dict(model.named_modules())
        self.cuda = device.type == "cuda"
        if paths and self.cuda:
            self.handles.append(mods[paths[0]].register_forward_pre_hook(self._start))
            self.handles.append(mods[paths[-1]].register_forward_hook(self._end))

    @torch._dynamo.disable
    def _start(self, *_):
        if torch.is_grad_enabled():
            self.before = torch.cuda.memory_allocated(self.device)

    @torch._dynamo.disable
    def _end(self, *_):
        if torch.is_grad_enabled():
            self.after = torch.cuda.memory_allocated(self.device)

    @property
    def activations(self) -> Optional[int]:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _weight_bytes(trainer: Trainer, device: torch.device) -> int:
    """Device bytes of parameters and buffers (ring slots for offloaded ones), and FP32 masters."""
    slots = []
    if trainer.offload is not None:
        slots = [(s.data_ptr(), s.data_ptr() + s.numel()) for ring in trainer.offload.rings for s in ring.slots]
    seen, total = set(), 0
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    if trainer.lm is not None:
        tensors += list(trainer.lm.head.parameters())
    for t in tensors:
        if t is None or t.device != device:
            continue
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in seen or any(a <= ptr < b for a, b in slots):
            continue
        seen.add(ptr)
        total += st.nbytes()
    total += sum(b - a for a, b in slots)
    return total + trainer.opt.master_bytes()


def _grad_bytes(trainer: Trainer, device: torch.device) -> int:
    seen, total = set(), 0
    for p in trainer.device_params + (trainer.offload.params() if trainer.offload else []):
        g = p.grad
        if g is not None and g.device == device and id(g) not in seen:
            seen.add(id(g))
            total += g.numel() * g.element_size()
    return total


def measure(trainer: Trainer, batch, steps: int, device: torch.device, paths: list[str]) -> dict:
    """One warm-up step, then `steps` timed steps: median step time, losses, peak memory and
    its parts (MiB; on the CPU only weights, gradients and optimizer state)."""
    probe = MemoryProbe(trainer.model, paths, device)
    grads = []
    user_hook = trainer.on_backward
    cuda = device.type == "cuda"

    def on_backward():
        grads.append(_grad_bytes(trainer, device))
        if user_hook is not None:
            user_hook()
    trainer.on_backward = on_backward
    losses, times, peaks = [], [], []
    try:
        for i in range(steps + 1):
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            loss = trainer.step(batch)
            if cuda:
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
            losses.append(float(loss))
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated(device))
    finally:
        trainer.on_backward = user_hook
        probe.close()
    timed = times[1:] or times
    mem = {"weights": _weight_bytes(trainer, device), "gradients": max(grads[1:] or grads),
           "optimizer": trainer.opt.state_bytes()}
    out = {"step_ms": statistics.median(timed), "step_ms_all": timed, "losses": losses}
    if cuda:
        peak = max(peaks[1:] or peaks)
        mem["activations"] = probe.activations
        mem["peak"] = peak
        known = sum(v for k, v in mem.items() if k != "peak" and v is not None)
        mem["rest"] = max(0, peak - known)
    out["memory_mib"] = {k: (v / MIB if v is not None else None) for k, v in mem.items()}
    if trainer.host_opt is not None:
        out["host_optimizer_state_mib"] = trainer.host_opt.state_bytes() / MIB
    if trainer.offload is not None:
        st = trainer.offload.stats()
        out["ring_mib"] = st["ring_bytes"] / MIB
        out["offloaded_layer_mib"] = st["layer_bytes"] / MIB
    return out


def lm_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0):
    """Random tokens [batch, seq] and their next-token targets (a fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the command

def cmd_train_step(args) -> int:
    from planlang.loader import load_with_source

    from .apply import ApplyError, apply
    from .commands import EXIT_ERRORS, EXIT_OK, _device, _model_error, _usage, print_diagnostics, refuse_on_device
    from .models.checkpoint import ModelLoadError, load_model

    loaded = load_with_source(args.plan)
    if loaded.plan is None:
        print_diagnostics(loaded.diagnostics)
        return 2 if any(d.code == "PL100" for d in loaded.diagnostics) else EXIT_ERRORS
    plan = loaded.plan
    if plan.mode != "training":
        return _usage(f"{args.plan}: train-step runs plans of mode training, and this one is {plan.mode} "
                      "(write `mode: training`)")
    if args.batch < 1 or args.seq < 2 or args.steps < 1:
        return _usage("--batch and --steps must be at least 1, --seq at least 2")
    device = _device(args.device)
    refused = refuse_on_device(loaded, device, "train-step")
    if refused is not None:
        return refused
    runs, source, report = {}, None, None
    for which in ("unplanned", "planned"):
        try:
            lm = load_model(args.model, trust_pickle=args.trust_pickle, device=device)
        except ModelLoadError as exc:
            return _model_error(exc)
        model, source = lm.model, lm.source
        if not hasattr(getattr(model, "config", None), "vocab_size") and not hasattr(model, "setup_caches"):
            return _usage(f"{lm.source}: train-step drives causal language models")
        paths = selected_modules(model, plan)
        forward, offload = None, None
        if which == "planned":
            try:
                planned = apply(model, plan, source=loaded.source, device=device)
            except ApplyError as exc:
                print_diagnostics(exc.diagnostics)
                return EXIT_ERRORS
            forward, offload, report = planned, getattr(planned, "offload", None), planned.report
        vocab = model.config.vocab_size
        batch = lm_batch(vocab, args.batch, args.seq, device)
        trainer = Trainer(model, forward, offload=offload)
        try:
            runs[which] = measure(trainer, batch, args.steps, device, paths)
        except torch.OutOfMemoryError as exc:
            runs[which] = {"error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
        finally:
            trainer.close()
            if offload is not None:
                offload.close()
            del trainer, model, forward, offload
            lm = None
            free_device(device)
        runs[which]["layers"] = f"{len(paths)} module(s): {', '.join(paths[:2])}{' ...' if len(paths) > 2 else ''}"
    result = {"plan": plan.name, "model": source, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "runs": runs, "report": report.to_json() if report is not None else None}
    result["ratios"] = _ratios(runs)
    if args.format == "json":
        print(json.dumps(result, indent=2, default=str))
    else:
        _print(result)
    return EXIT_OK


def _ratios(runs: dict) -> dict:
    a, b = runs.get("unplanned", {}), runs.get("planned", {})
    if "error" in a or "error" in b or not a or not b:
        return {}
    out = {"step_time": b["step_ms"] / a["step_ms"]}
    ma, mb = a["memory_mib"], b["memory_mib"]
    for k in ma:
        if ma[k] and mb.get(k) is not None:
            out[k] = mb[k] / ma[k]
    state = ("weights", "gradients", "optimizer")
    if all(ma.get(k) is not None and mb.get(k) is not None for k in state):
        out["weights+gradients+optimizer"] = sum(mb[k] for k in state) / sum(ma[k] for k in state)
    return out


def _print(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console(width=120)
    con.print(f"[bold]planlang train-step[/bold] {r['plan']} -> {r['model']} on {r['device']} (torch {r['torch']}), "
              f"batch {r['batch']} x {r['seq']} tokens, median of {r['steps']} step(s) after one warm-up")
    t = Table()
    cols = ("", "step ms", "peak", "weights", "gradients", "optimizer", "activations", "rest")
    for c in cols:
        t.add_column(c, justify="left" if not c else "right")
    for name, run in r["runs"].items():
        if "error" in run:
            t.add_row(name, run["error"], *[""] * (len(cols) - 2))
            continue
        m = run["memory_mib"]
        t.add_row(name, f"{run['step_ms']:.1f}",
                  *[("n/a" if m.get(k) is None else f"{m[k]:.0f}" if m[k] >= 100 else f"{m[k]:.2f}") for k in cols[2:]])
    con.print(t)
    con.print("memory in MiB; activations: what the selected layers keep for the backward pass "
              f"({r['runs'].get('planned', {}).get('layers', '')})")
    if r["report"]:
        for rule in r["report"]["rules"]:
            if rule["section"].startswith("memory"):
                con.print(f"  {rule['section']}[{rule['index']}] {rule['what']} at {rule['at']}: {rule['kernel']}"
                          + (f"; {rule['note']}" if rule["note"] else ""))
    ra = r["ratios"]
    if ra:
        parts = [f"step time {ra['step_time']:.2f}x"]
        for k in ("activations", "weights+gradients+optimizer", "peak"):
            if k in ra:
                parts.append(f"{k} {ra[k]:.2f}x")
        con.print("planned / unplanned: " + ", ".join(parts))
