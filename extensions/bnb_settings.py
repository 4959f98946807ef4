#!/usr/bin/env python3
"""extensions/bnb_settings.py — 第七节/第十节: the lesson's run with other bitsandbytes 4-bit settings, each measured
for speed and memory and for its error against the same weights unquantized.

The lesson's --quant 4bit is one BitsAndBytesConfig (nf4, double quant, bf16 compute: the tutorial's 第七节 choice).
This file swaps the lesson's bnb_config() for one built from three flags, so that each setting goes through the same
load, wrap, verification and measurement:
  --bnb-quant-type nf4|fp4        the 4-bit code book (nf4: quantiles of a normal distribution; fp4: a float format)
  --bnb-double-quant on|off       quantize the per-block scales again (about 0.4 bit per weight less)
  --bnb-compute-dtype bf16|fp16|fp32   the dtype the 4-bit weights are dequantized to for the matmul
  --fast-decode                   decode with fast_decode.py's loop (FAST_DECODE_MODE=compiled tries torch.compile,
                                  which bitsandbytes >= 0.46 supports, instead of the default CUDA graph)
After verification, the quantized model's prefill logits are compared with the same model unquantized (loaded for
that and freed): the report's verify.vs_unquantized holds the relative error and the top-1 agreement.

  python extensions/bnb_settings.py --model random:llama-2-7b --backend hf --quant 4bit --bnb-quant-type fp4 --fast-decode
  python extensions/bnb_settings.py --model random:tiny --quant 4bit --bnb-compute-dtype fp32       # CPU
(extensions/compare.py: the modes hf-4bit-*; their measured rows: benchmarks/README.md.)
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
lesson_bnb_config = lesson.bnb_config        # the lesson's own, put back after loading (init_engine)

def settings_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--bnb-quant-type", choices=["nf4", "fp4"], default="nf4")
    parser.add_argument("--bnb-double-quant", choices=["on", "off"], default="on")
    parser.add_argument("--bnb-compute-dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--fast-decode", action="store_true")
    return parser

def bnb_config(settings, quant: str, int8_threshold: float):
    """The lesson's bnb_config() with this file's 4-bit settings (8-bit is the lesson's own)."""
    import torch
    from transformers import BitsAndBytesConfig
    if quant == "8bit":
        return lesson_bnb_config(quant, int8_threshold)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.bnb_quant_type,
                              bnb_4bit_use_double_quant=settings.bnb_double_quant == "on",
                              bnb_4bit_compute_dtype=getattr(torch, DTYPES[settings.bnb_compute_dtype]))

def vs_unquantized(engine, tokenizer, config, info) -> str:
    """The quantized engine's prefill logits against the same weights unquantized (loaded for that, then freed): kept
    in the report's verify.vs_unquantized; returns it in words for the report's notes."""
    import torch
    enc = tokenizer(lesson.as_chat(tokenizer, lesson.load_prompts(config)[:4]), return_tensors="pt", padding=True)
    inputs = {k: enc[k].to(info.device) for k in ("input_ids", "attention_mask")}
    mask = inputs["attention_mask"].bool().cpu()
    with torch.no_grad():
        quantized = engine(**inputs).logits.float().cpu()[mask]
        plain = lesson.load_model(config, "none", info.device)
        unquantized, dtype = plain(**inputs).logits.float().cpu()[mask], plain.dtype
    del plain
    lesson.free_memory()
    error = {"of": f"the same weights unquantized ({str(dtype).replace('torch.', '')})", "prefill_rel_error":
             lesson.rel_error(quantized, unquantized),
             "top1_agreement": float((quantized.argmax(-1) == unquantized.argmax(-1)).float().mean())}
    if info.verify:                        # plain transformers without a decoder is its own reference: no verify
        info.verify = dict(info.verify, vs_unquantized=error)
    return f"against {error['of']}: rel. error {error['prefill_rel_error']:.2e}, top-1 {error['top1_agreement']:.1%}"

def init_engine(config, decoder=None, settings=None) -> tuple:
    """The lesson's init_engine with this file's bnb_config; then the error against the same weights unquantized."""
    if config.quant != "4bit":
        raise lesson.UsageError("bnb_settings.py varies the 4-bit settings: add --quant 4bit.")
    lesson.bnb_config = functools.partial(bnb_config, settings)
    try:
        engine, tokenizer, info = lesson.init_engine(config, decoder)
    finally:
        lesson.bnb_config = lesson_bnb_config
    summary = vs_unquantized(engine, tokenizer, config, info)
    info.notes.append(f"4-bit {settings.bnb_quant_type}, double quant {settings.bnb_double_quant}, compute "
                      f"{settings.bnb_compute_dtype}: {summary}")
    return engine, tokenizer, info

def main(argv=None) -> int:
    settings, rest = settings_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    decoder = None
    if settings.fast_decode:
        from extensions.fast_decode import FastGreedy
        decoder = FastGreedy
    return lesson.main(rest, decoder=decoder, prog="extensions/bnb_settings.py [--bnb-quant-type nf4|fp4] "
                       "[--bnb-double-quant on|off] [--bnb-compute-dtype bf16|fp16|fp32] [--fast-decode]",
                       job=functools.partial(lesson.run, init_engine=functools.partial(init_engine,
                                                                                       settings=settings)))

if __name__ == "__main__":
    sys.exit(main())
