"""`planlang apply`, `export` and `bench` from the command line, on the CPU."""
import json
import subprocess
import sys

import pytest

from planlang.cli import main

QUICK = "plans/quickstart.yaml"


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The commands are tested on the PyTorch reference path: the kernels themselves are
    tested under the interpreter in their own files, and interpreting a whole model is slow."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out, out.err


def test_apply_quickstart_reports_every_fusion_and_matches_the_unplanned_model(capsys):
    # --max-error 0 cannot hold (the kernels round differently), so the same run also shows
    # the bound failing the command while the report is still complete.
    code, out, err = run_cli(["apply", QUICK, "builtin:llama-tiny", "--context", "8", "--json", "--max-error", "0",
                              "--eval-tokens", "0"], capsys)
    assert code == 1
    assert "exceeds --max-error" in err
    r = json.loads(out)
    assert r["ok"] is False and r["failures"]
    kinds = {rule["what"]: rule for rule in r["report"]["rules"]}
    assert set(kinds) == {"rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention"}
    assert kinds["qkv"]["places"] == ["layers.0.attn", "layers.1.attn"]
    assert all(rule["places"] for rule in kinds.values())
    assert r["numerics"]["rel_error"] < 1e-4
    assert r["numerics"]["top1_agreement"] == 1.0
    assert r["time_ms"]["planned"] > 0 and r["time_ms"]["unplanned"] > 0


def test_apply_refuses_a_rule_that_finds_no_site_before_changing_the_model(tmp_path, capsys):
    plan = tmp_path / "bad.yaml"
    plan.write_text("planlang: 1\nfusions:\n  - {kind: qkv, at: \"layers.*.mlp\"}\n")
    code, out, err = run_cli(["apply", str(plan), "builtin:llama-tiny", "--context", "8"], capsys)
    assert code == 1
    assert "PL309" in err and "bad.yaml:3" in err


def test_apply_refuses_fp8_on_this_cpu_at_apply_time(tmp_path, capsys):
    plan = tmp_path / "fp8.yaml"
    plan.write_text("planlang: 1\ntarget: auto\nprecision: {rules: [{at: \"**:linear\", dtype: fp8_e4m3}]}\n")
    code, out, err = run_cli(["apply", str(plan), "builtin:llama-tiny", "--device", "cpu"], capsys)
    assert code == 1
    assert "PL201" in err and "cannot run on this device" in err


@pytest.mark.parametrize("content,fragment", [
    (b"", "empty"),
    (b"this is not a checkpoint", "fp8"),
    (b"PK\x03\x04truncated", "zip"),
])
def test_a_broken_model_file_is_a_clear_error_naming_it(tmp_path, capsys, content, fragment):
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    code, out, err = run_cli(["apply", QUICK, str(bad)], capsys)
    assert code == 2
    assert "model.pt" in err


def test_unknown_builtin_suggests_the_close_name(capsys):
    code, out, err = run_cli(["apply", QUICK, "builtin:llama-tiy"], capsys)
    assert code == 2
    assert "llama-tiny" in err


def test_export_writes_a_checkpoint_that_apply_loads(tmp_path, capsys):
    out_pt = tmp_path / "tiny.pt"
    code, out, err = run_cli(["export", "builtin:llama-tiny", str(out_pt)], capsys)
    assert code == 0 and out_pt.exists()
    code, out, err = run_cli(["apply", QUICK, str(out_pt), "--context", "8", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["numerics"]["rel_error"] < 1e-4


def test_export_writes_safetensors_by_suffix_and_refuses_other_suffixes(tmp_path, capsys):
    out_st = tmp_path / "tiny.safetensors"
    code, out, err = run_cli(["export", "builtin:llama-tiny", str(out_st)], capsys)
    assert code == 0 and out_st.read_bytes()[8:9] == b"{"  # a safetensors header, not a torch zip
    out_pt = tmp_path / "tiny.pt"
    assert run_cli(["export", "builtin:llama-tiny", str(out_pt)], capsys)[0] == 0
    assert out_st.stat().st_mode & 0o777 == out_pt.stat().st_mode & 0o777  # the same permissions
    code, out, err = run_cli(["apply", QUICK, str(out_st), "--context", "8", "--json", "--eval-tokens", "0"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["export", "builtin:llama-tiny", str(tmp_path / "tiny.bin")], capsys)
    assert code == 2 and "'.bin'" in err and "tiny.pt" in err and not (tmp_path / "tiny.bin").exists()


def test_apply_of_a_training_plan_scores_the_evaluation_text(tmp_path, capsys):
    plan = tmp_path / "train.yaml"
    plan.write_text("planlang: 1\ntarget: auto\nmode: training\nfusions: [rmsnorm_residual]\n")
    code, out, err = run_cli(["apply", str(plan), "builtin:llama-tiny", "--json", "--eval-tokens", "300"], capsys)
    assert code == 0, err
    assert json.loads(out)["accuracy"]["top1_agreement"] == 1.0


def test_apply_refuses_a_plan_whose_target_is_unknown_as_lint_does(tmp_path, capsys):
    plan = tmp_path / "t.yaml"
    plan.write_text("planlang: 1\ntarget: h100x\nfusions: [qkv]\n")
    code, out, err = run_cli(["apply", str(plan), "builtin:llama-tiny"], capsys)
    assert code == 1 and "PL203" in err and "t.yaml:2:9" in err and "did you mean 'h100'" in err


def test_bench_on_cpu_runs_and_says_graphs_are_skipped(capsys, tmp_path):
    plan = tmp_path / "g.yaml"
    plan.write_text("planlang: 1\nfusions: [rmsnorm_residual, qkv]\ngraphs: {capture: cuda_graph, buckets: [1, 2]}\n")
    code, out, err = run_cli(["bench", str(plan), "builtin:llama-tiny", "--context", "8", "--prefill", "16",
                              "--against", "eager", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    contenders = {row["contender"] for row in r["rows"]}
    assert "eager" in contenders and "plan g" in contenders
    assert {row["batch"] for row in r["rows"] if row["contender"] == "plan g"} == {1, 2}
    assert any("CUDA graphs skipped" in n or "capture skipped" in n for n in r["notes"])
    assert all(row["ms"] > 0 for row in r["rows"])


def test_bench_rejects_an_unknown_baseline(capsys):
    code, out, err = run_cli(["bench", QUICK, "builtin:llama-tiny", "--against", "vllm"], capsys)
    assert code == 2 and "--against" in err


def test_planlang_lint_never_imports_torch():
    code = ("import sys, planlang.cli; planlang.cli.main(['lint', 'plans/h100_decode.yaml']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_apply_scores_the_evaluation_text_and_gates_on_agreement(tmp_path, capsys):
    plan = tmp_path / "fp8emu.yaml"
    plan.write_text("planlang: 1\ntarget: cpu\nprecision:\n  rules:\n"
                    "    - {at: \"**:linear\", dtype: fp8_e4m3, emulate: true}\n")
    args = ["apply", str(plan), "builtin:llama-tiny-trained", "--device", "cpu", "--context", "8",
            "--eval-tokens", "300", "--json"]
    code, out, err = run_cli(args + ["--min-agreement", "0.9"], capsys)
    assert code == 0, err
    acc = json.loads(out)["accuracy"]
    assert acc["tokens"] == 299 and 0.9 <= acc["top1_agreement"] < 1.0
    assert 0 < acc["kl"] < 0.05 and abs(acc["ppl_candidate"] / acc["ppl_reference"] - 1) < 0.05
    code, out, err = run_cli(args + ["--min-agreement", "0.99999"], capsys)
    assert code == 1 and "below --min-agreement" in err


@pytest.mark.gpu
def test_the_per_kernel_cost_of_real_gemvs_is_at_least_an_empty_launch():
    import torch
    from planlang.runtime.bench import copy_bandwidth_gbs
    from planlang.runtime.commands import measure_kernel_cost_us, measure_launch_us
    device = torch.device("cuda")
    launch = measure_launch_us(device)
    cost = measure_kernel_cost_us(device, copy_bandwidth_gbs(device))
    assert launch * 0.8 <= cost < 20.0, (launch, cost)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_the_gemv_model_fits_a_cost_and_a_rate_under_the_copy_bandwidth(fp8):
    import torch
    from planlang.runtime.bench import copy_bandwidth_gbs
    from planlang.runtime.commands import measure_gemv_model, measure_launch_us
    device = torch.device("cuda")
    bw = copy_bandwidth_gbs(device)
    cost, rate = measure_gemv_model(device, bw, fp8=fp8)
    assert measure_launch_us(device) * 0.8 <= cost < 20.0 and 0.3 * bw <= rate <= bw, (cost, rate, bw)


def test_prediction_counts_the_merged_kernels_and_the_streaming_rate():
    from planlang.runtime.models.registry import build_builtin
    from planlang.runtime.predict import predict_decode
    cfg = build_builtin("llama-tiny").config
    every = {"rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention"}
    base = predict_decode(cfg, every, 2.0, 1, 128, 3000.0, 500.0, 2.0, True)
    no_rope = predict_decode(cfg, every - {"rope_kvcache"}, 2.0, 1, 128, 3000.0, 500.0, 2.0, True)
    # with rope and attention both fused, rope costs no launch of its own at decode
    assert no_rope.launches - base.launches == cfg.n_layers * 16
    assert base.launches == cfg.n_layers * (0 + 1 + 1 + 0 + 1 + 2) + 4  # norms folded, rope merged
    slow = predict_decode(cfg, every, 2.0, 1, 128, 3000.0, 500.0, 2.0, True, weight_bandwidth_gbs=1500.0)
    wbytes = base.bytes - 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 128 * 2 \
        - cfg.n_layers * (8 * cfg.dim + 4 * cfg.ffn_dim) * 2
    assert slow.ms - base.ms == pytest.approx(wbytes / 1500e9 * 1e3 - wbytes / 3000e9 * 1e3, rel=1e-6)


@pytest.fixture(scope="module")
def bench_two_plans(tmp_path_factory):
    """One CPU bench of two plans beside eager and compile, its JSON result and stderr.
    The compile baseline stands aside (the model itself is its contender): compiling on
    the CPU takes longer than the rest of the run, and what is checked is the rows."""
    import contextlib
    import io

    from planlang.runtime import commands
    folder = tmp_path_factory.mktemp("bench")
    for name, fusions in (("a", "[qkv]"), ("b", "[qkv, swiglu]")):
        (folder / f"{name}.yaml").write_text(f"planlang: 1\nname: {name}\nfusions: {fusions}\n")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        mp.setattr(commands, "compile_reduce_overhead", lambda model: model)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["bench", str(folder / "a.yaml"), str(folder / "b.yaml"), "builtin:llama-tiny",
                         "--context", "8", "--prefill", "4", "--batch", "1", "--batch", "2",
                         "--against", "eager,compile", "--eval-tokens", "0", "--json"])
    assert code == 0, err.getvalue()
    assert "Traceback" not in err.getvalue()
    return json.loads(out.getvalue()), err.getvalue()


def _decode(rows):
    return [r for r in rows if "prefill_tokens" not in r["extra"]]


def _prefill(rows):
    return [r for r in rows if "prefill_tokens" in r["extra"]]


def test_bench_times_prefill_for_eager_compile_and_every_plan(bench_two_plans):
    r, _ = bench_two_plans
    pre = _prefill(r["rows"])
    assert [x["contender"] for x in pre] == ["eager", "compile(reduce-overhead)", "plan a", "plan b"]
    assert all(x["extra"]["prefill_tokens"] == 4 and x["batch"] == 1 and x["ms"] > 0 for x in pre)
    assert all(x["tokens_s"] == pytest.approx(4 / x["ms"] * 1e3) for x in pre)


def test_bench_rows_keep_the_order_eager_compile_plans_then_prefill(bench_two_plans):
    r, _ = bench_two_plans
    order = [(x["contender"], x["batch"]) for x in r["rows"]]
    assert order[:8] == [("eager", 1), ("eager", 2), ("compile(reduce-overhead)", 1), ("compile(reduce-overhead)", 2),
                         ("plan a", 1), ("plan a", 2), ("plan b", 1), ("plan b", 2)]
    assert len(_prefill(r["rows"][8:])) == len(r["rows"]) - 8


def test_bench_decode_rows_carry_the_floor_over_the_catalog_bandwidth_too(bench_two_plans):
    r, _ = bench_two_plans
    assert r["catalog_bandwidth_gbs"]  # the catalog's cpu target
    for x in _decode(r["rows"]):
        ratio = r["copy_bandwidth_gbs"] / r["catalog_bandwidth_gbs"]
        assert x["extra"]["catalog_floor_ms"] == pytest.approx(x["extra"]["floor_ms"] * ratio)


def test_bench_rows_say_peak_memory_is_not_tracked_on_the_cpu(bench_two_plans):
    r, _ = bench_two_plans
    assert all("peak_memory_mib" in x and x["peak_memory_mib"] is None for x in r["rows"])


def test_bench_prints_a_progress_line_as_each_row_lands(bench_two_plans):
    r, err = bench_two_plans
    lines = [line for line in err.splitlines() if line.startswith("bench: ")]
    assert len(lines) == len(r["rows"])
    assert "bench: plan b prefill 4:" in err and "bench: compile(reduce-overhead) batch 2:" in err


def test_bench_text_table_has_the_catalog_floor_and_peak_memory_columns(capsys):
    code, out, err = run_cli(["bench", QUICK, "builtin:llama-tiny", "--context", "8", "--prefill", "0",
                              "--against", "eager", "--eval-tokens", "0"], capsys)
    assert code == 0, err
    assert "catalog floor ms" in out and "peak MiB" in out


def test_bench_records_whether_kernels_launch_with_pdl(bench_two_plans):
    r, _ = bench_two_plans
    # each plan's state, with its reason
    assert r["pdl"] == {"a": "PDL needs a CUDA device, not 'cpu'", "b": "PDL needs a CUDA device, not 'cpu'"}


def test_the_pdl_line_follows_the_plans_setting(monkeypatch):
    from planlang.runtime import commands
    from planlang.runtime.kernels import backend
    monkeypatch.delenv(backend.PDL_ENV, raising=False)
    monkeypatch.setattr(backend, "pdl_support", lambda device: (True, "PDL on (test)"))
    assert commands._pdl_line("cuda", "off") == "PDL is off (the plan's graphs.pdl: off)"
    assert commands._pdl_line("cuda", "on") == "PDL on (test)"
    assert commands._pdl_line("cuda") == ("PDL on (test)" if backend.PDL_DEFAULT else
                                          f"PDL is off by default ({backend.PDL_ENV}=1 turns it on)")


def test_prediction_streams_weights_slower_above_one_row():
    from planlang.runtime.models.registry import build_builtin
    from planlang.runtime.predict import SKINNY_STREAM, predict_decode
    cfg = build_builtin("llama-tiny").config
    every = {"rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention"}
    one, two = (predict_decode(cfg, every, 2.0, b, 128, 3000.0, 500.0, 0.0, True, weight_bandwidth_gbs=2000.0)
                for b in (1, 2))
    weights = one.bytes - 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 128 * 2 \
        - cfg.n_layers * (8 * cfg.dim + 4 * cfg.ffn_dim) * 2
    extra = (two.bytes - weights) - (one.bytes - weights)  # the second row's cache and activations
    want = weights / (2000e9 * SKINNY_STREAM) + (two.bytes - weights) / 3000e9
    assert 0 < SKINNY_STREAM < 1 and extra > 0
    assert two.ms == pytest.approx(want * 1e3, rel=1e-9)


def test_json_output_is_one_object_also_when_a_command_refuses(tmp_path, capsys):
    code, out, err = run_cli(["apply", "plans/h100_decode.yaml", "builtin:llama-tiny", "--device", "cpu", "--json"],
                             capsys)
    got = json.loads(out)
    assert code == 1 and got["ok"] is False and got["exit"] == 1
    assert any(d["code"] == "PL202" and d["line"] for d in got["diagnostics"])
    code, out, err = run_cli(["bench", QUICK, "builtin:llama-tny", "--json"], capsys)
    got = json.loads(out)
    assert code == 2 and "llama-tiny" in got["diagnostics"][0]["message"] and got["diagnostics"][0]["hint"]
    # a result already printed is not followed by a second object
    code, out, err = run_cli(["apply", QUICK, "builtin:llama-tiny", "--context", "8", "--json", "--max-error", "0",
                              "--eval-tokens", "0"], capsys)
    assert code == 1 and json.loads(out)["ok"] is False


def test_planlangs_own_warnings_print_as_one_plain_line(tmp_path, capsys):
    import torch

    from planlang.runtime.models.registry import build_builtin
    path = tmp_path / "module.pt"
    torch.save(build_builtin("llama-tiny"), path)
    code, out, err = run_cli(["apply", QUICK, str(path), "--trust-pickle", "--context", "8", "--eval-tokens", "0"],
                             capsys)
    assert "planlang: warning: loading" in err and "executes code" in err
    assert "UserWarning" not in err and "warnings.warn" not in err and "load_model(" not in err


def test_nproc_against_the_plans_tensor_degree_is_checked_before_any_process_starts(tmp_path, capsys):
    code, out, err = run_cli(["apply", QUICK, "builtin:llama-tiny", "--nproc", "2"], capsys)
    assert code == 1 and "PL307" in err and "--nproc 2 starts 2 processes" in err and "no parallel section" in err
    assert "parallel: {tensor: 2}" in err and "torch.distributed" not in err
    plan = tmp_path / "tp4.yaml"
    plan.write_text("planlang: 1\ntarget: auto\nparallel: {tensor: 4}\n")
    code, out, err = run_cli(["bench", str(plan), "builtin:llama-tiny", "--nproc", "2", "--against", ""], capsys)
    assert code == 1 and "tp4.yaml:3:20" in err and "parallel.tensor is 4" in err


def test_a_graph_plan_refused_on_the_cpu_says_how_to_run_it_here_and_that_works(tmp_path, capsys):
    import shutil
    code, out, err = run_cli(["apply", "plans/h100_decode.yaml", "builtin:llama-tiny", "--device", "cpu"], capsys)
    assert code == 1 and "PL202" in err and "extends: h100_decode.yaml" in err and "graphs: {capture: none}" in err
    shutil.copy("plans/h100_decode.yaml", tmp_path / "h100_decode.yaml")
    (tmp_path / "here.yaml").write_text("planlang: 1\nextends: h100_decode.yaml\ngraphs: {capture: none}\n")
    code, out, err = run_cli(["apply", str(tmp_path / "here.yaml"), "builtin:llama-tiny", "--device", "cpu",
                              "--eval-tokens", "0"], capsys)
    assert code == 0, err
