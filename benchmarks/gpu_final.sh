#!/usr/bin/env bash
# One GPU call: every GPU test, the attention/sampling kernel benchmark,
# and `planlang bench` of the H100 decode plan on llama-1b (with the per-kernel profile).
set -u
OUT=${OUT:-/tmp/planlang_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } > "$OUT/env.txt" 2>&1
timeout ${T_TESTS:-130} python3 -m pytest -q -m gpu tests/runtime -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/gpu_tests.log"
timeout ${T_KB:-80} python3 benchmarks/bench_kernels_b.py --out "$OUT/kernels_b.json" > "$OUT/kernels_b.txt" 2>&1
timeout ${T_DECODE:-200} python3 -m planlang.cli bench plans/h100_decode.yaml builtin:llama-1b --batch 1 --batch 16 --prefill 2048 --profile > "$OUT/bench_1b.txt" 2>&1
tail -n 4 "$OUT/gpu_tests.log"; tail -n 30 "$OUT/kernels_b.txt"; cat "$OUT/bench_1b.txt" | head -60
