"""Fused residual add + RMSNorm: the Triton kernel, its plain-PyTorch reference and the launcher.

The formula, exactly (it is the one the built-in models' RMSNorm uses; `offset` is 0 for
Llama-style weights and 1 for Gemma-style weights stored as `w - 1`):

    s  = x + residual                                   rounded to x.dtype, as `x + r` in bf16 is
    hf = s.float() * rsqrt(mean(s.float() ** 2, dim=-1) + eps)
    h  = (hf * (offset + weight.float())).to(x.dtype)

`rmsnorm_residual(x, residual, weight, eps, offset)` returns `(s, h)`; `rmsnorm(x, weight, eps,
offset)` returns `h` of `x` itself. Rows may have any leading shape; the norm runs over the
last dimension. The kernel makes a single pass over HBM: it reads x, r and w once and writes
s and h once (for hidden sizes above 8192 a looped two-pass kernel reads s back, from L2).

With PDL (sm_90+, `backend.pdl_launch`) the kernels wait for the kernel before them before
reading x and r or storing (the rows kernel loads the weight first) and let the next kernel
(a GEMV that loads its weights meanwhile) launch at once.

Both ops are registered as torch custom ops (`planlang::rmsnorm_residual`,
`planlang::rmsnorm`) with fake implementations, so a rewritten graph keeps them through
torch.compile and CUDA-graph capture. Nothing here synchronizes with the host. Inference
only: no autograd formula is registered.
"""
import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from .backend import gdc_functions, pdl_launch, use_triton, register_op

try:  # the module must import without triton; then only the reference runs
    import triton
    import triton.language as tl
    gdc_wait, gdc_launch_dependents = gdc_functions()
except Exception:  # ImportError, or a broken install raising anything
    triton = None

# Above this many columns a row no longer fits in registers: use the looped kernel.
MAX_FUSED_BLOCK = 8192
# Chunk width of the looped kernel.
LOOP_BLOCK = 4096


# ----------------------------------------------------------------------------- reference
def rmsnorm_residual_reference(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float, offset: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: `s = x + residual` in x's dtype (s is x when residual is None), then
    the float32 RMSNorm of s described in the module docstring. Returns (s, h)."""
    s = x if residual is None else (x + residual).to(x.dtype)
    sf = s.float()
    hf = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    h = (hf * (offset + weight.float())).to(x.dtype)
    return s, h


def rmsnorm_reference(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    """Plain PyTorch RMSNorm of x (the formula of the module docstring, with s = x)."""
    return rmsnorm_residual_reference(x, None, weight, eps, offset)[1]


# ----------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def norm_prologue_tile(x_ptr, r_ptr, g_ptr, s_ptr, offs_k, k_mask, offset, s_cols,
                           NORM: tl.constexpr, HAS_RES: tl.constexpr):
        """One K tile of a GEMV's input, for a GEMV that computes `rmsnorm(x + r) @ W.T`
        itself (`norm_gemm`): with NORM, s = x + r rounded to x's dtype (as the unfused add
        is; stored at the columns below `s_cols`: K in the program that writes s, 0 in the
        others), returned as `s * (offset + g)` in fp32 with s^2 per element (the caller
        adds those up across tiles and reduces once, in `norm_prologue_rstd`: a reduction
        per tile would put a barrier in the weight stream). The GEMV multiplies its sums by
        rsqrt(mean + eps) at the end: the norm's scale is one number per row, so it commutes
        with the dot product. Without NORM, x in fp32 and 0."""
        xk = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
        if NORM:
            if HAS_RES:
                r = tl.load(r_ptr + offs_k, mask=k_mask, other=0.0)
                xk = (xk.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
                tl.store(s_ptr + offs_k, xk, mask=offs_k < s_cols)
            xf = xk.to(tl.float32)
            sq = xf * xf
            xf = xf * (offset + tl.load(g_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32))
        else:
            xf = xk.to(tl.float32)
            sq = 0.0
        return xf, sq

    @triton.jit
    def norm_prologue_rstd(sq, K, eps, NORM: tl.constexpr):
        """The norm's 1 / rms from the squares of the whole row, summed over the tiles (1
        without NORM)."""
        if NORM:
            r = tl.math.rsqrt(tl.sum(sq, axis=0) / K + eps)
        else:
            r = 1.0
        return r

    @triton.jit
    def _rmsnorm_rows_kernel(
        x_ptr, r_ptr, w_ptr, s_ptr, h_ptr,
        n_rows, n_cols, stride_x, stride_r, stride_s, stride_h,
        eps, offset,
        HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STORE_CACHE: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """BLOCK_M whole rows per program, each row held in registers: one HBM pass. With
        USE_PDL the weight (constant) is loaded first, while waiting for the kernel that
        writes x and r."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)  # row * stride can pass 2**31 elements
        if USE_PDL:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0, eviction_policy="evict_last")
            gdc_wait()
            gdc_launch_dependents()
        # x and r are streamed once: let them leave L2 first; w is reread by every program.
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0,
                    eviction_policy="evict_first")
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0,
                        eviction_policy="evict_first")
            # Round the sum to x's dtype first: the model's `x + r` does, and the norm sees that.
            s = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + rows[:, None] * stride_s + cols[None, :], s, mask=mask, cache_modifier=STORE_CACHE)
            sf = s.to(tl.float32)
        else:
            sf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(sf * sf, axis=1) / n_cols + eps)
        if not USE_PDL:  # loaded here, it is not held in registers across the loads and the sum
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0, eviction_policy="evict_last")
        h = (sf * rstd[:, None]) * (offset + w.to(tl.float32))[None, :]
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=mask, cache_modifier=STORE_CACHE)

    @triton.jit
    def _rmsnorm_looped_kernel(
        x_ptr, r_ptr, w_ptr, s_ptr, h_ptr,
        n_cols, stride_x, stride_r, stride_s, stride_h,
        eps, offset,
        HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """One row per program in BLOCK_N chunks: pass 1 writes s and sums squares, pass 2
        rereads s (just written, so from L2) and writes h. For rows too wide for registers."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        r_row = r_ptr + row * stride_r
        s_row = s_ptr + row * stride_s
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
            if HAS_RESIDUAL:
                r = tl.load(r_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
                s = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
                tl.store(s_row + cols, s, mask=mask)
                sf = s.to(tl.float32)
            else:
                sf = x.to(tl.float32)
            acc += sf * sf
        rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        # Pass 2 reads s written by other threads of this program: order the accesses.
        tl.debug_barrier()
        src_row = s_row if HAS_RESIDUAL else x_row
        h_row = h_ptr + row * stride_h
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            sf = tl.load(src_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last")
            h = (sf * rstd) * (offset + w.to(tl.float32))
            tl.store(h_row + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


def row_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(rows_per_program, BLOCK_N, num_warps) for the one-pass rows kernel: about 4K elements
    per program (small rows share a program), 8 to 16 elements per thread."""
    block_n = triton.next_power_of_2(n_cols)
    rows = max(1, min(16, 4096 // block_n))
    # Keep the grid at least a few waves deep when there are few rows.
    while rows > 1 and triton.cdiv(n_rows, rows) < 256:
        rows //= 2
    elements = rows * block_n
    num_warps = 4 if elements <= 2048 else 8 if elements <= 4096 else 16
    return rows, block_n, num_warps


@dataclass(frozen=True)
class NormConfig:
    """Launch parameters of the one-pass rows kernel: rows per program, warps, and the store
    cache modifier (".cs", streaming: L2 writes s and h back early and in order instead of
    holding them dirty; "" the default write-back)."""
    num_warps: int
    rows_per_program: int = 1
    store_cache: str = ""


# Rows at least this wide take `TUNED_WIDE` (narrower rows share a program: `row_config`).
WIDE_MIN_BLOCK = 1024
# The launch for 4096-wide bf16 rows, as tuned on an H100 (`--tune` of
# benchmarks/bench_kernels_a.py, 16384 rows: 97-98% of the copy bandwidth, against 96% for
# 8 warps and plain stores); other widths scale num_warps with the width.
TUNED_WIDE = NormConfig(16, rows_per_program=1, store_cache=".cs")


@functools.lru_cache(maxsize=256)
def norm_config(n_rows: int, n_cols: int) -> NormConfig:
    """The heuristic launch: `TUNED_WIDE` (warps scaled to the width, 8 bf16 a thread) for
    rows of 1K to 8K columns, `row_config` for narrow rows."""
    block_n = triton.next_power_of_2(n_cols)
    if block_n < WIDE_MIN_BLOCK:
        rows, _, warps = row_config(n_rows, n_cols)
        return NormConfig(warps, rows_per_program=rows)
    return replace(TUNED_WIDE, num_warps=max(4, min(16, TUNED_WIDE.num_warps * block_n // 4096)))


# ----------------------------------------------------------------------------- GEMV prologue
@dataclass(frozen=True)
class NormPrologue:
    """What a one-row GEMV needs to compute the RMSNorm of its input itself
    (`norm_prologue_tile`): the residual added first (None: the norm of x alone), the norm's
    weight, eps and offset, and `s`, the buffer the sum x + residual is written to (the
    residual stream's next value; None without a residual)."""
    residual: Optional[Tensor]
    weight: Tensor
    eps: float
    offset: float
    s: Optional[Tensor] = None


def prologue_args(norm: Optional[NormPrologue], x1: Tensor) -> tuple[tuple, tuple, dict]:
    """The prologue's kernel arguments; with no norm, dummies and NORM=False."""
    if norm is None:
        return (x1, x1, x1), (0.0, 0.0), dict(NORM=False, HAS_RES=False)
    has_res = norm.residual is not None
    r = norm.residual.reshape(-1) if has_res else x1
    s = norm.s.view(-1) if has_res else x1
    return (r, norm.weight, s), (float(norm.eps), float(norm.offset)), dict(NORM=True, HAS_RES=has_res)


# ----------------------------------------------------------------------------- launcher
def _as_rows(t: Tensor, n_cols: int) -> Tensor:
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rmsnorm_residual_triton(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float, offset: float = 0.0,
    *, config: Optional[NormConfig] = None, out: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor]:
    """Triton launch of `rmsnorm_residual_reference` (s is x itself when residual is None).
    `config` overrides the heuristic `norm_config`; `out` gives contiguous (s, h) to write
    (benchmarks that compare launches on the same buffers)."""
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n_cols},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    x2 = _as_rows(x, n_cols)
    r2 = x2 if residual is None else _as_rows(residual, n_cols)
    w = weight.contiguous()
    if out is not None:
        s, h = (x if residual is None else out[0]), out[1]
    else:
        s = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x2.shape[0]
    if n_rows == 0 or n_cols == 0:
        return s, h
    s2 = x2 if residual is None else s.view(-1, n_cols)
    h2 = h.view(-1, n_cols)
    args = (x2, r2, w, s2, h2)
    strides = (x2.stride(0), r2.stride(0), s2.stride(0), h2.stride(0), float(eps), float(offset))
    has_res = residual is not None
    block_n = triton.next_power_of_2(n_cols)
    pdl = pdl_launch(x.device)
    if block_n > MAX_FUSED_BLOCK:
        _rmsnorm_looped_kernel[(n_rows,)](*args, n_cols, *strides, HAS_RESIDUAL=has_res,
                                          BLOCK_N=LOOP_BLOCK, num_warps=config.num_warps if config else 8, **pdl)
        return s, h
    cfg = config or norm_config(n_rows, n_cols)
    rows = cfg.rows_per_program
    _rmsnorm_rows_kernel[(triton.cdiv(n_rows, rows),)](
        *args, n_rows, n_cols, *strides, HAS_RESIDUAL=has_res, BLOCK_M=rows, BLOCK_N=block_n,
        STORE_CACHE=cfg.store_cache, num_warps=cfg.num_warps, **pdl)
    return s, h


# ----------------------------------------------------------------------------- public ops
def rmsnorm_residual(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, offset: float = 0.0
) -> tuple[Tensor, Tensor]:
    """`s = x + residual` (in x's dtype) and `h = rmsnorm(s)` in float32, cast to x's dtype
    (formula in the module docstring). Returns fresh tensors (s, h) of x's shape. Triton on
    CUDA or under the interpreter, the reference elsewhere."""
    if use_triton(x, residual, weight):
        return rmsnorm_residual_triton(x, residual, weight, eps, offset)
    return rmsnorm_residual_reference(x, residual, weight, eps, offset)


def rmsnorm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    """RMSNorm of x over its last dimension (float32 math, result in x's dtype)."""
    if use_triton(x, weight):
        return rmsnorm_residual_triton(x, None, weight, eps, offset)[1]
    return rmsnorm_reference(x, weight, eps, offset)


# ----------------------------------------------------------------------------- custom ops
def _rmsnorm_residual_op(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, offset: float = 0.0
) -> tuple[Tensor, Tensor]:
    return rmsnorm_residual(x, residual, weight, eps, offset)


def _rmsnorm_residual_fake(x, residual, weight, eps, offset=0.0):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _rmsnorm_op(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    # A fresh tensor: a custom op may not return one of its inputs (empty rows would).
    return rmsnorm(x, weight, eps, offset)


def _rmsnorm_fake(x, weight, eps, offset=0.0):
    return x.new_empty(x.shape)


rmsnorm_residual_op = register_op("rmsnorm_residual", _rmsnorm_residual_op, _rmsnorm_residual_fake)
rmsnorm_op = register_op("rmsnorm", _rmsnorm_op, _rmsnorm_fake)
