#!/usr/bin/env bash
# Issue 12 on the H100: `planlang tune` on llama-1b with a 5-minute budget, then the tuned
# plan re-measured by `planlang bench` beside the hand-written plans that pass the same gate.
# Two stages, each under its own timeout, output straight to $OUT; the optuna records
# ($OUT/tune.db) come back, so a killed run can resume from them (carry the file back).
set -u
OUT=${OUT:-/tmp/planlang_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
if [ "${STAGE:-tune}" = tune ]; then
  timeout ${T_TUNE:-560} python3 -m planlang.cli tune builtin:llama-1b -o "$OUT/best.yaml" --budget 5 --max-error 0.1 \
    --storage "$OUT/tune.db" > "$OUT/tune.txt" 2>&1; echo "rc=$?" >> "$OUT/tune.txt"
  tail -n 40 "$OUT/tune.txt"
else
  # STAGE=bench, with the tuned plan copied into the tree as plans/tuned_h100.yaml
  timeout ${T_BENCH:-500} python3 -m planlang.cli bench plans/tuned_h100.yaml plans/h100_decode.yaml plans/h100_fp8_decode.yaml \
    builtin:llama-1b --against compile --batch 1 --batch 16 --prefill 0 --eval-tokens 512 > "$OUT/bench_tuned.txt" 2>&1
  cat "$OUT/bench_tuned.txt"
fi
