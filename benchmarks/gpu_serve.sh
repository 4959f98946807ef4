#!/usr/bin/env bash
# Usage (repo root, after the device prefix of benchmarks/README.md, whose .whl also holds requirements-serve.txt's
# wheels, carry [".whl"]: fastapi 0.165.0, uvicorn 0.54.0, starlette 1.10.0, anyio 4.16.0, annotated-doc 0.0.7,
# opentelemetry-api 1.45.3, click 8.5.1, h11 0.16.0, httpx 0.28.1, httpcore 1.0.9, certifi, idna: `pip download
# --only-binary=:all: --python-version 3.12 -r requirements-serve.txt`, less the pydantic of the lesson's wheels):
#   PART=serve bash benchmarks/gpu_serve.sh     # one GPU: the server, 16 rows x 256 positions, queue 32; load at 1, 16, 64
#   SERVE_ARGS="--admit-wait-ms 10" PART=serve bash benchmarks/gpu_serve.sh  # the same, the server given these flags
#                                               # too; its files are named after them: serve-admit-wait-ms-10.json, ...
#   PART=offline bash benchmarks/gpu_serve.sh   # one GPU: extensions/fast_decode.py batch 1 and 16, the baseline
#   PART=tp2 bash benchmarks/gpu_serve.sh       # two GPUs: the 2-GPU tests, then the server under the launcher
# extensions/serve.py under load (measure/bench_serve.py) against the offline decode of the same card:
# random:llama-2-7b fp16, prompts of 32 tokens, 128-token answers, greedy. Run serve and offline in one call on one
# machine to compare them (and PART=serve with and without SERVE_ARGS). env-PART.log: date, card, each step's exit; when
# there are more than 8 files in OUT (earlier runs' included) they are packed into one, PART.tgz (PART-<flags>.tgz
# with SERVE_ARGS).
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
export PATH="${PYTHONPATH:+$PYTHONPATH/bin:}$PATH"   # the launcher of a deepspeed installed with --target
OUT=${OUT:-/tmp/out}; PART=${PART:-serve}; SERVE_ARGS=${SERVE_ARGS:-}; mkdir -p "$OUT"
# PART=serve's files carry its extra flags in their names, so that runs with other flags can share OUT.
TAG=$(printf '%s' "$SERVE_ARGS" | tr -s ' =/' '-' | tr -cd 'A-Za-z0-9._-' | sed 's/^-*//')
[ "$PART" = serve ] || TAG=""
PART=$PART${TAG:+-$TAG}; T=${TAG:+-$TAG}
PROMPT="Serve the model over HTTP now:  "        # 32 characters: 32 tokens with the byte-level preset
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$OUT/env-$PART.log" 2>&1
if [ "$PART" = offline ]; then
  for b in 1 16; do
    timeout -k 10 200 python3 extensions/fast_decode.py --model random:llama-2-7b --backend hf --max-new-tokens 128 \
      --prompt "$PROMPT" --batch-size "$b" --iters 3 --json "$OUT/offline-b$b.json" > "$OUT/offline-b$b.log" 2>&1
    echo "offline b$b exit $?" >> "$OUT/env-$PART.log"
  done
elif [ "$PART" = tp2 ]; then
  timeout -k 10 300 python3 -m pytest -q -m gpu tests/test_fast_decode.py -k 2_gpus > "$OUT/tp2-gpu-tests.log" 2>&1
  echo "2-GPU tests exit $?" >> "$OUT/env-$PART.log"
  deepspeed --num_gpus=2 extensions/serve.py --tp-size 2 --model random:llama-2-7b --max-num-seqs 16 \
    --max-model-len 256 --max-queue 32 --port 8000 > "$OUT/tp2-server.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do curl -sf localhost:8000/health > /dev/null && break; sleep 1; done
  timeout -k 10 200 python3 measure/bench_serve.py --url http://127.0.0.1:8000 --concurrency 1 16 \
    --requests 8 64 --max-tokens 128 --prompt-len 32 --distinct 8 --json "$OUT/tp2-serve.json" > "$OUT/tp2-bench.log" 2>&1
  echo "bench exit $?" >> "$OUT/env-$PART.log"
  kill -TERM "$(pgrep -f 'serve.py --local_rank=0')"; timeout 90 tail --pid="$pid" -f /dev/null
  wait "$pid"; echo "launcher exit $?" >> "$OUT/env-$PART.log"
else
  # shellcheck disable=SC2086  # SERVE_ARGS: several flags, split on spaces
  python3 extensions/serve.py --model random:llama-2-7b --backend hf --max-num-seqs 16 --max-model-len 256 \
    --max-queue 32 --port 8000 $SERVE_ARGS > "$OUT/server$T.log" 2>&1 &
  pid=$!
  # up to 600 s: a 4-bit server's first start on a machine times each kernel tiling at each shape (later ones read the
  # picks from Triton's cache)
  # (and no longer once it has exited: a server that failed to start says why in its log)
  for _ in $(seq 600); do curl -sf localhost:8000/health > /dev/null && break; kill -0 "$pid" 2> /dev/null || break
    sleep 1; done
  if ! kill -0 "$pid" 2> /dev/null; then
    wait "$pid"; echo "server exited $? before it was up: $(tail -n 1 "$OUT/server$T.log")" >> "$OUT/env-$PART.log"
    cat "$OUT/env-$PART.log"; exit 1
  fi
  echo "server up after ${SECONDS}s" >> "$OUT/env-$PART.log"
  timeout -k 10 240 python3 measure/bench_serve.py --url http://127.0.0.1:8000 --concurrency 1 16 64 \
    --requests 8 64 128 --max-tokens 128 --prompt-len 32 --distinct 8 --json "$OUT/serve$T.json" > "$OUT/bench$T.log" 2>&1
  echo "bench exit $?" >> "$OUT/env-$PART.log"
  curl -s localhost:8000/metrics > "$OUT/metrics$T.txt"
  kill -TERM "$pid"; timeout 60 tail --pid="$pid" -f /dev/null
  wait "$pid"; echo "server exit $?" >> "$OUT/env-$PART.log"
fi
cat "$OUT/env-$PART.log"; tail -n 5 "$OUT"/*.log
# More than 8 files: packed into one.
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  tar czf "/tmp/$PART.tgz" -C "$OUT" . && find "$OUT" -type f -delete && mv "/tmp/$PART.tgz" "$OUT/"
fi
