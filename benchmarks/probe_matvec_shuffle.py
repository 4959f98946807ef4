"""Usage (one GPU, repo root): python3 benchmarks/probe_matvec_shuffle.py --json $OUT/shuffle.json

Device probe (issue 25): extensions/kernel_4bit.py's matvec with its two table lookups, each with its absmax loaded
in the step that uses it and a step ahead (`_ahead`, SCALES_AHEAD), each autotuned over the matvec's own tilings at
the 7B shapes the fused loop runs: `gather` (tl.gather from the 16-entry table in shared memory: a shift, a mask and
an index scaled to a byte offset a code, then a shared-memory load) and `shuffle` (a warp shuffle from the lane whose
number is the code: a shift a code, no mask, no table in shared memory; benchmarks/inspect_kernel_4bit.py counts
them); and each of those four with the one-warp programs among the autotuner's tilings (`_1w`, ONE_WARP). Each is
timed as one CUDA graph cycling through 8 copies of the weights (so every call reads memory); before that, the forms'
outputs are compared bit for bit at one tiling (the same values in the same fused multiply-adds: they must be equal),
and both lookups' one-hot products against bitsandbytes' dequantize_4bit, column by column (nf4 and fp4, double
quantization on and off, fp16 and bf16), in programs of 4 warps and of one.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import triton  # noqa: E402
from extensions import kernel_4bit as K  # noqa: E402
from probe_kernel_4bit import graph_time  # noqa: E402

SHAPES = {"q/k/v fused": (12288, 4096), "gate/up fused": (22016, 4096), "o": (4096, 4096), "down": (4096, 11008)}


FORMS = {"gather": (False, False, False), "shuffle": (True, False, False), "gather_ahead": (False, True, False),
         "shuffle_ahead": (True, True, False)}   # (shuffle, scales_ahead, one_warp)
FORMS.update({name + "_1w": (shuffle, ahead, True) for name, (shuffle, ahead, _) in list(FORMS.items())})
ONE_WARP_TILING = [2, 16, 1 << 20, 1]     # a fixed one-warp tiling for the checks (the autotuner's are timed)


def run(xt, packed, args, n, nested, form, out_dtype=torch.float16, tiling=None):
    """The matvec (kernel_4bit.matvec_4bit) in the form given (FORMS), autotuned (its autotuner keys on the form too;
    a `_1w` form's autotuner times the one-warp programs too), or at tiling (rows, blocks of 64 codes a step[,
    programs, warps])."""
    return K.matvec_4bit(xt, packed, *args, n, nested, out_dtype, tiling, None, *FORMS[form])


def exact(report):
    """Every form against the gather form at the same tiling (random x; 3 programs of 4 warps, each taking several
    blocks, or programs of one warp) and both lookups against dequantize_4bit (one-hot x), in programs of 4 warps and
    of one (Triton lowers a one-warp program's layout conversions and tl.gather to warp shuffles)."""
    import bitsandbytes.functional as F
    torch.manual_seed(0)
    for quant in ("nf4", "fp4"):
        for nested in (True, False):
            for dtype in (torch.float16, torch.bfloat16):
                n, k = 384, 4096 + 1024
                w = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
                packed, qs = F.quantize_4bit(w, blocksize=64, quant_type=quant, compress_statistics=nested)
                args, nested_ = K.state_args(qs)
                x = torch.randn(1, k, device="cuda", dtype=dtype)
                equal = []
                for tiling, forms in (([8, 16, 3], [f for f in FORMS if not f.endswith("_1w")]),
                                      (ONE_WARP_TILING, [f for f in FORMS if f.endswith("_1w")])):
                    a, *others = (run(K.code_major(x), packed, args, n, nested_, form, dtype, tiling)
                                  for form in forms)
                    equal += [bool(torch.equal(a, b)) for b in others]
                deq = F.dequantize_4bit(packed, qs)
                cols = list(range(0, k, 97))
                onehot = torch.zeros(len(cols), k, device="cuda", dtype=dtype)
                onehot[torch.arange(len(cols)), cols] = 1
                onehot_equal = []
                for form, tiling in (("shuffle", [8, 16]), ("gather_1w", ONE_WARP_TILING),
                                     ("shuffle_1w", ONE_WARP_TILING)):
                    got = torch.stack([run(K.code_major(onehot[i:i + 1]), packed, args, n, nested_, form, dtype,
                                           tiling)[0] for i in range(len(cols))], 1)
                    onehot_equal.append(bool(torch.equal(got, deq[:, cols])))
                case = dict(quant=quant, nested=nested, dtype=str(dtype), forms_equal_gather=all(equal),
                            onehot_equals_dequantize=all(onehot_equal))
                report["exact"].append(case)
                print(case, flush=True)
    return all(c["forms_equal_gather"] and c["onehot_equals_dequantize"] for c in report["exact"])


def main() -> int:
    import bitsandbytes.functional as F
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "exact": [], "shapes": []}
    ok = exact(report)
    json.dump(report, open(args.json, "w"), indent=1)
    if not ok:
        print("a form is not exact: none timed")
        return 1
    for name, (n, k) in SHAPES.items():
        copies = []
        for _ in range(8):
            w = (torch.randn(n, k, device="cuda") * 0.02).half()
            packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            copies.append((packed, K.state_args(qs)[0]))
        xt = K.code_major(torch.randn(1, k, device="cuda", dtype=torch.float16))
        row = {"shape": name, "n": n, "k": k}
        for label in FORMS:
            t = graph_time([lambda c=c: run(xt, c[0], c[1], n, True, label) for c in copies])
            row[label + "_us"] = t * 1e6
            row[label + "_config"] = str((K.MATVEC_ONE_WARP if FORMS[label][2] else K.MATVEC).best_config)
            row[label + "_GBps"] = (copies[0][0].numel() + copies[0][1][0].numel()) / t / 1e9
        print(f"{name}: " + ", ".join(f"{label} {row[label + '_us']:.1f} us ({row[label + '_GBps']:.0f} GB/s)"
                                      for label in FORMS), flush=True)
        report["shapes"].append(row)
        json.dump(report, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
