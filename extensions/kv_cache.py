#!/usr/bin/env python3
"""extensions/kv_cache.py — 第十节 KV Cache 启用/验证: the same greedy decode with the KV cache on and off.

With the cache, each step feeds one new token and reads the keys and values of the earlier ones from memory: a step
costs about the same at every position. Without it, each step runs the whole sequence again: a step costs more the
longer the sequence, and the total grows with the square of the length. This file decodes the first prompt both
ways, one token a step on the engine the lesson built and verified (init_engine), times every step, and checks that
both ways pick the same tokens (they compute the same function; in half precision the summation order may differ).

  python extensions/kv_cache.py --model real:smollm2-135m --max-new-tokens 128 --json /tmp/kv.json --plot /tmp/kv.png
The lesson's flags for the model (python ds_bnb_infer.py --help); batch 1, greedy; --json writes both runs' step
times and the comparison.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Annotated

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402


@dataclasses.dataclass
class KvCacheConfig(lesson.DeployConfig):
    """extensions/kv_cache.py: the comparison"""
    plot: Annotated[str | None, "draw seconds per step against position here (matplotlib)"] = None
    not_flags = ("batch_size", "warmup", "iters", "do_sample", "temperature", "top_p", "text_chars")


def decode(model, ids, new_tokens: int, use_cache: bool) -> tuple[list[int], list[float]]:
    """Greedy tokens and the seconds of each step (step 0 is the prefill), with or without the KV cache."""
    import torch
    tokens, seconds, past, x = [], [], None, ids
    with torch.no_grad():
        for _ in range(new_tokens):
            lesson.sync(ids.device)
            t0 = time.perf_counter()
            out = model(input_ids=x, past_key_values=past, use_cache=use_cache)
            token = out.logits[:, -1].argmax(-1)
            lesson.sync(ids.device)
            seconds.append(time.perf_counter() - t0)
            tokens.append(int(token))
            past, x = (out.past_key_values, token[:, None]) if use_cache else (None, torch.cat([x, token[:, None]], 1))
    return tokens, seconds


def compare(config: KvCacheConfig) -> int:
    """Decode the first prompt with the cache on, then off, on the engine the lesson built and verified."""
    import torch
    lesson.validate(config, 1, torch.cuda.is_available())
    if config.plot:
        lesson.check_writable(config.plot, "--plot")
    engine, tokenizer, info = lesson.init_engine(config)
    module = getattr(engine, "module", engine)
    ids = lesson.encode(tokenizer, lesson.load_prompts(config)[:1], next(module.parameters()).device)["input_ids"]
    decode(module, ids, 2, True)                                      # warm-up
    runs = {}
    for use_cache in (True, False):
        lesson.log(f"[kv_cache] {config.max_new_tokens} steps with the cache {'on' if use_cache else 'off'} ...")
        runs["on" if use_cache else "off"] = decode(module, ids, config.max_new_tokens, use_cache)
    (on, on_s), (off, _) = runs["on"], runs["off"]
    agree = next((i for i, (a, b) in enumerate(zip(on, off)) if a != b), len(on))
    quarter = max(1, len(on_s) // 4)
    rows = {name: {"total_s": sum(s), "tokens_per_s": len(s) / sum(s), "first_quarter_step_ms":
                   1e3 * lesson.percentile(s[1:quarter + 1] or s, 50), "last_quarter_step_ms":
                   1e3 * lesson.percentile(s[-quarter:], 50)} for name, (_, s) in runs.items()}
    print(f"{config.model_name}, prompt {ids.shape[1]} tokens, {len(on)} new tokens, {info.device}, {info.dtype}")
    print(f"{'KV cache':<10}{'total s':>9}{'tok/s':>9}{'step ms, early':>16}{'step ms, late':>15}")
    for name, r in rows.items():
        print(f"{name:<10}{r['total_s']:>9.2f}{r['tokens_per_s']:>9.1f}{r['first_quarter_step_ms']:>16.1f}"
              f"{r['last_quarter_step_ms']:>15.1f}")
    print(f"greedy tokens equal with and without the cache: {agree}/{len(on)}")
    if config.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, (_, s) in runs.items():
            ax.plot(range(1, len(s)), [1e3 * x for x in s[1:]], label=f"KV cache {name}")
        ax.set_xlabel("new token (the prefill, step 0, left out)")
        ax.set_ylabel("ms per decode step")
        ax.legend()
        ax.set_title(f"{config.model_name}, {info.device}, {time.strftime('%Y-%m-%d')}")
        fig.tight_layout()
        fig.savefig(config.plot, dpi=120)
    if config.json_path:
        lesson.write_json({"date": time.strftime("%Y-%m-%d"), "model": config.model_name, "device": info.device,
                           "dtype": info.dtype, "quant": info.quant, "prompt_tokens": int(ids.shape[1]),
                           "versions": lesson.versions(), "tokens_equal": agree, "tokens": len(on), "rows": rows,
                           "step_s": {name: s for name, (_, s) in runs.items()}}, config.json_path)
    return 0


def main(argv=None) -> int:
    return lesson.main(argv, prog="extensions/kv_cache.py", config_class=KvCacheConfig, job=compare)


if __name__ == "__main__":
    sys.exit(main())
