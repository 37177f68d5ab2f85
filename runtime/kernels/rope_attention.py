"""Rotary embedding, the KV-cache write and decode attention in one kernel.

    rope_attention(q, k, v, cos, sin, k_cache, v_cache, input_pos, rope_k_scale, rope_v_scale,
                   kv_format, scale, softcap, sinks, window, causal, k_scale, v_scale) -> out

is, by definition, `rope_kvcache` followed by `attention` on its rotated queries:

    q_rot, _ = rope_kvcache(q, k, v, cos, sin, k_cache, v_cache, input_pos,
                            rope_k_scale, rope_v_scale, kv_format)
    out = attention(q_rot, k_cache, v_cache, input_pos, scale=scale, softcap=softcap,
                    sinks=sinks, window=window, causal=causal, k_scale=k_scale, v_scale=v_scale)

Why: at decode the rope kernel is a ~2 us launch (plus its gap in the graph) that reads
a few KB, once per layer: 16 of a Llama-1B step's kernels. With one new token (T == 1)
the decode attention kernel does its work instead (`attention._decode_split_kernel`,
ROPE): each program rotates its group's query heads in registers, rounded to q's dtype as
q_rot is; the program whose KV slice holds the new position rotates the key and writes
it and the value into the caches (quantized as `rope_kvcache` quantizes, for FP8 or
emulated FP8 caches) before it reads the slice. Results equal the two kernels' up to the
order of float32 operations in the rotation. Prefill (T > 1), the CPU and anything the
fused kernel does not take run the two ops one after the other.

The graph pass that makes this op is `passes/attention.py::fuse_rope_attention`. Custom
op: `planlang::rope_attention`, mutating k_cache and v_cache, with a fake implementation.
Inference only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import attention as attn
from . import rope_kvcache as rk
from .backend import env_switch, register_op, use_triton

# PLANLANG_ROPE_ATTENTION=0 keeps the two kernels at decode too (for A/B measurements).
FUSE_ENV = "PLANLANG_ROPE_ATTENTION"


def fused_kernel_enabled() -> bool:
    return env_switch(FUSE_ENV, True, "fused")


def rope_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
    input_pos: Tensor, rope_k_scale: Optional[Tensor] = None, rope_v_scale: Optional[Tensor] = None,
    kv_format: str = "", scale: float = 1.0, softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
    window: Optional[int] = None, causal: bool = True, k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
) -> Tensor:
    """Plain PyTorch: the two references one after the other (the definition)."""
    q_rot, _ = rk.rope_kvcache_reference(q, k, v, cos, sin, k_cache, v_cache, input_pos,
                                         rope_k_scale, rope_v_scale, kv_format)
    return attn.attention_reference(q_rot, k_cache, v_cache, input_pos, scale=scale, softcap=softcap, sinks=sinks,
                                    window=window, causal=causal, k_scale=k_scale, v_scale=v_scale)


def _unfused(q, k, v, cos, sin, k_cache, v_cache, input_pos, rope_k_scale, rope_v_scale, kv_format, scale, softcap,
             sinks, window, causal, k_scale, v_scale) -> Tensor:
    q_rot, _ = rk.rope_kvcache(q, k, v, cos, sin, k_cache, v_cache, input_pos, rope_k_scale, rope_v_scale, kv_format)
    return attn._attention_impl(q_rot, k_cache, v_cache, input_pos, scale, softcap, sinks, window, causal,
                                k_scale, v_scale)


def _fused_args(q, k, v, cos, sin, k_cache, v_cache, fmt, rope_k_scale, k_scale) -> Optional[dict]:
    """The decode kernel's ROPE arguments, or None where the fused kernel does not apply."""
    if q.shape[1] != 1 or not fused_kernel_enabled():
        return None
    if fmt and k_scale is not None and k_scale is not rope_k_scale:
        return None  # one scale pointer serves the write and the read
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return None
    k, v, cos, sin = (rk._last_dim_contiguous(t) for t in (k, v, cos, sin))
    args = dict(kn_ptr=k, vn_ptr=v, cos_ptr=cos, sin_ptr=sin, stride_knb=k.stride(0), stride_knh=k.stride(2),
                stride_vnb=v.stride(0), stride_vnh=v.stride(2), stride_cos=cos.stride(0), stride_sin=sin.stride(0),
                MAX_SEQ=cos.shape[0], ROPE=True)
    if fmt:
        fmax, mant, emin = rk._FP8_FORMAT[fmt]
        args.update(QUANT=1 if k_cache.dtype in rk._FP8 else 2, E5M2=fmt == "fp8_e5m2", FMAX=fmax, MANT=mant,
                    EMIN=emin, ROUND_IN_FP32=q.device.type != "cuda")
    return args


def rope_attention(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
    input_pos: Tensor, rope_k_scale: Optional[Tensor] = None, rope_v_scale: Optional[Tensor] = None,
    kv_format: str = "", scale: float = 1.0, softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
    window: Optional[int] = None, causal: bool = True, k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
) -> Tensor:
    """The module docstring's op: one kernel at decode where Triton runs, else the two ops."""
    fmt = rk._check_shapes(q, k, v, cos, sin, k_cache, v_cache, input_pos, rope_k_scale, rope_v_scale, kv_format)
    attn._check_shapes(q, k_cache, v_cache, input_pos, sinks, window, k_scale, v_scale)
    args = (q, k, v, cos, sin, k_cache, v_cache, input_pos, rope_k_scale, rope_v_scale, kv_format, scale, softcap,
            sinks, window, causal, k_scale, v_scale)
    rope = None
    if attn._HAVE_TRITON and use_triton(q, k, v, cos, sin, k_cache, v_cache, input_pos):
        rope = _fused_args(q, k, v, cos, sin, k_cache, v_cache, fmt, rope_k_scale, k_scale)
    if rope is None:
        return _unfused(*args)
    B, T, Hq, D = q.shape
    out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    common = attn.decode_common(q, k_cache, scale, softcap, window, sinks, k_scale, v_scale)
    common["ks_ptr"] = rope_k_scale if fmt else common["ks_ptr"]  # the write's scales (also the read's)
    common["vs_ptr"] = rope_v_scale if fmt else common["vs_ptr"]
    attn._launch_decode(rk._last_dim_contiguous(q), k_cache, v_cache, input_pos, sinks if sinks is not None else q,
                        out, common, None, None, None, None, rope=rope)
    return out


def _rope_attention_op(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
    input_pos: Tensor, rope_k_scale: Optional[Tensor], rope_v_scale: Optional[Tensor], kv_format: str,
    scale: float, softcap: Optional[float], sinks: Optional[Tensor], window: Optional[int], causal: bool,
    k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
) -> Tensor:
    return rope_attention(q, k, v, cos, sin, k_cache, v_cache, input_pos, rope_k_scale, rope_v_scale, kv_format,
                          scale, softcap, sinks, window, causal, k_scale, v_scale)


def _rope_attention_fake(q, k, v, cos, sin, k_cache, v_cache, input_pos, rope_k_scale, rope_v_scale, kv_format,
                         scale, softcap, sinks, window, causal, k_scale=None, v_scale=None):
    return q.new_empty(q.shape)


rope_attention_op = register_op("rope_attention", _rope_attention_op, _rope_attention_fake,
                                mutates_args=("k_cache", "v_cache"))
