"""The hardware capability model: the shipped catalog, user hardware files, the gating
rules of PLAN_SPEC.md §10, and GPU detection without torch."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml

from planlang import hardware
from planlang.hardware import (
    Capability,
    HardwareFileError,
    cuda_graphs_support,
    detect,
    dtype_support,
    format_cc,
    load_catalog,
    scaling_support,
    triton_support,
)
from planlang.names import DTYPES

REQUIRED_IDS = ("cpu", "a100-40gb", "a100-80gb", "l40s", "rtx4090", "h100-pcie", "h100-sxm", "h200", "b200", "rtx5090")
YAML_PATH = Path(hardware.__file__).with_name("hardware.yaml")


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def write(tmp_path: Path, text: str, name: str = "hw.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the shipped catalog
def test_shipped_catalog_has_every_required_target(catalog):
    assert set(REQUIRED_IDS) <= set(catalog.ids())
    for target_id in REQUIRED_IDS:
        assert catalog.get(target_id).id == target_id


def test_alias_h100_names_h100_sxm(catalog):
    assert catalog.get("h100").id == "h100-sxm"
    assert catalog.get("H100").id == "h100-sxm"
    assert "h100" in catalog and "h999" not in catalog


def test_catalog_iterates_in_file_order(catalog):
    in_file = [r["id"] for r in yaml.safe_load(YAML_PATH.read_text())["targets"]]
    assert [t.id for t in catalog] == in_file == catalog.ids()


def test_shipped_gemm_lists_agree_with_the_gating_rules(catalog):
    for target in catalog:
        for dtype in DTYPES:
            assert bool(dtype_support(target, dtype)) == (dtype in target.gemm), (target.id, dtype)
        assert set(target.tflops) <= set(target.gemm), target.id


def test_shipped_gpu_targets_have_graphs_triton_and_a_compute_capability(catalog):
    for target in catalog:
        if target.is_cpu:
            assert not target.cuda_graphs and target.compute_capability is None
        else:
            assert target.cuda_graphs and target.triton and target.cc >= (8, 0)
            assert 0 < target.launch_us < 10


def test_every_figure_of_the_shipped_yaml_cites_its_source():
    text = YAML_PATH.read_text(encoding="utf-8")
    lines = text.splitlines()
    figures = []
    stack = [yaml.compose(text, Loader=yaml.SafeLoader)]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            stack.extend(v for _, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif node.tag.endswith((":int", ":float")) or (node.tag.endswith(":str") and node.value[:1].isdigit()):
            figures.append(node)
    assert len(figures) > 100  # the walk really found the figures
    for node in figures:
        line = node.start_mark.line
        here, above = lines[line], lines[line - 1]
        assert "# source:" in here or above.strip().startswith("# source:"), f"line {line + 1}: {here.strip()}"


# ---------------------------------------------------------------- gating (spec §10)
def test_fp8_on_a100_is_refused_with_the_spec_message(catalog):
    cap = dtype_support(catalog.get("a100-80gb"), "fp8_e4m3")
    assert not cap
    assert cap.reason == "fp8_e4m3 needs compute capability 8.9 (sm_89) or newer; target a100-80gb has 8.0 (sm_80)"
    assert cap.hint == "use bf16 here, or target h100"


@pytest.mark.parametrize("target_id", ["l40s", "rtx4090", "h100", "h100-pcie", "h200", "b200", "rtx5090"])
@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_runs_on_sm89_and_newer(catalog, target_id, dtype):
    cap = dtype_support(catalog.get(target_id), dtype)
    assert cap and isinstance(cap, Capability) and cap.hint is None


@pytest.mark.parametrize("dtype", ["nvfp4", "mxfp4", "mxfp8"])
def test_block_formats_are_refused_on_hopper_with_a_blackwell_hint(catalog, dtype):
    cap = dtype_support(catalog.get("h100"), dtype)
    assert not cap
    assert cap.reason == f"{dtype} needs compute capability 10.0 (sm_100) or newer; target h100-sxm has 9.0 (sm_90)"
    assert cap.hint == "use fp8_e4m3 here, or target b200"


@pytest.mark.parametrize("target_id", ["b200", "rtx5090"])
@pytest.mark.parametrize("dtype", ["nvfp4", "mxfp4", "mxfp8"])
def test_block_formats_run_on_sm100_and_sm120(catalog, target_id, dtype):
    assert dtype_support(catalog.get(target_id), dtype)


@pytest.mark.parametrize("dtype", ["tf32", "bf16"])
def test_tf32_and_bf16_run_on_ampere(catalog, dtype):
    assert dtype_support(catalog.get("a100-40gb"), dtype)


def test_tf32_is_refused_on_cpu(catalog):
    cap = dtype_support(catalog.get("cpu"), "tf32")
    assert not cap and "tf32" in cap.reason and cap.hint == "use fp32 here"


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_cpu_runs_fp32_bf16_fp16(catalog, dtype):
    assert dtype_support(catalog.get("cpu"), dtype)


def test_fp8_on_cpu_only_with_emulate(catalog):
    cpu = catalog.get("cpu")
    refused = dtype_support(cpu, "fp8_e4m3")
    assert not refused and "emulate: true" in refused.hint
    emulated = dtype_support(cpu, "fp8_e4m3", emulate=True)
    assert emulated and "quantize-dequantize" in emulated.reason


def test_emulate_allows_any_dtype_anywhere(catalog):
    for target in catalog:
        for dtype in DTYPES:
            assert dtype_support(target, dtype, emulate=True), (target.id, dtype)


def test_unknown_dtype_is_refused_with_did_you_mean(catalog):
    cap = dtype_support(catalog.get("h100"), "fp8_e4m4")
    assert not cap and "fp8_e4m" in cap.hint


def test_format_cc_names_the_sm():
    assert format_cc("9.0") == "compute capability 9.0 (sm_90)"
    assert format_cc("12.0") == "compute capability 12.0 (sm_120)"
    assert format_cc("8.9") == "compute capability 8.9 (sm_89)"


def test_cpu_has_no_cuda_graphs_nor_triton(catalog):
    cpu, h100 = catalog.get("cpu"), catalog.get("h100")
    assert not cuda_graphs_support(cpu) and cuda_graphs_support(cpu).hint
    assert not triton_support(cpu)
    assert cuda_graphs_support(h100) and triton_support(h100)


# ---------------------------------------------------------------- scalings
@pytest.mark.parametrize("target_id,sm", [("b200", "sm_100"), ("rtx5090", "sm_120")])
def test_per_token_fp8_on_blackwell_is_a_kernel_note_not_a_refusal(catalog, target_id, sm):
    cap = scaling_support(catalog.get(target_id), "fp8_e4m3", "channel", "per_token")
    assert cap and cap.note and "cuBLAS" in cap.note and sm in cap.note and "Triton" in cap.note


def test_per_token_fp8_on_hopper_has_no_note(catalog):
    cap = scaling_support(catalog.get("h100"), "fp8_e4m3", "channel", "per_token")
    assert cap and cap.note is None


@pytest.mark.parametrize("scaling", ["tensor", "channel", "block"])
@pytest.mark.parametrize("activations", ["keep", "per_token", "per_tensor", "per_block"])
def test_fp8_takes_every_scaling_on_ada_and_hopper(catalog, scaling, activations):
    for target_id in ("l40s", "h100"):
        assert scaling_support(catalog.get(target_id), "fp8_e4m3", scaling, activations)


def test_fp8_scaling_on_a100_fails_like_the_dtype(catalog):
    cap = scaling_support(catalog.get("a100-80gb"), "fp8_e4m3", "channel", "per_token")
    assert not cap and "sm_89" in cap.reason


def test_nvfp4_scales_only_in_its_own_blocks(catalog):
    b200 = catalog.get("b200")
    assert scaling_support(b200, "nvfp4", None, "per_block")
    cap = scaling_support(b200, "nvfp4", "channel", "per_block")
    assert not cap and cap.hint == "use scaling: block"


def test_bf16_takes_no_weight_scales(catalog):
    cap = scaling_support(catalog.get("h100"), "bf16", "channel")
    assert not cap and cap.hint == "remove `scaling`"
    assert scaling_support(catalog.get("h100"), "bf16")


def test_emulated_fp8_takes_any_scaling_on_a100(catalog):
    cap = scaling_support(catalog.get("a100-80gb"), "fp8_e4m3", "block", "per_block", emulate=True)
    assert cap and "quantize-dequantize" in cap.reason


def test_misspelt_scaling_gets_did_you_mean(catalog):
    cap = scaling_support(catalog.get("h100"), "fp8_e4m3", "chanel")
    assert not cap and cap.hint == "did you mean `channel`?"


# ---------------------------------------------------------------- suggest
def test_suggest_finds_close_ids_and_aliases(catalog):
    assert catalog.suggest("h10") in ("h100", "h100-sxm", "h100-pcie")
    assert catalog.suggest("a100") in ("a100-40gb", "a100-80gb")
    assert catalog.suggest("rtx 4090") in ("rtx4090", "rtx-4090")
    assert catalog.suggest("zzzzzz") is None


# ---------------------------------------------------------------- user hardware files
def test_user_file_adds_a_target(tmp_path):
    path = write(tmp_path, """
        - id: my-gpu
          aliases: [mine]
          name: My GPU
          vendor: acme
          arch: ada
          compute_capability: 8.9
          memory_gb: 16
          memory_bandwidth_gbs: 500
          tflops: {bf16: 100, fp8_e4m3: 200}
          cuda_graphs: true
          triton: true
          launch_us: 3
    """)
    catalog = load_catalog([path])
    target = catalog.get("mine")
    assert target.id == "my-gpu" and catalog.ids()[-1] == "my-gpu"
    assert target.compute_capability == "8.9"
    assert dtype_support(target, "fp8_e4m3") and not dtype_support(target, "nvfp4")
    assert load_catalog().get("my-gpu") is None  # the shipped catalog is untouched


def test_user_file_overrides_one_figure_of_a_target(tmp_path):
    path = write(tmp_path, """
        targets:
          - id: h100-sxm
            launch_us: 1.8
            tflops: {bf16: 900}
    """)
    catalog = load_catalog([str(path)])
    h100 = catalog.get("h100")
    assert h100.launch_us == 1.8 and h100.tflops["bf16"] == 900
    assert h100.tflops["fp8_e4m3"] == load_catalog().get("h100").tflops["fp8_e4m3"]
    assert catalog.ids() == load_catalog().ids()


def bad_file_error(tmp_path: Path, text: str) -> HardwareFileError:
    with pytest.raises(HardwareFileError) as info:
        load_catalog([write(tmp_path, text)])
    assert info.value.diagnostics and all(d.code == "PL130" for d in info.value.diagnostics)
    return info.value


GOOD_RECORD = """
    - id: my-gpu
      name: My GPU
      vendor: acme
      arch: hopper
      compute_capability: "9.0"
      memory_gb: 80
      memory_bandwidth_gbs: 3000
      cuda_graphs: true
      triton: true
      launch_us: 2.5
"""


def test_unknown_key_in_user_file_is_reported_at_the_key(tmp_path):
    error = bad_file_error(tmp_path, GOOD_RECORD + "      memory_gbs: 12\n")
    (diag,) = error.diagnostics
    assert "memory_gbs" in diag.message and "my-gpu" in diag.message
    assert (diag.span.line, diag.span.column) == (11, 3)
    assert diag.hint == "did you mean `memory_gb`?"


def test_wrong_type_in_user_file_is_reported_at_the_value(tmp_path):
    error = bad_file_error(tmp_path, GOOD_RECORD.replace("memory_gb: 80", "memory_gb: lots"))
    (diag,) = error.diagnostics
    assert "`memory_gb`" in diag.message
    assert (diag.span.line, diag.span.column, diag.span.end_column) == (6, 14, 18)
    assert str(error).startswith(f"{error.file}:6:14: error[PL130]")


def test_unknown_dtype_key_in_user_file_is_reported_at_the_key(tmp_path):
    error = bad_file_error(tmp_path, GOOD_RECORD + "      tflops:\n        bf61: 3\n")
    (diag,) = error.diagnostics
    assert "bf61" in diag.message and (diag.span.line, diag.span.column) == (12, 5)
    assert diag.hint == "did you mean `bf16`?"


def test_yaml_syntax_error_in_user_file_has_its_line(tmp_path):
    error = bad_file_error(tmp_path, "- id: x\n  name: [unclosed\n  vendor: acme\n")
    (diag,) = error.diagnostics
    assert "YAML" in diag.message and diag.span is not None and diag.span.line >= 2


def test_missing_key_in_user_file_names_it(tmp_path):
    error = bad_file_error(tmp_path, GOOD_RECORD.replace("      launch_us: 2.5\n", ""))
    (diag,) = error.diagnostics
    assert "launch_us" in diag.message and diag.span.line == 1


def test_user_record_contradicting_the_gating_rules_is_refused(tmp_path):
    text = GOOD_RECORD.replace('"9.0"', '"8.0"') + "      tflops:\n        fp8_e4m3: 10\n"
    (diag,) = bad_file_error(tmp_path, text).diagnostics
    assert diag.message.startswith("fp8_e4m3 needs compute capability 8.9") and diag.span.line == 12


def test_user_alias_clashing_with_a_shipped_name_is_refused(tmp_path):
    text = GOOD_RECORD.replace("      name: My GPU\n", "      aliases: [h100]\n      name: My GPU\n")
    (diag,) = bad_file_error(tmp_path, text).diagnostics
    assert "h100" in diag.message and diag.span.line == 2


def test_override_taking_a_later_targets_alias_is_refused_at_the_override(tmp_path):
    (diag,) = bad_file_error(tmp_path, "- id: a100-40gb\n  aliases: [h100]\n").diagnostics
    assert "`h100`" in diag.message and "h100-sxm" in diag.message
    assert (diag.span.line, diag.span.column) == (2, 13)


def test_overriding_by_alias_asks_for_the_id(tmp_path):
    (diag,) = bad_file_error(tmp_path, "- id: h100\n  launch_us: 2\n").diagnostics
    assert diag.hint == "write `id: h100-sxm` to override it" and diag.span.line == 1


def test_unknown_top_level_key_in_user_file_gets_did_you_mean(tmp_path):
    (diag,) = bad_file_error(tmp_path, "target:\n  - id: x\n").diagnostics[:1]
    assert "`target`" in diag.message and diag.hint == "did you mean `targets`?"


def test_duplicate_key_in_user_file_is_refused(tmp_path):
    (diag,) = bad_file_error(tmp_path, GOOD_RECORD + "      launch_us: 3\n").diagnostics
    assert "duplicate" in diag.message and diag.span.line == 11


def test_unreadable_user_file_is_a_hardware_file_error(tmp_path):
    with pytest.raises(HardwareFileError) as info:
        load_catalog([tmp_path / "missing.yaml"])
    assert "cannot read" in info.value.diagnostics[0].message


def test_python_tags_are_refused_by_the_safe_loader(tmp_path):
    (diag,) = bad_file_error(tmp_path, "- !!python/object/apply:os.system ['true']\n").diagnostics
    assert "YAML" in diag.message


# ---------------------------------------------------------------- detection
@pytest.fixture
def fake_smi(monkeypatch):
    """Fakes a machine whose nvidia-smi prints `fake_smi.output` (no NVML, no torch)."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails
    state = types.SimpleNamespace(output="", returncode=0, calls=[])
    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)

    def run(cmd, **kwargs):
        state.calls.append(cmd)
        assert kwargs.get("timeout")  # a hung driver must not hang lint
        output = state.output(cmd) if callable(state.output) else state.output
        return subprocess.CompletedProcess(cmd, state.returncode, stdout=output, stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    return state


@pytest.mark.parametrize(
    "line,expected",
    [
        ("NVIDIA H100 80GB HBM3, 9.0, 81559 MiB", "h100-sxm"),
        ("NVIDIA H100 PCIe, 9.0, 81559 MiB", "h100-pcie"),
        ("NVIDIA H100 NVL, 9.0, 95830 MiB", "h100-nvl"),
        ("NVIDIA H200, 9.0, 143771 MiB", "h200"),
        ("NVIDIA A100-SXM4-80GB, 8.0, 81920 MiB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB, 8.0, 40960 MiB", "a100-40gb"),
        ("NVIDIA A100 80GB PCIe, 8.0, 81920 MiB", "a100-80gb"),
        ("NVIDIA B200, 10.0, 183359 MiB", "b200"),
        ("NVIDIA GeForce RTX 4090, 8.9, 24564 MiB", "rtx4090"),
        ("NVIDIA GeForce RTX 5090, 12.0, 32607 MiB", "rtx5090"),
        ("NVIDIA L40S, 8.9, 46068 MiB", "l40s"),
        ("NVIDIA L40, 8.9, 46068 MiB", "l40s"),  # no record: by compute capability
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition, 12.0, 97887 MiB", "rtx5090"),
    ],
)
def test_detect_maps_nvidia_smi_names_to_targets(fake_smi, line, expected):
    fake_smi.output = line + "\n"
    found = detect()
    assert found.target_id == expected
    assert found.name == line.split(",")[0] and "nvidia-smi" in found.how
    assert found.compute_capability == line.split(", ")[1]


def test_detect_counts_gpus_and_reports_memory(fake_smi):
    fake_smi.output = "NVIDIA H100 80GB HBM3, 9.0, 81559 MiB\n" * 8
    found = detect()
    assert found.gpu_count == 8 and found.memory_gb == pytest.approx(81559 / 1024)


def test_detect_gives_unknown_gpu_no_target(fake_smi):
    fake_smi.output = "Tesla T4, 7.5, 15360 MiB\n"
    found = detect()
    assert found.target_id is None and found.name == "Tesla T4"


def test_detect_retries_without_compute_cap_on_old_drivers(fake_smi):
    fake_smi.output = lambda cmd: "" if "compute_cap" in cmd[1] else "NVIDIA A100-SXM4-80GB, 81920 MiB\n"
    found = detect()
    assert found.target_id == "a100-80gb" and found.compute_capability is None
    assert len(fake_smi.calls) == 2


def test_detect_without_nvidia_smi_finds_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    assert detect() is None


def test_detect_survives_a_failing_nvidia_smi(fake_smi):
    fake_smi.returncode = 9
    fake_smi.output = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    assert detect() is None


def test_detect_survives_a_hung_nvidia_smi(fake_smi, monkeypatch):
    def hang(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(subprocess, "run", hang)
    assert detect() is None


def test_detect_with_torch_and_no_gpu_is_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False), version=types.SimpleNamespace(hip=None))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    found = detect(use_torch=True)
    assert found.target_id == "cpu" and found.compute_capability is None


def test_detect_with_torch_maps_its_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=150_000_000_000)
    cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, get_device_properties=lambda i: props)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda, version=types.SimpleNamespace(hip=None)))
    found = detect(use_torch=True)
    assert found.target_id == "h200" and found.how.startswith("torch") and found.compute_capability == "9.0"


def test_detect_prefers_nvml(monkeypatch):
    class FakeNvml:
        @staticmethod
        def nvmlInit(): pass
        @staticmethod
        def nvmlShutdown(): pass
        @staticmethod
        def nvmlDeviceGetCount(): return 1
        @staticmethod
        def nvmlDeviceGetHandleByIndex(i): return i
        @staticmethod
        def nvmlDeviceGetName(h): return b"NVIDIA B200"
        @staticmethod
        def nvmlDeviceGetCudaComputeCapability(h): return (10, 0)
        @staticmethod
        def nvmlDeviceGetMemoryInfo(h): return types.SimpleNamespace(total=183359 * 2**20)

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: pytest.fail("nvidia-smi asked although NVML answered"))
    found = detect()
    assert found.target_id == "b200" and found.how.startswith("NVML")


# ---------------------------------------------------------------- no torch
def test_importing_the_hardware_model_does_not_import_torch():
    code = "import planlang.hardware as h, sys; h.load_catalog(); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
