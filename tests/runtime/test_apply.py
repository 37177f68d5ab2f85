"""`apply(model, plan)` on the built-in tiny models: every fusion, its report, and the
planned model against its unplanned twin (same weights) for prefill and decode.

Planned models are built once per module (apply traces with Dynamo, a few seconds each)
and shared by the tests that read them. float32 runs the Triton kernels (through Triton's
interpreter when there is no GPU: the test environment sets TRITON_INTERPRET=1), bfloat16
runs their PyTorch reference: both paths run.
"""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

from planlang.plan import Plan
from planlang.runtime.apply import PASSES, ApplyError, apply
from planlang.runtime.kernels.backend import triton_available
from planlang.runtime.models.registry import build_builtin
from .kernel_switch import kernels  # noqa: E402

MODELS = ["llama-tiny", "gemma2-tiny", "sinks-tiny"]
FUSIONS = ["rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention"]
B, PROMPT, STEPS, MAX_SEQ = 2, 5, 3, 16
F32_TOL = 1e-5  # norm-wise relative error of float32 logits
LAYERS = (0, 1)
EXPECTED_PLACES = {
    "rmsnorm_residual": [f"layers.{i}.{n}" for i in LAYERS for n in ("attn_norm", "mlp_norm")] + ["norm"],
    "qkv": [f"layers.{i}.attn" for i in LAYERS],
    "swiglu": [f"layers.{i}.mlp" for i in LAYERS],
    "rope_kvcache": [f"layers.{i}.attn" for i in LAYERS],
    "attention": [f"layers.{i}.attn" for i in LAYERS],
}
EXPECTED_KERNELS = {
    # the first layer's norm has no residual; norms read by a planlang GEMM fold into it (rmsnorm_gemm)
    "rmsnorm_residual": "planlang::rmsnorm, rmsnorm_gemm, rmsnorm_residual",
    "qkv": "planlang::qkv_linear",
    "swiglu": "planlang::swiglu_linear",
    # rope + cache write merge into the attention that reads the queries (rope_attention)
    "rope_kvcache": "planlang::rope_attention, rope_kvcache",
    "attention": "planlang::attention, rope_attention",
}


def make_plan(*fusions) -> Plan:
    plan, diags = Plan.from_document({"planlang": 1, "fusions": list(fusions)})
    assert plan is not None, diags
    return plan


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@contextlib.contextmanager
def rewrite_log():
    """Records (graph id, fusion kind, place, result) of every rewrite a pass makes."""
    log: list[tuple] = []
    for kind, fusion in PASSES.items():
        def logged(view, site, weights, _orig=fusion.rewrite, _kind=kind):
            done = _orig(view, site, weights)
            log.append((id(view.gm), _kind, site.path, done))
            return done
        fusion.rewrite = logged  # an instance attribute shadows the method
    try:
        yield log
    finally:
        for fusion in PASSES.values():
            fusion.__dict__.pop("rewrite", None)


def per_graph(log) -> list[set]:
    graphs = collections.OrderedDict()
    for gid, kind, path, done in log:
        graphs.setdefault(gid, set()).add((kind, path, done))
    return list(graphs.values())


def prompt_and_steps(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, PROMPT + STEPS), generator=torch.Generator().manual_seed(seed))


def decode(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill PROMPT tokens, then STEPS single-token steps; the logits of each call."""
    with torch.no_grad():
        out = [model(tokens[:, :PROMPT], torch.arange(PROMPT))]
        for p in range(PROMPT, PROMPT + STEPS):
            out.append(model(tokens[:, p:p + 1], torch.tensor([p])))
    return out


def example_run(model):
    """What apply traces: a prefill and one decode step (the two graphs decoding uses)."""
    tokens = prompt_and_steps(seed=1)
    with torch.no_grad():
        model(tokens[:, :PROMPT], torch.arange(PROMPT))
        model(tokens[:, PROMPT:PROMPT + 1], torch.tensor([PROMPT]))


class Planned:
    """A planned model, its unplanned twin, and what applying and decoding did."""

    def __init__(self, name: str, dtype: torch.dtype, plan: Plan, reference: bool = False):
        self.name, self.dtype = name, dtype
        self.model = build_builtin(name, dtype=dtype)
        self.twin = build_builtin(name, dtype=dtype)
        self.twin.setup_caches(B, MAX_SEQ)
        self.reference = reference
        with rewrite_log() as log, kernels(reference):
            self.backend = "triton" if triton_available("cpu")[0] else "reference"
            self.planned = apply(self.model, plan, example_inputs=example_run, max_batch=B, max_seq_len=MAX_SEQ)
            self.fused_before = dict(self.planned.fused_weights.tensors)
            tokens = prompt_and_steps()
            self.got, self.want = decode(self.planned, tokens), decode(self.twin, tokens)
        self.graphs = per_graph(log)
        self.truth = self.want
        if dtype != torch.float32:  # the float32 model, the yardstick for both bf16 runs
            exact = build_builtin(name)
            exact.setup_caches(B, MAX_SEQ)
            self.truth = decode(exact, tokens)

    def rule(self, kind: str):
        return next(r for r in self.planned.report.rules if r.what == kind)

    def __call__(self, *args):
        with kernels(self.reference):
            return self.planned(*args)


_PLANNED: dict = {}


def full_plan(name: str, dtype: torch.dtype) -> Planned:
    """The model planned with every fusion, built once per module run. Triton's
    interpreter is slow, so on the CPU only float32 runs the Triton kernels; bfloat16 runs
    their PyTorch reference (the kernel tests cover Triton in bfloat16)."""
    if (name, dtype) not in _PLANNED:
        _PLANNED[name, dtype] = Planned(name, dtype, make_plan(*FUSIONS), reference=dtype != torch.float32)
    return _PLANNED[name, dtype]


@pytest.fixture(scope="module", params=[(m, d) for d in (torch.float32, torch.bfloat16) for m in MODELS],
                ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def planned(request):
    return full_plan(*request.param)


# ----------------------------------------------------------------------------- every fusion

def test_report_lists_every_place_and_kernel(planned):
    for kind in FUSIONS:
        rule = planned.rule(kind)
        assert sorted(rule.places) == sorted(EXPECTED_PLACES[kind]), kind
        assert rule.kernel == f"{EXPECTED_KERNELS[kind]} ({planned.backend})", kind
        assert rule.note == ""
    assert ("reference" in planned.planned.report.backend) == (planned.backend == "reference")


def test_the_reference_path_and_the_triton_path_both_run():
    assert full_plan("llama-tiny", torch.bfloat16).backend == "reference"
    if triton_available("cpu")[0]:  # the interpreter (no GPU)
        assert full_plan("llama-tiny", torch.float32).backend == "triton"


def test_decoding_past_the_sliding_window_matches():
    """gemma2-tiny's even layers see the last 8 positions: decode on to positions 8..10."""
    case = full_plan("gemma2-tiny", torch.float32)
    start = PROMPT + STEPS
    tokens = torch.randint(0, 256, (B, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for i in range(3):
            pos = torch.tensor([start + i])
            got, want = case(tokens[:, i:i + 1], pos), case.twin(tokens[:, i:i + 1], pos)
            assert rel_err(got, want) < F32_TOL, f"position {start + i}"


def test_every_graph_is_rewritten_at_every_place(planned):
    # prefill and decode are two graphs; both must run every fused kernel
    assert len(planned.graphs) >= 2
    for graph in planned.graphs:
        for kind in FUSIONS:
            assert sorted(p for k, p, _ in graph if k == kind) == sorted(EXPECTED_PLACES[kind]), kind
        assert ("rmsnorm_residual", "layers.0.attn_norm", "rmsnorm") in graph
        assert ("rmsnorm_residual", "layers.1.attn_norm", "rmsnorm_residual") in graph


def test_prefill_and_decode_match_the_unplanned_twin(planned):
    """float32: the planned model matches its twin to 1e-5. bfloat16: two bf16 runs whose
    roundings differ anywhere drift apart by about bf16's own error on these logits (the
    unplanned bf16 model is already 1-2% off float32), so the planned bf16 model must stay
    within 3e-2 of its twin and be about as close to the float32 model as the twin is."""
    assert len(planned.got) == 1 + STEPS
    for step, (got, want, truth) in enumerate(zip(planned.got, planned.want, planned.truth)):
        assert got.dtype == want.dtype == planned.dtype
        assert torch.isfinite(got).all()
        if planned.dtype == torch.float32:
            assert rel_err(got, want) < F32_TOL, f"call {step}"
        else:
            assert rel_err(got, want) < 3e-2, f"call {step}"
            assert rel_err(got, truth) <= 1.5 * rel_err(want, truth) + 5e-3, f"call {step}"


def test_fused_weights_are_built_once_and_the_parts_are_views(planned):
    model, fused = planned.model, planned.planned.fused_weights.tensors
    # one fused QKV weight and one gate/up weight per layer, built at apply time only:
    # decoding (a second graph, several steps) rebuilt nothing
    assert len(fused) == 2 * len(LAYERS)
    assert {k: id(v) for k, v in fused.items()} == {k: id(v) for k, v in planned.fused_before.items()}
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attn, layer.mlp
        w_qkv = fused["qkv", tuple(f"layers.{i}.attn.{w}" for w in ("wq", "wk", "wv"))]
        w13 = fused["swiglu", (f"layers.{i}.mlp.w1", f"layers.{i}.mlp.w3")]
        assert torch.equal(w_qkv, torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))
        for part, whole in ((attn.wq, w_qkv), (attn.wk, w_qkv), (attn.wv, w_qkv), (mlp.w1, w13), (mlp.w3, w13)):
            # the module's weight is a view into the fused tensor: no second copy
            assert part.weight.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


def test_new_shapes_recompile_and_stay_fused():
    """Calls whose shapes differ from the traced ones make Dynamo recompile (the second
    one with symbolic sizes); the passes must find every site there too. Two planned
    models of one class with different float attributes (eps 1e-5 and 1e-6, norm offsets
    0 and 1) live in this process: the floats must stay constants in the new graphs."""
    other = full_plan("gemma2-tiny", torch.float32)
    case = full_plan("llama-tiny", torch.float32)
    gen = torch.Generator().manual_seed(3)
    with rewrite_log() as log, torch.no_grad():
        other(torch.randint(0, 256, (1, 2), generator=gen), torch.arange(2))
        for batch, length in ((1, 3), (1, 4)):
            tokens = torch.randint(0, 256, (batch, length), generator=gen)
            got = case(tokens, torch.arange(length))
            want = case.twin(tokens, torch.arange(length))
            assert rel_err(got, want) < F32_TOL
    assert per_graph(log), "no recompilation happened"
    for graph in per_graph(log):
        assert {k for k, _, _ in graph} == set(FUSIONS)
        assert len(graph) == sum(len(v) for v in EXPECTED_PLACES.values())


# ----------------------------------------------------------------------------- selectors and errors

def test_a_layer_selector_rewrites_only_that_layer():
    plan = make_plan(*({"kind": k, "at": "layers.0.*"} for k in ("rmsnorm_residual", "qkv", "swiglu")),
                     {"kind": "attention", "at": "layers.0.attn"},
                     {"kind": "rope_kvcache", "at": "layers.*.mlp", "required": False})  # no site: a note
    case = Planned("llama-tiny", torch.float32, plan)
    assert case.rule("rmsnorm_residual").places == ["layers.0.attn_norm", "layers.0.mlp_norm"]
    for kind in ("qkv", "attention"):
        assert case.rule(kind).places == ["layers.0.attn"]
    assert case.rule("swiglu").places == ["layers.0.mlp"]
    assert case.rule("rope_kvcache").places == []
    assert any("rope_kvcache" in n and "found no site" in n for n in case.planned.report.notes)
    for graph in case.graphs:
        assert {path for _, path, _ in graph} == {"layers.0.attn_norm", "layers.0.mlp_norm", "layers.0.attn",
                                                  "layers.0.mlp"}
    # layer 1 keeps its own weights: nothing fused there
    assert case.model.layers[1].attn.wq.weight.untyped_storage().data_ptr() != \
        case.model.layers[1].attn.wk.weight.untyped_storage().data_ptr()
    for got, want in zip(case.got, case.want):
        assert rel_err(got, want) < F32_TOL


def _snapshot(model):
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}


def _unchanged(model, snap) -> bool:
    now = dict(model.named_parameters())
    return all(now[n].data_ptr() == ptr and torch.equal(now[n], v) for n, (ptr, v) in snap.items())


def test_a_required_rule_naming_no_module_fails_before_the_model_changes():
    model = build_builtin("llama-tiny")
    snap = _snapshot(model)
    plan = make_plan("qkv", {"kind": "swiglu", "at": "blocks.*.ffn"})
    with pytest.raises(ApplyError) as err:
        apply(model, plan, max_batch=B, max_seq_len=MAX_SEQ)
    assert [d.code for d in err.value.diagnostics] == ["PL309"]
    assert "blocks.*.ffn" in err.value.diagnostics[0].message
    assert _unchanged(model, snap)


def test_a_required_rule_finding_no_site_fails_before_the_model_changes():
    model = build_builtin("llama-tiny")
    snap = _snapshot(model)
    with pytest.raises(ApplyError) as err:
        apply(model, make_plan("swiglu", {"kind": "qkv", "at": "layers.*.mlp"}), max_batch=B, max_seq_len=MAX_SEQ)
    (diag,) = err.value.diagnostics
    assert diag.code == "PL309" and "qkv" in diag.message and "found no site" in diag.message
    assert _unchanged(model, snap)  # the swiglu rule, which did find sites, built nothing either


def test_compile_mode_default_hands_the_rewritten_graph_to_inductor():
    """`compile: {mode: default}` runs the rewritten graphs (fused ops and all) through
    Inductor. Inductor re-reads every parameter as Dynamo traced it, so the fused weights
    are copies there (the parts are not turned into views of them) and the fused tensors
    registered on the graph have a source of their own."""
    plan, diags = Plan.from_document({"planlang": 1, "fusions": FUSIONS + ["linear"], "compile": {"mode": "default"}})
    assert plan is not None, diags
    model, twin = build_builtin("llama-tiny"), build_builtin("llama-tiny")
    twin.setup_caches(B, MAX_SEQ)
    wq_before = model.layers[0].attn.wq.weight.data_ptr()
    with kernels(reference=True):
        planned = apply(model, plan, example_inputs=example_run, max_batch=B, max_seq_len=MAX_SEQ)
        tokens = prompt_and_steps()
        got, want = decode(planned, tokens), decode(twin, tokens)
    assert "compiled with Inductor, mode default" in planned.report.notes
    assert any(n.startswith("fused weights: copies beside the model's parameters") for n in planned.report.notes)
    assert model.layers[0].attn.wq.weight.data_ptr() == wq_before
    for step, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) < F32_TOL, f"call {step}"


def test_a_plan_with_nothing_to_rewrite_runs_the_models_own_forward_without_dynamo():
    model = build_builtin("llama-tiny").eval()
    model.setup_caches(1, 32)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(5))
    want = model(ids, torch.arange(8))
    planned = apply(model, Plan.model_validate({"planlang": 1, "target": "auto"}), device=torch.device("cpu"))
    assert planned._forward == model.forward
    model.setup_caches(1, 32)
    assert torch.equal(planned(ids, torch.arange(8)), want)
    fused = apply(build_builtin("llama-tiny").eval(), Plan.model_validate({"planlang": 1, "fusions": ["qkv"]}),
                  device=torch.device("cpu"))
    assert fused._forward != fused.model.forward  # a plan that rewrites goes through its backend


def test_apply_takes_a_plan_path_or_document_and_says_what_else_it_wants(tmp_path):
    model = build_builtin("llama-tiny").eval()
    planned = apply(model, "plans/quickstart.yaml", device=torch.device("cpu"))
    text = str(planned.report)
    assert text.startswith("plan quickstart on cpu") and "fusions[1] qkv: 2 place(s) layers.0.attn" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("planlang: 1\nfusions:\n  - {kind: qkv, at: \"layers.*.mlp\"}\n")
    with pytest.raises(ApplyError) as err:
        apply(build_builtin("llama-tiny").eval(), str(bad), device=torch.device("cpu"))
    assert f"{bad}:3:" in str(err.value) and "PL309" in str(err.value) and "hint:" in str(err.value)
    with pytest.raises(ApplyError, match="PL108"):
        apply(build_builtin("llama-tiny").eval(), {"planlang": 1, "fusions": ["qkvv"]})
    with pytest.raises(TypeError, match="planlang.load"):
        apply(build_builtin("llama-tiny").eval(), 42)
