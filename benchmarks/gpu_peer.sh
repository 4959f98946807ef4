#!/usr/bin/env bash
# Usage (repo root, two GPUs of one host, after the device prefix of benchmarks/README.md, carry [".whl", ".peer"]):
#   PEERS="tp1 tp2" bash benchmarks/gpu_peer.sh; RUNS="tp1fast load7" bash benchmarks/gpu_tensor_parallel.sh
# The peer, gpt-fast, on the machine where the lesson's rows run, so that a ratio to it compares one card with itself;
# benchmarks/peer_gpt_fast.py says what is run and how it is timed. PEERS picks from:
#   tp1  peer-b1 (GPU 0) and peer-b16 (GPU 1) at the same time, as gpu_tensor_parallel.sh's tp1fast
#   tp2  peer-tp2 (both GPUs, torchrun, batch 1)
#   int4 peer-int4-b1 (GPU 0, batch 1, its weight-only int4, group 128; one GPU is enough)
# Writes NAME.json per run, peer-env.log (card, versions, each run's exit) and peer-runs.log (the consoles).
# gpt-fast's files travel in an ignored folder; fill it once (nothing of it is committed):
#   mkdir -p .peer/gpt-fast && echo /.peer/ >> .git/info/exclude
#   (from a clone of pytorch-labs/gpt-fast) cp generate.py model.py tp.py quantize.py tokenizer.py GPTQ.py LICENSE \
#       .peer/gpt-fast/ && git rev-parse HEAD > .peer/gpt-fast/COMMIT
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PEERS=${PEERS:-"tp1 tp2"}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "gpt-fast $(cat .peer/gpt-fast/COMMIT)"; } > "$OUT/peer-env.log" 2>&1
peer() {   # peer NAME LIMIT COMMAND...
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  timeout -k 10 "$limit" "$@" --json "$OUT/$name.json" > "/tmp/$name.log" 2>&1
  echo "$name exit $? after $(( SECONDS - t0 )) s" >> "$OUT/peer-env.log"
  { echo "===== $name: $*"; cat "/tmp/$name.log"; } >> "$OUT/peer-runs.log"
}
for what in $PEERS; do
  case $what in
    tp1) peer peer-b1 300 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/peer_gpt_fast.py --batch-size 1 &
         peer peer-b16 300 env CUDA_VISIBLE_DEVICES=1 python3 benchmarks/peer_gpt_fast.py --batch-size 16 &
         wait ;;
    int4) peer peer-int4-b1 300 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/peer_gpt_fast.py --quant int4 --batch-size 1 ;;
    tp2) peer peer-tp2 300 torchrun --standalone --nproc_per_node=2 benchmarks/peer_gpt_fast.py --batch-size 1 ;;
    *)   echo "unknown peer run $what" >> "$OUT/peer-env.log" ;;
  esac
done
cat "$OUT/peer-env.log"
for f in "$OUT"/peer-*.json; do
  [ -s "$f" ] && python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], \
'tp', r['tp'], 'batch', r['batch_size'], 'decode tok/s', round(r['decode_tokens_per_s_median'], 1), r['card'])" "$f"
done
