"""CUDA-graph capture buckets (`graphs.capture: cuda_graph`).

One graph per bucket, all sharing one memory pool, each replaying one decode step of the
planned model for a batch of that size. A batch runs on the smallest bucket that holds
it: its tokens go into rows 0..B-1 of the bucket's static token buffer, rows B.. are
padding. Real sequences own cache rows 0..B-1, so padding rows write only into cache rows
that no real sequence of this step owns, and their logits are never returned. Positions
live in a static device tensor, so one graph serves every step; prefill (more than one
token) runs eagerly through the same planned forward.

Models that take their KV cache as an argument (Hugging Face causal LMs over a
`transformers.StaticCache`, whose layers hold their own positions as a device counter) run
through `CacheGraphRunner` instead: such a cache has a fixed batch, so there is no padding
to a bucket; a decode step on a cache replays the graph captured for that cache at its
first decode step (batches up to the largest bucket; `over_max` above it).
"""
from __future__ import annotations

import copy
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import fx


class CaptureError(RuntimeError):
    """A bucket could not be captured; names the bucket and the cause."""


# ----------------------------------------------------------------------------- naming a failure
class _Blame(threading.local):
    """While `active`, the planned graphs (`traced_call`) run node by node and `node` is the
    last one started: after a failed capture, the node (module path, op) that failed."""
    active = False
    node = None


BLAME = _Blame()


class _NodeTracker(fx.Interpreter):
    def run_node(self, n):
        BLAME.node = n
        return super().run_node(n)


def traced_call(gm: fx.GraphModule, fn: Callable) -> Callable:
    """`fn` (gm's compiled forward) as the planned forward calls it; run through
    `_NodeTracker` instead while BLAME is active (only when a capture failed: never in a
    replay or an ordinary eager step)."""
    def call(*args):
        if BLAME.active:
            return _NodeTracker(gm).run(*args)
        return fn(*args)
    return call


_OWN_CODE = ("/torch/", "/planlang/runtime/", "/runtime/passes/", "/runtime/kernels/", "<eval_with_key")


def _op_name(node) -> str:
    target = node.target
    if node.op == "call_function":
        return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
    return f"{node.op} {target}"


def blame(run: Callable[[], object]) -> Optional[str]:
    """Run `run` (one failing capture attempt) with the planned graphs tracked node by node;
    returns where it failed, "layers.3.attn (aten._local_scalar_dense.default)", or for code
    outside the traced graphs (a graph break) the innermost frame of the model's own source,
    "model.py:120 in forward"; None when the attempt did not fail."""
    from .graph import node_module
    BLAME.active, BLAME.node = True, None
    try:
        run()
    except Exception as exc:  # the failure being located
        node = BLAME.node
        if node is not None:
            return f"{node_module(node) or 'the model top level'} ({_op_name(node)})"
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not any(o in f.filename for o in _OWN_CODE)]
        if frames:
            f = frames[-1]
            return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}"
        return "an unknown place (no traced node or model frame in the traceback)"
    finally:
        BLAME.active, BLAME.node = False, None
    return None


@dataclass
class BucketGraph:
    size: int
    graph: "torch.cuda.CUDAGraph"
    tokens: torch.Tensor     # [size, 1] static input
    logits: torch.Tensor     # [size, 1, vocab] static output


@dataclass
class CaptureReport:
    buckets: list[int]
    capture_s: float = 0.0
    pool_mib: float = 0.0
    failed: dict = field(default_factory=dict)


class BucketRunner:
    """Replays the captured decode step for batches up to the largest bucket.

    `__call__(tokens [B, T], input_pos [T])`: T == 1 and B <= max bucket replays a graph;
    anything else runs `eager` (or raises, when `over_max` is "error" and B is too big).
    """

    def __init__(self, forward: Callable, buckets: list[int], device: torch.device, vocab: int,
                 over_max: str = "eager", warmup: int = 3):
        self.forward = forward
        self.buckets = sorted(buckets)
        self.device = device
        self.vocab = vocab
        self.over_max = over_max
        self.warmup = max(1, warmup)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, BucketGraph] = {}
        self.pool = None
        self.report = CaptureReport(self.buckets)

    def bucket_for(self, batch: int) -> Optional[int]:
        return next((b for b in self.buckets if b >= batch), None)

    @torch.no_grad()
    def capture(self, start_pos: int = 0) -> CaptureReport:
        """Capture every bucket (largest first, so the pool is sized once). Positions used
        for warm-up write cache slots at `start_pos`, which the first real step overwrites."""
        if self.device.type != "cuda":
            raise CaptureError("CUDA graphs need a CUDA device")
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.pos.fill_(start_pos)
        stream = torch.cuda.Stream(self.device)
        for size in sorted(self.buckets, reverse=True):
            tokens = torch.zeros(size, 1, dtype=torch.long, device=self.device)
            try:
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(self.warmup):
                        self.forward(tokens, self.pos)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    logits = self.forward(tokens, self.pos)
            except Exception as exc:  # a host sync, a dynamic shape, an uncapturable op
                why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
                torch.cuda.synchronize(self.device)
                where = self._blame(size)
                self.report.failed[size] = f"at {where}: {why}" if where else why
                continue
            self.graphs[size] = BucketGraph(size, graph, tokens, logits)
        torch.cuda.synchronize(self.device)
        self.report.capture_s = time.perf_counter() - t0
        self.report.pool_mib = (torch.cuda.memory_allocated(self.device) - before) / 2**20
        if self.report.failed and not self.graphs:
            size, why = next(iter(self.report.failed.items()))
            raise CaptureError(f"capturing bucket {size} failed: {why}")
        return self.report

    def _blame(self, size: int) -> Optional[str]:
        """The module and op where capturing bucket `size` fails (a second, throwaway
        capture with the graphs run node by node), or None."""
        tokens = torch.zeros(size, 1, dtype=torch.long, device=self.device)

        def attempt():
            try:
                with torch.cuda.graph(torch.cuda.CUDAGraph()):
                    self.forward(tokens, self.pos)
            finally:
                torch.cuda.synchronize(self.device)
        try:
            return blame(attempt)
        except Exception:  # never let naming the failure hide it
            return None

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        batch, steps = tokens.shape
        bucket = self.bucket_for(batch) if steps == 1 and not args and not kwargs else None
        g = self.graphs.get(bucket) if bucket is not None else None
        if g is None:
            if steps == 1 and bucket is None and self.over_max == "error":
                raise ValueError(f"batch {batch} is larger than the largest bucket ({self.buckets[-1]}) "
                                 "and graphs.over_max is error")
            return self.forward(tokens, input_pos, *args, **kwargs)
        g.tokens[:batch].copy_(tokens)
        if batch < bucket:
            g.tokens[batch:].zero_()
        self.pos.copy_(input_pos.reshape(1))
        g.graph.replay()
        return g.logits[:batch].clone()


def _cache_layers(cache) -> Optional[list]:
    """The layers of a static cache a graph can take: every layer's tensors and device-side
    position counter exist, and no layer decides anything on the host (a sliding-window
    layer branches on a host-side length, which a replay would never advance; an
    offloading cache moves tensors between devices). Else None."""
    layers = getattr(cache, "layers", None)
    if not layers or type(cache).__name__ != "StaticCache" or getattr(cache, "offloading", False):
        return None
    for layer in layers:
        if not getattr(layer, "is_initialized", False) or not hasattr(layer, "cumulative_length"):
            return None
        if getattr(layer, "is_sliding", False) or hasattr(layer, "cumulative_length_int"):
            return None
    return list(layers)


def _clone_outputs(value, cache):
    """The forward's output with every tensor cloned (the next replay overwrites the static
    ones) and the cache object passed through: tuples, lists and ModelOutput-like mappings."""
    if value is cache or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_outputs(v, cache) for v in value)
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):
        out = copy.copy(value)
        for k in list(value.keys()):
            out[k] = _clone_outputs(value[k], cache)
        return out
    return value


def _with_cache(value, placeholder, cache):
    """`value` with `placeholder` swapped for `cache` (both ways: the stored output must not
    hold the cache, or the weak table would keep every cache alive)."""
    if value is placeholder:
        return cache
    if isinstance(value, (tuple, list)):
        return type(value)(_with_cache(v, placeholder, cache) for v in value)
    if hasattr(value, "keys") and hasattr(value, "__getitem__") and not isinstance(value, torch.Tensor):
        out = copy.copy(value)
        for k in list(value.keys()):
            out[k] = _with_cache(value[k], placeholder, cache)
        return out
    return value


class _CacheSlot:
    """Stands for the cache inside a stored output."""


@dataclass
class CacheGraph:
    batch: int
    graph: "torch.cuda.CUDAGraph"
    input_ids: torch.Tensor   # [batch, 1] static input
    output: object            # what the forward returned at capture, the cache replaced by a slot
    kwargs: dict              # the call's other (non-tensor) arguments, which the graph bakes in


_FAILED = object()  # a cache whose capture failed: it runs eagerly from then on


class CacheGraphRunner:
    """CUDA graphs for a model called Hugging Face's way: `forward(input_ids=..., cache=...)`.

    A decode step (input_ids [B, 1], B <= the largest bucket, an initialized StaticCache
    without sliding-window or offloading layers, and no other tensor argument) replays the
    graph captured for that cache object at its first decode step: the cache's tensors and
    its device-side position counters are the graph's static state, so one graph serves
    every later step; the tokens are copied into the static input and every returned tensor
    is a copy. Warm-up runs before a capture would advance the cache's positions: they are
    restored, also when the capture fails (that cache then runs eagerly, without retrying).
    Anything else (prefill, `generate`, which passes positions and a mask as tensors, a
    batch above the largest bucket with over_max eager) runs the planned forward eagerly.
    Graphs of caches that are gone are dropped; all graphs share one memory pool.
    """

    def __init__(self, forward: Callable, buckets: list[int], device: torch.device,
                 over_max: str = "eager", warmup: int = 3):
        self.forward = forward
        self.buckets = sorted(buckets)
        self.device = device
        self.over_max = over_max
        self.warmup = max(1, warmup)
        self.graphs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self.pool = None
        self.report = CaptureReport(self.buckets)
        self.captures = 0

    def _decode_call(self, args, kwargs):
        """(input_ids, cache, its keyword, other kwargs) when the call is a decode step a graph
        can take, else None."""
        if args or "input_ids" not in kwargs:
            return None
        ids = kwargs["input_ids"]
        key = "cache" if "cache" in kwargs else "past_key_values"  # the name transformers < 5 used
        cache = kwargs.get(key)
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", key)}
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1 or ids.device != self.device:
            return None
        if _cache_layers(cache) is None or any(isinstance(v, torch.Tensor) for v in rest.values()):
            return None
        return ids, cache, key, rest

    def _capture(self, ids: torch.Tensor, cache, key: str, rest: dict) -> CacheGraph:
        layers = _cache_layers(cache)
        saved = [layer.cumulative_length.clone() for layer in layers]
        static_ids = ids.clone()
        call = dict(rest, input_ids=static_ids, **{key: cache})
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    self.forward(**call)
            torch.cuda.current_stream(self.device).wait_stream(stream)
        finally:  # the warm-ups advanced the positions, also when one of them failed
            for layer, length in zip(layers, saved):
                layer.cumulative_length.copy_(length)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.forward(**call)
        self.report.capture_s += time.perf_counter() - t0
        self.captures += 1
        return CacheGraph(ids.shape[0], graph, static_ids, _with_cache(output, cache, _CacheSlot), dict(rest))

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        found = self._decode_call(args, kwargs)
        if found is None:
            return self.forward(*args, **kwargs)
        ids, cache, key, rest = found
        batch = ids.shape[0]
        if batch > self.buckets[-1]:
            if self.over_max == "error":
                raise ValueError(f"batch {batch} is larger than the largest bucket ({self.buckets[-1]}) "
                                 "and graphs.over_max is error")
            return self.forward(*args, **kwargs)
        g = self.graphs.get(cache)
        if g is _FAILED:
            return self.forward(*args, **kwargs)
        if g is None or g.batch != batch or g.kwargs != rest:
            try:
                g = self._capture(ids, cache, key, rest)
            except Exception as exc:  # a host sync, an uncapturable op: this cache runs eagerly
                self.report.failed[batch] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                self.graphs[cache] = _FAILED
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return self.forward(*args, **kwargs)
            self.graphs[cache] = g
        g.input_ids.copy_(ids)
        g.graph.replay()
        return _with_cache(_clone_outputs(g.output, _CacheSlot), _CacheSlot, cache)
