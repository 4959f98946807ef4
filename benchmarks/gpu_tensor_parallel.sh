#!/usr/bin/env bash
# Usage (repo root, two GPUs of one host, after the device prefix of benchmarks/README.md, carry [".whl"]):
#   RUNS="tp1fast load7 load7b16" bash benchmarks/gpu_tensor_parallel.sh
# Tensor parallel at tp 2 beside tp 1 on the same host: speed, each rank's GPU and host memory (peak RSS), and
# verification (extensions/tensor_parallel.py: the first 2 layers against rank 0's unsharded ones, then the fast loop
# against the engine at full depth; --quant: the first 2 layers quantized at tp 1). Default prompt, 128 new tokens
# (generate() runs of the 4-bit model: 32), greedy, 3 timed runs. RUNS picks from (each NAME writes NAME.json):
#   lesson7      extensions/fast_decode.py --tp-size 2: the lesson's tp 2 (AutoTP; the whole 7B model built on every
#                rank's CPU first), batch 1. lesson7b16: batch 16. lesson7graph: batch 1, --step cuda-graph
#   generate7    the lesson's own generate() at tp 2 (README 三's two-GPU command), batch 1
#   load7        extensions/tensor_parallel.py --fast-decode (each rank builds only its shard), 7B, batch 1
#   load7b16     the same, batch 16
#   load7nccl    load7 with --all-reduce nccl; load7oneshot: with --all-reduce one-shot (the default is push)
#   load70       tensor_parallel.py --fast-decode --step cuda-graph, random:llama-2-70b (80 layers would compile for
#                minutes); load70b16: batch 16
#   quant7 / quant70   tensor_parallel.py --quant 4bit, generate(), 7B / 70B, 32 new tokens
#   qfast7 / qfast70   tensor_parallel.py --quant 4bit --fast-decode (a CUDA graph a step), 7B / 70B
#   tp1fast      tp 1 baselines, one GPU each at the same time: fast7tp1 (fast_decode.py, batch 1), fast7tp1b16
#   tp1quant     qtp1fast70 (tensor_parallel.py --tp-size 1 --quant 4bit --fast-decode: quantized while filled, as no
#                80 GB GPU holds the 70B fp16 model; fp16 compute, README 六) and qtp1fast7, one GPU each at once
#   tp1pair      fast7tp1 and lesson7q (the lesson's --quant 4bit, generate(), 32 tokens), one GPU each
#   profile      benchmarks/profile_tp.py: both ranks' kernels of one tp 2 decode step -> tp-profile*.json
#   probe        benchmarks/probe_allreduce.py --push under torchrun -> allreduce.log
#   gputest      the two-GPU tests of tests/test_gpu.py (tensor parallel, symmetric all-reduce) -> gpu-tests.log
# TP1_LIMIT: tp1fast's limit in seconds (240; a fresh machine's first batch-16 compile took longer).
# A run whose ranks are alive 45 s after its JSON appeared is killed and recorded as "hang". env.log: card, versions,
# each run's exit; runs.log: the consoles; a table last. MODEL7=random:tiny MODEL70=random:tiny EXTRA="--dtype fp32"
# checks the script on a CPU machine.
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
export PATH="${PYTHONPATH:+$PYTHONPATH/bin:}$PATH"   # the launcher of a deepspeed installed with --target
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/tp-logs
MODEL7=${MODEL7:-random:llama-2-7b} MODEL70=${MODEL70:-random:llama-2-70b}
read -r -a EXTRA <<< "${EXTRA:-}"
RUNS=${RUNS:-"tp1fast load7 load7b16"}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  free -g | head -2; python3 -c "import ds_bnb_infer as m; print(m.versions())"; } > "$OUT/env.log" 2>&1

run() {   # run NAME LIMIT COMMAND...: the command gets --json $OUT/NAME.json; its exit (or "hang") goes to env.log
  local name=$1 limit=$2 seen="" t0=$SECONDS state; shift 2
  local json="$OUT/$name.json" log="/tmp/tp-logs/$name.log"
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
DS2=(deepspeed --num_gpus=2) TAIL=(--tp-size 2 --iters 3 "${EXTRA[@]}") ONE=(--iters 3 "${EXTRA[@]}")
TP=extensions/tensor_parallel.py FAST=extensions/fast_decode.py
for name in $RUNS; do
  case $name in
    lesson7)      run lesson7 300 "${DS2[@]}" $FAST --model "$MODEL7" --max-new-tokens 128 "${TAIL[@]}" ;;
    lesson7b16)   run lesson7b16 300 "${DS2[@]}" $FAST --model "$MODEL7" --max-new-tokens 128 --batch-size 16 "${TAIL[@]}" ;;
    lesson7graph) run lesson7graph 300 "${DS2[@]}" $FAST --step cuda-graph --model "$MODEL7" --max-new-tokens 128 "${TAIL[@]}" ;;
    generate7)    run generate7 360 "${DS2[@]}" ds_bnb_infer.py --model "$MODEL7" --max-new-tokens 128 "${TAIL[@]}" ;;
    load7)        run load7 240 "${DS2[@]}" $TP --fast-decode --model "$MODEL7" --max-new-tokens 128 "${TAIL[@]}" ;;
    load7b16)     run load7b16 240 "${DS2[@]}" $TP --fast-decode --model "$MODEL7" --max-new-tokens 128 --batch-size 16 \
                    "${TAIL[@]}" ;;
    load7nccl)    run load7nccl 240 "${DS2[@]}" $TP --fast-decode --all-reduce nccl --model "$MODEL7" \
                    --max-new-tokens 128 "${TAIL[@]}" ;;
    load7oneshot) run load7oneshot 240 "${DS2[@]}" $TP --fast-decode --all-reduce one-shot --model "$MODEL7" \
                    --max-new-tokens 128 "${TAIL[@]}" ;;
    load70)       run load70 420 "${DS2[@]}" $TP --fast-decode --step cuda-graph --model "$MODEL70" \
                    --max-new-tokens 128 "${TAIL[@]}" ;;
    load70b16)    run load70b16 420 "${DS2[@]}" $TP --fast-decode --step cuda-graph --model "$MODEL70" \
                    --max-new-tokens 128 --batch-size 16 "${TAIL[@]}" ;;
    quant7)       run quant7 240 "${DS2[@]}" $TP --quant 4bit --model "$MODEL7" --max-new-tokens 32 "${TAIL[@]}" ;;
    quant70)      run quant70 420 "${DS2[@]}" $TP --quant 4bit --model "$MODEL70" --max-new-tokens 32 "${TAIL[@]}" ;;
    qfast7)       run qfast7 240 "${DS2[@]}" $TP --quant 4bit --fast-decode --model "$MODEL7" --max-new-tokens 128 \
                    "${TAIL[@]}" ;;
    qfast70)      run qfast70 420 "${DS2[@]}" $TP --quant 4bit --fast-decode --model "$MODEL70" --max-new-tokens 128 \
                    "${TAIL[@]}" ;;
    tp1fast)      run fast7tp1 "${TP1_LIMIT:-240}" env CUDA_VISIBLE_DEVICES=0 python3 $FAST --model "$MODEL7" \
                    --max-new-tokens 128 "${ONE[@]}" &
                  run fast7tp1b16 "${TP1_LIMIT:-240}" env CUDA_VISIBLE_DEVICES=1 python3 $FAST --model "$MODEL7" \
                    --max-new-tokens 128 --batch-size 16 "${ONE[@]}" &
                  wait ;;
    tp1quant)     run qtp1fast70 420 env CUDA_VISIBLE_DEVICES=0 python3 $TP --tp-size 1 --quant 4bit --fast-decode \
                    --bnb-4bit-compute-dtype fp16 --model "$MODEL70" --max-new-tokens 128 "${ONE[@]}" &
                  run qtp1fast7 240 env CUDA_VISIBLE_DEVICES=1 python3 $TP --tp-size 1 --quant 4bit --fast-decode \
                    --model "$MODEL7" --max-new-tokens 128 "${ONE[@]}" &
                  wait ;;
    tp1pair)      run fast7tp1 200 env CUDA_VISIBLE_DEVICES=0 python3 $FAST --model "$MODEL7" --max-new-tokens 128 \
                    "${ONE[@]}" &
                  run lesson7q 200 env CUDA_VISIBLE_DEVICES=1 python3 ds_bnb_infer.py --quant 4bit --model "$MODEL7" \
                    --max-new-tokens 32 "${ONE[@]}" &
                  wait ;;
    profile)      OUT=$OUT timeout -k 10 300 "${DS2[@]}" benchmarks/profile_tp.py --model "$MODEL7" --tp-size 2 \
                    --max-new-tokens 64 "${EXTRA[@]}" > "$OUT/profile-console.log" 2>&1
                  echo "profile exit $?" >> "$OUT/env.log" ;;
    probe)        timeout -k 10 200 torchrun --standalone --nproc_per_node 2 benchmarks/probe_allreduce.py --push \
                    > "$OUT/allreduce.log" 2>&1
                  echo "probe exit $?" >> "$OUT/env.log" ;;
    gputest)      timeout -k 10 "${GPUTEST_LIMIT:-400}" python3 -m pytest -q -m gpu tests/test_gpu.py \
                    -k "tensor_parallel or symmetric" > "$OUT/gpu-tests.log" 2>&1
                  echo "gputest exit $? ($(tail -n 1 "$OUT/gpu-tests.log"))" >> "$OUT/env.log" ;;
    *)            echo "unknown run $name" >> "$OUT/env.log" ;;
  esac
done

cat "$OUT/env.log"
python3 - "$OUT" $RUNS <<'EOF'
import json, os, sys
pairs = {"tp1pair": ["fast7tp1", "lesson7q"], "tp1fast": ["fast7tp1", "fast7tp1b16"],
         "tp1quant": ["qtp1fast70", "qtp1fast7"], "gputest": [], "profile": [], "probe": []}
print(f"{'run':<13}{'decode':>11}{'batch':>6}{'tok/s':>9}{'verify':>8}{'GPU GiB':>9}{'host GiB':>9}  summary")
for name in [n for arg in sys.argv[2:] for n in pairs.get(arg, [arg])]:
    path = os.path.join(sys.argv[1], name + ".json")
    if not os.path.exists(path):
        print(f"{name:<13}  (no JSON)")
        continue
    r = json.load(open(path))
    e, m, ranks = r["engine"], r["metrics"], r["memory"]["per_rank"]
    gpu = max(x["peak_allocated"] or 0 for x in ranks)
    host = max(x["host_peak_rss"] for x in ranks)
    print(f"{name:<13}{e.get('decode', 'generate'):>11}{r['config']['batch_size']:>6}{m['decode_tokens_per_s']:>9.1f}"
          f"{str(e['verify']['passed']):>8}{gpu:>9.2f}{host:>9.2f}  {e['verify']['summary']}")
EOF
