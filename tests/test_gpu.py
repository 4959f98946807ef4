"""GPU-only behaviour (marked `gpu`): run on the device machine with `python -m pytest -q -m gpu tests`."""
import json

import pytest
import torch

import ds_bnb_infer as m
from conftest import ROOT, launch, run_cli
from extensions.fast_decode import FastDecodeConfig, FastGreedy

pytestmark = pytest.mark.gpu


def cuda_config(**kw):
    return m.DeployConfig(**{**dict(model_name="random:tiny", max_new_tokens=16, iters=1, warmup=0, device="cuda"),
                             **kw})


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_gpu_quantized_model_unchanged_by_init_engine(quant):
    """With dtype fp16 DeepSpeed would call .half() on the bnb model (an error); the script must skip it."""
    config = cuda_config(quant=quant, dtype="fp16", kernel_inject=False)
    unwrapped = m.load_model(config, quant, "cuda:0")
    engine, tok, info = m.init_engine(config)
    ids = tok(["a quantized model must not change"], return_tensors="pt")["input_ids"].cuda()
    with torch.no_grad():
        assert torch.equal(unwrapped(input_ids=ids).logits, engine(input_ids=ids).logits)
    assert info.quant == quant and info.verify["passed"]


def test_gpu_default_path_is_verified(tmp_path):
    """The default run on a GPU: kernel injection off by default where known broken (a note), verified."""
    r = run_cli("--model", "random:tiny", "--device", "cuda", "--max-new-tokens", "16", "--iters", "1",
                "--json", str(tmp_path / "r.json"), env={"TORCH_CUDA_ARCH_LIST": "9.0"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    engine = json.loads((tmp_path / "r.json").read_text())["engine"]
    assert engine["verify"]["passed"] and engine["verify"]["tolerance"] == 0.0
    assert engine["kernel_inject"] or engine["notes"][0].startswith("kernel injection off by default")


def test_gpu_hf_and_deepspeed_fp16_identical():
    """DeepSpeed's .half() would turn the fp32 rotary inv_freq into fp16; the script keeps the model as loaded."""
    outs = []
    for backend in ("hf", "deepspeed"):
        config = cuda_config(backend=backend, kernel_inject=False, max_new_tokens=32, dtype="fp16")
        engine, tok, info = m.init_engine(config)
        outs.append(m.generate(engine, tok, ["DeepSpeed is", "a second prompt"], config)["texts"])
        assert getattr(engine, "module", engine).model.rotary_emb.inv_freq.dtype == torch.float32
        del engine
        m.free_memory()
    assert outs[0] == outs[1]
    assert info.verify["passed"] and info.verify["prefill_rel_error"] == 0.0


def test_gpu_fast_decode_compiles_one_graph_per_step_and_is_verified(tmp_path):
    """extensions/fast_decode.py on a GPU: the decode step is compiled (CUDA graphs), padded batches too, verified."""
    r = run_cli("--model", "random:tiny", "--device", "cuda", "--backend", "hf", "--max-new-tokens", "24", "--iters",
                "2", "--batch-size", "2", "--prompt", "a", "--prompt", "a longer second prompt",
                "--json", str(tmp_path / "r.json"), script=ROOT / "extensions" / "fast_decode.py", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    engine = json.loads((tmp_path / "r.json").read_text())["engine"]
    assert engine["decode"] == "compiled" and engine["verify"]["passed"]
    assert engine["verify"]["tolerance"] == m.KERNEL_TOL["fp16"]


def test_gpu_int8_weight_only_is_compiled_and_verified(tmp_path):
    """extensions/quantized_matmul.py on a GPU: no bitsandbytes layer is left, so the step is compiled; verified
    against the weight-only model eager, and near the unquantized weights."""
    r = run_cli("--model", "random:tiny", "--device", "cuda", "--backend", "hf", "--quant", "8bit", "--int8-threshold",
                "0", "--max-new-tokens", "16", "--iters", "1", "--json", str(tmp_path / "r.json"),
                script=ROOT / "extensions" / "quantized_matmul.py", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    engine = json.loads((tmp_path / "r.json").read_text())["engine"]
    assert engine["decode"] == "compiled" and engine["verify"]["passed"]
    assert engine["verify"]["vs_unquantized"]["prefill_rel_error"] < 0.1


@pytest.mark.parametrize("quant, threshold, mode", [("4bit", 6.0, "cuda-graph"), ("8bit", 0.0, "cuda-graph"),
                                                    ("8bit", 6.0, "eager")])
def test_gpu_quantized_decode_graph_keeps_the_eager_numbers(quant, threshold, mode):
    """A bitsandbytes model's eager step replayed as a CUDA graph gives the eager step's logits bit for bit (4-bit,
    plain int8); LLM.int8 with outlier columns syncs with the host in every matmul, so it is not captured."""
    model = m.load_model(cuda_config(backend="hf", quant=quant, int8_threshold=threshold), quant, "cuda:0")
    enc = m.load_tokenizer(cuda_config())(["a", "a longer second prompt"], return_tensors="pt", padding=True)
    enc = {k: enc[k].cuda() for k in ("input_ids", "attention_mask")}
    eager, fast = FastGreedy(model, FastDecodeConfig(step="eager")), FastGreedy(model, FastDecodeConfig())
    assert fast.mode == mode
    with torch.no_grad():
        runs = [decoder.generate(**enc, max_new_tokens=24, output_logits=True, return_dict_in_generate=True).logits
                for decoder in (eager, fast, fast)]       # eager, then capture, then replay
    torch.randint(0, 9, (4,), device="cuda")         # a failed capture would leave the CUDA RNG unusable
    for logits in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], logits))


def test_gpu_memory_is_reported(tmp_path):
    r = run_cli("--model", "random:tiny", "--device", "cuda", "--backend", "hf", "--max-new-tokens", "8",
                "--iters", "1", "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    mem = json.loads((tmp_path / "r.json").read_text())["memory"]["per_rank"][0]
    assert 0 < mem["peak_allocated"] <= mem["peak_reserved"]
    assert "GPU memory: peak allocated" in r.stdout


def test_gpu_out_of_memory_is_one_sentence():
    r = run_cli("--model", "random:llama-2-7b", "--backend", "hf", "--batch-size", "4096",
                "--prompt", "x" * 1000, "--max-new-tokens", "2", "--warmup", "0", "--iters", "1", timeout=900)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "out of GPU memory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (device kind nvidia-h100-x2)")
def test_gpu_tensor_parallel_2_gpus_is_verified(tmp_path):
    """AutoTP over 2 GPUs (NCCL), fp32: within rounding of rank 0's CPU reference, every rank's memory reported.
    (Tokens are not compared with tp 1: a tiny random model's near-tied logits flip with the summation order.)"""
    r = launch("--model", "random:tiny", "--device", "cuda", "--dtype", "fp32", "--no-kernel-inject",
               "--max-new-tokens", "16", "--iters", "1", "--warmup", "0", "--batch-size", "2", "--prompt", "two GPUs",
               "--prompt", "tp 2", "--json", str(tmp_path / "tp2.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tp2 = json.loads((tmp_path / "tp2.json").read_text())
    v = tp2["engine"]["verify"]
    assert v["passed"] and v["tolerance"] == m.KERNEL_TOL["fp32"] and v["reference"].endswith("(rank 0)")
    assert tp2["hardware"]["world_size"] == 2 and "AutoTP" in r.stderr
    assert all(mem["peak_allocated"] > 0 and mem["loading_peak_allocated"] > 0 for mem in tp2["memory"]["per_rank"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (device kind nvidia-h100-x2)")
def test_gpu_tp_compiled_step_all_reduces_over_symmetric_memory(tmp_path):
    """tensor_parallel.py --fast-decode over 2 GPUs: the compiled step's small all-reduces are push_all_reduce() calls
    (--all-reduce one-shot: lowered to the one-shot kernel over symmetric memory; fp16 summed in fp32, as that kernel
    adds bf16 and fp32 only), and the loop is verified against the engine; --all-reduce nccl keeps NCCL's."""
    import os
    from conftest import launch_cmd, run_group
    for kind, dtype in (("push", "fp16"), ("one-shot", "fp16"), ("nccl", "fp16"), ("push", "bf16")):
        out = tmp_path / f"{kind}-{dtype}.json"
        r = run_group(launch_cmd("--fast-decode", "--all-reduce", kind, "--no-tune", "--model", "random:tiny",
                                 "--device", "cuda", "--dtype", dtype, "--max-new-tokens", "16", "--iters", "1",
                                 "--warmup", "2", "--json", str(out), script=ROOT / "extensions" / "tensor_parallel.py"),
                      900, env={**os.environ, "TORCH_LOGS": "output_code"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        report = json.loads(out.read_text())
        assert report["engine"]["verify"]["passed"] and report["engine"]["decode"] == "compiled"
        code = r.stdout + r.stderr                                        # with the generated code
        assert any(f"all-reduces: {kind}" in n for n in report["engine"]["notes"]) == (kind != "nccl")
        assert ("ds_bnb_infer.push_all_reduce" in code) == (kind == "push")
        assert ("symm_mem.one_shot_all_reduce" in code) == (kind == "one-shot")
