"""`planlang::emulated_linear`: a GEMM in a number format the device lacks, as
quantize-dequantize (a precision rule's `emulate: true`, and accuracy studies of MX/NVFP4
on any device).

    emulated_linear(x, w, bias, fmt, activations, block_size, act)

`w` is the weight already quantized and dequantized once at apply time, kept in float32.
When `fmt` is set the input is quantized and dequantized at every call as `activations`
says (`per_token`, `per_tensor`, `per_block`; the format's own blocks for MX/NVFP4), in
float32. Then one float32 GEMM (+ bias), the act-mul of a fused gate/up weight when `act`
is set, and the result in x's dtype. These are the numbers the format fixes, not its
speed: every step runs in plain PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from planlang import names

from ..precision.formats import fake_quantize
from .backend import register_op


def _act(g: Tensor, act: str) -> Tensor:
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


def emulated_linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, fmt: str = "",
                    activations: str = "keep", block_size: int = 0, act: Optional[str] = None) -> Tensor:
    x32 = x.float()
    if fmt:
        if fmt in names.FP8_DTYPES:
            x32 = fake_quantize(x32, fmt, activations, block_size or None)
        else:
            x32 = fake_quantize(x32, fmt)
    y = x32 @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    if act:
        g, u = y.chunk(2, dim=-1)
        y = _act(g, act) * u
    return y.to(x.dtype)


def _fake(x, w, bias=None, fmt="", activations="keep", block_size=0, act=None):
    n = w.shape[0] // 2 if act else w.shape[0]
    return x.new_empty((*x.shape[:-1], n))


emulated_linear_op = register_op("emulated_linear", emulated_linear, _fake)
