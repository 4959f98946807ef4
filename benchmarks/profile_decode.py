#!/usr/bin/env python3
"""Where one decode step of extensions/fast_decode.py's loop goes (issue 25): its kernels, one line each, per step.

Usage: python3 benchmarks/profile_decode.py [--steps N] [--top K] [--json PATH] [--inductor NAME=VALUE ...] -- DECODER
       FLAGS
  python3 benchmarks/profile_decode.py --json $OUT/profile-4bit.json -- --model random:llama-2-7b --backend hf \\
      --quant 4bit --batch-size 1
  python3 benchmarks/profile_decode.py -- --model random:llama-2-7b --backend hf        # fp16, compiled
  python3 benchmarks/profile_decode.py --steps 4 -- --model random:tiny --device cpu    # smoke test (aten ops)
  python3 benchmarks/profile_decode.py --inductor aggressive_fusion=True -- --model random:llama-2-7b --backend hf \
      --quant 4bit                 # the same step compiled with one of torch.compile's inductor options changed

The flags after -- are extensions/quantized_matmul.py's (with --quant none: fast_decode.py's loop alone). The engine
is built and verified by the lesson's init_engine, as every run is (and, with 4-bit kernels, each layer's kernels
checked against their weights). Then, after warm-up, one generate() of N + 1 new tokens and one of 1 new token (the
prefill and the first argmax alone) are profiled; a kernel's time per step is its difference over N. On a GPU a
"kernel" is what the device ran (the kernels inside the step's CUDA graph included); on a CPU, an aten op's own time.
Also timed without the profiler (3 runs each, median): the step's wall time, which the kernels' sum should approach
when the GPU never waits for the host, and the kernels launched a step. Prints a table, writes it as JSON (card, date,
versions) with --json. --inductor sets an option of torch._inductor.config (dotted: triton.max_tiles=3) before the
step is compiled, to see what a fusion option would change before fast_decode.py takes it.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402
from extensions.fast_decode import FastGreedy  # noqa: E402
from extensions.quantized_matmul import QuantizedGreedy, QuantizedMatmulConfig  # noqa: E402

# A kernel's group: extensions/kernel_4bit.py's kernels by their names, the others by the first of these words in their
# name (lower case): where the step's time goes, coarsely.
OURS = {"matvec": "4-bit matvec", "matmul": "4-bit tensor-core matmul", "dequantize_kernel": "4-bit dequantize"}
GROUPS = [("inductor (fused elementwise)", "triton_"), ("attention", "sdpa"), ("attention", "attention"),
          ("attention", "flash"), ("attention", "fmha"), ("cuBLAS / GEMM", "gemm"), ("cuBLAS / GEMM", "gemv"),
          ("cuBLAS / GEMM", "cublas"), ("cuBLAS / GEMM", "xmma"), ("cuBLAS / GEMM", "nvjet"),
          ("cuBLAS / GEMM", "addmm"), ("cuBLAS / GEMM", "aten::mm"), ("cuBLAS / GEMM", "aten::linear"),
          ("copies", "memcpy"), ("copies", "copy"), ("copies", "memset")]

def group_of(name: str) -> str:
    low = name.lower()
    return OURS.get(name) or next((group for group, word in GROUPS if word in low), "other")

def kernel_times(profile, on_gpu: bool) -> tuple[dict[str, float], int]:
    """Microseconds by kernel name: device events on a GPU (the kernels), aten ops' own CPU time on a CPU; and how
    many there were."""
    from torch.autograd import DeviceType
    times, count = collections.Counter(), 0
    for e in profile.events():
        if on_gpu and e.device_type == DeviceType.CUDA:
            times[e.name] += e.time_range.elapsed_us()
            count += 1
        elif not on_gpu and e.device_type == DeviceType.CPU and e.name.startswith("aten::"):
            times[e.name] += e.self_cpu_time_total
            count += 1
    return dict(times), count

def set_inductor_options(pairs: list[str]) -> dict:
    """Set --inductor's NAME=VALUE pairs in torch._inductor.config for the rest of this process (the step's
    compilation included); each name an option it has, each value a Python literal (True, 3, 'x'); a bad one is a
    usage error. Returns them as {name: value}."""
    import ast
    import torch._inductor.config as inductor
    options = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise lesson.UsageError(f"--inductor {pair}: the value is not a Python literal (True, 3, 'x').") from None
        head, _, last = name.rpartition(".")
        section = inductor
        for part in filter(None, head.split(".")):
            section = getattr(section, part, None)
        if not name or section is None or not hasattr(section, last):
            raise lesson.UsageError(f"--inductor {pair}: torch._inductor.config has no option {name!r}.")
        options[name] = value
    for name, value in options.items():
        head, _, last = name.rpartition(".")
        section = inductor
        for part in filter(None, head.split(".")):
            section = getattr(section, part)
        setattr(section, last, value)
    return options

def timed(fn, runs: int = 3) -> float:
    """The median wall time of fn() in seconds (the GPU synchronized before and after each)."""
    seconds = []
    for _ in range(runs):
        fn.sync()
        t0 = time.perf_counter()
        fn()
        fn.sync()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="benchmarks/profile_decode.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=64, help="decode steps profiled (default 64)")
    parser.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    parser.add_argument("--json", help="write the table here")
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of torch._inductor.config for the compiled step (repeatable)")
    args = parser.parse_args(argv[:cut])
    if args.steps < 1 or args.top < 1:
        parser.error("--steps and --top take a whole number of at least 1")
    config = lesson.config_from_args(argv[cut + 1:], "extensions/quantized_matmul.py", QuantizedMatmulConfig)
    import torch
    decoder = FastGreedy if config.quant == "none" else QuantizedGreedy
    lesson.quiet_libraries(config.debug)
    try:
        if args.json:
            lesson.check_writable(args.json, "--json")
        decoder.validate(config)
        options = set_inductor_options(args.inductor)
        engine, tokenizer, info = lesson.init_engine(config, decoder)
    except (lesson.UsageError, lesson.RunFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, lesson.UsageError) else 1
    device = next(engine.parameters()).device
    on_gpu = device.type == "cuda"
    enc = lesson.encode(tokenizer, (lesson.load_prompts(config) * config.batch_size)[: config.batch_size], device)

    def run(new_tokens: int):
        def go():
            with torch.no_grad():
                engine.generate(**enc, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
                                min_new_tokens=new_tokens)
        go.sync = lambda: lesson.sync(device)
        return go
    full, prefill = run(args.steps + 1), run(1)
    for _ in range(max(2, config.warmup)):          # the compiled step's first calls compile and capture
        full(), prefill()
    step_s = (timed(full) - timed(prefill)) / args.steps
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    times, counts = {}, {}
    for name, fn in (("full", full), ("prefill", prefill)):
        fn.sync()
        with torch.profiler.profile(activities=activities) as profile:
            fn()
            fn.sync()
        times[name], counts[name] = kernel_times(profile, on_gpu)
    per_step = {k: (v - times["prefill"].get(k, 0.0)) / args.steps for k, v in times["full"].items()}
    per_step = {k: v for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]) if v > 0}
    groups = collections.Counter()
    for k, v in per_step.items():
        groups[group_of(k)] += v
    total_us = sum(per_step.values())
    report = {"what": "one decode step's kernels (profile_decode.py)", "date": time.strftime("%Y-%m-%d"),
              "card": torch.cuda.get_device_name(device) if on_gpu else "cpu", "versions": lesson.versions(),
              "argv": argv[cut + 1:], "inductor": options, "batch": config.batch_size, "steps": args.steps, "mode": info.decode,
              "verify": info.verify, "step_wall_us": step_s * 1e6, "kernels_us_per_step": total_us,
              "launches_per_step": (counts["full"] - counts["prefill"]) / args.steps,
              "groups_us_per_step": dict(groups.most_common()),
              "top": [{"kernel": k[:160], "group": group_of(k), "us_per_step": v}
                      for k, v in list(per_step.items())[: args.top]]}
    print(f"{report['card']}, batch {config.batch_size}, {info.decode}: step {report['step_wall_us']:.1f} us wall, "
          f"kernels {total_us:.1f} us a step, {report['launches_per_step']:.1f} launches")
    for g, v in groups.most_common():
        print(f"  {v:9.1f} us  {100 * v / max(total_us, 1e-9):5.1f}%  {g}")
    for row in report["top"]:
        print(f"  {row['us_per_step']:9.2f} us  {row['kernel'][:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    engine.close()
    return 0

if __name__ == "__main__":
    sys.exit(main())
