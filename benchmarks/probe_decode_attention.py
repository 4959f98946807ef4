"""Usage (one GPU): python benchmarks/probe_decode_attention.py          # writes $OUT/decode-attention.json

Device probe (issue 11): which attention kernel suits one decode step at tp 2 (batch 1, 16 heads a rank).

In the tp 2 step's profile (benchmarks/runs/h100x2-2026-11-26-tp-profile/tp-profile.json) each layer's attention is cuDNN's SDPA
kernel (6.8 us) after a mask kernel, about 250 us of a 3.9 ms step. This times one call of
scaled_dot_product_attention at the step's shapes (query 1 token, a static KV cache of 140 slots, a boolean mask as
transformers passes it) for each SDPA backend PyTorch offers, and the same attention compiled from its math (what
Inductor generates when no fused kernel is chosen), 32 calls captured in one CUDA graph, median of 20 replays. Each
variant's output is compared with the math backend's in fp32.
"""
import json
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


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
    heads, dim, slots, filled = 16, 128, 140, 77
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
    os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "decode-attention.json"), "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "shapes": {"heads": heads, "head_dim": dim, "cache_slots": slots, "filled": filled},
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
