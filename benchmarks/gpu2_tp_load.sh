#!/usr/bin/env bash
# Device run on two GPUs (kind nvidia-h100-x2 / nvidia-h200-x2), issue 11: models built shard by shard on each rank
# (extensions/tp_load.py, and tp_quant.py on top of it), each rank's peak host memory (RSS) and GPU memory beside
# its speed. Every run is verified (tp_load.py's method: the first 2 layers against rank 0's unsharded model, then
# the decode loop against the engine at full depth; tp_quant.py: the first 2 layers quantized at tp 1).
# Start the device command with the pip prefix of the README (第九节), carry [".whl"], then
#   RUNS="lesson7 load7 load70" bash benchmarks/gpu2_tp_load.sh
# RUNS picks from (each NAME writes NAME.json):
#   lesson7   the lesson's own tp 2 (whole 7B model built on every rank's CPU), fast_decode.py, batch 1: the baseline
#   load7     tp_load.py --fast-decode, random:llama-2-7b, batch 1 (compiled step)
#   load70    tp_load.py --fast-decode, random:llama-2-70b, batch 1 (CUDA graph: 80 layers compile for minutes)
#   load70b16 the same, batch 16
#   quant70   tp_quant.py --quant 4bit, random:llama-2-70b, batch 1, generate() (no fast loop for bitsandbytes tp)
#   quant7    tp_quant.py --quant 4bit, random:llama-2-7b, batch 1
#   load7b16  load7 at batch 16
#   load7nccl load7 with FAST_DECODE_SYMM=0: the all-reduces stay NCCL's (what symmetric memory gives). When load7
#             wrote no JSON, the runs after it run with FAST_DECODE_SYMM=0 (env.log says so).
#   tp1fast   tp 1 baselines of load7 / load7b16 on one GPU each, at once: fast7tp1 (fast_decode.py, batch 1) and
#             fast7tp1b16 (batch 16)
#   qfast70 / qfast7  tp_quant.py --quant 4bit --fast-decode (a CUDA graph per step), 70B / 7B, tp 2, 128 tokens
#   tp1quant  their tp 1 baselines on one GPU each, at once: qtp1fast70 (tp_quant.py --tp-size 1: quantized while
#             filled, as no 80 GB GPU holds the 70B fp16 model) and qtp1fast7 (the same at 7B)
#   gputest   the two-GPU tests of tests/test_gpu.py (tensor parallel, symmetric all-reduce) -> gpu-tests.log
#   tp1pair   tp 1 baselines on one GPU each, at once: fast7tp1 (fast_decode.py, fp16, 128 tokens) and lesson7q
#             (the lesson's --quant 4bit, generate(), 32 tokens, as quant7)
# TP1_LIMIT: tp1fast's limit in seconds (240; a fresh machine's first batch-16 compile took longer).
# Prompt: the default; 128 new tokens (quant runs: 32); 3 timed runs. A run whose ranks are alive 45 s after its JSON
# appeared is killed and recorded as "hang". env.log: card, versions, each run's exit; runs.log: the consoles.
# MODEL7=random:tiny MODEL70=random:tiny EXTRA="--dtype fp32" smoke-tests it on a CPU machine.
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
export PATH="${PYTHONPATH:+$PYTHONPATH/bin:}$PATH"   # the launcher of a deepspeed installed with --target
MODEL7=${MODEL7:-random:llama-2-7b} MODEL70=${MODEL70:-random:llama-2-70b}
read -r -a EXTRA <<< "${EXTRA:-}"
RUNS=${RUNS:-"lesson7 load7 load70"}
mkdir -p /tmp/tp-load-logs
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  free -g | head -2; python3 -c "import ds_bnb_infer as m; print(m.versions())"; } > "$OUT/env.log" 2>&1

run() {   # run NAME LIMIT COMMAND...: the command gets --json $OUT/NAME.json; its exit (or "hang") goes to env.log
  local name=$1 limit=$2 seen="" t0=$SECONDS state; shift 2
  local json="$OUT/$name.json" log="/tmp/tp-load-logs/$name.log"
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
  echo "$name exit $state after $(( SECONDS - t0 )) s (JSON $([ -s "$json" ] && echo written || echo missing))" \
       >> "$OUT/env.log"
  { echo "===== $name: $*"; cat "$log"; } >> "$OUT/runs.log"
}
DS2=(deepspeed --num_gpus=2) TAIL=(--tp-size 2 --iters 3 "${EXTRA[@]}")
for name in $RUNS; do
  case $name in
    lesson7)   run lesson7 300 "${DS2[@]}" extensions/fast_decode.py --model "$MODEL7" --max-new-tokens 128 \
                 "${TAIL[@]}" ;;
    load7)     run load7 240 "${DS2[@]}" extensions/tp_load.py --fast-decode --model "$MODEL7" \
                 --max-new-tokens 128 "${TAIL[@]}"
               if [ ! -s "$OUT/load7.json" ]; then
                 export FAST_DECODE_SYMM=0; echo "load7 failed: the runs after it use FAST_DECODE_SYMM=0" >> "$OUT/env.log"
               fi ;;
    load7b16)  run load7b16 240 "${DS2[@]}" extensions/tp_load.py --fast-decode --model "$MODEL7" \
                 --max-new-tokens 128 --batch-size 16 "${TAIL[@]}" ;;
    load7nccl) run load7nccl 240 env FAST_DECODE_SYMM=0 "${DS2[@]}" extensions/tp_load.py --fast-decode \
                 --model "$MODEL7" --max-new-tokens 128 "${TAIL[@]}" ;;
    tp1fast)   run fast7tp1 "${TP1_LIMIT:-240}" env CUDA_VISIBLE_DEVICES=0 python3 extensions/fast_decode.py --model "$MODEL7" \
                 --max-new-tokens 128 --iters 3 "${EXTRA[@]}" &
               run fast7tp1b16 "${TP1_LIMIT:-240}" env CUDA_VISIBLE_DEVICES=1 python3 extensions/fast_decode.py --model "$MODEL7" \
                 --max-new-tokens 128 --batch-size 16 --iters 3 "${EXTRA[@]}" &
               wait ;;
    qfast70)   run qfast70 420 "${DS2[@]}" extensions/tp_quant.py --quant 4bit --fast-decode --model "$MODEL70" \
                 --max-new-tokens 128 "${TAIL[@]}" ;;
    qfast7)    run qfast7 240 "${DS2[@]}" extensions/tp_quant.py --quant 4bit --fast-decode --model "$MODEL7" \
                 --max-new-tokens 128 "${TAIL[@]}" ;;
    tp1quant)  run qtp1fast70 420 env CUDA_VISIBLE_DEVICES=0 python3 extensions/tp_quant.py --tp-size 1 --quant 4bit \
                 --fast-decode --model "$MODEL70" --max-new-tokens 128 --iters 3 "${EXTRA[@]}" &
               run qtp1fast7 240 env CUDA_VISIBLE_DEVICES=1 python3 extensions/tp_quant.py --tp-size 1 --quant 4bit \
                 --fast-decode --model "$MODEL7" --max-new-tokens 128 --iters 3 "${EXTRA[@]}" &
               wait ;;
    gputest)   timeout ${GPUTEST_LIMIT:-400} python3 -m pytest -q -m gpu tests/test_gpu.py -k "tensor_parallel or symmetric" \
                 > "$OUT/gpu-tests.log" 2>&1
               echo "gputest exit $? ($(tail -1 "$OUT/gpu-tests.log"))" >> "$OUT/env.log" ;;
    load70)    run load70 420 env FAST_DECODE_MODE=cuda-graph "${DS2[@]}" extensions/tp_load.py --fast-decode \
                 --model "$MODEL70" --max-new-tokens 128 "${TAIL[@]}" ;;
    load70b16) run load70b16 420 env FAST_DECODE_MODE=cuda-graph "${DS2[@]}" extensions/tp_load.py --fast-decode \
                 --model "$MODEL70" --max-new-tokens 128 --batch-size 16 "${TAIL[@]}" ;;
    quant70)   run quant70 420 "${DS2[@]}" extensions/tp_quant.py --quant 4bit --model "$MODEL70" \
                 --max-new-tokens 32 "${TAIL[@]}" ;;
    quant7)    run quant7 240 "${DS2[@]}" extensions/tp_quant.py --quant 4bit --model "$MODEL7" \
                 --max-new-tokens 32 "${TAIL[@]}" ;;
    tp1pair)   # one GPU each, at the same time: the tp 1 baselines of the same host (fp16 fast loop; 4-bit generate())
               run fast7tp1 200 env CUDA_VISIBLE_DEVICES=0 python3 extensions/fast_decode.py --model "$MODEL7" \
                 --max-new-tokens 128 --iters 3 "${EXTRA[@]}" &
               run lesson7q 200 env CUDA_VISIBLE_DEVICES=1 python3 ds_bnb_infer.py --quant 4bit --model "$MODEL7" \
                 --max-new-tokens 32 --iters 3 "${EXTRA[@]}" &
               wait ;;
    *) echo "unknown run $name" >> "$OUT/env.log" ;;
  esac
done

cat "$OUT/env.log"
python3 - "$OUT" $RUNS <<'EOF'
import json, os, sys
print(f"{'run':<10}{'decode':>11}{'batch':>6}{'tok/s':>9}{'verify':>8}{'GPU GiB':>9}{'host GiB':>9}  summary")
for name in [n for arg in sys.argv[2:] for n in ({"tp1pair": ["fast7tp1", "lesson7q"], "tp1fast": ["fast7tp1", "fast7tp1b16"],
                                                 "tp1quant": ["qtp1fast70", "qtp1fast7"], "gputest": []}.get(arg, [arg]))]:
    path = os.path.join(sys.argv[1], name + ".json")
    if not os.path.exists(path):
        print(f"{name:<10}  (no JSON)")
        continue
    r = json.load(open(path))
    e, m, ranks = r["engine"], r["metrics"], r["memory"]["per_rank"]
    gpu = max(x["peak_allocated"] or 0 for x in ranks)
    host = max(x["host_peak_rss"] for x in ranks)
    print(f"{name:<10}{e['decode']:>11}{r['config']['batch_size']:>6}{m['decode_tokens_per_s']:>9.1f}"
          f"{str(e['verify']['passed']):>8}{gpu:>9.2f}{host:>9.2f}  {e['verify']['summary']}")
EOF
