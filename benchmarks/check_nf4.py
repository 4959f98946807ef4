"""Usage (a GPU; on a CPU the shapes are cut by 8 unless --full): python benchmarks/check_nf4.py  # $OUT/nf4-check.json

Device check (issue 11): does extensions/tensor_parallel.py's 4-bit linear (--quant 4bit) hold and compute what the
lesson's 4-bit linear does, at Llama-2-7B's and Llama-2-70B's matrix shapes?

tensor_parallel.py --quant 4bit (then tp_quant.py) at tp 1 once matched the lesson's 4-bit 70B model within tolerance only, where the 7B one matched exactly.
This compares one linear at a time on the GPU: the lesson's side quantizes as transformers does (bitsandbytes'
Params4bit, nf4 + double quant, moved to the GPU), tensor_parallel.py's side is nf4_shard() at tp 1. For each shape it prints
whether the packed codes, the block scales (the lesson's dequantized from its nested state), the dequantized weight,
and the 4-bit matmul of 1 and 12 rows (bitsandbytes' gemv and gemm paths) are bit-equal, and the largest difference
where not; and whether the same 12-row matmul, run twice, gives the same bits. It showed the cause: with fp32 block
scales bitsandbytes' 12-row matmul gives other bits at 8192-wide outputs than with the lesson's nested 8-bit ones, so
nf4_shard() now keeps the nested state at tp 1 (results: benchmarks/README.md).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from extensions.tensor_parallel import BLOCK, nf4_shard  # noqa: E402

SHAPES = {"7B q/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008),
          "70B k/v": (1024, 8192), "70B q/o": (8192, 8192), "70B gate/up": (28672, 8192), "70B down": (8192, 28672)}


def diff(a, b) -> dict:
    import torch
    a, b = a.float(), b.float()
    return {"equal": bool(torch.equal(a, b)), "max_abs": float((a - b).abs().max())}


def main() -> int:
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = "--small" in sys.argv or (device == "cpu" and "--full" not in sys.argv)
    torch.manual_seed(0)
    rows = {}
    for name, (out, inp) in SHAPES.items():
        if small:
            out, inp = out // 8, inp // 8
        w = (torch.randn(out, inp, device=device) * 0.02).half()       # as a preset draws, in fp16
        ref = bnb.nn.Params4bit(w.cpu(), requires_grad=False, blocksize=BLOCK, compress_statistics=True,
                                quant_type="nf4").to(device)                # as transformers quantizes a checkpoint
        packed, state = nf4_shard(w, lambda t: [t], 0, False)
        rs = ref.quant_state
        def scales(st):                                  # a state's fp32 block scales (nested: dequantized first)
            return F.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.nested else st.absmax
        x1 = torch.randn(1, 1, inp, device=device, dtype=torch.bfloat16)   # bf16: the lesson's compute dtype
        x12 = torch.randn(1, 12, inp, device=device, dtype=torch.bfloat16)
        cand = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCK,
                                 compress_statistics=False, quant_type="nf4", bnb_quantized=True)
        rows[name] = {
            "shape": [out, inp], "state_dtype": [str(rs.dtype), str(state.dtype)],
            "codes": diff(ref.data.view(torch.uint8), packed.view(torch.uint8)),
            "absmax": diff(scales(rs), scales(state)),
            "dequantized": diff(F.dequantize_4bit(ref.data, rs), F.dequantize_4bit(packed, state)),
            "matmul 1 row": diff(bnb.matmul_4bit(x1, ref.t(), quant_state=rs),
                                 bnb.matmul_4bit(x1, cand.t(), quant_state=state)),
            "matmul 12 rows": diff(bnb.matmul_4bit(x12, ref.t(), quant_state=rs),
                                   bnb.matmul_4bit(x12, cand.t(), quant_state=state)),
            # the lesson's own 12-row matmul twice: whether the GPU's matmul gives the same bits run to run
            "matmul 12 rows, the lesson's twice": diff(bnb.matmul_4bit(x12, ref.t(), quant_state=rs),
                                                       bnb.matmul_4bit(x12, ref.t(), quant_state=rs)),
            "fp16 matmul 12 rows twice": diff(x12.half() @ F.dequantize_4bit(ref.data, rs).t(),
                                              x12.half() @ F.dequantize_4bit(ref.data, rs).t()),
        }
        print(name, json.dumps(rows[name]), flush=True)
    os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    path = os.path.join(os.environ.get("OUT", "/tmp"), "nf4-check.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "small": small,
                   "torch": torch.__version__, "bitsandbytes": bnb.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
