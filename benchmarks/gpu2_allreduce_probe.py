"""Where tp 2's decode step goes (issue 11): the latency of the all-reduces AutoTP adds, 2 per layer = 64 per token for
the Llama-2-7B shape, at that step's message sizes (hidden 4096 fp16: 8 KiB a row; batch 1 and 16), on two GPUs.
Not part of the lesson: a probe, torch only. On the device (kind nvidia-h100-x2), no wheels needed:
  torchrun --nproc_per_node 2 benchmarks/gpu2_allreduce_probe.py [--push]
Variants: NCCL in-place all_reduce issued eagerly; the same 64 captured in one CUDA graph (what fast_decode.py's
compiled / cuda-graph step does); torch's symmetric-memory one-shot all-reduce (P2P loads over NVLink, no
multicast) captured likewise. Each: 64 calls a replay, 5 warm-up + 30 timed replays, median per call.

`--push` adds what fast_decode.py's step uses today, the one-shot all-reduce of fp32 partial sums (16 KB a row), beside
a candidate for it, push_all_reduce(): each rank stores its partial sum straight into its peers' symmetric buffers,
and each reads what its peers stored there, word by word, until no word holds the "empty" mark (-0.0, which a sender
never sends: it sends +0.0 instead, the same number in a sum). The data is its own flag, so there is no barrier
before or after (the one-shot kernel has two: ~8-13 us a call in the tp 2 profile). Three slots a buffer, used in
turn: a peer can be at most one call ahead, and a reader empties what it read. Sums are taken in rank order, so every
rank gets the same bits. Checked against NCCL's fp32 sum, bit for bit, over calls of several sizes in a row; the
protocol itself also on a CPU, under Triton's interpreter (push_all_reduce_interpret.py)."""
import os
import statistics
import sys

import torch
import torch.distributed as dist

CALLS, REPS = 64, 30

def timed(fn) -> float:
    """Median microseconds per call of fn() (which issues CALLS calls), device events around each replay."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / CALLS)
    return statistics.median(times)

def graph_of(body):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return g

def push_kernel():
    """The Triton kernel of push_all_reduce() (built on first use: Triton loads only where a run needs it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, out_ptr, buffer_ptr_addrs, counters, numel, MAX: tl.constexpr, RANK: tl.constexpr,
               WORLD: tl.constexpr, BLOCK: tl.constexpr, EMPTY: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        slot = tl.load(counters + pid) % 3               # this program's call count: the same on every rank
        bits = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.int32, bitcast=True)
        x = tl.where(bits == EMPTY, 0, bits).to(tl.float32, bitcast=True)   # -0.0 -> +0.0: -0.0 marks an empty word
        addrs = buffer_ptr_addrs.to(tl.pointer_type(tl.uint64))
        mine = slot * WORLD * MAX + RANK * MAX + offs    # where this rank's words go, in every peer's buffer
        for p in tl.static_range(WORLD):
            if p != RANK:
                peer = tl.load(addrs + p).to(tl.pointer_type(tl.float32))
                tl.store(peer + mine, x, mask=mask)
        own = tl.load(addrs + RANK).to(tl.pointer_type(tl.float32))
        empty = tl.full([BLOCK], EMPTY, tl.int32).to(tl.float32, bitcast=True)
        acc = tl.zeros([BLOCK], tl.float32)
        for p in tl.static_range(WORLD):
            if p == RANK:
                acc += x
            else:
                src = own + slot * WORLD * MAX + p * MAX + offs
                v = tl.load(src, mask=mask, other=0.0, volatile=True)
                waiting = tl.sum(((v.to(tl.int32, bitcast=True) == EMPTY) & mask).to(tl.int32), axis=0)
                while waiting > 0:
                    v = tl.load(src, mask=mask, other=0.0, volatile=True)
                    waiting = tl.sum(((v.to(tl.int32, bitcast=True) == EMPTY) & mask).to(tl.int32), axis=0)
                acc += v
                tl.store(src, empty, mask=mask)          # emptied for this slot's next use, three calls on
        tl.store(out_ptr + offs, acc, mask=mask)
        tl.store(counters + pid, tl.load(counters + pid) + 1)
    return kernel

def push_all_reduce_factory(group, max_numel: int):
    """push_all_reduce(x: fp32 CUDA tensor, numel <= max_numel) -> a new tensor, the sum over the group's ranks."""
    import triton
    import torch.distributed._symmetric_memory as symm_mem
    kernel, block = push_kernel(), 1024
    buf = symm_mem.empty(3 * dist.get_world_size(group) * max_numel, dtype=torch.float32, device="cuda")
    buf.fill_(-0.0)
    handle = symm_mem.rendezvous(buf, group.group_name)
    counters = torch.zeros(triton.cdiv(max_numel, block), dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    dist.barrier(group)                                  # every buffer is empty before anyone writes

    def push_all_reduce(x):
        assert x.dtype == torch.float32 and x.is_contiguous() and x.numel() <= max_numel
        out = torch.empty_like(x)
        kernel[(triton.cdiv(x.numel(), block),)](x, out, handle.buffer_ptrs_dev, counters, x.numel(), MAX=max_numel,
                                                 RANK=handle.rank, WORLD=handle.world_size, BLOCK=block,
                                                 EMPTY=-2147483648, num_warps=4)   # EMPTY: -0.0's bits as int32
        return out
    return push_all_reduce

def push_rows(group, graphs) -> list:
    """--push: fp32 one-shot (today's step) against push_all_reduce, at batch 1 and 16, and the checks."""
    import torch.distributed._symmetric_memory as symm_mem
    rows, sizes = [], {"batch 1 (16 KB)": 4096, "lm_head, batch 1 (125 KB)": 32000, "batch 16 (256 KB)": 16 * 4096}
    push = push_all_reduce_factory(group, max(sizes.values()))
    # the checks: calls of every size in a row, each against NCCL's fp32 sum (two ranks: one rounding, same bits)
    equal, calls = True, 0
    for round_ in range(4):
        for numel in list(sizes.values()) * 2:
            x = torch.randn(numel, device="cuda") * (round_ + 1)
            x[::97] = -0.0                               # a sender's -0.0 must arrive as zero
            expect = x.clone()
            dist.all_reduce(expect)
            equal &= torch.equal(push(x), expect)
            calls += 1
    rows.append(f"push_all_reduce: {calls} calls of 3 sizes in turn, equal to NCCL's fp32 sum: {equal}")
    for name, numel in sizes.items():
        x = torch.randn(numel, device="cuda")
        s = symm_mem.empty(numel, dtype=torch.float32, device="cuda")
        symm_mem.rendezvous(s, group.group_name)
        s.copy_(x)
        g1 = graph_of(lambda: [torch.ops.symm_mem.one_shot_all_reduce(s, "sum", group.group_name)
                               for _ in range(CALLS)])
        g2 = graph_of(lambda: [push(x) for _ in range(CALLS)])
        graphs += [g1, g2]
        rows.append(f"{name}, fp32, in a CUDA graph: one-shot {timed(g1.replay):.1f} us, "
                    f"push_all_reduce {timed(g2.replay):.1f} us a call")
    g = graph_of(lambda: [push(x) for _ in range(CALLS)])    # after replays: still the same sum?
    graphs.append(g)
    expect = x.clone()
    dist.all_reduce(expect)
    g.replay()
    rows.append(f"push_all_reduce after the timed graph replays, still equal: {torch.equal(push(x), expect)}")
    return rows

def main():
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    group = dist.group.WORLD
    graphs, rows = [], []
    for batch in (1, 16):
        x = torch.randn(batch, 4096, dtype=torch.float16, device="cuda")
        eager = timed(lambda: [dist.all_reduce(x) for _ in range(CALLS)])
        g = graph_of(lambda: [dist.all_reduce(x) for _ in range(CALLS)])
        graphs.append(g)
        nccl_graph = timed(g.replay)
        try:
            import warnings
            import torch.distributed._symmetric_memory as symm_mem
            with warnings.catch_warnings():                # needed before torch 2.10, deprecated since
                warnings.simplefilter("ignore")
                symm_mem.enable_symm_mem_for_group(group.group_name)
            s = symm_mem.empty(batch, 4096, dtype=torch.float16, device="cuda")
            symm_mem.rendezvous(s, group.group_name)
            s.copy_(x)
            expect = x.clone()
            dist.all_reduce(expect)
            got = torch.ops.symm_mem.one_shot_all_reduce(s, "sum", group.group_name)
            ok = torch.equal(got, expect)
            g2 = graph_of(lambda: [torch.ops.symm_mem.one_shot_all_reduce(s, "sum", group.group_name)
                                   for _ in range(CALLS)])
            graphs.append(g2)
            symm = f"{timed(g2.replay):.1f} us (equal to NCCL's sum: {ok})"
        except Exception as e:  # noqa: BLE001 — a probe: say why and go on
            symm = f"failed: {type(e).__name__}: {str(e)[:160]}"
        rows.append(f"batch {batch:>2} ({batch * 8} KiB): NCCL eager {eager:.1f} us, NCCL in a CUDA graph "
                    f"{nccl_graph:.1f} us, symmetric-memory one-shot in a CUDA graph {symm}; x64 a token: "
                    f"{nccl_graph * CALLS / 1e3:.2f} ms (NCCL graph)")
    if "--push" in sys.argv[1:]:
        rows += push_rows(group, graphs)
    if rank == 0:
        print(torch.cuda.get_device_name(), torch.__version__, "NCCL", torch.cuda.nccl.version(), flush=True)
        print("\n".join(rows), flush=True)
    for g in graphs:                                  # pytorch/pytorch#115388: graphs first, or destroy hangs
        g.reset()
    torch.cuda.synchronize()
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
