"""`planlang bench`: decode and prefill timings of planned models beside eager and
torch.compile(reduce-overhead) of the same model, measured in one run, with the floor.

Decode is timed per bucket at a context (`--context`, 128 by default): the cache is
filled up to the context, then one step at that position is timed repeatedly (CUDA
events around each call, so launch and Python overhead count, as a user sees it).
The floor is the bytes one step must read (every weight once, the embedding only for the
rows looked up unless the LM head is tied to it, plus the KV cache up to the context),
over the copy bandwidth measured in the same run (and over the catalog's figure).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


def copy_bandwidth_gbs(device: torch.device, size: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy_ of `size` bytes: (read + write) / median time, GB/s."""
    if device.type != "cuda":
        x = torch.empty(size // 8, dtype=torch.uint8)
        y = torch.empty_like(x)
        import time
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            y.copy_(x)
            ts.append(time.perf_counter() - t0)
        return 2 * x.numel() / statistics.median(ts) / 1e9
    x = torch.empty(size, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del x, y
    return 2 * size / statistics.median(times) / 1e9


def time_ms(fn: Callable, device: torch.device, reps: int = 50, warmup: int = 5) -> float:
    """Median time of fn() in ms: CUDA events around each call (host overhead included)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        import time
        ts = []
        for _ in range(max(3, reps // 10)):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def step_bytes(model, batch: int, context: int, weight_bytes: Optional[float] = None) -> float:
    """Bytes one decode step must read: weights once (embedding rows only, unless tied to
    the LM head, which reads it whole), and the KV cache up to `context`."""
    cfg = model.config
    seen, total = set(), 0
    embed = model.embed.weight
    tied = model.lm_head.weight is embed
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is embed and not tied:
            total += batch * p.shape[1] * p.element_size()
            continue
        total += p.numel() * p.element_size()
    if weight_bytes is not None:
        total = weight_bytes
    cache = model.layers[0].attn.kv_cache.k_cache
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * batch * cache.element_size()
    return float(total + kv)


@dataclass
class Row:
    contender: str
    batch: int
    ms: float
    tokens_s: float
    floor_ratio: Optional[float] = None
    predicted_ms: Optional[float] = None
    extra: dict = field(default_factory=dict)


def fill_cache(model_call: Callable, batch: int, context: int, vocab: int, device) -> None:
    """Write `context` positions of the cache for `batch` rows (chunks of at most 512)."""
    gen = torch.Generator().manual_seed(0)
    pos = 0
    with torch.no_grad():
        while pos < context:
            n = min(512, context - pos)
            toks = torch.randint(0, vocab, (batch, n), generator=gen).to(device)
            model_call(toks, torch.arange(pos, pos + n, device=device))
            pos += n


def decode_step(fn: Callable, batch: int, context: int, vocab: int, device) -> Callable:
    tok = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(1)).to(device)
    pos = torch.tensor([context], device=device)

    def step():
        with torch.no_grad():
            return fn(tok, pos)
    return step
