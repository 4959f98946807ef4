"""init_engine / generate / measure / the report, with the real libraries on the CPU and the random:tiny preset."""
import contextlib
import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import ds_bnb_infer as m
from conftest import HIDE, ROOT, SCRIPT, launch, launch_cmd, run_cli


def tiny_config(**kw):
    return m.DeployConfig(**{**dict(model_name="random:tiny", max_new_tokens=8, iters=1, warmup=0, device="cpu"), **kw})


def greedy_tokens(config, prompts=("DeepSpeed is",)):
    engine, tok, info = m.init_engine(config)
    return m.generate(engine, tok, list(prompts), config), info, engine


def logits(model, text="a quantized model must not change"):
    ids = m.byte_tokenizer(m.PRESETS["random:tiny"]["vocab_size"])([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- backends ---------------------------------------------------------------------------------------------------

def test_hf_and_deepspeed_give_identical_greedy_tokens():
    hf, info_hf, _ = greedy_tokens(tiny_config(backend="hf", max_new_tokens=24))
    ds, info_ds, engine = greedy_tokens(tiny_config(backend="deepspeed", kernel_inject=False, max_new_tokens=24))
    import deepspeed
    assert isinstance(engine, deepspeed.InferenceEngine)
    assert (info_hf.backend, info_ds.backend, info_ds.decode) == ("hf", "deepspeed", "generate")
    assert hf["texts"] == ds["texts"] and hf["new_tokens"] == ds["new_tokens"] == [24]
    assert info_ds.verify["passed"] and info_ds.verify["greedy_tokens_matching"] == m.VERIFY_TOKENS
    assert set(info_ds.seconds) == {"load", "reference", "init_inference", "verify"}
    assert info_hf.verify is None and set(info_hf.seconds) == {"load"}        # no reference when none is needed


def test_left_padding_batched_equals_one_by_one():
    config = tiny_config(backend="hf", max_new_tokens=6)
    engine, tok, _ = m.init_engine(config)
    prompts = ["a", "a much longer prompt than the first"]
    batched = m.generate(engine, tok, prompts, config)["texts"]
    alone = [m.generate(engine, tok, [p], config)["texts"][0] for p in prompts]
    assert batched == alone


def test_timing_fields_are_consistent():
    out, _, _ = greedy_tokens(tiny_config(backend="hf", max_new_tokens=12))
    assert 0 < out["ttft_s"] < out["latency_s"]
    assert out["steps"] == 12 and out["decode_s_per_token"] > 0
    assert out["decode_s_per_token"] == pytest.approx((out["latency_s"] - out["ttft_s"]) / 11)


def test_first_token_timer_fires_once_at_the_prefill_and_leaves_no_hook():
    """TTFT = the end of the prefill forward; the decode steps after it must run with no hook attached."""
    config = tiny_config(backend="hf", max_new_tokens=12)
    engine, tok, _ = m.init_engine(config)
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
    engine, tok, _ = m.init_engine(config)
    a = m.generate(engine, tok, ["x"], config)["texts"]
    b = m.generate(engine, tok, ["x"], config)["texts"]
    c = m.generate(engine, tok, ["x"], dataclasses.replace(config, seed=1))["texts"]
    greedy = m.generate(engine, tok, ["x"], dataclasses.replace(config, do_sample=False))["texts"]
    assert a == b and a != c and a != greedy


def test_deepspeed_wrapping_keeps_a_half_precision_model_bit_identical():
    """DeepSpeed's .half()/.bfloat16() would re-round Llama's fp32 rotary inv_freq buffer. DeepSpeed's CPU
    accelerator has no fp16, so bf16 shows it here."""
    config = tiny_config(dtype="bf16", kernel_inject=False)
    unwrapped = m.load_model(config, "none", "cpu")
    engine, _, info = m.init_engine(config)
    assert engine.module.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(logits(unwrapped), logits(engine))
    assert info.verify["passed"] and info.verify["tolerance"] == 0.0


def test_prompts_longer_than_deepspeeds_default_1024_tokens_run():
    """init_inference's max_tokens defaults to 1024 (total tokens a sequence may have); the script sets it to the
    model's positions, so every backend takes what the model takes (random:tiny: 2048)."""
    config = tiny_config(max_new_tokens=4, prompts=["x" * 1500])
    out, info, engine = greedy_tokens(config, prompts=config.prompts)
    assert info.backend == "deepspeed" and engine._config.max_out_tokens == 2048
    assert out["new_tokens"] == [4] and out["prompt_tokens"] == 1500


# --- bitsandbytes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_load_and_generate_on_cpu(quant, layer):
    out, info, engine = greedy_tokens(tiny_config(quant=quant))
    assert info.quant == quant and info.fallbacks == [] and info.kernel_inject is False
    assert info.notes == ["kernel injection off by default: bitsandbytes weights cannot be kernel-injected"]
    assert any(type(mod).__name__ == layer for mod in engine.module.modules())
    assert out["new_tokens"] == [8]


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_int8_threshold_reaches_every_8bit_layer(threshold):
    """--int8-threshold is BitsAndBytesConfig's llm_int8_threshold: 0 = no outlier columns kept in fp16."""
    out, _, engine = greedy_tokens(tiny_config(quant="8bit", int8_threshold=threshold))
    layers = [mod for mod in engine.module.modules() if type(mod).__name__ == "Linear8bitLt"]
    assert layers and {mod.state.threshold for mod in layers} == {threshold}
    assert out["new_tokens"] == [8]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_init_engine_does_not_change_a_quantized_model(quant, dtype):
    """DeepSpeed casts its module to `dtype`; on a bnb model that raises (fp32/fp16) or re-rounds it (bf16)."""
    config = tiny_config(quant=quant, dtype=dtype, kernel_inject=False)
    unwrapped = m.load_model(config, quant, "cpu")
    engine, _, info = m.init_engine(config)
    assert isinstance(engine, __import__("deepspeed").InferenceEngine)
    assert torch.equal(logits(unwrapped), logits(engine))
    assert info.verify["passed"] and info.verify["prefill_rel_error"] == 0.0


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
    enc = m.load_tokenizer(config)(["one prompt", "and another one"], return_tensors="pt", padding=True)
    ids = {k: enc[k] for k in ("input_ids", "attention_mask")}
    ref = m.reference(model, ids, tp_size=1)
    assert m.verify(model, ids, ref, m.EXACT_TOL)["passed"]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)      # a 1% change in one matrix
    result = m.verify(model, ids, ref, m.EXACT_TOL)
    assert not result["passed"] and 0 < result["prefill_rel_error"] < 0.1


def test_a_failed_check_names_the_compute_dtype_only_where_4bit_computes_coarser():
    """A check that fails at a tolerance above the model dtype's (4-bit's bf16 compute in an fp16 model: it rounds
    where the model does not, 第七节) names the flag that computes in the model's dtype; any other failure does not."""
    config = tiny_config(backend="hf")
    model = m.load_model(config, "none", "cpu")
    enc = m.load_tokenizer(config)(["one prompt"], return_tensors="pt")
    ids = {k: enc[k] for k in ("input_ids", "attention_mask")}
    ref = m.reference(model, ids, tp_size=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    for dtype, compute, fix in [(torch.float16, "bf16", "fp16"), (torch.float32, "bf16", "fp32"),
                                (torch.float16, None, None), (torch.bfloat16, "bf16", None)]:
        result = m.verify(model, ids, ref, m.kernel_tol(dtype, compute))
        message = str(m.failed_check(result, dtype))
        assert not result["passed"] and message.startswith(f"its output differs from {ref['of']}: rel. error")
        assert ("--bnb-4bit-compute-dtype" in message) == (fix is not None)
        assert fix is None or message.endswith(f"; try --bnb-4bit-compute-dtype {fix}")


# --- kernel injection and fallbacks (each failure is real: a package hidden, a kernel missing on a CPU) -----------

def test_kernel_injection_is_off_by_default_on_known_broken_versions(tiny):
    """deepspeed 0.19.8 + transformers 5.17 (requirements.txt): injection is not tried by default (a GPU would spend
    a minute building kernels that then crash), and the run says so once, as a note, not as a fallback."""
    assert "do not work with transformers 5.17" in m.injection_known_broken()
    out, info, _ = greedy_tokens(tiny_config())
    assert info.kernel_inject is False and info.fallbacks == [] and info.verify["passed"]
    assert info.notes == [f"kernel injection off by default: {m.injection_known_broken()}"]
    r = run_cli(*tiny, "--no-fallback")                         # nothing fell back: --no-fallback has no say
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("kernel injection off by default") == 1 and "fallback" not in r.stdout + r.stderr


def test_explicit_kernel_injection_is_tried_and_falls_back_when_it_fails(tiny):
    """--kernel-inject tries even a known-broken pair; on a CPU it fails for real (no CPU kernels) and falls back,
    and under --no-fallback that is a run failure (exit 1)."""
    out, info, _ = greedy_tokens(tiny_config(kernel_inject=True))
    assert info.kernel_inject is False and info.verify["passed"]
    assert info.fallbacks == [{"what": "kernel_inject", "from": "on", "to": "off",
                               "reason": "ValueError: This op had not been implemented on CPU backend."}]
    r = run_cli(*tiny, "--kernel-inject", "--no-fallback")
    assert r.returncode == 1 and "kernel_inject on cannot be used" in r.stderr and "Traceback" not in r.stderr


def test_default_injection_is_tried_where_not_known_broken(monkeypatch):
    monkeypatch.setitem(m.INJECTION_BROKEN, "deepspeed_upto", "0.0")
    assert m.injection_known_broken() is None
    out, info, _ = greedy_tokens(tiny_config())
    assert info.kernel_inject is False and info.notes == [] and info.fallbacks[0]["what"] == "kernel_inject"


def test_quant_with_explicit_injection_falls_back_or_refuses(tiny):
    out, info, _ = greedy_tokens(tiny_config(quant="8bit", kernel_inject=True))
    assert info.fallbacks[0]["reason"] == "bitsandbytes weights cannot be kernel-injected"
    r = run_cli(*tiny, "--quant", "8bit", "--kernel-inject", "--no-fallback")
    assert r.returncode == 2 and "cannot be kernel-injected" in r.stderr


def test_without_bitsandbytes_4bit_falls_back_to_8bit_then_none(tiny, tmp_path):
    r = run_cli(*tiny, "--quant", "4bit", "--json", str(tmp_path / "r.json"), prelude=HIDE.format(name="bitsandbytes"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["engine"]["quant"] == "none" and report["versions"]["bitsandbytes"] is None
    fallbacks = report["engine"]["fallbacks"]
    assert [(f["from"], f["to"]) for f in fallbacks if f["what"] == "quant"] == [("4bit", "8bit"), ("8bit", "none")]
    assert all(f["reason"] == "ImportError: bitsandbytes is not installed (pip install bitsandbytes)"
               for f in fallbacks if f["what"] == "quant")
    r = run_cli(*tiny, "--quant", "8bit", "--no-fallback", prelude=HIDE.format(name="bitsandbytes"))
    assert r.returncode == 2 and "quant 8bit cannot be used" in r.stderr and "Traceback" not in r.stderr


def test_4bit_that_cannot_run_falls_back_to_8bit(tmp_path):
    """A real 4-bit failure at the first matmul: on CPUs with AVX512-BF16, bitsandbytes packs 4-bit weights in
    blocks of 32 output rows and cannot run a layer of 688. Elsewhere that kernel is not used and 4-bit runs."""
    from bitsandbytes.functional import has_avx512bf16
    from transformers import AutoModelForCausalLM, LlamaConfig
    preset = {**m.PRESETS["random:tiny"], "intermediate_size": 688}
    AutoModelForCausalLM.from_config(LlamaConfig(**preset, eos_token_id=1)).save_pretrained(tmp_path)
    m.byte_tokenizer(preset["vocab_size"]).save_pretrained(tmp_path)
    config = m.DeployConfig(model_name=str(tmp_path), quant="4bit", max_new_tokens=4, iters=1, warmup=0)
    out, info, _ = greedy_tokens(config)
    if has_avx512bf16():
        assert info.quant == "8bit"
        assert info.fallbacks[0]["from"] == "4bit" and "divisible" in info.fallbacks[0]["reason"]
    else:
        assert info.quant == "4bit" and info.fallbacks == []
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
    *console, last = r.stdout.strip().splitlines()
    report = json.loads(last)
    assert all(not line.startswith("[") for line in console)        # progress and library lines go to stderr
    assert "[load]" in r.stderr and "[measure] timed runs" in r.stderr
    assert {"config", "versions", "hardware", "engine", "metrics", "memory", "outputs"} <= set(report)
    assert report["versions"]["deepspeed"] and report["versions"]["bitsandbytes"]
    assert set(report["engine"]) == {f.name for f in dataclasses.fields(m.EngineInfo)}
    met = report["metrics"]
    runs = met["per_run"]
    assert len(runs) == 2 * 2 == met["latency_s"]["n"]            # 2 iters x 2 batches; warmup not counted
    assert met["generated_tokens"] == sum(sum(r["new_tokens"]) for r in runs)
    assert met["tokens_per_s_cluster"] == pytest.approx(met["generated_tokens"] / met["timed_seconds"])
    assert met["timed_seconds"] == pytest.approx(sum(r["latency_s"] for r in runs))
    assert met["latency_s"]["p50"] <= met["latency_s"]["p95"]
    assert met["achieved_gb_s"] == pytest.approx(met["decode_read_gb"] / met["decode_s_per_token"]["p50"])
    assert [o["prompt"] for o in report["outputs"]] == ["hello", "a second, longer prompt", "3rd", "hello"]
    assert [o["new_tokens"] for o in report["outputs"]] == [n for r in runs[:2] for n in r["new_tokens"]]
    rss = report["memory"]["per_rank"][0]["host_peak_rss"]          # the peak host memory, in GiB (Linux: KiB)
    assert 0.1 < rss < 64 and f"rank 0 host memory: peak RSS {rss:.2f} GiB" in m.render(report)
    assert report["memory"]["per_rank"] == [dict(m.gpu_mem_gb(), loading_peak_allocated=None, host_peak_rss=rss)]
    assert report["hardware"]["world_size"] == 1


def test_console_shortens_long_texts_and_names_where_the_json_went(tmp_path):
    r = run_cli("--model", "random:tiny", "--max-new-tokens", "200", "--iters", "1", "--warmup", "0",
                "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    full = json.loads((tmp_path / "r.json").read_text())["outputs"][0]["text"]
    assert len(repr(full)) > 100
    line = next(line for line in r.stdout.splitlines() if line.startswith("> "))
    assert len(line) < 200 and f"({len(repr(full))} characters; --text-chars 0 shows all)" in line
    assert f"[json] report written to {tmp_path / 'r.json'}" in r.stderr
    assert "[reference]" in r.stderr and "WARNING" not in r.stdout + r.stderr
    whole = run_cli("--model", "random:tiny", "--max-new-tokens", "200", "--iters", "1", "--warmup", "0",
                    "--text-chars", "0")
    assert f"> 'DeepSpeed is' -> {repr(full)} (200 tokens)" in whole.stdout        # --text-chars 0: all of it


def test_ctrl_c_ends_with_one_line_and_exit_130():
    # The child gets Ctrl-C as a terminal's foreground job does: a background job of a non-interactive shell (a CI
    # started with `&`) ignores SIGINT, and a child inherits that.
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--model", "random:tiny", "--max-new-tokens", "1000",
                             "--iters", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:                   # wait until it is measuring, then press Ctrl-C
            if line.startswith("[warmup]"):
                break
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("interrupted (Ctrl-C): no report was written.")
    assert err.count("interrupted") == 1
    assert "tok/s" not in out


# --- tensor parallel: two CPU ranks under the deepspeed launcher (gloo) ---------------------------------------------

def test_tensor_parallel_2_cpu_ranks_equals_tp_1(tmp_path):
    """AutoTP shards the model over two ranks; the tokens stay those of tp 1."""
    common = ["--model", "random:tiny", "--max-new-tokens", "16", "--iters", "1", "--warmup", "0",
              "--prompt", "tensor parallel", "--prompt", "two ranks", "--batch-size", "2"]
    r1 = run_cli(*common, "--json", str(tmp_path / "tp1.json"))
    assert r1.returncode == 0, r1.stderr
    shm_files = lambda: set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))  # noqa: E731
    before = shm_files()
    r2 = launch(*common, "--json", str(tmp_path / "tp2.json"))
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert shm_files() <= before           # DeepSpeed's all-reduce files (66 MB a rank) left with the ranks
    tp1, tp2 = (json.loads((tmp_path / f).read_text()) for f in ("tp1.json", "tp2.json"))
    assert tp2["hardware"]["world_size"] == 2 and len(tp2["memory"]["per_rank"]) == 2
    assert all(rank["host_peak_rss"] > 0.1 for rank in tp2["memory"]["per_rank"])     # each rank's own
    assert tp2["engine"]["verify"]["passed"] and tp2["engine"]["verify"]["tolerance"] > 0
    assert [o["text"] for o in tp2["outputs"]] == [o["text"] for o in tp1["outputs"]]
    assert "AutoTP" in r2.stderr                                    # the layers really were sharded
    assert "tensor parallel on CPU ranks (gloo) shows how AutoTP shards the model" in r2.stdout


def test_tensor_parallel_half_precision_is_checked_against_fp32_on_rank_0(tmp_path):
    """tp > 1 in bf16: the whole model only ever sits on the CPU, so rank 0 runs the reference there in fp32 and
    sends it to the other rank (on GPUs a half-precision model cannot be the reference on the CPU)."""
    r = launch("--model", "random:tiny", "--dtype", "bf16", "--max-new-tokens", "4", "--iters", "1", "--warmup", "0",
               "--json", str(tmp_path / "tp2.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    v = json.loads((tmp_path / "tp2.json").read_text())["engine"]["verify"]
    assert v["reference"] == "the unwrapped model in fp32 on the CPU (rank 0)"
    assert v["passed"] and 0 < v["prefill_rel_error"] <= m.KERNEL_TOL["bf16"]


def test_a_rank_that_dies_ends_every_rank():
    """Rank 1 is killed mid-run (as the OOM killer would): rank 0, blocked in a collective, must not hang."""
    proc = subprocess.Popen(launch_cmd("--model", "random:tiny", "--max-new-tokens", "2000", "--iters", "5",
                                       "--warmup", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
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
        proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert time.time() - start < 60
        with pytest.raises(ProcessLookupError):
            os.kill(pids["0"], 0)                     # rank 0 is gone too
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)                # the launcher and any rank left


# --- weight bytes ----------------------------------------------------------------------------------------------

def test_preset_weights_are_the_same_for_every_rank_and_for_tp_1():
    """One seed, one model: built where tp 1 builds it and where a tp rank builds it (the CPU)."""
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
    linears = [mod for mod in full.modules() if isinstance(mod, torch.nn.Linear) and mod is not full.lm_head]
    weights, rows = sum(mod.weight.numel() for mod in linears), sum(mod.weight.shape[0] for mod in linears)
    # 8-bit: one byte per weight plus one fp32 scale per output row (SCB)
    assert m.weight_bytes(q8) == m.weight_bytes(full) - 3 * weights + 4 * rows
    # 4-bit: half a byte per weight plus the (double-quantized) absmax and codebooks, which must be counted too
    assert m.weight_bytes(full) - 4 * weights + weights // 2 < m.weight_bytes(q4) < m.weight_bytes(q8)
