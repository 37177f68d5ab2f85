"""Long fuzzing run of the readers and validation: tests/language/test_fuzz.py with 10,000
cases per hypothesis test (CI runs 150), then a table of cases and time per test.

    python benchmarks/fuzz_readers.py            # 10,000 cases per test
    python benchmarks/fuzz_readers.py 50000      # more

The exit status is pytest's: 0 when no case raised anything but planlang's own errors.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ_FILE = ROOT / "tests" / "language" / "test_fuzz.py"


class Recorder:
    """A pytest plugin that keeps, per test, its outcome, time and the cases it ran."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.known_bugs: dict = {}

    def pytest_runtest_makereport(self, item, call):
        if call.when != "call":
            return
        self.known_bugs = dict(getattr(item.module, "KNOWN_BUG_HITS", {}))
        counter = getattr(item.module, "CASES", {})
        self.rows[item.name] = {
            "seconds": call.stop - call.start,
            "cases": counter.get(item.originalname, 1),
            "outcome": "?",
        }

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.nodeid.split("::")[-1] in self.rows:
            row = self.rows[report.nodeid.split("::")[-1]]
            row["outcome"] = "xfail" if hasattr(report, "wasxfail") else report.outcome


def main(argv: list[str]) -> int:
    examples = int(argv[0]) if argv else 10_000
    os.environ["PLANLANG_FUZZ_EXAMPLES"] = str(examples)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import pytest

    recorder = Recorder()
    start = time.perf_counter()
    status = pytest.main([str(FUZZ_FILE), "-q", "-p", "no:cacheprovider", "-p", "no:warnings"],
                         plugins=[recorder])
    total = time.perf_counter() - start

    fuzzed = {name: row for name, row in recorder.rows.items() if row["cases"] > 1}
    print()
    print(f"{'test':<64} {'cases':>8} {'seconds':>9} {'cases/s':>8} {'outcome':>8}")
    for name, row in sorted(fuzzed.items()):
        rate = row["cases"] / row["seconds"] if row["seconds"] else 0.0
        print(f"{name:<64} {row['cases']:>8} {row['seconds']:>9.1f} {rate:>8.0f} {row['outcome']:>8}")
    for (kind, file, function), hits in sorted(recorder.known_bugs.items()):
        print(f"  skipped {hits} case(s) hitting the known bug {kind} in {file}:{function} (see KNOWN_BUGS)")
    others = sorted(name for name, row in recorder.rows.items() if name not in fuzzed and row["outcome"] == "failed")
    if others:
        print(f"  other tests of the file failing: {', '.join(others)}")
    cases = sum(row["cases"] for row in fuzzed.values())
    failed = sum(row["outcome"] == "failed" for row in fuzzed.values())
    print(f"fuzzed {len(fuzzed)} tests, {cases} cases (>= {examples} asked per test) in {total:.0f} s: "
          f"{'no' if not failed else str(failed) + ' test(s) with'} unexpected exceptions")
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
