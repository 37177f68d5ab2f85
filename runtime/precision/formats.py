"""Exact quantize / dequantize of planlang's low-precision formats (PLAN_SPEC.md §7).

Plain PyTorch on any device (CPU, CUDA), no Triton and no host synchronisation, so weights
can be quantized once at apply time and `fake_quantize` (the `emulate: true` path of a rule)
can run inside a captured graph.

    quantize_fp8(w, "fp8_e4m3", scaling="channel")        weights [N, K] -> QuantizedTensor
    quantize_activation_fp8(x, "fp8_e4m3", "per_token")   activations [..., K]; rows are tokens
    quantize_mx(x, "mxfp8" | "mxfp4")                     OCP MX v1.0, blocks of 32 along the last dim
    quantize_nvfp4(x)                                     blocks of 16, E4M3 block scales, FP32 tensor scale
    quantize(x, dtype, scaling=None, block_size=None)     any of the above, by the plan's words
    dequantize(q) -> float32
    fake_quantize(x, dtype, scaling=None, block_size=None) = dequantize(quantize(x, ...)).to(x.dtype)
    encode_e2m1 / decode_e2m1, pack_fp4 / unpack_fp4, decode_e8m0, fp8_dtype, format_max

The numerics. Every step is one float32 operation, rounded as written; conversions to a
narrow format round to nearest, ties to even, and saturate (a finite value never becomes
inf or NaN).

- FP8: `fp8_e4m3` is torch.float8_e4m3fn (max 448), `fp8_e5m2` torch.float8_e5m2 (max
  57344). Per scale group: scale = amax / fmax; a group whose amax is 0 gets scale 1; the
  scale is at least 2^-149 (the smallest float32), so a tiny amax never makes it 0.
  data = fp8(clamp(x / scale, -fmax, fmax)); dequantize: data * scale.
  Groups and scale shapes (float32): `tensor` / `per_tensor` [1]; `channel` / `per_token`
  a scale per row, x.shape[:-1] ([N] for an nn.Linear weight [N, K]); `block` / `per_block`
  groups of `block_size` along the last (input) dim, the last group partial when K is not
  a multiple, x.shape[:-1] + [ceil(K / block_size)].
- MX (mxfp8: E4M3 elements, mxfp4: E2M1 elements; blocks of 32 along the last dim, the last
  one partial when K is not a multiple): shared exponent e = floor(log2(block amax)) -
  emax_elem (8 for E4M3, 2 for E2M1), clamped to [-127, 127]; an all-zero block gets
  e = -127. The scale X = 2^e is stored as E8M0: uint8 code e + 127, value 2^(code - 127),
  255 = NaN; shape x.shape[:-1] + [ceil(K / 32)]. Elements = x / X in the element format,
  saturating at 448 or 6. A block holding a NaN or inf gets scale 255 and zero elements.
- NVFP4 (E2M1 elements, blocks of 16): tensor scale s_t = amax(x) / (6 * 448), float32 [1]
  (1 when amax is 0, at least 2^-149); block scale = E4M3((block amax / 6) / s_t),
  saturating at 448, raised to the smallest E4M3 subnormal 2^-9 where it rounds to 0 in a
  block that is not all zero (so no block is flushed to zero by its scale); elements =
  E2M1(x / (block scale * s_t)) (±0 where that product underflows to 0).
  Dequantize: value * (block scale * s_t).
- E2M1 codes are 4 bits sign | e1 e0 | m (bias 1, subnormal at exponent 0): codes 0..7 are
  0, 0.5, 1, 1.5, 2, 3, 4, 6 and 8..15 the same negated. mxfp4 and nvfp4 data hold two codes
  per uint8, the even index in the low nibble: shape x.shape[:-1] + [ceil(K / 2)]. As in an
  IEEE conversion, a negative value that rounds to zero keeps its sign (-0 is code 8).

Inputs are expected finite: a NaN or inf makes its scale group dequantize to NaN (for
NVFP4 the whole tensor, through s_t). A scale passed in (`scale=`) must be positive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from planlang.names import (ACTIVATION_QUANT, BLOCK_DTYPES, DEFAULT_BLOCK_SIZE, FORMAT_BLOCK, FP8_DTYPES,
                            SCALINGS)

_FP8_TORCH = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
assert set(_FP8_TORCH) == set(FP8_DTYPES), "planlang.names.FP8_DTYPES changed: map the new name to a torch dtype"

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
E2M1_MAX = 6.0
# The largest finite value of each format; for the block formats, of their elements.
_FORMAT_MAX = {"fp8_e4m3": E4M3_MAX, "fp8_e5m2": E5M2_MAX, "mxfp8": E4M3_MAX, "mxfp4": E2M1_MAX,
               "nvfp4": E2M1_MAX}
# Exponent of the largest normal element (OCP MX v1.0, section 6.3: emax_elem).
MX_EMAX = {"mxfp8": 8, "mxfp4": 2}
# The magnitudes of E2M1 codes 0..7; codes 8..15 are the same negated.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E8M0_BIAS = 127
E8M0_NAN = 255
FP32_TINY = 2.0 ** -149  # the smallest float32 (subnormal): a scale never goes below it
E4M3_TINY = 2.0 ** -9    # the smallest E4M3 value (subnormal)
NVFP4_TENSOR_DIV = E2M1_MAX * E4M3_MAX  # s_t = amax / (6 * 448)

# The plan's scaling words -> how the scale groups are formed.
_FP8_GROUP = {"tensor": "tensor", "per_tensor": "tensor", "channel": "row", "per_token": "row",
              "block": "block", "per_block": "block"}
_ACTIVATION_MODES = tuple(m for m in ACTIVATION_QUANT if m != "keep")


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor: everything `dequantize` needs to give the values back.

    format:       the plan's dtype name (fp8_e4m3, fp8_e5m2, mxfp8, mxfp4, nvfp4).
    data:         fp8 values of the input's shape (fp8_*: that float8 type; mxfp8:
                  float8_e4m3fn), or packed E2M1 codes, uint8 [..., ceil(K / 2)] (mxfp4, nvfp4).
    scale:        float32 (fp8_*), E8M0 codes as uint8 (mxfp8, mxfp4), float8_e4m3fn (nvfp4);
                  shapes in the module docstring.
    shape:        the input's shape.
    scaling:      tensor | channel | block | per_tensor | per_token | per_block ("block" for
                  MX and NVFP4).
    block_size:   elements per scale block along the last dim; None unless block-scaled.
    tensor_scale: NVFP4's float32 per-tensor scale, shape [1]; None for the other formats.
    """
    format: str
    data: Tensor
    scale: Tensor
    shape: torch.Size
    scaling: str
    block_size: Optional[int] = None
    tensor_scale: Optional[Tensor] = None

    def dequantize(self) -> Tensor:
        """The values as float32, of the input's shape (same as `dequantize(self)`)."""
        return dequantize(self)


# ----------------------------------------------------------------------------- names
def fp8_dtype(name: str) -> torch.dtype:
    """The torch dtype of an FP8 plan dtype: fp8_e4m3 -> float8_e4m3fn, fp8_e5m2 -> float8_e5m2."""
    if name not in _FP8_TORCH:
        raise ValueError(f"fp8_dtype: {name!r} is not an FP8 dtype; expected one of {', '.join(FP8_DTYPES)}")
    return _FP8_TORCH[name]


def format_max(name: str) -> float:
    """The largest finite value of a format (for mxfp8, mxfp4, nvfp4: of their elements)."""
    if name not in _FORMAT_MAX:
        raise ValueError(f"format_max: unknown low-precision dtype {name!r}; "
                         f"expected one of {', '.join(FP8_DTYPES + BLOCK_DTYPES)}")
    return _FORMAT_MAX[name]


# ----------------------------------------------------------------------------- checks
def _check_input(x, where: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{where}: expected a floating-point tensor, got {x.dtype}; hint: convert it with .float()")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{where}: cannot quantize a tensor of shape {tuple(x.shape)}; "
                         "hint: it needs a last (input) dimension and at least one element")


def _check_block_size(block_size, where: str) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{where}: block_size must be a positive integer, got {block_size!r}")
    return block_size


# ----------------------------------------------------------------------------- shared pieces
def _blocks(x: Tensor, block: int) -> Tensor:
    """[..., K] -> [..., ceil(K / block), block], the last block padded with zeros (which
    change no amax and quantize to zero)."""
    pad = (-x.shape[-1]) % block
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block)


def _unblock(xb: Tensor, k: int) -> Tensor:
    """[..., nb, block] -> [..., K], dropping the padding of the last block."""
    return xb.reshape(*xb.shape[:-2], -1)[..., :k]


def _per_element(scale: Tensor, block: int, k: int) -> Tensor:
    """A block scale [..., nb] repeated over its elements: [..., K]."""
    return scale.repeat_interleave(block, dim=-1)[..., :k]


def _div(x: Tensor, d: float) -> Tensor:
    """x / d rounded once, as IEEE division, on every device: CUDA turns a division by a
    Python scalar into a multiplication by its reciprocal (two roundings), so the divisor
    is a tensor here."""
    return x / torch.full_like(x, d)


def _amax_scale(amax: Tensor, fmax: float) -> Tensor:
    """amax / fmax, 1 where amax is 0, never below the smallest float32 (NaN stays NaN)."""
    scale = torch.where(amax == 0, torch.ones_like(amax), _div(amax, fmax))
    return scale.clamp_min(FP32_TINY)


def _pow2(e: Tensor) -> Tensor:
    """2^e as float32, exactly, for integer e in [-126, 127] (built from the exponent bits)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


# ----------------------------------------------------------------------------- E2M1, E8M0, packing
def encode_e2m1(v: Tensor) -> Tensor:
    """E2M1 codes (uint8, 0..15) of v: round to nearest, ties to even, saturating at ±6; the
    sign of v is kept (also for zero); NaN gives code 0."""
    v = v.float()
    a = v.abs().clamp(max=E2M1_MAX)
    # Spacing of E2M1 values: 0.5 below 2, 1 in [2, 4), 2 in [4, 6]. a / step is exact and
    # torch.round rounds half to even, which is the even mantissa at every tie.
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    q = torch.round(a / step) * step
    index = torch.where(q < 2, q * 2, torch.where(q < 4, q + 2, q / 2 + 4))  # 0..7 in E2M1_VALUES order
    code = index.to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)
    return torch.where(torch.isnan(v), torch.zeros_like(code), code)


def decode_e2m1(codes: Tensor) -> Tensor:
    """The float32 values of E2M1 codes (uint8 or any integer tensor, 0..15)."""
    # From the bits, not a lookup table, so nothing is copied to the device (graph capture).
    c = codes.to(torch.int32)
    e, m = (c >> 1) & 3, c & 1
    halves = torch.where(e == 0, m, (2 + m) << (e - 1).clamp_min(0))  # 0.m or 1.m * 2^(e-1), in halves
    magnitude = halves.float() * 0.5
    return torch.where((c & 8) != 0, -magnitude, magnitude)


def decode_e8m0(codes: Tensor) -> Tensor:
    """The float32 values of E8M0 scale codes (uint8): 2^(code - 127), NaN for 255."""
    c = codes.to(torch.int32)
    bits = torch.where(c == 0, torch.full_like(c, 1 << 22), c << 23)  # 2^-127 is a float32 subnormal
    value = bits.view(torch.float32)
    return torch.where(c == E8M0_NAN, torch.full_like(value, float("nan")), value)


def _pack(codes: Tensor) -> Tensor:
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def pack_fp4(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte along the last dim: uint8 [..., K] -> uint8 [..., ceil(K / 2)],
    element 2i in the low nibble and 2i+1 in the high one (an odd K pads a zero code)."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_fp4: expected uint8 codes, got {codes.dtype}; hint: encode_e2m1 makes them")
    if codes.dim() == 0:
        raise ValueError("pack_fp4: codes need a last dimension to pack along")
    if codes.numel() and int(codes.max()) > 15:  # apply-time only: the check syncs with the device
        raise ValueError(f"pack_fp4: codes must be 0..15, found {int(codes.max())}")
    return _pack(codes)


def unpack_fp4(packed: Tensor, k: Optional[int] = None) -> Tensor:
    """The inverse of `pack_fp4`: uint8 [..., M] -> codes uint8 [..., 2M], or [..., k] when the
    original length k is given."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_fp4: expected packed uint8, got {packed.dtype}")
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    if k is not None:
        if not 0 <= k <= codes.shape[-1] or codes.shape[-1] - k > 1:
            raise ValueError(f"unpack_fp4: {packed.shape[-1]} bytes hold {codes.shape[-1] - 1} or "
                             f"{codes.shape[-1]} codes, not {k}")
        codes = codes[..., :k]
    return codes


# ----------------------------------------------------------------------------- FP8
def _fp8_scale_shape(shape: torch.Size, group: str, block_size: int) -> tuple:
    if group == "tensor":
        return (1,)
    if group == "row":
        return tuple(shape[:-1])
    return tuple(shape[:-1]) + (-(-shape[-1] // block_size),)


def _quantize_fp8(x: Tensor, dtype: str, scaling: str, block_size: int, scale: Optional[Tensor],
                  where: str) -> QuantizedTensor:
    _check_input(x, where)
    target = fp8_dtype(dtype)
    group = _FP8_GROUP[scaling]
    block_size = _check_block_size(block_size, where) if group == "block" else None
    fmax = _FORMAT_MAX[dtype]
    x32 = x.float()
    expected = _fp8_scale_shape(x.shape, group, block_size or 1)
    if scale is None:
        a = x32.abs()
        amax = (a.amax().reshape(1) if group == "tensor" else
                a.amax(dim=-1) if group == "row" else _blocks(a, block_size).amax(dim=-1))
        scale = _amax_scale(amax, fmax)
    else:
        if tuple(scale.shape) != expected:
            raise ValueError(f"{where}: scale of shape {tuple(scale.shape)} given for {scaling} scaling of a "
                             f"tensor of shape {tuple(x.shape)}; expected shape {expected}")
        scale = scale.to(device=x.device, dtype=torch.float32)
    data = (x32 / _fp8_expand(scale, group, block_size, x.shape[-1])).clamp(-fmax, fmax).to(target)
    return QuantizedTensor(dtype, data, scale, x.shape, scaling, block_size)


def _fp8_expand(scale: Tensor, group: str, block_size: Optional[int], k: int) -> Tensor:
    if group == "tensor":
        return scale
    if group == "row":
        return scale.unsqueeze(-1)
    return _per_element(scale, block_size, k)


def quantize_fp8(w: Tensor, dtype: str = "fp8_e4m3", scaling: str = "channel",
                 block_size: int = DEFAULT_BLOCK_SIZE, scale: Optional[Tensor] = None) -> QuantizedTensor:
    """Quantize a weight ([N, K], nn.Linear layout; any [..., K] works) to FP8.

    scaling: `tensor` (one scale, shape [1]), `channel` (a scale per output row, [N]) or
    `block` (groups of `block_size` along K, [N, ceil(K / block_size)]). Scales are
    amax / fmax unless `scale` (that shape, positive) is given, e.g. a calibrated one;
    values beyond ±fmax * scale saturate."""
    if scaling not in SCALINGS:
        raise ValueError(f"quantize_fp8: unknown scaling {scaling!r}; expected one of {', '.join(SCALINGS)}")
    return _quantize_fp8(w, dtype, scaling, block_size, scale, "quantize_fp8")


def quantize_activation_fp8(x: Tensor, dtype: str = "fp8_e4m3", mode: str = "per_token",
                            block_size: int = DEFAULT_BLOCK_SIZE,
                            scale: Optional[Tensor] = None) -> QuantizedTensor:
    """Quantize an activation [..., K] to FP8 dynamically: `per_token` (a scale per row,
    shape x.shape[:-1]), `per_tensor` ([1]) or `per_block` (groups of `block_size` along K,
    x.shape[:-1] + [ceil(K / block_size)]). The numerics are `quantize_fp8`'s."""
    if mode not in _ACTIVATION_MODES:
        hint = "; `keep` means the activation is not quantized" if mode == "keep" else ""
        raise ValueError(f"quantize_activation_fp8: unknown mode {mode!r}; expected one of "
                         f"{', '.join(_ACTIVATION_MODES)}{hint}")
    return _quantize_fp8(x, dtype, mode, block_size, scale, "quantize_activation_fp8")


# ----------------------------------------------------------------------------- MX
def quantize_mx(x: Tensor, fmt: str = "mxfp8", block: int = FORMAT_BLOCK["mxfp8"]) -> QuantizedTensor:
    """Quantize to an OCP MX format along the last dim (MX v1.0, section 6.3): a power-of-two
    E8M0 scale per `block` elements (32 in the spec), elements E4M3 (mxfp8) or E2M1 (mxfp4),
    rounded to nearest even and saturated. See the module docstring for the exact rule."""
    if fmt not in MX_EMAX:
        raise ValueError(f"quantize_mx: unknown MX format {fmt!r}; expected one of {', '.join(MX_EMAX)}")
    _check_input(x, "quantize_mx")
    block = _check_block_size(block, "quantize_mx")
    k = x.shape[-1]
    xb = _blocks(x.float(), block)
    amax = xb.abs().amax(dim=-1)
    finite = torch.isfinite(amax)
    _, e = torch.frexp(amax)  # amax = m * 2^e with m in [0.5, 1): floor(log2(amax)) = e - 1, exactly
    shared = torch.where(amax == 0, torch.full_like(e, -E8M0_BIAS), e - 1 - MX_EMAX[fmt])
    shared = torch.where(finite, shared.clamp(-E8M0_BIAS, E8M0_BIAS), torch.zeros_like(shared))
    scale = torch.where(finite, shared + E8M0_BIAS, torch.full_like(shared, E8M0_NAN)).to(torch.uint8)
    # x / 2^shared as x * 2^-shared: exact, and 2^-shared is a normal float32 (shared <= 125)
    y = xb * _pow2(-shared).unsqueeze(-1)
    y = torch.where(finite.unsqueeze(-1), y, torch.zeros_like(y))
    fmax = _FORMAT_MAX[fmt]
    y = _unblock(y.clamp(-fmax, fmax), k)
    data = y.to(torch.float8_e4m3fn) if fmt == "mxfp8" else _pack(encode_e2m1(y))
    return QuantizedTensor(fmt, data, scale, x.shape, "block", block)


# ----------------------------------------------------------------------------- NVFP4
def quantize_nvfp4(x: Tensor) -> QuantizedTensor:
    """Quantize to NVFP4 along the last dim: blocks of 16 E2M1 elements, an E4M3 scale per
    block and a float32 scale for the tensor. See the module docstring for the exact rule."""
    _check_input(x, "quantize_nvfp4")
    block = FORMAT_BLOCK["nvfp4"]
    k = x.shape[-1]
    x32 = x.float()
    s_t = _amax_scale(x32.abs().amax().reshape(1), NVFP4_TENSOR_DIV)
    xb = _blocks(x32, block)
    bamax = xb.abs().amax(dim=-1)
    sb = (_div(bamax, E2M1_MAX) / s_t).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    sb = torch.where((sb == 0) & (bamax > 0), torch.full_like(sb, E4M3_TINY), sb)
    denom = (sb * s_t).unsqueeze(-1)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    y = torch.where(denom > 0, xb / safe, xb * 0)  # x * 0 keeps the sign of zero
    codes = encode_e2m1(_unblock(y, k))
    return QuantizedTensor("nvfp4", _pack(codes), sb.to(torch.float8_e4m3fn), x.shape, "block", block, s_t)


# ----------------------------------------------------------------------------- by the plan's words
def quantize(x: Tensor, dtype: str, scaling: Optional[str] = None,
             block_size: Optional[int] = None) -> QuantizedTensor:
    """Quantize by a precision rule's words.

    fp8_e4m3 / fp8_e5m2: `scaling` is a weight scaling (tensor, channel, block; default
    channel) or an activation mode (per_tensor, per_token, per_block); `block_size`
    defaults to 128. mxfp8 / mxfp4 / nvfp4 always scale in their own blocks: `scaling` may be
    None, block or per_block, and `block_size` None or the format's (32, 32, 16)."""
    if dtype in _FP8_TORCH:
        scaling = "channel" if scaling is None else scaling
        if scaling not in _FP8_GROUP:
            raise ValueError(f"quantize: unknown scaling {scaling!r} for {dtype}; expected one of "
                             f"{', '.join(_FP8_GROUP)}")
        return _quantize_fp8(x, dtype, scaling, DEFAULT_BLOCK_SIZE if block_size is None else block_size,
                             None, "quantize")
    if dtype in FORMAT_BLOCK:
        if scaling not in (None, "block", "per_block"):
            raise ValueError(f"quantize: {dtype} scales in its own blocks of {FORMAT_BLOCK[dtype]}, not "
                             f"{scaling!r}; hint: leave scaling out")
        if block_size is not None and block_size != FORMAT_BLOCK[dtype]:
            raise ValueError(f"quantize: {dtype} blocks hold {FORMAT_BLOCK[dtype]} elements, not {block_size}; "
                             "hint: leave block_size out")
        return quantize_nvfp4(x) if dtype == "nvfp4" else quantize_mx(x, dtype)
    raise ValueError(f"quantize: {dtype!r} is not a low-precision dtype; expected one of "
                     f"{', '.join(FP8_DTYPES + BLOCK_DTYPES)}")


def dequantize(q: QuantizedTensor) -> Tensor:
    """The values of a QuantizedTensor as float32, of the original shape."""
    k = q.shape[-1]
    if q.format in _FP8_TORCH:
        group = _FP8_GROUP[q.scaling]
        return q.data.float() * _fp8_expand(q.scale, group, q.block_size, k)
    if q.format in MX_EMAX:
        values = q.data.float() if q.format == "mxfp8" else decode_e2m1(unpack_fp4(q.data, k))
        return values * _per_element(decode_e8m0(q.scale), q.block_size, k)
    if q.format == "nvfp4":
        values = decode_e2m1(unpack_fp4(q.data, k))
        return values * _per_element(q.scale.float() * q.tensor_scale, q.block_size, k)
    raise ValueError(f"dequantize: unknown format {q.format!r}")


def fake_quantize(x: Tensor, dtype: str, scaling: Optional[str] = None,
                  block_size: Optional[int] = None) -> Tensor:
    """Quantize and dequantize (a rule's `emulate: true`): the values the format would
    give, in x's dtype. Arguments as `quantize`."""
    return dequantize(quantize(x, dtype, scaling, block_size)).to(x.dtype)
