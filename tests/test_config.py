"""DeployConfig <-> command line, refusals of bad input, and the pure metric functions (no model needed)."""
import dataclasses
import json
import math
import time
import typing  # noqa: F401 — ExtensionConfig's annotation names it

import numpy as np
import pytest

import ds_bnb_infer as m
from conftest import HIDE, run_cli


# --- config and parser ------------------------------------------------------------------------------------------

def test_parser_defaults_are_the_dataclass_defaults():
    assert m.config_from_args([]) == m.DeployConfig()
    c = m.DeployConfig()
    assert (c.model_name, c.tp_size, c.pp_size, c.max_new_tokens) == ("meta-llama/Llama-2-7b-chat-hf", 1, 1, 64)
    assert [f.name for f in dataclasses.fields(m.DeployConfig)][:4] == ["model_name", "tp_size", "pp_size",
                                                                        "max_new_tokens"]   # the tutorial's four


ARGV = ["--model", "random:tiny", "--tp-size", "2", "--pp-size", "2", "--max-new-tokens", "7", "--backend", "hf",
        "--quant", "4bit", "--int8-threshold", "0", "--bnb-4bit-quant-type", "fp4", "--no-bnb-4bit-use-double-quant",
        "--bnb-4bit-compute-dtype", "fp16", "--text-chars", "0", "--dtype", "bf16", "--no-kernel-inject", "--device", "cpu",
        "--no-fallback", "--no-verify", "--trust-remote-code", "--prompt", "a", "--prompt", "b", "--prompts-file",
        "p.txt", "--batch-size", "3", "--warmup", "0", "--iters", "5", "--do-sample", "--temperature", "0.5",
        "--top-p", "0.9", "--seed", "3", "--json", "-", "--debug", "--local_rank", "1"]


def test_every_field_has_a_flag_that_sets_it():
    config = m.config_from_args(ARGV)
    changed = {f.name for f in dataclasses.fields(m.DeployConfig)
               if getattr(config, f.name) != getattr(m.DeployConfig(), f.name)}
    assert changed == {f.name for f in dataclasses.fields(m.DeployConfig)}
    assert config.prompts == ["a", "b"] and config.kernel_inject is False and config.int8_threshold == 0.0


@dataclasses.dataclass
class ExtensionConfig(m.DeployConfig):
    """an extension's settings"""
    rows: "typing.Annotated[int, 'rows at once']" = 4
    not_flags = ("iters", "warmup")


def test_an_extensions_settings_subclass_deployconfig_with_their_own_flags():
    """An extension's settings are fields of a DeployConfig subclass: flags in a group of their own, defaults from the
    dataclass; the fields it has no use for (not_flags) are no flags at all."""
    c = m.config_from_args(["--rows", "8", "--model", "x"], config_class=ExtensionConfig)
    assert isinstance(c, ExtensionConfig) and (c.rows, c.model_name, c.iters) == (8, "x", 3)
    help_text = m.build_parser("ext.py", ExtensionConfig).format_help()
    assert "an extension's settings:\n  --rows ROWS" in help_text and "--iters" not in help_text
    with pytest.raises(SystemExit):
        m.config_from_args(["--iters", "2"], config_class=ExtensionConfig)


def test_doc_flag_spellings():
    c = m.config_from_args(["--kernel-inject", "--no-fallback", "--do-sample", "--local-rank", "2"])
    assert (c.kernel_inject, c.fallback, c.do_sample, c.local_rank) == (True, False, True, 2)
    assert m.DeployConfig().kernel_inject is None        # on unless the installed versions are known broken


def test_help_shows_each_default_once_and_the_choices():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "(default: deepspeed)" in r.stdout and "{none,8bit,4bit}" in r.stdout
    assert "(default: None)" not in r.stdout and r.stdout.count("(default: 64)") == 1
    assert "measure/compare.py" in r.stdout


def test_llama_2_presets_have_the_published_shapes():
    """random:llama-2-{7b,13b,70b} build the Llama-2 architectures: their parameter counts (on the meta device, no
    memory), and 70B's grouped-query attention (8 KV heads for 64 query heads)."""
    import torch
    from transformers import AutoModelForCausalLM
    billions = {}
    for size in ("7b", "13b", "70b"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(m.model_config(m.DeployConfig(model_name=f"random:llama-2-{size}")))
        billions[size] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
    assert billions == {"7b": 6.74, "13b": 13.02, "70b": 68.98}
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8 * 128, 8192)


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
    (dict(json_path="/no/such/dir/r.json"), 1, "its folder does not exist"),
    (dict(json_path="/tmp"), 1, "is a folder"),
    (dict(json_path="/proc/r.json"), 1, "cannot write --json /proc/r.json"),
    (dict(int8_threshold=-1.0, quant="8bit"), 1, "--int8-threshold must be >= 0"),
    (dict(int8_threshold=float("nan"), quant="8bit"), 1, "--int8-threshold must be >= 0"),
    (dict(int8_threshold=0.0), 1, "applies to --quant 8bit only"),
    (dict(int8_threshold=0.0, quant="4bit"), 1, "applies to --quant 8bit only"),
    (dict(bnb_4bit_quant_type="fp4"), 1, "--bnb-4bit-quant-type applies to --quant 4bit only"),
    (dict(bnb_4bit_use_double_quant=False, quant="8bit"), 1, "--bnb-4bit-use-double-quant applies to --quant 4bit"),
    (dict(bnb_4bit_compute_dtype="fp16"), 1, "--bnb-4bit-compute-dtype applies to --quant 4bit only"),
    (dict(text_chars=-1), 1, "--text-chars must be at least 0"),
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
    f.write_bytes(b"caf\xe9 latin-1, not UTF-8\n")
    with pytest.raises(m.UsageError, match="is not UTF-8 text"):
        m.load_prompts(cfg(prompts_file=str(f)))
    with pytest.raises(m.UsageError, match="is empty"):
        m.load_prompts(cfg(prompts=["fine", ""]))


@pytest.mark.parametrize("args, words", [
    (["--model", "random:tiny", "--tp-size", "3"], "needs 3 ranks"),
    (["--model", "./no/such/model"], "model path ./no/such/model does not exist"),
    (["--model", "tests"], "tests is a folder but not a model (no config.json)"),
    (["--model", "random:tiny", "--prompts-file", "/no/such/prompts.txt"], "cannot read --prompts-file"),
    (["--model", "random:tiny", "--prompt", ""], "--prompt is empty"),
    (["--model", "random:tiny", "--device", "cuda"], "no CUDA GPU is visible"),
    (["--model", "random:tiny", "--max-new-tokens", "5000"], "at most 2048 positions"),
    (["--model", "random:tiny", "--json", "/proc/report.json"], "cannot write --json /proc/report.json"),
    # The doc's default model is on the hub; offline (as in CI) that must be one sentence, not a traceback.
    ([], "cannot load meta-llama/Llama-2-7b-chat-hf"),
])
def test_cli_bad_input_exits_2_with_one_sentence(args, words):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""                                          # no report, not even part of one
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1
    assert "[load]" not in r.stderr                                # refused before any weight was loaded


def test_prompts_file_that_is_not_utf8_is_one_sentence(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xff\xfe\x00b\x00a\x00d")
    r = run_cli("--model", "random:tiny", "--prompts-file", str(f))
    assert r.returncode == 2 and "is not UTF-8 text" in r.stderr and "Traceback" not in r.stderr


def test_default_hub_model_fails_fast_without_a_network():
    """No HF_HUB_OFFLINE here: the script itself must notice that the hub cannot be reached, within seconds
    (huggingface_hub's own retries take most of a minute)."""
    t0 = time.time()
    r = run_cli(env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"})   # a port where nothing listens
    assert r.returncode == 2 and time.time() - t0 < 20, r.stderr
    assert "cannot load meta-llama/Llama-2-7b-chat-hf: it is not in the local cache" in r.stderr
    assert "Retrying" not in r.stderr and "Traceback" not in r.stderr


def test_argparse_errors_exit_2():
    for args in (["--quant", "3bit"], ["--no-such-flag"], ["--batch-size", "two"], ["--compare"]):
        r = run_cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "usage:" in r.stderr


def test_tensor_parallel_without_deepspeed_is_one_sentence():
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


def test_summarize_and_decode_time():
    s = m.summarize([1.0, 2.0, 3.0, 4.0])
    assert s == {"mean": 2.5, "p50": 2.5, "p95": pytest.approx(3.85), "n": 4}
    assert m.decode_time_per_token(latency_s=1.1, ttft_s=0.1, steps=11) == pytest.approx(0.1)
    assert m.decode_time_per_token(1.0, 1.0, 1) is None


def test_batches_of():
    assert m.batches_of(["a", "b"], 3) == [["a", "b", "a"]]
    assert m.batches_of(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e", "a"]]
    assert m.batches_of(["a", "b", "c", "d"], 2) == [["a", "b"], ["c", "d"]]


def test_report_json_is_valid_with_non_finite_numbers(tmp_path, capsys):
    path = tmp_path / "r.json"
    m.write_json({"x": math.nan, "y": [math.inf, 1.5], "z": {"w": 2}}, str(path))
    assert json.loads(path.read_text()) == {"x": None, "y": [None, 1.5], "z": {"w": 2}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]       # no temporary file left behind
    assert path.stat().st_mode & 0o044                               # readable by others, like any file
    assert f"report written to {path}" in capsys.readouterr().err   # the user is told where it went


def test_a_report_that_cannot_be_written_names_the_path_not_a_temporary_file(tmp_path):
    target = tmp_path / "gone" / "r.json"                            # its folder vanished during the run
    with pytest.raises(m.RunFailure, match=f"cannot write the JSON report to {target} ") as e:
        m.write_json({"x": 1}, str(target))
    assert ".tmp" not in str(e.value)


def test_gpu_mem_gb_is_none_on_cpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert m.gpu_mem_gb() == {"allocated": None, "reserved": None, "peak_allocated": None, "peak_reserved": None}


@pytest.mark.parametrize("text, words", [
    ("You are trying to access a gated repo. Make sure to have access to it.", "gated model"),
    ("We couldn't connect to the hub to load the files", "cannot load org/model"),
])
def test_hub_errors_become_one_sentence(text, words):
    with pytest.raises(m.UsageError, match=words):
        with m.loading_errors("org/model"):
            raise OSError(text)
