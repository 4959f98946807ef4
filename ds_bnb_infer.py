#!/usr/bin/env python3
"""ds_bnb_infer.py — DeepSpeed Inference + bitsandbytes 8/4-bit: deploy an LLM and measure what each choice costs.

Read it beside the tutorial "DeepSpeed + bitsandbytes 量化部署示例：使用说明与函数文档"; the 第N节 pointers in the
docstrings are its sections, and README.md is that tutorial made true for today's libraries.

What generation costs (第八节). A request has two phases:
  * prefill — the prompt goes through the model in one pass: many tokens per weight read, compute-bound;
  * decode  — one new token per step per sequence: every weight is read once per step, so at small batch the
    step time is bounded below by weight bytes / memory bandwidth. That is why 8-bit and 4-bit weights can make
    decode faster on a GPU (fewer bytes), and why they often don't in practice (dequantisation kernels).
  TTFT (time to first token) ~ prefill; decode time per token ~ the rest. Throughput counts tokens actually
  generated: not the prompt, not padding, nothing after a sequence's EOS. MBU (model bandwidth utilisation) says
  how close decode is to that bound. Measured on an H100 (README 第八节, benchmarks/, Llama-2-7B shape, batch 1):
  plain generate() fp16 27-31 tok/s = 12-15% MBU, Python and kernel launches dominate; --compile (this script's
  greedy loop, each step one CUDA graph) 156.5 tok/s = 74%; bitsandbytes 4-bit 18.6, 4-bit --compile 129.5;
  8-bit (LLM.int8) 11-13 with or without --compile: each matmul makes the host wait for "any outlier columns?",
  so the step cannot be captured; --int8-threshold 0 (plain int8, another quantization) is captured: 128.8.

What the libraries do today (README 第七节, 第十一节 FAQ) and what this script does about it:
  * `deepspeed.init_inference` always casts the module to its `dtype`. That re-rounds fp32 buffers transformers
    keeps on purpose (Llama's rotary inv_freq) and, on a bitsandbytes model, raises (fp16/fp32) or silently
    changes the quantized model (bf16). The model is already in the dtype asked for, so the script keeps the
    cast from running and proves (tests) that the logits are bit-identical before and after wrapping.
  * Kernel injection crashes or gives wrong tokens with deepspeed 0.19.8 on transformers >= 4.53 (measured), so
    there it is refused up front with the reason; elsewhere it is checked against the plain model before any
    output is trusted (`verify`) and falls back to no injection when it crashes or disagrees (--no-fallback:
    an error instead). Tensor parallel is checked the same way, against the full model in fp32 on rank 0.
  * DeepSpeed Inference has no pipeline engine, and AutoTP cannot slice bitsandbytes' packed weights:
    --pp-size > 1 and --quant with --tp-size > 1 are refused with the reason.

Commands
  python ds_bnb_infer.py --model random:tiny                      # CPU, offline, seconds (random weights)
  python ds_bnb_infer.py --model random:tiny --quant 4bit --json - | tail -n 1 | jq .metrics
  python ds_bnb_infer.py --model random:llama-2-7b --quant 8bit   # Llama-2-7B shape, random weights, one GPU
  python ds_bnb_infer.py --model random:llama-2-7b --backend hf --quant 4bit --compile   # CUDA graphs (第八节)
  deepspeed --num_gpus=2 ds_bnb_infer.py --tp-size 2 --model meta-llama/Llama-2-7b-chat-hf   # 第六节
  python ds_bnb_infer.py --model random:llama-2-7b --compare --plot compare.png      # every mode, one table
The last stdout line is the JSON report when `--json -` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

# torch / transformers are imported on first use (inside functions) so that `--help` and bad flags answer at
# once and `import ds_bnb_infer` does no work; deepspeed and bitsandbytes are optional and imported where used.

# ----------------------------------------------------------------------------------------------------------------
# 第三节 配置: DeployConfig is the one source of truth for defaults; the CLI is derived from its fields.

PRESETS = {
    # A small Llama (2 layers): runs on a CPU in seconds. Dimensions are multiples of 32 because bitsandbytes'
    # CPU 4-bit kernel packs weights in blocks of 32 output rows.
    "random:tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=320, max_position_embeddings=2048),
    # The real Llama-2-7B architecture: costs exactly what the real weights cost in time and memory.
    "random:llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                              max_position_embeddings=4096, rms_norm_eps=1e-5),
}
QUANT_FALLBACK = {"4bit": "8bit", "8bit": "none"}     # 第九节: 4-bit → 8-bit → fp16
# --compare: each mode is a set of flags added to the user's own. Injection runs with --no-fallback so that a
# failed injection shows as a failed row instead of a second copy of "ds".
COMPARE_MODES = {
    "hf": ["--backend", "hf"],
    "ds": ["--backend", "deepspeed", "--no-kernel-inject"],
    "ds-inject": ["--backend", "deepspeed", "--kernel-inject", "--no-fallback"],
    "ds-8bit": ["--backend", "deepspeed", "--quant", "8bit", "--no-kernel-inject"],
    "ds-4bit": ["--backend", "deepspeed", "--quant", "4bit", "--no-kernel-inject"],
    "hf-compile": ["--backend", "hf", "--compile"],
    "hf-8bit-compile": ["--backend", "hf", "--quant", "8bit", "--compile"],
    "hf-8bit-t0-compile": ["--backend", "hf", "--quant", "8bit", "--int8-threshold", "0", "--compile"],
    "hf-4bit-compile": ["--backend", "hf", "--quant", "4bit", "--compile"],
}


def _opt(flag, help, **kw):
    """Field metadata: the CLI flag, its help, and any extra argparse settings (choices, metavar)."""
    return dict(flag=flag, help=help, **kw)


@dataclass
class DeployConfig:
    """Every setting of a run (第三节). Flags are derived from these fields by build_parser()."""
    model_name: str = field(default="meta-llama/Llama-2-7b-chat-hf", metadata=_opt(
        "--model", "hub id, local path, or a random-weight preset: " + ", ".join(PRESETS), metavar="NAME"))
    backend: str = field(default="deepspeed", metadata=_opt(
        "--backend", "deepspeed: wrap with deepspeed.init_inference; hf: plain transformers",
        choices=["deepspeed", "hf"]))
    quant: str = field(default="none", metadata=_opt(
        "--quant", "bitsandbytes weights: 8bit (LLM.int8) or 4bit (nf4 + double quant, bf16 compute)",
        choices=["none", "8bit", "4bit"]))
    int8_threshold: float = field(default=6.0, metadata=_opt(
        "--int8-threshold", "8bit: LLM.int8's outlier threshold (llm_int8_threshold, transformers' default 6.0); "
        "0 = plain int8 with no outlier columns kept in fp16: another quantization, which --compile can capture "
        "(第八节)"))
    dtype: str = field(default="auto", metadata=_opt(
        "--dtype", "dtype of the (non-quantized) weights; auto = fp16 on GPU, fp32 on CPU",
        choices=["auto", "fp16", "bf16", "fp32"]))
    tp_size: int = field(default=1, metadata=_opt("--tp-size", "tensor-parallel ranks (DeepSpeed AutoTP)"))
    pp_size: int = field(default=1, metadata=_opt("--pp-size", "pipeline stages (see 第六节: not offered)"))
    kernel_inject: bool = field(default=True, metadata=_opt(
        "--kernel-inject", "replace layers with DeepSpeed's fused kernels (verified first, 第七节)"))
    max_new_tokens: int = field(default=64, metadata=_opt("--max-new-tokens", "new tokens per sequence"))
    compile: bool = field(default=False, metadata=_opt(
        "--compile", "this script's greedy decode loop: static KV cache, on a GPU each step one CUDA graph "
        "(verified first)"))
    batch_size: int = field(default=1, metadata=_opt("--batch-size", "sequences per generate() call"))
    prompts: list = field(default_factory=lambda: ["DeepSpeed is"], metadata=_opt(
        "--prompt", "a prompt (repeat the flag for several)", action="append", metavar="TEXT"))
    prompts_file: str | None = field(default=None, metadata=_opt(
        "--prompts-file", "a text file with one prompt per line", metavar="PATH"))
    warmup: int = field(default=1, metadata=_opt("--warmup", "untimed runs before measuring"))
    iters: int = field(default=3, metadata=_opt("--iters", "timed runs (latency mean/p50/p95 over their batches)"))
    do_sample: bool = field(default=False, metadata=_opt("--do-sample", "sample instead of greedy decoding"))
    temperature: float = field(default=1.0, metadata=_opt("--temperature", "sampling temperature (> 0)"))
    top_p: float = field(default=1.0, metadata=_opt("--top-p", "nucleus sampling mass, in (0, 1]"))
    seed: int = field(default=0, metadata=_opt("--seed", "seed for random weights and sampling"))
    device: str = field(default="auto", metadata=_opt(
        "--device", "auto = cuda when a GPU is visible, else cpu", choices=["auto", "cuda", "cpu"]))
    fallback: bool = field(default=True, metadata=_opt(
        "--fallback", "on failure fall back (4bit→8bit→none, injection→none, deepspeed→hf); "
        "--no-fallback makes each an error"))
    verify: bool = field(default=True, metadata=_opt(
        "--verify", "check the engine's logits and greedy tokens against the unwrapped model "
        "(always on for kernel injection)"))
    json_path: str | None = field(default=None, metadata=_opt(
        "--json", "write the JSON report to PATH ('-' = print it as the last stdout line)", metavar="PATH"))
    compare: str | None = field(default=None, metadata=_opt(
        "--compare", "run a matrix of modes, each in its own process, and print one table; MODES is a comma list "
        "of names in COMPARE_MODES (default: all)", nargs="?", const="all", metavar="MODES"))
    plot: str | None = field(default=None, metadata=_opt(
        "--plot", "with --compare: draw decode tok/s and peak memory per mode into a PNG (needs matplotlib)",
        metavar="PATH"))
    trust_remote_code: bool = field(default=False, metadata=_opt(
        "--trust-remote-code", "allow model code from the hub (off: only run code you have read)"))
    debug: bool = field(default=False, metadata=_opt("--debug", "show tracebacks"))
    local_rank: int = field(default=-1, metadata=_opt(
        "--local_rank", "set by the deepspeed launcher (LOCAL_RANK is read too)"))


def build_parser() -> argparse.ArgumentParser:
    """The CLI, derived field by field from DeployConfig. Defaults are SUPPRESSed so the dataclass fills them."""
    p = argparse.ArgumentParser(prog="ds_bnb_infer.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(DeployConfig):
        meta = dict(f.metadata)
        flag, help = meta.pop("flag"), meta.pop("help")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [flag, "--local-rank"] if f.name == "local_rank" else [flag]
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{help} (default: {default})")
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif "action" not in meta:
            kw["type"] = {"int": int, "float": float}.get(f.type, str)
        p.add_argument(*flags, **kw, **meta)
    return p


def config_from_args(argv=None) -> DeployConfig:
    """Parse argv into a DeployConfig; argparse itself exits 2 with one line on unknown flags or bad values."""
    return DeployConfig(**vars(build_parser().parse_args(argv)))


def to_argv(config: DeployConfig, skip=()) -> list[str]:
    """The flags that reproduce `config` (non-default fields only), e.g. to start one --compare mode."""
    argv, default = [], DeployConfig()
    for f in dataclasses.fields(DeployConfig):
        value, flag = getattr(config, f.name), f.metadata["flag"]
        if f.name in skip or value == getattr(default, f.name):
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [x for v in value for x in (flag, v)]
        else:
            argv += [flag, str(value)]
    return argv


class UsageError(Exception):
    """Bad input: the message names the problem and the fix. Exit code 2."""


class RunFailure(Exception):
    """The run itself failed (a mode that cannot run, out of memory). Exit code 1."""


def dist_env(config: DeployConfig) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment (deepspeed, torchrun) or --local_rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", config.local_rank if config.local_rank >= 0 else 0))
    return int(os.environ.get("RANK", local)), local, world


def validate(config: DeployConfig, world_size: int, cuda_available: bool) -> None:
    """Reject impossible or conflicting settings before any model is loaded (every rank fails the same way)."""
    for name, low in [("tp_size", 1), ("pp_size", 1), ("max_new_tokens", 1), ("batch_size", 1),
                      ("warmup", 0), ("iters", 1)]:
        if getattr(config, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(config, name)}.")
    if not config.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {config.temperature}.")
    if not 0 < config.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {config.top_p}.")
    if config.device == "cuda" and not cuda_available:
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu (or auto).")
    if config.backend == "deepspeed" and config.dtype == "fp16" and (config.device == "cpu" or not cuda_available):
        raise UsageError("DeepSpeed's CPU accelerator has no fp16; use --dtype bf16 or fp32 on a CPU "
                         "(or --backend hf).")
    if config.pp_size > 1:
        raise UsageError("--pp-size > 1 is not offered: DeepSpeed Inference has no pipeline engine (第六节); "
                         "use --tp-size N to split each layer over N GPUs.")
    if config.compare and world_size > 1:
        raise UsageError("--compare starts one process per mode by itself; run it without the deepspeed launcher.")
    if config.tp_size != world_size:
        raise UsageError(f"--tp-size {config.tp_size} needs {config.tp_size} ranks but {world_size} were launched; "
                         f"run: deepspeed --num_gpus={config.tp_size} ds_bnb_infer.py --tp-size {config.tp_size} ...")
    if config.tp_size > 1 and config.backend != "deepspeed":
        raise UsageError("--tp-size > 1 is DeepSpeed's tensor parallelism; use --backend deepspeed.")
    if config.tp_size > 1 and config.quant != "none":
        raise UsageError(f"--quant {config.quant} cannot be combined with --tp-size > 1: AutoTP slices weight "
                         "matrices and bitsandbytes' packed weights cannot be sliced that way; use --tp-size 1 "
                         "(a 4-bit 7B model fits one GPU) or --quant none.")
    if not config.int8_threshold >= 0:                       # (NaN too)
        raise UsageError(f"--int8-threshold must be >= 0, got {config.int8_threshold}.")
    if config.int8_threshold != DeployConfig.int8_threshold and (config.quant != "8bit" or config.compare):
        raise UsageError("--int8-threshold applies to --quant 8bit only (with --compare, the mode "
                         "hf-8bit-t0-compile sets it); add --quant 8bit or drop --int8-threshold.")
    if config.compile and (config.do_sample or config.tp_size > 1):
        raise UsageError("--compile is a greedy decode loop for one GPU; drop --do-sample and --tp-size, "
                         "or drop --compile.")
    if config.plot and not config.compare:
        raise UsageError("--plot draws the --compare table; add --compare.")
    unknown = set((config.compare or "all").split(",")) - set(COMPARE_MODES) - {"all"}
    if unknown:
        raise UsageError(f"unknown --compare mode(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(COMPARE_MODES)}.")
    if config.prompts_file is not None and config.prompts != DeployConfig().prompts:
        raise UsageError("give prompts either with --prompt or with --prompts-file, not both.")
    for flag, path in (("--json", config.json_path), ("--plot", config.plot)):
        if path not in (None, "-") and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"the folder for {flag} {path} does not exist; create it or pick another path.")
        if path not in (None, "-") and os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a folder; give a file name inside it.")


def load_prompts(config: DeployConfig) -> list[str]:
    """The prompts of a run: --prompt values, or the non-empty lines of --prompts-file."""
    if config.prompts_file is None:
        return list(config.prompts)
    try:
        with open(config.prompts_file, encoding="utf-8") as fh:
            prompts = [line.rstrip("\n") for line in fh if line.strip()]
    except OSError as e:
        raise UsageError(f"cannot read --prompts-file {config.prompts_file} ({e.strerror}); check the path.")
    if not prompts:
        raise UsageError(f"--prompts-file {config.prompts_file} has no prompts; write one prompt per line.")
    return prompts


def batches_of(prompts: list[str], batch_size: int) -> list[list[str]]:
    """Split prompts into batches of exactly batch_size (批处理, 第八节): prompts repeat to fill the last one,
    so that every timed batch does the same amount of work."""
    n = -(-len(prompts) // batch_size) * batch_size
    filled = [prompts[i % len(prompts)] for i in range(n)]
    return [filled[i:i + batch_size] for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------------------------------------------
# 第四节 加载: tokenizer and model object — plain, or quantized by bitsandbytes — before DeepSpeed sees it.

def resolve_dtype(config: DeployConfig, device: str):
    import torch
    name = config.dtype if config.dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def byte_tokenizer(vocab_size: int):
    """A byte-level tokenizer built in code (no download): one token per UTF-8 byte, ids up to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(chars))}
    # Ids the model can emit but no text maps to: they decode to a visible placeholder.
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def load_tokenizer(config: DeployConfig):
    """第四节: the tokenizer, padded on the left so that every sequence of a batch ends at the same position."""
    if config.model_name in PRESETS:
        tok = byte_tokenizer(PRESETS[config.model_name]["vocab_size"])
    else:
        _check_model_source(config.model_name)
        from transformers import AutoTokenizer
        with _loading_errors(config.model_name):
            tok = AutoTokenizer.from_pretrained(config.model_name, trust_remote_code=config.trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token      # Llama has no pad token; padded positions are masked anyway
    return tok


def _check_model_source(name: str) -> None:
    if name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise UsageError(f"model path {name} does not exist; give a local model folder, a hub id, "
                         f"or a preset ({', '.join(PRESETS)}).")


@contextlib.contextmanager
def _loading_errors(name: str):
    """Turn the hub's many failure modes into one sentence each."""
    try:
        yield
    except OSError as e:
        text = str(e)
        if "gated" in text or "401" in text or "403" in text:
            raise UsageError(f"{name} is a gated model: accept its license on the hub and set HF_TOKEN, "
                             "or use a local copy.") from e
        raise UsageError(f"cannot load {name} (not a local folder, and the hub could not provide it: "
                         f"{text.splitlines()[0][:160]}); give a local path or --model random:tiny.") from e


def bnb_config(quant: str, dtype, int8_threshold: float):
    """第四节: the BitsAndBytesConfig of the doc — LLM.int8, or 4-bit nf4 with double quant and bf16 compute.

    LLM.int8 keeps the input columns holding a value >= int8_threshold in fp16 (outlier features, which real
    LLMs from ~6.7B parameters have); 0 turns that off: every column in int8."""
    import torch
    from transformers import BitsAndBytesConfig
    try:
        import bitsandbytes  # noqa: F401 — fail here, in one sentence, rather than deep inside transformers
    except ImportError as e:
        raise ImportError("bitsandbytes is not installed (pip install bitsandbytes)") from e
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_model(config: DeployConfig, quant: str, device: str):
    """第四节: the model object, on `device`, quantized by bitsandbytes when quant != none."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    dtype = resolve_dtype(config, device)
    if config.model_name in PRESETS:
        from transformers.initialization import no_init_weights
        cfg = LlamaConfig(**PRESETS[config.model_name], bos_token_id=0, eos_token_id=1, pad_token_id=2)
        # tp > 1: build on the CPU and let DeepSpeed move only its shard to each GPU (no GPU holds a full copy).
        with torch.device("cpu" if config.tp_size > 1 else device), no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        random_weights(model, config.seed, device)
        if quant == "none":
            return model.eval()
        # bitsandbytes quantizes while loading from a folder, exactly as for a real checkpoint.
        with tempfile.TemporaryDirectory(prefix="ds_bnb_infer-") as tmp:
            model.save_pretrained(tmp)
            del model
            free_memory()          # or the fp16 copy's cached blocks would show up as "reserved" memory
            return _from_pretrained(tmp, config, quant, dtype, device)
    return _from_pretrained(config.model_name, config, quant, dtype, device)


def random_weights(model, seed: int, device: str) -> None:
    """A preset's weights: every matrix ~ N(0, initializer_range), as transformers initializes Llama (norms stay 1).

    Drawn on `device` one matrix at a time and copied into the model wherever it sits. Every tp rank builds the
    model on the CPU, and torch's CPU random numbers can be very slow: on the 2-GPU host, transformers' own init
    took 337 s per rank, drawing on the GPU brought the whole tp 2 load to 24 s (measured, README 第八节).
    The same seed on any GPU (or on the CPU) gives every rank, and tp 1, the same weights."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    std = model.config.initializer_range
    for p in model.parameters():
        if p.dim() >= 2:
            p.data.copy_(torch.empty(p.shape, dtype=p.dtype, device=device).normal_(0, std, generator=gen))


def _from_pretrained(source: str, config: DeployConfig, quant: str, dtype, device: str):
    from transformers import AutoModelForCausalLM
    kw = dict(dtype=dtype, trust_remote_code=config.trust_remote_code)
    if quant != "none":
        kw.update(quantization_config=bnb_config(quant, dtype, config.int8_threshold), device_map={"": device})
    elif config.tp_size == 1:              # tp > 1: stay on the CPU, as for the presets in load_model()
        kw.update(device_map={"": device})
    with _loading_errors(config.model_name):
        return AutoModelForCausalLM.from_pretrained(source, **kw).eval()


def load_quantized(config: DeployConfig, device: str, tokenizer, record: dict):
    """Load config.quant, falling back 4bit → 8bit → none when a quant mode cannot load or run (第九节)."""
    import torch
    quant = config.quant
    while True:
        try:
            model = load_model(config, quant, device)
            if quant != "none":
                # One token through the model: some bitsandbytes failures only show at the first matmul.
                with torch.no_grad():
                    model(input_ids=torch.tensor([[tokenizer.bos_token_id or 0]], device=device))
            record["quant"] = quant
            return model
        except (UsageError, torch.OutOfMemoryError):
            raise
        except Exception as e:
            if quant == "none":
                raise
            fall_back(config, record, "quant", quant, QUANT_FALLBACK[quant], _reason(e),
                      usage=isinstance(e, ImportError))
            quant = QUANT_FALLBACK[quant]


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


FALLBACK_FIX = {"quant": "pick another --quant", "kernel_inject": "add --no-kernel-inject",
                "backend": "pip install deepspeed, or use --backend hf"}


def fall_back(config: DeployConfig, record: dict, what: str, frm, to, reason: str, usage: bool = False) -> None:
    """Record (and log) a fallback, or raise when --no-fallback was given."""
    if not config.fallback:
        err = UsageError if usage else RunFailure
        raise err(f"{what} {frm} cannot be used ({reason}); --no-fallback forbids falling back to {to}: "
                  f"{FALLBACK_FIX[what]}.")
    record["fallbacks"].append({"what": what, "from": frm, "to": to, "reason": reason})
    print0(f"[fallback] {what}: {frm} -> {to} ({reason})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# 第五节/第七节 引擎: hand the model object to deepspeed.init_inference, then check the engine against it.

# Verification thresholds (relative logits error ‖out−ref‖/‖ref‖). Wrapping without injection must not change
# a single bit; fused fp16 kernels differ from PyTorch's only by rounding (~1e-3); tensor parallel sums in
# another order (rounding too). A broken kernel or KV cache gives errors far above rounding.
EXACT_TOL = 0.0
KERNEL_TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 4e-2}
VERIFY_TOKENS = 16


@contextlib.contextmanager
def keep_model_as_loaded():
    """Stop InferenceEngine from casting the module to its dtype (it calls .half() / .bfloat16() / .float()).

    The model is already loaded in the dtype asked for, so the cast can only do harm: it re-rounds the fp32
    buffers transformers keeps on purpose (Llama's rotary inv_freq: 0.7% logits error on Llama-2-7B in fp16,
    measured on an H100), and on a bitsandbytes model it raises (fp16/fp32) or re-rounds the quantization state
    (bf16: 0.6-17% logits error, measured). Tests prove the wrapped model's logits are bit-identical.
    """
    from deepspeed.inference.engine import InferenceEngine
    original = InferenceEngine._convert_to_dtype
    InferenceEngine._convert_to_dtype = lambda self, config: None
    try:
        yield
    finally:
        InferenceEngine._convert_to_dtype = original


@contextlib.contextmanager
def timed(record: dict, step: str):
    """Note how long a step of init_engine took (record["seconds"]) and say so on stderr: a 7B model takes
    minutes to load, and the reader should see where they go."""
    t0 = time.perf_counter()
    yield
    record["seconds"][step] = round(time.perf_counter() - t0, 2)
    print0(f"[{step}] {record['seconds'][step]:.1f} s", file=sys.stderr)


def init_engine(config: DeployConfig, record: dict | None = None):
    """第五节/第七节: (engine, tokenizer) — the model loaded, then wrapped by deepspeed.init_inference.

    `record` (optional) receives what was actually used: backend, quant, dtype, kernel_inject, fallbacks, verify.
    """
    import torch
    record = {} if record is None else record
    record.update(backend=config.backend, quant=config.quant, kernel_inject=False, compile=config.compile,
                  fallbacks=[], verify=None, seconds={})
    device = pick_device(config)
    tokenizer = load_tokenizer(config)
    with timed(record, "load"):
        model = load_quantized(config, device, tokenizer, record)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    record["dtype"] = str(dtype).replace("torch.", "")     # of the weights bitsandbytes leaves unquantized
    if record["quant"] == "4bit":
        record["compute_dtype"] = "bfloat16"                # bnb_4bit_compute_dtype: matmuls run in bf16
    deepspeed = import_deepspeed(config, record)
    if config.tp_size > 1:                 # the ranks meet here (NCCL between GPUs, gloo between CPU ranks)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo")
    inject = config.kernel_inject and deepspeed is not None
    why_not = inject and ("bitsandbytes weights cannot be kernel-injected" if record["quant"] != "none"
                          else injection_known_broken())       # (only asked when deepspeed is there)
    if why_not:
        fall_back(config, record, "kernel_inject", "on", "off", why_not, usage=True)
        inject = False
    # Verify whatever replaces the model's computation: DeepSpeed's wrapper, fused kernels, tensor parallel, the
    # --compile's decode loop. Plain transformers is its own reference.
    check = (deepspeed is not None and (config.verify or inject)) or config.compile
    verify_ids = verify_batch(tokenizer, load_prompts(config), device) if check else None
    # The reference comes first: injection rewrites the model's layers in place.
    with timed(record, "reference"):
        ref = reference(model, verify_ids, config) if check else None
    while True:
        engine = None
        try:
            engine = model
            if deepspeed is not None:
                with keep_model_as_loaded(), timed(record, "init_inference"):
                    engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=inject,
                                                      tensor_parallel={"tp_size": config.tp_size})
            if check:
                with timed(record, "verify"):
                    record["verify"] = verify(engine, verify_ids, ref, tolerance(config, dtype, inject),
                                              fast=config.compile)
                if not record["verify"]["passed"]:
                    raise RunFailure("its output differs from the unwrapped model: " + record["verify"]["summary"])
            record["kernel_inject"] = inject
            return engine, tokenizer
        except (UsageError, torch.OutOfMemoryError):
            raise
        except Exception as e:
            if not inject:
                raise
            fall_back(config, record, "kernel_inject", "on", "off", _reason(e))
            # Injection replaced the model's layers in place: start again from a fresh copy.
            del engine, model
            free_memory()
            model, inject = load_model(config, "none", device), False


# DeepSpeed's injected layers (ds_transformer.py) predate transformers' current decoder-layer interface: they
# return (output, presents) tuples where transformers >= 4.54 passes a tensor on, keep their own KV cache instead
# of the Cache object transformers hands them, and ignore position_ids. Measured on an H100 (2026-11-25, README
# FAQ): deepspeed 0.19.8 crashes on transformers 4.57.6 and 5.17.0 (Llama, OPT, GPT-2) and gives wrong tokens on
# 4.53.3 (0/32 greedy tokens right). Newer deepspeed releases are tried, and verified.
INJECTION_BROKEN = {"deepspeed_upto": "0.19.8", "transformers_from": "4.53"}


def injection_known_broken() -> str | None:
    """Why kernel injection cannot work with the installed versions; None when not known (then: try, verify)."""
    from importlib import metadata
    from packaging.version import Version
    ds, tf = metadata.version("deepspeed"), metadata.version("transformers")
    if Version(ds) <= Version(INJECTION_BROKEN["deepspeed_upto"]) and \
            Version(tf) >= Version(INJECTION_BROKEN["transformers_from"]):
        return (f"deepspeed {ds}'s injected kernels do not work with transformers {tf}: they crash or give wrong "
                f"tokens (measured, see the README FAQ)")
    return None


def import_deepspeed(config: DeployConfig, record: dict):
    """The deepspeed module for --backend deepspeed; None for hf, or (fallback) when it is not installed."""
    if config.backend == "hf":
        return None
    try:
        import deepspeed
        return deepspeed
    except ImportError as e:
        if config.tp_size > 1:
            raise UsageError("--tp-size > 1 needs deepspeed; pip install deepspeed==0.19.8.") from e
        fall_back(config, record, "backend", "deepspeed", "hf", "deepspeed is not installed", usage=True)
        record["backend"] = "hf"
        return None


def pick_device(config: DeployConfig) -> str:
    import torch
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return f"cuda:{dist_env(config)[1]}"


def free_memory() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tolerance(config: DeployConfig, dtype, inject: bool) -> float:
    """The verification threshold of a mode (see EXACT_TOL / KERNEL_TOL above)."""
    import torch
    if not inject and config.tp_size == 1 and not config.compile:
        return EXACT_TOL
    return KERNEL_TOL[{torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")]


def verify_batch(tokenizer, prompts: list[str], device: str):
    enc = tokenizer(prompts[:4], return_tensors="pt", padding=True)
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


def greedy_with_logits(model, inputs, fast: bool = False):
    """Greedy tokens and every step's logits (prefill logits included) — what verification compares.
    fast: decode with fast_generate (--compile) instead of transformers' generate()."""
    import torch
    with torch.no_grad():
        prefill = model(**inputs).logits.float().cpu()
        if fast:
            steps = []
            tokens = fast_generate(getattr(model, "module", model), inputs, VERIFY_TOKENS, eos=eos_ids(None, model),
                                   pad_id=0, min_new_tokens=VERIFY_TOKENS, step_logits=steps)
            steps = torch.stack(steps, dim=1)
        else:
            out = model.generate(**inputs, max_new_tokens=VERIFY_TOKENS, do_sample=False,
                                 min_new_tokens=VERIFY_TOKENS, output_logits=True, return_dict_in_generate=True)
            tokens, steps = out.sequences, torch.stack([s.float().cpu() for s in out.logits], dim=1)
    return {"prefill": prefill, "steps": steps, "tokens": tokens[:, inputs["input_ids"].shape[1]:].cpu()}


def reference(model, inputs, config: DeployConfig) -> dict:
    """The unwrapped model's greedy tokens and logits, taken before DeepSpeed touches the model.

    tp > 1: the model still sits on the CPU (load_model keeps every GPU from holding a full copy), where
    half-precision matmuls are slow or missing. So rank 0 alone runs it there with fp32 parameters and sends the
    result to every rank: all ranks then take the same pass/fail decision (one rank falling back alone would hang
    the others). fp32 against the engine's fp16/bf16 differs by rounding only, within KERNEL_TOL.
    """
    if config.tp_size == 1:
        return dict(greedy_with_logits(model, inputs), of=f"the unwrapped model ({model.dtype})")
    import torch.distributed as tdist
    ref = [None]
    if tdist.get_rank() == 0:
        # Parameters up to fp32 and back in place (exact: fp16/bf16 -> fp32 -> fp16/bf16 loses nothing); buffers
        # such as the fp32 rotary inv_freq stay as they are. No second copy of the model in host memory.
        dtypes = [p.dtype for p in model.parameters()]
        for p in model.parameters():
            p.data = p.data.float()
        try:
            ref[0] = greedy_with_logits(model, {k: v.cpu() for k, v in inputs.items()})
        finally:
            for p, dtype in zip(model.parameters(), dtypes):
                p.data = p.data.to(dtype)
        ref[0]["of"] = "the unwrapped model in fp32 on the CPU (rank 0)"
    tdist.broadcast_object_list(ref, src=0)
    return ref[0]


def verify(engine, inputs, ref: dict, tol: float, fast: bool = False) -> dict:
    """Compare the engine with the reference: logits error, top-1 agreement, greedy tokens (第七节)."""
    out = greedy_with_logits(engine, inputs, fast)
    mask = inputs["attention_mask"].bool().cpu()
    same = (out["tokens"] == ref["tokens"]).all(dim=0).long()
    agree = int(same.cumprod(0).sum())            # steps until the first divergence in any sequence
    upto = min(agree + 1, VERIFY_TOKENS)          # decode logits are comparable up to the first divergence
    prefill_err = rel_error(out["prefill"][mask], ref["prefill"][mask])
    decode_err = rel_error(out["steps"][:, :upto], ref["steps"][:, :upto])
    top1 = float((out["prefill"][mask].argmax(-1) == ref["prefill"][mask].argmax(-1)).float().mean())
    passed = prefill_err <= tol and decode_err <= tol and math.isfinite(prefill_err + decode_err)
    if tol == EXACT_TOL:
        passed = passed and agree == VERIFY_TOKENS
    return {"passed": bool(passed), "reference": ref.get("of", "the reference given"), "tolerance": tol,
            "prefill_rel_error": prefill_err, "decode_rel_error": decode_err, "top1_agreement": top1, "greedy_tokens_matching": agree,
            "greedy_tokens_checked": VERIFY_TOKENS,
            "summary": f"rel. error prefill {prefill_err:.2e} / decode {decode_err:.2e} (tolerance {tol:g}), "
                       f"top-1 {top1:.1%}, greedy tokens {agree}/{VERIFY_TOKENS} equal"}


def rel_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ (NaN when the output is not finite)."""
    denom = float(ref.norm())
    return float((out - ref).norm()) / denom if denom else float(out.norm() != 0) * math.inf


# ----------------------------------------------------------------------------------------------------------------
# 第五节 生成: one batched generate() call, timed: latency, TTFT, decode time per token, tokens generated.

def _sync(device) -> None:
    import torch
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def first_token_timer(module, device, on: bool = True):
    """TTFT: a forward hook that fires once, after the prefill forward (the first new token's logits exist),
    synchronizes, notes the time and removes itself, so the decode steps after it run with no hook at all.

    (A LogitsProcessor would also work, but transformers inspects every processor's signature at every step:
    measured +5-10% per request on random:tiny.) Yields a dict whose "t" is the time, None until then.
    """
    mark = {"t": None}

    def hook(mod, args, output):
        _sync(device)
        mark["t"] = time.perf_counter()
        handle.remove()
    handle = module.register_forward_hook(hook) if on else None
    try:
        yield mark
    finally:
        if handle is not None:
            handle.remove()


class GraphStep:
    """A decode step captured once as a CUDA graph and then replayed: the very kernels of the eager step, launched
    as one. For bitsandbytes models, which transformers does not let torch.compile rewrite: their numbers stay
    exactly those of the eager model. One graph per KV cache (the graph holds its addresses)."""

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
        # This step runs eagerly, on a side stream as capture needs (lazy cuBLAS/bnb setup happens there, not
        # in the graph); then the next step's work is recorded, not run.
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


def forward_last(model, ids, pos, slots, mask, cache):
    """One forward on the static KV cache (prefill: the prompt; decode: one token a row): the last logits."""
    return model(input_ids=ids, position_ids=pos, cache_position=slots, attention_mask=mask,
                 past_key_values=cache, use_cache=True).logits[:, -1]


def decode_step(model, device) -> tuple:
    """fast_generate's one-token forward and how it runs (`decode_step` in the report): "compiled" —
    torch.compile, fused kernels in CUDA graphs — for a plain model on a GPU; "cuda-graph" (GraphStep) for a
    bitsandbytes model on a GPU; "eager" on a CPU and for LLM.int8 with outlier columns (threshold > 0): every
    matmul asks the host whether the input has outliers, which no CUDA graph can hold (on an H100 the capture
    failed, and torch's CUDA RNG failed after it)."""
    import torch
    step = functools.partial(forward_last, model)
    quant = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if device.type != "cuda" or (quant and quant.load_in_8bit and quant.llm_int8_threshold > 0):
        return step, "eager"
    if quant is not None:
        return GraphStep(step), "cuda-graph"
    return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False), "compiled"


def decode_mode(model) -> str:
    """How fast_generate ran the decode step: decode_step()'s answer, or "generate" (no --compile)."""
    return model.__dict__.get("_fast_decode", {}).get("mode", "generate")


def fast_generate(model, enc, new_tokens: int, eos: set, pad_id: int, min_new_tokens: int = 0, step_logits=None):
    """--compile (第八节): greedy decoding written out, as gpt-fast does it; returns prompt + new token ids.

    A static KV cache gives every decode step the same shapes, so on a GPU the whole step becomes one CUDA graph
    (decode_step): one launch a token instead of ~700 kernels issued from Python. Nothing else runs per step but
    an argmax; the host waits for the GPU once every 16 steps (have all sequences ended?), where generate() waits
    every step. transformers' own generate(cache_implementation="static") compiles the same forward, but its
    per-step Python leaves the GPU idle ~30% of each step (measured, README 第八节).
    step_logits (a list) receives each step's raw logits; min_new_tokens bans EOS as generate() does.
    """
    import torch
    from transformers import StaticCache
    ids, mask = enc["input_ids"], enc["attention_mask"]
    (b, t), dev = ids.shape, ids.device
    state = model.__dict__.setdefault("_fast_decode", {})     # the step and a KV cache per shape, kept
    if "step" not in state:
        state["step"], state["mode"] = decode_step(model, dev)
    if (b, t + new_tokens) not in state:
        state[b, t + new_tokens] = StaticCache(config=model.config, max_cache_len=t + new_tokens)
    cache = state[b, t + new_tokens]
    cache.reset()
    # Left padding: a row's positions count its real tokens only; the mask spans the whole cache (fixed shape),
    # and is left out when nothing is padded.
    full_mask = None if bool(mask.all()) else torch.cat([mask, mask.new_ones(b, new_tokens)], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    eos_t = torch.tensor(sorted(eos - {None}), dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    out = []
    logits = forward_last(model, ids, pos, torch.arange(t, device=dev), full_mask, cache)      # prefill
    pos, slot = pos[:, -1:] + 1, torch.tensor([t], device=dev)       # where the first new token goes
    for i in range(new_tokens):
        logits = logits.float()
        if step_logits is not None:
            step_logits.append(logits.cpu())
        if i < min_new_tokens:
            logits = logits.index_fill(-1, eos_t, -math.inf)
        token = torch.where(done, pad_id, logits.argmax(-1))
        done |= torch.isin(token, eos_t)
        out.append(token)
        if i == new_tokens - 1 or (i % 16 == 15 and bool(done.all())):
            break
        if state["mode"] == "compiled":
            torch.compiler.cudagraph_mark_step_begin()         # the last step's outputs are consumed: reuse them
        logits = state["step"](token[:, None], pos, slot, full_mask, cache)
        pos, slot = pos + 1, slot + 1
    return torch.cat([ids, torch.stack(out, dim=1)], dim=1)


def generate(engine, tokenizer, prompts: list[str], config: DeployConfig, ttft: bool = True) -> dict:
    """第五节: generate for one batch of prompts; returns texts, latency, TTFT, decode time, token counts.

    ttft=False leaves the first-token timer out (measure() uses it to show what the timer itself costs)."""
    import torch
    device = next(p.device for p in engine.parameters())
    module = getattr(engine, "module", engine)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    sampling = dict(do_sample=True, temperature=config.temperature, top_p=config.top_p) if config.do_sample \
        else dict(do_sample=False)
    torch.manual_seed(config.seed)                # same samples on every rank and every run
    _sync(device)
    with first_token_timer(module, device, on=ttft) as first, torch.no_grad():
        t0 = time.perf_counter()
        if config.compile:
            out = fast_generate(module, enc, config.max_new_tokens, eos_ids(tokenizer, engine),
                                tokenizer.pad_token_id)
        else:
            out = engine.generate(**enc, max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                  **sampling)
        _sync(device)
        latency = time.perf_counter() - t0
    new_ids = out[:, enc["input_ids"].shape[1]:].tolist()
    counts = count_new_tokens(new_ids, eos_ids(tokenizer, engine))
    ttft = first["t"] - t0 if ttft else math.nan
    steps = len(new_ids[0])                                  # generate() pads every row to the same length
    return {"texts": [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(new_ids, counts)],
            "latency_s": latency, "ttft_s": ttft, "new_tokens": counts, "steps": steps,
            "decode_s_per_token": decode_time_per_token(latency, ttft, steps),
            "prompt_tokens": int(enc["attention_mask"].sum())}


def eos_ids(tokenizer, model) -> set[int]:
    cfg = getattr(getattr(model, "module", model), "generation_config", None)   # a DeepSpeed engine wraps .module
    ids = cfg.eos_token_id if cfg is not None and cfg.eos_token_id is not None else \
        getattr(tokenizer, "eos_token_id", None)
    return set(ids) if isinstance(ids, (list, tuple)) else {ids}


# ----------------------------------------------------------------------------------------------------------------
# 第八节 测量: pure functions of numbers, so that tests check them without a model.

def count_new_tokens(new_ids: list[list[int]], eos: set[int]) -> list[int]:
    """Tokens each sequence actually generated: up to and including its first EOS; padding after it excluded."""
    return [next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids)) for ids in new_ids]


def decode_time_per_token(latency_s: float, ttft_s: float, steps: int) -> float | None:
    """Seconds per decode step: the time after the first token over the steps after it (None for 1 step)."""
    return (latency_s - ttft_s) / (steps - 1) if steps > 1 else None


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "n": len(values)}


def throughput(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else math.nan


def gpu_mem_gb(device=None) -> dict:
    """第八节: this process's GPU memory in GiB — allocated/reserved now and their peaks (None on CPU).

    Allocated = tensors alive; reserved = what PyTorch's caching allocator holds from the driver (>= allocated).
    """
    import torch
    if not torch.cuda.is_available():
        return {"allocated": None, "reserved": None, "peak_allocated": None, "peak_reserved": None}
    gib = 2 ** 30
    return {"allocated": torch.cuda.memory_allocated(device) / gib,
            "reserved": torch.cuda.memory_reserved(device) / gib,
            "peak_allocated": torch.cuda.max_memory_allocated(device) / gib,
            "peak_reserved": torch.cuda.max_memory_reserved(device) / gib}


def weight_bytes(model) -> int:
    """Bytes of weight storage, counted from the real tensors: parameters and buffers (packed int8 / 4-bit data
    as stored) plus bitsandbytes' quantization state (8-bit row scales; 4-bit absmax and codebooks, nested too)."""
    import torch
    seen, total = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        qs = getattr(p, "quant_state", None)
        tensors = [p, getattr(p, "SCB", None)]
        while qs is not None:
            tensors += [qs.absmax, qs.code]
            qs = qs.state2 if qs.nested else None
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def decode_read_bytes(model) -> int:
    """Weight bytes one decode step reads: everything but the input embedding table, of which a step reads only
    one row per sequence (unless it is tied to the output layer, which reads all of it)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    return weight_bytes(model) - (0 if tied else emb.numel() * emb.element_size())


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(device: str) -> float:
    """This device's memory bandwidth in GB/s, measured: a large copy, bytes read + written, median of 10.

    The buffer (1 GiB on a GPU) is far larger than any cache, and holds random bytes, never zeros."""
    import torch
    n = 2 ** 30 if device.startswith("cuda") else 2 ** 27
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(12):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:                                            # the first copies page the buffers in
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n / percentile(times, 50) / 1e9


def mbu(bytes_per_step: int, s_per_step: float | None, bandwidth_gbps: float) -> float | None:
    """Model bandwidth utilisation: weight bytes read per decode step × steps/s ÷ the device's bandwidth."""
    if not s_per_step:
        return None
    return bytes_per_step / s_per_step / (bandwidth_gbps * 1e9)


def measure(engine, tokenizer, prompts: list[str], config: DeployConfig) -> dict:
    """第八节: warm up, then --iters timed runs over all batches; latency stats, token throughput, MBU."""
    import torch
    batches = batches_of(prompts, config.batch_size)
    module = getattr(engine, "module", engine)
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts) + config.max_new_tokens
    limit = getattr(module.config, "max_position_embeddings", None)
    if limit and longest > limit:
        raise UsageError(f"the longest prompt plus --max-new-tokens is {longest} tokens but the model was trained "
                         f"for at most {limit} positions; shorten the prompt or lower --max-new-tokens.")
    device = str(next(engine.parameters()).device)
    bandwidth = copy_bandwidth_gbps(device)                   # before the peak-memory reset: its buffers are big
    # Warm-up picks cuBLAS kernels and grows the allocator; with --compile the first two calls compile.
    warmup = max(config.warmup, 2) if config.compile else config.warmup
    for _ in range(warmup):
        generate(engine, tokenizer, batches[0], config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    runs, untimed = [], []
    for i in range(config.iters):
        # The same first batch without the TTFT timer (measuring must not slow down what it measures), run after
        # the timed batches on even iterations and before them on odd ones, so that neither side always runs warmer.
        if i % 2:
            untimed.append(generate(engine, tokenizer, batches[0], config, ttft=False)["latency_s"])
        runs += [generate(engine, tokenizer, b, config) for b in batches]
        if not i % 2:
            untimed.append(generate(engine, tokenizer, batches[0], config, ttft=False)["latency_s"])
    timed_first = [r["latency_s"] for r in runs[::len(batches)]]
    tokens = sum(sum(r["new_tokens"]) for r in runs)
    seconds = sum(r["latency_s"] for r in runs)
    decode = [r["decode_s_per_token"] for r in runs if r["decode_s_per_token"] is not None]
    step_bytes = decode_read_bytes(module)
    step_s = percentile(decode, 50) if decode else None
    return {"runs": runs, "metrics": {
        "latency_s": summarize([r["latency_s"] for r in runs]),
        "ttft_s": summarize([r["ttft_s"] for r in runs]),
        "decode_s_per_token": summarize(decode) if decode else None,
        "decode_tok_s": config.batch_size / step_s if step_s else None,
        "generated_tokens": tokens, "timed_seconds": seconds,
        "tokens_per_s": throughput(tokens, seconds), "batch_size": config.batch_size,
        "batches_per_iter": len(batches), "warmup_runs": warmup,
        "weight_gb": weight_bytes(module) / 1e9, "decode_read_gb": step_bytes / 1e9,
        "bandwidth_GBps": bandwidth, "mbu": mbu(step_bytes, step_s, bandwidth),
        "roofline_decode_tok_s": config.batch_size * bandwidth * 1e9 / step_bytes,
        "decode_step": decode_mode(module),
        "timer_overhead": percentile(timed_first, 50) / percentile(untimed, 50) - 1}}


# ----------------------------------------------------------------------------------------------------------------
# 报告: rank 0 prints a card, the texts, a metrics table and the fallbacks; --json writes one object.

def print0(text: str, file=None) -> None:
    """Print on rank 0 only (every rank runs the same script), in one write: the other ranks share the terminal,
    and a line written in two pieces can come out with another process's line in between."""
    if int(os.environ.get("RANK", "0")) == 0:
        file = file or sys.stdout
        file.write(text + "\n")
        file.flush()


def versions() -> dict:
    from importlib import metadata
    v = {"python": platform.python_version()}
    for pkg in ["torch", "transformers", "deepspeed", "bitsandbytes", "accelerate"]:
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    import torch
    v["cuda"] = torch.version.cuda
    return v


def hardware(device: str, world_size: int) -> dict:
    import torch
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    return {"device": device.split(":")[0], "gpu": gpu, "world_size": world_size, "cpu_count": os.cpu_count()}


def gather_memory(world_size: int, mem: dict) -> list[dict]:
    """Every rank's memory dict, collected on all ranks (rank order)."""
    if world_size == 1:
        return [mem]
    import torch.distributed as tdist
    out = [None] * world_size
    tdist.all_gather_object(out, mem)
    return out


def build_report(config, record, prompts, result, memory, device, world_size) -> dict:
    batches = batches_of(prompts, config.batch_size)
    outputs = [{"prompt": p, "text": t, "new_tokens": n}          # the first iteration's batches
               for r, b in zip(result["runs"], batches) for p, t, n in zip(b, r["texts"], r["new_tokens"])]
    m = dict(result["metrics"])
    m["tokens_per_s_cluster"] = m.pop("tokens_per_s")
    m["tokens_per_s_per_gpu"] = m["tokens_per_s_cluster"] / world_size
    m["per_run"] = [{k: r[k] for k in ("latency_s", "ttft_s", "new_tokens", "steps", "prompt_tokens")}
                    for r in result["runs"]]
    return {"config": dataclasses.asdict(config), "versions": versions(), "hardware": hardware(device, world_size),
            "engine": dict(record),
            "metrics": m, "memory": {"unit": "GiB", "per_rank": memory}, "outputs": outputs,
            "note": "random weights: the text is meaningless" if config.model_name in PRESETS else None}


def render(report: dict) -> str:
    """Human-readable report: card, generated texts, metrics table, fallbacks."""
    c, e, m, h = report["config"], report["engine"], report["metrics"], report["hardware"]
    v = report["versions"]
    int8 = f" (int8 threshold {c['int8_threshold']:g})" if e["quant"] == "8bit" else ""
    lines = [f"model    {c['model_name']}" + ("   (random weights: the text is meaningless)" if report["note"] else ""),
             f"engine   backend={e['backend']} quant={e['quant']}{int8} kernel_inject={e['kernel_inject']} "
             f"dtype={e['dtype']}{' (4-bit matmuls in bfloat16)' if e.get('compute_dtype') else ''} "
             f"tp={c['tp_size']}",
             f"hardware {h['gpu'] or h['device']} x{h['world_size']} rank(s)",
             f"versions torch {v['torch']}, transformers {v['transformers']}, deepspeed {v['deepspeed']}, "
             f"bitsandbytes {v['bitsandbytes']}",
             "verify   " + (f"against {e['verify']['reference']}: {e['verify']['summary']}"
                           + (" PASSED" if e["verify"]["passed"] else " FAILED")
                           if e["verify"] else "not run (no DeepSpeed wrapping)" if e["backend"] == "hf"
                           else "off (--no-verify)"), ""]
    for o in report["outputs"][:8]:
        lines.append(f"> {o['prompt']!r} -> {o['text']!r} ({o['new_tokens']} tokens)")
    lat, ttft, dec = m["latency_s"], m["ttft_s"], m["decode_s_per_token"]
    lines += ["", f"{'metric':<30}{'mean':>10}{'p50':>10}{'p95':>10}",
              f"{'latency per batch (s)':<30}{lat['mean']:>10.4f}{lat['p50']:>10.4f}{lat['p95']:>10.4f}",
              f"{'TTFT (s)':<30}{ttft['mean']:>10.4f}{ttft['p50']:>10.4f}{ttft['p95']:>10.4f}"]
    if dec:
        lines.append(f"{'decode per token (ms)':<30}{dec['mean'] * 1e3:>10.2f}{dec['p50'] * 1e3:>10.2f}"
                     f"{dec['p95'] * 1e3:>10.2f}")
    lines += [f"tokens generated {m['generated_tokens']} in {m['timed_seconds']:.3f} s over {lat['n']} batches of "
              f"{m['batch_size']}: {m['tokens_per_s_cluster']:.1f} tok/s (cluster), "
              f"{m['tokens_per_s_per_gpu']:.1f} tok/s per rank"]
    if m["mbu"] is not None:
        lines.append(f"decode {m['decode_tok_s']:.1f} tok/s reads {m['decode_read_gb']:.3f} GB of weights per step: "
                     f"MBU {m['mbu']:.1%} of {m['bandwidth_GBps']:.0f} GB/s (measured copy bandwidth), roofline "
                     f"{m['roofline_decode_tok_s']:.0f} tok/s, decode step: {m['decode_step']}")
    lines.append(f"the TTFT timer changed the batch latency by {m['timer_overhead']:+.1%} (p50 with vs without it, "
                 f"{lat['n'] // m['batches_per_iter']} runs each)")
    for rank, mem in enumerate(report["memory"]["per_rank"]):
        if mem["peak_allocated"] is not None:
            lines.append(f"rank {rank} GPU memory: peak allocated {mem['peak_allocated']:.2f} GiB, "
                         f"peak reserved {mem['peak_reserved']:.2f} GiB (measured runs); peak allocated "
                         f"{mem['loading_peak_allocated']:.2f} GiB while loading and verifying")
    for f in e["fallbacks"]:
        lines.append(f"fallback {f['what']}: {f['from']} -> {f['to']} ({f['reason']})")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    """Write the report to a temporary file and rename it into place: never a half-written file."""
    text = json.dumps(_finite(report), ensure_ascii=False)
    if path == "-":
        print(text, flush=True)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _finite(x):
    """NaN/inf become null, so the report stays valid JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------------------------
# 第八节 对比: --compare runs each mode in a fresh process (no mode inherits another's memory or compiled kernels).

def compare(config: DeployConfig) -> int:
    """Run the modes of --compare on the same model and prompts; one table, optional JSON and PNG chart."""
    names = list(COMPARE_MODES) if config.compare == "all" else config.compare.split(",")
    if config.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib; pip install matplotlib (or leave out --plot).")
    common = to_argv(config, skip={"compare", "plot", "json_path", "backend", "quant", "kernel_inject", "compile",
                                   "fallback", "local_rank"})
    rows = []
    with tempfile.TemporaryDirectory(prefix="ds_bnb_infer-compare-") as tmp:
        for name in names:
            path = os.path.join(tmp, f"{name}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *common, *COMPARE_MODES[name], "--json", path]
            print(f"[compare] {name}: {' '.join(cmd[2:-2])}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            rows.append(compare_row(name, proc.returncode, proc.stderr, path))
    ok = [r for r in rows if r["status"] == "ok"]
    result = {"date": time.strftime("%Y-%m-%d"), "card": ok[0]["card"] if ok else None, "versions": versions(),
              "bandwidth_GBps": ok[0]["bandwidth_GBps"] if ok else None, "config": dataclasses.asdict(config),
              "rows": rows}
    print(render_compare(result))
    if config.plot:
        plot_compare(result, config.plot)
    if config.json_path:
        write_json(result, config.json_path)
    return 0


def compare_row(name: str, returncode: int, stderr: str, path: str) -> dict:
    """One --compare row from a mode's JSON report (or its one-line error)."""
    if returncode != 0 or not os.path.exists(path):
        errors = [line for line in stderr.splitlines() if line.startswith("error:")] or stderr.splitlines()[-1:]
        return {"mode": name, "status": "failed", "reason": errors[-1] if errors else f"exit {returncode}"}
    with open(path, encoding="utf-8") as fh:
        rep = json.load(fh)
    e, m, c = rep["engine"], rep["metrics"], rep["config"]
    peaks = [r["peak_allocated"] for r in rep["memory"]["per_rank"] if r["peak_allocated"] is not None]
    return {"mode": name, "status": "ok", "card": rep["hardware"]["gpu"] or "cpu", "backend": e["backend"],
            "quant": e["quant"], "int8_threshold": c["int8_threshold"] if e["quant"] == "8bit" else None,
            "dtype": e["dtype"], "kernel_inject": e["kernel_inject"], "compile": e["compile"],
            "decode_step": m["decode_step"], "batch_size": c["batch_size"],
            "prompt_len": m["per_run"][0]["prompt_tokens"] / c["batch_size"], "new_tokens": c["max_new_tokens"],
            "decode_tok_s": m["decode_tok_s"], "tok_s": m["tokens_per_s_cluster"], "ttft_s": m["ttft_s"]["p50"],
            "p50_s": m["latency_s"]["p50"], "p95_s": m["latency_s"]["p95"],
            "peak_alloc_gb": max(peaks) * 2 ** 30 / 1e9 if peaks else None, "weight_gb": m["weight_gb"],
            "mbu": m["mbu"], "roofline_decode_tok_s": m["roofline_decode_tok_s"],
            "bandwidth_GBps": m["bandwidth_GBps"], "timer_overhead": m["timer_overhead"],
            "verified": e["verify"]["passed"] if e["verify"] else "reference",
            "verify": e["verify"]["summary"] if e["verify"] else "plain transformers is the reference",
            "fallbacks": e["fallbacks"]}


def render_compare(result: dict) -> str:
    head = f"{'mode':<20}{'quant':>6}{'batch':>6}{'TTFT s':>8}{'p50 s':>8}{'p95 s':>8}{'decode tok/s':>13}" \
           f"{'MBU':>6}{'peak GB':>9}  verified"
    lines = [f"compare on {result['card']} ({result['bandwidth_GBps'] or 0:.0f} GB/s measured copy bandwidth), "
             f"{result['date']}", head]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['mode']:<20} FAILED: {r['reason']}")
            continue
        mbu_txt = f"{r['mbu']:.0%}" if r["mbu"] is not None else "-"
        peak = f"{r['peak_alloc_gb']:.2f}" if r["peak_alloc_gb"] is not None else "-"
        lines.append(f"{r['mode']:<20}{r['quant']:>6}{r['batch_size']:>6}{r['ttft_s']:>8.3f}{r['p50_s']:>8.3f}"
                     f"{r['p95_s']:>8.3f}{r['decode_tok_s'] or 0:>13.1f}{mbu_txt:>6}{peak:>9}  {r['verified']}")
    lines.append("decode tok/s = batch / decode time per step (p50); MBU = weight bytes per step x steps/s / "
                 "bandwidth; peak GB = peak allocated GPU memory (1e9 bytes)")
    return "\n".join(lines)


def plot_compare(result: dict, path: str) -> None:
    """Bar chart: decode tok/s per mode with its bandwidth roofline, and peak GPU memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    names = [r["mode"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar(names, [r["decode_tok_s"] or 0 for r in rows], color="tab:blue", label="decode tok/s (measured)")
    ax1.scatter(names, [r["roofline_decode_tok_s"] for r in rows], marker="_", s=600, color="tab:red",
                label="roofline: bandwidth / weight bytes per step")
    ax1.set_ylabel("tokens/s")
    ax1.legend(fontsize=8)
    ax2.bar(names, [r["peak_alloc_gb"] or 0 for r in rows], color="tab:green")
    ax2.set_ylabel("peak allocated GPU memory (GB)" + ("" if any(r["peak_alloc_gb"] for r in rows) else ": none on CPU"))
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    batch = rows[0]["batch_size"] if rows else "?"
    fig.suptitle(f"{result['card']}, batch {batch}, {result['date']} (verified modes only)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------------------------
# main: validate → (distributed) → init_engine → measure → report. Errors: one sentence, exit 2 or 1.

def run(config: DeployConfig) -> int:
    import torch
    rank, _, world_size = dist_env(config)
    validate(config, world_size, torch.cuda.is_available())
    prompts = load_prompts(config)
    if config.compare:
        return compare(config)
    device = pick_device(config)
    record = {}
    engine, tokenizer = init_engine(config, record)
    loading = gpu_mem_gb()["peak_allocated"]         # loading, wrapping, verifying (measure() resets the peak)
    result = measure(engine, tokenizer, prompts, config)
    memory = gather_memory(world_size, dict(gpu_mem_gb(), loading_peak_allocated=loading))
    report = build_report(config, record, prompts, result, memory, device, world_size)
    print0(render(report))
    if config.json_path and rank == 0:
        write_json(report, config.json_path)
    if world_size > 1:
        torch.distributed.destroy_process_group()     # a clean exit (NCCL warns of leaked resources otherwise)
    return 0


def quiet_libraries() -> None:
    """Library chatter (deprecations, progress bars, bitsandbytes' per-call "cast to float16" note) would bury
    the report; --debug keeps all of it. Must run before transformers is imported."""
    import logging
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv=None) -> int:
    config = config_from_args(argv)
    if not config.debug:
        quiet_libraries()
    try:
        return run(config)
    except Exception as e:
        if config.debug:
            raise
        import torch
        if isinstance(e, UsageError):
            print0(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, torch.OutOfMemoryError):
            print(f"error: out of GPU memory ({_reason(e)[:120]}); try --quant 4bit, a smaller --batch-size or "
                  "--max-new-tokens, or more GPUs with --tp-size.", file=sys.stderr)
        else:
            print(f"error: {e if isinstance(e, RunFailure) else _reason(e)} (run with --debug for the traceback)",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
