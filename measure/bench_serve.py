#!/usr/bin/env python3
"""measure/bench_serve.py — 第十节 服务化: a load generator for extensions/serve.py (or any OpenAI-compatible server).

  python extensions/serve.py --model random:tiny --port 8000 &
  python measure/bench_serve.py --url http://127.0.0.1:8000 --concurrency 1 4 --requests 8 --max-tokens 32

Each level sends --requests streaming completions with at most --concurrency in flight, all at once or as Poisson
arrivals (--rate, requests/s), greedy (temperature 0) and full length (ignore_eos), and reports what a user of the
server sees: request throughput, output tokens/s, TTFT, time per output token (after the first) and inter-token
latency at p50/p95/p99, and how many requests were refused (429) or failed. The answers are checked: the prompts
are --distinct texts, each first sent alone. In fp32 an answer under load equals its prompt's answer alone; in
half precision a row's place in the cache changes the rounding, and random weights have near-tied tokens, so
answers part after a common start (reported). An answer that starts more like another prompt's answer than its
own counts as mixed up, and must never happen. Where the server is extensions/serve.py, each level also reports
what its /metrics say of that level: how many prefills it ran and how many requests each took, and the mean time a
request waited in the queue and took from admission to its first token (the parts of TTFT), and of that the
device's span for a prefill (on a GPU from when the stream reaches it to its first tokens).
"""
import argparse
import asyncio
import datetime
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402


def prompts(n: int, length: int) -> list[str]:
    """n different prompts of about `length` characters (a byte-level preset: as many tokens)."""
    base = "DeepSpeed and bitsandbytes deploy a large language model on GPUs. "
    return [(f"{i:03d} " + base * (length // len(base) + 1))[:length] for i in range(n)]


async def one(client, url: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """One streaming completion: its status, text, tokens and the arrival time of each piece of text."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "seed": seed, "stream_options": {"include_usage": True}}
    t0, times, text, tokens = time.perf_counter(), [], [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "error": r.text[:200]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500, "error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c.get("text"):
                    times.append(time.perf_counter() - t0)
                    text.append(c["text"])
    return {"status": 200, "text": "".join(text), "tokens": tokens, "latency_s": time.perf_counter() - t0,
            "ttft_s": times[0] if times else None, "gaps_s": [b - a for a, b in zip(times, times[1:])]}


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def stats(values: list) -> dict:
    values = [v for v in values if v is not None]
    return {f"p{q}": lesson.percentile(values, q) for q in (50, 95, 99)} if values else {}


async def counters(client, url: str) -> dict:
    """The server's Prometheus counters and histogram sums and counts (names ending _total, _sum, _count), or {}
    where it has no /metrics."""
    import httpx
    try:
        r = await client.get(url + "/metrics")
    except httpx.HTTPError:
        return {}
    out = {}
    for line in r.text.splitlines() if r.status_code == 200 else []:
        name, _, value = line.rpartition(" ")
        if not line.startswith("#") and name.endswith(("_total", "_sum", "_count")):
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def server_side(before: dict, after: dict) -> dict:
    """extensions/serve.py's own account of one level (its /metrics after minus before); {} for another server."""
    def get(name):
        return after.get("ds_bnb_" + name, 0.0) - before.get("ds_bnb_" + name, 0.0)
    if not get("prefills_total"):
        return {}
    return {"prefills": int(get("prefills_total")),
            "rows_per_prefill": get("prefill_rows_total") / get("prefills_total"),
            "queue_s_mean": get("queue_seconds_sum") / max(get("queue_seconds_count"), 1),
            "prefill_s_mean": get("prefill_seconds_sum") / max(get("prefill_seconds_count"), 1),
            "prefill_device_s_mean": get("prefill_device_seconds_sum") / max(get("prefill_device_seconds_count"), 1)}


async def level(client, args, texts: list[str], alone: dict, concurrency: int, requests: int) -> dict:
    """One concurrency level: `requests` requests, at most `concurrency` in flight."""
    gate, rng, tasks = asyncio.Semaphore(concurrency), random.Random(args.seed), []
    before = await counters(client, args.url)

    async def gated(i):
        async with gate:
            return await one(client, args.url, texts[i % len(texts)], args.max_tokens, i)
    t0 = time.perf_counter()
    for i in range(requests):
        if math.isfinite(args.rate) and i:
            await asyncio.sleep(rng.expovariate(args.rate))        # Poisson arrivals
        tasks.append(asyncio.create_task(gated(i)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    server = server_side(before, await counters(client, args.url))
    ok = [(i, r) for i, r in enumerate(results) if r["status"] == 200]
    own = [common_prefix(r["text"], alone[texts[i % len(texts)]]) for i, r in ok]
    equal = sum(r["text"] == alone[texts[i % len(texts)]] for i, r in ok)
    mixed = sum(max(common_prefix(r["text"], alone[t]) for t in texts if t != texts[i % len(texts)]) > n
                for (i, r), n in zip(ok, own))
    tpot = [(r["latency_s"] - r["ttft_s"]) / (r["tokens"] - 1) for _, r in ok if r["tokens"] > 1 and r["ttft_s"]]
    return {"concurrency": concurrency, "requests": requests, "ok": len(ok),
            "rejected_429": sum(r["status"] == 429 for r in results),
            "failed": sum(r["status"] not in (200, 429) for r in results),
            "errors": sorted({r["error"] for r in results if r["status"] not in (200, 429)})[:3],
            "duration_s": duration, "request_throughput": len(ok) / duration,
            "output_tokens_per_s": sum(r["tokens"] for _, r in ok) / duration,
            "ttft_s": stats([r["ttft_s"] for _, r in ok]), "tpot_s": stats(tpot),
            "itl_s": stats([g for _, r in ok for g in r["gaps_s"]]),
            "answers_equal_alone": equal, "common_prefix_with_alone_chars": stats(own), "answers_mixed_up": mixed,
            "server": server}


async def bench(args) -> dict:
    import httpx
    texts = prompts(args.distinct, args.prompt_len)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=httpx.Limits(max_connections=None)) \
            as client:
        health = (await client.get(args.url + "/health")).json()
        alone = {}
        for t in texts:          # each prompt alone first: the answers under load are compared with these
            r = await one(client, args.url, t, args.max_tokens, 0)
            if r["status"] != 200:
                raise lesson.RunFailure(f"a request alone failed ({r['status']}: {r['error']})")
            alone[t] = r["text"]
        levels = []
        for c, n in zip(args.concurrency, args.requests * len(args.concurrency) if len(args.requests) == 1
                        else args.requests):
            levels.append(await level(client, args, texts, alone, c, n))
            x = levels[-1]
            print(f"concurrency {c:3d}: {x['ok']}/{x['requests']} ok, {x['rejected_429']} refused (429), "
                  f"{x['failed']} failed; {x['output_tokens_per_s']:.1f} output tok/s, "
                  f"TTFT p50 {x['ttft_s'].get('p50', math.nan) * 1e3:.1f} ms, "
                  f"TPOT p50 {x['tpot_s'].get('p50', math.nan) * 1e3:.2f} ms; answers equal alone "
                  f"{x['answers_equal_alone']}/{x['ok']}, mixed up {x['answers_mixed_up']}", flush=True)
            if x["server"]:
                print(f"  server: {x['server']['prefills']} prefills, {x['server']['rows_per_prefill']:.1f} requests "
                      f"each; mean {x['server']['queue_s_mean'] * 1e3:.1f} ms in the queue, "
                      f"{x['server']['prefill_s_mean'] * 1e3:.1f} ms from admission to the first token (the "
                      f"device's span of a prefill: {x['server']['prefill_device_s_mean'] * 1e3:.1f} ms)", flush=True)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "server": health, "client_versions": lesson.versions(),
            "settings": {k: v for k, v in vars(args).items() if k != "json_path"}, "levels": levels}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="measure/bench_serve.py", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="levels (default: 1 16)")
    p.add_argument("--requests", type=int, nargs="+", default=[32],
                   help="requests per level: one number for all, or one per level (default: 32)")
    p.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (default: 128)")
    p.add_argument("--prompt-len", type=int, default=32, help="characters per prompt (default: 32)")
    p.add_argument("--distinct", type=int, default=8, help="different prompts (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times (default: 0)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per request (default: 600)")
    p.add_argument("--json", dest="json_path", help="write the results here")
    args = p.parse_args(argv)
    bad = [f"--{n.replace('_', '-')} must be at least 1" for n in ("max_tokens", "prompt_len", "distinct")
           if getattr(args, n) < 1] + [f"--{n} values must be at least 1" for n in ("concurrency", "requests")
                                       if min(getattr(args, n)) < 1]
    if len(args.requests) not in (1, len(args.concurrency)):
        bad.append("--requests takes one number, or one per --concurrency level")
    if bad or not args.rate > 0:
        print(f"error: {(bad or ['--rate must be > 0'])[0]}.", file=sys.stderr)
        return 2
    if args.json_path:
        try:
            lesson.check_writable(args.json_path, "--json")
        except lesson.UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        report = asyncio.run(bench(args))
    except (OSError, lesson.RunFailure) as e:
        print(f"error: {e}; is the server running at {args.url}?", file=sys.stderr)
        return 1
    except Exception as e:                                   # httpx's connection errors, among others
        print(f"error: {lesson.reason_of(e)}; is the server running at {args.url}?", file=sys.stderr)
        return 1
    if args.json_path:
        try:
            lesson.write_json(report, args.json_path)
        except lesson.RunFailure as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
