"""runtime/accuracy.py: `compare` and `score` against direct float64 computations, chunking,
no state between chunks, the logits functions of built-in, planned and Hugging Face models,
and a perturbed model scoring measurably worse."""
from __future__ import annotations

import json
import math

import pytest
import torch

from planlang.plan import Plan
from planlang.runtime.accuracy import (
    EVAL_TEXT, AccuracyResult, compare, eval_tokens, logits_fn_for, relative_error, score,
)
from planlang.runtime.models.registry import build_builtin

V = 256


@pytest.fixture(autouse=True)
def one_thread():
    # See test_trained_model.py: one thread is far faster on a shared small machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bigram(seed: int, scale: float = 3.0):
    """A context-free logits function: row `id` of a random table for every position, so
    the logits at a position do not depend on the chunk it falls in."""
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * scale
    return table, (lambda ids: table[ids])


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def direct(ref_table, cand_table, tokens) -> dict:
    """The metrics written out in float64, in one pass, position by position."""
    ids, target = tokens[:, :-1], tokens[:, 1:]
    ref, cand = ref_table.double()[ids], cand_table.double()[ids]
    p = torch.softmax(ref, -1)
    kl = (p * (torch.log_softmax(ref, -1) - torch.log_softmax(cand, -1))).sum(-1).mean().item()
    nll = lambda x: -torch.log_softmax(x, -1).gather(-1, target[..., None]).mean().item()  # noqa: E731
    return {"kl": kl, "ppl_reference": math.exp(nll(ref)), "ppl_candidate": math.exp(nll(cand)),
            "top1_agreement": (ref.argmax(-1) == cand.argmax(-1)).double().mean().item(),
            "acc_reference": (ref.argmax(-1) == target).double().mean().item(),
            "rel_error": ((cand - ref).norm() / ref.norm()).item(),
            "max_abs_error": (cand - ref).abs().max().item(), "tokens": target.numel()}


def test_metrics_match_a_direct_float64_computation():
    ref_table, ref = bigram(0)
    cand_table, cand = bigram(1)
    cand_table.mul_(0.3).add_(ref_table, alpha=0.7)  # related, so agreement is neither 0 nor 1
    tokens = random_tokens(2, 50)
    got = compare(ref, cand, tokens, chunk=50)
    want = direct(ref_table, cand_table, tokens)
    assert 0.05 < want["top1_agreement"] < 0.95 and want["kl"] > 0.1
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_chunking_gives_the_same_result_as_one_pass():
    _, ref = bigram(2)
    _, cand = bigram(3)
    tokens = random_tokens(3, 97)
    whole = compare(ref, cand, tokens, chunk=97).to_json()
    for chunk in (1, 7, 32, 96, 500):
        parts = compare(ref, cand, tokens, chunk=chunk).to_json()
        assert parts.pop("chunk") == chunk
        for key, value in parts.items():
            assert value == pytest.approx(whole[key], rel=1e-6, abs=1e-9), (chunk, key)


def test_score_matches_the_reference_side_of_compare():
    _, fn = bigram(4)
    tokens = random_tokens(2, 40)
    both, alone = compare(fn, fn, tokens, chunk=16), score(fn, tokens, chunk=16)
    assert alone.ppl == pytest.approx(both.ppl_reference, rel=1e-12)
    assert alone.accuracy == both.acc_reference and alone.tokens == both.tokens == 2 * 39
    assert alone.nll == pytest.approx(math.log(alone.ppl))


def test_a_model_compared_with_itself_is_exact():
    model = build_builtin("llama-tiny")
    fn = logits_fn_for(model)
    r = compare(fn, fn, random_tokens(1, 80), chunk=32)
    assert r.kl == 0.0 and r.rel_error == 0.0 and r.max_abs_error == 0.0
    assert r.top1_agreement == 1.0 and r.ppl_reference == r.ppl_candidate and r.tokens == 79


def test_a_perturbed_model_scores_measurably_worse():
    ref = build_builtin("llama-tiny-trained", dtype=torch.float32)
    noisy = build_builtin("llama-tiny-trained", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.std())
    r = compare(logits_fn_for(ref), logits_fn_for(noisy), eval_tokens(max_tokens=1024))
    assert r.kl > 0.05 and r.rel_error > 0.1 and r.top1_agreement < 0.95, r.summary()
    assert r.ppl_candidate > 1.1 * r.ppl_reference and r.acc_candidate < r.acc_reference, r.summary()


def test_built_in_model_sees_nothing_of_an_earlier_chunk_through_its_caches():
    model = build_builtin("llama-tiny")
    first, second = random_tokens(1, 24, seed=1), random_tokens(1, 16, seed=2)
    with torch.no_grad():
        fresh = model(second)  # no caches: attention sees this call's tokens only
        model.setup_caches(1, 64)
        fn = logits_fn_for(model)
        fn(first)
        again = fn(second)
    torch.testing.assert_close(again, fresh, rtol=1e-5, atol=1e-5)


def test_caches_too_small_for_a_chunk_are_an_error_with_a_hint():
    model = build_builtin("llama-tiny")
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match="KV caches hold 1 x 16 positions.*smaller chunk"):
        compare(logits_fn_for(model), logits_fn_for(model), random_tokens(1, 40), chunk=32)


def test_a_planned_model_is_scored_through_its_rewritten_forward():
    from planlang.runtime.apply import apply
    model = build_builtin("llama-tiny")
    plan, diags = Plan.from_document({"planlang": 1, "fusions": ["rmsnorm_residual"]})
    assert plan is not None, diags
    tokens = random_tokens(1, 32)
    example = (tokens[:, :16], torch.arange(16))  # traced at the chunk's shape: no second compile
    planned = apply(model, plan, example, max_batch=1, max_seq_len=32)
    calls = []
    planned_fn = logits_fn_for(planned)
    r = compare(logits_fn_for(model), lambda ids: calls.append(ids.shape) or planned_fn(ids), tokens, chunk=16)
    assert calls == [(1, 16), (1, 16)]
    assert planned.report.rules[0].places
    assert r.top1_agreement == 1.0 and r.rel_error < 1e-4 and r.kl < 1e-7, r.summary()


def test_a_hugging_face_model_is_scored_through_its_logits():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    tokens = random_tokens(1, 20)
    fn = logits_fn_for(model)
    with torch.no_grad():
        want = model(input_ids=tokens[:, :8]).logits
    torch.testing.assert_close(fn(tokens[:, :8]), want)
    r = compare(fn, fn, tokens, chunk=8)
    assert r.kl == 0.0 and r.top1_agreement == 1.0 and r.tokens == 19


def test_a_module_that_is_no_language_model_is_refused():
    with pytest.raises(TypeError, match="neither a planlang Transformer nor a Hugging Face"):
        logits_fn_for(torch.nn.Linear(4, 4))


def test_bad_inputs_are_refused_with_a_hint():
    _, fn = bigram(5)
    with pytest.raises(ValueError, match="LongTensor"):
        compare(fn, fn, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        compare(fn, fn, torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="expected \\[B, T, V\\]"):
        compare(fn, lambda ids: fn(ids)[:, :, None], random_tokens(1, 5))
    with pytest.raises(ValueError, match="differ"):
        compare(fn, lambda ids: fn(ids)[..., :10], random_tokens(1, 5))


def test_eval_tokens_are_the_bytes_of_the_shipped_text():
    data = EVAL_TEXT.read_bytes()
    assert len(data) > 32_000
    tokens = eval_tokens()
    assert tokens.dtype == torch.long and tokens.shape == (1, len(data))
    assert bytes(tokens[0].tolist()) == data
    assert torch.equal(eval_tokens(max_tokens=100), tokens[:, :100])
    with pytest.raises(ValueError, match="at least 2"):
        eval_tokens(max_tokens=1)


def test_relative_error_is_the_norm_ratio():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref + torch.tensor([0.3, 0.4]), ref) == pytest.approx(0.1)
    assert relative_error(ref.bfloat16(), ref) == 0.0
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.ones(2), torch.zeros(2)) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(torch.zeros(2), torch.zeros(3))


def test_result_serializes_and_summarizes_in_one_line():
    _, ref = bigram(6)
    _, cand = bigram(7)
    r = compare(ref, cand, random_tokens(1, 30))
    assert isinstance(r, AccuracyResult)
    data = json.loads(json.dumps(r.to_json()))
    assert set(data) >= {"rel_error", "max_abs_error", "kl", "top1_agreement", "ppl_reference", "ppl_candidate",
                         "tokens"}
    line = r.summary()
    assert "\n" not in line and "KL" in line and "top-1 agreement" in line and "29 tokens" in line
