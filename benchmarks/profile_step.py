"""Usage (one GPU): python3 benchmarks/profile_step.py [--model M] [--device D] [--out DIR] EXPERIMENT [ARGS]

Device experiment (issue: fast and measured): where does decode time go at batch 1, and what would close the gap?
It imports the lesson as it was at commit 7bf4eeb, whose flag --compile is today's extensions/fast_decode.py (see
benchmarks/README.md, "2026-11-25"): run it in a checkout of that commit, e.g.
  git worktree add /tmp/at-7bf4eeb 7bf4eeb && cp benchmarks/profile_step.py /tmp/at-7bf4eeb/benchmarks/ \
    && cd /tmp/at-7bf4eeb && python3 benchmarks/profile_step.py profile fp16-compile

Not part of the script: a harness that imports ds_bnb_infer and, on one GPU, for --model (default random:llama-2-7b;
random:tiny with --device cpu is a smoke test), prompt 32 tokens, greedy, runs one experiment and appends one JSON
line to DIR/profile.jsonl (--out, default $OUT or /tmp/out):

  profile MODE   MODE in fp16-compile, fp16, 4bit, 8bit: torch profiler over one generate() of 64 new tokens:
                 wall time per step vs GPU kernel time per step (the rest is the GPU waiting for the CPU), kernels
                 per step, the top kernels.
  loop [B...]    fp16 greedy decode written out by hand: static KV cache, one torch.compile'd decode step
                 (fullgraph, CUDA graphs), no per-step work in Python beyond argmax — the gpt-fast recipe. Tokens
                 and logits checked against transformers' generate() on the same model.
  int8-error     quantization error against the fp16 model (same seed, same weights) of LLM.int8 (threshold 6),
                 plain int8 (--int8-threshold 0) and nf4: prefill and decode logits, greedy tokens; and how many
                 input columns of the 8-bit matmuls held a value >= 6 (the outliers LLM.int8 keeps in fp16).
  ds-cuda-graph  deepspeed.init_inference(enable_cuda_graph=True) without injection vs without the option: does
                 generate() use the graph, and what does engine(...) give for a second input of the same shape
                 and for one of another shape (checked against the unwrapped model)?
  graph [B...]   the script's fast_generate (--compile) on fp16, but with the step captured as a CUDA graph of
                 the eager kernels (GraphStep, what --compile does for bitsandbytes) instead of torch.compile:
                 verified against transformers' generate() like --compile, timed with the script's generate().

This file was benchmarks/h100_profile.py until issue 24. Run 3 (benchmarks/runs/h100x2-2026-11-25-run3/profile.jsonl)
also ran `bnb-compile Q` (force torch.compile on a bitsandbytes model through transformers'
generate(cache_implementation="static"), the script's --compile of that time); it is in this file at commit 39210bb
and was dropped when --compile became the script's own loop.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as m  # noqa: E402

OUT, MODEL, DEVICE = "/tmp/out", "random:llama-2-7b", "cuda:0"    # set from the command line in main()
PROMPT = "Explain tensor parallelism now: "      # 32 tokens with the preset's byte tokenizer
NEW = 64


def sync():
    m._sync(DEVICE)


def emit(**row):
    row.update(card=m.hardware(DEVICE, 1)["gpu"] or "cpu", model=MODEL, date=time.strftime("%Y-%m-%d"),
               versions=m.versions())
    print(json.dumps(row), flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "profile.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def setup(quant="none", compile=False, batch=1, backend="hf", int8_threshold=6.0):
    config = m.DeployConfig(model_name=MODEL, backend=backend, quant=quant, compile=compile, int8_threshold=int8_threshold,
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


PROMPTS = [PROMPT, "Quantization trades memory for: ", "The capital of France is Paris. ", "def square(x): return x * x  #  "]


def run_int8_error():
    config, tok, model = setup(batch=4)
    inputs = m.verify_batch(tok, PROMPTS, DEVICE)
    ref = dict(m.greedy_with_logits(model, inputs), of="the fp16 model")
    del model
    m.free_memory()
    for quant, threshold in (("8bit", 6.0), ("8bit", 0.0), ("4bit", 6.0)):
        config, tok, model = setup(quant=quant, int8_threshold=threshold, batch=4)
        seen = []                                  # per 8-bit matmul call: input columns holding |x| >= 6

        def count(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            seen.append((x.abs() >= 6).any(0).sum())
        hooks = [mod.register_forward_pre_hook(count) for mod in model.modules()
                 if type(mod).__name__ == "Linear8bitLt"]
        ver = m.verify(model, inputs, ref, m.KERNEL_TOL["fp16"])
        for h in hooks:
            h.remove()
        cols = torch.stack(seen).float().cpu() if seen else torch.zeros(0)
        emit(experiment="int8-error", quant=quant, int8_threshold=threshold if quant == "8bit" else None,
             batch=4, prompt_tokens=int(inputs["attention_mask"].sum()), reference="the unquantized model, same weights",
             prefill_rel_error=ver["prefill_rel_error"], decode_rel_error=ver["decode_rel_error"],
             top1_agreement=ver["top1_agreement"], greedy_tokens_matching=ver["greedy_tokens_matching"],
             greedy_tokens_checked=ver["greedy_tokens_checked"], matmul_calls=len(seen),
             matmuls_with_outlier_columns=int((cols > 0).sum()),
             outlier_columns_mean=float(cols.mean()) if len(cols) else None)
        del model
        m.free_memory()


def run_ds_cuda_graph():
    import deepspeed
    a_text, b_text = PROMPTS[0], PROMPTS[1]                       # both 32 tokens
    for graph in (False, True):
        config, tok, model = setup(backend="deepspeed")
        a, b = (tok([t], return_tensors="pt")["input_ids"].to(DEVICE) for t in (a_text, b_text))
        probes = {"first_input": a, "second_input_same_shape": b, "one_token_input": a[:, :1]}
        with torch.no_grad():
            refs = {k: model(input_ids=x, use_cache=False).logits.float() for k, x in probes.items()}
        with m.keep_model_as_loaded():
            engine = deepspeed.init_inference(model, dtype=model.dtype, replace_with_kernel_inject=False,
                                              enable_cuda_graph=graph)
        m.generate(engine, tok, config.prompts, config)
        tps, step, r = decode_tok_s(engine, tok, config)
        row = dict(experiment="ds-cuda-graph", enable_cuda_graph=graph, batch=1, decode_tok_s=tps,
                   decode_ms_per_step=step * 1e3, graph_created_during_generate=engine.cuda_graph_created)
        for k, x in probes.items():                                 # engine(...): the path the graph is on
            try:
                with torch.no_grad():
                    out = engine(input_ids=x, use_cache=False).logits.float()
                same = out.shape == refs[k].shape
                row[k] = {"out_shape": list(out.shape), "ref_shape": list(refs[k].shape),
                          "rel_error": m.rel_error(out, refs[k]) if same else None}
            except Exception as e:
                row[k] = {"error": m._reason(e)}
        row["graph_created_after_forward"] = engine.cuda_graph_created
        emit(**row)
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


def main(argv=None) -> None:
    import argparse
    global OUT, MODEL, DEVICE
    p = argparse.ArgumentParser(prog="benchmarks/profile_step.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, help="model preset or path (default %(default)s)")
    p.add_argument("--device", default=DEVICE, help="torch device (default %(default)s; cpu with random:tiny: a smoke test)")
    p.add_argument("--out", default=os.environ.get("OUT", OUT), help="folder of profile.jsonl (default $OUT or /tmp/out)")
    p.add_argument("experiment", choices=["profile", "loop", "int8-error", "ds-cuda-graph", "graph"])
    p.add_argument("args", nargs="*", help="profile: MODE (fp16-compile, fp16, 4bit, 8bit); loop / graph: batch sizes")
    a = p.parse_args(argv)
    OUT, MODEL, DEVICE = a.out, a.model, a.device
    m.quiet_libraries()
    {"profile": lambda: run_profile(a.args[0]), "loop": lambda: run_loop([int(b) for b in a.args] or (1, 16)),
     "int8-error": run_int8_error, "ds-cuda-graph": run_ds_cuda_graph,
     "graph": lambda: run_graph([int(b) for b in a.args] or (1,))}[a.experiment]()


if __name__ == "__main__":
    main()
