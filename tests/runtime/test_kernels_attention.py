"""The fused attention kernels (decode split-KV and prefill) against the reference and a
float64 loop written from the definition.

On a machine without CUDA the Triton kernels run under Triton's interpreter, at tiny
shapes: head dim 16/32, 4 query heads over 2 KV heads, contexts up to 70 positions read in
blocks of 16 so that every case spans several blocks (and several KV splits).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are defined (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from planlang.runtime.kernels import attention as attn_mod  # noqa: E402
from planlang.runtime.kernels.attention import attention, attention_reference  # noqa: E402
from planlang.runtime.kernels.backend import triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(DEVICE)[0], reason=triton_available(DEVICE)[1])
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Against the float64 definition: float32 agrees to rounding; half types round p (before
# P @ V) and the output.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2.5e-2, torch.float16: 3e-3}

FEATURES = {
    "plain": {},
    "softcap": {"softcap": 4.0},
    "window": {"window": 11},
    "sinks": {"sinks": True},
    "noncausal": {"causal": False},
    "everything": {"softcap": 3.0, "sinks": True, "window": 9},
}


def naive_attention_f64(q, k_cache, v_cache, input_pos, *, scale, softcap=None, sinks=None, window=None, causal=True):
    """The definition, one query at a time, in float64, reading only the visible keys."""
    B, T, Hq, D = q.shape
    group = Hq // k_cache.shape[1]
    filled = int(input_pos[-1]) + 1
    out = torch.empty(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p = int(input_pos[t])
            keys = [j for j in range(filled)
                    if (not causal or j <= p) and (window is None or p - j < window)]
            for h in range(Hq):
                k = k_cache[b, h // group, keys].double()
                v = v_cache[b, h // group, keys].double()
                s = (k @ q[b, t, h].double()) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                logits = s if sinks is None else torch.cat([s, sinks[h].double().view(1)])
                w = torch.softmax(logits, dim=0)[: len(keys)]
                out[b, t, h] = w @ v
    return out


def make_case(*, B=2, T=1, Hq=4, Hkv=2, D=16, S=80, last=69, dtype=torch.float32, sinks=False, seed=0):
    """Fresh random q and caches with garbage where the op must not look: positions past
    `last` hold NaN, cache rows past B hold huge keys and NaN values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    k = torch.randn(B + 1, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B + 1, Hkv, S, D, generator=g).to(dtype)
    k[:, :, last + 1:] = float("nan")
    v[:, :, last + 1:] = float("nan")
    k[B:] = 6e4
    v[B:] = float("nan")
    input_pos = torch.arange(last - T + 1, last + 1)
    sink_logits = torch.randn(Hq, generator=g) if sinks else None
    return q, k, v, input_pos, sink_logits


def to_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def run_kernel(q, k, v, input_pos, **kwargs):
    """The Triton launcher into a NaN-poisoned output, with blocks of 16 keys."""
    q, k, v, input_pos = to_device(q, k, v, input_pos)
    if kwargs.get("sinks") is not None:
        kwargs["sinks"] = kwargs["sinks"].to(DEVICE)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    attn_mod.attention_triton(q, k, v, input_pos, out=out, block_n=16, block_m=16, **kwargs)
    return out.cpu()


def assert_close(actual, expected, dtype):
    assert not torch.isnan(actual).any(), "the kernel left poisoned (NaN) outputs or read garbage"
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


def feature_kwargs(name, sink_logits):
    kwargs = dict(FEATURES[name])
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = sink_logits
    return kwargs


# ---------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_reference_matches_the_float64_definition(T, feature):
    q, k, v, pos, sinks = make_case(T=T, sinks=True)
    kwargs = feature_kwargs(feature, sinks)
    expected = naive_attention_f64(q, k, v, pos, scale=0.25, **kwargs)
    assert_close(attention_reference(q, k, v, pos, scale=0.25, **kwargs), expected, torch.float32)


# ---------------------------------------------------------------- the Triton kernels
@needs_triton
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_kernel_matches_the_definition_in_float32(T, feature):
    q, k, v, pos, sinks = make_case(T=T, D=32, sinks=True, seed=1)
    kwargs = feature_kwargs(feature, sinks)
    expected = naive_attention_f64(q, k, v, pos, scale=32 ** -0.5, **kwargs)
    assert_close(run_kernel(q, k, v, pos, scale=32 ** -0.5, **kwargs), expected, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("feature", ["plain", "everything"])
def test_kernel_matches_the_definition_in_half_types(dtype, T, feature):
    q, k, v, pos, sinks = make_case(T=T, dtype=dtype, sinks=True, seed=2)
    kwargs = feature_kwargs(feature, sinks)
    expected = naive_attention_f64(q, k, v, pos, scale=0.25, **kwargs)
    actual = run_kernel(q, k, v, pos, scale=0.25, **kwargs)
    assert actual.dtype == dtype
    assert_close(actual, expected, dtype)
    reference = attention_reference(q, k, v, pos, scale=0.25, **kwargs)
    assert_close(actual, reference, dtype)


@needs_triton
@pytest.mark.parametrize("fused_reduce", [True, False])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_gives_the_same_result_for_any_number_of_splits(num_splits, fused_reduce):
    # 8 splits of a 70-key context in blocks of 16: some splits are idle (fused: they do
    # nothing; separate reduce: their empty partials must weigh 0). min_chunk=16 lets the
    # fused path use them all; twice in a row, so the arrival counters must have been reset.
    q, k, v, pos, sinks = make_case(T=1, sinks=True, seed=3)
    kwargs = dict(scale=0.25, softcap=5.0, sinks=sinks)
    expected = naive_attention_f64(q, k, v, pos, **kwargs)
    for _ in range(2):
        actual = run_kernel(q, k, v, pos, num_splits=num_splits, fused_reduce=fused_reduce, min_chunk=16, **kwargs)
        assert_close(actual, expected, torch.float32)


@needs_triton
@pytest.mark.parametrize("merge_splits", [1, 2, 4, None])
@pytest.mark.parametrize("Hq", [4, 6])
def test_fused_merge_gives_the_same_result_for_any_tile_of_splits(merge_splits, Hq):
    # 5 working splits of a 70-key context (blocks of 16): tiles of 1, 2 and 4 splits leave a
    # partly filled last tile, None takes them all in one. Hq 6 over 2 KV heads: a group of
    # 3 heads padded to 4. Sinks join the merged denominator.
    q, k, v, pos, sinks = make_case(T=1, Hq=Hq, sinks=True, seed=21)
    kwargs = dict(scale=0.3, softcap=4.0, sinks=sinks)
    expected = naive_attention_f64(q, k, v, pos, **kwargs)
    for _ in range(2):  # the arrival counters are reset for the second launch
        actual = run_kernel(q, k, v, pos, num_splits=5, min_chunk=16, merge_splits=merge_splits, **kwargs)
        assert_close(actual, expected, torch.float32)


def test_merge_tile_fits_llama_1b_in_one_step_and_stays_a_power_of_two():
    pytest.importorskip("triton")
    # Llama-1B decode: up to 32 splits, group 4, head dim 64, 4 warps: 16 splits a step.
    assert attn_mod.merge_tile(32, 4, 64, 4) == dict(BLOCK_S=32, BLOCK_GM=4, MERGE_S=16)
    # A group of 16 heads at head dim 128: 2 splits a step; 32 heads (MQA-like): 1 (serial).
    assert attn_mod.merge_tile(24, 16, 128, 4) == dict(BLOCK_S=32, BLOCK_GM=16, MERGE_S=2)
    assert attn_mod.merge_tile(24, 32, 128, 4)["MERGE_S"] == 1
    # Never more than BLOCK_S; an explicit tile is rounded up to a power of two.
    assert attn_mod.merge_tile(3, 1, 16, 8)["MERGE_S"] == 4
    assert attn_mod.merge_tile(64, 4, 64, 4, merge_splits=3)["MERGE_S"] == 4


@needs_triton
def test_decode_short_context_uses_one_split_of_at_least_min_chunk_keys():
    # A 40-key window: one working split of the eight (min_chunk 64 or 256), writing the output itself.
    q, k, v, pos, sinks = make_case(T=1, sinks=True, seed=12)
    kwargs = dict(scale=0.25, sinks=sinks, window=40)
    expected = naive_attention_f64(q, k, v, pos, **kwargs)
    for min_chunk in (64, 256):
        assert_close(run_kernel(q, k, v, pos, num_splits=8, min_chunk=min_chunk, **kwargs), expected, torch.float32)


@needs_triton
def test_decode_at_position_zero_sees_only_its_own_key():
    q, k, v, pos, _ = make_case(T=1, last=0, seed=4)
    out = run_kernel(q, k, v, pos, scale=0.25)
    expected = v[:2, :, 0].double().repeat_interleave(2, dim=1)  # softmax over one key is 1
    assert_close(out[:, 0], expected, torch.float32)


@needs_triton
def test_prefill_from_position_zero_over_several_query_blocks():
    q, k, v, pos, _ = make_case(T=37, last=36, seed=5)
    expected = naive_attention_f64(q, k, v, pos, scale=0.25, window=13)
    assert_close(run_kernel(q, k, v, pos, scale=0.25, window=13), expected, torch.float32)


@needs_triton
def test_strided_query_and_output_views_are_honoured():
    q, k, v, pos, _ = make_case(T=5, seed=6)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] with H-major strides
    expected = naive_attention_f64(q, k, v, pos, scale=0.25)
    assert_close(run_kernel(q_view, k, v, pos, scale=0.25), expected, torch.float32)


# ---------------------------------------------------------------- the public op
def test_public_op_dispatches_and_returns_q_dtype_and_shape():
    q, k, v, pos, sinks = make_case(T=5, dtype=torch.bfloat16, sinks=True, seed=7)
    q, k, v, pos, sinks = to_device(q, k, v, pos, sinks)
    out = attention(q, k, v, pos, scale=0.25, softcap=3.0, sinks=sinks, window=9)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    expected = naive_attention_f64(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), scale=0.25, softcap=3.0,
                                   sinks=sinks.cpu(), window=9)
    assert_close(out.cpu(), expected, torch.bfloat16)


def test_custom_op_survives_torch_compile_without_graph_breaks():
    q, k, v, pos, sinks = to_device(*make_case(T=1, sinks=True, seed=8))

    def step(q, k, v, pos, sinks):
        return attention(q, k, v, pos, scale=0.25, softcap=5.0, sinks=sinks) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, pos, sinks), step(q, k, v, pos, sinks))


def test_custom_op_passes_opcheck():
    q, k, v, pos, sinks = to_device(*make_case(T=5, sinks=True, seed=9))
    # opcheck compares outputs across its runs with NaN-unaware checks: no NaN garbage here.
    k, v = k[:, :, :72].clone(), v[:, :, :72].clone()
    k[:, :, 70:], v[:, :, 70:] = 0.0, 0.0
    k[2:], v[2:] = 0.0, 0.0
    torch.library.opcheck(torch.ops.planlang.attention.default, (q, k, v, pos, 0.25, 4.0, sinks, 9, True))


@pytest.mark.parametrize("bad", ["head_dim", "batch", "groups", "positions", "sinks", "dtype"])
def test_shape_errors_are_refused_before_any_launch(bad):
    q, k, v, pos, sinks = make_case(T=5, sinks=True)
    if bad == "head_dim":
        q = q[..., :8]
    elif bad == "batch":
        q = torch.randn(4, 5, 4, 16)
    elif bad == "groups":
        q = torch.randn(2, 5, 3, 16)
    elif bad == "positions":
        pos = pos[:3]
    elif bad == "sinks":
        sinks = sinks[:2]
    else:
        q = q.half()
    with pytest.raises(ValueError, match="attention"):
        attention(q, k, v, pos, scale=0.25, sinks=sinks)


# ---------------------------------------------------------------- real shapes on a GPU
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 300])
def test_llama_1b_shapes_match_the_reference_on_gpu(T):
    B, Hq, Hkv, D, S, last = 4, 32, 8, 64, 4096, 2500
    q, k, v, pos, sinks = to_device(*make_case(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, S=S, last=last,
                                               dtype=torch.bfloat16, sinks=True, seed=10))
    kwargs = dict(scale=D ** -0.5, softcap=50.0, sinks=sinks, window=1024)
    out = attention(q, k, v, pos, **kwargs)
    assert_close(out.cpu(), attention_reference(q, k, v, pos, **kwargs).cpu(), torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_decode_replays_in_a_cuda_graph_at_new_positions():
    B, Hq, Hkv, D, S = 2, 32, 8, 64, 1024
    q, k, v, _, _ = to_device(*make_case(B=B, Hq=Hq, Hkv=Hkv, D=D, S=S, last=S - 1, dtype=torch.bfloat16, seed=11))
    pos = torch.tensor([5], device="cuda")
    attention(q, k, v, pos, scale=0.125, softcap=30.0)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, k, v, pos, scale=0.125, softcap=30.0)
    for p in (5, 700, 1023):
        pos.fill_(p)
        graph.replay()
        expected = attention_reference(q, k, v, pos, scale=0.125, softcap=30.0)
        assert_close(out.cpu(), expected.cpu(), torch.bfloat16)
