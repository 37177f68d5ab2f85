"""Fused QKV projection, and the decode-time linear it runs on.

`qkv_linear(x, w_qkv, q_size, kv_size, bias)` is one GEMM on the concatenated weight
`[Wq; Wk; Wv]` (built once by `build_w_qkv`) followed by a split of the last dimension into
q, k and v: views of the one output, no copies. `linear(x, w, bias)` is that GEMM alone,
dispatched by the number of rows (measured on an H100, Llama-1B decode shapes):
  - 1 row: a Triton GEMV on CUDA cores (`gemv_triton`): many small programs stream the
    weight once in 16-byte vectors, fp32 accumulation (1.2-1.4x cuBLAS);
  - 2..16 rows: the Triton skinny GEMM (`linear_triton`, tl.dot on 16-row tiles) where
    `SKINNY_TUNED` lists the shape, else cuBLAS (it was as fast or faster at every
    Llama-1B linear shape);
  - more rows: torch's matmul (cuBLAS), already at its best there.

Programmatic Dependent Launch (sm_90+, `backend.pdl_launch`): every kernel here waits for
the kernel before it (`gdc_wait`) before reading x or storing; the GEMV loads its first
weight tile before that wait, so the weight stream starts while the previous kernel ends.

Custom ops: `planlang::linear(x, w, bias) -> out` and `planlang::qkv_linear(x, w_qkv, bias)
-> fused out` (a custom op may not return views of one tensor, so the split into q, k, v is
`split_qkv`, done outside the op where Dynamo traces it). Nothing synchronizes with the
host. Inference only: no autograd formula is registered.
"""
import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import gdc_functions, interpreter_on, pdl_launch, use_triton, register_op
from .rmsnorm_residual import NormPrologue, prologue_args

try:  # the module must import without triton; then only the reference runs
    import triton
    import triton.language as tl
    gdc_wait, gdc_launch_dependents = gdc_functions()
    from .rmsnorm_residual import norm_prologue_rstd, norm_prologue_tile
except Exception:  # ImportError, or a broken install raising anything
    triton = None

# Rows up to which the Triton skinny GEMM replaces cuBLAS (decode batch sizes).
SKINNY_MAX_M = 16
# tl.dot needs at least 16 rows in a tile; decode rows are padded (masked) up to it.
_BLOCK_M = 16
_SKINNY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Shared memory a pipelined program may use for its weight tiles (H100: 227 KiB a block).
_SMEM_BUDGET = 96 * 1024


# ----------------------------------------------------------------------------- weights
def build_w_qkv(
    wq: Tensor, wk: Tensor, wv: Tensor,
    bq: Optional[Tensor] = None, bk: Optional[Tensor] = None, bv: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """The fused weight `[Wq; Wk; Wv]` ([q_size + 2 kv_size, D], nn.Linear layout) and the
    fused bias (None when no part has one; a missing part's bias is zeros). Build it once at
    apply time, never per call."""
    if not (wq.shape[1] == wk.shape[1] == wv.shape[1]):
        raise ValueError(f"q/k/v weights disagree on the input size: {wq.shape}, {wk.shape}, {wv.shape}")
    if wk.shape != wv.shape:
        raise ValueError(f"k and v weights differ in shape: {tuple(wk.shape)} vs {tuple(wv.shape)}")
    w = torch.cat([wq, wk, wv], dim=0).contiguous()
    if bq is None and bk is None and bv is None:
        return w, None
    parts = [b if b is not None else w.new_zeros(n) for b, n in
             ((bq, wq.shape[0]), (bk, wk.shape[0]), (bv, wv.shape[0]))]
    return w, torch.cat(parts).contiguous()


def split_qkv(out: Tensor, q_size: int, kv_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views q, k, v of the fused projection's last dimension."""
    return out.split([q_size, kv_size, kv_size], dim=-1)


# ----------------------------------------------------------------------------- reference
def linear_reference(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Plain PyTorch `x @ w.T + bias`."""
    return F.linear(x, w, bias)


def qkv_linear_reference(
    x: Tensor, w_qkv: Tensor, q_size: int, kv_size: int, bias: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Plain PyTorch: one linear on the fused weight, split into views q, k, v."""
    return split_qkv(F.linear(x, w_qkv, bias), q_size, kv_size)


# ----------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        M, N, K, stride_xm, stride_wn, stride_om, stride_split, k_per_split,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """out[:M, n-block] = x @ w[n-block].T over this program's K range. With SPLIT_K > 1
        the fp32 partial goes to out[pid_k] (a workspace) and `_splitk_reduce_kernel` ends.
        USE_PDL: waits for the previous kernel first (the pipelined loop reads x and w together)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        # The weight tile is read as [BLOCK_K, BLOCK_N] with K contiguous: coalesced rows.
        w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        k_lo = pid_k * k_per_split
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0,
                         eviction_policy="evict_first")  # read once: keep x and outputs in L2
            if UPCAST:  # see `dot_needs_upcast`
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            if IEEE:  # float32 inputs: match torch's default (no TF32)
                acc = tl.dot(xt, wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, wt, acc)
        mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :],
                     acc, mask=mask)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, r_ptr, g_ptr, s_ptr,
        N, K, stride_wn, stride_split, k_per_split, eps, offset,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """out[n-block] = w[n-block] @ x for ONE row x, on CUDA cores: tl.dot needs 16 rows,
        which would pad 15 of them and route the weight through shared memory. The weight
        streams as [BLOCK_N, BLOCK_K] tiles of whole 16-byte vectors along its rows; the fp32
        partial products stay [BLOCK_N, BLOCK_K] and are reduced over K once, at the end.
        SPLIT_K > 1: the fp32 partial goes to out[pid_k] (a workspace) for the reduce kernel.
        NORM (SPLIT_K == 1 only): x is the input of an RMSNorm (plus r with HAS_RES; the sum
        is stored to s by the first column block) and the GEMV computes `rmsnorm(x) @ w.T`
        from it (`rmsnorm_residual.norm_prologue_tile`), so the norm needs no kernel of its own.
        The first weight tile is loaded before anything else: with USE_PDL that load is in
        flight while the program waits for the kernel that writes x."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        k_lo = pid_k * k_per_split
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        s_cols = tl.where(pid_n == 0, K, 0)  # the first column block stores s
        wt = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                     eviction_policy="evict_first")
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        xk, sq = norm_prologue_tile(x_ptr, r_ptr, g_ptr, s_ptr, offs_k, k_mask, offset, s_cols, NORM, HAS_RES)
        acc = wt.to(tl.float32) * xk[None, :]
        # STAGES > 1: the weight tiles of the next iterations stream into shared memory meanwhile.
        for k0 in tl.range(BLOCK_K, k_per_split, BLOCK_K, num_stages=STAGES):
            offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xk, sq_k = norm_prologue_tile(x_ptr, r_ptr, g_ptr, s_ptr, offs_k, k_mask, offset, s_cols,
                                          NORM, HAS_RES)
            sq += sq_k
            wt = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                         eviction_policy="evict_first")
            acc += wt.to(tl.float32) * xk[None, :]
        out = tl.sum(acc, axis=1) * norm_prologue_rstd(sq, K, eps, NORM)
        if SPLIT_K == 1:
            if HAS_BIAS:
                out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)
        else:
            tl.store(out_ptr + pid_k * stride_split + offs_n, out, mask=n_mask)

    @triton.jit
    def _splitk_reduce_kernel(
        ws_ptr, b_ptr, out_ptr, M, N, stride_split, stride_wm, stride_om,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """out = sum over splits of the fp32 partials (+ bias), cast to out's dtype. A fixed
        summation order, so results do not vary between runs (no atomics)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        mask = (offs_m < M)[:, None] & n_mask[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + s * stride_split + offs_m[:, None] * stride_wm + offs_n[None, :],
                           mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SkinnyConfig:
    """Launch parameters of a skinny GEMM: column block, K block, K splits, warps, stages."""
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a small "GPU", so that tiny test shapes exercise split-K


@functools.lru_cache(maxsize=256)
def skinny_config(n_cols: int, k: int, elem_size: int, device: torch.device, tiles: int = 1) -> SkinnyConfig:
    """A heuristic config for a skinny GEMM streaming `tiles` weight blocks of `n_cols`
    output columns by `k`: the whole grid resident at once (a second, partial wave of
    programs doubles the time of the SMs that run it): at least one program per SM with
    column blocks of 16 to 64, split-K where there are still too few, K blocks of 128 and
    up to 3 pipeline stages within `_SMEM_BUDGET`."""
    sms = _sm_count(device)
    block_k = max(16, min(128, triton.next_power_of_2(k)))
    block_n = 64 if tiles == 1 else 32
    while block_n > 16 and triton.cdiv(n_cols, block_n) < sms:
        block_n //= 2
    n_blocks = triton.cdiv(n_cols, block_n)
    k_blocks = triton.cdiv(k, block_k)
    split_k = max(1, min(triton.cdiv(sms, n_blocks), k_blocks // 2, 16))
    stage_bytes = (tiles * block_n + _BLOCK_M) * block_k * elem_size
    num_stages = max(2, min(3, _SMEM_BUDGET // stage_bytes))
    return SkinnyConfig(block_n, block_k, split_k, 4, num_stages)


# Which kernel takes 2..16 rows, per weight ("linear", N, K) or fused gate/up ("gate_up", F,
# K), as measured on an H100 at the decode shapes of Llama-3.2-1B (`--tune` of
# benchmarks/bench_kernels_a.py writes these values): a SkinnyConfig for the Triton skinny
# GEMM, or None where cuBLAS was faster (by 6-9% at M = 4 and 16 for these linears).
# Unlisted linears take cuBLAS; unlisted gate/up take `skinny_config`.
SKINNY_TUNED: dict = {
    ("gate_up", 8192, 2048): SkinnyConfig(32, 128, 1, 4, 3),
    ("linear", 2048, 2048): None,
    ("linear", 2048, 8192): None,
    ("linear", 3072, 2048): None,
}


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of the one-row GEMV: output rows per program, K tile, K splits, warps
    and software-pipelining stages of the K loop."""
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1


@functools.lru_cache(maxsize=256)
def gemv_config(n_rows: int, k: int, device: torch.device, tiles: int = 1) -> GemvConfig:
    """A heuristic config for the one-row GEMV over `tiles` weight blocks of `n_rows` rows by
    `k` (measured best or within 1% of it on an H100 at every Llama-1B decode shape): 4096
    weight elements an iteration (2 rows of 2048, or one row each of gate and up) over 8
    warps, two 16-byte loads a thread, so many small programs (8+ per SM) keep HBM busy;
    fewer rows a program, then split-K, when there would be under 2 programs per SM."""
    sms = _sm_count(device)
    block_k = max(16, min(2048, triton.next_power_of_2(k)))
    block_n = max(1, 4096 // (block_k * tiles))
    while block_n > 1 and triton.cdiv(n_rows, block_n) < 2 * sms:
        block_n //= 2
    n_blocks = triton.cdiv(n_rows, block_n)
    split_k = 1 if n_blocks >= sms else max(1, min(triton.cdiv(2 * sms, n_blocks), triton.cdiv(k, block_k), 16))
    num_warps = max(1, min(8, block_n * tiles * block_k // 512))
    return GemvConfig(block_n, block_k, split_k, num_warps, 1)


# With the norm in the prologue every program reloads the input row, the residual and the
# norm weight and does the norm's arithmetic for its K tiles: programs take at least this
# many weight rows (gate and up rows counted apart), while 4 programs per SM remain.
NORM_MIN_ROWS = 16


@functools.lru_cache(maxsize=256)
def norm_gemv_config(n_rows: int, k: int, device: torch.device, tiles: int = 1) -> GemvConfig:
    """The one-row GEMV config when the norm runs in the GEMV's prologue (`gemv_triton` with
    `norm`): `gemv_config`'s, with more rows a program (up to NORM_MIN_ROWS weight rows, at
    least 4 programs per SM) and the same 4096 weight elements an iteration, no split-K."""
    base = gemv_config(n_rows, k, device, tiles)
    sms = _sm_count(device)
    block_n = base.block_n
    while block_n * tiles < NORM_MIN_ROWS and triton.cdiv(n_rows, 2 * block_n) >= 4 * sms:
        block_n *= 2
    block_k = max(16, min(triton.next_power_of_2(k), 4096 // (block_n * tiles)))
    return GemvConfig(block_n, block_k, 1, base.num_warps, 1)


def k_per_split(k: int, block_k: int, split_k: int) -> int:
    """K elements each split covers: whole K blocks, the last split masked at K."""
    return triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k


def dot_needs_upcast(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bfloat16 tiles of `tl.dot` as their raw 16-bit
    integers (triton 3.x); upcasting to float32 first is exact, so the interpreter does."""
    return dtype == torch.bfloat16 and interpreter_on()


def skinny_gemm_applies(x: Tensor, w: Tensor) -> bool:
    """Whether `linear(x, w)` takes the Triton skinny GEMM: few rows, Triton available,
    matching supported dtypes, contiguous weight rows."""
    rows = x.numel() // max(1, x.shape[-1])
    return (
        0 < rows <= SKINNY_MAX_M
        and x.dtype == w.dtype
        and x.dtype in _SKINNY_DTYPES
        and w.stride(-1) == 1
        and use_triton(x, w)
    )


# ----------------------------------------------------------------------------- launchers
def linear_triton(
    x: Tensor, w: Tensor, bias: Optional[Tensor] = None, *, config: Optional[SkinnyConfig] = None
) -> Tensor:
    """Triton skinny GEMM `x @ w.T + bias` for at most 16 rows (fp32 accumulate, output in
    x's dtype). `config` overrides the heuristic (tests and benchmark sweeps)."""
    k = x.shape[-1]
    n = w.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > SKINNY_MAX_M:
        raise ValueError(f"the skinny GEMM takes at most {SKINNY_MAX_M} rows, got {m}")
    if w.shape[1] != k or w.stride(-1) != 1:
        raise ValueError(f"weight {tuple(w.shape)} (last stride {w.stride(-1)}) does not fit x [..., {k}]")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    cfg = config or skinny_config(n, k, x.element_size(), x.device)
    kps = k_per_split(k, cfg.block_k, cfg.split_k)
    b = bias.contiguous() if bias is not None else w  # a dummy pointer when there is no bias
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    upcast = dot_needs_upcast(x.dtype)
    pdl = pdl_launch(x.device)
    common = dict(IEEE=x.dtype == torch.float32 or upcast, UPCAST=upcast, BLOCK_M=_BLOCK_M, BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)
    if cfg.split_k == 1:
        _skinny_gemm_kernel[grid](x2, w, b, out, m, n, k, x2.stride(0), w.stride(0), out.stride(0), 0, kps,
                                  HAS_BIAS=bias is not None, SPLIT_K=1, **common)
    else:
        ws = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device)
        _skinny_gemm_kernel[grid](x2, w, b, ws, m, n, k, x2.stride(0), w.stride(0), ws.stride(1),
                                  ws.stride(0), kps, HAS_BIAS=False, SPLIT_K=cfg.split_k, **common)
        _splitk_reduce_kernel[(triton.cdiv(n, 128),)](
            ws, b, out, m, n, ws.stride(0), ws.stride(1), out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=cfg.split_k, BLOCK_M=_BLOCK_M, BLOCK_N=128, num_warps=4, **pdl)
    return out.view(*x.shape[:-1], n)


def gemv_triton(
    x: Tensor, w: Tensor, bias: Optional[Tensor] = None, *, config: Optional[GemvConfig] = None,
    norm: Optional["NormPrologue"] = None,
) -> Tensor:
    """Triton GEMV `x @ w.T + bias` for ONE row of x (any leading shape of one element; fp32
    accumulate, output in x's dtype). With `norm` (a `rmsnorm_residual.NormPrologue`) it is
    `rmsnorm(x + norm.residual) @ w.T + bias` in one kernel, x + residual written to norm.s.
    `config` overrides the heuristic (tests, sweeps)."""
    k = x.shape[-1]
    n = w.shape[0]
    if x.numel() != k:
        raise ValueError(f"the GEMV takes one row, got x of shape {tuple(x.shape)}")
    if w.shape[1] != k or w.stride(-1) != 1:
        raise ValueError(f"weight {tuple(w.shape)} (last stride {w.stride(-1)}) does not fit x [..., {k}]")
    x1 = x.reshape(k).contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    if n == 0:
        return out.view(*x.shape[:-1], n)
    cfg = config or (norm_gemv_config(n, k, x.device) if norm is not None else gemv_config(n, k, x.device))
    if norm is not None and cfg.split_k > 1:  # the norm needs the whole row's sum of squares
        cfg = replace(cfg, split_k=1)
    kps = k_per_split(k, cfg.block_k, cfg.split_k)
    b = bias.contiguous() if bias is not None else w  # a dummy pointer when there is no bias
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    pdl = pdl_launch(x.device)
    ptrs, scalars, flags = prologue_args(norm, x1)
    common = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES=cfg.num_stages, num_warps=cfg.num_warps, **pdl)
    if cfg.split_k == 1:
        _gemv_kernel[grid](x1, w, b, out, *ptrs, n, k, w.stride(0), 0, kps, *scalars, HAS_BIAS=bias is not None,
                           SPLIT_K=1, **flags, **common)
    else:
        ws = torch.empty((cfg.split_k, 1, n), dtype=torch.float32, device=x.device)
        _gemv_kernel[grid](x1, w, b, ws, *ptrs, n, k, w.stride(0), ws.stride(0), kps, *scalars, HAS_BIAS=False,
                           SPLIT_K=cfg.split_k, **flags, **common)
        _splitk_reduce_kernel[(triton.cdiv(n, 128),)](
            ws, b, out, 1, n, ws.stride(0), ws.stride(1), n,
            HAS_BIAS=bias is not None, SPLIT_K=cfg.split_k, BLOCK_M=1, BLOCK_N=128, num_warps=4, **pdl)
    return out.view(*x.shape[:-1], n)


# ----------------------------------------------------------------------------- public ops
def linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`x @ w.T + bias` (w in nn.Linear layout [N, K]). Where Triton runs: one row takes the
    Triton GEMV; 2..16 rows the Triton skinny GEMM where `SKINNY_TUNED` lists the shape as
    faster than cuBLAS; the rest torch's matmul (cuBLAS). Returns a fresh tensor."""
    if skinny_gemm_applies(x, w):
        if x.numel() == x.shape[-1]:
            return gemv_triton(x, w, bias)
        config = SKINNY_TUNED.get(("linear", w.shape[0], w.shape[1]))
        if config is not None:
            return linear_triton(x, w, bias, config=config)
    return linear_reference(x, w, bias)


def qkv_linear(
    x: Tensor, w_qkv: Tensor, q_size: int, kv_size: int, bias: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v projections of x as one GEMM on `w_qkv` = `[Wq; Wk; Wv]` (see `build_w_qkv`);
    q, k and v are views of the one fused output (shapes [..., q_size], [..., kv_size] x2)."""
    if w_qkv.shape[0] != q_size + 2 * kv_size:
        raise ValueError(f"w_qkv has {w_qkv.shape[0]} rows, expected q_size + 2 * kv_size = "
                         f"{q_size + 2 * kv_size}")
    return split_qkv(linear(x, w_qkv, bias), q_size, kv_size)


# ----------------------------------------------------------------------------- custom ops
def _linear_op(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return linear(x, w, bias)


def _linear_fake(x, w, bias=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _qkv_linear_op(x: Tensor, w_qkv: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return linear(x, w_qkv, bias)


linear_op = register_op("linear", _linear_op, _linear_fake)
# The fused projection [..., q + 2 kv]; callers split it with `split_qkv` (see `qkv_linear_op`).
qkv_linear_fused_op = register_op("qkv_linear", _qkv_linear_op, _linear_fake)


def qkv_linear_op(
    x: Tensor, w_qkv: Tensor, q_size: int, kv_size: int, bias: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """`qkv_linear` through the custom op `planlang::qkv_linear`: what a rewritten graph
    calls (the split stays outside the op, as traceable views)."""
    return split_qkv(torch.ops.planlang.qkv_linear(x, w_qkv, bias), q_size, kv_size)
