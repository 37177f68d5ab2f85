"""RMSNorm (after a residual add) folded into the GEMM that reads it: one kernel at decode.

    rmsnorm_gemm(x, residual, g, eps, offset, w, w_scale, bias, block_size, act) -> (s, y)
        s = x + residual                     (empty when residual is None: the norm reads x)
        h = rmsnorm(s; g, eps, offset)       (the formula of `rmsnorm_residual`)
        y = gemm(h)                          the op the graph ran on h:
            w_scale None, act None:  `qkv.linear(h, w, bias)`      (QKV, LM head, any linear)
            w_scale None, act set:   `swiglu.swiglu_linear(h, w, act)`  (w = [W1; W3])
            w_scale set:             `fp8_linear(h, w, w_scale, bias, block_size, act)` (weight-only FP8)

Why: at decode every layer runs the norm twice, each a ~2 us kernel reading 4 KB and a launch
gap, between GEMVs that stream megabytes; 33 of the ~145 kernels of a Llama-1B step. With one
row (decode at batch 1) the GEMV computes the norm itself: each program loads x (+ residual)
tile by tile as it streams the weight, multiplies by the norm weight, accumulates the sum of
squares beside the dot product and scales its sums by rsqrt(mean + eps) at the end (one
number per row, so it commutes with the dot product); the first column block stores s. The
result differs from the unfused path only by h not being rounded to the model's dtype before
the GEMV (it is more exact). With more rows, on the CPU, or for weights the prologue does not
take (FP8 block scales), the norm kernel and the GEMM run one after the other, as before.

The graph pass that makes these ops is `passes/prologue.py`. Custom op:
`planlang::rmsnorm_gemm`, with a fake implementation. Inference only.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import qkv, swiglu
from .backend import register_op, use_triton
from .fp8_linear import fp8_gemv_norm_triton, fp8_linear, fp8_linear_reference
from .rmsnorm_residual import NormPrologue, rmsnorm, rmsnorm_residual, rmsnorm_residual_reference

_GEMV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Which one-row GEMVs take the norm in their prologue, by kind: "linear" (a plain GEMV, QKV
# and any projection), "head" (a plain GEMV of more than HEAD_ROWS outputs: the LM head,
# whose thousands of programs would each redo the norm), "gate_up" (the fused SwiGLU GEMV),
# "fp8" and "fp8_gate_up" (weight-only FP8). Kinds left out run the norm kernel, then the GEMV.
# PLANLANG_NORM_PROLOGUE overrides it: 1 / on (every kind), 0 / off (none), or a comma list.
PROLOGUE_ENV = "PLANLANG_NORM_PROLOGUE"
PROLOGUE_KINDS = ("linear", "head", "gate_up", "fp8", "fp8_gate_up")
PROLOGUE_DEFAULT = frozenset(PROLOGUE_KINDS)
HEAD_ROWS = 32768


def prologue_kinds() -> frozenset:
    """The GEMV kinds that take the norm prologue now (PROLOGUE_DEFAULT unless the
    environment says otherwise); a bad value is a ValueError naming the variable."""
    raw = os.environ.get(PROLOGUE_ENV, "").strip().lower()
    if not raw:
        return PROLOGUE_DEFAULT
    if raw in ("1", "on", "true", "yes", "all"):
        return frozenset(PROLOGUE_KINDS)
    if raw in ("0", "off", "false", "no", "none"):
        return frozenset()
    kinds = frozenset(k.strip() for k in raw.split(",") if k.strip())
    bad = sorted(kinds - set(PROLOGUE_KINDS))
    if bad:
        raise ValueError(f"environment variable {PROLOGUE_ENV}={os.environ[PROLOGUE_ENV]!r}: unknown kind "
                         f"{', '.join(bad)}; hint: 1, 0 or a comma list of {', '.join(PROLOGUE_KINDS)}")
    return kinds


def prologue_kind(w: Tensor, w_scale: Optional[Tensor], act: Optional[str]) -> str:
    """The PROLOGUE_KINDS entry of a GEMM on weight `w`."""
    if w_scale is not None:
        return "fp8_gate_up" if act is not None else "fp8"
    if act is not None:
        return "gate_up"
    return "head" if w.shape[0] > HEAD_ROWS else "linear"


def _gemm(h: Tensor, w: Tensor, w_scale: Optional[Tensor], bias: Optional[Tensor], block_size: int,
          act: Optional[str]) -> Tensor:
    if w_scale is not None:
        return fp8_linear(h, w, w_scale, bias, block_size=block_size, act=act)
    if act is not None:
        if bias is not None:
            raise ValueError("rmsnorm_gemm: the fused gate/up GEMM takes no bias")
        return swiglu.swiglu_linear(h, w, act)
    return qkv.linear(h, w, bias)


def rmsnorm_gemm_reference(
    x: Tensor, residual: Optional[Tensor], g: Tensor, eps: float, offset: float, w: Tensor,
    w_scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, block_size: int = 0,
    act: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: the norm's reference, then the GEMM's (both as the unfused graph runs)."""
    s, h = rmsnorm_residual_reference(x, residual, g, eps, offset)
    if w_scale is not None:
        y = fp8_linear_reference(h, w, w_scale, bias, block_size=block_size, act=act)
    elif act is not None:
        y = swiglu.swiglu_linear_reference(h, w, act)
    else:
        y = qkv.linear_reference(h, w, bias)
    return (s if residual is not None else x.new_empty(0)), y


def _one_row_kernel(x: Tensor, norm: NormPrologue, w: Tensor, w_scale: Optional[Tensor], bias: Optional[Tensor],
                    block_size: int, act: Optional[str]) -> Optional[Tensor]:
    """The fused one-row GEMV, or None where no fused kernel takes these operands."""
    if w_scale is not None:
        return fp8_gemv_norm_triton(x, norm, w, w_scale, bias, block_size=block_size, act=act)
    if x.dtype != w.dtype or x.dtype not in _GEMV_DTYPES or w.stride(-1) != 1:
        return None
    if act is not None:
        return None if bias is not None else swiglu.swiglu_gemv_triton(x, w, act, norm=norm)
    return qkv.gemv_triton(x, w, bias, norm=norm)


def fused_applies(x: Tensor, residual: Optional[Tensor], g: Tensor) -> bool:
    """Whether the one-kernel path can run: one row, Triton where the tensors are,
    contiguous norm operands of one shape."""
    k = x.shape[-1]
    return (x.numel() == k and k > 0 and use_triton(x, g) and g.shape == (k,) and g.is_contiguous()
            and (residual is None or (residual.shape == x.shape and residual.is_contiguous()))
            and x.is_contiguous())


def rmsnorm_gemm(
    x: Tensor, residual: Optional[Tensor], g: Tensor, eps: float, offset: float, w: Tensor,
    w_scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, block_size: int = 0,
    act: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """(s, y) of the module docstring: one kernel for one row where Triton runs, else the
    norm kernel (or reference) and then the GEMM op."""
    if fused_applies(x, residual, g) and prologue_kind(w, w_scale, act) in prologue_kinds():
        s = torch.empty_like(x) if residual is not None else None
        y = _one_row_kernel(x, NormPrologue(residual, g, eps, offset, s), w, w_scale, bias, block_size, act)
        if y is not None:
            return (s if s is not None else x.new_empty(0)), y
    if residual is not None:
        s, h = rmsnorm_residual(x, residual, g, eps, offset)
    else:
        s, h = x.new_empty(0), rmsnorm(x, g, eps, offset)
    return s, _gemm(h, w, w_scale, bias, block_size, act)


def _rmsnorm_gemm_op(x: Tensor, residual: Optional[Tensor], g: Tensor, eps: float, offset: float, w: Tensor,
                     w_scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, block_size: int = 0,
                     act: Optional[str] = None) -> tuple[Tensor, Tensor]:
    return rmsnorm_gemm(x, residual, g, eps, offset, w, w_scale, bias, block_size, act)


def _rmsnorm_gemm_fake(x, residual, g, eps, offset, w, w_scale=None, bias=None, block_size=0, act=None):
    n = w.shape[0] // (2 if act is not None else 1)
    s = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return s, x.new_empty((*x.shape[:-1], n))


rmsnorm_gemm_op = register_op("rmsnorm_gemm", _rmsnorm_gemm_op, _rmsnorm_gemm_fake)
