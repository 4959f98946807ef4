"""DeployConfig ↔ CLI, validation of bad input, and the pure metric functions (no model needed)."""
import dataclasses
import json
import math

import numpy as np
import pytest

import ds_bnb_infer as m
from conftest import run_cli


# --- config and parser ------------------------------------------------------------------------------------------

def test_parser_defaults_are_the_dataclass_defaults():
    assert m.config_from_args([]) == m.DeployConfig()
    assert m.DeployConfig().model_name == "meta-llama/Llama-2-7b-chat-hf"
    assert m.DeployConfig().max_new_tokens == 64


NON_DEFAULT = {"model_name": "random:tiny", "backend": "hf", "quant": "4bit", "dtype": "bf16", "tp_size": 2,
               "pp_size": 2, "int8_threshold": 0.0, "kernel_inject": False, "max_new_tokens": 7, "compile": True, "batch_size": 3,
               "prompts": ["a", "b"], "prompts_file": "p.txt", "warmup": 0, "iters": 5, "do_sample": True,
               "temperature": 0.5, "top_p": 0.9, "seed": 3, "device": "cpu", "fallback": False, "verify": False,
               "json_path": "-", "compare": "hf,ds", "plot": "c.png", "trust_remote_code": True, "debug": True,
               "local_rank": 1}


def test_every_field_has_a_flag_that_sets_it():
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(m.DeployConfig)}
    config = m.DeployConfig(**NON_DEFAULT)
    argv = m.to_argv(config)
    assert len(argv) >= len(NON_DEFAULT)
    assert m.config_from_args(argv) == config
    assert m.to_argv(m.DeployConfig()) == []


def test_compare_without_modes_means_all():
    assert m.config_from_args(["--compare"]).compare == "all"


def test_doc_flag_spellings():
    c = m.config_from_args(["--no-kernel-inject", "--no-fallback", "--do-sample", "--local-rank", "2"])
    assert (c.kernel_inject, c.fallback, c.do_sample, c.local_rank) == (False, False, True, 2)


# --- bad input: one sentence, exit 2, no traceback ---------------------------------------------------------------

def cfg(**kw):
    return m.DeployConfig(model_name="random:tiny", **kw)


@pytest.mark.parametrize("kw, world, words", [
    (dict(tp_size=0), 1, "--tp-size must be at least 1"),
    (dict(max_new_tokens=0), 1, "--max-new-tokens must be at least 1"),
    (dict(iters=0), 1, "--iters"),
    (dict(temperature=0.0), 1, "--temperature must be > 0"),
    (dict(top_p=1.5), 1, "--top-p"),
    (dict(tp_size=2), 1, "deepspeed --num_gpus=2"),
    (dict(tp_size=1), 2, "needs 1 ranks but 2"),
    (dict(tp_size=2, backend="hf"), 2, "use --backend deepspeed"),
    (dict(tp_size=2, quant="8bit"), 2, "cannot be combined with --tp-size"),
    (dict(pp_size=2), 1, "no pipeline engine"),
    (dict(dtype="fp16"), 1, "CPU accelerator has no fp16"),
    (dict(prompts=["x"], prompts_file="p.txt"), 1, "not both"),
    (dict(json_path="/no/such/dir/r.json"), 1, "does not exist"),
    (dict(compare="hf,turbo"), 1, "unknown --compare mode"),
    (dict(json_path="/tmp"), 1, "is a folder"),
    (dict(compare="all"), 2, "without the deepspeed launcher"),
    (dict(plot="c.png"), 1, "add --compare"),
    (dict(int8_threshold=-1.0, quant="8bit"), 1, "--int8-threshold must be >= 0"),
    (dict(int8_threshold=float("nan"), quant="8bit"), 1, "--int8-threshold must be >= 0"),
    (dict(int8_threshold=0.0), 1, "applies to --quant 8bit only"),
    (dict(int8_threshold=0.0, quant="4bit"), 1, "applies to --quant 8bit only"),
    (dict(int8_threshold=0.0, quant="8bit", compare="all"), 1, "hf-8bit-t0-compile sets it"),
    (dict(compile=True, do_sample=True), 1, "greedy decode loop"),
    (dict(compile=True, tp_size=2), 2, "greedy decode loop"),
])
def test_validate_rejects(kw, world, words):
    with pytest.raises(m.UsageError, match=words.replace("(", r"\(")):
        m.validate(cfg(**kw), world, cuda_available=False)


def test_validate_rejects_cuda_without_gpu():
    with pytest.raises(m.UsageError, match="no CUDA GPU"):
        m.validate(cfg(device="cuda"), 1, cuda_available=False)


def test_prompts_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\n second \n", encoding="utf-8")
    assert m.load_prompts(cfg(prompts_file=str(f))) == ["first prompt", " second "]
    f.write_text("\n  \n")
    with pytest.raises(m.UsageError, match="has no prompts"):
        m.load_prompts(cfg(prompts_file=str(f)))
    with pytest.raises(m.UsageError, match="cannot read --prompts-file"):
        m.load_prompts(cfg(prompts_file=str(tmp_path / "missing.txt")))


@pytest.mark.parametrize("args, words", [
    (["--model", "random:tiny", "--tp-size", "3"], "needs 3 ranks"),
    (["--model", "./no/such/model"], "model path ./no/such/model does not exist"),
    (["--model", "random:tiny", "--prompts-file", "/no/such/prompts.txt"], "cannot read --prompts-file"),
    (["--model", "random:tiny", "--device", "cuda"], "no CUDA GPU is visible"),
    (["--model", "random:tiny", "--max-new-tokens", "5000"], "at most 2048 positions"),
    (["--model", "random:tiny", "--compare", "hf", "--plot", "/no/such/dir/c.png"], "folder for --plot"),
    # The doc's default model is on the hub; offline (as in CI) that must be one sentence, not a traceback.
    ([], "cannot load meta-llama/Llama-2-7b-chat-hf"),
])
def test_cli_bad_input_exits_2_with_one_sentence(args, words):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr
    assert "Traceback" not in r.stderr
    assert "tok/s" not in r.stdout and "{" not in r.stdout           # no report, not even part of one
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def test_argparse_errors_exit_2():
    for args in (["--quant", "3bit"], ["--no-such-flag"], ["--batch-size", "two"]):
        r = run_cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "usage:" in r.stderr


def test_tensor_parallel_without_deepspeed_is_one_sentence():
    from conftest import HIDE
    r = run_cli("--model", "random:tiny", "--tp-size", "2", env={"WORLD_SIZE": "2", "RANK": "0"},
                prelude=HIDE.format(name="deepspeed"))
    assert r.returncode == 2 and "needs deepspeed" in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_the_traceback():
    r = run_cli("--model", "./no/such/model", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


# --- metric functions ---------------------------------------------------------------------------------------------

def test_count_new_tokens_stops_at_first_eos_and_ignores_padding():
    eos, pad = 2, 0
    new = [[5, 6, 7, 8],          # never ended: all 4 count
           [5, eos, pad, pad],    # ended at step 2: EOS counts, padding after it does not
           [eos, pad, pad, pad],
           [5, 6, eos, eos]]      # pad == eos: only the first EOS counts
    assert m.count_new_tokens(new, {eos}) == [4, 2, 1, 3]
    assert m.count_new_tokens([[5, 9, 6]], {9, 6}) == [2]


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0], [0.5, 0.1, 0.9, 0.3, 0.7], list(np.random.rand(23))])
@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_matches_numpy(values, q):
    assert m.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_summarize_and_rates():
    s = m.summarize([1.0, 2.0, 3.0, 4.0])
    assert s == {"mean": 2.5, "p50": 2.5, "p95": pytest.approx(3.85), "n": 4}
    assert m.decode_time_per_token(latency_s=1.1, ttft_s=0.1, steps=11) == pytest.approx(0.1)
    assert m.decode_time_per_token(1.0, 1.0, 1) is None
    assert m.throughput(100, 2.0) == 50.0 and math.isnan(m.throughput(5, 0.0))


def test_batches_of():
    assert m.batches_of(["a", "b"], 3) == [["a", "b", "a"]]
    assert m.batches_of(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e", "a"]]
    assert m.batches_of(["a", "b", "c", "d"], 2) == [["a", "b"], ["c", "d"]]


def test_report_json_is_valid_with_non_finite_numbers(tmp_path):
    path = tmp_path / "r.json"
    m.write_json({"x": math.nan, "y": [math.inf, 1.5], "z": {"w": 2}}, str(path))
    assert json.loads(path.read_text()) == {"x": None, "y": [None, 1.5], "z": {"w": 2}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]       # no temporary file left behind
    assert path.stat().st_mode & 0o044                               # readable by others, like any file


def test_gpu_mem_gb_is_none_on_cpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert m.gpu_mem_gb() == {"allocated": None, "reserved": None, "peak_allocated": None, "peak_reserved": None}


def test_mbu():
    # 13.5 GB per step at 30 ms/step on a 3000 GB/s device: 450 GB/s achieved = 15%
    assert m.mbu(13_500_000_000, 0.030, 3000.0) == pytest.approx(0.15)
    assert m.mbu(1, None, 1.0) is None


@pytest.mark.parametrize("text, words", [
    ("You are trying to access a gated repo. Make sure to have access to it.", "gated model"),
    ("We couldn't connect to the hub to load the files", "cannot load org/model"),
])
def test_hub_errors_become_one_sentence(text, words):
    with pytest.raises(m.UsageError, match=words):
        with m._loading_errors("org/model"):
            raise OSError(text)
