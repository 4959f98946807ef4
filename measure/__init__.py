"""measure/ — the tools that measure the lessons (their dated results live in benchmarks/).

compare.py       every deployment mode on the same model and prompts, each in its own process: one table, JSON, chart.
bench_serve.py   a load generator for extensions/serve.py (or any OpenAI-compatible server): TTFT, tok/s, percentiles.
quality.py       what 8-bit and 4-bit cost in perplexity on the trained real:smollm2-135m, on a CPU.
hostile.py       90 hostile requests against serve.py (fields, body size, slow/vanished clients, bursts, routes).
lm_eval_check.py lm-eval scores serve.py on mc_task/ (fp32, 8-bit, 4-bit); the lesson's model must score the same.
"""
