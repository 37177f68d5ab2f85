"""Tensor parallelism (`parallel` section, PLAN_SPEC.md §8a) on the CPU: gloo, 2 processes.

Two ranks are started once for the module (torch.multiprocessing, a file rendezvous, a
60 s process-group timeout so a broken collective fails instead of hanging); each runs
every scenario below and writes what it saw to a JSON file, which the tests read:
- the built-in llama-tiny at `tensor: 2` with the fusions on: prefill and decode give the
  logits of the unsplit twin within float32 tolerance; the fused QKV and gate/up weights
  are built from each rank's shard (one QKV site per layer, per-rank sizes); the KV cache
  holds the rank's heads;
- a multi-query built-in model (1 KV head: replicated on both ranks) with plan styles and
  `sequence: true`: the same check, and the prefill really runs sequence-parallel;
- a tiny Hugging Face LlamaForCausalLM (random weights, seeded) over a static cache, and
  (eagerly, no trace) Qwen2 and Gemma-2 with sequence parallelism;
- refusals: a degree that does not divide the heads, a degree that is not the job's size,
  a colwise style on a norm; each names its place in the plan, and the model is untouched.
The kernels run their PyTorch reference here (TRITON_INTERPRET=0 in the ranks): the
interpreter is slow on two shared cores, and what is tested is the splitting.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from planlang.loader import load_with_source
from planlang.plan import Plan
from planlang.runtime.apply import ApplyError
from planlang.runtime.models.llama import ModelConfig, Transformer
from planlang.runtime.parallel import infer_styles, maybe_launch, resolve_styles, run_torchrun, shard_model
from planlang.runtime.parallel.launch import strip_nproc

WORLD = 2
F32_TOL = 2e-5
FUSIONS = ["rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention"]
HF_FUSIONS = ["rmsnorm_residual", "qkv", "swiglu", "attention"]
B, PROMPT, STEPS = 2, 6, 2


def tiny_config(**over) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=256)
    return ModelConfig(**{**base, **over})


def builtin(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    model.setup_caches(B, 32)
    return model


def make_plan(doc: dict) -> Plan:
    plan, diags = Plan.from_document({"planlang": 1, "limits": {"max_batch": B, "max_seq_len": 32}, **doc})
    assert plan is not None, diags
    return plan


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def run_builtin(model, tokens, steps: int = STEPS) -> list[torch.Tensor]:
    with torch.no_grad():
        out = [model(tokens[:, :PROMPT], torch.arange(PROMPT))]
        for p in range(PROMPT, PROMPT + steps):
            out.append(model(tokens[:, p:p + 1], torch.tensor([p])))
    return out


def tokens(vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, PROMPT + STEPS), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- what each rank runs

def _apply(model, plan, source=None, **kw):
    """shard_model then apply, as apply() will once it calls shard_model itself. Traced on
    a prefill of the test's shape (each trace costs seconds on two shared cores)."""
    kw.setdefault("example_inputs", lambda m: run_builtin(m, tokens(seed=9), steps=0))
    from planlang.runtime import apply as apply_mod
    if hasattr(apply_mod, "shard_model"):  # wired: apply shards
        planned = apply_mod.apply(model, plan, source=source, **kw)
        return planned, getattr(model, "_planlang_tp", None), planned.report
    report = apply_mod.Report("p", "cpu", "reference")
    info = shard_model(model, plan, report, source)
    planned = apply_mod.apply(model, plan, source=source, **kw)
    planned.report.rules[:0] = report.rules
    planned.report.notes[:0] = report.notes
    return planned, info, planned.report


def _summary(planned, info, got, want) -> dict:
    rules = {r.what: {"places": r.places, "kernel": r.kernel, "section": r.section} for r in planned.report.rules}
    return {
        "errors": [rel_err(g, w) for g, w in zip(got, want)],
        "finite": all(bool(torch.isfinite(g).all()) for g in got),
        "shapes": [list(g.shape) for g in got],
        "rules": rules,
        "part_rows": {"|".join([k[0], *k[1]]): v for k, v in planned.fused_weights.part_rows.items()},
        "attention": info.attention if info else None,
        "places": info.places if info else None,
        "notes": planned.report.notes,
    }


def scenario_builtin(rank, out):
    cfg = tiny_config()
    model, twin = builtin(cfg), builtin(cfg)
    planned, info, _ = _apply(model, make_plan({"fusions": FUSIONS, "parallel": {"tensor": WORLD}}))
    toks = tokens()
    got, want = run_builtin(planned, toks), run_builtin(twin, toks)
    res = _summary(planned, info, got, want)
    res["kv_cache"] = list(model.layers[0].attn.kv_cache.k_cache.shape)
    res["tied"] = model.lm_head.weight is model.embed.weight
    res["embed_rows"] = model.embed.weight.shape[0]
    out["builtin"] = res


def scenario_mqa_sequence(rank, out):
    """One KV head (replicated), styles written in the plan, sequence parallelism."""
    from planlang.runtime.parallel import tp
    cfg = tiny_config(n_kv_heads=1, tie_embeddings=False)
    model, twin = builtin(cfg, seed=3), builtin(cfg, seed=3)
    plan = make_plan({"fusions": FUSIONS, "parallel": {"tensor": WORLD, "sequence": True, "styles": [
        {"at": "layers.*.attn.{wq,wk,wv}", "style": "colwise"}, {"at": "layers.*.attn.wo", "style": "rowwise"},
        {"at": "**:lm_head", "style": "colwise"}]}})
    calls = {"reduce_scatter": 0}
    inner = tp.reduce_scatter

    def counting(*a, **k):
        calls["reduce_scatter"] += 1
        return inner(*a, **k)
    tp.reduce_scatter = counting
    try:
        info = shard_model(model, plan, None, None)
        with torch.no_grad():  # eager, before apply: prefill of 6 tokens splits them, decode does not
            model(tokens()[:, :PROMPT], torch.arange(PROMPT))
            eager_prefill = calls["reduce_scatter"]
            model(tokens()[:, PROMPT:PROMPT + 1], torch.tensor([PROMPT]))
            eager_decode = calls["reduce_scatter"] - eager_prefill
        model.setup_caches(B, 32)  # the eager calls wrote the caches: start again
        planned, info2, _ = _apply(model, plan)
    finally:
        tp.reduce_scatter = inner
    toks = tokens(seed=5)
    got, want = run_builtin(planned, toks), run_builtin(twin, toks)
    res = _summary(planned, info, got, want)
    res["reduce_scatter"] = [eager_prefill, eager_decode]
    res["sources"] = {p: s for p, s in info.source.items() if s is not None}
    res["kv_cache"] = list(model.layers[0].attn.kv_cache.k_cache.shape)
    out["mqa_sequence"] = res


def hf_model(seed: int = 0):
    import transformers
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=256, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def hf_decode(model, toks, steps: int = STEPS) -> list[torch.Tensor]:
    import transformers
    cfg = model.config
    info = getattr(model, "_planlang_tp", None) or getattr(getattr(model, "model", None), "_planlang_tp", None)
    kv = cfg.num_key_value_heads
    if info is not None:
        lo, hi = next(iter(info.attention.values()))["kv_heads"]
        kv = hi - lo
    cache = transformers.StaticCache(config=cfg, max_cache_len=16)
    cache.early_initialization(B, kv, cfg.hidden_size // cfg.num_attention_heads, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        out = [model(input_ids=toks[:, :PROMPT], cache=cache, use_cache=True).logits]
        for p in range(PROMPT, PROMPT + steps):
            out.append(model(input_ids=toks[:, p:p + 1], cache=cache, use_cache=True).logits)
    return out


def scenario_hf(rank, out):
    try:
        import transformers  # noqa: F401
    except ImportError:
        out["hf"] = None
        return
    model, twin = hf_model(), hf_model()
    plan = make_plan({"fusions": HF_FUSIONS, "parallel": {"tensor": WORLD}})
    planned, info, _ = _apply(model, plan, example_inputs=lambda m: hf_decode(m, tokens(seed=7), steps=0))
    toks = tokens(seed=2)
    got, want = hf_decode(planned, toks), hf_decode(twin, toks)
    res = _summary(planned, info, got, want)
    res["styles"] = {p: s for p, s in info.styles.items() if s != "replicate"}
    out["hf"] = res


def scenario_builtin_eager(rank, out):
    """The Gemma-2-like (GeGLU, scaled embedding, soft-caps, sliding window) and gpt-oss-like
    (a sink logit per query head) built-ins, split, with their caches, run eagerly."""
    from planlang.runtime.models.registry import BUILTIN_MODELS
    res = {}
    for name in ("gemma2-tiny", "sinks-tiny"):
        cfg = BUILTIN_MODELS[name]()
        model, twin = builtin(cfg, seed=6), builtin(cfg, seed=6)
        info = shard_model(model, make_plan({"parallel": {"tensor": WORLD}}), None, None)
        toks = tokens(seed=8)
        got, want = run_builtin(model, toks), run_builtin(twin, toks)
        sinks = getattr(model.layers[0].attn, "sinks", None)
        res[name] = {"errors": [rel_err(g, w) for g, w in zip(got, want)], "places": len(info.places),
                     "sinks": list(sinks.shape) if sinks is not None else None}
    out["builtin_eager"] = res


def scenario_hf_eager(rank, out):
    """Qwen2 (q/k/v biases) and Gemma-2 (GeGLU, scaled embedding, soft-caps, post-norms),
    split with sequence parallelism, run eagerly (no trace: cheap)."""
    try:
        import transformers
    except ImportError:
        out["hf_eager"] = None
        return
    from planlang.runtime.parallel import tp
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256, max_position_embeddings=64)
    archs = {"qwen2": (transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM),
             "gemma2": (transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
                        transformers.Gemma2ForCausalLM)}
    res = {}
    inner = tp.reduce_scatter
    calls = {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        return inner(*a, **k)
    tp.reduce_scatter = counting
    try:
        for arch, (config, cls) in archs.items():
            config._attn_implementation = "eager"
            model, twin = (cls(config).eval() for _ in range(2))
            twin.load_state_dict(model.state_dict())
            shard_model(model, make_plan({"parallel": {"tensor": WORLD, "sequence": True}}), None, None)
            toks = tokens(seed=4)
            calls["n"] = 0
            with torch.no_grad():
                got = model(input_ids=toks, use_cache=False).logits
                want = twin(input_ids=toks, use_cache=False).logits
            res[arch] = {"error": rel_err(got, want), "reduce_scatter": calls["n"], "shape": list(got.shape)}
    finally:
        tp.reduce_scatter = inner
    out["hf_eager"] = res


PLAN_BAD_HEADS = """\
planlang: 1
name: three_heads
fusions: [qkv]
parallel:
  tensor: 2
"""

PLAN_NORM_STYLE = """\
planlang: 1
name: norm_style
parallel:
  tensor: 2
  styles:
    - at: "layers.*.attn_norm"
      style: colwise
"""


def _refusal(fn) -> dict:
    try:
        fn()
    except ApplyError as exc:
        d = exc.diagnostics[0]
        return {"code": d.code, "message": d.message, "hint": d.hint, "line": d.line, "column": d.column}
    return {"code": None}


def scenario_refusals(rank, out, tmp: str):
    # a file per rank: the ranks run at once, and one rank's write must not truncate the
    # file another is reading
    bad = Path(tmp) / f"bad_heads_rank{rank}.yaml"
    bad.write_text(PLAN_BAD_HEADS)
    loaded = load_with_source(str(bad))
    model = builtin(tiny_config(dim=48, n_heads=3, n_kv_heads=3, ffn_dim=96))
    before = model.layers[0].attn.wq.weight.shape
    out["bad_heads"] = _refusal(lambda: shard_model(model, loaded.plan, None, loaded.source))
    out["bad_heads"]["untouched"] = (model.layers[0].attn.wq.weight.shape == before
                                     and not hasattr(model, "_planlang_tp"))
    out["mismatch"] = _refusal(lambda: shard_model(builtin(tiny_config()), make_plan({"parallel": {"tensor": 4}}),
                                                   None, None))
    norm = Path(tmp) / f"norm_style_rank{rank}.yaml"
    norm.write_text(PLAN_NORM_STYLE)
    loaded = load_with_source(str(norm))
    out["norm_style"] = _refusal(lambda: shard_model(builtin(tiny_config()), loaded.plan, None, loaded.source))


def _rank_main(rank: int, world: int, tmp: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    out: dict = {"timings": {}}
    try:
        for name, fn in (("refusals", lambda: scenario_refusals(rank, out, tmp)),
                         ("builtin", lambda: scenario_builtin(rank, out)),
                         ("mqa_sequence", lambda: scenario_mqa_sequence(rank, out)),
                         ("hf", lambda: scenario_hf(rank, out)),
                         ("hf_eager", lambda: scenario_hf_eager(rank, out)),
                         ("builtin_eager", lambda: scenario_builtin_eager(rank, out))):
            t0 = time.perf_counter()
            fn()
            out["timings"][name] = round(time.perf_counter() - t0, 1)
    finally:
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(out, default=str))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp
    tmp = tmp_path_factory.mktemp("tp")
    mp.spawn(_rank_main, args=(WORLD, str(tmp)), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


# ----------------------------------------------------------------------------- tests on the ranks' results

@pytest.mark.parametrize("case", ["builtin", "mqa_sequence", "hf"])
def test_split_model_gives_the_unsplit_outputs(ranks, case):
    if ranks[0].get(case) is None:
        pytest.skip("transformers is not installed")
    for rank, res in enumerate(ranks):
        r = res[case]
        assert r["finite"], (case, rank)
        assert len(r["errors"]) == 1 + STEPS
        assert r["shapes"][0] == [B, PROMPT, 256] and r["shapes"][1] == [B, 1, 256]  # full vocabulary on every rank
        assert max(r["errors"]) < F32_TOL, (case, rank, r["errors"])


@pytest.mark.parametrize("case", ["builtin", "mqa_sequence", "hf"])
def test_fusions_find_their_sites_on_each_rank(ranks, case):
    if ranks[0].get(case) is None:
        pytest.skip("transformers is not installed")
    attn = "model.layers.{}.self_attn" if case == "hf" else "layers.{}.attn"
    mlp = "model.layers.{}.mlp" if case == "hf" else "layers.{}.mlp"
    for res in ranks:
        rules = res[case]["rules"]
        assert rules["qkv"]["places"] == [attn.format(i) for i in (0, 1)]
        assert rules["swiglu"]["places"] == [mlp.format(i) for i in (0, 1)]
        assert rules["attention"]["places"] == [attn.format(i) for i in (0, 1)]
        assert len(rules["rmsnorm_residual"]["places"]) == 5
        for kind in rules:
            if rules[kind]["section"] == "fusions":
                assert "none" not in rules[kind]["kernel"], kind
        assert rules[f"tensor {WORLD}"]["section"] == "parallel"


def test_fused_weights_are_built_from_each_ranks_shard(ranks):
    """[Wq; Wk; Wv] of a rank: 2 of 4 query heads and 1 of 2 KV heads (head_dim 16);
    [W1; W3]: half the FFN width each."""
    for res in ranks:
        rows = res["builtin"]["part_rows"]
        assert rows["qkv|layers.0.attn.wq|layers.0.attn.wk|layers.0.attn.wv"] == [32, 16, 16]
        assert rows["swiglu|layers.1.mlp.w1|layers.1.mlp.w3"] == [96, 96]
        hf = res["hf"]
        if hf is not None:
            assert hf["part_rows"]["qkv|model.layers.0.self_attn.q_proj|model.layers.0.self_attn.k_proj|"
                                   "model.layers.0.self_attn.v_proj"] == [32, 16, 16]
            assert hf["part_rows"]["swiglu|model.layers.0.mlp.gate_proj|model.layers.0.mlp.up_proj"] == [64, 64]


def test_each_rank_keeps_its_heads_and_cache(ranks):
    for rank, res in enumerate(ranks):
        b = res["builtin"]
        assert b["attention"]["layers.0.attn"]["q_heads"] == [2 * rank, 2 * rank + 2]
        assert b["attention"]["layers.0.attn"]["kv_heads"] == [rank, rank + 1]
        assert b["kv_cache"] == [B, 1, 32, 16]
        assert b["tied"] and b["embed_rows"] == 128  # vocabulary-parallel embedding, LM head still tied
        m = res["mqa_sequence"]
        assert m["attention"]["layers.0.attn"]["kv_heads"] == [0, 1]  # the one KV head, on both ranks
        assert m["attention"]["layers.0.attn"]["kv_replicated"] is True
        assert m["kv_cache"] == [B, 1, 32, 16]
        assert any("replicated" in n for n in m["notes"])


def test_styles_follow_the_plan_and_the_structure(ranks):
    m = ranks[0]["mqa_sequence"]
    assert m["sources"]["layers.0.attn.wq"] == 0 and m["sources"]["layers.1.attn.wo"] == 1
    assert m["sources"]["lm_head"] == 2 and "layers.0.mlp.w1" not in m["sources"]  # inferred there
    hf = ranks[0]["hf"]
    if hf is not None:
        assert hf["styles"]["model.embed_tokens"] == "rowwise" and hf["styles"]["lm_head"] == "colwise"
        assert hf["styles"]["model.layers.1.self_attn.o_proj"] == "rowwise"
        assert hf["styles"]["model.layers.1.mlp.up_proj"] == "colwise"


def test_gemma2_and_sink_builtins_split(ranks):
    for res in ranks:
        for name, r in res["builtin_eager"].items():
            assert max(r["errors"]) < F32_TOL, (name, r)
            assert r["places"] == 2 * 7 + 2  # 7 linears per layer, the embedding and the LM head
        assert res["builtin_eager"]["sinks-tiny"]["sinks"] == [2]  # the rank's 2 of 4 query heads


def test_other_hugging_face_layouts_split_with_sequence_parallelism(ranks):
    if ranks[0]["hf_eager"] is None:
        pytest.skip("transformers is not installed")
    for res in ranks:
        for arch, r in res["hf_eager"].items():
            assert r["shape"] == [B, PROMPT + STEPS, 256]
            assert r["error"] < F32_TOL, (arch, r)
            assert r["reduce_scatter"] == 4, arch  # 8 tokens: split; o_proj and down_proj of 2 layers


def test_sequence_parallel_splits_the_prefill_only(ranks):
    prefill, decode = ranks[0]["mqa_sequence"]["reduce_scatter"]
    assert prefill == 4  # attention output and MLP down projection, in 2 layers
    assert decode == 0   # one token: the degree does not divide it, all-reduce instead


def test_a_degree_that_does_not_divide_the_heads_is_refused_at_apply(ranks):
    for res in ranks:
        r = res["bad_heads"]
        assert r["code"] == "PL307"
        assert "does not divide the query heads (3)" in r["message"]
        assert (r["line"], r["column"]) == (5, 11)  # the value of parallel.tensor
        assert r["hint"] and "3" in r["hint"]
        assert r["untouched"]


def test_a_degree_other_than_the_jobs_size_is_refused(ranks):
    r = ranks[1]["mismatch"]
    assert r["code"] == "PL307" and "tensor: 4 does not match the 2 process(es)" in r["message"]
    assert "--nproc 4" in r["hint"]


def test_a_split_style_on_a_norm_is_refused_at_its_place(ranks):
    r = ranks[0]["norm_style"]
    assert r["code"] == "PL309" and "selects no linear or embedding" in r["message"]
    assert r["line"] == 6


# ----------------------------------------------------------------------------- one process

def test_without_a_process_group_the_degree_is_refused_with_how_to_start():
    model = builtin(tiny_config())
    with pytest.raises(ApplyError) as exc:
        shard_model(model, make_plan({"parallel": {"tensor": 2}}), None, None)
    d = exc.value.diagnostics[0]
    assert d.code == "PL307" and "needs 2 processes" in d.message and "--nproc 2" in d.hint
    assert shard_model(model, make_plan({}), None, None) is None  # tensor: 1 splits nothing
    with pytest.raises(ApplyError) as exc:
        shard_model(model, make_plan({"mode": "training", "parallel": {"tensor": 2}}), None, None)
    assert "inference only" in exc.value.diagnostics[0].message


def test_lint_with_a_model_refuses_a_degree_that_does_not_divide_it(tmp_path):
    from planlang.runtime.modelcheck import model_diagnostics
    path = tmp_path / "three.yaml"
    path.write_text("planlang: 1\nname: three\nparallel:\n  tensor: 3\n")
    diags = model_diagnostics(load_with_source(str(path)), "builtin:llama-tiny", target=None, catalog=None)
    bad = [d for d in diags if d.code == "PL307"]
    assert bad and "query heads (4)" in bad[0].message and (bad[0].line, bad[0].column) == (4, 11)
    assert bad[0].hint


def test_styles_inferred_from_the_structure():
    model = Transformer(tiny_config())
    styles = infer_styles(model)
    assert styles["layers.0.attn.wq"] == styles["layers.1.attn.wv"] == "colwise"
    assert styles["layers.0.attn.wo"] == styles["layers.0.mlp.w2"] == "rowwise"
    assert styles["layers.0.mlp.w1"] == styles["layers.0.mlp.w3"] == "colwise"
    assert styles["embed"] == "rowwise" and styles["lm_head"] == "colwise"
    plan = make_plan({"parallel": {"tensor": 2, "styles": [{"at": "layers.1.**:linear", "style": "replicate"},
                                                            {"at": "layers.1.mlp.w2", "style": "rowwise"}]}})
    resolved, source, empty = resolve_styles(model, plan)
    assert resolved["layers.1.attn.wq"] == "replicate" and source["layers.1.attn.wq"] == 0
    assert resolved["layers.1.mlp.w2"] == "rowwise" and source["layers.1.mlp.w2"] == 1
    assert resolved["layers.0.attn.wq"] == "colwise" and source["layers.0.attn.wq"] is None
    assert resolved["lm_head"] == "colwise" and empty == []


def test_styles_inferred_for_a_hugging_face_llama():
    pytest.importorskip("transformers")
    styles = infer_styles(hf_model())
    assert {p for p, s in styles.items() if s == "colwise"} == {
        f"model.layers.{i}.{m}" for i in (0, 1) for m in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")} | {"lm_head"}
    assert {p for p, s in styles.items() if s == "rowwise"} == {
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.o_proj", "mlp.down_proj")} | {"model.embed_tokens"}


def test_nproc_is_dropped_from_the_command_the_ranks_run():
    assert strip_nproc(["apply", "p.yaml", "--nproc", "2", "--device", "cpu"]) == ["apply", "p.yaml", "--device", "cpu"]
    assert strip_nproc(["bench", "--nproc=4", "p.yaml"]) == ["bench", "p.yaml"]
    assert maybe_launch(["apply", "p.yaml"], None) is None
    assert maybe_launch(["apply", "p.yaml"], 1) is None


# ----------------------------------------------------------------------------- torchrun

_CHILD = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from planlang.runtime.parallel import init_distributed
    rank, world = init_distributed(torch.device("cpu"), timeout_s=20)
    assert (rank, world) == (int(os.environ["RANK"]), 2) and dist.get_backend() == "gloo"
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    print(f"rank {rank} sum {t.item()}", flush=True)
    if sys.argv[1] == "fail" and rank == 1:
        # at once, with no teardown: dead before rank 0 sees its connection close (a slower
        # exit races rank 0's own failure, and torchrun then stops rank 1 by a signal)
        os._exit(3)
    dist.all_reduce(t)   # rank 0 waits here for a rank that is gone: the job must stop, not hang
""")


def test_torchrun_job_runs_and_a_failing_rank_stops_it(capfd):
    t0 = time.perf_counter()
    assert run_torchrun(WORLD, ["-c", _CHILD, "ok"]) == 0
    out = capfd.readouterr().out
    assert "rank 0 sum 3.0" in out and "rank 1" not in out  # only rank 0 writes to stdout
    code = run_torchrun(WORLD, ["-c", _CHILD, "fail"])
    err = capfd.readouterr().err
    assert code in (1, 3) and "rank 1 of 2 failed (exit status 3)" in err
    assert time.perf_counter() - t0 < 60


# ----------------------------------------------------------------------------- once apply and the CLI are wired

def _cli_takes(*flags: str) -> bool:
    from planlang.cli import build_parser
    _, unknown = build_parser().parse_known_args(["apply", "p.yaml", *flags])
    return not unknown


def _wired_cli() -> bool:
    return _cli_takes("--nproc", "2")


@pytest.mark.skipif(not _wired_cli(), reason="the CLI has no --nproc yet")
def test_cli_apply_with_nproc_runs_two_ranks(tmp_path):
    import subprocess
    plan = tmp_path / "tp.yaml"
    plan.write_text("planlang: 1\nname: tp\ntarget: cpu\nfusions: [rmsnorm_residual, qkv, swiglu]\n"
                    "parallel:\n  tensor: 2\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    extra = ["--eval-tokens", "0"] if _cli_takes("--eval-tokens", "0") else []
    command = [sys.executable, "-m", "planlang.cli", "apply", str(plan), "builtin:llama-tiny", "--nproc", "2",
               "--device", "cpu", "--context", "16", "--format", "json", "--max-error", "1e-4", *extra]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # rank 0's report only
    rules = {r["what"]: r for r in result["report"]["rules"]}
    assert rules["tensor 2"]["section"] == "parallel"
    assert rules["qkv"]["places"] == ["layers.0.attn", "layers.1.attn"]
    assert result["numerics"]["rel_error"] < 1e-4
