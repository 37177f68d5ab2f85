"""Rotary embedding of q and k fused with the write of k and v into a static KV cache.

    rope_kvcache(q, k, v, cos, sin, k_cache, v_cache, input_pos,
                 k_scale=None, v_scale=None, kv_format="") -> (q_rot, k_rot)

Shapes: q [B, T, Hq, D], k and v [B, T, Hkv, D] (the layout right after the projections'
view; any strides with the last dimension contiguous), cos and sin [max_seq, D],
caches [Bmax, Hkv, S, D] with B <= Bmax, input_pos an integer tensor [T] on the device,
shared by the batch.

The rotation is Hugging Face's non-interleaved "rotate_half" convention, in float32:

    out = x * cos[pos] + rotate_half(x) * sin[pos],   rotate_half(x) = cat(-x2, x1)

with x1, x2 the two halves of the head dimension; results are cast to q's / k's dtype.
For every b < B, t < T and kv head h: `k_cache[b, h, input_pos[t]] = k_rot[b, t, h]` and
`v_cache[b, h, input_pos[t]] = v[b, t, h]` (cast to the cache's dtype). Nothing else in the
caches changes. q_rot and k_rot come back as fresh contiguous [B, T, H, D] tensors.

One kernel launch does all of it (one program per token, all heads as one tile, cos/sin
read once). The kernel reads input_pos on the device and never syncs with the host, so it
can be captured in a CUDA graph. A position outside [0, S) and [0, max_seq) writes no
cache entry and rotates to zeros in the kernel (the reference raises instead); repeated
positions are undefined.

Custom op: `planlang::rope_kvcache(q, k, v, cos, sin, k_cache, v_cache, input_pos,
k_scale=None, v_scale=None, kv_format="")`, mutating `k_cache` and `v_cache`, with a fake
implementation. Inference only.

Per-token cos/sin (Hugging Face computes them each call from the position ids, so there
is no table to read at the write positions):

    rope_kvcache_tokens(q, k, v, cos, sin, k_cache, v_cache, cache_pos) -> (q_rot, k_rot)
    rope_tokens(q, k, cos, sin) -> (q_rot, k_rot)

cos and sin are [Bc, T, D] with Bc 1 (shared by the batch) or B: token (b, t) rotates with
row (b if Bc == B else 0, t), whatever positions they were computed from. The rotation is
the one above; `rope_kvcache_tokens` also writes rotated k and raw v at `cache_pos` [T] as
`rope_kvcache` does (the write positions need not be the rotary ones; unquantized caches
only), `rope_tokens` only rotates (no cache, or one the graph writes itself). Both are one
kernel launch (`_rope_tokens_kernel`, one program per token) and custom ops
`planlang::rope_kvcache_tokens` (mutating the caches) and `planlang::rope_tokens`.
"""
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


_FP8 = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}
# format -> (largest finite value, mantissa bits, exponent of the smallest normal)
_FP8_FORMAT = {"fp8_e4m3": (448.0, 3, -6), "fp8_e5m2": (57344.0, 2, -14)}
_FP8_TORCH = {name: dtype for dtype, name in _FP8.items()}


def kv_format_of(k_cache: Tensor, k_scale: Optional[Tensor], kv_format: str = "") -> str:
    """The FP8 format the cache writes quantize to ("" for none), checked against the
    cache's dtype and the scales (host metadata only)."""
    stored = _FP8.get(k_cache.dtype, "")
    if stored and kv_format and kv_format != stored:
        raise ValueError(f"kv_format {kv_format!r} disagrees with the cache's dtype {k_cache.dtype}")
    fmt = stored or kv_format
    if fmt and fmt not in _FP8_FORMAT:
        raise ValueError(f"unknown kv_format {fmt!r}; expected one of {', '.join(_FP8_FORMAT)}")
    if fmt and k_scale is None:
        raise ValueError(f"an {fmt} KV cache needs k_scale and v_scale (float32 [Hkv], a scale per KV head)")
    if k_scale is not None and not fmt:
        raise ValueError(f"k_scale/v_scale given for a {k_cache.dtype} cache; hint: pass kv_format "
                         "(fp8_e4m3 | fp8_e5m2) to emulate an FP8 cache, or leave the scales out")
    return fmt


def _check_shapes(q, k, v, cos, sin, k_cache, v_cache, input_pos, k_scale=None, v_scale=None,
                  kv_format: str = "") -> str:
    """Shape checks only: nothing that reads device values (no host sync). Returns the FP8
    format of the cache writes ("" for none)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, T, Hq, D] and k, v [B, T, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, t, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d or d % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree (or D is odd)")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != d:
        raise ValueError(f"cos/sin must be [max_seq, {d}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    want = (k.shape[2], d)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or (cache.shape[1], cache.shape[3]) != want or cache.shape[0] < b:
            raise ValueError(f"{name} {tuple(cache.shape)} is not [Bmax >= {b}, {want[0]}, S, {d}]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if input_pos.shape != (t,) or input_pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_pos must be an integer tensor [{t}], got {input_pos.dtype} {tuple(input_pos.shape)}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale, or neither")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) differ in dtype")
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if sc is not None and (sc.shape != (k.shape[2],) or not sc.is_floating_point()):
            raise ValueError(f"{name} must be a float tensor [Hkv={k.shape[2]}] (a scale per KV head), "
                             f"got {sc.dtype} {tuple(sc.shape)}")
    return kv_format_of(k_cache, k_scale, kv_format)


# ----------------------------------------------------------------------------- reference
def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin in float32; cos/sin broadcast as [T, 1, D]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin


def kv_quantize(x: Tensor, scale: Tensor, fmt: str, out_dtype: torch.dtype) -> Tensor:
    """x [B, H, T, D] as an FP8 cache of dtype `out_dtype` stores it: the codes
    fp8(clamp(x / scale[h], -fmax, fmax)), or for a wider dtype those codes times the scale."""
    s = scale.float().view(1, -1, 1, 1)
    fmax = _FP8_FORMAT[fmt][0]
    codes = (x.float() / s).clamp(-fmax, fmax).to(_FP8_TORCH[fmt])
    return codes if out_dtype == codes.dtype else (codes.float() * s).to(out_dtype)


def _write(cache: Tensor, b: int, input_pos: Tensor, x: Tensor) -> None:
    """cache[:b].index_copy_(2, input_pos, x), FP8 caches as bytes (index_copy_ has no FP8 kernels)."""
    if cache.dtype in _FP8:
        cache[:b].view(torch.uint8).index_copy_(2, input_pos, x.view(torch.uint8))
    else:
        cache[:b].index_copy_(2, input_pos, x)


def rope_kvcache_reference(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
    k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None, kv_format: str = "",
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: rotate q and k at positions input_pos, `index_copy_` rotated k and raw
    v (quantized with the scales, if given) into rows 0..B-1 of the caches along the sequence
    axis; returns (q_rot, k_rot)."""
    fmt = _check_shapes(q, k, v, cos, sin, k_cache, v_cache, input_pos, k_scale, v_scale, kv_format)
    c = cos[input_pos].float()[:, None, :]  # [T, 1, D]: broadcasts over batch and heads
    s = sin[input_pos].float()[:, None, :]
    q_rot = _rotate(q, c, s).to(q.dtype)
    k_rot = _rotate(k, c, s).to(k.dtype)
    b = q.shape[0]
    # [B, T, H, D] -> [B, H, T, D]; slicing [:b] is a view, so index_copy_ writes the cache.
    k_new, v_new = k_rot.transpose(1, 2), v.transpose(1, 2)
    if fmt:
        k_new, v_new = kv_quantize(k_new, k_scale, fmt, k_cache.dtype), kv_quantize(v_new, v_scale, fmt, v_cache.dtype)
    _write(k_cache, b, input_pos, k_new.to(k_cache.dtype))
    _write(v_cache, b, input_pos, v_new.to(v_cache.dtype))
    return q_rot.contiguous(), k_rot.contiguous()


# ----------------------------------------------------------------------------- kernel
if triton is not None:

    @triton.jit
    def _rotate_heads(base, cos1, cos2, sin1, sin2, offs_h, stride_h, d, mask, HALF: tl.constexpr):
        """Rotated halves (float32) of the heads at base + offs_h * stride_h."""
        ptrs = base + offs_h[:, None] * stride_h + d[None, :]
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2

    @triton.jit
    def _rotate_store_qk(q_base, k_base, qo_ptr, ko_ptr, pid, cos1, cos2, sin1, sin2, sq_h, sk_h, HQ, HKV, d, d_mask,
                         HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr):
        """Token `pid`'s q and k heads rotated and stored as q_rot and k_rot (contiguous
        [.., heads, 2 * HALF]); returns k_rot's halves in k's dtype (rounded first, as the
        reference does), the KV head offsets and their mask, for the cache writes."""
        hq = tl.arange(0, BLOCK_HQ)
        q_mask = (hq < HQ)[:, None] & d_mask[None, :]
        o1, o2 = _rotate_heads(q_base, cos1, cos2, sin1, sin2, hq, sq_h, d, q_mask, HALF)
        qo = qo_ptr + (pid.to(tl.int64) * HQ + hq[:, None]) * (2 * HALF) + d[None, :]
        tl.store(qo, o1.to(qo_ptr.dtype.element_ty), mask=q_mask)
        tl.store(qo + HALF, o2.to(qo_ptr.dtype.element_ty), mask=q_mask)
        hk = tl.arange(0, BLOCK_HKV)
        kv_mask = (hk < HKV)[:, None] & d_mask[None, :]
        k1, k2 = _rotate_heads(k_base, cos1, cos2, sin1, sin2, hk, sk_h, d, kv_mask, HALF)
        k1 = k1.to(ko_ptr.dtype.element_ty)
        k2 = k2.to(ko_ptr.dtype.element_ty)
        ko = ko_ptr + (pid.to(tl.int64) * HKV + hk[:, None]) * (2 * HALF) + d[None, :]
        tl.store(ko, k1, mask=kv_mask)
        tl.store(ko + HALF, k2, mask=kv_mask)
        return k1, k2, hk, kv_mask

    @triton.jit
    def _kv_quant(x, scale, QUANT: tl.constexpr, E5M2: tl.constexpr, FMAX: tl.constexpr,
                  MANT: tl.constexpr, EMIN: tl.constexpr, ROUND_IN_FP32: tl.constexpr):
        """x (float32) as the cache stores it: QUANT 1, the FP8 codes of clamp(x / scale);
        QUANT 2 (emulated), those codes times the scale (float32, cast by the store)."""
        y = tl.math.div_rn(x, scale)  # IEEE division, as torch's x / scale
        y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
        if ROUND_IN_FP32:
            # Round to the format's grid (nearest, ties to even) in float32, so the cast below
            # is exact: Triton's interpreter (3.9) mis-rounds float32 -> fp8 when the mantissa
            # carries into the exponent (126.4 became 64, not 128). Adding and subtracting
            # 1.5 * 2^23 grid steps rounds to a multiple of the step; the step is
            # 2^(max(exponent, EMIN) - MANT).
            e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            step = ((tl.maximum(e, EMIN) - MANT + 127) << 23).to(tl.float32, bitcast=True)
            magic = step * 12582912.0
            y = (y + magic) - magic
        if E5M2:
            codes = y.to(tl.float8e5)
        else:
            codes = y.to(tl.float8e4nv)
        if QUANT == 2:
            return codes.to(tl.float32) * scale
        return codes

    @triton.jit
    def _rope_kvcache_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, qo_ptr, ko_ptr, ks_ptr, vs_ptr,
        T, HQ, HKV, S, MAX_SEQ,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, s_cos, s_sin,
        skc_b, skc_h, skc_s, svc_b, svc_h, svc_s,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
        QUANT: tl.constexpr = 0, E5M2: tl.constexpr = False, FMAX: tl.constexpr = 448.0,
        MANT: tl.constexpr = 3, EMIN: tl.constexpr = -6, ROUND_IN_FP32: tl.constexpr = False,
        USE_PDL: tl.constexpr = False,
    ):
        """One program per token (b, t): rotate its q heads and k heads, write q_rot and
        k_rot, and write k_rot and v into the caches at input_pos[t]. USE_PDL: waits for
        the kernel before (which writes q, k, v) first."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        pid = tl.program_id(0)
        b = (pid // T).to(tl.int64)
        t = (pid % T).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)
        d_mask = d < HALF
        # An out-of-range position reads no table row (rotating to zeros) and writes no cache.
        # (Built as a vector: the interpreter mis-types a scalar bool broadcast into a mask.)
        pos_vec = tl.zeros([BLOCK_HALF], dtype=tl.int64) + pos
        cs_mask = d_mask & (pos_vec >= 0) & (pos_vec < S) & (pos_vec < MAX_SEQ)
        cos1 = tl.load(cos_ptr + pos * s_cos + d, mask=cs_mask, other=0.0).to(tl.float32)[None, :]
        cos2 = tl.load(cos_ptr + pos * s_cos + HALF + d, mask=cs_mask, other=0.0).to(tl.float32)[None, :]
        sin1 = tl.load(sin_ptr + pos * s_sin + d, mask=cs_mask, other=0.0).to(tl.float32)[None, :]
        sin2 = tl.load(sin_ptr + pos * s_sin + HALF + d, mask=cs_mask, other=0.0).to(tl.float32)[None, :]

        # q heads -> q_rot, k heads -> k_rot, then k_rot into the k cache
        k1, k2, hk, kv_mask = _rotate_store_qk(q_ptr + b * sq_b + t * sq_t, k_ptr + b * sk_b + t * sk_t, qo_ptr,
                                               ko_ptr, pid, cos1, cos2, sin1, sin2, sq_h, sk_h, HQ, HKV, d, d_mask,
                                               HALF, BLOCK_HQ, BLOCK_HKV)
        cache_mask = (hk < HKV)[:, None] & cs_mask[None, :]
        kc = kc_ptr + b * skc_b + hk[:, None] * skc_h + pos * skc_s + d[None, :]
        if QUANT != 0:  # an FP8 cache: a scale per KV head
            ks = tl.load(ks_ptr + hk, mask=hk < HKV, other=1.0).to(tl.float32)[:, None]
            k1 = _kv_quant(k1.to(tl.float32), ks, QUANT, E5M2, FMAX, MANT, EMIN, ROUND_IN_FP32)
            k2 = _kv_quant(k2.to(tl.float32), ks, QUANT, E5M2, FMAX, MANT, EMIN, ROUND_IN_FP32)
        tl.store(kc, k1.to(kc_ptr.dtype.element_ty), mask=cache_mask)
        tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty), mask=cache_mask)

        # v heads -> the v cache, unrotated
        vp = v_ptr + b * sv_b + t * sv_t + hk[:, None] * sv_h + d[None, :]
        v1 = tl.load(vp, mask=kv_mask, other=0.0)
        v2 = tl.load(vp + HALF, mask=kv_mask, other=0.0)
        if QUANT != 0:
            vs = tl.load(vs_ptr + hk, mask=hk < HKV, other=1.0).to(tl.float32)[:, None]
            v1 = _kv_quant(v1.to(tl.float32), vs, QUANT, E5M2, FMAX, MANT, EMIN, ROUND_IN_FP32)
            v2 = _kv_quant(v2.to(tl.float32), vs, QUANT, E5M2, FMAX, MANT, EMIN, ROUND_IN_FP32)
        vc = vc_ptr + b * svc_b + hk[:, None] * svc_h + pos * svc_s + d[None, :]
        tl.store(vc, v1.to(vc_ptr.dtype.element_ty), mask=cache_mask)
        tl.store(vc + HALF, v2.to(vc_ptr.dtype.element_ty), mask=cache_mask)


# ----------------------------------------------------------------------------- launcher
def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_kvcache_triton(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
    k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None, kv_format: str = "",
) -> tuple[Tensor, Tensor]:
    """Triton launch of `rope_kvcache_reference`: one kernel for the whole step."""
    fmt = _check_shapes(q, k, v, cos, sin, k_cache, v_cache, input_pos, k_scale, v_scale, kv_format)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' last dimension must be contiguous (they are written in place)")
    q, k, v, cos, sin = (_last_dim_contiguous(t) for t in (q, k, v, cos, sin))
    bsz, seq, hq, dim = q.shape
    hkv = k.shape[2]
    q_rot = torch.empty((bsz, seq, hq, dim), dtype=q.dtype, device=q.device)
    k_rot = torch.empty((bsz, seq, hkv, dim), dtype=k.dtype, device=k.device)
    if bsz * seq == 0:
        return q_rot, k_rot
    half = dim // 2
    block_hq = triton.next_power_of_2(hq)
    heads_elems = (block_hq + triton.next_power_of_2(hkv)) * triton.next_power_of_2(half)
    quant = {}
    if fmt:
        fmax, mant, emin = _FP8_FORMAT[fmt]
        quant = dict(QUANT=1 if k_cache.dtype in _FP8 else 2, E5M2=fmt == "fp8_e5m2", FMAX=fmax, MANT=mant,
                     EMIN=emin, ROUND_IN_FP32=q.device.type != "cuda")
    _rope_kvcache_kernel[(bsz * seq,)](
        q, k, v, cos, sin, k_cache, v_cache, input_pos, q_rot, k_rot,
        k_scale if fmt else k_cache, v_scale if fmt else v_cache,
        seq, hq, hkv, k_cache.shape[2], cos.shape[0],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HQ=block_hq,
        BLOCK_HKV=triton.next_power_of_2(hkv),
        num_warps=4 if heads_elems <= 2048 else 8, **quant, **pdl_launch(q.device),
    )
    return q_rot, k_rot


# ----------------------------------------------------------------------------- public op
def rope_kvcache(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
    k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None, kv_format: str = "",
) -> tuple[Tensor, Tensor]:
    """Rotate q and k (HF rotate_half convention, float32 math) at positions input_pos, write
    rotated k and raw v into k_cache / v_cache rows 0..B-1 at those positions (in place;
    FP8 caches quantized with the per-KV-head scales), and return (q_rot, k_rot) as fresh
    [B, T, H, D] tensors. See the module docstring."""
    args = (q, k, v, cos, sin, k_cache, v_cache, input_pos, k_scale, v_scale, kv_format)
    if use_triton(q, k, v, cos, sin, k_cache, v_cache, input_pos):
        return rope_kvcache_triton(*args)
    return rope_kvcache_reference(*args)


# ----------------------------------------------------------------------------- custom op
def _rope_kvcache_op(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
    k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None, kv_format: str = "",
) -> tuple[Tensor, Tensor]:
    return rope_kvcache(q, k, v, cos, sin, k_cache, v_cache, input_pos, k_scale, v_scale, kv_format)


def _rope_kvcache_fake(q, k, v, cos, sin, k_cache, v_cache, input_pos, k_scale=None, v_scale=None, kv_format=""):
    return q.new_empty(q.shape), k.new_empty(k.shape)


rope_kvcache_op = register_op("rope_kvcache", _rope_kvcache_op, _rope_kvcache_fake,
                            mutates_args=("k_cache", "v_cache"))


# ----------------------------------------------------------------------------- per-token cos/sin
def _check_token_shapes(q, k, cos, sin, v=None, k_cache=None, v_cache=None, cache_pos=None) -> None:
    """Shape checks of the per-token variants (host metadata only)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q [B, T, Hq, D] and k [B, T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    b, t, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d or d % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree (or D is odd)")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, b) or tuple(cos.shape[1:]) != (t, d):
        raise ValueError(f"cos/sin must be [1 or {b}, {t}, {d}] (a row per token), got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if k_cache is None:
        return
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} is not shaped as k {tuple(k.shape)}")
    want = (k.shape[2], d)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or (cache.shape[1], cache.shape[3]) != want or cache.shape[0] < b:
            raise ValueError(f"{name} {tuple(cache.shape)} is not [Bmax >= {b}, {want[0]}, S, {d}]")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {k_cache.dtype} {tuple(k_cache.shape)} and v_cache {v_cache.dtype} "
                         f"{tuple(v_cache.shape)} differ")
    if k_cache.dtype in _FP8:
        raise ValueError(f"a {k_cache.dtype} cache needs the per-KV-head quantize of rope_kvcache; "
                         "rope_kvcache_tokens writes unquantized caches")
    if cache_pos.shape != (t,) or cache_pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cache_pos must be an integer tensor [{t}], got {cache_pos.dtype} {tuple(cache_pos.shape)}")


def rope_tokens_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: q and k [B, T, H, D] rotated with the per-token cos/sin [Bc, T, D]
    (float32 math, cast back); returns fresh contiguous (q_rot, k_rot)."""
    _check_token_shapes(q, k, cos, sin)
    c = cos.float()[:, :, None, :]  # [Bc, T, 1, D]: broadcasts over the heads (and a shared batch)
    s = sin.float()[:, :, None, :]
    return _rotate(q, c, s).to(q.dtype).contiguous(), _rotate(k, c, s).to(k.dtype).contiguous()


def rope_kvcache_tokens_reference(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, cache_pos: Tensor,
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: `rope_tokens_reference`, then rotated k and raw v `index_copy_`-ed
    into rows 0..B-1 of the caches at cache_pos along the sequence axis."""
    _check_token_shapes(q, k, cos, sin, v, k_cache, v_cache, cache_pos)
    q_rot, k_rot = rope_tokens_reference(q, k, cos, sin)
    b = q.shape[0]
    _write(k_cache, b, cache_pos, k_rot.transpose(1, 2).to(k_cache.dtype))
    _write(v_cache, b, cache_pos, v.transpose(1, 2).to(v_cache.dtype))
    return q_rot, k_rot


if triton is not None:

    @triton.jit
    def _rope_tokens_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, qo_ptr, ko_ptr,
        T, HQ, HKV, S,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_b, sc_t, ss_b, ss_t,
        skc_b, skc_h, skc_s, svc_b, svc_h, svc_s,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
        WRITE: tl.constexpr, USE_PDL: tl.constexpr = False,
    ):
        """One program per token (b, t): rotate its q and k heads with cos/sin row (b, t)
        (batch stride 0 for a shared row), write q_rot and k_rot, and with WRITE store k_rot
        and v into the caches at cache_pos[t]."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        pid = tl.program_id(0)
        b = (pid // T).to(tl.int64)
        t = (pid % T).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)
        d_mask = d < HALF
        cb = cos_ptr + b * sc_b + t * sc_t
        sb = sin_ptr + b * ss_b + t * ss_t
        cos1 = tl.load(cb + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        cos2 = tl.load(cb + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        sin1 = tl.load(sb + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        sin2 = tl.load(sb + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]

        k1, k2, hk, kv_mask = _rotate_store_qk(q_ptr + b * sq_b + t * sq_t, k_ptr + b * sk_b + t * sk_t, qo_ptr,
                                               ko_ptr, pid, cos1, cos2, sin1, sin2, sq_h, sk_h, HQ, HKV, d, d_mask,
                                               HALF, BLOCK_HQ, BLOCK_HKV)

        if WRITE:
            pos = tl.load(pos_ptr + t).to(tl.int64)
            # An out-of-range position writes no cache entry (built as a vector: see above).
            pos_vec = tl.zeros([BLOCK_HALF], dtype=tl.int64) + pos
            cache_mask = (hk < HKV)[:, None] & (d_mask & (pos_vec >= 0) & (pos_vec < S))[None, :]
            kc = kc_ptr + b * skc_b + hk[:, None] * skc_h + pos * skc_s + d[None, :]
            tl.store(kc, k1.to(kc_ptr.dtype.element_ty), mask=cache_mask)
            tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty), mask=cache_mask)
            vp = v_ptr + b * sv_b + t * sv_t + hk[:, None] * sv_h + d[None, :]
            v1 = tl.load(vp, mask=kv_mask, other=0.0)
            v2 = tl.load(vp + HALF, mask=kv_mask, other=0.0)
            vc = vc_ptr + b * svc_b + hk[:, None] * svc_h + pos * svc_s + d[None, :]
            tl.store(vc, v1.to(vc_ptr.dtype.element_ty), mask=cache_mask)
            tl.store(vc + HALF, v2.to(vc_ptr.dtype.element_ty), mask=cache_mask)


def _rope_tokens_launch(q, k, cos, sin, v=None, k_cache=None, v_cache=None, cache_pos=None):
    """The one launch of `_rope_tokens_kernel` behind both per-token variants."""
    if k_cache is not None and (k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1):
        raise ValueError("the caches' last dimension must be contiguous (they are written in place)")
    q, k, cos, sin = (_last_dim_contiguous(t) for t in (q, k, cos, sin))
    bsz, seq, hq, dim = q.shape
    hkv = k.shape[2]
    q_rot = torch.empty((bsz, seq, hq, dim), dtype=q.dtype, device=q.device)
    k_rot = torch.empty((bsz, seq, hkv, dim), dtype=k.dtype, device=k.device)
    if bsz * seq == 0:
        return q_rot, k_rot
    write = k_cache is not None
    if write:
        v = _last_dim_contiguous(v)
    else:  # never read (WRITE is off): any tensors of the right kind
        v, k_cache, v_cache, cache_pos = k, k_rot, k_rot, q
    cos, sin = cos.expand(bsz, seq, dim), sin.expand(bsz, seq, dim)  # a shared row: batch stride 0
    half = dim // 2
    block_hq = triton.next_power_of_2(hq)
    heads_elems = (block_hq + triton.next_power_of_2(hkv)) * triton.next_power_of_2(half)
    _rope_tokens_kernel[(bsz * seq,)](
        q, k, v, cos, sin, k_cache, v_cache, cache_pos, q_rot, k_rot,
        seq, hq, hkv, k_cache.shape[2] if write else 0,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        *((k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)) if write else (0,) * 6),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HQ=block_hq,
        BLOCK_HKV=triton.next_power_of_2(hkv), WRITE=write,
        num_warps=4 if heads_elems <= 2048 else 8, **pdl_launch(q.device),
    )
    return q_rot, k_rot


def rope_tokens_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Triton launch of `rope_tokens_reference`."""
    _check_token_shapes(q, k, cos, sin)
    return _rope_tokens_launch(q, k, cos, sin)


def rope_kvcache_tokens_triton(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, cache_pos: Tensor,
) -> tuple[Tensor, Tensor]:
    """Triton launch of `rope_kvcache_tokens_reference`: one kernel for the whole step."""
    _check_token_shapes(q, k, cos, sin, v, k_cache, v_cache, cache_pos)
    return _rope_tokens_launch(q, k, cos, sin, v, k_cache, v_cache, cache_pos)


def rope_tokens(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q and k [B, T, H, D] with per-token cos/sin [1 or B, T, D] (HF rotate_half,
    float32 math); returns fresh (q_rot, k_rot). See the module docstring."""
    if use_triton(q, k, cos, sin):
        return rope_tokens_triton(q, k, cos, sin)
    return rope_tokens_reference(q, k, cos, sin)


def rope_kvcache_tokens(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, cache_pos: Tensor,
) -> tuple[Tensor, Tensor]:
    """`rope_tokens`, and rotated k and raw v written into k_cache / v_cache rows 0..B-1 at
    cache_pos (in place). See the module docstring."""
    if use_triton(q, k, v, cos, sin, k_cache, v_cache, cache_pos):
        return rope_kvcache_tokens_triton(q, k, v, cos, sin, k_cache, v_cache, cache_pos)
    return rope_kvcache_tokens_reference(q, k, v, cos, sin, k_cache, v_cache, cache_pos)


def _rope_tokens_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rope_tokens(q, k, cos, sin)


def _rope_tokens_fake(q, k, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_kvcache_tokens_op(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, cache_pos: Tensor,
) -> tuple[Tensor, Tensor]:
    return rope_kvcache_tokens(q, k, v, cos, sin, k_cache, v_cache, cache_pos)


def _rope_kvcache_tokens_fake(q, k, v, cos, sin, k_cache, v_cache, cache_pos):
    return q.new_empty(q.shape), k.new_empty(k.shape)


rope_tokens_op = register_op("rope_tokens", _rope_tokens_op, _rope_tokens_fake)
rope_kvcache_tokens_op = register_op("rope_kvcache_tokens", _rope_kvcache_tokens_op, _rope_kvcache_tokens_fake,
                                     mutates_args=("k_cache", "v_cache"))
