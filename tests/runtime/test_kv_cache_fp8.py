"""The FP8 KV cache (precision rules on `:kv_cache`): the cache-write kernel and the
attention kernel with FP8 caches against references written with `formats`, the
calibration of a scale per KV head, the saturation count, and a whole tiny model whose
FP8 caches run through the fused kernels and agree with its eager FP8 twin and with a
twin that fake-quantizes K and V per head.

Without CUDA the Triton kernels run under Triton's interpreter, at tiny shapes.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are defined (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from planlang.plan import Plan  # noqa: E402
from planlang.runtime.apply import PASSES, apply  # noqa: E402
from planlang.runtime.kernels import attention as attn_mod  # noqa: E402
from planlang.runtime.kernels import rope_kvcache as rope_mod  # noqa: E402
from planlang.runtime.kernels.backend import triton_available  # noqa: E402
from planlang.runtime.models.llama import KVCache  # noqa: E402
from planlang.runtime.models.registry import build_builtin  # noqa: E402
from planlang.runtime.passes.fusions import FusedWeights  # noqa: E402
from planlang.runtime.passes.graph import capture  # noqa: E402
from planlang.runtime.passes.precision import PrecisionMap  # noqa: E402
from planlang.runtime.precision import formats  # noqa: E402
from planlang.runtime.precision.kv_cache import (apply_kv_cache_precision, kv_caches, kv_saturation,  # noqa: E402
                                                 pow2_scale)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK, TRITON_WHY = triton_available(DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FMAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
# attention against the float64 definition (as tests/runtime/test_kernels_attention.py)
ATT_TOL = {torch.float32: 2e-5, torch.bfloat16: 2.5e-2}


def ref_codes(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [B, H, T, D] quantized per head with the given scales, by `formats` (the reference)."""
    b, h, t, _ = x.shape
    s = scale.float().cpu().view(1, h, 1).expand(b, h, t)
    return formats.quantize_activation_fp8(x.float().cpu(), fmt, "per_token", scale=s).data


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as numbers (+0 == -0), NaN nowhere."""
    a, b = a.float().cpu(), b.float().cpu()
    return not a.isnan().any() and not b.isnan().any() and torch.equal(a, b)


def head_scales(x: torch.Tensor, fmt: str, seed: int) -> torch.Tensor:
    """Scales per head [H] of x [B, T, H, D] that make some values saturate (and are not
    powers of two): amax / fmax times 0.4 .. 1.3."""
    g = torch.Generator().manual_seed(seed)
    amax = x.detach().float().abs().amax(dim=(0, 1, 3)).cpu()
    return (amax / FMAX[fmt] * (0.4 + 0.9 * torch.rand(amax.shape, generator=g))).to(x.device)


def make_step(b, t, hq, hkv, d, dtype, bmax, s, cache_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, t, hq, d, generator=g) * 2).to(dtype).to(DEVICE)
    k = (torch.randn(b, t, hkv, d, generator=g) * 3).to(dtype).to(DEVICE)
    v = (torch.randn(b, t, hkv, d, generator=g) * 5).to(dtype).to(DEVICE)
    ang = torch.rand(s + 2, d // 2, generator=g) * 6.28
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(DEVICE), torch.cat([ang.sin()] * 2, -1).to(DEVICE)
    cache = torch.full((bmax, hkv, s, d), float("nan"), device=DEVICE).to(cache_dtype)
    pos = torch.randperm(s, generator=g)[:t].to(DEVICE)
    return q, k, v, cos, sin, cache, cache.clone(), pos


# ----------------------------------------------------------------------------- scales
def test_pow2_scale_rounds_amax_over_fmax_up_to_a_power_of_two():
    amax = torch.tensor([448.0, 449.0, 100.0, 0.0, 1e-3, 3 * 448.0])
    assert pow2_scale(amax, 448.0).tolist() == [1.0, 2.0, 0.25, 1.0, 2.0 ** -18, 4.0]
    s = pow2_scale(torch.tensor([57344.0 * 3]), 57344.0)
    assert s.tolist() == [4.0]


# ----------------------------------------------------------------------------- cache-write kernel
@needs_triton
@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 4, 2, 16, 3, 9), (1, 1, 6, 3, 12, 2, 5)])
def test_rope_kvcache_writes_the_per_head_fp8_codes(fmt, dtype, shape):
    b, t, hq, hkv, d, bmax, s = shape
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(b, t, hq, hkv, d, dtype, bmax, s, FP8[fmt], seed=t)
    k_scale, v_scale = head_scales(k, fmt, 1), head_scales(v, fmt, 2)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_rot, k_rot = rope_mod.rope_kvcache_triton(q, k, v, cos, sin, k_cache, v_cache, pos, k_scale, v_scale)
    q_want, k_want = rope_mod.rope_kvcache_reference(q, k, v, cos, sin, k_ref, v_ref, pos, k_scale, v_scale)
    tol = 1e-6 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(q_rot.float(), q_want.float(), rtol=tol, atol=tol * 10)
    torch.testing.assert_close(k_rot.float(), k_want.float(), rtol=tol, atol=tol * 10)
    written = torch.zeros(k_cache.shape, dtype=torch.bool, device=DEVICE)
    written[:b, :, pos] = True
    for cache, ref_cache in ((k_cache, k_ref), (v_cache, v_ref)):
        assert cache.dtype == FP8[fmt]
        assert cache.float()[~written].isnan().all(), "an entry outside the written positions changed"
    # the codes the kernel stored are the reference quantization of what it rotated
    assert same_values(k_cache[:b][:, :, pos], ref_codes(k_rot.transpose(1, 2), k_scale, fmt))
    assert same_values(v_cache[:b][:, :, pos], ref_codes(v.transpose(1, 2), v_scale, fmt))
    assert same_values(k_ref[:b][:, :, pos], ref_codes(k_want.transpose(1, 2), k_scale, fmt))
    assert same_values(v_ref[:b][:, :, pos], ref_codes(v.transpose(1, 2), v_scale, fmt))
    saturated = (v_cache[:b][:, :, pos].float().abs() == FMAX[fmt]).sum()
    assert 0 < saturated < v.numel(), "the scales were chosen so that some values saturate"


@needs_triton
def test_rope_kvcache_emulated_fp8_stores_the_dequantized_codes():
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(2, 3, 4, 2, 16, torch.float32, 2, 7, torch.bfloat16)
    k_scale, v_scale = head_scales(k, "fp8_e4m3", 3), head_scales(v, "fp8_e4m3", 4)
    _, k_rot = rope_mod.rope_kvcache_triton(q, k, v, cos, sin, k_cache, v_cache, pos, k_scale, v_scale, "fp8_e4m3")
    for cache, x, sc in ((k_cache, k_rot, k_scale), (v_cache, v, v_scale)):
        want = ref_codes(x.transpose(1, 2), sc, "fp8_e4m3").float() * sc.cpu().view(1, -1, 1, 1)
        # the interpreter rounds float32 -> bfloat16 toward zero: one bfloat16 step apart at most
        torch.testing.assert_close(cache[:, :, pos].float().cpu(), want, rtol=2 ** -7, atol=0)


def test_rope_kvcache_refuses_inconsistent_fp8_arguments():
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(1, 2, 2, 1, 8, torch.float32, 1, 4, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="needs k_scale"):
        rope_mod.rope_kvcache_reference(q, k, v, cos, sin, k_cache, v_cache, pos)
    ones = torch.ones(1, device=DEVICE)
    with pytest.raises(ValueError, match="Hkv"):
        rope_mod.rope_kvcache_reference(q, k, v, cos, sin, k_cache, v_cache, pos, torch.ones(2), torch.ones(2))
    plain = torch.zeros(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="kv_format"):
        rope_mod.rope_kvcache_reference(q, k, v, cos, sin, plain, plain.clone(), pos, ones, ones)


# ----------------------------------------------------------------------------- attention kernel
def naive_f64(q, k, v, input_pos, *, scale, softcap=None, sinks=None, window=None):
    """The definition, one query at a time, in float64 (k, v: the dequantized caches)."""
    B, T, Hq, D = q.shape
    group = Hq // k.shape[1]
    filled = int(input_pos[-1]) + 1
    out = torch.empty(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p = int(input_pos[t])
            keys = [j for j in range(filled) if j <= p and (window is None or p - j < window)]
            for h in range(Hq):
                s = (k[b, h // group, keys].double() @ q[b, t, h].double()) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                logits = s if sinks is None else torch.cat([s, sinks[h].double().view(1)])
                out[b, t, h] = torch.softmax(logits, dim=0)[: len(keys)] @ v[b, h // group, keys].double()
    return out


def fp8_case(fmt, T, dtype, seed, B=2, Hq=4, Hkv=2, D=16, S=48, last=37):
    """q and FP8 caches (codes, scales, the dequantized float64 values); NaN codes past
    `last` and in the row past B, where the kernel must not look."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    heads = torch.arange(Hkv)
    k_scale = 2.0 ** -(5.0 + 3 * (heads % 2))
    v_scale = torch.where(heads % 2 == 0, 0.013, 2.0 ** -6)  # some scales not powers of two
    k_codes = (torch.randn(B + 1, Hkv, S, D, generator=g) * 60).to(FP8[fmt])
    v_codes = (torch.randn(B + 1, Hkv, S, D, generator=g) * 60).to(FP8[fmt])
    k_deq = k_codes.double() * k_scale.double().view(1, -1, 1, 1)
    v_deq = v_codes.double() * v_scale.double().view(1, -1, 1, 1)
    for c in (k_codes, v_codes):
        c[:, :, last + 1:] = float("nan")
        c[B:] = float("nan")
    pos = torch.arange(last - T + 1, last + 1)
    sinks = torch.randn(Hq, generator=g)
    return q, k_codes, v_codes, k_scale, v_scale, k_deq, v_deq, pos, sinks


@needs_triton
@pytest.mark.parametrize("fmt,T,dtype,feature", [
    ("fp8_e4m3", 1, torch.float32, "plain"), ("fp8_e4m3", 5, torch.float32, "everything"),
    ("fp8_e4m3", 1, torch.bfloat16, "everything"), ("fp8_e5m2", 5, torch.bfloat16, "plain"),
])
def test_attention_kernels_read_fp8_caches_with_per_head_scales(fmt, T, dtype, feature):
    q, kc, vc, ks, vs, k_deq, v_deq, pos, sinks = fp8_case(fmt, T, dtype, seed=T + len(feature))
    kwargs = dict(scale=0.25)
    if feature == "everything":
        kwargs.update(softcap=3.0, sinks=sinks, window=9)
    dev = [x.to(DEVICE) for x in (q, kc, vc, pos, ks, vs)]
    dev_kwargs = {**kwargs, **({"sinks": sinks.to(DEVICE)} if "sinks" in kwargs else {})}
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    attn_mod.attention_triton(dev[0], dev[1], dev[2], dev[3], out=out, block_n=16, block_m=16, num_splits=2,
                              k_scale=dev[4], v_scale=dev[5], **dev_kwargs)
    want = naive_f64(q, k_deq, v_deq, pos, **kwargs)
    assert not out.isnan().any(), "the kernel left poisoned outputs or read NaN garbage"
    tol = ATT_TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)
    ref = attn_mod.attention_reference(q, kc, vc, pos, k_scale=ks, v_scale=vs, **kwargs)
    torch.testing.assert_close(ref.double(), want, atol=tol, rtol=tol)


def test_attention_refuses_fp8_caches_without_scales():
    q, kc, vc, ks, vs, *_ , pos, _ = fp8_case("fp8_e4m3", 1, torch.float32, seed=0)
    with pytest.raises(ValueError, match="FP8 cache"):
        attn_mod.attention(q, kc, vc, pos, scale=0.25)
    with pytest.raises(ValueError, match="Hkv"):
        attn_mod.attention(q, kc, vc, pos, scale=0.25, k_scale=torch.ones(3), v_scale=torch.ones(3))
    with pytest.raises(ValueError, match="FP8 caches"):
        attn_mod.attention(q, kc.float(), vc.float(), pos, scale=0.25, k_scale=ks, v_scale=vs)


def test_fp8_ops_pass_opcheck():
    q, kc, vc, ks, vs, *_ , pos, _ = fp8_case("fp8_e4m3", 5, torch.float32, seed=1)
    # opcheck compares runs NaN-unaware: no NaN garbage
    kc, vc = (c.float().nan_to_num(0.0).to(c.dtype) for c in (kc, vc))
    # opcheck's schema check compares the (FP8) inputs before and after with torch.allclose,
    # which has no FP8 kernel on the CPU: the fake implementations are checked (the graphs of
    # the model tests below go through Dynamo and the custom ops for real).
    checks = ("test_faketensor",)
    torch.library.opcheck(torch.ops.planlang.attention.default, (q, kc, vc, pos, 0.25, None, None, None, True, ks, vs),
                          test_utils=checks)
    rq, rk, rv, cos, sin, rkc, rvc, rpos = make_step(2, 3, 2, 1, 8, torch.float32, 2, 6, torch.float8_e4m3fn)
    rkc.zero_()
    rvc.zero_()
    one = torch.ones(1, device=DEVICE)
    torch.library.opcheck(torch.ops.planlang.rope_kvcache.default,
                          (rq, rk, rv, cos, sin, rkc, rvc, rpos, one * 0.02, one * 0.03, ""), test_utils=checks)


# ----------------------------------------------------------------------------- a whole model
B, PROMPT, STEPS, MAX_SEQ = 2, 5, 2, 16


def plan_of(doc: dict) -> Plan:
    plan, diags = Plan.from_document({"planlang": 1, **doc})
    assert plan is not None, diags
    return plan


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (B, PROMPT + STEPS), generator=torch.Generator().manual_seed(seed))


def example_run(model):
    """The example inputs: a prefill and one decode step."""
    tok = tokens(1)
    with torch.no_grad():
        model(tok[:, :PROMPT], torch.arange(PROMPT))
        model(tok[:, PROMPT:PROMPT + 1], torch.tensor([PROMPT]))


def decode(model, tok) -> list[torch.Tensor]:
    with torch.no_grad():
        out = [model(tok[:, :PROMPT], torch.arange(PROMPT))]
        for p in range(PROMPT, PROMPT + STEPS):
            out.append(model(tok[:, p:p + 1], torch.tensor([p])))
    return out


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fake_quant_twin(name, dtype, scales, fmt):
    """The model with plain caches whose writes fake-quantize K and V per head with `formats`."""
    model = build_builtin(name, dtype=dtype)
    model.setup_caches(B, MAX_SEQ)
    for path, cache in kv_caches(model):
        ks, vs = scales[path]

        def update(pos, k, v, _orig=cache.update, _ks=ks, _vs=vs):
            fq = [(ref_codes(x, s, fmt).float() * s.view(1, -1, 1, 1)).to(x.dtype) for x, s in ((k, _ks), (v, _vs))]
            return _orig(pos, *fq)
        cache.update = update
    return model


def observed_amax(name, dtype) -> dict:
    """{holder path: (k amax, v amax)} per KV head of what the example inputs write, seen by
    wrapping each cache's update (independently of the calibration's observer)."""
    model = build_builtin(name, dtype=dtype)
    model.setup_caches(B, MAX_SEQ)
    seen: dict = {}
    for path, cache in kv_caches(model):
        def update(pos, k, v, _orig=cache.update, _path=path):
            ka, va = (x.float().abs().amax(dim=(0, 2, 3)) for x in (k, v))
            if _path in seen:
                ka, va = torch.maximum(seen[_path][0], ka), torch.maximum(seen[_path][1], va)
            seen[_path] = (ka, va)
            return _orig(pos, k, v)
        cache.update = update
    example_run(model)
    return seen


def calibrated(name, dtype, emulate, fmt="fp8_e4m3"):
    """The model with FP8 caches calibrated on the example inputs, and what apply_kv_cache_precision said."""
    rule = {"at": "**:kv_cache", "dtype": fmt, **({"emulate": True} if emulate else {})}
    model = build_builtin(name, dtype=dtype)
    model.setup_caches(B, MAX_SEQ)
    report = SimpleNamespace(notes=[])
    summary = apply_kv_cache_precision(model, PrecisionMap(model, plan_of({"precision": {"rules": [rule]}})),
                                       example_run, report)
    return model, summary, report


def fp8_twin(name, dtype, model, emulate, fmt="fp8_e4m3"):
    """The same weights with an eager FP8 cache of the same scales."""
    twin = build_builtin(name, dtype=dtype)
    twin.setup_caches(B, MAX_SEQ)
    for (_, a), (_, b) in zip(kv_caches(model), kv_caches(twin)):
        b.to_fp8(fmt, a.k_scale, a.v_scale, emulate=emulate)
    return twin


def test_a_tiny_model_with_an_fp8_cache_runs_the_fused_kernels_and_agrees():
    name, dtype, fmt = "llama-tiny", torch.float32, "fp8_e4m3"
    model, summary, report = calibrated(name, dtype, emulate=False)
    places = [f"layers.{i}.attn" for i in range(model.config.n_layers)]
    assert summary["layers"] == len(places) and summary["places"] == places and summary["dtype"] == fmt
    assert summary["rules"] == {0: places} and not summary["skipped"] and not summary["emulated"]
    assert report.notes and "a scale per KV head" in report.notes[0]
    assert summary["cache_bytes"]["after"] * 4 == summary["cache_bytes"]["before"]  # float32 -> 1 byte
    amax = observed_amax(name, dtype)
    scales = {}
    for path, cache in kv_caches(model):
        assert cache.fp8 == fmt and cache.k_cache.dtype == torch.float8_e4m3fn
        for s in (cache.k_scale, cache.v_scale):
            assert s.shape == (model.config.n_kv_heads,) and s.dtype == torch.float32 and (s > 0).all()
            assert torch.equal(torch.frexp(s)[0], torch.full_like(s, 0.5)), "scales are powers of two"
        for s, a in zip((cache.k_scale, cache.v_scale), amax[path]):  # per head: amax / fmax <= s < 2 amax / fmax
            assert (s * FMAX[fmt] >= a).all() and (s * FMAX[fmt] < 2 * a).all(), (path, s, a)
        assert summary["scales"]["per_layer"][path] == {"k": cache.k_scale.tolist(), "v": cache.v_scale.tolist()}
        scales[path] = (cache.k_scale.clone(), cache.v_scale.clone())
    # Nothing saturates on the calibration inputs.
    assert kv_saturation(model, example_run) == 0.0

    twin = fp8_twin(name, dtype, model, emulate=False)
    ref = fake_quant_twin(name, dtype, scales, fmt)
    planned = apply(model, plan_of({"fusions": ["rope_kvcache", "attention"]}), example_inputs=example_run,
                    max_batch=B, max_seq_len=MAX_SEQ)
    backend = "triton" if TRITON_OK else "reference"
    for rule_report in planned.report.rules:
        assert rule_report.places == places and backend in rule_report.kernel, rule_report
    tok = tokens(0)
    got, eager, want = decode(planned, tok), decode(twin, tok), decode(ref, tok)
    for step, (g, e, w) in enumerate(zip(got, eager, want)):
        assert rel_err(e, w) < 1e-6, f"eager FP8 cache vs fake-quantized K and V, step {step}"
        assert rel_err(g, e) < 1e-5, f"fused kernels vs eager, step {step}"
    written = slice(0, PROMPT + STEPS)
    for (_, a), (_, b) in zip(kv_caches(planned), kv_caches(twin)):
        assert torch.equal(a.k_cache[:, :, written].float(), b.k_cache[:, :, written].float())
        assert torch.equal(a.v_cache[:, :, written].float(), b.v_cache[:, :, written].float())
    # Values beyond what the scales were calibrated for saturate, and are counted.
    for _, cache in kv_caches(twin):
        cache.k_scale.div_(64.0)
    frac = kv_saturation(twin, example_run)
    assert 0.0 < frac < 0.5


@pytest.mark.parametrize("name,emulate", [("gemma2-tiny", False), ("sinks-tiny", True)])
def test_the_variants_fp8_cache_sites_are_found_and_rewritten(name, emulate):
    """Soft-cap + sliding window (gemma2) and sinks with an emulated FP8 cache (sinks): both
    passes find their sites with the scales, and the rewritten prefill graph agrees with
    the eager FP8 twin."""
    fmt = "fp8_e4m3"
    model, summary, _ = calibrated(name, torch.float32, emulate)
    assert summary["layers"] == model.config.n_layers and summary["emulated"] == (summary["places"] if emulate else [])
    twin = fp8_twin(name, torch.float32, model, emulate)
    tok = tokens(2)[:, :PROMPT]
    views = capture(model, lambda m: m(tok, torch.arange(PROMPT)))
    assert len(views) == 1
    view = views[0]
    caches = dict(kv_caches(model))
    for kind in ("rope_kvcache", "attention"):
        sites = PASSES[kind].find(view)
        assert sorted(s.path for s in sites) == sorted(caches), (kind, PASSES[kind].explain(view))
        for site in sites:
            cache = caches[site.path]
            k_scale = site.nodes["k_scale"]
            if kind == "rope_kvcache":
                assert site.info["kv_format"] == fmt and view.input_tensor(k_scale) is cache.k_scale
            else:  # an emulated cache holds dequantized values: attention reads it as it is
                assert (k_scale is None) if emulate else (view.input_tensor(k_scale) is cache.k_scale)
            assert PASSES[kind].rewrite(view, site, FusedWeights()) == kind
    ops = {n.target for n in view.graph.nodes if n.op == "call_function"}
    assert torch.ops.planlang.rope_kvcache.default in ops and torch.ops.planlang.attention.default in ops
    assert not any(n.target == "index_copy_" for n in view.graph.nodes), "the cache writes are the kernel's"
    view.gm.recompile()
    with torch.no_grad():
        got = view.gm(*view.example_inputs)[0]
        want = twin(tok, torch.arange(PROMPT))
    assert rel_err(got, want) < 1e-5
    for (_, a), (_, b) in zip(kv_caches(model), kv_caches(twin)):
        assert torch.equal(a.v_cache[:, :, :PROMPT].float(), b.v_cache[:, :, :PROMPT].float())


def test_no_kv_cache_rule_leaves_the_caches_alone():
    model = build_builtin("llama-tiny")
    model.setup_caches(B, MAX_SEQ)
    pmap = PrecisionMap(model, plan_of({"precision": {"rules": [{"at": "layers.*.mlp:linear", "dtype": "bf16"}]}}))
    summary = apply_kv_cache_precision(model, pmap, example_run, SimpleNamespace(notes=[]))
    assert summary["layers"] == 0 and summary["dtype"] is None
    assert all(c.fp8 is None and c.k_cache.dtype == torch.float32 and c.k_scale is None for _, c in kv_caches(model))
    assert kv_saturation(model, example_run) == 0.0


def test_a_model_without_a_planlang_kv_cache_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    pmap = PrecisionMap(model, plan_of({"precision": {"rules": [{"at": "**:kv_cache", "dtype": "fp8_e4m3"}]}}))
    report = SimpleNamespace(notes=[])
    summary = apply_kv_cache_precision(model, pmap, lambda m: m(torch.randn(1, 4)), report)
    assert summary["layers"] == 0 and "built-in models only" in summary["skipped"]["(model)"]
    assert "skipped" in report.notes[0]


def test_an_fp8_cache_keeps_its_format_when_allocated_again():
    cache = KVCache()
    cache.allocate(2, 2, 8, 4, torch.bfloat16, "cpu")
    cache.to_fp8("fp8_e5m2", torch.tensor([0.5, 0.25]), torch.tensor([1.0, 2.0]))
    cache.allocate(3, 2, 16, 4, torch.bfloat16, "cpu")
    assert cache.k_cache.dtype == torch.float8_e5m2 and cache.k_cache.shape == (3, 2, 16, 4)
    k = torch.randn(3, 2, 2, 4, dtype=torch.bfloat16)
    k_out, _ = cache.update(torch.tensor([0, 1]), k, k)
    assert k_out.dtype == torch.bfloat16
    want = ref_codes(k, torch.tensor([0.5, 0.25]), "fp8_e5m2").float() * torch.tensor([0.5, 0.25]).view(1, -1, 1, 1)
    assert torch.equal(k_out[:, :, :2].float(), want)
    with pytest.raises(ValueError, match="KV heads"):
        cache.allocate(1, 4, 8, 4, torch.bfloat16, "cpu")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("b,t", [(1, 1), (16, 1), (1, 512)])
def test_gpu_rope_kvcache_fp8_codes_at_llama_1b_shapes(fmt, b, t):
    q, k, v, cos, sin, k_cache, v_cache, pos = make_step(b, t, 32, 8, 64, torch.bfloat16, 16, 1024, FP8[fmt])
    k_scale, v_scale = head_scales(k, fmt, 5), head_scales(v, fmt, 6)
    _, k_rot = rope_mod.rope_kvcache(q, k, v, cos, sin, k_cache, v_cache, pos, k_scale, v_scale)
    # the hardware conversion (round to nearest even) against the reference quantization
    assert same_values(k_cache[:b][:, :, pos], ref_codes(k_rot.transpose(1, 2), k_scale, fmt))
    assert same_values(v_cache[:b][:, :, pos], ref_codes(v.transpose(1, 2), v_scale, fmt))
    written = torch.zeros(k_cache.shape, dtype=torch.bool, device=DEVICE)
    written[:b, :, pos] = True
    assert k_cache.float()[~written].isnan().all() and v_cache.float()[~written].isnan().all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 300])
def test_gpu_attention_fp8_cache_at_llama_1b_shapes(T):
    q, kc, vc, ks, vs, k_deq, v_deq, pos, sinks = fp8_case("fp8_e4m3", T, torch.bfloat16, seed=T, B=4, Hq=32,
                                                           Hkv=8, D=64, S=4096, last=2500)
    ks, vs = torch.rand(8) * 0.05 + 1e-3, torch.rand(8) * 0.05 + 1e-3
    kwargs = dict(scale=0.125, softcap=50.0, sinks=sinks.cuda(), window=1024)
    args = [x.cuda() for x in (q, kc, vc, pos)]
    out = attn_mod.attention(*args, k_scale=ks.cuda(), v_scale=vs.cuda(), **kwargs)
    ref = attn_mod.attention_reference(*args, k_scale=ks.cuda(), v_scale=vs.cuda(), **kwargs)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=2.5e-2, rtol=2.5e-2)
    # the same numbers as the kernel on the dequantized bf16 cache
    kd = (kc.cuda().float() * ks.cuda().view(1, -1, 1, 1)).to(torch.bfloat16)
    vd = (vc.cuda().float() * vs.cuda().view(1, -1, 1, 1)).to(torch.bfloat16)
    plain = attn_mod.attention(args[0], kd, vd, args[3], **kwargs)
    torch.testing.assert_close(out.float(), plain.float(), atol=2.5e-2, rtol=2.5e-2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_planned_llama_tiny_with_an_fp8_cache_matches_its_eager_twin_in_cuda_graphs():
    dtype, fmt = torch.bfloat16, "fp8_e4m3"
    model = build_builtin("llama-tiny", dtype=dtype, device="cuda")
    twin = build_builtin("llama-tiny", dtype=dtype, device="cuda")
    for m in (model, twin):
        m.setup_caches(B, MAX_SEQ)

    def run(m):
        tok = tokens(1).cuda()
        with torch.no_grad():
            m(tok[:, :PROMPT], torch.arange(PROMPT, device="cuda"))
            m(tok[:, PROMPT:PROMPT + 1], torch.tensor([PROMPT], device="cuda"))

    pmap = PrecisionMap(model, plan_of({"precision": {"rules": [{"at": "**:kv_cache", "dtype": fmt}]}}))
    summary = apply_kv_cache_precision(model, pmap, run, None)
    assert summary["layers"] == model.config.n_layers
    for (_, a), (_, b) in zip(kv_caches(model), kv_caches(twin)):
        b.to_fp8(fmt, a.k_scale, a.v_scale)
    planned = apply(model, plan_of({"fusions": ["rope_kvcache", "attention"],
                                    "graphs": {"capture": "cuda_graph", "buckets": [1, 2]}}),
                    example_inputs=run, max_batch=B, max_seq_len=MAX_SEQ)
    tok = tokens(0).cuda()
    with torch.no_grad():
        for p in range(PROMPT + STEPS):
            pos = torch.tensor([p], device="cuda")
            got, want = planned(tok[:, p:p + 1], pos), twin(tok[:, p:p + 1], pos)
            assert rel_err(got.float(), want.float()) < 3e-2, p  # bf16 kernels vs eager bf16: rounding only
    for layer, ((_, a), (_, b)) in enumerate(zip(kv_caches(planned), kv_caches(twin))):
        assert a.k_cache.dtype == torch.float8_e4m3fn
        va, vb = a.v_cache[:, :, :PROMPT + STEPS].float(), b.v_cache[:, :, :PROMPT + STEPS].float()
        if layer == 0:
            # v is written unrotated, from the same projection of the same embedding in both
            # models: the same codes from the kernel's conversion and torch's
            assert torch.equal(va, vb)
        else:
            # later layers' v comes from the fused attention's output, which differs from the
            # eager model's by bf16 rounding; quantized to e4m3, a few codes move by a step or
            # more (2.5% of them by more than one step on the H100, 2026-12-07): the caches
            # agree within the logits' rounding bound, norm-wise
            assert rel_err(va, vb) < 3e-2, f"layer {layer}"
