#!/usr/bin/env bash
# One GPU call for the precision work (issue 10) and the decode headline (issue 9):
#   1. the new GPU tests (fp8 kernels, KV cache, formats, precision, accuracy);
#   2. the accuracy of each format on llama-tiny-trained with the real FP8 kernels;
#   3. `planlang bench` of the bf16 and FP8 decode plans on llama-1b against eager,
#      torch.compile(reduce-overhead) and torchao FP8 (dynamic row-wise and weight-only),
#      all in one run, with the per-kernel profile.
# Each stage has its own timeout and writes straight to $OUT. Wheels (.whl) carry
# pydantic/lark/rich/optuna/torchao to the GPU image.
set -u
OUT=${OUT:-/tmp/planlang_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; python3 -c "import torchao; print('torchao', torchao.__version__)"; date -u; } > "$OUT/env.txt" 2>&1
timeout ${T_TESTS:-100} python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/runtime/test_kernels_fp8.py tests/runtime/test_kv_cache_fp8.py tests/runtime/test_formats.py \
  tests/runtime/test_precision.py > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/gpu_tests.log"
timeout ${T_ACC:-60} python3 benchmarks/accuracy_formats.py --out "$OUT/accuracy.json" > "$OUT/accuracy.txt" 2>&1
timeout ${T_BENCH:-330} python3 -m planlang.cli bench plans/h100_decode.yaml plans/h100_fp8_decode.yaml builtin:llama-1b \
  --against eager,compile,torchao-fp8,torchao-fp8-wo --batch 1 --batch 16 --prefill 2048 --profile \
  > "$OUT/bench_1b.txt" 2>&1
tail -n 3 "$OUT/gpu_tests.log"; cat "$OUT/accuracy.txt"; head -80 "$OUT/bench_1b.txt"
