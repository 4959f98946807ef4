#!/usr/bin/env bash
# Device run after the lesson's restructure (issue 10): the gpu-marked tests, then extensions/compare.py on
# random:llama-2-7b (prompt "Explain tensor parallelism now: " = 32 tokens, 128 new tokens, greedy, warm-up 1, 3 timed
# runs). One GPU. Start the device command with the pip prefix of the README (第二节) and carry [".whl"], then:
#   PART=A bash benchmarks/gpu_lesson.sh   # gpu tests; compare hf,ds,hf-compile at batch 1
#   PART=B bash benchmarks/gpu_lesson.sh   # compare ds-8bit,ds-4bit,hf-8bit-t0-compile,hf-4bit-compile at batch 1
#   PART=C bash benchmarks/gpu_lesson.sh   # compare hf,hf-compile at batch 16
# Everything lands in $OUT: <part>-*.log / .json / .png, plus the card and versions in <part>-env.log.
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
PROMPT="Explain tensor parallelism now: "
COMMON=(--model random:llama-2-7b --max-new-tokens 128 --prompt "$PROMPT" --warmup 1 --iters 3)
part=${PART:-A}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import ds_bnb_infer as m; print(m.versions())"; } > "$OUT/$part-env.log" 2>&1

compare() {   # compare NAME TIMEOUT BATCH MODES
  timeout -k 10 "$2" python3 extensions/compare.py "${COMMON[@]}" --batch-size "$3" --modes "$4" \
    --json "$OUT/$part-$1.json" --plot "$OUT/$part-$1.png" > "$OUT/$part-$1.log" 2>&1
  echo "compare $1 exit $?" | tee -a "$OUT/$part-env.log"
}

case "$part" in
  A) timeout -k 10 330 python3 -m pytest -q -m gpu tests > "$OUT/A-gpu-tests.log" 2>&1
     echo "gpu tests exit $?" | tee -a "$OUT/A-env.log"
     compare b1 240 1 hf,ds,hf-compile ;;
  B) compare b1-quant 560 1 ds-8bit,ds-4bit,hf-8bit-t0-compile,hf-4bit-compile ;;
  C) compare b16 500 16 hf,hf-compile ;;
esac
tail -n 3 "$OUT"/*.log
