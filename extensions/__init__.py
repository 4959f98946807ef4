"""extensions/ — 第十节 扩展建议: the lessons that come after ds_bnb_infer.py. Each imports the lesson, adds one thing,
copies nothing from it; a decode loop implements the lesson's Decoder. In reading order:

kv_cache.py          KV Cache 启用/验证: the same greedy tokens with the cache on and off, every step timed.
fast_decode.py       the fast decode loop: a static KV cache and one CUDA graph per step (--loop transformers: the
                     library's own static-cache generate()); --step, --fuse, --tune choose how a step runs.
decode_attention.py  a decode step's attention as a split-KV Triton kernel (fast_decode.py --attention: by default
                     at one row a step on a GPU).
quantized_matmul.py  the quantized matmuls: bitsandbytes' int8 and 4-bit weights multiplied weight-only, or its own
                     kernels, each with its error against the unquantized weights.
kernel_4bit.py       the 4-bit weight-only kernel (Triton): bitsandbytes' nf4/fp4 storage dequantized in registers.
tensor_parallel.py   张量并行: each rank builds only its shard (meta skeleton, slices read or drawn); --quant 8bit|4bit
                     shards bitsandbytes weights too; verified at depth against the unsharded model.
tp_all_reduce.py     the tensor-parallel decode step's all-reduces as one kernel each (one-shot, or push: no barrier).
kernel_inject.py     DeepSpeed's injected Llama kernels adapted to transformers 5 (GQA, mask, residual; 第九节).
fastgen.py           与其他推理后端对比: DeepSpeed-FastGen on the lesson's model, verified like any engine.
serve.py             服务化: an OpenAI-compatible HTTP server, continuous batching over one static KV cache.
"""
