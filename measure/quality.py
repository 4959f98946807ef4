#!/usr/bin/env python3
"""measure/quality.py — what 8-bit and 4-bit cost in quality on a trained model (第七节, 第八节), on a CPU.

For real:smollm2-135m (setup/real_model.py converts it once) and each weight format (fp32, bf16, LLM.int8,
plain int8, 4-bit nf4 and fp4 with and without double quant): the perplexity on a fixed English text shipped in the
repository (the Apache-2.0 LICENSE, its first --tokens tokens), the bytes of weights, and the greedy answers to a few
chat prompts. Each model is also wrapped by deepspeed.init_inference the lesson's way (keep_model_as_loaded): its
logits must stay bit-identical, so whatever DeepSpeed is used for, the quality is the format's.

nf4-dq-wo is nf4-dq (the lesson's --quant 4bit) with the same stored weights multiplied weight-only
(extensions/quantized_matmul.py's Int4WeightOnly, the default of --quant 4bit: on a GPU extensions/kernel_4bit.py's
kernel), beside nf4-dq multiplied by bitsandbytes' own kernel: is the speed bought with accuracy? Its dequantized
weight is bitsandbytes' dequantize_4bit bit for bit, so with bitsandbytes' generic matmul (dequantize_4bit, then one
matmul: a GPU's prefill, a CPU without AVX512-BF16) the two perplexities are equal to the last bit
(tests/test_real_model.py checks it). On a CPU with AVX512-BF16, bitsandbytes' nf4 rows are not quite those
weights: at their first forward it repacks 4-bit weights for its own CPU kernel and rounds their block scales to bf16
(the JSON's bnb_cpu_repack, a * in the table), which moves the perplexity by a few tenths of a percent either way.

  python measure/quality.py --json /tmp/quality.json
  python measure/quality.py --formats fp32,int8,nf4-dq --tokens 256 --answers 0     # faster

Perplexity = exp(mean negative log-likelihood of each next token). Lower is better; what matters is the change
from fp32, not the value (a license is not the text the model was trained for).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ds_bnb_infer as lesson  # noqa: E402

MODEL = "real:smollm2-135m"
TEXT = os.path.join(ROOT, "LICENSE")
PROMPTS = ["What is tensor parallelism? Answer in one sentence.", "Name three primary colors.",
           "Write one sentence about the sea."]
# format -> dtype of the unquantized weights, the BitsAndBytesConfig arguments (None: not quantized), and the matmul
# that multiplies the quantized weights (bitsandbytes': its own kernels; weight-only: quantized_matmul.py's layers)
NF4_DQ = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
FORMATS = {
    "fp32": ("fp32", None, None),
    "bf16": ("bf16", None, None),
    "int8": ("fp32", dict(load_in_8bit=True), "bitsandbytes"),                              # LLM.int8, threshold 6
    "int8-t0": ("fp32", dict(load_in_8bit=True, llm_int8_threshold=0.0), "bitsandbytes"),   # plain int8
    "nf4-dq": ("fp32", NF4_DQ, "bitsandbytes"),
    "nf4-dq-wo": ("fp32", NF4_DQ, "weight-only"),
    "nf4": ("fp32", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
            "bitsandbytes"),
    "fp4-dq": ("fp32", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
               "bitsandbytes"),
    "fp4": ("fp32", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
            "bitsandbytes"),
}


def load(fmt: str):
    """The converted model in one weight format, on the CPU (4-bit computes in bf16, as the lesson's --quant 4bit);
    weight-only formats have their bitsandbytes layers swapped before any forward, so that they multiply the weights
    as quantized (what a GPU holds), not bitsandbytes' CPU repacking of them."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    dtype, bnb, matmul = FORMATS[fmt]
    kw = dict(dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], device_map={"": "cpu"})
    if bnb:
        extra = dict(bnb_4bit_compute_dtype=torch.bfloat16) if bnb.get("load_in_4bit") else {}
        kw["quantization_config"] = BitsAndBytesConfig(**bnb, **extra)
    model = AutoModelForCausalLM.from_pretrained(lesson.model_source(MODEL), **kw).eval()
    if matmul == "weight-only":
        from extensions.quantized_matmul import weight_only
        weight_only(model)
    return model


def matmul_in(model) -> str | None:
    """The matmul that multiplies the model's quantized weights, read from its layers (None: none quantized)."""
    kinds = {type(m).__name__ for m in model.modules()}
    return "weight-only" if kinds & {"Int4WeightOnly", "Int8WeightOnly"} else \
        "bitsandbytes" if kinds & {"Linear4bit", "Linear8bitLt"} else None


def bnb_cpu_repack(model) -> bool:
    """Whether bitsandbytes repacked the model's 4-bit weights for its AVX512-BF16 CPU kernel (at their first
    forward), rounding their block scales to bf16: then its matmul multiplies slightly other weights than stored."""
    return any(getattr(getattr(p, "quant_state", None), "packing_format_for_cpu", False) for p in model.parameters())


def perplexity(model, ids) -> float:
    """exp(mean NLL) of each token of `ids` (1 x n) given the tokens before it, in one forward."""
    import torch
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))


def answers(model, tokenizer, prompts: list[str], new_tokens: int) -> list[str]:
    """Greedy answers to chat prompts (the lesson's as_chat), up to EOS or new_tokens."""
    import torch
    out = []
    for prompt in lesson.as_chat(tokenizer, prompts):
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def evaluate(fmt: str, ids, tokenizer, new_tokens: int) -> dict:
    """One row: perplexity, the matmul, weight bytes, DeepSpeed bit-identical or not, greedy answers."""
    import deepspeed
    import torch
    t0 = time.perf_counter()
    model = load(fmt)
    stored = lesson.weight_bytes(model)        # before any forward: as quantized, not as a CPU kernel repacks them
    ppl = perplexity(model, ids)
    with torch.no_grad():
        plain = model(input_ids=ids[:, :64]).logits
    with lesson.keep_model_as_loaded():
        engine = deepspeed.init_inference(model, dtype=next(p.dtype for p in model.parameters() if p.is_floating_point()),
                                          replace_with_kernel_inject=False)
    with torch.no_grad():
        wrapped = engine(input_ids=ids[:, :64]).logits
    return {"format": fmt, "perplexity": ppl, "matmul": matmul_in(model), "bnb_cpu_repack": bnb_cpu_repack(model),
            "weight_gb": stored / 1e9,
            "deepspeed_bit_identical": bool(torch.equal(plain, wrapped)),
            "answers": answers(model, tokenizer, PROMPTS, new_tokens) if new_tokens else [],
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="measure/quality.py", description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, from: {', '.join(FORMATS)}")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the text to score (default: 512)")
    parser.add_argument("--answers", type=int, default=32, help="new tokens per greedy answer; 0 = none (default: 32)")
    parser.add_argument("--json", metavar="PATH", help="write the table with date and versions")
    args = parser.parse_args(argv)
    lesson.quiet_libraries()
    try:
        formats = args.formats.split(",")
        if set(formats) - set(FORMATS) or args.tokens < 2 or args.answers < 0:
            raise lesson.UsageError(f"--formats takes names from {', '.join(FORMATS)}; --tokens at least 2; "
                                    "--answers at least 0.")
        if args.json:
            lesson.check_writable(args.json, "--json")
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(lesson.model_source(MODEL))
        with open(TEXT, encoding="utf-8") as fh:
            ids = tokenizer(fh.read(), return_tensors="pt")["input_ids"][:, :args.tokens]
        rows = []
        for fmt in formats:
            lesson.log(f"[quality] {fmt} ...")
            rows.append(evaluate(fmt, ids, tokenizer, args.answers))
    except lesson.UsageError as e:
        lesson.log(f"error: {e}")
        return 2
    base = next((r["perplexity"] for r in rows if r["format"] == "fp32"), None)
    print(f"{MODEL}: perplexity on the first {ids.shape[1]} tokens of LICENSE, CPU")
    print(f"{'format':<10}{'matmul':<14}{'perplexity':>11}{'vs fp32':>9}{'weights GB':>12}  DeepSpeed bit-identical"
          f"  first answer")
    for r in rows:
        vs = f"{r['perplexity'] / base - 1:+.1%}" if base else "-"
        first = (r["answers"] or [""])[0][:60]
        matmul = (r["matmul"] or "-") + "*" * r["bnb_cpu_repack"]
        print(f"{r['format']:<10}{matmul:<14}{r['perplexity']:>11.3f}{vs:>9}{r['weight_gb']:>12.3f}  "
              f"{str(r['deepspeed_bit_identical']):<24} {first!r}")
    if any(r["bnb_cpu_repack"] for r in rows):
        print("* bitsandbytes repacked these 4-bit weights for its AVX512-BF16 CPU kernel, scales rounded to bf16")
    by = {r["format"]: r["perplexity"] for r in rows}
    if {"nf4-dq", "nf4-dq-wo"} <= set(by):
        print(f"nf4-dq: weight-only matmul vs bitsandbytes': perplexity {by['nf4-dq-wo'] / by['nf4-dq'] - 1:+.2%}")
    if args.json:
        lesson.write_json({"date": time.strftime("%Y-%m-%d"), "model": MODEL, "text": "LICENSE",
                           "tokens": int(ids.shape[1]), "prompts": PROMPTS, "versions": lesson.versions(),
                           "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
