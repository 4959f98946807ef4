#!/usr/bin/env python3
"""extensions/quantized_matmul.py — 第七节/第十节: which matmul multiplies bitsandbytes' stored weights, and what each
costs against the same weights unquantized.

The lesson's --quant 8bit --int8-threshold 0 ("plain int8", 第七节) stores each weight row as int8 with one absmax
scale (bitsandbytes' CB and SCB) and multiplies with bitsandbytes' int8 kernel, which also rounds the activations to
int8 on every call (weights and activations int8: W8A8) and, at batch 1, runs an int8 GEMM made for large batches.
--matmul weight-only keeps the very same stored weights and changes only the matmul: x @ (CB x SCB / 127)^T in the
activations' dtype (int8 weights, fp16 activations: W8A16, the int8 of gpt-fast). In fast_decode.py's compiled step
torch.compile fuses the int8 -> fp16 conversion into the matrix-vector kernel, so a step reads each int8 weight once.
As the activations are no longer rounded to int8, its output is nearer the unquantized model than bitsandbytes' own.
--matmul bitsandbytes keeps bitsandbytes' kernels (any --bnb-4bit-* setting): the same loop, for comparison.

Every run decodes with fast_decode.py's loop (its flags apply), is verified as every decoder (against the same model
unwrapped, its matmuls already swapped), and reports its error against the same weights unquantized
(verify.vs_unquantized in the JSON).

  python extensions/quantized_matmul.py --model random:llama-2-7b --backend hf --quant 8bit --int8-threshold 0
  python extensions/quantized_matmul.py --model random:llama-2-7b --backend hf --quant 4bit --matmul bitsandbytes \\
      --bnb-4bit-compute-dtype fp16
  python extensions/quantized_matmul.py --model random:tiny --quant 8bit --int8-threshold 0        # CPU
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Annotated, Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402
from extensions.fast_decode import FastDecodeConfig, FastGreedy  # noqa: E402

@dataclasses.dataclass
class QuantizedMatmulConfig(FastDecodeConfig):
    """extensions/quantized_matmul.py: the matmul over bitsandbytes' weights"""
    matmul: Annotated[Literal["auto", "weight-only", "bitsandbytes"], "weight-only: plain int8 weights multiplied in "
                      "the activations' dtype; bitsandbytes: its own kernels; auto: weight-only where it exists "
                      "(--quant 8bit --int8-threshold 0)"] = "auto"

def matmul_of(config: QuantizedMatmulConfig) -> str:
    """The matmul a run uses: --matmul, with auto resolved."""
    plain_int8 = config.quant == "8bit" and config.int8_threshold == 0
    return config.matmul if config.matmul != "auto" else "weight-only" if plain_int8 else "bitsandbytes"

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

class QuantizedGreedy(FastGreedy):
    """fast_decode.py's loop over the model with its bitsandbytes matmuls swapped (prepare_model) where asked."""

    @classmethod
    def validate(cls, config: QuantizedMatmulConfig) -> None:
        super().validate(config)
        if config.quant == "none":
            raise lesson.UsageError("quantized_matmul.py multiplies bitsandbytes weights: add --quant 8bit or 4bit.")
        if config.matmul == "weight-only" and matmul_of(dataclasses.replace(config, matmul="auto")) != "weight-only":
            raise lesson.UsageError("--matmul weight-only multiplies plain int8 weights: add --quant 8bit "
                                    "--int8-threshold 0 (LLM.int8 keeps part of each matmul in fp16; a 4-bit "
                                    "weight-only matmul is not written yet), or use --matmul bitsandbytes.")

    @classmethod
    def prepare_model(cls, model, config: QuantizedMatmulConfig):
        if matmul_of(config) == "weight-only" and not weight_only(model):
            raise lesson.RunFailure("bitsandbytes 8-bit did not load (see the fallback above): nothing to multiply "
                                    "weight-only; fix the 8-bit load, or run ds_bnb_infer.py.")
        return model

def vs_unquantized(engine, tokenizer, config, info) -> dict:
    """The quantized engine's prefill logits against the same weights unquantized (loaded for that, then freed): the
    relative error and top-1 agreement, also kept in the report's verify.vs_unquantized."""
    import torch
    inputs = lesson.encode(tokenizer, lesson.load_prompts(config)[:4], info.device)
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
    if info.verify:
        info.verify = dict(info.verify, vs_unquantized=error)
    return error

def init_engine(config: QuantizedMatmulConfig, decoder=QuantizedGreedy) -> tuple:
    """The lesson's init_engine with this file's loop; then the error against the same weights unquantized."""
    engine, tokenizer, info = lesson.init_engine(config, decoder)
    error = vs_unquantized(engine, tokenizer, config, info)
    what = f"{info.quant} weights" + (f", 4-bit {config.bnb_4bit_quant_type}, double quant "
                                      f"{config.bnb_4bit_use_double_quant}, compute {config.bnb_4bit_compute_dtype}"
                                      if info.quant == "4bit" else "")
    info.notes.append(f"{what}, {matmul_of(config)} matmul: against {error['of']}: rel. error "
                      f"{error['prefill_rel_error']:.2e}, top-1 {error['top1_agreement']:.1%}")
    return engine, tokenizer, info

def main(argv=None) -> int:
    return lesson.main(argv, prog="extensions/quantized_matmul.py", config_class=QuantizedMatmulConfig,
                       job=lambda config: lesson.run(config, QuantizedGreedy, init_engine=init_engine))

if __name__ == "__main__":
    sys.exit(main())
