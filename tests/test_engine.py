"""init_engine / generate / the report, with the real libraries on the CPU and the random:tiny preset."""
import json

import pytest
import torch

import ds_bnb_infer as m
from conftest import HIDE, run_cli


def tiny_config(**kw):
    base = dict(model_name="random:tiny", max_new_tokens=8, iters=1, warmup=0, device="cpu")
    return m.DeployConfig(**{**base, **kw})


def greedy_tokens(config, prompts=("DeepSpeed is",)):
    record = {}
    engine, tok = m.init_engine(config, record)
    out = m.generate(engine, tok, list(prompts), config)
    return out, record, engine


def logits(model, text="a quantized model must not change"):
    tok = m.byte_tokenizer(m.PRESETS["random:tiny"]["vocab_size"])
    ids = tok([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- backends ---------------------------------------------------------------------------------------------------

def test_hf_and_deepspeed_give_identical_greedy_tokens():
    hf, rec_hf, _ = greedy_tokens(tiny_config(backend="hf", max_new_tokens=24))
    ds, rec_ds, engine = greedy_tokens(tiny_config(backend="deepspeed", kernel_inject=False, max_new_tokens=24))
    import deepspeed
    assert isinstance(engine, deepspeed.InferenceEngine)
    assert (rec_hf["backend"], rec_ds["backend"]) == ("hf", "deepspeed")
    assert hf["texts"] == ds["texts"] and hf["new_tokens"] == ds["new_tokens"] == [24]
    assert rec_ds["verify"]["passed"] and rec_ds["verify"]["greedy_tokens_matching"] == m.VERIFY_TOKENS


def test_left_padding_batched_equals_one_by_one():
    config = tiny_config(backend="hf", max_new_tokens=6)
    engine, tok = m.init_engine(config)
    prompts = ["a", "a much longer prompt than the first"]
    batched = m.generate(engine, tok, prompts, config)["texts"]
    alone = [m.generate(engine, tok, [p], config)["texts"][0] for p in prompts]
    assert batched == alone


def test_compile_decode_loop_equals_generate_with_padding_and_eos():
    """--compile's own decode loop (static cache, left padding, a row ending at EOS) gives generate()'s tokens."""
    config = tiny_config(backend="hf", max_new_tokens=40)
    engine, tok = m.init_engine(config)
    prompts = ["a", "a much longer prompt than the first", "DeepSpeed is"]
    first = tok.encode(m.generate(engine, tok, prompts[:1], config)["texts"][0])
    engine.generation_config.eos_token_id = first[5]          # so that the first row ends early (EOS)
    plain = m.generate(engine, tok, prompts, config)
    fast = m.generate(engine, tok, prompts, m.DeployConfig(**{**config.__dict__, "compile": True}))
    assert min(plain["new_tokens"]) < 40 == max(plain["new_tokens"])     # one row stops at EOS, one runs on
    assert fast["texts"] == plain["texts"] and fast["new_tokens"] == plain["new_tokens"]
    assert m.decode_mode(engine) == "eager"                   # on a CPU the loop runs without CUDA graphs
    # Every row ends early: the loop notices at its next check (every 16 steps) and stops there.
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        firsts = engine.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)[:, -1]
    engine.generation_config.eos_token_id = sorted(set(firsts.tolist()))
    plain = m.generate(engine, tok, prompts, config)
    fast = m.generate(engine, tok, prompts, m.DeployConfig(**{**config.__dict__, "compile": True}))
    assert plain["new_tokens"] == [1, 1, 1] and fast["steps"] == 16
    assert fast["texts"] == plain["texts"] and fast["new_tokens"] == plain["new_tokens"]


@pytest.mark.parametrize("quant, threshold, on_gpu", [("none", 6.0, "compiled"), ("4bit", 6.0, "cuda-graph"),
                                                     ("8bit", 6.0, "eager"), ("8bit", 0.0, "cuda-graph")])
def test_decode_step_is_compiled_captured_or_eager_by_kind_of_model(quant, threshold, on_gpu):
    """What --compile does with each kind of model on a GPU (the choice itself touches no GPU), and on a CPU:
    LLM.int8 with outlier columns is not captured, plain int8 (--int8-threshold 0) is."""
    model = m.load_model(tiny_config(quant=quant, int8_threshold=threshold), quant, "cpu")
    assert m.decode_step(model, torch.device("cuda"))[1] == on_gpu
    assert m.decode_step(model, torch.device("cpu"))[1] == "eager"


def test_timing_fields_are_consistent():
    out, _, _ = greedy_tokens(tiny_config(backend="hf", max_new_tokens=12))
    assert 0 < out["ttft_s"] < out["latency_s"]
    assert out["steps"] == 12 and out["decode_s_per_token"] > 0
    assert out["decode_s_per_token"] == pytest.approx((out["latency_s"] - out["ttft_s"]) / 11)


def test_first_token_timer_fires_once_at_the_prefill_and_leaves_no_hook():
    """TTFT = the end of the prefill forward; the decode steps after it must run with no hook attached."""
    import time
    config = tiny_config(backend="hf", max_new_tokens=12)
    engine, tok = m.init_engine(config)
    calls = []
    engine.register_forward_pre_hook(lambda mod, args: calls.append((len(mod._forward_hooks), time.perf_counter())))
    t0 = time.perf_counter()
    out = m.generate(engine, tok, ["hello"], config)
    assert len(calls) == 12                                   # the prefill, then 11 decode steps
    assert calls[0][0] == 1 and all(n == 0 for n, _ in calls[1:])
    assert 0 < out["ttft_s"] < calls[1][1] - t0               # noted before the first decode step began
    assert not engine._forward_hooks


def test_sampling_is_seeded():
    config = tiny_config(backend="hf", do_sample=True, temperature=1.5, max_new_tokens=16)
    engine, tok = m.init_engine(config)
    a = m.generate(engine, tok, ["x"], config)["texts"]
    b = m.generate(engine, tok, ["x"], config)["texts"]
    c = m.generate(engine, tok, ["x"], m.DeployConfig(**{**config.__dict__, "seed": 1}))["texts"]
    greedy = m.generate(engine, tok, ["x"], tiny_config(backend="hf", max_new_tokens=16))["texts"]
    assert a == b and a != c and a != greedy


def test_deepspeed_wrapping_keeps_a_half_precision_model_bit_identical():
    """DeepSpeed's .half()/.bfloat16() would re-round Llama's fp32 rotary inv_freq buffer (fp16 on an H100:
    0.7% logits error on a 7B). DeepSpeed's CPU accelerator has no fp16, so bf16 shows it here."""
    config = tiny_config(dtype="bf16", kernel_inject=False)
    unwrapped = m.load_model(config, "none", "cpu")
    record = {}
    engine, _ = m.init_engine(config, record)
    assert engine.module.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(logits(unwrapped), logits(engine))
    assert record["verify"]["passed"] and record["verify"]["tolerance"] == 0.0


# --- bitsandbytes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_load_and_generate_on_cpu(quant, layer):
    out, record, engine = greedy_tokens(tiny_config(quant=quant, kernel_inject=False))
    assert record["quant"] == quant and record["fallbacks"] == []
    assert any(type(mod).__name__ == layer for mod in engine.module.modules())
    assert out["new_tokens"] == [8]


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_int8_threshold_reaches_every_8bit_layer(threshold):
    """--int8-threshold is BitsAndBytesConfig's llm_int8_threshold: 0 = no outlier columns kept in fp16."""
    out, record, engine = greedy_tokens(tiny_config(quant="8bit", int8_threshold=threshold, kernel_inject=False))
    layers = [mod for mod in engine.module.modules() if type(mod).__name__ == "Linear8bitLt"]
    assert layers and {mod.state.threshold for mod in layers} == {threshold}
    assert out["new_tokens"] == [8]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_init_engine_does_not_change_a_quantized_model(quant, dtype):
    """DeepSpeed casts its module to `dtype`; on a bnb model that raises (fp32/fp16) or re-rounds it (bf16)."""
    config = tiny_config(quant=quant, dtype=dtype, kernel_inject=False)
    unwrapped = m.load_model(config, quant, "cpu")
    record = {}
    engine, _ = m.init_engine(config, record)
    assert isinstance(engine, __import__("deepspeed").InferenceEngine)
    assert torch.equal(logits(unwrapped), logits(engine))
    assert record["verify"]["passed"] and record["verify"]["prefill_rel_error"] == 0.0


def test_deepspeed_alone_would_change_a_quantized_model():
    """Why keep_model_as_loaded exists: without it, init_inference(dtype=bf16) re-rounds a bnb model silently
    (and fp32/fp16 raise). If a DeepSpeed release stops doing this, this test says so."""
    import deepspeed
    config = tiny_config(quant="4bit", dtype="bf16", kernel_inject=False)
    model = m.load_model(config, "4bit", "cpu")
    before = logits(model)
    engine = deepspeed.init_inference(model, dtype=torch.bfloat16, replace_with_kernel_inject=False)
    assert m.rel_error(logits(engine).float(), before.float()) > 1e-3
    with pytest.raises(ValueError, match="not supported for quantized model"):
        deepspeed.init_inference(m.load_model(config, "4bit", "cpu"), dtype=torch.float32)


# --- verification ---------------------------------------------------------------------------------------------------

def test_verify_detects_a_changed_model():
    config = tiny_config(backend="hf")
    model = m.load_model(config, "none", "cpu")
    tok = m.load_tokenizer(config)
    ids = m.verify_batch(tok, ["one prompt", "and another one"], "cpu")
    ref = m.greedy_with_logits(model, ids)
    assert m.verify(model, ids, ref, m.EXACT_TOL)["passed"]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)      # a 1% change in one matrix
    result = m.verify(model, ids, ref, m.EXACT_TOL)
    assert not result["passed"] and 0 < result["prefill_rel_error"] < 0.1


# --- fallbacks (each failure is real: a package hidden, a kernel that does not exist on CPU) ---------------------

def test_kernel_injection_known_broken_is_refused_up_front(tiny):
    """deepspeed 0.19.8 + transformers 5.17 (requirements.txt): injection is not even tried (a GPU would spend a
    minute building kernels that then crash); --no-fallback makes that a usage error."""
    out, record, _ = greedy_tokens(tiny_config(kernel_inject=True))
    assert record["kernel_inject"] is False and record["verify"]["passed"]
    assert record["fallbacks"] == [{"what": "kernel_inject", "from": "on", "to": "off",
                                    "reason": m.injection_known_broken()}]
    assert "do not work with transformers 5.17" in m.injection_known_broken()
    r = run_cli(*tiny, "--no-fallback")
    assert r.returncode == 2, r.stderr
    assert "kernel_inject on cannot be used" in r.stderr and "Traceback" not in r.stderr


def test_kernel_injection_falls_back_when_it_fails(monkeypatch):
    """A combination not known to be broken is tried; here it fails for real (no CPU kernels) and falls back."""
    monkeypatch.setitem(m.INJECTION_BROKEN, "deepspeed_upto", "0.0")
    assert m.injection_known_broken() is None
    out, record, _ = greedy_tokens(tiny_config(kernel_inject=True))
    assert record["kernel_inject"] is False
    assert record["fallbacks"] == [{"what": "kernel_inject", "from": "on", "to": "off",
                                    "reason": "ValueError: This op had not been implemented on CPU backend."}]
    assert record["verify"]["passed"]
    config = tiny_config(kernel_inject=True, fallback=False)
    with pytest.raises(m.RunFailure, match="kernel_inject on cannot be used"):
        m.init_engine(config)


def test_quant_with_injection_turns_injection_off_or_refuses(tiny):
    out, record, _ = greedy_tokens(tiny_config(quant="8bit", kernel_inject=True))
    assert record["fallbacks"][0]["reason"] == "bitsandbytes weights cannot be kernel-injected"
    r = run_cli(*tiny, "--quant", "8bit", "--no-fallback")
    assert r.returncode == 2 and "cannot be kernel-injected" in r.stderr


def test_without_bitsandbytes_4bit_falls_back_to_8bit_then_none(tiny, tmp_path):
    r = run_cli(*tiny, "--quant", "4bit", "--json", str(tmp_path / "r.json"), prelude=HIDE.format(name="bitsandbytes"))
    assert r.returncode == 0, r.stderr
    engine = json.loads((tmp_path / "r.json").read_text())["engine"]
    assert engine["quant"] == "none"
    assert [(f["from"], f["to"]) for f in engine["fallbacks"] if f["what"] == "quant"] == [("4bit", "8bit"),
                                                                                          ("8bit", "none")]
    assert all(f["reason"] == "ImportError: bitsandbytes is not installed (pip install bitsandbytes)"
               for f in engine["fallbacks"] if f["what"] == "quant")
    r = run_cli(*tiny, "--quant", "8bit", "--no-fallback", prelude=HIDE.format(name="bitsandbytes"))
    assert r.returncode == 2 and "quant 8bit cannot be used" in r.stderr and "Traceback" not in r.stderr


def test_4bit_that_cannot_run_falls_back_to_8bit(tmp_path):
    """bitsandbytes' CPU 4-bit kernel needs layers whose rows are a multiple of 32: a real 4-bit failure."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    preset = {**m.PRESETS["random:tiny"], "intermediate_size": 688}
    model = AutoModelForCausalLM.from_config(LlamaConfig(**preset, eos_token_id=1))
    model.save_pretrained(tmp_path)
    m.byte_tokenizer(preset["vocab_size"]).save_pretrained(tmp_path)
    config = m.DeployConfig(model_name=str(tmp_path), quant="4bit", kernel_inject=False, max_new_tokens=4,
                            iters=1, warmup=0)
    out, record, _ = greedy_tokens(config)
    assert record["quant"] == "8bit"
    assert record["fallbacks"][0]["from"] == "4bit" and "divisible" in record["fallbacks"][0]["reason"]
    assert out["new_tokens"] == [4]


def test_without_deepspeed_runs_plain_transformers(tiny, tmp_path):
    r = run_cli(*tiny, "--json", str(tmp_path / "r.json"), prelude=HIDE.format(name="deepspeed"))
    assert r.returncode == 0, r.stderr
    engine = json.loads((tmp_path / "r.json").read_text())["engine"]
    assert engine["backend"] == "hf"
    assert engine["fallbacks"] == [{"what": "backend", "from": "deepspeed", "to": "hf",
                                    "reason": "deepspeed is not installed"}]
    r = run_cli(*tiny, "--no-fallback", prelude=HIDE.format(name="deepspeed"))
    assert r.returncode == 2 and "deepspeed is not installed" in r.stderr


# --- the report ---------------------------------------------------------------------------------------------------

def test_cli_end_to_end_json_report_is_consistent():
    r = run_cli("--model", "random:tiny", "--max-new-tokens", "10", "--iters", "2", "--warmup", "1",
                "--batch-size", "2", "--prompt", "hello", "--prompt", "a second, longer prompt", "--prompt", "3rd",
                "--json", "-")
    assert r.returncode == 0, r.stderr
    assert "random weights: the text is meaningless" in r.stdout and "tok/s" in r.stdout
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"config", "versions", "hardware", "engine", "metrics", "memory", "outputs"} <= set(report)
    assert report["versions"]["deepspeed"] and report["versions"]["bitsandbytes"]
    met = report["metrics"]
    runs = met["per_run"]
    assert len(runs) == 2 * 2 == met["latency_s"]["n"]            # 2 iters x 2 batches; warmup not counted
    assert met["generated_tokens"] == sum(sum(r["new_tokens"]) for r in runs)
    assert met["tokens_per_s_cluster"] == pytest.approx(met["generated_tokens"] / met["timed_seconds"])
    assert met["timed_seconds"] == pytest.approx(sum(r["latency_s"] for r in runs))
    assert met["latency_s"]["p50"] <= met["latency_s"]["p95"]
    assert abs(met["timer_overhead"]) < 1 and "the TTFT timer changed the batch latency" in r.stdout
    assert [o["prompt"] for o in report["outputs"]] == ["hello", "a second, longer prompt", "3rd", "hello"]
    first_iter = [n for r in runs[:2] for n in r["new_tokens"]]
    assert [o["new_tokens"] for o in report["outputs"]] == first_iter
    assert report["memory"]["per_rank"] == [dict(m.gpu_mem_gb(), loading_peak_allocated=None)]
    assert report["hardware"]["world_size"] == 1


def test_tensor_parallel_2_cpu_ranks_equals_tp_1(tmp_path):
    """Two CPU ranks under the deepspeed launcher (gloo): AutoTP shards the model, the tokens stay the same."""
    import shutil
    import subprocess
    import sys
    common = ["--model", "random:tiny", "--max-new-tokens", "16", "--iters", "1", "--warmup", "0",
              "--prompt", "tensor parallel", "--prompt", "two ranks", "--batch-size", "2"]
    r1 = run_cli(*common, "--json", str(tmp_path / "tp1.json"))
    assert r1.returncode == 0, r1.stderr
    launcher = shutil.which("deepspeed", path=str(__import__("pathlib").Path(sys.executable).parent))
    r2 = subprocess.run([launcher, "--num_gpus", "2", "ds_bnb_infer.py", "--tp-size", "2", *common,
                         "--json", str(tmp_path / "tp2.json")], capture_output=True, text=True, timeout=600,
                        cwd=m.__file__.rsplit("/", 1)[0])
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    tp1, tp2 = (json.loads((tmp_path / f).read_text()) for f in ("tp1.json", "tp2.json"))
    assert tp2["hardware"]["world_size"] == 2 and len(tp2["memory"]["per_rank"]) == 2
    assert tp2["engine"]["verify"]["passed"] and tp2["engine"]["verify"]["tolerance"] > 0
    assert [o["text"] for o in tp2["outputs"]] == [o["text"] for o in tp1["outputs"]]
    assert "AutoTP" in r2.stdout                                    # the layers really were sharded


def test_tensor_parallel_half_precision_is_checked_against_fp32_on_rank_0(tmp_path):
    """tp > 1 in bf16: the whole model only ever sits on the CPU, so rank 0 runs the reference there in fp32 and
    sends it to the other rank (on GPUs a half-precision model cannot be the reference on the CPU)."""
    import shutil
    import subprocess
    import sys
    launcher = shutil.which("deepspeed", path=str(__import__("pathlib").Path(sys.executable).parent))
    r = subprocess.run([launcher, "--num_gpus", "2", "ds_bnb_infer.py", "--tp-size", "2", "--model", "random:tiny",
                        "--dtype", "bf16", "--max-new-tokens", "4", "--iters", "1", "--warmup", "0",
                        "--json", str(tmp_path / "tp2.json")], capture_output=True, text=True, timeout=600,
                       cwd=m.__file__.rsplit("/", 1)[0])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    v = json.loads((tmp_path / "tp2.json").read_text())["engine"]["verify"]
    assert v["reference"] == "the unwrapped model in fp32 on the CPU (rank 0)"
    assert v["passed"] and 0 < v["prefill_rel_error"] <= m.KERNEL_TOL["bf16"]


# --- weight bytes, bandwidth, --compare ----------------------------------------------------------------------------

def test_preset_weights_are_the_same_for_every_rank_and_for_tp_1():
    """random_weights: one seed, one model — built where tp 1 builds it and where a tp rank builds it (the CPU)."""
    one = m.load_model(tiny_config(), "none", "cpu")
    rank = m.load_model(tiny_config(tp_size=2), "none", "cpu")
    other_seed = m.load_model(tiny_config(seed=1), "none", "cpu")
    pairs = list(zip(one.state_dict().values(), rank.state_dict().values(), other_seed.state_dict().values()))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    matrices = [(a, c) for a, _, c in pairs if a.dim() >= 2]
    assert all(not torch.equal(a, c) for a, c in matrices)
    assert all(abs(float(a.std()) - one.config.initializer_range) < 2e-3 for a, _ in matrices)


def test_weight_bytes_count_the_real_storage():
    config = tiny_config()
    full = m.load_model(config, "none", "cpu")
    n_params = sum(p.numel() for p in full.parameters())
    assert m.weight_bytes(full) == 4 * n_params + sum(b.numel() * b.element_size() for b in full.buffers())
    emb = full.get_input_embeddings().weight
    assert m.decode_read_bytes(full) == m.weight_bytes(full) - 4 * emb.numel()
    q8, q4 = (m.load_model(config, q, "cpu") for q in ("8bit", "4bit"))
    linear = sum(mod.weight.numel() for mod in full.modules() if isinstance(mod, torch.nn.Linear)
                 and mod is not full.lm_head)
    rows = sum(mod.weight.shape[0] for mod in full.modules() if isinstance(mod, torch.nn.Linear)
               and mod is not full.lm_head)
    # 8-bit: one byte per weight plus one fp32 scale per output row (SCB)
    assert m.weight_bytes(q8) == m.weight_bytes(full) - 3 * linear + 4 * rows
    # 4-bit: half a byte per weight plus the (double-quantized) absmax and codebooks, which must be counted too
    assert m.weight_bytes(full) - 4 * linear + linear // 2 < m.weight_bytes(q4) < m.weight_bytes(q8)


def test_copy_bandwidth_is_measured():
    bw = m.copy_bandwidth_gbps("cpu")
    assert 0.1 < bw < 10_000 and m.copy_bandwidth_gbps("cpu") == bw        # measured once per run, cached


def test_compare_runs_each_mode_and_reports_failures(tmp_path):
    r = run_cli("--model", "random:tiny", "--max-new-tokens", "8", "--iters", "2", "--warmup", "0",
                "--compare", "hf,ds-4bit,ds-inject,hf-compile,hf-8bit-t0-compile", "--json", str(tmp_path / "c.json"),
                "--plot", str(tmp_path / "c.png"), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "c.json").read_text())
    assert {"card", "date", "versions", "bandwidth_GBps", "rows"} <= set(result)
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["hf", "ds-4bit", "ds-inject", "hf-compile", "hf-8bit-t0-compile"]
    assert rows["ds-inject"]["status"] == "failed" and "do not work with transformers" in rows["ds-inject"]["reason"]
    assert rows["hf"]["verified"] == "reference" and rows["ds-4bit"]["verified"] is True
    assert rows["hf-compile"]["compile"] is True and rows["hf-compile"]["verified"] is True
    assert rows["ds-4bit"]["quant"] == "4bit" and rows["ds-4bit"]["weight_gb"] < rows["hf"]["weight_gb"]
    t0 = rows["hf-8bit-t0-compile"]                          # plain int8: the mode passes --int8-threshold 0 on
    assert (t0["quant"], t0["int8_threshold"], t0["verified"]) == ("8bit", 0.0, True)
    assert rows["ds-4bit"]["int8_threshold"] is None
    for row in (rows["hf"], rows["ds-4bit"], rows["hf-compile"]):
        for key in ("backend", "quant", "kernel_inject", "compile", "batch_size", "prompt_len", "new_tokens",
                    "decode_tok_s", "ttft_s", "p50_s", "p95_s", "peak_alloc_gb", "mbu", "verified"):
            assert key in row
        assert row["decode_tok_s"] > 0 and 0 < row["mbu"] and row["p50_s"] <= row["p95_s"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert "FAILED" in r.stdout and "MBU" in r.stdout


def test_plot_without_matplotlib_is_one_sentence(tiny):
    r = run_cli(*tiny, "--compare", "hf", "--plot", "x.png", prelude=HIDE.format(name="matplotlib"))
    assert r.returncode == 2 and "pip install matplotlib" in r.stderr and "Traceback" not in r.stderr


def test_a_rank_that_dies_ends_every_rank():
    """Rank 1 is killed mid-run (as the OOM killer would): rank 0, blocked in a collective, must not hang."""
    import os
    import re
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen([launcher, "--num_gpus", "2", "ds_bnb_infer.py", "--tp-size", "2", "--model",
                             "random:tiny", "--max-new-tokens", "2000", "--iters", "5", "--warmup", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(m.__file__).parent)
    pids, sharded = {}, 0
    try:
        for line in proc.stdout:                      # until both ranks have sharded the model
            found = re.search(r"process (\d+) spawned with command: .*'--local_rank=(\d)'", line)
            if found:
                pids[found.group(2)] = int(found.group(1))
            sharded += line.count("AutoTP")         # two ranks' prints can land on one line
            if sharded >= 2:
                break
        assert set(pids) == {"0", "1"} and sharded >= 2
        time.sleep(2)
        os.kill(pids["1"], signal.SIGKILL)
        start = time.time()
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert time.time() - start < 60
        with pytest.raises(ProcessLookupError):
            os.kill(pids["0"], 0)                     # rank 0 is gone too
    finally:
        if proc.poll() is None:
            proc.kill()
