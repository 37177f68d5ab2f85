"""`planlang bench`: decode and prefill timings of planned models beside eager and
torch.compile(reduce-overhead) of the same model, measured in one run, with the floor.

Decode is timed per bucket at a context (`--context`, 128 by default): the cache is
filled up to the context, then one step at that position is timed repeatedly (CUDA
events around each call, so launch and Python overhead count, as a user sees it).
The floor is the bytes one step must read (every weight once, the embedding only for the
rows looked up unless the LM head is tied to it, plus the KV cache up to the context),
over the copy bandwidth measured in the same run (`floor_ms`) and over the catalog's
figure for the device (`catalog_floor_ms`). Prefill (`--prefill` tokens at batch 1) is
timed for eager, compile and every plan. Each row carries the peak memory allocated while
it was measured (CUDA only; None on the CPU).

`graph_time_us` is the kernel benchmarks' (benchmarks/bench_*.py) one way of timing a list
of calls as CUDA-graph replays.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

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


GRAPH_STATS = {"median": statistics.median, "min": min}  # graph_time_us's `stat` values


def graph_time_us(calls: Sequence[Callable[[], object]], *, reps: int = 15, inner: int = 1, warmup: int = 3,
                  stat: str = "median", count: Optional[int] = None, eager_first: int = 0, side_warmup: int = 1,
                  queued: bool = False, eager_fallback: bool = False, outputs: Optional[list] = None,
                  device: Optional[torch.device] = None,
                  timer: Optional[Callable[[Callable[[], None]], float]] = None) -> float:
    """Microseconds per call of `calls`, captured back to back in one CUDA graph and replayed.

    In order:
      1. the first `eager_first` calls run once each on the current stream (compiling them);
      2. every call runs `side_warmup` times on a side stream (capture needs lazy set-up done);
      3. the calls are captured once each, in order, into one graph; if `outputs` is a list,
         their return values are appended (the graph's static outputs: when this returns
         they hold the last replay's results, and they stay valid after the graph is freed);
      4. `warmup` untimed replays, then a synchronize;
      5. `reps` samples, each `inner` back-to-back replays timed by `timer` (it runs the
         callable it is given and returns the microseconds that took; by default CUDA
         events around it on the current stream). With `queued`, each sample is queued
         behind one untimed replay, so the GPU is busy while the host launches the timed one.
    Each sample is divided by `inner` and by `count` (the calls one pass makes: len(calls),
    unless the calls loop themselves), and the `stat` ("median" or "min") of the samples is
    returned.

    Where the device is not CUDA, or capture fails, `eager_fallback=True` times the plain
    loop over `calls` instead, the same steps without graph (on the CPU: no streams, and
    perf_counter for the default timer; `outputs` gets the last timed pass's return values);
    without it a device that is not CUDA raises RuntimeError and a capture error propagates.
    The arguments are checked before anything runs. `device` defaults to the current CUDA
    device, or the CPU where there is no CUDA.
    """
    calls = list(calls)
    if not calls:
        raise ValueError("graph_time_us: no calls to time; pass a list of callables")
    count = len(calls) if count is None else count
    for name, value, least in (("reps", reps, 1), ("inner", inner, 1), ("count", count, 1),
                               ("warmup", warmup, 0), ("side_warmup", side_warmup, 0),
                               ("eager_first", eager_first, 0)):
        if value < least:
            raise ValueError(f"graph_time_us: {name}={value}; it must be at least {least}")
    if eager_first > len(calls):
        raise ValueError(f"graph_time_us: eager_first={eager_first} but only {len(calls)} call(s)")
    if stat not in GRAPH_STATS:
        raise ValueError(f"graph_time_us: stat={stat!r}; use one of {', '.join(GRAPH_STATS)}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if not cuda and not eager_fallback:
        raise RuntimeError(f"graph_time_us: CUDA graphs need a CUDA device, got {device}; "
                           "pass eager_fallback=True to time the calls eagerly instead")
    timer = timer or (_cuda_event_us if cuda else _perf_counter_us)
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    last = []  # the eager loop's latest return values, kept only when `outputs` asks

    def eager():
        if outputs is None:
            for c in calls:
                c()
        else:
            last[:] = [c() for c in calls]

    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        for c in calls[:eager_first]:
            c()
        synchronize()
        run = eager
        if not cuda:
            for _ in range(side_warmup):
                eager()
        else:
            try:
                graph, captured = _capture(calls, side_warmup, keep=outputs is not None)
                run = graph.replay
            except Exception:
                if not eager_fallback:
                    raise
            else:
                if outputs is not None:
                    outputs.extend(captured)
        for _ in range(warmup):
            run()
        synchronize()

        def sample():
            for _ in range(inner):
                run()
        times = []
        for _ in range(reps):
            if queued:
                run()
            times.append(timer(sample) / inner / count)
    if run is eager and outputs is not None:
        outputs.extend(last)
    return GRAPH_STATS[stat](times)


def _capture(calls: list, side_warmup: int, keep: bool):
    """(graph, the calls' return values if `keep`) of `calls` captured in order, after
    `side_warmup` passes on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(side_warmup):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    captured = []
    with torch.cuda.graph(graph):
        for c in calls:
            out = c()
            if keep:  # otherwise dropped at once, so later calls in the capture reuse its memory
                captured.append(out)
            del out
    return graph, captured


def _cuda_event_us(sample: Callable[[], None]) -> float:
    """Microseconds of sample() between two CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    sample()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def _perf_counter_us(sample: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    sample()
    return (time.perf_counter() - t0) * 1e6


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
    """One timing of a bench contender: a decode step at `batch`, or (with
    extra["prefill_tokens"]) a prefill of that many tokens at batch 1."""
    contender: str
    batch: int
    ms: float
    tokens_s: float
    floor_ratio: Optional[float] = None  # ms over the floor at the copy bandwidth measured in the run
    predicted_ms: Optional[float] = None
    extra: dict = field(default_factory=dict)  # floor_ms, catalog_floor_ms, plan_floor_ms or prefill_tokens
    peak_memory_mib: Optional[float] = None  # max_memory_allocated while the row was measured; None off CUDA


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
