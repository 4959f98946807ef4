#!/usr/bin/env python3
"""extensions/kernel_4bit.py — 第七节/第十节: a matmul that reads bitsandbytes' 4-bit weights as they are stored and
dequantizes them inside the matrix-vector kernel.

Why a kernel of our own. At batch 1 a decode step is a chain of matrix-vector products: its time is the time to read
the weights. 4-bit weights are a quarter of fp16's bytes, so a 4-bit step can be up to ~3.5x faster than fp16 — if
the matmul reads them at the card's bandwidth. bitsandbytes' own 4-bit kernels were written for memory, not speed
(benchmarks/README.md: they read the weights at about a third of an H100's bandwidth, and 4-bit decoded slower than
fp16). torch.compile of a plain-torch dequantization followed by x @ W^T does not help: inductor makes the table
lookup and the matvec two kernels, and the dequantized weight goes through memory between them. So this file writes
the kernel (Triton): each program reads its rows' packed codes once, looks each 4-bit code up in the 16-entry table
(nf4 or fp4), multiplies by its block's scale and by x, and keeps the sum in fp32 — the dequantized weight never
leaves the registers.

What it reads (bitsandbytes' Params4bit and QuantState as the lesson's load and tensor_parallel.py's shards leave
them; a fused layer's are the same tensors stacked row by row): two codes a byte, the first in the high nibble, over
the weight flattened row by row; one scale (absmax) per block of 64 codes; with double quantization
(bnb_4bit_use_double_quant) the scales are themselves 8-bit codes with one fp32 absmax per 256 of them, a 256-entry
table and one offset (a layer's scalar, given to the kernels once per output row, so that one call can multiply
several layers' rows stacked: q, k and v fused, each part with its own offset):
    scale[b] = code2[absmax8[b]] * absmax2[b // 256] + offset[row]     (fp32; the product rounded before the sum)
    W[e]     = to_weight_dtype(code[q[e]] * scale[e // 64])             (fp32 product, rounded once)
which is bitsandbytes' dequantize_4bit bit for bit (tests/test_kernel_4bit.py checks it on a CPU for the torch code
below and, under Triton's interpreter, for the kernels). dequantize() writes that weight out (a prefill multiplies
it). The matvec multiplies x by each weight's fp32 value code[q] * scale itself, the value
that bitsandbytes then rounds to the weight's dtype: a one-hot row of x gives back the dequantized weight bit for
bit (the tests check it column by column), and any other x a product nearer the exact one than a matmul of the
rounded weight. Its sums run in fp32 in another order than bitsandbytes' kernel, as any two matmul kernels differ:
the decoders verify the whole step against the model unwrapped, as every decoder is.

How the matvec reads them fast. Its time is the weights' bytes over the card's bandwidth only if every code costs
few instructions; a table lookup from memory costs a 64-bit address and a load a code, and a tile whose codes are
spread over threads needs shuffles and shared-memory copies to sum. So a program takes BLOCK_N rows x WORDS int32
words (8 codes a word) a step, splits each word with shifts, and joins the 8 codes into one tl.gather from the
16-entry table, which Triton keeps in shared memory (one 32-bit shared load a code, 16 entries in 16 banks: no
conflicts; a 256-entry table of a byte's two values, half the loads, measured slower). A lookup with no memory at
all is written too (SHUFFLE_ON_GPU, below): every lane of a warp holds one entry (lane l the entry l mod 16) and a
warp shuffle reads it from the lane whose number is the code, so a code costs one shift (the shuffle's lane index
keeps 5 bits, and lanes l and l + 16 hold the same entry: no mask, no index scaled to an address), where tl.gather
takes a shift, a mask and a scaling besides its load, on the integer pipe that takes half a warp a cycle. A lane's
entry is a scalar of its thread, not a tensor: Triton may move a tensor's elements between threads (a layout
conversion), and then a lane holds another lane's entry (Triton 3.6 did, with a tensor-valued table). Each
word's 8 products with x are summed in registers (fused multiply-adds) and each block's scale multiplies its words'
sums once, not each weight. x must reach each thread in the tile's own layout: a vector of x broadcast over the rows
is moved through shared memory with two barriers at each of the 8 code positions, so the matvec takes x as
code_major() lays it out (fp32, code position j of every word in row j) and loads it as a tile of the words' shape.
Compiled for sm_90 that is about 5 instructions a code with tl.gather, about 4 with the shuffle, 128 registers a
thread at most (benchmarks/inspect_kernel_4bit.py counts them; the first form took 33-39, the form before this one 20
barriers a step; benchmarks/README.md has their times). Still 2-6 barriers a step with 2-8 warps a program: the
scales, computed a block at a time, are moved into the words' layout through shared memory, and tl.gather writes its
table there each step; in a program of one warp Triton makes both with warp shuffles, no barrier (ONE_WARP). Each
step issues the next step's loads before it computes (Triton pipelines loads that feed tl.dot, not those of a matvec):
the words, and with SCALES_AHEAD their blocks' absmax (else a step's scales wait for its absmax from memory, then for
the second level's code at the address it gives; the faster form on a GPU); a program may take several blocks of rows in
one such pipeline (fewer programs than blocks: the first load of a block, a whole memory latency, overlaps the block
before; Triton's own pipeline of asynchronous copies, with half the registers, was 1.9-3.1x slower at every 7B shape,
benchmarks/README.md), and on Hopper the matvec is a programmatic
dependent launch: its first words load while the kernel that writes x finishes, and gdc_wait() holds the reads of x
until it has. The tiling is autotuned per matrix shape on its first call. For 2-16 rows the tensor-core form
dequantizes a tile of W through tl.gather's lookup, rounded as bitsandbytes rounds it, then one tl.dot with 16 rows of x
(6-8 instructions a code of W: fewer with the tile as the dot's first operand, which Hopper's tensor cores read from
registers), its tiling, operand order and split of K (a matrix of few rows and long ones, down_proj, gives too few
programs otherwise; the ranges' fp32 sums are added in a fixed order) autotuned too; a prefill (more rows) dequantizes
W a range of rows at a time (linear()), then one matmul each. On a CPU (no Triton) the same dequantization runs in
torch (extensions/quantized_matmul.py), so a CPU run verifies what the GPU runs; on a GPU each layer's kernels are
checked against its weight dequantized before anything is timed (quantized_matmul.check_matmuls()).
"""
from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl
import triton.language.extra.cuda  # noqa: F401  (tl.extra.cuda.gdc_wait: programmatic dependent launch)

BLOCK = 64            # codes per scale: the only blocksize the kernel reads

@triton.jit
def load_step(w_ptr, absmax_ptr, absmax2_ptr, rows, row_ok, b0, KB, NESTED: tl.constexpr, BLOCKS: tl.constexpr):
    """One step's loads from memory, for `rows` x BLOCKS blocks of 64 codes from block b0 of each row: the packed
    codes as int32 words [R, B, 8] (8 codes a word), the blocks' absmax [R, B] (double quantization: their 8-bit
    codes and the second-level absmax of each)."""
    blocks = b0 + tl.arange(0, BLOCKS)
    ok = row_ok[:, None] & (blocks < KB)[None, :]
    block = rows[:, None] * KB + blocks[None, :]                                  # [R, B]: the scale's index
    absmax = tl.load(absmax_ptr + block, mask=ok, other=0)
    absmax2 = tl.load(absmax2_ptr + block // 256, mask=ok, other=0.0) if NESTED else absmax
    words = tl.load(w_ptr + block[:, :, None] * 8 + tl.arange(0, 8)[None, None, :], mask=ok[:, :, None], other=0)
    return words, absmax, absmax2

@triton.jit
def dequantize_tile(words, absmax, absmax2, code2_ptr, code_ptr, offset, NESTED: tl.constexpr,
                    W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr):
    """The weights of load_step's tile, [R, B, 8, 8] in K's order, as bitsandbytes dequantizes them (module
    docstring), then in x's dtype. `offset`: the tile's rows' offsets [R] (double quantization)."""
    if NESTED:
        scale = tl.load(code2_ptr + absmax.to(tl.int32)) * absmax2
        scale = scale + offset[:, None]
    else:
        scale = absmax
    # A little-endian word holds bytes 0..3; each byte's first code is its high nibble: shifts 4, 0, 12, 8, ...
    i = tl.arange(0, 8)
    shifts = (i // 2) * 8 + 4 * (1 - i % 2)
    codes = (words[:, :, :, None] >> shifts[None, None, None, :]) & 15
    weight = tl.load(code_ptr + codes) * scale[:, :, None, None]
    return weight.to(W_DTYPE).to(X_DTYPE)

@triton.jit
def lookup(table, words, K_ORDER: tl.constexpr):
    """The 16-entry table's value of each code of `words` [R, W] (int32, 8 codes a word, a byte's high nibble first),
    in one tl.gather: Triton keeps the table in shared memory (one 32-bit shared load a code). The 8 codes of a word
    are joined along new axes, so the values come back as [R, W, 2, 2, 2]; K_ORDER: joined so that they flatten to K's
    order ([R, W * 8], for a matmul's tile), else so that tl.split takes them apart in order (its first split gives
    codes 0-3 and 4-7 of every word)."""
    if K_ORDER:     # the innermost join pairs codes 4 apart, the outermost neighbours: flattened, code i is at i
        codes = tl.join(tl.join(tl.join((words >> 4) & 15, (words >> 20) & 15),
                                tl.join((words >> 12) & 15, (words >> 28) & 15)),
                        tl.join(tl.join(words & 15, (words >> 16) & 15),
                                tl.join((words >> 8) & 15, (words >> 24) & 15)))
    else:
        codes = tl.join(tl.join(tl.join((words >> 4) & 15, words & 15), tl.join((words >> 12) & 15, (words >> 8) & 15)),
                        tl.join(tl.join((words >> 20) & 15, (words >> 16) & 15),
                                tl.join((words >> 28) & 15, (words >> 24) & 15)))
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    return tl.gather(table, codes.reshape(R * W * 8), 0).reshape(R, W, 2, 2, 2)

@triton.jit
def word_values(table, words):
    """lookup()'s values of `words` [R, W] as 8 tensors [R, W], the n-th holding each word's code n's value."""
    first, second = tl.split(lookup(table, words, False))
    v01, v23 = tl.split(first)
    v45, v67 = tl.split(second)
    v0, v1 = tl.split(v01)
    v2, v3 = tl.split(v23)
    v4, v5 = tl.split(v45)
    v6, v7 = tl.split(v67)
    return v0, v1, v2, v3, v4, v5, v6, v7

@triton.jit
def lane_table(code_ptr):
    """For the shuffle lookup: the 16-entry table's entry of this thread's lane (lane & 15), as int32 bits: the warp's
    32 lanes hold the table twice over. A scalar, on purpose: each thread keeps its own in a register, and a scalar
    given to a tensor's operation is that thread's register. A tensor's element may be moved to another thread (a
    layout conversion, which Triton inserts where it likes), and then it holds another lane's entry."""
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    return tl.load(code_ptr + (lane & 15)).to(tl.int32, bitcast=True)

@triton.jit
def shuffle_lookup(table_bits, codes):
    """The table's value (fp32) of each code in the low 4 bits of `codes` (int32; the bits above are ignored), read
    from the lane whose number is the code by a warp shuffle: the shuffle's lane index keeps 5 bits and lanes l and
    l + 16 hold the same entry, so no mask is needed and the value comes back in a register, with no table in
    shared memory and no index scaled to an address."""
    bits = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r", [table_bits, codes],
                                     dtype=tl.int32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True)

@triton.jit
def load_absmax(absmax_ptr, rows, row_ok, w0, KB, BLOCKS: tl.constexpr):
    """The stored absmax [R, BLOCKS] of the blocks that start at word w0 (8 words a block): with double quantization
    each an 8-bit index into the second level's code, else the fp32 scale itself."""
    blocks = w0 // 8 + tl.arange(0, BLOCKS)
    return tl.load(absmax_ptr + rows[:, None] * KB + blocks[None, :],
                   mask=row_ok[:, None] & (blocks < KB)[None, :], other=0)

@triton.jit
def scales_of(absmax, absmax2_ptr, code2_ptr, offset, rows, row_ok, w0, KB, NESTED: tl.constexpr,
              BLOCKS: tl.constexpr):
    """The fp32 scales [R, BLOCKS] of those blocks from their stored absmax (load_absmax()), as bitsandbytes computes
    them (the module docstring); offset: the rows' offsets [R] (double quantization)."""
    scale = absmax
    if NESTED:
        blocks = w0 // 8 + tl.arange(0, BLOCKS)
        block = rows[:, None] * KB + blocks[None, :]
        ok = row_ok[:, None] & (blocks < KB)[None, :]
        scale = tl.load(code2_ptr + absmax.to(tl.int32)) * tl.load(absmax2_ptr + block // 256, mask=ok, other=0.0)
        scale = scale + offset[:, None]
    return scale

@triton.jit
def block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, rows, row_ok, w0, KB, NESTED: tl.constexpr,
                 BLOCKS: tl.constexpr):
    """The fp32 scales [R, BLOCKS] of the blocks that start at word w0, loaded and computed in one go."""
    return scales_of(load_absmax(absmax_ptr, rows, row_ok, w0, KB, BLOCKS), absmax2_ptr, code2_ptr, offset, rows,
                     row_ok, w0, KB, NESTED, BLOCKS)

@triton.jit
def matmul(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, offset_ptr, part_ptr, M, N, KW, KB,
           NESTED: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
           W_FIRST: tl.constexpr, SPLIT: tl.constexpr = 1):
    """out[M, N] = x[M, K] @ W[N, K]^T on the tensor cores (the 2-16-row form): a program multiplies BLOCK_N rows of
    W, WORDS words (8 codes each) of every row a step, against 16 rows of x. Each step's tile is dequantized as
    bitsandbytes does it (lookup(), then each block's scale, rounded to the weight's dtype), then one tl.dot.
    W_FIRST: the product taken as W @ x^T, the dequantized tile the dot's first operand, which a Hopper GPU's
    tensor cores (wgmma, 64 rows of W or more) read from registers (else it goes through shared memory first).
    SPLIT > 1: K split into that many ranges (grid axis 2), each program's fp32 sums written to part[range, M, N]
    (matmul_rows_4bit adds them up): a matrix of few rows and long rows (down_proj) is otherwise too few programs."""
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    m = tl.program_id(1) * 16 + tl.arange(0, 16)
    table = tl.load(code_ptr + tl.arange(0, 16))
    offset = tl.load(offset_ptr + rows, mask=row_ok, other=0.0) if NESTED else 0.0
    col = tl.arange(0, WORDS)
    split = tl.program_id(2)
    span = tl.cdiv(tl.cdiv(KW, SPLIT), WORDS) * WORDS                   # words a range of K: whole steps
    first, end = split * span, tl.minimum(KW, split * span + span)
    w_at = w_ptr + rows[:, None] * KW + col[None, :]
    next_words = tl.load(w_at + first, mask=row_ok[:, None] & (first + col < end)[None, :], other=0)
    acc = tl.zeros((BLOCK_N, 16) if W_FIRST else (16, BLOCK_N), dtype=tl.float32)
    for w0 in range(first, end, WORDS):
        words = next_words
        next_words = tl.load(w_at + w0 + WORDS, mask=row_ok[:, None] & (w0 + WORDS + col < end)[None, :], other=0)
        value = lookup(table, words, True).reshape(BLOCK_N, WORDS // 8, 64)
        scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, rows, row_ok, w0, KB, NESTED, WORDS // 8)
        weight = (value * scale[:, :, None]).to(W_DTYPE).to(X_DTYPE).reshape(BLOCK_N, WORDS * 8)
        k = w0 * 8 + tl.arange(0, WORDS * 8)
        if W_FIRST:
            x = tl.load(x_ptr + m[None, :] * (KW * 8) + k[:, None], mask=(m < M)[None, :] & (k < KW * 8)[:, None],
                        other=0.0)
            acc = tl.dot(weight, x, acc)
        else:
            x = tl.load(x_ptr + m[:, None] * (KW * 8) + k[None, :], mask=(m < M)[:, None] & (k < KW * 8)[None, :],
                        other=0.0)
            acc = tl.dot(x, tl.trans(weight), acc)
    at = part_ptr + split * M * N if SPLIT > 1 else out_ptr
    if W_FIRST:
        tl.store(at + m[None, :] * N + rows[:, None], acc.to(at.dtype.element_ty),
                 mask=(m < M)[None, :] & row_ok[:, None])
    else:
        tl.store(at + m[:, None] * N + rows[None, :], acc.to(at.dtype.element_ty),
                 mask=(m < M)[:, None] & row_ok[None, :])

@triton.jit
def matvec_step(acc, table, words, absmax, x_ptr, absmax2_ptr, code2_ptr, offset, rows, row_ok, col, w0, KB, XW,
                NESTED: tl.constexpr, WORDS: tl.constexpr, SHUFFLE: tl.constexpr):
    """One step of the matvec: acc [R, WORDS] plus the products of `words` (the rows' words w0 .. w0 + WORDS) with
    x; absmax: their blocks' stored absmax (load_absmax())."""
    # x in the tile's shape (the same address down a column): loaded in the words' own layout, where a vector
    # broadcast over the rows would be moved through shared memory, with barriers, at every code position.
    x_at = x_ptr + (w0 + col)[None, :] + rows[:, None] * 0
    # Each word's sum of its 8 products with x, then each block's scale once on its words' sums.
    part = tl.zeros(acc.shape, dtype=tl.float32)
    if SHUFFLE:     # `table`: lane_table()'s; code j of a word at bit 8 (j // 2) + 4 (1 - j % 2)
        for j in tl.static_range(8):
            part = tl.fma(shuffle_lookup(table, words >> ((j // 2) * 8 + 4 * (1 - j % 2))), tl.load(x_at + j * XW),
                          part)
    else:
        values = word_values(table, words)
        for j in tl.static_range(8):
            part = tl.fma(values[j], tl.load(x_at + j * XW), part)
    scale = scales_of(absmax, absmax2_ptr, code2_ptr, offset, rows, row_ok, w0, KB, NESTED, WORDS // 8)
    R: tl.constexpr = acc.shape[0]
    return tl.fma(part, tl.broadcast_to(scale[:, :, None], (R, WORDS // 8, 8)).reshape(R, WORDS), acc)

@triton.jit
def matvec(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, offset_ptr, N, KW, KB, XW: tl.constexpr,
           NESTED: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, PER_SM: tl.constexpr = 0,
           PDL: tl.constexpr = False, SHUFFLE: tl.constexpr = False, SCALES_AHEAD: tl.constexpr = False,
           TRIGGER: tl.constexpr = False):
    """out[N] = W[N, K] @ x[K] (one row of x: a decode step at batch 1). A program: BLOCK_N rows of W, WORDS int32
    words (8 codes each) of every row a step, the next step's words loaded before this step's are used. x comes as
    code_major() lays it out (fp32, row j holding code position j of every word, XW words a row, zeros past KW), so
    that it loads in the tile's own layout, 4 words a load; XW is a compile-time constant (it follows from KW, which
    keys the autotuner: no compilation more), so the 8 rows of x are offsets of one address, not 8 computed ones
    (fewer instructions a code: benchmarks/inspect_kernel_4bit.py). KW, KB: words and blocks of 64 codes a row of W.
    Launched with fewer programs than blocks of BLOCK_N rows, a program takes blocks pid, pid + programs, ... in one
    pipeline: the first words of its next block are loaded during the last step of the one before (else each block's
    first load waits a whole memory latency). PDL (launched as a programmatic dependent launch): the first words are
    loaded before the kernel that writes x has finished; gdc_wait() holds every read of x until it has; with TRIGGER
    too, the kernel after it may launch once every program has passed that wait (it waits in its own gdc_wait() for
    this one to finish), not only when this one has ended. PER_SM: the
    programs an SM runs at once, for the launcher (0: a program a block). SHUFFLE: the table lookup by warp shuffle
    (lane_table(), shuffle_lookup(); PTX, so not under Triton's interpreter), else by tl.gather (word_values()).
    SCALES_AHEAD: the next step's absmax loaded with its words, a step ahead, else at the start of the step that uses
    them (then each step's scales wait for a load from memory, and for the second level's code after it)."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    col = tl.arange(0, WORDS)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    next_words = tl.load(w_ptr + rows[:, None] * KW + col[None, :],
                         mask=(rows < N)[:, None] & (col < KW)[None, :], other=0)
    if SCALES_AHEAD:
        next_absmax = load_absmax(absmax_ptr, rows, rows < N, 0, KB, WORDS // 8)
    if SHUFFLE:
        table = lane_table(code_ptr)
    else:
        table = tl.load(code_ptr + tl.arange(0, 16))                              # the 16-entry code (nf4 or fp4)
    if PDL:
        tl.extra.cuda.gdc_wait()
        if TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
    for b in range(pid, tl.cdiv(N, BLOCK_N), programs):
        rows = b * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        offset = tl.load(offset_ptr + rows, mask=row_ok, other=0.0) if NESTED else 0.0
        w_at = w_ptr + rows[:, None] * KW + col[None, :]
        acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        for w0 in range(0, KW, WORDS):
            words = next_words
            # The next step's words: this block's, or after its last step the first of the program's next block.
            last = w0 + WORDS >= KW
            ahead = tl.where(last, programs * BLOCK_N * KW, w0 + WORDS)
            ahead_ok = tl.where(last, rows + programs * BLOCK_N < N, row_ok)
            ahead_w0 = tl.where(last, 0, w0 + WORDS)
            next_words = tl.load(w_at + ahead, mask=ahead_ok[:, None] & (ahead_w0 + col < KW)[None, :], other=0)
            if SCALES_AHEAD:
                absmax = next_absmax
                next_absmax = load_absmax(absmax_ptr, tl.where(last, rows + programs * BLOCK_N, rows), ahead_ok,
                                          ahead_w0, KB, WORDS // 8)
            else:
                absmax = load_absmax(absmax_ptr, rows, row_ok, w0, KB, WORDS // 8)
            acc = matvec_step(acc, table, words, absmax, x_ptr, absmax2_ptr, code2_ptr, offset, rows, row_ok, col,
                              w0, KB, XW, NESTED, WORDS, SHUFFLE)
        tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)

@triton.jit
def dequantize_kernel(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, offset_ptr, ROW0, N, K,
                      NESTED: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
    """The weight's rows ROW0 to N - 1 ([N - ROW0, K]) written out, dequantized as the tensor-core form's first design
    did (load_step, dequantize_tile): bitsandbytes' dequantize_4bit bit for bit."""
    rows = ROW0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b0 = tl.program_id(1) * BLOCKS
    KB = K // 64
    words, absmax, absmax2 = load_step(w_ptr, absmax_ptr, absmax2_ptr, rows, rows < N, b0, KB, NESTED, BLOCKS)
    offset = tl.load(offset_ptr + rows, mask=rows < N, other=0.0) if NESTED else 0.0
    weight = dequantize_tile(words, absmax, absmax2, code2_ptr, code_ptr, offset, NESTED, W_DTYPE, W_DTYPE)
    col = b0 * 64 + tl.arange(0, BLOCKS * 64)
    tl.store(out_ptr + (rows - ROW0)[:, None] * K + col[None, :], weight.reshape(BLOCK_N, BLOCKS * 64),
             mask=(rows < N)[:, None] & (col < K)[None, :])

# The kernels with their tilings picked on the GPU, once per (N, KW): the first call of a shape times each
# configuration (the decoders' warm-up runs make that call, before any CUDA graph is captured), and Triton keeps the
# times in its cache directory (cache_results, Triton 3.4 and later), so a later process on the same kind of GPU
# compiles only the picked one (a server's start: one compilation a shape, not one a configuration). A
# configuration: rows of W a program, words a step, warps: those among the fastest at a 7B model's shapes on an H100
# (benchmarks/README.md); for the matvec also some with registers capped at 80 (more programs an SM hide more of the
# loads' latency; nothing spills for sm_90: picked at most 7B shapes), some with PER_SM programs an SM each taking
# several blocks (picked at the fused shapes) and two for short rows (small models); for the tensor-core form also
# some with the weight as the dot's first operand (W_FIRST: fewer instructions a code for sm_90) and some with K
# split in 2 or 4, with Triton's pipeline of the loads that feed the dot (num_stages 3, Triton's default: the
# probe's explicit tilings ran so, faster at 16 rows than the same tilings autotuned with 1 stage, benchmarks/README.md;
# not 32 x 64 words, which spills with it).
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
MATVEC_TILINGS = [(16, 128, 4, None, 0), (8, 128, 4, None, 0), (4, 128, 2, None, 0), (32, 64, 4, None, 0),
                  (8, 128, 4, 80, 0), (16, 128, 8, None, 0), (32, 128, 8, None, 0), (8, 64, 4, None, 0),
                  (16, 32, 4, None, 0), (8, 128, 4, 80, 6), (8, 128, 4, 80, 3), (16, 128, 4, None, 4),
                  (16, 128, 8, 80, 3)]            # (BLOCK_N, WORDS, warps, maxnreg, PER_SM)
# Programs of one warp (ONE_WARP below): Triton moves a tensor between layouts of one warp with shuffles, so the
# loop has no barrier and no shared memory at all (with 2-8 warps, a step's layout conversions of the scales and
# tl.gather's table take 2-6 barriers: benchmarks/inspect_kernel_4bit.py), and with 72 registers an SM holds 28 such
# programs (7 warps a scheduler, none waiting for another; the GPU's counters showed 3-5.5 at the picked tilings,
# waiting on memory and at those barriers: benchmarks/README.md).
ONE_WARP_TILINGS = [(2, 128, 1, 72, 0), (4, 64, 1, 72, 0), (2, 128, 1, 72, 32), (2, 128, 1, 72, 16),
                    (1, 128, 1, None, 0)]

def matvec_autotuner(tilings):
    """The matvec autotuned over `tilings` per matrix shape and form (the first call of each times them all)."""
    return triton.autotune([triton.Config(dict(BLOCK_N=n, WORDS=w, PER_SM=per_sm), num_warps=warps, num_stages=1,
                                          maxnreg=regs) for n, w, warps, regs, per_sm in tilings],
                           key=["N", "KW", "SHUFFLE", "SCALES_AHEAD"], **AUTOTUNE_CACHE)(matvec)

MATVEC = matvec_autotuner(MATVEC_TILINGS)
MATVEC_ONE_WARP = matvec_autotuner(MATVEC_TILINGS + ONE_WARP_TILINGS)      # the one-warp programs as candidates too
MATMUL = triton.autotune([triton.Config(dict(BLOCK_N=n, WORDS=w, W_FIRST=first, SPLIT=split), num_warps=warps,
                                        num_stages=stages)
                          for n, w, first, warps, split, stages in [
                              (32, 32, False, 4, 1, 3), (32, 64, False, 4, 1, 1), (64, 16, True, 4, 1, 3),
                              (64, 32, True, 8, 1, 3), (128, 16, True, 4, 1, 3), (32, 32, False, 4, 2, 3),
                              (32, 32, False, 4, 4, 3), (64, 16, True, 4, 2, 3), (64, 16, True, 4, 4, 3)]],
                         key=["N", "KW"], **AUTOTUNE_CACHE)(matmul)
MAX_SPLIT = max(c.kwargs["SPLIT"] for c in MATMUL.configs)
# The matvec's table lookup on a GPU: by warp shuffle (True) or by tl.gather from shared memory (False). Both give the
# same values to the same multiply-adds (the same outputs, bit for bit: benchmarks/probe_matvec_shuffle.py checks it on
# a GPU, and times both); the shuffle issues fewer instructions a code (benchmarks/inspect_kernel_4bit.py), but with
# the absmax a step ahead and the one-warp programs (the defaults below) tl.gather was the faster at a 7B layer's four
# shapes together (benchmarks/README.md), so it stays the default.
SHUFFLE_ON_GPU = False
# The matvec's absmax loaded a step ahead, with the words (True), or in the step that uses them (False). The same
# values in the same operations either way; benchmarks/probe_matvec_shuffle.py times both (with the one-warp programs,
# a step ahead was the faster form at the 7B shapes: benchmarks/README.md).
SCALES_AHEAD = True
# The matvec's autotuner also times the one-warp programs (ONE_WARP_TILINGS: True) or only those of 2-8 warps (False).
# A one-warp program's layout conversions and table lookup are warp shuffles, with no barrier; more of them fit an SM.
# Every tiling computes the same products (one-hot rows of x give the dequantized weight at any tiling); only a row's
# order of summing follows the tiling. benchmarks/probe_matvec_shuffle.py times both sets.
ONE_WARP = True
# On Hopper (the matvec a programmatic dependent launch), the kernel after the matvec launched as soon as every program
# has passed its gdc_wait() (True: it then waits in its own gdc_wait() for the matvec to end, and starts at once when it
# has) or when the matvec has ended (False). The same kernels and values either way. Off: a 7B step took longer with
# it (profile_decode.py, benchmarks/README.md), most likely as the early kernel's programs hold their SMs while
# they wait, where the matvec's last programs would run.
TRIGGER_EARLY = False
# code_major() pads x's rows with zeros to a multiple of this many words, a multiple of every matvec step's words (its
# last step reads x unmasked: a masked word is code 0, whose value is not 0).
X_WORDS = 256
assert all(X_WORDS % c.kwargs["WORDS"] == 0 for c in MATVEC_ONE_WARP.configs)

def picked_tilings() -> dict[str, str]:
    """The tilings the autotuners picked in this process, one line a kernel and shape: {"matvec N=.. KW=..": tiling}
    (the decoders' reports carry it: which candidates are ever picked, and so worth a first call's time). Picks of
    one shape for other dtypes (the autotuner keys those too) are joined with " | "."""
    picked = {}
    for name, tuner in (("matvec", MATVEC), ("matvec", MATVEC_ONE_WARP), ("matmul", MATMUL)):
        for key, config in tuner.cache.items():
            label = f"{name} " + " ".join(f"{k}={v}" for k, v in zip(tuner.keys, key))
            picked[label] = " | ".join(dict.fromkeys(filter(None, [picked.get(label), tiling_of(config)])))
    return picked

def tiling_of(config: triton.Config) -> str:
    """A tiling as one line: its block sizes, then warps, stages and the register cap where set."""
    extra = {"warps": config.num_warps, "stages": config.num_stages, "maxnreg": config.maxnreg}
    return " ".join(f"{k}={v}" for k, v in {**config.kwargs, **extra}.items() if v is not None)

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

def state_args(quant_state):
    """bitsandbytes' QuantState as the kernels' arguments: (absmax, the second level's absmax and code, the 4-bit
    code, offset), NESTED; offset holds the layer's one offset once per output row (fp32 [N]; a fused layer's rows
    hold their own part's), repeated on the weights' device without a read to the host. Without double quantization
    the second level is absent: absmax and code stand in for it, and the offsets are zeros (none of them read).
    Int4WeightOnly keeps the same tensors as its buffers."""
    nested, absmax, n = quant_state.nested, quant_state.absmax, quant_state.shape[0]
    second = quant_state.state2 if nested else quant_state
    offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=absmax.device).reshape(1).expand(n) \
        if nested else torch.zeros(1, dtype=torch.float32, device=absmax.device).expand(n)
    return (absmax, second.absmax, second.code, quant_state.code, offset.contiguous()), nested

def words(packed):
    """The packed codes as int32 words (the kernels' loads: 8 codes a word)."""
    return packed.reshape(-1).view(torch.int32)

def code_major(x):
    """One row of x [1, K] as the matvec reads it: fp32, [8, XW], row j holding code position j of each word of 8
    codes (xt[j, w] = x[8 w + j]), XW = K / 8 rounded up to X_WORDS with zeros. Plain torch: in a compiled step
    inductor writes it from the kernel that makes x (a norm, an activation), no launch of its own."""
    kw = x.shape[-1] // 8
    # contiguous: with no padding to add (K / 8 a multiple of X_WORDS) pad returns the transposed view as it is
    return torch.nn.functional.pad(x.reshape(kw, 8).t().float(), (0, -kw % X_WORDS)).contiguous()

# What a compiled step needs from inductor for code_major() to cost no kernel of its own: the layout is a transpose, for
# which inductor picks a 2D tiling, and by default a tiled pointwise kernel is not fused into the reduction before it,
# so each RMSNorm feeding a matvec ran as two kernels (the reduction, then the norm applied and transposed; 64 a 7B
# step). With this option the norm, the residual add before it and the layout are one kernel (the gpu test counts
# them). The two after it make every such norm one persistent one-pass reduction (multi_kernel 2: inductor's larger
# threshold for keeping a whole row in registers, and that form always taken, without timing both) and keep inductor
# from computing a small result again in each kernel that reads it (realize_reads_threshold 1). With decode_attention's
# MASK_ONCE, PDL and JOIN_IN_GRAPH they were measured as one change: a batch-1 step faster, 16 rows the same
# (benchmarks/README.md). Int4WeightOnly carries them; fast_decode.decode_step() compiles with every option the model's
# layers carry.
INDUCTOR_OPTIONS = {"triton.tiling_prevents_reduction_fusion": False, "realize_reads_threshold": 1,
                    "triton.multi_kernel": 2}

@functools.cache
def pdl_capable(device) -> bool:
    """Can kernels on `device` be launched as programmatic dependent launches (Hopper, sm_90, and later)?"""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9

@functools.cache
def sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1

def programs(n: int, block_n: int, per_sm: int, device) -> int:
    """The matvec's grid: a program a block of block_n rows, or at most per_sm programs an SM (matvec())."""
    blocks = triton.cdiv(n, block_n)
    return min(blocks, per_sm * sm_count(device)) if per_sm else blocks

@torch.library.custom_op("ds_bnb_infer::matvec_4bit", mutates_args=())
def matvec_4bit(xt: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor,
                code2: torch.Tensor, code: torch.Tensor, offset: torch.Tensor, out_features: int, nested: bool,
                out_dtype: torch.dtype, tiling: list[int] | None = None, pdl: bool | None = None,
                shuffle: bool | None = None, scales_ahead: bool | None = None,
                one_warp: bool | None = None, trigger: bool | None = None) -> torch.Tensor:
    """The matvec [1, N] in out_dtype, x given as code_major(x). A custom op: torch.compile keeps it whole in the
    compiled step (and a CUDA graph captures its launch). Its tiling is autotuned; tiling (BLOCK_N, BLOCKS[,
    PROGRAMS[, WARPS]]): rows of W and blocks of 64 codes a step (and at most that many programs, of that many warps
    a program; Triton's interpreter, the tests, the probes). pdl: launched as a programmatic dependent launch where
    the GPU can (None) or not (False).
    shuffle: the table lookup on a GPU by warp shuffle or not (None: SHUFFLE_ON_GPU; the tests, the probes).
    scales_ahead: the absmax loaded a step ahead or not (None: SCALES_AHEAD; the tests, the probes).
    one_warp: the autotuner times the one-warp programs too or not (None: ONE_WARP; the probes).
    trigger: with PDL, the kernel after it launched once its programs have passed their wait or not (None:
    TRIGGER_EARLY; the probes)."""
    n = out_features
    kw = packed.numel() // 4 // n
    if not xt.is_contiguous() or xt.shape[0] != 8 or xt.shape[1] < kw or xt.shape[1] % X_WORDS:
        raise ValueError(f"matvec_4bit takes x as code_major() lays it out, not {tuple(xt.shape)} {xt.stride()}")
    if tiling is not None and 8 * tiling[1] > X_WORDS:
        raise ValueError(f"a matvec step takes at most {X_WORDS // 8} blocks of 64 codes, not {tiling[1]}")
    if tiling is not None and (tiling[4:] or tiling[2:] and tiling[2] < 1       # (a tensor-core tiling's 3rd: W_FIRST)
                               or tiling[3:] and tiling[3] not in (1, 2, 4, 8)):
        raise ValueError(f"a matvec's tiling is (rows, blocks[, programs >= 1[, warps 1/2/4/8]]), not {tiling}")
    out = torch.empty(1, n, dtype=out_dtype, device=xt.device)
    args = (xt, words(packed), absmax, absmax2, code2, code, out, offset, n, kw, kw // 8, xt.shape[1])
    # enable_fp_fusion=False: a scale's product and its sum with the offset are rounded apart, as in bitsandbytes (a
    # fused multiply-add rounds once: a scale could differ in its last bit); the products with x are tl.fma.
    pdl = ({"PDL": True, "launch_pdl": True, "TRIGGER": TRIGGER_EARLY if trigger is None else trigger}
           if pdl_capable(xt.device) and pdl is not False else {})
    # Triton's interpreter (a CPU's tests) runs no PTX: the lookup by tl.gather there, whatever SHUFFLE_ON_GPU says.
    shuffle = (SHUFFLE_ON_GPU if shuffle is None else shuffle) and xt.device.type == "cuda"
    ahead = SCALES_AHEAD if scales_ahead is None else scales_ahead
    if tiling is None:
        tuner = MATVEC_ONE_WARP if (ONE_WARP if one_warp is None else one_warp) else MATVEC
        tuner[lambda meta: (programs(n, meta["BLOCK_N"], meta["PER_SM"], xt.device),)](
            *args, NESTED=nested, SHUFFLE=shuffle, SCALES_AHEAD=ahead, enable_fp_fusion=False, **pdl)
    else:
        grid = min(triton.cdiv(n, tiling[0]), tiling[2]) if tiling[2:] else triton.cdiv(n, tiling[0])
        matvec[(grid,)](*args, NESTED=nested, BLOCK_N=tiling[0], WORDS=8 * tiling[1], SHUFFLE=shuffle,
                        SCALES_AHEAD=ahead, enable_fp_fusion=False, num_warps=tiling[3] if tiling[3:] else 4, **pdl)
    return out

@matvec_4bit.register_fake
def _(xt, packed, absmax, absmax2, code2, code, offset, out_features, nested, out_dtype, tiling=None, pdl=None,
      shuffle=None, scales_ahead=None, one_warp=None, trigger=None):
    return xt.new_empty(1, out_features, dtype=out_dtype)

@torch.library.custom_op("ds_bnb_infer::matmul_rows_4bit", mutates_args=())
def matmul_rows_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor,
                     code2: torch.Tensor, code: torch.Tensor, offset: torch.Tensor, out_features: int, nested: bool,
                     weight_dtype: torch.dtype, tiling: list[int] | None = None) -> torch.Tensor:
    """x[M, K] @ W^T for 2-16 rows (a custom op, as matvec_4bit): the tensor-core form, its tiling autotuned;
    tiling (BLOCK_N, BLOCKS[, W_FIRST[, SPLIT]]): rows of W and blocks of 64 codes a step (1: the weight first; K in
    SPLIT ranges, their fp32 sums added in order here, the same sum every call)."""
    m, k = x.shape
    n = out_features
    split = tiling[3] if tiling is not None and tiling[3:] else 1 if tiling is not None else MAX_SPLIT
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out   # split K's sums
    args = (x, words(packed), absmax, absmax2, code2, code, out, offset, part, m, n, k // 8, k // BLOCK)
    if tiling is None:
        MATMUL[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, 16), meta["SPLIT"])](
            *args, NESTED=nested, W_DTYPE=TL_DTYPES[weight_dtype], enable_fp_fusion=False)
        split = MATMUL.best_config.kwargs["SPLIT"]                       # the tiling it ran (picked once a shape)
    else:
        matmul[(triton.cdiv(n, tiling[0]), triton.cdiv(m, 16), split)](
            *args, NESTED=nested, W_DTYPE=TL_DTYPES[weight_dtype], BLOCK_N=tiling[0], WORDS=8 * tiling[1],
            W_FIRST=bool(tiling[2:] and tiling[2]), SPLIT=split, enable_fp_fusion=False)
    return part[:split].sum(0).to(x.dtype) if split > 1 else out

@matmul_rows_4bit.register_fake
def _(x, packed, absmax, absmax2, code2, code, offset, out_features, nested, weight_dtype, tiling=None):
    return x.new_empty(x.shape[0], out_features)

def matmul_4bit(x, packed, absmax, absmax2, code2, code, offset, out_features: int, nested: bool, weight_dtype,
                tiling: list[int] | None = None):
    """x[M, K] @ W^T (M <= 16, in the compute dtype, contiguous) with W read from bitsandbytes' storage; offset: one
    per output row (state_args). One row: the matvec of code_major(x); 2-16: matmul_rows_4bit."""
    if x.shape[0] == 1:
        return matvec_4bit(code_major(x), packed, absmax, absmax2, code2, code, offset, out_features, nested,
                           x.dtype, tiling)
    return matmul_rows_4bit(x, packed, absmax, absmax2, code2, code, offset, out_features, nested, weight_dtype,
                            tiling)

def dequantize(packed, absmax, absmax2, code2, code, offset, nested: bool, shape, weight_dtype,
               tiling: tuple[int, int] = (16, 8), rows: tuple[int, int] | None = None):
    """The weight [N, K] = shape as the kernels dequantize it (load_step and dequantize_tile, written out), from the
    tensors the matmul takes (Int4WeightOnly's buffers, a fused layer's included): bitsandbytes' dequantize_4bit bit
    for bit (the test of exactness), and the weight of every matmul of more than one row (matmul_4bit's 2-16, a
    prefill's: linear()). tiling: rows, blocks of 64 codes a program (16 x 8 measured faster than 4 x 4); rows:
    (first, end), only those rows of W."""
    n, k = shape
    first, end = rows or (0, n)
    out = torch.empty(end - first, k, dtype=weight_dtype, device=packed.device)
    dequantize_kernel[(triton.cdiv(end - first, tiling[0]), triton.cdiv(k // BLOCK, tiling[1]))](
        words(packed), absmax, absmax2, code2, code, out, offset, first, end, k, NESTED=nested,
        W_DTYPE=TL_DTYPES[weight_dtype], BLOCK_N=tiling[0], BLOCKS=tiling[1], enable_fp_fusion=False)
    return out

# The most dequantized weight that linear() holds at once: a fused gate/up of a 7B model (22016 x 4096) would take
# 172 MiB in fp16 beside its 4-bit weights, twice what bitsandbytes' own matmul takes for its largest layer.
CHUNK_BYTES = 64 * 2 ** 20

def linear(x, packed, absmax, absmax2, code2, code, offset, nested: bool, shape, weight_dtype,
           chunk_bytes: int = CHUNK_BYTES):
    """x[M, K] @ W^T for many rows of x (a prefill): W dequantized (bit for bit, dequantize()) a range of its rows at
    a time, at most chunk_bytes of it at once (16 rows at the least), each range's products written into its columns
    of the output."""
    n, k = shape
    step = max(16, chunk_bytes // (k * torch.finfo(weight_dtype).bits // 8) // 16 * 16)
    if step >= n:
        return torch.nn.functional.linear(x, dequantize(packed, absmax, absmax2, code2, code, offset, nested, shape,
                                                        weight_dtype).to(x.dtype))
    out = x.new_empty(x.shape[0], n)
    for first in range(0, n, step):
        end = min(n, first + step)
        weight = dequantize(packed, absmax, absmax2, code2, code, offset, nested, shape, weight_dtype,
                            rows=(first, end))
        out[:, first:end] = torch.nn.functional.linear(x, weight.to(x.dtype))
        del weight
    return out

def dequantize_state(packed, quant_state, tiling: tuple[int, int] = (16, 8)):
    """dequantize() of one bitsandbytes layer's packed codes and QuantState (the tests' and probes' shorthand)."""
    (absmax, absmax2, code2, code, offset), nested = state_args(quant_state)
    return dequantize(packed, absmax, absmax2, code2, code, offset, nested, quant_state.shape, quant_state.dtype,
                      tiling)
