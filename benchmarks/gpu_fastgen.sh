#!/usr/bin/env bash
# Usage (repo root, after the device prefix of benchmarks/README.md on .whl-fastgen, carry [".whl-fastgen"]):
#   [BATCHES="1 16"] [TEST=0] bash benchmarks/gpu_fastgen.sh     # TEST=0: without the gpu test
# DeepSpeed-FastGen (extensions/fastgen.py) beside the lesson's fp16 fast loop on one GPU, random:llama-2-7b, 32-token
# prompt, 128 new tokens, every row verified: the gpu test of tests/test_fastgen.py (it builds FastGen's kernels,
# ~2.5 min), then measure/compare.py --modes fastgen,hf-compile for each batch in BATCHES (default 1).
#   -> env.log, test.log, fastgen-bB.json / .png, console-bB.log
# FastGen needs the deepspeed-kernels wheel (44.5 MB), which with bitsandbytes' is more than one call carries: fill a
# folder without bitsandbytes,
#   mkdir .whl-fastgen; cp .whl/{deepspeed,hjson,pydantic,pydantic_core,annotated_types,typing_*}-*.whl .whl-fastgen/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux1_x86_64 \
#     -d .whl-fastgen deepspeed-kernels
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import ds_bnb_infer as m; print(m.versions())"; pip list 2>/dev/null | grep -i deepspeed
} > "$OUT/env.log" 2>&1
if [ "${TEST:-1}" = 1 ]; then
  timeout -k 10 ${TEST_LIMIT:-330} python3 -m pytest -q -m gpu tests/test_fastgen.py > "$OUT/test.log" 2>&1
  echo "gpu test exit $? ($(tail -1 "$OUT/test.log"))" >> "$OUT/env.log"
fi
for b in ${BATCHES:-1}; do
  timeout -k 10 ${LIMIT:-300} python3 measure/compare.py --model "${MODEL:-random:llama-2-7b}" \
    --modes "${MODES:-fastgen,hf-compile}" \
    --max-new-tokens 128 --warmup 1 --iters 3 --batch-size "$b" --prompt "Explain tensor parallelism now: " \
    --json "$OUT/fastgen-b$b.json" --plot "$OUT/fastgen-b$b.png" > "$OUT/console-b$b.log" 2>&1
  echo "compare batch $b exit $?" >> "$OUT/env.log"
done
cat "$OUT/env.log"; grep -v "^\[" "$OUT"/console-b*.log | tail -40
