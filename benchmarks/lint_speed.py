"""`planlang lint plans/*.yaml` wall time: the median and the minimum of N runs of the real
command, each in a fresh process (the number a user and CI see), beside `python -c pass`
(the interpreter's own start-up) timed in the same loop. Then the import-time breakdown from
`python -X importtime`, and a check that neither torch nor lark (YAML-only lint) gets imported.

    python benchmarks/lint_speed.py [--runs 15] [--top 20] [--bytecode env|cached|both]

`--bytecode env` runs with the environment as it is (here PYTHONDONTWRITEBYTECODE=1, so
planlang's own modules are compiled from source on every run); `cached` lets Python keep
compiled bytecode (in a temporary PYTHONPYCACHEPREFIX, after one warm-up run), as an
installed package has. The runs of the two commands alternate, so background load falls on
both alike; the goal (issue 2) is a median under 0.3 s on the 2-core machine when idle.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

GOAL_S = 0.3


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


def time_commands(lint: list[str], runs: int, env: dict) -> dict[str, list[tuple[float, float]]]:
    base = [sys.executable, "-c", "pass"]
    for cmd in (lint, base):  # warm-up: the page cache, and the bytecode cache in `cached` mode
        _run(cmd, env)
    out: dict[str, list[tuple[float, float]]] = {"lint": [], "python -c pass": []}
    for _ in range(runs):
        out["lint"].append(_run(lint, env))
        out["python -c pass"].append(_run(base, env))
    return out


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
    args = ap.parse_args()

    plans = sorted(glob.glob("plans/*.yaml"))
    if not plans:
        raise SystemExit("run from the repository root (no plans/*.yaml here)")
    lint = [sys.executable, "-m", "planlang.cli", "lint", *plans]
    modes = ("env", "cached") if args.bytecode == "both" else (args.bytecode,)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"`planlang lint` of {len(plans)} plans, {args.runs} runs each, load average {load:.2f}, "
          f"Python {sys.version.split()[0]}, PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}")
    print(f"{'bytecode':>9} {'command':>15} {'median s':>9} {'min s':>7} {'cpu med s':>10}")
    with tempfile.TemporaryDirectory(prefix="planlang-pycache-") as cache_dir:
        verdicts = []
        for mode in modes:
            env = _environment(mode, cache_dir)
            for name, samples in time_commands(lint, args.runs, env).items():
                walls, cpus = [s[0] for s in samples], [s[1] for s in samples]
                med = statistics.median(walls)
                print(f"{mode:>9} {name:>15} {med:>9.3f} {min(walls):>7.3f} {statistics.median(cpus):>10.3f}")
                if name == "lint":
                    verdicts.append(f"{mode}: {'under' if med < GOAL_S else 'OVER'} {GOAL_S} s")
        print("goal (median):", "; ".join(verdicts))
        import_breakdown(lint, _environment(modes[0], cache_dir), args.top)


if __name__ == "__main__":
    main()
