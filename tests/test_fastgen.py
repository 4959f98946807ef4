"""extensions/fastgen.py (第十节): DeepSpeed-FastGen as an engine on the lesson's model, verified like any engine.
It runs on CUDA GPUs only: on a CPU each refusal is one sentence; the run itself is a `gpu` test."""
import json

import pytest

from conftest import ROOT, run_cli

FASTGEN = ROOT / "extensions" / "fastgen.py"


@pytest.mark.parametrize("flags, sentence", [
    ([], "DeepSpeed-FastGen runs on CUDA GPUs only"),
    (["--quant", "4bit"], "not bitsandbytes weights; drop --quant"),
    (["--dtype", "fp32"], "FastGen runs in fp16 or bf16"),
    (["--do-sample"], "decodes greedily; drop --do-sample"),
])
def test_fastgen_refuses_what_it_cannot_run_in_one_sentence(tmp_path, flags, sentence):
    r = run_cli("--model", "random:tiny", "--backend", "hf", *flags, "--json", str(tmp_path / "r.json"),
                script=FASTGEN)
    assert r.returncode == 2, r.stderr[-2000:]
    assert sentence in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.gpu
def test_gpu_fastgen_is_verified_against_the_same_weights(tmp_path):
    """FastGen built from the lesson's model (saved, then read by build_hf_engine): every prompt position's logits
    and the greedy tokens against the transformers model; its KV cache sized for the run, not all free memory."""
    r = run_cli("--model", "random:tiny", "--device", "cuda", "--backend", "hf", "--max-new-tokens", "16",
                "--iters", "1", "--batch-size", "2", "--prompt", "FastGen", "--prompt", "a second, longer prompt",
                "--json", str(tmp_path / "r.json"), script=FASTGEN, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["engine"]["decode"] == "fastgen" and report["engine"]["verify"]["passed"]
    assert report["memory"]["per_rank"][0]["peak_reserved"] < 4


@pytest.mark.parametrize("arch_list, readable", [
    ("9.0a", "9.0"), ("8.0;9.0a+PTX", "8.0;9.0+PTX"), ("7.5 8.6 10.0f", "7.5 8.6 10.0"), ("8.6+PTX", "8.6+PTX"),
    ("", "")])
def test_fastgen_gives_deepspeeds_kernel_builder_an_arch_list_it_can_read(arch_list, readable):
    """Some CUDA images set TORCH_CUDA_ARCH_LIST=9.0a; DeepSpeed 0.19.8's builder fails on the suffix, and FastGen's
    support check reports that as "Config ... rms_norm ... is not supported" (benchmarks/README.md, fastgen-5/-7)."""
    from extensions.fastgen import deepspeed_arch_list
    assert deepspeed_arch_list(arch_list) == readable
