"""extensions/tp_quant.py (第十节): bitsandbytes 8-bit and 4-bit under AutoTP tensor parallel. Each rank's shard
quantizes to the very values of the unsharded quantized layer; two CPU ranks run it, verified against tp 1's
quantized model, with tp 1's greedy texts."""
import json
import socket
import subprocess

import bitsandbytes.functional as F
import pytest
import torch

import ds_bnb_infer as m
from conftest import ROOT, launch_cmd, run_cli
from extensions.tp_quant import int8_rows, nf4_shard

TP_QUANT = ROOT / "extensions" / "tp_quant.py"


def _weight():
    torch.manual_seed(0)
    return torch.randn(768, 256) * 0.02        # random:tiny's up_proj shape (out, in)


@pytest.mark.parametrize("row_parallel", [False, True])
def test_4bit_shards_dequantize_to_the_slices_of_the_unsharded_layer(row_parallel):
    """nf4 with double quant, as the lesson's --quant 4bit: blocks of 64 along rows make a shard's codes and block
    scales the unsharded layer's; the double-quantized scales (statistics of the whole matrix) come from the
    exchange. Quantizing each shard alone, double quant included, does not give the same values."""
    w, dim = _weight(), 1 if row_parallel else 0
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    full = F.dequantize_4bit(packed, state)
    shards = w.chunk(2, dim)
    scales = [F.quantize_4bit(s.contiguous(), blocksize=64, quant_type="nf4")[1].absmax for s in shards]
    for rank, shard in enumerate(shards):
        codes, st = nf4_shard(shard.contiguous(), lambda t: scales, rank, row_parallel)
        assert torch.equal(F.dequantize_4bit(codes, st), full.chunk(2, dim)[rank])
        alone = F.dequantize_4bit(*F.quantize_4bit(shard.contiguous(), blocksize=64, compress_statistics=True,
                                                   quant_type="nf4"))
        assert not torch.equal(alone, full.chunk(2, dim)[rank])


@pytest.mark.parametrize("row_parallel", [False, True])
def test_8bit_shards_dequantize_to_the_slices_of_the_unsharded_layer(row_parallel):
    """LLM.int8 scales each row by its absmax: a column-parallel shard holds whole rows; a row-parallel shard holds
    part of each row and needs the whole row's absmax (the MAX over the ranks), else its scales are its own."""
    w, dim = _weight(), 1 if row_parallel else 0
    cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))       # as bitsandbytes' Int8Params quantizes
    full = cb.float() * scb[:, None] / 127
    shards = w.chunk(2, dim)
    row_absmax = torch.stack([s.half().abs().amax(1).float() for s in shards]).amax(0) if row_parallel else None
    for rank, shard in enumerate(shards):
        c, s = int8_rows(shard, row_absmax)
        assert torch.equal(c.float() * s[:, None] / 127, full.chunk(2, dim)[rank])
    if row_parallel:
        c, s = int8_rows(shards[0])
        assert not torch.equal(c.float() * s[:, None] / 127, full.chunk(2, dim)[0])


def _launch(*args):
    """conftest's launch() on a free port: the launcher's default 29500 may be held by another run on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = launch_cmd(*args, script=TP_QUANT)
    return subprocess.run([cmd[0], "--master_port", str(port), *cmd[1:]], capture_output=True, text=True,
                          timeout=400, cwd=ROOT)


def _tp1_texts(quant, threshold, prompts, new_tokens):
    """tp 1: the lesson's quantized model in this process, greedy."""
    config = m.DeployConfig(model_name="random:tiny", quant=quant, int8_threshold=threshold, dtype="fp32",
                            max_new_tokens=new_tokens, batch_size=len(prompts), device="cpu")
    model = m.load_model(config, quant, "cpu")
    return m.generate(model, m.load_tokenizer(config), prompts, config)["texts"]


@pytest.mark.parametrize("quant, threshold", [("4bit", 6.0), ("8bit", 0.0)])
def test_two_cpu_ranks_quantized_verified_against_tp1_with_its_texts(quant, threshold, tmp_path):
    """deepspeed --num_gpus=2 extensions/tp_quant.py --tp-size 2 --quant ...: AutoTP shards, each rank quantizes its
    slices, the engine passes verification against the same model quantized at tp 1 (rank 0), its greedy texts
    (left-padded batch of two) are tp 1's, and both ranks exit."""
    prompts, new_tokens = ["tensor parallel", "two ranks, one quantized model"], 12
    args = ["--model", "random:tiny", "--quant", quant, "--dtype", "fp32", "--max-new-tokens", str(new_tokens),
            "--iters", "1", "--warmup", "0", "--batch-size", "2", "--json", str(tmp_path / "tp2.json")]
    args += ["--int8-threshold", str(threshold)] if quant == "8bit" else []
    for p in prompts:
        args += ["--prompt", p]
    r = _launch(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "tp2.json").read_text())
    engine, verify = report["engine"], report["engine"]["verify"]
    assert report["hardware"]["world_size"] == 2 and engine["quant"] == quant and "14 linears" in engine["notes"][0]
    assert verify["passed"] and verify["tolerance"] == m.KERNEL_TOL["bf16" if quant == "4bit" else "fp32"] and verify["greedy_tokens_matching"] == 16
    assert verify["reference"] == f"layers 1-2 of 2 quantized {quant} at tp 1 (rank 0, cpu)"
    assert [o["text"] for o in report["outputs"]] == _tp1_texts(quant, threshold, prompts, new_tokens)
    assert (r.stdout + r.stderr).count("exits successfully") == 2


@pytest.mark.parametrize("args, words", [
    (["--quant", "4bit"], "--tp-size 1 shards nothing: use ds_bnb_infer.py --quant 4bit"),
    (["--tp-size", "2"], "runs --quant 8bit or 4bit"),
    (["--tp-size", "2", "--quant", "4bit", "--int8-threshold", "0"], "--int8-threshold applies to --quant 8bit"),
    (["--tp-size", "2", "--quant", "8bit", "--kernel-inject"], "without kernel injection"),
    (["--tp-size", "2", "--quant", "8bit"], "needs 2 ranks but 1 were launched")])
def test_bad_input_is_one_sentence_and_exit_2(args, words):
    r = run_cli("--model", "random:tiny", *args, script=TP_QUANT)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
