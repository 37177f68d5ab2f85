"""`apply(model, plan)` on tiny Hugging Face models built offline from a config (no
download): Llama, Qwen2 (q/k/v biases), Mistral (sliding window) and Gemma-2 (GeGLU,
(1 + w) norms, post-attention/post-feedforward norms, attention and final soft-caps).

Decoding runs over `transformers.StaticCache`, whose layers write with `index_copy_` at
`arange(T) + counter`: `attention` fuses there (its mask is a position mask over the cache
slots), and so does `rope_kvcache`: Hugging Face computes cos/sin from the position ids
each call, so the pass takes them as per-token tensors (planlang::rope_kvcache_tokens: the
rotation with those rows, the cache writes at the cache's own positions). Without a static
cache (the default: a dynamic cache that concatenates; or no cache at all) the rotation
still fuses (planlang::rope_tokens) and `attention` does not, and its pass says why.
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
FUSED = ["rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention"]
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
        plan = make_plan(*FUSED)
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
    for kind in ("qkv", "rope_kvcache", "attention"):
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
        for kind in ("qkv", "swiglu", "rope_kvcache", "attention"):
            assert len(places[kind]) == len(LAYERS), kind
        assert {done for kind, _, done, _ in graph if kind == "rope_kvcache"} == {"rope_kvcache_tokens"}


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


def test_rope_kvcache_takes_the_per_token_cos_sin_and_the_static_cache_writes(planned):
    """cos/sin come from the model's rotary embedding of the position ids; the writes are
    StaticCache's `index_copy_` at its counter: one fused op per layer does both."""
    for graph in planned.graphs:
        info = {path: i for kind, path, _, i in graph if kind == "rope_kvcache"}
        assert sorted(info) == [f"model.layers.{i}.self_attn" for i in LAYERS]
        assert all(i == {"cos_sin": "per_token", "cache": "static"} for i in info.values()), info
    assert "rope_kvcache_tokens" in planned.rule("rope_kvcache").kernel
    assert explain_misses(planned.views, "rope_kvcache", lambda path: True) == {}
    assert not any("rope_kvcache" in n for n in planned.planned.report.notes)


def test_the_planned_static_cache_holds_what_the_twins_holds():
    """The fused op wrote the rotated keys and the values where StaticCache would."""
    case = _PLANNED.get("qwen2") or Planned("qwen2")
    tokens = tokens_for(4)
    caches = []
    for model in (case.planned, case.twin):
        cache = static_cache(case.model)
        with torch.no_grad(), kernels_for("qwen2"):
            model(input_ids=tokens[:, :PROMPT], cache=cache, use_cache=True)
            model(input_ids=tokens[:, PROMPT:PROMPT + 1], cache=cache, use_cache=True)
        caches.append(cache)
    for got, want in zip(*(c.layers for c in caches)):
        assert torch.isfinite(got.keys).all() and torch.isfinite(got.values).all()
        assert rel_err(got.keys, want.keys) < F32_TOL and rel_err(got.values, want.values) < F32_TOL


def rope_rewrites(log, since: int = 0) -> dict:
    """Graph id -> {place: what the rope_kvcache pass did} for the rewrites after `since`."""
    out: dict = {}
    for gid, kind, path, done, info in log.rewrites[since:]:
        if kind == "rope_kvcache":
            out.setdefault(gid, {})[path] = (done, info["cache"])
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_without_a_static_cache_rope_fuses_alone_and_attention_says_why(arch):
    """The default trace (token ids only: a dynamic cache that concatenates) and a forward
    without any cache: the rotation is fused (planlang::rope_tokens), the cache code stays
    the model's, attention is left out with its reason; decoding over the dynamic cache
    and the cache-less forward match the twin."""
    model, twin = build(arch), build(arch)
    plan = make_plan("rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", {"kind": "attention", "required": False})
    layers = [f"model.layers.{i}.self_attn" for i in LAYERS]
    with pass_log() as log, kernels_for("default"):
        planned = apply(model, plan)
        rules = {r.what: r for r in planned.report.rules}
        assert rules["qkv"].places == rules["rope_kvcache"].places == layers
        assert rules["rope_kvcache"].kernel.startswith("planlang::rope_tokens")
        assert rules["attention"].places == []
        assert any("attention" in n and "found no site" in n for n in planned.report.notes)
        why = explain_misses(log.views, "attention", lambda path: True)
        assert sorted(why) == layers and all("not read from a static cache" in w for w in why.values()), why
        assert explain_misses(log.views, "rope_kvcache", lambda path: True) == {}

        tokens = tokens_for(3)
        with torch.no_grad():
            seen = len(log.rewrites)
            got = planned(input_ids=tokens, use_cache=False).logits  # a new graph: no cache at all
            want = twin(input_ids=tokens, use_cache=False).logits
            assert rel_err(got, want) < F32_TOL
            no_cache = rope_rewrites(log, seen)
            outs = [m(input_ids=tokens[:, :PROMPT], use_cache=True) for m in (planned, twin)]
            for p in range(PROMPT, PROMPT + STEPS):  # the dynamic cache the model's own code extends
                outs = [m(input_ids=tokens[:, p:p + 1], cache=o.cache, use_cache=True)
                        for m, o in zip((planned, twin), outs)]
                assert rel_err(outs[0].logits, outs[1].logits) < F32_TOL, p
    assert no_cache, "the cache-less forward was traced and rewritten"
    for graph in rope_rewrites(log).values():
        assert graph == {path: ("rope_tokens", "none") for path in layers}


def test_a_rolled_sliding_window_cache_is_no_attention_site():
    """Gemma-2 with a window shorter than the prompt: its sliding layers' static cache
    takes the prompt without a write (then rolls), so only the full-attention layer
    fuses attention and the cache write; the sliding layer's rotation fuses alone (its
    cache code stays the model's), and the model still matches its twin."""
    model, twin = build("gemma2", sliding_window=4), build("gemma2", sliding_window=4)
    plan = make_plan({"kind": "attention", "required": False}, "rope_kvcache")
    with pass_log() as log, kernels_for("gemma2"):
        planned = apply(model, plan, example_inputs=lambda m: decode(m, tokens_for(1), steps=1))
        tokens = tokens_for(0)
        got, want = decode(planned, tokens), decode(twin, tokens)
    assert {path for _, kind, path, *_ in log.rewrites if kind == "attention"} == {"model.layers.1.self_attn"}
    for graph in rope_rewrites(log).values():
        assert graph == {"model.layers.0.self_attn": ("rope_tokens", "none"),
                         "model.layers.1.self_attn": ("rope_kvcache_tokens", "static")}
    why = explain_misses(log.views, "attention", lambda path: True)
    assert set(why) == {"model.layers.0.self_attn"}
    for g, w in zip(got, want):
        assert rel_err(g, w) < F32_TOL


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_partial_rotary_is_left_unfused_with_the_reason(cache):
    """Phi rotates only the first half of each head (`partial_rotary_factor`) and concatenates
    the rest unrotated: no rotation of a whole projection, so no site, the pass says why, and
    the model still matches its twin."""
    def phi():
        config = transformers.PhiConfig(**COMMON, partial_rotary_factor=0.5)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        return transformers.PhiForCausalLM(config).eval()

    model, twin = phi(), phi()
    plan = make_plan({"kind": "rope_kvcache", "required": False})
    example = (lambda m: decode(m, tokens_for(1), steps=1)) if cache == "static" else None
    with pass_log() as log, kernels_for("default"):
        planned = apply(model, plan, example_inputs=example)
        tokens = tokens_for(0)
        if cache == "static":
            got, want = decode(planned, tokens), decode(twin, tokens)
        else:
            with torch.no_grad():
                got, want = [planned(input_ids=tokens).logits], [twin(input_ids=tokens).logits]
    assert planned.report.rules[0].places == []
    why = explain_misses(log.views, "rope_kvcache", lambda path: True)
    assert sorted(why) == [f"model.layers.{i}.self_attn" for i in LAYERS]
    reason = "is not rotated" if cache == "static" else "partial rotary"
    assert all(reason in w for w in why.values()), why
    for g, w in zip(got, want):
        assert rel_err(g, w) < F32_TOL
