#!/usr/bin/env bash
# Device run: an explicit --kernel-inject on the known-broken versions (deepspeed 0.19.8, transformers 5.17) is tried
# on a GPU, fails, and falls back to no injection (verified); under --no-fallback the same is one sentence, exit 1.
# Start with the pip prefix of the README (第九节), carry [".whl"], then:  bash benchmarks/gpu_inject_check.sh
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$OUT/env.log" 2>&1
timeout -k 10 300 python3 ds_bnb_infer.py --model random:tiny --kernel-inject --max-new-tokens 16 --iters 1 \
  --json "$OUT/inject.json" > "$OUT/inject.log" 2>&1; echo "inject exit $?" >> "$OUT/env.log"
timeout -k 10 200 python3 ds_bnb_infer.py --model random:tiny --kernel-inject --no-fallback --max-new-tokens 16 \
  --iters 1 > "$OUT/inject-no-fallback.log" 2>&1; echo "inject --no-fallback exit $?" >> "$OUT/env.log"
cat "$OUT/env.log"; grep -h "fallback\|error\|verify\|engine" "$OUT"/inject*.log
