#!/usr/bin/env python3
"""extensions/tp_load.py — 第六节: tensor parallel where each rank builds and holds only its own shard.

The lesson's --tp-size N builds the whole model on every rank's CPU and init_inference (AutoTP) then cuts each
rank's shard out of it: N copies of the full weights in host memory at once (a 70B model in fp16: 140 GB a rank).
Here the model is built with its matrices on the meta device (shapes, no memory), init_inference shards that
skeleton (AutoTP keeps meta tensors meta), and each rank then fills its shards on its own device, a matrix at a time:
  - from a safetensors checkpoint: only the rank's slice of each tensor is read (safe_open(...).get_slice), or
  - for a random:... preset: each matrix drawn whole on the device exactly as the lesson draws it, then sliced.
A rank's host memory is what torch and CUDA take plus one tensor: the report's host_peak_rss.

Verification, for models no one device can hold as a reference: rank 0 builds the first VERIFY_LAYERS layers of the
same model (the same embeddings, layers, final norm and head) unsharded on its device; the engine, cut to that depth
for the check, must match it within rounding (tensor parallel sums in another order). That checks the slicing and
loading of every kind of tensor; the remaining layers are loaded by the same code. With --fast-decode the decode
loop (fast_decode.py) is then checked against the engine at full depth. Where tp 1 fits, tests and benchmarks also
compare tp N with the lesson's tp 1 (README 第六节).

  FAST_DECODE_MODE=cuda-graph deepspeed --num_gpus=2 extensions/tp_load.py --tp-size 2 --model random:llama-2-70b \
      --fast-decode                                             # 2 x 80 GB GPUs; CUDA graph: no long compile
  deepspeed --num_gpus=2 extensions/tp_load.py --tp-size 2 --model random:tiny --dtype fp32      # CPU ranks
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402

VERIFY_LAYERS = 2           # the reference's depth: every kind of tensor, a layer's output feeding the next


# ---- The skeleton: shapes without memory ----

@contextlib.contextmanager
def matrices_on_meta():
    """Modules built inside put every parameter of 2+ dims on the meta device. Norm weights, biases and buffers
    (rotary inv_freq) stay real, with their constructor values, which are the presets' (the lesson draws matrices
    only)."""
    import torch
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.dim() >= 2 and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register

def skeleton(config, dtype):
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    with matrices_on_meta(), no_init_weights():
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
                                "tp_load.py slices safetensors only: convert it, or use ds_bnb_infer.py --tp-size N.")
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
            raise lesson.UsageError(f"the checkpoint of {config.model_name} has no tensor {name}; tp_load.py reads "
                                    "checkpoints whose names are the model's own (as Llama's are).")

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
        raise lesson.UsageError(f"{name} is sharded by {type(module).__name__}, which tp_load.py cannot slice; use "
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

def sharded_engine(config, device: str, dtype, max_positions: int):
    """deepspeed.init_inference over the skeleton (AutoTP shards the meta matrices), then this rank's shards filled
    on `device`. No rank ever holds the whole model."""
    import deepspeed
    model = skeleton(config, dtype)
    plan = plan_of(model)
    with lesson.keep_model_as_loaded(), contextlib.redirect_stdout(sys.stderr):
        engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=False,
                                          tensor_parallel={"tp_size": config.tp_size}, max_tokens=max_positions)
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
    """Rank 0 runs unsharded_prefix(); its greedy tokens and logits go to every rank, so that all take the same
    pass/fail decision."""
    def build():
        model, layers, whole = unsharded_prefix(config, device, dtype)
        return dict(lesson.greedy_with_logits(model, inputs), layers=layers,
                    of=f"layers 1-{layers} of {whole} unsharded (rank 0, {device}, {dtype})")
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

def checked_decoder(engine, decoder, config, inputs, tol, seconds: dict, checked: tuple):
    """(engine, mode, result): `decoder` (fast_decode.py's loop) around the engine, checked against the engine's own
    generate() at full depth - what the depth check cannot see (every layer, the loop's cache and steps).
    `checked`: (the depth check's result, its depth)."""
    result, layers = checked
    if not config.verify:
        engine = decoder(engine)
        return engine, engine.mode, result
    full = dict(lesson.greedy_with_logits(engine, inputs), of="the engine's generate() at full depth")
    engine = decoder(engine)
    with lesson.step_timer(seconds, "verify_decoder", f"{engine.mode} decoding against {full['of']}"):
        second = lesson.verify(engine, inputs, full, tol)
    if not second["passed"]:
        raise lesson.RunFailure(f"{engine.mode} decoding differs from the engine: " + second["summary"])
    return engine, engine.mode, dict(result, passed=True, decoder=second,
                                     summary=f"{result['summary']} (depth {layers}); {engine.mode} decoding against "
                                             f"the engine at full depth: {second['summary']}")


# ---- init_engine: the lesson's steps, with sharded loading and the verification above ----

def dtype_of(config, on_gpu: bool):
    """--dtype as the lesson's load_model() reads it (auto: fp16 on a GPU, fp32 on a CPU)."""
    import torch
    name = config.dtype if config.dtype != "auto" else ("fp16" if on_gpu else "fp32")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]

def validate(config) -> None:
    if config.tp_size == 1 or config.quant != "none" or config.backend != "deepspeed" or config.kernel_inject:
        raise lesson.UsageError("tp_load.py shards an unquantized model over --tp-size N > 1 ranks with DeepSpeed "
                                "AutoTP; drop --quant, --backend hf and --kernel-inject (4/8-bit: tp_quant.py).")

def start(config) -> tuple:
    """(device, dtype, tokenizer, max_positions, verify inputs): the lesson's first steps (tokenizer, positions
    check), then the ranks meet (NCCL between GPUs, gloo between CPU ranks). tp_quant.py starts the same way."""
    import deepspeed
    import torch
    _, local, _ = lesson.dist_env(config)
    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = f"cuda:{local}" if on_gpu else "cpu"
    tokenizer, prompts = lesson.load_tokenizer(config), lesson.load_prompts(config)
    max_positions = lesson.check_positions(config, tokenizer, prompts)
    if on_gpu:
        torch.cuda.set_device(device)
    if config.tp_size > 1:                        # (tp_quant.py at tp 1 runs alone, as the lesson does)
        lesson.meet_ranks(deepspeed, device)
    enc = tokenizer(lesson.as_chat(tokenizer, prompts[:4]), return_tensors="pt", padding=True)
    inputs = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    return device, dtype_of(config, on_gpu), tokenizer, max_positions, inputs

def init_engine(config, decoder=None) -> tuple:
    """(engine, tokenizer, info), as the lesson's init_engine, built shard by shard."""
    import torch
    validate(config)
    (device, dtype, tokenizer, max_positions, inputs), seconds = start(config), {}
    if config.verify:
        with lesson.step_timer(seconds, "reference", f"the first {VERIFY_LAYERS} layers, unsharded, on rank 0"):
            ref = reference(config, inputs, device, dtype)
    with lesson.step_timer(seconds, "load", f"{config.model_name}: a skeleton, sharded, then this rank's shards "
                                            f"filled on {device}"):
        engine = sharded_engine(config, device, dtype, max_positions)
    tol = lesson.KERNEL_TOL[{torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")]
    result, mode = None, "generate"
    if config.verify:
        with lesson.step_timer(seconds, "verify", f"the engine at depth {ref['layers']} against {ref['of']}"), \
                depth(engine.module, ref["layers"]):
            result = lesson.verify(engine, inputs, ref, tol)
        if not result["passed"]:
            raise lesson.RunFailure("its output differs from the unsharded model: " + result["summary"])
    if decoder is not None:
        engine, mode, result = checked_decoder(engine, decoder, config, inputs, tol, seconds,
                                               (result, ref["layers"] if config.verify else None))
    notes = [f"each rank built only its shard (tp_load.py); verified at depth {VERIFY_LAYERS} against the unsharded "
             "model (README 第六节)" if config.verify else "each rank built only its shard (tp_load.py)"]
    if getattr(engine, "fused", 0):
        notes.append(f"{engine.fused} groups of projections fused into one matmul each (fast_decode.py)")
    if getattr(engine, "push_numel", 0):
        notes.append("the compiled step's all-reduces run over symmetric memory: push_all_reduce() for sums of up to "
                     f"{engine.push_numel} fp32 words (fast_decode.py)")
    elif getattr(engine, "symmetric", False):
        notes.append("the compiled step's all-reduces run one-shot over symmetric memory (fast_decode.py)")
    return engine, tokenizer, lesson.EngineInfo(device, "deepspeed", "none", str(dtype).replace("torch.", ""), False,
                                                mode, [], notes, result, seconds)

def fast_decode_flag(argv) -> tuple:
    """(the other arguments, the decoder): --fast-decode asks for fast_decode.py's loop (tp_quant.py takes it too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--fast-decode" not in argv:
        return argv, None
    argv.remove("--fast-decode")
    from extensions.fast_decode import FastGreedy
    return argv, FastGreedy

def main(argv=None) -> int:
    """The lesson's command line and run(), with this init_engine; --fast-decode adds fast_decode.py's loop."""
    argv, decoder = fast_decode_flag(argv)
    return lesson.main(argv, decoder=decoder, prog="extensions/tp_load.py [--fast-decode]",
                       job=functools.partial(lesson.run, init_engine=init_engine))

if __name__ == "__main__":
    sys.exit(main())
