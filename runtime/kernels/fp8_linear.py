"""FP8 linears: weight-only (the decode path) and dynamic activation quantization.

The numbers are fixed by the plan (PLAN_SPEC.md section 7); every kernel below computes them
up to the order of the float32 accumulation:

    weight-only (`activations: keep`):
        y = x @ (Wq.float() * s_w).T  (+ bias)                 fp32 accumulate, x's dtype out
    dynamic (`per_token` / `per_tensor` / `per_block`):
        s_x = amax(|x|) / fmax over a row / the tensor / a K-block of a row (saturating cast)
        y = (xq.float() * s_x) @ (Wq.float() * s_w).T  (+ bias)

Weight scales `s_w` are float32: tensor (numel 1), channel ([N]) or block ([N, ceil(K / bs)],
blocks along K). `act` "silu" / "gelu_tanh" fuses the gated MLP input: the weight is
`[W1; W3]` ([2F, K], swiglu.py's layout, scales over the 2F rows) and the output is
act(x @ W1') * (x @ W3') ([..., F]), act-mul in the kernels' epilogue.

Why the kernels can skip dequantizing: fp8 (e4m3, e5m2) converts to bf16 and fp16 exactly,
so a weight tile is upcast in registers and multiplied on tensor cores (or CUDA cores) with
float32 accumulation, and the scale multiplies the float32 sum: per output column (tensor,
channel) at the end, per K-block partial sum (block) inside the K loop.

Kernels, by the number of rows M of x (`fp8_kernel_name` names the one a shape takes; configs
per shape in `FP8_TUNED`, measured on an H100, heuristics elsewhere):
  - M == 1: `_fp8_gemv_kernel`, CUDA cores, the weight streamed once in 16-byte vectors
    (16 fp8 elements a thread), split-K where the column blocks do not fill the SMs; the
    last split of a column block to finish sums the partials (an arrival counter, as in
    attention.py's decode) so split-K costs no second launch. Block scales take
    `_fp8_gemv_block_kernel` (K tiles of whole scale blocks, one scale per row and block);
  - 2..16: `_fp8_gemm_kernel` as a skinny GEMM (one 16-row tile, tl.dot on the upcast tile,
    split-K with the same fused reduce);
  - more (prefill): the same kernel tiled over M and N (grouped launch order for L2 reuse).
  The tl.dot paths upcast fp8 to bf16 with `_fp8x4_asm` (integer ops on packed bytes, no
  cvt instructions); the GEMV keeps Triton's cast, measured as fast there.
Measured (H100, CUDA graphs, weights cycled past L2; benchmarks/bench_fp8.py): the four
decode linears of a Llama-3.2-1B layer at M = 1 take 0.67x the time of planlang's bf16
GEMVs; prefill (M = 2048) weight-only is 1.5-1.9x slower than cuBLAS bf16.
Dynamic activations: x is quantized by one small Triton kernel (amax, scale, cast in one
pass over a row or a block; per_tensor adds a per-row amax pass), then `torch._scaled_mm`
(cuBLAS FP8, precise accumulation) from `SCALED_MM_MIN_M` rows on where this torch supports
the scale layout, the dtypes and the shape (probed once), else the same Triton kernels on the
fp8 x (upcast to bf16 in registers, exact).

With PDL (sm_90+, `backend.pdl_launch`) every kernel waits for the kernel before it before
reading x or storing (the split-K arrival counters included); the GEMV loads its first weight
tile(s) before that wait.

Custom ops: `planlang::fp8_linear(x, wq, w_scale, bias, block_size, act)` and
`planlang::fp8_linear_dynamic(x, wq, w_scale, bias, act_mode, block_size, act)`, with fake
implementations. No host synchronization; buffers are allocated by shape only (CUDA-graph
safe). Inference only: no autograd formula.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import gdc_functions, interpreter_on, pdl_launch, register_op, use_triton
from .qkv import NORM_MIN_ROWS, k_per_split
from .rmsnorm_residual import NormPrologue, prologue_args
from .swiglu import ACTS, _act_code

try:  # the module must import without triton; then only the reference runs
    import triton
    import triton.language as tl
    from .swiglu import _act_fp32
    from .rmsnorm_residual import norm_prologue_rstd, norm_prologue_tile
    gdc_wait, gdc_launch_dependents = gdc_functions()
except Exception:  # ImportError, or a broken install raising anything
    triton = None

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ACT_MODES = ("per_token", "per_tensor", "per_block")
SKINNY_MAX_M = 16
AMAX_EPS = 1e-12  # amax floor: an all-zero row gets a finite scale (and quantizes to zeros)
_ONE_PASS_MAX = 16384  # a row up to this many elements is quantized from registers, one read
_W_TENSOR, _W_CHANNEL, _W_BLOCK = 0, 1, 2  # weight scale kinds (kernel codes)
_X_NONE, _X_ROW, _X_BLOCK = 0, 1, 2  # activation scale kinds: weight-only, per row, per K-block


# ----------------------------------------------------------------------------- checks
def _fmax(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def weight_scaling(wq: Tensor, w_scale: Tensor, block_size: int = 0) -> str:
    """"tensor", "channel" or "block": what `w_scale`'s shape says about `wq` ([N, K]); a 2-D
    scale is per block of `block_size` along K and must be [N, ceil(K / block_size)]."""
    n, k = wq.shape
    if w_scale.dim() == 2:
        if block_size > 0 and tuple(w_scale.shape) == (n, -(-k // block_size)):
            return "block"
        want = f"[{n}, {-(-k // block_size)}]" if block_size > 0 else "block_size > 0"
        raise ValueError(f"fp8_linear: block weight scale of shape {tuple(w_scale.shape)} does not fit weight "
                         f"{tuple(wq.shape)} with block_size {block_size}: expected {want}")
    if w_scale.numel() == 1:
        return "tensor"
    if w_scale.dim() == 1 and w_scale.shape[0] == n:
        return "channel"
    raise ValueError(f"fp8_linear: weight scale of shape {tuple(w_scale.shape)} does not fit weight "
                     f"{tuple(wq.shape)}: expected numel 1 (tensor), [{n}] (channel) or "
                     f"[{n}, ceil(K / block_size)] (block)")


def _check(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor], block_size: int,
           act: Optional[str]) -> str:
    if wq.dtype not in FP8_DTYPES:
        raise TypeError(f"fp8_linear: weight dtype {wq.dtype} is not fp8; hint: quantize it with "
                        f"planlang.runtime.precision.formats.quantize_fp8 (float8_e4m3fn or float8_e5m2)")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"fp8_linear: x dtype {x.dtype} is not one of bf16, fp16, fp32")
    if wq.dim() != 2 or x.shape[-1] != wq.shape[1]:
        raise ValueError(f"fp8_linear: weight {tuple(wq.shape)} does not fit x [..., {x.shape[-1]}]; "
                         f"hint: the weight is in nn.Linear layout [N, K]")
    if w_scale.dtype != torch.float32:
        raise TypeError(f"fp8_linear: the weight scale must be float32, got {w_scale.dtype}")
    if act is not None:
        _act_code(act)
        if wq.shape[0] % 2:
            raise ValueError(f"fp8_linear: act={act!r} needs the fused [W1; W3] weight (an even number "
                             f"of rows), got {wq.shape[0]} rows")
    if bias is not None and tuple(bias.shape) != (wq.shape[0],):
        raise ValueError(f"fp8_linear: bias of shape {tuple(bias.shape)} does not fit {wq.shape[0]} weight rows")
    return weight_scaling(wq, w_scale, block_size)


def _rows(x: Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


# ----------------------------------------------------------------------------- reference
def dequantize_weight_reference(wq: Tensor, w_scale: Tensor, block_size: int = 0) -> Tensor:
    """Wq.float() * s_w, the scale broadcast per tensor, output row or K-block (float32)."""
    kind = weight_scaling(wq, w_scale, block_size)
    w = wq.float()
    s = w_scale.float()
    if kind == "tensor":
        return w * s.reshape(())
    if kind == "channel":
        return w * s[:, None]
    return w * s.repeat_interleave(block_size, dim=1)[:, : wq.shape[1]]


def _act_mul_fp32(y: Tensor, act: Optional[str]) -> Tensor:
    if act is None:
        return y
    g, u = y.chunk(2, dim=-1)
    return (F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")) * u


def fp8_linear_reference(
    x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, *, block_size: int = 0,
    act: Optional[str] = None,
) -> Tensor:
    """Plain PyTorch in float32: x @ dequantize(Wq).T (+ bias) [then act-mul], x's dtype out."""
    _check(x, wq, w_scale, bias, block_size, act)
    y = x.float() @ dequantize_weight_reference(wq, w_scale, block_size).T
    if bias is not None:
        y = y + bias.float()
    return _act_mul_fp32(y, act).to(x.dtype)


def quantize_activation_reference(
    x: Tensor, act_mode: str = "per_token", block_size: int = 0, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[Tensor, Tensor]:
    """(xq [M, K] fp8, s_x) of x ([..., K] flattened to rows): s_x = max(amax, 1e-12) / fmax
    per row ([M]), for the whole tensor (repeated per row, [M]) or per K-block of a row
    ([M, ceil(K / block_size)]); xq = clamp(x / s_x, -fmax, fmax) cast to `dtype`."""
    _check_act_mode(act_mode, block_size)
    k = x.shape[-1]
    xf = x.reshape(-1, k).float()
    m = xf.shape[0]
    fmax = _fmax(dtype)
    if act_mode == "per_block":
        nkb = -(-k // block_size)
        pad = F.pad(xf.abs(), (0, nkb * block_size - k))
        scale = pad.view(m, nkb, block_size).amax(-1).clamp_min(AMAX_EPS) / fmax
        full = scale.repeat_interleave(block_size, dim=1)[:, :k]
    else:
        amax = xf.abs().amax(-1) if act_mode == "per_token" else xf.abs().amax().expand(m)
        scale = amax.clamp_min(AMAX_EPS) / fmax
        full = scale[:, None]
    xq = (xf / full).clamp(-fmax, fmax).to(dtype)
    return xq, scale.contiguous()


def fp8_linear_dynamic_reference(
    x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, *, act_mode: str = "per_token",
    block_size: int = 0, act: Optional[str] = None,
) -> Tensor:
    """Plain PyTorch in float32: x quantized per `act_mode` to wq's fp8 dtype, then
    dequantize(xq) @ dequantize(Wq).T (+ bias) [then act-mul], x's dtype out."""
    _check(x, wq, w_scale, bias, block_size, act)
    xq, sx = quantize_activation_reference(x, act_mode, block_size, wq.dtype)
    k = x.shape[-1]
    xd = xq.float() * (sx.repeat_interleave(block_size, dim=1)[:, :k] if act_mode == "per_block" else sx[:, None])
    y = xd @ dequantize_weight_reference(wq, w_scale, block_size).T
    if bias is not None:
        y = y + bias.float()
    n_out = wq.shape[0] // 2 if act else wq.shape[0]
    return _act_mul_fp32(y, act).to(x.dtype).reshape(*x.shape[:-1], n_out)


def _check_act_mode(act_mode: str, block_size: int) -> None:
    if act_mode not in ACT_MODES:
        raise ValueError(f"fp8_linear_dynamic: act_mode {act_mode!r} is not one of {', '.join(ACT_MODES)}; "
                         f"hint: weight-only ('activations: keep') is fp8_linear")
    if act_mode == "per_block" and block_size <= 0:
        raise ValueError("fp8_linear_dynamic: per_block activations need block_size > 0 (the plan's default is 128)")


# ----------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _outer(a_m, b_n, W_AS_A: tl.constexpr):
        """a[m] * b[n] laid out like the accumulator: [BN, BM] when the weight is the A operand."""
        if W_AS_A:
            r = b_n[:, None] * a_m[None, :]
        else:
            r = a_m[:, None] * b_n[None, :]
        return r

    @triton.jit
    def _round_fp8(v, MANT: tl.constexpr, MIN_EXP: tl.constexpr):
        """v (fp32, within +-fmax) rounded to nearest-even on the fp8 grid of MANT mantissa bits
        and smallest normal exponent MIN_EXP, in fp32 arithmetic. Used only under Triton's
        interpreter, whose fp32 -> fp8 cast drops the carry of a mantissa that rounds up
        (124.3 -> 64 in e4m3); the GPU's cvt rounds correctly and casts directly."""
        e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, MIN_EXP)
        quantum = ((e - MANT + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e - MANT)
        y = tl.math.div_rn(v, quantum)  # exact: a power of two
        return ((y + 12582912.0) - 12582912.0) * quantum  # 1.5 * 2^23: fp32 adds round to even

    @triton.jit
    def _saturate(v, FMAX, MANT: tl.constexpr, MIN_EXP: tl.constexpr, EXACT_CAST: tl.constexpr):
        """clamp(v, -FMAX, FMAX), ready for the cast to fp8 (rounded already when EXACT_CAST)."""
        v = tl.clamp(v, -FMAX, FMAX)
        if EXACT_CAST:
            v = _round_fp8(v, MANT, MIN_EXP)
        return v

    def _fp8x4_ptx(shift: str, mask: str, power: str, to_f32: bool) -> str:
        """PTX for `_fp8x4_asm`: 4 packed fp8 bytes in, 4 fp32 out ($0..$3, input $4) or two
        bf16x2 words out ($0, $1, input $2: Triton packs 16-bit results in pairs)."""
        src = "$4" if to_f32 else "$2"
        head = ("{ .reg .b32 lo, hi, t, s, z, p, nz; mov.b32 z, 0; mov.b32 p, " + power + "; "
                "mov.b32 nz, 0x80008000; prmt.b32 lo, " + src + ", z, 0x1404; prmt.b32 hi, " + src + ", z, 0x3424; "
                "shr.b32 t, lo, " + shift + "; and.b32 t, t, " + mask + "; and.b32 s, lo, nz; or.b32 lo, s, t; "
                "shr.b32 t, hi, " + shift + "; and.b32 t, t, " + mask + "; and.b32 s, hi, nz; or.b32 hi, s, t; "
                "fma.rn.bf16x2 lo, lo, p, nz; fma.rn.bf16x2 hi, hi, p, nz; ")
        if to_f32:
            return head + ("shl.b32 $0, lo, 16; and.b32 $1, lo, 0xFFFF0000; "
                           "shl.b32 $2, hi, 16; and.b32 $3, hi, 0xFFFF0000; }")
        return head + "mov.b32 $0, lo; mov.b32 $1, hi; }"

    # e4m3: exponent+mantissa shifted by 4 under bf16's, 2^120 (bf16 0x7B80) restores it;
    # e5m2: by 3, 2^112 (0x7780).
    _PTX_E4M3_F32 = tl.constexpr(_fp8x4_ptx("4", "0x07F007F0", "0x7B807B80", True))
    _PTX_E4M3_BF16 = tl.constexpr(_fp8x4_ptx("4", "0x07F007F0", "0x7B807B80", False))
    _PTX_E5M2_F32 = tl.constexpr(_fp8x4_ptx("3", "0x0FE00FE0", "0x77807780", True))
    _PTX_E5M2_BF16 = tl.constexpr(_fp8x4_ptx("3", "0x0FE00FE0", "0x77807780", False))

    @triton.jit
    def _fp8x4_asm(w, E5M2: tl.constexpr, TO_F32: tl.constexpr):
        """Exact fp8 -> bf16 (or fp32) of 4 packed bytes by integer ops, no cvt instruction:
        the plain cast costs 1.5 conversions an element (fp8x2 -> f16x2, then f16 -> bf16 or
        f32) on the SM's 16-a-clock conversion units, which capped the GEMV near 2.3 TB/s
        on an H100. prmt puts each byte in the top of a 16-bit half; sign and
        exponent+mantissa move under bf16's (a value 2^-120 (e4m3) or 2^-112 (e5m2) times
        too small, subnormals too); one bf16x2 fma by that power of two (+ -0, which keeps
        signed zeros) makes it exact."""
        u = w.to(tl.uint8, bitcast=True)
        if TO_F32:
            if E5M2:
                r = tl.inline_asm_elementwise(_PTX_E5M2_F32, "=r,=r,=r,=r,r", [u], dtype=tl.float32,
                                              is_pure=True, pack=4)
            else:
                r = tl.inline_asm_elementwise(_PTX_E4M3_F32, "=r,=r,=r,=r,r", [u], dtype=tl.float32,
                                              is_pure=True, pack=4)
        else:
            if E5M2:
                r = tl.inline_asm_elementwise(_PTX_E5M2_BF16, "=r,=r,r", [u], dtype=tl.bfloat16,
                                              is_pure=True, pack=4)
            else:
                r = tl.inline_asm_elementwise(_PTX_E4M3_BF16, "=r,=r,r", [u], dtype=tl.bfloat16,
                                              is_pure=True, pack=4)
        return r

    @triton.jit
    def _fp8_to_f32(w, FAST_CVT: tl.constexpr, E5M2: tl.constexpr):
        """fp8 -> fp32, exactly (FAST_CVT: `_fp8x4_asm`, CUDA only)."""
        if FAST_CVT:
            r = _fp8x4_asm(w, E5M2, True)
        else:
            r = w.to(tl.float32)
        return r

    @triton.jit
    def _fp8_up(w, CDT: tl.constexpr, FAST_CVT: tl.constexpr, E5M2: tl.constexpr):
        """fp8 -> CDT (the tl.dot input type), exactly. FAST_CVT for bf16 (fp16 has a one-cvt
        path for two elements already)."""
        if FAST_CVT and CDT == tl.bfloat16:
            r = _fp8x4_asm(w, E5M2, False)
        else:
            r = w.to(CDT)
        return r

    @triton.jit
    def _gemv_finish(
        gate, up, pid_n, pid_k, offs_n, n_mask, N, ws_ptr, xs_ptr, b_ptr, out_ptr, part_ptr, counter_ptr,
        stride_split, W_SCALE: tl.constexpr, X_SCALE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr, FUSED_REDUCE: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """The GEMVs' epilogue over this program's K range: whole-sum scales (weight tensor /
        channel, x per row), then with SPLIT_K == 1 bias, act-mul and the store; otherwise the
        scaled partials go to part[pid_k] and, with FUSED_REDUCE, the last split of this column
        block to arrive sums them in split order and finishes."""
        GATE_UP: tl.constexpr = ACT >= 0
        if W_SCALE == 0:
            sw = tl.load(ws_ptr)
            gate = gate * sw
            up = up * sw
        elif W_SCALE == 1:
            gate = gate * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
            if GATE_UP:
                up = up * tl.load(ws_ptr + N + offs_n, mask=n_mask, other=0.0)
        if X_SCALE == 1:
            sx = tl.load(xs_ptr)
            gate = gate * sx
            up = up * sx
        if SPLIT_K == 1:
            if HAS_BIAS:
                gate += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                if GATE_UP:
                    up += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if GATE_UP:
                gate = _act_fp32(gate, ACT) * up
            tl.store(out_ptr + offs_n, gate.to(out_ptr.dtype.element_ty), mask=n_mask)
        else:
            part = part_ptr + pid_k * stride_split + offs_n
            tl.store(part, gate, mask=n_mask)
            if GATE_UP:
                tl.store(part + N, up, mask=n_mask)
            if FUSED_REDUCE:
                # Every thread's partial stores come before the arrival (release, GPU scope).
                tl.debug_barrier()
                arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
                if arrived == SPLIT_K - 1:  # the last to arrive: every partial is written
                    tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # for the next launch
                    gate = tl.zeros([BLOCK_N], dtype=tl.float32)
                    up = tl.zeros([BLOCK_N], dtype=tl.float32)
                    for s in tl.static_range(SPLIT_K):  # a fixed order: results do not vary by run
                        # .cg: read from L2, where the other programs' stores landed.
                        gate += tl.load(part_ptr + s * stride_split + offs_n, mask=n_mask, other=0.0,
                                        cache_modifier=".cg")
                        if GATE_UP:
                            up += tl.load(part_ptr + s * stride_split + N + offs_n, mask=n_mask, other=0.0,
                                          cache_modifier=".cg")
                    if HAS_BIAS:
                        gate += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                        if GATE_UP:
                            up += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    if GATE_UP:
                        gate = _act_fp32(gate, ACT) * up
                    tl.store(out_ptr + offs_n, gate.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _fp8_gemv_tile(
        acc_g, acc_u, wg, wu, xk, xs_ptr, s_gate, s_up, offs_k, k_mask, w_mask, BS,
        W_SCALE: tl.constexpr, X_SCALE: tl.constexpr, GATE_UP: tl.constexpr, FAST_CVT: tl.constexpr,
        E5M2: tl.constexpr,
    ):
        """One K tile of `_fp8_gemv_kernel`: the loaded weight tiles wg (and wu) times x's
        tile xk (fp32), added to the fp32 partials. Block scales are gathered per element."""
        if X_SCALE == 2:  # per-block activation scale, per element
            xk = xk * tl.load(xs_ptr + offs_k // BS, mask=k_mask, other=0.0)
        if W_SCALE == 2:
            sg = tl.load(s_gate[:, None] + offs_k[None, :] // BS, mask=w_mask, other=0.0)
            acc_g += _fp8_to_f32(wg, FAST_CVT, E5M2) * (xk[None, :] * sg)
        else:
            acc_g += _fp8_to_f32(wg, FAST_CVT, E5M2) * xk[None, :]
        if GATE_UP:
            if W_SCALE == 2:
                su = tl.load(s_up[:, None] + offs_k[None, :] // BS, mask=w_mask, other=0.0)
                acc_u += _fp8_to_f32(wu, FAST_CVT, E5M2) * (xk[None, :] * su)
            else:
                acc_u += _fp8_to_f32(wu, FAST_CVT, E5M2) * xk[None, :]
        return acc_g, acc_u

    @triton.jit
    def _fp8_gemv_kernel(
        x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, counter_ptr, r_ptr, g_ptr, s_ptr,
        N, K, stride_wn, stride_wsn, stride_split, k_per_split, BS, eps, offset,
        W_SCALE: tl.constexpr, X_SCALE: tl.constexpr, ACT: tl.constexpr,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, FUSED_REDUCE: tl.constexpr,
        FAST_CVT: tl.constexpr, E5M2: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """out[n] = scale * (Wq[n] . x) for one row x and this program's BLOCK_N outputs, on
        CUDA cores: [BLOCK_N, BLOCK_K] fp8 tiles of whole rows, upcast to fp32, multiplied by
        x into fp32 partials that are reduced over K once, at the end. ACT >= 0: the rows n
        (gate) and N + n (up) both, act(gate) * up stored. Block scales here (block sizes
        that fit no tile, see `_fp8_gemv_block_kernel`) are gathered per element. The first
        weight tiles are loaded first: with USE_PDL while waiting for the kernel that writes x.
        NORM (SPLIT_K == 1, X_SCALE == 0 only): x is the input of an RMSNorm that the kernel
        computes itself (`rmsnorm_residual.norm_prologue_tile`, as in qkv._gemv_kernel)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        GATE_UP: tl.constexpr = ACT >= 0
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w_gate = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        w_up = w_ptr + (offs_n + N).to(tl.int64)[:, None] * stride_wn
        s_gate = ws_ptr + offs_n * stride_wsn
        s_up = s_gate + N * stride_wsn
        k_lo = pid_k * k_per_split
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w_mask = n_mask[:, None] & k_mask[None, :]
        wg = tl.load(w_gate + offs_k[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
        wu = wg
        if GATE_UP:
            wu = tl.load(w_up + offs_k[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        s_cols = tl.where(pid_n == 0, K, 0)  # the first column block stores s
        xk, sq = norm_prologue_tile(x_ptr, r_ptr, g_ptr, s_ptr, offs_k, k_mask, offset, s_cols, NORM, HAS_RES)
        acc_g, acc_u = _fp8_gemv_tile(acc_g, acc_u, wg, wu, xk, xs_ptr, s_gate, s_up, offs_k, k_mask, w_mask,
                                      BS, W_SCALE, X_SCALE, GATE_UP, FAST_CVT, E5M2)
        for k0 in tl.range(BLOCK_K, k_per_split, BLOCK_K, num_stages=STAGES):
            offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w_mask = n_mask[:, None] & k_mask[None, :]
            wg = tl.load(w_gate + offs_k[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            wu = wg
            if GATE_UP:
                wu = tl.load(w_up + offs_k[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            xk, sq_k = norm_prologue_tile(x_ptr, r_ptr, g_ptr, s_ptr, offs_k, k_mask, offset, s_cols,
                                          NORM, HAS_RES)
            sq += sq_k
            acc_g, acc_u = _fp8_gemv_tile(acc_g, acc_u, wg, wu, xk, xs_ptr, s_gate, s_up, offs_k, k_mask,
                                          w_mask, BS, W_SCALE, X_SCALE, GATE_UP, FAST_CVT, E5M2)
        rstd = norm_prologue_rstd(sq, K, eps, NORM)
        _gemv_finish(tl.sum(acc_g, axis=1) * rstd, tl.sum(acc_u, axis=1) * rstd, pid_n, pid_k, offs_n, n_mask, N, ws_ptr,
                     xs_ptr, b_ptr, out_ptr, part_ptr, counter_ptr, stride_split,
                     W_SCALE, X_SCALE, ACT, HAS_BIAS, SPLIT_K, FUSED_REDUCE, BLOCK_N)

    @triton.jit
    def _fp8_gemv_block_kernel(
        x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, counter_ptr,
        N, K, stride_wn, stride_wsn, stride_split, k_per_split, BS,
        W_SCALE: tl.constexpr, X_SCALE: tl.constexpr, ACT: tl.constexpr,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, FUSED_REDUCE: tl.constexpr,
        FAST_CVT: tl.constexpr, E5M2: tl.constexpr,
        BLOCK_N: tl.constexpr, NB: tl.constexpr, SUB: tl.constexpr, STAGES: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """The one-row GEMV with block scales (weight blocks and/or per-block x): the K tile is
        [NB, SUB], NB sub-blocks of SUB columns that each lie in one scale block of BS (SUB ==
        BS, or NB == 1 inside a larger block), so a tile as large as the plain GEMV's takes one
        scale per (row, sub-block), broadcast over SUB, instead of a gather per element.
        USE_PDL: waits for the previous kernel first."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        GATE_UP: tl.constexpr = ACT >= 0
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_b = tl.arange(0, NB)
        offs_e = tl.arange(0, SUB)
        w_gate = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn
        w_up = w_ptr + (offs_n + N).to(tl.int64)[:, None, None] * stride_wn
        s_gate = ws_ptr + offs_n * stride_wsn
        s_up = s_gate + N * stride_wsn
        k_lo = pid_k * k_per_split
        acc_g = tl.zeros([BLOCK_N, NB, SUB], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, NB, SUB], dtype=tl.float32)
        for k0 in tl.range(0, k_per_split, NB * SUB, num_stages=STAGES):
            kt = k_lo + k0
            sub_k = kt + offs_b * SUB  # first column of each sub-block
            offs_k = sub_k[:, None] + offs_e[None, :]  # [NB, SUB]
            k_mask = offs_k < K
            kb = sub_k // BS  # each sub-block's scale block
            b_mask = sub_k < K
            w_mask = n_mask[:, None, None] & k_mask[None, :, :]
            xk = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            if X_SCALE == 2:
                xk = xk * tl.load(xs_ptr + kb, mask=b_mask, other=0.0)[:, None]
            wg = tl.load(w_gate + offs_k[None, :, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            if W_SCALE == 2:
                sg = tl.load(s_gate[:, None] + kb[None, :], mask=n_mask[:, None] & b_mask[None, :], other=0.0)
                acc_g += _fp8_to_f32(wg, FAST_CVT, E5M2) * (xk[None, :, :] * sg[:, :, None])
            else:
                acc_g += _fp8_to_f32(wg, FAST_CVT, E5M2) * xk[None, :, :]
            if GATE_UP:
                wu = tl.load(w_up + offs_k[None, :, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
                if W_SCALE == 2:
                    su = tl.load(s_up[:, None] + kb[None, :], mask=n_mask[:, None] & b_mask[None, :], other=0.0)
                    acc_u += _fp8_to_f32(wu, FAST_CVT, E5M2) * (xk[None, :, :] * su[:, :, None])
                else:
                    acc_u += _fp8_to_f32(wu, FAST_CVT, E5M2) * xk[None, :, :]
        gate = tl.sum(tl.sum(acc_g, axis=2), axis=1)
        up = tl.sum(tl.sum(acc_u, axis=2), axis=1)
        _gemv_finish(gate, up, pid_n, pid_k, offs_n, n_mask, N, ws_ptr, xs_ptr, b_ptr, out_ptr, part_ptr,
                     counter_ptr, stride_split, W_SCALE, X_SCALE, ACT, HAS_BIAS, SPLIT_K, FUSED_REDUCE, BLOCK_N)

    @triton.jit
    def _fp8_gemm_kernel(
        x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, counter_ptr,
        M, N, K, stride_xm, stride_xsm, stride_wn, stride_wsn, stride_om, stride_split, stride_pm,
        k_per_split, BS,
        W_SCALE: tl.constexpr, X_SCALE: tl.constexpr, BLOCKED: tl.constexpr, TILE_SCALE: tl.constexpr,
        ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, FUSED_REDUCE: tl.constexpr,
        W_AS_A: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr, FAST_CVT: tl.constexpr, E5M2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """out[m-block, n-block] = scale * (x @ Wq.T) with tl.dot on tiles upcast to CDT (exact
        for fp8 weights, and for fp8 x in the dynamic path), fp32 accumulation. W_AS_A: the
        weight tile is the left operand (acc is out.T; Hopper's wgmma then takes it from
        registers). Tile scales (block kinds) multiply each K tile's dot; without TILE_SCALE
        the tiles are scaled per element in fp32 and multiplied in IEEE fp32 (block sizes
        that are no multiple of 16). ACT >= 0: gate (rows n) and up (rows N + n), act-mul in
        the epilogue. SPLIT_K > 1: scaled partials to part[pid_k]; FUSED_REDUCE: the last
        split of this tile to arrive sums them, else `_fp8_reduce_kernel` does. USE_PDL: waits
        for the previous kernel first (the pipelined loop reads x and w together)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        GATE_UP: tl.constexpr = ACT >= 0
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_size
        pid_n = (pid % in_group) // group_size
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        s_gate = ws_ptr + offs_n * stride_wsn
        s_up = s_gate + N * stride_wsn
        s_x = xs_ptr + offs_m * stride_xsm
        if W_AS_A:
            acc_g = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_lo = pid_k * k_per_split
        for k0 in range(0, k_per_split, BLOCK_K):
            kt = k_lo + k0
            offs_k = kt + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            if W_AS_A:  # [BN, BK] weight rows (K contiguous) and [BK, BM] x columns
                w_off = offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
                u_off = (offs_n + N).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
                w_mask = n_mask[:, None] & k_mask[None, :]
                xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                             mask=m_mask[None, :] & k_mask[:, None], other=0.0)
            else:  # [BM, BK] x rows and [BK, BN] weight columns (K contiguous)
                w_off = offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
                u_off = (offs_n + N).to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
                w_mask = k_mask[:, None] & n_mask[None, :]
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                             mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wg = tl.load(w_ptr + w_off, mask=w_mask, other=0.0, eviction_policy="evict_first")
            if GATE_UP:
                wu = tl.load(w_ptr + u_off, mask=w_mask, other=0.0, eviction_policy="evict_first")
            if BLOCKED and TILE_SCALE:  # each K tile lies in one scale block: scale its dot
                xc = xt.to(CDT)
                zero = tl.zeros(acc_g.shape, dtype=tl.float32)
                if W_AS_A:
                    pg = tl.dot(_fp8_up(wg, CDT, FAST_CVT, E5M2), xc, zero, input_precision=PRECISION)
                else:
                    pg = tl.dot(xc, _fp8_up(wg, CDT, FAST_CVT, E5M2), zero, input_precision=PRECISION)
                kb = tl.minimum(kt, K - 1) // BS  # a tile past K (zeros) reads the last block's scale
                if X_SCALE == 2:
                    fx = tl.load(s_x + kb, mask=m_mask, other=0.0)
                else:
                    fx = tl.full([BLOCK_M], 1.0, tl.float32)
                if W_SCALE == 2:
                    fg = tl.load(s_gate + kb, mask=n_mask, other=0.0)
                else:
                    fg = tl.full([BLOCK_N], 1.0, tl.float32)
                acc_g += pg * _outer(fx, fg, W_AS_A)
                if GATE_UP:
                    if W_AS_A:
                        pu = tl.dot(_fp8_up(wu, CDT, FAST_CVT, E5M2), xc, zero, input_precision=PRECISION)
                    else:
                        pu = tl.dot(xc, _fp8_up(wu, CDT, FAST_CVT, E5M2), zero, input_precision=PRECISION)
                    if W_SCALE == 2:
                        fu = tl.load(s_up + kb, mask=n_mask, other=0.0)
                    else:
                        fu = fg
                    acc_u += pu * _outer(fx, fu, W_AS_A)
            elif BLOCKED:  # per-element scales in fp32 (only with W_AS_A False)
                kbs = offs_k // BS
                xf = xt.to(tl.float32)
                if X_SCALE == 2:
                    xf = xf * tl.load(s_x[:, None] + kbs[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                wgf = wg.to(tl.float32)
                if W_SCALE == 2:
                    wgf = wgf * tl.load(s_gate[None, :] + kbs[:, None], mask=w_mask, other=0.0)
                acc_g = tl.dot(xf, wgf, acc_g, input_precision="ieee")
                if GATE_UP:
                    wuf = wu.to(tl.float32)
                    if W_SCALE == 2:
                        wuf = wuf * tl.load(s_up[None, :] + kbs[:, None], mask=w_mask, other=0.0)
                    acc_u = tl.dot(xf, wuf, acc_u, input_precision="ieee")
            else:
                xc = xt.to(CDT)
                if W_AS_A:
                    acc_g = tl.dot(_fp8_up(wg, CDT, FAST_CVT, E5M2), xc, acc_g, input_precision=PRECISION)
                    if GATE_UP:
                        acc_u = tl.dot(_fp8_up(wu, CDT, FAST_CVT, E5M2), xc, acc_u, input_precision=PRECISION)
                else:
                    acc_g = tl.dot(xc, _fp8_up(wg, CDT, FAST_CVT, E5M2), acc_g, input_precision=PRECISION)
                    if GATE_UP:
                        acc_u = tl.dot(xc, _fp8_up(wu, CDT, FAST_CVT, E5M2), acc_u, input_precision=PRECISION)
        # Whole-sum scales: per column (weight tensor / channel), per row (x per row).
        if X_SCALE == 1:
            ex = tl.load(s_x, mask=m_mask, other=0.0)
        else:
            ex = tl.full([BLOCK_M], 1.0, tl.float32)
        if W_SCALE == 0:
            eg = tl.full([BLOCK_N], 1.0, tl.float32) * tl.load(ws_ptr)
            eu = eg
        elif W_SCALE == 1:
            eg = tl.load(s_gate, mask=n_mask, other=0.0)
            if GATE_UP:
                eu = tl.load(s_up, mask=n_mask, other=0.0)
            else:
                eu = eg
        else:
            eg = tl.full([BLOCK_N], 1.0, tl.float32)
            eu = eg
        acc_g = acc_g * _outer(ex, eg, W_AS_A)
        if GATE_UP:
            acc_u = acc_u * _outer(ex, eu, W_AS_A)
        if W_AS_A:
            acc_g = tl.trans(acc_g)
            acc_u = tl.trans(acc_u)
        mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc_g += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                if GATE_UP:
                    acc_u += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if GATE_UP:
                acc_g = _act_fp32(acc_g, ACT) * acc_u
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                     acc_g.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            part = part_ptr + pid_k * stride_split + offs_m[:, None] * stride_pm + offs_n[None, :]
            tl.store(part, acc_g, mask=mask)
            if GATE_UP:
                tl.store(part + N, acc_u, mask=mask)
            if FUSED_REDUCE:
                tl.debug_barrier()
                arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel", scope="gpu")
                if arrived == SPLIT_K - 1:
                    tl.atomic_xchg(counter_ptr + pid, 0, sem="relaxed", scope="gpu")
                    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    rows = part_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]
                    for s in tl.static_range(SPLIT_K):
                        g += tl.load(rows + s * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
                        if GATE_UP:
                            u += tl.load(rows + s * stride_split + N, mask=mask, other=0.0, cache_modifier=".cg")
                    if HAS_BIAS:
                        g += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                        if GATE_UP:
                            u += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                    if GATE_UP:
                        g = _act_fp32(g, ACT) * u
                    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                             g.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_reduce_kernel(
        part_ptr, b_ptr, out_ptr, N, stride_split, stride_pm, stride_om,
        ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """out[row, cols] = epilogue(sum over splits of the scaled partials): bias, act-mul."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        row = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        g = tl.zeros([BLOCK_N], dtype=tl.float32)
        u = tl.zeros([BLOCK_N], dtype=tl.float32)
        base = part_ptr + row * stride_pm + offs_n
        for s in tl.static_range(SPLIT_K):
            g += tl.load(base + s * stride_split, mask=n_mask, other=0.0)
            if ACT >= 0:
                u += tl.load(base + s * stride_split + N, mask=n_mask, other=0.0)
        if HAS_BIAS:
            g += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if ACT >= 0:
                u += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ACT >= 0:
            g = _act_fp32(g, ACT) * u
        tl.store(out_ptr + row * stride_om + offs_n, g.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, q_ptr, s_ptr, amax_ptr, K, stride_xm, stride_qm, n_amax, FMAX, EPS,
        FROM_AMAX: tl.constexpr, STORE_Q: tl.constexpr, ONE_PASS: tl.constexpr,
        MANT: tl.constexpr, MIN_EXP: tl.constexpr, EXACT_CAST: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """One row: amax (of the row; FROM_AMAX: the max of n_amax per-row amaxes, the
        per-tensor case), scale = max(amax, EPS) / FMAX, q = clamp(x / scale) in fp8.
        STORE_Q False: only the row's amax goes to amax_ptr (the per-tensor first pass).
        ONE_PASS: the row fits one tile, read once."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        offs = tl.arange(0, BLOCK_K)
        if ONE_PASS:
            xv = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if FROM_AMAX:
            am = tl.zeros([BLOCK_R], dtype=tl.float32)
            for r0 in range(0, n_amax, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                am = tl.maximum(am, tl.load(amax_ptr + rr, mask=rr < n_amax, other=0.0))
            amax = tl.max(am, axis=0)
        elif ONE_PASS:
            amax = tl.max(tl.abs(xv), axis=0)
        else:
            acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                acc = tl.maximum(acc, tl.abs(tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)))
            amax = tl.max(acc, axis=0)
        if STORE_Q:
            scale = tl.math.div_rn(tl.maximum(amax, EPS), FMAX)
            tl.store(s_ptr + row, scale)
            q_row = q_ptr + row * stride_qm
            if ONE_PASS:
                q = _saturate(tl.math.div_rn(xv, scale), FMAX, MANT, MIN_EXP, EXACT_CAST)
                tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
            else:
                for k0 in range(0, K, BLOCK_K):
                    xk = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                    q = _saturate(tl.math.div_rn(xk, scale), FMAX, MANT, MIN_EXP, EXACT_CAST)
                    tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)
        else:
            tl.store(amax_ptr + row, amax)

    @triton.jit
    def _quantize_blocks_kernel(
        x_ptr, q_ptr, s_ptr, K, BS, stride_xm, stride_qm, stride_sm, FMAX, EPS,
        MANT: tl.constexpr, MIN_EXP: tl.constexpr, EXACT_CAST: tl.constexpr, BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """One (row, K-block): scale = max(amax, EPS) / FMAX over the block, q = clamp(x / scale)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        kb = tl.program_id(1)
        offs = kb * BS + tl.arange(0, BLOCK)
        mask = (offs < K) & (tl.arange(0, BLOCK) < BS)
        xv = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(xv), axis=0), EPS), FMAX)
        tl.store(s_ptr + row * stride_sm + kb, scale)
        q = _saturate(tl.math.div_rn(xv, scale), FMAX, MANT, MIN_EXP, EXACT_CAST)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Fp8GemvConfig:
    """Launch parameters of the one-row fp8 GEMV: output rows a program, K tile, K splits,
    warps, pipelining stages of the K loop, and whether the last split reduces (no second
    launch) or `_fp8_reduce_kernel` does."""
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    fused_reduce: bool = True
    # fp8 -> fp32 by `_fp8x4_asm` on CUDA; off: Triton's cast, as fast or faster in the GEMV
    # at every Llama-1B shape on the H100 (it is latency-bound, not conversion-bound).
    fast_cvt: bool = False

    def name(self) -> str:
        red = ",fused" if self.split_k > 1 and self.fused_reduce else (",reduce" if self.split_k > 1 else "")
        return (f"fp8_gemv[bn={self.block_n},bk={self.block_k},split={self.split_k},"
                f"w{self.num_warps}s{self.num_stages}{red}{',asm' if self.fast_cvt else ''}]")


@dataclass(frozen=True)
class Fp8GemmConfig:
    """Launch parameters of the fp8 tl.dot kernel (skinny when block_m covers all rows)."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    w_as_a: bool = False
    fused_reduce: bool = True
    # fp8 -> bf16 by `_fp8x4_asm` on CUDA (off: Triton's cast): 3-7% faster skinny GEMMs and
    # 2-20% faster prefill GEMMs on the H100 at the Llama-1B shapes.
    fast_cvt: bool = True

    def name(self, m: int = 0) -> str:
        kind = "fp8_skinny" if 0 < m <= SKINNY_MAX_M else "fp8_gemm"
        red = ",fused" if self.split_k > 1 and self.fused_reduce else (",reduce" if self.split_k > 1 else "")
        return (f"{kind}[{self.block_m}x{self.block_n}x{self.block_k},split={self.split_k},"
                f"w{self.num_warps}s{self.num_stages}{',w_as_a' if self.w_as_a else ''}{red}"
                f"{',asm' if self.fast_cvt else ''}]")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a small "GPU", so that tiny test shapes exercise split-K


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (1 when n is odd)."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _tile_k(block_k: int, k: int, block_size: int, needs_blocks: bool, minimum: int = 1) -> tuple[int, bool]:
    """(K tile, tile-scaled?): with block scales the tile must lie inside one block, so it is
    cut to a power of two dividing block_size; below `minimum` (tl.dot's 16) the kernels
    scale per element instead and keep the tile."""
    block_k = max(minimum, min(block_k, triton.next_power_of_2(max(k, 1))))
    if not needs_blocks:
        return block_k, True
    fit = _pow2_divisor(block_size, block_k)
    if fit >= minimum:
        return fit, True
    return block_k, False


def fp8_gemv_config(n_out: int, k: int, device: torch.device, tiles: int = 1) -> Fp8GemvConfig:
    """A heuristic GEMV config over `tiles` weight blocks of `n_out` rows by `k` (fit to the
    H100 sweep of benchmarks/bench_fp8.py): 4 warps over 2048 fp8 weights an iteration (2
    rows of 1024) for a plain linear, 8192 (8 gate and 8 up rows of 512) for gate/up, so
    many small programs keep HBM busy; fewer rows a program, then split-K, when there would
    be under 2 programs per SM."""
    sms = _sm_count(device)
    block_k = max(16, min(1024 if tiles == 1 else 512, triton.next_power_of_2(k)))
    block_n = max(1, (2048 if tiles == 1 else 8192) // (block_k * tiles))
    while block_n > 1 and triton.cdiv(n_out, block_n) < 2 * sms:
        block_n //= 2
    n_blocks = triton.cdiv(n_out, block_n)
    split_k = 1 if n_blocks >= sms else max(1, min(triton.cdiv(2 * sms, n_blocks), triton.cdiv(k, block_k), 16))
    return Fp8GemvConfig(block_n, block_k, split_k, 4, 1, True)


def fp8_gemm_config(m: int, n_out: int, k: int, device: torch.device, tiles: int = 1) -> Fp8GemmConfig:
    """A heuristic tl.dot config (fit to the H100 sweep): for <= 16 rows one 16-row tile, 32
    columns, K tiles of 128 (256 for gate/up and K >= 4096), split-K (up to 4) where column
    blocks are fewer than SMs; for prefill 128x128 tiles (128x64 and 4 warps for gate/up,
    two accumulators), K tiles of 64, 3 stages."""
    sms = _sm_count(device)
    if m <= SKINNY_MAX_M:
        block_n = 32
        block_k = max(16, min(256 if (tiles == 2 or k >= 4096) else 128, triton.next_power_of_2(k)))
        n_blocks = triton.cdiv(n_out, block_n)
        split_k = 1 if n_blocks >= sms else min(4, triton.next_power_of_2(triton.cdiv(2 * sms, n_blocks)))
        split_k = max(1, min(split_k, triton.cdiv(k, block_k)))
        return Fp8GemmConfig(16, block_n, block_k, split_k, 4, 3, 1, False, True)
    if tiles == 2:
        return Fp8GemmConfig(128, 64, 64, 1, 4, 3, 8, False, True)
    return Fp8GemmConfig(128 if m > 64 else 64, 128, 64, 1, 8, 3, 8, False, True)


# Measured on an H100 (benchmarks/bench_fp8.py --tune: two sweeps, CUDA-graph replays over
# weights cycled past L2), bf16 x, channel scales, at the Llama-3.2-1B shapes: key ("linear",
# N, K) or ("gate_up", F, K), then the row bucket (1; 4 for 2..4 rows; 16 for 5..16; 0 above).
# Shapes not listed take the heuristics above.
_GEMV_QKV_O = Fp8GemvConfig(2, 1024, 1, 4, 1, True)
_SKINNY_2K = Fp8GemmConfig(16, 32, 128, 4, 4, 3, 1, False, True)
_SKINNY_GATE_UP = Fp8GemmConfig(16, 32, 256, 1, 4, 3, 1, False, True)
_SKINNY_DOWN = Fp8GemmConfig(16, 32, 256, 4, 4, 3, 1, False, True)
_GEMM_256 = Fp8GemmConfig(256, 128, 64, 1, 8, 3, 8, True, True)
FP8_TUNED: dict = {
    ("linear", 3072, 2048, 1): _GEMV_QKV_O,                               # 4.6-5.1 us
    ("linear", 2048, 2048, 1): _GEMV_QKV_O,                               # 3.8-4.3 us
    ("gate_up", 8192, 2048, 1): Fp8GemvConfig(8, 512, 1, 4, 1, True),     # 14.4-15.8 us
    ("linear", 2048, 8192, 1): Fp8GemvConfig(8, 2048, 1, 8, 1, True),     # 8.8-9.4 us
    ("linear", 3072, 2048, 4): _SKINNY_2K,
    ("linear", 3072, 2048, 16): _SKINNY_2K,
    ("linear", 2048, 2048, 4): _SKINNY_2K,
    ("linear", 2048, 2048, 16): _SKINNY_2K,
    ("gate_up", 8192, 2048, 4): _SKINNY_GATE_UP,
    ("gate_up", 8192, 2048, 16): _SKINNY_GATE_UP,
    ("linear", 2048, 8192, 4): _SKINNY_DOWN,
    ("linear", 2048, 8192, 16): _SKINNY_DOWN,
    ("linear", 3072, 2048, 0): Fp8GemmConfig(128, 128, 64, 1, 8, 3, 8, False, True),
    ("linear", 2048, 2048, 0): _GEMM_256,
    ("gate_up", 8192, 2048, 0): Fp8GemmConfig(128, 64, 64, 1, 4, 3, 8, False, True),
    ("linear", 2048, 8192, 0): _GEMM_256,
}


def _m_bucket(m: int) -> int:
    return 1 if m == 1 else (4 if m <= 4 else (16 if m <= SKINNY_MAX_M else 0))


def _tuned(kind: str, n_out: int, k: int, m: int):
    return FP8_TUNED.get((kind, n_out, k, _m_bucket(m)))


def _gemv_sub(block_k: int, k: int, block_size: int, needs_blocks: bool) -> tuple[int, int]:
    """(K tile, sub-block) of the GEMV: sub == tile without block scales; with them a power of
    two that is a whole scale block (block_size <= tile) or lies inside one (a block that is
    a multiple of the tile); 0 when neither fits (the per-element path)."""
    block_k = max(16, min(block_k, triton.next_power_of_2(max(k, 1))))
    if not needs_blocks:
        return block_k, block_k
    if block_size <= block_k and block_size & (block_size - 1) == 0:
        return block_k, block_size
    if block_size % block_k == 0:
        return block_k, block_k
    return block_k, 0


def _fit_gemm(cfg: Fp8GemmConfig, k: int, block_size: int, needs_blocks: bool) -> tuple[Fp8GemmConfig, bool]:
    block_k, tile = _tile_k(cfg.block_k, k, block_size, needs_blocks, minimum=16)
    w_as_a = cfg.w_as_a and tile  # per-element scales are written for the x-as-A layout only
    if block_k == cfg.block_k and w_as_a == cfg.w_as_a:
        return cfg, tile
    return Fp8GemmConfig(cfg.block_m, cfg.block_n, block_k, cfg.split_k, cfg.num_warps, cfg.num_stages,
                         cfg.group_m, w_as_a, cfg.fused_reduce, cfg.fast_cvt), tile


# ----------------------------------------------------------------------------- launchers
_COUNTERS: dict = {}


def _arrival_counters(device: torch.device, n: int) -> Optional[Tensor]:
    """Zeroed int32 arrival counters kept per device; the last split of a tile resets its
    counter, so they are zero after every launch (also in a replayed CUDA graph). None while
    a CUDA graph is being captured and none exist yet (a buffer made during capture would be
    zeroed only on replay): the launch then takes the separate reduce kernel. Launches on
    two streams at once must not share them: one decode stream per device is assumed."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(n, 8192), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _scale_codes(kind: str) -> int:
    return {"tensor": _W_TENSOR, "channel": _W_CHANNEL, "block": _W_BLOCK}[kind]


def _compute_dtype(x_dtype: torch.dtype, device: torch.device):
    """The tl.dot input type of an upcast tile and its precision ("ieee" for fp32 inputs,
    which would otherwise run as TF32; ignored for 16-bit inputs)."""
    if x_dtype == torch.float32 or (interpreter_on() and device.type == "cpu"):
        return tl.float32, "ieee"  # the interpreter multiplies bf16 dots as raw integers (qkv.dot_needs_upcast)
    return (tl.float16 if x_dtype == torch.float16 else tl.bfloat16), "tf32"


def _launch_gemv(x1: Tensor, xs: Tensor, x_scale: int, wq: Tensor, w_scale: Tensor, w_kind: str, block_size: int,
                 bias: Optional[Tensor], act: Optional[str], out: Tensor, cfg: Fp8GemvConfig,
                 norm: Optional[NormPrologue] = None) -> None:
    n_rows, k = wq.shape
    tiles = 2 if act else 1
    n_out = n_rows // tiles
    needs_blocks = w_kind == "block" or x_scale == _X_BLOCK
    if norm is not None and (needs_blocks or x_scale != _X_NONE):
        raise ValueError("the norm prologue takes weight-only tensor or channel scales")
    block_k, sub = _gemv_sub(cfg.block_k, k, block_size, needs_blocks)
    split_k = 1 if norm is not None else max(1, min(cfg.split_k, triton.cdiv(k, block_k)))
    kps = k_per_split(k, block_k, split_k)
    grid = (triton.cdiv(n_out, cfg.block_n), split_k)
    counters = _arrival_counters(x1.device, grid[0]) if split_k > 1 and cfg.fused_reduce else None
    fused = counters is not None
    part = torch.empty((split_k, 1, n_rows), dtype=torch.float32, device=x1.device) if split_k > 1 else out
    b = bias if bias is not None else w_scale
    ptrs = (x1, xs, wq, w_scale, b, out, part, counters if fused else w_scale)
    sizes = (n_out, k, wq.stride(0), w_scale.stride(0) if w_kind == "block" else 1, part.stride(0), kps,
             max(block_size, 1))
    common = dict(W_SCALE=_scale_codes(w_kind), X_SCALE=x_scale, ACT=ACTS[act] if act else -1,
                  HAS_BIAS=bias is not None, SPLIT_K=split_k, FUSED_REDUCE=fused,
                  FAST_CVT=cfg.fast_cvt and x1.device.type == "cuda", E5M2=wq.dtype == torch.float8_e5m2,
                  BLOCK_N=cfg.block_n,
                  STAGES=cfg.num_stages, num_warps=cfg.num_warps, **pdl_launch(x1.device))
    if needs_blocks and sub:
        _fp8_gemv_block_kernel[grid](*ptrs, *sizes, NB=block_k // sub, SUB=sub, **common)
    else:
        norm_ptrs, norm_scalars, flags = prologue_args(norm, x1)
        _fp8_gemv_kernel[grid](*ptrs, *norm_ptrs, *sizes, *norm_scalars, BLOCK_K=block_k, **flags, **common)
    if split_k > 1 and not fused:
        _launch_reduce(part, bias, act, out.view(1, -1), split_k)


def _launch_reduce(part: Tensor, bias: Optional[Tensor], act: Optional[str], out2: Tensor, split_k: int) -> None:
    m, n_out = out2.shape
    block = min(1024, triton.next_power_of_2(n_out))
    _fp8_reduce_kernel[(m, triton.cdiv(n_out, block))](
        part, bias if bias is not None else part, out2, n_out, part.stride(0), part.stride(1), out2.stride(0),
        ACT=ACTS[act] if act else -1, HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK_N=block, num_warps=4,
        **pdl_launch(part.device))


def _launch_gemm(x2: Tensor, xs: Tensor, x_scale: int, wq: Tensor, w_scale: Tensor, w_kind: str, block_size: int,
                 bias: Optional[Tensor], act: Optional[str], out2: Tensor, cfg: Fp8GemmConfig,
                 out_dtype: torch.dtype) -> None:
    m, k = x2.shape
    n_rows = wq.shape[0]
    n_out = out2.shape[1]
    cfg, tile = _fit_gemm(cfg, k, block_size, w_kind == "block" or x_scale == _X_BLOCK)
    split_k = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    kps = k_per_split(k, cfg.block_k, split_k)
    tiles_mn = triton.cdiv(m, cfg.block_m) * triton.cdiv(n_out, cfg.block_n)
    counters = _arrival_counters(x2.device, tiles_mn) if split_k > 1 and cfg.fused_reduce else None
    fused = counters is not None
    part = torch.empty((split_k, m, n_rows), dtype=torch.float32, device=x2.device) if split_k > 1 else out2
    cdt, precision = _compute_dtype(out_dtype if x_scale == _X_NONE else torch.bfloat16, x2.device)
    b = bias if bias is not None else w_scale
    _fp8_gemm_kernel[(tiles_mn, split_k)](
        x2, xs, wq, w_scale, b, out2, part, counters if fused else w_scale,
        m, n_out, k, x2.stride(0), xs.stride(0) if xs.dim() == 2 else 1, wq.stride(0),
        w_scale.stride(0) if w_kind == "block" else 1, out2.stride(0),
        part.stride(0) if split_k > 1 else 0, part.stride(1) if split_k > 1 else 0, kps, max(block_size, 1),
        W_SCALE=_scale_codes(w_kind), X_SCALE=x_scale, BLOCKED=w_kind == "block" or x_scale == _X_BLOCK,
        TILE_SCALE=tile, ACT=ACTS[act] if act else -1, HAS_BIAS=bias is not None, SPLIT_K=split_k,
        FUSED_REDUCE=fused, W_AS_A=cfg.w_as_a, CDT=cdt, PRECISION=precision,
        FAST_CVT=cfg.fast_cvt and x2.device.type == "cuda", E5M2=wq.dtype == torch.float8_e5m2,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_launch(x2.device),
    )
    if split_k > 1 and not fused:
        _launch_reduce(part, bias, act, out2, split_k)


def _pick_config(m: int, wq: Tensor, act: Optional[str], device: torch.device):
    n_rows, k = wq.shape
    tiles = 2 if act else 1
    key_kind = "gate_up" if act else "linear"
    cfg = _tuned(key_kind, n_rows // tiles, k, m)
    if cfg is not None:
        return cfg
    if m == 1:
        return fp8_gemv_config(n_rows // tiles, k, device, tiles)
    return fp8_gemm_config(m, n_rows // tiles, k, device, tiles)


def _run_triton(x2: Tensor, xs: Tensor, x_scale: int, wq: Tensor, w_scale: Tensor, w_kind: str, block_size: int,
                bias: Optional[Tensor], act: Optional[str], out_dtype: torch.dtype, config=None) -> Tensor:
    m = x2.shape[0]
    n_out = wq.shape[0] // (2 if act else 1)
    out = torch.empty((m, n_out), dtype=out_dtype, device=x2.device)
    if m == 0 or n_out == 0:
        return out
    cfg = config or _pick_config(m, wq, act, x2.device)
    if isinstance(cfg, Fp8GemvConfig):
        if m != 1:
            raise ValueError(f"fp8_linear: a GEMV config takes one row, got {m}")
        _launch_gemv(x2.reshape(-1), xs, x_scale, wq, w_scale, w_kind, block_size, bias, act, out.view(-1), cfg)
    else:
        _launch_gemm(x2, xs, x_scale, wq, w_scale, w_kind, block_size, bias, act, out, cfg, out_dtype)
    return out


def _prepare(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor]):
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    w_scale = w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return x2, wq, w_scale, bias


def fp8_linear_triton(
    x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, *, block_size: int = 0,
    act: Optional[str] = None, config=None,
) -> Tensor:
    """The Triton launch of `fp8_linear_reference`: GEMV for one row, tl.dot otherwise.
    `config` (Fp8GemvConfig / Fp8GemmConfig) overrides the per-shape choice (tests, sweeps)."""
    kind = _check(x, wq, w_scale, bias, block_size, act)
    x2, wq, w_scale, bias = _prepare(x, wq, w_scale, bias)
    out = _run_triton(x2, w_scale, _X_NONE, wq, w_scale, kind, block_size, bias, act, x.dtype, config)
    return out.view(*x.shape[:-1], out.shape[-1])


def norm_gemv_fit(cfg: Fp8GemvConfig, n_out: int, tiles: int, device: torch.device) -> Fp8GemvConfig:
    """`cfg` for a GEMV with the norm in its prologue (see qkv.norm_gemv_config): more rows a
    program, the same weight elements an iteration, no split-K."""
    sms = _sm_count(device)
    block_n, block_k = cfg.block_n, cfg.block_k
    while block_n * tiles < NORM_MIN_ROWS and triton.cdiv(n_out, 2 * block_n) >= 4 * sms and block_k >= 32:
        block_n, block_k = block_n * 2, block_k // 2
    return replace(cfg, block_n=block_n, block_k=block_k, split_k=1)


def fp8_gemv_norm_triton(
    x: Tensor, norm: NormPrologue, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, *,
    block_size: int = 0, act: Optional[str] = None,
) -> Optional[Tensor]:
    """The one-row weight-only GEMV of `rmsnorm(x + norm.residual)` in one kernel (the norm in
    its prologue, x + residual written to norm.s), or None where that kernel does not take
    the weight (block scales, or a shape tuned to a tl.dot kernel): the caller then runs the
    norm and `fp8_linear` apart."""
    kind = _check(x, wq, w_scale, bias, block_size, act)
    if kind == "block" or x.numel() != x.shape[-1]:
        return None
    x2, wq, w_scale, bias = _prepare(x, wq, w_scale, bias)
    cfg = _pick_config(1, wq, act, x.device)
    if not isinstance(cfg, Fp8GemvConfig):
        return None
    n_out = wq.shape[0] // (2 if act else 1)
    cfg = norm_gemv_fit(cfg, n_out, 2 if act else 1, x.device)
    out = torch.empty(n_out, dtype=x.dtype, device=x.device)
    if n_out:
        _launch_gemv(x2.reshape(-1), w_scale, _X_NONE, wq, w_scale, kind, block_size, bias, act, out, cfg, norm)
    return out.view(*x.shape[:-1], n_out)


def quantize_activation_triton(
    x: Tensor, act_mode: str = "per_token", block_size: int = 0, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[Tensor, Tensor]:
    """The Triton launch of `quantize_activation_reference`: one pass over a row (per_token)
    or a block (per_block); per_tensor first writes per-row amaxes, then every row program
    takes their max (no atomics, no host sync). Returns (xq [M, K], s_x)."""
    _check_act_mode(act_mode, block_size)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    xq = torch.empty((m, k), dtype=dtype, device=x.device)
    fmax = _fmax(dtype)
    # The fp8 grid: e4m3 has 3 mantissa bits and normals from 2^-6, e5m2 2 bits and 2^-14.
    grid_args = dict(MANT=3 if dtype == torch.float8_e4m3fn else 2, MIN_EXP=-6 if dtype == torch.float8_e4m3fn else -14,
                     EXACT_CAST=interpreter_on() and x.device.type == "cpu", **pdl_launch(x.device))
    if act_mode == "per_block":
        nkb = triton.cdiv(k, block_size)
        scale = torch.empty((m, nkb), dtype=torch.float32, device=x.device)
        if m and k:
            _quantize_blocks_kernel[(m, nkb)](x2, xq, scale, k, block_size, x2.stride(0), xq.stride(0),
                                              scale.stride(0), fmax, AMAX_EPS, **grid_args,
                                              BLOCK=triton.next_power_of_2(block_size), num_warps=4)
        return xq, scale
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, scale
    one_pass = triton.next_power_of_2(max(k, 1)) <= _ONE_PASS_MAX
    block_k = triton.next_power_of_2(max(k, 1)) if one_pass else 4096
    warps = max(1, min(16, block_k // 512))
    common = dict(ONE_PASS=one_pass, BLOCK_K=block_k, num_warps=warps, **grid_args)
    if act_mode == "per_tensor" and m > 1:
        amax = torch.empty(m, dtype=torch.float32, device=x.device)
        _quantize_rows_kernel[(m,)](x2, xq, scale, amax, k, x2.stride(0), xq.stride(0), m, fmax, AMAX_EPS,
                                    FROM_AMAX=False, STORE_Q=False, BLOCK_R=16, **common)
        _quantize_rows_kernel[(m,)](x2, xq, scale, amax, k, x2.stride(0), xq.stride(0), m, fmax, AMAX_EPS,
                                    FROM_AMAX=True, STORE_Q=True, BLOCK_R=min(1024, triton.next_power_of_2(m)),
                                    **common)
    else:  # per_token, and per_tensor of one row (the same numbers)
        _quantize_rows_kernel[(m,)](x2, xq, scale, scale, k, x2.stride(0), xq.stride(0), 0, fmax, AMAX_EPS,
                                    FROM_AMAX=False, STORE_Q=True, BLOCK_R=16, **common)
    return xq, scale


# ----------------------------------------------------------------------------- torch._scaled_mm
# Dynamic activations take cuBLAS FP8 (torch._scaled_mm) from this many rows on, where it
# runs (measured on an H100: the Triton kernels win at decode sizes).
SCALED_MM_MIN_M = 17
_SCALED_MM_OK: dict = {}


def _scaled_mm_layout(act_mode: str, w_kind: str) -> Optional[str]:
    """"tensorwise", "rowwise" or None (no cuBLAS layout for these scales)."""
    if act_mode == "per_block" or w_kind == "block":
        return None
    if act_mode == "per_tensor" and w_kind == "tensor":
        return "tensorwise"
    return "rowwise"


def _scaled_mm_call(xq: Tensor, sx: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                    layout: str, out_dtype: torch.dtype) -> Tensor:
    m, n = xq.shape[0], wq.shape[0]
    if layout == "tensorwise":
        sa, sb = sx[:1].reshape(()), w_scale.reshape(())
    else:
        sa = sx.view(m, 1)
        sb = w_scale.reshape(1, -1) if w_scale.numel() == n else w_scale.reshape(1, 1).expand(1, n).contiguous()
    return torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=False)


def scaled_mm_supported(device: torch.device, layout: Optional[str], x_dtype: torch.dtype, w_dtype: torch.dtype,
                        bias_dtype: Optional[torch.dtype]) -> bool:
    """Whether this torch and device run torch._scaled_mm for this scale layout and these
    dtypes, and get the plan's numbers: probed once per combination on a small problem and
    compared with the reference (never during CUDA-graph capture: then False until probed)."""
    if layout is None or device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    if torch.cuda.get_device_capability(device) < (8, 9):
        return False
    key = (device.index, layout, x_dtype, w_dtype, bias_dtype)
    if key in _SCALED_MM_OK:
        return _SCALED_MM_OK[key]
    if torch.cuda.is_current_stream_capturing():
        return False
    ok = False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(32, 64, device=device, generator=gen).to(x_dtype)
        w = torch.randn(32, 64, device=device, generator=gen)
        if layout == "tensorwise":
            ws = (w.abs().amax() / _fmax(w_dtype)).reshape(1)
            mode = "per_tensor"
        else:
            ws = w.abs().amax(1) / _fmax(w_dtype)
            mode = "per_token"
        wq = (w / ws[:, None] if ws.numel() > 1 else w / ws).clamp(-_fmax(w_dtype), _fmax(w_dtype)).to(w_dtype)
        bias = torch.randn(32, device=device, generator=gen).to(bias_dtype) if bias_dtype is not None else None
        xq, sx = quantize_activation_triton(x, mode, 0, w_dtype)
        got = _scaled_mm_call(xq, sx, wq, ws.float(), bias, layout, x_dtype)
        ref = fp8_linear_dynamic_reference(x, wq, ws.float(), bias, act_mode=mode)
        ok = bool(((got.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max() + 1e-6).item())
    except Exception:  # an unsupported layout or dtype raises on the host, before any launch
        ok = False
    _SCALED_MM_OK[key] = ok
    return ok


def _dynamic_route(m: int, n_rows: int, k: int, act_mode: str, w_kind: str, x_dtype: torch.dtype,
                   w_dtype: torch.dtype, bias_dtype: Optional[torch.dtype], device: torch.device) -> Optional[str]:
    """The _scaled_mm layout when the dynamic linear takes cuBLAS FP8, else None (Triton)."""
    if m < SCALED_MM_MIN_M or k % 16 or n_rows % 16:
        return None
    layout = _scaled_mm_layout(act_mode, w_kind)
    return layout if scaled_mm_supported(device, layout, x_dtype, w_dtype, bias_dtype) else None


# ----------------------------------------------------------------------------- public ops
def fp8_linear(
    x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, *, block_size: int = 0,
    act: Optional[str] = None,
) -> Tensor:
    """Weight-only FP8 linear: x [..., K] (bf16 / fp16 / fp32) times the fp8 weight wq [N, K]
    with float32 scales w_scale (numel 1, [N], or [N, ceil(K / block_size)]), fp32
    accumulation, + bias, x's dtype out ([..., N]). act "silu" / "gelu_tanh": wq is [W1; W3]
    and the output act(x W1') * (x W3') ([..., N / 2]). Triton where it runs (GEMV for one
    row, skinny tl.dot up to 16, tiled tl.dot above), else the float32 reference."""
    if use_triton(x, wq) and triton is not None:
        return fp8_linear_triton(x, wq, w_scale, bias, block_size=block_size, act=act)
    return fp8_linear_reference(x, wq, w_scale, bias, block_size=block_size, act=act)


def fp8_linear_dynamic_triton(
    x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, *, act_mode: str = "per_token",
    block_size: int = 0, act: Optional[str] = None, config=None, use_scaled_mm: Optional[bool] = None,
) -> Tensor:
    """The Triton launch of `fp8_linear_dynamic_reference`: x quantized by one Triton kernel,
    then torch._scaled_mm (where `fp8_kernel_name` says so; `use_scaled_mm` forces the choice,
    for benchmarks) or the Triton kernels on the fp8 x."""
    _check_act_mode(act_mode, block_size)
    w_kind = _check(x, wq, w_scale, bias, block_size, act)
    x2, wq, w_scale, bias = _prepare(x, wq, w_scale, bias)
    m, k = x2.shape
    n_rows = wq.shape[0]
    n_out = n_rows // (2 if act else 1)
    xq, sx = quantize_activation_triton(x2, act_mode, block_size, wq.dtype)
    layout = _dynamic_route(m, n_rows, k, act_mode, w_kind, x.dtype, wq.dtype,
                            bias.dtype if bias is not None else None, x.device) \
        if use_scaled_mm is None else (_scaled_mm_layout(act_mode, w_kind) if use_scaled_mm else None)
    if layout is not None and m > 0:
        y = _scaled_mm_call(xq, sx, wq, w_scale, bias, layout, x.dtype)
        if act:
            from .swiglu import act_mul_triton
            y = act_mul_triton(y, act)
        return y.view(*x.shape[:-1], n_out)
    x_scale = _X_BLOCK if act_mode == "per_block" else _X_ROW
    out = _run_triton(xq, sx, x_scale, wq, w_scale, w_kind, block_size, bias, act, x.dtype, config)
    return out.view(*x.shape[:-1], n_out)


def fp8_linear_dynamic(
    x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, *, act_mode: str = "per_token",
    block_size: int = 0, act: Optional[str] = None,
) -> Tensor:
    """FP8 linear with dynamically quantized activations (`per_token`, `per_tensor`,
    `per_block` of `block_size` along K; x quantized to wq's fp8 dtype). w_scale as in
    `fp8_linear` (block scales use the same block_size). Same output as `fp8_linear`."""
    if use_triton(x, wq) and triton is not None:
        return fp8_linear_dynamic_triton(x, wq, w_scale, bias, act_mode=act_mode, block_size=block_size, act=act)
    return fp8_linear_dynamic_reference(x, wq, w_scale, bias, act_mode=act_mode, block_size=block_size, act=act)


def fp8_kernel_name(
    M: int, N: int, K: int, *, act: Optional[str] = None, scaling: str = "channel", block_size: int = 0,
    act_mode: str = "keep", x_dtype: torch.dtype = torch.bfloat16, w_dtype: torch.dtype = torch.float8_e4m3fn,
    has_bias: bool = False, device="cuda",
) -> str:
    """The kernel an FP8 linear of M rows on a weight of N rows by K takes (N counts both
    halves of a fused [W1; W3]), for the report: e.g. "fp8_gemv[bn=4,bk=2048,split=1,w4s1]",
    "quantize_per_token+scaled_mm_rowwise", or "reference (why)"."""
    device = torch.device(device)
    from .backend import triton_available
    ok, why = triton_available(device)
    if not ok or triton is None:
        return f"reference ({why})"
    if M <= 0:
        return "none (no rows)"
    tiles = 2 if act else 1
    needs_blocks = scaling == "block" or act_mode == "per_block"
    prefix = ""
    if act_mode != "keep":
        prefix = f"quantize_{act_mode}+"
        layout = _dynamic_route(M, N, K, act_mode, scaling, x_dtype, w_dtype, x_dtype if has_bias else None,
                                device) \
            if device.type == "cuda" else None
        if layout is not None:
            return prefix + f"scaled_mm_{layout}" + (f"+act_mul_{act}" if act else "")
    w = torch.empty((N, K), dtype=w_dtype, device="meta")
    cfg = _pick_config(M, w, act, device)
    if isinstance(cfg, Fp8GemvConfig):
        block_k, sub = _gemv_sub(cfg.block_k, K, block_size, needs_blocks)
        name = cfg.name()[:-1] + (f",sub={sub}]" if needs_blocks and sub else (",gather]" if needs_blocks else "]"))
    else:
        cfg, _ = _fit_gemm(cfg, K, block_size, needs_blocks)
        name = cfg.name(M)
    return prefix + name + (f"+{act}_mul" if act else "")


# ----------------------------------------------------------------------------- custom ops
def _fp8_linear_op(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, block_size: int = 0,
                   act: Optional[str] = None) -> Tensor:
    return fp8_linear(x, wq, w_scale, bias, block_size=block_size, act=act)


def _fp8_linear_fake(x, wq, w_scale, bias=None, block_size=0, act=None):
    n = wq.shape[0] // 2 if act else wq.shape[0]
    return x.new_empty((*x.shape[:-1], n))


def _fp8_linear_dynamic_op(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                           act_mode: str = "per_token", block_size: int = 0, act: Optional[str] = None) -> Tensor:
    return fp8_linear_dynamic(x, wq, w_scale, bias, act_mode=act_mode, block_size=block_size, act=act)


def _fp8_linear_dynamic_fake(x, wq, w_scale, bias=None, act_mode="per_token", block_size=0, act=None):
    _check_act_mode(act_mode, block_size)
    n = wq.shape[0] // 2 if act else wq.shape[0]
    return x.new_empty((*x.shape[:-1], n))


fp8_linear_op = register_op("fp8_linear", _fp8_linear_op, _fp8_linear_fake)
fp8_linear_dynamic_op = register_op("fp8_linear_dynamic", _fp8_linear_dynamic_op, _fp8_linear_dynamic_fake)
