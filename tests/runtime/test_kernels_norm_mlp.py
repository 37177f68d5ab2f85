"""The fused RMSNorm(+residual), SwiGLU and QKV kernels against their references.

Each Triton path is checked against its plain-PyTorch reference (same dtype, allclose) and
against a float64 computation (norm-wise relative error), with a tolerance per dtype. On a
machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set
before the kernels are imported), so shapes stay tiny. Outputs are poisoned: every float
tensor the launchers allocate starts as NaN, so an element a kernel fails to write fails.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # tests/conftest.py does the same; harmless twice
    os.environ.setdefault("TRITON_INTERPRET", "1")

from planlang.runtime.kernels import qkv as qkv_mod  # noqa: E402
from planlang.runtime.kernels import rmsnorm_residual as norm_mod  # noqa: E402
from planlang.runtime.kernels import swiglu as swiglu_mod  # noqa: E402
from planlang.runtime.kernels.backend import interpreter_on, triton_available  # noqa: E402
from planlang.runtime.kernels.qkv import GemvConfig, SkinnyConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK, TRITON_WHY = triton_available(DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# dtype -> (max norm-wise relative error vs float64, rtol/atol vs the same-dtype reference)
TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (3e-3, 1e-2),
    torch.bfloat16: (1.5e-2, 3e-2),
}


# ----------------------------------------------------------------------------- helpers
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


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    return ((out.double() - ref64).norm() / ref64.norm()).item()


def check(out, same_dtype_ref, ref64, dtype):
    """out is finite, within the dtype's tolerance of the float64 result and of the
    same-dtype reference."""
    rel_tol, close_tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref64.shape
    assert torch.isfinite(out).all(), "unwritten (NaN) or overflowed elements"
    assert rel_err(out, ref64) < rel_tol
    scale = same_dtype_ref.float().abs().max().item()
    torch.testing.assert_close(out, same_dtype_ref, rtol=close_tol, atol=close_tol * scale)


def exact_rounding(dtype) -> bool:
    """Whether float32 -> dtype casts round to nearest even: not bfloat16 under the
    interpreter, which truncates."""
    return not (dtype == torch.bfloat16 and interpreter_on() and DEVICE == "cpu")


def rmsnorm64(s, w, eps, offset):
    s64 = s.double()
    return s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps) * (offset + w.double())


def act64(g, act):
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


# ----------------------------------------------------------------------------- rmsnorm
NORM_SHAPES = [(1, 64), (3, 40), (16, 100), (33, 48), (2, 3, 72)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rmsnorm_residual_triton_matches_reference_and_float64(poisoned, dtype, shape):
    x, r, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    eps, offset = 1e-5, (1.0 if len(shape) == 3 else 0.0)
    s, h = norm_mod.rmsnorm_residual_triton(x, r, w, eps, offset)
    s_ref, h_ref = norm_mod.rmsnorm_residual_reference(x, r, w, eps, offset)
    if exact_rounding(dtype):
        assert torch.equal(s, x + r), "s must be exactly x + r in x's dtype"
    else:
        torch.testing.assert_close(s, s_ref, rtol=2 ** -7, atol=0)
    check(h, h_ref, rmsnorm64(s_ref, w, eps, offset), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_alone_normalizes_x(poisoned, dtype):
    x, w = randn(5, 56, dtype=dtype, scale=3.0), randn(56, dtype=dtype)
    h = norm_mod.rmsnorm(x, w, 1e-6)
    check(h, norm_mod.rmsnorm_reference(x, w, 1e-6), rmsnorm64(x, w, 1e-6, 0.0), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_residual_several_rows_per_program_masks_the_last_block(poisoned, dtype):
    x, r, w = randn(33, 24, dtype=dtype), randn(33, 24, dtype=dtype), randn(24, dtype=dtype)
    cfg = norm_mod.NormConfig(4, rows_per_program=8, store_cache=".cs")
    s, h = norm_mod.rmsnorm_residual_triton(x, r, w, 1e-6, config=cfg)
    s_ref, h_ref = norm_mod.rmsnorm_residual_reference(x, r, w, 1e-6)
    check(h, h_ref, rmsnorm64(s_ref, w, 1e-6, 0.0), dtype)


@needs_triton
def test_rmsnorm_residual_writes_into_given_buffers(poisoned):
    x, r, w = randn(6, 40), randn(6, 40), randn(40)
    s, h = torch.empty(6, 40), torch.empty(6, 40)
    got = norm_mod.rmsnorm_residual_triton(x, r, w, 1e-6, out=(s, h))
    assert got[0] is s and got[1] is h
    s_ref, h_ref = norm_mod.rmsnorm_residual_reference(x, r, w, 1e-6)
    check(h, h_ref, rmsnorm64(s_ref, w, 1e-6, 0.0), torch.float32)


def test_norm_config_takes_the_tuned_launch_for_model_widths_and_scales_its_warps():
    tuned = norm_mod.TUNED_WIDE
    assert norm_mod.norm_config(16384, 4096) == tuned
    assert norm_mod.norm_config(7, 8192).num_warps == min(16, 2 * tuned.num_warps)
    narrow = norm_mod.norm_config(100_000, 64)
    assert narrow.rows_per_program > 1 and narrow.store_cache == ""


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_residual_wide_rows_take_the_looped_kernel(poisoned, dtype):
    n = norm_mod.MAX_FUSED_BLOCK + 40  # not a multiple of the loop's chunk either
    x, r, w = randn(2, n, dtype=dtype), randn(2, n, dtype=dtype), randn(n, dtype=dtype)
    s, h = norm_mod.rmsnorm_residual_triton(x, r, w, 1e-6, 0.5)
    s_ref, h_ref = norm_mod.rmsnorm_residual_reference(x, r, w, 1e-6, 0.5)
    assert torch.isfinite(s).all()
    check(h, h_ref, rmsnorm64(s_ref, w, 1e-6, 0.5), dtype)
    h_alone = norm_mod.rmsnorm_residual_triton(x, None, w, 1e-6)[1]
    check(h_alone, norm_mod.rmsnorm_reference(x, w, 1e-6), rmsnorm64(x, w, 1e-6, 0.0), dtype)


@needs_triton
def test_rmsnorm_residual_rejects_a_weight_of_the_wrong_size():
    x = randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        norm_mod.rmsnorm_residual_triton(x, x, randn(9), 1e-6)


# ----------------------------------------------------------------------------- act_mul / swiglu
ACTS = ["silu", "gelu_tanh"]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1, 96), (3, 80), (2, 5, 36)])
def test_act_mul_matches_reference_and_float64(poisoned, dtype, act, shape):
    gu = randn(*shape, dtype=dtype, scale=2.0)
    out = swiglu_mod.act_mul_triton(gu, act)
    g64, u64 = gu.double().chunk(2, dim=-1)
    check(out, swiglu_mod.act_mul_reference(gu, act), act64(g64, act) * u64, dtype)


def _swiglu_weights(f, d, dtype):
    w1, w3 = randn(f, d, dtype=dtype, scale=d ** -0.5), randn(f, d, dtype=dtype, scale=d ** -0.5)
    return w1, w3, swiglu_mod.build_w13(w1, w3)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_swiglu_linear_matches_the_unfused_mlp(poisoned, dtype, act, m):
    f, d = 40, 72  # neither a power of two
    x = randn(m, d, dtype=dtype)
    w1, w3, w13 = _swiglu_weights(f, d, dtype)
    out = swiglu_mod.swiglu_linear_triton(x, w13, act)
    ref64 = act64(x.double() @ w1.double().T, act) * (x.double() @ w3.double().T)
    check(out, swiglu_mod.swiglu_linear_reference(x, w13, act), ref64, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_swiglu_skinny_kernel_with_forced_split_k(poisoned, dtype, split_k):
    x = randn(2, 1, 100, dtype=dtype)  # leading dims are kept
    w1, w3, w13 = _swiglu_weights(24, 100, dtype)
    out = swiglu_mod.swiglu_skinny_triton(x, w13, "silu", config=SkinnyConfig(16, 32, split_k))
    ref64 = act64(x.double() @ w1.double().T, "silu") * (x.double() @ w3.double().T)
    assert out.shape == (2, 1, 24)
    check(out, swiglu_mod.swiglu_linear_reference(x, w13, "silu"), ref64, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [GemvConfig(1, 64, 1, 2), GemvConfig(4, 32, 3, 1), GemvConfig(16, 128, 1, 4, 2)])
def test_swiglu_gemv_one_row_with_forced_configs(poisoned, dtype, config):
    """The one-row kernel: rows per program beyond F (masked), split-K (finished by act_mul),
    a pipelined K loop; K = 100 is no multiple of any K block."""
    x = randn(1, 1, 100, dtype=dtype)
    w1, w3, w13 = _swiglu_weights(24, 100, dtype)
    out = swiglu_mod.swiglu_gemv_triton(x, w13, "gelu_tanh", config=config)
    ref64 = act64(x.double() @ w1.double().T, "gelu_tanh") * (x.double() @ w3.double().T)
    assert out.shape == (1, 1, 24)
    check(out, swiglu_mod.swiglu_linear_reference(x, w13, "gelu_tanh"), ref64, dtype)


def test_act_mul_rejects_an_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        swiglu_mod.act_mul(randn(2, 8), "relu")


def test_build_w13_stacks_gate_over_up_and_rejects_mismatched_halves():
    w1, w3 = randn(6, 4), randn(6, 4)
    w13 = swiglu_mod.build_w13(w1, w3)
    assert torch.equal(w13[:6], w1) and torch.equal(w13[6:], w3) and w13.is_contiguous()
    with pytest.raises(ValueError, match="differ"):
        swiglu_mod.build_w13(w1, randn(5, 4))


# ----------------------------------------------------------------------------- qkv / linear
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_qkv_linear_matches_three_linears(poisoned, dtype, m, with_bias):
    d, q_size, kv_size = 72, 48, 24
    ws = [randn(n, d, dtype=dtype, scale=d ** -0.5) for n in (q_size, kv_size, kv_size)]
    bs = [randn(n, dtype=dtype) for n in (q_size, kv_size, kv_size)] if with_bias else [None] * 3
    w_qkv, b_qkv = qkv_mod.build_w_qkv(*ws, *bs)
    x = randn(m, d, dtype=dtype)
    q, k, v = qkv_mod.qkv_linear(x, w_qkv, q_size, kv_size, b_qkv)
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr(), "views of one GEMM"
    ref_q, ref_k, ref_v = qkv_mod.qkv_linear_reference(x, w_qkv, q_size, kv_size, b_qkv)
    for out, ref, w, b in zip((q, k, v), (ref_q, ref_k, ref_v), ws, bs):
        ref64 = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
        check(out, ref, ref64, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [SkinnyConfig(16, 32, 1), SkinnyConfig(32, 16, 4), SkinnyConfig(64, 64, 2)])
def test_skinny_linear_configs_agree(poisoned, dtype, config):
    x, w, b = randn(5, 136, dtype=dtype), randn(40, 136, dtype=dtype, scale=136 ** -0.5), randn(40, dtype=dtype)
    out = qkv_mod.linear_triton(x, w, b, config=config)
    check(out, qkv_mod.linear_reference(x, w, b), x.double() @ w.double().T + b.double(), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [GemvConfig(1, 32), GemvConfig(8, 64, 3, 2), GemvConfig(16, 256, 1, 4, 3)])
def test_gemv_configs_agree(poisoned, dtype, config):
    x, w, b = randn(1, 136, dtype=dtype), randn(40, 136, dtype=dtype, scale=136 ** -0.5), randn(40, dtype=dtype)
    out = qkv_mod.gemv_triton(x, w, b, config=config)
    check(out, qkv_mod.linear_reference(x, w, b), x.double() @ w.double().T + b.double(), dtype)


@needs_triton
def test_linear_sends_one_row_to_the_gemv_and_untuned_shapes_of_more_rows_to_cublas(monkeypatch):
    calls = []
    real_gemv, real_skinny = qkv_mod.gemv_triton, qkv_mod.linear_triton
    monkeypatch.setattr(qkv_mod, "gemv_triton", lambda *a, **k: calls.append("gemv") or real_gemv(*a, **k))
    monkeypatch.setattr(qkv_mod, "linear_triton", lambda *a, **k: calls.append("skinny") or real_skinny(*a, **k))
    w = randn(24, 32, scale=32 ** -0.5)
    qkv_mod.linear(randn(1, 1, 32), w)
    qkv_mod.linear(randn(4, 32), w)
    assert calls == ["gemv"]
    monkeypatch.setitem(qkv_mod.SKINNY_TUNED, ("linear", 24, 32), SkinnyConfig(16, 32, 1))
    out = qkv_mod.linear(randn(4, 32), w)
    assert calls == ["gemv", "skinny"] and out.shape == (4, 24)


def test_gemv_config_fills_the_gpu():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sms = qkv_mod._sm_count(dev)
    for n, k, tiles in [(3072, 2048, 1), (2048, 8192, 1), (8192, 2048, 2), (128256, 2048, 1), (64, 4096, 1)]:
        cfg = qkv_mod.gemv_config(n, k, dev, tiles)
        assert math.ceil(n / cfg.block_n) * cfg.split_k >= sms, (n, k, cfg)
        assert cfg.block_n * tiles * cfg.block_k <= 4096


def test_skinny_config_fills_the_gpu_and_respects_shared_memory():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sms = qkv_mod._sm_count(dev)
    for n, k, tiles in [(3072, 2048, 1), (2048, 8192, 1), (8192, 2048, 2), (128256, 2048, 1)]:
        cfg = qkv_mod.skinny_config(n, k, 2, dev, tiles)
        programs = math.ceil(n / cfg.block_n) * cfg.split_k
        assert programs >= sms, (n, k, cfg)
        stage = (tiles * cfg.block_n + 16) * cfg.block_k * 2
        assert stage * cfg.num_stages <= qkv_mod._SMEM_BUDGET or cfg.num_stages == 2


@needs_triton
def test_skinny_linear_refuses_more_than_16_rows():
    with pytest.raises(ValueError, match="at most 16 rows"):
        qkv_mod.linear_triton(randn(17, 8), randn(4, 8))


def test_build_w_qkv_fills_missing_biases_with_zeros():
    wq, wk, wv = randn(8, 4), randn(2, 4), randn(2, 4)
    w, b = qkv_mod.build_w_qkv(wq, wk, wv, bq=randn(8))
    assert w.shape == (12, 4) and torch.equal(w[8:10], wk)
    assert b.shape == (12,) and torch.equal(b[8:], torch.zeros(4, device=DEVICE))
    assert qkv_mod.build_w_qkv(wq, wk, wv)[1] is None
    with pytest.raises(ValueError, match="k and v"):
        qkv_mod.build_w_qkv(wq, wk, randn(3, 4))


# ----------------------------------------------------------------------------- custom ops
def _op_cases():
    x = randn(2, 3, 16)
    return {
        "rmsnorm_residual": (torch.ops.planlang.rmsnorm_residual.default, (x, randn(2, 3, 16), randn(16), 1e-6, 1.0)),
        "rmsnorm": (torch.ops.planlang.rmsnorm.default, (x, randn(16), 1e-6, 0.0)),
        "act_mul": (torch.ops.planlang.act_mul.default, (randn(3, 16), "gelu_tanh")),
        "swiglu_linear": (torch.ops.planlang.swiglu_linear.default, (x, randn(24, 16), "silu")),
        "linear": (torch.ops.planlang.linear.default, (x, randn(24, 16), randn(24))),
        "qkv_linear": (torch.ops.planlang.qkv_linear.default, (x, randn(24, 16), None)),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_custom_op_passes_opcheck(name):
    op, args = _op_cases()[name]
    torch.library.opcheck(op, args)


def test_fake_implementations_give_the_real_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 16, dtype=torch.bfloat16)
        s, h = torch.ops.planlang.rmsnorm_residual(x, x, torch.empty(16), 1e-6)
        out = torch.ops.planlang.swiglu_linear(x, torch.empty(40, 16, dtype=torch.bfloat16), "silu")
        fused = torch.ops.planlang.qkv_linear(x, torch.empty(24, 16, dtype=torch.bfloat16), None)
    assert s.shape == h.shape == (2, 3, 16) and h.dtype == torch.bfloat16
    assert out.shape == (2, 3, 20) and out.dtype == torch.bfloat16
    assert fused.shape == (2, 3, 24)


def test_registering_an_op_twice_reuses_the_first():
    again = norm_mod.register_op("rmsnorm", norm_mod._rmsnorm_op, norm_mod._rmsnorm_fake)
    assert again is torch.ops.planlang.rmsnorm.default


@pytest.fixture
def reference_only(monkeypatch):
    """The public ops take their reference path, as on a CPU without the interpreter."""
    for mod in (norm_mod, swiglu_mod, qkv_mod):
        monkeypatch.setattr(mod, "use_triton", lambda *tensors: False)


def _block(x, r, w, w_qkv, w13):
    s, h = torch.ops.planlang.rmsnorm_residual(x, r, w, 1e-6)
    q, k, v = qkv_mod.qkv_linear_op(h, w_qkv, 16, 8)
    return s + torch.ops.planlang.swiglu_linear(h, w13, "silu"), q * 2, k + v


def test_custom_ops_compile_with_fullgraph_and_no_graph_break(reference_only):
    args = (randn(2, 3, 16), randn(2, 3, 16), randn(16), randn(32, 16), randn(32, 16))
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), _block(*args)):
        torch.testing.assert_close(got, want)


def test_public_ops_fall_back_to_the_reference_without_triton(reference_only):
    x, r, w = randn(3, 8), randn(3, 8), randn(8)
    assert torch.equal(norm_mod.rmsnorm_residual(x, r, w, 1e-6)[1],
                       norm_mod.rmsnorm_residual_reference(x, r, w, 1e-6)[1])
    w13 = randn(12, 8)
    assert torch.equal(swiglu_mod.swiglu_linear(x, w13, "gelu_tanh"),
                       swiglu_mod.swiglu_linear_reference(x, w13, "gelu_tanh"))


# ----------------------------------------------------------------------------- GPU, real shapes
@gpu
@needs_cuda
@pytest.mark.parametrize("rows,hidden", [(257, 2048), (64, 4096), (31, 8192), (5, 12288)])
def test_gpu_rmsnorm_residual_at_model_sizes(poisoned, rows, hidden):
    dtype = torch.bfloat16
    x, r, w = randn(rows, hidden, dtype=dtype), randn(rows, hidden, dtype=dtype), randn(hidden, dtype=dtype)
    s, h = norm_mod.rmsnorm_residual(x, r, w, 1e-5, 1.0)
    s_ref, h_ref = norm_mod.rmsnorm_residual_reference(x, r, w, 1e-5, 1.0)
    assert torch.equal(s, s_ref)
    check(h, h_ref, rmsnorm64(s_ref, w, 1e-5, 1.0), dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 4, 16, 2048])
def test_gpu_swiglu_and_qkv_at_llama_1b_shapes(poisoned, m):
    dtype, d, f, q_size, kv_size = torch.bfloat16, 2048, 8192, 2048, 512
    x = randn(m, d, dtype=dtype)
    w1, w3, w13 = _swiglu_weights(f, d, dtype)
    ref64 = act64(x.double() @ w1.double().T, "silu") * (x.double() @ w3.double().T)
    check(swiglu_mod.swiglu_linear(x, w13, "silu"), swiglu_mod.swiglu_linear_reference(x, w13), ref64, dtype)
    ws = [randn(n, d, dtype=dtype, scale=d ** -0.5) for n in (q_size, kv_size, kv_size)]
    w_qkv, _ = qkv_mod.build_w_qkv(*ws)
    for out, w in zip(qkv_mod.qkv_linear(x, w_qkv, q_size, kv_size), ws):
        check(out, F.linear(x, w), x.double() @ w.double().T, dtype)


@gpu
@needs_cuda
def test_gpu_ops_replay_in_a_cuda_graph():
    dtype, d, f = torch.bfloat16, 2048, 8192
    x, r, w = randn(4, d, dtype=dtype), randn(4, d, dtype=dtype), randn(d, dtype=dtype)
    w13 = randn(2 * f, d, dtype=dtype, scale=d ** -0.5)
    w_qkv = randn(3072, d, dtype=dtype, scale=d ** -0.5)

    def step():
        s, h = torch.ops.planlang.rmsnorm_residual(x, r, w, 1e-5)
        return s, torch.ops.planlang.swiglu_linear(h, w13, "silu"), qkv_mod.qkv_linear_op(h, w_qkv, 2048, 512)[0]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    x.copy_(randn(4, d, dtype=dtype))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):
        torch.testing.assert_close(got, want)


@gpu
@needs_cuda
def test_gpu_custom_ops_survive_inductor():
    args = (randn(2, 3, 16, dtype=torch.bfloat16), randn(2, 3, 16, dtype=torch.bfloat16), randn(16),
            randn(32, 16, dtype=torch.bfloat16), randn(32, 16, dtype=torch.bfloat16))
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True)
    for got, want in zip(compiled(*args), _block(*args)):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- PDL
from planlang.runtime.kernels import backend as backend_mod  # noqa: E402


@pytest.mark.parametrize("value,want", [("0", False), ("off", False), ("1", True), ("on", True)])
def test_pdl_switch_reads_the_environment(monkeypatch, value, want):
    monkeypatch.setenv(backend_mod.PDL_ENV, value)
    assert backend_mod._pdl_setting() is want
    monkeypatch.delenv(backend_mod.PDL_ENV)
    assert backend_mod._pdl_setting() is backend_mod.PDL_DEFAULT


def test_pdl_switch_refuses_other_values_with_a_hint(monkeypatch):
    monkeypatch.setenv(backend_mod.PDL_ENV, "maybe")
    with pytest.raises(ValueError, match="PLANLANG_PDL='maybe': expected 0 or 1; hint"):
        backend_mod.pdl_status("cpu")


def test_pdl_is_off_on_the_cpu_and_under_the_interpreter(monkeypatch):
    monkeypatch.setenv(backend_mod.PDL_ENV, "1")
    assert backend_mod.pdl_status("cpu") == (False, "PDL needs a CUDA device, not 'cpu'")
    assert backend_mod.pdl_launch("cpu") == {"USE_PDL": False}  # no launch_pdl for old Triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not backend_mod.pdl_enabled("cuda")


# Compiles every PDL kernel of qkv, swiglu, rmsnorm_residual and fp8_linear for sm_90 (no GPU
# needed: Triton's compiler and ptxas run on the CPU) from the launches their launchers make,
# with USE_PDL set, and reports per kernel where griddepcontrol.wait falls in the PTX.
_PTX_SCRIPT = r'''
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
from planlang.runtime.kernels import attention, fp8_linear as fp8, qkv, rmsnorm_residual as norm, swiglu
from planlang.runtime.kernels import rope_kvcache as rope

launches = []
JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8e4nv",
         torch.int32: "i32", torch.int64: "i64"}

def ptx(fn, args, kwargs):
    values = {**dict(zip(fn.arg_names, args)), **kwargs, "USE_PDL": True}
    sig, consts = {}, {}
    for p in fn.params:
        v = values[p.name] if p.name in values else p.default  # constexprs left at their defaults
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TYPES[v.dtype]
        else:
            sig[p.name] = "fp32" if isinstance(v, float) else "i32"
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(opts, launch_pdl=True)).asm["ptx"]

bf, f8 = torch.bfloat16, torch.float8_e4m3fn
r = lambda *s: torch.randn(*s).to(bf)
qkv.gemv_triton(r(64), r(48, 64), config=qkv.GemvConfig(2, 16, 2))
qkv.linear_triton(r(4, 64), r(48, 64), config=qkv.SkinnyConfig(16, 32, 2))
swiglu.swiglu_gemv_triton(r(64), r(96, 64), config=qkv.GemvConfig(2, 16, 2))
swiglu.swiglu_skinny_triton(r(4, 64), r(96, 64), config=qkv.SkinnyConfig(16, 32, 1))
norm.rmsnorm_residual_triton(r(2, 64), r(2, 64), r(64), 1e-6)
norm.rmsnorm_residual_triton(r(1, 16384), r(1, 16384), r(16384), 1e-6)
w8 = torch.randn(48, 64).to(f8)
fp8.fp8_linear_triton(r(1, 64), w8, torch.rand(48), config=fp8.Fp8GemvConfig(2, 32, 2, 4, 1, False))
fp8.fp8_linear_triton(r(1, 64), w8, torch.rand(48, 2), block_size=32)
fp8.fp8_linear_triton(r(4, 64), w8, torch.rand(48), act="silu", config=fp8.Fp8GemmConfig(16, 32, 32, 2))
fp8.quantize_activation_triton(r(3, 64), "per_tensor")
fp8.quantize_activation_triton(r(3, 64), "per_block", 32)
kc, vc, pos = r(1, 2, 64, 16), r(1, 2, 64, 16), torch.tensor([5])
rope.rope_kvcache_triton(r(1, 1, 4, 16), r(1, 1, 2, 16), r(1, 1, 2, 16), r(64, 16), r(64, 16), kc, vc, pos)
attention.attention_triton(r(1, 1, 4, 16), kc, vc, pos, scale=0.25, num_splits=2)
report = {}
for fn, args, kwargs in launches:
    if fn.__name__ in report:
        continue
    lines = [l.strip() for l in ptx(fn, args, kwargs).splitlines()]
    wait = next((i for i, l in enumerate(lines) if l.startswith("griddepcontrol.wait")), len(lines))
    report[fn.__name__] = {
        "wait": wait < len(lines),
        "launch_dependents": any(l.startswith("griddepcontrol.launch_dependents") for l in lines),
        "writes_before_wait": sum(any(op in l for op in ("st.global", "atom.", "red.")) for l in lines[:wait]),
        "loads_before_wait": sum("ld.global" in l for l in lines[:wait])}
print(json.dumps(report))
'''
PDL_KERNELS = {"_gemv_kernel", "_splitk_reduce_kernel", "_skinny_gemm_kernel", "_gate_up_gemv_kernel",
               "_gate_up_skinny_kernel", "_act_mul_kernel", "_rmsnorm_rows_kernel", "_rmsnorm_looped_kernel",
               "_fp8_gemv_kernel", "_fp8_reduce_kernel", "_fp8_gemv_block_kernel", "_fp8_gemm_kernel",
               "_quantize_rows_kernel", "_quantize_blocks_kernel", "_rope_kvcache_kernel", "_decode_split_kernel"}
# These load their weight tiles (constant data) before the wait: the overlap PDL buys.
PREFETCHING = {"_gemv_kernel", "_gate_up_gemv_kernel", "_fp8_gemv_kernel", "_rmsnorm_rows_kernel"}


@needs_triton
def test_pdl_kernels_wait_before_their_first_write_in_the_sm90_code():
    import json
    import subprocess
    import sys
    try:
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as exc:
        pytest.skip(f"this triton cannot compile PDL kernels for sm_90: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == PDL_KERNELS
    for name, facts in report.items():
        assert facts["wait"] and facts["launch_dependents"], (name, facts)
        assert facts["writes_before_wait"] == 0, (name, facts)
        assert (facts["loads_before_wait"] > 0) == (name in PREFETCHING), (name, facts)


def _decode_chain(layers, x, r, split: bool):
    """Llama-1B's decode kernels at batch 1 (no rope/attention), plus split-K GEMVs and a
    4-row skinny GEMM when `split` (the reduce and act-mul kernels)."""
    outs = []
    for n1, wqkv, wo, n2, w13, wd in layers:
        s, h = norm_mod.rmsnorm_residual(x, r, n1, 1e-5)
        q = qkv_mod.linear(h, wqkv)[..., :2048]
        if split:
            q = qkv_mod.gemv_triton(h, wqkv, config=GemvConfig(2, 512, 4))[..., :2048]
            outs.append(qkv_mod.linear_triton(q.expand(4, 2048), wo, config=SkinnyConfig(32, 128, 2)))
        o = qkv_mod.linear(q, wo)
        s2, h2 = norm_mod.rmsnorm_residual(o, s, n2, 1e-5)
        g = swiglu_mod.swiglu_linear(h2, w13, "silu")
        if split:
            g = swiglu_mod.swiglu_gemv_triton(h2, w13, "silu", config=GemvConfig(1, 512, 4))
        x, r = qkv_mod.linear(g, wd), s2
        outs += [q, o, s2, h2, g, x]
    return outs


@gpu
@needs_cuda
@pytest.mark.parametrize("split", [False, True])
def test_gpu_pdl_chain_in_a_cuda_graph_equals_the_chain_without_pdl(monkeypatch, split):
    monkeypatch.setenv(backend_mod.PDL_ENV, "1")
    on, why = backend_mod.pdl_status("cuda")
    if not on:
        pytest.skip(why)
    dtype, d, f = torch.bfloat16, 2048, 8192
    layers = [(randn(d, dtype=dtype), randn(3072, d, dtype=dtype, scale=d ** -0.5),
               randn(d, d, dtype=dtype, scale=d ** -0.5), randn(d, dtype=dtype),
               randn(2 * f, d, dtype=dtype, scale=d ** -0.5), randn(d, f, dtype=dtype, scale=f ** -0.5))
              for _ in range(3)]
    x, r = randn(1, d, dtype=dtype), randn(1, d, dtype=dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _decode_chain(layers, x, r, split)  # compile the PDL variants outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _decode_chain(layers, x, r, split)
    for _ in range(4):  # fresh inputs each replay; the graph must match launches without PDL
        x.copy_(randn(1, d, dtype=dtype))
        r.copy_(randn(1, d, dtype=dtype))
        graph.replay()
        monkeypatch.setenv(backend_mod.PDL_ENV, "0")
        want = _decode_chain(layers, x, r, split)
        monkeypatch.setenv(backend_mod.PDL_ENV, "1")
        torch.cuda.synchronize()
        for i, (got, ref) in enumerate(zip(outs, want)):
            assert torch.equal(got, ref), f"output {i} differs with PDL"
    h = norm_mod.rmsnorm_residual_reference(x, r, layers[0][0], 1e-5)[1]
    q = outs[1 if split else 0]  # the first layer's q projection
    check(q, F.linear(h, layers[0][1][:2048]), h.double() @ layers[0][1][:2048].double().T, dtype)
