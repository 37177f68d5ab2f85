"""`apply(model, plan)` on tiny Hugging Face models built offline from a config (no
download): Llama, Qwen2 (q/k/v biases), Mistral (sliding window) and Gemma-2 (GeGLU,
(1 + w) norms, post-attention/post-feedforward norms, attention and final soft-caps).

Decoding runs over `transformers.StaticCache`, whose layers write with `index_copy_` at
`arange(T) + counter`: `attention` fuses there (its mask is a position mask over the cache
slots). `rope_kvcache` does not: Hugging Face computes cos/sin from the position ids each
call and writes the cache at its own counter, two tensors the fused kernel would need to be
one, so the rule is `required: false` and the pass says why. Without a static cache
(the default: a dynamic cache that concatenates) neither applies, and the passes say why.
"""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from planlang.plan import Plan  # noqa: E402
from planlang.runtime.apply import PASSES, apply  # noqa: E402
from planlang.runtime.kernels.backend import triton_available  # noqa: E402
from planlang.runtime.passes.fusions import explain_misses  # noqa: E402
from .kernel_switch import kernels  # noqa: E402

B, PROMPT, STEPS, MAX_CACHE = 2, 5, 3, 16
F32_TOL = 1e-5
LAYERS = (0, 1)
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=256, max_position_embeddings=64)
# Sliding windows as long as the whole test sequence: the static sliding-window cache
# stays a plain static cache (it rolls once full, and a rolled cache is no site).
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "sdpa"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}, "eager"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}, "eager"),
}
FUSED = ["rmsnorm_residual", "qkv", "swiglu", "attention"]
TRITON_ARCH = "llama"


def build(arch: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra, attn = ARCHS[arch]
    config = getattr(transformers, config_cls)(**COMMON, **{**extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def make_plan(*fusions) -> Plan:
    plan, diags = Plan.from_document({"planlang": 1, "fusions": list(fusions)})
    assert plan is not None, diags
    return plan


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


class Log:
    """What the passes did while it was installed: every rewrite (graph id, kind, place,
    result, site info) and every graph a pass searched (for `explain_misses`)."""

    def __init__(self):
        self.rewrites: list[tuple] = []
        self.views: list = []


@contextlib.contextmanager
def pass_log():
    log = Log()
    for kind, fusion in PASSES.items():
        def rewrite(view, site, weights, _orig=fusion.rewrite, _kind=kind):
            done = _orig(view, site, weights)
            log.rewrites.append((id(view.gm), _kind, site.path, done, dict(site.info)))
            return done

        def find(view, _orig=fusion.find):
            if all(v is not view for v in log.views):
                log.views.append(view)
            return _orig(view)
        fusion.rewrite, fusion.find = rewrite, find  # instance attributes shadow the methods
    try:
        yield log
    finally:
        for fusion in PASSES.values():
            fusion.__dict__.pop("rewrite", None)
            fusion.__dict__.pop("find", None)


def static_cache(model):
    cfg = model.config
    cache = transformers.StaticCache(config=cfg, max_cache_len=MAX_CACHE)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(B, cfg.num_key_value_heads, head_dim, torch.float32, torch.device("cpu"))
    return cache


def decode(model, tokens, steps: int = STEPS) -> list[torch.Tensor]:
    """Prefill, then `steps` single-token steps over a fresh static cache; each call's logits."""
    cache = static_cache(model)
    with torch.no_grad():
        out = [model(input_ids=tokens[:, :PROMPT], cache=cache, use_cache=True).logits]
        for p in range(PROMPT, PROMPT + steps):
            out.append(model(input_ids=tokens[:, p:p + 1], cache=cache, use_cache=True).logits)
    return out


def tokens_for(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (B, PROMPT + STEPS), generator=torch.Generator().manual_seed(seed))


def kernels_for(arch: str):
    """Triton's interpreter is slow: it runs the kernels for one architecture (Llama,
    whose attention hands the kernel a strided query view); the others run the kernels'
    PyTorch reference (the passes are what these tests are about). On a GPU machine
    these CPU models run the reference anyway."""
    return kernels(reference=arch != TRITON_ARCH)


class Planned:
    def __init__(self, arch: str):
        self.arch = arch
        self.model, self.twin = build(arch), build(arch)
        plan = make_plan(*FUSED, {"kind": "rope_kvcache", "required": False})
        with pass_log() as log, kernels_for(arch):
            self.planned = apply(self.model, plan, example_inputs=lambda m: decode(m, tokens_for(1), steps=1))
            tokens = tokens_for(0)
            self.got, self.want = decode(self.planned, tokens), decode(self.twin, tokens)
        self.views = log.views
        graphs = collections.OrderedDict()
        for gid, kind, path, done, info in log.rewrites:
            graphs.setdefault(gid, []).append((kind, path, done, info))
        self.graphs = list(graphs.values())

    def rule(self, kind):
        return next(r for r in self.planned.report.rules if r.what == kind)


_PLANNED: dict = {}


@pytest.fixture(scope="module", params=list(ARCHS))
def planned(request):
    if request.param not in _PLANNED:
        _PLANNED[request.param] = Planned(request.param)
    return _PLANNED[request.param]


def norm_places(arch):
    names = ["input_layernorm", "post_attention_layernorm"]
    if arch == "gemma2":
        names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    return sorted([f"model.layers.{i}.{n}" for i in LAYERS for n in names] + ["model.norm"])


def test_report_places_use_the_models_own_module_names(planned):
    assert sorted(planned.rule("rmsnorm_residual").places) == norm_places(planned.arch)
    for kind in ("qkv", "attention"):
        assert planned.rule(kind).places == [f"model.layers.{i}.self_attn" for i in LAYERS], kind
    assert planned.rule("swiglu").places == [f"model.layers.{i}.mlp" for i in LAYERS]
    backend = "triton" if planned.arch == TRITON_ARCH and triton_available("cpu")[0] else "reference"
    for kind in FUSED:
        kernel = planned.rule(kind).kernel
        assert kernel.startswith("planlang::") and "none" not in kernel and kernel.endswith(f"({backend})"), kind


def test_every_graph_runs_the_fused_kernels(planned):
    """Prefill and decode are separate graphs; each is rewritten at every place."""
    assert len(planned.graphs) >= 2
    for graph in planned.graphs:
        places = collections.defaultdict(list)
        for kind, path, done, _ in graph:
            assert not done.startswith("skipped"), (kind, path, done)
            places[kind].append(path)
        assert sorted(places["rmsnorm_residual"]) == norm_places(planned.arch)
        assert len(places["qkv"]) == len(places["swiglu"]) == len(places["attention"]) == len(LAYERS)
        assert "rope_kvcache" not in places


def test_norms_take_the_residual_add_only_where_it_feeds_them(planned):
    """Gemma-2 adds the residual after a post-norm: the post-norms (inputs: attention and
    MLP outputs) are plain norms, the pre-feedforward norm and the next layer's input
    norm take the add. The first input norm reads the embeddings: no add."""
    for graph in planned.graphs:
        done = {path: result for kind, path, result, _ in graph if kind == "rmsnorm_residual"}
        assert done["model.layers.0.input_layernorm"] == "rmsnorm"
        assert done["model.layers.1.input_layernorm"] == "rmsnorm_residual"
        assert done["model.norm"] == "rmsnorm_residual"
        if planned.arch == "gemma2":
            for i in LAYERS:
                assert done[f"model.layers.{i}.post_attention_layernorm"] == "rmsnorm"
                assert done[f"model.layers.{i}.post_feedforward_layernorm"] == "rmsnorm"
                assert done[f"model.layers.{i}.pre_feedforward_layernorm"] == "rmsnorm_residual"
        else:
            assert done["model.layers.0.post_attention_layernorm"] == "rmsnorm_residual"


def test_site_options_are_read_from_the_model(planned):
    info = {(k, p): i for graph in planned.graphs for k, p, _, i in graph}
    cfg = planned.model.config
    for i in LAYERS:
        norm = info["rmsnorm_residual", f"model.layers.{i}.input_layernorm"]
        assert norm["eps"] == pytest.approx(cfg.rms_norm_eps)
        assert norm["offset"] == (1.0 if planned.arch == "gemma2" else 0.0)
        assert info["swiglu", f"model.layers.{i}.mlp"]["act"] == ("gelu_tanh" if planned.arch == "gemma2" else "silu")
        assert info["qkv", f"model.layers.{i}.self_attn"]["bias"] == (planned.arch == "qwen2")
        attn = info["attention", f"model.layers.{i}.self_attn"]
        assert attn["softcap"] == (50.0 if planned.arch == "gemma2" else None)
        sliding = planned.arch == "mistral" or (planned.arch == "gemma2" and i == 0)
        assert attn["window"] == (8 if sliding else None)
        assert attn["scale"] in (None, pytest.approx(16 ** -0.5))


def test_qwen2_biases_are_fused_once():
    case = _PLANNED.get("qwen2") or Planned("qwen2")
    fused = case.planned.fused_weights.tensors
    for i in LAYERS:
        attn = case.model.model.layers[i].self_attn
        members = tuple(f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv")
        bias = fused["qkv", members, "bias"]
        assert torch.equal(bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        assert attn.k_proj.bias.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()


def test_prefill_and_decode_match_the_unplanned_twin(planned):
    assert len(planned.got) == 1 + STEPS
    for step, (got, want) in enumerate(zip(planned.got, planned.want)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < F32_TOL, f"call {step}"


def test_rope_kvcache_is_left_out_and_the_pass_says_why(planned):
    rule = planned.rule("rope_kvcache")
    assert rule.places == []
    assert any("rope_kvcache" in n and "found no site" in n for n in planned.planned.report.notes)
    why = explain_misses(planned.views, "rope_kvcache", lambda path: True)
    assert sorted(why) == [f"model.layers.{i}.self_attn" for i in LAYERS]
    assert all("cos/sin are computed each call" in w for w in why.values())


def test_without_a_static_cache_attention_and_rope_are_left_out_with_reasons():
    """The default trace (token ids only: a dynamic cache) fuses the norms and linears."""
    model, twin = build("llama"), build("llama")
    plan = make_plan("rmsnorm_residual", "qkv", "swiglu",
                     *({"kind": k, "required": False} for k in ("rope_kvcache", "attention")))
    with pass_log() as log, kernels_for("default"):
        planned = apply(model, plan)
    rules = {r.what: r for r in planned.report.rules}
    assert rules["qkv"].places == [f"model.layers.{i}.self_attn" for i in LAYERS]
    assert rules["rope_kvcache"].places == rules["attention"].places == []
    for kind, reason in (("rope_kvcache", "no static KV-cache write"), ("attention", "not read from a static cache")):
        assert any(kind in n and "found no site" in n for n in planned.report.notes)
        why = explain_misses(log.views, kind, lambda path: True)
        assert sorted(why) == [f"model.layers.{i}.self_attn" for i in LAYERS], kind
        assert all(reason in w for w in why.values()), why
    tokens = tokens_for(3)
    with torch.no_grad(), kernels_for("default"):
        got = planned(input_ids=tokens, use_cache=False).logits
        want = twin(input_ids=tokens, use_cache=False).logits
    assert rel_err(got, want) < F32_TOL


def test_a_rolled_sliding_window_cache_is_no_attention_site():
    """Gemma-2 with a window shorter than the prompt: its sliding layers' static cache
    takes the prompt without a write (then rolls), so only the full-attention layer
    fuses, and the model still matches its twin."""
    model, twin = build("gemma2", sliding_window=4), build("gemma2", sliding_window=4)
    plan = make_plan({"kind": "attention", "required": False})
    with pass_log() as log, kernels_for("gemma2"):
        planned = apply(model, plan, example_inputs=lambda m: decode(m, tokens_for(1), steps=1))
        tokens = tokens_for(0)
        got, want = decode(planned, tokens), decode(twin, tokens)
    assert {path for _, kind, path, *_ in log.rewrites if kind == "attention"} == {"model.layers.1.self_attn"}
    why = explain_misses(log.views, "attention", lambda path: True)
    assert set(why) == {"model.layers.0.self_attn"}
    for g, w in zip(got, want):
        assert rel_err(g, w) < F32_TOL
