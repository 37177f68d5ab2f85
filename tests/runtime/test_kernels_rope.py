"""The fused rotary-embedding + KV-cache-write kernel against its reference.

The Triton path is checked against the plain-PyTorch reference and a float64 rotation, per
dtype. The caches start as NaN: the written entries must match, and every entry outside
the written positions (and batch rows past B) must still be NaN. Outputs the launcher
allocates start as NaN too. Without CUDA the kernel runs under Triton's interpreter.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # tests/conftest.py does the same; harmless twice
    os.environ.setdefault("TRITON_INTERPRET", "1")

from planlang.runtime.kernels import rope_kvcache as rope_mod  # noqa: E402
from planlang.runtime.kernels.backend import triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK, TRITON_WHY = triton_available(DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# dtype -> (max norm-wise relative error vs float64, rtol/atol vs the same-dtype reference)
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}


@pytest.fixture
def poisoned():
    """Every float tensor made by torch.empty during the test starts as NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


def rope_tables(max_seq, dim, base=10000.0):
    """HF-style tables: the frequencies repeated over both halves of the head dimension."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().to(DEVICE), emb.sin().float().to(DEVICE)


def make_step(b, t, hq, hkv, d, dtype, bmax, s, cache_dtype=None):
    """q, k, v as views of one fused projection (as qkv_linear leaves them), NaN caches,
    tables and T distinct, unordered positions."""
    fused = torch.randn(b, t, (hq + 2 * hkv) * d, device=DEVICE).to(dtype)
    q = fused[..., : hq * d].view(b, t, hq, d)
    k = fused[..., hq * d: (hq + hkv) * d].view(b, t, hkv, d)
    v = fused[..., (hq + hkv) * d:].view(b, t, hkv, d)
    cos, sin = rope_tables(s + 3, d)
    cache = torch.full((bmax, hkv, s, d), float("nan"), dtype=cache_dtype or dtype, device=DEVICE)
    pos = torch.randperm(s, device=DEVICE)[:t]
    return q, k, v, cos, sin, cache, cache.clone(), pos


def rotate64(x, cos, sin, pos):
    c, s = cos[pos].double()[:, None, :], sin[pos].double()[:, None, :]
    x1, x2 = x.double().chunk(2, dim=-1)
    return x.double() * c + torch.cat([-x2, x1], dim=-1) * s


def rel_err(out, ref64):
    return ((out.double() - ref64).norm() / ref64.norm()).item()


def check(out, ref, ref64, dtype):
    rel_tol, close_tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref64.shape and torch.isfinite(out).all()
    assert rel_err(out, ref64) < rel_tol
    torch.testing.assert_close(out, ref, rtol=close_tol, atol=close_tol * ref.float().abs().max().item())


def written_mask(cache, b, pos):
    """True at the cache entries a step of batch b at positions pos writes."""
    mask = torch.zeros(cache.shape, dtype=torch.bool, device=cache.device)
    mask[:b, :, pos] = True
    return mask


SHAPES = [  # (B, T, Hq, Hkv, D, Bmax, S)
    (1, 1, 4, 2, 8, 2, 6),  # decode
    (2, 3, 4, 2, 12, 3, 10),  # D/2 = 6: not a power of two
    (3, 5, 6, 3, 16, 3, 9),  # Hq, Hkv not powers of two; the batch fills the cache
    (1, 7, 2, 1, 8, 1, 7),  # prefill of the whole cache
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_kvcache_matches_reference_float64_and_writes_only_its_positions(poisoned, dtype, shape):
    b, t, hq, hkv, d, bmax, s = shape
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(b, t, hq, hkv, d, dtype, bmax, s)
    k_ref_cache, v_ref_cache = k_cache.clone(), v_cache.clone()
    q_rot, k_rot = rope_mod.rope_kvcache_triton(q, k, v, cos, sin, k_cache, v_cache, pos)
    q_ref, k_ref = rope_mod.rope_kvcache_reference(q, k, v, cos, sin, k_ref_cache, v_ref_cache, pos)

    check(q_rot, q_ref, rotate64(q, cos, sin, pos), dtype)
    check(k_rot, k_ref, rotate64(k, cos, sin, pos), dtype)
    written = written_mask(k_cache, b, pos)
    assert torch.isnan(k_cache[~written]).all() and torch.isnan(v_cache[~written]).all()
    assert torch.equal(k_cache[:b, :, pos], k_rot.transpose(1, 2)), "the cache holds k_rot itself"
    assert torch.equal(v_cache[:b, :, pos], v.transpose(1, 2)), "v is written unrotated"


@needs_triton
def test_rope_kvcache_casts_into_a_cache_of_another_dtype(poisoned):
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(2, 2, 2, 1, 8, torch.bfloat16, 2, 5,
                                                         cache_dtype=torch.float32)
    q_rot, k_rot = rope_mod.rope_kvcache_triton(q, k, v, cos, sin, k_cache, v_cache, pos)
    assert torch.equal(k_cache[:, :, pos], k_rot.transpose(1, 2).float())
    assert torch.equal(v_cache[:, :, pos], v.transpose(1, 2).float())


@needs_triton
def test_rope_kvcache_accepts_int32_positions(poisoned):
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(1, 3, 2, 1, 8, torch.float32, 1, 6)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    rope_mod.rope_kvcache_triton(q, k, v, cos, sin, k_cache, v_cache, pos.int())
    rope_mod.rope_kvcache_reference(q, k, v, cos, sin, k_ref, v_ref, pos)
    assert torch.equal(k_cache.nan_to_num(), k_ref.nan_to_num())


@needs_triton
def test_rope_kvcache_kernel_skips_cache_writes_at_out_of_range_positions():
    q, k, v, cos, sin, k_cache, v_cache, _ = make_step(1, 2, 2, 1, 8, torch.float32, 1, 4)
    pos = torch.tensor([1, 4], device=DEVICE)  # 4 == S: outside the cache
    rope_mod.rope_kvcache_triton(q, k, v, cos, sin, k_cache, v_cache, pos)
    assert torch.isfinite(k_cache[0, :, 1]).all()
    assert torch.isnan(k_cache[0, :, [0, 2, 3]]).all()


def test_rope_kvcache_rejects_a_batch_larger_than_the_cache():
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(3, 1, 2, 1, 8, torch.float32, 2, 4)
    with pytest.raises(ValueError, match="Bmax"):
        rope_mod.rope_kvcache(q, k, v, cos, sin, k_cache, v_cache, pos)


def test_rope_kvcache_op_passes_opcheck():
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(2, 3, 2, 1, 8, torch.float32, 3, 6)
    k_cache.normal_()
    v_cache.normal_()
    torch.library.opcheck(torch.ops.planlang.rope_kvcache.default,
                          (q, k, v, cos, sin, k_cache, v_cache, pos))


def test_rope_kvcache_op_compiles_with_fullgraph_and_mutates_the_caches(monkeypatch):
    monkeypatch.setattr(rope_mod, "use_triton", lambda *tensors: False)  # the reference path

    def attention_input(fused, cos, sin, k_cache, v_cache, pos):
        q, k, v = fused.split([16, 8, 8], dim=-1)
        b, t = fused.shape[:2]
        return torch.ops.planlang.rope_kvcache(q.view(b, t, 2, 8), k.view(b, t, 1, 8), v.view(b, t, 1, 8),
                                               cos, sin, k_cache, v_cache, pos)

    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(2, 3, 2, 1, 8, torch.float32, 2, 6)
    fused = torch.randn(2, 3, 32, device=DEVICE)
    k_cache.zero_()
    v_cache.zero_()
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    want = attention_input(fused, cos, sin, k_eager, v_eager, pos)
    torch._dynamo.reset()
    got = torch.compile(attention_input, fullgraph=True, backend="aot_eager")(fused, cos, sin, k_cache, v_cache, pos)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)
    assert k_cache.abs().sum() > 0, "the compiled op wrote into the caller's cache"


# ----------------------------------------------------------------------------- per-token cos/sin
def token_rows(b, t, d, shared, base=10000.0):
    """cos/sin [1 or B, T, D] as Hugging Face's rotary embedding computes them from position
    ids (here random, distinct per batch row unless shared)."""
    ids = torch.randint(0, 50, (1 if shared else b, t), dtype=torch.float64)
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat([ids[..., None] * inv_freq] * 2, dim=-1)
    return emb.cos().float().to(DEVICE), emb.sin().float().to(DEVICE)


def rotate64_tokens(x, cos, sin):
    c, s = cos.double()[:, :, None, :], sin.double()[:, :, None, :]
    x1, x2 = x.double().chunk(2, dim=-1)
    return x.double() * c + torch.cat([-x2, x1], dim=-1) * s


@needs_triton
@pytest.mark.parametrize("shared", [True, False], ids=["shared-rows", "rows-per-batch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_kvcache_tokens_matches_reference_float64_and_writes_only_its_positions(poisoned, dtype, shape, shared):
    b, t, hq, hkv, d, bmax, s = shape
    q, k, v, _, _, k_cache, v_cache, pos = make_step(b, t, hq, hkv, d, dtype, bmax, s)
    cos, sin = token_rows(b, t, d, shared)
    k_ref_cache, v_ref_cache = k_cache.clone(), v_cache.clone()
    q_rot, k_rot = rope_mod.rope_kvcache_tokens_triton(q, k, v, cos, sin, k_cache, v_cache, pos)
    q_ref, k_ref = rope_mod.rope_kvcache_tokens_reference(q, k, v, cos, sin, k_ref_cache, v_ref_cache, pos)

    check(q_rot, q_ref, rotate64_tokens(q, cos, sin), dtype)
    check(k_rot, k_ref, rotate64_tokens(k, cos, sin), dtype)
    written = written_mask(k_cache, b, pos)
    assert torch.isnan(k_cache[~written]).all() and torch.isnan(v_cache[~written]).all()
    assert torch.equal(k_cache[:b, :, pos], k_rot.transpose(1, 2)), "the cache holds k_rot itself"
    assert torch.equal(v_cache[:b, :, pos], v.transpose(1, 2)), "v is written unrotated"
    assert torch.equal(k_cache.isnan(), k_ref_cache.isnan())


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_rope_tokens_matches_reference_and_float64(poisoned, dtype, shape):
    b, t, hq, hkv, d, _, _ = shape
    q, k, *_ = make_step(b, t, hq, hkv, d, dtype, 1, 1)
    cos, sin = token_rows(b, t, d, shared=False)
    q_rot, k_rot = rope_mod.rope_tokens_triton(q, k, cos, sin)
    q_ref, k_ref = rope_mod.rope_tokens_reference(q, k, cos, sin)
    check(q_rot, q_ref, rotate64_tokens(q, cos, sin), dtype)
    check(k_rot, k_ref, rotate64_tokens(k, cos, sin), dtype)
    assert q_rot.is_contiguous() and k_rot.is_contiguous()


def test_rope_tokens_reference_is_the_table_rotation_at_the_positions():
    """Rows gathered from a table at the positions rotate exactly as rope_kvcache does."""
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(2, 3, 4, 2, 8, torch.float32, 2, 6)
    want = rope_mod.rope_kvcache_reference(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), pos)
    got = rope_mod.rope_tokens_reference(q, k, cos[pos][None], sin[pos][None])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_triton
def test_rope_kvcache_tokens_kernel_skips_cache_writes_at_out_of_range_positions():
    q, k, v, _, _, k_cache, v_cache, _ = make_step(1, 2, 2, 1, 8, torch.float32, 1, 4)
    cos, sin = token_rows(1, 2, 8, shared=True)
    rope_mod.rope_kvcache_tokens_triton(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([1, 4], device=DEVICE))
    assert torch.isfinite(k_cache[0, :, 1]).all()
    assert torch.isnan(k_cache[0, :, [0, 2, 3]]).all()


@pytest.mark.parametrize("bad", ["cos rows", "fp8 cache"])
def test_rope_kvcache_tokens_rejects_what_it_cannot_compute(bad):
    q, k, v, _, _, k_cache, v_cache, pos = make_step(2, 3, 2, 1, 8, torch.float32, 2, 6)
    cos, sin = token_rows(2, 3, 8, shared=True)
    if bad == "cos rows":
        cos, sin, match = cos[:, :2], sin[:, :2], "a row per token"
    else:
        k_cache = torch.zeros(k_cache.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
        v_cache, match = k_cache.clone(), "unquantized"
    with pytest.raises(ValueError, match=match):
        rope_mod.rope_kvcache_tokens(q, k, v, cos, sin, k_cache, v_cache, pos)


def test_rope_tokens_ops_pass_opcheck():
    q, k, v, _, _, k_cache, v_cache, pos = make_step(2, 3, 2, 1, 8, torch.float32, 3, 6)
    k_cache.normal_()
    v_cache.normal_()
    for shared in (True, False):
        cos, sin = token_rows(2, 3, 8, shared)
        torch.library.opcheck(torch.ops.planlang.rope_kvcache_tokens.default,
                              (q, k, v, cos, sin, k_cache, v_cache, pos))
        torch.library.opcheck(torch.ops.planlang.rope_tokens.default, (q, k, cos, sin))


# ----------------------------------------------------------------------------- GPU, real shapes
@gpu
@needs_cuda
@pytest.mark.parametrize("b,t", [(1, 1), (16, 1), (1, 512)])
def test_gpu_rope_kvcache_at_llama_1b_shapes(poisoned, b, t):
    dtype = torch.bfloat16
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(b, t, 32, 8, 64, dtype, 16, 1024)
    k_ref_cache, v_ref_cache = k_cache.clone(), v_cache.clone()
    q_rot, k_rot = rope_mod.rope_kvcache(q, k, v, cos, sin, k_cache, v_cache, pos)
    q_ref, k_ref = rope_mod.rope_kvcache_reference(q, k, v, cos, sin, k_ref_cache, v_ref_cache, pos)
    check(q_rot, q_ref, rotate64(q, cos, sin, pos), dtype)
    check(k_rot, k_ref, rotate64(k, cos, sin, pos), dtype)
    assert torch.equal(k_cache.isnan(), k_ref_cache.isnan())
    assert torch.equal(v_cache.nan_to_num(), v_ref_cache.nan_to_num())


@gpu
@needs_cuda
def test_gpu_rope_kvcache_replays_in_a_cuda_graph_at_a_new_position():
    q, k, v, cos, sin, k_cache, v_cache, _ = make_step(4, 1, 32, 8, 64, torch.bfloat16, 4, 64)
    pos = torch.tensor([3], device=DEVICE)

    def step():
        return rope_mod.rope_kvcache_op(q, k, v, cos, sin, k_cache, v_cache, pos)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_rot, _ = step()
    pos.fill_(17)  # the graph reads the position from the device
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(k_cache[:, :, 17]).all() and torch.isfinite(v_cache[:, :, 17]).all()
    q_ref = rotate64(q, cos, sin, pos)
    assert rel_err(q_rot, q_ref) < TOL[torch.bfloat16][0]
