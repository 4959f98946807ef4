"""Usage (two GPUs of one host, torch only, no wheels needed): torchrun --nproc_per_node 2 benchmarks/probe_allreduce.py [--push]

Where tp 2's decode step goes (issue 11): the latency of the all-reduces AutoTP adds, 2 per layer = 64 per token for
the Llama-2-7B shape, at that step's message sizes (hidden 4096 fp16: 8 KiB a row; batch 1 and 16), on two GPUs.
Not part of the lesson: a probe.
Variants: NCCL in-place all_reduce issued eagerly; the same 64 captured in one CUDA graph (what fast_decode.py's
compiled / cuda-graph step does); torch's symmetric-memory one-shot all-reduce (P2P loads over NVLink, no
multicast) captured likewise. Each: 64 calls a replay, 5 warm-up + 30 timed replays, median per call.

`--push` adds the one-shot all-reduce of fp32 partial sums (16 KB a row) beside push_all_reduce()
(extensions/tp_all_reduce.py: each rank stores its partial sum into its peers' symmetric buffers, no barrier), with
the check against NCCL's fp32 sum, bit for bit, over calls of several sizes in a row."""
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

def push_rows(group, graphs) -> list:
    """--push: fp32 one-shot against push_all_reduce (extensions/tp_all_reduce.py), at batch 1 and 16, and the
    checks."""
    import torch.distributed._symmetric_memory as symm_mem
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from extensions.tp_all_reduce import push_all_reduce_factory
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
