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
  python extensions/fast_decode.py --model random:llama-2-7b --backend hf --loop transformers   # the library's own
  deepspeed --num_gpus=2 extensions/fast_decode.py --tp-size 2 --model random:llama-2-7b   # AutoTP shards, compiled

How a step runs (--step): "compiled" (torch.compile: fused kernels in CUDA graphs) for a plain model on a GPU;
"cuda-graph" (the eager step's kernels captured as one graph) for bitsandbytes; "eager" on a CPU and for LLM.int8 with
outliers, whose every matmul waits for the host. Two more steps close the gap to the bandwidth bound, each a small
function: fuse_projections() (--no-fuse to compare) and inductor_tuning() (--no-tune; --pdl off: without inductor's
programmatic dependent launches, on by default at --tp-size 1 where the GPU can). Under tensor parallel (第六节)
the step is the same one over each rank's shard, its all-reduces traced into the compiled step or captured in the
graph; extensions/tp_all_reduce.py makes them one kernel each (--all-reduce).

--loop transformers is the library's answer to the same problem: generate(..., cache_implementation="static"), whose
decode step transformers compiles itself on its first calls; it samples too. Both loops are checked against the
unwrapped model like any engine (rounding tolerance: a compiled step fuses kernels). Measured: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
from typing import Annotated, Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402

STEPS = ("compiled", "cuda-graph", "eager")             # how a decode step runs (decode_step)

@dataclasses.dataclass
class FastDecodeConfig(lesson.DeployConfig):
    """extensions/fast_decode.py: the decode loop and how its step runs"""
    loop: Annotated[Literal["ours", "transformers"], "ours: the greedy loop of this file; transformers: generate() "
                    "on a static KV cache, compiled by transformers"] = "ours"
    step: Annotated[Literal["auto", *STEPS], "how a decode step runs; auto: compiled (plain model on a GPU), "
                    "cuda-graph (bitsandbytes), eager (CPU; LLM.int8 with outliers)"] = "auto"
    fuse: Annotated[bool, "one matmul for q/k/v and one for gate/up, where they are plain linears or 4-bit "
                    "weight-only layers"] = True
    tune: Annotated[bool, "torch.compile's coordinate-descent tuning of a compiled step's kernels"] = True
    pdl: Annotated[Literal["auto", "on", "off"], "a compiled step's kernels as programmatic dependent launches "
                   "(Hopper and later: each starts while the one before it ends; torch.compile's own option, off in "
                   "torch by default); auto: on at --tp-size 1 (measured faster there, fp16 and 4-bit), off under "
                   "tensor parallel (not measured); on: --step compiled or auto only"] = "auto"
    all_reduce: Annotated[Literal["push", "one-shot", "nccl"], "tensor parallel, compiled step: push (no barrier), "
                          "one-shot (symmetric memory) or NCCL's (extensions/tp_all_reduce.py)"] = "push"
    attention: Annotated[Literal["auto", "sdpa", "triton"], "a decode step's attention: sdpa (transformers' path: "
                         "PyTorch's SDPA) or triton (extensions/decode_attention.py's split-KV kernel; GPU only); "
                         "auto: triton on a GPU at one row a step and --tp-size 1 where the model allows it (measured "
                         "faster there with 4-bit weights, 7B and 70B), else sdpa"] = "auto"

def validate(config: FastDecodeConfig) -> None:
    """The loop's own refusals (the lesson's validate() runs first)."""
    loop_flags = [f for f in ("step", "fuse", "tune", "pdl", "all_reduce", "attention")
                  if getattr(config, f) != getattr(FastDecodeConfig, f)]
    if config.pdl == "on" and config.step in ("cuda-graph", "eager"):
        raise lesson.UsageError(f"--pdl on sets how torch.compile launches a compiled step's kernels; --step "
                                f"{config.step} compiles nothing: drop --pdl, or use --step compiled.")
    if config.loop == "transformers" and loop_flags:
        raise lesson.UsageError(f"--{loop_flags[0].replace('_', '-')} sets how this file's loop runs; drop it, or "
                                "drop --loop transformers.")
    import torch
    check_attention(config.attention, config.device != "cpu" and torch.cuda.is_available())

def check_attention(attention: str, on_gpu: bool) -> None:
    """--attention triton runs on a GPU only (this file's loop and serve.py's)."""
    if attention == "triton" and not on_gpu:
        raise lesson.UsageError("--attention triton runs a GPU kernel and no CUDA GPU is used here; drop it, or run "
                                "on a GPU.")

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
        """Output `index` of one matmul over several linears' concatenated rows (`fused`: an nn.Linear, or a
        quantized layer's concatenation). Part 0, called first (q_proj, gate_proj), holds the fused module and runs
        it; the others (k_proj, v_proj; up_proj), called next on the same input, hand out their slice, and the last
        one drops the held outputs (nothing escapes a compiled step)."""

        def __init__(self, fused, sizes, index, held):
            super().__init__()
            self.index, self.sizes, self.held = index, sizes, held
            if index == 0:                  # the fused weights belong to part 0 (counted once in parameters())
                self.fused = fused

        def forward(self, x):
            if self.index == 0:
                self.held["out"] = self.fused(x).split(self.sizes, -1)
            out = self.held["out"][self.index]
            if self.index == len(self.sizes) - 1:
                self.held["out"] = None
            return out
    return Part

@functools.cache
def one_counter_cache():
    """OneCounterCache (defined on first use): transformers' StaticCache whose layers share one write position.

    transformers' StaticLayer keeps a position counter of its own and advances it in place as it writes its keys and
    values: in a compiled step that is a one-element kernel a layer (32 a 7B step) on the step's critical path. Here
    every layer writes at the one counter, and the last layer advances it once a step; the positions written, the
    mask (built from layer 0's count before the first layer) and the cache's length between steps are the same. The
    loop here and serve.py's take it (serve.py moves the one counter, where it moved one a layer)."""
    import torch
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    class OneCounterLayer(StaticLayer):
        def __init__(self, max_cache_len: int, shared: dict, advances: bool):
            super().__init__(max_cache_len)
            self.shared, self.advances = shared, advances
            self.cumulative_length = shared["counter"]

        def lazy_initialization(self, key_states, value_states) -> None:
            # StaticLayer moves its counter to the keys' device: the first layer moves the shared one, and the others
            # take that (its .to() is then the same tensor)
            if self.shared["counter"].device != key_states.device:
                self.shared["counter"] = self.shared["counter"].to(key_states.device)
            self.cumulative_length = self.shared["counter"]
            super().lazy_initialization(key_states, value_states)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            kv_length = key_states.shape[-2]
            positions = torch.arange(kv_length, device=self.device) + self.cumulative_length
            self.keys.index_copy_(2, positions, key_states)
            self.values.index_copy_(2, positions, value_states)
            if self.advances:
                self.cumulative_length.add_(kv_length)
            return self.keys, self.values

    class OneCounterCache(StaticCache):
        def __init__(self, config, max_cache_len: int):
            super().__init__(config, max_cache_len=max_cache_len)
            if all(type(layer) is StaticLayer for layer in self.layers):     # (sliding-window models: as they are)
                shared = {"counter": torch.tensor(0, dtype=int)}
                n = len(self.layers)
                self.layers = [OneCounterLayer(max_cache_len, shared, i == n - 1) for i in range(n)]
    return OneCounterCache

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

def fused_matmul(layers) -> tuple:
    """(module, sizes): one module computing `layers`' outputs side by side, and each one's size; (None, None) where
    they cannot be one. Plain matmuls: an nn.Linear over their concatenated weights. Layers of one type with a
    `concatenate` classmethod (extensions/quantized_matmul.py's Int4WeightOnly: the 4-bit storage stacked row by
    row) build their own, or refuse (None)."""
    import torch
    if all(plain_matmul(x) for x in layers):
        if len({x.weight.shape[1] for x in layers}) > 1 or len({x.bias is None for x in layers}) > 1:
            return None, None
        with torch.no_grad():
            weight = torch.cat([x.weight for x in layers])
            bias = None if layers[0].bias is None else torch.cat([x.bias for x in layers])
        fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        fused.weight = torch.nn.Parameter(weight, requires_grad=False)
        fused.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        return fused, [x.weight.shape[0] for x in layers]
    kind = type(layers[0])
    if callable(getattr(kind, "concatenate", None)) and all(type(x) is kind for x in layers):
        fused = kind.concatenate(layers)
        if isinstance(fused, torch.nn.Module):
            return fused, [x.out_features for x in layers]
    return None, None

def fuse_projections(model) -> int:
    """One matmul for q, k and v, and one for gate and up, in each layer where they can be one (fused_matmul): plain
    matmuls (unquantized; at tp N each rank's column-parallel shards), and quantized_matmul.py's 4-bit weight-only
    layers (--quant 4bit's default) - what DeepSpeed's injected kernels and gpt-fast do. At batch 1 a decode step is a
    chain of matrix-vector products; three that read the same input become one bigger kernel. bitsandbytes' own
    Linear4bit and Linear8bitLt, tensor_parallel.py's quantized shards and int8 weight-only layers are left as they
    are. The fused copy replaces the parts (their weights are freed with them). Checked like the rest of the step: the
    engine against the unwrapped model. Returns how many groups were fused (--no-fuse: none, to measure one against
    the other)."""
    count = 0
    for module in list(model.modules()):
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            layers = [getattr(module, n, None) for n in names]
            if any(x is None for x in layers):
                continue
            fused, sizes = fused_matmul(layers)
            if fused is None:
                continue
            held = {}
            for i, name in enumerate(names):
                setattr(module, name, part_class()(fused, sizes, i, held))
            count += 1
    return count

def inductor_tuning(on: bool, pdl: str = "off", tp_size: int = 1) -> None:
    """torch.compile's coordinate-descent tuning of each generated kernel's block sizes (gpt-fast turns it on): the
    decode step's matrix-vector kernels get sizes that read memory faster, at a longer first compile. pdl (--pdl):
    inductor launches its kernels as programmatic dependent launches where the GPU can (each waits for the one before
    it only where it reads that one's output; inductor leaves it off before Hopper), so a step of ~300 small kernels
    loses less time between them; auto: on at tp_size 1, where it was measured, and where torch has the option."""
    import torch._inductor.config as inductor
    inductor.coordinate_descent_tuning = on
    if hasattr(inductor.triton, "enable_pdl"):               # torch >= 2.9
        inductor.triton.enable_pdl = pdl == "on" or (pdl == "auto" and tp_size == 1)
    elif pdl == "on":
        raise lesson.UsageError("--pdl on needs torch.compile's enable_pdl option (torch 2.9 or later); drop it.")

def decode_step(model, device, config: FastDecodeConfig) -> tuple:
    """(step, mode, all_reduce): the one-token forward, how it runs (config.step; auto: see the module docstring),
    and the kind of all-reduce a compiled tensor-parallel step uses (None: none lowered)."""
    import torch
    step = functools.partial(forward_last, model)
    # bitsandbytes layers, whether transformers put them there or tensor_parallel.py did (its shards)
    quantized = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    outliers = any(getattr(getattr(m, "state", None), "threshold", 0) > 0 for m in quantized)
    mode = config.step if config.step != "auto" else \
        "eager" if device.type != "cuda" or outliers else "cuda-graph" if quantized else "compiled"
    if mode == "cuda-graph":
        return GraphStep(step), mode, None
    if mode == "compiled":
        inductor_tuning(config.tune, config.pdl, config.tp_size)
        options = layer_options(model)
        from extensions.tp_all_reduce import symmetric_all_reduce
        if symmetric_all_reduce(model, config.all_reduce):
            # The symmetric buffers are allocated on the compiled step's first run and kept; torch.compile's own
            # CUDA graphs (cudagraph trees) would hold them in their memory pool ("tensors in the cudagraph pool not
            # tracked as outputs"), so the compiled step is captured by GraphStep instead.
            return GraphStep(torch.compile(step, fullgraph=True, dynamic=False,
                                           options={"triton.cudagraphs": False, **options})), mode, config.all_reduce
        if options:       # torch.compile takes a mode or options: "reduce-overhead" is triton.cudagraphs, no more
            return torch.compile(step, fullgraph=True, dynamic=False,
                                 options={"triton.cudagraphs": True, **options}), mode, None
        return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False), mode, None
    return step, mode, None

def kernel_attention_wanted(attention: str, on_gpu: bool, rows: int, tp_size: int) -> bool:
    """--attention: is decode_attention.py's kernel wanted (triton; auto on a GPU at one row a step and tp 1)?"""
    return attention == "triton" or (attention == "auto" and on_gpu and rows == 1 and tp_size == 1)

def use_attention(model, attention: str, rows: int, tp_size: int) -> str:
    """--attention: a decode step's attention as extensions/decode_attention.py's kernel or transformers' sdpa (set
    after the lesson took its reference, so the engine is checked against the model's own attention); the one used.
    auto takes the kernel where it was measured faster (a GPU, one row a step, one rank: benchmarks/README.md) and
    the model allows it, and says so; elsewhere (more rows, tensor parallel) the kernel runs only when asked."""
    if not kernel_attention_wanted(attention, next(model.parameters()).is_cuda, rows, tp_size):
        return "sdpa"
    from extensions import decode_attention
    why_not = decode_attention.use(model)
    if why_not and attention == "triton":
        raise lesson.UsageError(f"--attention triton: {why_not}; drop --attention.")
    lesson.log(f"[attention] --attention {attention}: " + (f"sdpa, as the split-KV kernel cannot take this model: "
                                                           f"{why_not}" if why_not else "the split-KV kernel"))
    return "sdpa" if why_not else "triton"

def layer_options(model) -> dict:
    """The torch.compile options that the model's layers carry as `inductor_options` (kernel_4bit.INDUCTOR_OPTIONS:
    the 4-bit matvec's layout of x written by the kernel that makes x)."""
    return {k: v for m in model.modules() for k, v in getattr(m, "inductor_options", {}).items()}

def release_step(step, mode: str) -> None:
    """Free what decode_step() captured, then wait for the GPU; before the ranks leave, graphs that captured NCCL
    calls must be gone, or NCCL's teardown waits for them forever (GraphStep.release)."""
    import torch
    if isinstance(step, GraphStep):
        step.release()
    if mode == "compiled":
        torch._dynamo.reset()                     # drops the compiled step and its CUDA graphs (cudagraph trees)
        from extensions import tp_all_reduce
        tp_all_reduce.disable()                   # its buffers, once no graph launches the kernel
    if torch.cuda.is_available():
        torch.cuda.synchronize()

def greedy_token(logits, i: int, done, eos, pad_token_id: int, min_new_tokens: int):
    """generate()'s greedy choice of new token i, for every greedy loop here (serve.py's and fastgen.py's too): EOS
    banned before min_new_tokens, padding for the rows that have ended; `done` (a row has ended) updated in place."""
    import torch
    if i < min_new_tokens:
        logits = logits.index_fill(-1, eos, -math.inf)
    token = torch.where(done, pad_token_id, logits.argmax(-1))
    done |= torch.isin(token, eos)
    return token

def greedy_loop(logits, next_logits, max_new_tokens: int, eos, pad_token_id: int, min_new_tokens: int,
                output_logits: bool, ended) -> tuple[list, list]:
    """generate()'s greedy decode over any step, for every loop here: from the prefill's last `logits`, choose a token
    (greedy_token), then next_logits(token) gives the logits after it, until max_new_tokens or ended(i, done) (has
    every row ended?). Returns the tokens chosen and, if asked, each step's logits (on the host, for verify())."""
    import torch
    done, tokens, step_logits = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), [], []
    for i in range(max_new_tokens):
        logits = logits.float()
        if output_logits:
            step_logits.append(logits.cpu())
        token = greedy_token(logits, i, done, eos, pad_token_id, min_new_tokens)
        tokens.append(token)
        if i == max_new_tokens - 1 or ended(i, done):
            break
        logits = next_logits(token)
    return tokens, step_logits

def generate_output(input_ids, tokens: list, step_logits: list, return_dict_in_generate: bool):
    """What generate() returns: the sequences (prompt and new tokens), with the step logits when asked."""
    import torch
    sequences = torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
    return argparse.Namespace(sequences=sequences, logits=step_logits) if return_dict_in_generate else sequences

def eos_tensor(module, device):
    """The model's EOS ids as a tensor on `device`, what greedy_token() takes."""
    import torch
    return torch.tensor(sorted(lesson.eos_ids(module) - {None}), dtype=torch.long, device=device)

class FastGreedy(lesson.Decoder):
    """Greedy decoding written out (gpt-fast's recipe) behind transformers' generate() interface.

    A static KV cache (one per batch shape, kept) gives every decode step the same shapes, so on a GPU a step is one
    CUDA graph (decode_step): one launch a token instead of hundreds of kernels issued from Python. Per step only an
    argmax runs in Python, and the host asks "has every row ended?" once every 16 steps, where generate() waits
    every step. Left padding, positions, EOS and padding follow generate() (tests compare the two)."""

    warmup_runs = 2          # the lesson's measure() warms up at least this often: the first two calls compile

    def __init__(self, engine, config: FastDecodeConfig):
        import torch
        super().__init__(engine, config)
        self.fused = fuse_projections(self.module) if config.fuse else 0
        use_attention(self.module, config.attention, config.batch_size, config.tp_size)
        self.step, self.mode, self.all_reduce = decode_step(self.module, next(self.module.parameters()).device, config)
        self.caches = {}
        # Tensor parallel: the ranks, which must all run the same number of steps (each step all-reduces).
        dist = torch.distributed
        self.ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @classmethod
    def validate(cls, config: FastDecodeConfig) -> None:
        if config.do_sample:
            raise lesson.UsageError("this decode loop is greedy; drop --do-sample, or add --loop transformers.")
        validate(config)

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

    def generate(self, input_ids, attention_mask, max_new_tokens: int, pad_token_id: int = 0, do_sample=False,
                 min_new_tokens: int = 0, output_logits=False, return_dict_in_generate=False):
        import torch
        assert not do_sample, "greedy only: FastGreedy.validate() refuses --do-sample"
        (b, t), dev, mask = input_ids.shape, input_ids.device, attention_mask
        # 1) The static KV cache of this shape (its layers writing at one counter: one_counter_cache), emptied.
        size = t + max_new_tokens
        if (b, size) not in self.caches:
            self.caches[b, size] = one_counter_cache()(self.module.config, max_cache_len=size)
        cache = self.caches[b, size]
        cache.reset()
        # 2) Left padding: a row's positions count its real tokens; the mask spans the whole cache (one shape for
        #    every step) and is left out when nothing is padded.
        full_mask = None if bool(mask.all()) else torch.cat([mask, mask.new_ones(b, max_new_tokens)], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # 3) Prefill: the whole prompt in one forward.
        logits = forward_last(self.module, input_ids, pos, torch.arange(t, device=dev), full_mask, cache)
        at = {"pos": pos[:, -1:] + 1, "slot": torch.tensor([t], device=dev)}     # where the first new token goes

        # 4) Decode: argmax, then one step (one CUDA graph on a GPU) per token.
        def next_logits(token):
            if self.mode == "compiled":
                torch.compiler.cudagraph_mark_step_begin()    # the last step's outputs are consumed: reuse them
            out = self.step(token[:, None], at["pos"], at["slot"], full_mask, cache)
            at["pos"], at["slot"] = at["pos"] + 1, at["slot"] + 1
            return out
        tokens, step_logits = greedy_loop(logits, next_logits, max_new_tokens, eos_tensor(self.module, dev),
                                          pad_token_id, min_new_tokens, output_logits,
                                          lambda i, done: i % 16 == 15 and self.all_ended(done))
        return generate_output(input_ids, tokens, step_logits, return_dict_in_generate)

class StaticGenerate(lesson.Decoder):
    """--loop transformers: the engine's own generate() on a static KV cache, which transformers compiles (CUDA graphs
    included) on its first calls on a GPU. Greedy and sampled decoding alike."""
    mode, warmup_runs = "static-generate", 2        # transformers compiles on the first two calls

    @classmethod
    def validate(cls, config: FastDecodeConfig) -> None:
        if config.tp_size > 1:
            raise lesson.UsageError("--loop transformers runs on one device: transformers' compiled static-cache step "
                                    "does not know DeepSpeed's tensor-parallel shards; drop --tp-size.")
        validate(config)

    def generate(self, **kwargs):
        return self.module.generate(**kwargs, cache_implementation="static")

def decoder_of(config: FastDecodeConfig) -> type[lesson.Decoder]:
    """The loop --loop asks for."""
    return FastGreedy if config.loop == "ours" else StaticGenerate

def main(argv=None) -> int:
    return lesson.main(argv, prog="extensions/fast_decode.py", config_class=FastDecodeConfig,
                       job=lambda config: lesson.run(config, decoder_of(config)))

if __name__ == "__main__":
    sys.exit(main())
