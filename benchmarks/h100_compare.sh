#!/usr/bin/env bash
# Device run: the gpu-marked tests, then `ds_bnb_infer.py --compare` groups on random:llama-2-7b (prompt 32 tokens,
# 128 new tokens, greedy). Each group has its own timeout so one slow mode cannot lose the others' results.
# Device command (repo root, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PART=a bash benchmarks/h100_compare.sh
set -u
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log-$PART.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, deepspeed, bitsandbytes as b; print(torch.__version__, transformers.__version__, deepspeed.__version__, b.__version__)" 2>/dev/null
PROMPT="Explain tensor parallelism now: "            # 32 bytes = 32 tokens with the preset's byte tokenizer
COMMON=(--model random:llama-2-7b --max-new-tokens 128 --warmup 1 --iters 3 --prompt "$PROMPT")
group() {  # name timeout_s batch modes [plot]
  local t0=$SECONDS
  timeout -k 10 "$2" python3 ds_bnb_infer.py "${COMMON[@]}" --batch-size "$3" --compare "$4" \
    --json "$OUT/$1.json" ${5:+--plot "$OUT/$1.png"} 2>&1 | grep -v "^\[20"
  echo "== group $1: rc=${PIPESTATUS[0]} wall $((SECONDS - t0)) s"
}
if [ "$PART" = a ]; then
  t0=$SECONDS; timeout -k 10 240 python3 -m pytest -q -m gpu tests 2>&1 | tail -n 15; echo "== gpu tests wall $((SECONDS - t0)) s"
  group compare-b1 230 1 hf,ds,ds-inject,ds-4bit plot
  group compare-b1-compile 150 1 hf-compile
elif [ "$PART" = c ]; then
  group compare-b1-8bit 170 1 ds-8bit
  group compare-b1-4bit-compile 230 1 hf-4bit-compile
else
  group compare-b16 250 16 hf,ds,hf-compile plot
  group compare-b1-more 220 1 ds-8bit,hf-4bit-compile
  # Kernel injection, twice, with tracebacks: the first call JIT-builds DeepSpeed's kernels, the second loads them.
  for i in 1 2; do
    timeout -k 5 $(( i == 1 ? 80 : 40 )) python3 ds_bnb_infer.py --model random:tiny --device cuda --no-fallback \
      --max-new-tokens 8 --iters 1 --debug 2>&1 | grep -v "^\[20" | grep -B2 -A1 "Error\|error" | tail -n 12
    echo "== inject debug run $i: rc=${PIPESTATUS[0]}"
  done
fi
