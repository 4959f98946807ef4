#!/usr/bin/env python3
"""extensions/fastgen.py — 第十节 与其他推理后端对比: DeepSpeed-FastGen, the engine DeepSpeed ships for serving
today (deepspeed.inference.v2, under DeepSpeed-MII), on the lesson's model and prompts, verified like any engine.

  pip install deepspeed-kernels                                        # FastGen's CUDA kernels (one GPU, sm >= 8.0)
  python extensions/fastgen.py --model random:llama-2-7b --backend hf  # the first run builds its kernels (minutes)

FastGen does not wrap a transformers model as init_inference() does: build_hf_engine() reads a checkpoint folder into
its own implementation of the architecture (q/k/v as one matmul, a KV cache in blocks, ragged batches: sequences of
different lengths in one forward, no padding). So this decoder saves the model the lesson loaded and builds FastGen
from that folder: both hold the same weights, and the lesson's verification compares FastGen with that model.

How FastGen is fed (what its put() takes): token ids on the host, one tensor a sequence, without padding; each put()
is one forward and returns each sequence's last logits. A sequence is a uid: its KV blocks stay until flush(uid).
So prefill puts the prompts, and each decode step puts one token a sequence. Its KV cache is allocated once, sized
for this run (kv_sizes()), where FastGen's default takes all free GPU memory. Greedy only.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import math
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402
from extensions.fast_decode import eos_tensor, generate_output, greedy_loop  # noqa: E402

KV_BLOCK_TOKENS = 64     # FastGen's smallest KV block (get_kv_block_size: 64 tokens, 128 for heads of <= 64)

def deepspeed_arch_list(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's kernel builder can read it: "9.0a" (torch's name for sm_90a, set by some
    CUDA images) becomes "9.0". The builder (0.19.8) reads each entry's minor as an int and fails on "0a", and FastGen's
    support check then reports that as "Config ... is not supported". Built for "9.0", its kernels run verified on H100."""
    return re.sub(r"(\d+\.\d+)[af]\b", r"\1", arch_list)

def kv_sizes(config) -> tuple[int, int]:
    """(sequences, positions) FastGen's KV cache must hold in this run: the batch (verification decodes up to 4
    prompts at once), and the longest prompt plus the tokens decoded after it."""
    tokenizer = lesson.load_tokenizer(config)
    prompts = lesson.as_chat(tokenizer, lesson.load_prompts(config))
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    return max(config.batch_size, min(len(prompts), 4)), longest + max(config.max_new_tokens, lesson.VERIFY_TOKENS)

class FastGenGreedy(lesson.Decoder):
    """FastGen behind transformers' interface: __call__ gives every position's logits (what verification compares),
    generate() decodes greedily. The transformers model leaves the GPU once FastGen holds its own copy; it stays on
    the host for the report (weight bytes) and for the lesson's timer of the first token."""

    mode, warmup_runs = "fastgen", 1

    def __init__(self, engine, config):
        import torch
        from deepspeed.inference.v2 import RaggedInferenceEngineConfig, build_hf_engine
        from deepspeed.ops.op_builder import InferenceCoreBuilder
        # FastGen's modules load their core kernels (built on first use) inside a support check that reports any
        # failure as "Config ... is not supported"; loaded here first, a failed build says what failed.
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if deepspeed_arch_list(arch_list) != arch_list:
            print(f"  fastgen: TORCH_CUDA_ARCH_LIST={arch_list!r} -> {deepspeed_arch_list(arch_list)!r} for "
                  "DeepSpeed's kernel build, which cannot read an 'a'/'f' suffix", file=sys.stderr)
            os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(arch_list)
        InferenceCoreBuilder().load()
        super().__init__(engine, config)
        sequences, positions = kv_sizes(config)
        blocks = sequences * math.ceil(positions / KV_BLOCK_TOKENS)
        ragged = RaggedInferenceEngineConfig(state_manager={
            "max_tracked_sequences": sequences, "max_ragged_sequence_count": sequences, "max_context": positions,
            "max_ragged_batch_size": sequences * positions,             # a prefill of every sequence in one put()
            "memory_config": {"mode": "allocate", "size": blocks}})
        if not torch.distributed.is_initialized():
            # FastGen makes its tensor-parallel group through deepspeed.comm, which without a launcher's environment
            # looks for MPI; one rank needs neither: a process group of one, over an in-memory store.
            torch.distributed.init_process_group("nccl", store=torch.distributed.HashStore(), rank=0, world_size=1)
        with tempfile.TemporaryDirectory(prefix="ds_bnb_infer-fastgen-") as tmp:
            self.module.save_pretrained(tmp)                     # safetensors, with config.json (its dtype too)
            self.engine = build_hf_engine(tmp, ragged)
        self.module.to("cpu")
        lesson.free_memory()
        self.uids = itertools.count()

    @classmethod
    def validate(cls, config) -> None:
        """Refuse what FastGen cannot do here, before anything is loaded."""
        import torch
        for refused, message in [
            (config.tp_size > 1, "fastgen.py runs FastGen on one GPU; drop --tp-size."),
            (config.quant != "none", "FastGen loads fp16/bf16 checkpoints, not bitsandbytes weights; drop --quant."),
            (config.dtype == "fp32", "FastGen runs in fp16 or bf16; use --dtype fp16 or bf16."),
            (config.do_sample, "fastgen.py decodes greedily; drop --do-sample."),
            (config.device == "cpu" or not torch.cuda.is_available(),
             "DeepSpeed-FastGen runs on CUDA GPUs only (compute capability 8.0 or newer); run fastgen.py on a GPU."),
            (importlib.util.find_spec("dskernels") is None,     # the deepspeed-kernels package
             "DeepSpeed-FastGen needs its CUDA kernels: pip install deepspeed-kernels."),
        ]:
            if refused:
                raise lesson.UsageError(message)

    def parameters(self):
        """FastGen's weights: one flat buffer on its GPU (the lesson puts the inputs where the parameters are)."""
        yield self.engine._model.flattened_params

    def forward_rows(self, rows: list):
        """One put() of new sequences, flushed after: each row's last logits, copied (put() returns a view of its
        logits buffer, which the next put() overwrites)."""
        import torch
        uids = [next(self.uids) for _ in rows]
        try:
            return self.engine.put(uids, rows, do_checks=False).to(torch.float32, copy=True)
        finally:
            for uid in uids:
                self.engine.flush(uid)

    def __call__(self, input_ids, attention_mask):
        """Every position's logits, as a model's forward gives them: FastGen returns only a sequence's last logits,
        so position j is the last of a prefill of the row's first j + 1 tokens (padding positions stay 0)."""
        import torch
        logits = None
        for b, (ids, mask) in enumerate(zip(input_ids.cpu(), attention_mask.cpu().bool())):
            real = ids[mask]
            out = torch.cat([self.forward_rows([real[:j + 1]]) for j in range(len(real))])
            if logits is None:
                logits = torch.zeros(*input_ids.shape, out.shape[-1], device=out.device)
            logits[b, mask.nonzero().squeeze(-1).to(out.device)] = out
        return argparse.Namespace(logits=logits)

    def first_logits(self, logits) -> None:
        """The lesson times the first token (TTFT) with a forward hook on the model (first_token_timer); FastGen never
        calls that model, so its forward hooks are called here, once FastGen's first logits exist."""
        for hook in list(self.module._forward_hooks.values()):
            hook(self.module, (), logits)

    def generate(self, input_ids, attention_mask, max_new_tokens: int, pad_token_id: int = 0, do_sample=False,
                 min_new_tokens: int = 0, output_logits=False, return_dict_in_generate=False):
        """Greedy decoding as transformers' generate() does it (EOS, padding after it, min_new_tokens), one put() a
        step; each step's tokens go to the host, where put() takes them."""
        import torch
        assert not do_sample, "greedy only: FastGenGreedy.validate() refuses --do-sample"
        dev = input_ids.device
        rows = [ids[mask.bool()].cpu() for ids, mask in zip(input_ids, attention_mask)]   # no padding: ragged
        uids = [next(self.uids) for _ in rows]

        def put(rows):       # one forward; a copy of its logits, as the next put() overwrites its buffer
            return self.engine.put(uids, rows, do_checks=False).to(torch.float32, copy=True).to(dev)
        try:
            logits = put(rows)                                    # prefill: every prompt in one forward
            self.first_logits(logits)
            tokens, step_logits = greedy_loop(logits, lambda token: put(list(token.cpu()[:, None])), max_new_tokens,
                                              eos_tensor(self.module, dev), pad_token_id, min_new_tokens,
                                              output_logits, lambda i, done: bool(done.all()))
        finally:
            for uid in uids:
                self.engine.flush(uid)
        return generate_output(input_ids, tokens, step_logits, return_dict_in_generate)

    def close(self) -> None:
        """Free FastGen's weights and KV cache; end the process group of one made for it."""
        import torch
        del self.engine
        lesson.free_memory()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1:
            torch.distributed.destroy_process_group()

def main(argv=None) -> int:
    return lesson.main(argv, prog="extensions/fastgen.py", job=functools.partial(lesson.run, decoder=FastGenGreedy))

if __name__ == "__main__":
    sys.exit(main())
