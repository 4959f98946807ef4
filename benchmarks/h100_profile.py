"""Device experiment (issue: fast and measured): where does decode time go at batch 1, and what would close the gap?

Not part of the script: a harness that imports ds_bnb_infer and, on one GPU, for random:llama-2-7b (prompt 32
tokens, greedy) runs one experiment and appends one JSON line to $OUT/profile.jsonl:

  profile MODE   MODE in fp16-compile, fp16, 4bit, 8bit: torch profiler over one generate() of 64 new tokens:
                 wall time per step vs GPU kernel time per step (the rest is the GPU waiting for the CPU), kernels
                 per step, the top kernels.
  loop [B...]    fp16 greedy decode written out by hand: static KV cache, one torch.compile'd decode step
                 (fullgraph, CUDA graphs), no per-step work in Python beyond argmax — the gpt-fast recipe. Tokens
                 and logits checked against transformers' generate() on the same model.
  bnb-compile Q  Q in 4bit, 8bit: transformers refuses to compile bitsandbytes models (hf_quantizer.is_compileable
                 is False); force it, check the logits against the same model eager, and time it.
  ds-cuda-graph  deepspeed.init_inference(enable_cuda_graph=True) without injection vs without the option.
  graph [B...]   the script's fast_generate (--compile) on fp16, but with the step captured as a CUDA graph of
                 the eager kernels (GraphStep, what --compile does for bitsandbytes) instead of torch.compile:
                 verified against transformers' generate() like --compile, timed with the script's generate().

Usage (device, repo root): python3 benchmarks/h100_profile.py profile fp16-compile
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as m  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
PROMPT = "Explain tensor parallelism now: "      # 32 tokens with the preset's byte tokenizer
NEW = 64
MODEL = os.environ.get("MODEL", "random:llama-2-7b")      # MODEL=random:tiny DEVICE=cpu: a smoke test on a CPU
DEVICE = os.environ.get("DEVICE", "cuda:0")


def sync():
    m._sync(DEVICE)


def emit(**row):
    row.update(card=m.hardware(DEVICE, 1)["gpu"] or "cpu", model=MODEL, date=time.strftime("%Y-%m-%d"),
               versions=m.versions())
    print(json.dumps(row), flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "profile.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def setup(quant="none", compile=False, batch=1, backend="hf"):
    config = m.DeployConfig(model_name=MODEL, backend=backend, quant=quant, compile=compile,
                            device=DEVICE.split(":")[0], max_new_tokens=NEW, prompts=[PROMPT] * batch, batch_size=batch,
                            kernel_inject=False)
    tok = m.load_tokenizer(config)
    model = m.load_model(config, quant, DEVICE)
    return config, tok, model


def decode_tok_s(engine, tok, config, runs=3):
    out = [m.generate(engine, tok, config.prompts, config) for _ in range(runs)]
    step = m.percentile([r["decode_s_per_token"] for r in out], 50)
    return config.batch_size / step, step, out[-1]


def profile_generate(engine, tok, config):
    """Kernel time vs wall time over one generate() (decode-dominated: 64 steps after a 32-token prefill)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = m.generate(engine, tok, config.prompts, config, ttft=False)
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in gpu)
    busy, end = 0.0, -1.0                      # union of kernel/memcpy intervals (us)
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    by_name = {}
    for e in gpu:
        by_name[e.name[:70]] = by_name.get(e.name[:70], 0.0) + e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    steps = r["steps"]
    return {"profiled_wall_ms_per_step": r["latency_s"] * 1e3 / steps, "gpu_busy_ms_per_step": busy / 1e3 / steps,
            "gpu_ops_per_step": len(gpu) / steps,
            "top_gpu_ops_ms_per_step": {k: round(v / 1e3 / steps, 4) for k, v in top}}


def run_profile(mode):
    quant = {"4bit": "4bit", "8bit": "8bit"}.get(mode, "none")
    config, tok, model = setup(quant=quant, compile=mode == "fp16-compile")
    for _ in range(3 if config.compile else 1):
        m.generate(model, tok, config.prompts, config)
    tps, step, _ = decode_tok_s(model, tok, config)
    prof = profile_generate(model, tok, config)
    prof["gpu_idle_fraction_unprofiled"] = 1 - prof["gpu_busy_ms_per_step"] / (step * 1e3)
    emit(experiment="profile", mode=mode, batch=1, decode_tok_s=tps, decode_ms_per_step=step * 1e3,
         compiled=hasattr(model, "_compiled_call"), **prof)


def static_greedy(model, input_ids, new, step_fn=None):
    """Greedy decode with a StaticCache; step_fn (compiled) runs one token. Returns tokens, step logits, s/step."""
    from transformers import StaticCache
    b, t = input_ids.shape
    cache = StaticCache(config=model.config, max_cache_len=t + new)
    step_fn = step_fn or (lambda ids, pos, c: model(input_ids=ids, position_ids=pos[None].expand(ids.shape[0], -1),
                                                    cache_position=pos, past_key_values=c, use_cache=True).logits)
    with torch.no_grad():
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                       cache_position=torch.arange(t, device=input_ids.device)).logits[:, -1].float()
        tokens, steps = [logits.argmax(-1)], [logits.cpu()]
        sync()
        t0 = time.perf_counter()
        for i in range(new - 1):
            torch.compiler.cudagraph_mark_step_begin()
            pos = torch.tensor([t + i], device=input_ids.device)
            logits = step_fn(tokens[-1][:, None], pos, cache)[:, -1].float()
            tokens.append(logits.argmax(-1))
            if i < m.VERIFY_TOKENS:
                steps.append(logits.cpu())        # a sync, but only in the first steps; timing uses the rest
                if i == m.VERIFY_TOKENS - 1:
                    sync()
                    t0, first = time.perf_counter(), i + 1
        sync()
        s_per_step = (time.perf_counter() - t0) / (new - 1 - first)
    return torch.stack(tokens, 1).cpu(), torch.stack(steps[:m.VERIFY_TOKENS], 1), s_per_step


def run_loop(batches=(1, 16)):
    for batch in batches:
        config, tok, model = setup(batch=batch)
        ids = tok(config.prompts, return_tensors="pt")["input_ids"].to(DEVICE)
        # Reference: transformers' own greedy generate on the same model (dynamic cache, eager).
        ref = model.generate(input_ids=ids, max_new_tokens=m.VERIFY_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, min_new_tokens=m.VERIFY_TOKENS)
        ref_steps = torch.stack([s.float().cpu() for s in ref.logits], 1)
        ref_tokens = ref.sequences[:, ids.shape[1]:].cpu()

        def step(ids_, pos, cache):
            return model(input_ids=ids_, position_ids=pos[None].expand(ids_.shape[0], -1), cache_position=pos,
                         past_key_values=cache, use_cache=True).logits
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        t0 = time.perf_counter()
        for _ in range(3):                        # compile + CUDA graph capture
            tokens, steps, s = static_greedy(model, ids, 128, compiled)
        warm_s = time.perf_counter() - t0
        runs = [static_greedy(model, ids, 128, compiled)[2] for _ in range(3)]
        s = m.percentile(runs, 50)
        agree = int((tokens[:, :m.VERIFY_TOKENS] == ref_tokens).all(0).long().cumprod(0).sum())
        upto = min(agree + 1, m.VERIFY_TOKENS)
        err = m.rel_error(steps[:, :upto], ref_steps[:, :upto])
        emit(experiment="loop", batch=batch, new_tokens=128, decode_tok_s=batch / s, decode_ms_per_step=s * 1e3,
             mbu=m.mbu(m.decode_read_bytes(model), s, m.copy_bandwidth_gbps(DEVICE)),
             warmup_s=warm_s, decode_rel_error=err, greedy_tokens_matching=agree,
             verified=err <= m.KERNEL_TOL["fp16"])
        del model, compiled
        torch._dynamo.reset()
        m.free_memory()


def run_bnb_compile(quant):
    config, tok, model = setup(quant=quant, compile=True)
    ids = tok(config.prompts, return_tensors="pt")["input_ids"].to(DEVICE)
    eager = m.greedy_with_logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    type(model.hf_quantizer).is_compileable = property(lambda self: True)     # the experiment: compile anyway
    row = {"experiment": "bnb-compile", "quant": quant, "batch": 1}
    try:
        t0 = time.perf_counter()
        for _ in range(3):
            m.generate(model, tok, config.prompts, config)
        row["warmup_s"] = time.perf_counter() - t0
        ver = m.verify(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, dict(eager, of="eager"),
                       m.KERNEL_TOL["bf16"], **m.gen_options(config))
        tps, step, _ = decode_tok_s(model, tok, config)
        row.update(decode_tok_s=tps, decode_ms_per_step=step * 1e3, compiled=hasattr(model, "_compiled_call"),
                   verify=ver["summary"], verified=ver["passed"],
                   mbu=m.mbu(m.decode_read_bytes(model), step, m.copy_bandwidth_gbps(DEVICE)))
        row.update(profile_generate(model, tok, config))
    except Exception as e:                         # the finding may be that it does not compile
        row["error"] = m._reason(e)
    emit(**row)


def run_ds_cuda_graph():
    import deepspeed
    for graph in (False, True):
        config, tok, model = setup(backend="deepspeed")
        with m.keep_model_as_loaded():
            engine = deepspeed.init_inference(model, dtype=model.dtype, replace_with_kernel_inject=False,
                                              enable_cuda_graph=graph)
        m.generate(engine, tok, config.prompts, config)
        tps, step, r = decode_tok_s(engine, tok, config)
        emit(experiment="ds-cuda-graph", enable_cuda_graph=graph, batch=1, decode_tok_s=tps,
             decode_ms_per_step=step * 1e3, text=r["texts"][0][:40],
             cuda_graph_created=getattr(engine, "cuda_graph_created", None))
        del engine, model
        m.free_memory()


def run_graph(batches=(1,)):
    for batch in batches:
        config, tok, model = setup(batch=batch, compile=True)
        model._fast_decode = {"step": m.GraphStep(m.decode_step(model, torch.device("cpu"))[0]), "mode": "cuda-graph"}
        inputs = m.verify_batch(tok, config.prompts, DEVICE)
        ref = dict(m.greedy_with_logits(model, inputs), of="eager generate")
        ver = m.verify(model, inputs, ref, m.KERNEL_TOL["fp16"], fast=True)
        for _ in range(2):
            m.generate(model, tok, config.prompts, config)
        tps, step, _ = decode_tok_s(model, tok, config)
        emit(experiment="graph", batch=batch, decode_tok_s=tps, decode_ms_per_step=step * 1e3,
             mbu=m.mbu(m.decode_read_bytes(model), step, m.copy_bandwidth_gbps(DEVICE)), decode_mode=m.decode_mode(model),
             verify=ver["summary"], verified=ver["passed"])
        del model
        m.free_memory()


if __name__ == "__main__":
    m.quiet_libraries()
    what = sys.argv[1]
    {"profile": lambda: run_profile(sys.argv[2]), "loop": lambda: run_loop([int(b) for b in sys.argv[2:]] or (1, 16)),
     "bnb-compile": lambda: run_bnb_compile(sys.argv[2]), "ds-cuda-graph": run_ds_cuda_graph,
     "graph": lambda: run_graph([int(b) for b in sys.argv[2:]] or (1,))}[what]()
