#!/usr/bin/env bash
# Third device run on 2 GPUs (kind nvidia-h100-x2), sized to the device time left (~500 s):
# 1. two experiments of benchmarks/h100_profile.py at once, one per GPU (each bounded);
# 2. tp 2 on random:llama-2-7b again, now with every Python process dumping its stack every 100 s (faulthandler via
#    sitecustomize): the two runs before (h100x2-2026-11-25-tp*.log) printed nothing within 300 / 420 s.
# Device command (repo root, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/h100x2_run3.sh
set -u
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
export PATH="${PYTHONPATH:+$PYTHONPATH/bin:}$PATH"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log-run3.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
exp() {  # gpu timeout_s args...
  local gpu=$1 t=$2 t0=$SECONDS; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 5 "$t" python3 benchmarks/h100_profile.py "$@" >> "$OUT/log-gpu$gpu.txt" 2>&1
  echo "== gpu$gpu $*: rc=$? wall $((SECONDS - t0)) s" | tee -a "$OUT/log-gpu$gpu.txt"
}
T=$SECONDS
( exp 0 130 profile fp16-compile; exp 0 $((215 - (SECONDS - T))) loop 1 ) &
( exp 1 150 bnb-compile 4bit; exp 1 $((215 - (SECONDS - T))) profile 4bit ) &
wait
grep -h "Error\|error" "$OUT"/log-gpu*.txt | grep -v "^USDT\|warn" | tail -n 8
grep -h "^{" "$OUT"/log-gpu*.txt | cut -c1-1200
mkdir -p /tmp/fh && echo 'import faulthandler; faulthandler.dump_traceback_later(100, repeat=True)' > /tmp/fh/sitecustomize.py
PROMPT="Explain tensor parallelism now: "
t0=$SECONDS
PYTHONPATH="/tmp/fh:$PYTHONPATH" timeout -k 10 $((480 - SECONDS)) deepspeed --num_gpus=2 ds_bnb_infer.py --tp-size 2 \
  --model random:llama-2-7b --max-new-tokens 128 --warmup 1 --iters 3 --prompt "$PROMPT" --no-kernel-inject \
  --json "$OUT/tp2.json" 2>&1 | grep -v "^\[20" | grep -v "^  File.*\(threading\|concurrent\|selectors\|subprocess\).py" \
  | cut -c1-300 | tail -n 80
echo "== tp2: rc=${PIPESTATUS[0]} wall $((SECONDS - t0)) s"
