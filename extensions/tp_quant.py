#!/usr/bin/env python3
"""extensions/tp_quant.py — 第十节: bitsandbytes 8-bit and 4-bit under DeepSpeed AutoTP tensor parallel.

The lesson (ds_bnb_infer.py) refuses --quant with --tp-size > 1: AutoTP slices a weight matrix, and bitsandbytes'
packed weights are not plain matrices (slicing them fails with "expected m1 and m2 to have the same dtype"). This
file shards first, then quantizes: deepspeed.init_inference shards the unquantized model, each rank building only
its own shards (tp_load.py) - q, k, v, gate, up: column-parallel LinearLayer; o, down: row-parallel LinearAllreduce,
an all-reduce after the matmul - and each rank's slice is quantized by bitsandbytes into the module transformers
would have used (Linear4bit, Linear8bitLt). The all-reduce stays in the model's dtype; a bias is added after it, once.

Every shard holds the very values the unsharded quantized layer holds, which is what lets tp N be checked against
tp 1 with a rounding tolerance:
  4-bit (nf4, blocks of 64 consecutive weights of the row-major matrix): with in_features / N a multiple of 64, a
    shard's blocks are blocks of the whole matrix, so its codes and block scales are tp 1's. Double quantization
    then compresses the block scales around their mean in groups of 256 - statistics of the whole matrix - so the
    ranks exchange their scales once, compress them as tp 1 does, and keep their own slice (as fp32 scales).
  8-bit (LLM.int8: each weight row and each token's activations scaled by their absmax): a row-parallel shard sees
    part of each row, so the ranks take the MAX of their row (once) and token (each call) absmaxes; the outlier
    columns of LLM.int8 are chosen column by column, so a shard's are exactly tp 1's within its slice.

At --tp-size 1 the same code quantizes a model that the lesson cannot load: the lesson builds (or reads) the whole
model unquantized before bitsandbytes quantizes it, 138 GB for a 70B model in fp16. Here each linear is quantized as
soon as its matrix is filled, so one device holds the quantized model and one unquantized matrix at most.
--fast-decode adds fast_decode.py's loop: a CUDA graph per decode step (bitsandbytes kernels, all-reduces and all).

  deepspeed --num_gpus=2 extensions/tp_quant.py --tp-size 2 --model random:llama-2-7b --quant 4bit
  python extensions/tp_quant.py --tp-size 1 --model random:llama-2-70b --quant 4bit --fast-decode   # one 80 GB GPU
  deepspeed --num_gpus=2 extensions/tp_quant.py --tp-size 2 --model random:tiny --quant 8bit --dtype fp32  # CPU

Verification: rank 0 quantizes the same model's first layers as the lesson does at tp 1 (tp_load.py's method, for
models no one device holds); the engine, cut to that depth, must match it. With --fast-decode the loop is then
checked against the engine at full depth.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402
from extensions import tp_load  # noqa: E402

BLOCK = 64            # bitsandbytes' 4-bit block size (the lesson's BitsAndBytesConfig default)

def tolerance(quant: str, dtype) -> float:
    """The rounding tolerance against tp 1: the shards hold tp 1's values and tp only reorders sums. 4-bit rounds
    each shard's partial sum to bf16 (its compute dtype); 8-bit sums int32 exactly, then rounds in the model's
    dtype (fp32: 1e-4 - measured 2e-7 - which is what catches a shard taking another bitsandbytes path)."""
    import torch
    return lesson.KERNEL_TOL["bf16" if quant == "4bit" else {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, "fp32")]


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
        # dequantized weights (benchmarks/gpu_nf4_check.py).
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


# ---- The sharded linear with a bitsandbytes matmul ----

@functools.cache
def shard_class():
    """The module replacing an AutoTP linear (defined on first use: torch loads only when a run needs it)."""
    import torch
    from deepspeed import comm as dist

    class QuantShard(torch.nn.Module):
        """x -> bitsandbytes matmul of this rank's slice -> all-reduce (row-parallel) -> + bias, once."""

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

def quantize_layer(layer, quant: str, threshold: float):
    """The QuantShard for one AutoTP linear (LinearLayer: column-parallel; LinearAllreduce: row-parallel), or for a
    whole nn.Linear at tp 1."""
    import torch
    import bitsandbytes as bnb
    from deepspeed import comm as dist
    from deepspeed.module_inject.layers import LinearAllreduce
    row, group, w = isinstance(layer, LinearAllreduce), getattr(layer, "mp_group", None), layer.weight.data
    rank, ranks = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    if ranks > 1 and (len(set(layer._partition_sizes)) > 1 or w.shape[1] % BLOCK):
        raise lesson.UsageError(f"{layer.name or 'a linear'} splits into shards {layer._partition_sizes} with "
                                f"{w.shape[1]} input features each; quantized tensor parallel needs equal shards and "
                                f"in_features / tp a multiple of {BLOCK}: pick another --tp-size.")
    out, inp = w.shape
    if quant == "4bit":
        def gather(t):
            if ranks == 1:
                return [t]
            parts = [torch.empty_like(t) for _ in range(ranks)]
            dist.all_gather(parts, t.contiguous(), group=group)
            return parts
        packed, state = nf4_shard(w, gather, rank, row)
        linear = bnb.nn.Linear4bit(inp, out, bias=False, compute_dtype=torch.bfloat16, compress_statistics=False,
                                   quant_type="nf4", device="meta")   # bf16 as the lesson's bnb_config
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
        if row:        # the token-scale column (QuantShard.forward), 3 zeros: cuBLASLt's int8 needs k % 4 == 0
            cb = torch.cat([cb, cb.new_zeros(out, 4)], 1)
        linear = bnb.nn.Linear8bitLt(cb.shape[1], out, bias=False, has_fp16_weights=False, threshold=threshold,
                                     device="meta")
        linear.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    # eval(): a new module is in training mode, where bitsandbytes takes other paths (8-bit on a CPU: dequantize
    # and matmul in floating point), not the ones the unsharded model runs.
    return shard_class()(linear, layer.bias, group if row and ranks > 1 else None, row and quant == "8bit",
                         threshold).eval()

def filled_and_quantized(config, device: str, dtype):
    """tp 1: the model's skeleton (tp_load.py) filled one matrix at a time on `device`, each linear quantized as soon
    as it is filled, so the device never holds more than the quantized model and one unquantized matrix (a 70B
    model: its 4-bit weights fit one 80 GB GPU, its fp16 weights - which the lesson's load builds first - do not).
    The values are the lesson's at tp 1: the same draws (or checkpoint tensors), quantized by quantize_layer()."""
    import torch
    model = tp_load.skeleton(config, dtype)
    plan, head = tp_load.plan_of(model), model.get_output_embeddings()
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    users = {}                                          # a tied head is the embedding's tensor
    for n in names:
        users.setdefault(plan["alias"].get(n, n), []).append(n)
    count = 0
    with torch.no_grad():
        for name, read in tp_load.sources(config, plan, names, device):
            param = torch.nn.Parameter(read((slice(None),) * len(plan["shapes"][name])).to(device, dtype),
                                       requires_grad=False)
            for n in users.get(name, []):
                parent, _, attr = n.rpartition(".")
                module = model.get_submodule(parent)
                setattr(module, attr, param)
                if type(module) is torch.nn.Linear and module is not head:
                    owner, _, child = parent.rpartition(".")
                    setattr(model.get_submodule(owner), child, quantize_layer(module, config.quant,
                                                                              config.int8_threshold))
                    count += 1
            del param
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise lesson.RunFailure(f"{len(left)} tensors were never filled ({', '.join(left[:3])}, ...)")
    lesson.free_memory()
    return model.to(device), count      # the small tensors kept at build time (norms, rotary buffers) follow

def quantize_shards(module, quant: str, threshold: float) -> int:
    """Replace every AutoTP linear but the output head (transformers leaves lm_head unquantized) by its
    QuantShard; returns how many."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer
    head = module.get_output_embeddings()
    names = [name for name, child in module.named_modules()
             if isinstance(child, (LinearLayer, LinearAllreduce)) and child is not head]
    for name in names:     # by name: a list of the modules would keep every unquantized shard alive to the end
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, quantize_layer(module.get_submodule(name), quant, threshold))
    lesson.free_memory()
    return len(names)


# ---- The run: the lesson's steps, with the quantization after the sharding ----

def validate(config) -> None:
    """Refuse what this file does not do, before anything is loaded; the rest is the lesson's validate()."""
    if config.quant == "none":
        raise lesson.UsageError("tp_quant.py runs --quant 8bit or 4bit; for unquantized tensor parallel run "
                                "tp_load.py --tp-size N.")
    if config.backend != "deepspeed" or config.kernel_inject:
        raise lesson.UsageError("tp_quant.py shards with DeepSpeed AutoTP, without kernel injection; drop "
                                "--backend hf and --kernel-inject.")
    if config.int8_threshold != lesson.DeployConfig.int8_threshold and config.quant != "8bit":
        raise lesson.UsageError("--int8-threshold applies to --quant 8bit only; add --quant 8bit or drop it.")
    import torch
    lesson.validate(dataclasses.replace(config, quant="none", int8_threshold=lesson.DeployConfig.int8_threshold),
                    lesson.dist_env(config)[2], torch.cuda.is_available())

def reference(config, inputs, device: str, dtype) -> dict:
    """Rank 0: the model's first layers (tp_load.py's unsharded_prefix: embeddings, final norm and head included)
    quantized by the lesson at tp 1 - saved, then loaded by transformers with the lesson's BitsAndBytesConfig, as the
    lesson quantizes a preset - and run on its device; its greedy tokens and logits go to every rank. The depth makes
    this possible for models no one device holds (README 第六节)."""
    def build():
        model, layers, whole = tp_load.unsharded_prefix(config, device, dtype)
        with tempfile.TemporaryDirectory(prefix="tp_quant-") as tmp:
            model.save_pretrained(tmp)
            del model
            lesson.free_memory()
            model = lesson.load_model(dataclasses.replace(config, model_name=tmp, tp_size=1), config.quant, device)
        return dict(lesson.greedy_with_logits(model, inputs), layers=layers,
                    of=f"layers 1-{layers} of {whole} quantized {config.quant} at tp 1 (rank 0, {device})")
    return tp_load.on_rank0(build)

def init_engine(config, decoder=None) -> tuple:
    """(engine, tokenizer, info): tp N: shard (init_inference over the skeleton, each rank filling its own shards),
    then quantize each shard; tp 1: quantize while filling, then init_inference. Verified, then `decoder`."""
    import deepspeed
    (device, dtype, tokenizer, max_positions, inputs), seconds = tp_load.start(config), {}
    if config.verify:
        with lesson.step_timer(seconds, "reference", f"the first layers quantized {config.quant} at tp 1 on rank 0"):
            ref = reference(config, inputs, device, dtype)
    if config.tp_size == 1:
        with lesson.step_timer(seconds, "load", f"{config.model_name}: a skeleton filled on {device} a matrix at a "
                                                f"time, each linear quantized {config.quant} once filled"):
            model, count = filled_and_quantized(config, device, dtype)
        with lesson.keep_model_as_loaded(), contextlib.redirect_stdout(sys.stderr):
            engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=False,
                                              max_tokens=max_positions)
        notes = [f"{count} linears quantized {config.quant} as they were filled (lm_head stays unquantized)"]
    else:
        with lesson.step_timer(seconds, "load", f"{config.model_name} unquantized: AutoTP shards a skeleton over "
                                                f"{config.tp_size} ranks, each fills its own shards (tp_load.py)"):
            engine = tp_load.sharded_engine(config, device, dtype, max_positions)
        with lesson.step_timer(seconds, "quantize", f"each rank's shards to {config.quant}"):
            count = quantize_shards(engine.module, config.quant, config.int8_threshold)
        notes = [f"{count} linears sharded, then quantized {config.quant} per rank (lm_head stays unquantized, as "
                 "at tp 1)"] + ([] if device.startswith("cuda") else ["tensor parallel on CPU ranks (gloo) shows "
                                                                      "the sharding; the speed is for GPUs (第六节)"])
    result, mode, tol = None, "generate", tolerance(config.quant, dtype)
    if config.verify:
        with lesson.step_timer(seconds, "verify", f"the engine at depth {ref['layers']} against {ref['of']}"), \
                tp_load.depth(engine.module, ref["layers"]):
            result = lesson.verify(engine, inputs, ref, tol)
        if not result["passed"]:
            raise lesson.RunFailure("its output differs from tp 1's quantized model: " + result["summary"])
    if decoder is not None:
        engine, mode, result = tp_load.checked_decoder(engine, decoder, config, inputs, tol, seconds,
                                                       (result, ref["layers"] if config.verify else None))
    return engine, tokenizer, lesson.EngineInfo(device, "deepspeed", config.quant, str(dtype).replace("torch.", ""),
                                                False, mode, [], notes, result, seconds)

def run(config, decoder=None) -> int:
    """The lesson's run() with this init_engine: measure, report, JSON, a clean exit of every rank. (The lesson's
    own run() would refuse --quant with --tp-size > 1 in its validate().)"""
    import torch
    validate(config)
    getattr(decoder, "validate", lambda config: None)(config)
    rank, _, world_size = lesson.dist_env(config)
    prompts = lesson.load_prompts(config)
    engine, tokenizer, info = init_engine(config, decoder)
    loading_peak = lesson.gpu_mem_gb()["peak_allocated"]
    result = lesson.measure(engine, tokenizer, prompts, config, world_size)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20       # as the lesson's run(): GiB
    memory = [dict(lesson.gpu_mem_gb(), loading_peak_allocated=loading_peak, host_peak_rss=rss)] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(memory, memory[0])
    report = lesson.build_report(config, info, prompts, result, memory, world_size)
    lesson.print0(lesson.render(report))
    if config.json_path and rank == 0:
        lesson.write_json(report, config.json_path)
    getattr(engine, "close", lambda: None)()       # fast_decode.py's CUDA graphs hold NCCL: freed before teardown
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return 0

def main(argv=None) -> int:
    """The lesson's command line; --fast-decode adds fast_decode.py's loop (a CUDA graph per step on a GPU)."""
    argv, decoder = tp_load.fast_decode_flag(argv)
    return lesson.main(argv, decoder=decoder, prog="extensions/tp_quant.py [--fast-decode]", job=run)

if __name__ == "__main__":
    sys.exit(main())
