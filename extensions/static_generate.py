#!/usr/bin/env python3
"""extensions/static_generate.py — 第十节 与其他后端对比: transformers' own fast path, generate() on a static KV cache.

  python extensions/static_generate.py --model random:tiny --backend hf             # CPU: the static cache, eager
  python extensions/static_generate.py --model random:llama-2-7b --backend hf       # one GPU: transformers compiles

`generate(..., cache_implementation="static")` allocates the KV cache at its full length, so every decode step has the
same shapes; on a GPU transformers then compiles the decode step itself (torch.compile, CUDA graphs) on its first
calls. It is the library's answer to what extensions/fast_decode.py writes out by hand, so the two belong side by
side (extensions/compare.py: modes hf-static and hf-compile). The lesson loads, wraps and verifies it like any
engine; everything else is the lesson's.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402


class StaticGenerate:
    """The engine, with generate() on a static KV cache. Greedy and sampled decoding alike (generate() does both)."""

    warmup_runs = 2          # the lesson's measure() warms up at least this often: transformers compiles on them

    def __init__(self, engine):
        self.engine = engine
        self.module = getattr(engine, "module", engine)       # a DeepSpeed engine wraps the model in .module
        self.mode = "static-generate"

    @staticmethod
    def validate(config) -> None:
        """Refuse what transformers' static cache cannot do here, before anything is loaded."""
        if config.tp_size > 1:
            raise lesson.UsageError("static_generate.py runs on one device: transformers' compiled static-cache "
                                    "step does not know DeepSpeed's tensor-parallel shards; drop --tp-size.")

    def __call__(self, **inputs):
        return self.engine(**inputs)

    def parameters(self):
        return self.module.parameters()

    def generate(self, **kwargs):
        return self.module.generate(**kwargs, cache_implementation="static")


def main(argv=None) -> int:
    return lesson.main(argv, decoder=StaticGenerate, prog="extensions/static_generate.py")


if __name__ == "__main__":
    sys.exit(main())
