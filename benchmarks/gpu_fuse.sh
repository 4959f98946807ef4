#!/usr/bin/env bash
# Device run, issue 13 (fp16 at the peer's speed): fast_decode.py's two optimisations measured against each other in
# one call, random:llama-2-7b fp16 --backend hf, prompt 32 tokens, 128 new tokens, 3 timed runs, each verified:
#   fuse_projections() (one matmul for q/k/v and for gate/up; FAST_DECODE_FUSE) and inductor_tuning() (torch.compile's
#   coordinate-descent tuning; FAST_DECODE_TUNE). Two GPUs of one host, two runs each, one after the other:
#   GPU 0: plain-b1 (both off: the loop before), both-b1 (both on: the default)
#   GPU 1: fuse-b1 (fusion only), both-b16 (the default at batch 16)
# Start the device command with the pip prefix of the README (第九节), carry [".whl"], then: bash benchmarks/gpu_fuse.sh
set -u
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
PROMPT="Explain tensor parallelism now: "            # 32 bytes = 32 tokens with the preset's byte tokenizer
COMMON=(--model "${MODEL:-random:llama-2-7b}" --backend hf --max-new-tokens 128 --iters 3 --prompt "$PROMPT" "${@}")
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import ds_bnb_infer as m; print(m.versions())"; } > "$OUT/env.log" 2>&1
one() {  # one NAME GPU FUSE TUNE BATCH
  local t0=$SECONDS
  CUDA_VISIBLE_DEVICES=$2 FAST_DECODE_FUSE=$3 FAST_DECODE_TUNE=$4 timeout -k 10 "${LIMIT:-200}" \
    python3 extensions/fast_decode.py "${COMMON[@]}" --batch-size "$5" --json "$OUT/$1.json" > "/tmp/fuse-$1.log" 2>&1
  echo "$1 (GPU $2, FUSE=$3 TUNE=$4, batch $5): exit $? after $(( SECONDS - t0 )) s" >> "$OUT/env.log"
  { echo "===== $1"; grep -v "^\[20\|it/s\]" "/tmp/fuse-$1.log"; } >> "$OUT/runs-gpu$2.log"
}
{ one plain-b1 0 0 0 1; one both-b1 0 1 1 1; } &
{ one fuse-b1 1 1 0 1; one both-b16 1 1 1 16; } &
wait
cat "$OUT/env.log"
python3 - "$OUT" <<'PY'
import json, os, sys
for name in ("plain-b1", "fuse-b1", "both-b1", "both-b16"):
    path = os.path.join(sys.argv[1], name + ".json")
    if not os.path.exists(path):
        print(f"{name:<10} (no JSON)"); continue
    r = json.load(open(path)); e, m = r["engine"], r["metrics"]
    print(f"{name:<10}{e['decode']:>10}{m['decode_tokens_per_s']:>9.1f} tok/s  {r['memory']['per_rank'][0]['peak_allocated'] or 0:.2f} GiB  "
          f"{e['verify']['summary']}")
PY
