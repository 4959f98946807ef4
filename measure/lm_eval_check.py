#!/usr/bin/env python3
"""measure/lm_eval_check.py — lm-eval scores the served model (第十节 服务化); the lesson's model must score the same.

How a multiple-choice task is scored by log-likelihood. Each question is a context ("Question: ...\\nAnswer:") and
each choice a continuation (" Paris"); the model's score for a choice is the sum, over the continuation's tokens, of
log p(token | every token before it). The choice with the highest sum is the model's answer: acc is the fraction
answered right; acc_norm divides each sum by the choice's length in characters first (long answers are not
punished for having more tokens). No text is generated: one forward pass over context + continuation scores it.

What lm-eval's `local-completions` model does (lm_eval 0.4.13, measure/mc_task/everyday_mc.yaml):
  1. tokenizes with the model's own tokenizer, no special tokens: the context's trailing spaces move to the
     continuation, context + continuation are encoded once and split after the context's tokens (so a word is
     tokenized as it would be in running text);
  2. sends the ids: POST /v1/completions {"prompt": [[ids]], "max_tokens": 1, "echo": true, "logprobs": 1,
     "temperature": 0} — echo asks for the prompt's own tokens back, each with its log-probability;
  3. reads choices[i].logprobs.token_logprobs[len(context):-1] (the continuation's tokens, not the one generated
     token) and sums them.
So the server must echo one log-probability per prompt token, from the logits it serves with, and append exactly
one generated token (EOS included) after them.

This check, for each --quant: starts extensions/serve.py --model real:smollm2-135m on the CPU, runs lm-eval's task
against it, then scores the same (context, continuation) pairs with the lesson's model (ds_bnb_infer.load_model: the
same weights in the same bitsandbytes format) one forward pass each, and compares: every choice's log-likelihood
within --tol, the same acc and acc_norm. Exit 0 when they agree, 1 when not (or when the server or lm-eval fails).
One prompt a request (--batch-size 1) is one prompt a prefill, the very forward pass of the direct score: equal to the
bit. Several prompts a request are left-padded into one prefill, and their scores move by the rounding of other
matmul shapes: ~3e-5 in fp32, ~5e-2 in 4-bit (its matmuls run in bf16). 8-bit's LLM.int8 picks its fp16 outlier
columns over all the rows of a step, so one row's numbers depend on the others': serve.py --quant 8bit with more
than one row fails its own verification on this model.
serve.py --quant 4bit multiplies weight-only by default (extensions/kernel_4bit.py; on a CPU its dequantization runs
in torch, ~5x slower than bitsandbytes' CPU kernel): the same 4-bit weights through another bf16 matmul, whose
log-likelihoods here differ from bitsandbytes' by up to ~0.2 (the same acc). --matmul picks one for both sides:
bitsandbytes (the lesson's model as it loads) or weight-only (its layers swapped here as serve.py swaps them).

  pip install -r requirements-eval.txt
  python measure/lm_eval_check.py                  # fp32, 8-bit and 4-bit: about 3 minutes on 2 CPU cores
  python measure/lm_eval_check.py --quant none --batch-size 4 --tol 1e-3 --json /tmp/lm_eval_check.json
  python measure/lm_eval_check.py --quant 4bit --matmul weight-only --limit 8

  real:smollm2-135m on the CPU: 36 questions of measure/mc_task/everyday_mc.yaml, lm-eval (local-completions -> ...
  quant         matmul lm-eval acc direct acc lm-eval acc_norm direct acc_norm  max |Δ loglik|  agree (tol 0.0001)
  fp32           torch      0.6944     0.6944           0.7778          0.7778        0.00e+00  yes
  8-bit   bitsandbytes      0.7222     0.7222           0.7222          0.7222        0.00e+00  yes
  4-bit   bitsandbytes      0.6389     0.6389           0.7500          0.7500        0.00e+00  yes

lm-eval itself against a running server, from the repository root (the task file names its data relative to it):
  python extensions/serve.py --model real:smollm2-135m --device cpu --max-num-seqs 1 --max-model-len 64 \\
      --max-new-tokens 16 --port 8000 &
  lm_eval --model local-completions --include_path measure/mc_task --tasks everyday_mc --model_args \\
model=real:smollm2-135m,base_url=http://127.0.0.1:8000/v1/completions,tokenizer_backend=huggingface,\\
tokenizer=$HOME/.cache/ds_bnb_infer/SmolLM2-135M-Instruct,tokenized_requests=True,max_length=64
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ds_bnb_infer as lesson  # noqa: E402

MODEL = "real:smollm2-135m"
SERVE = os.path.join(ROOT, "extensions", "serve.py")
TASK_FILE = os.path.join(ROOT, "measure", "mc_task", "everyday_mc.yaml")
QUANTS = {"none": "fp32", "8bit": "8-bit", "4bit": "4-bit"}      # --quant -> the table's name
INSTALL = "pip install -r requirements-eval.txt"

# ----------------------------------------------------------------------------------------------------------------
# The task: read from the same YAML file and JSONL data lm-eval reads.

def load_task(path: str = TASK_FILE) -> dict:
    """The task's YAML as a dict, its data file made absolute (the file names it relative to the repository root)."""
    import yaml
    with open(path, encoding="utf-8") as fh:
        task = yaml.safe_load(fh)
    files = task["dataset_kwargs"]["data_files"]
    task["dataset_kwargs"]["data_files"] = {split: os.path.join(ROOT, f) for split, f in files.items()}
    return task

def requests_of(task: dict) -> list[dict]:
    """Every question as lm-eval builds it: the context (doc_to_text rendered), one continuation per choice
    (target_delimiter + choice), the choices and the index of the right one. doc_to_choice and doc_to_target name
    fields of the data (the only form this file reads)."""
    import jinja2
    template = jinja2.Template(task["doc_to_text"], undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    with open(task["dataset_kwargs"]["data_files"][task["test_split"]], encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh if line.strip()]
    delimiter = task.get("target_delimiter", " ")
    return [{"context": template.render(**doc), "choices": doc[task["doc_to_choice"]],
             "continuations": [delimiter + c for c in doc[task["doc_to_choice"]]], "gold": doc[task["doc_to_target"]]}
            for doc in docs]

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split (TemplateLM._encode_pair, causal models): trailing spaces of the context go to the
    continuation; the whole is encoded once and cut after the context's tokens. No special tokens (lm-eval's
    add_bos_token=False)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]

def accuracy(questions: list[dict], scores: list[list[float]]) -> dict:
    """acc: the highest log-likelihood is the right choice; acc_norm: the highest per character of the choice."""
    acc = [max(range(len(s)), key=s.__getitem__) == q["gold"] for q, s in zip(questions, scores)]
    norm = [max(range(len(s)), key=lambda i: s[i] / len(q["choices"][i])) == q["gold"]
            for q, s in zip(questions, scores)]
    return {"acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm)}

# ----------------------------------------------------------------------------------------------------------------
# Direct: the lesson's model in this process, one forward pass per (context, continuation).

def direct_scores(quant: str, matmul: str, questions: list[dict]) -> list[list[float]]:
    """Each choice's log-likelihood from the lesson's model, loaded as init_engine loads it (第七节 load_quantized,
    on the CPU: fp32 weights, or the bitsandbytes format of `quant` with the lesson's settings, one token through
    first), its 4-bit layers multiplied weight-only when `matmul` says so (as serve.py then does); in fp32 from
    the logits."""
    import torch
    config = lesson.DeployConfig(model_name=MODEL, quant=quant, device="cpu", backend="hf", fallback=False)
    tokenizer = lesson.load_tokenizer(config)
    model, _, _ = lesson.load_quantized(config, "cpu", tokenizer)
    if matmul == "weight-only":
        from extensions.quantized_matmul import weight_only
        weight_only(model)
    scores = []
    for q in questions:
        row = []
        for continuation in q["continuations"]:
            context, cont = encode_pair(tokenizer, q["context"], continuation)
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            # the logits at position i predict token i + 1
            row.append(sum(float(logprobs[len(context) + j - 1, t]) for j, t in enumerate(cont)))
        scores.append(row)
    del model
    lesson.free_memory()
    return scores

# ----------------------------------------------------------------------------------------------------------------
# Through the server: extensions/serve.py in its own process, lm-eval's local-completions model against it.

@contextlib.contextmanager
def served(quant: str, matmul: str, port: int, rows: int, max_model_len: int, timeout: float):
    """extensions/serve.py with `quant` on the CPU, ready (GET /health answers); SIGTERM at the end, and the whole
    process group killed if it has not stopped within a minute. Yields its base URL. --no-fallback: a server that
    could not load 4-bit must fail here, not serve 8-bit and be compared with the 4-bit model. Few rows and
    positions: the static KV cache is small, so the server starts in seconds and each step is cheap."""
    cmd = [sys.executable, SERVE, "--model", MODEL, "--quant", quant, "--device", "cpu", "--no-fallback",
           "--max-num-seqs", str(rows), "--max-model-len", str(max_model_len), "--max-new-tokens", "1",
           "--host", "127.0.0.1", "--port", str(port)] + (["--matmul", matmul] if quant == "4bit" else [])
    log_file = tempfile.TemporaryFile("w+", encoding="utf-8")    # not a pipe: no one reads it while it runs
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise lesson.RunFailure(f"serve.py --quant {quant} exited ({proc.returncode}) before it was ready: "
                                        + tail(log_file))
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    health = json.load(r)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise lesson.RunFailure(f"serve.py --quant {quant} was not ready after {timeout:g} s; raise "
                                            "--startup-timeout.") from None
                time.sleep(0.5)
        if health["engine"]["quant"] != quant:
            raise lesson.RunFailure(f"serve.py was asked for --quant {quant} but serves {health['engine']['quant']}.")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)             # finish what is in flight, then exit
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)       # whatever is left of it
        proc.wait()
        log_file.close()

def tail(log_file) -> str:
    """The server's last words (its error sentence)."""
    log_file.seek(0)
    lines = [line.strip() for line in log_file.read().splitlines() if line.strip()]
    return " / ".join(lines[-2:])[-400:] or "(no output)"

def harness_scores(url: str, task: dict, max_model_len: int, batch_size: int,
                   limit: int | None) -> tuple[list, list[list[float]], dict]:
    """lm-eval's simple_evaluate with the local-completions model against `url` (the first `limit` questions, or
    all): the (context, continuation) pairs it built, each choice's log-likelihood per question (in the data's
    order), and its acc / acc_norm."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    model_args = {"model": MODEL, "base_url": url + "/v1/completions", "tokenizer_backend": "huggingface",
                  "tokenizer": lesson.model_source(MODEL), "tokenized_requests": True, "max_length": max_model_len,
                  "batch_size": batch_size, "num_concurrent": 1, "max_retries": 1}
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=[task],
                                  task_manager=TaskManager(include_defaults=False), log_samples=True,
                                  bootstrap_iters=0, limit=limit)
    samples = sorted(out["samples"][task["task"]], key=lambda s: s["doc_id"])
    pairs = [[tuple(a) for a in s["arguments"]] for s in samples]
    scores = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    metrics = out["results"][task["task"]]
    return pairs, scores, {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}

def check(quant: str, questions: list[dict], task: dict, args) -> dict:
    """One row: lm-eval through the server, the lesson's model directly, and how far apart they are."""
    matmul = {"none": "torch", "8bit": "bitsandbytes", "4bit": args.matmul}[quant]    # LLM.int8: no weight-only
    t0 = time.perf_counter()
    lesson.log(f"[lm_eval_check] {QUANTS[quant]}: starting serve.py ...")
    # As many rows as lm-eval sends prompts in one request: they are admitted together (one left-padded prefill).
    with served(quant, matmul, args.port or free_port(), args.batch_size, args.max_model_len,
                args.startup_timeout) as url:
        t1 = time.perf_counter()
        lesson.log(f"[lm_eval_check] {QUANTS[quant]}: ready in {t1 - t0:.1f} s; lm-eval ...")
        try:
            pairs, served_scores, served_acc = harness_scores(url, task, args.max_model_len, args.batch_size,
                                                              args.limit)
        except Exception as e:
            raise lesson.RunFailure(f"lm-eval against serve.py --quant {quant} failed: {http_reason(e)}") from e
    t2 = time.perf_counter()
    mine = [list(zip([q["context"]] * len(q["continuations"]), q["continuations"])) for q in questions]
    if pairs != mine:
        raise lesson.RunFailure("lm-eval built other (context, continuation) pairs than this file: "
                                f"{next(p for p, m in zip(pairs, mine) if p != m)[:1]}; this file's requests_of() "
                                "no longer reads the task as lm-eval does.")
    lesson.log(f"[lm_eval_check] {QUANTS[quant]}: lm-eval done in {t2 - t1:.1f} s; the lesson's model directly ...")
    direct = direct_scores(quant, matmul, questions)
    t3 = time.perf_counter()
    lesson.log(f"[lm_eval_check] {QUANTS[quant]}: done in {t3 - t2:.1f} s")
    delta = max(abs(a - b) for sa, sd in zip(served_scores, direct) for a, b in zip(sa, sd))
    direct_acc = accuracy(questions, direct)
    agree = delta <= args.tol and direct_acc == served_acc
    return {"quant": quant, "matmul": matmul, "lm_eval": served_acc, "direct": direct_acc,
            "max_abs_delta_loglikelihood": delta, "agree": agree, "questions": len(questions),
            "seconds": {"server_start": t1 - t0, "lm_eval": t2 - t1, "direct": t3 - t2},
            "loglikelihoods": {"lm_eval": served_scores, "direct": direct}}

def http_reason(e: BaseException) -> str:
    """An HTTP error as the server's own message (OpenAI's error shape), else the exception's first line."""
    response = getattr(e, "response", None)
    if response is not None:
        with contextlib.suppress(Exception):
            return f"HTTP {response.status_code}: {response.json()['error']['message']}"
        return f"HTTP {response.status_code}: {response.text[:200]}"
    return lesson.reason_of(e)

def free_port() -> int:
    """A port no one listens on now (two checks on one host each get their own)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def report(rows: list[dict], questions: list[dict], args) -> None:
    """The table on stdout; with --json, the rows, every log-likelihood, date and versions."""
    print(f"{MODEL} on the CPU: {len(questions)} questions of measure/mc_task/everyday_mc.yaml, lm-eval "
          f"(local-completions -> extensions/serve.py) against the lesson's model scored directly")
    print(f"{'quant':<7}{'matmul':>13}{'lm-eval acc':>12}{'direct acc':>11}{'lm-eval acc_norm':>17}"
          f"{'direct acc_norm':>16}{'max |Δ loglik|':>16}  agree (tol {args.tol:g})")
    for r in rows:
        print(f"{QUANTS[r['quant']]:<7}{r['matmul']:>13}{r['lm_eval']['acc']:>12.4f}{r['direct']['acc']:>11.4f}"
              f"{r['lm_eval']['acc_norm']:>17.4f}{r['direct']['acc_norm']:>16.4f}"
              f"{r['max_abs_delta_loglikelihood']:>16.2e}  {'yes' if r['agree'] else 'NO'}")
    if args.json:
        from importlib.metadata import version
        lesson.write_json({"date": time.strftime("%Y-%m-%d"), "model": MODEL, "tol": args.tol,
                           "task": "measure/mc_task/everyday_mc.yaml",
                           "versions": dict(lesson.versions(), lm_eval=version("lm_eval")),
                           "rows": rows}, args.json)

# ----------------------------------------------------------------------------------------------------------------
# The command line.

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="measure/lm_eval_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--quant", default="none,8bit,4bit",
                   help="comma-separated, from: none (fp32), 8bit, 4bit (default: none,8bit,4bit)")
    p.add_argument("--matmul", choices=["bitsandbytes", "weight-only"], default="bitsandbytes",
                   help="4-bit's matmul, in the server and here alike: bitsandbytes' own (the lesson's model as "
                        "loaded), or weight-only (extensions/kernel_4bit.py's, serve.py's default; slow on a CPU) "
                        "(default: bitsandbytes)")
    p.add_argument("--limit", type=int, help="only the first N questions (default: all)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest |difference| of a choice's log-likelihood, server vs direct (default: 1e-4)")
    p.add_argument("--port", type=int, default=0, help="the server's port (default: 0 = a free one)")
    p.add_argument("--max-model-len", type=int, default=64,
                   help="the server's positions per row, and lm-eval's max_length (default: 64)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="lm-eval's prompts per request, and the server's rows (default: 1)")
    p.add_argument("--startup-timeout", type=float, default=600,
                   help="seconds to wait for the server to load and verify the model (default: 600)")
    p.add_argument("--json", metavar="PATH", help="write the table, every log-likelihood, date and versions")
    p.add_argument("--debug", action="store_true", help="show tracebacks and lm-eval's log")
    return p

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    lesson.quiet_libraries(args.debug)
    if not args.debug:
        logging.getLogger("lm-eval").setLevel(logging.ERROR)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        quants = args.quant.split(",")
        if set(quants) - set(QUANTS) or not args.tol >= 0 or not 0 <= args.port < 2 ** 16 or args.batch_size < 1 \
                or args.max_model_len < 2 or (args.limit is not None and args.limit < 1):
            raise lesson.UsageError("--quant takes names from none, 8bit, 4bit; --tol at least 0; --port in "
                                    "0-65535; --batch-size, --limit at least 1; --max-model-len at least 2.")
        if importlib.util.find_spec("lm_eval") is None:
            raise lesson.UsageError(f"this check needs lm-eval: {INSTALL}")
        if args.json:
            lesson.check_writable(args.json, "--json")
        task = load_task()
        questions = requests_of(task)[:args.limit]
        config = lesson.DeployConfig(model_name=MODEL)
        tokenizer = lesson.load_tokenizer(config)       # says "run setup/real_model.py" if not converted
        longest = max(sum(map(len, encode_pair(tokenizer, q["context"], c))) for q in questions
                      for c in q["continuations"])
        if longest + 1 > args.max_model_len:        # + the one token lm-eval asks the server to generate
            raise lesson.UsageError(f"the longest question + choice is {longest} tokens; give --max-model-len "
                                    f"{longest + 1} or more.")
        rows = [check(q, questions, task, args) for q in quants]
        report(rows, questions, args)
    except KeyboardInterrupt:
        lesson.log("interrupted (Ctrl-C).")
        return 130
    except Exception as e:
        if args.debug:
            raise
        usage, known = isinstance(e, lesson.UsageError), isinstance(e, (lesson.UsageError, lesson.RunFailure))
        lesson.log(f"error: {e}" if known else f"error: {lesson.reason_of(e)} (run with --debug for the traceback)")
        return 2 if usage else 1
    if not all(r["agree"] for r in rows):
        lesson.log("error: lm-eval through the server and the lesson's model disagree (see the table).")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
