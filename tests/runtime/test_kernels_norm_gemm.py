"""RMSNorm folded into the next GEMM (`planlang::rmsnorm_gemm`) against the norm and the GEMM run apart.

One row takes the fused GEMV (the norm computed in the GEMV's prologue); the result is
checked against float64 (norm and GEMM) with the tolerance of the GEMM's dtype, against the
unfused planlang ops, and s (x + residual) must equal the reference bit for bit. More rows,
or weights the prologue does not take, must run exactly the unfused ops. Outputs are
poisoned (every float tensor torch.empty makes starts as NaN)."""
import os

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

if not torch.cuda.is_available():  # tests/conftest.py does the same; harmless twice
    os.environ.setdefault("TRITON_INTERPRET", "1")

from planlang.runtime.kernels import fp8_linear as fp8_mod  # noqa: E402
from planlang.runtime.kernels import norm_gemm as ng  # noqa: E402
from planlang.runtime.kernels import qkv as qkv_mod  # noqa: E402
from planlang.runtime.kernels import rmsnorm_residual as norm_mod  # noqa: E402
from planlang.runtime.kernels import swiglu as swiglu_mod  # noqa: E402
from planlang.runtime.kernels.fp8_linear import Fp8GemvConfig  # noqa: E402
from planlang.runtime.kernels.qkv import GemvConfig  # noqa: E402
from planlang.runtime.passes.prologue import fold_norms  # noqa: E402
from tests.runtime.test_kernels_fp8 import dequant64, quantize  # noqa: E402
from tests.runtime.test_kernels_norm_mlp import (act64, check, exact_rounding, needs_cuda, needs_triton,  # noqa: E402,F401
                                                 poisoned, randn, rmsnorm64)

gpu = pytest.mark.gpu
E4M3 = torch.float8_e4m3fn


def same_sum(s, s_ref):
    """s is x + r in x's dtype: bit for bit where casts round to nearest (the interpreter
    truncates bf16 casts: one ulp there)."""
    if exact_rounding(s.dtype):
        assert torch.equal(s, s_ref), "s must be exactly x + r in x's dtype"
    else:
        torch.testing.assert_close(s, s_ref, rtol=2 ** -7, atol=0)


def _operands(kind, k, n, dtype):
    """(w, w_scale, bias, act, float64 GEMM of a float64 row) for a GEMM kind."""
    if kind.startswith("fp8"):
        scaling = "tensor" if "tensor" in kind else "channel"
        act = "silu" if "act" in kind else None
        wq, s = quantize(randn(2 * n if act else n, k, scale=k ** -0.5), E4M3, scaling)
        bias = randn(wq.shape[0], dtype=dtype) if "bias" in kind else None
        w64 = dequant64(wq, s)

        def gemm64(h):
            y = h @ w64.T + (bias.double() if bias is not None else 0)
            return act64(y[..., :n], act) * y[..., n:] if act else y
        return wq, s, bias, act, gemm64
    if kind.startswith("swiglu"):
        act = "silu" if kind == "swiglu" else "gelu_tanh"
        w13 = randn(2 * n, k, dtype=dtype, scale=k ** -0.5)
        w64 = w13.double()
        return w13, None, None, act, lambda h: act64(h @ w64[:n].T, act) * (h @ w64[n:].T)
    w = randn(n, k, dtype=dtype, scale=k ** -0.5)
    bias = randn(n, dtype=dtype) if kind == "linear_bias" else None
    return w, None, bias, None, lambda h: h @ w.double().T + (bias.double() if bias is not None else 0)


KINDS = ["linear", "linear_bias", "swiglu", "geglu", "fp8_channel", "fp8_tensor", "fp8_channel_act", "fp8_tensor_bias"]


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype,offset", [(torch.bfloat16, 0.0), (torch.float32, 1.0)])
def test_one_row_matches_the_norm_then_the_gemm(poisoned, kind, residual, dtype, offset):
    k, n = 96, 40
    x = randn(1, k, dtype=dtype) + 0.5
    r = randn(1, k, dtype=dtype) if residual else None
    g = randn(k, dtype=dtype)
    w, w_scale, bias, act, gemm64 = _operands(kind, k, n, dtype)
    s, y = ng.rmsnorm_gemm(x, r, g, 1e-5, offset, w, w_scale, bias, 0, act)
    s_ref, h_ref = norm_mod.rmsnorm_residual_reference(x, r, g, 1e-5, offset)
    if residual:
        same_sum(s, s_ref)
    else:
        assert s.numel() == 0
    _, y_unfused = ng.rmsnorm_gemm_reference(x, r, g, 1e-5, offset, w, w_scale, bias, 0, act)
    check(y, y_unfused, gemm64(rmsnorm64(s_ref, g, 1e-5, offset)), dtype)


def refuse_the_norm_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the norm kernel ran: the GEMV should compute the norm itself")
    monkeypatch.setattr(norm_mod, "rmsnorm_residual_triton", refuse)
    monkeypatch.setattr(ng, "rmsnorm_residual", refuse)
    monkeypatch.setattr(ng, "rmsnorm", refuse)


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual", [True, False])
def test_one_row_does_not_launch_the_norm_kernel(monkeypatch, kind, residual):
    refuse_the_norm_kernel(monkeypatch)
    dtype, k, n = torch.bfloat16, 64, 24
    x, g = randn(1, 1, k, dtype=dtype), randn(k, dtype=dtype)
    r = randn(1, 1, k, dtype=dtype) if residual else None
    w, w_scale, bias, act, _ = _operands(kind, k, n, dtype)
    s, y = ng.rmsnorm_gemm(x, r, g, 1e-6, 0.0, w, w_scale, bias, 0, act)
    assert y.shape == (1, 1, n) and (s.shape == x.shape if residual else s.numel() == 0)


@needs_triton
@pytest.mark.parametrize("kind", ["linear", "swiglu", "fp8_channel_act", "fp8_block"])
def test_several_rows_or_block_scales_run_the_unfused_ops_exactly(poisoned, kind):
    dtype, k, n = torch.bfloat16, 64, 32
    rows = 1 if kind == "fp8_block" else 3
    x, r, g = randn(rows, k, dtype=dtype), randn(rows, k, dtype=dtype), randn(k, dtype=dtype)
    if kind == "fp8_block":
        wq, w_scale = quantize(randn(n, k, scale=k ** -0.5), E4M3, "block", 32)
        w, bias, bs, act = wq, None, 32, None
    else:
        w, w_scale, bias, act, _ = _operands(kind, k, n, dtype)
        bs = 0
    s, y = ng.rmsnorm_gemm(x, r, g, 1e-5, 0.0, w, w_scale, bias, bs, act)
    s2, h2 = norm_mod.rmsnorm_residual(x, r, g, 1e-5, 0.0)
    if w_scale is not None:
        y2 = fp8_mod.fp8_linear(h2, w, w_scale, bias, block_size=bs, act=act)
    elif act:
        y2 = swiglu_mod.swiglu_linear(h2, w, act)
    else:
        y2 = qkv_mod.linear(h2, w, bias)
    assert torch.equal(s, s2) and torch.equal(y, y2)


@needs_triton
@pytest.mark.parametrize("config", [GemvConfig(2, 16, 1), GemvConfig(4, 32, 4), GemvConfig(1, 64, 2, 2)])
def test_gemv_prologue_over_several_k_tiles_and_a_forced_split(poisoned, config):
    """K tiles that do not divide K (the sum of squares over masked tiles), and a split-K
    config, which the prologue turns into one split (it needs the whole row)."""
    dtype, k, n = torch.float32, 72, 20
    x, r, g = randn(1, k, dtype=dtype), randn(1, k, dtype=dtype), randn(k, dtype=dtype)
    w = randn(n, k, dtype=dtype, scale=k ** -0.5)
    s = torch.empty_like(x)
    y = qkv_mod.gemv_triton(x, w, config=config, norm=norm_mod.NormPrologue(r, g, 1e-5, 0.0, s))
    s_ref, _ = norm_mod.rmsnorm_residual_reference(x, r, g, 1e-5)
    same_sum(s, s_ref)
    ref64 = rmsnorm64(s_ref, g, 1e-5, 0.0) @ w.double().T
    check(y, ref64.float(), ref64, dtype)
    w13 = randn(2 * n, k, dtype=dtype, scale=k ** -0.5)
    y = swiglu_mod.swiglu_gemv_triton(x, w13, "silu", config=config, norm=norm_mod.NormPrologue(None, g, 1e-5, 0.0))
    h64 = rmsnorm64(x, g, 1e-5, 0.0)
    ref64 = act64(h64 @ w13.double()[:n].T, "silu") * (h64 @ w13.double()[n:].T)
    check(y, ref64.float(), ref64, dtype)


@needs_triton
def test_fp8_prologue_over_several_k_tiles(poisoned):
    dtype, k, n = torch.bfloat16, 200, 24
    x, r, g = randn(1, k, dtype=dtype), randn(1, k, dtype=dtype), randn(k, dtype=dtype)
    wq, ws = quantize(randn(2 * n, k, scale=k ** -0.5), E4M3, "channel")
    monkey = dict(fp8_mod.FP8_TUNED)
    try:
        fp8_mod.FP8_TUNED[("gate_up", n, k, 1)] = Fp8GemvConfig(4, 32, 3, 1)  # 7 tiles, a split the norm undoes
        s = torch.empty_like(x)
        y = fp8_mod.fp8_gemv_norm_triton(x, norm_mod.NormPrologue(r, g, 1e-5, 0.0, s), wq, ws, act="gelu_tanh")
    finally:
        fp8_mod.FP8_TUNED.clear()
        fp8_mod.FP8_TUNED.update(monkey)
    s_ref, _ = norm_mod.rmsnorm_residual_reference(x, r, g, 1e-5)
    same_sum(s, s_ref)
    yd = rmsnorm64(s_ref, g, 1e-5, 0.0) @ dequant64(wq, ws).T
    ref64 = act64(yd[..., :n], "gelu_tanh") * yd[..., n:]
    check(y, ng.rmsnorm_gemm_reference(x, r, g, 1e-5, 0.0, wq, ws, None, 0, "gelu_tanh")[1], ref64, dtype)


def test_the_fake_gives_the_shapes_of_the_real_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, g, w13 = torch.empty(2, 1, 64), torch.empty(64), torch.empty(96, 64)
        s, y = torch.ops.planlang.rmsnorm_gemm(x, x, g, 1e-5, 0.0, w13, None, None, 0, "silu")
        assert s.shape == x.shape and y.shape == (2, 1, 48)
        s, y = torch.ops.planlang.rmsnorm_gemm(x, None, g, 1e-5, 0.0, w13, None, None, 0, None)
        assert s.numel() == 0 and y.shape == (2, 1, 96)


# ----------------------------------------------------------------------------- the graph pass
def _graph(two_readers=False, s_read_early=False):
    """x, r -> rmsnorm_residual -> (s, h); h -> planlang::linear; s read after (or before) it."""
    g = fx.Graph()
    x, r, w, nw = (g.placeholder(n) for n in ("x", "r", "w", "nw"))
    norm = g.call_function(torch.ops.planlang.rmsnorm_residual.default, (x, r, nw, 1e-5, 0.0))
    s = g.call_function(__import__("operator").getitem, (norm, 0))
    h = g.call_function(__import__("operator").getitem, (norm, 1))
    early = g.call_function(torch.neg, (s,)) if s_read_early else None
    y = g.call_function(torch.ops.planlang.linear.default, (h, w, None))
    extra = g.call_function(torch.neg, (h,)) if two_readers else None
    out = g.call_function(torch.add, (y, s))
    g.output((out, extra, early) if (extra is not None or early is not None) else out)
    return g


def test_the_pass_folds_a_norm_read_by_one_gemm():
    g = _graph()
    assert fold_norms(g) == [""]
    targets = [n.target for n in g.nodes if n.op == "call_function"]
    assert torch.ops.planlang.rmsnorm_gemm.default in targets
    assert torch.ops.planlang.rmsnorm_residual.default not in targets
    assert torch.ops.planlang.linear.default not in targets
    gm = fx.GraphModule(torch.nn.Module(), g)
    x, r, nw, w = torch.randn(1, 16), torch.randn(1, 16), torch.randn(16), torch.randn(16, 16) / 4
    s, h = norm_mod.rmsnorm_residual_reference(x, r, nw, 1e-5)
    torch.testing.assert_close(gm(x, r, w, nw), F.linear(h, w) + s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("two_readers,s_read_early", [(True, False), (False, True)])
def test_the_pass_leaves_a_norm_read_twice_or_a_sum_read_before_the_gemm(two_readers, s_read_early):
    g = _graph(two_readers, s_read_early)
    assert fold_norms(g) == []
    assert torch.ops.planlang.rmsnorm_gemm.default not in [n.target for n in g.nodes]


# ----------------------------------------------------------------------------- GPU, real shapes
@gpu
@needs_cuda
@pytest.mark.parametrize("kind,n", [("linear", 3072), ("swiglu", 8192), ("fp8_channel", 3072),
                                    ("fp8_channel_act", 8192), ("linear", 128256)])
def test_gpu_llama_1b_shapes(poisoned, monkeypatch, kind, n):
    """At the decode shapes of Llama-1B (the tuned FP8 configs among them) the one-row op is
    one kernel, and computes the norm and the GEMM within the dtype's tolerance."""
    refuse_the_norm_kernel(monkeypatch)
    dtype, k = torch.bfloat16, 2048
    x, r, g = randn(1, 1, k, dtype=dtype), randn(1, 1, k, dtype=dtype), randn(k, dtype=dtype)
    w, w_scale, bias, act, gemm64 = _operands(kind, k, n, dtype)
    s, y = ng.rmsnorm_gemm(x, r, g, 1e-5, 0.0, w, w_scale, bias, 0, act)
    s_ref, _ = norm_mod.rmsnorm_residual_reference(x, r, g, 1e-5)
    same_sum(s, s_ref)
    check(y, ng.rmsnorm_gemm_reference(x, r, g, 1e-5, 0.0, w, w_scale, bias, 0, act)[1],
          gemm64(rmsnorm64(s_ref, g, 1e-5, 0.0)), dtype)


def test_the_pass_folds_a_norm_without_residual_into_swiglu_and_fp8_gemms():
    """`rmsnorm` (no residual add) read by the fused gate/up GEMM, and by a weight-only FP8
    GEMM with its block size and act: the operands land where rmsnorm_gemm takes them, and
    the folded graph computes what the two ops did."""
    import operator
    from planlang.runtime.kernels import fp8_linear  # noqa: F401  (registers planlang::fp8_linear)
    g = fx.Graph()
    x, nw, w13, wq, ws = (g.placeholder(n) for n in ("x", "nw", "w13", "wq", "ws"))
    h1 = g.call_function(torch.ops.planlang.rmsnorm.default, (x, nw, 1e-5, 1.0))
    y1 = g.call_function(torch.ops.planlang.swiglu_linear.default, (h1, w13, "gelu_tanh"))
    h2 = g.call_function(torch.ops.planlang.rmsnorm.default, (x, nw, 1e-5, 0.0))
    y2 = g.call_function(torch.ops.planlang.fp8_linear.default, (h2, wq, ws, None, 0, "silu"))
    g.output((y1, y2))
    before = fx.GraphModule(torch.nn.Module(), g)
    xs, nws = torch.randn(1, 32), torch.rand(32) + 0.5
    w13s = torch.randn(48, 32) / 6
    wqs, wss = quantize(torch.randn(40, 32) / 6, E4M3, "channel")
    want = before(xs, nws, w13s, wqs, wss)
    assert len(fold_norms(g)) == 2
    fused = [n for n in g.nodes if n.target is torch.ops.planlang.rmsnorm_gemm.default]
    assert [n.args[5:] for n in fused] == [(w13, None, None, 0, "gelu_tanh"), (wq, ws, None, 0, "silu")]
    assert all(n.target is not operator.getitem or n.args[1] == 1 for n in g.nodes if n.users)
    got = fx.GraphModule(torch.nn.Module(), g)(xs, nws, w13s, wqs, wss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,expected", [("linear", "linear"), ("swiglu", "gate_up"), ("fp8_channel", "fp8"),
                                           ("fp8_channel_act", "fp8_gate_up")])
def test_prologue_kind_names_each_gemm(kind, expected):
    w, w_scale, _, act, _ = _operands(kind, 32, 8, torch.bfloat16)
    assert ng.prologue_kind(w, w_scale, act) == expected
    head = torch.empty(ng.HEAD_ROWS + 1, 32, dtype=torch.bfloat16)
    assert ng.prologue_kind(head, None, None) == "head"


@needs_triton
@pytest.mark.parametrize("setting,fused", [("0", False), ("off", False), ("1", True), ("gate_up,fp8", False),
                                           ("linear", True), ("linear,head", True)])
def test_prologue_setting_picks_the_kernels(monkeypatch, poisoned, setting, fused):
    """PLANLANG_NORM_PROLOGUE decides per GEMV kind (a plain linear here): fused means the norm
    kernel never runs; unfused means exactly the norm op, then the GEMV op."""
    monkeypatch.setenv(ng.PROLOGUE_ENV, setting)
    dtype, k, n = torch.bfloat16, 64, 24
    x, r, g = randn(1, k, dtype=dtype), randn(1, k, dtype=dtype), randn(k, dtype=dtype)
    w = randn(n, k, dtype=dtype, scale=k ** -0.5)
    if fused:
        refuse_the_norm_kernel(monkeypatch)
        s, y = ng.rmsnorm_gemm(x, r, g, 1e-5, 0.0, w)
        assert y.shape == (1, n)
        return
    s, y = ng.rmsnorm_gemm(x, r, g, 1e-5, 0.0, w)
    s2, h2 = norm_mod.rmsnorm_residual(x, r, g, 1e-5, 0.0)
    assert torch.equal(s, s2) and torch.equal(y, qkv_mod.linear(h2, w, None))


def test_prologue_setting_rejects_unknown_kinds(monkeypatch):
    monkeypatch.setenv(ng.PROLOGUE_ENV, "linear,qkv")
    with pytest.raises(ValueError, match="PLANLANG_NORM_PROLOGUE.*unknown kind qkv.*hint"):
        ng.prologue_kinds()
    monkeypatch.delenv(ng.PROLOGUE_ENV)
    assert ng.prologue_kinds() == ng.PROLOGUE_DEFAULT
