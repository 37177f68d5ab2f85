"""Attention over a static KV cache, with its epilogue fused: soft-cap, sinks, sliding window.

`attention(q, k_cache, v_cache, input_pos, scale=...)` computes, for each of the T new
query tokens at positions `input_pos` (contiguous, shared by the batch), softmax attention
over the keys already written in the cache:

- key position j is visible to a query at position p when j <= input_pos[-1] (the filled
  part of the cache), and j <= p if `causal`, and p - j < window if `window` is given
  (the last `window` positions, the query's own included, as Gemma-2 and Mistral do;
  with causal=False the window still bounds how far back a query looks);
- scores are `scale * q.k`, soft-capped as `softcap * tanh(score / softcap)` before masking;
- `sinks[h]` (gpt-oss) is one extra logit per query head that joins the softmax
  denominator and carries no value;
- query head h reads KV head h // (Hq // Hkv) (grouped-query attention).

Two Triton kernels implement it. Decoding (T == 1) uses split-KV ("flash-decoding"): the
grid is (batch, KV head, split); each program reads its slice of the context once for all
the query heads of its group, and the last split of a (row, KV head) to finish merges the
splits' partials by log-sum-exp in the same kernel (the sink enters there; a separate
reduce kernel remains for `fused_reduce=False`). Prefill (T > 1) uses a flash-attention kernel over tiles of
queries x keys. Neither reads the context length on the host: programs load input_pos
themselves, so the op can be captured in a CUDA graph and replayed at any position.

Everything runs in float32 inside (scores, softmax, accumulation); the output has q's dtype.
`attention_reference` is the plain PyTorch definition, and what runs where Triton cannot.

FP8 caches (a precision rule on `:kv_cache`): k_cache and v_cache hold float8 codes and
`k_scale`, `v_scale` (float32 [Hkv]) a scale per KV head; the keys and values are
`codes * scale[h]`. The kernels load the codes, convert them to q's dtype (exact: every
FP8 value is a bfloat16 / float16 value) and apply the scales in float32 outside the
GEMMs: the key scale joins the score scale, the value scale multiplies the accumulated
output. For the power-of-two scales `KVCache` calibrates this is exactly the GEMM on the
dequantized cache; for any other scale it differs by float32 rounding only.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from planlang.runtime.kernels.backend import gdc_functions, pdl_launch, use_triton

try:  # the module must import without triton: the reference still works then
    import triton
    import triton.language as tl

    gdc_wait, gdc_launch_dependents = gdc_functions()
    from planlang.runtime.kernels.rope_kvcache import _kv_quant
    _HAVE_TRITON = True
except Exception:  # ImportError, or a broken install raising anything
    _HAVE_TRITON = False



# --------------------------------------------------------------------------------------
# The reference: plain PyTorch, float32, explicit masks
# --------------------------------------------------------------------------------------
def attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    *,
    scale: float,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    causal: bool = True,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The definition of `attention`, in float32 torch ops over the whole cache length.
    With `k_scale`, `v_scale` [Hkv] the caches hold FP8 codes: keys are k_cache * k_scale[h],
    values v_cache * v_scale[h].

    Cache rows past the batch and positions past input_pos[-1] are never read into the
    result (they are replaced by zeros before any arithmetic), so garbage there is harmless.
    float64 inputs are computed in float64.
    """
    B, T, Hq, D = q.shape
    if q.device.type == "cpu" and input_pos.device.type == "cpu" and not torch.compiler.is_compiling():
        # On the CPU reading the last position costs no device sync: read the filled prefix
        # only (a planned model's cache is limits.max_seq_len long; decode fills a few rows).
        filled_len = int(input_pos[-1]) + 1 if input_pos.numel() else 0
        k_cache, v_cache = k_cache[:, :, :max(filled_len, 1)], v_cache[:, :, :max(filled_len, 1)]
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32

    key_pos = torch.arange(S, device=q.device)
    query_pos = input_pos.to(q.device, torch.long)
    filled = key_pos <= query_pos[-1]  # [S]; a tensor comparison: no host sync
    visible = filled[None, :].expand(T, S)  # [T, S]
    if causal:
        visible = visible & (key_pos[None, :] <= query_pos[:, None])
    if window is not None:
        visible = visible & (query_pos[:, None] - key_pos[None, :] < window)

    # Zero the unfilled positions first: NaN or inf there must not reach the matmuls.
    k = torch.where(filled[None, None, :, None], k_cache[:B].to(compute), 0.0)
    v = torch.where(filled[None, None, :, None], v_cache[:B].to(compute), 0.0)
    if k_scale is not None:
        k = k * k_scale.to(compute).view(1, Hkv, 1, 1)
        v = v * v_scale.to(compute).view(1, Hkv, 1, 1)
    k = k.repeat_interleave(group, dim=1)  # [B, Hq, S, D]: query head h reads KV head h // group
    v = v.repeat_interleave(group, dim=1)

    scores = torch.einsum("bthd,bhsd->bhts", q.to(compute), k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible[None, None], float("-inf"))
    if sinks is not None:
        sink_col = sinks.to(compute).view(1, Hq, 1, 1).expand(B, Hq, T, 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhts,bhsd->bthd", probs, v)
    return out.to(q.dtype).contiguous()


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------
if _HAVE_TRITON:

    @triton.jit
    def _tanh(y, FAST_TANH: tl.constexpr):
        if FAST_TANH:
            # The GPU's tanh instruction (one MUFU op, relative error ~2^-11), as
            # FlashAttention's soft-cap does; for 16-bit inputs only.
            return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [y],
                                             dtype=tl.float32, is_pure=True, pack=1)
        # tanh(y) = 1 - 2 / (exp(2y) + 1): exact at both ends (exp -> inf gives 1, -> 0
        # gives -1) and needs no libdevice, so it also runs under the interpreter.
        return 1.0 - 2.0 / (tl.exp2(y * 2.8853900817779268) + 1.0)

    @triton.jit
    def _scores_base2(qk, scale, softcap, HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr):
        """Raw q.k products -> scaled (and soft-capped) logits, in base-2 units for exp2.
        The scalar factors are folded so that each score costs one multiply (plus tanh)."""
        if HAS_SOFTCAP:
            return _tanh(qk * (scale / softcap), FAST_TANH) * (softcap * 1.4426950408889634)
        return qk * (scale * 1.4426950408889634)

    @triton.jit
    def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b with float32 accumulation. UPCAST is for Triton's interpreter, whose bf16
        dot is wrong (triton 3.9): products of bf16 values are exact in float32 anyway."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, sinks_ptr, part_out_ptr, part_lse_ptr, out_ptr, counter_ptr,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_od,
        scale, softcap, window, S, Hq, Hkv, min_chunk, ks_ptr, vs_ptr,
        kn_ptr, vn_ptr, cos_ptr, sin_ptr, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cos, stride_sin,
        MAX_SEQ,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr, FUSED_REDUCE: tl.constexpr,
        BLOCK_S: tl.constexpr, MERGE_S: tl.constexpr, BLOCK_GM: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, FAST_TANH: tl.constexpr,
        KV_SCALED: tl.constexpr = False, USE_PDL: tl.constexpr = False,
        ROPE: tl.constexpr = False, QUANT: tl.constexpr = 0, E5M2: tl.constexpr = False,
        FMAX: tl.constexpr = 448.0, MANT: tl.constexpr = 3, EMIN: tl.constexpr = -6,
        ROUND_IN_FP32: tl.constexpr = False,
    ):
        """One (batch row, KV head, split): all GROUP query heads over one slice of the context.
        USE_PDL: waits first for the kernel before (which writes q and the caches).

        ROPE (`rope_attention`): q_ptr holds the unrotated queries, kn_ptr / vn_ptr the new
        token's key and value ([B, 1, Hkv, D] with the given strides). Every program rotates
        its query heads (HF rotate_half, float32, rounded to q's dtype as `rope_kvcache`
        rounds q_rot); the program whose slice holds the query's own position rotates the
        key, writes it (QUANT 1: as FP8 codes over ks_ptr's scales) and the value into the
        caches at that position, and synchronizes its threads before reading its slice. No
        other program reads that position, so no other ordering is needed.

        The slice is computed on the device from input_pos: the visible range [lo, hi) is cut
        into at most NUM_SPLITS chunks of whole blocks. Without FUSED_REDUCE a program whose
        chunk is empty writes an empty partial (lse = -inf) for the reduce kernel. With
        FUSED_REDUCE, chunks hold at least `min_chunk` keys, so a short context uses few
        splits (one: that program writes the output, no partials); the splits past the
        active ones do nothing, and the last active split to finish (a per-(row, KV head)
        arrival counter, reset by that program) merges the partials: no second launch.
        The merge reads every partial log-sum-exp at once ([BLOCK_S splits, BLOCK_GM heads]),
        then the partial outputs MERGE_S splits at a time: its L2 round trips are
        cdiv(n_active, MERGE_S) + 1, not one per split (the merge is the program's serial tail).
        """
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        pos = tl.load(pos_ptr).to(tl.int32)  # the single query's position (T == 1)
        hi = tl.minimum(pos + 1, S)
        lo = pos * 0
        if HAS_WINDOW:
            lo = tl.maximum(pos - window + 1, 0)
        chunk = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        if FUSED_REDUCE:
            chunk = tl.maximum(chunk, min_chunk)  # min_chunk: a multiple of BLOCK_N
        n_active = tl.cdiv(hi - lo, chunk)  # >= 1: the query's own key is always visible
        start = lo + split * chunk
        stop = tl.minimum(start + chunk, hi)  # start >= stop for the idle splits: no loop trips

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP + offs_g
        g_ok = offs_g < GROUP
        d_ok = offs_d < HEAD_DIM  # a constexpr bound: the K/V loads stay vectorized and pipelined

        q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head * stride_vh
        if ROPE:
            HALF: tl.constexpr = HEAD_DIM // 2
            # rotate_half(x)[d] = sign[d] * x[partner[d]]: -x[d + HALF] below HALF, x[d - HALF] above
            partner = (offs_d + HALF) % HEAD_DIM
            sign = tl.where(offs_d < HALF, -1.0, 1.0)
            pos_vec = tl.zeros([BLOCK_D], dtype=tl.int32) + pos
            in_range = (pos_vec >= 0) & (pos_vec < S) & (pos_vec < MAX_SEQ)  # else: zeros, no write
            cs_ok = d_ok & in_range
            cos = tl.load(cos_ptr + pos.to(tl.int64) * stride_cos + offs_d, mask=cs_ok, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + pos.to(tl.int64) * stride_sin + offs_d, mask=cs_ok, other=0.0).to(tl.float32)
            q_pair = tl.load(q_rows + partner[None, :] * stride_qd, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
            q = (q.to(tl.float32) * cos[None, :] + (sign[None, :] * q_pair.to(tl.float32)) * sin[None, :]
                 ).to(q_ptr.dtype.element_ty)
            if split == n_active - 1:  # the slice holding the query's own position
                kn = kn_ptr + b * stride_knb + kv_head * stride_knh
                kx = tl.load(kn + offs_d, mask=d_ok, other=0.0)
                k_pair = tl.load(kn + partner, mask=d_ok, other=0.0)
                k_rot = (kx.to(tl.float32) * cos + (sign * k_pair.to(tl.float32)) * sin).to(kn_ptr.dtype.element_ty)
                vx = tl.load(vn_ptr + b * stride_vnb + kv_head * stride_vnh + offs_d, mask=d_ok, other=0.0)
                if QUANT != 0:
                    k_rot = _kv_quant(k_rot.to(tl.float32), tl.load(ks_ptr + kv_head).to(tl.float32), QUANT, E5M2,
                                      FMAX, MANT, EMIN, ROUND_IN_FP32)
                    vx = _kv_quant(vx.to(tl.float32), tl.load(vs_ptr + kv_head).to(tl.float32), QUANT, E5M2,
                                   FMAX, MANT, EMIN, ROUND_IN_FP32)
                w_ok = d_ok & in_range
                tl.store(k_base + pos * stride_ks + offs_d * stride_kd, k_rot.to(k_ptr.dtype.element_ty), mask=w_ok)
                tl.store(v_base + pos * stride_vs + offs_d * stride_vd, vx.to(v_ptr.dtype.element_ty), mask=w_ok)
                tl.debug_barrier()  # the slice below reads this position back
        if KV_SCALED:  # FP8 cache: the key scale joins the score scale
            scale = scale * tl.load(ks_ptr + kv_head).to(tl.float32)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, stop, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < stop
            k_t = tl.load(  # [BLOCK_D, BLOCK_N]: K transposed for q @ K^T
                k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                mask=n_ok[None, :] & d_ok[:, None], other=0.0,
            )
            if KV_SCALED:
                k_t = k_t.to(q.dtype)  # FP8 codes: exact in q's dtype
            s = _scores_base2(_mma(q, k_t, DOT_PRECISION, DOT_UPCAST), scale, softcap, HAS_SOFTCAP, FAST_TANH)
            s = tl.where(n_ok[None, :], s, float("-inf"))
            # Every block holds at least one visible key (n0 < stop), so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0,
            )
            if KV_SCALED:
                v = v.to(q.dtype)
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
            m_i = m_new
        if KV_SCALED:  # every key of this program's slice belongs to one KV head
            acc = acc * tl.load(vs_ptr + kv_head).to(tl.float32)

        if FUSED_REDUCE:
            out_rows = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
            gd_ok = g_ok[:, None] & d_ok[None, :]
            if n_active == 1:
                if split == 0:
                    out = _decode_finish(acc, m_i, l_i, sinks_ptr, heads, g_ok, HAS_SINKS)
                    tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=gd_ok)
            else:
                if split < n_active:
                    row = (b * Hq + heads) * NUM_SPLITS + split  # partials are [B, Hq, NUM_SPLITS, (D)]
                    out = acc / l_i[:, None]  # an active split holds >= 1 visible key: l_i > 0
                    tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=g_ok)
                    tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=gd_ok)
                    # Every thread's partial stores come before the arrival (release, GPU scope).
                    tl.debug_barrier()
                    counter = counter_ptr + b * Hkv + kv_head
                    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
                    if arrived == n_active - 1:  # the last to arrive: all partials are written
                        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch
                        _decode_merge(part_out_ptr, part_lse_ptr, sinks_ptr, out_ptr, b, kv_head, n_active,
                                      stride_ob, stride_oh, stride_od, Hq, HEAD_DIM, GROUP, NUM_SPLITS,
                                      BLOCK_S, MERGE_S, BLOCK_GM, BLOCK_D, HAS_SINKS)
        elif NUM_SPLITS == 1:
            # The only split: apply the sink and write the output directly, no reduce launch.
            out = _decode_finish(acc, m_i, l_i, sinks_ptr, heads, g_ok, HAS_SINKS)
            tl.store(
                out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :],
            )
        else:
            nonempty = l_i > 0.0
            out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            row = (b * Hq + heads) * NUM_SPLITS + split  # partials are [B, Hq, NUM_SPLITS, (D)]
            tl.store(part_lse_ptr + row, lse, mask=g_ok)
            tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _decode_finish(acc, m_i, l_i, sinks_ptr, heads, g_ok, HAS_SINKS: tl.constexpr):
        """acc / l_i with the sink joining the denominator: the finished output rows (float32)."""
        denom = l_i
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + heads, mask=g_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            m_all = tl.maximum(m_i, sink)
            acc = acc * tl.exp2(m_i - m_all)[:, None]
            denom = l_i * tl.exp2(m_i - m_all) + tl.exp2(sink - m_all)
        return acc / tl.where(g_ok, denom, 1.0)[:, None]  # padding heads: 0, never stored

    @triton.jit
    def _decode_merge(part_out_ptr, part_lse_ptr, sinks_ptr, out_ptr, b, kv_head, n_active,
                      stride_ob, stride_oh, stride_od, Hq,
                      HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      BLOCK_S: tl.constexpr, MERGE_S: tl.constexpr, BLOCK_GM: tl.constexpr,
                      BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr):
        """The fused reduce: the n_active partials of one (batch row, KV head) merged by
        log-sum-exp and written as the GROUP heads' outputs. First every partial lse
        ([BLOCK_S, BLOCK_GM], one load), their maximum and the denominator; then the partial
        outputs in [MERGE_S, BLOCK_GM, BLOCK_D] tiles, each weighted by exp2(lse - max).
        Loads bypass L1 (.cg): the other programs' stores landed in L2."""
        offs_g = tl.arange(0, BLOCK_GM)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP + offs_g
        g_ok = offs_g < GROUP
        d_ok = offs_d < HEAD_DIM
        first = (b * Hq + heads) * NUM_SPLITS  # partials are [B, Hq, NUM_SPLITS, (D)]
        offs_s = tl.arange(0, BLOCK_S)
        sg_ok = (offs_s[:, None] < n_active) & g_ok[None, :]
        lse = tl.load(part_lse_ptr + first[None, :] + offs_s[:, None], mask=sg_ok, other=float("-inf"),
                      cache_modifier=".cg")
        m_all = tl.max(lse, axis=0)  # finite for real heads: every active split holds a visible key
        m_all = tl.where(g_ok, m_all, 0.0)
        l_all = tl.sum(tl.exp2(lse - m_all[None, :]), axis=0)  # inactive splits: exp2(-inf) = 0
        acc = tl.zeros([BLOCK_GM, BLOCK_D], tl.float32)
        offs_c = tl.arange(0, MERGE_S)
        for s0 in range(0, n_active, MERGE_S):
            s_idx = s0 + offs_c
            cg_ok = (s_idx[:, None] < n_active) & g_ok[None, :]  # [MERGE_S, BLOCK_GM]
            row = first[None, :] + s_idx[:, None]
            w = tl.exp2(tl.load(part_lse_ptr + row, mask=cg_ok, other=float("-inf"), cache_modifier=".cg")
                        - m_all[None, :])
            part = tl.load(part_out_ptr + row[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                           mask=cg_ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
            acc += tl.sum(part * w[:, :, None], axis=0)
        out = _decode_finish(acc, m_all, l_all, sinks_ptr, heads, g_ok, HAS_SINKS)
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _decode_reduce_kernel(
        part_out_ptr, part_lse_ptr, sinks_ptr, out_ptr,
        stride_ob, stride_oh, stride_od, Hq,
        HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_SINKS: tl.constexpr,
    ):
        """One (batch row, query head): merge the splits' partial outputs by log-sum-exp."""
        bh = tl.program_id(0)
        b = bh // Hq
        h = bh % Hq
        offs_s = tl.arange(0, BLOCK_SPLITS)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < NUM_SPLITS
        d_ok = offs_d < HEAD_DIM

        lse = tl.load(part_lse_ptr + bh * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
        m_all = tl.max(lse, axis=0)  # finite: the split holding the query's own key is never empty
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
            m_all = tl.maximum(m_all, sink)
        w = tl.exp2(lse - m_all)  # empty splits weigh exp2(-inf) = 0
        denom = tl.sum(w, axis=0)
        if HAS_SINKS:
            denom += tl.exp2(sink - m_all)
        parts = tl.load(
            part_out_ptr + (bh * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=s_ok[:, None] & d_ok[None, :], other=0.0,
        )
        out = tl.sum(parts * w[:, None], axis=0) / denom
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, sinks_ptr, out_ptr,
        stride_qb, stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_ot, stride_oh, stride_od,
        scale, softcap, window, S, T, Hq, ks_ptr, vs_ptr,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, FAST_TANH: tl.constexpr,
        KV_SCALED: tl.constexpr = False,
    ):
        """One (block of BLOCK_M queries, batch row x query head): flash attention over the cache."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        kv_head = h // GROUP

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < T
        d_ok = offs_d < HEAD_DIM  # a constexpr bound: the K/V loads stay vectorized and pipelined
        q_pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=0).to(tl.int32)
        filled = tl.load(pos_ptr + T - 1).to(tl.int32) + 1  # keys 0..input_pos[-1] are in the cache

        # The keys any query of this block can see: [lo, hi), cut to whole blocks.
        hi = tl.minimum(filled, S)
        if CAUSAL:
            hi = tl.minimum(tl.max(tl.where(m_ok, q_pos, 0), axis=0) + 1, hi)
        lo = hi * 0
        if HAS_WINDOW:
            first = tl.min(tl.where(m_ok, q_pos, 2147483647), axis=0)
            lo = (tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N

        q = tl.load(
            q_ptr + b * stride_qb + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
            mask=m_ok[:, None] & d_ok[None, :], other=0.0,
        )
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head * stride_vh
        if KV_SCALED:  # FP8 cache: the key scale joins the score scale
            scale = scale * tl.load(ks_ptr + kv_head).to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            k_t = tl.load(
                k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                mask=n_ok[None, :] & d_ok[:, None], other=0.0,
            )
            if KV_SCALED:
                k_t = k_t.to(q.dtype)  # FP8 codes: exact in q's dtype
            s = _scores_base2(_mma(q, k_t, DOT_PRECISION, DOT_UPCAST), scale, softcap, HAS_SOFTCAP, FAST_TANH)
            visible = n_ok[None, :] & m_ok[:, None]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (q_pos[:, None] - offs_n[None, :] < window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row may see nothing in this block (window, causal edge, padding row):
            # shift by 0 instead of -inf so exp2 gives 0 and never NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0,
            )
            if KV_SCALED:
                v = v.to(q.dtype)
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
            m_i = m_new

        if KV_SCALED:
            acc = acc * tl.load(vs_ptr + kv_head).to(tl.float32)
        denom = l_i
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
            m_all = tl.maximum(m_i, sink)
            acc = acc * tl.exp2(m_i - m_all)[:, None]
            denom = l_i * tl.exp2(m_i - m_all) + tl.exp2(sink - m_all)
        out = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]  # padding rows: 0, not NaN (never stored)
        tl.store(
            out_ptr + b * stride_ob + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
        )


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(batch: int, kv_heads: int, cache_len: int, block_n: int, device: torch.device,
                      waves: float = 2.0) -> int:
    """The most KV splits a decode launch may use: enough programs to fill the GPU about
    `waves` times over a long context, never more splits than the cache has blocks. Depends
    only on shapes, so it is fixed inside a captured CUDA graph; how many splits actually
    work is decided on the device from the context length (see `min_chunk`)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    wanted = math.ceil(waves * sms / max(batch * kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(cache_len, block_n), 64))


_COUNTERS: dict = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (batch row, KV head), kept per device: the decode
    kernel's last split resets its counter, so they are zero again after every launch
    (also inside a replayed CUDA graph). Launches on two streams at once must not share
    them: decode launches are assumed to run on one stream per device."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise go through TF32 tensor cores (10-bit mantissa).
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_common(q, k_cache, scale, softcap, window, sinks, k_scale, v_scale) -> dict:
    """The launch arguments both kernels share (shapes, epilogue flags, FP8 scales)."""
    Hq, D = q.shape[2], q.shape[3]
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    return dict(
        scale=float(scale),
        softcap=float(softcap) if softcap is not None else 1.0,
        window=int(window) if window is not None else 0,
        S=S, Hq=Hq, HEAD_DIM=D, GROUP=Hq // Hkv, BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None,
        ks_ptr=k_scale if k_scale is not None else q, vs_ptr=v_scale if v_scale is not None else q,
        KV_SCALED=k_scale is not None,
    )


def attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    *,
    scale: float,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    causal: bool = True,
    block_n: Optional[int] = None,
    block_m: Optional[int] = None,
    num_splits: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    min_chunk: Optional[int] = None,
    fused_reduce: bool = True,
    waves: Optional[float] = None,
    merge_splits: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the Triton kernels (decode for T == 1, prefill otherwise); returns `out`
    ([B, T, Hq, D], any strides; allocated when not given).

    The keyword tuning knobs (`block_n`, `block_m`, `num_splits`, `num_warps`,
    `num_stages`; for decode `min_chunk`, `fused_reduce`, `waves`, `merge_splits`) exist for benchmarks and
    tests; left out, shape-based defaults apply.
    """
    B, T, Hq, D = q.shape
    if out is None:
        out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    common = decode_common(q, k_cache, scale, softcap, window, sinks, k_scale, v_scale)
    sinks_arg = sinks if sinks is not None else q  # never read when HAS_SINKS is False
    if T == 1:
        _launch_decode(q, k_cache, v_cache, input_pos, sinks_arg, out, common,
                       block_n, num_splits, num_warps, num_stages, min_chunk, fused_reduce, waves,
                       merge_splits=merge_splits)
    else:
        _launch_prefill(q, k_cache, v_cache, input_pos, sinks_arg, out, common, causal,
                        block_m, block_n, num_warps, num_stages)
    return out


def _NO_ROPE(q):
    """The ROPE arguments of a plain decode launch (never read)."""
    return dict(kn_ptr=q, vn_ptr=q, cos_ptr=q, sin_ptr=q, stride_knb=0, stride_knh=0, stride_vnb=0, stride_vnh=0,
                stride_cos=0, stride_sin=0, MAX_SEQ=0)


def merge_tile(splits: int, group: int, block_d: int, num_warps: int, merge_splits: Optional[int] = None) -> dict:
    """The fused reduce's tile constexprs: BLOCK_S (every split's lse in one load), BLOCK_GM
    (the group's heads) and MERGE_S, the splits whose partial outputs one step of the merge
    loads: as many as about 32 float32 values a thread allow (4 warps, head dim 64, group 4:
    16 splits, so Llama-1B's up to 16 working splits merge in one step). `merge_splits`
    overrides it (benchmarks; 1 is one split a step)."""
    block_s = triton.next_power_of_2(max(splits, 1))
    block_gm = triton.next_power_of_2(max(group, 1))
    if merge_splits is None:
        room = max(1, (32 * 32 * num_warps) // (block_gm * block_d))
        merge_splits = 1 << (room.bit_length() - 1)  # a power of two, at most `room`
    return dict(BLOCK_S=block_s, BLOCK_GM=block_gm,
                MERGE_S=min(block_s, triton.next_power_of_2(max(int(merge_splits), 1))))


def _launch_decode(q, k_cache, v_cache, input_pos, sinks, out, common, block_n, num_splits, num_warps, num_stages,
                   min_chunk=None, fused_reduce=True, waves=None, rope=None, merge_splits=None):
    """The decode launch; `rope` (from `rope_attention`): the kernel's ROPE arguments."""
    B, _, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    half = q.dtype != torch.float32  # float32 tiles are twice the bytes: smaller, fewer stages
    block_n = block_n or (128 if half else 64)  # swept on H100 (bf16, D=64): 128 keys, 4 warps, 3 stages
    splits = num_splits or decode_num_splits(B, Hkv, S, block_n, q.device, waves or 2.0)
    # Each working split reads at least min_chunk keys: a short context uses one split and
    # no partials (the split loop's fixed costs outweigh the parallelism below ~256 keys).
    min_chunk = triton.cdiv(min_chunk or 256, block_n) * block_n
    # The partials are small (B * Hq * splits * D floats); with one split they are not used.
    part_out = torch.empty((B, Hq, splits, D) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, Hq, splits) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    counters = _arrival_counters(q.device, B * Hkv) if fused_reduce and splits > 1 else part_lse
    num_warps = num_warps or 4
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, input_pos, sinks, part_out, part_lse, out, counters,
        q.stride(0), q.stride(2), q.stride(3),
        *k_cache.stride(), *v_cache.stride(),
        out.stride(0), out.stride(2), out.stride(3),
        Hkv=Hkv, min_chunk=min_chunk, **(rope or _NO_ROPE(q)),
        NUM_SPLITS=splits, FUSED_REDUCE=fused_reduce and splits > 1,
        **merge_tile(splits, group, common["BLOCK_D"], num_warps, merge_splits),
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), DOT_UPCAST=q.device.type != "cuda",
        FAST_TANH=q.device.type == "cuda" and q.dtype != torch.float32,
        num_warps=num_warps, num_stages=num_stages or (3 if half else 2),
        **common, **pdl_launch(q.device),
    )
    if splits > 1 and not fused_reduce:
        _decode_reduce_kernel[(B * Hq,)](
            part_out, part_lse, sinks, out,
            out.stride(0), out.stride(2), out.stride(3), Hq,
            HEAD_DIM=D, NUM_SPLITS=splits, BLOCK_SPLITS=triton.next_power_of_2(splits),
            BLOCK_D=common["BLOCK_D"], HAS_SINKS=common["HAS_SINKS"],
            num_warps=1 if D <= 64 else 2,
        )


def prefill_config(T: int, D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for a prefill launch. Register and shared
    memory use checked offline for sm_90 (no spills); speed to be confirmed by
    benchmarks/bench_kernels_b.py --sweep."""
    if dtype == torch.float32:
        return 32, 32, 4, 2  # float32 tiles are twice the bytes: larger ones spill
    if T < 128:
        return (16 if T <= 16 else 64), 64, 4, 2
    if D <= 64:
        return 64, 64, 4, 3  # H100 sweep, bf16 D=64 T=2048: 77 us against 91 for (128, 64, 8, 3)
    return 128, 64, 8, 2


def _launch_prefill(q, k_cache, v_cache, input_pos, sinks, out, common, causal, block_m, block_n, num_warps, num_stages):
    B, T, Hq, D = q.shape
    default_m, default_n, default_warps, default_stages = prefill_config(T, D, q.dtype)
    block_m, block_n = block_m or default_m, block_n or default_n
    num_warps, num_stages = num_warps or default_warps, num_stages or default_stages
    grid = (triton.cdiv(T, block_m), B * Hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, input_pos, sinks, out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        T=T, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), DOT_UPCAST=q.device.type != "cuda",
        FAST_TANH=q.device.type == "cuda" and q.dtype != torch.float32,
        num_warps=num_warps, num_stages=num_stages,
        **common,
    )


# --------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _check_shapes(q, k_cache, v_cache, input_pos, sinks, window, k_scale=None, v_scale=None):
    """Shape errors that would otherwise read out of bounds (host metadata only: no sync)."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"attention wants q [B, T, Hq, D] and caches [Bmax, Hkv, S, D] of one shape; "
            f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    B, T, Hq, D = q.shape
    Bmax, Hkv, S, Dk = k_cache.shape
    if Dk != D or B > Bmax or Hq % Hkv != 0:
        raise ValueError(
            f"attention: q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} "
            f"(head dim must match, batch <= cache rows, query heads a multiple of KV heads)")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("attention: pass both k_scale and v_scale (FP8 caches), or neither")
    if k_cache.dtype in _FP8_DTYPES:
        if k_scale is None or v_cache.dtype != k_cache.dtype:
            raise ValueError(f"attention: an FP8 cache ({k_cache.dtype}, {v_cache.dtype}) needs k_scale and v_scale "
                             f"(float32 [Hkv], a scale per KV head) and both caches in one format")
        for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
            if sc.shape != (Hkv,) or not sc.is_floating_point():
                raise ValueError(f"attention: {name} must be a float tensor [Hkv={Hkv}], "
                                 f"got {sc.dtype} {tuple(sc.shape)}")
    elif k_scale is not None:
        raise ValueError(f"attention: k_scale/v_scale are for FP8 caches; these are {k_cache.dtype}")
    elif not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"attention: q and the caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if input_pos.dim() != 1 or input_pos.numel() != T:
        raise ValueError(f"attention: input_pos must be a 1-D tensor of T={T} positions, got {tuple(input_pos.shape)}")
    if sinks is not None and sinks.numel() != Hq:
        raise ValueError(f"attention: sinks must hold one logit per query head ({Hq}), got {tuple(sinks.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1, got {window}")


def _attention_impl(q, k_cache, v_cache, input_pos, scale, softcap, sinks, window, causal,
                    k_scale=None, v_scale=None):
    kwargs = dict(scale=scale, softcap=softcap, sinks=sinks, window=window, causal=causal,
                  k_scale=k_scale, v_scale=v_scale)
    if _HAVE_TRITON and use_triton(q, k_cache, v_cache, input_pos):
        return attention_triton(q, k_cache, v_cache, input_pos, **kwargs)
    return attention_reference(q, k_cache, v_cache, input_pos, **kwargs)


@torch.library.custom_op("planlang::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    scale: float,
    softcap: Optional[float],
    sinks: Optional[torch.Tensor],
    window: Optional[int],
    causal: bool,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _attention_impl(q, k_cache, v_cache, input_pos, scale, softcap, sinks, window, causal, k_scale, v_scale)


@_attention_op.register_fake
def _attention_fake(q, k_cache, v_cache, input_pos, scale, softcap, sinks, window, causal, k_scale=None,
                    v_scale=None):
    return q.new_empty(q.shape)  # contiguous, q's dtype: what both implementations return


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    *,
    scale: float,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    causal: bool = True,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of T new queries over a static KV cache; returns [B, T, Hq, D] in q's dtype.

    q: [B, T, Hq, D] rotated queries at positions input_pos (LongTensor[T] on q's device,
    contiguous positions shared by the batch). k_cache, v_cache: [Bmax, Hkv, S, D], rows
    0..B-1 filled for positions 0..input_pos[-1]; everything else may hold garbage.
    See the module docstring for the masks, soft-cap and sinks. FP8 caches (float8_e4m3fn or
    float8_e5m2) need `k_scale` and `v_scale`, float32 [Hkv]: keys are k_cache * k_scale[h],
    values v_cache * v_scale[h]. Runs the Triton kernels on CUDA (or under TRITON_INTERPRET=1), the float32 reference elsewhere; goes through the
    custom op `torch.ops.planlang.attention`, so it survives torch.compile and CUDA-graph
    capture (it never syncs with the host).
    """
    _check_shapes(q, k_cache, v_cache, input_pos, sinks, window, k_scale, v_scale)
    return torch.ops.planlang.attention(
        q, k_cache, v_cache, input_pos, float(scale),
        None if softcap is None else float(softcap), sinks,
        None if window is None else int(window), bool(causal), k_scale, v_scale,
    )
