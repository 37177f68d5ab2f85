"""FP8 linears (runtime/kernels/fp8_linear.py) against the float32 quantize-dequantize reference.

Every kernel path (one-row GEMV with and without split-K, the split-K reduce fused into the
last split or launched apart, the skinny tl.dot GEMM, the tiled GEMM with either operand
order), every weight scale (tensor, channel, block, K not a multiple of the block, block
sizes that are no multiple of 16), both fp8 formats, the fused gate/up activations and the
dynamic activation modes. On a machine without CUDA the kernels run under Triton's
interpreter, so shapes stay tiny. Outputs are poisoned: every float tensor the launchers
allocate starts as NaN, so an element a kernel fails to write fails the test.
"""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # tests/conftest.py does the same; harmless twice
    os.environ.setdefault("TRITON_INTERPRET", "1")

from planlang.runtime.kernels import fp8_linear as fp8  # noqa: E402
from planlang.runtime.kernels.backend import triton_available  # noqa: E402
from planlang.runtime.kernels.fp8_linear import Fp8GemmConfig, Fp8GemvConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK, TRITON_WHY = triton_available(DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY)
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

# x dtype -> (max norm-wise relative error vs float64, rtol/atol vs the same-dtype reference).
# bfloat16 is loose because the interpreter truncates float32 -> bfloat16 casts.
TOL = {
    torch.float32: (1e-5, 1e-5),
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
        if t.is_floating_point() and t.dtype not in (E4M3, E5M2):
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def quantize(w, dtype=E4M3, scaling="channel", block_size=0):
    """Own few lines (independent of runtime/precision): scale = amax / fmax, clamp, cast."""
    fmax = torch.finfo(dtype).max
    if scaling == "tensor":
        s = (w.abs().amax() / fmax).reshape(1)
        full = s
    elif scaling == "channel":
        s = w.abs().amax(1) / fmax
        full = s[:, None]
    else:
        n, k = w.shape
        nkb = -(-k // block_size)
        s = F.pad(w.abs(), (0, nkb * block_size - k)).view(n, nkb, block_size).amax(-1) / fmax
        full = s.repeat_interleave(block_size, 1)[:, :k]
    return (w / full).clamp(-fmax, fmax).to(dtype), s.float().contiguous()


def dequant64(wq, s, block_size=0):
    w = wq.double()
    if s.dim() == 2:
        return w * s.double().repeat_interleave(block_size, 1)[:, : w.shape[1]]
    return w * (s.double().reshape(()) if s.numel() == 1 else s.double()[:, None])


def act_mul64(y, act):
    if act is None:
        return y
    g, u = y.chunk(2, dim=-1)
    return (F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")) * u


def rel_err(out, ref64):
    return ((out.double() - ref64).norm() / ref64.norm()).item()


def check(out, ref_same_dtype, ref64, dtype):
    rel_tol, close_tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref64.shape
    assert torch.isfinite(out).all(), "unwritten (NaN) or overflowed elements"
    assert rel_err(out, ref64) < rel_tol
    scale = ref_same_dtype.float().abs().max().item()
    torch.testing.assert_close(out, ref_same_dtype, rtol=close_tol, atol=close_tol * scale)


# ----------------------------------------------------------------------------- weight-only
# (rows, K, out rows N (per half with act), scaling, block_size, fp8, x dtype, act, bias, config)
WEIGHT_ONLY = [
    pytest.param(1, 96, 40, "channel", 0, E4M3, torch.bfloat16, None, False, Fp8GemvConfig(4, 32, 1, 1),
                 id="gemv-channel-bf16"),
    pytest.param(1, 200, 24, "channel", 0, E4M3, torch.float32, "silu", True, Fp8GemvConfig(4, 32, 3, 1),
                 id="gemv-splitk-fused-silu-bias-fp32"),
    pytest.param(1, 80, 36, "block", 32, E5M2, torch.float16, "gelu_tanh", False,
                 Fp8GemvConfig(2, 64, 2, 1, fused_reduce=False), id="gemv-splitk-reduce-block-k%bs-e5m2"),
    pytest.param(1, 72, 20, "block", 24, E4M3, torch.float32, None, True, None, id="gemv-block24-default"),
    pytest.param(1, 64, 33, "tensor", 0, E5M2, torch.float32, None, False, None, id="gemv-tensor-e5m2"),
    pytest.param(1, 150, 12, "block", 64, E4M3, torch.float32, None, False, Fp8GemvConfig(4, 32, 1, 1),
                 id="gemv-tile-inside-block"),
    pytest.param(4, 96, 40, "tensor", 0, E5M2, torch.float32, None, True, None, id="skinny-tensor-e5m2"),
    pytest.param(16, 160, 48, "channel", 0, E4M3, torch.bfloat16, "silu", True,
                 Fp8GemmConfig(16, 16, 32, 2, 4, 2), id="skinny-splitk-fused-silu"),
    pytest.param(7, 96, 40, "block", 32, E4M3, torch.float32, None, False,
                 Fp8GemmConfig(16, 16, 64, 2, 4, 2, w_as_a=True, fused_reduce=False),
                 id="skinny-w_as_a-block-splitk-reduce"),
    pytest.param(5, 72, 24, "block", 24, E4M3, torch.float32, "gelu_tanh", False, None, id="skinny-block24-gather"),
    pytest.param(20, 96, 40, "block", 32, E4M3, torch.float16, None, True, None, id="gemm-block-fp16"),
    pytest.param(18, 64, 24, "channel", 0, E5M2, torch.bfloat16, "silu", False, None, id="gemm-channel-silu-e5m2"),
    pytest.param(33, 80, 24, "block", 32, E4M3, torch.float32, "gelu_tanh", True,
                 Fp8GemmConfig(16, 16, 32, 1, 4, 2, group_m=2, w_as_a=True), id="gemm-w_as_a-block-k%bs-gelu"),
]


@needs_triton
@pytest.mark.parametrize("m,k,n,scaling,bs,fp8_dtype,dtype,act,has_bias,config", WEIGHT_ONLY)
def test_fp8_linear_kernels_match_the_quantize_dequantize_reference(
        poisoned, m, k, n, scaling, bs, fp8_dtype, dtype, act, has_bias, config):
    rows = 2 * n if act else n
    x = randn(m, k, dtype=dtype)
    wq, s = quantize(randn(rows, k, scale=k ** -0.5), fp8_dtype, scaling, bs)
    bias = randn(rows, dtype=dtype) if has_bias else None
    out = fp8.fp8_linear_triton(x, wq, s, bias, block_size=bs, act=act, config=config)
    y64 = x.double() @ dequant64(wq, s, bs).T + (bias.double() if has_bias else 0)
    ref = fp8.fp8_linear_reference(x, wq, s, bias, block_size=bs, act=act)
    check(out, ref, act_mul64(y64, act), dtype)


@needs_triton
def test_fp8_linear_keeps_leading_dims_and_repeats_identically(poisoned):
    """Split-K with the fused reduce twice in a row: the arrival counters reset themselves."""
    x = randn(1, 1, 160)
    wq, s = quantize(randn(24, 160))
    cfg = Fp8GemvConfig(8, 32, 4, 1)
    first = fp8.fp8_linear_triton(x, wq, s, config=cfg)
    second = fp8.fp8_linear_triton(x, wq, s, config=cfg)
    assert first.shape == (1, 1, 24)
    assert torch.equal(first, second)
    check(first, fp8.fp8_linear_reference(x, wq, s), x.double() @ dequant64(wq, s).T, torch.float32)


def test_reference_block_scales_cover_a_partial_last_block():
    wq, s = quantize(torch.randn(6, 50), E4M3, "block", 16)  # 4 blocks, the last of 2 columns
    assert s.shape == (6, 4)
    w = fp8.dequantize_weight_reference(wq, s, 16)
    assert torch.allclose(w[:, 48:], wq[:, 48:].float() * s[:, 3:4])
    assert torch.allclose(w[:, :16], wq[:, :16].float() * s[:, :1])


# ----------------------------------------------------------------------------- dynamic
@needs_triton
@pytest.mark.parametrize("mode", ["per_token", "per_tensor", "per_block"])
@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
def test_activation_quantization_matches_the_reference_exactly(mode, fp8_dtype):
    x = randn(3, 100, scale=3.0)
    x[1] = 0.0  # an all-zero row gets a finite scale and zeros
    x[2, 7] = 1e4  # saturates nothing (scale follows amax) but spreads the range
    xq, sx = fp8.quantize_activation_triton(x, mode, 32, fp8_dtype)
    xq_ref, sx_ref = fp8.quantize_activation_reference(x, mode, 32, fp8_dtype)
    assert xq.dtype == fp8_dtype
    same_quantization(xq, sx, xq_ref, sx_ref, fp8_dtype)


@needs_triton
def test_activation_quantization_of_a_long_row_takes_two_passes():
    x = randn(2, fp8._ONE_PASS_MAX + 40, scale=2.0)
    xq, sx = fp8.quantize_activation_triton(x, "per_tensor")
    xq_ref, sx_ref = fp8.quantize_activation_reference(x, "per_tensor")
    same_quantization(xq, sx, xq_ref, sx_ref, E4M3)


def same_quantization(xq, sx, xq_ref, sx_ref, fp8_dtype):
    """Bit-equal under the interpreter. On CUDA torch divides by a scalar as a multiply by
    its reciprocal, so the reference scale may be one ulp off the kernel's amax / fmax; an
    element then rounds (rarely) to the neighbouring fp8 value."""
    if DEVICE == "cpu":
        assert torch.equal(sx, sx_ref) and torch.equal(xq.float(), xq_ref.float())
        return
    torch.testing.assert_close(sx, sx_ref, rtol=2.5e-7, atol=0)
    mant, subnormal_step = (3, 2.0 ** -9) if fp8_dtype == E4M3 else (2, 2.0 ** -16)
    torch.testing.assert_close(xq.float(), xq_ref.float(), rtol=2.0 ** -mant, atol=subnormal_step)
    assert (xq.float() != xq_ref.float()).float().mean().item() < 0.02


# (rows, K, N, act_mode, weight scaling, block_size, fp8, x dtype, act, bias, config)
DYNAMIC = [
    pytest.param(1, 96, 40, "per_token", "channel", 0, E4M3, torch.bfloat16, None, True, None, id="gemv-token"),
    pytest.param(1, 80, 24, "per_block", "block", 32, E4M3, torch.float32, "silu", False,
                 Fp8GemvConfig(2, 32, 2, 1), id="gemv-block-splitk-silu"),
    pytest.param(1, 96, 40, "per_block", "channel", 16, E5M2, torch.float32, None, False,
                 Fp8GemvConfig(4, 64, 1, 1), id="gemv-xblock-channel-e5m2"),
    pytest.param(5, 96, 40, "per_tensor", "tensor", 0, E5M2, torch.float32, None, False, None, id="skinny-tensor-e5m2"),
    pytest.param(3, 72, 20, "per_block", "channel", 24, E4M3, torch.float32, "gelu_tanh", True, None,
                 id="skinny-block24-gather"),
    pytest.param(24, 96, 40, "per_block", "block", 32, E4M3, torch.float16, None, True,
                 Fp8GemmConfig(16, 16, 32, 1, 4, 2, group_m=2, w_as_a=True), id="gemm-block-w_as_a"),
    pytest.param(24, 64, 24, "per_token", "channel", 0, E4M3, torch.bfloat16, "silu", False, None,
                 id="gemm-token-silu"),
]


@needs_triton
@pytest.mark.parametrize("m,k,n,mode,scaling,bs,fp8_dtype,dtype,act,has_bias,config", DYNAMIC)
def test_fp8_linear_dynamic_matches_the_reference(
        poisoned, m, k, n, mode, scaling, bs, fp8_dtype, dtype, act, has_bias, config):
    rows = 2 * n if act else n
    x = randn(m, k, dtype=dtype)
    wq, s = quantize(randn(rows, k, scale=k ** -0.5), fp8_dtype, scaling, bs)
    bias = randn(rows, dtype=dtype) if has_bias else None
    out = fp8.fp8_linear_dynamic_triton(x, wq, s, bias, act_mode=mode, block_size=bs, act=act, config=config)
    ref = fp8.fp8_linear_dynamic_reference(x, wq, s, bias, act_mode=mode, block_size=bs, act=act)
    xq, sx = fp8.quantize_activation_reference(x, mode, bs, fp8_dtype)
    xd = xq.double() * (sx.double().repeat_interleave(bs, 1)[:, :k] if mode == "per_block" else sx.double()[:, None])
    y64 = xd @ dequant64(wq, s, bs if scaling == "block" else 0).T + (bias.double() if has_bias else 0)
    check(out, ref, act_mul64(y64, act), dtype)


# ----------------------------------------------------------------------------- dispatch, ops, errors
@needs_triton
def test_kernel_names_follow_the_rows():
    assert fp8.fp8_kernel_name(1, 3072, 2048, device=DEVICE).startswith("fp8_gemv[")
    assert fp8.fp8_kernel_name(4, 3072, 2048, device=DEVICE).startswith("fp8_skinny[")
    assert fp8.fp8_kernel_name(2048, 16384, 2048, act="silu", device=DEVICE).endswith("+silu_mul")
    assert fp8.fp8_kernel_name(2048, 2048, 8192, device=DEVICE).startswith("fp8_gemm[")
    name = fp8.fp8_kernel_name(1, 2048, 8192, act_mode="per_token", device=DEVICE)
    assert name.startswith("quantize_per_token+fp8_gemv[")
    assert ",sub=128]" in fp8.fp8_kernel_name(1, 2048, 8192, scaling="block", block_size=128, device=DEVICE)
    assert fp8.fp8_kernel_name(1, 2048, 8192, scaling="block", block_size=96, device=DEVICE).endswith(",gather]")


@needs_triton
def test_custom_ops_trace_with_their_fake_shapes():
    x = randn(2, 3, 64)
    wq, s = quantize(randn(48, 64, scale=0.125))

    def block(x, wq, s):
        h = torch.ops.planlang.fp8_linear(x, wq, s, None, 0, "silu")  # [2, 3, 24]
        y = torch.ops.planlang.fp8_linear_dynamic(x * 2, wq, s, None, "per_token", 0, None)  # [2, 3, 48]
        return h, y

    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(block, tracing_mode="fake")(x, wq, s)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "planlang.fp8_linear.default" in targets and "planlang.fp8_linear_dynamic.default" in targets
    h, y = torch.compile(block, fullgraph=True, backend="aot_eager")(x, wq, s)
    assert h.shape == (2, 3, 24) and y.shape == (2, 3, 48)
    h_eager, y_eager = block(x, wq, s)
    torch.testing.assert_close(h, h_eager)
    torch.testing.assert_close(y, y_eager)


def test_bad_inputs_get_errors_that_name_the_fix():
    x = torch.randn(2, 32)
    wq, s = quantize(torch.randn(16, 32))
    with pytest.raises(ValueError, match=r"expected numel 1 \(tensor\), \[16\] \(channel\)"):
        fp8.fp8_linear_reference(x, wq, s[:8])
    with pytest.raises(ValueError, match="block_size"):
        fp8.fp8_linear_reference(x, wq, s.view(16, 1))
    with pytest.raises(TypeError, match="not fp8"):
        fp8.fp8_linear_reference(x, wq.float(), s)
    with pytest.raises(ValueError, match="even number"):
        fp8.fp8_linear_reference(x, wq[:15], s[:15], act="silu")
    with pytest.raises(ValueError, match="act_mode"):
        fp8.fp8_linear_dynamic_reference(x, wq, s, act_mode="per_row")
    with pytest.raises(ValueError, match="per_block activations need block_size"):
        fp8.fp8_linear_dynamic_reference(x, wq, s, act_mode="per_block")


# ----------------------------------------------------------------------------- GPU: model shapes
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 300])
@pytest.mark.parametrize("n,k,act", [(3072, 2048, None), (2048, 8192, None), (16384, 2048, "silu")])
def test_llama_shapes_on_the_gpu_default_dispatch(m, n, k, act):
    x = randn(m, k, dtype=torch.bfloat16)
    for scaling, bs in (("channel", 0), ("block", 128)):
        wq, s = quantize(randn(n, k, scale=k ** -0.5), E4M3, scaling, bs)
        out = fp8.fp8_linear(x, wq, s, block_size=bs, act=act)
        ref = fp8.fp8_linear_reference(x, wq, s, block_size=bs, act=act)
        check(out, ref, act_mul64(x.double() @ dequant64(wq, s, bs).T, act), torch.bfloat16)
        out = fp8.fp8_linear_dynamic(x, wq, s, act_mode="per_token", block_size=bs, act=act)
        ref = fp8.fp8_linear_dynamic_reference(x, wq, s, act_mode="per_token", block_size=bs, act=act)
        torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2 * ref.float().abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("fast_cvt", [True, False])
def test_every_fp8_value_converts_exactly_on_the_gpu(fp8_dtype, fast_cvt):
    """Each finite fp8 byte (subnormals, signed zeros) through the GEMV (fp8 -> fp32) and the
    skinny GEMM (fp8 -> bf16): x one-hot rows pick single weights, scale 1."""
    vals = torch.arange(256, dtype=torch.uint8, device=DEVICE).view(fp8_dtype)
    w = vals[torch.isfinite(vals.float())]
    k = 16 * (w.numel() // 16)
    w = w[:k].reshape(1, k).repeat(16, 1)  # 16 identical rows
    s = torch.ones(16, device=DEVICE)
    eye = torch.eye(k, device=DEVICE, dtype=torch.bfloat16)
    for rows in (eye[i:i + 1] for i in range(0, k, 7)):
        out = fp8.fp8_linear_triton(rows, w, s, config=Fp8GemvConfig(4, 64, 1, 4, fast_cvt=fast_cvt))
        assert torch.equal(out.float(), (rows.float() @ w.float().T))
    for i in range(0, k, 16):
        rows = eye[i:i + 16]
        out = fp8.fp8_linear_triton(rows, w, s, config=Fp8GemmConfig(16, 16, 64, 1, 4, 2, fast_cvt=fast_cvt))
        assert torch.equal(out.float(), (rows.float() @ w.float().T).bfloat16().float())


# ----------------------------------------------------------------------------- GPU: PDL
def _fp8_chain(ws, x):
    """Back-to-back fp8 linears at decode shapes: GEMVs whose split-K reduce is fused (the
    arrival counters every launch shares) or launched apart, block scales, a 4-row skinny
    GEMM with fused split-K, and the dynamic per-token path (quantize kernel first)."""
    (wq, s), (w13, s13), (wd, sd), (wb, sb) = ws
    outs = []
    for _ in range(3):
        y = fp8.fp8_linear_triton(x, wq, s, config=Fp8GemvConfig(2, 256, 4, 4, 1, True))
        g = fp8.fp8_linear_triton(y[..., :2048], w13, s13, act="silu", config=Fp8GemvConfig(4, 512, 2, 4, 1, False))
        x = fp8.fp8_linear(g, wd, sd)
        b = fp8.fp8_linear(x, wb, sb, block_size=128)
        m4 = fp8.fp8_linear_triton(b.expand(4, 2048), wq, s, config=Fp8GemmConfig(16, 32, 128, 4, 4, 3, 1))
        dyn = fp8.fp8_linear_dynamic(b, wd[:, :2048], sd, act_mode="per_token")
        outs += [y, g, x, b, m4, dyn]
        x = dyn
    return outs


@pytest.mark.gpu
def test_gpu_pdl_fp8_chain_in_a_cuda_graph_equals_the_chain_without_pdl(monkeypatch):
    from planlang.runtime.kernels import backend
    monkeypatch.setenv(backend.PDL_ENV, "1")
    on, why = backend.pdl_status(DEVICE)
    if not on:
        pytest.skip(why)
    d, f = 2048, 8192
    ws = [quantize(randn(3072, d, scale=d ** -0.5)), quantize(randn(2 * f, d, scale=d ** -0.5)),
          quantize(randn(d, f, scale=f ** -0.5)), quantize(randn(d, d, scale=d ** -0.5), E4M3, "block", 128)]
    x = randn(1, d, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _fp8_chain(ws, x)  # compile outside the capture; the arrival counters exist from here on
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _fp8_chain(ws, x)
    for _ in range(4):
        x.copy_(randn(1, d, dtype=torch.bfloat16))
        graph.replay()
        monkeypatch.setenv(backend.PDL_ENV, "0")
        want = _fp8_chain(ws, x)
        monkeypatch.setenv(backend.PDL_ENV, "1")
        torch.cuda.synchronize()
        for i, (got, ref) in enumerate(zip(outs, want)):
            assert torch.equal(got, ref), f"output {i} differs with PDL"
    ref = fp8.fp8_linear_reference(x, *ws[0])
    check(outs[0], ref, x.double() @ dequant64(*ws[0]).T, torch.bfloat16)
