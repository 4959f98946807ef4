#!/usr/bin/env bash
# Usage (repo root, after the device prefix of benchmarks/README.md, carry [".whl"]):
#   [PARTS="tests readme inject"] [K="pytest -k expression"] bash benchmarks/gpu_tests.sh
# The checks that are not measurements, on one GPU or two (the 2-GPU tests skip on one):
#   tests   python -m pytest -q -m gpu tests [-k "$K"]                                    -> tests.log
#   readme  README.md 三's GPU commands exactly as written there (read from the README's bash block after
#           "一张 GPU", so the two cannot drift apart); the deepspeed --num_gpus=2 line only where 2 GPUs are visible
#                                                                                          -> readme-N.log
#   inject  an explicit --kernel-inject on the known-broken versions (deepspeed 0.19.8, transformers >= 4.54):
#           tried, fails, falls back to no injection and verifies (exit 0); with --no-fallback one sentence, exit 1
#                                                                                          -> inject.json, inject.log,
#                                                                                             inject-no-fallback.log
# env.log: date, card, driver, versions, each part's exit. Examples: K="tensor_parallel or symmetric" PARTS=tests
# (the 2-GPU tests of tests/test_gpu.py); K=2_gpus (tests/test_fast_decode.py's); PARTS=inject.
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
export PATH="${PYTHONPATH:+$PYTHONPATH/bin:}$PATH"   # the launcher of a deepspeed installed with --target
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
command -v python >/dev/null || { mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import ds_bnb_infer as m; print(m.versions())"; } > "$OUT/env.log" 2>&1
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)

for part in ${PARTS:-tests readme}; do
  case $part in
    tests)
      timeout -k 10 "${TEST_LIMIT:-400}" python -m pytest -q -m gpu tests ${K:+-k "$K"} > "$OUT/tests.log" 2>&1
      echo "tests exit $? ($(tail -n 1 "$OUT/tests.log"))" >> "$OUT/env.log" ;;
    readme)
      n=0
      while IFS= read -r cmd; do
        [ -z "$cmd" ] && continue
        [[ $cmd == deepspeed\ --num_gpus=2* ]] && (( gpus < 2 )) && { echo "readme skipped (1 GPU): $cmd" >> "$OUT/env.log"; continue; }
        n=$((n + 1))
        timeout -k 10 "${README_LIMIT:-240}" bash -c "$cmd" > "$OUT/readme-$n.log" 2>&1
        echo "readme $n exit $?: $cmd" >> "$OUT/env.log"
      done < <(awk '/^一张 GPU/ {seen=1} seen && /^```bash/ {inside=1; next} inside && /^```/ {exit} inside' README.md)
      ;;
    inject)
      timeout -k 10 300 python3 ds_bnb_infer.py --model random:tiny --kernel-inject --max-new-tokens 16 --iters 1 \
        --json "$OUT/inject.json" > "$OUT/inject.log" 2>&1
      echo "inject exit $?" >> "$OUT/env.log"
      timeout -k 10 200 python3 ds_bnb_infer.py --model random:tiny --kernel-inject --no-fallback --max-new-tokens 16 \
        --iters 1 > "$OUT/inject-no-fallback.log" 2>&1
      echo "inject --no-fallback exit $?" >> "$OUT/env.log" ;;
    *) echo "unknown part $part" >> "$OUT/env.log" ;;
  esac
done
cat "$OUT/env.log"; tail -n 3 "$OUT"/*.log
