#!/usr/bin/env bash
# Device run on 2 GPUs (kind nvidia-h100-x2): tensor parallel (AutoTP) on random:llama-2-7b, plus the 2-GPU test.
# Prompt 32 tokens, 128 new tokens, greedy, fp16, no kernel injection (refused on this stack, README 第七节).
# Device command (repo root, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/h100x2_tp.sh
# History: runs 1 and 2 of 2026-11-25 (h100x2-2026-11-25-tp.log, -tp2.log) used earlier forms of this file (run 1
# also ran the tp 1 baseline on GPU 0, -tp1.json, and the other gpu tests on GPU 1); in both the 7B tp 2 run printed
# nothing before its timeout (300 s, 420 s). This form writes the console to $OUT as it goes and has every Python
# process dump its stack every 120 s (faulthandler), so a slow step shows where it is.
set -u
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
export PATH="${PYTHONPATH:+$PYTHONPATH/bin:}$PATH"   # the launcher of a deepspeed installed with --target
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log-tp.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import torch, transformers, deepspeed, bitsandbytes as b; print(torch.__version__, transformers.__version__, deepspeed.__version__, b.__version__)" 2>/dev/null
t0=$SECONDS; timeout -k 10 150 python3 -m pytest -q -m gpu -k tensor_parallel tests 2>&1 | tail -n 3
echo "== gpu tp test wall $((SECONDS - t0)) s"
mkdir -p /tmp/fh && echo 'import faulthandler; faulthandler.dump_traceback_later(120, repeat=True)' > /tmp/fh/sitecustomize.py
PROMPT="Explain tensor parallelism now: "            # 32 bytes = 32 tokens with the preset's byte tokenizer
t0=$SECONDS
PYTHONPATH="/tmp/fh:${PYTHONPATH:-}" timeout -k 10 $((570 - SECONDS)) deepspeed --num_gpus=2 ds_bnb_infer.py --tp-size 2 \
  --model random:llama-2-7b --max-new-tokens 128 --warmup 1 --iters 3 --prompt "$PROMPT" --no-kernel-inject \
  --json "$OUT/tp2.json" 2>&1 | grep -v "^\[20" | cut -c1-300 > "$OUT/tp2-console.txt"
echo "== tp2: rc=${PIPESTATUS[0]} wall $((SECONDS - t0)) s"
grep -v "^  File.*/\(threading\|concurrent\|selectors\|subprocess\|queue\)" "$OUT/tp2-console.txt" | tail -n 60
