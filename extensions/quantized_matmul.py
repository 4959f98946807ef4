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
--quant 4bit multiplies weight-only by default as well: extensions/kernel_4bit.py's kernel reads bitsandbytes' packed
4-bit codes and (double-quantized) scales as stored and dequantizes them inside the matrix-vector product (batch 1;
2-16 rows: inside a tensor-core matmul; a prefill: a range of rows at a time, then one matmul), each weight equal to
bitsandbytes' dequantize_4bit bit for bit (why a kernel of our own: that file's docstring); fast_decode.py's loop
then fuses q/k/v and gate/up into one matmul each (Int4WeightOnly.concatenate: 4 matmuls a layer, not 7), and each
layer's kernels are checked against its weight dequantized before the loop runs (check_matmuls()).
serve.py's rows and tensor_parallel.py's shards take the same --matmul and swap with the same swap_matmuls().
--matmul bitsandbytes keeps bitsandbytes' kernels (any --bnb-4bit-* setting): the same loop, for comparison.

Every run decodes with fast_decode.py's loop (its flags apply), is verified as every decoder (against the same model
unwrapped, its matmuls already swapped), and reports its error against the same weights unquantized
(verify.vs_unquantized in the JSON).

  python extensions/quantized_matmul.py --model random:llama-2-7b --backend hf --quant 8bit --int8-threshold 0
  python extensions/quantized_matmul.py --model random:llama-2-7b --backend hf --quant 4bit     # the 4-bit kernel
  python extensions/quantized_matmul.py --model random:llama-2-7b --backend hf --quant 4bit --matmul bitsandbytes \\
      --bnb-4bit-compute-dtype fp16
  python extensions/quantized_matmul.py --model random:tiny --quant 8bit --int8-threshold 0        # CPU
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from typing import Annotated, Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402
from extensions.fast_decode import FastDecodeConfig, FastGreedy  # noqa: E402

@dataclasses.dataclass
class QuantizedMatmulConfig(FastDecodeConfig):
    """extensions/quantized_matmul.py: the matmul over bitsandbytes' weights"""
    matmul: Annotated[Literal["auto", "weight-only", "bitsandbytes"], "weight-only: bitsandbytes' stored int8 or "
                      "4-bit weights multiplied in the activations' dtype (4-bit: extensions/kernel_4bit.py); "
                      "bitsandbytes: its own kernels; auto: weight-only where it can (--quant 4bit, or --quant 8bit "
                      "--int8-threshold 0)"] = "auto"

def matmul_of(config: QuantizedMatmulConfig) -> str:
    """The matmul a run uses: --matmul, with auto resolved."""
    readable = config.quant == "4bit" or (config.quant == "8bit" and config.int8_threshold == 0)
    return config.matmul if config.matmul != "auto" else "weight-only" if readable else "bitsandbytes"

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

BLOCK, BLOCK2 = 64, 256     # codes per 4-bit scale; scales per second-level absmax (double quantization)

def unreadable_4bit(quant_state, packed) -> str | None:
    """Why Int4WeightOnly cannot read a layer's 4-bit weights, or None. It reads bitsandbytes' layout (see
    extensions/kernel_4bit.py): blocks of 64 codes that do not straddle rows (in_features a multiple of 64), two
    codes a byte, as bitsandbytes quantized them (not repacked for its CPU kernel)."""
    if getattr(quant_state, "packing_format_for_cpu", False):
        return "the weights were repacked for bitsandbytes' CPU kernel"
    if quant_state.blocksize != BLOCK or (quant_state.nested and quant_state.state2.blocksize != BLOCK2):
        return f"blocksize {quant_state.blocksize} (the kernel reads {BLOCK})"
    if len(quant_state.shape) != 2 or quant_state.shape[1] % BLOCK:
        return f"weight shape {tuple(quant_state.shape)} (in_features must be a multiple of {BLOCK})"
    if packed.numel() * 2 != quant_state.shape[0] * quant_state.shape[1]:
        return "the packed weight does not hold two codes a byte"
    return None

def scales_4bit(absmax, absmax2, code2, offset, nested: bool):
    """The fp32 scale of each block of 64 codes (double quantization: dequantized from its 8-bit codes first, the
    product rounded before its row's offset is added, as bitsandbytes does). Arguments: Int4WeightOnly's buffers."""
    if not nested:
        return absmax.float()
    second = absmax2.float().repeat_interleave(BLOCK2)[: absmax.numel()]
    per_block = offset.float().repeat_interleave(absmax.numel() // offset.numel())       # a row's blocks: its offset
    return code2.float()[absmax.long()] * second + per_block

def dequantize_4bit(packed, absmax, absmax2, code2, code, offset, nested: bool, shape, weight_dtype):
    """The weight `shape` (out_features, in_features) from Int4WeightOnly's buffers (kernel_4bit.dequantize()'s
    arguments), as bitsandbytes' dequantize_4bit gives it, bit for bit, in plain torch: each code looked up in the
    16-entry table (nf4 or fp4), times its block's scale in fp32, rounded once."""
    import torch
    codes = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([codes >> 4, codes & 15], dim=-1).reshape(-1, BLOCK).long()    # the high nibble first
    weight = code.float()[codes] * scales_4bit(absmax, absmax2, code2, offset, nested)[:, None]
    return weight.to(weight_dtype).reshape(shape)

@functools.cache
def weight_only_4bit_class():
    """Int4WeightOnly (defined on first use: torch loads only when a run needs it)."""
    import torch

    class Int4WeightOnly(torch.nn.Module):
        """y = x @ W^T + b over bitsandbytes' 4-bit storage, unchanged: the packed codes and the QuantState's tensors
        become this module's buffers, the layer's double-quantization offset repeated once per output row (so that
        concatenate() can stack layers with different offsets: fast_decode.py fuses q/k/v and gate/up into one
        matmul each). On a GPU up to 16 rows of x (a decode step) go through extensions/kernel_4bit.py's matmul_4bit
        (one row: the weight multiplied in registers; 2-16: dequantized tile by tile into a tensor-core matmul); more
        rows (a prefill) through kernel_4bit.linear(): the weight dequantized a range of rows at a time (a bounded
        buffer: a fused gate/up whole would double bitsandbytes' largest), one matmul each. On a CPU the
        dequantization runs in torch: the same weight bit for bit."""

        def __init__(self, packed, absmax, code, offset, shape, weight_dtype, compute_dtype, bias, absmax2=None,
                     code2=None):
            super().__init__()
            self.register_buffer("packed", packed)                      # uint8, two codes a byte, row by row
            self.register_buffer("absmax", absmax)                      # a scale per block of 64 (8-bit if nested)
            self.register_buffer("code", code)                          # the 16-entry table (nf4 or fp4)
            self.register_buffer("offset", offset)                      # fp32 [out_features] (nested; else zeros)
            self.nested = absmax2 is not None
            # Without double quantization the kernel's second-level arguments are placeholders (not read): the same
            # tensors again, no memory of their own.
            self.register_buffer("absmax2", absmax2 if self.nested else absmax)
            self.register_buffer("code2", code2 if self.nested else code)
            (self.out_features, self.in_features), self.weight_dtype = shape, weight_dtype
            self.compute_dtype = compute_dtype
            self.bias = bias
            self.kernels, self.inductor_options = None, {}
            if self.packed.is_cuda:
                from extensions import kernel_4bit
                # what a compiled step needs for the matvec's layout of x (kernel_4bit.INDUCTOR_OPTIONS)
                self.kernels, self.inductor_options = kernel_4bit, kernel_4bit.INDUCTOR_OPTIONS

        @classmethod
        def from_state(cls, packed, state, compute_dtype=None, bias=None):
            """The module over one layer's packed codes and bitsandbytes QuantState (tensors kept, not copied; the
            offset, a 0-d tensor, repeated per row on its device without a read to the host)."""
            rows = state.shape[0]
            offset = torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device).reshape(1) \
                if state.nested else torch.zeros(1, dtype=torch.float32, device=packed.device)
            return cls(packed, state.absmax, state.code, offset.expand(rows).contiguous(), tuple(state.shape),
                       state.dtype, compute_dtype, bias, *((state.state2.absmax, state.state2.code) if state.nested
                                                           else ()))

        @classmethod
        def of_layer(cls, layer):
            """The module over a bitsandbytes Linear4bit's storage (weight_only())."""
            return cls.from_state(layer.weight.data, layer.weight.quant_state, layer.compute_dtype, layer.bias)

        @classmethod
        def concatenate(cls, layers):
            """One module whose output rows are `layers`' rows in order (fast_decode.fuse_projections: q/k/v, or
            gate/up, as one matmul), or None where they cannot be read as one weight: another in_features, nested
            flag, code table, second-level table, weight or compute dtype, device, or bias presence. The copies
            replace the parts' buffers (the caller drops the parts), so the memory is not held twice."""
            first = layers[0]
            same = [(x.in_features, x.nested, x.weight_dtype, x.compute_dtype, x.packed.device, x.bias is None)
                    for x in layers]
            if len(set(same)) > 1 or not all(torch.equal(x.code, first.code) for x in layers):
                return None
            if first.nested and not all(torch.equal(x.code2, first.code2) for x in layers):
                return None
            # The kernels find block b's second-level absmax at b // 256 of the concatenated absmax2: that is the
            # part's own only if every part before it ends on a whole group of 256 blocks (the last may not).
            if first.nested and any(x.absmax.numel() % BLOCK2 for x in layers[:-1]):
                return None
            with torch.no_grad():
                cat = lambda name: torch.cat([getattr(x, name).reshape(-1) for x in layers])  # noqa: E731
                bias = None if first.bias is None else torch.nn.Parameter(cat("bias"), requires_grad=False)
                rows = sum(x.out_features for x in layers)
                return cls(cat("packed").reshape(-1, 1), cat("absmax"), first.code, cat("offset"),
                           (rows, first.in_features), first.weight_dtype, first.compute_dtype, bias,
                           *((cat("absmax2"), first.code2) if first.nested else ()))

        def storage(self) -> tuple:
            """The buffers as kernel_4bit.dequantize() and dequantize_4bit() take them."""
            return (self.packed, self.absmax, self.absmax2, self.code2, self.code, self.offset, self.nested,
                    (self.out_features, self.in_features), self.weight_dtype)

        def dequantized(self):
            """The weight (out_features, in_features): bitsandbytes' dequantize_4bit of the stored weights, bit for
            bit (the kernel's dequantization on a GPU, the same in torch on a CPU)."""
            return self.kernels.dequantize(*self.storage()) if self.kernels is not None else \
                dequantize_4bit(*self.storage())

        def forward(self, x):
            in_dtype = x.dtype
            x = x.to(self.compute_dtype or x.dtype)
            rows = x.reshape(-1, x.shape[-1])
            if self.kernels is not None and rows.shape[0] <= 16:
                out = self.kernels.matmul_4bit(rows.contiguous(), self.packed, self.absmax, self.absmax2, self.code2,
                                               self.code, self.offset, self.out_features, self.nested,
                                               self.weight_dtype)
            elif self.kernels is not None:       # a prefill: the weight dequantized a range of rows at a time
                out = self.kernels.linear(rows, *self.storage())
            else:
                out = torch.nn.functional.linear(rows, self.dequantized().to(x.dtype))
            out = out.reshape(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                out = out + self.bias.to(x.dtype)
            return out.to(in_dtype)
    return Int4WeightOnly

def weight_only(model) -> int:
    """Replace each bitsandbytes layer of `model` by its weight-only matmul over the same stored weights
    (Linear8bitLt by Int8WeightOnly, Linear4bit by Int4WeightOnly); returns how many. Outlier columns (threshold
    > 0) are refused before loading: their fp16 part is not in CB."""
    import bitsandbytes as bnb
    swaps = {bnb.nn.Linear8bitLt: weight_only_class(), bnb.nn.Linear4bit: weight_only_4bit_class().of_layer}
    layers = [(name, m) for name, m in model.named_modules() if type(m) in swaps or isinstance(m, tuple(swaps))]
    for name, layer in layers:
        if isinstance(layer, bnb.nn.Linear4bit):
            weight = layer.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                # On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for its own kernel at their first
                # forward (the lesson's load check) and rounds their scales to bf16; its own inverse gives back the
                # plain layout (a CPU-only detour: a GPU keeps the layout as quantized).
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data,
                                                                                        weight.quant_state)
            why = unreadable_4bit(layer.weight.quant_state, layer.weight.data)
            if why:
                raise lesson.UsageError(f"--matmul weight-only cannot read the 4-bit layer {name}: {why}; use "
                                        f"--matmul bitsandbytes.")
        parent, _, attr = name.rpartition(".")
        cls = swaps[bnb.nn.Linear4bit] if isinstance(layer, bnb.nn.Linear4bit) else swaps[bnb.nn.Linear8bitLt]
        setattr(model.get_submodule(parent), attr, cls(layer))
    return len(layers)

def validate_matmul(config: QuantizedMatmulConfig) -> None:
    """Refuse --matmul weight-only where no stored weights can be read that way, before anything loads (this file's
    validate and tensor_parallel.py's)."""
    if config.matmul == "weight-only" and matmul_of(dataclasses.replace(config, matmul="auto")) != "weight-only":
        raise lesson.UsageError("--matmul weight-only multiplies plain int8 or 4-bit weights: add --quant 4bit, "
                                "or --quant 8bit --int8-threshold 0 (LLM.int8 keeps part of each matmul in "
                                "fp16), or use --matmul bitsandbytes.")

def swap_matmuls(model, config: QuantizedMatmulConfig):
    """The model with its bitsandbytes matmuls swapped where config.matmul asks (a decoder's prepare_model: this
    file's loop, and serve.py's rows; tensor_parallel.py's shards and its reference)."""
    if matmul_of(config) == "weight-only" and config.quant != "none" and not weight_only(model):
        raise lesson.RunFailure(f"bitsandbytes {config.quant} did not load (see the fallback above): nothing to "
                                f"multiply weight-only; fix the load, or add --matmul bitsandbytes.")
    return model

# A kernel's products against the same weight dequantized (bit for bit) and multiplied by torch: the sums differ in
# order and in the weight's rounding (the matvec multiplies its fp32 value), ~1e-3; a wrong kernel is off by ~1.
MATMUL_TOL = 1e-2

def check_matmuls(model) -> dict | None:
    """Each 4-bit layer's GPU matmul (one row of x: the matvec; 3 and 16: the tensor-core form), as the decoder calls
    it (fused layers included, the bias left out), against x @ W^T with W its weight dequantized (kernel_4bit.linear(),
    bitsandbytes' weight bit for bit): a RunFailure past MATMUL_TOL, or where an output is not finite. The decoders'
    own check compares the decoder with the same model, whose matmuls are these kernels too: a kernel that is wrong in
    both passes there, not here. Under tensor parallel every rank takes the worst error of all (each checks its own
    shards), so all pass or fail together. None where no layer runs a kernel (on a CPU the matmul is that
    dequantization)."""
    import torch
    layers = [m for m in model.modules() if type(m).__name__ == "Int4WeightOnly" and m.kernels is not None]
    if not layers:
        return None
    worst = 0.0
    with torch.no_grad():
        for layer in layers:
            seeded = torch.Generator(layer.packed.device).manual_seed(0)     # the same x on every rank
            for rows in (1, 3, 16):
                x = torch.randn(rows, layer.in_features, device=layer.packed.device, generator=seeded,
                                dtype=layer.compute_dtype or layer.weight_dtype)
                want = layer.kernels.linear(x, *layer.storage()).float()
                got = layer.kernels.matmul_4bit(x, layer.packed, layer.absmax, layer.absmax2, layer.code2, layer.code,
                                                layer.offset, layer.out_features, layer.nested, layer.weight_dtype)
                error = lesson.rel_error(got.float(), want)
                worst = max(worst, error if error == error else math.inf)            # NaN: as bad as it gets
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([worst], device=layers[0].packed.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        worst = float(t)
    if not worst <= MATMUL_TOL:
        raise lesson.RunFailure(f"the 4-bit matmul kernel differs from its own weight dequantized (rel. error "
                                f"{worst:.2e}, tolerance {MATMUL_TOL:g}): a kernel bug; --matmul bitsandbytes "
                                f"avoids it")
    return {"layers": len(layers), "max_rel_error": worst, "tolerance": MATMUL_TOL,
            "tilings": layers[0].kernels.picked_tilings()}        # (the autotuners picked them in these calls)

class QuantizedGreedy(FastGreedy):
    """fast_decode.py's loop over the model with its bitsandbytes matmuls swapped (prepare_model) where asked, each
    4-bit kernel checked against its weight (check_matmuls) before the loop is compiled."""

    def __init__(self, engine, config: QuantizedMatmulConfig):
        super().__init__(engine, config)
        self.matmul_check = check_matmuls(self.module)

    @classmethod
    def validate(cls, config: QuantizedMatmulConfig) -> None:
        super().validate(config)
        if config.quant == "none":
            raise lesson.UsageError("quantized_matmul.py multiplies bitsandbytes weights: add --quant 8bit or 4bit.")
        validate_matmul(config)

    @classmethod
    def prepare_model(cls, model, config: QuantizedMatmulConfig):
        return swap_matmuls(model, config)

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
    if getattr(engine, "matmul_check", None) and info.verify:
        info.verify = dict(info.verify, matmuls=engine.matmul_check)
        info.notes.append(f"4-bit matmul kernels of {engine.matmul_check['layers']} layers against their weights "
                          f"dequantized: rel. error {engine.matmul_check['max_rel_error']:.2e}")
    error = vs_unquantized(engine, tokenizer, config, info)
    if getattr(engine, "fused", 0):
        info.notes.append(f"{engine.fused} groups of projections fused into one matmul each (fast_decode.py)")
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
