"""What a `planlang lint` process loads (issue 2: lint starts in well under 0.3 s): no torch,
Triton, lark or rich for YAML plans, only the lint subcommand's parser, and no scan of the
installed distributions for pydantic plugins. Each behaviour is checked on a real process
where the process is what matters; benchmarks/lint_speed.py has the timings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from planlang import cli

ROOT = Path(__file__).resolve().parents[2]
YAML_PLANS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "plans").glob("*.yaml"))


def imported_modules(*args: str) -> tuple[int, set[str]]:
    """(exit status, the modules imported) of `python -X importtime -m planlang.cli ARGS`."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "planlang.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
             if line.startswith("import time:") and "self [us]" not in line}
    return proc.returncode, names


def test_lint_of_yaml_plans_imports_neither_torch_nor_lark_nor_rich():
    rc, names = imported_modules("lint", *YAML_PLANS)
    assert rc == 0
    assert {"pydantic", "yaml", "planlang.validate"} <= names  # the listing is read right
    assert not {"torch", "triton", "lark", "rich"} & names


def test_lint_of_the_text_form_imports_lark_but_not_torch():
    rc, names = imported_modules("lint", "plans/gemma2_decode.plan")
    assert rc == 0
    assert "lark" in names and not {"torch", "triton"} & names


@pytest.mark.parametrize("command", list(cli.SUBCOMMANDS))
def test_a_command_parses_alike_with_only_its_own_subparser(command, capsys):
    helps = []
    for parser in (cli.build_parser(), cli.build_parser(command)):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        helps.append(capsys.readouterr().out)
    assert helps[0] == helps[1] and f"usage: planlang {command}" in helps[0]


def test_the_top_level_help_still_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"    {name}" in out for name in cli.SUBCOMMANDS)


def _lint_as_program(env: dict) -> list[str]:
    """Run `planlang lint` as the console script does (`main()` without argv); returns what
    the process printed last: PYDANTIC_DISABLE_PLUGINS, then how often distribution
    metadata (where pydantic finds plugins) was listed."""
    code = ("import importlib.metadata, os, sys\n"
            "calls = []\n"
            "listing = importlib.metadata.distributions\n"
            "importlib.metadata.distributions = lambda *a, **k: calls.append(1) or listing(*a, **k)\n"
            "import planlang.cli\n"
            "sys.argv = ['planlang', 'lint', 'plans/h100_decode.yaml']\n"
            "rc = planlang.cli.main()\n"
            "print(os.environ.get('PYDANTIC_DISABLE_PLUGINS'), len(calls))\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(env, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_lint_as_a_program_lists_no_distributions_for_pydantic_plugins():
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    assert _lint_as_program(env) == ["__all__", "0"]


def test_a_pydantic_plugin_setting_of_the_user_is_kept():
    assert _lint_as_program(dict(os.environ, PYDANTIC_DISABLE_PLUGINS="some_plugin"))[0] == "some_plugin"


def test_main_called_with_arguments_leaves_the_environment_alone(capsys, monkeypatch):
    monkeypatch.delenv("PYDANTIC_DISABLE_PLUGINS", raising=False)
    assert cli.main(["lint", str(ROOT / "plans" / "h100_decode.yaml")]) == 0
    assert "PYDANTIC_DISABLE_PLUGINS" not in os.environ
