"""Pick the runtime switches for the next measurement from bench_variants.py results.

    python benchmarks/choose_variant.py variants_fp8.json variants_bf16.json [--max-ratio 0.98]

Reads the results of one or more `bench_variants.py` runs and prints shell `export` lines
for the variant that is faster than `base` in every plan at batch 1 (paired ratio at most
`--max-ratio`) and no slower anywhere (paired ratio at most 1.01 at every batch), choosing
the lowest geometric mean of the batch-1 ratios; nothing when no variant qualifies. Only the
variants named by `--only` (default: every one) are considered. `gpu_session.sh` sources the
output between its two calls, so the final bench runs with the switches that won on the
same machine; the choice is printed with its ratios on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def choose(results: list[dict], max_ratio: float = 0.98, only: set[str] | None = None) -> tuple[str, dict, dict]:
    """(name, env, batch-1 ratios by plan) of the winning variant, or ("base", {}, {})."""
    by_variant: dict[str, list[dict]] = {}
    envs: dict[str, dict] = {}
    for result in results:
        for row in result["rows"]:
            if row["variant"] == "base" or (only and row["variant"] not in only):
                continue
            by_variant.setdefault(row["variant"], []).append(row)
            envs[row["variant"]] = row["env"]
    best = ("base", {}, {})
    best_score = 0.0
    for name, rows in by_variant.items():
        b1 = {r["plan"]: r["ratio_paired"] for r in rows if r["batch"] == 1}
        plans = {r["plan"] for r in rows}
        if set(b1) != plans or any(v > max_ratio for v in b1.values()):
            continue
        if any(r["ratio_paired"] > 1.01 for r in rows):
            continue
        score = sum(math.log(v) for v in b1.values()) / len(b1)
        if score < best_score:
            best, best_score = (name, envs[name], b1), score
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--max-ratio", type=float, default=0.98)
    ap.add_argument("--only", default="", help="comma-separated variant names to consider")
    args = ap.parse_args(argv)
    results = []
    for path in args.results:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            print(f"choose_variant: skipping {path}: {exc}", file=sys.stderr)
    only = {v for v in args.only.split(",") if v} or None
    name, env, ratios = choose(results, args.max_ratio, only)
    print(f"choose_variant: {name} {env} batch-1 paired ratios {ratios}", file=sys.stderr)
    for key, value in env.items():
        print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
