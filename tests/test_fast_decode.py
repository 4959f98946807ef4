"""extensions/fast_decode.py (第十节 KV Cache): its decode loop gives generate()'s tokens, chooses how to run each kind
of model, and goes through the lesson's verification and report."""
import dataclasses
import json

import pytest
import torch

import ds_bnb_infer as m
from conftest import ROOT, run_cli
from extensions.fast_decode import FastGreedy, decode_step

FAST = ROOT / "extensions" / "fast_decode.py"


def test_decode_loop_equals_generate_with_padding_and_eos():
    """The loop (static cache, left padding, a row ending at EOS) gives generate()'s texts and token counts."""
    config = m.DeployConfig(model_name="random:tiny", backend="hf", max_new_tokens=40, device="cpu")
    model, tok, _ = m.init_engine(config)
    fast, prompts = FastGreedy(model), ["a", "a much longer prompt than the first", "DeepSpeed is"]
    first = tok.encode(m.generate(model, tok, prompts[:1], config)["texts"][0])
    model.generation_config.eos_token_id = first[5]          # so that the first row ends early (EOS)
    plain, ours = m.generate(model, tok, prompts, config), m.generate(fast, tok, prompts, config)
    assert min(plain["new_tokens"]) < 40 == max(plain["new_tokens"])     # one row stops at EOS, one runs on
    assert ours["texts"] == plain["texts"] and ours["new_tokens"] == plain["new_tokens"]
    assert fast.mode == "eager"                               # on a CPU the loop runs without CUDA graphs
    # Every row ends early: the loop notices at its next check (every 16 steps) and stops there.
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        firsts = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)[:, -1]
    model.generation_config.eos_token_id = sorted(set(firsts.tolist()))
    plain, ours = m.generate(model, tok, prompts, config), m.generate(fast, tok, prompts, config)
    assert plain["new_tokens"] == [1, 1, 1] and ours["steps"] == 16
    assert ours["texts"] == plain["texts"] and ours["new_tokens"] == plain["new_tokens"]


@pytest.mark.parametrize("quant, threshold, on_gpu", [("none", 6.0, "compiled"), ("4bit", 6.0, "cuda-graph"),
                                                     ("8bit", 6.0, "eager"), ("8bit", 0.0, "cuda-graph")])
def test_decode_step_is_compiled_captured_or_eager_by_kind_of_model(quant, threshold, on_gpu):
    """What the loop does with each kind of model on a GPU (the choice itself touches no GPU), and on a CPU:
    LLM.int8 with outlier columns is not captured, plain int8 (--int8-threshold 0) is."""
    config = m.DeployConfig(model_name="random:tiny", quant=quant, int8_threshold=threshold)
    model = m.load_model(config, quant, "cpu")
    assert decode_step(model, torch.device("cuda"))[1] == on_gpu
    assert decode_step(model, torch.device("cpu"))[1] == "eager"


def test_cli_runs_the_lesson_with_the_loop_and_verifies_it(tmp_path):
    r = run_cli("--model", "random:tiny", "--backend", "hf", "--max-new-tokens", "12", "--iters", "1",
                "--json", str(tmp_path / "r.json"), script=FAST)
    assert r.returncode == 0, r.stderr
    engine = json.loads((tmp_path / "r.json").read_text())["engine"]
    assert engine["decode"] == "eager" and engine["verify"]["passed"]
    assert engine["verify"]["tolerance"] == m.KERNEL_TOL["fp32"]    # a compiled step may round differently
    assert "[warmup] 2 untimed run(s)" in r.stderr and "decode=eager" in r.stdout


@pytest.mark.parametrize("args, words", [(["--do-sample"], "greedy decode loop for one GPU"),
                                         (["--quant", "3bit"], "invalid choice"),
                                         (["--prompt", ""], "--prompt is empty")])
def test_cli_bad_input_is_one_sentence(args, words):
    r = run_cli("--model", "random:tiny", *args, script=FAST)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
    assert "usage: extensions/fast_decode.py" in r.stderr or r.stderr.startswith("error:")


def test_validate_refuses_tensor_parallel():
    with pytest.raises(m.UsageError, match="for one GPU"):
        FastGreedy.validate(dataclasses.replace(m.DeployConfig(), tp_size=2))
