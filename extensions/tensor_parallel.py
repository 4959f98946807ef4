#!/usr/bin/env python3
"""extensions/tensor_parallel.py — 第六节 张量并行: each rank builds and holds only its own shard; bitsandbytes 8/4-bit
shards too.

The lesson's --tp-size N builds the whole model on every rank's CPU and init_inference (AutoTP) then cuts each
rank's shard out of it: N copies of the full weights in host memory at once (a 70B model in fp16: 140 GB a rank).
Here the model is built with its matrices on the meta device (shapes, no memory), init_inference shards that
skeleton (AutoTP keeps meta tensors meta), and each rank then fills its shards on its own device, a matrix at a time:
  - from a safetensors checkpoint: only the rank's slice of each tensor is read (safe_open(...).get_slice), or
  - for a random:... preset: each matrix drawn whole on the device exactly as the lesson draws it, then sliced.
A rank's host memory is what torch and CUDA take plus one tensor: the report's host_peak_rss.

--quant 8bit|4bit: the lesson refuses --quant with --tp-size > 1, as AutoTP slices a weight matrix and bitsandbytes'
packed weights are not plain matrices ("expected m1 and m2 to have the same dtype"). Here the model is sharded
first, then each rank's slice is quantized by bitsandbytes into the module transformers would have used (q, k, v,
gate, up: column-parallel; o, down: row-parallel, an all-reduce after the matmul, in the model's dtype; a bias is
added after it, once). Every shard holds the very values the unsharded quantized layer holds:
  4-bit (nf4, blocks of 64 consecutive weights of the row-major matrix): with in_features / N a multiple of 64, a
    shard's blocks are blocks of the whole matrix, so its codes and block scales are tp 1's. Double quantization
    then compresses the block scales around their mean in groups of 256 - statistics of the whole matrix - so the
    ranks exchange their scales once, compress them as tp 1 does, and keep their own slice (as fp32 scales).
  8-bit (LLM.int8: each weight row and each token's activations scaled by their absmax): a row-parallel shard sees
    part of each row, so the ranks take the MAX of their row (once) and token (each call) absmaxes; the outlier
    columns of LLM.int8 are chosen column by column, so a shard's are exactly tp 1's within its slice.
At --tp-size 1 the same code quantizes a model that the lesson cannot load (it builds the whole model unquantized
first, 138 GB for a 70B model in fp16): each linear is quantized as soon as its matrix is filled.

--matmul (quantized_matmul.py's flag; auto by default): which matmul multiplies a shard's stored weights. 4-bit (and
plain int8, --int8-threshold 0) shards multiply weight-only, as the lesson's 4-bit model does in quantized_matmul.py
and serve.py: the same packed codes and scales, dequantized inside extensions/kernel_4bit.py's kernel on a GPU (in
torch on a CPU; bitsandbytes' dequantize_4bit bit for bit), because bitsandbytes' own 4-bit kernel reads the weights
at a third of an H100's bandwidth (kernel_4bit.py says why) - and a 70B model at --tp-size 1 is all 4-bit matmuls.
Weight-only int8 multiplies in the activations' dtype, so a row-parallel shard needs no token absmax from the other
ranks. --matmul bitsandbytes keeps bitsandbytes' layers (Linear4bit, Linear8bitLt), for comparison. The reference
below multiplies with the same matmul as the shards, so the check compares like with like: tensor parallel only.

Verification, for models no one device can hold as a reference: rank 0 builds the first VERIFY_LAYERS layers of the
same model (the same embeddings, layers, final norm and head) unsharded on its device - quantized by the lesson at
tp 1 when --quant is given; the engine, cut to that depth for the check, must match it within rounding (tensor
parallel sums in another order). That checks the slicing, loading and quantizing of every kind of tensor; the
remaining layers are loaded by the same code. --fast-decode adds fast_decode.py's loop (a compiled step, or a CUDA
graph of bitsandbytes' kernels and the all-reduces), checked against the engine at full depth.

  deepspeed --num_gpus=2 extensions/tensor_parallel.py --tp-size 2 --model random:llama-2-7b --fast-decode
  deepspeed --num_gpus=2 extensions/tensor_parallel.py --tp-size 2 --model random:llama-2-70b --fast-decode \\
      --step cuda-graph                                        # 2 x 80 GB GPUs; a CUDA graph: no long compile
  python extensions/tensor_parallel.py --tp-size 1 --model random:llama-2-70b --quant 4bit --fast-decode \\
      --bnb-4bit-compute-dtype fp16                            # one GPU; bf16's rounding fails the check (README 六)
  deepspeed --num_gpus=2 extensions/tensor_parallel.py --tp-size 2 --model random:tiny --quant 8bit --dtype fp32  # CPU
  deepspeed --num_gpus=2 extensions/tensor_parallel.py --tp-size 2 --model random:tiny --quant 4bit --dtype fp32 \
      --matmul bitsandbytes                                    # CPU; bitsandbytes' own 4-bit kernel, for comparison
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
from typing import Annotated

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402
from extensions.fast_decode import FastGreedy, decoder_of  # noqa: E402
from extensions.quantized_matmul import QuantizedMatmulConfig, check_matmuls, matmul_of, swap_matmuls, \
    validate_matmul  # noqa: E402

VERIFY_LAYERS = 2           # the reference's depth: every kind of tensor, a layer's output feeding the next
BLOCK = 64                  # bitsandbytes' 4-bit block size (the lesson's BitsAndBytesConfig default)

@dataclasses.dataclass
class TensorParallelConfig(QuantizedMatmulConfig):
    """extensions/tensor_parallel.py: sharded loading; --quant 8bit|4bit quantizes each shard (--matmul: its matmul)"""
    fast_decode: Annotated[bool, "decode with extensions/fast_decode.py's loop (its flags: --step, --fuse, ...)"] = False


# ---- The skeleton: shapes without memory ----

@functools.cache
def matrices_on_meta_class():
    """MatricesOnMeta (defined on first use: torch loads only when a run needs it)."""
    import torch

    class MatricesOnMeta(torch.overrides.TorchFunctionMode):
        """Inside it, every tensor of 2+ dims that torch.empty makes (nn.Linear's and nn.Embedding's weights) is made
        on the meta device: shapes without memory. Norm weights and buffers (rotary inv_freq) stay real, with their
        constructor values, which are the presets' (the lesson draws matrices only)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.empty:
                shape = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
                if len(shape) >= 2:
                    kwargs["device"] = "meta"
            return func(*args, **kwargs)
    return MatricesOnMeta

def skeleton(config, dtype):
    """The model with its matrices on meta (MatricesOnMeta), tied head tied, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    with matrices_on_meta_class()(), no_init_weights():
        model = AutoModelForCausalLM.from_config(lesson.model_config(config), dtype=dtype,
                                                 trust_remote_code=config.trust_remote_code)
    model.tie_weights()                # a tied head is the embedding (from_pretrained ties it while loading)
    return model.eval()

@contextlib.contextmanager
def depth(model, layers: int):
    """The model cut to its first `layers` decoder layers (embeddings, final norm and head kept), then restored."""
    decoder, cfg = model.get_decoder(), model.config
    whole, n, types = decoder.layers, cfg.num_hidden_layers, getattr(cfg, "layer_types", None)
    decoder.layers, cfg.num_hidden_layers = whole[:layers], min(layers, n)
    if types is not None:
        cfg.layer_types = types[:layers]
    try:
        yield
    finally:
        decoder.layers, cfg.num_hidden_layers = whole, n
        if types is not None:
            cfg.layer_types = types


# ---- Where each tensor comes from ----

def checkpoint_index(config) -> dict:
    """{tensor name: safetensors file} of a model folder or a hub id (fetched into the cache when needed)."""
    folder = os.path.expanduser(lesson.model_source(config.model_name))
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download
        with lesson.loading_errors(config.model_name):
            folder = snapshot_download(folder, allow_patterns=["*.safetensors", "*.json"])
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise lesson.UsageError(f"{config.model_name} has no safetensors checkpoint (model.safetensors or its index); "
                                "tensor_parallel.py slices safetensors only: convert it, or use ds_bnb_infer.py "
                                "--tp-size N.")
    from safetensors import safe_open
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}

def checkpoint_tensors(config, names: list[str]):
    """(name, read(index)) for each tensor asked for: read() opens the file and reads just that slice (the mapping
    is closed again at once, so the file's pages never add up in host memory)."""
    from safetensors import safe_open
    files = checkpoint_index(config)
    for name in names:
        if name not in files:
            raise lesson.UsageError(f"the checkpoint of {config.model_name} has no tensor {name}; tensor_parallel.py "
                                    "reads checkpoints whose names are the model's own (as Llama's are).")

        def read(index, name=name):
            with safe_open(files[name], framework="pt") as f:
                return f.get_slice(name)[index]
        yield name, read

def preset_tensors(config, order: list[tuple], device: str, std: float):
    """(name, read(index)) for every matrix of a random:... preset in the lesson's random_weights() order: one
    generator, each matrix drawn whole on `device` (as the lesson does), so that a shard is a slice of tp 1's."""
    import torch
    gen = torch.Generator(device=device).manual_seed(config.seed)
    for name, shape, dtype in order:
        full = torch.empty(shape, dtype=dtype, device=device).normal_(0, std, generator=gen)
        yield name, full.__getitem__



# ---- Filling a sharded (or a whole) skeleton ----

def shard_index(module, name: str, local: tuple, full: tuple) -> tuple:
    """Which slice of the whole tensor this rank holds: AutoTP splits one dim into module._partition_sizes."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, LmHeadLinearAllreduce
    if local == full:
        return (slice(None),) * len(full)
    dims = [d for d in range(len(full)) if local[d] != full[d]]
    if type(module) not in (LinearLayer, LinearAllreduce, LmHeadLinearAllreduce) or len(dims) != 1:
        raise lesson.UsageError(f"{name} is sharded by {type(module).__name__}, which tensor_parallel.py cannot slice; use "
                                "ds_bnb_infer.py --tp-size N (it shards the whole model in host memory).")
    d, sizes, rank = dims[0], module._partition_sizes, module.tp_index
    start = sum(sizes[:rank])
    assert local[d] == sizes[rank], f"{name}: shard {local} is not {sizes[rank]} of {full} along dim {d}"
    return tuple(slice(start, start + sizes[rank]) if i == d else slice(None) for i in range(len(full)))

def materialize(module, plan: dict, tensors) -> None:
    """After to_empty(): every tensor of `module` is uninitialized on its device. The small ones kept at build time
    go back; each matrix gets its slice from `tensors`, the source's (name, read) pairs."""
    import torch
    owners = {n: m for m_name, m in module.named_modules()
              for n in (f"{m_name}.{p}" if m_name else p for p, _ in m.named_parameters(recurse=False))}
    state = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers())
    users = {}                                       # a tied head's own shard after AutoTP reads the embedding
    for n in state:
        if n in plan["kept"]:                        # a checkpoint's own values, where it has them, come below
            state[n].data.copy_(plan["kept"][n])
        if n in owners:
            users.setdefault(plan["alias"].get(n, n), []).append(n)
    filled = set(plan["kept"])
    with torch.no_grad():
        for name, read in tensors:
            for n in users.get(name, []):
                p = state[n]
                p.data.copy_(read(shard_index(owners[n], n, tuple(p.shape), plan["shapes"][name])))
                filled.add(n)
    missing = sorted(set(state) - filled)
    if missing:
        raise lesson.RunFailure(f"{len(missing)} tensors were never filled ({', '.join(missing[:3])}, ...)")

def plan_of(model) -> dict:
    """What filling needs to know of the skeleton before DeepSpeed replaces its layers: each matrix's whole shape,
    the tied names (lm_head -> embed_tokens), the real small tensors, and the presets' draw order."""
    first = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), n)
    params = list(model.named_parameters())
    return {"shapes": {n: tuple(p.shape) for n, p in params},
            "alias": {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)},
            "kept": {n: t.detach().clone() for n, t in [*params, *model.named_buffers()] if not t.is_meta},
            "order": [(n, tuple(p.shape), p.dtype) for n, p in params if p.dim() >= 2]}

def sources(config, plan: dict, names: list[str], device: str):
    if config.model_name in lesson.PRESETS:
        return preset_tensors(config, plan["order"], device, lesson.model_config(config).initializer_range)
    return checkpoint_tensors(config, list(dict.fromkeys(plan["alias"].get(n, n) for n in names)))



def init_inference(model, config, dtype, max_positions: int):
    """The lesson's call (第五节): the model in its own dtype (keep_model_as_loaded), AutoTP over config.tp_size
    ranks, no kernel injection."""
    import deepspeed
    with lesson.keep_model_as_loaded(), contextlib.redirect_stdout(sys.stderr):
        return deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=False,
                                        tensor_parallel={"tp_size": config.tp_size}, max_tokens=max_positions)

def sharded_engine(config, device: str, dtype, max_positions: int):
    """deepspeed.init_inference over the skeleton (AutoTP shards the meta matrices), then this rank's shards filled
    on `device`. No rank ever holds the whole model."""
    model = skeleton(config, dtype)
    plan = plan_of(model)
    engine = init_inference(model, config, dtype, max_positions)
    module = engine.module
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    materialize(module, plan, sources(config, plan, names, device))
    lesson.free_memory()
    return engine

def unsharded_prefix(config, device: str, dtype) -> tuple:
    """(model, layers, whole): the model's first VERIFY_LAYERS of its `whole` layers, with its embeddings, final norm
    and head, unsharded on `device`, holding exactly the values the shards get."""
    model = skeleton(config, dtype)
    plan = plan_of(model)
    decoder, cfg = model.get_decoder(), model.config
    whole = cfg.num_hidden_layers
    layers = min(VERIFY_LAYERS, whole)
    decoder.layers, cfg.num_hidden_layers = decoder.layers[:layers], layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = cfg.layer_types[:layers]
    model.to_empty(device=device)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    materialize(model, plan, sources(config, plan, names, device))
    return model, layers, whole

def reference(config, inputs, device: str, dtype) -> dict:
    """Rank 0 runs unsharded_prefix() - quantized as the lesson quantizes at tp 1 (saved, then loaded by transformers
    with the lesson's BitsAndBytesConfig) when --quant is given; its greedy tokens and logits go to every rank, so
    that all take the same pass/fail decision. The depth makes this possible for models no one device holds."""
    def build():
        model, layers, whole = unsharded_prefix(config, device, dtype)
        how = "unsharded"
        if config.quant != "none":
            with tempfile.TemporaryDirectory(prefix="tensor_parallel-") as tmp:
                model.save_pretrained(tmp)
                del model
                lesson.free_memory()
                model = lesson.load_model(dataclasses.replace(config, model_name=tmp, tp_size=1), config.quant, device)
            # The shards' matmul (before any forward: bitsandbytes repacks 4-bit weights for its own CPU kernel at the
            # first one), so that the check sees tensor parallel only.
            model = swap_matmuls(model, config)
            how = f"quantized {config.quant} at tp 1, {matmul_of(config)} matmul"
        return dict(lesson.greedy_with_logits(model, inputs), layers=layers,
                    of=f"layers 1-{layers} of {whole} {how} (rank 0, {device}, {dtype})")
    return on_rank0(build)

def on_rank0(build):
    """build() on rank 0, its result handed to every rank (so that all take the same pass/fail decision); what
    build() made on the device is freed before the engine is built."""
    import torch.distributed as tdist
    ranks = tdist.is_available() and tdist.is_initialized()
    ref = [build() if not ranks or tdist.get_rank() == 0 else None]
    lesson.free_memory()
    if ranks:
        tdist.broadcast_object_list(ref, src=0)
    return ref[0]

def checked_decoder(engine, decoder, config, inputs, tol, dtype, seconds: dict, checked: tuple):
    """(engine, mode, result): `decoder` (fast_decode.py's loop) around the engine, checked against the engine's own
    generate() at full depth - what the depth check cannot see (every layer, the loop's cache and steps).
    `checked`: (the depth check's result, its depth)."""
    result, layers = checked
    if not config.verify:
        engine = decoder(engine, config)
        return engine, engine.mode, result
    full = dict(lesson.greedy_with_logits(engine, inputs), of="the engine's generate() at full depth")
    engine = decoder(engine, config)
    with lesson.step_timer(seconds, "verify_decoder", f"{engine.mode} decoding against {full['of']}"):
        second = lesson.verify(engine, inputs, full, tol)
    if not second["passed"]:
        raise lesson.failed_check(second, dtype)
    return engine, engine.mode, dict(result, passed=True, decoder=second,
                                     summary=f"{result['summary']} (depth {layers}); {engine.mode} decoding against "
                                             f"the engine at full depth: {second['summary']}")


# ---- Quantizing one rank's slice to the unsharded layer's values (pure functions: tests call them directly) ----

def nf4_shard(w, gather, rank: int, row_parallel: bool):
    """(packed codes, QuantState) of this rank's slice `w`, dequantizing exactly as the unsharded layer quantized
    by the lesson (nf4, double quant). `gather(absmax)` returns every rank's block scales, in rank order."""
    import torch
    import bitsandbytes.functional as F
    packed, state = F.quantize_4bit(w, blocksize=BLOCK, compress_statistics=False, quant_type="nf4")
    parts = gather(state.absmax)
    if len(parts) == 1:
        # One rank: the lesson's own state, its block scales kept 8-bit (nested). bitsandbytes' GPU matmul of several
        # rows takes another path for fp32 scales: at Llama-2-70B's 8192-wide outputs it gave other bits from the same
        # dequantized weights (benchmarks/README.md).
        return F.quantize_4bit(w, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
    rows = w.shape[0]
    # The whole matrix's block scales in its row-major order: a row-parallel shard holds a band of each row.
    full = torch.cat([p.view(rows, -1) for p in parts], 1).flatten() if row_parallel else torch.cat(parts)
    offset = full.mean()                                   # as quantize_4bit(compress_statistics=True), then
    qabsmax, state2 = F.quantize_blockwise(full - offset, blocksize=256)
    absmax = F.dequantize_blockwise(qabsmax, state2)       # as dequantize_4bit does with a nested state
    absmax += offset
    mine = absmax.view(rows, -1).chunk(len(parts), 1)[rank] if row_parallel else absmax.chunk(len(parts))[rank]
    state.absmax = mine.float().contiguous().flatten()
    return packed, state

def int8_rows(w, row_absmax=None):
    """(CB, SCB) as bitsandbytes' Int8Params quantizes `w`: each fp16 row scaled by its absmax. `row_absmax`, the
    whole row's (a row-parallel shard holds part of it), rides in an appended column, so that bitsandbytes' own
    quantizer scales by it and rounds as it does for the unsharded layer."""
    import torch
    import bitsandbytes.functional as F
    w16 = w.to(torch.float16)
    if row_absmax is not None:
        w16 = torch.cat([w16, row_absmax.to(torch.float16)[:, None]], 1)
    cb, scb, _ = F.int8_vectorwise_quant(w16)
    return cb[:, :w.shape[1]].contiguous(), scb


# ---- The sharded linear: bitsandbytes' storage, its matmul or a weight-only one (--matmul) ----

@functools.cache
def shard_class():
    """The module replacing an AutoTP linear (defined on first use: torch loads only when a run needs it)."""
    import torch
    from deepspeed import comm as dist

    class QuantShard(torch.nn.Module):
        """x -> the matmul of this rank's slice (`linear`: bitsandbytes' layer, or the weight-only layer that
        swap_matmuls() put in its place) -> all-reduce (row-parallel) -> + bias, once."""

        def __init__(self, linear, bias, group, token_scale: bool, threshold: float):
            super().__init__()
            self.linear, self.bias, self.group = linear, bias, group        # group None: column-parallel
            self.token_scale, self.threshold = token_scale, threshold

        def forward(self, x):
            if self.token_scale:
                # LLM.int8 scales each token by its absmax over all in_features (outliers >= threshold left out);
                # this shard sees a slice: the MAX over the ranks is tp 1's scale, handed to bitsandbytes as an
                # extra column (below the threshold: never an outlier; its weight column is 0). Exact in x.dtype:
                # the absmax is one of x's own values.
                a = x.to(torch.float16).abs()
                if self.threshold > 0:
                    a = a.masked_fill(a >= self.threshold, 0)
                scale = a.amax(-1, keepdim=True).float()
                dist.all_reduce(scale, op=dist.ReduceOp.MAX, group=self.group)
                x = torch.cat([x, scale.to(x.dtype), x.new_zeros(*x.shape[:-1], 3)], -1)
            out = self.linear(x)
            if self.group is not None:
                dist.inference_all_reduce(out, group=self.group)     # in the model's dtype, as AutoTP's own
            return out if self.bias is None else out + self.bias
    return QuantShard

def quantize_layer(layer, quant: str, threshold: float, compute_dtype=None, matmul: str = "bitsandbytes"):
    """The QuantShard for one AutoTP linear (LinearLayer: column-parallel; LinearAllreduce: row-parallel), or for a
    whole nn.Linear at tp 1, holding bitsandbytes' layer (swap_matmuls() may then replace it: --matmul).
    compute_dtype: 4-bit's (the lesson's --bnb-4bit-compute-dtype; default bf16). matmul: the one that will
    multiply it (8-bit: bitsandbytes' rounds the activations to int8 and needs the whole token's absmax)."""
    import torch
    import bitsandbytes as bnb
    from deepspeed import comm as dist
    from deepspeed.module_inject.layers import LinearAllreduce
    compute_dtype = compute_dtype or torch.bfloat16
    row, group, w = isinstance(layer, LinearAllreduce), getattr(layer, "mp_group", None), layer.weight.data
    rank, ranks = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    if ranks > 1 and (len(set(layer._partition_sizes)) > 1 or w.shape[1] % BLOCK):
        raise lesson.UsageError(f"{layer.name or 'a linear'} splits into shards {layer._partition_sizes} with "
                                f"{w.shape[1]} input features each; quantized tensor parallel needs equal shards and "
                                f"in_features / tp a multiple of {BLOCK}: pick another --tp-size.")
    out, inp = w.shape
    # bitsandbytes' int8 matmul rounds each token by its absmax over all in_features: a row-parallel shard needs the
    # other ranks' (QuantShard.forward). A weight-only matmul leaves the activations as they are.
    token_scale = row and quant == "8bit" and matmul == "bitsandbytes"
    if quant == "4bit":
        def gather(t):
            if ranks == 1:
                return [t]
            parts = [torch.empty_like(t) for _ in range(ranks)]
            dist.all_gather(parts, t.contiguous(), group=group)
            return parts
        packed, state = nf4_shard(w, gather, rank, row)
        linear = bnb.nn.Linear4bit(inp, out, bias=False, compute_dtype=compute_dtype, compress_statistics=False,
                                   quant_type="nf4", device="meta")
        linear.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCK,
                                          compress_statistics=False, quant_type="nf4", bnb_quantized=True,
                                          module=linear)
        linear.quant_state = state
    else:
        row_absmax = None
        if row:                                   # the whole row's absmax: the MAX over the ranks' parts
            row_absmax = w.to(torch.float16).abs().amax(1).float()
            dist.all_reduce(row_absmax, op=dist.ReduceOp.MAX, group=group)
        cb, scb = int8_rows(w, row_absmax)
        if token_scale:    # the token-scale column (QuantShard.forward), 3 zeros: cuBLASLt's int8 needs k % 4 == 0
            cb = torch.cat([cb, cb.new_zeros(out, 4)], 1)
        linear = bnb.nn.Linear8bitLt(cb.shape[1], out, bias=False, has_fp16_weights=False, threshold=threshold,
                                     device="meta")
        linear.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    # eval(): a new module is in training mode, where bitsandbytes takes other paths (8-bit on a CPU: dequantize
    # and matmul in floating point), not the ones the unsharded model runs.
    return shard_class()(linear, layer.bias, group if row and ranks > 1 else None, token_scale, threshold).eval()

def filled_and_quantized(config, device: str, dtype):
    """tp 1: the model's skeleton (py) filled one matrix at a time on `device`, each linear quantized as soon
    as it is filled, so the device never holds more than the quantized model and one unquantized matrix (a 70B
    model: its 4-bit weights fit one 80 GB GPU, its fp16 weights - which the lesson's load builds first - do not).
    The values are the lesson's at tp 1: the same draws (or checkpoint tensors), quantized by quantize_layer()."""
    import torch
    model = skeleton(config, dtype)
    plan, head = plan_of(model), model.get_output_embeddings()
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    users = {}                                          # a tied head is the embedding's tensor
    for n in names:
        users.setdefault(plan["alias"].get(n, n), []).append(n)
    count = 0
    with torch.no_grad():
        for name, read in sources(config, plan, names, device):
            param = torch.nn.Parameter(read((slice(None),) * len(plan["shapes"][name])).to(device, dtype),
                                       requires_grad=False)
            for n in users.get(name, []):
                parent, _, attr = n.rpartition(".")
                module = model.get_submodule(parent)
                setattr(module, attr, param)
                if type(module) is torch.nn.Linear and module is not head:
                    owner, _, child = parent.rpartition(".")
                    setattr(model.get_submodule(owner), child, quantize_layer(
                        module, config.quant, config.int8_threshold, getattr(torch, lesson.DTYPES[
                            config.bnb_4bit_compute_dtype])))
                    count += 1
            del param
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise lesson.RunFailure(f"{len(left)} tensors were never filled ({', '.join(left[:3])}, ...)")
    lesson.free_memory()
    return model.to(device), count      # the small tensors kept at build time (norms, rotary buffers) follow

def quantize_shards(module, quant: str, threshold: float, compute_dtype=None, matmul: str = "bitsandbytes") -> int:
    """Replace every AutoTP linear but the output head (transformers leaves lm_head unquantized) by its
    QuantShard; returns how many."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer
    head = module.get_output_embeddings()
    names = [name for name, child in module.named_modules()
             if isinstance(child, (LinearLayer, LinearAllreduce)) and child is not head]
    for name in names:     # by name: a list of the modules would keep every unquantized shard alive to the end
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, quantize_layer(module.get_submodule(name), quant, threshold,
                                                                   compute_dtype, matmul))
    lesson.free_memory()
    return len(names)


def matmul_note(module, config) -> str:
    """What multiplies the quantized linears, counted from the modules the shards hold."""
    import collections
    kinds = collections.Counter(type(m.linear).__name__ for m in module.modules() if isinstance(m, shard_class()))
    return f"{matmul_of(config)} matmul: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))

def tolerance(config, dtype) -> float:
    """The rounding tolerance against tp 1: the shards hold tp 1's values, multiply with tp 1's matmul, and tp only
    reorders sums. 4-bit rounds each shard's partial sum to its compute dtype (either matmul); 8-bit rounds in the
    model's dtype (bitsandbytes' sums int32 exactly; weight-only sums in the model's dtype) - fp32: 1e-4, measured
    2e-7, which is what catches a shard taking another path than tp 1's."""
    return lesson.kernel_tol(dtype, config.bnb_4bit_compute_dtype if config.quant == "4bit" else None)


# ---- The run: the lesson's run() with this file's validate() and init_engine() ----

def validate(config, world_size: int, cuda_available: bool) -> None:
    """Refuse what this file does not do, before anything is loaded; the rest is the lesson's validate() (less its
    refusal of --quant with --tp-size > 1, which this file lifts)."""
    c, default = config, TensorParallelConfig
    loop_flags = [f for f in ("loop", "step", "fuse", "tune", "all_reduce", "attention")
                  if getattr(c, f) != getattr(default, f)]
    for refused, message in [
        (c.backend != "deepspeed" or c.kernel_inject, "tensor_parallel.py shards with DeepSpeed AutoTP, without "
                                                      "kernel injection; drop --backend hf and --kernel-inject."),
        (c.quant == "none" and c.tp_size == 1, "unquantized at --tp-size 1 is the lesson's own run: use "
                                               "ds_bnb_infer.py, or --tp-size N > 1, or --quant 8bit|4bit."),
        (c.quant == "4bit" and (c.bnb_4bit_quant_type, c.bnb_4bit_use_double_quant) != ("nf4", True),
         "tensor_parallel.py shards 4-bit as nf4 with double quantization (the lesson's default); drop "
         "--bnb-4bit-quant-type / --no-bnb-4bit-use-double-quant."),
        (loop_flags and not c.fast_decode, f"--{loop_flags[0].replace('_', '-') if loop_flags else ''} sets "
                                           "fast_decode.py's loop; add --fast-decode."),
    ]:
        if refused:
            raise lesson.UsageError(message)
    if c.quant != "none":              # the lesson's own refusals of the quantization flags, as at --tp-size 1
        lesson.validate(dataclasses.replace(c, tp_size=1), 1, cuda_available)
    validate_matmul(c)
    lesson.validate(dataclasses.replace(c, quant="none", int8_threshold=default.int8_threshold, bnb_4bit_compute_dtype=
                                        default.bnb_4bit_compute_dtype), world_size, cuda_available)

def start(config) -> tuple:
    """(device, dtype, tokenizer, max_positions, verify inputs): the lesson's first steps (tokenizer, positions
    check), then the ranks meet (NCCL between GPUs, gloo between CPU ranks)."""
    import deepspeed
    import torch
    _, local, _ = lesson.dist_env(config)
    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = f"cuda:{local}" if on_gpu else "cpu"
    tokenizer, prompts = lesson.load_tokenizer(config), lesson.load_prompts(config)
    max_positions = lesson.check_positions(config, tokenizer, prompts)
    if on_gpu:
        torch.cuda.set_device(device)
    if config.tp_size > 1:                        # (quantized at tp 1, one rank runs alone, as the lesson does)
        lesson.meet_ranks(deepspeed, device)
    inputs = lesson.encode(tokenizer, prompts[:4], device)
    return device, lesson.weights_dtype(config, device), tokenizer, max_positions, inputs

def init_engine(config, decoder=None) -> tuple:
    """(engine, tokenizer, info), as the lesson's init_engine, built shard by shard: unquantized, or quantized after
    sharding (tp N) or while filling (tp 1); verified at depth, then `decoder` checked against the engine."""
    import torch
    (device, dtype, tokenizer, max_positions, inputs), seconds = start(config), {}
    if config.verify:
        with lesson.step_timer(seconds, "reference", f"the first {VERIFY_LAYERS} layers, unsharded, on rank 0"):
            ref = reference(config, inputs, device, dtype)
    compute = getattr(torch, lesson.DTYPES[config.bnb_4bit_compute_dtype])
    if config.quant != "none" and config.tp_size == 1:
        with lesson.step_timer(seconds, "load", f"{config.model_name}: a skeleton filled on {device} a matrix at a "
                                                f"time, each linear quantized {config.quant} once filled"):
            model, count = filled_and_quantized(config, device, dtype)
            engine = init_inference(swap_matmuls(model, config), config, dtype, max_positions)
        notes = [f"{count} linears quantized {config.quant} as they were filled (lm_head stays unquantized)"]
    else:
        with lesson.step_timer(seconds, "load", f"{config.model_name}: AutoTP shards a skeleton over "
                                                f"{config.tp_size} ranks, each fills its own shards"):
            engine = sharded_engine(config, device, dtype, max_positions)
        notes = ["each rank built only its shard (tensor_parallel.py)"]
        if config.quant != "none":
            with lesson.step_timer(seconds, "quantize", f"each rank's shards to {config.quant}"):
                count = quantize_shards(engine.module, config.quant, config.int8_threshold, compute,
                                        matmul_of(config))
                swap_matmuls(engine.module, config)
            notes.append(f"{count} linears sharded, then quantized {config.quant} per rank (lm_head stays "
                         "unquantized, as at tp 1)")
        if not device.startswith("cuda"):
            notes.append("tensor parallel on CPU ranks (gloo) shows the sharding; the speed is for GPUs (第六节)")
    if config.quant != "none":
        notes.append(matmul_note(engine.module, config))
    tol, result, mode = tolerance(config, dtype), None, "generate"
    if config.verify:
        with lesson.step_timer(seconds, "verify", f"the engine at depth {ref['layers']} against {ref['of']}"), \
                depth(engine.module, ref["layers"]):
            result = lesson.verify(engine, inputs, ref, tol)
        if not result["passed"]:
            raise lesson.failed_check(result, dtype)
    if decoder is not None:
        engine, mode, result = checked_decoder(engine, decoder, config, inputs, tol, dtype, seconds,
                                               (result, ref["layers"] if config.verify else None))
    check = check_matmuls(engine.module) if config.quant != "none" else None   # the reference ran these kernels too
    if check:
        notes.append(f"4-bit matmul kernels of {check['layers']} layers (this rank's shards) against their weights "
                     f"dequantized: rel. error {check['max_rel_error']:.2e}")
    if isinstance(engine, FastGreedy):
        notes += [f"{engine.fused} groups of projections fused into one matmul each (fast_decode.py)"] * bool(
            engine.fused) + [f"the compiled step's all-reduces: {engine.all_reduce} (tp_all_reduce.py)"] * bool(
            engine.all_reduce)
    return engine, tokenizer, lesson.EngineInfo(device, "deepspeed", config.quant, str(dtype)[6:], False, mode, [],
                                                notes, result, seconds)

def main(argv=None) -> int:
    """The lesson's command line and run(), with this file's validate() and init_engine(); --fast-decode adds
    fast_decode.py's loop."""
    def job(config):
        return lesson.run(config, decoder_of(config) if config.fast_decode else None, init_engine=init_engine,
                          validate=validate)
    return lesson.main(argv, prog="extensions/tensor_parallel.py", config_class=TensorParallelConfig, job=job)

if __name__ == "__main__":
    sys.exit(main())
