"""extensions/push_all_reduce.py — 第六节 张量并行: an all-reduce for the small sums of a tensor-parallel decode step.

At batch 1, tp 2 all-reduces 65 times a token (two a layer and the head's), 16 KB each in fp32 for Llama-2-7B: the
time of each is the protocol's, not the bytes'. NCCL's ring and PyTorch's symmetric-memory one-shot (two cross-GPU
barriers a call) both pay a fixed cost per call; this kernel has no barrier, and takes about a third of the one-shot's
time (benchmarks/gpu2_allreduce_probe.py --push; its numbers, card and date in benchmarks/README.md).

How: each rank stores its partial sum straight into its peers' symmetric buffers (P2P stores over NVLink), and each
reads what its peers stored there, word by word, until no word holds the "empty" mark (-0.0, which a sender never
sends: it sends +0.0 instead, the same number in a sum). The data is its own flag, so there is no barrier before or
after. Three slots a buffer, used in turn: a peer can be at most one call ahead, and a reader empties what it read.
Sums are taken in rank order, so every rank gets the same bits; for two ranks, the bits of NCCL's fp32 sum.

Conditions: every rank makes the same calls in the same order with the same sizes (a tensor-parallel step does), the
whole grid is resident at once (<= a few hundred blocks of 1024 words: max_numel), and the ranks' GPUs reach each
other's memory (NVLink or PCIe P2P). enable() registers it as the custom op ds_bnb_infer::push_all_reduce, so
torch.compile keeps it as one call in the compiled step. Checked: against NCCL's sum on GPUs (the probe), and the
protocol on a CPU under Triton's interpreter (benchmarks/push_all_reduce_interpret.py).
"""
from __future__ import annotations

import functools

import torch

PUSH = {}          # process group name -> its push_all_reduce (what the custom op calls); filled by enable()

@functools.cache
def push_kernel():
    """The Triton kernel of push_all_reduce() (built on first use: Triton loads only where a run needs it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def push_all_reduce_kernel(x_ptr, out_ptr, buffer_ptr_addrs, counters, numel, MAX: tl.constexpr,
                               RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, EMPTY: tl.constexpr):
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
    return push_all_reduce_kernel   # (its name is what a profile shows)

def push_all_reduce_factory(group, max_numel: int):
    """push_all_reduce(x: fp32 CUDA tensor, numel <= max_numel) -> a new tensor, the sum over the group's ranks."""
    import triton
    import torch.distributed._symmetric_memory as symm_mem
    kernel, block = push_kernel(), 1024
    buf = symm_mem.empty(3 * torch.distributed.get_world_size(group) * max_numel, dtype=torch.float32, device="cuda")
    buf.fill_(-0.0)
    handle = symm_mem.rendezvous(buf, group.group_name)
    counters = torch.zeros(triton.cdiv(max_numel, block), dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.distributed.barrier(group)                                  # every buffer is empty before anyone writes

    def push_all_reduce(x):
        assert x.dtype == torch.float32 and x.is_contiguous() and x.numel() <= max_numel
        out = torch.empty_like(x)
        kernel[(triton.cdiv(x.numel(), block),)](x, out, handle.buffer_ptrs_dev, counters, x.numel(), MAX=max_numel,
                                                 RANK=handle.rank, WORLD=handle.world_size, BLOCK=block,
                                                 EMPTY=-2147483648, num_warps=4)   # EMPTY: -0.0's bits as int32
        return out
    return push_all_reduce

@functools.cache
def register_op():
    """The custom op ds_bnb_infer::push_all_reduce(x, group_name) -> the sum over that group. torch.compile keeps it as
    one call in the graph it compiles (shape: its fake, a tensor like x); the call runs the group's kernel."""
    @torch.library.custom_op("ds_bnb_infer::push_all_reduce", mutates_args=())
    def push_op(x: torch.Tensor, group_name: str) -> torch.Tensor:
        return PUSH[group_name](x)

    @push_op.register_fake
    def _(x, group_name):
        return torch.empty_like(x)
    return push_op

def enable(group, max_numel: int) -> None:
    """Make torch.ops.ds_bnb_infer.push_all_reduce(x, group.group_name) work for sums of up to max_numel words.
    Collective: every rank of the group calls it (the buffers' rendezvous)."""
    register_op()
    if group.group_name not in PUSH:
        PUSH[group.group_name] = push_all_reduce_factory(group, max_numel)

def disable() -> None:
    """Drop the buffers (after every CUDA graph that launched the kernel is gone)."""
    PUSH.clear()
