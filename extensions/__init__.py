"""第十节 扩展建议: each file imports the lesson (ds_bnb_infer.py) and adds one thing to it.

real_model.py       a trained model offline: converts the lesson's REAL_MODELS presets once into a model folder.
quality.py          what 8-bit and 4-bit cost in perplexity on that model, DeepSpeed-wrapped logits bit-identical.
kv_cache.py         KV cache on and off: the same greedy tokens, and what each step costs along the sequence.
fast_decode.py      a static KV cache and one CUDA graph per decode step, verified like any engine.
static_generate.py  transformers' own fast path: generate() on a static KV cache, verified like any engine.
tp_load.py          tensor parallel where each rank builds only its shard (meta skeleton, slices read or drawn).
bnb_settings.py     the lesson with other bitsandbytes 4-bit settings (nf4/fp4, double quant, compute dtype).
tp_quant.py         bitsandbytes 8/4-bit under AutoTP tensor parallel: shard, then quantize each slice as tp 1.
compare.py          every mode in one table, JSON and chart (each mode in its own process).
serve.py            an OpenAI-compatible HTTP server: a request queue and continuous batching over one static KV cache.
bench_serve.py      a load generator for it: concurrency levels or Poisson arrivals; TTFT, time per token, tok/s.
"""
