"""extensions/tp_all_reduce.py — 第六节 张量并行: the all-reduces of a tensor-parallel decode step, one kernel each.

At batch 1, tp 2 all-reduces 65 times a token (two a layer and the head's), 16 KB each in fp32 for Llama-2-7B: the
time of each is the protocol's, not the bytes'. fast_decode.py's compiled step under AutoTP calls
symmetric_all_reduce() (--all-reduce push|one-shot|nccl), which swaps each row-parallel layer for one that adds its
partial sums in fp32 through one of two kernels:
  - one-shot: PyTorch's all-reduce over symmetric memory, which Inductor lowers the step's small all-reduces to;
  - push: push_all_reduce() of this file. Each rank stores its partial sum straight into its peers' symmetric buffers
    (P2P stores over NVLink), and each reads what its peers stored there, word by word, until no word holds the
    "empty" mark (-0.0, which a sender never sends: it sends +0.0 instead, the same number in a sum). The data is its
    own flag, so there is no barrier before or after. Three slots a buffer, used in turn: a peer can be at most one
    call ahead, and a reader empties what it read. Sums are taken in rank order, so every rank gets the same bits;
    for two ranks, the bits of NCCL's fp32 sum.
Conditions of push: every rank makes the same calls in the same order with the same sizes (a tensor-parallel step
does), the whole grid is resident at once (<= a few hundred blocks of 1024 words: max_numel), and the ranks' GPUs
reach each other's memory (NVLink or PCIe P2P). enable() registers it as the custom op ds_bnb_infer::push_all_reduce,
so torch.compile keeps it as one call in the compiled step. Checked against NCCL's sum on GPUs, and the protocol on a
CPU under Triton's interpreter (benchmarks/push_all_reduce_interpret.py); measured: benchmarks/README.md.
"""
from __future__ import annotations

import functools

import torch

@functools.cache
def row_parallel_fp32_class():
    """RowParallelFp32 (defined on first use: torch loads only when a run needs it)."""
    import torch
    from deepspeed.module_inject.layers import LmHeadLinearAllreduce

    class RowParallelFp32(torch.nn.Module):
        """An AutoTP row-parallel layer (LinearAllreduce: o_proj, down_proj; LmHeadLinearAllreduce: lm_head) whose
        partial sums are added in fp32, then rounded to the model's dtype once. For 2 ranks that is the very
        number NCCL's fp16 or bf16 sum gives (the exact sum of two such values, rounded once)."""

        def __init__(self, layer, push_group: str | None):
            super().__init__()
            self.layer = layer
            self.push_group = push_group    # the group whose push_all_reduce adds the small sums; None: NCCL's

        @property
        def weight(self):               # this rank's shard, where the lesson's report reads it (lm_head's)
            return self.layer.weight

        def forward(self, x):
            layer = self.layer
            if type(layer) is LmHeadLinearAllreduce:          # its shard of the input features, as its forward
                sizes = layer._partition_sizes
                start = sum(sizes[:layer.tp_index])
                x = x[..., start:start + sizes[layer.tp_index]]
            out = torch.matmul(x, layer.weight.transpose(-1, -2)).float()
            if self.push_group is not None and out.numel() <= PUSH_NUMEL:
                out = torch.ops.ds_bnb_infer.push_all_reduce(out, self.push_group)
            else:
                torch.distributed.all_reduce(out, group=layer.mp_group)
            out = out.to(x.dtype)
            return out if layer.bias is None else out + layer.bias
    return RowParallelFp32

ONE_SHOT_BYTES = 512 * 1024   # all-reduces up to this size run one-shot: the fp32 hidden state of up to 32 rows (7B)
PUSH_NUMEL = ONE_SHOT_BYTES // 4   # and up to this many fp32 words, push_all_reduce() (--all-reduce push)

def symmetric_all_reduce(model, kind: str) -> bool:
    """Under tensor parallel on GPUs (NCCL), make each small all-reduce of the compiled decode step (up to
    ONE_SHOT_BYTES; Llama-2-7B's hidden state is 16 KB a row in fp32) one kernel over NVLink: "one-shot", PyTorch's
    all-reduce over symmetric memory (each rank's partial sum written where its peers read it, one kernel on every
    rank; two cross-GPU barriers a call), or "push" (push_all_reduce() below for sums of up to PUSH_NUMEL words: no
    barrier). NCCL's ring pays its protocol's fixed cost on each of the step's 65 all-reduces (two a layer and the
    head's), which at batch 1 is much of the step. The one-shot kernel adds bf16 and fp32 only, so the row-parallel
    layers add in fp32 (RowParallelFp32). kind "nccl" leaves NCCL's; returns whether anything was lowered."""
    import torch
    dist = torch.distributed
    if kind == "nccl" or not (dist.is_available() and dist.is_initialized()):
        return False
    groups = {m.mp_group for m in model.modules() if getattr(m, "mp_group", None) is not None}
    if not groups or any(dist.get_backend(g) != "nccl" for g in groups):
        return False                                  # one GPU, or CPU ranks (gloo): nothing to lower
    import torch._inductor.config as inductor
    from deepspeed.module_inject.layers import LinearAllreduce
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group
    push = kind == "push"
    for group in sorted(groups, key=lambda g: g.group_name):     # collective calls: the same order on every rank
        enable_symm_mem_for_group(group.group_name)
        if push:
            enable(group, PUSH_NUMEL)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LinearAllreduce):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr,
                    row_parallel_fp32_class()(layer, layer.mp_group.group_name if push else None))
    inductor._collective.auto_select = True
    # Inductor's default limit (128 KB) would leave batch 16's sums (256 KB) to NCCL, whose fixed cost per call is
    # what one-shot avoids. The head's all-reduce at batch 16 (vocab-wide rows, 2 MB) stays NCCL's.
    inductor._collective.one_shot_all_reduce_threshold_bytes = ONE_SHOT_BYTES
    return True

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
