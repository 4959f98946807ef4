#!/usr/bin/env bash
# Usage (repo root, after the device prefix of benchmarks/README.md, carry [".whl"]):
#   A=hf,ds,hf-compile [B=modes] [BATCH=1] bash benchmarks/gpu_modes.sh        # PART=compare, the default
#   PART=fuse bash benchmarks/gpu_modes.sh                                      # needs two GPUs
#   PART=kv-cache bash benchmarks/gpu_modes.sh
# The lesson's modes on one GPU, random:llama-2-7b, prompt "Explain tensor parallelism now: " (32 tokens with the
# preset's byte tokenizer), 128 new tokens, greedy, 1 warm-up (the fast loop: 2) and 3 timed runs, every row verified.
#   compare   measure/compare.py, one process a mode (a mode that runs out of time loses only its own row), in the
#             order given; A's modes on GPU 0 and, when B is given, B's on GPU 1 at the same time (GPUS=1: after A,
#             on GPU 0). Rows merged into modes-a.json / .png (and -b), the table in table-a.txt, consoles in
#             console-a.log. Examples: A=ds-8bit,ds-4bit,hf-8bit-t0-compile,hf-4bit-compile;
#             A=hf,hf-compile BATCH=16; A=hf-compile B=hf-8bit-wo-compile (int8 weight-only beside fp16);
#             A=hf-compile,hf-4bit-compile,hf-4bit-fp4-compile,hf-4bit-torch-compile,hf-static
#             B=hf-8bit-t0-compile,hf-4bit-nodq-compile,hf-4bit-fp16-compile,hf-8bit-t0-torch-compile (4-bit settings)
#   fuse      extensions/fast_decode.py --backend hf with and without its two step optimisations, fuse_projections()
#             (--no-fuse) and inductor_tuning() (--no-tune): GPU 0 plain-b1 (both off), both-b1 (the default);
#             GPU 1 fuse-b1 (--no-tune), both-b16                                -> NAME.json, runs-gpu0.log, runs-gpu1.log
#   kv-cache  extensions/kv_cache.py at 128 and 512 new tokens (the step-by-step eager loop, cache on and off)
#                                                                                -> kv128.json / .png, kv512.json / .png
# env.log: date, card, driver, versions, each run's exit. MODEL=random:tiny EXTRA="--dtype fp32" on a CPU machine
# checks the script itself (compare.py then runs on the CPU).
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PROMPT="Explain tensor parallelism now: "
read -r -a EXTRA <<< "${EXTRA:-}"
COMMON=(--model "${MODEL:-random:llama-2-7b}" --max-new-tokens 128 --prompt "$PROMPT" --iters 3 "${EXTRA[@]}")
BUDGET=${BUDGET:-560}                     # seconds this script may take in all
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import ds_bnb_infer as m; print(m.versions())"; } > "$OUT/env.log" 2>&1

half() {  # half NAME GPU MODES: one compare.py process a mode, then the rows merged into one report and chart
  local mode left
  rm -f /tmp/modes-"$1"-*.json
  for mode in ${3//,/ }; do
    left=$(( BUDGET - SECONDS ))
    (( left < 60 )) && { echo "modes-$1 $mode skipped: $left s left" >> "$OUT/env.log"; continue; }
    CUDA_VISIBLE_DEVICES=$2 timeout -k 10 $(( left < ${LIMIT:-240} ? left : ${LIMIT:-240} )) \
      python3 measure/compare.py "${COMMON[@]}" --warmup 1 --batch-size "${BATCH:-1}" --modes "$mode" \
      --json "/tmp/modes-$1-$mode.json" >> "$OUT/console-$1.log" 2>&1
    echo "modes-$1 $mode (GPU $2, batch ${BATCH:-1}): exit $? at $SECONDS s" >> "$OUT/env.log"
  done
  ls /tmp/modes-"$1"-*.json > /dev/null 2>&1 || return 0
  python3 - "$OUT/modes-$1" /tmp/modes-"$1"-*.json <<'EOF' > "$OUT/table-$1.txt"
import json, sys
from measure import compare
parts = [json.load(open(p)) for p in sys.argv[2:]]
result = dict(parts[0], rows=[row for part in parts for row in part["rows"]])
json.dump(result, open(sys.argv[1] + ".json", "w"), indent=1)
compare.plot(result, sys.argv[1] + ".png")
print(compare.render(result))
EOF
}

fast() {  # fast NAME GPU BATCH FLAGS...: one extensions/fast_decode.py run
  local name=$1 gpu=$2 batch=$3 t0=$SECONDS; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 10 "${LIMIT:-240}" python3 extensions/fast_decode.py --backend hf "${COMMON[@]}" \
    --batch-size "$batch" "$@" --json "$OUT/$name.json" > "/tmp/fast-$name.log" 2>&1
  echo "$name (GPU $gpu, batch $batch, $*): exit $? after $(( SECONDS - t0 )) s" >> "$OUT/env.log"
  { echo "===== $name"; grep -v "^\[20\|it/s\]" "/tmp/fast-$name.log"; } >> "$OUT/runs-gpu$gpu.log"
}

case ${PART:-compare} in
  compare)
    if [ -n "${B:-}" ] && [ "${GPUS:-2}" = 2 ]; then
      half a 0 "${A:?A=modes}" & half b 1 "$B" & wait
    else
      half a 0 "${A:?A=modes}"; [ -n "${B:-}" ] && half b 0 "$B"
    fi
    cat "$OUT"/table-*.txt ;;
  fuse)
    { fast plain-b1 0 1 --no-fuse --no-tune; fast both-b1 0 1; } &
    { fast fuse-b1 1 1 --no-tune; fast both-b16 1 16; } &
    wait ;;
  kv-cache)
    for n in 128 512; do
      timeout -k 10 240 python3 extensions/kv_cache.py --model "${MODEL:-random:llama-2-7b}" --max-new-tokens "$n" \
        --prompt "$PROMPT" "${EXTRA[@]}" --json "$OUT/kv$n.json" --plot "$OUT/kv$n.png" > "/tmp/kv$n.log" 2>&1
      echo "kv-cache $n new tokens: exit $?" >> "$OUT/env.log"
      grep -v "^\[" "/tmp/kv$n.log" | tail -n 8
    done ;;
  *) echo "unknown PART ${PART}" >> "$OUT/env.log" ;;
esac
cat "$OUT/env.log"
