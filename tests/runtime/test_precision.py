"""The precision section applied: rule resolution, weights prepared once, the op each GEMM
becomes, and the numbers it computes (each path against its quantize-dequantize
emulation in float32)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from planlang.plan import Plan
from planlang.runtime.apply import ApplyError, apply
from planlang.runtime.models.registry import build_builtin
from planlang.runtime.passes.precision import GemmPrecision, PrecisionMap, check_device, lm_head_paths
from planlang.runtime.precision.formats import fake_quantize

FUSIONS = [{"kind": "qkv", "at": "**"}, {"kind": "swiglu", "at": "**"},
           {"kind": "linear", "at": "**", "required": False}]


def _plan(rules=None, preset=None, fusions=FUSIONS, **precision) -> Plan:
    prec = dict(precision)
    if rules is not None:
        prec["rules"] = rules
    if preset is not None:
        prec["preset"] = preset
    return Plan.model_validate({"planlang": 1, "target": "cpu", "fusions": fusions, "precision": prec,
                                "limits": {"max_batch": 2, "max_seq_len": 64}})


def _model(dtype=torch.float32):
    m = build_builtin("llama-tiny", dtype=dtype)
    m.setup_caches(2, 64)
    return m


def _tokens(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, n), generator=g)


def _run(m, ids):
    return m(ids, torch.arange(ids.shape[1])).float()


def _fake_model(m, wanted, **kw):
    """A copy of `m` whose linears named by `wanted(path)` hold fake-quantized weights."""
    m2 = copy.deepcopy(m)
    m2.lm_head.weight = torch.nn.Parameter(m2.embed.weight.detach().clone())  # untie: the head keeps bf16
    for name, mod in m2.named_modules():
        if isinstance(mod, torch.nn.Linear) and wanted(name):
            mod.weight.data = fake_quantize(mod.weight.data.float(), **kw).to(mod.weight.dtype)
    return m2


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- resolution

def test_last_rule_wins_and_linear_excludes_the_lm_head():
    m = _model()
    pmap = PrecisionMap(m, _plan([{"at": "**:linear", "dtype": "fp8_e4m3"},
                                  {"at": "layers.1.mlp", "dtype": "fp8_e5m2", "scaling": "tensor"},
                                  {"at": "**:lm_head", "dtype": "bf16"}]))
    assert lm_head_paths(m) == {"lm_head"}
    assert pmap.gemm("layers.0.attn.wq").dtype == "fp8_e4m3"
    assert pmap.gemm("layers.1.mlp.w2").dtype == "fp8_e5m2"
    assert pmap.gemm("layers.1.mlp.w2").scaling == "tensor"
    assert pmap.gemm("lm_head").dtype == "bf16"
    assert pmap.gemm("layers.0.attn.wq").scaling == "channel"  # the spec's default for fp8


class _Wide(torch.nn.Module):
    """A block whose inner linear is as wide as the vocabulary (hidden size == vocab)."""

    def __init__(self, dim):
        super().__init__()
        self.up = torch.nn.Linear(dim, dim, bias=False)
        self.down = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _NoHeadAttribute(torch.nn.Module):
    """No `lm_head`, no `get_output_embeddings`: the head is found by its place."""

    def __init__(self, vocab=32, tied=False):
        super().__init__()
        self.config = {"vocab_size": vocab}
        self.tok = torch.nn.Embedding(vocab, vocab)
        self.blocks = torch.nn.ModuleList(_Wide(vocab) for _ in range(2))
        self.out = torch.nn.Linear(vocab, vocab, bias=False)
        if tied:
            self.out.weight = self.tok.weight

    def forward(self, ids):
        h = self.tok(ids)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def test_linears_as_wide_as_the_vocabulary_inside_the_blocks_are_not_lm_heads():
    m = _NoHeadAttribute()
    assert lm_head_paths(m) == {"out"}
    pmap = PrecisionMap(m, _plan([{"at": "**:linear", "dtype": "bf16"}], fusions=[]))
    assert pmap.op_kind("blocks.0.up") == pmap.op_kind("blocks.1.down") == "linear"
    assert pmap.gemm("blocks.1.down").dtype == "bf16" and pmap.gemm("out") is None


def test_a_linear_tied_to_the_input_embedding_is_the_lm_head():
    m = _NoHeadAttribute(tied=True)
    m.extra = torch.nn.Linear(32, 32, bias=False)  # wide, outside the blocks, later: not tied
    assert lm_head_paths(m) == {"out"}


def test_the_lm_head_is_the_one_modelcheck_names_on_a_model_whose_hidden_size_is_its_vocabulary():
    from planlang.runtime.modelcheck import op_of
    m = build_builtin("llama-tiny-trained")
    assert m.config.dim == m.config.vocab_size  # 256 and 256: wq, wo, w2 are all vocab-wide
    heads = {n for n, mod in m.named_modules() if op_of(m, n, mod) == "lm_head"}
    assert lm_head_paths(m) == heads == {"lm_head"}
    pmap = PrecisionMap(m, _plan([{"at": "**:linear", "dtype": "fp8_e4m3", "emulate": True}]))
    linears = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    assert len(linears) == 28
    assert all(pmap.gemm(n) is not None for n in linears) and pmap.gemm("lm_head") is None


def test_a_linear_rule_changes_every_linear_of_the_trained_model_but_the_lm_head():
    m = build_builtin("llama-tiny-trained")
    m.setup_caches(1, 16)
    planned = apply(m, _plan([{"at": "**:linear", "dtype": "fp8_e4m3", "emulate": True}], fusions=[]),
                    device=torch.device("cpu"))
    linears = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert set(planned.report.precision) == linears - {"lm_head"} and len(linears - {"lm_head"}) == 28


def test_a_preset_expands_before_the_plans_own_rules():
    pmap = PrecisionMap(_model(), _plan([{"at": "layers.0.attn:linear", "dtype": "fp32"}], preset="fp8_weight_only"))
    assert pmap.gemm("layers.1.attn.wq").dtype == "fp8_e4m3"
    assert pmap.gemm("layers.0.attn.wq") is None   # fp32 on an fp32 model: nothing to do
    assert pmap.gemm("lm_head") is None            # the preset leaves the LM head


def test_a_rule_in_the_models_own_dtype_changes_nothing():
    pmap = PrecisionMap(_model(torch.bfloat16), _plan([{"at": "**", "dtype": "bf16"}]))
    assert pmap.gemm("layers.0.attn.wq") is None


def test_the_device_gates_fp8_and_block_formats_at_apply_time(monkeypatch):
    pmap = PrecisionMap(_model(), _plan([{"at": "**:linear", "dtype": "fp8_e4m3"},
                                         {"at": "layers.0:linear", "dtype": "nvfp4"},
                                         {"at": "layers.1:linear", "dtype": "mxfp4", "emulate": True}]))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    msgs = check_device(pmap, torch.device("cuda"))
    assert [(i, "sm_89+" in m or "sm_100+" in m) for i, m, _ in msgs] == [(0, True), (1, True)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert [i for i, _, _ in check_device(pmap, torch.device("cuda"))] == [1]  # nvfp4 on sm_90; emulate passes
    assert check_device(pmap, torch.device("cpu")) == []


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("dtype,kw", [
    ("fp8_e4m3", {"scaling": "channel"}),
    ("fp8_e5m2", {"scaling": "block", "block_size": 32}),
    ("nvfp4", {}),
    ("mxfp4", {}),
])
def test_emulated_weights_compute_the_formats_numbers(dtype, kw):
    m = _model()
    ids = _tokens()
    rule = {"at": "**:linear", "dtype": dtype, "emulate": True, **kw}
    want = _run(_fake_model(m, lambda p: p != "lm_head", dtype=dtype, **kw), ids)
    planned = apply(m, _plan([rule]))
    got = _run(planned, ids)
    assert rel(got, want) < 1e-5
    assert rel(got, _run(m, ids)) > 1e-4  # the format did change the numbers
    gemms = planned.report.precision
    assert gemms["layers.0.attn.wq"]["kernel"] == "emulated_linear" and "lm_head" not in gemms


def test_emulated_activations_are_quantized_at_the_op_boundary():
    m = _model()
    ids = _tokens(1)
    planned = apply(m, _plan([{"at": "layers.0.mlp.w2", "dtype": "nvfp4", "emulate": True,
                               "activations": "per_block"}], fusions=[]))
    ref = copy.deepcopy(m)
    w = fake_quantize(m.layers[0].mlp.w2.weight.float(), "nvfp4")
    ref.layers[0].mlp.w2.forward = lambda x: fake_quantize(x.float(), "nvfp4") @ w.t()
    want = _run(ref, ids)
    got = _run(planned, ids)
    assert rel(got, want) < 1e-5


def test_a_base_dtype_rule_casts_the_weight_once_and_the_input_at_the_boundary():
    m = _model()
    ids = _tokens(2)
    planned = apply(m, _plan([{"at": "layers.0.mlp:linear", "dtype": "bf16"}]))
    ref = copy.deepcopy(m)
    for name in ("w1", "w2", "w3"):
        lin = getattr(ref.layers[0].mlp, name)
        lin.weight.data = lin.weight.data.bfloat16().float()
        orig = lin.forward
        lin.forward = (lambda o: lambda x: o(x.bfloat16().float()).bfloat16().float())(orig)
    got, want = _run(planned, ids), _run(ref, ids)
    assert rel(got, want) < 2e-2
    assert planned.report.precision["layers.0.mlp.w1"]["dtype"] == "bf16"


def test_a_fused_gemm_whose_parts_disagree_is_not_fused_and_says_why():
    m = _model()
    planned = apply(m, _plan([{"at": "layers.0.attn.wq", "dtype": "fp8_e4m3", "emulate": True}]))
    qkv = next(r for r in planned.report.rules if r.what == "qkv")
    assert "layers.0.attn" not in qkv.places and "layers.1.attn" in qkv.places
    assert "different precisions" in qkv.note and "layers.0.attn.wq: fp8_e4m3" in qkv.note
    assert planned.report.precision["layers.0.attn.wq"]["kernel"] == "emulated_linear"


def test_fp8_weights_run_the_fp8_kernels_and_equal_their_emulation():
    pytest.importorskip("planlang.runtime.kernels.fp8_linear")
    m = _model(torch.bfloat16)
    ids = _tokens(3, n=4)
    emulated = apply(copy.deepcopy(m), _plan([{"at": "**:linear", "dtype": "fp8_e4m3", "emulate": True}]))
    want = _run(emulated, ids)
    planned = apply(m, _plan([{"at": "**:linear", "dtype": "fp8_e4m3"}]))
    got = _run(planned, ids)
    assert rel(got, want) < 2e-2  # bf16 activations between the GEMMs; one rounding apart
    kernels = {v["kernel"] for v in planned.report.precision.values()}
    assert kernels == {"fp8_linear"}
    rows = planned.report.precision["layers.0.attn.wo"]["by_rows"]
    assert rows[1].startswith("fp8_gemv") and "gemv" not in rows[2048]


def test_the_report_names_rules_for_ops_that_stay_as_they_are():
    planned = apply(_model(), _plan([{"at": "**:kv_cache", "dtype": "fp8_e4m3", "emulate": True},
                                     {"at": "**:norm", "dtype": "fp32"}]))
    notes = {r.at: r.note for r in planned.report.rules if r.section.startswith("precision")}
    assert "KV cache" in notes["**:kv_cache"] and "fp32" in notes["**:norm"]


def test_default_casts_the_model_once():
    m = _model()
    planned = apply(m, _plan([], default="bf16"))
    assert m.layers[0].attn.wq.weight.dtype == torch.bfloat16
    assert any("cast from float32 to bf16" in n for n in planned.report.notes)
    out = planned(_tokens(4), torch.arange(12))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_gemm_precision_describes_itself():
    spec = GemmPrecision("fp8_e4m3", "block", 128, "per_token", False, 0, "**")
    assert spec.describe() == "fp8_e4m3, block scales of 128, activations per_token"


def test_each_rule_reports_the_error_of_the_gemm_outputs_it_changes():
    planned = apply(_model(), _plan([{"at": "**:linear", "dtype": "fp8_e5m2", "emulate": True},
                                     {"at": "layers.1.mlp:linear", "dtype": "nvfp4", "emulate": True}]))
    rules = {r.what: r for r in planned.report.rules if r.section.startswith("precision")}
    e5m2, nvfp4 = rules["fp8_e5m2"].error, rules["nvfp4"].error
    assert e5m2["gemms"] == 11 and nvfp4["gemms"] == 3   # 14 linears; the later rule takes layers.1.mlp
    assert 0.01 < e5m2["rel_error"] < 0.2 and 0.03 < nvfp4["rel_error"] < 0.5
    assert nvfp4["worst"][0].startswith("layers.1.mlp.")
