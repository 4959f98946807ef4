"""Usage (two GPUs): deepspeed --num_gpus=2 benchmarks/profile_tp.py --model random:llama-2-7b --tp-size 2 --max-new-tokens 64

Device harness (issue 11): where a tensor-parallel decode step's time goes, each rank's view.

Builds the engine exactly as `deepspeed --num_gpus=2 extensions/tensor_parallel.py --fast-decode ...` does (verified the
same way), runs the lesson's generate() twice to compile and capture, then once under torch.profiler. From the
GPU's kernels of that run it writes $OUT/tp-profile.json: for one decode step (the run's kernels divided by its
steps), the GPU's busy time and its idle time (gaps between kernels), split by kind of kernel (matmul, all-reduce,
attention, generated Triton kernels, other), the top kernels, and the kernel sequence of one step in the middle of the
run (name, start offset and duration in microseconds), which shows the gaps where they are. Rank 0 writes
$OUT/tp-profile.json, rank r > 0 $OUT/tp-profile-rank<r>.json; "all_reduce_us" gives the spread of one all-reduce's
time (min, median, max): an all-reduce waits for the slower rank, so its minimum is the protocol's cost and the rest
is the ranks' skew.

On a CPU machine (--model random:tiny --dtype fp32) the profile holds no CUDA kernels: only the GPU writes the JSON.
"""
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402
from extensions import tensor_parallel  # noqa: E402
from extensions.fast_decode import FastGreedy  # noqa: E402

# Inductor names a kernel after the operations fused into it: its matmuls are reductions ("triton_red_...mm...") or
# templates, and a name may hold "all_reduce" for the cast feeding one; the all-reduce itself is PyTorch's or NCCL's.
KINDS = [("all-reduce", r"one_shot_all_reduce|two_shot|allreduce|nccl|multimem|^push_all_reduce_kernel"),
         ("attention", r"flash|fmha|sdpa|attention"),
         ("matmul", r"^triton_(red|tem)_\w*_mm_|gemm|gemv|cublas|cutlass|nvjet|xmma|splitk"),
         ("pointwise/norm", r"^triton"),
         ("other", r".")]


def kind_of(name: str) -> str:
    return next(k for k, pattern in KINDS if re.search(pattern, name, re.I))


def main() -> int:
    import torch
    config = lesson.config_from_args(sys.argv[1:], prog="benchmarks/profile_tp.py",
                                     config_class=tensor_parallel.TensorParallelConfig)   # --step, --all-reduce, ...
    engine, tokenizer, info = tensor_parallel.init_engine(config, decoder=FastGreedy)
    prompts = lesson.batches_of(lesson.load_prompts(config), config.batch_size)[0]
    for _ in range(2):
        lesson.generate(engine, tokenizer, prompts, config)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=acts) as prof:
        run = lesson.generate(engine, tokenizer, prompts, config)
    engine.close()
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                         key=lambda e: e.time_range.start)
        # The decode steps: the kernels after the first 30 % of the run's GPU span (the eager prefill comes first);
        # each figure below is that window's share, scaled to one step of this run's measured decode time.
        first, last = kernels[0].time_range.start, kernels[-1].time_range.end
        window = [e for e in kernels if e.time_range.start >= first + 0.3 * (last - first)]
        w0, w1 = window[0].time_range.start, max(e.time_range.end for e in window)
        step_us = run["decode_s_per_token"] * 1e6
        scale = step_us / (w1 - w0)                       # window microseconds -> one step's microseconds
        busy, end, by_kind, by_name = 0.0, None, {}, {}
        for e in window:
            s, t = e.time_range.start, e.time_range.end
            if end is None or t > end:                    # the part of this kernel no earlier kernel covered
                busy += t - (s if end is None else max(s, end))
                end = t
            k = kind_of(e.name)
            by_kind[k] = by_kind.get(k, 0.0) + (t - s)
            n = by_name.setdefault(e.name[:90], [0, 0.0])
            n[0], n[1] = n[0] + 1, n[1] + t - s
        reduces = sorted(e.time_range.end - e.time_range.start for e in window if kind_of(e.name) == "all-reduce")
        middle = window[len(window) // 2].time_range.start
        one = [e for e in window if middle <= e.time_range.start < middle + step_us]
        report = {
            "rank": rank, "model": config.model_name, "tp": config.tp_size, "batch_size": config.batch_size,
            "new_tokens": config.max_new_tokens, "decode_mode": info.decode, "notes": info.notes,
            "verify": info.verify, "decode_us_per_step": step_us,
            "kernels_per_step": len(window) * step_us / (w1 - w0),
            "gpu_busy_us_per_step": busy * scale, "gpu_idle_us_per_step": (w1 - w0 - busy) * scale,
            "kernel_us_per_step_by_kind": {k: v * scale for k, v in sorted(by_kind.items(), key=lambda x: -x[1])},
            "all_reduce_us": {"calls": len(reduces), **({"min": reduces[0], "median": reduces[len(reduces) // 2],
                                                         "max": reduces[-1]} if reduces else {})},
            "top_kernels": [{"name": n, "per_step": c * step_us / (w1 - w0), "us_per_step": t * scale}
                            for n, (c, t) in sorted(by_name.items(), key=lambda x: -x[1][1])[:30]],
            "one_step": [{"name": e.name[:70], "at_us": round(e.time_range.start - middle, 1),
                          "us": round(e.time_range.end - e.time_range.start, 1)} for e in one],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": lesson.versions(),
            "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        out = os.path.join(os.environ.get("OUT", "/tmp"), f"tp-profile{f'-rank{rank}' if rank else ''}.json")
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps({k: report[k] for k in ("decode_us_per_step", "kernels_per_step", "gpu_busy_us_per_step",
                                                 "gpu_idle_us_per_step", "kernel_us_per_step_by_kind", "all_reduce_us",
                                                 "rank")}, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
