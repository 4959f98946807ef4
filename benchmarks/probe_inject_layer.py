#!/usr/bin/env python3
"""benchmarks/probe_inject_layer.py — DeepSpeed kernel injection on Llama, piece by piece against transformers.

Why the injected Llama is wrong or crashes (issue 27; README 第九节): one injected decoder layer and the same
transformers LlamaDecoderLayer get the same input, and every piece is compared: the input RMSNorm, q/k/v (head
layout, GQA), rotary (base, which dims rotate — rotate_half or interleaved —, positions), the attention under each
form of mask (none, transformers' 4-D mask, DeepSpeed's 2-D padding mask), o_proj, the residual, the post-attention
norm and the MLP (gate/up order, SiLU), the layer's output; then the whole model's prefill and greedy decode (KV
cache), first as transformers calls the injected layers, then through extensions/kernel_inject.py.

The pieces are "teacher-forced": each DeepSpeed op gets the reference's input to that piece, so an error is the
piece's own, not carried in from an earlier one. The full layer (its own inputs all the way) is compared too.
Each op gets its own copies of its inputs and its outputs are copied at once: on the GPU the fused kernels write
into their arguments and return views of one shared workspace. Where a piece could be computed two ways, both are
rows, so one run answers the question (gate/up order; the residual holding x + attn or x; attention added once
or twice), and the layer is run as DeepSpeed ships it and with kernel_inject.fix_residual_add.

Cases (each in its own process: a CUDA fault or DeepSpeed's process-wide layer counters cannot spoil the next):
  gqa      a small random Llama: 8 heads, 2 KV heads, rope_theta 500000 (injection as is, then prepare_model())
  mha      the same with 8 KV heads (what DeepSpeed's Llama container was written for)
  smollm2  real:smollm2-135m, a trained Llama with GQA (9 heads, 3 KV heads, rope_theta 1e5), if converted here

  python benchmarks/probe_inject_layer.py --json /tmp/probe.json            # GPU: fp16, DeepSpeed's CUDA kernels
  python benchmarks/probe_inject_layer.py --cases mha --dtype fp32           # CPU: DeepSpeed's torch fallbacks

On a CPU, DeepSpeed's CPU accelerator has no inference kernels (its InferenceBuilder raises at load); every op of
the injected layer has a torch fallback for builds that lack a kernel, and the probe reaches them by giving the ops
an inference module without any kernel (documented in cpu_fallbacks()). The attention fallback calls transformers
<= 4.37 rotary APIs, so on transformers 5 the attention pieces fail there and say why; the rest runs.
Output: a table of relative errors (|ds - ref| / |ref|) per case and piece; the JSON (--json) holds all of it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = {
    "gqa": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=512, rope_theta=500000.0),
    "mha": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=512, rope_theta=500000.0),
    "smollm2": "real:smollm2-135m",
}
PROMPT_LEN, PAD, DECODE_STEPS = 16, 4, 8      # row 1 of the batch is left-padded by PAD tokens


# ---------------------------------------------------------------------------------------------------------------
# Helpers
def rel(out, ref) -> float:
    """|out - ref| / |ref| in fp32 (inf for a shape mismatch, so a table never hides one)."""
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if out.shape != ref.shape:
        return math.inf
    d = float(ref.norm())
    return float((out - ref).norm()) / d if d else float(out.norm())


def cpu_fallbacks():
    """On the CPU accelerator, make every op of DeepSpeed's injected layers take its own torch fallback: each op
    binds its kernel as `inference_module.<name>` and falls back on AttributeError, so an inference module without
    any kernel selects them all. (The CPU accelerator's InferenceBuilder raises ValueError instead, at the first op.)
    Probe-only: this is the one attribute of DeepSpeed the probe sets, and only where there is no GPU."""
    import types
    from deepspeed.ops.transformer.inference.op_binding.base import BaseOp
    BaseOp.inference_module = types.SimpleNamespace()


def build_case(name: str, dtype, device):
    """(reference model, a deep copy to inject, input ids, attention mask) for a case."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    spec = CASES[name]
    torch.manual_seed(0)
    if isinstance(spec, str):
        import ds_bnb_infer as lesson
        source = lesson.model_source(spec)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(source)
        tok.padding_side = "left"
        tok.pad_token = tok.pad_token or tok.eos_token
        enc = tok(["DeepSpeed inference with injected kernels is", "Rotary position embeddings"],
                  return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    else:
        spec = dict(spec)
        theta = spec.pop("rope_theta")
        config = LlamaConfig(**spec, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        if hasattr(config, "rope_parameters"):
            config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        else:
            config.rope_theta = theta
        model = AutoModelForCausalLM.from_config(config)
        for name, p in model.named_parameters():    # a fresh RMSNorm weight is all ones: a mix-up would not show
            if name.endswith("norm.weight"):
                p.data += 0.2 * torch.randn_like(p)
        model = model.to(device=device, dtype=dtype).eval()
        ids = torch.randint(3, spec["vocab_size"], (2, PROMPT_LEN), device=device)
        mask = torch.ones_like(ids)
        ids[1, :PAD], mask[1, :PAD] = 2, 0
    return model, copy.deepcopy(model), ids, mask


def rope_theta_of(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope(x, theta: float, positions, style: str):
    """x [b, heads, seq, d] rotated at `positions` [seq]: rotate_half (transformers' Llama) or interleaved
    (GPT-J's rotate_every_two); fp32."""
    import torch
    x = x.float()
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device).float() / d)
    ang = positions.float()[:, None] * inv[None, :]                   # [seq, d/2]
    if style == "none":
        return x
    if style == "rotate_half":
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin
    cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return x * cos + torch.stack([-x2, x1], -1).flatten(-2) * sin


class Recorder:
    """Stages and pieces: each stage runs in its own try/except; a failure is recorded with its error."""

    def __init__(self):
        self.rows, self.failures = [], []

    def add(self, stage, piece, value, note=""):
        self.rows.append({"stage": stage, "piece": piece, "rel_error": value, "note": note})

    def stage(self, name, fn):
        try:
            fn()
        except Exception as e:
            self.failures.append({"stage": name, "error": f"{type(e).__name__}: {str(e)[:300]}",
                                  "where": traceback.format_exc().strip().splitlines()[-3][:200]})


# ---------------------------------------------------------------------------------------------------------------
# The reference: transformers' layer 0, every piece captured by hooks during one prefill of the whole model.
def reference_pieces(model, ids, mask):
    import torch
    from transformers import DynamicCache
    layer, got = model.model.layers[0], {}
    def keep(name, output=True):
        def hook(mod, args, kwargs, out=None):
            got[name] = (out if output else (args[0] if args else kwargs["hidden_states"]))
        return hook
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k: got.update(x=a[0] if a else k["hidden_states"], mask4d=k.get("attention_mask"),
                                   position_ids=k.get("position_ids")), with_kwargs=True)]
    for name, mod in [("norm1", layer.input_layernorm), ("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj),
                      ("v", layer.self_attn.v_proj), ("attn_out", layer.self_attn.o_proj),
                      ("norm2", layer.post_attention_layernorm), ("mlp_out", layer.mlp), ("out", layer)]:
        handles.append(mod.register_forward_hook(lambda m, a, o, n=name: got.__setitem__(
            n, o[0] if isinstance(o, tuple) else o)))
    handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("ctx", a[0])))
    handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, a: got.__setitem__("resid1", a[0])))
    cache = DynamicCache(config=model.config) if "config" in DynamicCache.__init__.__code__.co_varnames \
        else DynamicCache()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    for h in handles:
        h.remove()
    layer0 = cache.layers[0] if hasattr(cache, "layers") else None
    got["k_rot"] = layer0.keys if layer0 is not None else cache.key_cache[0]
    got["logits"] = logits
    return got


def reference_generate(model, ids, mask):
    import torch
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=DECODE_STEPS,
                             min_new_tokens=DECODE_STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


# ---------------------------------------------------------------------------------------------------------------
# One case: inject, then the pieces, the full layer, the model.
def run_case(name: str, dtype_name: str, device: str) -> dict:
    import torch
    import torch.nn.functional as F
    import deepspeed
    from extensions import kernel_inject
    dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype_name])
    if device == "cpu":
        cpu_fallbacks()
    rec, info = Recorder(), {"case": name, "dtype": dtype_name, "device": device}
    ref_model, model, ids, mask = build_case(name, dtype, device)
    cfg = ref_model.config
    info.update(heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, rope_theta=rope_theta_of(cfg),
                hidden=cfg.hidden_size, head_dim=cfg.hidden_size // cfg.num_attention_heads)
    ref = reference_pieces(ref_model, ids, mask)
    real = mask.bool()                                          # positions that are tokens, not padding
    state = {}

    def inject_as_is():
        try:
            state["engine"] = deepspeed.init_inference(copy.deepcopy(model), dtype=dtype,
                                                       replace_with_kernel_inject=True)
            rec.add("inject", "as is", 0.0, "injected")
        except Exception as e:
            rec.add("inject", "as is", None, f"{type(e).__name__}: {str(e)[:120]}")
            state.pop("engine", None)
    rec.stage("inject as is", inject_as_is)
    if "engine" not in state or cfg.num_key_value_heads != cfg.num_attention_heads:
        def inject_prepared():
            kernel_inject.prepare_model(model)
            state["engine"] = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=True)
            rec.add("inject", "prepare_model (GQA -> MHA)", 0.0, "injected")
        rec.stage("inject after prepare_model", inject_prepared)
    if "engine" not in state:
        return {"info": info, "rows": rec.rows, "failures": rec.failures}
    injected = state["engine"].module
    ds = injected.model.layers[0]
    c = ds.config
    info["ds_config"] = {k: str(getattr(c, k, None)) for k in ("rotary_dim", "rope_theta", "rotate_half",
                         "rotate_every_two", "heads", "num_kv", "epsilon", "triangular_masking", "mlp_after_attn",
                         "return_tuple", "max_out_tokens", "mlp_act_func_type", "norm_type", "layer_id",
                         "mp_size", "pre_layer_norm", "transposed_mode", "scale_attention")}
    hd, L, H = cfg.hidden_size // cfg.num_attention_heads, ids.shape[1], cfg.hidden_size
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    l0 = ref_model.model.layers[0]
    # Every DeepSpeed op below gets its own copies (fresh()): on the GPU the fused kernels write into their
    # arguments (the MLP kernel writes x + attn over its residual) and return views of one shared workspace that the
    # next op overwrites, so inputs are never shared between ops and outputs are copied at once (snap()).
    def fresh(t):
        return t.detach().to(dtype).clone().contiguous()
    def snap(t):
        return t.detach().clone()
    x, attn, resid1, mlp_ref, out_ref = (ref[k] for k in ("x", "attn_out", "resid1", "mlp_out", "out"))
    def as_heads(t, n):                                          # [b, s, n*hd] -> [b, n, s, hd]
        return t.view(t.shape[0], t.shape[1], n, hd).transpose(1, 2)
    k_ref_mha = as_heads(ref["k"], cfg.num_key_value_heads).repeat_interleave(groups, 1)
    v_ref_mha = as_heads(ref["v"], cfg.num_key_value_heads).repeat_interleave(groups, 1)
    qkv_ref = torch.cat([ref["q"], k_ref_mha.transpose(1, 2).flatten(2), v_ref_mha.transpose(1, 2).flatten(2)], -1)
    with torch.no_grad():                                        # hypotheses, in fp32 from transformers' weights
        n2 = ref["norm2"].float()
        gate, up = n2 @ l0.mlp.gate_proj.weight.float().t(), n2 @ l0.mlp.up_proj.weight.float().t()
        down = l0.mlp.down_proj.weight.float().t()
        mlp_swapped = (F.silu(up) * gate) @ down                 # SiLU on up, gated by gate: [gate; up] read swapped
        out_twice = resid1.float() + attn.float() + mlp_ref.float()      # x + 2 attn + mlp: attention added twice

    def weights():
        a = ds.attention
        qkv = torch.cat([l0.self_attn.q_proj.weight,
                         l0.self_attn.k_proj.weight.view(-1, hd, H).repeat_interleave(groups, 0).flatten(0, 1),
                         l0.self_attn.v_proj.weight.view(-1, hd, H).repeat_interleave(groups, 0).flatten(0, 1)])
        inter = torch.cat([l0.mlp.up_proj.weight, l0.mlp.gate_proj.weight]).t()
        for piece, got, want in [
                ("W qkv = [q;k;v]^T", a.attn_qkvw, qkv.t()), ("W o^T", a.attn_ow, l0.self_attn.o_proj.weight.t()),
                ("W inter = [up;gate]^T", ds.mlp.inter_w, inter), ("W down^T", ds.mlp.output_w, down),
                ("input norm weight", ds.norm_w, l0.input_layernorm.weight),
                ("post-attn norm weight", ds.mlp.attn_nw, l0.post_attention_layernorm.weight),
                ("post-attn norm weight vs input norm's (mix-up?)", ds.mlp.attn_nw, l0.input_layernorm.weight)]:
            rec.add("weights", piece, rel(got, want))
        for piece, b in [("attention out bias (None for Llama)", a.attn_ob), ("MLP out bias", ds.mlp.output_b),
                         ("qkv bias", a.attn_qkvb), ("MLP inter bias", ds.mlp.inter_b)]:
            rec.add("weights", piece, None if b is None else float(b.float().abs().max()),
                    "None" if b is None else f"max |b| (shape {tuple(b.shape)})")
        rec.add("config", "rope_theta read", abs(float(c.rope_theta) - info["rope_theta"]) / info["rope_theta"],
                f"DeepSpeed {c.rope_theta} vs config {info['rope_theta']}")
        rec.add("config", "rotary_dim = head_dim", float(c.rotary_dim != hd), f"{c.rotary_dim} vs {hd}")
        rec.add("config", "rms eps", abs(c.epsilon - cfg.rms_norm_eps) / cfg.rms_norm_eps, f"{c.epsilon}")
        rec.add("config", "mp_size = 1 (residual add divides by it)", float(c.mp_size != 1), f"{c.mp_size}")
        rec.add("config", "pre_layer_norm, mlp_after_attn", float(not (c.pre_layer_norm and c.mlp_after_attn)),
                f"{c.pre_layer_norm}, {c.mlp_after_attn}")
        rec.add("config", "MLP op is the fused kernel (writes x + attn in place)",
                float(kernel_inject.norm_updates_residual(ds.mlp)),
                getattr(ds.mlp.mlp_gemm_func.mlp_gemm_func, "__name__", "?"))
    rec.stage("weights and config", weights)

    def workspace():        # the GPU ops write into the workspace; without it they get a null (host) pointer
        ds.allocate_workspace(x.size())
    rec.stage("workspace", workspace)

    def norm_qkv():
        with torch.no_grad():
            qkv, inp_norm = ds.attention.qkv_func(input=fresh(x), weight=ds.attention.attn_qkvw,
                                                  bias=ds.attention.attn_qkvb, gamma=ds.norm_w, beta=ds.norm_b)
            qkv, inp_norm = snap(qkv), snap(inp_norm)
        rec.add("layer 0 (teacher-forced)", "input RMSNorm", rel(inp_norm, ref["norm1"]))
        rec.add("layer 0 (teacher-forced)", "q", rel(qkv[..., :H], ref["q"]))
        rec.add("layer 0 (teacher-forced)", "k (KV heads repeated)", rel(qkv[..., H:2 * H], qkv_ref[..., H:2 * H]))
        rec.add("layer 0 (teacher-forced)", "v (KV heads repeated)", rel(qkv[..., 2 * H:], qkv_ref[..., 2 * H:]))
    rec.stage("input norm + qkv", norm_qkv)

    def attention():
        forms = {"DeepSpeed 2-D int64 padding mask": mask.to(torch.int64).contiguous(),
                 "transformers' 4-D mask (as passed)": ref["mask4d"], "no mask (row 0 only)": None}
        pos = torch.arange(L, device=x.device)
        for form, m in forms.items():
            try:
                with torch.no_grad():
                    ctx, key, value = ds.attention.compute_attention(
                        qkv_out=fresh(qkv_ref), input_mask=m, layer_past=None, alibi=None,
                        is_prompt=True, token_idx=None, position_ids=pos[None].expand(ids.shape[0], L))
                    ctx, key, value = snap(ctx), snap(key), snap(value)
            except Exception as e:
                rec.add("attention", form, None, f"{type(e).__name__}: {str(e)[:100]}")
                continue
            rows = slice(0, 1) if m is None else slice(None)
            sel = real[rows]
            rec.add("attention", f"context, {form}", rel(ctx[rows][sel], ref["ctx"][rows][sel]))
            if form.startswith("DeepSpeed"):
                k_ds = key[:1, :, :L].float()                    # row 0: unpadded, positions 0..L-1 both sides
                k_pre = k_ref_mha[:1]
                theta = info["rope_theta"]
                for style, th in [("rotate_half", theta), ("rotate_half", 10000.0), ("interleaved", theta),
                                  ("none", theta)]:
                    rec.add("rotary (row 0 keys)", f"{style}, theta {th:g}", rel(k_ds, rope(k_pre, th, pos, style)))
                k_hf = ref["k_rot"][:1].repeat_interleave(groups, 1)
                rec.add("rotary (row 0 keys)", "vs transformers' cached keys", rel(k_ds, k_hf))
                rec.add("kv cache", "values (row 0)", rel(value[:1, :, :L], v_ref_mha[:1]))
    rec.stage("attention", attention)

    def o_proj():
        with torch.no_grad():
            o = snap(ds.attention.vector_matmul_func(input=fresh(ref["ctx"]), weight=ds.attention.attn_ow))
        rec.add("layer 0 (teacher-forced)", "o_proj", rel(o[real], attn[real]))
    rec.stage("o_proj", o_proj)

    S = "MLP pieces (teacher-forced)"
    def post_norm():            # the same RMSNorm-with-residual kernel the fused MLP op starts with
        with torch.no_grad():
            norm, res = ds.mlp.mlp_gemm_func.pre_rms_norm(fresh(attn), fresh(x), ds.mlp.attn_nw, c.epsilon)
            norm, res = snap(norm), snap(res)
        rec.add(S, "pre_rms_norm(attn, x): norm = RMSNorm(x + attn)", rel(norm[real], ref["norm2"][real]))
        rec.add(S, "pre_rms_norm(attn, x): residual out = x + attn", rel(res[real], resid1[real]))
    rec.stage("post-attention RMSNorm", post_norm)

    def gated():
        from deepspeed.ops.transformer.inference.op_binding.gated_activation import GatedActivationOp
        from deepspeed.utils.types import ActivationFuncType
        with torch.no_grad():
            h = fresh(ref["norm2"]) @ ds.mlp.inter_w                         # [up | gate], as the MLP kernel has it
            act = GatedActivationOp()(h.contiguous(), torch.zeros(h.shape[-1], dtype=dtype, device=h.device),
                                      ActivationFuncType.GATED_SILU)
            act = snap(act)
        rec.add(S, "gated activation: SiLU(gate) * up", rel(act[real], (F.silu(gate) * up)[real]))
        rec.add(S, "gated activation: SiLU(up) * gate (halves swapped)", rel(act[real], (F.silu(up) * gate)[real]))
    rec.stage("gated activation", gated)

    def mlp_kernel():
        r, a = fresh(x), fresh(attn)
        with torch.no_grad():
            mlp_out, resid = ds.mlp.mlp_gemm_func(input=a, residual=r, weight_interm=ds.mlp.inter_w,
                                                  weight_out=ds.mlp.output_w, input_bias=ds.attention.attn_ob,
                                                  bias=ds.mlp.inter_b, gamma=ds.mlp.attn_nw, beta=ds.mlp.attn_nb)
            same, mlp_out, resid = resid is r, snap(mlp_out), snap(resid)
        rec.add(S, "MLP op output = down(SiLU(gate) * up)", rel(mlp_out[real], mlp_ref[real]))
        rec.add(S, "MLP op output = down(SiLU(up) * gate) (gate/up swapped)", rel(mlp_out[real], mlp_swapped[real]))
        rec.add(S, "MLP op returns residual = x + attn", rel(resid[real], resid1[real]),
                f"returns its residual argument itself: {same}")
        rec.add(S, "MLP op's residual arg. afterwards = x + attn (in place)", rel(r[real], resid1[real]))
        rec.add(S, "MLP op's residual arg. afterwards = x (untouched)", rel(r[real], x[real]))
    rec.stage("MLP op (rms_mlp_gemm)", mlp_kernel)

    def residual_add():
        ob, fb = ds.attention.attn_ob, ds.mlp.output_b
        original = ds.mlp.residual_add_func
        if isinstance(original, kernel_inject.KernelResidualAdd):
            original = original.original
        def call(op, residual):
            with torch.no_grad():
                return snap(op(hidden_state=fresh(mlp_ref), residual=residual, add_bias=ob is not None,
                               attention_output=fresh(attn), attention_bias=ob if ob is not None else fb,
                               final_bias=fb, residual_add=None))
        for label, op in [("ResidualAddOp (DeepSpeed)", original),
                          ("KernelResidualAdd (kernel_inject)", kernel_inject.KernelResidualAdd(original, c.mp_size))]:
            got = call(op, fresh(resid1))                       # the residual as the fused MLP kernel leaves it
            rec.add(S, f"{label}, residual = x + attn: = x + attn + mlp", rel(got[real], out_ref[real]))
            rec.add(S, f"{label}, residual = x + attn: = x + 2 attn + mlp", rel(got[real], out_twice[real]))
        got = call(original, fresh(x))                          # the residual as the torch fallback leaves it
        rec.add(S, "ResidualAddOp (DeepSpeed), residual = x: = x + attn + mlp", rel(got[real], out_ref[real]))
    rec.stage("residual add", residual_add)

    def mlp_module(label):
        def go():
            r = fresh(x)
            with torch.no_grad():
                out = snap(ds.mlp(fresh(attn), r, fresh(ref["norm1"]), ds.attention.attn_ob))
            rec.add(label, "DeepSpeedMLP(attn, x) = x + attn + mlp", rel(out[real], out_ref[real]))
            rec.add(label, "DeepSpeedMLP(attn, x) = x + 2 attn + mlp", rel(out[real], out_twice[real]))
        return go

    def layer(label):
        def go():
            inp = fresh(x)
            with torch.no_grad():
                out = ds(inp, attention_mask=mask.to(torch.int64).contiguous(), use_cache=False)
            out = snap(out[0] if isinstance(out, tuple) else out)
            rec.add(label, "layer output, 2-D mask = x + attn + mlp", rel(out[real], out_ref[real]))
            rec.add(label, "layer output, 2-D mask = x + 2 attn + mlp", rel(out[real], out_twice[real]))
            rec.add(label, "layer input afterwards = x + attn (overwritten)", rel(inp[real], resid1[real]))
        return go
    rec.stage("DeepSpeedMLP, as DeepSpeed", mlp_module("layer 0, as DeepSpeed"))
    rec.stage("full layer, as DeepSpeed", layer("layer 0, as DeepSpeed"))

    def fix():
        rec.add("layer 0, kernel_inject's fix", "fix_residual_add applied", float(kernel_inject.fix_residual_add(ds)),
                "1: the fused kernel is bound, residual add replaced; 0: fallback, DeepSpeed's op kept")
        mlp_module("layer 0, kernel_inject's fix")()
        layer("layer 0, kernel_inject's fix")()
    rec.stage("layer 0 with kernel_inject.fix_residual_add", fix)

    ref_tokens, ref_steps = reference_generate(ref_model, ids, mask)

    def model_stage(label):
        def go():
            with torch.no_grad():
                logits = injected(input_ids=ids, attention_mask=mask).logits
            rec.add(label, "prefill logits", rel(logits[real], ref["logits"][real]))
            with torch.no_grad():
                out = state["engine"].generate(input_ids=ids, attention_mask=mask, max_new_tokens=DECODE_STEPS,
                                               min_new_tokens=DECODE_STEPS, do_sample=False, output_logits=True,
                                               return_dict_in_generate=True)
            tokens, steps = out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)
            agree = int((tokens.cpu() == ref_tokens.cpu()).all(0).long().cumprod(0).sum())
            upto = min(agree + 1, DECODE_STEPS)
            rec.add(label, f"decode logits (first {upto} steps)", rel(steps[:, :upto], ref_steps[:, :upto]),
                    f"greedy tokens {agree}/{DECODE_STEPS} equal")
        return go
    raw_layers = list(injected.model.layers)

    def adapted():                     # first: "as is" may fault on the GPU (it reads past transformers' mask)
        kernel_inject.adapt(injected)
        model_stage("model via kernel_inject.adapt")()
    rec.stage("model via kernel_inject.adapt", adapted)

    def as_is():
        for i, layer in enumerate(raw_layers):
            injected.model.layers[i] = layer
        model_stage("model as is")()
    rec.stage("model, as transformers calls the injected layers", as_is)
    return {"info": info, "rows": rec.rows, "failures": rec.failures}


# ---------------------------------------------------------------------------------------------------------------
def versions() -> dict:
    from importlib.metadata import version
    import torch
    out = {p: version(p) for p in ("torch", "transformers", "deepspeed")}
    out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return out


def print_table(results: dict) -> None:
    print(f"{'case':8} {'stage':30} {'piece':64} {'rel. error':>11}  note")
    for name, res in results.items():
        for r in res.get("rows", []):
            v = r["rel_error"]
            v = "—" if v is None else f"{v:11.3e}"
            print(f"{name:8} {r['stage'][:30]:30} {r['piece'][:64]:64} {v:>11}  {r['note']}")
        for f in res.get("failures", []):
            print(f"{name:8} FAILED {f['stage']}: {f['error']}  [{f['where']}]")
        if "error" in res:
            print(f"{name:8} FAILED: {res['error']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                        help="default: fp16 on a GPU, fp32 on a CPU")
    parser.add_argument("--json", default=None, help="write every row here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # a child process: one case
    args = parser.parse_args(argv)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("fp16" if device == "cuda" else "fp32")
    if args.one:
        name = args.cases
        try:
            res = run_case(name, dtype, device)
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {str(e)[:300]}", "trace": traceback.format_exc()[-2000:]}
        with open(args.json, "w") as f:
            json.dump(res, f, default=str)
        return 0
    results = {}
    for name in args.cases.split(","):
        if name == "smollm2":
            import ds_bnb_infer as lesson
            try:
                lesson.model_source(CASES[name])
            except lesson.UsageError as e:
                results[name] = {"error": f"skipped: {e}"}
                continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            path = tmp.name
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "--cases", name, "--dtype", dtype, "--json", path]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        try:
            with open(path) as f:
                results[name] = json.load(f)
        except (OSError, ValueError):
            results[name] = {"error": f"the case's process died (rc {proc.returncode}): {proc.stderr[-600:]}"}
        os.unlink(path)
    print_table(results)
    report = {"versions": versions(), "device": device, "dtype": dtype, "cases": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=lambda v: None if isinstance(v, float) else str(v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
