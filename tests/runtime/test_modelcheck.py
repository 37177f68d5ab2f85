"""`lint --model` and `explain --model` (runtime/modelcheck.py): the checks and the
predictions that need a model's shapes but no run. Built-in models are built on the meta
device, so even llama-1b costs no memory here."""
from __future__ import annotations

import json

import pytest
import torch

from planlang.cli import main
from planlang.hardware import load_catalog
from planlang.loader import load_with_source
from planlang.runtime.modelcheck import decode_predictions, linear_weight_bytes, model_diagnostics, shape_model
from planlang.runtime.models.checkpoint import export_checkpoint
from planlang.runtime.models.llama import ModelConfig, Transformer
from planlang.runtime.predict import Figures, figures_from_bench, plan_decode_ms


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_lint_with_a_model_checks_memory_against_the_plans_own_target(tmp_path, capsys):
    # No --target: the plan's target (h100, 80 GB) is the budget; 131072 x 64 of KV cache is 275 GB.
    plan = write(tmp_path, "mem.yaml", "planlang: 1\nname: mem\ntarget: h100\nfusions: [qkv]\n"
                                       "limits: {max_seq_len: 131072, max_batch: 64}\n")
    assert main(["lint", plan, "--model", "builtin:llama-1b"]) == 1
    err = capsys.readouterr()
    text = err.out + err.err
    assert "PL207" in text and "target h100-sxm has 80 GB" in text and "mem.yaml:5:9" in text
    # The same limits fit a small model: no PL207.
    assert main(["lint", plan, "--model", "builtin:llama-tiny"]) == 0


def test_lint_with_an_auto_target_and_no_target_flag_skips_the_memory_budget(tmp_path):
    loaded = load_with_source(write(tmp_path, "auto.yaml", "planlang: 1\nname: a\ntarget: auto\n"
                                                            "limits: {max_seq_len: 131072, max_batch: 64}\n"))
    diags = model_diagnostics(loaded, "builtin:llama-1b", target=None, catalog=load_catalog())
    assert not [d for d in diags if d.code == "PL207"]
    diags = model_diagnostics(loaded, "builtin:llama-1b", target="h100", catalog=load_catalog())
    assert [d.code for d in diags if d.code == "PL207"] == ["PL207"]


def test_lint_with_a_model_refuses_fp8_on_dims_that_are_not_multiples_of_16(tmp_path):
    cfg = ModelConfig(dim=72, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=128)
    torch.manual_seed(0)
    ckpt = export_checkpoint(Transformer(cfg), tmp_path / "odd.pt")
    plan = write(tmp_path, "fp8.yaml", "planlang: 1\nname: f\ntarget: h100\nprecision:\n  rules:\n"
                                       "    - {at: '**:linear', dtype: fp8_e4m3}\n")
    diags = model_diagnostics(load_with_source(plan), str(ckpt), target=None, catalog=load_catalog())
    odd = [d for d in diags if d.code == "PL313"]
    assert odd, [d.code for d in diags]
    assert any("in_features 72 is not a multiple of 16" in d.message for d in odd)
    assert all((d.line, d.hint) != (None, None) for d in odd)


def test_linear_weight_bytes_follow_the_rules_that_win():
    model = shape_model("builtin:llama-1b")
    plain = load_with_source("plans/tuned_h100.yaml").plan
    fp8 = load_with_source("plans/h100_fp8_decode.yaml").plan
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    assert linear_weight_bytes(model, plain) == 2 * linears  # bf16, the model's own dtype
    assert linear_weight_bytes(model, fp8) == linears  # one byte each: the LM head is not counted


def test_predictions_follow_the_plans_buckets_and_grow_with_batch():
    model = shape_model("builtin:llama-1b")
    plan = load_with_source("plans/tuned_h100.yaml").plan
    figures = Figures(3000.0, 2.0, 700.0)
    rows = decode_predictions(model, plan, figures, 128, on_cuda=True)
    assert [r["batch"] for r in rows] == list(plan.graphs.buckets)
    ms = [r["ms"] for r in rows]
    assert ms == sorted(ms) and ms[0] < ms[-1]
    # The weights' bytes over the bandwidth bound it from below (2.47 GB at 3000 GB/s).
    assert ms[0] > 2.4e9 / 3000e9 * 1e3
    # Off CUDA no graphs: every launch pays the eager cost, so the same step is slower.
    eager = decode_predictions(model, plan, figures, 128, on_cuda=False)
    assert eager[0]["ms"] > ms[0] and eager[0]["launches"] == rows[0]["launches"]
    # A batch between buckets is predicted on the bucket that holds it.
    assert plan_decode_ms(plan, model.config, 5, 128, figures).ms == pytest.approx(rows[4]["ms"])


def test_explain_with_a_model_prints_the_step_per_bucket(capsys):
    assert main(["explain", "plans/tuned_h100.yaml", "--model", "builtin:llama-1b", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    pred = data["decode_predictions"]
    assert [r["batch"] for r in pred["rows"]] == [1, 2, 3, 4, 6, 8, 12, 16]
    assert pred["figures"]["source"] == "catalog" and pred["figures"]["bandwidth_gbs"] == 3350
    assert any(line.startswith("decode step at context 128") for line in data["predictions"])
    assert main(["explain", "plans/tuned_h100.yaml", "--model", "builtin:llama-1b"]) == 0
    assert "batch 16" in capsys.readouterr().out


def test_figures_from_bench_json_use_the_measured_gemv_fit():
    data = {"copy_bandwidth_gbs": 2930.0, "launch_us": 1.9, "tflops": 700,
            "gemv_models": {"bf16": {"kernel_us": 1.6, "stream_gbs": 2600.0}}}
    f = figures_from_bench(data, fp8=False)
    assert (f.bandwidth_gbs, f.launch_us, f.weight_bandwidth_gbs, f.source) == (2930.0, 1.6, 2600.0, "measured")
    f8 = figures_from_bench(data, fp8=True)  # no FP8 fit measured: the per-kernel cost, copy bandwidth
    assert (f8.launch_us, f8.weight_bandwidth_gbs) == (1.9, None)
    with pytest.raises(ValueError, match="planlang bench --format json"):
        figures_from_bench({"rows": []}, fp8=False)


def test_explain_predicts_with_a_bench_runs_measured_figures(tmp_path, capsys):
    bench = {"copy_bandwidth_gbs": 2930.0, "launch_us": 1.9, "tflops": 700,
             "gemv_models": {"bf16": {"kernel_us": 1.6, "stream_gbs": 2600.0}}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    args = ["explain", "plans/tuned_h100.yaml", "--model", "builtin:llama-1b", "--format", "json"]
    assert main(args + ["--calibration", str(path)]) == 0
    measured = json.loads(capsys.readouterr().out)["decode_predictions"]
    assert measured["figures"]["source"] == "measured" and measured["figures"]["weight_bandwidth_gbs"] == 2600.0
    assert main(args) == 0
    catalog = json.loads(capsys.readouterr().out)["decode_predictions"]
    # Slower weight streaming than the catalog's 3350 GB/s: every bucket predicts slower.
    assert all(m["ms"] > c["ms"] for m, c in zip(measured["rows"], catalog["rows"]))


@pytest.mark.parametrize("content", [None, "not json", "[1, 2]", '{"rows": []}'])
def test_explain_refuses_an_unreadable_calibration_with_a_hint(tmp_path, capsys, content):
    path = tmp_path / "bench.json"
    if content is not None:
        path.write_text(content)
    code = main(["explain", "plans/tuned_h100.yaml", "--model", "builtin:llama-1b", "--calibration", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "--calibration" in err and "Traceback" not in err


def test_explain_reuses_its_resolved_rules_for_the_predictions_with_the_same_result(capsys):
    from planlang.hardware import load_catalog
    from planlang.loader import load_with_source
    from planlang.runtime.modelcheck import catalog_figures
    for path in ("plans/tuned_h100.yaml", "plans/h100_fp8_decode.yaml"):
        assert main(["explain", path, "--model", "builtin:llama-1b", "--format", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)["decode_predictions"]["rows"]
        plan = load_with_source(path).plan
        figures = catalog_figures(load_catalog().get(plan.target))
        alone = decode_predictions(shape_model("builtin:llama-1b"), plan, figures, 128, on_cuda=True)
        assert [r["ms"] for r in rows] == pytest.approx([r["ms"] for r in alone], rel=1e-12), path


def test_explain_with_a_model_says_which_selectors_name_nothing_and_predicts_no_decode_for_training(capsys):
    assert main(["explain", "plans/gemma2_decode.plan", "--model", "builtin:gemma2-tiny", "--format", "json"]) == 0
    places = json.loads(capsys.readouterr().out)["places"]
    assert any(p.startswith("offload 'layers[16:32]': names no module") and "PL309" in p for p in places)
    assert main(["explain", "plans/h200_train.yaml", "--model", "builtin:llama-1b", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "decode_predictions" not in data
    assert any("not predicted for a training plan" in p for p in data["predictions"])
