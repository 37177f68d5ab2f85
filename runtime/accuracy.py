"""Accuracy of a model's logits against a reference's, on a fixed text: what apply, bench and
tune report when a plan changes numerics (number formats, fused kernels).

A *logits function* maps token ids [B, T] (int64) to logits [B, T, V] for full-sequence,
teacher-forced scoring: position t's logits predict token t + 1. `logits_fn_for(model)`
builds one for a built-in `Transformer`, a Hugging Face causal LM, or either wrapped by
`apply` (a `PlannedModel`).

`compare` and `score` walk the tokens in chunks of `chunk` positions; each chunk is scored
on its own (its first token sees no earlier context), and every position but the very last
is scored against the token after it, so chunking changes only the context the model sees.
Sums are accumulated in float64; logits are compared in float32.

The shipped evaluation text (`eval_tokens`) is held-out Python source, bytes as tokens: the
text `builtin:llama-tiny-trained` was evaluated on (never trained on). docs/ACCURACY.md
lists the numbers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .models.registry import DATA_DIR

EVAL_TEXT = DATA_DIR / "llama_tiny_trained_eval.txt"
DEFAULT_CHUNK = 256

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def eval_text_path() -> Path:
    """The shipped held-out evaluation text (Python source, read as bytes)."""
    return EVAL_TEXT


def eval_tokens(device=None, max_tokens: Optional[int] = None) -> torch.Tensor:
    """The shipped evaluation text as byte tokens: a LongTensor [1, T] on `device` (default
    CPU), the first `max_tokens` bytes when given."""
    data = EVAL_TEXT.read_bytes()
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens={max_tokens}: scoring needs at least 2 tokens")
        data = data[:max_tokens]
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)
    return ids.unsqueeze(0).to(device or "cpu")


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference|| (Frobenius norms, float32 differences summed
    in float64); 0.0 when both are zero, inf when only the reference is."""
    if candidate.shape != reference.shape:
        raise ValueError(f"relative_error: shapes differ, {tuple(candidate.shape)} vs {tuple(reference.shape)}")
    ref = reference.detach().float()
    diff = candidate.detach().float() - ref
    num = diff.double().pow(2).sum().item()
    den = ref.double().pow(2).sum().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


@dataclass
class AccuracyResult:
    """Candidate logits against reference logits on `tokens` scored positions.

    rel_error: ||cand - ref|| / ||ref|| over all scored logits; max_abs_error: the largest
    |cand - ref|; kl: mean KL(ref || cand) of the next-token distributions (nats);
    top1_agreement: fraction of positions where both argmaxes agree; ppl_*: exp of the
    mean negative log-likelihood of the actual next tokens; acc_*: fraction of positions
    whose argmax is the actual next token.
    """

    rel_error: float
    max_abs_error: float
    kl: float
    top1_agreement: float
    ppl_reference: float
    ppl_candidate: float
    acc_reference: float
    acc_candidate: float
    tokens: int
    chunk: int

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"top-1 agreement {self.top1_agreement:.4f}, KL {self.kl:.3e}, "
                f"ppl {self.ppl_reference:.4f} -> {self.ppl_candidate:.4f}, "
                f"rel error {self.rel_error:.3e}, max abs {self.max_abs_error:.3e} "
                f"({self.tokens} tokens, chunk {self.chunk})")


@dataclass
class LMScore:
    """A model's logits against the text itself: next-token accuracy, perplexity and mean
    negative log-likelihood (nats; bits per token is nll / ln 2) over `tokens` positions."""

    accuracy: float
    ppl: float
    nll: float
    tokens: int
    chunk: int

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"next-token accuracy {self.accuracy:.4f}, ppl {self.ppl:.4f}, "
                f"{self.nll / math.log(2):.4f} bits/token ({self.tokens} tokens, chunk {self.chunk})")


def _check_tokens(tokens: torch.Tensor, chunk: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        what = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a LongTensor [B, T], not {what} (hint: eval_tokens() gives one)")
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens has {tokens.shape[1]} position(s); scoring needs at least 2")
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be at least 1")


def _chunks(logits_fns, tokens: torch.Tensor, chunk: int):
    """For each chunk: the scored logits of each function (float32, [B, n, V]) and the
    targets [B, n]. Position t is scored when t + 1 < T."""
    total = tokens.shape[1]
    for start in range(0, total - 1, chunk):
        ids = tokens[:, start:start + chunk]
        n = min(ids.shape[1], total - 1 - start)
        outs = []
        for fn in logits_fns:
            out = fn(ids)
            if out.dim() != 3 or out.shape[:2] != ids.shape:
                raise ValueError(f"a logits function returned {tuple(out.shape)} for ids {tuple(ids.shape)}; "
                                 "expected [B, T, V] (hint: logits_fn_for(model) builds one)")
            outs.append(out[:, :n].float())
        yield outs, tokens[:, start + 1:start + 1 + n]


@torch.no_grad()
def compare(reference_logits_fn: LogitsFn, candidate_logits_fn: LogitsFn, tokens: torch.Tensor, *,
            chunk: int = DEFAULT_CHUNK) -> AccuracyResult:
    """Score the candidate's logits against the reference's on `tokens` [B, T], teacher
    forced, `chunk` positions at a time (see the module docstring)."""
    _check_tokens(tokens, chunk)
    sq_diff = sq_ref = kl = nll_ref = nll_cand = 0.0
    agree = hit_ref = hit_cand = count = 0
    max_abs = 0.0
    for (ref, cand), target in _chunks((reference_logits_fn, candidate_logits_fn), tokens, chunk):
        if ref.shape != cand.shape:
            raise ValueError(f"reference logits {tuple(ref.shape)} and candidate logits {tuple(cand.shape)} differ")
        diff = cand - ref
        sq_diff += diff.double().pow(2).sum().item()
        sq_ref += ref.double().pow(2).sum().item()
        max_abs = max(max_abs, diff.abs().max().item())
        logp_ref, logp_cand = F.log_softmax(ref, dim=-1), F.log_softmax(cand, dim=-1)
        p_ref = logp_ref.exp()
        # 0 * log(0 / q) is 0: tokens the reference rules out add nothing.
        terms = torch.where(p_ref > 0, p_ref * (logp_ref - logp_cand), torch.zeros_like(p_ref))
        kl += terms.sum(-1).clamp_min(0).double().sum().item()  # rounding can dip just below 0
        top_ref, top_cand = ref.argmax(-1), cand.argmax(-1)
        agree += (top_ref == top_cand).sum().item()
        hit_ref += (top_ref == target).sum().item()
        hit_cand += (top_cand == target).sum().item()
        idx = target.unsqueeze(-1)
        nll_ref -= logp_ref.gather(-1, idx).double().sum().item()
        nll_cand -= logp_cand.gather(-1, idx).double().sum().item()
        count += target.numel()
    rel = math.sqrt(sq_diff / sq_ref) if sq_ref > 0 else (0.0 if sq_diff == 0 else math.inf)
    return AccuracyResult(rel_error=rel, max_abs_error=max_abs, kl=kl / count, top1_agreement=agree / count,
                          ppl_reference=_exp(nll_ref / count), ppl_candidate=_exp(nll_cand / count),
                          acc_reference=hit_ref / count, acc_candidate=hit_cand / count,
                          tokens=count, chunk=chunk)


@torch.no_grad()
def score(logits_fn: LogitsFn, tokens: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> LMScore:
    """Next-token accuracy and perplexity of `logits_fn` on `tokens` [B, T] itself."""
    _check_tokens(tokens, chunk)
    nll = 0.0
    hits = count = 0
    for (logits,), target in _chunks((logits_fn,), tokens, chunk):
        logp = F.log_softmax(logits, dim=-1)
        nll -= logp.gather(-1, target.unsqueeze(-1)).double().sum().item()
        hits += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return LMScore(accuracy=hits / count, ppl=_exp(nll / count), nll=nll / count, tokens=count, chunk=chunk)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def logits_fn_for(model: nn.Module) -> LogitsFn:
    """A logits function for `model`: a built-in `Transformer` (or a planned one) runs
    `model(ids, arange(T))`; a Hugging Face causal LM (or a planned one) runs
    `model(input_ids=ids, use_cache=False).logits`.

    A built-in model with static caches writes positions 0..T-1 of rows 0..B-1 on every
    call and attends only to positions <= each query's, so nothing of an earlier call is
    seen; caches that cannot hold [B, T] are an error (a planned model's graphs were built
    on them), a model without caches keeps no state at all.
    """
    if hasattr(model, "setup_caches"):
        def builtin_logits(ids: torch.Tensor) -> torch.Tensor:
            batch, length = ids.shape
            if getattr(model, "max_batch", 0) and not model.caches_fit(batch, length):
                raise ValueError(f"the model's KV caches hold {model.max_batch} x {model.max_seq_len} positions, "
                                 f"too few for a chunk of {batch} x {length} "
                                 "(hint: pass a smaller chunk, or call setup_caches before apply)")
            return model(ids, torch.arange(length, device=ids.device))
        return builtin_logits
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "forward"):
        def hf_logits(ids: torch.Tensor) -> torch.Tensor:
            out = model(input_ids=ids, use_cache=False)
            return out.logits if hasattr(out, "logits") else out[0]
        return hf_logits
    raise TypeError(f"logits_fn_for: {type(model).__name__} is neither a planlang Transformer nor a Hugging Face "
                    "causal LM (hint: pass your own function ids [B, T] -> logits [B, T, V])")
