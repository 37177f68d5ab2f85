"""`memory.recompute` (training mode): activations of the selected modules are recomputed
in the backward pass instead of kept.

- `policy: full` wraps each selected module's forward in `torch.utils.checkpoint`
  (non-reentrant): only the module's inputs are kept, its whole forward runs again in the
  backward pass.
- `policy: selective` keeps the outputs of the op kinds listed in `save` and recomputes
  every other op, through PyTorch's selective activation checkpoint API
  (`create_selective_checkpoint_contexts` with a policy that returns `MUST_SAVE` for the
  kinds' aten ops). `save: [linear]` keeps the GEMM outputs (the expensive part) and
  recomputes norms, activations, RoPE and attention.

  When `save` names only GEMMs on weights (`linear`, `lm_head`), the same policy runs
  without a dispatch mode over every op: the checkpoint's `context_fn` gives two contexts
  in which each `nn.Linear` of the module keeps its output in the forward pass, and in the
  recomputation runs under a dispatch mode that lives only for that call and hands the kept
  output back for its GEMM (autograd records and saves exactly what the forward pass did).
  In eager mode SAC's Python dispatch of every op made llama-1b's forward CPU-bound (+34%
  step time, against +20% for full recompute, on an H100); this path drops that cost.

RNG state is saved and restored around the recomputation (dropout draws the same mask).
In inference mode nothing changes and the report says so (lint warns, PL305).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from planlang import names

_SDPA = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
         "_efficient_attention_forward")

# planlang op kind -> the aten ops whose outputs `save` keeps. The op kind is a property of
# the computation, and one aten op can serve several kinds: a GEMM on weights is `mm` or
# `addmm` whether it is a linear or the LM head, and `bmm` is every batched matmul.
OP_KIND_ATEN: dict[str, tuple[str, ...]] = {
    "linear": ("mm", "addmm", "_scaled_mm"),
    "lm_head": ("mm", "addmm", "_scaled_mm"),
    "matmul": ("bmm", "baddbmm"),
    "qk": ("bmm", "baddbmm"),
    "pv": ("bmm", "baddbmm"),
    "attention": _SDPA,
    "softmax": ("_softmax", "_safe_softmax", "_log_softmax"),
    "norm": ("native_layer_norm", "_fused_rms_norm", "native_group_norm", "native_batch_norm"),
    "act": ("silu", "gelu", "relu", "sigmoid", "tanh", "hardswish", "mish"),
    "embedding": ("embedding",),
    "kv_cache": (),  # cache writes are in-place updates: there is no output to keep
}
# planlang's own custom ops of each kind (they run in inference graphs; listed for completeness).
_PLANLANG_OPS = {"linear": ("linear", "qkv_linear", "swiglu_linear"), "attention": ("attention",),
                 "norm": ("rmsnorm", "rmsnorm_residual")}
assert set(OP_KIND_ATEN) == set(names.OP_KINDS), "every op kind maps to aten ops"


def saved_ops(kinds: list[str]) -> set:
    """The op overload packets whose outputs a selective policy keeps for these op kinds
    (ops this torch build lacks are left out)."""
    out = set()
    for kind in kinds:
        for name in OP_KIND_ATEN.get(kind, ()):
            op = getattr(torch.ops.aten, name, None)
            if op is not None:
                out.add(op)
        for name in _PLANLANG_OPS.get(kind, ()):
            if hasattr(torch.ops, "planlang") and hasattr(torch.ops.planlang, name):
                out.add(getattr(torch.ops.planlang, name))
    return out


def selective_policy(kinds: list[str]):
    """The SAC policy function: MUST_SAVE for the listed kinds' ops, PREFER_RECOMPUTE else."""
    keep = saved_ops(kinds)

    def policy(ctx, op, *args, **kwargs):
        packet = getattr(op, "overloadpacket", op)
        return CheckpointPolicy.MUST_SAVE if packet in keep else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


# ----------------------------------------------------------------------------- kept linears

GEMM_KINDS = {"linear", "lm_head"}
_KEEP: contextvars.ContextVar = contextvars.ContextVar("planlang_keep_linears", default=None)


class _ReplayGemm(TorchDispatchMode):
    """Around one linear's call in the recomputation: its GEMM returns the output kept in
    the forward pass instead of running. Autograd above records the same nodes and saves
    the same tensors as in the forward pass (the checkpoint matches them one by one)."""

    def __init__(self, kept: torch.Tensor):
        super().__init__()
        self.kept = kept
        self.done = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.done and getattr(func, "overloadpacket", None) in _GEMMS:
            mat1, mat2 = (args[1], args[2]) if func.overloadpacket is torch.ops.aten.addmm else (args[0], args[1])
            shape = (mat1.shape[0], mat2.shape[1])
            if self.kept.numel() == shape[0] * shape[1] and self.kept.dtype == mat1.dtype:
                self.done = True
                return self.kept.view(shape)
        return func(*args, **kwargs)


_GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm}


class _KeepLinears(contextlib.AbstractContextManager):
    """The checkpoint context of one region: in the forward pass (`recompute=False`) each
    wrapped linear appends its output to `kept`; in the recomputation it takes them back
    in the same order."""

    def __init__(self, kept: list, recompute: bool):
        self.kept, self.recompute = kept, recompute
        self.cursor = [0]

    def __enter__(self):
        self.token = _KEEP.set(self)
        self.cursor[0] = 0
        return self

    def __exit__(self, *exc):
        _KEEP.reset(self.token)
        return False


def _keep_contexts():
    kept: list = []
    return _KeepLinears(kept, recompute=False), _KeepLinears(kept, recompute=True)


def _keeping_linear(module: nn.Linear, forward):
    @functools.wraps(forward)
    def run(x):
        ctx = _KEEP.get()
        if ctx is None:
            return forward(x)
        if not ctx.recompute:
            y = forward(x)
            ctx.kept.append((y.detach(), y._version))
            return y
        i = ctx.cursor[0]
        ctx.cursor[0] += 1
        y, version = ctx.kept[i]
        if y._version != version:
            raise RuntimeError("selective recompute: the output of a linear in this module was changed in place "
                               "after it was kept; use policy full for this module")
        with _ReplayGemm(y):
            return forward(x)
    return run


def _checkpointed(module: nn.Module, forward, policy: str, save: list[str]):
    context_fn = None
    if policy == "selective":
        context_fn = (_keep_contexts if save and set(save) <= GEMM_KINDS else
                      functools.partial(create_selective_checkpoint_contexts, selective_policy(save)))

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)
    return run


def remove_recompute(model: nn.Module) -> int:
    """Undo `apply_recompute` on every module of `model`; returns how many it restored."""
    n = 0
    for mod in model.modules():
        orig = mod.__dict__.pop("_planlang_forward", None)
        if orig is not None:
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop("_planlang_recompute", None)
            n += 1
    return n


def recompute_units(model: nn.Module, plan) -> dict[str, tuple[int, Any]]:
    """Module path -> (rule index, rule) for every module a recompute rule takes: the
    outermost modules the selectors name (the later rule wins a module two rules name)."""
    from . import outermost_owners
    return {n: (i, plan.memory.recompute[i]) for n, i in outermost_owners(model, plan.memory.recompute).items()}


def apply_recompute(model: nn.Module, plan, report, source) -> dict[str, str]:
    """Training: wrap each selected module's forward in a checkpoint of its rule's policy.
    Inference: a report note, nothing else. Returns module path -> policy applied. A
    recomputed module may hold offloaded ones: the recomputation enters them again, and the
    ring fetches their weights again (the report says so)."""
    from ..apply import RuleReport
    if plan.mode != "training":
        if report is not None:
            report.notes.append("recompute: inference mode, nothing recomputed (recompute applies in training)")
            for i, rule in enumerate(plan.memory.recompute):
                report.rules.append(RuleReport("memory.recompute", i, rule.policy, rule.at, [], "none",
                                               "inference mode: nothing to recompute"))
        return {}
    remove_recompute(model)
    units = recompute_units(model, plan)
    mods = dict(model.named_modules())
    from .offload import offloaded_modules
    streamed = offloaded_modules()
    enclosed = {path: [n for n, m in mods.items() if m in streamed and n.startswith(path + ".")] for path in units}
    done: dict[str, str] = {}
    by_rule: dict[int, list[str]] = {}
    head = _lm_head(model)
    for path, (i, rule) in units.items():
        mod = mods[path]
        save = list(rule.save)
        if rule.policy == "selective" and save and set(save) <= GEMM_KINDS:
            for sub in mod.modules():
                kind = "lm_head" if sub is head else "linear"
                if isinstance(sub, nn.Linear) and sub is not mod and kind in save:
                    sub._planlang_forward = sub.forward
                    sub.forward = _keeping_linear(sub, sub.forward)
        forward = mod.forward
        mod._planlang_forward = forward
        mod._planlang_recompute = (rule.policy, save)
        mod.forward = _checkpointed(mod, forward, rule.policy, save)
        done[path] = rule.policy
        by_rule.setdefault(i, []).append(path)
    if report is not None:
        for i, rule in enumerate(plan.memory.recompute):
            if rule.policy == "selective" and rule.save and set(rule.save) <= GEMM_KINDS:
                kernel = ("selective checkpoint: the nn.Linear outputs are kept, the rest recomputed "
                          "(torch.utils.checkpoint, non-reentrant, with planlang's context_fn)")
            elif rule.policy == "selective":
                ops = sorted({getattr(o, "__name__", str(o)).replace(".default", "") for o in saved_ops(list(rule.save))})
                kernel = ("selective checkpoint, keeps " + (", ".join(ops) if ops else "nothing")
                          + " (torch.utils.checkpoint.create_selective_checkpoint_contexts)")
            else:
                kernel = "torch.utils.checkpoint (non-reentrant), RNG state preserved"
            note = ""
            if rule.policy == "full" and rule.save:
                note = "save is for policy selective; full keeps only the module inputs"
            if "kv_cache" in rule.save:
                note = "kv_cache writes are in place: nothing to keep for them"
            inner = [n for p in by_rule.get(i, []) for n in enclosed.get(p, [])]
            if inner:
                note = (note + "; " if note else "") + (
                    f"encloses {len(inner)} offloaded module(s) ({inner[0]}, ...): the recomputation fetches "
                    "their weights again in the backward pass")
            report.rules.append(RuleReport("memory.recompute", i, rule.policy, rule.at, by_rule.get(i, []), kernel, note))
    return done


def _lm_head(model: nn.Module) -> Optional[nn.Module]:
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    return head


def recompute_of(module: nn.Module) -> Optional[tuple[str, list[str]]]:
    """(policy, save) when `module` is wrapped by apply_recompute, else None."""
    return module.__dict__.get("_planlang_recompute")
