#!/usr/bin/env bash
# Device runs on the two-GPU host (kind nvidia-h100-x2), random:llama-2-7b, prompt 32 tokens, 128 new tokens, greedy.
# PART=A: 1. tp 2 over both GPUs (AutoTP, fp16, no injection), every rank dumping its stack every 90 s;
#         2. two jobs at a time, one per GPU: GPU 0 the tp 1 baseline, then the gpu-marked tests;
#            GPU 1 `--compare hf-compile,hf` at batch 1 (with --plot).
# PART=B: two jobs at a time: GPU 0 `--compare hf-4bit-compile,hf-8bit-compile` at batch 1, then the `graph`
#         experiment of h100_profile.py (fp16 step as a CUDA graph of eager kernels, batch 1 and 16);
#         GPU 1 `--compare hf-compile,hf` at batch 16 (with --plot), then `h100_profile.py profile 8bit`.
# History: runs 1-3 of 2026-11-25 (earlier forms) saw tp 2 print nothing for 300-420 s; the diagnosis run
# (h100x2_diag.sh, h100x2-2026-11-25-diag.log) found why: drawing the random weights on the host's CPU
# (torch's CPU normal_ in fp16: 123 s for 3e9 numbers; the 7B preset 337 s per process). Weights are now drawn
# on the GPU (random_weights), and the same seed gives tp 1 and tp 2 the same model.
# PART=C: fp32 tp 2 and fp32 tp 1 (128 greedy tokens compared), then --compile rows: 4-bit at batch 1 (GPU 0),
#         fp16 at batch 16 and 8-bit at batch 1 (GPU 1).
# Device command (repo root, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PART=A bash benchmarks/h100x2_tp.sh
set -u
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
export PATH="${PYTHONPATH:+$PYTHONPATH/bin:}$PATH"   # the launcher of a deepspeed installed with --target
# At most 8 files come back from a device run: the log, plus every result packed (again after each job) into one tar.
FINAL=${OUT:-/tmp/out}; OUT=/tmp/work; mkdir -p "$FINAL" "$OUT"
exec > >(tee -a "$FINAL/log-$PART.txt") 2>&1
pack() { tar -cf "$FINAL/.results-$BASHPID.tar" -C "$OUT" . && mv "$FINAL/.results-$BASHPID.tar" "$FINAL/results-$PART.tar"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import torch, transformers, deepspeed, bitsandbytes as b; print(torch.__version__, transformers.__version__, deepspeed.__version__, b.__version__)" 2>/dev/null
PROMPT="Explain tensor parallelism now: "            # 32 bytes = 32 tokens with the preset's byte tokenizer
COMMON=(--model random:llama-2-7b --max-new-tokens 128 --warmup 1 --iters 3 --prompt "$PROMPT")
LIMIT=${LIMIT:-555}                                  # seconds from the start for everything
group() {  # gpu name batch modes [plot]
  local t0=$SECONDS
  CUDA_VISIBLE_DEVICES=$1 timeout -k 10 $((LIMIT - SECONDS)) python3 ds_bnb_infer.py "${COMMON[@]}" --batch-size "$3" \
    --compare "$4" --json "$OUT/$2.json" ${5:+--plot "$OUT/$2.png"} > "$OUT/$2.txt" 2>&1
  echo "== gpu$1 group $2: rc=$? wall $((SECONDS - t0)) s"; pack
}
if [ "$PART" = A ]; then
  mkdir -p /tmp/fh && echo 'import faulthandler; faulthandler.dump_traceback_later(90, repeat=True)' > /tmp/fh/sitecustomize.py
  t0=$SECONDS
  PYTHONPATH="/tmp/fh:${PYTHONPATH:-}" timeout -k 10 300 deepspeed --num_gpus=2 ds_bnb_infer.py --tp-size 2 \
    "${COMMON[@]}" --no-kernel-inject --json "$OUT/tp2.json" > "$OUT/tp2-console.txt" 2>&1
  echo "== tp2: rc=$? wall $((SECONDS - t0)) s"
  grep -v "^\[20\|^  File.*/\(threading\|concurrent\|selectors\|subprocess\|queue\)" "$OUT/tp2-console.txt" | cut -c1-250 | tail -n 45
  (
    t0=$SECONDS; CUDA_VISIBLE_DEVICES=0 timeout -k 10 120 python3 ds_bnb_infer.py "${COMMON[@]}" --no-kernel-inject \
      --json "$OUT/tp1.json" > "$OUT/tp1-console.txt" 2>&1
    echo "== gpu0 tp1: rc=$? wall $((SECONDS - t0)) s"
    t0=$SECONDS; CUDA_VISIBLE_DEVICES=0 timeout -k 10 $((LIMIT - SECONDS)) python3 -m pytest -q -m gpu tests \
      > "$OUT/gpu-tests.txt" 2>&1
    echo "== gpu0 gpu tests: rc=$? wall $((SECONDS - t0)) s"
  ) &
  group 1 compile-b1 1 hf-compile,hf plot &
  wait
  grep -v "^\[20" "$OUT/tp1-console.txt" | tail -n 14
  tail -n 30 "$OUT/gpu-tests.txt"
elif [ "$PART" = C ]; then
  # fp32 tp 2 against fp32 tp 1 (do 128 greedy tokens agree where rounding is ~1e-7?), then the last --compile rows.
  ONE=(--model random:llama-2-7b --max-new-tokens 128 --warmup 0 --iters 1 --prompt "$PROMPT" --no-kernel-inject --dtype fp32)
  t0=$SECONDS
  timeout -k 10 180 deepspeed --num_gpus=2 ds_bnb_infer.py --tp-size 2 "${ONE[@]}" --json "$OUT/tp2-fp32.json" \
    > "$OUT/tp2-fp32-console.txt" 2>&1
  echo "== tp2 fp32: rc=$? wall $((SECONDS - t0)) s"; pack
  grep -v "^\[20" "$OUT/tp2-fp32-console.txt" | cut -c1-250 | tail -n 16
  (
    t0=$SECONDS; CUDA_VISIBLE_DEVICES=0 timeout -k 10 100 python3 ds_bnb_infer.py "${ONE[@]}" --json "$OUT/tp1-fp32.json" \
      > "$OUT/tp1-fp32-console.txt" 2>&1
    echo "== gpu0 tp1 fp32: rc=$? wall $((SECONDS - t0)) s"; pack
    group 0 compile-b1-4bit 1 hf-4bit-compile
  ) &
  ( group 1 compile-b16 16 hf-compile plot; group 1 compile-b1-8bit 1 hf-8bit-compile ) &
  wait
  python3 -c "import json; a, b = (json.load(open('$OUT/tp%s-fp32.json' % n))['outputs'][0]['text'] for n in (1, 2)); print('tp1 == tp2 fp32 texts:', a == b)"
else
  exp() {  # gpu args...: one experiment of benchmarks/h100_profile.py (appends to $OUT/profile.jsonl)
    local gpu=$1 t0=$SECONDS; shift
    CUDA_VISIBLE_DEVICES=$gpu timeout -k 5 $((LIMIT - SECONDS)) python3 benchmarks/h100_profile.py "$@" > "$OUT/exp-$gpu-$1.txt" 2>&1
    echo "== gpu$gpu experiment $*: rc=$? wall $((SECONDS - t0)) s"
  }
  ( group 0 compile-b1-bnb 1 hf-4bit-compile,hf-8bit-compile; exp 0 graph 1 16 ) &
  ( group 1 compile-b16 16 hf-compile,hf plot; exp 1 profile 8bit ) &
  wait
  cat "$OUT"/profile.jsonl 2>/dev/null | cut -c1-900
  grep -h "Error\|error" "$OUT"/exp-*.txt | tail -n 6
fi
pack
for f in "$OUT"/compile-*.txt; do echo "--- $f"; grep -v "^\[20\|Warning\|warn" "$f" | tail -n 14; done
