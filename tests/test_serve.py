"""extensions/serve.py (第十节 服务化): a real server on 127.0.0.1 with random:tiny, called with the openai client and
raw HTTP. Its answers equal the lesson's own generate() and, under load, each prompt's answer alone; its logprobs
equal the lesson's model's; bad requests are 400 naming the field, a full queue 429; a client that leaves frees its
row, one that stops sending is closed; one request's own failure answers it alone; SIGTERM finishes what is in
flight and exits 0; two CPU ranks serve under the deepspeed launcher. Chat and a character cut between tokens:
real:smollm2-135m. Every server started here is stopped."""
import contextlib
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from openai import OpenAI

import ds_bnb_infer as m
from conftest import HIDE, ROOT, free_port, launch_cmd, run_cli
from extensions.serve import Request, ServeConfig, SlotBatch, Worker

SERVE = ROOT / "extensions" / "serve.py"
TINY = ["--model", "random:tiny", "--max-num-seqs", "4", "--max-queue", "4"]


class Server:
    """A server process (or the deepspeed launcher with its ranks), ready when /health answers."""

    def __init__(self, *args, ranks=1):
        self.port = free_port()
        # Its own process group (the launcher and its ranks): kill() ends them all.
        cmd = [sys.executable, str(SERVE), *args] if ranks == 1 else launch_cmd(*args, ranks=ranks, script=SERVE)
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("the server exited: " + self.proc.stderr.read()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.kill()
        raise AssertionError("the server did not come up in 300 s")

    def pid(self, rank=0) -> int:
        """The process of `rank` (under the launcher: the child whose command line has --local_rank=<rank>)."""
        if self.proc.args[0] == sys.executable:
            return self.proc.pid
        out = subprocess.run(["pgrep", "-f", f"local_rank={rank} .*--port {self.port}"], capture_output=True,
                             text=True).stdout.split()
        return int(out[0])

    def stop(self) -> int:
        """SIGTERM (to rank 0 under the launcher), then the exit code; killed if it does not end in 120 s."""
        import os
        os.kill(self.pid(), signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        finally:
            self.kill()
        return self.proc.returncode

    def kill(self):
        import os
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.stderr = self.proc.stderr.read()


@pytest.fixture(scope="module")
def server():
    s = Server(*TINY, "--read-timeout", "2")
    yield s
    assert s.stop() == 0, s.stderr[-2000:]
    assert "[serve] stopped" in s.stderr


def complete(url, timeout=120, **body):
    return httpx.post(url + "/v1/completions", json={"temperature": 0, **body}, timeout=timeout)


def offline_text(prompt: str, n: int) -> str:
    """The lesson's own generate() on the same preset (greedy): what the server must answer, less a character still
    unfinished where the answer ends (U+FFFD: the server leaves it out, as vLLM does)."""
    config = m.DeployConfig(model_name="random:tiny", backend="hf", device="cpu", max_new_tokens=n)
    model, tok, _ = m.init_engine(config)
    return m.generate(model, tok, [prompt], config)["texts"][0].rstrip("\ufffd")


def test_openai_client_gets_the_lessons_answer_streamed_or_not(server):
    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    r = client.completions.create(model="random:tiny", prompt="DeepSpeed is", max_tokens=12, temperature=0)
    assert r.choices[0].text == offline_text("DeepSpeed is", 12)
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="random:tiny", prompt="DeepSpeed is", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    raw = httpx.post(server.url + "/v1/completions", json={"prompt": "DeepSpeed is", "max_tokens": 3,
                                                          "temperature": 0, "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")
    assert [x.id for x in client.models.list()] == ["random:tiny"]


def test_health_and_prometheus_metrics(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["engine"]["verify"]["passed"] and health["max_num_seqs"] == 4
    before = httpx.get(server.url + "/metrics").text
    complete(server.url, prompt="metrics", max_tokens=5, ignore_eos=True)
    after = httpx.get(server.url + "/metrics").text

    def value(text, name):
        return float(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + " ")))
    assert value(after, "ds_bnb_generation_tokens_total") - value(before, "ds_bnb_generation_tokens_total") == 5
    assert value(after, "ds_bnb_ttft_seconds_count") == value(before, "ds_bnb_ttft_seconds_count") + 1
    for name in ("queue_seconds_count", "prefill_seconds_count", "prefill_device_seconds_count", "prefills_total",
                 "prefill_rows_total"):
        assert value(after, "ds_bnb_" + name) == value(before, "ds_bnb_" + name) + 1, name
    # the prefill's own compute is part of the time from admission to the first token
    device = value(after, "ds_bnb_prefill_device_seconds_sum") - value(before, "ds_bnb_prefill_device_seconds_sum")
    assert 0 < device <= value(after, "ds_bnb_prefill_seconds_sum") - value(before, "ds_bnb_prefill_seconds_sum") + 2e-6
    # TTFT's two parts (the queue, then admission to the first token) add up to no more than TTFT itself; the sums
    # are written to 6 decimals, so the six values compared are each rounded by up to 5e-7
    parts = sum(value(after, f"ds_bnb_{n}_seconds_sum") - value(before, f"ds_bnb_{n}_seconds_sum")
                for n in ("queue", "prefill"))
    assert 0 < parts <= value(after, "ds_bnb_ttft_seconds_sum") - value(before, "ds_bnb_ttft_seconds_sum") + 5e-6
    assert "# TYPE ds_bnb_requests_waiting gauge" in after and 'ds_bnb_tpot_seconds_bucket{le="+Inf"}' in after


def test_concurrent_requests_each_get_their_own_answer(server):
    """8 prompts with different lengths and max_tokens: rows finish at different steps and waiting requests take
    them (4 rows, 4 waiting); every answer equals the same prompt sent alone, none is another's."""
    prompts = [f"prompt {i}: " + "x" * (3 * i) for i in range(8)]
    sizes = [5 + 7 * i for i in range(8)]
    alone = [complete(server.url, prompt=p, max_tokens=n).json()["choices"][0]["text"] for p, n in zip(prompts, sizes)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda pn: complete(server.url, prompt=pn[0], max_tokens=pn[1]), zip(prompts, sizes)))
    assert [r.status_code for r in together] == [200] * 8
    assert [r.json()["choices"][0]["text"] for r in together] == alone
    assert len(set(alone)) == 8


def test_sampling_seed_top_p_and_stop(server):
    a, b, c = (complete(server.url, prompt="DeepSpeed is", max_tokens=16, temperature=1.0, seed=s).json()
               for s in (7, 7, 8))
    assert a["choices"][0]["text"] == b["choices"][0]["text"] != c["choices"][0]["text"]     # the seed decides
    greedy = complete(server.url, prompt="DeepSpeed is", max_tokens=16).json()["choices"][0]["text"]
    nucleus = complete(server.url, prompt="DeepSpeed is", max_tokens=16, temperature=1.0, top_p=1e-6)
    assert nucleus.json()["choices"][0]["text"] == greedy                # top_p that small keeps the top token
    stop = greedy[5:8]
    r = complete(server.url, prompt="DeepSpeed is", max_tokens=16, stop=[stop]).json()["choices"][0]
    assert r["text"] == greedy[:greedy.find(stop)] and r["finish_reason"] == "stop"


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", b'{"prompt": ', None),                                    # malformed JSON
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),       # a lone surrogate: was a 500 (tokenizer)
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, "max_tokens"),           # beyond the positions
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),   # no chat template
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
])
def test_bad_requests_are_400_in_openai_shape(server, path, body, field):
    r = httpx.post(server.url + path, timeout=30, **({"content": body, "headers": {"Content-Type": "application/json"}}
                                                     if isinstance(body, bytes) else {"json": body}))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field
    assert (field or "JSON") in error["message"]


@pytest.mark.parametrize("body, words", [
    ({"seed": 2 ** 70}, "seed"),                                 # beyond what a torch generator takes
    ({"stream": "yes"}, "stream"),                               # a string is not a boolean
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"logprobs": 6}, "logprobs: Input should be less than or equal to 5"),      # OpenAI's bound
    ({"logprobs": True}, "logprobs: Input should be a valid integer"),
    ({"logprobs": 1, "stream": True}, "not supported with stream"),     # refused, never silently ignored
    ({"echo": "yes"}, "echo"),
    ({"stop": ["a"] * 17}, "at most 16 strings"),
    ({"stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"prompt": 12}, "prompt: give a string"),
    ({"prompt": ["a", 1]}, "prompt: give a string"),
    ({"prompt": [5, 320]}, "token id 320 is not in the vocabulary"),         # random:tiny has 320 ids
    ({"prompt": [[5], [-1]]}, "token id -1 is not in the vocabulary"),
    ({"prompt": []}, "prompt is empty"),
    ({"prompt": [[5], []]}, "prompt is empty"),
    ({"prompt": ["x"] * 9}, "takes at most 8 at once"),                       # 4 rows + 4 waiting
])
def test_field_extremes_and_wrong_types_are_400(server, body, words):
    r = complete(server.url, **{"prompt": "x", "max_tokens": 4, **body})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_prompts_as_strings_or_token_ids_get_one_choice_each(server):
    """OpenAI's four forms of prompt: a string, a list of strings, a list of token ids, a list of such lists; each
    prompt's choice (index in order) is its answer alone."""
    tok, texts = m.byte_tokenizer(320), ["DeepSpeed is", "a"]
    ids = [tok(t)["input_ids"] for t in texts]
    alone = [complete(server.url, prompt=t, max_tokens=6).json()["choices"][0]["text"] for t in texts]
    assert complete(server.url, prompt=ids[0], max_tokens=6).json()["choices"][0]["text"] == alone[0]
    for prompt in (texts, ids):
        r = complete(server.url, prompt=prompt, max_tokens=6).json()
        assert [(c["index"], c["text"]) for c in r["choices"]] == [(0, alone[0]), (1, alone[1])]
        assert r["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])


def direct_logprobs(ids: list[int], n: int) -> tuple:
    """The lesson's model (random:tiny, fp32): `n` greedy tokens after `ids`, and every position's fp32 log_softmax
    over prompt + answer (one forward): what the server's logprobs must be."""
    model, _, _ = m.init_engine(m.DeployConfig(model_name="random:tiny", backend="hf", device="cpu"))
    x = torch.tensor([ids])
    full = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0) if n else x
    with torch.no_grad():
        return full[0].tolist(), model(full).logits[0].float().log_softmax(-1)


def test_echo_and_logprobs_are_the_models_own(server):
    """echo + logprobs (OpenAI's legacy object): the prompt's tokens (the first with null), then the answer's; each
    logprob and the top ones equal the lesson's model's fp32 log_softmax; lm-evaluation-harness's loglikelihood
    request (token-id lists, max_tokens 1, echo, logprobs 1) scores a batch; max_tokens 0 echoes the prompt alone."""
    prompt = m.byte_tokenizer(320)("DeepSpeed is")["input_ids"]
    full, lps = direct_logprobs(prompt, 4)
    want = [None] + [lps[k - 1, full[k]].item() for k in range(1, len(full))]
    plain = complete(server.url, prompt="DeepSpeed is", max_tokens=4, ignore_eos=True).json()["choices"][0]
    c = complete(server.url, prompt=prompt, max_tokens=4, echo=True, logprobs=3, ignore_eos=True).json()["choices"][0]
    lp = c["logprobs"]
    assert c["text"] == "DeepSpeed is" + plain["text"] and set(lp) == {"tokens", "token_logprobs", "top_logprobs",
                                                                      "text_offset"}
    assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(full) and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == pytest.approx(want[1:], abs=1e-4)
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:k])) for k in range(len(full))]
    for k, top in enumerate(lp["top_logprobs"][1:], 1):      # 3 likeliest (+ the chosen); the likeliest is the model's
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(lps[k - 1].max().item(), abs=1e-4)
    for k in range(len(prompt), len(full)):                  # greedy: the answer's tokens are the likeliest
        assert lp["token_logprobs"][k] == max(lp["top_logprobs"][k].values())
    # lm-eval's local-completions loglikelihood request, two contexts at once (left-padded into one prefill)
    body = {"model": "random:tiny", "prompt": [prompt, prompt[:5]], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    for choice, p in zip(sorted(r["choices"], key=lambda x: x["index"]), body["prompt"]):
        scores = choice["logprobs"]["token_logprobs"]
        assert len(scores) == len(p) + 1 and sum(scores[2:-1]) == pytest.approx(sum(want[2:len(p)]), abs=1e-4)
    c = complete(server.url, prompt=[prompt], max_tokens=0, echo=True, logprobs=0).json()
    lp = c["choices"][0]["logprobs"]
    assert c["choices"][0]["text"] == "DeepSpeed is" and c["usage"]["completion_tokens"] == 0
    assert lp["token_logprobs"][1:] == pytest.approx(want[1:len(prompt)], abs=1e-4)
    assert [len(t) for t in lp["top_logprobs"][1:]] == [1] * (len(prompt) - 1)      # logprobs 0: the chosen token's
    streamed = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "prompt": ["DeepSpeed is", "a"], "max_tokens": 3, "temperature": 0, "echo": True, "stream": True}).text
    chunks = [json.loads(x[6:])["choices"] for x in streamed.splitlines() if x.startswith("data: {")]
    assert "".join(c[0]["text"] for c in chunks if c[0]["index"] == 0).startswith("DeepSpeed is")


def test_a_failure_in_one_requests_own_work_answers_it_alone():
    """The worker (in this process, on random:tiny): a request whose own step fails (its stop check here: stop
    strings that are not strings, which the HTTP API refuses, so no HTTP request can do it) gets an error; the rows
    beside it finish their answers, and the worker serves the next request."""
    model, tok, _ = m.init_engine(m.DeployConfig(model_name="random:tiny", backend="hf", device="cpu"))
    worker = Worker(SlotBatch(model, ServeConfig(max_num_seqs=4, max_model_len=64)), tok, 4, 1)
    worker.thread.start()
    got = {name: queue.Queue() for name in ("a", "bad", "b", "next")}

    def request(name, **kw):
        return Request(tok("DeepSpeed is")["input_ids"], 12, ignore_eos=True, emit=got[name].put, **kw)

    def answer(name):
        events = []
        while not events or not ({"finish_reason", "error"} & set(events[-1])):
            events.append(got[name].get(timeout=60))
        return events
    worker.submit([request("a"), request("bad", stop=[7]), request("b")])
    a, bad, b = answer("a"), answer("bad"), answer("b")
    worker.submit([request("next")])
    after = answer("next")
    worker.stopping.set()
    worker.thread.join(timeout=60)
    assert "TypeError" in bad[-1]["error"] and worker.error is None
    assert [x["finish_reason"] for x in (a[-1], b[-1], after[-1])] == ["length"] * 3
    assert "".join(e.get("text", "") for e in a) == "".join(e.get("text", "") for e in b) != ""
    assert worker.metrics.counts["requests_failed_total"] == 1 and not worker.live


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith(f"ds_bnb_{name} ")))


def test_a_burst_to_an_idle_server_shares_one_prefill():
    """--admit-wait-ms: 8 requests sent at once to an idle server with 8 rows are admitted in one prefill (the
    first waits for the others; a full set of rows ends the wait); a lone request waits the whole time, no more."""
    s = Server("--model", "random:tiny", "--max-num-seqs", "8", "--max-queue", "8", "--admit-wait-ms", "1000")
    try:
        before = {n: metric(s.url, n) for n in ("prefills_total", "prefill_rows_total", "queue_seconds_sum")}
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda i: complete(s.url, prompt=f"burst {i}", max_tokens=6, ignore_eos=True),
                               range(8)))
        burst = time.monotonic() - t0
        assert [r.json()["usage"]["completion_tokens"] for r in rs] == [6] * 8
        assert metric(s.url, "prefills_total") == before["prefills_total"] + 1
        assert metric(s.url, "prefill_rows_total") == before["prefill_rows_total"] + 8
        assert burst < 1.0                                   # the rows were full: nobody waited the whole second
        queued = metric(s.url, "queue_seconds_sum")
        assert complete(s.url, prompt="alone", max_tokens=2).status_code == 200
        assert 0.99 <= metric(s.url, "queue_seconds_sum") - queued < 1.5
        assert metric(s.url, "prefills_total") == before["prefills_total"] + 2
        assert s.stop() == 0, s.stderr[-2000:]
    finally:
        s.kill()


@pytest.mark.parametrize("wait_ms", [0, 300])
def test_admission_waits_for_company_only_while_idle(wait_ms):
    """The worker's iterations, one at a time (no thread): idle, a request is prefilled with those that come within
    --admit-wait-ms (0: alone, at once); while a row decodes, a newcomer never holds the step up: it joins when it
    has waited --admit-wait-ms (0: at the next step)."""
    model, tok, _ = m.init_engine(m.DeployConfig(model_name="random:tiny", backend="hf", device="cpu"))
    worker = Worker(SlotBatch(model, ServeConfig(max_num_seqs=4, max_model_len=64)), tok, 4, 1, wait_ms)
    counts, wait = worker.metrics.counts, wait_ms / 1000

    def request():
        return Request(tok("DeepSpeed is")["input_ids"], 40, ignore_eos=True, emit=lambda ev: None)

    def timed_iteration():
        t0 = time.perf_counter()
        worker.iteration()
        return time.perf_counter() - t0
    # idle: one request now, three more 0.1 s later (they fill the 4 rows)
    first = request()
    worker.submit([first])
    later = threading.Timer(0.1, worker.submit, [[request() for _ in range(3)]])
    later.start()
    timed_iteration()
    later.join()
    if wait_ms:                                          # the rows are full: the wait ends before its time
        assert (counts["prefills_total"], counts["prefill_rows_total"]) == (1, 4)
        assert 0.1 <= first.admitted_at - first.arrived < wait
    else:
        assert (counts["prefills_total"], counts["prefill_rows_total"]) == (1, 1)
        timed_iteration()                                    # the other three: a prefill of their own
        assert (counts["prefills_total"], counts["prefill_rows_total"]) == (2, 4)
    # two rows decode, two are free: a newcomer is held while the steps go on, then joins
    worker.live[2].cancelled = worker.live[3].cancelled = True
    newcomer = request()
    worker.submit([newcomer])
    prefills, tokens = counts["prefills_total"], counts["generation_tokens_total"]
    took = timed_iteration()
    if wait_ms:
        assert counts["prefills_total"] == prefills and counts["generation_tokens_total"] == tokens + 2
        assert took < wait and worker.placing == [newcomer]
        time.sleep(wait)
        timed_iteration()
        assert newcomer.admitted_at - newcomer.arrived >= wait
    assert counts["prefills_total"] == prefills + 1 and counts["prefill_rows_total"] == 5
    assert sorted(worker.live) == [0, 1, 2] and not worker.placing


def test_a_client_that_stops_sending_is_closed_while_others_are_served(server):
    """--read-timeout 2: a connection that sends nothing, stops in its headers or in its body, or sends its headers a
    byte at a time, is closed about 2 s after it began; other clients are answered meanwhile, and a request whose
    body comes in two parts within the time is answered."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    t0 = time.monotonic()
    stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    for sock, data in zip(stalled, [b"", head, head + b"Content-Length: 100\r\n\r\n{\"prompt\": "]):
        sock.sendall(data)
    assert complete(server.url, prompt="DeepSpeed is", max_tokens=3).status_code == 200
    assert time.monotonic() - t0 < 1.5
    for sock in stalled:                                     # still open: the deadline is not up
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
    body = json.dumps({"prompt": "DeepSpeed is", "max_tokens": 2, "temperature": 0}).encode()
    split = socket.create_connection(("127.0.0.1", server.port))
    split.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:10])
    time.sleep(0.5)
    split.sendall(body[10:])
    split.settimeout(30)
    assert split.recv(100).startswith(b"HTTP/1.1 200")
    drip = socket.create_connection(("127.0.0.1", server.port))
    with pytest.raises(OSError):                             # slowloris: a byte every 0.2 s until it is closed
        for byte in head * 5:
            drip.send(bytes([byte]))
            time.sleep(0.2)
    assert time.monotonic() - t0 < 8
    for sock in stalled:
        sock.setblocking(True)
        sock.settimeout(10)
        assert sock.recv(1) == b""
    assert time.monotonic() - t0 < 8 and httpx.get(server.url + "/health").status_code == 200


def test_a_tiny_temperature_samples_greedily_and_the_server_keeps_serving(server):
    """logits / 1e-300 would overflow the sampler and end the worker: below 1e-5 the row is greedy (as vLLM's)."""
    r = complete(server.url, prompt="DeepSpeed is", max_tokens=6, temperature=1e-300, seed=3)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline_text("DeepSpeed is", 6)
    r = complete(server.url, prompt="DeepSpeed is", max_tokens=6, temperature=1e-5, seed=2 ** 64 - 1)
    assert r.status_code == 200 and httpx.get(server.url + "/health").status_code == 200


def test_wrong_paths_methods_and_oversized_bodies_answer_in_openai_shape(server):
    """A body over --max-body-bytes is 413 whether it says its length or comes in chunks (counted as it arrives:
    it was read whole, then tokenized); bytes that are not HTTP get a 400 in OpenAI's shape too (uvicorn's is text)."""
    big = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "' + b"x" * (5 * 2 ** 20) + b'"}',
                     headers={"Content-Type": "application/json"}, timeout=60)
    chunked = httpx.post(server.url + "/v1/completions", content=(b"x" * 2 ** 16 for _ in range(80)),
                         headers={"Content-Type": "application/json"}, timeout=60)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"HELLO THERE\r\n\r\n")
        head, _, body = sock.makefile("rb").read().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    for r, status in [(httpx.get(server.url + "/v1/nothing"), 404), (httpx.get(server.url + "/v1/completions"), 405),
                      (big, 413), (chunked, 413)]:
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    assert "--max-body-bytes" in big.json()["error"]["message"] and "--max-body-bytes" in chunked.text
    assert complete(server.url, prompt="DeepSpeed is", max_tokens=3).status_code == 200


def test_a_full_queue_is_429_and_the_rest_complete(server):
    """12 long requests at once: 4 rows and 4 waiting places take 8; the others are refused with Retry-After."""
    with ThreadPoolExecutor(12) as pool:
        rs = list(pool.map(lambda i: complete(server.url, prompt=f"busy {i}", max_tokens=400, ignore_eos=True),
                           range(12)))
    codes = sorted(r.status_code for r in rs)
    assert set(codes) == {200, 429} and codes.count(200) >= 8
    refused = next(r for r in rs if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
    assert all(r.json()["usage"]["completion_tokens"] == 400 for r in rs if r.status_code == 200)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_row_within_a_second(server, stream):
    """Streamed or not: a non-streaming client's leaving was never seen (Starlette's @app.middleware hid it from
    is_disconnected()), so its row decoded on to max_tokens."""
    body = json.dumps({"prompt": "leave", "max_tokens": 1500, "ignore_eos": True, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def running():
        return "ds_bnb_requests_running 0" not in httpx.get(server.url + "/metrics").text
    deadline = time.monotonic() + 30
    while not running() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert running()                                  # 1500 tokens: seconds to go
    sock.close()
    left = time.monotonic()
    while running() and time.monotonic() - left < 1.0:
        time.sleep(0.02)
    assert not running(), "the abandoned request still holds its row 1 s after its client left"
    assert complete(server.url, prompt="DeepSpeed is", max_tokens=4).status_code == 200


@pytest.fixture(scope="module")
def chat_server():
    """A trained chat model (real:smollm2-135m, converted once by the README's setup command), 2 rows."""
    from setup import real_model
    real_model.convert("real:smollm2-135m")
    s = Server("--model", "real:smollm2-135m", "--max-num-seqs", "2", "--max-model-len", "256")
    yield s
    assert s.stop() == 0, s.stderr[-2000:]


def chat(url, stream=False, **body):
    """A chat answer's text (streamed: its chunks' texts), at temperature 0."""
    body = {"max_tokens": 24, "temperature": 0, **body}
    if not stream:
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        return [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]


def test_chat_goes_through_the_models_chat_template(chat_server):
    """/v1/chat/completions applies the template and answers what the lesson answers for the same user message,
    streamed or not; logprobs (OpenAI chat's shape) are the lesson's model's."""
    question = "What is tensor parallelism? Answer in one sentence."
    client, messages = OpenAI(base_url=chat_server.url + "/v1", api_key="none"), [{"role": "user", "content": question}]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    config = m.DeployConfig(model_name="real:smollm2-135m", backend="hf", device="cpu", max_new_tokens=24)
    model, tok, _ = m.init_engine(config)
    offline = m.generate(model, tok, [question], config)["texts"][0]
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == offline
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == offline
    lp = chat(chat_server.url, messages=messages, max_tokens=6, logprobs=True, top_logprobs=3).json()
    content = lp["choices"][0]["logprobs"]["content"]
    assert len(content) == lp["usage"]["completion_tokens"] == 6
    assert "".join(x["token"] for x in content) == lp["choices"][0]["message"]["content"] == offline[:len(
        lp["choices"][0]["message"]["content"])]
    for x in content:
        assert set(x) == {"token", "logprob", "bytes", "top_logprobs"} and x["bytes"] == list(x["token"].encode())
        assert len(x["top_logprobs"]) == 3 and x["top_logprobs"][0]["logprob"] == x["logprob"]     # greedy
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    assert content[0]["logprob"] == pytest.approx(first.max().item(), abs=1e-4)
    assert [x["logprob"] for x in content[0]["top_logprobs"]] == pytest.approx(first.topk(3).values.tolist(),
                                                                             abs=1e-4)
    for body, words in [({"top_logprobs": 21, "logprobs": True}, "less than or equal to 20"),
                        ({"top_logprobs": 2}, "needs logprobs: true"),
                        ({"logprobs": True, "stream": True}, "not supported with stream")]:
        bad = httpx.post(chat_server.url + "/v1/chat/completions", json={"messages": messages, **body}, timeout=60)
        assert bad.status_code == 400 and words in bad.json()["error"]["message"], bad.text


def test_a_character_cut_between_tokens_is_sent_whole(chat_server):
    """A Chinese answer: its characters' bytes are cut between tokens (the logprobs show tokens that are no whole
    character); streamed, each chunk holds only whole characters, and the chunks make the answer not streamed; an
    answer cut by max_tokens inside a character leaves that character out."""
    messages = [{"role": "user", "content": "用中文写一首关于春天的短诗。"}]
    r = chat(chat_server.url, messages=messages, max_tokens=40, logprobs=True).json()["choices"][0]
    chunks = chat(chat_server.url, stream=True, messages=messages, max_tokens=40)
    parts = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert any(x["token"] == "\ufffd" for x in r["logprobs"]["content"])        # cuts exist in this answer
    assert "".join(parts) == r["message"]["content"] and len(r["message"]["content"]) > 10
    assert not any("\ufffd" in p for p in parts + [r["message"]["content"]])


def test_sigterm_finishes_the_answer_in_flight_then_exits_0():
    s = Server(*TINY)
    try:
        got = {}

        def stream():
            with httpx.stream("POST", s.url + "/v1/completions", timeout=120,
                              json={"prompt": "x", "max_tokens": 600, "ignore_eos": True, "stream": True}) as r:
                got["lines"] = [l for l in r.iter_lines() if l.startswith("data:")]
        t = threading.Thread(target=stream)
        t.start()
        time.sleep(1.0)
        code = s.stop()
        t.join(timeout=60)
    finally:
        s.kill()
    assert code == 0, s.stderr[-2000:]
    assert got["lines"][-1] == "data: [DONE]"
    assert json.loads(got["lines"][-2][6:])["choices"][0]["finish_reason"] == "length"


def test_two_cpu_ranks_serve_under_the_launcher():
    """Tensor parallel: rank 0 serves HTTP and tells rank 1 every step; the answer is the single-process one;
    SIGTERM to rank 0 stops both ranks and the launcher exits 0."""
    s = Server(*TINY, "--dtype", "fp32", ranks=2)
    try:
        texts = [complete(s.url, prompt=p, max_tokens=10).json()["choices"][0]["text"] for p in ("DeepSpeed is", "a")]
        code = s.stop()
    finally:
        s.kill()
    assert texts[0] == offline_text("DeepSpeed is", 10) and code == 0, s.stderr[-3000:]


def test_a_rank_that_dies_ends_the_server():
    """Under the launcher a rank that dies (killed here) takes the others with it: the launcher exits non-zero
    instead of leaving rank 0 waiting in its next collective."""
    s = Server(*TINY, "--dtype", "fp32", ranks=2)
    try:
        assert complete(s.url, prompt="a", max_tokens=4).status_code == 200
        import os
        os.kill(s.pid(rank=1), signal.SIGKILL)
        code = s.proc.wait(timeout=120)
    finally:
        s.kill()
    assert code != 0


@pytest.mark.parametrize("quant", ["none", "8bit", "4bit"])
def test_slot_batch_moves_rows_and_keeps_each_ones_tokens(quant):
    """The batching itself, without HTTP, for each kind of model the server takes: a request joins while another
    decodes, a long prompt moves the cache right, the end of the cache moves it left; each row's greedy tokens equal
    generate() run alone on the same model. The cache's layers share one write position (fast_decode.py's
    one-counter cache), which the moves set once."""
    config = m.DeployConfig(model_name="random:tiny", backend="hf", device="cpu", quant=quant)
    model, _, info = m.init_engine(config)
    assert info.quant == quant
    batch = SlotBatch(model, ServeConfig(max_num_seqs=2, max_model_len=39))
    assert len({id(layer.cumulative_length) for layer in batch.cache.layers}) == 1

    def alone(prompt, n):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    a, b = [5, 6, 7], list(range(10, 32))                       # b (22 tokens) arrives when the pointer is at 8
    got = {0: [int(batch.admit([0], [a])[0].argmax())], 1: []}
    for step in range(45):
        live = [r for r in (0, 1) if (r == 0 and len(got[0]) < 30) or (r == 1 and 0 < len(got[1]) < 15)]
        if step == 5:
            got[1].append(int(batch.admit([1], [b])[0].argmax()))
            live = [0, 1]
        if not live:
            break
        tokens = torch.tensor([got[0][-1], got[1][-1] if got[1] else 0])
        logits = batch.step(tokens, live)
        for r in live:
            got[r].append(int(logits[r].argmax()))
    assert got[0][:30] == alone(a, 30) and got[1][:15] == alone(b, 15)


def test_a_compiled_prefill_is_one_graph_for_every_shape_and_equals_eager():
    """--prefill compiled (auto's choice where the step is compiled): one graph, compiled at start, takes any count
    of rows and any prompt length (one prompt, one token) without compiling again, and what it leaves (the first
    logits, the cache the steps read) equals the eager prefill's."""
    config = m.DeployConfig(model_name="random:tiny", backend="hf", device="cpu")
    model, _, _ = m.init_engine(config)
    compiled, eager = (SlotBatch(model, ServeConfig(max_num_seqs=4, max_model_len=40, prefill=p))
                       for p in ("compiled", "eager"))
    assert (compiled.prefill_mode, eager.prefill_mode) == ("compiled", "eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows, prompts in [([0], [[5]]), ([1], [[5, 6, 7]]), ([0, 2, 3], [[1], list(range(3, 20)), [9, 9]]),
                              ([1, 3], [[4, 4], [7]])]:
            torch.testing.assert_close(compiled.admit(rows, prompts), eager.admit(rows, prompts))
        for token in range(3):
            tokens = torch.full((4,), token)
            torch.testing.assert_close(compiled.step(tokens, [0, 1, 2, 3]), eager.step(tokens, [0, 1, 2, 3]))


def test_cli_refusals_are_one_sentence(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [(["--iters", "2"], "unrecognized arguments: --iters 2"),     # the offline run's flags are no flags here
             (["--port", str(busy.getsockname()[1])], "pick another --port"),
             (["--max-model-len", "99999"], "beyond the model's 2048 positions"),
             (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
             (["--admit-wait-ms", "-1"], "--admit-wait-ms must be between 0 and 1000"),
             (["--max-model-len", "20", "--max-new-tokens", "8"], "larger --max-model-len"),
             (["--device", "cpu", "--step", "cuda-graph"], "needs a GPU; on a CPU use --step eager"),
             (["--quant", "8bit", "--max-num-seqs", "2"], "depend on the other rows"),
             (["--tp-size", "2", "--prefill", "compiled"], "--prefill compiled runs on one rank")]
    for args, words in cases:
        r = run_cli("--model", "random:tiny", *args, script=SERVE)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-800:])
    busy.close()
    r = run_cli("--model", "random:tiny", script=SERVE, prelude=HIDE.format(name="fastapi"))
    assert r.returncode == 2 and "pip install -r requirements-serve.txt" in r.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("step", ["compiled", "cuda-graph"])
def test_gpu_step_modes_serve_verified_batched_answers(step):
    """On a GPU the batch's step is compiled or captured: the lesson verifies it at start, 8 concurrent requests
    over 4 rows (fp32: no rounding from a row's place) each get their answer alone, and the server exits 0."""
    s = Server("--model", "random:tiny", "--backend", "hf", "--dtype", "fp32", "--max-num-seqs", "4",
               "--max-model-len", "128", "--step", step)
    try:
        health = httpx.get(s.url + "/health").json()
        prompts, sizes = [f"gpu {i}: " + "y" * (2 * i) for i in range(8)], [10 + 9 * i for i in range(8)]
        alone = [complete(s.url, prompt=p, max_tokens=n, ignore_eos=True).json() for p, n in zip(prompts, sizes)]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda pn: complete(s.url, prompt=pn[0], max_tokens=pn[1], ignore_eos=True),
                                     zip(prompts, sizes)))
        code = s.stop()
    finally:
        s.kill()
    assert health["engine"]["decode"] == step and health["engine"]["verify"]["passed"]
    assert health["prefill"] == ("compiled" if step == "compiled" else "eager")     # auto: as the step
    assert [a["usage"]["completion_tokens"] for a in alone] == sizes
    assert [r.json()["choices"][0]["text"] for r in together] == [a["choices"][0]["text"] for a in alone]
    assert code == 0, s.stderr[-2000:]


def test_load_generator_reports_each_level_and_checks_the_answers(server, tmp_path):
    """measure/bench_serve.py against the server: every level's counts, rates and latency percentiles, each answer
    checked against its prompt sent alone (fp32 on a CPU: equal), nothing mixed up; bad flags and a server that is
    not there are one sentence."""
    bench = ROOT / "measure" / "bench_serve.py"
    r = run_cli("--url", server.url, "--concurrency", "1", "12", "--requests", "3", "12", "--max-tokens", "40",
                "--distinct", "3", "--json", str(tmp_path / "b.json"), script=bench)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "b.json").read_text())
    one, many = report["levels"]
    assert report["server"]["model"] == "random:tiny" and report["settings"]["max_tokens"] == 40
    assert (one["ok"], one["rejected_429"], one["failed"]) == (3, 0, 0) and one["answers_equal_alone"] == 3
    assert many["ok"] + many["rejected_429"] == 12 and many["rejected_429"] >= 1 and many["failed"] == 0
    assert many["answers_equal_alone"] == many["ok"] and many["answers_mixed_up"] == 0
    for level in (one, many):
        assert level["output_tokens_per_s"] > 0 and 0 < level["ttft_s"]["p50"] <= level["ttft_s"]["p99"]
        assert level["tpot_s"]["p50"] > 0 and level["itl_s"]["p50"] > 0
    # the server's own account of each level (its /metrics): one prefill a request alone, several rows a prefill
    # at most under load, and TTFT's parts
    assert one["server"]["prefills"] == 3 and one["server"]["rows_per_prefill"] == 1
    assert 1 <= many["server"]["rows_per_prefill"] <= 4 and many["server"]["prefills"] * 4 >= many["ok"]
    assert one["server"]["queue_s_mean"] >= 0 and one["server"]["prefill_s_mean"] > 0
    assert 0 < one["server"]["prefill_device_s_mean"] <= one["server"]["prefill_s_mean"] + 1e-6
    bad = run_cli("--requests", "0", script=bench)
    assert bad.returncode == 2 and "--requests values must be at least 1" in bad.stderr
    gone = run_cli("--url", f"http://127.0.0.1:{free_port()}", "--requests", "1", script=bench)
    assert gone.returncode == 1 and "is the server running" in gone.stderr and "Traceback" not in gone.stderr
