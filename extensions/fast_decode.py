#!/usr/bin/env python3
"""extensions/fast_decode.py — 第十节 KV Cache: a static KV cache and one CUDA graph per decode step.

The lesson (ds_bnb_infer.py) decodes with transformers' generate(): at batch 1 on a GPU each step launches hundreds
of small kernels from Python and waits for the GPU, so decode runs far below the memory-bandwidth bound (README
第八节). This file is the same run with another decode loop passed into the lesson's init_engine(): the KV cache is
allocated once at its full length (StaticCache), so every decode step has the same shapes and can be captured as
one CUDA graph. Everything else, verification included, is the lesson's:

  python extensions/fast_decode.py --model random:tiny --backend hf                 # CPU: the same loop, eager
  python extensions/fast_decode.py --model random:llama-2-7b --backend hf           # one GPU, fp16: compiled
  python extensions/fast_decode.py --model random:llama-2-7b --backend hf --quant 4bit   # cuda-graph
  deepspeed --num_gpus=2 extensions/fast_decode.py --tp-size 2 --model random:llama-2-7b   # AutoTP shards, compiled

Two more steps close the gap to the bandwidth bound, each one small function (measured: benchmarks/README.md):
fuse_projections() makes q/k/v and gate/up one matmul each, and inductor_tuning() lets torch.compile tune its kernels.
Under tensor parallel, symmetric_all_reduce() makes each small all-reduce one kernel over NVLink without a barrier.

Under tensor parallel (第六节) the step is the same one over each rank's shard: AutoTP's all-reduces (two a layer, one
for lm_head) are traced into the compiled step, or captured in the CUDA graph (NCCL supports both), and every rank
runs the same steps. FAST_DECODE_MODE=compiled|cuda-graph|eager overrides the choice (to measure one against another).

The output is checked against the unwrapped model like any engine (rounding tolerance: a compiled step fuses
kernels). Measured speeds, with card and date: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402

MODES = ("compiled", "cuda-graph", "eager")             # how a decode step runs (decode_step)

def forward_last(model, ids, pos, slots, mask, cache):
    """One forward on the static KV cache (prefill: the prompt; decode: one token a row): the last logits."""
    return model(input_ids=ids, position_ids=pos, cache_position=slots, attention_mask=mask,
                 past_key_values=cache, use_cache=True).logits[:, -1]

class GraphStep:
    """A decode step captured once as a CUDA graph, then replayed: the eager step's very kernels, launched as one,
    so a bitsandbytes model (which transformers keeps torch.compile from rewriting) gives exactly its eager numbers.
    One graph per KV cache: a graph holds the addresses it was captured with."""

    def __init__(self, step):
        self.step, self.graphs = step, {}

    def __call__(self, *args):                               # args: token, positions, slot, mask, cache
        import torch
        *inputs, cache = args
        if id(cache) in self.graphs:
            graph, static, out = self.graphs[id(cache)]
            for buf, x in zip(static, inputs):
                if buf is not None:
                    buf.copy_(x)
            graph.replay()
            return out
        # Run the step eagerly on a side stream, as capture needs (lazy cuBLAS and bitsandbytes setup happens then,
        # not in the graph); then record the same step.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(*args)
        torch.cuda.current_stream().wait_stream(side)
        static = [None if x is None else x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.step(*static, cache)
        self.graphs[id(cache)] = (graph, static, static_out)
        return out

    def release(self):
        """Free the captured graphs. A graph that captured NCCL calls holds the communicator: NCCL's teardown
        waits for every such graph to be gone, so a process that destroys its process group first hangs there
        (pytorch/pytorch#115388)."""
        for graph, _, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()

@functools.cache
def part_class():
    """Part: one output of a fused matmul (defined on first use: torch loads only when a run needs it)."""
    import torch

    class Part(torch.nn.Module):
        """Output `index` of one matmul over several linears' concatenated weights. Part 0, called first (q_proj,
        gate_proj), runs the matmul; the others (k_proj, v_proj; up_proj), called next on the same input, hand out
        their slice, and the last one drops the held outputs (nothing escapes a compiled step)."""

        def __init__(self, weight, bias, sizes, index, held):
            super().__init__()
            self.index, self.sizes, self.held = index, sizes, held
            if index == 0:                  # the fused weight belongs to part 0 (counted once in parameters())
                self.weight = torch.nn.Parameter(weight, requires_grad=False)
                self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

        def forward(self, x):
            if self.index == 0:
                self.held["out"] = torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, -1)
            out = self.held["out"][self.index]
            if self.index == len(self.sizes) - 1:
                self.held["out"] = None
            return out
    return Part

def plain_matmul(layer) -> bool:
    """Is `layer` x @ W.T + b and nothing else: an nn.Linear, or AutoTP's column-parallel LinearLayer (its forward
    is that matmul on this rank's rows, with no collective, when it neither gathers its output nor overlaps)?"""
    import torch
    if type(layer) is torch.nn.Linear:
        return True
    try:
        from deepspeed.module_inject.layers import LinearLayer
    except ImportError:
        return False
    return type(layer) is LinearLayer and not layer.gather_output and not LinearLayer.tp_overlap_comm

def fuse_projections(model) -> int:
    """One matmul for q, k and v, and one for gate and up, in each layer where they are plain matmuls (unquantized;
    at tp N each rank's column-parallel shards): what DeepSpeed's injected kernels and gpt-fast do. At batch 1 a decode
    step is a chain of matrix-vector products; three that read the same input become one bigger kernel. bitsandbytes
    layers are left as they are. Checked like the rest of the step: the engine against the unwrapped model. Returns
    how many groups were fused; FAST_DECODE_FUSE=0 turns it off (to measure one against the other)."""
    import torch
    if os.environ.get("FAST_DECODE_FUSE", "1") == "0":
        return 0
    count = 0
    for module in list(model.modules()):
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            linears = [getattr(module, n, None) for n in names]
            if not all(plain_matmul(x) for x in linears) or \
                    len({x.weight.shape[1] for x in linears}) > 1 or len({x.bias is None for x in linears}) > 1:
                continue
            with torch.no_grad():
                weight = torch.cat([x.weight for x in linears])
                bias = None if linears[0].bias is None else torch.cat([x.bias for x in linears])
            held = {}
            parts = [part_class()(weight, bias, [x.weight.shape[0] for x in linears], i, held)
                     for i in range(len(names))]
            for name, part in zip(names, parts):
                setattr(module, name, part)
            count += 1
    return count

def inductor_tuning() -> bool:
    """torch.compile's coordinate-descent tuning of each generated kernel's block sizes (gpt-fast turns it on): the
    decode step's matrix-vector kernels get sizes that read memory faster, at a longer first compile.
    FAST_DECODE_TUNE=0 turns it off."""
    import torch._inductor.config as inductor
    inductor.coordinate_descent_tuning = os.environ.get("FAST_DECODE_TUNE", "1") != "0"
    return inductor.coordinate_descent_tuning

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
PUSH_NUMEL = ONE_SHOT_BYTES // 4   # and up to this many fp32 words, push_all_reduce() (FAST_DECODE_PUSH=0: one-shot)

def symmetric_all_reduce(model) -> bool:
    """Under tensor parallel on GPUs (NCCL), let torch.compile lower each all-reduce of the decode step that is
    small (up to ONE_SHOT_BYTES; Llama-2-7B's hidden state is 16 KB a row in fp32) to PyTorch's one-shot all-reduce
    over symmetric memory: each rank's partial sum is written where its peers can read it over NVLink, and one kernel on
    every rank reads and adds them all. NCCL's ring pays its protocol's fixed cost on each of the step's 65
    all-reduces (two a layer and the head's), which at batch 1 is much of the step. Inductor does this itself
    (config._collective.auto_select) for process groups with symmetric memory enabled. Its kernel adds bf16 and fp32
    only ("not implemented for 'Half'"), so the row-parallel layers add in fp32 (RowParallelFp32); bf16 models too,
    as the lowering of AutoTP's own in-place sum of a matmul's output failed there ("a previous allocation with the
    same alloc_id is still active"). The one-shot kernel still makes two cross-GPU barriers a call; sums of up to
    PUSH_NUMEL words go to push_all_reduce() instead (extensions/push_all_reduce.py: no barrier; FAST_DECODE_PUSH=0
    keeps the one-shot). FAST_DECODE_SYMM=0 turns all of it off; returns whether it is on."""
    import torch
    dist = torch.distributed
    if os.environ.get("FAST_DECODE_SYMM", "1") == "0" or not (dist.is_available() and dist.is_initialized()):
        return False
    groups = {m.mp_group for m in model.modules() if getattr(m, "mp_group", None) is not None}
    if not groups or any(dist.get_backend(g) != "nccl" for g in groups):
        return False                                  # one GPU, or CPU ranks (gloo): nothing to lower
    import torch._inductor.config as inductor
    from deepspeed.module_inject.layers import LinearAllreduce
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    from extensions import push_all_reduce
    push = os.environ.get("FAST_DECODE_PUSH", "1") != "0"
    for group in sorted(groups, key=lambda g: g.group_name):     # collective calls: the same order on every rank
        enable_symm_mem_for_group(group.group_name)
        if push:
            push_all_reduce.enable(group, PUSH_NUMEL)
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

def decode_step(model, device, mode: str | None = None) -> tuple:
    """(step, mode): the one-token forward and how it runs. "compiled" (torch.compile: fused kernels in
    CUDA graphs) for a plain model on a GPU; "cuda-graph" (GraphStep) for bitsandbytes on a GPU; "eager" on a CPU
    and for LLM.int8 with outliers (threshold > 0): each of its matmuls waits for the host, which no graph holds."""
    import torch
    step = functools.partial(forward_last, model)
    # bitsandbytes layers, whether transformers put them there or tp_quant.py did (its shards)
    quantized = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    outliers = any(getattr(getattr(m, "state", None), "threshold", 0) > 0 for m in quantized)
    if mode is None:
        mode = "eager" if device.type != "cuda" or outliers else "cuda-graph" if quantized else "compiled"
    if mode == "cuda-graph":
        return GraphStep(step), mode
    if mode == "compiled":
        inductor_tuning()
        if symmetric_all_reduce(model):
            # The symmetric buffers are allocated on the compiled step's first run and kept; torch.compile's own
            # CUDA graphs (cudagraph trees) would hold them in their memory pool ("tensors in the cudagraph pool not
            # tracked as outputs"), so the compiled step is captured by GraphStep instead.
            return GraphStep(torch.compile(step, fullgraph=True, dynamic=False,
                                           options={"triton.cudagraphs": False})), mode
        return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False), mode
    return step, mode

def release_step(step, mode: str) -> None:
    """Free what decode_step() captured, then wait for the GPU; before the ranks leave, graphs that captured NCCL
    calls must be gone, or NCCL's teardown waits for them forever (GraphStep.release)."""
    import torch
    if isinstance(step, GraphStep):
        step.release()
    if mode == "compiled":
        torch._dynamo.reset()                     # drops the compiled step and its CUDA graphs (cudagraph trees)
        from extensions import push_all_reduce
        push_all_reduce.disable()                 # its buffers, once no graph launches the kernel
    if torch.cuda.is_available():
        torch.cuda.synchronize()

def greedy_token(logits, i: int, done, eos, pad_token_id: int, min_new_tokens: int):
    """generate()'s greedy choice of new token i: EOS banned before min_new_tokens, padding for the rows that have
    ended; `done` (a row has ended) is updated in place."""
    import torch
    if i < min_new_tokens:
        logits = logits.index_fill(-1, eos, -math.inf)
    token = torch.where(done, pad_token_id, logits.argmax(-1))
    done |= torch.isin(token, eos)
    return token

class FastGreedy:
    """Greedy decoding written out (gpt-fast's recipe) behind transformers' generate() interface.

    A static KV cache (one per batch shape, kept) gives every decode step the same shapes, so on a GPU a step is one
    CUDA graph (decode_step): one launch a token instead of hundreds of kernels issued from Python. Per step only an
    argmax runs in Python, and the host asks "has every row ended?" once every 16 steps, where generate() waits
    every step. Left padding, positions, EOS and padding follow generate() (tests compare the two)."""

    warmup_runs = 2          # the lesson's measure() warms up at least this often: the first two calls compile

    def __init__(self, engine, mode: str | None = None):
        import torch
        self.module = getattr(engine, "module", engine)        # a DeepSpeed engine wraps the model in .module
        self.fused = fuse_projections(self.module)
        self.step, self.mode = decode_step(self.module, next(self.module.parameters()).device,
                                           mode or os.environ.get("FAST_DECODE_MODE") or None)
        self.symmetric = self.mode == "compiled" and isinstance(self.step, GraphStep)    # symmetric_all_reduce()
        # symmetric_all_reduce() with push_all_reduce(): the largest sum it takes (0: none)
        self.push_numel = PUSH_NUMEL if self.symmetric and os.environ.get("FAST_DECODE_PUSH", "1") != "0" else 0
        self.caches = {}
        # Tensor parallel: the ranks, which must all run the same number of steps (each step all-reduces).
        dist = torch.distributed
        self.ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @staticmethod
    def validate(config) -> None:
        """Refuse what this loop cannot do, before anything is loaded (the lesson calls it after its validate())."""
        if config.do_sample:
            raise lesson.UsageError("fast_decode.py is a greedy decode loop; drop --do-sample, or run ds_bnb_infer.py.")
        if os.environ.get("FAST_DECODE_MODE", "") not in ("", *MODES):
            raise lesson.UsageError(f"FAST_DECODE_MODE={os.environ['FAST_DECODE_MODE']} is not one of "
                                    f"{', '.join(MODES)}; unset it to let fast_decode.py choose.")

    def all_ended(self, done) -> bool:
        """Has every row ended? Under tensor parallel every rank computes the same logits (the all-reduce hands each
        rank the same sum), so the same answer; a MIN over the ranks makes sure, as one rank stopping alone would
        leave the others waiting in their next all-reduce forever."""
        import torch
        ended = done.all().int()
        if self.ranks > 1:
            torch.distributed.all_reduce(ended, op=torch.distributed.ReduceOp.MIN)
        return bool(ended)

    def close(self) -> None:
        """Free the CUDA graphs and caches (the lesson calls this before it destroys the process group)."""
        release_step(self.step, self.mode)
        self.caches.clear()

    def __call__(self, **inputs):
        return self.module(**inputs)

    def parameters(self):
        return self.module.parameters()

    def generate(self, input_ids, attention_mask, max_new_tokens: int, pad_token_id: int = 0, do_sample=False,
                 min_new_tokens: int = 0, output_logits=False, return_dict_in_generate=False):
        import torch
        from transformers import StaticCache
        assert not do_sample, "greedy only: FastGreedy.validate() refuses --do-sample"
        (b, t), dev, mask = input_ids.shape, input_ids.device, attention_mask
        # 1) The static KV cache of this shape, emptied.
        if (b, t + max_new_tokens) not in self.caches:
            self.caches[b, t + max_new_tokens] = StaticCache(self.module.config, max_cache_len=t + max_new_tokens)
        cache = self.caches[b, t + max_new_tokens]
        cache.reset()
        # 2) Left padding: a row's positions count its real tokens; the mask spans the whole cache (one shape for
        #    every step) and is left out when nothing is padded.
        full_mask = None if bool(mask.all()) else torch.cat([mask, mask.new_ones(b, max_new_tokens)], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = torch.tensor(sorted(lesson.eos_ids(self.module) - {None}), dtype=torch.long, device=dev)
        done, tokens, step_logits = torch.zeros(b, dtype=torch.bool, device=dev), [], []
        # 3) Prefill: the whole prompt in one forward.
        logits = forward_last(self.module, input_ids, pos, torch.arange(t, device=dev), full_mask, cache)
        pos, slot = pos[:, -1:] + 1, torch.tensor([t], device=dev)       # where the first new token goes
        # 4) Decode: argmax, then one step (one CUDA graph on a GPU) per token.
        for i in range(max_new_tokens):
            logits = logits.float()
            if output_logits:
                step_logits.append(logits.cpu())
            token = greedy_token(logits, i, done, eos, pad_token_id, min_new_tokens)
            tokens.append(token)
            if i == max_new_tokens - 1 or (i % 16 == 15 and self.all_ended(done)):
                break
            if self.mode == "compiled":
                torch.compiler.cudagraph_mark_step_begin()    # the last step's outputs are consumed: reuse them
            logits = self.step(token[:, None], pos, slot, full_mask, cache)
            pos, slot = pos + 1, slot + 1
        sequences = torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
        return argparse.Namespace(sequences=sequences, logits=step_logits) if return_dict_in_generate else sequences

def main(argv=None) -> int:
    return lesson.main(argv, decoder=FastGreedy, prog="extensions/fast_decode.py")

if __name__ == "__main__":
    sys.exit(main())
