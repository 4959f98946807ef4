#!/usr/bin/env python3
"""ds_bnb_infer.py — deploy an LLM with DeepSpeed Inference and bitsandbytes 8/4-bit; measure what each choice costs.

Read it beside the tutorial 《DeepSpeed + bitsandbytes 量化部署示例：使用说明与函数文档》 (README.md: made true for
today's libraries): its path in its order, every 第N节 its own section. 四 DeployConfig → 七 the model object, quantized
by bitsandbytes → 五 init_engine (deepspeed.init_inference), checked against the unwrapped model → 五 generate → 八
latency, throughput, GPU memory → the report → main(), under the deepspeed launcher too (六). extensions/: 第十节.

What generation costs (第八节). Prefill: the prompt in one pass, many tokens per weight read (compute-bound).
Decode: one new token per sequence per step, every weight read once a step, so at small batch a step takes at least
weight bytes / memory bandwidth; fewer bytes (8-bit, 4-bit) lower that bound, and the dequantisation kernels and
Python launching hundreds of kernels a step decide how near decode gets. TTFT (time to first token) is the prefill;
decode time per token is the rest over the later steps. Throughput counts the tokens actually generated (not the
prompt, not padding, nothing after EOS). Weight bytes read per step x steps per second, over the bandwidth: MBU.

Commands (random:* presets: random weights built in code, no download, meaningless text, real time and memory):
  python ds_bnb_infer.py --model random:llama-2-7b --quant 4bit           # one GPU; random:tiny: CPU, seconds
  deepspeed --num_gpus=2 ds_bnb_infer.py --tp-size 2 --model random:llama-2-7b   # tensor parallel (第六节)
"""
import argparse, contextlib, dataclasses, gc, json, logging, math, os, platform, resource, sys, tempfile, time, typing
import warnings
from dataclasses import dataclass, field
from typing import Annotated, Literal
# torch, transformers, deepspeed and bitsandbytes are imported where used: --help and bad flags answer at once.

# ----------------------------------------------------------------------------------------------------------------
# 第四节 DeployConfig: every setting of a run, each default written once; the command line is derived from it.
PRESETS = {
    # A small Llama (2 layers) that runs on a CPU in seconds. Sizes are multiples of 32: on CPUs with AVX512-BF16,
    # bitsandbytes' 4-bit kernel packs weights in blocks of 32 output rows.
    "random:tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=320, max_position_embeddings=2048),
    # The Llama-2 architectures (70B: 8 KV heads): random weights cost exactly what real ones cost in time and memory.
    **{f"random:llama-2-{size}": dict(hidden_size=h, intermediate_size=ffn, num_hidden_layers=n, num_attention_heads=a,
                                      num_key_value_heads=kv, vocab_size=32000, max_position_embeddings=4096,
                                      rms_norm_eps=1e-5) for size, h, ffn, n, a, kv in [("7b", 4096, 11008, 32, 32, 32),
                                      ("13b", 5120, 13824, 40, 40, 40), ("70b", 8192, 28672, 80, 64, 8)]},
}
REAL_MODELS = {"real:smollm2-135m": "SmolLM2-135M-Instruct"}   # trained, offline: setup/real_model.py

@dataclass
class DeployConfig:
    """第四节: every setting of a run; each line is a field's type, --help text and default (build_parser reads them)."""
    # The tutorial's four fields.
    model_name: Annotated[str, "hub id, local folder, or a preset: " + ", ".join([*PRESETS, *REAL_MODELS])] = \
        "meta-llama/Llama-2-7b-chat-hf"
    tp_size: Annotated[int, "tensor-parallel ranks (DeepSpeed AutoTP); start them with deepspeed --num_gpus=N"] = 1
    pp_size: Annotated[int, "pipeline stages; refused above 1: DeepSpeed Inference has none (第六节)"] = 1
    max_new_tokens: Annotated[int, "new tokens per sequence"] = 64
    # How the model is loaded and wrapped (第五节, 第七节).
    backend: Annotated[Literal["deepspeed", "hf"], "deepspeed.init_inference, or plain transformers"] = "deepspeed"
    quant: Annotated[Literal["none", "8bit", "4bit"], "bitsandbytes: 8bit LLM.int8, 4bit nf4 + double quant"] = "none"
    int8_threshold: Annotated[float, "8bit: LLM.int8's outlier threshold; 0 = plain int8 (another format)"] = 6.0
    # 第七节's 4-bit BitsAndBytesConfig fields, under their own names.
    bnb_4bit_quant_type: Annotated[Literal["nf4", "fp4"], "4bit code book: nf4 (normal quantiles) or fp4"] = "nf4"
    bnb_4bit_use_double_quant: Annotated[bool, "4bit: quantize the block scales again (~0.4 bit/weight less)"] = True
    bnb_4bit_compute_dtype: Annotated[Literal["bf16", "fp16", "fp32"], "4bit: dtype the matmuls run in"] = "bf16"
    dtype: Annotated[Literal["auto", "fp16", "bf16", "fp32"], "unquantized weights; auto: GPU fp16, CPU fp32"] = "auto"
    kernel_inject: Annotated[bool | None, "DeepSpeed's fused kernels, verified (default: on unless broken)"] = None
    device: Annotated[Literal["auto", "cuda", "cpu"], "auto = cuda when a GPU is visible"] = "auto"
    fallback: Annotated[bool, "on failure fall back: 4bit -> 8bit -> none, injection -> none, deepspeed -> hf"] = True
    verify: Annotated[bool, "check the engine's logits and greedy tokens against the unwrapped model"] = True
    trust_remote_code: Annotated[bool, "run model code from the hub (only code you have read)"] = False
    # What is generated and measured (第五节, 第八节).
    prompts: Annotated[list, "a prompt; repeat the flag for several"] = field(default_factory=lambda: ["DeepSpeed is"])
    prompts_file: Annotated[str | None, "a UTF-8 text file, one prompt per line"] = None
    batch_size: Annotated[int, "sequences per generate() call"] = 1
    warmup: Annotated[int, "untimed runs first (cuBLAS picks its kernels, the allocator grows)"] = 1
    iters: Annotated[int, "timed runs over all batches"] = 3
    do_sample: Annotated[bool, "sample instead of greedy decoding"] = False
    temperature: Annotated[float, "sampling temperature (> 0)"] = 1.0
    top_p: Annotated[float, "nucleus sampling mass, in (0, 1]"] = 1.0
    seed: Annotated[int, "seed of the presets' random weights and of sampling"] = 0
    json_path: Annotated[str | None, "write the JSON report here ('-': as the last stdout line)"] = None
    text_chars: Annotated[int, "characters of each generated text the console shows; 0 = all"] = 100
    debug: Annotated[bool, "show tracebacks and library warnings"] = False
    local_rank: Annotated[int, "set by the deepspeed launcher (LOCAL_RANK is read too)"] = -1
    # An extension's settings subclass DeployConfig (their flags: a group of their own); fields it has no use for:
    not_flags: typing.ClassVar[tuple] = ()

FLAG_NAMES = {"model_name": "--model", "prompts": "--prompt", "json_path": "--json", "local_rank": "--local_rank"}
# Hand-written rather than transformers' HfArgumentParser, which would name the flags after the fields (--model_name).
def build_parser(prog: str = "ds_bnb_infer.py", config_class: type = DeployConfig) -> argparse.ArgumentParser:
    """The command line: one flag per field of config_class; a flag not given keeps the dataclass default."""
    doc = sys.modules[config_class.__module__].__doc__ or __doc__      # the running script's: --help's first line
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0],
                                     epilog="Every mode in one table: python measure/compare.py --help")
    hints, defaults = typing.get_type_hints(config_class, include_extras=True), config_class()
    group, lesson_fields = parser, {f.name for f in dataclasses.fields(DeployConfig)}
    for f in [f for f in dataclasses.fields(config_class) if f.name not in config_class.not_flags]:
        if f.name not in lesson_fields and group is parser:
            group = parser.add_argument_group(config_class.__doc__.split("\n")[0])
        kind, help = typing.get_args(hints[f.name])
        kind = typing.get_args(kind)[0] if type(None) in typing.get_args(kind) else kind     # X | None -> X
        default = getattr(defaults, f.name)
        kw = dict(dest=f.name, default=argparse.SUPPRESS,
                  help=help if default in (None, -1) else f"{help} (default: {default})")
        if typing.get_origin(kind) is Literal:
            kw["choices"] = typing.get_args(kind)
        elif kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kw.update(action="append", metavar="TEXT")
        else:
            kw.update(type=kind, metavar=f.name.split("_")[-1].upper())      # model_name -> NAME
        flag = FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        group.add_argument(*[flag, "--local-rank"][:2 if f.name == "local_rank" else 1], **kw)
    return parser

def config_from_args(argv=None, prog: str = "ds_bnb_infer.py", config_class: type = DeployConfig) -> DeployConfig:
    """Parse argv into a config_class; argparse exits 2 with one line on an unknown flag or a bad value."""
    return config_class(**vars(build_parser(prog, config_class).parse_args(argv)))

class UsageError(Exception):
    """Bad input: the message names the problem and the fix. Exit code 2."""
class RunFailure(Exception):
    """The run itself failed (a mode that cannot run, a file that cannot be written). Exit code 1."""

def dist_env(config: DeployConfig) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment (deepspeed, torchrun) or --local_rank."""
    local = int(os.environ.get("LOCAL_RANK", config.local_rank if config.local_rank >= 0 else 0))
    return int(os.environ.get("RANK", local)), local, int(os.environ.get("WORLD_SIZE", "1"))

def print0(text: str, file=None) -> None:
    """Print on rank 0 only (every rank runs this file), in one write so that no other rank's line lands inside."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text + "\n", end="", file=file or sys.stdout, flush=True)
def log(text: str) -> None:
    print0(text, file=sys.stderr)         # progress and notes: stdout holds the report alone

def validate(config: DeployConfig, world_size: int, cuda_available: bool) -> None:
    """Refuse impossible or conflicting settings before anything is loaded (every rank refuses the same way)."""
    c = config
    refusals = [(getattr(c, name) < low, f"--{name.replace('_', '-')} must be at least {low}, got {getattr(c, name)}.")
                for name, low in [("tp_size", 1), ("pp_size", 1), ("max_new_tokens", 1), ("batch_size", 1),
                                  ("warmup", 0), ("iters", 1), ("text_chars", 0)]] + [
        (not c.temperature > 0, f"--temperature must be > 0, got {c.temperature}."),
        (not 0 < c.top_p <= 1, f"--top-p must be in (0, 1], got {c.top_p}."),
        (c.device == "cuda" and not cuda_available,
         "--device cuda was asked for but no CUDA GPU is visible; use --device cpu (or auto)."),
        (c.backend == "deepspeed" and c.dtype == "fp16" and (c.device == "cpu" or not cuda_available),
         "DeepSpeed's CPU accelerator has no fp16; use --dtype bf16 or fp32 on a CPU (or --backend hf)."),
        (c.pp_size > 1, "--pp-size > 1 is not offered: DeepSpeed Inference has no pipeline engine (第六节); "
                        "use --tp-size N to split each layer over N GPUs."),
        (c.tp_size != world_size, f"--tp-size {c.tp_size} needs {c.tp_size} ranks but {world_size} were launched; "
                                  f"run: deepspeed --num_gpus={c.tp_size} ds_bnb_infer.py --tp-size {c.tp_size} ..."),
        (c.tp_size > 1 and c.backend != "deepspeed",
         "--tp-size > 1 is DeepSpeed's tensor parallelism; use --backend deepspeed."),
        (c.tp_size > 1 and c.quant != "none",
         f"--quant {c.quant} cannot be combined with --tp-size > 1: AutoTP slices weight matrices and bitsandbytes' "
         "packed weights cannot be sliced that way; use --tp-size 1 (a 4-bit 7B model fits one GPU) or --quant none."),
        (not c.int8_threshold >= 0, f"--int8-threshold must be >= 0, got {c.int8_threshold}."),        # NaN too
        *[(getattr(c, name) != getattr(DeployConfig, name) and c.quant != q, f"--{name.replace('_', '-')} applies to "
           f"--quant {q} only; add --quant {q} or drop it.") for name, q in [("int8_threshold", "8bit"), *[(
               f"bnb_4bit_{n}", "4bit") for n in ("quant_type", "use_double_quant", "compute_dtype")]]],
        (c.prompts_file and c.prompts != DeployConfig().prompts, "give --prompt or --prompts-file, not both."),
    ]
    if refused := [message for bad, message in refusals if bad]:
        raise UsageError(refused[0])
    if c.json_path not in (None, "-"):
        check_writable(c.json_path, "--json")

def check_writable(path: str, flag: str) -> None:
    """Create a file beside `path` now: a run of many minutes must not end in "cannot write"."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: " + ("is a folder; give a file name in it." if os.path.isdir(path) else
                                               "its folder does not exist; create it or pick another path."))
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"cannot write {flag} {path} ({e.strerror}); pick a folder you can write to.") from None

def load_prompts(config: DeployConfig) -> list[str]:
    """The prompts of a run: the --prompt values, or the non-blank lines of --prompts-file."""
    prompts, path = list(config.prompts), config.prompts_file
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                prompts = [line.rstrip("\n") for line in fh if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read --prompts-file {path} ({e.strerror}); check the path.") from None
        except UnicodeDecodeError:
            raise UsageError(f"--prompts-file {path} is not UTF-8 text; save it as UTF-8.") from None
        if not prompts:
            raise UsageError(f"--prompts-file {path} has no prompts; write one prompt per line.")
    if "" in prompts:
        raise UsageError("a --prompt is empty; give it some text (the model continues a prompt).")
    return prompts

def batches_of(prompts: list[str], batch_size: int) -> list[list[str]]:
    """Batches of exactly batch_size (第八节 批量); prompts repeat to fill the last, so every batch does equal work."""
    n = -(-len(prompts) // batch_size) * batch_size
    filled = [prompts[i % len(prompts)] for i in range(n)]
    return [filled[i:i + batch_size] for i in range(0, n, batch_size)]

# ----------------------------------------------------------------------------------------------------------------
# 第七节 bitsandbytes: the tokenizer and the model object, plain or quantized, loaded before DeepSpeed sees it.
QUANT_FALLBACK = {"4bit": "8bit", "8bit": "none"}     # 第七节: "若遇到不支持，可退回 8bit 或 FP16"
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}      # the flags' names -> torch's
def dtype_flag(dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(str(dtype)[6:], "fp32")      # torch.float16 -> "fp16"

def weights_dtype(config: DeployConfig, device: str):
    """The dtype of the weights bitsandbytes leaves unquantized: --dtype; auto = fp16 on a GPU, fp32 on a CPU."""
    import torch
    return getattr(torch, DTYPES[config.dtype if config.dtype != "auto" else "fp16" if "cuda" in device else "fp32"])

def byte_tokenizer(vocab_size: int):
    """The presets' tokenizer, built in code (no download): one token per UTF-8 byte, ids up to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(["<s>", "</s>", "<pad>"] + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), vocab_size)})   # ids no byte maps to
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")

def model_source(name: str, converted: bool = True) -> str:
    """Where a model loads from: the hub id or folder given, or the folder a REAL_MODELS preset is converted into."""
    if name not in REAL_MODELS:
        return name
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ds_bnb_infer",
                          REAL_MODELS[name])
    if converted and not os.path.isfile(os.path.join(folder, "config.json")):
        raise UsageError(f"{name} is not converted yet; run python setup/real_model.py once (README 二).")
    return folder

def check_model_source(name: str) -> None:
    """A folder must hold a model; a hub id must be cached or the hub answer in 3 s (its own retries take a minute)."""
    folder, fix = os.path.expanduser(name), f"give a local model folder, a hub id, or a preset ({', '.join(PRESETS)})"
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise UsageError(f"{name} is a folder but not a model (no config.json); {fix}.")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"model path {name} does not exist; {fix}.")
    from huggingface_hub import constants, get_session, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    try:
        if constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set")
        get_session().head(constants.ENDPOINT, timeout=3)
    except Exception as e:
        raise UsageError(f"cannot load {name}: it is not in the local cache and the model hub cannot be reached "
                         f"({str(e)[:100]}); give a local model folder, or --model random:tiny to learn offline.")

@contextlib.contextmanager
def loading_errors(name: str):
    """The hub's failures (a gated model, a missing repository) as one sentence each."""
    try:
        yield
    except OSError as e:
        if any(word in str(e) for word in ("gated", "401", "403")):
            raise UsageError(f"{name} is a gated model: accept its license on the hub and set HF_TOKEN (第九节), "
                             "or use a local copy.") from e
        raise UsageError(f"cannot load {name} ({str(e).splitlines()[0][:160]}); give a local model folder or "
                         "--model random:tiny.") from e

def load_tokenizer(config: DeployConfig):
    """The tokenizer, padding on the left so that every sequence of a batch ends at the same position."""
    if config.model_name in PRESETS:
        tok = byte_tokenizer(PRESETS[config.model_name]["vocab_size"])
    else:
        check_model_source(source := model_source(config.model_name))
        from transformers import AutoTokenizer
        with loading_errors(config.model_name):
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token      # Llama has no pad token; padded positions are masked anyway
    return tok

def model_config(config: DeployConfig):
    """The model's transformers config: its shape and how many positions it takes, read before any weight."""
    from transformers import AutoConfig, LlamaConfig
    if config.model_name in PRESETS:
        return LlamaConfig(**PRESETS[config.model_name], bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with loading_errors(config.model_name):
        return AutoConfig.from_pretrained(model_source(config.model_name), trust_remote_code=config.trust_remote_code)

def as_chat(tokenizer, prompts: list[str]) -> list[str]:
    """A chat model (one whose tokenizer has a chat template) answers a conversation: each prompt as a user turn."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts] if getattr(tokenizer, "chat_template", None) else prompts

def encode(tokenizer, prompts: list[str], device) -> dict:
    """Prompts as the model takes them: as_chat(), left-padded into one batch, ids and mask on `device`."""
    enc = tokenizer(as_chat(tokenizer, prompts), return_tensors="pt", padding=True)
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

def check_positions(config: DeployConfig, tokenizer, prompts: list[str]) -> int:
    """The longest prompt plus --max-new-tokens must fit the model's positions; returns that limit."""
    limit = getattr(model_config(config), "max_position_embeddings", None) or 2 ** 31
    longest = max(len(tokenizer(p)["input_ids"]) for p in as_chat(tokenizer, prompts)) + config.max_new_tokens
    if longest > limit:
        raise UsageError(f"the longest prompt plus --max-new-tokens is {longest} tokens but the model takes at most "
                         f"{limit} positions; shorten the prompt or lower --max-new-tokens.")
    return limit

def eos_ids(model, tokenizer=None) -> set[int]:
    """The ids that end a sequence: the model's generation_config, else the tokenizer's EOS."""
    cfg = getattr(getattr(model, "module", model), "generation_config", None)   # a DeepSpeed engine wraps .module
    ids = cfg.eos_token_id if cfg is not None and cfg.eos_token_id is not None else tokenizer.eos_token_id
    return set(ids) if isinstance(ids, (list, tuple)) else {ids}

def bnb_config(config: DeployConfig, quant: str):
    """第七节's BitsAndBytesConfig. LLM.int8 multiplies the input columns holding a value >= int8_threshold (the
    outlier features of trained LLMs) in fp16 and the rest in int8; threshold 0 is plain int8. 4-bit: the
    tutorial's nf4 + double quant + bf16 compute unless the bnb_4bit_* flags say otherwise."""
    from transformers import BitsAndBytesConfig
    try:
        import bitsandbytes  # noqa: F401 — fail here, in one sentence, rather than deep inside transformers
    except ImportError as e:
        raise ImportError("bitsandbytes is not installed (pip install bitsandbytes)") from e
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.int8_threshold)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=DTYPES[config.bnb_4bit_compute_dtype])

def free_memory() -> None:
    import torch
    gc.collect()
    torch.cuda.empty_cache()              # (does nothing without a GPU)

def random_weights(model, seed: int, device: str) -> None:
    """A preset's weights, each matrix ~ N(0, initializer_range) as transformers draws them, drawn on `device` a
    matrix at a time (tp ranks build on the CPU, slow at billions of draws): one seed, one model on every rank."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in [p for p in model.parameters() if p.dim() >= 2]:
        p.data.copy_(torch.empty_like(p, device=device).normal_(0, model.config.initializer_range, generator=gen))

def load_model(config: DeployConfig, quant: str, device: str):
    """第七节: the model object on `device`, quantized by bitsandbytes when quant != none. tp > 1 keeps it on the
    CPU: init_inference moves each rank's shard to its GPU, so no GPU holds the whole model (第七节's 提示)."""
    import torch
    from transformers import AutoModelForCausalLM
    dtype = weights_dtype(config, device)
    def from_pretrained(source):
        kw = dict(dtype=dtype, trust_remote_code=config.trust_remote_code)
        if quant != "none":
            kw.update(quantization_config=bnb_config(config, quant), device_map={"": device})
        elif config.tp_size == 1:
            kw.update(device_map={"": device})
        with loading_errors(config.model_name):
            return AutoModelForCausalLM.from_pretrained(source, **kw).eval()
    if config.model_name not in PRESETS:
        return from_pretrained(model_source(config.model_name))
    from transformers.initialization import no_init_weights
    with torch.device("cpu" if config.tp_size > 1 else device), no_init_weights():
        model = AutoModelForCausalLM.from_config(model_config(config), dtype=dtype)
    random_weights(model, config.seed, device)
    if quant == "none":
        return model.eval()
    with tempfile.TemporaryDirectory(prefix="ds_bnb_infer-") as tmp:   # bitsandbytes quantizes while loading
        model.save_pretrained(tmp)
        del model
        free_memory()              # or the full-precision copy's cached blocks would count as "reserved"
        return from_pretrained(tmp)

def fall_back(config: DeployConfig, what: str, frm, to, reason: str, usage: bool = False) -> dict:
    """A fallback (第九节), said on stderr and returned for the report; an error instead under --no-fallback."""
    if not config.fallback:
        fix = {"quant": "pick another --quant", "kernel_inject": "add --no-kernel-inject",
               "backend": "pip install deepspeed, or use --backend hf"}[what]
        raise (UsageError if usage else RunFailure)(
            f"{what} {frm} cannot be used ({reason}); --no-fallback forbids falling back to {to}: {fix}.")
    log(f"[fallback] {what}: {frm} -> {to} ({reason})")
    return {"what": what, "from": frm, "to": to, "reason": reason}

def reason_of(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"        # its first line

def load_quantized(config: DeployConfig, device: str, tokenizer) -> tuple:
    """(model, quant, fallbacks): config.quant, or 4bit -> 8bit -> none when a mode cannot load or run."""
    import torch
    quant, fallbacks = config.quant, []
    while True:
        try:
            model = load_model(config, quant, device)
            if quant != "none":     # one token through: some bitsandbytes failures only show at the first matmul
                with torch.no_grad():
                    model(input_ids=torch.tensor([[tokenizer.bos_token_id or 0]], device=device))
            return model, quant, fallbacks
        except Exception as e:
            if quant == "none" or isinstance(e, (UsageError, torch.OutOfMemoryError)):
                raise
            fallbacks.append(fall_back(config, "quant", quant, QUANT_FALLBACK[quant], reason_of(e),
                                       usage=isinstance(e, ImportError)))
            quant = QUANT_FALLBACK[quant]

# ----------------------------------------------------------------------------------------------------------------
# 第五节 init_engine: the model object handed to deepspeed.init_inference, then checked against itself unwrapped.

# Verification thresholds (relative logits error |out - ref| / |ref|). Wrapping without injection must not change a
# bit; fused kernels, tensor parallel (another summation order) and a compiled decoder differ from PyTorch's eager
# kernels by rounding only. A broken kernel or KV cache gives errors far above rounding.
EXACT_TOL = 0.0
KERNEL_TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 4e-2}
VERIFY_TOKENS = 16
# Versions whose injected kernels were measured to crash or to give wrong tokens (README 第九节): DeepSpeed's
# injected layers predate transformers' decoder-layer interface (tuples, their own KV cache, no position_ids).
INJECTION_BROKEN = {"deepspeed_upto": "0.19.8", "transformers_from": "4.53"}

def kernel_tol(dtype, compute: str | None = None) -> float:
    """Rounding tolerance of kernels computing in `dtype`, or in 4-bit's `compute` dtype (a flag's name) if coarser."""
    return max(KERNEL_TOL[dtype_flag(dtype)], KERNEL_TOL.get(compute, 0))

def failed_check(result: dict, dtype) -> RunFailure:
    """verify() failed, said; past the model dtype's tolerance (4-bit computing coarser, 第七节), the flag to try."""
    fix = f"; try --bnb-4bit-compute-dtype {dtype_flag(dtype)}" if result["tolerance"] > kernel_tol(dtype) else ""
    return RunFailure(f"its output differs from {result['reference']}: {result['summary']}{fix}")

def injection_known_broken() -> str | None:
    """Why kernel injection cannot work with the installed versions; None when not known (then: try, verify)."""
    from importlib.metadata import version
    from packaging.version import Version as V
    ds, tf = version("deepspeed"), version("transformers")
    if V(ds) <= V(INJECTION_BROKEN["deepspeed_upto"]) and V(tf) >= V(INJECTION_BROKEN["transformers_from"]):
        return f"deepspeed {ds}'s injected kernels do not work with transformers {tf} (README 第九节)"

@contextlib.contextmanager
def keep_model_as_loaded():
    """Stop InferenceEngine casting the module to its dtype (.half(), .bfloat16()): the model is in that dtype
    already, and the cast re-rounds fp32 buffers transformers keeps on purpose (Llama's rotary inv_freq) and, on a
    bitsandbytes model, raises (fp16, fp32) or silently re-rounds it (bf16). Tests prove the logits bit-identical."""
    from deepspeed.inference.engine import InferenceEngine
    original, InferenceEngine._convert_to_dtype = InferenceEngine._convert_to_dtype, lambda self, config: None
    try:
        yield
    finally:
        InferenceEngine._convert_to_dtype = original

def import_deepspeed(config: DeployConfig) -> tuple:
    """(deepspeed or None, fallbacks): None for --backend hf, or (a fallback) when it is not installed."""
    if config.backend == "hf":
        return None, []
    try:
        import deepspeed
    except ImportError as e:
        if config.tp_size > 1:
            raise UsageError("--tp-size > 1 needs deepspeed; pip install deepspeed==0.19.8.") from e
        return None, [fall_back(config, "backend", "deepspeed", "hf", "deepspeed is not installed", usage=True)]
    for handler in logging.getLogger("DeepSpeed").handlers:    # it logs to stdout, which holds the report
        if type(handler) is logging.StreamHandler:
            handler.setStream(sys.__stderr__)
    return deepspeed, []

def meet_ranks(deepspeed, device: str) -> None:
    """第六节: the ranks meet, NCCL between GPUs and gloo between CPU ranks. CPU ranks all-reduce through a /dev/shm
    file each (66 MiB) that DeepSpeed never deletes; once every rank has mapped them all, each deletes its own name."""
    with contextlib.redirect_stdout(sys.stderr):
        deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu":
        deepspeed.comm.barrier()
        with contextlib.suppress(FileNotFoundError):
            os.remove("/dev/shm/deepspeed_allreduce_buffer_{}_{MASTER_ADDR}_{MASTER_PORT}_{RANK}".format(
                os.getuid(), **os.environ))

def greedy_with_logits(model, inputs) -> dict:
    """Greedy tokens and every step's logits (the prompt's too): what verification compares."""
    import torch
    with torch.no_grad():
        prefill = model(**inputs).logits.float().cpu()
        out = model.generate(**inputs, max_new_tokens=VERIFY_TOKENS, min_new_tokens=VERIFY_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return {"prefill": prefill, "steps": torch.stack([s.float().cpu() for s in out.logits], dim=1),
            "tokens": out.sequences[:, inputs["input_ids"].shape[1]:].cpu()}

def reference(model, inputs, tp_size: int) -> dict:
    """The unwrapped model's greedy tokens and logits, before DeepSpeed touches it. tp > 1: the whole model is on
    the CPU, where half precision is slow or missing, so rank 0 runs it in fp32 and sends the result to every rank,
    which then all take the same pass/fail decision (one rank falling back alone would leave the others waiting)."""
    if tp_size == 1:
        return dict(greedy_with_logits(model, inputs), of=f"the unwrapped model ({model.dtype})")
    import torch.distributed as tdist
    ref = [None]
    if tdist.get_rank() == 0:         # parameters to fp32 and back (exact); fp32 buffers (rotary inv_freq) stay
        dtypes = [p.dtype for p in model.parameters()]
        for p in model.parameters():
            p.data = p.data.float()
        ref[0] = dict(greedy_with_logits(model, {k: v.cpu() for k, v in inputs.items()}),
                      of="the unwrapped model in fp32 on the CPU (rank 0)")
        for p, dtype in zip(model.parameters(), dtypes):
            p.data = p.data.to(dtype)
    tdist.broadcast_object_list(ref, src=0)
    return ref[0]

def rel_error(out, ref) -> float:
    """|out - ref| / |ref|."""
    denom = float(ref.norm())
    return float((out - ref).norm()) / denom if denom else float(out.norm() != 0) * math.inf

def verify(engine, inputs, ref: dict, tol: float) -> dict:
    """The engine against the reference: logits error, top-1 agreement, greedy tokens equal."""
    out = greedy_with_logits(engine, inputs)
    mask = inputs["attention_mask"].bool().cpu()
    agree = int((out["tokens"] == ref["tokens"]).all(dim=0).long().cumprod(0).sum())   # steps before a divergence
    upto = min(agree + 1, VERIFY_TOKENS)          # decode logits are comparable up to the first divergence
    prefill_err = rel_error(out["prefill"][mask], ref["prefill"][mask])
    decode_err = rel_error(out["steps"][:, :upto], ref["steps"][:, :upto])
    top1 = float((out["prefill"][mask].argmax(-1) == ref["prefill"][mask].argmax(-1)).float().mean())
    passed = prefill_err <= tol and decode_err <= tol and (tol != EXACT_TOL or agree == VERIFY_TOKENS)
    return {"passed": passed, "reference": ref["of"], "tolerance": tol, "prefill_rel_error": prefill_err,
            "decode_rel_error": decode_err, "top1_agreement": top1, "greedy_tokens_matching": agree,
            "summary": f"rel. error prefill {prefill_err:.2e} / decode {decode_err:.2e} (tolerance {tol:g}), "
                       f"top-1 {top1:.1%}, greedy tokens {agree}/{VERIFY_TOKENS} equal"}

@dataclass
class EngineInfo:
    """What init_engine actually did (after any fallback): the report's "engine" block."""
    device: str                  # "cpu", or "cuda:<local rank>"
    backend: str                 # "deepspeed" or "hf"
    quant: str                   # "none", "8bit" or "4bit"
    dtype: str                   # of the weights bitsandbytes leaves unquantized
    kernel_inject: bool
    decode: str                  # "generate", or a Decoder's mode (extensions/fast_decode.py: "compiled", ...)
    fallbacks: list              # {what, from, to, reason}
    notes: list                  # what was left off by default, and why
    verify: dict | None          # verify()'s result; None when nothing replaced the model's computation
    seconds: dict                # load, reference, init_inference, verify: the steps that ran

class Decoder:
    """A decode loop of 第十节: Decoder(engine, config) answers like the model it wraps (a forward; greedy generate()),
    checked by verify(). validate() refuses before loading; prepare_model() alters the reference's; close() frees."""
    mode, warmup_runs = "generate", 0       # for the report; measure() warms up at least that often (compiling)
    def __init__(self, engine, config: DeployConfig):
        self.engine, self.config = engine, config
        self.module = getattr(engine, "module", engine)        # a DeepSpeed engine wraps the model in .module
    @classmethod
    def validate(cls, config: DeployConfig) -> None: ...
    @classmethod
    def prepare_model(cls, model, config: DeployConfig):
        return model
    def __call__(self, **inputs):
        return self.engine(**inputs)
    def parameters(self):
        return self.module.parameters()
    def close(self) -> None: ...

@contextlib.contextmanager
def step_timer(seconds: dict, step: str, doing: str):
    """Say what a long step does before it starts (a 7B model loads for minutes), and how long it took."""
    log(f"[{step}] {doing} ...")
    t0 = time.perf_counter()
    yield
    seconds[step] = round(time.perf_counter() - t0, 2)
    log(f"[{step}] done in {seconds[step]:.1f} s")

def init_engine(config: DeployConfig, decoder: type[Decoder] | None = None) -> tuple:
    """第五节: (engine, tokenizer, info): the model object loaded first (第七节: init_inference takes a module, not the
    tutorial's name), wrapped by deepspeed.init_inference (and `decoder`, 第十节), checked against itself unwrapped."""
    import torch
    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device, seconds, notes = f"cuda:{dist_env(config)[1]}" if on_gpu else "cpu", {}, []
    # 1) The tokenizer, and the positions check before any weight is loaded.
    tokenizer, prompts = load_tokenizer(config), load_prompts(config)
    max_positions = check_positions(config, tokenizer, prompts)
    # 2) The model object (第七节), plain or quantized by bitsandbytes.
    with step_timer(seconds, "load", f"{config.model_name}, quant {config.quant}, on {device}"):
        model, quant, fallbacks = load_quantized(config, device, tokenizer)
        model = decoder.prepare_model(model, config) if decoder else model
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    # 3) DeepSpeed, the ranks (第六节: NCCL between GPUs, gloo between CPU ranks), and kernel injection.
    deepspeed, fb = import_deepspeed(config)
    fallbacks += fb
    if config.tp_size > 1:
        if on_gpu:
            torch.cuda.set_device(device)          # this rank's GPU: init_inference puts its shard there
        else:
            notes.append("tensor parallel on CPU ranks (gloo) shows how AutoTP shards the model; it is slower than "
                         "--tp-size 1 on a CPU: the speed is for GPUs (第六节)")
        meet_ranks(deepspeed, device)
    inject = deepspeed is not None and injection_wanted(config, quant, fallbacks, notes)
    # 4) The reference, from the unwrapped model (injection rewrites its layers in place). Whatever replaces the
    #    model's computation is checked: DeepSpeed's wrapper, its kernels, tensor parallel, a decoder.
    ref = None
    if (deepspeed is not None and (config.verify or inject)) or decoder is not None:
        verify_ids = encode(tokenizer, prompts[:4], device)
        with step_timer(seconds, "reference", "greedy tokens and logits of the unwrapped model"):
            ref = reference(model, verify_ids, config.tp_size)
    # 5) The tutorial's call, on the model object in its own dtype (no cast: keep_model_as_loaded), then the check.
    engine, result = model, None
    try:
        if deepspeed is not None:
            with step_timer(seconds, "init_inference", f"deepspeed.init_inference, kernel injection {inject}"), \
                    keep_model_as_loaded(), contextlib.redirect_stdout(sys.stderr):
                engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=inject,
                                                  tensor_parallel={"tp_size": config.tp_size}, max_tokens=max_positions)
        engine = decoder(engine, config) if decoder else engine
        if ref is not None:
            exact = not (inject or config.tp_size > 1 or decoder)   # 4-bit rounds in its compute dtype (第七节):
            tol = EXACT_TOL if exact else kernel_tol(dtype, config.bnb_4bit_compute_dtype if quant == "4bit" else None)
            with step_timer(seconds, "verify", f"the engine against {ref['of']}"):
                result = verify(engine, verify_ids, ref, tol)
            if not result["passed"]:
                raise failed_check(result, dtype)
    except Exception as e:
        if not inject or isinstance(e, (UsageError, torch.OutOfMemoryError)):
            raise
        engine = model = None                      # the injected copy is freed before the model loads again
        return without_injection(config, decoder, e)
    return engine, tokenizer, EngineInfo(device, "deepspeed" if deepspeed else "hf", quant, str(dtype)[6:], inject,
                                         engine.mode if isinstance(engine, Decoder) else "generate", fallbacks, notes,
                                         result, seconds)

def injection_wanted(config: DeployConfig, quant: str, fallbacks: list, notes: list) -> bool:
    """Kernel injection: off, with a note, where it cannot work (bitsandbytes weights, known-broken versions), unless
    --kernel-inject asks for it (then a fallback, said); else on unless --no-kernel-inject (then tried, verified)."""
    if config.kernel_inject is False:
        return False
    why_not = "bitsandbytes weights cannot be kernel-injected" if quant != "none" else \
        injection_known_broken() if config.kernel_inject is None else None
    if why_not and config.kernel_inject:
        fallbacks.append(fall_back(config, "kernel_inject", "on", "off", why_not, usage=True))
    elif why_not:
        notes.append(f"kernel injection off by default: {why_not}")
    return not why_not

def without_injection(config: DeployConfig, decoder, error: Exception) -> tuple:
    """第九节: injection failed (an exception, or output that fails verification): said, then the whole of
    init_engine again on a fresh copy of the model (injection rewrote the first in place), without injection."""
    record = fall_back(config, "kernel_inject", "on", "off", reason_of(error))
    free_memory()
    engine, tokenizer, info = init_engine(dataclasses.replace(config, kernel_inject=False), decoder)
    info.fallbacks.insert(0, record)
    return engine, tokenizer, info

# ----------------------------------------------------------------------------------------------------------------
# 第五节 generate: one batch of prompts through engine.generate(), timed: latency, TTFT, decode time, tokens.
def sync(device) -> None:
    """Wait for the GPU: its work is asynchronous, and a clock read without waiting times only the launches."""
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)

@contextlib.contextmanager
def first_token_timer(module, device):
    """TTFT: a forward hook that fires once, after the prefill forward (the first new token's logits exist): it
    synchronizes, notes the time and removes itself, so that the decode steps run with no hook at all."""
    mark = {"t": None}
    def hook(mod, args, output):
        sync(device)
        mark["t"] = time.perf_counter()
        handle.remove()
    handle = module.register_forward_hook(hook)
    try:
        yield mark
    finally:
        handle.remove()

def count_new_tokens(new_ids: list[list[int]], eos: set[int]) -> list[int]:
    """Tokens each sequence actually generated: up to and including its first EOS, the padding after it excluded."""
    return [next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids)) for ids in new_ids]

def decode_time_per_token(latency_s: float, ttft_s: float, steps: int) -> float | None:
    """Seconds per decode step: the time after the first token over the steps after it (None for one step)."""
    return (latency_s - ttft_s) / (steps - 1) if steps > 1 else None

def generate(engine, tokenizer, prompts: list[str], config: DeployConfig) -> dict:
    """One batch, timed: a sequence counts its tokens up to its first EOS, not max_new_tokens (第五节 可替换/增强)."""
    import torch
    device = next(engine.parameters()).device
    enc = encode(tokenizer, prompts, device)
    sampling = dict(do_sample=True, temperature=config.temperature, top_p=config.top_p) if config.do_sample \
        else dict(do_sample=False)
    torch.manual_seed(config.seed)                # the same samples on every rank and in every run
    sync(device)
    with first_token_timer(getattr(engine, "module", engine), device) as first, torch.no_grad():
        t0 = time.perf_counter()
        out = engine.generate(**enc, max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              **sampling)
        sync(device)
        latency = time.perf_counter() - t0
    new_ids = out[:, enc["input_ids"].shape[1]:].tolist()
    counts = count_new_tokens(new_ids, eos_ids(engine, tokenizer))
    steps = len(new_ids[0])                       # generate() pads every row to the same length
    return {"texts": [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(new_ids, counts)],
            "latency_s": latency, "ttft_s": first["t"] - t0, "new_tokens": counts, "steps": steps,
            "decode_s_per_token": decode_time_per_token(latency, first["t"] - t0, steps),
            "prompt_tokens": int(enc["attention_mask"].sum())}

# ----------------------------------------------------------------------------------------------------------------
# 第八节 性能度量与显存统计: pure functions of numbers (tested without a model), then measure().
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, interpolating linearly between order statistics (numpy's default)."""
    xs, pos = sorted(values), (len(values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

def summarize(values: list[float]) -> dict:
    return dict(mean=sum(values) / len(values), p50=percentile(values, 50), p95=percentile(values, 95), n=len(values))

def gpu_mem_gb(device=None) -> dict:
    """第八节: this process's GPU memory in GiB (2**30 bytes), now and at the peak; None on a CPU. Allocated =
    tensors alive; reserved = what PyTorch's allocator holds. (mem_get_info() would count every process's.)"""
    import torch
    stats = {"allocated": torch.cuda.memory_allocated, "reserved": torch.cuda.memory_reserved,
             "peak_allocated": torch.cuda.max_memory_allocated, "peak_reserved": torch.cuda.max_memory_reserved}
    return {k: f(device) / 2 ** 30 if torch.cuda.is_available() else None for k, f in stats.items()}

def weight_bytes(model) -> int:
    """Bytes of weight storage, counted from the real tensors: parameters and buffers (packed int8 / 4-bit data as
    stored) and bitsandbytes' quantization state (8-bit row scales; 4-bit absmax and codebooks, nested too)."""
    import torch
    seen, total = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        qs, tensors = getattr(p, "quant_state", None), [p, getattr(p, "SCB", None)]
        while qs is not None:
            tensors += [qs.absmax, qs.code]
            qs = qs.state2 if qs.nested else None
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total

def decode_read_bytes(model) -> int:
    """Weight bytes a decode step reads: all but the input embeddings (a row a sequence), unless tied to the output."""
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    return weight_bytes(model) - (0 if tied else emb.numel() * emb.element_size())

def measure(engine, tokenizer, prompts: list[str], config: DeployConfig, world_size: int = 1) -> dict:
    """第八节: warm up, then --iters timed runs over all batches: latency p50/p95, TTFT, tokens/s, GB/s."""
    import torch
    from tqdm import tqdm
    batches = batches_of(prompts, config.batch_size)
    # Warm-up: cuBLAS picks its kernels and the allocator grows; a decoder may need more (its first calls compile).
    warmup = max(config.warmup, engine.warmup_runs if isinstance(engine, Decoder) else 0)
    log(f"[warmup] {warmup} untimed run(s)" if warmup else "[warmup] none")
    for _ in range(warmup):
        generate(engine, tokenizer, batches[0], config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tqdm(batches * config.iters, desc="[measure] timed runs", file=sys.stderr, leave=False,
              disable=int(os.environ.get("RANK", "0")) != 0) as bar:
        runs = [generate(engine, tokenizer, batch, config) for batch in bar]
    tokens, seconds = sum(sum(r["new_tokens"]) for r in runs), sum(r["latency_s"] for r in runs)
    decode = [r["decode_s_per_token"] for r in runs if r["decode_s_per_token"] is not None]
    module = getattr(engine, "module", engine)
    step_bytes, step_s = decode_read_bytes(module), percentile(decode, 50) if decode else None
    return {"runs": runs, "metrics": {
        "latency_s": summarize([r["latency_s"] for r in runs]), "ttft_s": summarize([r["ttft_s"] for r in runs]),
        "decode_s_per_token": summarize(decode) if decode else None,
        "decode_tokens_per_s": config.batch_size / step_s if step_s else None,
        "generated_tokens": tokens, "timed_seconds": seconds, "tokens_per_s_cluster": tokens / seconds,
        "tokens_per_s_per_gpu": tokens / seconds / world_size,
        "batch_size": config.batch_size, "batches_per_iter": len(batches), "warmup_runs": warmup,
        "weight_gb": weight_bytes(module) / 1e9, "decode_read_gb": step_bytes / 1e9,
        "achieved_gb_s": step_bytes / step_s / 1e9 if step_s else None}}

# ----------------------------------------------------------------------------------------------------------------
# 报告: rank 0 prints a card, the texts and a metrics table; --json writes the same as one JSON object.
def versions() -> dict:
    from importlib.metadata import distributions
    import torch
    have = {d.metadata["Name"].lower(): d.version for d in distributions()}
    return {"python": platform.python_version(), "cuda": torch.version.cuda,
            **{pkg: have.get(pkg) for pkg in ["torch", "transformers", "deepspeed", "bitsandbytes", "accelerate"]}}

def build_report(config: DeployConfig, info: EngineInfo, prompts, result, memory, world_size) -> dict:
    import torch
    outputs = [{"prompt": p, "text": t, "new_tokens": n}          # the first iteration's batches
               for r, b in zip(result["runs"], batches_of(prompts, config.batch_size))
               for p, t, n in zip(b, r["texts"], r["new_tokens"])]
    per_run = [{k: r[k] for k in ("latency_s", "ttft_s", "new_tokens", "steps", "prompt_tokens")}
               for r in result["runs"]]
    gpu = torch.cuda.get_device_name(info.device) if info.device.startswith("cuda") else None
    return {"config": dataclasses.asdict(config), "versions": versions(),
            "hardware": {"device": info.device.split(":")[0], "gpu": gpu, "world_size": world_size,
                         "cpu_count": os.cpu_count()},
            "engine": dataclasses.asdict(info), "metrics": dict(result["metrics"], per_run=per_run),
            "memory": {"unit": "GiB", "per_rank": memory}, "outputs": outputs,
            "note": "random weights: the text is meaningless" if config.model_name in PRESETS else None}

def render(report: dict) -> str:
    """The report for a person: card, generated texts (shortened), metrics, GPU memory, fallbacks and notes."""
    c, e, m, h, v = (report[k] for k in ("config", "engine", "metrics", "hardware", "versions"))
    cut = lambda text, width: text if len(text) <= width or not width else \
        f"{text[:width]}... ({len(text)} characters; --text-chars 0 shows all)"  # noqa
    vf, lat, ttft, dec = e["verify"], m["latency_s"], m["ttft_s"], m["decode_s_per_token"]
    lines = [f"model    {c['model_name']}" + (f"   ({report['note']})" if report["note"] else ""),
             f"engine   backend={e['backend']} quant={e['quant']}"
             + (f" (int8 threshold {c['int8_threshold']:g})" if e["quant"] == "8bit" else "")
             + f" dtype={e['dtype']}" + (f" (4-bit {c['bnb_4bit_quant_type']}, matmuls in "
                                         f"{c['bnb_4bit_compute_dtype']})" if e["quant"] == "4bit" else "")
             + f" kernel_inject={e['kernel_inject']} decode={e['decode']} tp={c['tp_size']}",
             f"hardware {h['gpu'] or h['device']} x{h['world_size']} rank(s)",
             f"versions torch {v['torch']}, transformers {v['transformers']}, deepspeed {v['deepspeed']}, "
             f"bitsandbytes {v['bitsandbytes']}",
             "verify   " + (f"against {vf['reference']}: {vf['summary']} {'PASSED' if vf['passed'] else 'FAILED'}"
                           if vf else "not run: plain transformers is its own reference" if e["backend"] == "hf"
                           else "off (--no-verify)"), ""]
    lines += [f"> {cut(repr(o['prompt']), min(40, c['text_chars']))} -> {cut(repr(o['text']), c['text_chars'])} "
              f"({o['new_tokens']} tokens)" for o in report["outputs"][:8]]
    lines += ["", f"{'metric':<30}{'mean':>10}{'p50':>10}{'p95':>10}"]
    lines += [f"{name:<30}" + "".join(f"{s[k] * scale:>10{fmt}}" for k in ("mean", "p50", "p95"))
              for name, s, scale, fmt in [("latency per batch (s)", lat, 1, ".4f"), ("TTFT (s)", ttft, 1, ".4f"),
                                          ("decode per token (ms)", dec, 1e3, ".2f")] if s]
    lines.append(f"tokens generated {m['generated_tokens']} in {m['timed_seconds']:.3f} s over {lat['n']} batches "
                 f"of {m['batch_size']}: {m['tokens_per_s_cluster']:.1f} tok/s (cluster), "
                 f"{m['tokens_per_s_per_gpu']:.1f} tok/s per rank")
    if (gb_s := m["achieved_gb_s"]) is not None:
        lines.append(f"decode {m['decode_tokens_per_s']:.1f} tok/s; each step reads {m['decode_read_gb']:.3f} GB of "
                     f"weights: {gb_s:.{0 if gb_s >= 10 else 2}f} GB/s achieved (memory bandwidth is the ceiling)")
    lines += [f"rank {rank} host memory: peak RSS {mem['host_peak_rss']:.2f} GiB" + ("" if mem["peak_allocated"] is None
              else f"; GPU memory: peak allocated {mem['peak_allocated']:.2f} GiB (timed runs), "
              f"{mem['loading_peak_allocated']:.2f} GiB (load, verify); peak reserved {mem['peak_reserved']:.2f} GiB")
              for rank, mem in enumerate(report["memory"]["per_rank"])]
    lines += [f"fallback {f['what']}: {f['from']} -> {f['to']} ({f['reason']})" for f in e["fallbacks"]]
    return "\n".join(lines + [f"note     {n}" for n in e["notes"]])

def finite(x):
    """NaN and inf become null, so that the report stays valid JSON."""
    if isinstance(x, (dict, list, tuple)):
        return {k: finite(v) for k, v in x.items()} if isinstance(x, dict) else [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x

def write_json(report: dict, path: str) -> None:
    """The report as one JSON line on stdout ('-'), or in a file written whole (a temporary file renamed)."""
    text = json.dumps(finite(report), ensure_ascii=False)
    if path == "-":
        print(text, flush=True)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise RunFailure(f"cannot write the JSON report to {path} ({e.strerror}); pick another --json path.") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"[json] report written to {path}")

# ----------------------------------------------------------------------------------------------------------------
# main (第三节 快速开始; 第六节: every rank runs it). Errors: one sentence; exit 2 (bad input) or 1, Ctrl-C 130.
def run(config: DeployConfig, decoder: type[Decoder] | None = None, init_engine=init_engine, validate=validate) -> int:
    """validate, init_engine, measure, report on every rank; an extension may pass its own init_engine and validate."""
    import torch
    rank, _, world_size = dist_env(config)
    validate(config, world_size, torch.cuda.is_available())
    (decoder or Decoder).validate(config)
    prompts = load_prompts(config)
    engine, tokenizer, info = init_engine(config, decoder)
    loading_peak = gpu_mem_gb()["peak_allocated"]    # loading, wrapping, verifying (measure() resets the peak)
    result = measure(engine, tokenizer, prompts, config, world_size)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # peak host memory, GiB (Linux counts KiB)
    memory = [dict(gpu_mem_gb(), loading_peak_allocated=loading_peak, host_peak_rss=rss)] * world_size  # 第八节: 每卡峰值
    if world_size > 1:
        torch.distributed.all_gather_object(memory, memory[0])
    report = build_report(config, info, prompts, result, memory, world_size)
    print0(render(report))
    if config.json_path and rank == 0:
        write_json(report, config.json_path)
    if isinstance(engine, Decoder):
        engine.close()                             # its CUDA graphs: NCCL's teardown waits for those
    if world_size > 1:
        torch.distributed.destroy_process_group()      # a clean exit (NCCL warns of leaked resources otherwise)
    return 0

def quiet_libraries(debug: bool = False) -> None:
    """Library chatter would bury the report (--debug keeps it); runs before transformers and deepspeed load."""
    import torch
    if not torch.cuda.is_available():     # what DeepSpeed picks itself, said without a WARNING (on stdout)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if debug:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("bitsandbytes", "DeepSpeed", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)

def main(argv=None, prog: str = "ds_bnb_infer.py", config_class: type = DeployConfig, job=run) -> int:
    """The command line: parse into config_class (or take a config), run job(config), one sentence per failure."""
    config = argv if isinstance(argv, DeployConfig) else config_from_args(argv, prog, config_class)
    quiet_libraries(config.debug)
    try:
        return job(config)
    except (KeyboardInterrupt, Exception) as e:
        if config.debug:
            raise
        import torch
        if isinstance(e, (KeyboardInterrupt, UsageError)):
            log("interrupted (Ctrl-C): no report was written." if isinstance(e, KeyboardInterrupt) else f"error: {e}")
            return 130 if isinstance(e, KeyboardInterrupt) else 2
        print(f"error: out of GPU memory ({reason_of(e)[:120]}); try --quant 4bit, a smaller --batch-size or "
              "--max-new-tokens, or more GPUs with --tp-size." if isinstance(e, torch.OutOfMemoryError) else
              f"error: {e if isinstance(e, RunFailure) else reason_of(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
