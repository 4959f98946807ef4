"""Usage (one GPU): python benchmarks/probe_kernel_4bit_variants.py --json $OUT/variants.json     # ~2 min

Device probe (issue 25): where the time of a 4-bit matrix-vector kernel goes, at Llama-2-7B's shapes, nf4 + double
quant, fp16. Variants of extensions/kernel_4bit.py's matvec (one row of x), each timed as a CUDA graph of 24 calls
that cycle through 8 copies of the weights (more than the card's L2 cache, so every call reads from memory), beside
bitsandbytes' matmul_4bit and the fp16 matvec timed the same way; 16 rows: the tensor-core tile (dot16):
  prefetch           extensions/kernel_4bit.py's former matvec: a [rows, blocks, 8 words, 8 codes] tile, int32 words, a
                     table lookup each, each weight rounded to fp16 (exact), each step's loads issued one step ahead;
                     also tiles larger than its autotuner tried
  prefetch-gather    prefetch with the 16-entry table held in registers and read by tl.gather, not loaded per code
  prefetch-nolookup  prefetch without the table lookup (a linear code: not nf4; what the lookup costs)
  2d                 a form tried after it (slower: benchmarks/README.md): a [rows, words] tile, a word's codes taken
                     one shift at a time into the word's own sum, x read once per code position (strided)
  smem               the kernel's matvec now: a [rows, words] tile whose 8 codes a word are joined into one
                     tl.gather a step (Triton puts the 16-entry table in shared memory: a 32-bit address and one
                     shared load a code, where a load from the table in global memory costs a 64-bit address
                     each), products in fp32 with the table's value unrounded, each block's scale applied once to
                     the sum of its 64 products (not to each weight); compiled for sm_90 it is ~5 instructions a code
                     against the prefetch form's 33-39 (inspect_kernel_4bit.py counts them); also with the words of
                     two steps loaded ahead (depth=2), with K split over 2-8 programs that add their sums
                     atomically (split=), and its loads alone (loads-only: no lookup, no x; the tiling's floor)
  pair               a byte's two values from one 64-bit entry of a 256-entry table (pair_table(): one
                     shared load for two codes) and x loaded as a tile of the words' own shape (the smem form's x,
                     a vector broadcast over the rows, is moved through shared memory with two barriers a code
                     position); x as it is (fp16), in fp32, or in fp32 code-position-major (xt[j, w] = x[8 w + j],
                     one vector load for 4 words); also with K split over 2-4 programs
Each variant's output is compared with x @ W^T (W bitsandbytes' dequantized weight) in fp32.
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_kernel_4bit import graph_time  # noqa: E402   (the same timing as the kernel's probe)
from extensions import kernel_4bit  # noqa: E402

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
COPIES = 8


@triton.jit
def load_step(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, rows, row_ok, b0, kb_end, KB, BLOCKS: tl.constexpr):
    """One step's loads from memory: packed words [R, B, 8], 8-bit scales [R, B], their absmax [R, B], x [B, 8, 8]."""
    blocks = b0 + tl.arange(0, BLOCKS)
    block_ok = blocks < kb_end
    ok = row_ok[:, None] & block_ok[None, :]
    block = rows[:, None] * KB + blocks[None, :]
    q8 = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
    a2 = tl.load(absmax2_ptr + block // 256, mask=ok, other=0.0)
    packed = tl.load(w_ptr + block[:, :, None] * 8 + tl.arange(0, 8)[None, None, :], mask=ok[:, :, None], other=0)
    col = blocks[:, None, None] * 64 + tl.arange(0, 8)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    x = tl.load(x_ptr + col, mask=block_ok[:, None, None], other=0.0).to(tl.float32)
    return q8, a2, packed, x


@triton.jit
def matvec(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, offset, N, K, KSPLIT,
           PREFETCH: tl.constexpr, LOOKUP: tl.constexpr, SPLIT: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    KB = K // 64
    if SPLIT:
        kb_start = tl.program_id(1) * KSPLIT
        kb_end = tl.minimum(kb_start + KSPLIT, KB)
    else:
        kb_start = 0
        kb_end = KB
    shifts = tl.arange(0, 8)
    shifts = (shifts // 2) * 8 + 4 * (1 - shifts % 2)                                       # 4,0,12,8,20,16,...
    acc = tl.zeros((BLOCK_N, BLOCKS, 8, 8), dtype=tl.float32)
    q8n, a2n, packedn, xn = load_step(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, rows, row_ok, kb_start, kb_end, KB,
                                      BLOCKS)
    for b0 in range(kb_start, kb_end, BLOCKS):
        if PREFETCH:       # this step's values were loaded a step ago; start the next step's loads now
            q8, a2, packed, x = q8n, a2n, packedn, xn
            q8n, a2n, packedn, xn = load_step(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, rows, row_ok, b0 + BLOCKS,
                                              kb_end, KB, BLOCKS)
        else:
            q8, a2, packed, x = load_step(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, rows, row_ok, b0, kb_end, KB,
                                          BLOCKS)
        scale = tl.load(code2_ptr + q8) * a2
        scale = scale + offset
        codes = (packed[:, :, :, None] >> shifts[None, None, None, :]) & 15                 # [R, B, 8, 8]
        if LOOKUP == 1:    # a load from the 16-entry table (in memory, cached) for each code
            c = tl.load(code_ptr + codes)
        elif LOOKUP == 2:  # the table in registers, each code's entry taken by tl.gather
            table = tl.load(code_ptr + tl.arange(0, 16))
            c = tl.gather(table, codes.reshape(BLOCK_N * BLOCKS * 64), 0).reshape(BLOCK_N, BLOCKS, 8, 8)
        else:              # diagnostic: no table lookup (a linear code, not nf4)
            c = codes.to(tl.float32) * 0.125 - 1.0
        acc += (c * scale[:, :, None, None]).to(tl.float16).to(tl.float32) * x[None]
    total = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    if SPLIT:
        tl.atomic_add(out_ptr + rows, total, mask=row_ok)
    else:
        tl.store(out_ptr + rows, total, mask=row_ok)


@triton.jit
def matvec2d(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, offset, N, K,
             LOOKUP: tl.constexpr, ROUND: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    """The [rows, words] form of the matvec (one shift at a time, the next step's loads issued first), nested scales,
    fp16; LOOKUP=False: a linear code instead of the table (what the lookup costs);
    ROUND=False: each weight left in fp32 (what rounding it to fp16 costs)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    KW = K // 8
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    col = tl.arange(0, WORDS)
    ok = row_ok[:, None] & (col < KW)[None, :]
    word = rows[:, None] * KW + col[None, :]
    next_words = tl.load(w_ptr + word, mask=ok, other=0)
    next_absmax = tl.load(absmax_ptr + word // 8, mask=ok, other=0)
    for w0 in range(0, KW, WORDS):
        words, absmax, block, cur_ok = next_words, next_absmax, word // 8, ok
        word += WORDS
        ok = row_ok[:, None] & (col + w0 + WORDS < KW)[None, :]
        next_words = tl.load(w_ptr + word, mask=ok, other=0)
        next_absmax = tl.load(absmax_ptr + word // 8, mask=ok, other=0)
        scale = tl.load(code2_ptr + absmax.to(tl.int32)) * tl.load(absmax2_ptr + block // 256, mask=cur_ok, other=0.0)
        scale = scale + offset
        x_col = (w0 + col) * 8
        x_ok = w0 + col < KW
        for j in tl.static_range(8):
            codes = (words >> ((j // 2) * 8 + 4 * (1 - j % 2))) & 15
            if LOOKUP:
                c = tl.load(code_ptr + codes)
            else:
                c = codes.to(tl.float32) * 0.125 - 1.0
            weight = c * scale
            if ROUND:
                weight = weight.to(tl.float16).to(tl.float32)
            x = tl.load(x_ptr + x_col + j, mask=x_ok, other=0.0).to(tl.float32)
            acc += weight * x[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


@triton.jit
def pair_table(code_ptr):
    """The 256-entry table of a byte's two values: entry b holds code[b >> 4] (the byte's first code, its high nibble)
    in its low 32 bits and code[b & 15] in its high 32 bits (int64, fp32 bits), built from the 16-entry code."""
    b = tl.arange(0, 256)
    first = tl.load(code_ptr + (b >> 4)).to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    second = tl.load(code_ptr + (b & 15)).to(tl.int32, bitcast=True).to(tl.int64)
    return first | (second << 32)


@triton.jit
def pair_values(table, words):
    """pair_table()'s entries of the 4 bytes of each word of `words` [R, W] in one tl.gather (one 64-bit shared load
    a byte: two codes' values), as 4 tensors [R, W] (int64), the n-th holding each word's byte n (codes 2n, 2n+1)."""
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    b = tl.join(tl.join(words & 255, (words >> 8) & 255), tl.join((words >> 16) & 255, (words >> 24) & 255))
    v01, v23 = tl.split(tl.gather(table, b.reshape(R * W * 4), 0).reshape(R, W, 2, 2))
    p0, p1 = tl.split(v01)
    p2, p3 = tl.split(v23)
    return p0, p1, p2, p3


@triton.jit
def pair_split(pair):
    """A pair_table() entry's two fp32 values: (the byte's first code's, its second's)."""
    return pair.to(tl.int32).to(tl.float32, bitcast=True), (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def matvec_smem(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, offset, N, KW, KB, KSPLIT,
                BLOCK_N: tl.constexpr, WORDS: tl.constexpr, EVEN: tl.constexpr, DEPTH: tl.constexpr,
                SPLIT: tl.constexpr, LOADONLY: tl.constexpr):
    """The smem form (module docstring): nested scales, fp32 sums; EVEN: KW is a multiple of WORDS (no masks on K);
    LOADONLY: the same loads, each word summed as a number (no lookup, no x): the floor that this tiling's loads set;
    DEPTH: steps whose words are loaded ahead (1 or 2); SPLIT: program_id(1) takes KSPLIT words of each row (a
    multiple of WORDS) and adds its sums into out (fp32 zeros) atomically, for more programs at a short K."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    table = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    col = tl.arange(0, WORDS)
    k_start = tl.program_id(1) * KSPLIT if SPLIT else 0
    k_end = tl.minimum(k_start + KSPLIT, KW) if SPLIT else KW
    wptr = w_ptr + rows[:, None] * KW + col[None, :]
    nxt = tl.load(wptr + k_start, mask=row_ok[:, None] & (k_start + col < k_end)[None, :], other=0)
    if DEPTH == 2:
        nxt2 = tl.load(wptr + k_start + WORDS, mask=row_ok[:, None] & (k_start + WORDS + col < k_end)[None, :],
                       other=0)
    for w0 in range(k_start, k_end, WORDS):
        words = nxt
        if DEPTH == 2:
            nxt = nxt2
            nxt2 = tl.load(wptr + w0 + 2 * WORDS, mask=row_ok[:, None] & (w0 + 2 * WORDS + col < k_end)[None, :],
                           other=0)
        else:
            nxt = tl.load(wptr + w0 + WORDS, mask=row_ok[:, None] & (w0 + WORDS + col < k_end)[None, :], other=0)
        if LOADONLY:
            p = words.to(tl.float32)
        else:
            values = kernel_4bit.word_values(table, words)       # the kernel's lookup
            p = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            xw = (w0 + col) * 8
            for j in tl.static_range(8):
                if EVEN:
                    x = tl.load(x_ptr + xw + j)
                else:
                    x = tl.load(x_ptr + xw + j, mask=w0 + col < KW, other=0.0)
                p += values[j] * x.to(tl.float32)[None, :]
        blocks = w0 // 8 + tl.arange(0, WORDS // 8)
        block = rows[:, None] * KB + blocks[None, :]
        bok = row_ok[:, None] & (blocks < KB)[None, :]
        q8 = tl.load(absmax_ptr + block, mask=bok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q8) * tl.load(absmax2_ptr + block // 256, mask=bok, other=0.0) + offset
        acc += p * tl.broadcast_to(scale[:, :, None], (BLOCK_N, WORDS // 8, 8)).reshape(BLOCK_N, WORDS)
    if SPLIT:
        tl.atomic_add(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)
    else:
        tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


@triton.jit
def matvec_pair(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, offset, N, KW, KB, KSPLIT,
                BLOCK_N: tl.constexpr, WORDS: tl.constexpr, XMODE: tl.constexpr, SPLIT: tl.constexpr,
                EVEN: tl.constexpr):
    """The pair form (module docstring): a byte's two values from one 64-bit entry of pair_table(); x
    loaded as a tile of the words' own shape (no conversion of layouts through shared memory): XMODE 0 x fp16 as it
    is, 1 x in fp32, 2 x in fp32 given code-position-major (xt[j, w] = x[8 w + j]); EVEN: KW a multiple of WORDS;
    SPLIT: program_id(1) takes KSPLIT words of each row and adds its sums into out atomically."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    table = pair_table(code_ptr)
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    col = tl.arange(0, WORDS)
    k_start = tl.program_id(1) * KSPLIT if SPLIT else 0
    k_end = tl.minimum(k_start + KSPLIT, KW) if SPLIT else KW
    wptr = w_ptr + rows[:, None] * KW + col[None, :]
    nxt = tl.load(wptr + k_start, mask=row_ok[:, None] & (k_start + col < k_end)[None, :], other=0)
    for w0 in range(k_start, k_end, WORDS):
        words = nxt
        nxt = tl.load(wptr + w0 + WORDS, mask=row_ok[:, None] & (w0 + WORDS + col < k_end)[None, :], other=0)
        pairs = pair_values(table, words)
        p = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        here = (w0 + col)[None, :] + rows[:, None] * 0              # the tile's shape: x loaded in its layout
        for j in tl.static_range(4):
            first, second = pair_split(pairs[j])
            at = x_ptr + (2 * j * KW + here if XMODE == 2 else here * 8 + 2 * j)
            step = KW if XMODE == 2 else 1
            if EVEN:
                xa = tl.load(at).to(tl.float32)
                xb = tl.load(at + step).to(tl.float32)
            else:
                xa = tl.load(at, mask=here < KW, other=0.0).to(tl.float32)
                xb = tl.load(at + step, mask=here < KW, other=0.0).to(tl.float32)
            p = tl.fma(first, xa, p)
            p = tl.fma(second, xb, p)
        blocks = w0 // 8 + tl.arange(0, WORDS // 8)
        block = rows[:, None] * KB + blocks[None, :]
        bok = row_ok[:, None] & (blocks < KB)[None, :]
        q8 = tl.load(absmax_ptr + block, mask=bok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q8) * tl.load(absmax2_ptr + block // 256, mask=bok, other=0.0) + offset
        acc = tl.fma(p, tl.broadcast_to(scale[:, :, None], (BLOCK_N, WORDS // 8, 8)).reshape(BLOCK_N, WORDS), acc)
    if SPLIT:
        tl.atomic_add(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)
    else:
        tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


@triton.jit
def matmul16(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, offset, M, N, K,
             BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
    """16 rows of x: the tile dequantized in K's natural order ([R, B*64] fp16), then tl.dot on the tensor cores."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    m = tl.arange(0, 16)
    KB = K // 64
    shifts = tl.arange(0, 8)
    shifts = (shifts // 2) * 8 + 4 * (1 - shifts % 2)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, KB, BLOCKS):
        q8, a2, packed, _ = load_step(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, rows, row_ok, b0, KB, KB, BLOCKS)
        scale = tl.load(code2_ptr + q8) * a2
        scale = scale + offset
        codes = (packed[:, :, :, None] >> shifts[None, None, None, :]) & 15
        w = (tl.load(code_ptr + codes) * scale[:, :, None, None]).to(tl.float16).reshape(BLOCK_N, BLOCKS * 64)
        col = b0 * 64 + tl.arange(0, BLOCKS * 64)
        x = tl.load(x_ptr + m[:, None] * K + col[None, :], mask=(m < M)[:, None] & (col < K)[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(out_ptr + m[:, None] * N + rows[None, :], acc, mask=(m < M)[:, None] & row_ok[None, :])


def time_variant(name, label, call, outs, copies, x, nbytes, rows) -> None:
    """call(copy, out) once, its output against x @ W^T in fp32, then timed over the copies (graph_time): the row kept
    in rows[label] and printed; a variant that fails to compile or to run is printed and left out."""
    try:
        call(copies[0], outs[0])
        exact = x.float() @ copies[0][4].float().t()
        err = float((outs[0].float() - exact).norm() / exact.norm())
        seconds = graph_time([lambda c=c, o=o: call(c, o) for c, o in zip(copies, outs)])
        rows[label] = seconds
        print(f"{name} {label}: {seconds * 1e6:.1f} us, {nbytes / seconds / 1e9:.0f} GB/s, rel err {err:.1e}",
              flush=True)
    except Exception as e:
        print(f"{name} {label}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)


def main() -> int:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="variants.json")
    parser.add_argument("--only", default="prefetch,2d,smem,pair,kernel,dot16",
                        help="comma-separated groups to time: prefetch (its three variants), 2d, smem, pair, kernel, "
                        "dot16")
    args = parser.parse_args()
    torch.manual_seed(0)
    variants = {"prefetch": dict(PREFETCH=True, LOOKUP=1, SPLIT=False),
                "prefetch-gather": dict(PREFETCH=True, LOOKUP=2, SPLIT=False),
                "prefetch-nolookup": dict(PREFETCH=True, LOOKUP=0, SPLIT=False)}
    tilings = [(8, 8, 4), (4, 8, 4), (8, 16, 4), (16, 8, 8), (16, 16, 8), (8, 32, 8)]
    variants2d = {"2d": dict(LOOKUP=True, ROUND=True)}
    tilings2d = [(8, 64, 4), (4, 256, 4)]
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "bitsandbytes": bnb.__version__, "rows": {}}
    for name, (n, k) in SHAPES.items():
        copies = []
        for _ in range(COPIES):
            w = (torch.randn(n, k, device="cuda") * 0.02).half()
            packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            copies.append((w, packed, qs, float(qs.offset), F.dequantize_4bit(packed, qs),
                           torch.full((n,), float(qs.offset), device="cuda")))
        nbytes = copies[0][1].numel() + copies[0][2].absmax.numel() + copies[0][2].state2.absmax.numel() * 4
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        rows = {}
        rows["fp16 F.linear"] = graph_time([lambda w=c[4]: torch.nn.functional.linear(x, w) for c in copies[:4]])
        weights = [bnb.nn.Params4bit(c[1], requires_grad=False, quant_state=c[2], bnb_quantized=True) for c in copies]
        rows["bnb matmul_4bit"] = graph_time([lambda w=w, c=c: bnb.matmul_4bit(x, w.t(), quant_state=c[2])
                                              for w, c in zip(weights, copies)])
        for label in list(rows):
            print(f"{name} {label}: {rows[label] * 1e6:.1f} us", flush=True)
        for vname, flags in variants.items() if "prefetch" in args.only else ():
            for bn, blocks, warps in tilings:
                splits = 4 if flags["SPLIT"] else 1
                kb = k // 64
                ksplit = triton.cdiv(triton.cdiv(kb, splits), blocks) * blocks
                label = f"{vname} BLOCK_N={bn} BLOCKS={blocks} warps={warps}"
                outs = [torch.zeros(1, n, dtype=torch.float32, device="cuda") for _ in copies]
                def call(c, out):
                    if flags["SPLIT"]:
                        out.zero_()
                    pk = c[1].view(-1).view(torch.int32)
                    matvec[(triton.cdiv(n, bn), triton.cdiv(kb, ksplit))](
                        x, pk, c[2].absmax, c[2].state2.absmax, c[2].state2.code, c[2].code, out, c[3], n, k,
                        ksplit, **flags, BLOCK_N=bn, BLOCKS=blocks, num_warps=warps, num_stages=2,
                        enable_fp_fusion=False)
                time_variant(name, label, call, outs, copies, x, nbytes, rows)
        for vname, flags in variants2d.items() if "2d" in args.only else {}.items():
            for bn, nwords, warps in tilings2d:
                label = f"{vname} BLOCK_N={bn} WORDS={nwords} warps={warps}"
                outs = [torch.zeros(1, n, dtype=torch.float32, device="cuda") for _ in copies]
                def call2d(c, out):
                    matvec2d[(triton.cdiv(n, bn),)](
                        x, c[1].view(-1).view(torch.int32), c[2].absmax, c[2].state2.absmax, c[2].state2.code,
                        c[2].code, out, c[3], n, k, **flags, BLOCK_N=bn, WORDS=nwords, num_warps=warps,
                        num_stages=1, enable_fp_fusion=False)
                time_variant(name, label, call2d, outs, copies, x, nbytes, rows)
        smem_tilings = [(16, 128, 4, 1, 1, False), (8, 128, 4, 1, 1, False), (8, 256, 8, 1, 1, False),
                        (16, 32, 4, 1, 1, False)]
        # deeper prefetch, and K split over 2-4 programs (short rows: more programs, more loads in flight)
        smem_tilings += [(16, 128, 4, 2, 1, False), (16, 128, 4, 1, 4, False), (8, 64, 4, 1, 4, False)]
        # the loads alone (no lookup, no x): what the tiling's reads cost without the arithmetic
        smem_tilings += [(16, 128, 4, 1, 1, True), (8, 128, 4, 1, 1, True), (16, 128, 4, 1, 4, True),
                         (8, 64, 4, 1, 4, True)]
        for bn, nwords, warps, depth, splits, loadonly in smem_tilings if "smem" in args.only else ():
            label = f"smem BLOCK_N={bn} WORDS={nwords} warps={warps}" + (f" depth={depth}" if depth > 1 else "") + \
                (f" split={splits}" if splits > 1 else "") + (" loads-only" if loadonly else "")
            ksplit = triton.cdiv(triton.cdiv(k // 8, splits), nwords) * nwords
            outs = [torch.zeros(1, n, dtype=torch.float32, device="cuda") for _ in copies]
            def call_smem(c, out):
                if splits > 1:
                    out.zero_()
                matvec_smem[(triton.cdiv(n, bn), triton.cdiv(k // 8, ksplit))](
                    x, c[1].view(-1).view(torch.int32), c[2].absmax, c[2].state2.absmax, c[2].state2.code,
                    c[2].code, out, c[3], n, k // 8, k // 64, ksplit, BLOCK_N=bn, WORDS=nwords,
                    EVEN=(k // 8) % nwords == 0, DEPTH=depth, SPLIT=splits > 1, LOADONLY=loadonly,
                    num_warps=warps, num_stages=1)
            time_variant(name, label, call_smem, outs, copies, x, nbytes, rows)
        xt = kernel_4bit.code_major(x)
        for bn, nwords, warps in [(16, 128, 4), (8, 128, 4), (8, 256, 8), (4, 128, 2), (16, 64, 4), (32, 128, 8),
                                  (16, 256, 8), (32, 64, 4), (8, 64, 2)] if "kernel" in args.only else ():
            label = f"kernel BLOCK_N={bn} WORDS={nwords} warps={warps}"
            outs = [torch.zeros(1, n, dtype=torch.float16, device="cuda") for _ in copies]
            def call_kernel(c, out):
                kernel_4bit.matvec[(triton.cdiv(n, bn),)](
                    xt, c[1].view(-1).view(torch.int32), c[2].absmax, c[2].state2.absmax, c[2].state2.code,
                    c[2].code, out, c[5], n, k // 8, k // 64, xt.shape[1], NESTED=True, BLOCK_N=bn,
                    WORDS=nwords, num_warps=warps, num_stages=1, enable_fp_fusion=False)
            time_variant(name, label, call_kernel, outs, copies, x, nbytes, rows)
        xs = {0: x, 1: x.float(), 2: x.float().reshape(k // 8, 8).t().contiguous()}
        if "pair" in args.only:
            rows["x to fp32, code-position-major"] = graph_time(
                [lambda: x.float().reshape(k // 8, 8).t().contiguous() for _ in range(4)])
        pair_tilings = [(bn, w, warps, xmode, 1) for bn, w, warps in [
            (16, 128, 4), (8, 128, 4), (8, 256, 8), (16, 64, 4), (32, 128, 8), (4, 128, 2), (16, 256, 8),
            (32, 64, 4)] for xmode in (2, 0)]
        pair_tilings += [(32, 32, 4, 2, 1), (64, 32, 4, 2, 1), (64, 32, 8, 2, 1), (128, 32, 8, 2, 1)]
        pair_tilings += [(16, 128, 4, 1, 1), (8, 128, 4, 1, 1), (16, 128, 4, 2, 2), (8, 128, 4, 2, 2),
                         (8, 128, 4, 2, 4), (16, 64, 4, 2, 4)]
        for bn, nwords, warps, xmode, splits in pair_tilings if "pair" in args.only else ():
            label = f"pair BLOCK_N={bn} WORDS={nwords} warps={warps} x={['fp16', 'fp32', 'fp32-major'][xmode]}" + \
                (f" split={splits}" if splits > 1 else "")
            ksplit = triton.cdiv(triton.cdiv(k // 8, splits), nwords) * nwords
            outs = [torch.zeros(1, n, dtype=torch.float32, device="cuda") for _ in copies]
            def call_pair(c, out):
                if splits > 1:
                    out.zero_()
                matvec_pair[(triton.cdiv(n, bn), triton.cdiv(k // 8, ksplit))](
                    xs[xmode], c[1].view(-1).view(torch.int32), c[2].absmax, c[2].state2.absmax,
                    c[2].state2.code, c[2].code, out, c[3], n, k // 8, k // 64, ksplit, BLOCK_N=bn, WORDS=nwords,
                    XMODE=xmode, SPLIT=splits > 1, EVEN=(k // 8) % nwords == 0, num_warps=warps, num_stages=1)
            time_variant(name, label, call_pair, outs, copies, x, nbytes, rows)
        x16 = torch.randn(16, k, device="cuda", dtype=torch.float16)
        rows["fp16 F.linear m=16"] = graph_time([lambda w=c[4]: torch.nn.functional.linear(x16, w) for c in copies[:4]])
        rows["bnb matmul_4bit m=16"] = graph_time([lambda w=w, c=c: bnb.matmul_4bit(x16, w.t(), quant_state=c[2])
                                                   for w, c in zip(weights, copies)])
        print(f"{name} m=16 fp16 {rows['fp16 F.linear m=16'] * 1e6:.1f} us, bnb {rows['bnb matmul_4bit m=16'] * 1e6:.1f} us")
        for bn, blocks, warps, stages in [(32, 1, 4, 3), (32, 2, 4, 3), (64, 1, 4, 3), (64, 2, 4, 3), (64, 2, 8, 3),
                                          (128, 1, 8, 3), (32, 4, 4, 2), (16, 2, 4, 3), (64, 4, 8, 2)] \
                if "dot16" in args.only else ():
            label = f"dot16 BLOCK_N={bn} BLOCKS={blocks} warps={warps} stages={stages}"
            outs = [torch.zeros(16, n, dtype=torch.float32, device="cuda") for _ in copies]
            def call16(c, out):
                matmul16[(triton.cdiv(n, bn),)](x16, c[1].view(-1).view(torch.int32), c[2].absmax,
                                                c[2].state2.absmax, c[2].state2.code, c[2].code, out, c[3], 16,
                                                n, k, BLOCK_N=bn, BLOCKS=blocks, num_warps=warps,
                                                num_stages=stages, enable_fp_fusion=False)
            time_variant(name, label, call16, outs, copies, x16, nbytes, rows)
        result["rows"][name] = {"shape": [n, k], "weight_bytes": nbytes, "seconds": rows}
        json.dump(result, open(args.json, "w"), indent=1)
        del copies, weights
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
