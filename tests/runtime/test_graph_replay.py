"""CUDA-graph buckets (`graphs.capture: cuda_graph`, runtime/passes/graphs.py) against the
same planned model run eagerly, for every bucket and for the batches between buckets.

A decode step of batch B replays the graph of the smallest bucket b >= B: the tokens go
into rows 0..B-1 of the bucket's static token buffer, the position into the runner's
static position tensor, and the graph relaunches the kernels the planned forward launched
at capture time, at batch b. So the replay is compared with that planned forward
(`BucketRunner.forward`) run eagerly at batch b with the padding rows filled in: the same
kernels on the same shapes, bit for bit. Against the eager run at batch B itself (other
GEMM shapes), and against the unplanned model, the comparisons are tolerances.

Two variants of each built-in test, one test logic:
- `cuda-graphs` (GPU): llama-tiny-trained in bf16, planned and captured by `apply`;
- `cpu-emulated-graphs`: llama-tiny-trained in float32 on the CPU, where `apply` skips
  capture; the test wraps the planned forward in a `BucketRunner` whose graphs are
  `EmulatedGraph`s (replay reruns the captured call on the same static tensors), so the
  runner's own logic (bucket choice, padding, positions, over_max, output copies) runs.

Replays are counted by patching the graphs' `replay` (`watch_replays`), so a test that
compares a replay with an eager run knows a graph really ran.
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from typing import Callable, Optional

import pytest
import torch

from planlang.plan import Plan
from planlang.runtime.apply import apply
from planlang.runtime.models.registry import build_builtin
from planlang.runtime.passes.graphs import BucketGraph, BucketRunner, CacheGraphRunner, CaptureError
from .kernel_switch import kernels

MODEL = "llama-tiny-trained"
FUSIONS = ["rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention"]
BUCKETS = [1, 2, 4, 8]
BATCHES = range(1, 9)
BUCKET_OF = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}  # the smallest bucket holding the batch
BETWEEN = [3, 5, 6, 7]  # batches that run padded
OVER = 9  # above the largest bucket
ERROR_BUCKETS = [1, 2]  # the over_max: error plan (two buckets: a short capture)
MAX_BATCH = OVER  # the caches hold OVER rows, so over_max: eager can run it
PROMPT, STEPS, LONG_STEPS, MAX_SEQ = 4, 3, 8, 32
# The same planned model at another batch size (other GEMM shapes, so cuBLAS may choose
# another algorithm and accumulate in another order): bf16 roundings of a few elements
# differ by an ulp, which stays well under 1e-2 of the logits; float32 under 1e-5.
SAME_MODEL_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
# Planned against unplanned: every fused kernel rounds differently from eager PyTorch; two
# bf16 runs drift apart by about bf16's own error (the bound test_apply.py uses).
TWIN_TOL = {torch.bfloat16: 3e-2, torch.float32: 1e-5}

# ----------------------------------------------------------------------------- helpers

def make_plan(buckets, over_max: str, fusions=FUSIONS) -> Plan:
    plan, diags = Plan.from_document({"planlang": 1, "fusions": list(fusions),
                                      "graphs": {"capture": "cuda_graph", "buckets": list(buckets),
                                                 "over_max": over_max}})
    assert plan is not None, diags
    return plan


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def random_tokens(batch: int, seed: int, device, length: int = PROMPT + STEPS, vocab: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def decode(step: Callable, tokens: torch.Tensor, prompt: int = PROMPT) -> list[torch.Tensor]:
    """Prefill `prompt` tokens, then one token a step at positions given as device tensors;
    the logits of every call (copied)."""
    dev = tokens.device
    with torch.no_grad():
        out = [step(tokens[:, :prompt].contiguous(), torch.arange(prompt, device=dev)).clone()]
        for p in range(prompt, tokens.shape[1]):
            out.append(step(tokens[:, p:p + 1].contiguous(), torch.tensor([p], device=dev)).clone())
    return out


def decode_padded(eager: Callable, tokens: torch.Tensor, bucket: int, prompt: int = PROMPT) -> list[torch.Tensor]:
    """What the bucket's graph computes, run eagerly: the prefill at the real batch (the
    runner runs prefill eagerly), then every step at the bucket's size with token 0 in the
    padding rows; the real rows' logits."""
    batch, dev = tokens.shape[0], tokens.device
    pad = torch.zeros(bucket - batch, 1, dtype=tokens.dtype, device=dev)
    with torch.no_grad():
        out = [eager(tokens[:, :prompt].contiguous(), torch.arange(prompt, device=dev)).clone()]
        for p in range(prompt, tokens.shape[1]):
            step_tokens = torch.cat([tokens[:, p:p + 1], pad])
            out.append(eager(step_tokens, torch.tensor([p], device=dev))[:batch].clone())
    return out


def kv_caches(model) -> list[torch.Tensor]:
    """Every layer's key and value cache tensors (the ones the graphs write)."""
    return [t for block in model.layers for t in (block.attn.kv_cache.k_cache, block.attn.kv_cache.v_cache)]


def real_cache(model, batch: int, length: int) -> list[torch.Tensor]:
    """Copies of the cache entries real sequences own: rows 0..batch-1, positions 0..length-1."""
    return [c[:batch, :, :length].clone() for c in kv_caches(model)]


@contextlib.contextmanager
def watch_replays(runner: BucketRunner, before: Optional[Callable[[BucketGraph], None]] = None):
    """Record the bucket size of every graph replay while the block runs. `before(bucket)`
    runs just before each replay, after the runner has filled the static buffers."""
    by_id = {id(g.graph): g for g in runner.graphs.values()}
    seen: list = []
    with pytest.MonkeyPatch.context() as mp:
        for cls in {type(g.graph) for g in runner.graphs.values()}:
            def replay(graph, *args, _original=cls.replay, **kwargs):
                bucket = by_id.get(id(graph))
                seen.append(bucket.size if bucket is not None else None)
                if before is not None and bucket is not None:
                    before(bucket)
                return _original(graph, *args, **kwargs)
            mp.setattr(cls, "replay", replay)
        yield seen


def poison_output(bucket: BucketGraph) -> None:
    """NaN in the graph's static output: the replay must write every row the runner returns."""
    bucket.logits.fill_(float("nan"))


def garbage_padding(batch: int, seed: int, vocab: int) -> Callable[[BucketGraph], None]:
    """Random tokens in the bucket's padding rows (and NaN in its output) before every replay."""
    gen = torch.Generator().manual_seed(seed)

    def before(bucket: BucketGraph) -> None:
        poison_output(bucket)
        rows = bucket.size - batch
        if rows:
            bucket.tokens[batch:] = torch.randint(0, vocab, (rows, 1), generator=gen).to(bucket.tokens.device)
    return before


class EmulatedGraph:
    """A CUDA graph's contract without CUDA: `replay` reruns the captured call on the same
    static tensors (the bucket's token buffer, the runner's position tensor) and writes the
    same static output tensor."""

    def __init__(self, forward: Callable, tokens: torch.Tensor, pos: torch.Tensor):
        self.forward, self.tokens, self.pos = forward, tokens, pos
        with torch.no_grad():
            self.out = forward(tokens, pos).clone()

    def replay(self) -> None:
        with torch.no_grad():
            self.out.copy_(self.forward(self.tokens, self.pos))


def emulate_capture(runner: BucketRunner) -> None:
    """Fill `runner.graphs` as `BucketRunner.capture` does, with `EmulatedGraph`s (CPU)."""
    for size in sorted(runner.buckets, reverse=True):
        tokens = torch.zeros(size, 1, dtype=torch.long, device=runner.device)
        graph = EmulatedGraph(runner.forward, tokens, runner.pos)
        runner.graphs[size] = BucketGraph(size, graph, tokens, graph.out)


# ----------------------------------------------------------------------------- the planned built-in model

class BuiltinCase:
    """The built-in model planned with cuda_graph buckets, its unplanned twin (same
    weights), and three ways to run a step: `step` through the buckets, `eager` through
    the same planned forward without graphs, `twin` on the unplanned model."""

    def __init__(self, where: str, buckets: list[int], over_max: str):
        self.device = torch.device(where)
        self.emulated = self.device.type != "cuda"
        self.dtype = torch.float32 if self.emulated else torch.bfloat16
        # On the CPU the fused kernels' PyTorch reference runs (Triton's interpreter is slow).
        self.reference = self.emulated
        self.model = build_builtin(MODEL, device=self.device, dtype=self.dtype)
        self.unplanned = build_builtin(MODEL, device=self.device, dtype=self.dtype)
        self.unplanned.setup_caches(MAX_BATCH, MAX_SEQ)
        self.vocab = self.model.config.vocab_size
        plan = make_plan(buckets, over_max)
        with kernels(self.reference):
            self.planned = apply(self.model, plan, example_inputs=self.example_run,
                                 max_batch=MAX_BATCH, max_seq_len=MAX_SEQ)
            forward = self.planned._forward  # the bucket runner apply returns, or the planned forward
            if self.emulated:
                # as apply's _capture_graphs builds it, from the plan
                forward = BucketRunner(forward, plan.graphs.buckets, self.device, self.vocab,
                                       plan.graphs.over_max, plan.graphs.warmup)
                emulate_capture(forward)
        if not isinstance(forward, BucketRunner):
            pytest.fail(f"apply returned no bucket runner: {self.planned.report.notes}")
        self.runner = forward
        self.same_model_tol, self.twin_tol = SAME_MODEL_TOL[self.dtype], TWIN_TOL[self.dtype]

    def example_run(self, m) -> None:
        """What apply traces: a prefill and one decode step."""
        tok = random_tokens(2, seed=1, device=self.device, length=PROMPT + 1)
        with torch.no_grad():
            m(tok[:, :PROMPT], torch.arange(PROMPT, device=self.device))
            m(tok[:, PROMPT:], torch.tensor([PROMPT], device=self.device))

    def tokens(self, batch: int, seed: int, length: int = PROMPT + STEPS) -> torch.Tensor:
        return random_tokens(batch, seed, self.device, length, self.vocab)

    def step(self, tokens, input_pos):
        with kernels(self.reference):
            return (self.runner if self.emulated else self.planned)(tokens, input_pos)

    def eager(self, tokens, input_pos):
        with kernels(self.reference):
            return self.runner.forward(tokens, input_pos)

    def twin(self, tokens, input_pos):
        return self.unplanned(tokens, input_pos)

    def reset_caches(self) -> None:
        """Zero the caches in place: the graphs hold their addresses."""
        for c in kv_caches(self.model) + kv_caches(self.unplanned):
            c.zero_()


_CASES: dict = {}


def builtin_case(where: str, buckets=tuple(BUCKETS), over_max: str = "eager") -> BuiltinCase:
    """Built once per module run (apply traces with Dynamo, and captures on the GPU)."""
    key = (where, tuple(buckets), over_max)
    if key not in _CASES:
        _CASES[key] = BuiltinCase(where, list(buckets), over_max)
    return _CASES[key]


WHERE = [pytest.param("cuda", marks=pytest.mark.gpu, id="cuda-graphs"),
         pytest.param("cpu", id="cpu-emulated-graphs")]


@pytest.fixture(scope="module", params=WHERE)
def case(request) -> BuiltinCase:
    return builtin_case(request.param)


@pytest.fixture(scope="module", params=WHERE)
def error_case(request) -> BuiltinCase:
    return builtin_case(request.param, ERROR_BUCKETS, "error")


# ----------------------------------------------------------------------------- capture

@pytest.mark.gpu
def test_every_bucket_is_captured_builtin():
    case = builtin_case("cuda")
    graphs = case.planned.report.graphs
    assert graphs["buckets"] == BUCKETS, case.planned.report.notes
    assert graphs["failed"] == {}
    assert sorted(case.runner.graphs) == BUCKETS
    assert all(isinstance(g.graph, torch.cuda.CUDAGraph) for g in case.runner.graphs.values())


def test_apply_on_the_cpu_skips_capture_and_says_so():
    case = builtin_case("cpu")
    assert ("graphs: capture skipped: CUDA graphs need a CUDA device; the planned forward runs eagerly"
            in case.planned.report.notes)
    assert case.planned.report.graphs == {}
    assert not isinstance(case.planned._forward, BucketRunner)


def test_capture_refuses_a_device_that_is_not_cuda():
    runner = BucketRunner(lambda tokens, pos: tokens, [1, 2], torch.device("cpu"), vocab=256)
    with pytest.raises(CaptureError, match="CUDA graphs need a CUDA device"):
        runner.capture()


# ----------------------------------------------------------------------------- buckets and padding

def test_each_decode_batch_replays_the_smallest_bucket_that_holds_it_builtin(case):
    """Batches 1..8 replay buckets 1, 2, 4, 4, 8, 8, 8, 8, once per decode step; the
    prefill (more than one token) replays nothing."""
    for batch in BATCHES:
        case.reset_caches()
        with watch_replays(case.runner) as seen:
            decode(case.step, case.tokens(batch, seed=batch, length=PROMPT + 2))
        assert seen == [BUCKET_OF[batch]] * 2, f"batch {batch}"
    assert [case.runner.bucket_for(b) for b in (*BATCHES, OVER)] == [BUCKET_OF[b] for b in BATCHES] + [None]


def test_replay_equals_eager_for_every_bucket_and_between_buckets_builtin(case):
    """Every batch 1..8 (3, 5, 6 and 7 padded) against the planned forward run eagerly at the
    bucket's size: the graph replays exactly those kernel launches, so every step's logits
    are bit-identical. The static output is NaN before every replay."""
    for batch in BATCHES:
        bucket = BUCKET_OF[batch]
        tokens = case.tokens(batch, seed=100 + batch)
        case.reset_caches()
        with watch_replays(case.runner, before=poison_output) as seen:
            got = decode(case.step, tokens)
        case.reset_caches()
        want = decode_padded(case.eager, tokens, bucket)
        assert seen == [bucket] * STEPS, f"batch {batch}: decode steps must replay bucket {bucket}"
        for call, (g, w) in enumerate(zip(got, want)):
            assert g.shape == (batch, 1 if call else PROMPT, case.vocab)
            assert torch.isfinite(g).all(), f"batch {batch}, call {call}"
            assert torch.equal(g, w), f"batch {batch}, call {call}"


def test_padded_replay_matches_the_unpadded_eager_batch_within_rounding_builtin(case):
    """Batch B in a larger bucket against the planned forward run eagerly at batch B: the
    same kernels but other GEMM shapes (cuBLAS may pick another algorithm), so logits and
    the real rows' KV cache agree within rounding, not bit for bit."""
    length = PROMPT + STEPS
    for batch in BETWEEN:
        tokens = case.tokens(batch, seed=200 + batch)
        case.reset_caches()
        got = decode(case.step, tokens)
        got_cache = real_cache(case.model, batch, length)
        case.reset_caches()
        want = decode(case.eager, tokens)
        want_cache = real_cache(case.model, batch, length)
        for call, (g, w) in enumerate(zip(got, want)):
            assert rel_err(g, w) < case.same_model_tol, f"batch {batch}, call {call}"
        for i, (g, w) in enumerate(zip(got_cache, want_cache)):
            assert rel_err(g, w) < case.same_model_tol, f"batch {batch}, cache {i}"


def test_padding_rows_never_reach_real_rows_or_their_kv_cache_builtin(case):
    """Batch 3 decodes in bucket 4 twice, each time with other garbage in everything it does
    not own: random tokens written into the padding row just before every replay, and NaN
    (first run) or large random values (second run) in every cache row past the batch. The
    real rows' logits and KV cache entries are bit-identical in both runs and to the eager
    run at the bucket's size with clean padding, and cache rows past the bucket stay as
    they were: the bucket's graph writes no row it does not cover."""
    batch, bucket, length = 3, 4, PROMPT + STEPS
    tokens = case.tokens(batch, seed=300)
    runs = []
    for run, fill in enumerate((lambda c: c.fill_(float("nan")),
                                lambda c: c.copy_(torch.randn(c.shape, generator=torch.Generator().manual_seed(9))
                                                  .mul(100).to(c.dtype)))):
        case.reset_caches()
        for c in kv_caches(case.model):
            fill(c[batch:])
        past_bucket = [c[bucket:].clone() for c in kv_caches(case.model)]
        with watch_replays(case.runner, before=garbage_padding(batch, seed=10 + run, vocab=case.vocab)) as seen:
            logits = decode(case.step, tokens)
        assert seen == [bucket] * STEPS
        for before, c in zip(past_bucket, kv_caches(case.model)):
            assert same_bits(c[bucket:], before), f"run {run}: a row past the bucket changed"
        runs.append((logits, real_cache(case.model, batch, length)))
    case.reset_caches()
    clean = (decode_padded(case.eager, tokens, bucket), real_cache(case.model, batch, length))
    for run, (logits, cache) in enumerate(runs):
        for call, (g, w) in enumerate(zip(logits, clean[0])):
            assert torch.isfinite(g).all() and torch.equal(g, w), f"run {run}, call {call}"
        for i, (g, w) in enumerate(zip(cache, clean[1])):
            assert same_bits(g, w), f"run {run}, cache {i}"


def test_one_graph_serves_consecutive_positions_builtin(case):
    """Positions live in a device tensor the graph reads: LONG_STEPS consecutive steps of
    batch 3 replay bucket 4's one graph, each at its own position. Every step's logits are
    bit-identical to the eager run's, each step wrote its keys and values at its own
    position (the real rows' cache equals the eager run's there) and nothing past the last."""
    batch, bucket, length = 3, 4, PROMPT + LONG_STEPS
    tokens = case.tokens(batch, seed=400, length=length)
    case.reset_caches()
    with watch_replays(case.runner) as seen:
        got = decode(case.step, tokens)
    got_cache = [c[:batch].clone() for c in kv_caches(case.model)]
    case.reset_caches()
    want = decode_padded(case.eager, tokens, bucket)
    want_cache = [c[:batch].clone() for c in kv_caches(case.model)]
    assert seen == [bucket] * LONG_STEPS
    for call, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"call {call} (position {PROMPT + call - 1 if call else 'prefill'})"
    for i, (g, w) in enumerate(zip(got_cache, want_cache)):
        assert same_bits(g[:, :, :length], w[:, :, :length]), f"cache {i}"
        assert (g[:, :, length:] == 0).all(), f"cache {i}: written past position {length - 1}"


def test_replay_matches_the_unplanned_model_within_bf16_rounding_builtin(case):
    for batch in BATCHES:
        tokens = case.tokens(batch, seed=500 + batch)
        case.reset_caches()
        got, want = decode(case.step, tokens), decode(case.twin, tokens)
        for call, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype == case.dtype
            assert rel_err(g, w) < case.twin_tol, f"batch {batch}, call {call}"


def test_returned_logits_are_a_copy_of_the_static_output_builtin(case):
    """The next replay of the same graph overwrites its static output, not what the
    previous step returned."""
    tokens = case.tokens(4, seed=600)
    dev = case.device
    case.reset_caches()
    with torch.no_grad():
        case.step(tokens[:, :PROMPT].contiguous(), torch.arange(PROMPT, device=dev))
        first = case.step(tokens[:, PROMPT:PROMPT + 1].contiguous(), torch.tensor([PROMPT], device=dev))
        kept = first.clone()
        case.step(tokens[:, PROMPT + 1:PROMPT + 2].contiguous(), torch.tensor([PROMPT + 1], device=dev))
    assert first.data_ptr() != case.runner.graphs[4].logits.data_ptr()
    assert torch.equal(first, kept)


# ----------------------------------------------------------------------------- above the largest bucket

def test_over_max_eager_runs_a_batch_above_the_largest_bucket_eagerly_builtin(case):
    tokens = case.tokens(OVER, seed=700)
    case.reset_caches()
    with watch_replays(case.runner) as seen:
        got = decode(case.step, tokens)
    case.reset_caches()
    want, twin = decode(case.eager, tokens), decode(case.twin, tokens)
    assert seen == []
    for call, (g, w, t) in enumerate(zip(got, want, twin)):
        assert g.shape == (OVER, 1 if call else PROMPT, case.vocab)
        assert torch.equal(g, w), f"call {call}"
        assert rel_err(g, t) < case.twin_tol, f"call {call}"


def test_over_max_error_refuses_a_batch_above_the_largest_bucket_builtin(error_case):
    """A decode step of batch 3 on buckets 1, 2 with `over_max: error`: a ValueError that
    names the batch, the largest bucket and the setting, raised before the step runs."""
    case = error_case
    tokens = case.tokens(3, seed=800, length=1)
    case.reset_caches()
    before = [c.clone() for c in kv_caches(case.model)]
    with torch.no_grad(), watch_replays(case.runner) as seen, pytest.raises(ValueError) as err:
        case.step(tokens, torch.tensor([0], device=case.device))
    message = str(err.value)
    assert "batch 3" in message and "largest bucket (2)" in message and "over_max" in message, message
    assert seen == []
    assert all(same_bits(c, b) for c, b in zip(kv_caches(case.model), before))


# ----------------------------------------------------------------------------- a Hugging Face model
# A Hugging Face model takes its KV cache as an argument (a transformers.StaticCache of a fixed
# batch, holding its own positions as a device counter): `CacheGraphRunner` captures one
# graph per cache at its first decode step, and every later step on that cache replays it.

HF_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=64)
HF_FUSIONS = ["rmsnorm_residual", "qkv", "swiglu", "attention", {"kind": "rope_kvcache", "required": False}]


class HFCase:
    """A tiny LlamaForCausalLM built offline from a config, planned with cuda_graph buckets
    (on the CPU: the same runner with emulated graphs), and its unplanned twin."""

    def __init__(self, where: str):
        transformers = pytest.importorskip("transformers")
        self.transformers = transformers
        self.device = torch.device(where)
        self.emulated = self.device.type != "cuda"
        self.dtype = torch.float32 if self.emulated else torch.bfloat16
        self.model, self.twin = self.build(), self.build()
        self.config = self.model.config
        plan = make_plan(BUCKETS, "eager", HF_FUSIONS)
        with kernels(self.emulated):
            self.planned = apply(self.model, plan,
                                 example_inputs=lambda m: self.decode(m, self.tokens(2, seed=1, length=PROMPT + 1)))
        runner = self.planned._forward
        if self.emulated:  # as apply's _capture_graphs builds it on a GPU
            runner = CacheGraphRunner(runner, plan.graphs.buckets, self.device, plan.graphs.over_max,
                                      plan.graphs.warmup)
        if not isinstance(runner, CacheGraphRunner):
            pytest.fail(f"apply returned no cache graph runner: {self.planned.report.notes}")
        self.runner = runner

    def build(self):
        config = self.transformers.LlamaConfig(**HF_CONFIG)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        return self.transformers.LlamaForCausalLM(config).eval().to(self.device, self.dtype)

    def tokens(self, batch: int, seed: int, length: int = PROMPT + STEPS) -> torch.Tensor:
        return random_tokens(batch, seed, self.device, length, HF_CONFIG["vocab_size"])

    def cache(self, batch: int):
        cfg = self.config
        cache = self.transformers.StaticCache(config=cfg, max_cache_len=MAX_SEQ)
        cache.early_initialization(batch, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                                   self.dtype, self.device)
        return cache

    def decode(self, model, tokens: torch.Tensor, cache=None) -> list[torch.Tensor]:
        """Prefill, then one token a step over a static cache of the batch (a fresh one
        unless given), called as Hugging Face callers call a model; each call's logits."""
        cache = cache if cache is not None else self.cache(tokens.shape[0])
        with torch.no_grad(), kernels(self.emulated):
            out = [model(input_ids=tokens[:, :PROMPT].contiguous(), past_key_values=cache,
                         use_cache=True).logits.clone()]
            for p in range(PROMPT, tokens.shape[1]):
                out.append(model(input_ids=tokens[:, p:p + 1].contiguous(), past_key_values=cache,
                                 use_cache=True).logits.clone())
        return out


class EmulatedCUDAGraph:
    """torch.cuda.CUDAGraph's contract on the CPU for `CacheGraphRunner`: what runs inside
    `torch.cuda.graph(g)` is recorded as a call, `replay` reruns it (the same static
    tensors, the same cache object) and writes the captured output's logits in place."""

    current = None

    def __init__(self):
        self.call = None

    def replay(self):
        self.logits.copy_(self.call().logits)


@contextlib.contextmanager
def emulated_cuda_graphs():
    """Patch what CacheGraphRunner._capture uses from torch.cuda so it runs on the CPU."""
    class _Graph(contextlib.ContextDecorator):
        def __init__(self, graph, pool=None):
            self.graph = graph

        def __enter__(self):
            EmulatedCUDAGraph.current = self.graph
            return self

        def __exit__(self, *exc):
            EmulatedCUDAGraph.current = None
            return False

    class _Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, other):
            pass

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "CUDAGraph", EmulatedCUDAGraph)
        mp.setattr(torch.cuda, "graph", _Graph)
        mp.setattr(torch.cuda, "Stream", _Stream)
        mp.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        mp.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
        mp.setattr(torch.cuda, "graph_pool_handle", lambda: None)
        yield


def runner_forward_recording(runner: CacheGraphRunner):
    """Wrap the runner's forward so a call made while a graph is being 'captured' is
    recorded into that emulated graph instead of (as on a GPU) not running."""
    real = runner.forward

    def forward(*args, **kwargs):
        graph = EmulatedCUDAGraph.current
        if graph is None:
            return real(*args, **kwargs)
        # A CUDA graph holds raw addresses, not the cache object: hold it weakly, as it does.
        key = "past_key_values" if "past_key_values" in kwargs else "cache"
        ref, rest = weakref.ref(kwargs[key]), {k: v for k, v in kwargs.items() if k != key}
        graph.call = lambda: real(*args, **rest, **{key: ref()})
        out = real(*args, **kwargs)
        graph.logits = out.logits  # the static output a replay writes (not the output: it holds the cache)
        # A CUDA capture runs nothing: undo this call's effect on the cache positions.
        for layer in kwargs.get("past_key_values", kwargs.get("cache")).layers:
            layer.cumulative_length.sub_(kwargs["input_ids"].shape[1])
        return out
    runner.forward = forward
    return real


_HF: dict = {}

HF_WHERE = [pytest.param("cuda", marks=pytest.mark.gpu, id="cuda-graphs"),
            pytest.param("cpu", id="cpu-emulated-graphs")]


@pytest.fixture(scope="module", params=HF_WHERE)
def hf_case(request) -> HFCase:
    if request.param not in _HF:
        _HF[request.param] = HFCase(request.param)
    return _HF[request.param]


@contextlib.contextmanager
def hf_graphs(case: HFCase):
    """Count replays (and poison the static output before each); on the CPU, emulate."""
    seen = []
    with contextlib.ExitStack() as stack:
        real_forward = None
        if case.emulated:
            stack.enter_context(emulated_cuda_graphs())
            real_forward = runner_forward_recording(case.runner)
        cls = EmulatedCUDAGraph if case.emulated else torch.cuda.CUDAGraph
        original = cls.replay

        def replay(graph, *args, **kwargs):
            g = next((g for g in case.runner.graphs.values() if g.graph is graph), None)
            seen.append(g.batch if g is not None else None)
            if g is not None:
                g.output.logits.fill_(float("nan"))
            return original(graph, *args, **kwargs)
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        mp.setattr(cls, "replay", replay)
        try:
            yield seen
        finally:
            if real_forward is not None:
                case.runner.forward = real_forward


def test_the_report_says_graphs_are_captured_per_static_cache_hf(hf_case):
    if hf_case.emulated:
        pytest.skip("apply skips capture on the CPU")
    assert hf_case.planned.report.graphs["buckets"] == BUCKETS
    assert "per static cache" in hf_case.planned.report.graphs["capture"]


@pytest.mark.parametrize("batch", list(BATCHES))
def test_each_decode_step_replays_its_caches_graph_and_equals_eager_hf(hf_case, batch):
    """Every decode step on a cache replays the graph captured for that cache at its first
    decode step (the prefill runs eagerly); the logits equal those of the same planned
    forward run eagerly on a fresh cache bit for bit (the same kernels at the same shapes),
    for every batch up to the largest bucket."""
    tokens = hf_case.tokens(batch, seed=900 + batch)
    captures = hf_case.runner.captures
    with hf_graphs(hf_case) as seen:
        got = hf_case.decode(hf_case.runner, tokens)
    want = hf_case.decode(hf_case.runner.forward, tokens)
    assert hf_case.runner.captures == captures + 1
    assert seen == [batch] * STEPS
    for call, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), f"call {call}"
        assert torch.equal(g, w), f"batch {batch}, call {call}"


def test_the_warm_up_before_a_capture_leaves_the_caches_positions_alone_hf(hf_case):
    """Capture's warm-up runs advance a StaticCache's position counters; the runner puts
    them back, so the first replayed step writes the position after the prefill."""
    tokens = hf_case.tokens(2, seed=970)
    cache = hf_case.cache(2)
    with hf_graphs(hf_case), torch.no_grad(), kernels(hf_case.emulated):
        hf_case.runner(input_ids=tokens[:, :PROMPT].contiguous(), past_key_values=cache, use_cache=True)
        hf_case.runner(input_ids=tokens[:, PROMPT:PROMPT + 1].contiguous(), past_key_values=cache, use_cache=True)
    assert all(int(layer.cumulative_length) == PROMPT + 1 for layer in cache.layers)


def test_a_batch_above_the_largest_bucket_runs_eagerly_hf(hf_case):
    tokens = hf_case.tokens(OVER, seed=980)
    captures = hf_case.runner.captures
    with hf_graphs(hf_case) as seen:
        got = hf_case.decode(hf_case.runner, tokens)
    assert seen == [] and hf_case.runner.captures == captures
    want = hf_case.decode(hf_case.runner.forward, tokens)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_calls_a_graph_cannot_take_run_eagerly_hf(hf_case):
    """A prefill, a step with an attention mask, a dynamic cache: no capture, no replay."""
    tokens = hf_case.tokens(2, seed=990)
    captures = hf_case.runner.captures
    cache = hf_case.cache(2)
    with hf_graphs(hf_case) as seen, torch.no_grad(), kernels(hf_case.emulated):
        hf_case.runner(input_ids=tokens[:, :PROMPT].contiguous(), past_key_values=cache, use_cache=True)
        mask = torch.ones(2, PROMPT + 1, dtype=torch.long, device=hf_case.device)
        hf_case.runner(input_ids=tokens[:, PROMPT:PROMPT + 1].contiguous(), past_key_values=cache,
                       attention_mask=mask, use_cache=True)
        hf_case.runner(input_ids=tokens[:, :1].contiguous(), use_cache=True)  # a dynamic cache
    assert seen == [] and hf_case.runner.captures == captures


def test_returned_tensors_are_copies_of_the_static_output_hf(hf_case):
    """A step's logits stay as they were after the next step replays the same graph."""
    tokens = hf_case.tokens(2, seed=960)
    cache = hf_case.cache(2)
    with hf_graphs(hf_case) as seen, torch.no_grad(), kernels(hf_case.emulated):
        hf_case.runner(input_ids=tokens[:, :PROMPT].contiguous(), past_key_values=cache, use_cache=True)
        first = hf_case.runner(input_ids=tokens[:, PROMPT:PROMPT + 1].contiguous(), past_key_values=cache,
                               use_cache=True)
        kept = first.logits.clone()
        second = hf_case.runner(input_ids=tokens[:, PROMPT + 1:PROMPT + 2].contiguous(), past_key_values=cache,
                                use_cache=True)
    assert seen == [2, 2]
    assert same_bits(first.logits, kept) and not torch.equal(first.logits, second.logits)
    assert getattr(second, "past_key_values", getattr(second, "cache", None)) is cache


def test_a_cache_that_is_gone_takes_its_graph_with_it_hf(hf_case):
    """The runner keeps graphs per cache in a weak table: a finished generation's cache (and
    the KV tensors it holds) is not kept alive by its graph."""
    with hf_graphs(hf_case):
        hf_case.decode(hf_case.runner, hf_case.tokens(3, seed=965))  # its cache is dropped on return
    gc.collect()
    assert len(hf_case.runner.graphs) == 0


def test_a_failed_capture_restores_the_positions_and_is_not_retried_hf(hf_case, monkeypatch):
    tokens = hf_case.tokens(2, seed=975)
    cache = hf_case.cache(2)
    real, calls = hf_case.runner.forward, []

    def flaky(*args, **kwargs):  # the prefill and the first warm-up run; the second fails
        calls.append(kwargs["input_ids"].shape[1])
        if len(calls) == 3:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(*args, **kwargs)
    with hf_graphs(hf_case) as seen, torch.no_grad(), kernels(hf_case.emulated):
        monkeypatch.setattr(hf_case.runner, "forward", flaky)
        captures = hf_case.runner.captures
        hf_case.runner(input_ids=tokens[:, :PROMPT].contiguous(), past_key_values=cache, use_cache=True)
        step = hf_case.runner(input_ids=tokens[:, PROMPT:PROMPT + 1].contiguous(), past_key_values=cache,
                              use_cache=True)
        assert all(int(layer.cumulative_length) == PROMPT + 1 for layer in cache.layers)
        hf_case.runner(input_ids=tokens[:, PROMPT + 1:PROMPT + 2].contiguous(), past_key_values=cache,
                       use_cache=True)
        monkeypatch.setattr(hf_case.runner, "forward", real)
    assert seen == [] and hf_case.runner.captures == captures
    assert calls[3:] == [1, 1]  # the failed step and the next one ran eagerly, no second capture
    assert torch.isfinite(step.logits).all()
    assert 2 in hf_case.runner.report.failed


@pytest.mark.gpu
def test_hf_model_planned_with_cuda_graphs_decodes_like_its_unplanned_twin(hf_case):
    """The planned model, graphs and all, stays within bf16 rounding of the unplanned
    model's logits for every batch 1..8."""
    for batch in BATCHES:
        tokens = hf_case.tokens(batch, seed=950 + batch)
        got, want = hf_case.decode(hf_case.planned, tokens), hf_case.decode(hf_case.twin, tokens)
        for call, (g, w) in enumerate(zip(got, want)):
            assert torch.isfinite(g).all(), f"batch {batch}, call {call}"
            assert rel_err(g, w) < TWIN_TOL[hf_case.dtype], f"batch {batch}, call {call}"
