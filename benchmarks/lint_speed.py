"""`planlang lint plans/*.yaml` wall time: median of several runs of the real command,
in fresh processes (the number a user and CI see). Also checks no torch gets imported."""
import glob
import statistics
import subprocess
import sys
import time

RUNS = 9


def main() -> None:
    plans = sorted(glob.glob("plans/*.yaml"))
    cmd = [sys.executable, "-m", "planlang.cli", "lint", *plans]
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    imp = subprocess.run([sys.executable, "-X", "importtime", "-m", "planlang.cli", "lint", *plans],
                         capture_output=True, text=True)
    torch_lines = [l for l in imp.stderr.splitlines() if "| torch" in l or l.rstrip().endswith(" torch")]
    print(f"{'plans':>6} {'runs':>5} {'median s':>9} {'min s':>7} {'torch imported':>15}")
    print(f"{len(plans):>6} {RUNS:>5} {statistics.median(times):>9.3f} {min(times):>7.3f} {str(bool(torch_lines)):>15}")


if __name__ == "__main__":
    main()
