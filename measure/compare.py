#!/usr/bin/env python3
"""measure/compare.py — 第十节: every deployment mode on the same model and prompts, in one table, JSON and chart.

Each mode is the lesson (ds_bnb_infer.py) or an extension (fast_decode.py, quantized_matmul.py, fastgen.py) run
with a few flags, in a process of its own (no mode inherits another's GPU memory
or compiled kernels), verified as always; a mode that fails is a row that says why. On top of each run's own report this file measures the device's memory bandwidth once, so that every row gets
its MBU (model bandwidth utilisation: achieved GB/s over the bandwidth) and its roofline (the decode tok/s that
bandwidth would allow, weight bytes per step being what they are).

  python measure/compare.py --model random:tiny --max-new-tokens 16 --json /tmp/compare.json --plot /tmp/compare.png
  python measure/compare.py --model random:llama-2-7b --modes hf,hf-compile,ds-4bit --max-new-tokens 128
Every other flag is the lesson's (python ds_bnb_infer.py --help) and goes to every mode; the flags a mode sets
(--backend, --quant, --int8-threshold, --kernel-inject, --fallback) are refused here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ds_bnb_infer as lesson  # noqa: E402

LESSON = os.path.join(ROOT, "ds_bnb_infer.py")
FAST, QMM = os.path.join(ROOT, "extensions", "fast_decode.py"), os.path.join(ROOT, "extensions", "quantized_matmul.py")
FASTGEN = os.path.join(ROOT, "extensions", "fastgen.py")
INJECT = os.path.join(ROOT, "extensions", "kernel_inject.py")
# mode -> (script, flags). Injection (the tutorial's call, through extensions/kernel_inject.py's adapter) runs with
# --no-fallback, so that a failed injection is a failed row rather than a second copy of "ds". The "-compile" modes
# are extensions/fast_decode.py (static KV cache, CUDA graphs);
# "hf-static" is transformers' own generate() on a static cache (fast_decode.py --loop transformers).
MODES = {
    "hf": (LESSON, ["--backend", "hf"]),
    "ds": (LESSON, ["--backend", "deepspeed", "--no-kernel-inject"]),
    "ds-inject": (INJECT, ["--backend", "deepspeed", "--kernel-inject", "--no-fallback"]),
    "ds-8bit": (LESSON, ["--backend", "deepspeed", "--quant", "8bit"]),
    "ds-4bit": (LESSON, ["--backend", "deepspeed", "--quant", "4bit"]),
    "hf-static": (FAST, ["--backend", "hf", "--loop", "transformers"]),
    "hf-compile": (FAST, ["--backend", "hf"]),
    "hf-8bit-compile": (FAST, ["--backend", "hf", "--quant", "8bit"]),
    "hf-8bit-t0-compile": (FAST, ["--backend", "hf", "--quant", "8bit", "--int8-threshold", "0"]),
    "hf-4bit-compile": (FAST, ["--backend", "hf", "--quant", "4bit"]),
    # bitsandbytes' 4-bit settings (第七节: the lesson's nf4 + double quant + bf16, one changed), in the fast loop
    # with bitsandbytes' own kernels, each with its error against the unquantized weights (quantized_matmul.py);
    # then torch.compile of the quantized step (bitsandbytes >= 0.46) instead of the CUDA graph fast_decode.py picks.
    "hf-4bit-fp4-compile": (QMM, ["--backend", "hf", "--quant", "4bit", "--matmul", "bitsandbytes",
                                  "--bnb-4bit-quant-type", "fp4"]),
    "hf-4bit-nodq-compile": (QMM, ["--backend", "hf", "--quant", "4bit", "--matmul", "bitsandbytes",
                                   "--no-bnb-4bit-use-double-quant"]),
    "hf-4bit-fp16-compile": (QMM, ["--backend", "hf", "--quant", "4bit", "--matmul", "bitsandbytes",
                                   "--bnb-4bit-compute-dtype", "fp16"]),
    "hf-4bit-fp16-nodq-compile": (QMM, ["--backend", "hf", "--quant", "4bit", "--matmul", "bitsandbytes",
                                        "--bnb-4bit-compute-dtype", "fp16", "--no-bnb-4bit-use-double-quant"]),
    "hf-4bit-torch-compile": (FAST, ["--backend", "hf", "--quant", "4bit", "--step", "compiled"]),
    "hf-8bit-t0-torch-compile": (FAST, ["--backend", "hf", "--quant", "8bit", "--int8-threshold", "0", "--step",
                                        "compiled"]),
    # the same int8 / 4-bit weights multiplied weight-only (extensions/quantized_matmul.py, the 4-bit kernel:
    # extensions/kernel_4bit.py), in the compiled loop; 4-bit with the lesson's bf16 compute, and with fp16
    "hf-8bit-wo-compile": (QMM, ["--backend", "hf", "--quant", "8bit", "--int8-threshold", "0"]),
    "hf-4bit-wo-compile": (QMM, ["--backend", "hf", "--quant", "4bit", "--matmul", "weight-only"]),
    "hf-4bit-wo-fp16-compile": (QMM, ["--backend", "hf", "--quant", "4bit", "--matmul", "weight-only",
                                      "--bnb-4bit-compute-dtype", "fp16"]),
    # the compiled step's kernels without programmatic dependent launches (fast_decode.py --pdl off; on by default
    # at tp 1 where the GPU can), fp16 and 4-bit
    "hf-nopdl-compile": (FAST, ["--backend", "hf", "--pdl", "off"]),
    "hf-4bit-wo-nopdl-compile": (QMM, ["--backend", "hf", "--quant", "4bit", "--matmul", "weight-only", "--pdl",
                                       "off"]),
    # a decode step's attention as transformers' sdpa instead of extensions/decode_attention.py's split-KV kernel
    # (fast_decode.py --attention sdpa; the kernel by default at one row a step on a GPU), fp16 and 4-bit
    "hf-sdpa-compile": (FAST, ["--backend", "hf", "--attention", "sdpa"]),
    "hf-4bit-wo-sdpa-compile": (QMM, ["--backend", "hf", "--quant", "4bit", "--matmul", "weight-only",
                                      "--attention", "sdpa"]),
    # DeepSpeed-FastGen (extensions/fastgen.py): another engine on the same weights; GPU only (refused on a CPU)
    "fastgen": (FASTGEN, ["--backend", "hf"]),
}
SET_BY_MODES = ["backend", "quant", "int8_threshold", "kernel_inject", "fallback", "bnb_4bit_quant_type",
                "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="measure/compare.py", description=__doc__.split("\n")[0],
        epilog="Any other flag is passed to every mode: see python ds_bnb_infer.py --help.")
    parser.add_argument("--modes", default=",".join(MODES), metavar="MODES",
                        help=f"comma-separated, from: {', '.join(MODES)} (default: all)")
    parser.add_argument("--json", metavar="PATH", help="write the table's rows, with card, date and versions")
    parser.add_argument("--plot", metavar="PATH", help="draw decode tok/s and peak GPU memory per mode (matplotlib)")
    return parser


def check_args(args, rest: list[str]) -> tuple[list[str], lesson.DeployConfig]:
    """The modes asked for and the lesson's config from the other flags; one sentence (exit 2) for anything wrong."""
    import torch
    names = args.modes.split(",")
    unknown = sorted(set(names) - set(MODES))
    if unknown:
        raise lesson.UsageError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}.")
    config = lesson.config_from_args(rest, prog="measure/compare.py")
    set_here = [f for f in SET_BY_MODES if getattr(config, f) != getattr(lesson.DeployConfig(), f)]
    if set_here:
        raise lesson.UsageError(f"--{set_here[0].replace('_', '-')} is set by each mode; drop it, or pick the modes "
                                "that use what you want with --modes.")
    lesson.validate(config, int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available())
    if lesson.dist_env(config)[2] > 1:
        raise lesson.UsageError("compare.py starts one process per mode by itself; run it without the deepspeed "
                                "launcher.")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            lesson.check_writable(path, flag)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise lesson.UsageError("--plot needs matplotlib; pip install matplotlib (or leave out --plot).") from None
    return names, config


def copy_bandwidth_gb_s(device: str) -> float:
    """This device's memory bandwidth in GB/s (1e9 bytes), measured: a large copy, bytes read + written, median of
    10. The buffer (1 GiB on a GPU) is far larger than any cache, and holds random bytes, never zeros."""
    import torch
    n = 2 ** 30 if device.startswith("cuda") else 2 ** 27
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst, times = torch.empty_like(src), []
    for _ in range(12):
        lesson.sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        lesson.sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n / lesson.percentile(times[2:], 50) / 1e9          # the first two copies page the buffers in


def run_mode(name: str, rest: list[str], path: str) -> tuple[int, list[str]]:
    """Run one mode; its progress lines are shown as they come, its stderr is kept for the error line."""
    script, flags = MODES[name]
    cmd = [sys.executable, script, *rest, *flags, "--json", path]
    lesson.log(f"[compare] {name}: {os.path.relpath(script, ROOT)} {' '.join(rest + flags)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if line.startswith("[") and not line.startswith(("[json]", "[measure]")):
            lesson.log(f"  {name} {line.rstrip()}")
    return proc.wait(), lines


def row(name: str, code: int, stderr: list[str], path: str, bandwidth_gb_s: float) -> dict:
    """One table row from a mode's JSON report, or its one-line error."""
    if code != 0 or not os.path.exists(path):
        errors = [line for line in stderr if line.startswith("error:")] or stderr[-1:]
        return {"mode": name, "status": "failed", "reason": errors[-1] if errors else f"exit code {code}"}
    with open(path, encoding="utf-8") as fh:
        rep = json.load(fh)
    e, m, c = rep["engine"], rep["metrics"], rep["config"]
    peaks = [r["peak_allocated"] for r in rep["memory"]["per_rank"] if r["peak_allocated"] is not None]
    return {"mode": name, "status": "ok", "card": rep["hardware"]["gpu"] or "cpu", "backend": e["backend"],
            "quant": e["quant"], "int8_threshold": c["int8_threshold"] if e["quant"] == "8bit" else None,
            "dtype": e["dtype"], "kernel_inject": e["kernel_inject"], "decode": e["decode"],
            "batch_size": c["batch_size"], "prompt_len": m["per_run"][0]["prompt_tokens"] / c["batch_size"],
            "new_tokens": c["max_new_tokens"], "decode_tokens_per_s": m["decode_tokens_per_s"],
            "tokens_per_s": m["tokens_per_s_cluster"], "ttft_s": m["ttft_s"]["p50"], "p50_s": m["latency_s"]["p50"],
            "p95_s": m["latency_s"]["p95"], "peak_allocated_gib": max(peaks) if peaks else None,
            "weight_gb": m["weight_gb"], "decode_read_gb": m["decode_read_gb"],
            "mbu": m["achieved_gb_s"] / bandwidth_gb_s if m["achieved_gb_s"] else None,
            "roofline_decode_tokens_per_s": c["batch_size"] * bandwidth_gb_s / m["decode_read_gb"],
            "verified": e["verify"]["passed"] if e["verify"] else "reference",
            "verify": e["verify"]["summary"] if e["verify"] else "plain transformers is the reference",
            "vs_unquantized": (e["verify"] or {}).get("vs_unquantized"), "fallbacks": e["fallbacks"],
            "kernel_tilings": ((e["verify"] or {}).get("matmuls") or {}).get("tilings")}


def render(result: dict) -> str:
    head = (f"{'mode':<25}{'quant':>6}{'batch':>6}{'TTFT s':>8}{'p50 s':>8}{'p95 s':>8}{'decode tok/s':>13}"
            f"{'MBU':>6}{'peak GiB':>9}  verified")
    lines = [f"compare on {result['card']} ({result['bandwidth_gb_s']:.0f} GB/s measured copy bandwidth), "
             f"{result['date']}", head]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['mode']:<25} FAILED: {r['reason']}")
            continue
        mbu = f"{r['mbu']:.0%}" if r["mbu"] is not None else "-"
        peak = f"{r['peak_allocated_gib']:.2f}" if r["peak_allocated_gib"] is not None else "-"
        err = r.get("vs_unquantized")
        lines.append(f"{r['mode']:<25}{r['quant']:>6}{r['batch_size']:>6}{r['ttft_s']:>8.3f}{r['p50_s']:>8.3f}"
                     f"{r['p95_s']:>8.3f}{r['decode_tokens_per_s'] or 0:>13.1f}{mbu:>6}{peak:>9}  {r['verified']}"
                     + (f" (vs unquantized: rel. error {err['prefill_rel_error']:.2e})" if err else ""))
    lines.append("decode tok/s = batch / decode time per step (p50); MBU = weight bytes per step x steps/s / "
                 "bandwidth; peak GiB = peak allocated GPU memory of the timed runs")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Decode tok/s per mode as horizontal bars (the mode names read whole), each labelled with its MBU and roofline;
    peak GPU memory beside it (on a GPU)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["status"] == "ok"][::-1]        # the first mode on top
    names, memory = [r["mode"] for r in rows], any(r["peak_allocated_gib"] for r in rows)
    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(13 if memory else 8, 1.2 + 0.45 * len(rows)),
                             squeeze=False, sharey=True)
    ax = axes[0][0]
    bars = ax.barh(names, [r["decode_tokens_per_s"] or 0 for r in rows], color="tab:blue")
    # The roofline is a label, not a bar: on a CPU it is ten times the measured speed and would flatten the chart.
    ax.bar_label(bars, [f" MBU {r['mbu']:.0%}, roofline {r['roofline_decode_tokens_per_s']:.0f}" if r["mbu"] else ""
                        for r in rows], fontsize=8)
    ax.set_xlabel("decode tokens/s (verified modes)")
    ax.margins(x=0.45)
    if memory:
        axes[0][1].barh(names, [r["peak_allocated_gib"] or 0 for r in rows], color="tab:green")
        axes[0][1].set_xlabel("peak allocated GPU memory (GiB)")
    fig.suptitle(f"{result['card']}, batch {rows[0]['batch_size']}, {result['new_tokens']} new tokens, "
                 f"{result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def compare(names: list[str], rest: list[str], config, args) -> int:
    import torch
    device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth_gb_s(device)          # once, before any mode holds the device
    if device == "cuda":
        torch.cuda.empty_cache()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ds_bnb_infer-compare-") as tmp:
        for name in names:
            path = os.path.join(tmp, f"{name}.json")
            rows.append(row(name, *run_mode(name, rest, path), path, bandwidth))
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise lesson.RunFailure(f"every mode failed ({rows[0]['mode']}: {rows[0]['reason']}); nothing to compare.")
    result = {"date": time.strftime("%Y-%m-%d"), "card": ok[0]["card"], "versions": lesson.versions(),
              "bandwidth_gb_s": bandwidth, "new_tokens": config.max_new_tokens, "rest": rest, "rows": rows}
    print(render(result))
    if args.plot:
        plot(result, args.plot)
        lesson.log(f"[plot] chart written to {args.plot}")
    if args.json:
        lesson.write_json(result, args.json)
    return 0


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    lesson.quiet_libraries(debug=False)
    try:
        names, config = check_args(args, rest)
        return compare(names, rest, config, args)
    except KeyboardInterrupt:
        lesson.log("interrupted (Ctrl-C): no table was written.")
        return 130
    except (lesson.UsageError, lesson.RunFailure) as e:
        lesson.log(f"error: {e}")
        return 2 if isinstance(e, lesson.UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
