#!/usr/bin/env bash
# Device run: the gpu-marked tests, then the README's one-GPU commands (第三节) exactly as written, each with a time
# limit. One GPU; start the device command with the pip prefix of the README (第九节) and carry [".whl"], then:
#   bash benchmarks/gpu_readme_check.sh
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
command -v python >/dev/null || { mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$OUT/env.log" 2>&1
timeout -k 10 200 python -m pytest -q -m gpu tests > "$OUT/gpu-tests.log" 2>&1; echo "gpu tests exit $?" >> "$OUT/env.log"
run() { local n=$1 limit=$2; shift 2; timeout -k 10 "$limit" "$@" > "$OUT/readme-$n.log" 2>&1; echo "readme $n exit $?" >> "$OUT/env.log"; }
run 1 120 python ds_bnb_infer.py --model random:llama-2-7b --max-new-tokens 128
run 2 150 python ds_bnb_infer.py --model random:llama-2-7b --max-new-tokens 128 --quant 4bit
run 3 170 python extensions/fast_decode.py --model random:llama-2-7b --max-new-tokens 128 --backend hf
cat "$OUT/env.log"; tail -n 4 "$OUT/gpu-tests.log"
