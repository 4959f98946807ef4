"""第十节 扩展建议: each file imports the lesson (ds_bnb_infer.py) and adds one thing to it.

fast_decode.py  KV cache: a static KV cache and one CUDA graph per decode step, verified like any engine.
compare.py      every mode in one table, JSON and chart (each mode in its own process).
"""
