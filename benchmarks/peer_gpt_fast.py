"""Usage (via benchmarks/gpu_peer.sh): python3 benchmarks/peer_gpt_fast.py --batch-size 1 --json $OUT/peer-b1.json

Device harness (issues 11 and 13): the peer, gpt-fast, timed on the card where this script's rows run.

gpt-fast (pytorch-labs/gpt-fast, BSD-3-Clause) is not part of this project and is not copied into it: a device run
carries its files in an ignored folder (default .peer/gpt-fast, filled by benchmarks/gpu_peer.sh's header command)
and this harness runs its own generate.main(), its recipe unchanged: torch.compile(mode="reduce-overhead") of its
decode step, coordinate-descent tuning, its own tensor parallel under torchrun. Only what cannot be had offline is
replaced: the checkpoint (random bf16 weights of the Llama-2-7B shape, built as its _load_model() builds a model:
meta device, then its apply_tp() under torchrun) and the tokenizer (main() takes a synthetic prompt of N random ids).
--quant int4 is its weight-only int4 (group 128, inner_k_tiles 8: its WeightOnlyInt4QuantHandler's defaults), made
from the random bf16 weights with its own group_quantize_tensor() and WeightOnlyInt4Linear, every nn.Linear as its
handler replaces them (the output layer too); one step differs from its quantize.py: the codes are packed two a byte
before torch.ops.aten._convert_weight_to_int4pack, the input that op takes since torch 2.5 (its code passes int32).

Its own figure, "tokens/sec", divides a row's new tokens by the whole generate() (prefill included). The figure
compared here is this script's: decode tokens per second, batch x (new tokens - 1) over the time of its
decode_n_tokens() (the timer synchronizes the GPU at both ends), the median over its timed samples.

  python3 benchmarks/peer_gpt_fast.py --batch-size 1 --json $OUT/peer-b1.json
  torchrun --standalone --nproc_per_node=2 benchmarks/peer_gpt_fast.py --json $OUT/peer-tp2.json
"""
import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path


def stub_tokenizer_modules():
    """gpt-fast's tokenizer.py imports sentencepiece and tiktoken at the top; the GPU image may lack them and the
    synthetic prompt needs neither."""
    for name in ("sentencepiece", "tiktoken", "tiktoken.load"):
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.load_tiktoken_bpe = None
            sys.modules[name] = module


def kernels_per_token(trace: str, new_tokens: int, top: int = 25) -> dict:
    """The profiled sample's GPU kernels from its chrome trace: each name's total time and launches over the sample's
    new tokens (its prefill is one of them: a step's figure is within 1/new_tokens of the sum's share)."""
    import collections
    events = json.load(open(trace))["traceEvents"]
    us, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "kernel":
            us[e["name"]] += e.get("dur", 0.0)
            count[e["name"]] += 1
    return {"trace": trace, "new_tokens": new_tokens, "kernels_us_per_token": sum(us.values()) / new_tokens,
            "launches_per_token": sum(count.values()) / new_tokens,
            "top": [{"kernel": k[:160], "us_per_token": v / new_tokens, "launches_per_token": count[k] / new_tokens}
                    for k, v in us.most_common(top)]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gpt-fast", default=".peer/gpt-fast")
    p.add_argument("--model", default="Llama-2-7b-chat-hf", help="a name from gpt-fast's transformer_configs")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--quant", choices=["bf16", "int4"], default="bf16", help="int4: its weight-only int4, group 128")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--samples", type=int, default=3, help="timed samples, after its one compiling sample")
    p.add_argument("--top-k", type=int, default=1, help="1: greedy, as this script's rows")
    p.add_argument("--json", required=True)
    p.add_argument("--profile", type=Path, help="also profile its last sample with its own --profile (torch profiler, "
                   "the CUDA graph's kernels included): the trace goes to PROFILE.json, each kernel's time a new token "
                   "into the report (that sample is then left out of the timed ones)")
    args = p.parse_args()

    import torch
    stub_tokenizer_modules()
    sys.path.insert(0, os.path.abspath(args.gpt_fast))
    import generate as G  # gpt-fast's generate.py
    from model import Transformer

    def load_random(checkpoint_path, device, precision, use_tp):          # its _load_model(), random weights
        torch.manual_seed(0)                                               # every rank the same full model
        with torch.device("meta"):
            model = Transformer.from_name(checkpoint_path.parent.name)
        model = model.to(dtype=precision).to_empty(device=device)     # (its checkpoint would come in bf16)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.02) if param.dim() > 1 else param.fill_(1.0)
        if args.quant == "int4":
            int4_weight_only(model)
        if use_tp:
            from tp import apply_tp
            apply_tp(model)
        return model.to(device=device, dtype=precision).eval()

    def int4_weight_only(model, groupsize=128, inner_k_tiles=8):   # its WeightOnlyInt4QuantHandler, done in place
        import quantize as Q
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                codes, scales_and_zeros = Q.group_quantize_tensor(child.weight.data.to(torch.bfloat16), 4, groupsize)
                packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
                with torch.device("meta"):
                    layer = Q.WeightOnlyInt4Linear(child.in_features, child.out_features, bias=False,
                                                   groupsize=groupsize, inner_k_tiles=inner_k_tiles, padding=False)
                layer.weight = torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles)
                layer.scales_and_zeros = scales_and_zeros
                setattr(parent, name, layer)

    class SyntheticTokenizer:
        def bos_id(self):
            return 1

        def decode(self, ids):
            return ""

    decode_s = []
    original = G.decode_n_tokens

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed_decode(*a, **kw):
        sync()
        t0 = time.perf_counter()
        out = original(*a, **kw)
        sync()
        decode_s.append(time.perf_counter() - t0)
        return out

    G._load_model, G.get_tokenizer, G.decode_n_tokens = load_random, lambda *a: SyntheticTokenizer(), timed_decode
    folder = Path("/tmp/peer-checkpoint") / args.model          # main() asserts both files exist; neither is read
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.pth", "tokenizer.model"):
        (folder / name).touch()
    G.main(prompt=args.prompt_tokens, num_samples=args.samples, max_new_tokens=args.max_new_tokens,
           batch_size=args.batch_size, top_k=args.top_k, temperature=1.0, checkpoint_path=folder / "model.pth",
           profile=args.profile)

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    timed = decode_s[1:-1] if args.profile else decode_s[1:]        # the first sample compiles; the last, profiled
    rates = [args.batch_size * (args.max_new_tokens - 1) / s for s in timed]
    if rank == 0:
        stamp = os.path.join(args.gpt_fast, "COMMIT")           # written when the folder was filled
        commit = open(stamp).read().strip() if os.path.exists(stamp) else None
        report = {"peer": "gpt-fast", "peer_commit": commit, "model": args.model, "dtype": "bf16",
                  "quant": args.quant if args.quant != "bf16" else None,
                  "tp": world, "batch_size": args.batch_size, "prompt_tokens": args.prompt_tokens,
                  "max_new_tokens": args.max_new_tokens, "top_k": args.top_k,
                  "decode_s": timed, "decode_tokens_per_s": rates,
                  "decode_tokens_per_s_median": statistics.median(rates),
                  "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                  "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "versions": {"torch": torch.__version__, "cuda": torch.version.cuda}}
        if args.profile:
            report["profile"] = kernels_per_token(f"{args.profile}.json", args.max_new_tokens)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"peer decode tok/s (median of {len(rates)}): {report['decode_tokens_per_s_median']:.1f}")
    if world > 1:                 # its CUDA graphs captured NCCL calls: leave without NCCL's teardown (it waits on them)
        torch.distributed.barrier()
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
