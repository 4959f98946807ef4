"""Usage (one GPU, repo root): python benchmarks/probe_matvec_rows.py time   (W=$OUT: probe-bc.json there)
       (a CPU, Triton's interpreter) TRITON_INTERPRET=1 python benchmarks/probe_matvec_rows.py check
       (a CPU) python benchmarks/probe_matvec_rows.py sass

Device probe (issue 25): does extensions/kernel_4bit.py's matvec lose time reading x once per row? Its tile is
[BLOCK_N rows, WORDS words] and Triton gives each warp one row (128 words across its 32 threads), so each row's warp
loads the same x again through L1. Here the tile is [WORDS / 4 groups, BLOCK_N rows, 4 words]: a warp spans 8 rows x
4 groups and its loads of x (one address down the rows) are one L1 transaction for 8 rows. Everything else is the
matvec's (table lookup, code_major() layout of x, fp32 sums, each group's scale on its sums). `time`: the 7B shapes
the fused loop runs, 8 copies of the weights cycled in one CUDA graph, against the autotuned matvec; `check`: the
variant against x @ W^T under the interpreter; `sass`: its instructions a code for sm_90.
Result (H100, 2026-12-06, benchmarks/README.md): 0.99-1.08x at its best tiling a shape, within noise; the matvec is not
bound by reading x.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from extensions import kernel_4bit as K  # noqa: E402

@triton.jit
def values8(table, words):
    codes = tl.join(tl.join(tl.join((words >> 4) & 15, words & 15), tl.join((words >> 12) & 15, (words >> 8) & 15)),
                    tl.join(tl.join((words >> 20) & 15, (words >> 16) & 15),
                            tl.join((words >> 28) & 15, (words >> 24) & 15)))
    G: tl.constexpr = words.shape[0]
    R: tl.constexpr = words.shape[1]
    V: tl.constexpr = words.shape[2]
    vals = tl.gather(table, codes.reshape(G * R * V * 8), 0).reshape(G, R, V, 2, 2, 2)
    first, second = tl.split(vals)
    v01, v23 = tl.split(first)
    v45, v67 = tl.split(second)
    v0, v1 = tl.split(v01)
    v2, v3 = tl.split(v23)
    v4, v5 = tl.split(v45)
    v6, v7 = tl.split(v67)
    return v0, v1, v2, v3, v4, v5, v6, v7

@triton.jit
def matvec_rows(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, offset_ptr, N, KW, KB, XW,
                NESTED: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    table = tl.load(code_ptr + tl.arange(0, 16))
    G: tl.constexpr = WORDS // 4
    g = tl.arange(0, G)[:, None, None]
    r = tl.arange(0, BLOCK_N)[None, :, None]
    v = tl.arange(0, 4)[None, None, :]
    rows = pid * BLOCK_N + r                                   # [1, R, 1]
    row_ok = rows < N
    col = g * 4 + v                                            # [G, 1, 4]
    w_at = w_ptr + rows * KW + col
    offset = tl.load(offset_ptr + rows, mask=row_ok, other=0.0) if NESTED else 0.0
    next_words = tl.load(w_at, mask=row_ok & (col < KW), other=0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((G, BLOCK_N, 4), dtype=tl.float32)
    for w0 in range(0, KW, WORDS):
        words = next_words
        next_words = tl.load(w_at + w0 + WORDS, mask=row_ok & (w0 + WORDS + col < KW), other=0)
        v0, v1, v2, v3, v4, v5, v6, v7 = values8(table, words)
        x_at = x_ptr + w0 + col + rows * 0
        part = v0 * tl.load(x_at)
        part = tl.fma(v1, tl.load(x_at + XW), part)
        part = tl.fma(v2, tl.load(x_at + 2 * XW), part)
        part = tl.fma(v3, tl.load(x_at + 3 * XW), part)
        part = tl.fma(v4, tl.load(x_at + 4 * XW), part)
        part = tl.fma(v5, tl.load(x_at + 5 * XW), part)
        part = tl.fma(v6, tl.load(x_at + 6 * XW), part)
        part = tl.fma(v7, tl.load(x_at + 7 * XW), part)
        blk = (w0 // 8 + g // 2)                                # [G, 1, 1]: the block of each group of 4 words
        ok = row_ok & (blk < KB)
        block = rows * KB + blk                                 # [G, R, 1]
        scale = tl.load(absmax_ptr + block, mask=ok, other=0)
        if NESTED:
            scale = tl.load(code2_ptr + scale.to(tl.int32)) * tl.load(absmax2_ptr + block // 256, mask=ok, other=0.0)
            scale = scale + offset
        acc = tl.fma(part, scale, acc)
    out = tl.sum(tl.sum(acc, axis=2), axis=0)                   # [R]
    rows1 = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + rows1, out.to(out_ptr.dtype.element_ty), mask=rows1 < N)


def sass():
    import inspect_kernel_4bit as I
    import collections
    import re
    common = dict(w_ptr="*i32", absmax_ptr="*u8", absmax2_ptr="*fp32", code2_ptr="*fp32", code_ptr="*fp32")
    sig = dict(x_ptr="*fp32", **common, out_ptr="*fp16", offset_ptr="*fp32", N="i32", KW="i32", KB="i32", XW="i32")
    for n, w, warps, regs in [(8, 128, 4, None), (8, 128, 4, 80), (16, 64, 4, None), (16, 128, 4, None),
                              (8, 64, 4, None), (32, 32, 4, None), (8, 256, 4, None)]:
        s, usage, ptx, _ = I.compile_kernel(matvec_rows, sig, dict(NESTED=True, BLOCK_N=n, WORDS=w, PDL=True), warps,
                                            90, ("N", "KW", "XW"), regs)
        loop = I.loop_of(s)
        codes = n * w * 8 // (32 * warps)
        print(n, w, warps, regs, re.search(r"REG:(\d+)", usage).group(1), "regs", len(loop), "instr",
              round(len(loop) / codes, 2), "a code", collections.Counter(loop).most_common(9), flush=True)


def time():
    import json
    import bitsandbytes.functional as F
    from probe_kernel_4bit import graph_time
    out = {"card": torch.cuda.get_device_name(), "rows": []}
    for name, (n, k) in {"q/k/v fused": (12288, 4096), "gate/up fused": (22016, 4096), "o": (4096, 4096),
                         "down": (4096, 11008)}.items():
        copies = []
        for _ in range(8):
            w = (torch.randn(n, k, device="cuda") * 0.02).half()
            packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            copies.append((packed, K.state_args(qs)[0]))
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        xt = K.code_major(x)
        kw = k // 8
        def ref(c):
            return K.matvec_4bit(xt, c[0], *c[1], n, True, torch.float16)
        def var(c, bn, words, warps):
            o = torch.empty(1, n, dtype=torch.float16, device="cuda")
            matvec_rows[(triton.cdiv(n, bn),)](xt, K.words(c[0]), *c[1][:4], o, c[1][4], n, kw, kw // 8, xt.shape[1],
                                             NESTED=True, BLOCK_N=bn, WORDS=words, PDL=True, num_warps=warps,
                                             num_stages=1, enable_fp_fusion=False, launch_pdl=True)
            return o
        base = ref(copies[0]).float()
        t_ref = graph_time([lambda c=c: ref(c) for c in copies])
        row = {"shape": name, "n": n, "k": k, "ours_us": t_ref * 1e6, "variants": {}}
        print(f"{name}: ours (autotuned) {t_ref * 1e6:.1f} us", flush=True)
        for bn, words, warps in [(8, 128, 4), (16, 64, 4), (16, 128, 4), (8, 256, 4), (32, 32, 4), (8, 64, 4),
                                 (16, 128, 8), (32, 64, 8)]:
            try:
                err = float((var(copies[0], bn, words, warps).float() - base).norm() / base.norm())
                t = graph_time([lambda c=c: var(c, bn, words, warps) for c in copies])
            except Exception as e:
                print(f"  {bn}x{words} w{warps}: {type(e).__name__} {str(e)[:120]}", flush=True)
                continue
            row["variants"][f"{bn}x{words} w{warps}"] = {"us": t * 1e6, "rel_err_vs_ours": err}
            print(f"  rows-in-a-warp {bn}x{words} w{warps}: {t * 1e6:.1f} us ({t_ref / t:.2f}x), "
                  f"rel. diff {err:.1e}", flush=True)
        out["rows"].append(row)
        json.dump(out, open(os.path.join(os.environ.get("W", "/tmp"), "probe-bc.json"), "w"), indent=1)


def check():      # TRITON_INTERPRET=1 on a CPU: the variant equals the matvec's sum up to fp32 order
    import bitsandbytes.functional as F
    torch.manual_seed(0)
    for n, k in [(16, 1024), (24, 2048), (8, 3072)]:
        w = torch.randn(n, k) * 0.02
        packed, qs = F.quantize_4bit(w.half(), blocksize=64, quant_type="nf4", compress_statistics=True)
        args, _ = K.state_args(qs)
        x = torch.randn(1, k).half()
        xt = K.code_major(x)
        ref = K.dequantize_state(packed, qs).float() @ x.float().t()
        kw = k // 8
        for bn, words in [(8, 128), (16, 64), (8, 256)]:
            o = torch.empty(1, n, dtype=torch.float32)
            matvec_rows[(triton.cdiv(n, bn),)](xt, K.words(packed), *args[:4], o, args[4], n, kw, kw // 8, xt.shape[1],
                                             NESTED=True, BLOCK_N=bn, WORDS=words)
            print(n, k, bn, words, float((o.t() - ref).abs().max() / ref.abs().max()))


if __name__ == "__main__":
    globals()[sys.argv[1]]()
