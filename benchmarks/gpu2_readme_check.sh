#!/usr/bin/env bash
# Device run on two GPUs (kind nvidia-h100-x2 / nvidia-h200-x2): the 2-GPU test, then the README's two-GPU command
# (第三节, 第六节) exactly as written, writing its JSON too. Start with the pip prefix of the README (第九节), carry
# [".whl"], then:  bash benchmarks/gpu2_readme_check.sh
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
export PATH="${PYTHONPATH:+$PYTHONPATH/bin:}$PATH"   # the launcher of a deepspeed installed with --target
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$OUT/env.log" 2>&1
timeout -k 10 200 python3 -m pytest -q -m gpu tests -k tensor_parallel > "$OUT/tp-test.log" 2>&1
echo "2-GPU test exit $?" >> "$OUT/env.log"
timeout -k 10 360 deepspeed --num_gpus=2 ds_bnb_infer.py --tp-size 2 --model random:llama-2-7b --max-new-tokens 128 \
  --json "$OUT/tp2.json" > "$OUT/tp2.log" 2>&1
echo "tp 2 exit $?" >> "$OUT/env.log"
cat "$OUT/env.log"; tail -n 3 "$OUT/tp-test.log"; grep -v "^\[measure\]" "$OUT/tp2.log" | tail -n 20
