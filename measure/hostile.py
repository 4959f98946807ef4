#!/usr/bin/env python3
"""measure/hostile.py — 第十节 服务化: a battery of hostile requests against a running extensions/serve.py (or any
OpenAI-compatible server). It passes when the server holds every one.

  python extensions/serve.py --model random:tiny --max-model-len 1024 --read-timeout 2 --port 8000 &
  python measure/hostile.py --url http://127.0.0.1:8000 --read-timeout 2 --json hostile.json

A server open to a network gets whatever a careless or hostile client sends; one such request must never hurt the
others or the process. Five classes of cases (--classes picks some):
  fields   every request field at its extremes and of the wrong type: temperature 1e-300, seed 2**70, NaN, top_p
           1e-30, token ids outside the vocabulary, lone surrogates, JSON nested 100 000 deep, bytes that are not
           UTF-8, ... A valid extreme is answered (200), an invalid one refused (400), never a 500.
  body     bodies beyond --max-body-bytes, with a Content-Length and in chunks (no length to check first), of
           --upload-mb MB, while /health is timed: it must answer within --health-limit s (no client may hold up
           the others), and the body is refused with 413.
  clients  connections that stop in their headers or body, or send a byte every 0.2 s: closed after the server's
           --read-timeout; clients that go away while their answer is generated (streamed or not, running or
           waiting for a row): their rows are free within --free-within s (/metrics' running and waiting gauges).
  burst    2 x (rows + --max-queue) + 2 requests at once: the excess is refused with 429, the rest answered, at most
           rows + --max-queue accepted, none hangs, and no row is left taken afterwards.
  routes   wrong methods, unknown paths, path traversal, a 100 KB URL, a 100 KB header, bytes that are not HTTP.
A case holds when its status is one it expects, every 4xx/5xx answer has OpenAI's error shape ({"error":
{"message", "type", "param", "code"}}), nothing waits beyond --timeout, the case's own check passes, and /health
answers 200 after it. A table is printed as the cases run; --json writes every case. Exit status: 0 when every
case held, 1 when one did not (or the server died: the cases after it are not run), 2 for bad flags or when no
server answers at --url. A few lines of the table:

  class    case                                         expect      got shape  time_s alive held
  fields   temperature 1e-300 (inside 0-2), sampled        200      200     -    0.02   yes  yes
  body     --upload-mb body in chunks (no length), /   413/closed      413   yes    0.24   yes  yes
  clients  non-streaming clients vanish while running     gone     gone     -    0.56   yes  yes
  routes   a request line that is not HTTP                 400      400   yes    0.00   yes  yes
  90/90 cases held
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import select
import socket
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402   (its report helpers only: no torch is imported)

CLASSES = ("fields", "body", "clients", "burst", "routes")
DRIP_S = 0.2            # slowloris: the pause between two bytes


@dataclasses.dataclass
class Answer:
    """What came back: an HTTP status, or instead "closed" (the server closed the connection without an answer),
    "timeout" (nothing within --timeout) or "refused" (no server). problem: why the case's own check failed."""
    status: int | str
    body: bytes = b""
    headers: dict = dataclasses.field(default_factory=dict)
    problem: str | None = None
    facts: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Case:
    cls: str
    name: str
    expect: tuple               # the statuses that hold
    run: object                 # run(target) -> Answer


def openai_shaped(body: bytes) -> bool:
    """OpenAI's error object: {"error": {"message": str, "type": str, "param": ..., "code": ...}}."""
    try:
        e = json.loads(body)["error"]
        return isinstance(e["message"], str) and isinstance(e["type"], str) and {"param", "code"} <= set(e)
    except (ValueError, KeyError, TypeError):
        return False


def parse(raw: bytes) -> Answer:
    """An HTTP/1.1 answer read off a socket (Connection: close, so it ends where the server closed)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return Answer("closed", raw)
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return Answer(status, body, headers)


# ----------------------------------------------------------------------------------------------------------------
# The server under test, and the ways to talk to it: httpx for well-formed HTTP, a raw socket for the rest.

class Target:
    def __init__(self, args):
        import httpx
        self.args, self.url = args, args.url.rstrip("/")
        u = urllib.parse.urlsplit(self.url)
        self.host, self.port = u.hostname, u.port or 80
        # Idle connections are reused for at most 1 s: uvicorn closes a kept-alive connection after 5 s idle and
        # httpx would reuse one for up to 5 s, so a request sent on it just then finds it closed with no answer (a
        # case right after a 5 s burst did), which is the client's race, not the server's failure.
        self.http = httpx.Client(timeout=args.timeout, limits=httpx.Limits(max_connections=None, keepalive_expiry=1.0))
        health = self.http.get(self.url + "/health").json()
        self.health = {k: health.get(k) for k in ("model", "max_num_seqs", "max_model_len")}
        self.rows = health.get("max_num_seqs") or 1
        self.max_len = health.get("max_model_len") or 2048

    def call(self, method: str, path: str, body=None, headers=None) -> Answer:
        """One request; body: a dict (sent as JSON), a str or bytes (sent as they are, as JSON)."""
        import httpx
        kw = {"json": body} if isinstance(body, (dict, list)) else {} if body is None else {
            "content": body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body,
            "headers": {"Content-Type": "application/json"}}
        if headers is not None:
            kw["headers"] = headers
        try:
            r = self.http.request(method, self.url + path, **kw)
        except httpx.TimeoutException:
            return Answer("timeout")
        except httpx.ConnectError:
            return Answer("refused")
        except httpx.TransportError:
            return Answer("closed")
        return Answer(r.status_code, r.content, dict(r.headers))

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=self.args.timeout)

    def raw(self, parts, timeout=None) -> Answer:
        """Send bytes as they are (an iterable: one part after another) and read the answer until the server
        closes. A server that answers early (413) and closes ends the sending: the answer is read then."""
        try:
            sock = self.connect()
        except OSError:
            return Answer("refused")
        with sock:
            try:
                for part in [parts] if isinstance(parts, bytes) else parts:
                    sock.sendall(part)
            except OSError:
                pass
            return self.read(sock, time.monotonic() + (timeout or self.args.timeout))

    @staticmethod
    def read(sock, deadline: float) -> Answer:
        got = b""
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(1 << 16)
            except socket.timeout:
                return Answer("timeout", got)
            except OSError:                     # reset: the server closed with our data unread
                break
            if not chunk:
                break
            got += chunk
        return parse(got) if got else Answer("closed")

    def head(self, fields: bytes, path="/v1/completions") -> bytes:
        """A POST's request line and headers, `fields` (header lines) among them."""
        return (b"POST %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nContent-Type: application/json\r\n%s"
                b"\r\n" % (path.encode(), self.host.encode(), fields))

    def post_raw(self, body: bytes) -> bytes:
        return self.head(b"Content-Length: %d\r\n" % len(body)) + body

    def gauges(self) -> tuple:
        """/metrics: requests running (rows taken) and waiting."""
        text = self.http.get(self.url + "/metrics").text
        value = {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l and not l.startswith("#")}
        p = self.args.metric_prefix
        return value.get(p + "requests_running", math.nan), value.get(p + "requests_waiting", math.nan)

    def idle_after(self, limit: float) -> float:
        """Seconds until no row is taken and nothing waits, polled every 20 ms; inf if not within `limit`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 <= limit:
            if self.gauges() == (0, 0):
                return time.monotonic() - t0
            time.sleep(0.02)
        return math.inf

    def alive(self) -> bool:
        """/health answers 200 (asked twice, a second apart, before the server is called dead)."""
        for _ in range(2):
            if self.call("GET", "/health").status == 200:
                return True
            time.sleep(1)
        return False


# ----------------------------------------------------------------------------------------------------------------
# The cases. Each returns an Answer; the battery then checks its status, its shape and that /health answers.

def post(body, path="/v1/completions"):
    """A POST of `body` over the defaults (a short greedy completion); a str is sent as it is."""
    if isinstance(body, dict):
        body = {"prompt": "x", "max_tokens": 4, "temperature": 0, **body} if path == "/v1/completions" else body
    def run(t):
        a = t.call("POST", path, body)
        if a.status == 200 and b'"choices"' not in a.body and b"data:" not in a.body:
            a.problem = "a 200 that is no completion"
        return a
    return run


def field_cases() -> list[Case]:
    ok, bad = (200,), (400,)
    cases = [
        ("temperature 1e-300 (inside 0-2), sampled", {"temperature": 1e-300, "seed": 1}, ok),
        ("temperature 0", {"temperature": 0}, ok),
        ("temperature 2", {"temperature": 2, "seed": 1}, ok),
        ("temperature -0.0", {"temperature": -0.0}, ok),
        ("temperature 2.000001", {"temperature": 2.000001}, bad),
        ("temperature NaN (a JSON extension)", '{"prompt": "x", "max_tokens": 4, "temperature": NaN}', bad),
        ("temperature \"NaN\" (a string)", {"temperature": "NaN"}, bad),
        ("temperature \"hot\"", {"temperature": "hot"}, bad),
        ("top_p Infinity", '{"prompt": "x", "max_tokens": 4, "top_p": Infinity}', bad),
        ("top_p 0", {"top_p": 0, "temperature": 1}, bad),
        ("top_p 1e-30, sampled", {"top_p": 1e-30, "temperature": 1, "seed": 1}, ok),
        ("seed 2**70, sampled", {"seed": 2 ** 70, "temperature": 1}, bad),
        ("seed -1, sampled", {"seed": -1, "temperature": 1}, ok),
        ("seed 2**64-1, sampled", {"seed": 2 ** 64 - 1, "temperature": 1}, ok),
        ("seed 1.5", {"seed": 1.5}, bad),
        ("max_tokens 0 (no echo)", {"max_tokens": 0}, bad),
        ("max_tokens -1", {"max_tokens": -1}, bad),
        ("max_tokens 10**30", {"max_tokens": 10 ** 30}, bad),
        ("max_tokens 1e400 (inf once parsed)", '{"prompt": "x", "max_tokens": 1e400}', bad),
        ("max_tokens \"ten\"", {"max_tokens": "ten"}, bad),
        ("stop: 10 000 strings", {"stop": ["a"] * 10000}, bad),
        ("stop: one string of 100 000 characters", {"stop": ["s" * 100000]}, ok),
        ("stop: the empty string", {"stop": [""]}, ok),
        ("stop: unicode and NUL", {"stop": ["\u2603", "\U0001F600", "\x00"]}, ok),
        ("stop: 5", {"stop": 5}, bad),
        ("n 2", {"n": 2}, bad),
        ("logprobs 99", {"logprobs": 99}, bad),
        ("logprobs true", {"logprobs": True}, bad),
        ("stream \"yes\"", {"stream": "yes"}, bad),
        ("echo 1", {"echo": 1}, bad),
        ("model 5", {"model": 5}, bad),
        ("an unknown field", {"frobnicate": {"a": [1, 2]}}, (200, 400)),
        ("prompt empty", {"prompt": ""}, bad),
        ("prompt null", {"prompt": None}, bad),
        ("prompt missing", '{"max_tokens": 4}', bad),
        ("prompt of 256 KB (beyond the positions)", {"prompt": "x " * 131072}, bad),
        ("prompt nested [[[1]]]", {"prompt": [[[1]]]}, bad),
        ("prompt [strings and ids]", {"prompt": ["x", [1, 2]]}, bad),
        ("prompt token id 10**9", {"prompt": [10 ** 9]}, bad),
        ("prompt token id -1", {"prompt": [-1]}, bad),
        ("prompt token id 2**40", {"prompt": [2 ** 40]}, bad),
        ("prompt token id 2**70", {"prompt": [2 ** 70]}, bad),
        ("prompt: 10 000 prompts", {"prompt": [[1]] * 10000}, bad),
        ("prompt with control characters, RTL and emoji", {"prompt": "\x00\x1b[31m\u202e\U0001F600\ufeff"}, ok),
        ("prompt a lone surrogate (\\ud800)", '{"prompt": "a\\ud800b", "max_tokens": 4}', bad),
        ("prompt as token ids, echo + logprobs 5, max_tokens 0", {"prompt": [1, 2, 3], "echo": True,
                                                                 "logprobs": 5, "max_tokens": 0}, ok),
        ("streamed, temperature 1e-300", {"stream": True, "temperature": 1e-300, "seed": 3}, ok),
        ("JSON nested 100 000 deep", "[" * 100000, bad),
        ("a JSON list, not an object", "[1, 2]", bad),
        ("a body that is not JSON", "hello", bad),
        ("a body that is not UTF-8", b'{"prompt": "\xff\xfe", "max_tokens": 4}', bad),
        ("an empty body", b"", bad),
    ]
    out = [Case("fields", name, expect, post(body)) for name, body, expect in cases]
    out += [Case("fields", "chat: messages \"hi\"", bad, post({"messages": "hi"}, "/v1/chat/completions")),
            Case("fields", "chat: role \"robot\", content null", bad,
                 post({"messages": [{"role": "robot", "content": None}]}, "/v1/chat/completions"))]

    def fills_every_position(t):           # the longest request there is: prompt + max_tokens = --max-model-len
        half = t.max_len // 2
        return post({"prompt": [1] * half, "max_tokens": t.max_len - half, "ignore_eos": True})(t)

    def no_content_type(t):
        body = b'{"prompt": "x", "max_tokens": 4}'
        return t.raw(t.post_raw(body).replace(b"Content-Type: application/json\r\n", b""))
    return out + [Case("fields", "prompt + max_tokens = every position", ok, fills_every_position),
                  Case("fields", "no Content-Type", (200, 400), no_content_type)]


def timing_health(t, fn) -> Answer:
    """fn() while /health is asked every 50 ms from another connection; the slowest answer goes in the facts
    (a failed one counts as inf), and it must be within --health-limit."""
    import httpx
    stop, times = threading.Event(), []

    def poll():
        with httpx.Client(timeout=t.args.timeout) as c:
            while not stop.is_set() or len(times) < 3:
                t0 = time.perf_counter()
                try:
                    ok = c.get(t.url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                times.append(time.perf_counter() - t0 if ok else math.inf)
                time.sleep(0.05)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        a = fn()
    finally:
        stop.set()
        poller.join()
    a.facts.update(health_max_s=max(times), health_polls=len(times))
    if max(times) > t.args.health_limit:
        a.problem = f"/health took {max(times):.2f} s (limit {t.args.health_limit} s)"
    return a


def body_cases() -> list[Case]:
    def upload(chunked: bool):
        def run(t):
            size = t.args.upload_mb * 2 ** 20
            body = b'{"prompt": "' + b"x" * (size - 30) + b'", "max_tokens": 4}'
            pieces = [body[i:i + 2 ** 16] for i in range(0, len(body), 2 ** 16)]
            if not chunked:
                parts = [t.head(b"Content-Length: %d\r\n" % len(body)), *pieces]
            else:                       # no length to refuse it by: the server must count what arrives
                parts = [t.head(b"Transfer-Encoding: chunked\r\n"),
                         *(b"%x\r\n%s\r\n" % (len(x), x) for x in pieces), b"0\r\n\r\n"]
            t0 = time.monotonic()
            a = timing_health(t, lambda: t.raw(parts))
            a.facts["answered_after_s"] = time.monotonic() - t0
            return a
        return run

    def just_under(t):              # not refused for its size: tokenized, found too long; others go on meanwhile
        body = b'{"prompt": "' + b"x " * ((t.args.max_body_bytes - 64) // 2) + b'", "max_tokens": 4}'
        return timing_health(t, lambda: t.call("POST", "/v1/completions", body))

    def length(value: bytes):
        return lambda t: t.raw(t.head(b"Content-Length: " + value + b"\r\n"))
    mb = "--upload-mb"
    return [Case("body", f"{mb} body with its Content-Length, /health timed", (413, "closed"), upload(False)),
            Case("body", f"{mb} body in chunks (no length), /health timed", (413, "closed"), upload(True)),
            Case("body", "--max-body-bytes + 1 bytes", (413,),
                 lambda t: t.call("POST", "/v1/completions", b" " * (t.args.max_body_bytes + 1))),
            Case("body", "a prompt just under --max-body-bytes, /health timed", (400,), just_under),
            Case("body", "Content-Length: 10**20", (400, 413), length(b"100000000000000000000")),
            Case("body", "Content-Length: -1", (400,), length(b"-1")),
            Case("body", "Content-Length: abc", (400,), length(b"abc"))]


def stalled(parts: list[bytes], drip=False):
    """A connection that sends `parts` (drip: one byte every DRIP_S s) and then nothing: the server must close it
    within its --read-timeout (+ 2 s) of the first byte, and answer /health meanwhile."""
    def run(t):
        limit = t.args.read_timeout + 2
        sock, t0 = t.connect(), time.monotonic()
        with sock:
            data = b"".join(parts)
            for piece in [data[i:i + 1] for i in range(len(data))] if drip else parts:
                if drip and (select.select([sock], [], [], DRIP_S)[0] or time.monotonic() - t0 > limit):
                    break                       # readable: the server has answered or closed
                try:
                    sock.sendall(piece)
                except OSError:
                    break
            health = t.call("GET", "/health").status
            a = t.read(sock, t0 + limit)
        a.facts.update(closed_after_s=time.monotonic() - t0, health_while_stalled=health)
        if a.status == "timeout":
            a.problem = f"still open {limit:.0f} s after its first byte"
        elif health != 200:
            a.problem = f"/health answered {health} while the connection stalled"
        return a
    return run


def vanished(stream: bool, waiting: int = 0):
    """A long request in every row (and `waiting` more, that wait for one); once they run, every client closes
    its connection: the rows must be free, and nothing waiting, within --free-within s."""
    def run(t):
        if t.idle_after(t.args.timeout) == math.inf:
            return Answer("gone", problem="rows were still taken before the case began")
        n = t.rows + waiting
        body = json.dumps({"prompt": "x", "max_tokens": t.max_len - 16, "ignore_eos": True, "temperature": 0,
                           "stream": stream}).encode()
        socks, t0, want = [], time.monotonic(), (min(n, t.rows), max(n - t.rows, 0))
        try:
            for _ in range(n):
                socks.append(t.connect())
                socks[-1].sendall(t.post_raw(body))
            while t.gauges() != want and time.monotonic() - t0 < t.args.timeout:
                time.sleep(0.02)
            if stream:                          # each running one has sent its first event
                for s in socks[:t.rows]:
                    s.settimeout(t.args.timeout)
                    s.recv(1 << 16)
            started = t.gauges()
        finally:
            for s in socks:
                s.close()
        freed = t.idle_after(max(t.args.free_within * 5, 3))
        a = Answer("gone", facts={"running_waiting_before": started, "freed_after_s": freed})
        if started != want:
            a.problem = f"expected {want} running/waiting before the clients left, saw {started}"
        elif freed > t.args.free_within:
            a.problem = f"rows still taken {t.args.free_within} s after the clients left (freed after {freed:.2f} s)"
        return a
    return run


def client_cases() -> list[Case]:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    closed = ("closed",)
    return [Case("clients", "connects and sends nothing", closed, stalled([])),
            Case("clients", "headers cut mid-way", closed, stalled([head[:40]])),
            Case("clients", "body cut (10 of 100 bytes)", closed, stalled([head + b"Content-Length: 100\r\n\r\n"
                                                                          b'{"prompt":']),),
            Case("clients", f"slowloris: a header byte every {DRIP_S} s", closed, stalled([head * 50], drip=True)),
            Case("clients", "non-streaming clients vanish while running", ("gone",), vanished(False)),
            Case("clients", "streaming clients vanish after their first event", ("gone",), vanished(True)),
            Case("clients", "clients vanish while running and waiting", ("gone",), vanished(False, 1))]


def burst(stream: bool):
    """2 x (rows + --max-queue) + 2 requests at once, each long enough to outlast the arrival of all: some are
    refused (429, OpenAI's shape), at most rows + --max-queue accepted, each accepted one answered in full, and
    no row is taken once they are done."""
    def run(t):
        bound = t.rows + t.args.max_queue
        n, tokens = 2 * bound + 2, max(min(256, t.max_len // 2), 1)
        body = {"prompt": "burst", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(lambda i: t.call("POST", "/v1/completions", dict(body, prompt=f"burst {i}")),
                                    range(n)))
        codes = [a.status for a in answers]
        ok = codes.count(200)
        a = Answer(429 if 429 in codes else codes[0], next((x.body for x in answers if x.status == 429), b""),
                   facts={"requests": n, "answered_200": ok, "refused_429": codes.count(429),
                          "other": [c for c in codes if c not in (200, 429)], "bound": bound})
        unfinished = sum(1 for x in answers if x.status == 200 and (b"data: [DONE]" not in x.body if stream
                                                                     else b'"finish_reason"' not in x.body))
        leftover = t.idle_after(t.args.timeout)
        if a.facts["other"]:
            a.problem = f"answers other than 200 and 429: {a.facts['other']}"
        elif not ok or 429 not in codes:
            a.problem = f"{ok} answered and {codes.count(429)} refused: expected both"
        elif ok > bound:
            a.problem = f"{ok} accepted, beyond rows + --max-queue = {bound}"
        elif unfinished:
            a.problem = f"{unfinished} accepted answers did not finish"
        elif not all(openai_shaped(x.body) for x in answers if x.status == 429):
            a.problem = "a 429 without OpenAI's error shape"
        elif leftover == math.inf:
            a.problem = "rows still taken after every answer"
        return a
    return run


def route_cases() -> list[Case]:
    def req(method: str, path: str, body=None):
        return lambda t: t.call(method, path, body)

    def raw(line: bytes, headers=b"Host: x\r\n"):
        return lambda t: t.raw(line + b"\r\n" + headers + b"Connection: close\r\n\r\n")

    def traversal(path: bytes):
        def run(t):
            a = raw(b"GET " + path + b" HTTP/1.1")(t)
            if b"root:" in a.body:
                a.problem = "a file of the host came back"
            return a
        return run
    no = (404,)
    return [Case("routes", "GET /v1/completions", (405,), req("GET", "/v1/completions")),
            Case("routes", "PUT /v1/completions", (405,), req("PUT", "/v1/completions", {"prompt": "x"})),
            Case("routes", "DELETE /v1/chat/completions", (405,), req("DELETE", "/v1/chat/completions")),
            Case("routes", "OPTIONS /v1/completions", (200, 204, 405), req("OPTIONS", "/v1/completions")),
            Case("routes", "POST /health", (405,), req("POST", "/health", {})),
            Case("routes", "PATCH /metrics", (405,), req("PATCH", "/metrics")),
            Case("routes", "BREW /health (no such method)", (400, 405, 501), raw(b"BREW /health HTTP/1.1")),
            Case("routes", "GET /v2/nothing", no, req("GET", "/v2/nothing")),
            Case("routes", "GET /../../etc/passwd", (400, 404), traversal(b"/../../etc/passwd")),
            Case("routes", "GET /%2e%2e/%2e%2e/etc/passwd", (400, 404), traversal(b"/%2e%2e/%2e%2e/etc/passwd")),
            Case("routes", "GET /v1/..%2f..%2fetc%2fpasswd", (400, 404), traversal(b"/v1/..%2f..%2fetc%2fpasswd")),
            Case("routes", "GET a path that is not ASCII", (400, 404), raw(b"GET /\xff\xfe HTTP/1.1")),
            Case("routes", "GET a URL of 100 KB", (400, 404, 414, 431),
                 raw(b"GET /" + b"a" * 10 ** 5 + b" HTTP/1.1")),
            Case("routes", "a header of 100 KB", (200, 400, 431),
                 raw(b"GET /health HTTP/1.1", b"Host: x\r\nX-Big: " + b"b" * 10 ** 5 + b"\r\n")),
            Case("routes", "headers of 2.5 MB", (400, 431, "closed"), raw(b"GET /health HTTP/1.1",
                                                                        b"Host: x\r\n" + b"X-Big: b\r\n" * 2 ** 18)),
            Case("routes", "HTTP/1.1 without Host", (400,), raw(b"GET /health HTTP/1.1", b"")),
            Case("routes", "a request line that is not HTTP", (400,), raw(b"HELLO THERE")),
            Case("routes", "HTTP/1.0 GET /health", (200,), raw(b"GET /health HTTP/1.0", b""))]


def all_cases(classes) -> list[Case]:
    make = {"fields": field_cases, "body": body_cases, "clients": client_cases, "routes": route_cases,
            "burst": lambda: [Case("burst", "2 x (rows + --max-queue) + 2 at once", (429,), burst(False)),
                              Case("burst", "the same, streamed", (429,), burst(True))]}
    return [c for cls in CLASSES if cls in classes for c in make[cls]()]


# ----------------------------------------------------------------------------------------------------------------
# The battery: each case, then its checks and /health; a table as it goes; JSON at the end.

def check(t, case: Case) -> dict:
    t0 = time.monotonic()
    try:
        a = case.run(t)
    except Exception as e:                     # e.g. a socket the server closed under a case that did not expect it
        a = Answer("error", problem=lesson.reason_of(e))
    seconds = time.monotonic() - t0
    error = isinstance(a.status, int) and a.status >= 400
    shaped = openai_shaped(a.body) if error else None
    alive = t.alive()
    problem = a.problem or (None if a.status in case.expect else f"expected {'/'.join(map(str, case.expect))}") \
        or (None if shaped is not False else "not in OpenAI's error shape") \
        or (None if alive else "/health does not answer after it")
    return {"class": case.cls, "case": case.name, "expect": list(case.expect), "status": a.status,
            "openai_shape": shaped, "seconds": round(seconds, 3), "alive": alive, "held": problem is None,
            "problem": problem, "facts": a.facts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="measure/hostile.py", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    p.add_argument("--classes", nargs="+", choices=CLASSES, default=list(CLASSES), help="which classes of cases "
                   "(default: all)")
    p.add_argument("--timeout", type=float, default=60, help="seconds any one request may take (default: 60)")
    p.add_argument("--read-timeout", type=float, default=30, help="the server's --read-timeout: a stalled "
                   "connection must be closed within it + 2 s (default: 30, serve.py's)")
    p.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue (default: 64, serve.py's)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2 ** 20, help="the server's --max-body-bytes "
                   "(default: 4 MiB, serve.py's)")
    p.add_argument("--upload-mb", type=int, default=20, help="the size of the bodies uploaded while /health is "
                   "timed, in MiB (default: 20)")
    p.add_argument("--health-limit", type=float, default=1.0, help="seconds /health may take during an upload "
                   "(default: 1)")
    p.add_argument("--free-within", type=float, default=1.0, help="seconds within which a vanished client's row "
                   "must be free (default: 1)")
    p.add_argument("--metric-prefix", default="ds_bnb_", help="the prefix of the /metrics gauges requests_running "
                   "and requests_waiting (default: ds_bnb_)")
    p.add_argument("--json", dest="json_path", help="write every case here")
    args = p.parse_args(argv)
    bad = [f"--{n.replace('_', '-')} must be above 0" for n in ("timeout", "read_timeout", "health_limit",
                                                                "free_within", "upload_mb", "max_body_bytes")
           if not getattr(args, n) > 0] + (["--max-queue must be at least 0"] if args.max_queue < 0 else [])
    if args.upload_mb * 2 ** 20 <= args.max_body_bytes:
        bad.append("--upload-mb must be beyond --max-body-bytes (the upload is one the server must refuse)")
    if not urllib.parse.urlsplit(args.url).hostname:
        bad.append(f"--url {args.url} has no host; give one like http://127.0.0.1:8000")
    try:
        if args.json_path:
            lesson.check_writable(args.json_path, "--json")
    except lesson.UsageError as e:
        bad.append(str(e).rstrip("."))
    if bad:
        print(f"error: {bad[0]}.", file=sys.stderr)
        return 2
    try:
        t = Target(args)
    except Exception as e:                     # httpx's connection errors, a /health that is not JSON, ...
        print(f"error: no server answers /health at {args.url} ({lesson.reason_of(e)}); start one, e.g. python "
              "extensions/serve.py --model random:tiny.", file=sys.stderr)
        return 2
    print(f"server {args.url}: {t.health}")
    print(f"{'class':8} {'case':54} {'expect':>12} {'got':>8} {'shape':>5} {'time_s':>7} {'alive':>5} {'held':>4}")
    results, cases = [], all_cases(args.classes)
    for i, case in enumerate(cases):
        r = check(t, case)
        results.append(r)
        shape = {None: "-", True: "yes", False: "NO"}[r["openai_shape"]]
        print(f"{r['class']:8} {r['case'][:54]:54} {'/'.join(map(str, r['expect']))[:12]:>12} {r['status']!s:>8} "
              f"{shape:>5} {r['seconds']:7.2f} {'yes' if r['alive'] else 'NO':>5} {'yes' if r['held'] else 'NO':>4}"
              + (f"   <- {r['problem']}" if r["problem"] else ""), flush=True)
        if not r["alive"]:
            print(f"the server died at this case; the {len(cases) - i - 1} after it are not run.", flush=True)
            break
    held = sum(r["held"] for r in results)
    facts = [r["facts"] for r in results]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "url": args.url,
              "server": t.health, "settings": {k: v for k, v in vars(args).items() if k != "json_path"},
              "cases_total": len(cases), "cases_run": len(results), "held": held,
              "all_held": held == len(cases),
              "health_max_s_during_uploads": max((f["health_max_s"] for f in facts if "health_max_s" in f),
                                                 default=None),
              "vanished_rows_freed_after_s": max((f["freed_after_s"] for f in facts if "freed_after_s" in f),
                                                 default=None),
              "cases": results}
    print(f"{held}/{len(cases)} cases held" + ("" if held == len(cases) else
                                               f"; not held: {[r['case'] for r in results if not r['held']]}"))
    if args.json_path:
        try:
            lesson.write_json(report, args.json_path)
        except lesson.RunFailure as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0 if held == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
