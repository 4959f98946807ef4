"""Usage (one GPU, repo root, after the device prefix of benchmarks/README.md):
    python benchmarks/probe_kernel_4bit.py --json $OUT/kernel-4bit.json          # ~3-5 min (kernel compiles)

Device probe (issue 25): extensions/kernel_4bit.py's 4-bit matmul, one linear at a time, at Llama-2-7B's shapes.
  exact    the kernel's dequantized weight (kernel_4bit.dequantize_state) against bitsandbytes' dequantize_4bit on the
           GPU, bit for bit: nf4 and fp4, double quant on and off, fp16 and bf16, 7B shapes and two odd ones (a row of
           576, a block count that is not a multiple of 256); q/k/v of a 7B layer fused (Int4WeightOnly.concatenate,
           one offset a row), its dequantization and its matvec (one-hot rows of x).
  time     the kernel as the model calls it (the custom op, autotuned; one row: x laid out by code_major() once,
           timed apart), bitsandbytes' matmul_4bit (what Linear4bit runs) and the fp16 matmul of the same weight
           (16 rows: the tensor-core form autotuned, and at six tilings, K split or not), x in --dtypes (fp16 and
           bf16), 1 and 16 rows: CUDA graphs of 24 calls cycling through 8 copies of the weights (more than L2
           holds: every call reads memory), median of 5 replays; the kernel's weight bytes / time as GB/s; its
           output against x @ W^T in fp32; the tilings the autotuners picked; one row also launched without PDL
           (not as a programmatic dependent launch), and with each call letting the next launch once past its wait
           (kernel_4bit.TRIGGER_EARLY; its output equal to the default's first).
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008),
          "q/k/v fused": (12288, 4096), "gate/up fused": (22016, 4096)}   # fast_decode.py's loop runs the fused
ODD = {"row 576": (96, 576), "blocks % 256": (100, 640)}


def graph_time(fns, calls=24, replays=5):
    """Seconds a call: one CUDA graph of `calls` calls cycling through `fns` (each on its own copy of the weights),
    replayed; median over replays."""
    import torch
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def main() -> int:
    import torch
    import triton
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from extensions import kernel_4bit as K
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="kernel-4bit.json")
    parser.add_argument("--dtypes", default="fp16,bf16", help="the dtypes of x timed (the JSON is written after each "
                        "shape, so a run cut short keeps what it timed)")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "bitsandbytes": bnb.__version__, "exact": {}, "time": {}}
    for name, (n, k) in {**SHAPES, **ODD}.items():
        for qt in ("nf4", "fp4"):
            for dq in (True, False):
                for dtype in (torch.float16, torch.bfloat16):
                    w = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
                    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq)
                    ref = F.dequantize_4bit(packed, qs)
                    mine = K.dequantize_state(packed, qs)
                    key = f"{name} {qt} dq={dq} {str(dtype)[6:]}"
                    result["exact"][key] = {"equal": bool(torch.equal(mine, ref)),
                                            "differ": int((mine != ref).sum())}
    # q, k and v of one 7B layer fused (Int4WeightOnly.concatenate): each part's own offset, read per row
    from extensions.quantized_matmul import weight_only_4bit_class
    for dtype in (torch.float16, torch.bfloat16):
        layers = [F.quantize_4bit((torch.randn(4096, 4096, device="cuda") * s).to(dtype), blocksize=64,
                                  compress_statistics=True) for s in (0.02, 0.05, 0.01)]
        fused = weight_only_4bit_class().concatenate([weight_only_4bit_class().from_state(*layer) for layer in layers])
        want = torch.cat([F.dequantize_4bit(*layer) for layer in layers])
        x = torch.eye(4096, device="cuda", dtype=dtype)[[0, 1, 2, 3, 4, 5, 6, 7, 4095]]
        one_row = torch.cat([fused(row[None]) for row in x])                  # the matvec, column by column
        result["exact"][f"q/k/v fused {str(dtype)[6:]}"] = {
            "equal": bool(torch.equal(fused.dequantized(), want))
            and bool(torch.equal(one_row, want[:, x.argmax(1)].t())),
            "differ": int((fused.dequantized() != want).sum())}
    bad = [k for k, v in result["exact"].items() if not v["equal"]]
    print(f"exact: {len(result['exact']) - len(bad)}/{len(result['exact'])} equal; differ: {bad}", flush=True)
    for name, (n, k) in SHAPES.items():
        copies = []          # 8 copies of the weights (more than L2 holds): each call reads from memory
        for _ in range(8):
            w = (torch.randn(n, k, device="cuda") * 0.02).half()
            packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            copies.append((packed, qs, F.dequantize_4bit(packed, qs),
                           bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, bnb_quantized=True)))
        nbytes = copies[0][0].numel() + copies[0][1].absmax.numel() + copies[0][1].state2.absmax.numel() * 4
        rows = {}
        for m in (1, 16):
            for dtype in [{"fp16": torch.float16, "bf16": torch.bfloat16}[d] for d in args.dtypes.split(",")]:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                states = {id(c): K.state_args(c[1]) for c in copies}    # the per-row offsets made before capture
                xt = K.code_major(x) if m == 1 else None
                def ours(c):
                    (absmax, absmax2, code2, code, offset), nested = states[id(c)]
                    if m == 1:       # x laid out for the matvec once (a compiled step writes it from x's kernel)
                        return K.matvec_4bit(xt, c[0], absmax, absmax2, code2, code, offset, n, nested, x.dtype)
                    return K.matmul_4bit(x, c[0], absmax, absmax2, code2, code, offset, n, nested, c[1].dtype)
                exact = x.float() @ copies[0][2].float().t()
                err = float((ours(copies[0]).float() - exact).norm() / exact.norm())
                label = f"m={m} {str(dtype)[6:]}"
                rows[f"ours {label}"] = graph_time([lambda c=c: ours(c) for c in copies])
                if m == 1:
                    rows[f"code_major {label}"] = graph_time([lambda: K.code_major(x) for _ in range(4)])
                    def no_pdl(c):       # the same tiling, not a programmatic dependent launch
                        (absmax, absmax2, code2, code, offset), nested = states[id(c)]
                        return K.matvec_4bit(xt, c[0], absmax, absmax2, code2, code, offset, n, nested, x.dtype,
                                             None, False)
                    rows[f"ours no PDL {label}"] = graph_time([lambda c=c: no_pdl(c) for c in copies])
                    print(f"{name} {label}: without PDL {rows[f'ours no PDL {label}'] * 1e6:.1f} us", flush=True)
                    def trigger(c):      # the same tiling, the next call launched once this one passed its wait
                        (absmax, absmax2, code2, code, offset), nested = states[id(c)]
                        return K.matvec_4bit(xt, c[0], absmax, absmax2, code2, code, offset, n, nested, x.dtype,
                                             trigger=True)
                    assert torch.equal(trigger(copies[0]), ours(copies[0])), "TRIGGER changed the matvec's output"
                    rows[f"ours trigger {label}"] = graph_time([lambda c=c: trigger(c) for c in copies])
                    print(f"{name} {label}: the next launched early {rows[f'ours trigger {label}'] * 1e6:.1f} us",
                          flush=True)
                rows[f"bnb matmul_4bit {label}"] = graph_time([lambda c=c: bnb.matmul_4bit(x, c[3].t(),
                                                                                           quant_state=c[1])
                                                              for c in copies])
                rows[f"fp16 F.linear {label}"] = graph_time([lambda c=c: torch.nn.functional.linear(x, c[2].to(dtype))
                                                            for c in copies[:3]])
                for tiling in ([32, 4], [64, 2, 1], [32, 4, 0, 2], [32, 4, 0, 4], [64, 2, 1, 2], [64, 2, 1, 4]) \
                        if m > 1 else ():   # tensor cores (BLOCK_N, BLOCKS, W first, K split)
                    def dot(c, tiling=tiling):
                        (absmax, absmax2, code2, code, offset), nested = states[id(c)]
                        return K.matmul_4bit(x, c[0], absmax, absmax2, code2, code, offset, n, nested, c[1].dtype,
                                             tiling)
                    key = (f"ours tensor-core {tiling[0]}x{tiling[1]}{' W first' * bool(tiling[2:] and tiling[2])}"
                           f"{f' split {tiling[3]}' if tiling[3:] else ''} {label}")
                    err = float((dot(copies[0]).float() - exact).norm() / exact.norm())
                    rows[key] = graph_time([lambda c=c: dot(c) for c in copies])
                    print(f"{name} {key}: {rows[key] * 1e6:.1f} us (rel err {err:.1e})", flush=True)
                print(f"{name} {label}: ours {rows[f'ours {label}'] * 1e6:.1f} us "
                      f"({nbytes / rows[f'ours {label}'] / 1e9:.0f} GB/s, rel err {err:.1e}), bnb "
                      f"{rows[f'bnb matmul_4bit {label}'] * 1e6:.1f} us, "
                      f"fp16 {rows[f'fp16 F.linear {label}'] * 1e6:.1f} us", flush=True)
        best = {str(key): str(config) for tuner in (K.MATVEC, K.MATMUL) for key, config in tuner.cache.items()}
        result["time"][name] = {"shape": [n, k], "weight_bytes": nbytes, "seconds": rows, "tilings": best}
        print(f"{name} autotuned: {best}", flush=True)
        json.dump(result, open(args.json, "w"), indent=1)
        del copies
        torch.cuda.empty_cache()
    json.dump(result, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
