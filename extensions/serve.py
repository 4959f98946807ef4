#!/usr/bin/env python3
"""extensions/serve.py — 第十节 服务化: the deployed engine behind an OpenAI-compatible HTTP API, with a request queue
and continuous (iteration-level) batching.

  python extensions/serve.py --model random:tiny --port 8000                       # CPU, the tiny preset
  python extensions/serve.py --model random:llama-2-7b --backend hf --max-model-len 1024     # one GPU
  deepspeed --num_gpus=2 extensions/serve.py --model random:llama-2-7b --tp-size 2           # rank 0 serves HTTP
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "DeepSpeed is", "max_tokens": 32, "temperature": 0}'
A prompt may also be token ids, or several prompts at once; echo and logprobs are OpenAI's (lm-evaluation-harness's
local-completions model scores the served model with them).

The engine is the lesson's: init_engine() loads, wraps and verifies it, with this file's decode loop (SlotBatch)
passed in as the decoder, so the loop that serves is the loop that was verified. How it batches:
  - One static KV cache of --max-num-seqs rows × --max-model-len positions. Every row writes its next token at the
    same cache position (one write pointer), so a decode step has one shape and runs as one CUDA graph on a GPU
    (extensions/fast_decode.py's decode_step). A row's own tokens sit just before the pointer; the attention mask
    hides everything else in its row, and its positions count its own tokens only.
  - A request joins at the next step: its prompt runs as its own prefill (with any others admitted at that step;
    --admit-wait-ms lets requests that arrive together share one; compiled where the step is, --prefill) and its
    keys and values are copied in, ending at the pointer. A finished row is free at the next step.
  - When the pointer reaches the end, the cache moves left by the oldest live row's start (rare: the cost is one
    copy of the cache); a prompt longer than the room before the pointer moves it right.
The cost: attention reads all --max-model-len positions of every row each step (masked ones too), so pick
--max-model-len to fit your longest request. Measured figures, with card and date: benchmarks/README.md.
"""
import argparse
import asyncio
import dataclasses
import functools
import importlib.util
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Annotated, Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402
from extensions.quantized_matmul import QuantizedMatmulConfig, check_matmuls, swap_matmuls  # noqa: E402
from extensions.fast_decode import (check_attention, decode_step, eos_tensor, forward_last,  # noqa: E402
                                    fuse_projections, generate_output, greedy_loop, one_counter_cache, release_step,
                                    use_attention)

@dataclasses.dataclass
class ServeConfig(QuantizedMatmulConfig):
    """extensions/serve.py: the server"""
    host: Annotated[str, "address to listen on"] = "127.0.0.1"
    port: Annotated[int, "port to listen on"] = 8000
    max_num_seqs: Annotated[int, "rows decoded together: requests in flight at once"] = 16
    max_model_len: Annotated[int | None, "positions per row: prompt + max_tokens (default: the model's, at most "
                             "2048)"] = None
    max_queue: Annotated[int, "requests waiting for a row; beyond it the answer is 429"] = 64
    max_body_bytes: Annotated[int, "the largest request body taken; a larger one is answered 413"] = 4 * 2 ** 20
    read_timeout: Annotated[float, "seconds a client has to send a whole request (headers and body) from its "
                            "first byte; a connection that stops sending is closed after it"] = 30.0
    # Requests sent together reach the worker spread out: each is parsed and tokenized in turn. Admitted as they
    # come, they take several prefills, each stalling every row already decoding, and the rows they fill then end at
    # different steps, so the clients' next requests arrive split the same way (on an H100 each wave of 16 requests
    # went in as two prefills of 8: benchmarks/README.md). A wait gathers an idle server's first wave into one
    # prefill (the wait ends at once when the free rows are full; a lone request on an idle server pays it in TTFT),
    # but once the rows are split in two groups each group's next wave fills its own free rows: on an H100 a 10 ms
    # wait still admitted every wave as two prefills, and served a smaller share of the offline loop than the server
    # without it had on another H100 (benchmarks/README.md). So it is off by default, a flag to try.
    admit_wait_ms: Annotated[float, "milliseconds a request may wait for others to share its prefill: an idle "
                             "worker admits the first arrival with those that come within this time (at once when "
                             "they fill the free rows); while rows decode (never paused for this), waiting requests "
                             "join when the oldest has waited this long or they fill the free rows; 0: admit what "
                             "is queued at each step (like vLLM's --scheduler-delay-factor, but a time)"] = 0.0
    # A prefill stalls every row already decoding. Eager, it is Python launching ~30 small kernels a layer; compiled,
    # the host launches inductor's fused kernels, and the stall is shorter (benchmarks/README.md: the server's share
    # of the offline loop either way). One graph serves every count of rows and every prompt length (dynamic shapes),
    # compiled at start.
    prefill: Annotated[Literal["auto", "compiled", "eager"], "how a prompt's forward runs: compiled (torch.compile, "
                       "one graph for every shape, compiled at start) or eager; auto: compiled where the decode step "
                       "is compiled on one rank (a plain or 4-bit weight-only model on a GPU), else eager"] = "auto"
    # The offline measurement's settings (a server takes sampling settings per request, rows with --max-num-seqs),
    # and the loop choice (a server runs this file's loop):
    not_flags = ("batch_size", "warmup", "iters", "do_sample", "temperature", "top_p", "json_path", "prompts_file",
                 "text_chars", "loop")

# ----------------------------------------------------------------------------------------------------------------
# The model side: rows of one static KV cache, a request per row, stepped together (the same on every rank).

def padded(prompts: list[list[int]], width: int) -> tuple:
    """Prompts left-padded to `width` positions: the token ids and the mask (0 on the padding), as lists."""
    return ([[0] * (width - len(p)) + p for p in prompts], [[0] * (width - len(p)) + [1] * len(p) for p in prompts])

def prefill_forward(model, ids, mask, keep: int = 1):
    """A prompt forward (left-padded rows, each row's positions counting its own tokens): the logits of the last
    `keep` positions (0: all) and each layer's new keys and values."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                logits_to_keep=keep)
    return out.logits, [(layer.keys, layer.values) for layer in out.past_key_values.layers]

class SlotBatch(lesson.Decoder):
    """--max-num-seqs rows over one static KV cache with one write pointer (`slot`); see the module docstring.
    admit() prefills new rows, step() decodes one token in every row. Under tensor parallel every rank makes the
    same calls in the same order (rank 0 decides, the others follow: Worker.follow). The cache has one position
    more than --max-model-len: the worker runs one spare step after a row's answer ended."""

    @classmethod
    def prepare_model(cls, model, config: ServeConfig):
        return swap_matmuls(model, config)      # --quant 4bit: extensions/kernel_4bit.py's matmul (--matmul)

    def __init__(self, engine, config: ServeConfig):
        import torch
        super().__init__(engine, config)
        if config.fuse:
            fuse_projections(self.module)                             # as fast_decode.py's loop (verified the same)
        use_attention(self.module, config.attention, config.max_num_seqs, config.tp_size)
        check_matmuls(self.module)                                    # 4-bit kernels against their weights
        self.device = next(self.module.parameters()).device
        self.rows, self.max_len = config.max_num_seqs, config.max_model_len + 1
        rows, max_len = self.rows, self.max_len
        self.cache = one_counter_cache()(self.module.config, max_cache_len=max_len)    # fast_decode.py's cache
        if any(type(layer).__name__ != "OneCounterLayer" for layer in self.cache.layers):
            raise lesson.UsageError("serve.py batches models whose every layer attends to all positions (Llama "
                                    "and the like); this model has sliding-window layers.")
        self.mask = torch.zeros(rows, max_len, dtype=torch.long, device=self.device)
        self.start = torch.zeros(rows, dtype=torch.long, device=self.device)   # where each row's tokens begin
        self.slot, self.slot_t = 0, torch.zeros(1, dtype=torch.long, device=self.device)
        # The first step allocates the cache (its sizes come from the model, sharded under tensor parallel); then the
        # step is compiled / captured / eager as fast_decode.py chooses, and run once more so that happens now.
        with torch.no_grad():
            forward_last(self.module, *self.step_inputs(torch.zeros(rows, dtype=torch.long, device=self.device)))
        self.slot = 0
        self.seek()
        self.step_fn, self.mode, _ = decode_step(self.module, self.device, self.config)
        self.step(torch.zeros(rows, dtype=torch.long, device=self.device))
        self.step(torch.zeros(rows, dtype=torch.long, device=self.device))
        self.prefill_mode = config.prefill if config.prefill != "auto" else \
            "compiled" if self.mode == "compiled" and config.tp_size == 1 else "eager"
        if self.prefill_mode == "compiled":
            self.prefill_fn = torch.compile(functools.partial(prefill_forward, self.module), dynamic=True,
                                            fullgraph=True)
            # Compiled now: 2 rows of 3 positions stand for any shape; and 2 rows of 17, as a 4-bit layer takes 2-16
            # rows of x through one kernel and more through another (quantized_matmul.py), a branch on the rows'
            # count that the graph keeps as a condition on its shape: each side compiled once, before any request.
            with torch.no_grad():
                for prompts in ([[1, 2, 3], [4, 5]], [list(range(1, 18)), [4, 5]]):
                    self.prefill_fn(*self.host_to_device(*padded(prompts, len(prompts[0]))))
        self.mask.zero_()
        self.slot = 0
        self.seek()

    def seek(self) -> None:
        """Point the layers' one write position (their shared cumulative_length) at `slot`; a step advances it by 1."""
        self.cache.layers[0].cumulative_length.fill_(self.slot)
        self.slot_t.fill_(self.slot)

    def move(self, shift: int) -> None:
        """Move every row's keys, values and mask by `shift` positions (negative: left), in place: a captured step
        holds the cache's addresses. What wraps around is outside every live row, so masked."""
        for layer in self.cache.layers:
            for t in (layer.keys, layer.values):
                t.copy_(t.roll(shift, dims=2))
        self.mask.copy_(self.mask.roll(shift, dims=1))
        self.start += shift
        self.slot += shift
        self.seek()

    def admit(self, rows: list[int], prompts: list[list[int]], all_logits: bool = False):
        """Prefill `prompts` into `rows` (left-padded together, in their own KV cache), copy their keys and values in
        to end at the pointer, and return the logits of each one's first new token (all_logits: of every position,
        rows x longest prompt x vocab, for the prompts' own logprobs)."""
        import torch
        longest = max(map(len, prompts))
        if self.slot < longest:                        # not enough room before the pointer: move everything right
            self.move(longest - self.slot)
        n, at = len(prompts), self.slot - longest
        if all_logits or self.prefill_mode == "eager":     # echo (rare) wants every position's logits: eager
            forward = functools.partial(prefill_forward, self.module, keep=0 if all_logits else 1)
            batch, width = prompts, longest
        else:    # compiled for 2 rows or more of 2 positions or more (torch.compile specializes sizes 0 and 1): one
            forward = self.prefill_fn      # prompt goes in twice, a one-token prompt with a masked position before it
            batch, width = prompts * (1 + (n == 1)), max(longest, 2)
        with torch.no_grad():
            logits, kv = forward(*self.host_to_device(*padded(batch, width)))
        starts = [self.slot - len(p) for p in prompts]
        index, mask, start = self.host_to_device(rows, padded(prompts, longest)[1], starts)
        for layer, (keys, values) in zip(self.cache.layers, kv):
            layer.keys[index, :, at:self.slot] = keys[:n, :, -longest:]
            layer.values[index, :, at:self.slot] = values[:n, :, -longest:]
        self.mask[index] = 0
        self.mask[index, at:self.slot] = mask          # padding stays masked
        self.start[index] = start
        return logits[:n] if all_logits else logits[:n, -1]

    def host_to_device(self, *lists) -> list:
        """Host lists as device tensors without waiting: from pinned memory, asynchronously (a copy from ordinary
        memory waits for the GPU to finish everything queued before it, here the step in flight)."""
        import torch
        if self.device.type != "cuda":
            return [torch.tensor(x) for x in lists]
        return [torch.tensor(x).pin_memory().to(self.device, non_blocking=True) for x in lists]

    def step_inputs(self, tokens):
        """The decode step's inputs: one token a row, its position (its own tokens so far), the pointer, the mask."""
        self.mask[:, self.slot] = 1                    # each row sees its own new token (an idle row: only that)
        return tokens[:, None], (self.slot_t - self.start)[:, None], self.slot_t, self.mask, self.cache

    def step(self, tokens, live: list[int] = ()):
        """One decode step of every row; returns the next logits (rows × vocab). `live`: rows still decoding,
        whose starts bound how far the cache can move left when the pointer is at the end."""
        import torch
        if self.slot == self.max_len:                  # Worker checks prompt + max_tokens <= max_len, so room exists
            self.move(-min((int(self.start[r]) for r in live), default=self.slot))
        inputs = self.step_inputs(tokens)
        if self.mode == "compiled":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            logits = self.step_fn(*inputs)
        self.slot += 1
        self.slot_t += 1
        return logits

    def close(self) -> None:
        """Free the captured step before the ranks leave (fast_decode.py's release_step says why)."""
        release_step(self.step_fn, self.mode)

    def generate(self, input_ids, attention_mask, max_new_tokens: int, pad_token_id: int = 0, do_sample=False,
                 min_new_tokens: int = 0, output_logits=False, return_dict_in_generate=False):
        """generate()'s greedy contract on this batch's machinery (rows admitted together, stepped), so that the
        lesson verifies exactly what serves. One batch at a time, at most --max-num-seqs rows."""
        import torch
        assert not do_sample, "greedy only: the lesson verifies with greedy decoding"
        if input_ids.shape[1] + max_new_tokens > self.max_len:
            raise lesson.UsageError(f"the prompt to verify ({input_ids.shape[1]} tokens) + {max_new_tokens} tokens "
                                    f"do not fit the {self.max_len - 1} positions of --max-model-len; give a shorter "
                                    "--prompt or a larger --max-model-len.")
        if len(input_ids) > self.rows:             # more prompts than rows: one batch of rows after another
            parts = [self.generate(input_ids[i:i + self.rows], attention_mask[i:i + self.rows], max_new_tokens,
                                   pad_token_id, False, min_new_tokens, output_logits, True)
                     for i in range(0, len(input_ids), self.rows)]
            width = max(p.sequences.shape[1] for p in parts)
            sequences = torch.cat([torch.nn.functional.pad(p.sequences, (0, width - p.sequences.shape[1]),
                                                           value=pad_token_id) for p in parts])
            steps = max(len(p.logits) for p in parts)
            logits = [torch.cat([p.logits[i] if i < len(p.logits) else torch.zeros_like(p.logits[0])
                                 for p in parts]) for i in range(steps)] if output_logits else []
            return argparse.Namespace(sequences=sequences, logits=logits) if return_dict_in_generate else sequences
        prompts = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        rows = list(range(len(prompts)))
        def next_logits(token):                    # every row steps; the rows of this batch are the first ones
            full = torch.full((self.rows,), pad_token_id, dtype=torch.long, device=self.device)
            full[:len(rows)] = token
            return self.step(full, rows)[:len(rows)].clone()
        tokens, step_logits = greedy_loop(self.admit(rows, prompts), next_logits, max_new_tokens,
                                          eos_tensor(self.module, self.device), pad_token_id, min_new_tokens,
                                          output_logits, lambda i, done: bool(done.all()))
        return generate_output(input_ids, tokens, step_logits, return_dict_in_generate)


# ----------------------------------------------------------------------------------------------------------------
# The scheduler: requests in a bounded queue; one thread owns the model and decodes every live request each step.

@dataclasses.dataclass
class Request:
    prompt_ids: list
    max_tokens: int                  # 0: no new token (echo: the prompt and its logprobs only)
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list = dataclasses.field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None      # each new token's logprob and this many most likely tokens'; None: none
    prompt_logprobs: bool = False    # the prompt's tokens' too (echo), from the prefill's logits
    emit: object = None              # called from the worker thread with each event (a dict)
    cancelled: bool = False          # the client went away: the row is freed at the next step
    # Filled by the worker:
    ids: list = dataclasses.field(default_factory=list)
    text: str = ""                   # the answer so far, and how much of it was sent
    sent: int = 0
    prefix_at: int = 0               # incremental detokenization: ids[prefix_at:read_at] were already text
    read_at: int = 0
    lp: list = dataclasses.field(default_factory=list)    # (token, logprob, [(token, logprob), ...]) a position
    prompt_lp: list = dataclasses.field(default_factory=list)
    finished: bool = False
    arrived: float = dataclasses.field(default_factory=time.perf_counter)     # tokenized, into the queue
    admitted_at: float | None = None     # taken from the queue into a prefill
    first_token_at: float | None = None


SAMPLING_EPS = 1e-5     # temperatures below this sample greedily, as vLLM does: logits / 1e-300 is inf


class Metrics:
    """Prometheus text for GET /metrics: gauges, counters and histograms: TTFT (from the request in the queue to its
    first token on the host) and its two parts, the time in the queue and the time from admission (the prefill, with
    the rows admitted with it) to the first token; of that, once a prefill, the device's span for it (on a GPU the
    stream's time between CUDA events around it: from when the GPU reaches it, after the step before it, to its
    first tokens, gaps while the host launches its kernels included); the time per output token.
    prefill_rows_total / prefills_total is how many requests a prefill took on average (requests that arrive
    together but are admitted apart each pay a prefill, and hold up the rows already decoding)."""
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self.counts = {"requests_finished_total": 0, "requests_rejected_total": 0, "requests_failed_total": 0,
                       "generation_tokens_total": 0, "prompt_tokens_total": 0, "prefills_total": 0,
                       "prefill_rows_total": 0}
        self.hist = {name: [0] * (len(self.BUCKETS) + 1) + [0.0]
                     for name in ("ttft_seconds", "queue_seconds", "prefill_seconds", "prefill_device_seconds",
                                  "tpot_seconds")}

    def observe(self, name: str, seconds: float) -> None:
        h = self.hist[name]
        h[next((i for i, b in enumerate(self.BUCKETS) if seconds <= b), len(self.BUCKETS))] += 1
        h[-1] += seconds

    def render(self, running: int, waiting: int) -> str:
        lines = []
        for name, kind, value in [("requests_running", "gauge", running), ("requests_waiting", "gauge", waiting),
                                  *[(n, "counter", v) for n, v in self.counts.items()]]:
            lines += [f"# TYPE ds_bnb_{name} {kind}", f"ds_bnb_{name} {value}"]
        for name, h in self.hist.items():
            lines.append(f"# TYPE ds_bnb_{name} histogram")
            total = 0
            for b, n in zip([*map(str, self.BUCKETS), "+Inf"], h[:-1]):
                total += n
                lines.append(f'ds_bnb_{name}_bucket{{le="{b}"}} {total}')
            lines += [f"ds_bnb_{name}_sum {h[-1]:.6f}", f"ds_bnb_{name}_count {total}"]
        return "\n".join(lines) + "\n"


class Worker:
    """Owns the model: rank 0's thread runs lead(), the other ranks follow() it. Each iteration frees the rows of
    abandoned requests, admits waiting requests into free rows (one prefill), launches one decode step of every live
    row, and only then reads the tokens of the step before: the GPU computes step k while the host turns step k-1's
    tokens into text, and no step waits for Python. Tokens are chosen on the device (sample), so the next step's
    input never goes through the host; a row whose answer ended costs one step too many, thrown away."""

    def __init__(self, batch: SlotBatch, tokenizer, max_queue: int, world_size: int, admit_wait_ms: float = 0.0):
        import torch
        self.batch, self.tok, self.world_size = batch, tokenizer, world_size
        self.waiting, self.max_queue = queue.Queue(), max_queue
        self.admit_wait = admit_wait_ms / 1000          # --admit-wait-ms, in seconds
        self.live: dict[int, Request] = {}              # row -> request
        self.placing: list[Request] = []                # off the queue, not yet live (submit() counts them)
        self.metrics, self.error, self.stopping = Metrics(), None, threading.Event()
        self.eos = lesson.eos_ids(batch.module, tokenizer) - {None}
        on_gpu = batch.device.type == "cuda"
        self.tokens = torch.zeros(batch.rows, dtype=torch.long, device=batch.device)   # each row's next input
        self.sampling = [(0.0, 1.0, None)] * batch.rows    # each row's temperature, top_p, seeded generator
        self.host = [torch.zeros(batch.rows, dtype=torch.long, pin_memory=on_gpu) for _ in range(4)]
        self.turn, self.pending = 0, None                   # the last step's tokens, on their way to the host
        self.want: dict[int, int] = {}     # rank 0: row -> how many top logprobs its request wants (0: its token's)
        # Rank 0 tells the others what to do over gloo (CPU): an NCCL broadcast would wait for the GPU's queue.
        self.control = None
        if world_size > 1:
            import torch.distributed as tdist
            self.control = tdist.new_group(backend="gloo")
        self.thread = threading.Thread(target=self.lead, name="model-worker", daemon=True)

    def submit(self, reqs: list[Request]) -> None:
        """Queue requests (one a prompt), or raise queue.Full (the server answers 429) when every row is taken and
        --max-queue requests already wait for one. All of them or none."""
        if self.waiting.qsize() + len(self.live) + len(self.placing) + len(reqs) > self.batch.rows + self.max_queue:
            raise queue.Full
        for req in reqs:
            self.waiting.put_nowait(req)

    # What every rank does, in the same order: rank 0 decides (lead) and tells the others (follow).
    def tell(self, op: tuple) -> tuple:
        if self.world_size > 1:
            import torch.distributed as tdist
            box = [op]
            tdist.broadcast_object_list(box, src=0, group=self.control)
            op = box[0]
        return op

    def admit(self, rows: list[int], prompts: list[list[int]], sampling: list[tuple], all_logits=False) -> tuple:
        """Prefill `rows` and choose their first tokens. sampling: (temperature, top_p, seed) a row. Returns the
        prefill's logits (all_logits: of every position) and sample()'s logprobs and failures."""
        import torch
        logits = self.batch.admit(rows, prompts, all_logits)
        for row, (temperature, top_p, seed) in zip(rows, sampling):
            generator = torch.Generator(self.batch.device).manual_seed(seed) if temperature >= SAMPLING_EPS else None
            self.sampling[row] = (temperature, top_p, generator)
        first, lp, failed = self.sample(logits[:, -1] if all_logits else logits, rows)
        for i, row in enumerate(rows):
            self.tokens[row] = first[i]
        return logits, lp, failed

    def step(self, rows: list[int]) -> tuple:
        """One decode step of every row; the live rows' next tokens replace their inputs, on the device."""
        tokens, lp, failed = self.sample(self.batch.step(self.tokens, rows), rows, at=rows)
        self.tokens.copy_(tokens)
        return lp, failed

    def sample(self, logits, rows, at=None) -> tuple:
        """The next token of every line of `logits`, on the device (nothing waits for the GPU): greedy, or for the
        `rows` that sample (their lines: `at`, else one each in order) temperature and top-p (nucleus) sampling
        from the row's own seeded generator, so that every rank draws the same token. Also, for the rows that want
        them (rank 0), the chosen tokens' logprobs and the most likely ones' (fp32 log_softmax of these logits),
        and the rows whose own sampling failed (row -> exception; they got their greedy token)."""
        import torch
        logits = logits.float()
        tokens, lines, failed = logits.argmax(-1), list(at or range(len(rows))), {}
        for i, row in zip(lines, rows):
            temperature, top_p, generator = self.sampling[row]
            if temperature >= SAMPLING_EPS:            # below it: greedy (a tiny temperature would overflow)
                try:
                    probs = torch.softmax((logits[i] - logits[i].max()) / temperature, -1)
                    if top_p < 1:
                        p, idx = probs.sort(descending=True)
                        p[(p.cumsum(-1) - p) >= top_p] = 0             # keep the smallest set that reaches top_p
                        probs = torch.zeros_like(probs).scatter_(0, idx, p)
                    tokens[i] = torch.multinomial(probs, 1, generator=generator)[0]
                except Exception as e:                 # this row's own failure: its request ends, the others go on
                    failed[row] = e
        wanted = [(i, row) for i, row in zip(lines, rows) if row in self.want]
        if not wanted:
            return tokens, None, failed
        lps = logits[[i for i, _ in wanted]].log_softmax(-1)
        chosen = lps.gather(1, tokens[[i for i, _ in wanted], None])[:, 0]
        return tokens, ([row for _, row in wanted], chosen, lps.topk(max(self.want[r] for _, r in wanted), -1)), failed

    def follow(self) -> None:
        """Ranks other than 0: run the steps rank 0 runs, until it says stop."""
        while True:
            op = self.tell(None)
            if op[0] == "admit":
                self.admit(*op[1:])
            elif op[0] == "step":
                self.step(op[1])
            elif op[0] == "stop":
                return

    def lead(self) -> None:
        try:
            while True:
                self.iteration()
                if (self.stopping.is_set() and not self.live and self.pending is None and not self.placing
                        and self.waiting.empty()):
                    break
        except BaseException as e:     # fail what is in flight, then stop the server: serve() exits 1
            self.error = e
            for req in [*self.live.values(), *self.placing, *self.drain()]:
                req.emit({"error": f"the model worker failed: {lesson.reason_of(e)}"})
            signal.raise_signal(signal.SIGTERM)     # uvicorn's graceful shutdown
            return
        self.tell(("stop",))

    def drain(self) -> list:
        out = []
        while not self.waiting.empty():
            out.append(self.waiting.get_nowait())
        return out

    def admissions(self, free: int) -> list:
        """The requests to prefill now (at most `free`), chosen by --admit-wait-ms: requests that arrive together
        share one prefill. Idle (nothing in flight), it blocks for the first arrival (1 s at most: tensor parallel
        ranks hear from us), then waits for more until the first has waited --admit-wait-ms or the free rows are
        full. While rows decode it never blocks: it takes what is queued and holds it (self.placing) until the
        oldest has waited --admit-wait-ms or the free rows are full; the steps go on meanwhile."""
        held = self.placing = [r for r in self.placing if not r.cancelled]
        idle = not self.live and self.pending is None
        while len(held) < free:
            wait = 0.0 if not idle else 1.0 if not held else held[0].arrived + self.admit_wait - time.perf_counter()
            try:
                req = self.waiting.get(timeout=wait) if wait > 0 else self.waiting.get_nowait()
            except queue.Empty:
                break
            if not req.cancelled:
                held.append(req)
        # Idle, the wait above is over: the rows are full or the first has waited its time.
        if held and (idle or len(held) >= free or time.perf_counter() - held[0].arrived >= self.admit_wait):
            return held
        return []

    def iteration(self) -> None:
        for row in [r for r, req in self.live.items() if req.cancelled]:
            del self.live[row]
        free = [r for r in range(self.batch.rows) if r not in self.live]
        new = self.admissions(len(free))
        admitted = step = None
        if new:
            now = time.perf_counter()
            for req in new:
                req.admitted_at = now
                self.metrics.observe("queue_seconds", now - req.arrived)
            self.metrics.counts["prefills_total"] += 1
            self.metrics.counts["prefill_rows_total"] += len(new)
            rows, prompts = free[:len(new)], [r.prompt_ids for r in new]
            sampling = [(r.temperature, r.top_p, r.seed if r.seed is not None else
                         int.from_bytes(os.urandom(8), "little") >> 1) for r in new]
            all_logits = any(r.prompt_logprobs for r in new)
            self.want = {row: r.logprobs for row, r in [*self.live.items(), *zip(rows, new)] if r.logprobs is not None}
            self.tell(("admit", rows, prompts, sampling, all_logits))
            began = self.clock()
            logits, lp, failed = self.admit(rows, prompts, sampling, all_logits)
            prefill = (began, self.clock())
            for i, (row, req) in enumerate(zip(rows, new)):
                self.live[row] = req
                self.metrics.counts["prompt_tokens_total"] += len(req.prompt_ids)
                try:
                    if req.prompt_logprobs:
                        req.prompt_lp = self.prompt_logprobs(logits[i], req.prompt_ids, req.logprobs)
                except Exception as e:
                    failed[row] = e
            self.placing = []
            admitted = self.to_host(rows, new, lp, failed)
        if self.live:
            rows = sorted(self.live)
            self.want = {row: r.logprobs for row, r in self.live.items() if r.logprobs is not None}
            self.tell(("step", rows))
            step = self.to_host(rows, [self.live[r] for r in rows], *self.step(rows))
        elif not new and self.pending is None:
            self.tell(("idle",))
        # The GPU is busy with the step just launched; meanwhile the tokens that are ready become text.
        if self.pending is not None:
            self.deliver(*self.pending)
        if admitted is not None:
            self.deliver(*admitted, first=True)
            self.metrics.observe("prefill_device_seconds", self.seconds(*prefill))
        self.pending = step

    def clock(self):
        """A point in the device's time: a CUDA event on a GPU (its time read once the work before it is done), the
        host's clock on a CPU (there the work is done when the call returns)."""
        import torch
        if self.batch.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def seconds(start, end) -> float:
        return start.elapsed_time(end) / 1e3 if hasattr(start, "elapsed_time") else end - start

    def prompt_logprobs(self, logits, prompt: list[int], top: int) -> list:
        """Each prompt token's logprob and the `top` most likely tokens' there, from its prefill logits (its row,
        left-padded: the prompt ends at the last position; position k gives token k+1's). The first has none."""
        import torch
        lps = logits[len(logits) - len(prompt):-1].float().log_softmax(-1)
        chosen = lps.gather(1, torch.tensor(prompt[1:], device=lps.device)[:, None])[:, 0]
        best = lps.topk(top, -1)
        return [(prompt[0], None, [])] + [(t, c, list(zip(i, v))) for t, c, i, v in zip(
            prompt[1:], chosen.tolist(), best.indices.tolist(), best.values.tolist())]

    def to_host(self, rows: list[int], reqs: list[Request], lp=None, failed=None) -> tuple:
        """Start copying every row's latest token to the host; deliver() waits for the copy, not for later steps."""
        import torch
        buf = self.host[self.turn % len(self.host)]
        self.turn += 1
        buf.copy_(self.tokens, non_blocking=True)
        done = None
        if self.batch.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return buf, done, rows, reqs, lp, failed or {}

    def deliver(self, buf, done, rows, reqs, lp, failed, first=False) -> None:
        if done is not None:
            done.synchronize()
        tokens, now, lps = buf.tolist(), time.perf_counter(), {}
        if lp is not None:                  # the logprobs of this step's tokens, computed before the copy
            lp_rows, chosen, top = lp
            lps = {r: (c, list(zip(i, v))) for r, c, i, v in zip(lp_rows, chosen.tolist(), top.indices.tolist(),
                                                                  top.values.tolist())}
        for row, req in zip(rows, reqs):
            if req.finished or req.cancelled:
                continue                    # its answer ended a step earlier: this token was the spare step's
            try:                            # a failure of this row's own work ends its request only
                if row in failed:
                    raise failed[row]
                if first:
                    req.first_token_at = now
                    self.metrics.observe("ttft_seconds", now - req.arrived)
                    self.metrics.observe("prefill_seconds", now - req.admitted_at)
                self.advance(row, req, tokens[row], lps.get(row))
            except Exception as e:
                self.fail(row, req, e)

    def fail(self, row: int, req: Request, e: Exception) -> None:
        """One request's own failure (its sampling, logprobs, detokenization, stop check): it is answered with a
        500, its row is freed, and the server goes on serving the others."""
        if self.live.get(row) is req:
            del self.live[row]
        req.finished = True
        self.metrics.counts["requests_failed_total"] += 1
        lesson.log(f"[serve] a request failed: {lesson.reason_of(e)}")
        req.emit({"error": f"the request failed: {lesson.reason_of(e)}"})

    def advance(self, row: int, req: Request, token: int, lp=None) -> None:
        """Append a row's new token; send the text that is final; end the request on EOS, a stop string or length."""
        if req.max_tokens == 0:             # echo: the prompt (and its logprobs) is the whole answer
            return self.finish(row, req, "length")
        if lp is not None:                  # every token, EOS included (vLLM's way; lm-eval counts on it)
            req.lp.append((token, lp[0], lp[1][:req.logprobs]))
        reason = None
        if token in self.eos and not req.ignore_eos:
            reason = "stop"
        else:
            req.ids.append(token)
            self.metrics.counts["generation_tokens_total"] += 1
            reason = "length" if len(req.ids) >= req.max_tokens else None
        # Incremental detokenization: decode from the previous read point on (the tokens before it give the new
        # text its word boundaries), and hold the text back while its last character is unfinished (a character's
        # bytes cut between tokens decode to U+FFFD); one still unfinished when the answer ends is left out.
        full = self.tok.decode(req.ids[req.prefix_at:], skip_special_tokens=True)
        if reason:
            full = full.rstrip("\ufffd")
        if reason or not full.endswith("\ufffd"):
            head = self.tok.decode(req.ids[req.prefix_at:req.read_at], skip_special_tokens=True)
            req.text += full[len(head):]
            req.prefix_at, req.read_at = req.read_at, len(req.ids)
        hit = min((i for i in (req.text.find(s) for s in req.stop) if i >= 0), default=-1)
        if hit >= 0:
            req.text, reason = req.text[:hit], "stop"
        # Hold back what may still turn out to be the start of a stop string.
        final = len(req.text) if reason else len(req.text) - max((len(s) - 1 for s in req.stop), default=0)
        if final > req.sent:
            req.emit({"text": req.text[req.sent:final]})
            req.sent = final
        if reason:
            self.finish(row, req, reason)

    def finish(self, row: int, req: Request, reason: str) -> None:
        del self.live[row]
        req.finished, n = True, len(req.ids)
        if n > 1:
            self.metrics.observe("tpot_seconds", (time.perf_counter() - req.first_token_at) / (n - 1))
        self.metrics.counts["requests_finished_total"] += 1
        req.emit({"finish_reason": reason, "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                                                     "total_tokens": len(req.prompt_ids) + n}})


# ----------------------------------------------------------------------------------------------------------------
# The HTTP API (OpenAI's shapes): FastAPI on rank 0.

def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def event(obj: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj)}\n\n"


def logprobs_shapes(tokenizer):
    """OpenAI's two logprobs objects, from the worker's (token, logprob, [(token, logprob), ...]) a position: each
    token as its own text (tokenizer.decode([id]), special tokens included, as vLLM), logprobs floored at -9999
    (JSON has no -inf; OpenAI's and vLLM's floor)."""
    def texts(entries):
        ids = sorted({t for e in entries for t in [e[0], *(i for i, _ in e[2])]})
        return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids])))

    def floor(x):
        return None if x is None else max(x, -9999.0)

    def legacy(entries):
        """/v1/completions: tokens, token_logprobs, top_logprobs (text -> logprob of the most likely tokens and the
        chosen one, likeliest first; two tokens of one text keep the likelier; null where the logprob is: the first
        prompt token), text_offset (the tokens' texts end to end)."""
        s, out, at = texts(entries), {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, 0
        for t, lp, top in entries:
            best = {s[t]: floor(lp)} | {s[i]: floor(v) for i, v in reversed(top)}
            out["tokens"].append(s[t])
            out["token_logprobs"].append(floor(lp))
            out["top_logprobs"].append(None if lp is None else dict(sorted(best.items(), key=lambda kv: -kv[1])))
            out["text_offset"].append(at)
            at += len(s[t])
        return out

    def chat(entries):
        """/v1/chat/completions: content[] of token, logprob, bytes, top_logprobs[] (the most likely tokens)."""
        s = texts(entries)
        def item(t, lp):
            return {"token": s[t], "logprob": floor(lp), "bytes": list(s[t].encode())}
        return {"content": [dict(item(t, lp), top_logprobs=[item(i, v) for i, v in top]) for t, lp, top in entries],
                "refusal": None}
    return legacy, chat


def build_app(worker: Worker, tokenizer, model_name: str, max_len: int, default_max_tokens: int, about: dict,
              max_body_bytes: int = 4 * 2 ** 20):
    """The FastAPI app; `about` (the engine, card and versions) is what GET /health says besides "ok"."""
    from typing import Literal

    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr
    from starlette.exceptions import HTTPException
    legacy_logprobs, chat_logprobs = logprobs_shapes(tokenizer)
    # Token ids a prompt may hold: those the model embeds and the tokenizer can write back as text.
    vocab = min(len(tokenizer), getattr(worker.batch.module.config, "vocab_size", None) or len(tokenizer))

    class StreamOptions(BaseModel):
        include_usage: StrictBool = False

    class Sampling(BaseModel):
        model: str | None = None
        max_tokens: StrictInt | None = Field(None, ge=0)             # 0: only with echo (scoring the prompt)
        max_completion_tokens: StrictInt | None = Field(None, ge=0)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = None   # each is searched a step
        seed: StrictInt | None = Field(None, ge=-2 ** 63, lt=2 ** 64)      # what a torch generator takes
        n: StrictInt = Field(1, ge=1, le=1)
        stream: StrictBool = False
        stream_options: StreamOptions | None = None
        ignore_eos: StrictBool = False    # an extension (vLLM has it too): benchmarks want full-length answers

    class Completion(Sampling):
        # OpenAI's four forms: a string, strings, token ids, lists of token ids (one choice a prompt)
        prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
        echo: StrictBool = False
        logprobs: StrictInt | None = Field(None, ge=0, le=5)       # this many most likely tokens a position

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: StrictStr

    class Chat(Sampling):
        messages: list[Message] = Field(min_length=1)
        logprobs: StrictBool = False
        top_logprobs: StrictInt | None = Field(None, ge=0, le=20)

    union_fields = {"prompt": "give a string, a list of strings, a list of token ids (integers) or a list of such "
                              "lists.", "stop": "give a string or a list of at most 16 strings."}
    app = FastAPI(title="ds_bnb_infer serve")

    def fail(status: int, message: str, param=None, kind="invalid_request_error", headers=None):
        return JSONResponse(error_body(message, param, kind), status_code=status, headers=headers)

    too_large = (f"the request body is larger than the server's {max_body_bytes} bytes (--max-body-bytes); send a "
                 "shorter prompt.")

    class BoundedBody:
        """A body larger than --max-body-bytes is refused (413) and holds no memory: by its Content-Length before
        it is read, and one sent in chunks (no length) as soon as what arrived passes the limit. A plain ASGI
        middleware: Starlette's @app.middleware wraps receive() so that is_disconnected() never sees a client go."""
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            size = dict(scope["headers"]).get(b"content-length")
            if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
                return await fail(413, too_large)(scope, receive, send)
            seen = 0

            async def counted():
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > max_body_bytes:             # FastAPI passes it on from reading the body: a 413 below
                    raise HTTPException(413, too_large)
                return message
            await self.app(scope, counted, send)
    app.add_middleware(BoundedBody)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc):                   # 404, 405, ... in OpenAI's error shape too
        return fail(exc.status_code, str(exc.detail), kind="invalid_request_error", headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc):
        e = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        where = ".".join(str(x) for x in e["loc"] if x != "body")
        if e["type"] == "json_invalid":
            return fail(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])}).")
        field = e["loc"][1] if len(e["loc"]) > 1 else None
        if field in union_fields and e["type"] != "missing":             # pydantic names each alternative's error
            return fail(400, f"{field}: {union_fields[field]}", field)
        return fail(400, f"{where or 'body'}: {e['msg']}", where or None)

    @app.exception_handler(Exception)
    async def crashed(_, exc):
        return fail(500, f"internal error: {lesson.reason_of(exc)}", kind="server_error")

    @app.get("/health")
    async def health():
        if worker.error is not None or not worker.thread.is_alive():
            return fail(503, "the model worker has stopped.", kind="server_error")
        return {"status": "ok", **about}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "ds_bnb_infer"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(worker.metrics.render(len(worker.live), worker.waiting.qsize() + len(worker.placing)),
                                 media_type="text/plain; version=0.0.4")

    async def answer(body: Sampling, prompts: list, http: HttpRequest, chat: bool):
        """prompts: strings (tokenized here, off the event loop) or lists of token ids; one choice each."""
        if worker.error is not None:
            return fail(503, "the model worker has stopped.", kind="server_error")
        if not prompts or not all(prompts):
            return fail(400, "prompt is empty; give it some text (or token ids).", "prompt")
        if len(prompts) > worker.batch.rows + worker.max_queue:
            return fail(400, f"prompt: {len(prompts)} prompts in one request; this server takes at most "
                             f"{worker.batch.rows + worker.max_queue} at once.", "prompt")
        bad = next((t for p in prompts if not isinstance(p, str) for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            return fail(400, f"prompt: token id {bad} is not in the vocabulary (0 to {vocab - 1}).", "prompt")
        echo = getattr(body, "echo", False)
        if chat and body.top_logprobs is not None and not body.logprobs:
            return fail(400, "top_logprobs needs logprobs: true.", "top_logprobs")
        top = ((body.top_logprobs or 0) if body.logprobs else None) if chat else body.logprobs
        if top is not None and body.stream:
            return fail(400, "logprobs are not supported with stream; send stream: false.", "logprobs")
        max_tokens = next((x for x in (body.max_completion_tokens, body.max_tokens) if x is not None),
                          default_max_tokens)
        if max_tokens == 0 and not echo:
            return fail(400, "max_tokens: 0 generates nothing; it is taken with echo (to score the prompt).",
                        "max_tokens")
        # Tokenized off the event loop: a long prompt must not hold up other clients (or /health).
        texts = [p for p in prompts if isinstance(p, str)]
        try:            # JSON can escape a lone surrogate ("\ud800"): no text, and the tokenizer would fail on it
            await asyncio.to_thread(lambda: [p.encode() for p in texts])
        except UnicodeEncodeError:
            field = "messages" if chat else "prompt"
            return fail(400, f"{field}: a lone surrogate (\\ud800-\\udfff) is no text; send valid Unicode.", field)
        encoded = iter((await asyncio.to_thread(tokenizer, texts, add_special_tokens=not chat))["input_ids"]
                       if texts else [])
        ids = [next(encoded) if isinstance(p, str) else p for p in prompts]
        if not all(ids):
            return fail(400, "prompt is empty once tokenized; give it some text.", "prompt")
        if max(map(len, ids)) + max_tokens > max_len:
            return fail(400, f"prompt ({max(map(len, ids))} tokens) + max_tokens ({max_tokens}) is beyond the "
                             f"server's {max_len} positions (--max-model-len); shorten the prompt or lower "
                             "max_tokens.", "max_tokens")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        reqs = [Request(p, max_tokens, body.temperature, body.top_p, stop, body.seed, body.ignore_eos, top,
                        echo and top is not None,
                        emit=lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev)))
                for i, p in enumerate(ids)]
        try:
            worker.submit(reqs)
        except queue.Full:
            worker.metrics.counts["requests_rejected_total"] += 1
            return fail(429, f"the server is busy: {worker.max_queue} requests are already waiting; retry "
                             "shortly.", kind="rate_limit_error", headers={"Retry-After": "1"})
        echoed = (await asyncio.to_thread(lambda: [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts])
                  if echo else [""] * len(reqs))           # echo: each prompt's text comes before its answer
        rid, created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name}

        def choice(i, text, reason, logprobs=None, delta=False):
            if not chat:
                return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
            msg = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": i, ("delta" if delta else "message"): msg, "logprobs": logprobs, "finish_reason": reason}

        def total(usages):
            return {k: sum(u[k] for u in usages) for k in usages[0]}

        if body.stream:
            async def sse():
                chunk, usages, left = dict(head, object="chat.completion.chunk" if chat else "text_completion"), \
                    [None] * len(reqs), len(reqs)
                try:
                    if chat:                             # OpenAI's first chat chunk names the role
                        yield event(dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]))
                    for i, text in enumerate(echoed):
                        if text:
                            yield event(dict(chunk, choices=[choice(i, text, None)]))
                    while left:
                        i, ev = await events.get()
                        if "error" in ev:
                            yield event(error_body(ev["error"], kind="server_error"))
                            break
                        yield event(dict(chunk, choices=[choice(i, ev.get("text", ""), ev.get("finish_reason"),
                                                                delta=True)]))
                        if "finish_reason" in ev:
                            usages[i], left = ev["usage"], left - 1
                    else:
                        if body.stream_options and body.stream_options.include_usage:
                            yield event(dict(chunk, choices=[], usage=total(usages)))
                    yield "data: [DONE]\n\n"
                finally:                                 # the client went away (or the answer ended): free the rows
                    for req in reqs:
                        req.cancelled = True
            return StreamingResponse(sse(), media_type="text/event-stream")
        parts, ends, checked = [[t] for t in echoed], [None] * len(reqs), time.monotonic()
        try:
            while None in ends:
                try:
                    i, ev = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    ev = None
                # A client that went away frees its rows at the next step, tokens arriving or not.
                if time.monotonic() - checked >= 0.25:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return fail(499, "the client closed the request.")
                if ev is None:
                    continue
                if "error" in ev:
                    return fail(500, ev["error"], kind="server_error")
                parts[i].append(ev.get("text", ""))
                if "finish_reason" in ev:
                    ends[i] = ev
        finally:
            for req in reqs:
                req.cancelled = True
        logprobs = [None] * len(reqs)
        if top is not None:                          # the worker is done with these requests: read them here
            shape = chat_logprobs if chat else legacy_logprobs
            logprobs = await asyncio.to_thread(lambda: [shape(r.prompt_lp + r.lp) for r in reqs])
        return dict(head, choices=[choice(i, "".join(parts[i]), e["finish_reason"], logprobs[i])
                                   for i, e in enumerate(ends)], usage=total([e["usage"] for e in ends]))

    @app.post("/v1/completions")
    async def completions(body: Completion, http: HttpRequest):
        single = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
        return await answer(body, [body.prompt] if single else body.prompt, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: Chat, http: HttpRequest):
        if not getattr(tokenizer, "chat_template", None):
            return fail(400, f"messages: {model_name} has no chat template; send a prompt to /v1/completions.",
                        "messages")
        prompt = await asyncio.to_thread(tokenizer.apply_chat_template, [m.model_dump() for m in body.messages],
                                         tokenize=False, add_generation_prompt=True)
        return await answer(body, [prompt], http, chat=True)

    return app


# ----------------------------------------------------------------------------------------------------------------
# The command line: the lesson's flags (the engine) plus the server's; the lesson's main() handles every failure.

def check_port(host: str, port: int) -> None:
    """Bind the port now: a server that loads a model for minutes must not then find its port taken."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise lesson.UsageError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port.") from None

def http_protocol(seconds: float):
    """uvicorn's HTTP/1.1 protocol (h11) with the read deadline uvicorn lacks: a request's headers and body must
    all arrive within `seconds` of its first byte (or of the connection's opening), or the connection is closed.
    Without it a client that stops mid-headers holds its socket for ever, and mid-body a task too. And bytes that
    are no HTTP/1.1 request get their 400 in OpenAI's error shape too (uvicorn's is plain text)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        deadline = None

        def arm(self):
            if self.deadline is None:
                self.deadline = self.loop.call_later(seconds, self.transport.close)

        def disarm(self):
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.arm()

        def data_received(self, data):
            self.arm()
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):     # the request is whole (or over)
                self.disarm()

        def connection_lost(self, exc):
            self.disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str):
            body = json.dumps(error_body("the request is not valid HTTP/1.1 (its request line, headers or "
                                         "length).")).encode()
            head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                    (b"connection", b"close")]
            for ev in (h11.Response(status_code=400, headers=head), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(ev))
            self.transport.close()
    return Protocol

def serve(config: ServeConfig) -> int:
    import torch
    rank, _, world_size = lesson.dist_env(config)
    if config.prefill == "compiled" and config.tp_size > 1:
        raise lesson.UsageError("--prefill compiled runs on one rank; under tensor parallel the prefill is eager: "
                                "drop --prefill compiled, or serve with --tp-size 1.")
    lesson.validate(config, world_size, torch.cuda.is_available())
    for name, low in [("port", 0), ("max_num_seqs", 1), ("max_queue", 1), ("max_model_len", 2), ("max_body_bytes", 1),
                      ("read_timeout", 0.1)]:
        if getattr(config, name) is not None and getattr(config, name) < low:
            raise lesson.UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(config, name)}.")
    if not 0 <= config.admit_wait_ms <= 1000:     # a wait of seconds would be a stall, no batching
        raise lesson.UsageError(f"--admit-wait-ms must be between 0 and 1000, got {config.admit_wait_ms}.")
    if config.quant == "8bit" and config.int8_threshold > 0 and config.max_num_seqs > 1:
        # LLM.int8 picks its fp16 outlier columns over every row of a matmul: one request's answer would depend on
        # the other requests decoded beside it (and fails the startup check against the model run alone).
        raise lesson.UsageError("--quant 8bit with outlier columns (--int8-threshold > 0) makes each row's answer "
                                "depend on the other rows; serve it with --max-num-seqs 1, or use --int8-threshold 0 "
                                "(plain int8) or --quant 4bit.")
    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.step in ("compiled", "cuda-graph") and not on_gpu:
        raise lesson.UsageError(f"--step {config.step} captures CUDA graphs and needs a GPU; on a CPU use "
                                "--step eager (or auto).")
    check_attention(config.attention, on_gpu)
    if rank == 0:
        missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
        if missing:
            raise lesson.UsageError(f"the server needs {' and '.join(missing)}: pip install -r requirements-serve.txt")
        check_port(config.host, config.port)
    positions = lesson.model_config(config).max_position_embeddings
    max_len = config.max_model_len or min(positions, 2048)
    if max_len > positions:
        raise lesson.UsageError(f"--max-model-len {max_len} is beyond the model's {positions} positions.")
    if config.max_new_tokens >= max_len:
        raise lesson.UsageError(f"--max-new-tokens {config.max_new_tokens} (a request's default max_tokens) must "
                                f"be below --max-model-len {max_len}.")
    config = dataclasses.replace(config, max_model_len=max_len)
    engine, tokenizer, info = lesson.init_engine(config, SlotBatch)
    lesson.log(f"[serve] verified: {info.verify['summary']}; decode {engine.mode}, prefill {engine.prefill_mode}, "
               f"{config.max_num_seqs} rows x {max_len} positions" if info.verify else
               f"[serve] decode {engine.mode}, prefill {engine.prefill_mode}")
    worker = Worker(engine, tokenizer, config.max_queue, world_size, config.admit_wait_ms)
    if rank != 0:
        worker.follow()
    else:
        import uvicorn
        about = {"model": config.model_name, "max_num_seqs": config.max_num_seqs, "max_model_len": max_len,
                 "prefill": engine.prefill_mode, "world_size": world_size, "engine": dataclasses.asdict(info),
                 "versions": lesson.versions(),
                 "gpu": torch.cuda.get_device_name(info.device) if info.device.startswith("cuda") else None}
        app = build_app(worker, tokenizer, config.model_name, max_len, config.max_new_tokens, lesson.finite(about),
                        config.max_body_bytes)
        worker.thread.start()
        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                super().handle_exit(sig, frame)
                if sig == signal.SIGTERM:      # a stop asked for and done (in-flight answers finished): exit 0,
                    self._captured_signals.remove(sig)     # where uvicorn would re-raise it and die of it (143)
        server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                       timeout_graceful_shutdown=600, http=http_protocol(config.read_timeout)))
        lesson.log(f"[serve] listening on http://{config.host}:{config.port} (OpenAI API: /v1/completions, "
                   "/v1/chat/completions; /health, /metrics)")
        server.run()                 # SIGTERM / Ctrl-C: stop taking requests, finish those in flight, return
        worker.stopping.set()
        worker.thread.join()
        if worker.error is not None:
            raise lesson.RunFailure(f"the model worker failed: {lesson.reason_of(worker.error)}")
    engine.close()
    if world_size > 1:
        torch.distributed.destroy_process_group()
    lesson.log("[serve] stopped")
    return 0

def main(argv=None) -> int:
    return lesson.main(argv, prog="extensions/serve.py", config_class=ServeConfig, job=serve)

if __name__ == "__main__":
    sys.exit(main())
