"""extensions/ — 第十节 扩展建议: the lessons that come after ds_bnb_infer.py. Each imports the lesson, adds one thing,
copies nothing from it; a decode loop implements the lesson's Decoder. In reading order:

kv_cache.py          KV Cache 启用/验证: the same greedy tokens with the cache on and off, every step timed.
fast_decode.py       the fast decode loop: a static KV cache and one CUDA graph per step (--loop transformers: the
                     library's own static-cache generate()); --step, --fuse, --tune choose how a step runs.
quantized_matmul.py  the quantized matmuls: bitsandbytes' int8 weights multiplied weight-only, or its own kernels,
                     each with its error against the unquantized weights.
tensor_parallel.py   张量并行: each rank builds only its shard (meta skeleton, slices read or drawn); --quant 8bit|4bit
                     shards bitsandbytes weights too; verified at depth against the unsharded model.
tp_all_reduce.py     the tensor-parallel decode step's all-reduces as one kernel each (one-shot, or push: no barrier).
fastgen.py           与其他推理后端对比: DeepSpeed-FastGen on the lesson's model, verified like any engine.
serve.py             服务化: an OpenAI-compatible HTTP server, continuous batching over one static KV cache.
"""
