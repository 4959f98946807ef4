"""Usage (no GPU needed): python benchmarks/inspect_kernel_4bit.py [--arch 90] [--json inspect.json]

What a 4-bit matvec costs in instructions, read from the machine code Triton makes for an H100 (sm_90), on any
machine: Triton compiles a kernel for a target without a GPU, and its wheel ships NVIDIA's ptxas and cuobjdump. For
each kernel and tiling this prints the registers a thread takes (they bound how many programs share an SM), the
shared memory, and the instructions of the loop over K with the codes a thread handles a step: instructions a code
(for the tensor-core matmul: a code of W, multiplied by 16 rows of x),
and the most frequent ones (LDS: a shared-memory load, the table lookup by tl.gather; LDG: a global load; BAR: a
barrier; SHFL: a shuffle between threads, the table lookup by warp shuffle). The kernels: extensions/kernel_4bit.py's
matvec with each of its two table lookups (its SHUFFLE_ON_GPU picks the GPU's; Triton's interpreter runs tl.gather's),
each with its absmax loaded in the step that uses it and a step ahead (SCALES_AHEAD), in programs of 2-8 warps and of
one (ONE_WARP), and its tensor-core matmul (the tilings their autotuners try), and two former forms of the matvec
(probe_kernel_4bit_variants.py's `prefetch`, the table in global memory and each weight rounded; its `smem`, x a
vector broadcast over the rows: through shared memory, with barriers). Integer arguments are taken divisible by 16
and pointers 16-byte aligned, as Triton specializes them at the 7B shapes.

It also counts the loop's instructions that run on the integer pipe (ALU: shifts, logic, LEA, IADD3, PRMT,
compares; IMAD runs on the FP32 pipe): on sm_90 that pipe takes 16 threads a cycle, half a warp, where the FP32 pipe
takes a whole warp, so its instructions a code bound how fast the SMs can unpack the codes whatever the memory does.

This counts instructions, not time: a kernel that issues few instructions a code can still wait on memory (the GPU
probes, probe_kernel_4bit.py and probe_kernel_4bit_variants.py, time them). benchmarks/README.md has the counts of
the day next to those times.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extensions import kernel_4bit  # noqa: E402
import probe_kernel_4bit_variants as variants  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(fn, signature: dict, constants: dict, warps: int, arch: int, divisible: tuple, maxnreg=None,
                   stages: int = 1):
    """fn compiled for sm_<arch> (maxnreg: at most that many registers a thread; stages: Triton's num_stages, its
    pipeline of the loads feeding a dot): (SASS text, the resource line of cuobjdump, PTX text, TTGIR text)."""
    names = list(fn.arg_names)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, t in signature.items()
             if t.startswith("*") or k in divisible}
    sig = dict(signature, **{k: "constexpr" for k in constants})
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=False,
                                           **({"maxnreg": maxnreg} if maxnreg else {})))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
    return sass, usage, compiled.asm["ptx"], compiled.asm["ttgir"]


# The opcodes sm_90 issues to its integer pipe (Nsight Compute's "alu"); a warp's instruction occupies it 2 cycles.
ALU = {"LOP3", "SHF", "LEA", "IADD3", "PRMT", "ISETP", "SEL", "IMNMX", "PLOP3", "IABS", "POPC", "FLO", "BMSK", "SGXT"}


def shuffles_read_own_lane(ttgir: str):
    """For the shuffle lookup: does every warp shuffle read its table from a scalar splat over the tensor (each
    thread's own register, its lane's entry)? None without shuffles. False: a tensor operand, which Triton may have
    built in another layout and moved between threads (a layout conversion: then a lane holds another lane's entry,
    and the lookup is wrong; Triton 3.6 did so with a tensor-valued table)."""
    tables = re.findall(r'tt\.elementwise_inline_asm "shfl\.sync\.idx[^"]*"[^%]*(%[\w.]+),', ttgir)
    splats = set(re.findall(r"(%[\w.]+) = tt\.splat %[\w.]+ : i32 ->", ttgir))
    return all(t in splats for t in tables) if tables else None


def loop_of(sass: str):
    """The instructions of the main loop as their opcodes: of the innermost loops (a backward branch's range holding
    no other), the longest (the matvec's steps; a persistent program's loop over its blocks holds it)."""
    lines = re.findall(r"/\*([0-9a-f]{4,5})\*/\s+(.*?);", sass)
    loops = []
    for addr, ins in lines:
        m = re.match(r"(?:@!?U?P\w+\s+)?BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < int(addr, 16):
            loops.append((int(m.group(1), 16), int(addr, 16)))
    inner = [(a, b) for a, b in loops if not any((a, b) != (c, d) and a <= c and d <= b for c, d in loops)]
    body = max(([i for x, i in lines if a <= int(x, 16) <= b] for a, b in inner), key=len, default=[])
    return [re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for i in body]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90, help="the target's compute capability x 10 (90: H100/H200)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    common = dict(w_ptr="*i32", absmax_ptr="*u8", absmax2_ptr="*fp32", code2_ptr="*fp32", code_ptr="*fp32")
    cases = []
    # kernel_4bit.SHUFFLE_ON_GPU's two lookups, each with the absmax loaded in its step and a step ahead (SCALES_AHEAD)
    for ahead, shuffle, lookup in [(a, s, name) for a in (False, True)
                                   for s, name in ((False, "tl.gather"), (True, "warp shuffle"))]:
        for n, words, warps, regs, per_sm in [(c.kwargs["BLOCK_N"], c.kwargs["WORDS"], c.num_warps, c.maxnreg,
                                               c.kwargs["PER_SM"])    # what its autotuners try (ONE_WARP: all)
                                              for c in kernel_4bit.MATVEC_ONE_WARP.configs]:
            cases.append((f"matvec (kernel_4bit.py){', absmax a step ahead' if ahead else ''}, lookup by {lookup}"
                          + (" (the GPU's)" if (shuffle, ahead, warps > 1 or kernel_4bit.ONE_WARP)
                             == (kernel_4bit.SHUFFLE_ON_GPU, kernel_4bit.SCALES_AHEAD, True) else ""),
                          f"BLOCK_N={n} WORDS={words} warps={warps}" + (f" maxnreg={regs}" if regs else "")
                          + (f" per_sm={per_sm}" if per_sm else ""),
                          kernel_4bit.matvec,
                          dict(x_ptr="*fp32", **common, out_ptr="*fp16", offset_ptr="*fp32", N="i32", KW="i32",
                               KB="i32"),
                          dict(NESTED=True, BLOCK_N=n, WORDS=words, PER_SM=per_sm, PDL=True, XW=512,  # the 7B's x
                               SHUFFLE=shuffle, SCALES_AHEAD=ahead, TRIGGER=kernel_4bit.TRIGGER_EARLY), warps,
                          n * words * 8 // (32 * warps),
                          ("N", "KW"), regs))
    # kernel_4bit.TRIGGER_EARLY: the matvec lets the kernel after it launch once it has passed its own gdc_wait()
    cases.append(("matvec, kernel after it launched early (TRIGGER)", "BLOCK_N=2 WORDS=128 warps=1", kernel_4bit.matvec,
                  dict(x_ptr="*fp32", **common, out_ptr="*fp16", offset_ptr="*fp32", N="i32", KW="i32", KB="i32"),
                  dict(NESTED=True, BLOCK_N=2, WORDS=128, PER_SM=0, PDL=True, XW=512, SHUFFLE=False, SCALES_AHEAD=True,
                       TRIGGER=True), 1, 2 * 128 * 8 // 32, ("N", "KW"), None))
    for n, words, warps in [(16, 128, 4), (8, 128, 4)]:
        cases.append(("former smem matvec (variants' smem)", f"BLOCK_N={n} WORDS={words} warps={warps}",
                      variants.matvec_smem,
                      dict(x_ptr="*fp16", **common, out_ptr="*fp32", offset="fp32", N="i32", KW="i32", KB="i32",
                           KSPLIT="i32"),
                      dict(BLOCK_N=n, WORDS=words, EVEN=True, DEPTH=1, SPLIT=False, LOADONLY=False), warps,
                      n * words * 8 // (32 * warps), ("N", "KW"), None))
    for n, words, first, warps, split, stages in [(c.kwargs["BLOCK_N"], c.kwargs["WORDS"], c.kwargs["W_FIRST"],
                                                  c.num_warps, c.kwargs["SPLIT"], c.num_stages)
                                                 for c in kernel_4bit.MATMUL.configs]:
        cases.append(("tensor-core matmul (16 rows of x)", f"BLOCK_N={n} WORDS={words} W_FIRST={first} warps={warps}"
                      + (f" split={split}" if split > 1 else "") + f" num_stages={stages}", kernel_4bit.matmul,
                      dict(x_ptr="*fp16", **common, out_ptr="*fp16", offset_ptr="*fp32", part_ptr="*fp32", M="i32",
                           N="i32", KW="i32", KB="i32"),
                      dict(NESTED=True, W_DTYPE=tl.float16, BLOCK_N=n, WORDS=words, W_FIRST=first, SPLIT=split),
                      warps,
                      n * words * 8 // (32 * warps), ("N", "KW"), None, stages))
    for n, blocks, warps in [(8, 8, 4), (4, 4, 4)]:
        cases.append(("former matvec (variants' prefetch)", f"BLOCK_N={n} BLOCKS={blocks} warps={warps}",
                      variants.matvec,
                      dict(x_ptr="*fp16", **common, out_ptr="*fp32", offset="fp32", N="i32", K="i32", KSPLIT="i32"),
                      dict(PREFETCH=True, LOOKUP=1, SPLIT=False, BLOCK_N=n, BLOCKS=blocks), warps,
                      n * blocks * 64 // (32 * warps), ("N", "K"), None))
    rows = []
    for kernel, tiling, fn, signature, constants, warps, codes, divisible, regs, *stages in cases:
        sass, usage, ptx, ttgir = compile_kernel(fn, signature, constants, warps, args.arch, divisible, regs, *stages)
        loop = loop_of(sass)
        regs = int(re.search(r"REG:(\d+)", usage).group(1))
        shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
        top = collections.Counter(loop).most_common(8)
        rows.append(dict(kernel=kernel, tiling=tiling, registers=regs, shared_bytes=shared, loop_instructions=len(loop),
                         codes_per_thread_step=codes, instructions_per_code=round(len(loop) / codes, 2),
                         barriers=loop.count("BAR"), spills=loop.count("LDL") + loop.count("STL"),
                         waits_for_prior_kernel="griddepcontrol.wait" in ptx,     # PDL: the matvec's gdc_wait()
                         # and its gdc_launch_dependents() after that wait (TRIGGER), or none
                         launches_next_after_wait=ptx.find("griddepcontrol.launch_dependents")
                         > ptx.find("griddepcontrol.wait") >= 0,
                         launches_next="griddepcontrol.launch_dependents" in ptx,
                         async_copies=loop.count("LDGSTS"),        # Triton's pipeline: global -> shared, no registers
                         alu_per_code=round(sum(i in ALU for i in loop) / codes, 2),
                         shared_loads_per_code=round(loop.count("LDS") / codes, 2),
                         shuffles_per_code=round(loop.count("SHFL") / codes, 2),
                         shuffles_read_own_lane=shuffles_read_own_lane(ttgir), most_frequent=dict(top)))
        print(f"{kernel:36s} {tiling:30s} {regs:3d} registers, loop {len(loop):4d} instructions for {codes:3d} codes "
              f"a thread: {len(loop) / codes:5.2f} a code ({rows[-1]['alu_per_code']:4.2f} ALU); "
              f"{', '.join(f'{k} {v}' for k, v in top)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=f"sm_{args.arch}", triton=triton.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
