"""extensions/kernel_inject.py — DeepSpeed's injected Llama kernels under today's transformers (README 第九节).

`deepspeed.init_inference(model, replace_with_kernel_inject=True)` swaps every LlamaDecoderLayer for a
DeepSpeedTransformerInference module that runs fused CUDA kernels. Those modules were written for the decoder-layer
interface of transformers 4.3x; deepspeed 0.19.8 still speaks it. What the kernels do and what transformers now
passes them differ in four places, and in a fifth DeepSpeed's Python no longer matches its own CUDA kernel; each
is measured by benchmarks/probe_inject_layer.py:

1. Return value. The layer returns a tuple ``(hidden, attn_mask)`` or ``(hidden, (key, value))``; transformers
   >= 4.54 hands a layer's return value straight to the next layer as its hidden states, so the second layer calls
   ``input.size()`` on a tuple: ``'tuple' object has no attribute 'size'``.
2. The attention mask. The kernel keeps its own KV cache (in its workspace, per layer, with its own token counter)
   and never fills transformers' ``Cache``; transformers sizes its 4-D mask from that cache, so after the prompt
   the mask has 1 key column where the kernel reads all of them (past the end of the tensor), and it is ``bool``
   (sdpa) where the kernel reads fp16. The kernel's own form is the 2-D int64 padding mask over every token so
   far (``(1 - mask) * -10000`` is added to the scores; causality it applies itself on the prompt) — exactly the
   ``attention_mask`` that generate() passes to the model. A forward pre-hook on the decoder stack keeps it for
   the layers.
3. Positions. The kernel rotates q/k by its token counter (0 .. prompt-1, then one more per step) and ignores
   ``position_ids``. RoPE depends only on the distance between two positions, so a left-padded row, whose real
   tokens start later, gets the same attention scores; nothing to adapt.
4. GQA. DeepSpeed's Llama container sizes the fused QKV weight as 3 x hidden and refuses anything else ("Merging
   tensors is not allowed here!"). Grouped-query attention equals multi-head attention with each K/V head repeated
   for its group, so prepare_model() repeats them before injection: exact, at the price of a KV cache and K/V
   weights as large as a multi-head model's.
5. The residual, added twice. On a GPU, DeepSpeed's RMSNorm MLP kernel (``rms_mlp_gemm``, csrc pt_binding.cpp
   ``ds_rms_mlp_gemm``) fuses the post-attention residual into its norm and writes ``x + attn`` over the layer's
   input tensor, in place ("we'll update the residual in-place"). DeepSpeedMLP then hands that tensor to its
   residual add, which for a model without biases computes ``(residual + attention_output) / mp_size + mlp``
   (op_binding/residual_add.py) — written for the torch fallback, whose pre-RMSNorm returns a new tensor — so on
   the CUDA path the layer returns ``x + 2 * attn + mlp``. (Older releases added ``residual / mp_size + mlp``
   there, right for the kernel.) adapt() gives each injected layer's MLP the residual add that the kernel
   expects, only where the fused kernel is bound (the fallback stays as DeepSpeed wrote it), and
   InjectedDecoderLayer hands the layer a copy of its input so that the in-place write cannot reach a tensor
   transformers keeps (the hidden states it records for ``output_hidden_states``).

And one DeepSpeed limitation is kept from biting: the workspace (activations and KV cache) is sized for the batch
of the first forward; a later, larger batch would write past each layer's cache into the next one's. The first
layer's allocation is armed again whenever a prompt arrives with another batch size.

As a lesson (第十节, after the lesson's 第五节/第九节): InjectedGenerate is the lesson's Decoder around the injected
engine, so the tutorial's call runs through the lesson's own init_engine and is verified like every engine:

  python extensions/kernel_inject.py --model random:llama-2-7b              # one GPU; injection on by default here
  python measure/compare.py --model random:llama-2-7b --modes ds,ds-inject  # beside the lesson without injection

This module changes no file of deepspeed or transformers: it wraps DeepSpeed's injected layers in a module with
transformers' decoder-layer interface, gives each layer's MLP its residual add (an attribute of that instance), and
rewrites the model's own weights (GQA) before injection. Use:

    model = kernel_inject.prepare_model(model)                     # before init_inference
    engine = deepspeed.init_inference(model, dtype=torch.float16, replace_with_kernel_inject=True)
    kernel_inject.adapt(engine.module)                             # after it
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Annotated

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402


def injection_refusal(config) -> str | None:
    """Why DeepSpeed's Llama container would compute something else than this model; None when it would not.
    (Scaled rope types the container refuses itself; GQA prepare_model() removes.)"""
    heads, hidden = config.num_attention_heads, config.hidden_size
    if getattr(config, "head_dim", None) not in (None, hidden // heads):
        return (f"head_dim {config.head_dim} is not hidden_size / heads ({hidden // heads}): DeepSpeed's Llama "
                "container derives the head size and the rotary dimension from hidden_size / heads")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the model has projection biases; DeepSpeed's Llama container drops them"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act}: DeepSpeed's Llama kernels compute SiLU-gated MLPs only"
    return None


def prepare_model(model):
    """Before init_inference: repeat each K/V head of a GQA model for its group of query heads (exactly the
    attention transformers computes, now multi-head), so that DeepSpeed's Llama container reads it. In place;
    returns the model. Raises ValueError, in one sentence, for a model the container would compute wrongly."""
    config = model.config
    why = injection_refusal(config)
    if why:
        raise ValueError(f"DeepSpeed kernel injection cannot serve this model: {why}.")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if kv_heads == heads:
        return model
    groups, head_dim = heads // kv_heads, config.hidden_size // heads
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.k_proj, attn.v_proj):
            weight = proj.weight.data.view(kv_heads, head_dim, -1)        # transformers' repeat_kv: head h reads
            proj.weight = torch.nn.Parameter(                             # K/V head h // groups
                weight.repeat_interleave(groups, dim=0).reshape(heads * head_dim, -1), requires_grad=False)
            proj.out_features = heads * head_dim
        attn.num_key_value_groups = 1
    config.num_key_value_heads = heads
    return model


def norm_updates_residual(mlp) -> bool:
    """Whether `mlp`'s (a DeepSpeedMLP's) RMSNorm MLP op is DeepSpeed's fused kernel, which writes x + attn over
    its residual argument in place; False for the torch fallback (a new tensor) and for LayerNorm layers."""
    from deepspeed.utils.types import NormType
    op = getattr(mlp, "mlp_gemm_func", None)
    fn = getattr(op, "mlp_gemm_func", None)
    return (fn is not None and mlp.config.norm_type == NormType.RMSNorm
            and getattr(fn, "__name__", "") != "rms_mlp_gemm_fallback")


class KernelResidualAdd(torch.nn.Module):
    """DeepSpeedMLP's residual add for the fused RMSNorm MLP kernel (point 5 of the module docstring): its residual
    already holds x + attn, so the layer's output is residual / mp_size + mlp (summed over tensor-parallel ranks
    by DeepSpeedMLP's all-reduce). With biases (no Llama has them) DeepSpeed's own op runs as before."""

    def __init__(self, original, mp_size: int):
        super().__init__()
        from deepspeed.ops.transformer.inference.op_binding.vector_add import VectorAddOp
        self.original, self.mp_size, self.vector_add = original, mp_size, VectorAddOp()

    def forward(self, hidden_state, residual, add_bias, attention_output=None, residual_add=None,
                attention_bias=None, final_bias=None):
        if attention_bias is not None or final_bias is not None:
            return self.original(hidden_state=hidden_state, residual=residual, add_bias=add_bias,
                                 attention_output=attention_output, residual_add=residual_add,
                                 attention_bias=attention_bias, final_bias=final_bias)
        return self.vector_add(residual, hidden_state, 1.0 / self.mp_size)


def fix_residual_add(layer) -> bool:
    """Give one injected layer's MLP KernelResidualAdd where its fused kernel needs it; True when it did (or had).
    In place."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not hasattr(mlp, "residual_add_func") or not norm_updates_residual(mlp):
        return False
    if not isinstance(mlp.residual_add_func, KernelResidualAdd):
        mlp.residual_add_func = KernelResidualAdd(mlp.residual_add_func, mlp.config.mp_size)
    return True


class InjectedDecoderLayer(torch.nn.Module):
    """One of DeepSpeed's injected layers behind transformers' decoder-layer interface: takes hidden states,
    returns hidden states (a 1-tuple for transformers < 4.54), attends with the 2-D padding mask kept by adapt()'s
    hook instead of transformers' 4-D mask, and leaves transformers' Cache alone (the kernel keeps its own)."""

    def __init__(self, layer, state: dict, first: bool, tuple_output: bool):
        super().__init__()
        self.layer, self.state, self.first, self.tuple_output = layer, state, first, tuple_output

    def forward(self, hidden_states, *args, **kwargs):
        batch, seq = hidden_states.shape[:2]
        if self.first and seq > 1 and batch != self.state.get("workspace_batch"):
            # DeepSpeed sizes its workspace for the first forward's batch only (see the module docstring).
            self.layer._should_allocate_workspace = True
            self.state["workspace_batch"] = batch
        # a copy: the fused MLP kernel writes x + attn over its input (point 5), which transformers may keep
        out = self.layer(hidden_states.clone(), attention_mask=self.state.get("mask"), use_cache=False)
        out = out[0] if isinstance(out, tuple) else out
        return (out,) if self.tuple_output else out


def _keep_padding_mask(state: dict):
    """A forward pre-hook for the decoder stack: keep its 2-D attention_mask (int64, the kernel's form) for the
    layers; None (the kernel's own causal masking only) when the caller gave none."""
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        state["mask"] = mask.to(torch.int64).contiguous() if mask is not None and mask.dim() == 2 else None
    return hook


def adapt(model):
    """After init_inference: every injected layer of `model` (the engine's .module) behind InjectedDecoderLayer,
    its MLP's residual add fixed for the fused kernel (fix_residual_add), and the hook that hands the layers the
    padding mask. In place; returns the model. Raises ValueError when the model holds no injected layer
    (injection was off or did not recognise the architecture)."""
    from importlib.metadata import version
    from packaging.version import Version
    from deepspeed.model_implementations.transformers.ds_transformer import DeepSpeedTransformerInference
    stack = model.model
    layers = stack.layers
    if not any(isinstance(layer, DeepSpeedTransformerInference) for layer in layers):
        raise ValueError("no DeepSpeed-injected layer in this model; call deepspeed.init_inference(..., "
                         "replace_with_kernel_inject=True) first.")
    state, tuple_output = {}, Version(version("transformers")) < Version("4.54")
    for i, layer in enumerate(layers):
        if isinstance(layer, DeepSpeedTransformerInference):
            fix_residual_add(layer)
            layers[i] = InjectedDecoderLayer(layer, state, first=(i == 0), tuple_output=tuple_output)
    stack.register_forward_pre_hook(_keep_padding_mask(state), with_kwargs=True)
    return model


@dataclasses.dataclass
class KernelInjectConfig(lesson.DeployConfig):
    """extensions/kernel_inject.py: the tutorial's kernel injection, adapted"""
    kernel_inject: Annotated[bool | None, "DeepSpeed's fused kernels through this file's adapter, verified (on by "
                             "default here)"] = True


class InjectedGenerate(lesson.Decoder):
    """The lesson's engine with kernel injection made to work: prepare_model() (GQA made multi-head, exactly) before
    init_inference, adapt() after it; generate() is the engine's own. Without injection (--no-kernel-inject, or
    after the lesson's fallback) it is the plain engine, so the fallback is the lesson's."""

    @classmethod
    def validate(cls, config: KernelInjectConfig) -> None:
        if config.backend != "deepspeed":
            raise lesson.UsageError("kernel_inject.py adapts DeepSpeed's injected kernels: use --backend deepspeed.")

    @classmethod
    def prepare_model(cls, model, config: KernelInjectConfig):
        if not config.kernel_inject or config.quant != "none":
            return model
        try:
            return prepare_model(model)
        except ValueError as e:
            raise lesson.UsageError(f"{e} Add --no-kernel-inject.") from None

    def __init__(self, engine, config: KernelInjectConfig):
        super().__init__(engine, config)
        from deepspeed.model_implementations.transformers.ds_transformer import DeepSpeedTransformerInference
        if any(isinstance(m, DeepSpeedTransformerInference) for m in self.module.modules()):
            adapt(self.module)
            self.mode = "generate (injected kernels)"

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)


def main(argv=None) -> int:
    return lesson.main(argv, prog="extensions/kernel_inject.py", config_class=KernelInjectConfig,
                       job=lambda config: lesson.run(config, InjectedGenerate))


if __name__ == "__main__":
    sys.exit(main())
