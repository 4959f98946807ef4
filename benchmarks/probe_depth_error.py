"""Usage (a CPU, ~2 min): python benchmarks/probe_depth_error.py [--json depth.json]

How much more does a deep random model amplify a rounding difference than a shallow one? (issue 25: the 70B nf4 step
compiled by inductor differed from the same engine's eager decode by 8.8e-2 in its logits, where a 7B fp16 step
differs by 5.75e-3; benchmarks/README.md.) A Llama of width 512 whose every matrix is drawn with the std that gives
it the gain of the random presets' (std 0.02 at width 4096 for random:llama-2-7b, 8192 for random:llama-2-70b, their
MLP widths and key/value heads in proportion), run once in fp32 and once in bf16 (eager, on the CPU): the relative
error of the last position's logits at several depths. It measures how the model amplifies noise, not any kernel.
"""
import argparse
import json
import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def error_at(depth: int, width_ref: int, mlp_ratio: float, kv_groups: int, width: int = 512, std_ref: float = 0.02):
    std = std_ref * math.sqrt(width_ref / width)          # the same gain a matrix as at the preset's width
    config = LlamaConfig(hidden_size=width, intermediate_size=int(width * mlp_ratio), num_hidden_layers=depth,
                         num_attention_heads=8, num_key_value_heads=8 // kv_groups, vocab_size=32000,
                         max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
        ids = torch.randint(0, 32000, (1, 32))
        exact = model(ids).logits[0, -1].double()
        rounded = model.to(torch.bfloat16)(ids).logits[0, -1].double()
    return float((rounded - exact).norm() / exact.norm())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name, width_ref, mlp_ratio, kv_groups, depths in [("7B-like", 4096, 11008 / 4096, 1, (8, 32)),
                                                           ("70B-like", 8192, 28672 / 8192, 8, (8, 32, 80))]:
        for depth in depths:
            rows.append(dict(model=name, depth=depth, bf16_vs_fp32_rel_error=error_at(depth, width_ref, mlp_ratio,
                                                                                      kv_groups)))
            error = rows[-1]["bf16_vs_fp32_rel_error"]
            print(f"{name} {depth} layers: bf16 against fp32, last logits rel. error {error:.3e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
