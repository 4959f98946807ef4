#!/usr/bin/env bash
# Device run, issue 13: transformers' own static-cache generate() and the bitsandbytes settings beside the fp16
# baseline (fast_decode.py), random:llama-2-7b, 32-token prompt, 128 new tokens, batch 1, every row verified.
# Two compare.py runs at once, one per GPU of a two-GPU machine (GPUS=1: one after the other on GPU 0), each row in a
# process of its own, in the order given (the most needed first). The fp16 baseline row (hf-compile) runs in the same
# call on the same host.
# Start the device command with the pip prefix of the README (第九节), carry [".whl"], then:
#   bash benchmarks/gpu_settings.sh   -> env.log, settings-a/b.json and .png (rows merged), console-a/b.log, table-a/b.txt
# A=... B=... pick other modes, e.g. int8 weight-only beside bitsandbytes' int8 and fp16:
#   A=hf-compile,hf-8bit-t0-compile B=hf-8bit-wo-compile bash benchmarks/gpu_settings.sh
set -u
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
PROMPT="Explain tensor parallelism now: "            # 32 bytes = 32 tokens with the preset's byte tokenizer
COMMON=(--model "${MODEL:-random:llama-2-7b}" --max-new-tokens 128 --warmup 1 --iters 3 --prompt "$PROMPT")
A=${A:-hf-compile,hf-4bit-compile,hf-4bit-fp4-compile,hf-4bit-torch-compile,hf-static}
B=${B:-hf-8bit-t0-compile,hf-4bit-nodq-compile,hf-4bit-fp16-compile,hf-8bit-t0-torch-compile}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import ds_bnb_infer as m; print(m.versions())"; } > "$OUT/env.log" 2>&1
half() {  # half NAME GPU MODES: one compare.py run a mode (a mode that runs out of time loses only its own row)
  local t0=$SECONDS mode
  for mode in ${3//,/ }; do
    local left=$(( ${BUDGET:-560} - SECONDS ))             # the device call's limit is 600 s: skip what cannot finish
    (( left < 60 )) && { echo "settings-$1 $mode skipped: $left s left" >> "$OUT/env.log"; continue; }
    CUDA_VISIBLE_DEVICES=$2 timeout -k 10 $(( left < ${LIMIT:-200} ? left : ${LIMIT:-200} )) \
      python3 extensions/compare.py "${COMMON[@]}" \
      --modes "$mode" --json "/tmp/settings-$1-$mode.json" >> "$OUT/console-$1.log" 2>&1
    echo "settings-$1 $mode (GPU $2): exit $? at $(( SECONDS - t0 )) s" >> "$OUT/env.log"
  done
  python3 - "$OUT/settings-$1" /tmp/settings-$1-*.json <<'EOF2'
import json, sys
from extensions import compare
parts = [json.load(open(p)) for p in sys.argv[2:]]
result = dict(parts[0], rows=[row for part in parts for row in part["rows"]])
json.dump(result, open(sys.argv[1] + ".json", "w"), indent=1)
compare.plot(result, sys.argv[1] + ".png")
print(compare.render(result))
EOF2
}
if [ "${GPUS:-2}" = 2 ]; then
  half a 0 "$A" > "$OUT/table-a.txt" & half b 1 "$B" > "$OUT/table-b.txt" & wait
else
  half a 0 "$A" > "$OUT/table-a.txt"; half b 0 "$B" > "$OUT/table-b.txt"
fi
cat "$OUT/env.log" "$OUT/table-a.txt" "$OUT/table-b.txt"
