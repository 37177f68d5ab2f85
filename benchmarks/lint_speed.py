"""`planlang lint plans/*.yaml` wall time: the median and the minimum of N runs of the real
command, each in a fresh process (the number a user and CI see), beside `python -c pass`
(the interpreter's own start-up) timed in the same loop. Then the import-time breakdown from
`python -X importtime`, and a check that neither torch nor lark (YAML-only lint) gets imported.

    python benchmarks/lint_speed.py [--runs 15] [--top 20] [--bytecode env|cached|both]
                                    [--instructions] [--script PATH]...

The commands timed: `python -m planlang.cli lint`, the installed console script (`planlang
lint`: the one beside this interpreter, the one on PATH where that is another file, and each
`--script`) and `python -c pass`. Under pyenv this script's own PATH starts with the
interpreter's bin/, so the shim a shell runs (`~/.pyenv/shims/planlang`: bash and `pyenv
exec` before Python starts) is timed only when named with `--script`. A console script runs
the installed planlang (with `pip install -e .`, this checkout), wherever it is started.

`--bytecode env` runs with the environment as it is (here PYTHONDONTWRITEBYTECODE=1, so
planlang's own modules are compiled from source on every run); `cached` lets Python keep
compiled bytecode (in a temporary PYTHONPYCACHEPREFIX, after one warm-up run), as an
installed package has. The runs of the commands alternate, so background load falls on all
alike, and the load average is printed before and after; the goal (issue 2) is a median
under 0.3 s on the 2-core machine when idle. `--instructions` adds one run of each under
valgrind (cachegrind, PYTHONHASHSEED=0): instruction counts do not move with the machine's
load, so two versions of the code compare even on a busy machine.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 0.3
BASELINE = "python -c pass"


def _run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one run of `cmd` in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if code not in (0, 1):  # 1: the plans have errors, still a timed lint
        err = subprocess.run(cmd, env=env, capture_output=True, text=True).stderr
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{err}")
    return wall, usage.ru_utime + usage.ru_stime


def _environment(mode: str, cache_dir: str) -> dict:
    env = dict(os.environ)
    if mode == "cached":
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = cache_dir
    return env


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def lint_commands(plans: list[str], scripts: list[str]) -> dict[str, list[str]]:
    """The ways to run `planlang lint PLANS`: the module, then each console script found,
    then `scripts` (paths the user asked for, e.g. a pyenv shim)."""
    commands = {"python -m planlang.cli": [sys.executable, "-m", "planlang.cli", "lint", *plans]}
    installed = Path(sys.executable).with_name("planlang")
    on_path = shutil.which("planlang")
    if installed.is_file():
        commands["planlang (bin/)"] = [str(installed), "lint", *plans]
    if on_path and (not installed.is_file() or not os.path.samefile(on_path, installed)):
        commands["planlang (PATH)"] = [on_path, "lint", *plans]
    for script in scripts:
        commands[f"planlang ({Path(script).parent.name}/)"] = [script, "lint", *plans]
    return commands


def time_commands(commands: dict[str, list[str]], runs: int, env: dict) -> dict[str, list[tuple[float, float]]]:
    """`runs` timings of each command, the commands alternating within each round."""
    commands = {**commands, BASELINE: [sys.executable, "-c", "pass"]}
    for cmd in commands.values():  # warm-up: the page cache, and the bytecode cache in `cached` mode
        _run(cmd, env)
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            out[name].append(_run(cmd, env))
    return out


def count_instructions(cmd: list[str], env: dict) -> int | None:
    """Instructions of one run of `cmd` under valgrind's cachegrind; None without valgrind.
    Console scripts are run through this interpreter so that valgrind follows Python itself."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return None
    if cmd[0] != sys.executable:
        with open(cmd[0], "rb") as f:
            if f.read(2) != b"#!" or b"python" not in f.readline():
                return None  # a shell shim: valgrind would count the shell
        cmd = [sys.executable, *cmd]
    proc = subprocess.run([valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", *cmd],
                          env={**env, "PYTHONHASHSEED": "0"}, capture_output=True, text=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    return int(found.group(1).replace(",", "")) if found else None


def import_breakdown(lint: list[str], env: dict, top: int) -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", *lint[1:]], env=env, capture_output=True, text=True)
    rows = []  # (self us, cumulative us, depth, name)
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, self_us, cum, name = (part for part in ("x|" + line.split(":", 1)[1]).split("|"))
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append((int(self_us), int(cum), depth, name.strip()))
    names = {r[3] for r in rows}
    total = sum(r[0] for r in rows)
    print(f"\nimport time (-X importtime, one run): {total / 1e3:.1f} ms in {len(rows)} modules")
    print(f"  torch imported: {'torch' in names}; lark imported: {'lark' in names}; "
          f"pydantic: {'pydantic' in names}; rich: {'rich' in names}")
    by_package: dict[str, int] = {}
    for self_us, _, _, name in rows:
        package = name.split(".")[0]
        by_package[package] = by_package.get(package, 0) + self_us
    print(f"  self time by top-level package (top {top}):")
    for package, us in sorted(by_package.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {us / 1e3:7.1f} ms  {package}")
    print("  imports made at top level (cumulative):")
    for _, cum, _, name in sorted((r for r in rows if r[2] == 0), key=lambda r: -r[1])[:top]:
        print(f"    {cum / 1e3:7.1f} ms  {name}")
    print(f"  modules by self time (top {top}):")
    for self_us, _, _, name in sorted(rows, key=lambda r: -r[0])[:top]:
        print(f"    {self_us / 1e3:7.1f} ms  {name}")
    own = [r for r in rows if r[3] == "planlang" or r[3].startswith("planlang.")]
    print("  planlang modules (self / cumulative ms): "
          + ", ".join(f"{n} {s / 1e3:.1f}/{c / 1e3:.1f}" for s, c, _, n in own))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--top", type=int, default=20, help="rows of the import-time tables")
    ap.add_argument("--bytecode", choices=("env", "cached", "both"), default="both")
    ap.add_argument("--instructions", action="store_true", help="also count instructions under valgrind")
    ap.add_argument("--script", action="append", default=[], metavar="PATH",
                    help="also time this console script, e.g. /root/.pyenv/shims/planlang (repeatable)")
    args = ap.parse_args()

    plans = sorted(glob.glob("plans/*.yaml"))
    if not plans:
        raise SystemExit("run from the repository root (no plans/*.yaml here)")
    commands = lint_commands(plans, args.script)
    modes = ("env", "cached") if args.bytecode == "both" else (args.bytecode,)
    print(f"`planlang lint` of {len(plans)} plans, {args.runs} runs each, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}, PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}")
    for name, cmd in commands.items():
        if name != "python -m planlang.cli":
            print(f"  {name}: {cmd[0]}")
    width = max(map(len, [*commands, BASELINE]))
    print(f"{'bytecode':>9} {'command':>{width}} {'median s':>9} {'min s':>7} {'cpu med s':>10}  load before/after")
    with tempfile.TemporaryDirectory(prefix="planlang-pycache-") as cache_dir:
        verdicts = []
        for mode in modes:
            env = _environment(mode, cache_dir)
            load_before = _load()
            timings = time_commands(commands, args.runs, env)
            load = f"{load_before}/{_load()}"
            for name, samples in timings.items():
                walls, cpus = [s[0] for s in samples], [s[1] for s in samples]
                med = statistics.median(walls)
                cpu = statistics.median(cpus)
                print(f"{mode:>9} {name:>{width}} {med:>9.3f} {min(walls):>7.3f} {cpu:>10.3f}  {load}")
                if name != BASELINE:
                    verdicts.append(f"{mode} {name}: {'under' if med < GOAL_S else 'OVER'} {GOAL_S} s")
        print("goal (median):", "; ".join(verdicts))
        if args.instructions:
            print("\ninstructions (valgrind cachegrind, one run, PYTHONHASHSEED=0), millions:")
            for mode in modes:
                env = _environment(mode, cache_dir)  # `cached`: the bytecode the timed runs wrote
                for name, cmd in {**commands, BASELINE: [sys.executable, "-c", "pass"]}.items():
                    count = count_instructions(cmd, env)
                    shown = "n/a (no valgrind, or a shell shim)" if count is None else f"{count / 1e6:9.1f}"
                    print(f"{mode:>9} {name:>{width}} {shown}")
        import_breakdown(commands["python -m planlang.cli"], _environment(modes[0], cache_dir), args.top)


if __name__ == "__main__":
    main()
