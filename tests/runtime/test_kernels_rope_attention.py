"""Rotary embedding + cache write + decode attention in one kernel (`planlang::rope_attention`).

The op is defined as `rope_kvcache` then `attention`. Its one-kernel decode path is checked
against that pair run apart (the planlang ops, on twin caches) and against a float64
rotation + attention, with per-dtype tolerances: the output, and every cache entry (the new
position written as the pair writes it, everything else untouched). Caches start as random
context with NaN past it; outputs the op allocates start as NaN (poisoned). Contexts long
enough for several KV splits check that only the split holding the new position writes it
and still reads it back. Without CUDA the kernels run under Triton's interpreter.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # tests/conftest.py does the same; harmless twice
    os.environ.setdefault("TRITON_INTERPRET", "1")

from planlang.runtime.kernels import attention as attn_mod  # noqa: E402
from planlang.runtime.kernels import rope_attention as ra  # noqa: E402
from planlang.runtime.kernels import rope_kvcache as rope_mod  # noqa: E402
from tests.runtime.test_kernels_rope import (DEVICE, needs_cuda, needs_triton, poisoned, rope_tables,  # noqa: E402,F401
                                             rotate64)

gpu = pytest.mark.gpu
# dtype -> (relative error vs float64, rtol/atol vs the pair of ops in the same dtype)
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}
E4M3 = torch.float8_e4m3fn


def make(b, hq, hkv, d, dtype, s, pos, cache_dtype=None, bmax=None):
    """One decode step: q, k, v as views of one projection, tables, caches holding random
    context below `pos` and NaN from it on (only the op may write `pos`)."""
    fused = torch.randn(b, 1, (hq + 2 * hkv) * d, device=DEVICE).to(dtype)
    q = fused[..., : hq * d].view(b, 1, hq, d)
    k = fused[..., hq * d: (hq + hkv) * d].view(b, 1, hkv, d)
    v = fused[..., (hq + hkv) * d:].view(b, 1, hkv, d)
    cos, sin = rope_tables(s + 3, d)
    bmax = bmax or b
    caches = []
    for _ in range(2):
        c = torch.randn(bmax, hkv, s, d, device=DEVICE)
        c[:, :, pos:] = float("nan")
        caches.append(c.to(cache_dtype or dtype))
    return q, k, v, cos, sin, caches[0], caches[1], torch.tensor([pos], device=DEVICE)


def attend64(q, kc, vc, pos, scale, softcap=None, window=None):
    """Float64 decode attention of q [B, 1, Hq, D] over cache rows 0..pos (GQA)."""
    b, _, hq, d = q.shape
    k = kc[:b, :, : pos + 1].double().repeat_interleave(hq // kc.shape[1], dim=1)
    v = vc[:b, :, : pos + 1].double().repeat_interleave(hq // kc.shape[1], dim=1)
    s = torch.einsum("bhd,bhsd->bhs", q[:, 0].double(), k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if window is not None:
        s[..., : max(pos - window + 1, 0)] = float("-inf")
    return torch.einsum("bhs,bhsd->bhd", torch.softmax(s, -1), v)[:, None]


def run_pair(q, k, v, cos, sin, kc, vc, pos, **kw):
    """The definition: the planlang rope_kvcache op, then the planlang attention op."""
    q_rot, _ = rope_mod.rope_kvcache(q, k, v, cos, sin, kc, vc, pos, kw.get("rope_k_scale"), kw.get("rope_v_scale"),
                                     kw.get("kv_format", ""))
    return attn_mod.attention(q_rot, kc, vc, pos, scale=kw["scale"], softcap=kw.get("softcap"),
                              sinks=kw.get("sinks"), window=kw.get("window"), k_scale=kw.get("k_scale"),
                              v_scale=kw.get("v_scale"))


def run_fused(q, k, v, cos, sin, kc, vc, pos, **kw):
    return ra.rope_attention(q, k, v, cos, sin, kc, vc, pos, kw.get("rope_k_scale"), kw.get("rope_v_scale"),
                             kw.get("kv_format", ""), kw["scale"], kw.get("softcap"), kw.get("sinks"),
                             kw.get("window"), True, kw.get("k_scale"), kw.get("v_scale"))


def refuse_rope_kernel(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the rope kernel ran: the attention kernel should rotate and write itself")
    monkeypatch.setattr(rope_mod, "rope_kvcache_triton", refuse)


def same_nan_pattern_and_close(a, b, rtol, atol):
    assert torch.equal(a.isnan(), b.isnan()), "the fused kernel wrote where the pair did not (or missed a write)"
    torch.testing.assert_close(torch.nan_to_num(a.float()), torch.nan_to_num(b.float()), rtol=rtol, atol=atol)


CASES = [  # b, hq, hkv, d, s, pos, extra options
    (1, 4, 1, 16, 40, 7, {}),
    (2, 8, 2, 32, 80, 79, {"softcap": 5.0}),
    (3, 4, 2, 16, 600, 555, {}),                 # several KV splits: only the last writes pos
    (2, 4, 4, 16, 600, 300, {"window": 64}),     # sliding window, MHA
    (1, 6, 2, 16, 50, 20, {"sinks": True}),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[1]}/{c[2]}d{c[3]}s{c[4]}p{c[5]}")
def test_one_kernel_matches_rope_then_attention(monkeypatch, poisoned, dtype, case):
    b, hq, hkv, d, s, pos, extra = case
    q, k, v, cos, sin, kc, vc, p = make(b, hq, hkv, d, dtype, s, pos, bmax=b + 1)
    kw = dict(scale=d ** -0.5, **{k_: v_ for k_, v_ in extra.items() if k_ != "sinks"})
    if extra.get("sinks"):
        kw["sinks"] = torch.randn(hq, device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()
    ref = run_pair(q, k, v, cos, sin, kc2, vc2, p, **kw)
    refuse_rope_kernel(monkeypatch)
    out = run_fused(q, k, v, cos, sin, kc, vc, p, **kw)
    rel64, tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    same_nan_pattern_and_close(kc, kc2, tol, tol)
    same_nan_pattern_and_close(vc, vc2, 0, 0)  # v is copied, not computed: exact
    # against float64: the rotation and attention of the same inputs
    k64 = rotate64(k, cos, sin, p)
    assert (kc[:b, :, pos].double() - k64[:, 0]).norm() <= rel64 * k64.norm()
    if not extra.get("sinks"):
        kc64 = kc.double().clone()
        kc64[:b, :, pos] = k64[:, 0]
        ref64 = attend64(rotate64(q, cos, sin, p), kc64, vc.double(), pos, kw["scale"], kw.get("softcap"),
                         kw.get("window"))
        assert (out.double() - ref64).norm() <= 2 * rel64 * ref64.norm() + 1e-6


@needs_triton
@pytest.mark.parametrize("cache_dtype,fmt", [(E4M3, ""), (torch.bfloat16, "fp8_e4m3")])
def test_one_kernel_writes_fp8_caches_as_rope_kvcache_does(monkeypatch, poisoned, cache_dtype, fmt):
    """A stored FP8 cache (codes, scales read by attention) and an emulated one (codes times
    the scale, in bf16): the same cache bytes as the pair, and the same output."""
    b, hq, hkv, d, s, pos = 2, 4, 2, 16, 48, 30
    q, k, v, cos, sin, _, _, p = make(b, hq, hkv, d, torch.bfloat16, s, pos)
    ks = torch.tensor([0.25, 0.5], device=DEVICE)
    vs = torch.tensor([0.125, 1.0], device=DEVICE)
    ctx_k = torch.randn(b, hkv, s, d, device=DEVICE)
    ctx_v = torch.randn(b, hkv, s, d, device=DEVICE)
    kc = rope_mod.kv_quantize(ctx_k, ks, "fp8_e4m3", cache_dtype)
    vc = rope_mod.kv_quantize(ctx_v, vs, "fp8_e4m3", cache_dtype)
    kw = dict(scale=d ** -0.5, rope_k_scale=ks, rope_v_scale=vs, kv_format=fmt)
    if cache_dtype == E4M3:
        kw.update(k_scale=ks, v_scale=vs)
    kc2, vc2 = kc.clone(), vc.clone()
    ref = run_pair(q, k, v, cos, sin, kc2, vc2, p, **kw)
    refuse_rope_kernel(monkeypatch)
    out = run_fused(q, k, v, cos, sin, kc, vc, p, **kw)
    assert torch.equal(vc.view(torch.uint8) if cache_dtype == E4M3 else vc,
                       vc2.view(torch.uint8) if cache_dtype == E4M3 else vc2)
    moved = (kc.float() != kc2.float()).sum().item()  # the rotation's float32 order may move a code
    assert moved <= 2, f"{moved} key codes differ from the pair's"
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)


@needs_triton
def test_prefill_and_the_switch_run_the_two_kernels(monkeypatch, poisoned):
    """T > 1, or PLANLANG_ROPE_ATTENTION=0: exactly the pair's kernels and results."""
    calls = []
    real = rope_mod.rope_kvcache_triton

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(rope_mod, "rope_kvcache_triton", counting)
    q, k, v, cos, sin, kc, vc, p = make(1, 4, 2, 16, torch.float32, 32, 9)
    kc2, vc2 = kc.clone(), vc.clone()
    monkeypatch.setenv(ra.FUSE_ENV, "0")
    out = run_fused(q, k, v, cos, sin, kc, vc, p, scale=0.25)
    ref = run_pair(q, k, v, cos, sin, kc2, vc2, p, scale=0.25)
    assert len(calls) == 2 and torch.equal(out, ref)
    assert torch.equal(kc.isnan(), kc2.isnan()) and torch.equal(torch.nan_to_num(kc), torch.nan_to_num(kc2))
    monkeypatch.setenv(ra.FUSE_ENV, "maybe")
    with pytest.raises(ValueError, match="PLANLANG_ROPE_ATTENTION.*hint"):
        run_fused(q, k, v, cos, sin, kc, vc, p, scale=0.25)


def test_reference_is_the_pair_of_references():
    q, k, v, cos, sin, kc, vc, p = make(2, 4, 2, 8, torch.float32, 16, 5)
    kc2, vc2 = kc.clone(), vc.clone()
    out = ra.rope_attention_reference(q, k, v, cos, sin, kc, vc, p, scale=0.3)
    q_rot, _ = rope_mod.rope_kvcache_reference(q, k, v, cos, sin, kc2, vc2, p)
    ref = attn_mod.attention_reference(q_rot, kc2, vc2, p, scale=0.3)
    assert torch.equal(out, ref) and torch.equal(kc.nan_to_num(), kc2.nan_to_num())


def test_op_passes_opcheck():
    q, k, v, cos, sin, kc, vc, p = make(1, 4, 2, 8, torch.float32, 16, 5)
    torch.library.opcheck(torch.ops.planlang.rope_attention.default,
                          (q, k, v, cos, sin, kc, vc, p, None, None, "", 0.3, None, None, None, True),
                          test_utils=("test_schema", "test_faketensor"))


@gpu
@needs_cuda
@pytest.mark.parametrize("b,pos", [(1, 127), (1, 4000), (16, 1000)])
def test_gpu_one_kernel_at_llama_1b_shapes(monkeypatch, poisoned, b, pos):
    q, k, v, cos, sin, kc, vc, p = make(b, 32, 8, 64, torch.bfloat16, 4096, pos, bmax=b)
    kc2, vc2 = kc.clone(), vc.clone()
    ref = run_pair(q, k, v, cos, sin, kc2, vc2, p, scale=0.125)
    refuse_rope_kernel(monkeypatch)
    out = run_fused(q, k, v, cos, sin, kc, vc, p, scale=0.125)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    same_nan_pattern_and_close(kc, kc2, 2e-2, 2e-2)
    same_nan_pattern_and_close(vc, vc2, 0, 0)


@needs_triton
@pytest.mark.parametrize("name", ["llama-tiny", "gemma2-tiny", "sinks-tiny"])
def test_planned_model_decodes_with_the_one_kernel(monkeypatch, name):
    """apply merges every layer's rope_kvcache into its attention: decode steps run without
    the rope kernel (refused after prefill) and match the unplanned twin (float32)."""
    from planlang.plan import Plan
    from planlang.runtime.apply import apply
    from planlang.runtime.models.registry import build_builtin
    plan, diags = Plan.from_document({"planlang": 1, "fusions": ["qkv", "rope_kvcache", "attention"]})
    assert plan is not None, diags
    model, twin = build_builtin(name), build_builtin(name)
    twin.setup_caches(2, 24)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    planned = apply(model, plan, max_batch=2, max_seq_len=24)
    kinds = {r.what: r.kernel for r in planned.report.rules}
    assert "rope_attention" in kinds["rope_kvcache"] and "rope_attention" in kinds["attention"]
    with torch.no_grad():
        got = [planned(tokens[:, :6], torch.arange(6))]
        want = [twin(tokens[:, :6], torch.arange(6))]
        refuse_rope_kernel(monkeypatch)
        monkeypatch.setattr(rope_mod, "rope_kvcache_reference", rope_mod.rope_kvcache_triton)  # refused too
        for p in range(6, 9):
            got.append(planned(tokens[:, p:p + 1], torch.tensor([p])))
            want.append(twin(tokens[:, p:p + 1], torch.tensor([p])))
    for g, w in zip(got, want):
        assert ((g.double() - w.double()).norm() / w.double().norm()).item() < 1e-5
