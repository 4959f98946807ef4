#!/usr/bin/env bash
# Device run on two GPUs (kind nvidia-h100-x2 / nvidia-h200-x2), issue 11: extensions/fast_decode.py (static KV cache,
# one compiled step / CUDA graph per token) under DeepSpeed AutoTP, against the same loop on one GPU of the same host.
# random:llama-2-7b fp16, the default prompt, 128 new tokens, greedy, the loop's 2 warm-up runs, 3 timed runs, each
# verified by the lesson (tp 2: against rank 0's fp32 CPU reference). Start the device command with the pip prefix of
# the README (第九节), carry [".whl"], then:  bash benchmarks/gpu2_tp_fast.sh
#   1. tp 2 batch 1, the default mode (compiled)                         -> tp2-b1.json
#   2. tp 1 batch 1 on GPU 0 and tp 1 batch 16 on GPU 1, at the same time -> tp1-b1.json, tp1-b16.json
#   3. tp 2 batch 16 (compiled; cuda-graph when 1. failed)                -> tp2-b16.json
#   4. tp 2 batch 1 with FAST_DECODE_MODE=cuda-graph, if time is left     -> tp2-b1-graph.json
# Every run has a time limit, and a run whose ranks are still alive 45 s after its JSON appeared is killed and recorded
# as "hang" (the report is written before the ranks leave). env.log: card, versions, each run's exit; runs.log: every
# run's console; a table last. MODEL=random:tiny EXTRA="--dtype fp32" smoke-tests the script on a CPU machine.
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
export PATH="${PYTHONPATH:+$PYTHONPATH/bin:}$PATH"   # the launcher of a deepspeed installed with --target
MODEL=${MODEL:-random:llama-2-7b}
read -r -a EXTRA <<< "${EXTRA:-}"
COMMON=(--model "$MODEL" --max-new-tokens 128 --iters 3 "${EXTRA[@]}")
BUDGET=${BUDGET:-560}                     # seconds this script may take (the device call's limit is 600)
mkdir -p /tmp/tp-fast-logs
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import ds_bnb_infer as m; print(m.versions())"; } > "$OUT/env.log" 2>&1

run() {   # run NAME LIMIT COMMAND...: the command gets --json $OUT/NAME.json; its exit (or "hang") goes to env.log
  local name=$1 limit=$2 seen="" t0=$SECONDS state; shift 2
  local json="$OUT/$name.json" log="/tmp/tp-fast-logs/$name.log"
  timeout -k 10 "$limit" "$@" --json "$json" > "$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    [ -z "$seen" ] && [ -s "$json" ] && seen=$SECONDS
    if [ -n "$seen" ] && (( SECONDS - seen > 45 )); then
      echo "$name: ranks still alive 45 s after the JSON was written: hang, killed" >> "$OUT/env.log"
      kill -TERM "$pid"; sleep 5; kill -KILL "$pid" 2>/dev/null; break
    fi
    sleep 1
  done
  wait "$pid"; state=$?
  [ -n "$seen" ] && (( SECONDS - seen > 45 )) && state=hang
  echo "$name exit $state after $(( SECONDS - t0 )) s (JSON $([ -s "$json" ] && echo written || echo missing)," \
       "then $([ -n "$seen" ] && echo "exit $(( SECONDS - seen )) s later" || echo "-"))" >> "$OUT/env.log"
  { echo "===== $name: $*"; cat "$log"; } >> "$OUT/runs.log"
}
tp2() { run "$1" "$2" env ${MODE:+FAST_DECODE_MODE=$MODE} deepspeed --num_gpus=2 extensions/fast_decode.py \
          --tp-size 2 "${COMMON[@]}" --batch-size "$3"; }
tp1() { run "$1" "$2" env CUDA_VISIBLE_DEVICES="$3" python3 extensions/fast_decode.py "${COMMON[@]}" --batch-size "$4"; }

MODE="" tp2 tp2-b1 240 1
[ -s "$OUT/tp2-b1.json" ] && mode16="" || mode16=cuda-graph        # compile failed under tp: GraphStep instead
tp1 tp1-b1 200 0 1 & tp1 tp1-b16 200 1 16 & wait
MODE=$mode16 tp2 tp2-b16 $(( BUDGET - SECONDS - 10 < 240 ? BUDGET - SECONDS - 10 : 240 )) 16
if (( BUDGET - SECONDS > 130 )); then
  MODE=cuda-graph tp2 tp2-b1-graph $(( BUDGET - SECONDS - 10 )) 1
else
  echo "tp2-b1-graph skipped: $(( BUDGET - SECONDS )) s left" >> "$OUT/env.log"
fi

cat "$OUT/env.log"
python3 - "$OUT" <<'EOF'
import json, os, sys
print(f"{'run':<14}{'decode':>11}{'tok/s':>9}{'verify':>8}  {'GiB/rank':>9}  summary")
for name in ("tp1-b1", "tp1-b16", "tp2-b1", "tp2-b16", "tp2-b1-graph"):
    path = os.path.join(sys.argv[1], name + ".json")
    if not os.path.exists(path):
        print(f"{name:<14}  (no JSON)")
        continue
    r = json.load(open(path))
    e, m = r["engine"], r["metrics"]
    peak = max(x["peak_allocated"] or 0 for x in r["memory"]["per_rank"])
    print(f"{name:<14}{e['decode']:>11}{m['decode_tokens_per_s']:>9.1f}{str(e['verify']['passed']):>8}  {peak:>9.2f}"
          f"  {e['verify']['summary']}")
EOF
