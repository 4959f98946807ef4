"""Usage (one GPU, repo root, under Nsight Compute; benchmarks/README.md has the whole command):
    ncu --clock-control none --profile-from-start off --section WarpStateStats ... \
        python3 benchmarks/probe_matvec_ncu.py --cases "gate/up fused:gather" "down:gather"

Device probe (issue 25): where extensions/kernel_4bit.py's matvec spends its time, read from the GPU's counters (warp
stall reasons, bytes in flight, occupancy, issue slots) rather than guessed from instruction counts. Each case (a 7B
shape of probe_matvec_shuffle.SHAPES and one of its FORMS) is autotuned first, outside the profiled range, then run
once inside it (cudaProfilerStart/Stop), so that the profiler sees one launch a case, in the order given, at the
tiling the decoder runs. Its weights are random nf4 with double quantization, as the 7B model's.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from extensions import kernel_4bit as K  # noqa: E402
from probe_matvec_shuffle import FORMS, SHAPES, run  # noqa: E402


def main() -> int:
    import bitsandbytes.functional as F
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["gate/up fused:gather", "down:gather"],
                        help="SHAPE:FORM, SHAPE one of %s, FORM one of %s" % (list(SHAPES), list(FORMS)))
    args = parser.parse_args()
    calls = []
    for case in args.cases:
        shape, _, form = case.rpartition(":")
        if shape not in SHAPES or form not in FORMS:
            parser.error(f"unknown case {case!r}: SHAPE:FORM, SHAPE in {list(SHAPES)}, FORM in {list(FORMS)}")
        n, k = SHAPES[shape]
        torch.manual_seed(0)
        packed, qs = F.quantize_4bit((torch.randn(n, k, device="cuda") * 0.02).half(), blocksize=64,
                                     quant_type="nf4", compress_statistics=True)
        state, nested = K.state_args(qs)
        xt = K.code_major(torch.randn(1, k, device="cuda", dtype=torch.float16))
        for _ in range(3):                                     # the autotuner's pick, then warm
            run(xt, packed, state, n, nested, form)
        tuner = K.MATVEC_ONE_WARP if FORMS[form][2] else K.MATVEC
        print(f"case {len(calls)}: {case} ({n} x {k}), tiling {tuner.best_config}", flush=True)
        calls.append(lambda xt=xt, packed=packed, state=state, n=n, nested=nested, form=form:
                     run(xt, packed, state, n, nested, form))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
