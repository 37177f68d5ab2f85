"""Rotary embedding of q and k fused with the write of k and v into a static KV cache.

    rope_kvcache(q, k, v, cos, sin, k_cache, v_cache, input_pos) -> (q_rot, k_rot)

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

Custom op: `planlang::rope_kvcache`, mutating `k_cache` and `v_cache`, with a fake
implementation. Inference only.
"""
import torch
from torch import Tensor

from .backend import use_triton, register_op

try:  # the module must import without triton; then only the reference runs
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install raising anything
    triton = None


def _check_shapes(q, k, v, cos, sin, k_cache, v_cache, input_pos) -> None:
    """Shape checks only: nothing that reads device values (no host sync)."""
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


# ----------------------------------------------------------------------------- reference
def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin in float32; cos/sin broadcast as [T, 1, D]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_kvcache_reference(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: rotate q and k at positions input_pos, `index_copy_` rotated k and raw
    v into rows 0..B-1 of the caches along the sequence axis; returns (q_rot, k_rot)."""
    _check_shapes(q, k, v, cos, sin, k_cache, v_cache, input_pos)
    c = cos[input_pos].float()[:, None, :]  # [T, 1, D]: broadcasts over batch and heads
    s = sin[input_pos].float()[:, None, :]
    q_rot = _rotate(q, c, s).to(q.dtype)
    k_rot = _rotate(k, c, s).to(k.dtype)
    b = q.shape[0]
    # [B, T, H, D] -> [B, H, T, D]; slicing [:b] is a view, so index_copy_ writes the cache.
    k_cache[:b].index_copy_(2, input_pos, k_rot.transpose(1, 2).to(k_cache.dtype))
    v_cache[:b].index_copy_(2, input_pos, v.transpose(1, 2).to(v_cache.dtype))
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
    def _rope_kvcache_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, qo_ptr, ko_ptr,
        T, HQ, HKV, S, MAX_SEQ,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, s_cos, s_sin,
        skc_b, skc_h, skc_s, svc_b, svc_h, svc_s,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    ):
        """One program per token (b, t): rotate its q heads and k heads, write q_rot and
        k_rot, and write k_rot and v into the caches at input_pos[t]."""
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

        # q heads -> q_rot (contiguous [B, T, HQ, 2 * HALF])
        hq = tl.arange(0, BLOCK_HQ)
        q_mask = (hq < HQ)[:, None] & d_mask[None, :]
        o1, o2 = _rotate_heads(q_ptr + b * sq_b + t * sq_t, cos1, cos2, sin1, sin2, hq, sq_h, d,
                               q_mask, HALF)
        qo = qo_ptr + (pid.to(tl.int64) * HQ + hq[:, None]) * (2 * HALF) + d[None, :]
        tl.store(qo, o1.to(qo_ptr.dtype.element_ty), mask=q_mask)
        tl.store(qo + HALF, o2.to(qo_ptr.dtype.element_ty), mask=q_mask)

        # k heads -> k_rot and the k cache; rounded to k's dtype first, as the reference does
        hk = tl.arange(0, BLOCK_HKV)
        kv_mask = (hk < HKV)[:, None] & d_mask[None, :]
        k1, k2 = _rotate_heads(k_ptr + b * sk_b + t * sk_t, cos1, cos2, sin1, sin2, hk, sk_h, d,
                               kv_mask, HALF)
        k1 = k1.to(ko_ptr.dtype.element_ty)
        k2 = k2.to(ko_ptr.dtype.element_ty)
        ko = ko_ptr + (pid.to(tl.int64) * HKV + hk[:, None]) * (2 * HALF) + d[None, :]
        tl.store(ko, k1, mask=kv_mask)
        tl.store(ko + HALF, k2, mask=kv_mask)
        cache_mask = (hk < HKV)[:, None] & cs_mask[None, :]
        kc = kc_ptr + b * skc_b + hk[:, None] * skc_h + pos * skc_s + d[None, :]
        tl.store(kc, k1.to(kc_ptr.dtype.element_ty), mask=cache_mask)
        tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty), mask=cache_mask)

        # v heads -> the v cache, unrotated
        vp = v_ptr + b * sv_b + t * sv_t + hk[:, None] * sv_h + d[None, :]
        v1 = tl.load(vp, mask=kv_mask, other=0.0)
        v2 = tl.load(vp + HALF, mask=kv_mask, other=0.0)
        vc = vc_ptr + b * svc_b + hk[:, None] * svc_h + pos * svc_s + d[None, :]
        tl.store(vc, v1.to(vc_ptr.dtype.element_ty), mask=cache_mask)
        tl.store(vc + HALF, v2.to(vc_ptr.dtype.element_ty), mask=cache_mask)


# ----------------------------------------------------------------------------- launcher
def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_kvcache_triton(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
) -> tuple[Tensor, Tensor]:
    """Triton launch of `rope_kvcache_reference`: one kernel for the whole step."""
    _check_shapes(q, k, v, cos, sin, k_cache, v_cache, input_pos)
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
    _rope_kvcache_kernel[(bsz * seq,)](
        q, k, v, cos, sin, k_cache, v_cache, input_pos, q_rot, k_rot,
        seq, hq, hkv, k_cache.shape[2], cos.shape[0],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HQ=block_hq,
        BLOCK_HKV=triton.next_power_of_2(hkv),
        num_warps=4 if heads_elems <= 2048 else 8,
    )
    return q_rot, k_rot


# ----------------------------------------------------------------------------- public op
def rope_kvcache(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
) -> tuple[Tensor, Tensor]:
    """Rotate q and k (HF rotate_half convention, float32 math) at positions input_pos, write
    rotated k and raw v into k_cache / v_cache rows 0..B-1 at those positions (in place), and
    return (q_rot, k_rot) as fresh [B, T, H, D] tensors. See the module docstring."""
    if use_triton(q, k, v, cos, sin, k_cache, v_cache, input_pos):
        return rope_kvcache_triton(q, k, v, cos, sin, k_cache, v_cache, input_pos)
    return rope_kvcache_reference(q, k, v, cos, sin, k_cache, v_cache, input_pos)


# ----------------------------------------------------------------------------- custom op
def _rope_kvcache_op(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
) -> tuple[Tensor, Tensor]:
    return rope_kvcache(q, k, v, cos, sin, k_cache, v_cache, input_pos)


def _rope_kvcache_fake(q, k, v, cos, sin, k_cache, v_cache, input_pos):
    return q.new_empty(q.shape), k.new_empty(k.shape)


rope_kvcache_op = register_op("rope_kvcache", _rope_kvcache_op, _rope_kvcache_fake,
                            mutates_args=("k_cache", "v_cache"))
