#!/usr/bin/env bash
# Device run: extensions/kv_cache.py on random:llama-2-7b (fp16, one GPU), 128 and 512 new tokens, prompt 32 tokens.
# Start with the pip prefix of the README (第九节), carry [".whl"], then:  bash benchmarks/gpu_kv_cache.sh
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$OUT/env.log" 2>&1
for n in 128 512; do
  timeout -k 10 240 python3 extensions/kv_cache.py --model random:llama-2-7b --max-new-tokens "$n" \
    --prompt "Explain tensor parallelism now: " --json "$OUT/kv$n.json" --plot "$OUT/kv$n.png" > "$OUT/kv$n.log" 2>&1
  echo "kv $n exit $?" >> "$OUT/env.log"
done
cat "$OUT/env.log"; grep -v "^\[" "$OUT"/kv*.log
