"""Usage (one GPU): python benchmarks/probe_decode_attention.py [--heads 16 --slots 140 --filled 77]
                                                                       # writes $OUT/decode-attention.json
       (the 7B step at batch 1, prompt 32 + 128 new tokens, half way: --heads 32 --slots 160 --filled 96)

Device probe (issues 11, 25): which attention kernel suits one decode step (batch 1, one query token).

In the tp 2 step's profile (benchmarks/runs/h100x2-2026-11-26-tp-profile/tp-profile.json) each layer's attention is cuDNN's SDPA
kernel (6.8 us) after a mask kernel, about 250 us of a 3.9 ms step; in the 4-bit 7B step's
(runs/h100-2026-12-06-step-profile/profile-4bit.json) 5.7 us a layer and a mask kernel of 1.2. This times one call of
scaled_dot_product_attention at the step's shapes (query 1 token, a static KV cache, a boolean mask as transformers
passes it) for each SDPA backend PyTorch offers, the same attention compiled from its math (what Inductor generates
when no fused kernel is chosen), and a split-KV decode kernel written here in Triton (`split_kv` then `combine`: each
program one head over one range of cache slots, the ranges' partial softmax sums joined after; cuDNN's kernel, by its
name, works in tiles of 64 x 64 for the one query), 32 calls captured in one CUDA graph, median of 20 replays. Each variant's output is compared with the math backend's in fp32.
"""
import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel


@triton.jit
def split_kv(q_ptr, k_ptr, v_ptr, keep_ptr, part_ptr, stat_ptr, L, scale, HEADS: tl.constexpr, D: tl.constexpr,
             SPLIT_L: tl.constexpr, BLOCK_L: tl.constexpr, RANGES: tl.constexpr):
    """One query head's attention over one range of SPLIT_L cache slots (grid: batch x heads, ranges): the
    range's unnormalised sum of values and its softmax statistics (max, sum of exponentials), at [bh, r] of buffers
    of RANGES ranges a head."""
    bh, r = tl.program_id(0), tl.program_id(1)
    b = bh // HEADS
    d = tl.arange(0, D)
    q = tl.load(q_ptr + bh * D + d).to(tl.float32) * scale
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for start in tl.static_range(0, SPLIT_L, BLOCK_L):
        pos = r * SPLIT_L + start + tl.arange(0, BLOCK_L)
        ok = pos < L
        keep = (tl.load(keep_ptr + b * L + pos, mask=ok, other=0) != 0) & ok
        kv = bh * L * D + pos[:, None] * D + d[None, :]
        k = tl.load(k_ptr + kv, mask=ok[:, None], other=0.0).to(tl.float32)
        score = tl.where(keep, tl.sum(k * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(score, 0))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(score - safe)
        alpha = tl.exp(m - safe)
        v = tl.load(v_ptr + kv, mask=ok[:, None], other=0.0).to(tl.float32)
        s = s * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m = m_new
    tl.store(part_ptr + (bh * RANGES + r) * D + d, acc)
    tl.store(stat_ptr + (bh * RANGES + r) * 2, m)
    tl.store(stat_ptr + (bh * RANGES + r) * 2 + 1, s)

@triton.jit
def combine(part_ptr, stat_ptr, o_ptr, RANGES: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    r = tl.arange(0, RANGES)
    d = tl.arange(0, D)
    m = tl.load(stat_ptr + (bh * RANGES + r) * 2)
    s = tl.load(stat_ptr + (bh * RANGES + r) * 2 + 1)
    big = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - big))
    acc = tl.load(part_ptr + (bh * RANGES + r)[:, None] * D + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(s * w, 0)
    tl.store(o_ptr + bh * D + d, out.to(o_ptr.dtype.element_ty))

def split_attention(q, k, v, keep, split_l=64, block_l=32):
    """q [B, H, 1, D], k and v [B, H, L, D] (contiguous), keep [B, L] (int8, nonzero: attended) -> [B, H, 1, D]. The
    ranges' buffers are made once a shape (a decoder would keep them), their padding ranges empty (-inf, 0)."""
    B, H, _, D = q.shape
    L = k.shape[2]
    ranges = triton.cdiv(L, split_l)
    padded = triton.next_power_of_2(ranges)
    key = (B * H, padded, D, q.device)
    if key not in BUFFERS:
        stat = torch.zeros(B * H, padded, 2, device=q.device)
        stat[:, :, 0] = float("-inf")
        BUFFERS[key] = (torch.zeros(B * H, padded, D, device=q.device), stat)
    part, stat = BUFFERS[key]
    out = torch.empty_like(q)
    split_kv[(B * H, ranges)](q, k, v, keep, part, stat, L, D ** -0.5, HEADS=H, D=D, SPLIT_L=split_l,
                              BLOCK_L=block_l, RANGES=padded)
    combine[(B * H,)](part, stat, out, RANGES=padded, D=D)
    return out


BUFFERS = {}


def timed(fn, calls: int = 32, replays: int = 20) -> float:
    """Microseconds a call, fn captured `calls` times in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--slots", type=int, default=140, help="the static cache's length")
    parser.add_argument("--filled", type=int, default=77, help="its filled slots (the rest masked)")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "decode-attention.json"))
    args = parser.parse_args()
    heads, dim, slots, filled = args.heads, 128, args.slots, args.filled
    q = torch.randn(1, heads, 1, dim, device="cuda", dtype=torch.float16)
    k = torch.randn(1, heads, slots, dim, device="cuda", dtype=torch.float16)
    v = torch.randn(1, heads, slots, dim, device="cuda", dtype=torch.float16)
    mask = (torch.arange(slots, device="cuda") < filled)[None, None, None, :]     # the cache's filled slots
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)

    def math(q, k, v, mask):
        s = (q @ k.transpose(-1, -2)).float() * dim ** -0.5
        s = s.masked_fill(~mask, float("-inf"))
        return (s.softmax(-1).to(v.dtype) @ v)

    compiled = torch.compile(math, fullgraph=True, dynamic=False)
    rows = {}
    variants = {f"sdpa {b.name}": b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                              SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)}
    for name, backend in variants.items():
        def call(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        try:
            out = call()
            rows[name] = {"us": timed(call), "max_abs_vs_fp32": float((out.float() - ref).abs().max())}
        except RuntimeError as e:
            rows[name] = {"error": str(e).splitlines()[0][:200]}
        print(name, rows[name], flush=True)
    out = compiled(q, k, v, mask)
    rows["compiled math"] = {"us": timed(lambda: compiled(q, k, v, mask)),
                             "max_abs_vs_fp32": float((out.float() - ref).abs().max())}
    print("compiled math", rows["compiled math"], flush=True)
    keep = mask.reshape(1, slots).to(torch.int8)
    for split_l, block_l in ((32, 32), (64, 32), (64, 64), (160, 32), (32, 16)):
        name = f"triton split-KV, {split_l} slots a program, {block_l} a step"
        out = split_attention(q, k, v, keep, split_l, block_l)
        rows[name] = {"us": timed(lambda: split_attention(q, k, v, keep, split_l, block_l)),
                      "max_abs_vs_fp32": float((out.float() - ref).abs().max())}
        print(name, rows[name], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "shapes": {"heads": heads, "head_dim": dim, "cache_slots": slots, "filled": filled},
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
