"""MXFP8, NVFP4 and MXFP4 GEMMs on Blackwell (sm_100+), through `torch._scaled_mm`.

    native_kernel(dtype, activations, capability) -> (kernel | None, why, hint)   the one gate
    prepare_block_weight(w, dtype, parts)   the weight, once at apply time, in the GEMM's layout
    quantize_operand(x, dtype)              the same for an activation, at every call
    block_scaled_linear(x, w, ...)          `planlang::block_scaled_linear`, the op in the graph

Both operands are in the format (`activations: per_block`, the format's own blocks, as
`emulate: true` computes): `torch._scaled_mm` has no mixed bf16 x FP4 GEMM, so weight-only
(`activations: keep`) is refused here rather than run as a dequantize-per-call GEMM.

The layout `torch._scaled_mm` expects (torch 2.8+; `Blas.cpp`, cuBLAS "1D block scaling
factors layout"): the activation [M, K] row-major, the weight [N, K] passed as its
transpose (column-major); MXFP8 elements float8_e4m3fn with float8_e8m0fnu scales per 32,
MXFP4 float4_e2m1fn_x2 (two E2M1 codes a byte, element 2i in the low nibble: the packing of
`formats.pack_fp4`) with float8_e8m0fnu scales per 32, NVFP4 float4_e2m1fn_x2 with
float8_e4m3fn scales per 16. A scale matrix [rows, K / block] is padded to 128 rows and 4
columns and swizzled (`swizzle_scales`). NVFP4's FP32 tensor scales are not passed: the
FP32 output is multiplied by (activation s_t) * (the weight's s_t of its part, per column).

Written against torch 2.13's source; the GPU machine lent to planlang is an H100 (sm_90),
so this path has never run on hardware.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from planlang import names

from ..kernels.backend import register_op
from . import formats

MIN_CAPABILITY = (10, 0)  # sm_100 (B200), sm_103, sm_120 (RTX 50): PLAN_SPEC.md §10
KERNELS = {"mxfp8": "scaled_mm_mxfp8", "nvfp4": "scaled_mm_nvfp4", "mxfp4": "scaled_mm_mxfp4"}
# The torch names the GEMM needs (float4 and e8m0 arrived in torch 2.8).
TORCH_API = ("_scaled_mm", "float4_e2m1fn_x2", "float8_e8m0fnu")
ALIGN_N, ALIGN_K = 16, 32  # _scaled_mm: N and the packed K divisible by 16; whole blocks of 32


def missing_torch_api() -> list[str]:
    return [f"torch.{a}" for a in TORCH_API if not hasattr(torch, a)]


def native_kernel(dtype: str, activations: str, capability: tuple[int, int]) -> tuple[Optional[str], str, str]:
    """The gate for a non-emulated MXFP8 / NVFP4 / MXFP4 GEMM on a CUDA device of compute
    capability (major, minor): (kernel name, "", "") where it runs natively, else
    (None, why, hint). `check_device`, `prepare_weight` and the tests all ask this."""
    sm = capability[0] * 10 + capability[1]
    if tuple(capability) < MIN_CAPABILITY:
        return None, f"{dtype} needs sm_100+ (Blackwell); this device is sm_{sm}", "use fp8_e4m3 (sm_89+) here"
    if activations == "keep":
        return (None, f"planlang has no weight-only {dtype} GEMM (sm_{sm}): torch._scaled_mm takes both operands "
                      f"in {dtype}, and no dequantize-in-kernel GEMM is written",
                "write activations: per_block for the native GEMM")
    missing = missing_torch_api()
    if missing:
        return (None, f"this torch ({torch.__version__}) lacks {', '.join(missing)}, which the {dtype} GEMM needs",
                "install torch 2.8 or later")
    return KERNELS[dtype], "", ""


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """The compute capability of a CUDA device; None for any other device."""
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def fits(n: int, k: int) -> bool:
    """Whether a weight [N, K] has the shape `torch._scaled_mm` takes; others run emulated
    (the same numbers, up to accumulation order)."""
    return n % ALIGN_N == 0 and k % ALIGN_K == 0


# ----------------------------------------------------------------------------- the layout
def swizzle_scales(scale: Tensor) -> Tensor:
    """A block-scale matrix [rows, cols] (one byte each) in cuBLAS's tiled layout, flat:
    padded with zeros to 128-row by 4-column tiles, tiles in row-major order, and inside a
    tile the scale of (r, c) at (r % 32) * 16 + (r // 32) * 4 + c."""
    rows, cols = scale.shape
    u = scale.view(torch.uint8)
    u = F.pad(u, (0, (-cols) % 4, 0, (-rows) % 128))
    rb, cb = u.shape[0] // 128, u.shape[1] // 4
    tiles = u.view(rb, 4, 32, cb, 4).permute(0, 3, 2, 1, 4)  # [rb, cb, r % 32, r // 32, c]
    return tiles.reshape(-1).view(scale.dtype).contiguous()


@dataclass(frozen=True)
class Operand:
    """One GEMM operand in the layout `torch._scaled_mm` takes."""

    data: Tensor                        # [rows, K] float8_e4m3fn, or [rows, K/2] float4_e2m1fn_x2
    scale: Tensor                       # swizzled block scales, flat: float8_e8m0fnu or float8_e4m3fn
    tensor_scale: Optional[Tensor]      # NVFP4: float32, [1] for an activation, [rows] for a weight


def _operand(q: formats.QuantizedTensor) -> Operand:
    data = q.data if q.format == "mxfp8" else q.data.view(torch.float4_e2m1fn_x2)
    scale = q.scale.view(torch.float8_e8m0fnu) if q.format != "nvfp4" else q.scale
    return Operand(data.contiguous(), swizzle_scales(scale), q.tensor_scale)


def quantize_operand(x: Tensor, dtype: str) -> Operand:
    """An activation [M, K] quantized in `dtype`'s own blocks (formats.quantize), packed."""
    return _operand(formats.quantize(x, dtype))


def prepare_block_weight(w: Tensor, dtype: str, parts: Optional[Sequence[int]] = None) -> Operand:
    """A weight [N, K] quantized once, each part (the linears a fused weight joins) on its
    own as its rule says, so an NVFP4 tensor scale is the part's: stored per row, [N]."""
    if dtype not in names.BLOCK_DTYPES:
        raise ValueError(f"prepare_block_weight: {dtype!r} is not one of {', '.join(names.BLOCK_DTYPES)}")
    pieces = [formats.quantize(p.float(), dtype) for p in w.detach().split(list(parts or [w.shape[0]]), dim=0)]
    data = torch.cat([q.data for q in pieces], dim=0)
    scale = torch.cat([q.scale for q in pieces], dim=0)
    ts = None
    if dtype == "nvfp4":
        ts = torch.cat([q.tensor_scale.expand(q.shape[0]) for q in pieces]).contiguous()
    joined = formats.QuantizedTensor(dtype, data, scale, torch.Size([w.shape[0], w.shape[1]]), "block",
                                     names.FORMAT_BLOCK[dtype], ts)
    return _operand(joined)


# ----------------------------------------------------------------------------- the GEMM
def _scaled_mm(a: Tensor, b_t: Tensor, scale_a: Tensor, scale_b: Tensor) -> Tensor:
    """a @ b_t with block scales, FP32 out. Tests on CPU replace this with a reference."""
    missing = missing_torch_api()
    if missing:
        raise RuntimeError(f"block_scaled_linear: this torch ({torch.__version__}) lacks {', '.join(missing)}; "
                           "hint: install torch 2.8 or later, or add emulate: true to the rule")
    return torch._scaled_mm(a, b_t, scale_a, scale_b, out_dtype=torch.float32)


def block_scaled_linear(x: Tensor, w: Tensor, w_scale: Tensor, w_tensor_scale: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, fmt: str = "nvfp4", act: Optional[str] = None) -> Tensor:
    """x @ w.T (+ bias) in `fmt`: x quantized in the format's blocks at every call, `w` and
    its scales as `prepare_block_weight` made them; FP32 accumulation and epilogue (NVFP4
    tensor scales, bias, the act-mul of a fused gate/up weight), the result in x's dtype."""
    k = x.shape[-1]
    a = quantize_operand(x.reshape(-1, k), fmt)
    y = _scaled_mm(a.data, w.t(), a.scale, w_scale)
    if w_tensor_scale is not None:
        y = y * (a.tensor_scale * w_tensor_scale)
    if bias is not None:
        y = y + bias.float()
    if act:
        g, u = y.chunk(2, dim=-1)
        y = (F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")) * u
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _fake(x, w, w_scale, w_tensor_scale=None, bias=None, fmt="nvfp4", act=None):
    n = w.shape[0] // 2 if act else w.shape[0]
    return x.new_empty((*x.shape[:-1], n))


block_scaled_linear_op = register_op("block_scaled_linear", block_scaled_linear, _fake)
