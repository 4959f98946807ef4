#!/usr/bin/env bash
# Device runs on one H100 (kind nvidia-h100-x1), random:llama-2-7b, prompt 32 tokens, 128 new tokens, greedy:
# what 8-bit can do at batch 1, and DeepSpeed's enable_cuda_graph.
# PART=A: `--compare hf-8bit-t0-compile,hf-8bit-compile,ds-8bit` (with --plot), then the int8-error experiment of
#         h100_profile.py (LLM.int8 / plain int8 / nf4 against the fp16 model).
# PART=B: the gpu-marked tests, then h100_profile.py `profile 8bit` and `ds-cuda-graph`.
# Device command (repo root, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PART=A bash benchmarks/h100_int8.sh
set -u
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
FINAL=${OUT:-/tmp/out}; export OUT=/tmp/work; mkdir -p "$FINAL" "$OUT"
exec > >(tee -a "$FINAL/log-$PART.txt") 2>&1
pack() { tar -cf "$FINAL/.r.tar" -C "$OUT" . && mv "$FINAL/.r.tar" "$FINAL/results-$PART.tar"; }   # few files return
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import torch, transformers, deepspeed, bitsandbytes as b; print(torch.__version__, transformers.__version__, deepspeed.__version__, b.__version__)" 2>/dev/null
PROMPT="Explain tensor parallelism now: "            # 32 bytes = 32 tokens with the preset's byte tokenizer
LIMIT=${LIMIT:-570}                                  # seconds from the start for everything
job() {  # name command...
  local t0=$SECONDS name=$1; shift
  timeout -k 10 $((LIMIT - SECONDS)) "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name: rc=$? wall $((SECONDS - t0)) s"; grep -v "^\[20" "$OUT/$name.txt" | tail -n 12; pack
}
if [ "$PART" = A ]; then
  job compare-8bit python3 ds_bnb_infer.py --model random:llama-2-7b --max-new-tokens 128 --warmup 1 --iters 3 \
    --prompt "$PROMPT" --compare hf-8bit-t0-compile,hf-8bit-compile,ds-8bit --json "$OUT/compare-8bit.json" \
    --plot "$OUT/compare-8bit.png"
  job int8-error python3 benchmarks/h100_profile.py int8-error
else
  job gpu-tests python3 -m pytest -q -m gpu tests
  job profile-8bit python3 benchmarks/h100_profile.py profile 8bit
  job ds-cuda-graph python3 benchmarks/h100_profile.py ds-cuda-graph
fi
