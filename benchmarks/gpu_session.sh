#!/usr/bin/env bash
# GPU calls of a session, one stage a call (STAGE=...), each step under its own timeout with
# its output straight to $OUT (a call cut short still returns what finished):
#   check  every GPU test; the kernel benchmark (attention, sampling); the two H100 decode
#          plans on llama-1b at batch 1 and 16 with PDL off and on (plans only, --profile)
#   final  GPU tests ($TESTS), then the tuned plan (plans/tuned_h100.yaml, if present) and the
#          hand-written plans against eager, torch.compile(reduce-overhead) and torchao FP8 in
#          one run, then the attention and sampling kernels
#   tune   the norm-GEMV and attention kernel sweeps, then
#          `planlang tune builtin:llama-1b --budget 5 --max-error 0.1` (issue 12)
#   precision  the FP8/format/KV-cache GPU tests and the accuracy of every number format
#          on llama-tiny-trained with the real FP8 kernels (benchmarks/accuracy_formats.py)
# The final bench takes about 7 minutes (torchao's compile is the slow part): give it
# T_BENCH=480 and the other steps less, or drop torchao from --against.
# Wheels for what the GPU image lacks (pydantic, lark, optuna, torchao) travel in .whl/.
set -u
OUT=${OUT:-/tmp/planlang_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } > "$OUT/env.txt" 2>&1
PLANS="plans/h100_decode.yaml plans/h100_fp8_decode.yaml"
case "${STAGE:-check}" in
check)
  timeout ${T_TESTS:-240} python3 -m pytest -q -m gpu tests/runtime -p no:cacheprovider -rfs > "$OUT/gpu_tests.log" 2>&1
  echo "tests rc=$?" >> "$OUT/gpu_tests.log"
  for pdl in 0 1; do
    PLANLANG_PDL=$pdl timeout ${T_BENCH:-150} python3 -m planlang.cli bench $PLANS builtin:llama-1b --against "" \
      --batch 1 --batch 16 --prefill 0 --profile --eval-tokens 256 > "$OUT/bench_pdl$pdl.txt" 2> "$OUT/bench_pdl$pdl.err"
  done
  timeout ${T_KB:-100} python3 benchmarks/bench_kernels_b.py --out "$OUT/kernels_b.json" > "$OUT/kernels_b.txt" 2>&1
  tail -n 5 "$OUT/gpu_tests.log"; cat "$OUT/bench_pdl0.txt" "$OUT/bench_pdl1.txt" | head -120
  ;;
final)
  # the GPU tests of what changed this session, then the headline bench, then the kernels
  timeout ${T_TESTS:-150} python3 -m pytest -q -m gpu -p no:cacheprovider -rfs ${TESTS:-tests/runtime} \
    > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/gpu_tests.log"
  extra=""; [ -f plans/tuned_h100.yaml ] && extra=plans/tuned_h100.yaml
  timeout ${T_BENCH:-480} python3 -m planlang.cli bench $extra $PLANS builtin:llama-1b \
    --against ${AGAINST:-eager,compile,torchao-fp8} --batch 1 --batch 16 --prefill ${PREFILL:-2048} --profile \
    --eval-tokens 256 > "$OUT/bench_final.txt" 2> "$OUT/bench_final.err"
  timeout ${T_KB:-80} python3 benchmarks/bench_kernels_b.py --quick --out "$OUT/kernels_b.json" > "$OUT/kernels_b.txt" 2>&1
  tail -n 8 "$OUT/gpu_tests.log"; cat "$OUT/bench_final.txt"; tail -n 30 "$OUT/kernels_b.txt"
  ;;
tune)
  # the kernel sweeps first (they set defaults), then the tune itself
  timeout ${T_SWEEP:-120} python3 benchmarks/bench_norm_gemm.py --sweep --out "$OUT/norm_gemm.json" > "$OUT/norm_gemm.txt" 2>&1
  timeout ${T_KB:-90} python3 benchmarks/bench_kernels_b.py --sweep --quick --out "$OUT/kernels_b_sweep.json" > "$OUT/kernels_b_sweep.txt" 2>&1
  timeout ${T_TUNE:-560} python3 -m planlang.cli tune builtin:llama-1b -o "$OUT/best.yaml" --budget 5 --max-error 0.1 \
    --storage "$OUT/tune.db" > "$OUT/tune.txt" 2>&1; echo "rc=$?" >> "$OUT/tune.txt"
  tail -n 60 "$OUT/tune.txt"
  ;;
precision)
  timeout ${T_TESTS:-100} python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/runtime/test_kernels_fp8.py tests/runtime/test_kv_cache_fp8.py tests/runtime/test_formats.py \
    tests/runtime/test_precision.py > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/gpu_tests.log"
  timeout ${T_ACC:-60} python3 benchmarks/accuracy_formats.py --out "$OUT/accuracy.json" > "$OUT/accuracy.txt" 2>&1
  tail -n 3 "$OUT/gpu_tests.log"; cat "$OUT/accuracy.txt"
  ;;
esac
