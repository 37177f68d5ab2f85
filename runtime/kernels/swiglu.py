"""Fused gated MLP input: one GEMM on `[W1; W3]` and a fused activation-multiply.

    act_mul(gate_up, act)   = act(gate) * up        gate_up[..., 2F] = [gate | up]
    swiglu_linear(x, w13)   = act(x @ W1.T) * (x @ W3.T)    w13 = [W1; W3]  ([2F, D])

Both compute the activation and the product in float32 and store the input's dtype.
`act` is "silu" (x * sigmoid(x)) or "gelu_tanh" (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
torch's `gelu(approximate="tanh")`).

`swiglu_linear` runs, for one row (decode at batch 1), a Triton GEMV on CUDA cores whose
programs each stream the gate and the up rows of the same output columns and apply act-mul
in the epilogue, writing only the F outputs; for 2..16 rows the same fusion as a tl.dot
skinny GEMM (config from `qkv.SKINNY_TUNED`); for more rows one cuBLAS GEMM on w13 followed
by the Triton act-mul kernel. Either way one weight read instead of two GEMMs, an activation
and a product (1.25-1.33x the unfused MLP input at decode on an H100, ~1.1x at prefill).
`build_w13(w1, w3)` makes the fused weight once, at apply time; it keeps the [W1; W3] layout
that the swiglu fusion pass builds (gate row n and up row n are F rows apart, each read as
its own contiguous stream; the one-row kernel reaches 2.6-2.8 TB/s without interleaving them).

With PDL (sm_90+, `backend.pdl_launch`) the kernels wait for the kernel before them before
reading x or storing; the one-row GEMV loads its first gate and up tiles before that wait.

Custom ops: `planlang::act_mul(gate_up, act)` and `planlang::swiglu_linear(x, w13, act)`, with
fake implementations. Nothing synchronizes with the host. Inference only.
"""
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import gdc_functions, pdl_launch, use_triton, register_op
from .rmsnorm_residual import NormPrologue, prologue_args
from .qkv import (SKINNY_MAX_M, SKINNY_TUNED, GemvConfig, SkinnyConfig, dot_needs_upcast, gemv_config,
                  k_per_split, norm_gemv_config, skinny_config)

try:  # the module must import without triton; then only the reference runs
    import triton
    import triton.language as tl
    gdc_wait, gdc_launch_dependents = gdc_functions()
    from .rmsnorm_residual import norm_prologue_rstd, norm_prologue_tile
except Exception:  # ImportError, or a broken install raising anything
    triton = None

ACTS = {"silu": 0, "gelu_tanh": 1}  # the names of planlang.names.ACTIVATIONS, as kernel codes
_SKINNY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_M = 16  # tl.dot's smallest tile; decode rows are padded (masked) up to it
_ACT_MUL_BLOCK = 1024


def _act_code(act: str) -> int:
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTS)}")
    return ACTS[act]


# ----------------------------------------------------------------------------- weights
def build_w13(w1: Tensor, w3: Tensor) -> Tensor:
    """The fused gate/up weight `[W1; W3]` ([2F, D], nn.Linear layout). Build it once at
    apply time, never per call."""
    if w1.shape != w3.shape:
        raise ValueError(f"gate and up weights differ in shape: {tuple(w1.shape)} vs {tuple(w3.shape)}")
    return torch.cat([w1, w3], dim=0).contiguous()


# ----------------------------------------------------------------------------- reference
def _act_reference(g: Tensor, act: str) -> Tensor:
    _act_code(act)
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


def act_mul_reference(gate_up: Tensor, act: str = "silu") -> Tensor:
    """Plain PyTorch: `act(gate) * up` in float32 over the halves of the last dimension,
    cast to gate_up's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (_act_reference(gate, act) * up).to(gate_up.dtype)


def swiglu_linear_reference(x: Tensor, w13: Tensor, act: str = "silu") -> Tensor:
    """Plain PyTorch: one linear on w13, then `act_mul_reference`."""
    return act_mul_reference(F.linear(x, w13), act)


def swiglu_unfused(x: Tensor, w1: Tensor, w3: Tensor, act: str = "silu") -> Tensor:
    """What the fusion replaces, as a model writes it: `act(x @ W1.T) * (x @ W3.T)`."""
    return _act_reference(F.linear(x, w1), act) * F.linear(x, w3)


# ----------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _act_fp32(g, ACT: tl.constexpr):
        """silu (ACT 0) or tanh-approximated gelu (ACT 1) of a float32 tile."""
        if ACT == 0:
            out = g * tl.sigmoid(g)
        else:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) (g + c g^3)
            # tanh(y) = 2 sigmoid(2y) - 1: saturates cleanly at +-1 for large |y|.
            out = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
        return out

    @triton.jit
    def _act_mul_kernel(
        gu_ptr, out_ptr, F_, stride_gu_split, stride_gu_m, stride_out_m,
        N_SPLIT: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """out[row, cols] = act(gate) * up. gate/up are summed over N_SPLIT stacked partials
        first (1 for a plain act-mul; more to finish a split-K skinny GEMM)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_
        g = tl.zeros([BLOCK], dtype=tl.float32)
        u = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(N_SPLIT):
            base = gu_ptr + s * stride_gu_split + row * stride_gu_m
            g += tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            u += tl.load(base + F_ + cols, mask=mask, other=0.0).to(tl.float32)
        out = _act_fp32(g, ACT) * u
        tl.store(out_ptr + row * stride_out_m + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gate_up_skinny_kernel(
        x_ptr, w_ptr, out_ptr,
        M, F_, K, stride_xm, stride_wn, stride_om, stride_split, k_per_split,
        ACT: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """For output columns n of this program: gate = x @ W1[n].T and up = x @ W3[n].T
        (W3 rows start F_ rows after W1's), fp32 accumulation. SPLIT_K == 1: store
        act(gate) * up. Otherwise store the fp32 partials [gate | up] in out[pid_k] (a
        workspace) for `_act_mul_kernel` to sum and finish. USE_PDL: waits for the previous
        kernel first (the pipelined loop reads x and w together)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < F_
        w_gate = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
        w_up = w_gate + F_ * stride_wn
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        k_lo = pid_k * k_per_split
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w_mask = k_mask[:, None] & n_mask[None, :]
            xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            # The weight is read once: let it leave L2 first.
            wg = tl.load(w_gate + offs_k[:, None], mask=w_mask, other=0.0, eviction_policy="evict_first")
            wu = tl.load(w_up + offs_k[:, None], mask=w_mask, other=0.0, eviction_policy="evict_first")
            if UPCAST:  # the interpreter's bf16 dot is wrong: see qkv.dot_needs_upcast
                xt = xt.to(tl.float32)
                wg = wg.to(tl.float32)
                wu = wu.to(tl.float32)
            if IEEE:
                acc_g = tl.dot(xt, wg, acc_g, input_precision="ieee")
                acc_u = tl.dot(xt, wu, acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(xt, wg, acc_g)
                acc_u = tl.dot(xt, wu, acc_u)
        mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            out = _act_fp32(acc_g, ACT) * acc_u
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            part = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
            tl.store(part, acc_g, mask=mask)
            tl.store(part + F_, acc_u, mask=mask)


    @triton.jit
    def _gate_up_gemv_kernel(
        x_ptr, w_ptr, out_ptr, r_ptr, g_ptr, s_ptr,
        F_, K, stride_wn, stride_split, k_per_split, eps, offset,
        ACT: tl.constexpr, SPLIT_K: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """The one-row case on CUDA cores (see qkv._gemv_kernel): gate = W1[n] @ x and up =
        W3[n] @ x for this program's BLOCK_N columns, each from [BLOCK_N, BLOCK_K] tiles of
        whole rows, fp32 partials reduced over K at the end. SPLIT_K == 1: store act(gate) *
        up. Otherwise store the fp32 partials [gate | up] in out[pid_k] for `_act_mul_kernel`.
        NORM (SPLIT_K == 1 only): x is the input of an RMSNorm, computed here as in
        qkv._gemv_kernel. The first gate and up tiles are loaded first: with USE_PDL while
        the program waits for the kernel that writes x."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < F_
        w_gate = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        w_up = w_gate + F_ * stride_wn
        k_lo = pid_k * k_per_split
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w_mask = n_mask[:, None] & k_mask[None, :]
        s_cols = tl.where(pid_n == 0, K, 0)  # the first column block stores s
        wg = tl.load(w_gate + offs_k[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
        wu = tl.load(w_up + offs_k[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        xk, sq = norm_prologue_tile(x_ptr, r_ptr, g_ptr, s_ptr, offs_k, k_mask, offset, s_cols, NORM, HAS_RES)
        acc_g = wg.to(tl.float32) * xk[None, :]
        acc_u = wu.to(tl.float32) * xk[None, :]
        # STAGES > 1: the weight tiles of the next iterations stream into shared memory meanwhile.
        for k0 in tl.range(BLOCK_K, k_per_split, BLOCK_K, num_stages=STAGES):
            offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w_mask = n_mask[:, None] & k_mask[None, :]
            xk, sq_k = norm_prologue_tile(x_ptr, r_ptr, g_ptr, s_ptr, offs_k, k_mask, offset, s_cols,
                                          NORM, HAS_RES)
            sq += sq_k
            wg = tl.load(w_gate + offs_k[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            wu = tl.load(w_up + offs_k[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            acc_g += wg.to(tl.float32) * xk[None, :]
            acc_u += wu.to(tl.float32) * xk[None, :]
        rstd = norm_prologue_rstd(sq, K, eps, NORM)
        gate = tl.sum(acc_g, axis=1) * rstd
        up = tl.sum(acc_u, axis=1) * rstd
        if SPLIT_K == 1:
            tl.store(out_ptr + offs_n, (_act_fp32(gate, ACT) * up).to(out_ptr.dtype.element_ty), mask=n_mask)
        else:
            part = out_ptr + pid_k * stride_split + offs_n
            tl.store(part, gate, mask=n_mask)
            tl.store(part + F_, up, mask=n_mask)


# ----------------------------------------------------------------------------- launchers
def _launch_act_mul(gu2: Tensor, out2: Tensor, act_code: int, n_split: int, stride_split: int) -> None:
    m, f = out2.shape
    block = min(_ACT_MUL_BLOCK, triton.next_power_of_2(f))
    grid = (m, triton.cdiv(f, block))
    _act_mul_kernel[grid](gu2, out2, f, stride_split, gu2.stride(-2), out2.stride(0),
                          N_SPLIT=n_split, ACT=act_code, BLOCK=block, num_warps=4, **pdl_launch(gu2.device))


def act_mul_triton(gate_up: Tensor, act: str = "silu") -> Tensor:
    """Triton launch of `act_mul_reference`."""
    code = _act_code(act)
    two_f = gate_up.shape[-1]
    if two_f % 2:
        raise ValueError(f"gate_up's last dimension must be even (gate | up), got {two_f}")
    gu2 = gate_up.reshape(-1, two_f)
    if gu2.stride(-1) != 1:
        gu2 = gu2.contiguous()
    out = torch.empty((*gate_up.shape[:-1], two_f // 2), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        _launch_act_mul(gu2, out.view(-1, two_f // 2), code, 1, 0)
    return out


def swiglu_skinny_triton(
    x: Tensor, w13: Tensor, act: str = "silu", *, config: Optional[SkinnyConfig] = None
) -> Tensor:
    """Triton skinny GEMM of x (at most 16 rows) on w13 with act-mul in the epilogue: reads
    w13 once, writes only the F outputs. `config` overrides the heuristic (tests, sweeps)."""
    code = _act_code(act)
    k = x.shape[-1]
    f = w13.shape[0] // 2
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > SKINNY_MAX_M:
        raise ValueError(f"the skinny GEMM takes at most {SKINNY_MAX_M} rows, got {m}")
    if w13.shape != (2 * f, k) or w13.stride(-1) != 1:
        raise ValueError(f"w13 {tuple(w13.shape)} does not fit x [..., {k}] as [W1; W3]")
    out = torch.empty((m, f), dtype=x.dtype, device=x.device)
    if m == 0 or f == 0:
        return out.view(*x.shape[:-1], f)
    cfg = config or skinny_config(f, k, x.element_size(), x.device, tiles=2)
    kps = k_per_split(k, cfg.block_k, cfg.split_k)
    upcast = dot_needs_upcast(x.dtype)
    grid = (triton.cdiv(f, cfg.block_n), cfg.split_k)
    common = dict(ACT=code, IEEE=x.dtype == torch.float32 or upcast, UPCAST=upcast, BLOCK_M=_BLOCK_M,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages, **pdl_launch(x.device))
    if cfg.split_k == 1:
        _gate_up_skinny_kernel[grid](x2, w13, out, m, f, k, x2.stride(0), w13.stride(0), out.stride(0),
                                     0, kps, SPLIT_K=1, **common)
    else:
        ws = torch.empty((cfg.split_k, m, 2 * f), dtype=torch.float32, device=x.device)
        _gate_up_skinny_kernel[grid](x2, w13, ws, m, f, k, x2.stride(0), w13.stride(0), ws.stride(1),
                                     ws.stride(0), kps, SPLIT_K=cfg.split_k, **common)
        _launch_act_mul(ws, out, code, cfg.split_k, ws.stride(0))
    return out.view(*x.shape[:-1], f)


def swiglu_gemv_triton(
    x: Tensor, w13: Tensor, act: str = "silu", *, config: Optional[GemvConfig] = None,
    norm: Optional[NormPrologue] = None,
) -> Tensor:
    """The one-row fused kernel: x (one row, any leading shape) on w13 with act-mul in the
    epilogue, on CUDA cores. With `norm` the input is `rmsnorm(x + norm.residual)`, computed
    in the same kernel (see `qkv.gemv_triton`). `config` overrides the heuristic."""
    code = _act_code(act)
    k = x.shape[-1]
    f = w13.shape[0] // 2
    if x.numel() != k:
        raise ValueError(f"the GEMV takes one row, got x of shape {tuple(x.shape)}")
    if w13.shape != (2 * f, k) or w13.stride(-1) != 1:
        raise ValueError(f"w13 {tuple(w13.shape)} does not fit x [..., {k}] as [W1; W3]")
    x1 = x.reshape(k).contiguous()
    out = torch.empty((1, f), dtype=x.dtype, device=x.device)
    if f == 0:
        return out.view(*x.shape[:-1], f)
    cfg = config or (norm_gemv_config(f, k, x.device, tiles=2) if norm is not None
                     else gemv_config(f, k, x.device, tiles=2))
    if norm is not None and cfg.split_k > 1:  # the norm needs the whole row's sum of squares
        cfg = replace(cfg, split_k=1)
    kps = k_per_split(k, cfg.block_k, cfg.split_k)
    grid = (triton.cdiv(f, cfg.block_n), cfg.split_k)
    ptrs, scalars, flags = prologue_args(norm, x1)
    common = dict(ACT=code, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES=cfg.num_stages,
                  num_warps=cfg.num_warps, **flags, **pdl_launch(x.device))
    if cfg.split_k == 1:
        _gate_up_gemv_kernel[grid](x1, w13, out, *ptrs, f, k, w13.stride(0), 0, kps, *scalars, SPLIT_K=1, **common)
    else:
        ws = torch.empty((cfg.split_k, 1, 2 * f), dtype=torch.float32, device=x.device)
        _gate_up_gemv_kernel[grid](x1, w13, ws, *ptrs, f, k, w13.stride(0), ws.stride(0), kps, *scalars,
                                   SPLIT_K=cfg.split_k, **common)
        _launch_act_mul(ws, out, code, cfg.split_k, ws.stride(0))
    return out.view(*x.shape[:-1], f)


def swiglu_linear_triton(x: Tensor, w13: Tensor, act: str = "silu") -> Tensor:
    """The Triton path: one row takes the fused GEMV; 2..16 rows the fused skinny GEMM (config
    from `SKINNY_TUNED`, else `skinny_config`; None there means cuBLAS); more rows, or a
    shape the skinny kernels do not take, one torch GEMM on w13 followed by the Triton act-mul."""
    rows = x.numel() // max(1, x.shape[-1])
    if 0 < rows <= SKINNY_MAX_M and x.dtype == w13.dtype and x.dtype in _SKINNY_DTYPES and w13.stride(-1) == 1:
        if rows == 1:
            return swiglu_gemv_triton(x, w13, act)
        key = ("gate_up", w13.shape[0] // 2, w13.shape[1])
        config = SKINNY_TUNED[key] if key in SKINNY_TUNED else skinny_config(
            key[1], key[2], x.element_size(), x.device, tiles=2)
        if config is not None:
            return swiglu_skinny_triton(x, w13, act, config=config)
    return act_mul_triton(F.linear(x, w13), act)


# ----------------------------------------------------------------------------- public ops
def act_mul(gate_up: Tensor, act: str = "silu") -> Tensor:
    """`act(gate) * up` over the two halves of gate_up's last dimension (float32 math, the
    input's dtype out). Triton on CUDA or under the interpreter, the reference elsewhere."""
    if use_triton(gate_up):
        return act_mul_triton(gate_up, act)
    return act_mul_reference(gate_up, act)


def swiglu_linear(x: Tensor, w13: Tensor, act: str = "silu") -> Tensor:
    """`act(x @ W1.T) * (x @ W3.T)` from the fused weight `w13 = [W1; W3]` ([2F, D]):
    [..., D] -> [..., F], activation and product in float32, x's dtype out."""
    if use_triton(x, w13):
        return swiglu_linear_triton(x, w13, act)
    return swiglu_linear_reference(x, w13, act)


# ----------------------------------------------------------------------------- custom ops
def _act_mul_op(gate_up: Tensor, act: str = "silu") -> Tensor:
    return act_mul(gate_up, act)


def _act_mul_fake(gate_up, act="silu"):
    _act_code(act)
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


def _swiglu_linear_op(x: Tensor, w13: Tensor, act: str = "silu") -> Tensor:
    return swiglu_linear(x, w13, act)


def _swiglu_linear_fake(x, w13, act="silu"):
    _act_code(act)
    return x.new_empty((*x.shape[:-1], w13.shape[0] // 2))


act_mul_op = register_op("act_mul", _act_mul_op, _act_mul_fake)
swiglu_linear_op = register_op("swiglu_linear", _swiglu_linear_op, _swiglu_linear_fake)
