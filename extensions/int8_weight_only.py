#!/usr/bin/env python3
"""extensions/int8_weight_only.py — 第七节/第十节: bitsandbytes' int8 weights multiplied weight-only.

The lesson's --quant 8bit --int8-threshold 0 ("plain int8", 第七节) stores each weight row as int8 with one absmax
scale (bitsandbytes' CB and SCB) and multiplies with bitsandbytes' int8 kernel, which also rounds the activations to
int8 on every call (weights and activations int8: W8A8) and, at batch 1, runs an int8 GEMM made for large batches.
This file keeps the very same stored weights and changes only the matmul: x @ (CB x SCB / 127)^T in the activations'
dtype (int8 weights, fp16 activations: W8A16, the int8 of gpt-fast). In fast_decode.py's compiled step torch.compile
can fuse the int8 -> fp16 conversion into the matrix-vector kernel, so a step reads each int8 weight once. As the
activations are no longer rounded to int8, its output is nearer the unquantized model than bitsandbytes' own (the
report's vs_unquantized says how near).

  python extensions/int8_weight_only.py --model random:llama-2-7b --backend hf --quant 8bit --int8-threshold 0
  python extensions/int8_weight_only.py --model random:tiny --quant 8bit --int8-threshold 0        # CPU

Verified as every decoder: fast_decode.py's loop against the same model unwrapped (its weight-only layers, eager).
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402
from extensions import bnb_settings  # noqa: E402

lesson_load_model = lesson.load_model       # the lesson's own, put back after loading (init_engine)

@functools.cache
def weight_only_class():
    """Int8WeightOnly (defined on first use: torch loads only when a run needs it)."""
    import torch

    class Int8WeightOnly(torch.nn.Module):
        """y = x @ W^T + b with W = CB x SCB / 127 made in x's dtype inside the matmul: bitsandbytes' int8 rows and
        their absmax scales, as Linear8bitLt stores them (7.4 bits of the int8 range a row; the scales in fp32)."""

        def __init__(self, layer):
            super().__init__()
            # The scales sit on the weight until the layer's first forward, then in its state.
            scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
            self.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)        # int8, (out, in)
            self.register_buffer("scale", scb.float() / 127)                               # fp32, (out,)
            self.bias = layer.bias

        def forward(self, x):
            # The scale goes on the weight before the matmul: x @ CB^T alone can exceed fp16's range.
            out = torch.nn.functional.linear(x, self.weight.to(x.dtype) * self.scale[:, None].to(x.dtype))
            return out if self.bias is None else out + self.bias
    return Int8WeightOnly

def weight_only(model) -> int:
    """Replace each bitsandbytes Linear8bitLt of `model` by an Int8WeightOnly over the same int8 weights; returns how
    many. Outlier columns (threshold > 0) are refused before loading: their fp16 part is not in CB."""
    import bitsandbytes as bnb
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    for name, layer in layers:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, weight_only_class()(layer))
    return len(layers)

def load_model(config, quant: str, device: str):
    """The lesson's load_model(), then its int8 layers made weight-only (init_engine puts it in the lesson's place)."""
    model = lesson_load_model(config, quant, device)
    if quant == "8bit":
        weight_only(model)
    return model

def init_engine(config, decoder=None) -> tuple:
    """The lesson's init_engine over the weight-only model; then the error against the same weights unquantized."""
    if config.quant != "8bit" or config.int8_threshold != 0:
        raise lesson.UsageError("int8_weight_only.py multiplies bitsandbytes' plain int8 weights: add --quant 8bit "
                                "--int8-threshold 0 (with outliers, LLM.int8 keeps part of each matmul in fp16).")
    lesson.load_model = load_model
    try:
        engine, tokenizer, info = lesson.init_engine(config, decoder)
    finally:
        lesson.load_model = lesson_load_model
    count = sum(type(m).__name__ == "Int8WeightOnly" for m in getattr(engine, "module", engine).modules())
    if not count:
        raise lesson.RunFailure("bitsandbytes 8-bit did not load (see the fallback above): nothing to multiply "
                                "weight-only; fix the 8-bit load, or run ds_bnb_infer.py.")
    info.notes.append(f"{count} bitsandbytes int8 linears multiplied weight-only (int8 weights, {info.dtype} "
                      f"activations): " + bnb_settings.vs_unquantized(engine, tokenizer, config, info))
    return engine, tokenizer, info

def main(argv=None) -> int:
    from extensions.fast_decode import FastGreedy
    return lesson.main(argv, decoder=FastGreedy, prog="extensions/int8_weight_only.py",
                       job=functools.partial(lesson.run, init_engine=init_engine))

if __name__ == "__main__":
    sys.exit(main())
