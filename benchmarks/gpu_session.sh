#!/usr/bin/env bash
# One device call: GPU tests, kernel benchmarks, and an end-to-end apply on llama-1b.
# Usage on the GPU machine: bash benchmarks/gpu_session.sh  (writes under $OUT)
set -u
OUT=${OUT:-/tmp/planlang_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Packages the GPU image lacks travel as wheels in .whl (see docs/PERFORMANCE.md).
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || \
  python3 -m pip install -q --no-deps -e . >> "$OUT/install.log" 2>&1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } > "$OUT/env.txt" 2>&1
timeout ${T_TESTS:-240} python3 -m pytest -q -m gpu tests/runtime -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/gpu_tests.log"
timeout ${T_BENCH:-150} python3 benchmarks/bench_kernels_a.py --no-sweep --out "$OUT/kernels_a.json" > "$OUT/kernels_a.txt" 2>&1
timeout ${T_BENCH:-150} python3 benchmarks/bench_kernels_b.py --out "$OUT/kernels_b.json" > "$OUT/kernels_b.txt" 2>&1
timeout ${T_APPLY:-150} planlang apply plans/h100_decode.yaml builtin:llama-1b > "$OUT/apply_1b.txt" 2>&1
timeout ${T_DECODE:-240} planlang bench plans/h100_decode.yaml builtin:llama-1b --batch 1 --batch 16 --prefill 2048 > "$OUT/bench_1b.txt" 2>&1
tail -n 5 "$OUT/gpu_tests.log"; cat "$OUT/kernels_a.txt" "$OUT/kernels_b.txt" | tail -n 60; tail -n 25 "$OUT/apply_1b.txt"; tail -n 20 "$OUT/bench_1b.txt"
