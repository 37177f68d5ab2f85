"""graphs.pdl: the plan says whether kernels launch with Programmatic Dependent Launch.

apply refuses `pdl: on` where the device cannot honour it (PL210, as lint does for the
target), and the plan's setting is in force while the model is applied (compiles, graph
captures) and at every call of the planned model; PLANLANG_PDL, when set, overrides it.
"""
import pytest
import torch

from planlang.plan import Plan
from planlang.runtime.apply import ApplyError, apply
from planlang.runtime.kernels import backend
from planlang.runtime.models.registry import build_builtin


def plan_of(**graphs) -> Plan:
    plan, diags = Plan.from_document({"planlang": 1, "fusions": ["rmsnorm_residual"], "graphs": graphs})
    assert plan is not None, diags
    return plan


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(backend.PDL_ENV, raising=False)


@pytest.mark.parametrize("mode,want", [("on", True), ("off", False), ("auto", backend.PDL_DEFAULT),
                                       (None, backend.PDL_DEFAULT)])
def test_pdl_mode_sets_the_switch_inside_and_restores_it_after(mode, want):
    outside = backend._pdl_setting()
    with backend.pdl_mode(mode):
        assert backend._pdl_setting() is want
        with backend.pdl_mode("off"):  # nested: the inner plan's setting, then the outer one again
            assert backend._pdl_setting() is False
        assert backend._pdl_setting() is want
    assert backend._pdl_setting() is outside


def test_the_environment_overrides_the_plan(monkeypatch):
    monkeypatch.setenv(backend.PDL_ENV, "0")
    with backend.pdl_mode("on"):
        assert backend._pdl_setting() is False
    monkeypatch.setenv(backend.PDL_ENV, "1")
    with backend.pdl_mode("off"):
        assert backend._pdl_setting() is True


def test_pdl_on_is_refused_at_apply_where_the_device_has_none():
    model = build_builtin("llama-tiny")
    with pytest.raises(ApplyError) as err:
        apply(model, plan_of(pdl="on"), device="cpu", max_batch=2, max_seq_len=32)
    (diag,) = err.value.diagnostics
    assert diag.code == "PL210" and "pdl: on cannot be honoured on cpu" in diag.message
    assert "PDL needs a CUDA device" in diag.message and "pdl: auto" in diag.hint


@pytest.mark.parametrize("mode,want", [("off", False), ("on", True), ("auto", None)])
def test_the_planned_model_runs_under_its_plans_setting(monkeypatch, mode, want):
    seen = []
    model = build_builtin("llama-tiny")
    if mode == "on":  # pretend the device supports PDL: what is checked is the setting in force
        monkeypatch.setattr("planlang.runtime.apply.pdl_support", lambda device: (True, "PDL on (test)"))
    planned = apply(model, plan_of(pdl=mode), device="cpu", max_batch=2, max_seq_len=32)
    if "_forward" in planned._modules:  # the compiled forward is a module: swap in a probe
        del planned._modules["_forward"]
    planned._forward = lambda *a, **k: seen.append(backend._PLAN_PDL.get())
    planned(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    assert seen == [want] and backend._PLAN_PDL.get() is None


def test_apply_itself_runs_under_the_plans_setting(monkeypatch):
    import planlang.runtime.apply as apply_mod
    monkeypatch.setattr(apply_mod, "_apply", lambda *a: backend._PLAN_PDL.get())
    assert apply(torch.nn.Linear(2, 2), plan_of(pdl="off"), device="cpu") is False
    assert apply(torch.nn.Linear(2, 2), plan_of(pdl="on"), device="cpu") is True
    assert backend._PLAN_PDL.get() is None


@pytest.mark.parametrize("word", ["on", "off", "auto"])
def test_pdl_reads_and_writes_as_a_bare_word_in_both_syntaxes(tmp_path, word):
    from planlang.loader import load_with_source
    from planlang.text_writer import write_text
    from planlang.writer import write_yaml
    text = f"planlang 1\nplan p on h100\n\ncapture cuda_graph buckets 1,2 pdl {word}\n"
    (tmp_path / "p.plan").write_text(text)
    plan = load_with_source(str(tmp_path / "p.plan")).plan
    assert plan.graphs.pdl == word
    assert f"pdl {word}\n" in write_text(plan.to_document())  # not quoted, though `on` is a keyword
    (tmp_path / "p.yaml").write_text(write_yaml(plan.to_document()))
    assert load_with_source(str(tmp_path / "p.yaml")).plan.graphs.pdl == word


def test_the_plan_text_round_trips_and_lint_refuses_on_for_an_a100(tmp_path):
    from planlang import cli
    path = tmp_path / "p.plan"
    path.write_text("planlang 1\nplan p on h100\ncapture cuda_graph buckets 1,2 pdl off\n")
    from planlang.loader import load_with_source
    loaded = load_with_source(str(path))
    assert loaded.plan.graphs.pdl == "off"
    from planlang.text_writer import write_text
    assert "pdl off" in write_text(loaded.plan.to_document())
    bad = tmp_path / "a.yaml"
    bad.write_text("planlang: 1\ntarget: a100-80gb\ngraphs: {pdl: on}\n")
    assert cli.main(["lint", str(bad)]) == 1


@pytest.mark.gpu
def test_gpu_pdl_on_and_off_plans_replay_the_same_logits_and_say_which():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the GPU machine)")
    if not backend.pdl_support("cuda")[0]:
        pytest.skip(backend.pdl_support("cuda")[1])
    outs, notes = {}, {}
    for mode in ("on", "off"):
        model = build_builtin("llama-tiny", device="cuda", dtype=torch.bfloat16)
        planned = apply(model, plan_of(capture="cuda_graph", buckets=[1, 2], pdl=mode), max_batch=2, max_seq_len=64)
        notes[mode] = [n for n in planned.report.notes if n.startswith("kernels: ")]
        tok = torch.randint(0, model.config.vocab_size, (2, 1), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            outs[mode] = planned(tok, torch.tensor([3], device="cuda")).float().cpu()
    assert notes["on"] == ["kernels: " + backend.pdl_support("cuda")[1]]
    assert notes["off"] == ["kernels: PDL is off (the plan's graphs.pdl: off)"]
    assert torch.equal(outs["on"], outs["off"])  # PDL orders launches; it never changes a result
