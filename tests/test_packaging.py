"""Packaging: the wheel carries the grammar, the hardware catalog and every runtime
subpackage, and the language works from the installed wheel; linting never imports torch.

The wheel is built from a copy of the source tree, so the test leaves no `build/` behind
in the checkout that others work in.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "planlang", "grammar", "runtime")
NO_TORCH = ("torch", "triton")


def _copy_sources(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def _has_pypa_build() -> bool:
    # Asked of the installed distributions, not the import system: setuptools' `build/`
    # folder in the checkout imports as a namespace package called `build` too.
    try:
        importlib.metadata.distribution("build")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _build_command(project: Path, out: Path) -> list[str]:
    if _has_pypa_build():
        return [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
                "--outdir", str(out), str(project)]
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
            "-w", str(out), str(project)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the project, built once for this module."""
    project = _copy_sources(tmp_path_factory.mktemp("project"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(_build_command(project, out), cwd=out, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = sorted(out.glob("planlang-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_holds_the_grammar_the_catalog_and_the_runtime(wheel):
    names = _names(wheel)
    for required in ("planlang/__init__.py", "planlang/cli.py", "planlang/grammar/planlang.lark",
                     "planlang/grammar/__init__.py", "planlang/hardware.yaml", "planlang/runtime/__init__.py",
                     "planlang/runtime/kernels/__init__.py", "planlang/runtime/models/__init__.py",
                     "planlang/runtime/passes/__init__.py"):
        assert required in names, required


def test_wheel_holds_every_runtime_subpackage_of_the_tree(wheel):
    # pyproject lists packages one by one: a new runtime/<sub>/ must be added there too.
    names = _names(wheel)
    subpackages = [p.parent.relative_to(ROOT / "runtime") for p in (ROOT / "runtime").rglob("__init__.py")]
    assert len(subpackages) >= 4
    for sub in subpackages:
        init = "/".join(("planlang", "runtime", *sub.parts, "__init__.py"))
        assert init in names, f"runtime/{sub} is not in the wheel: add it to [tool.setuptools] packages"
    modules = [p.relative_to(ROOT / "runtime") for p in (ROOT / "runtime").rglob("*.py")]
    for module in modules:
        assert "/".join(("planlang", "runtime", *module.parts)) in names, module


def test_wheel_holds_the_runtime_model_data(wheel):
    data = ROOT / "runtime" / "models" / "data"
    files = [p for p in data.rglob("*") if p.is_file()] if data.is_dir() else []
    if not files:
        pytest.skip("no runtime/models/data in this tree yet")
    names = _names(wheel)
    for path in files:
        assert "/".join(("planlang", "runtime", *path.relative_to(ROOT / "runtime").parts)) in names


def test_wheel_declares_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as zf:
        entry = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = zf.read(entry).decode()
    assert "planlang = planlang.cli:main" in text


def test_the_installed_wheel_lints_both_syntaxes_without_torch(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)  # a pure-Python wheel: unpacking it is installing it
    work = tmp_path / "work"
    work.mkdir()
    for name in ("h100_decode.yaml", "gemma2_decode.plan"):
        shutil.copy(ROOT / "plans" / name, work / name)
    code = ("import sys, planlang, planlang.cli\n"
            f"assert planlang.__file__.startswith({str(site)!r}), planlang.__file__\n"
            "rc = planlang.cli.main(['lint', '--target', 'h100', 'h100_decode.yaml', 'gemma2_decode.plan'])\n"
            f"assert not [m for m in {NO_TORCH!r} if m in sys.modules]\n"
            "sys.exit(rc)\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 plan(s): 0 error(s)" in proc.stderr


@pytest.mark.parametrize("command", [
    ["lint", "plans/h100_decode.yaml"],
    ["lint", "--format", "sarif", "plans/gemma2_decode.plan"],
    ["fmt", "--to", "plan", "plans/h100_fp8_decode.yaml"],
    ["explain", "plans/h100_fp8_decode.yaml"],
], ids=["lint", "lint-sarif-plan", "fmt", "explain"])
def test_the_language_commands_do_not_import_torch(command):
    code = ("import sys, planlang.cli\n"
            f"rc = planlang.cli.main({command!r})\n"
            f"imported = [m for m in {NO_TORCH!r} if m in sys.modules]\n"
            "assert not imported, imported\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_briefed_one_liner_does_not_import_torch():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, planlang.cli; planlang.cli.main(['lint', 'plans/h100_decode.yaml']); "
                               "assert 'torch' not in sys.modules"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
