#!/usr/bin/env bash
# Device run on 2 GPUs (kind nvidia-h100-x2): why does tp 2 on random:llama-2-7b print nothing for minutes?
# (runs 1-3 of 2026-11-25: nothing within 300 / 420 s; the same code path with 2 layers runs in 12 s on a 2-core CPU.)
# 1. the host: cores, CPU quota, memory, torch's thread count;
# 2. one process building the 7B preset on the CPU in fp16, as each tp rank does, timed per part;
# 3. the tp 2 run itself, every rank dumping its stack every 60 s, and ps sampled every 20 s (CPU %, RSS, state).
# Device command (repo root, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/h100x2_diag.sh
set -u
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
export PATH="${PYTHONPATH:+$PYTHONPATH/bin:}$PATH"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log-diag.txt") 2>&1
nproc; cat /sys/fs/cgroup/cpu.max 2>/dev/null; grep MemTotal /proc/meminfo; free -g | head -2
python3 - <<'PY'
import time, torch, os
t0 = time.perf_counter()
def say(what): print(f"{time.perf_counter() - t0:7.1f} s  {what}", flush=True)
say(f"threads {torch.get_num_threads()}, affinity {len(os.sched_getaffinity(0))}")
x = torch.empty(3_000_000_000, dtype=torch.float16); say("empty 6 GB")
x.fill_(1.0); say("filled 6 GB (page faults)")
x.normal_(); say("normal_ 6 GB")
del x
from transformers import AutoModelForCausalLM, LlamaConfig
import sys; sys.path.insert(0, "."); import ds_bnb_infer as d
for layers in (2, 32):
    cfg = LlamaConfig(**dict(d.PRESETS["random:llama-2-7b"], num_hidden_layers=layers))
    t = time.perf_counter()
    with torch.device("cpu"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    say(f"from_config {layers} layers fp16 on cpu: {time.perf_counter() - t:.1f} s")
    del m
PY
echo "== probe done at $SECONDS s"
mkdir -p /tmp/fh && echo 'import faulthandler; faulthandler.dump_traceback_later(60, repeat=True)' > /tmp/fh/sitecustomize.py
( while sleep 20; do echo "-- ps at $SECONDS s"; ps -eo pid,pcpu,rss,stat,wchan:24,args --sort=-pcpu | grep "[d]s_bnb_infer" | cut -c1-110; done ) &
MON=$!
t0=$SECONDS
PYTHONPATH="/tmp/fh:${PYTHONPATH:-}" timeout -k 10 $((560 - SECONDS)) deepspeed --num_gpus=2 ds_bnb_infer.py --tp-size 2 \
  --model random:llama-2-7b --max-new-tokens 128 --warmup 1 --iters 3 --prompt "Explain tensor parallelism now: " \
  --no-kernel-inject --json "$OUT/tp2.json" 2>&1 | grep --line-buffered -v "^\[20\|^  File.*/\(threading\|concurrent\|selectors\|subprocess\|queue\)" \
  | cut -c1-300 > "$OUT/tp2-console.txt"
echo "== tp2: rc=${PIPESTATUS[0]} wall $((SECONDS - t0)) s"
kill $MON
tail -n 70 "$OUT/tp2-console.txt"
