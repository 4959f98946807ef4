"""extensions/tensor_parallel.py (第六节): tensor parallel where each rank builds only its own shard, unquantized or
bitsandbytes 8/4-bit. Two CPU ranks build a preset and a safetensors checkpoint shard by shard; each rank's quantized
shard holds the very values of the unsharded quantized layer; the engine is verified against the unsharded (or tp 1
quantized) model's first layers, and its greedy texts are the lesson's at tp 1. 4-bit and plain int8 shards multiply
weight-only by default (Int4WeightOnly / Int8WeightOnly over the same stored weights); --matmul bitsandbytes keeps
bitsandbytes' layers."""
import json

import bitsandbytes.functional as F
import pytest
import torch

import ds_bnb_infer as m
from conftest import ROOT, launch, run_cli
from extensions import tensor_parallel as tp
from extensions.fast_decode import FastDecodeConfig, decode_step
from extensions.quantized_matmul import weight_only
from extensions.tensor_parallel import TensorParallelConfig, filled_and_quantized, int8_rows, nf4_shard

TP = ROOT / "extensions" / "tensor_parallel.py"
PROMPTS = ["tensor parallel", "two ranks, each with its own shard"]


def _launch(*args):
    return launch(*args, script=TP, timeout=400)


def _tp1_texts(model_name, new_tokens):
    """The lesson at tp 1, in this process: the whole model, greedy, the same left-padded batch."""
    config = m.DeployConfig(model_name=model_name, dtype="fp32", max_new_tokens=new_tokens,
                            batch_size=len(PROMPTS), device="cpu", backend="hf")
    model = m.load_model(config, "none", "cpu")
    return m.generate(model, m.load_tokenizer(config), PROMPTS, config)["texts"]


def _run_two_ranks(model_name, tmp_path, *extra):
    args = ["--model", model_name, "--dtype", "fp32", "--max-new-tokens", "12", "--iters", "1", "--warmup", "0",
            "--batch-size", "2", "--json", str(tmp_path / "tp2.json"), *extra]
    for p in PROMPTS:
        args += ["--prompt", p]
    r = _launch(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("exits successfully") == 2
    return json.loads((tmp_path / "tp2.json").read_text())


def test_skeleton_holds_no_matrix_and_keeps_the_small_tensors():
    """Built on meta: no weight matrix takes memory; norms and the rotary buffer are real, as the lesson builds them."""
    model = tp.skeleton(m.DeployConfig(model_name="random:llama-2-70b"), torch.float16)
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values() if p.dim() >= 2) and len(params) == 80 * 9 + 3
    assert not params["model.norm.weight"].is_meta and torch.equal(params["model.norm.weight"],
                                                                   torch.ones(8192, dtype=torch.float16))
    assert not model.model.rotary_emb.inv_freq.is_meta


def test_a_preset_filled_unsharded_is_the_lessons_model():
    """preset_tensors() draws what the lesson's random_weights() draws, in its order: a shard is a slice of it."""
    config = m.DeployConfig(model_name="random:tiny", dtype="fp32", seed=3)
    lesson_model = m.load_model(config, "none", "cpu")
    model = tp.skeleton(config, torch.float32)
    plan = tp.plan_of(model)
    model.to_empty(device="cpu")
    tp.materialize(model, plan, tp.sources(config, plan, [], "cpu"))
    expected = lesson_model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())


def test_two_cpu_ranks_build_a_preset_shard_by_shard_verified_with_tp1_texts(tmp_path):
    """deepspeed --num_gpus=2 extensions/tp.py --tp-size 2 --fast-decode: the preset's shards drawn per rank,
    verified against the unsharded model, the fast loop against the engine, the texts tp 1's."""
    report = _run_two_ranks("random:tiny", tmp_path, "--fast-decode")
    verify = report["engine"]["verify"]
    assert verify["passed"] and verify["reference"].startswith("layers 1-2 of 2 unsharded (rank 0, cpu")
    assert verify["decoder"]["passed"] and verify["decoder"]["greedy_tokens_matching"] == m.VERIFY_TOKENS
    assert report["engine"]["decode"] == "eager" and "each rank built only its shard" in report["engine"]["notes"][0]
    assert any("4 groups of projections fused" in n for n in report["engine"]["notes"])   # q/k/v, gate/up shards
    assert all(r["host_peak_rss"] > 0 for r in report["memory"]["per_rank"])
    assert [o["text"] for o in report["outputs"]] == _tp1_texts("random:tiny", 12)


def test_two_cpu_ranks_slice_a_safetensors_checkpoint_with_a_tied_head(tmp_path):
    """A 4-layer checkpoint (tied lm_head, trained-looking norms): each rank reads its slices from the file; the
    check runs at depth 2 of 4; the full-depth texts are the lesson's from the same folder at tp 1."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(m.PRESETS["random:tiny"], num_hidden_layers=4), tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.2) + (0 if p.dim() > 1 else 1))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    m.byte_tokenizer(cfg.vocab_size).save_pretrained(folder)
    assert (folder / "model.safetensors").exists() and "lm_head.weight" not in _keys(folder / "model.safetensors")
    report = _run_two_ranks(str(folder), tmp_path)
    verify = report["engine"]["verify"]
    assert verify["passed"] and verify["reference"].startswith("layers 1-2 of 4 unsharded")
    assert [o["text"] for o in report["outputs"]] == _tp1_texts(str(folder), 12)


def _keys(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_a_checkpoint_without_safetensors_is_one_sentence(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path / "bin"
    model = LlamaForCausalLM(LlamaConfig(**m.PRESETS["random:tiny"]))
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()                 # an older checkpoint: pickled tensors only
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    m.byte_tokenizer(320).save_pretrained(folder)
    r = _launch("--model", str(folder), "--dtype", "fp32", "--no-verify")
    assert r.returncode != 0 and "has no safetensors checkpoint" in r.stderr and "Traceback" not in r.stderr


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


def test_4bit_at_tp_1_keeps_the_lessons_nested_block_scales():
    """At tp 1 the quantized-while-filled layer holds the lesson's very state: 8-bit block scales with their own
    scales (double quant), not the fp32 scales a shard gets; bitsandbytes' GPU matmul computes differently from those."""
    w = _weight()
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    codes, st = nf4_shard(w, lambda t: [t], 0, False)
    assert st.nested and st.absmax.dtype == torch.uint8 and torch.equal(codes, packed)
    assert torch.equal(st.absmax, state.absmax) and torch.equal(st.state2.absmax, state.state2.absmax)
    assert torch.equal(st.offset, state.offset)


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


def _tp1_quantized_texts(quant, threshold, prompts, new_tokens, matmul="weight-only"):
    """tp 1: the lesson's quantized model in this process, greedy, with the matmul the shards use (weight-only: its
    layers swapped before any forward, as tensor_parallel.py's reference is)."""
    config = m.DeployConfig(model_name="random:tiny", quant=quant, int8_threshold=threshold, dtype="fp32",
                            max_new_tokens=new_tokens, batch_size=len(prompts), device="cpu")
    model = m.load_model(config, quant, "cpu")
    if matmul == "weight-only":
        assert weight_only(model) == 14
    return m.generate(model, m.load_tokenizer(config), prompts, config)["texts"]


@pytest.mark.parametrize("quant, threshold, fast, matmul, layer", [
    ("4bit", 6.0, True, "weight-only", "Int4WeightOnly"), ("8bit", 0.0, False, "weight-only", "Int8WeightOnly"),
    ("4bit", 6.0, False, "bitsandbytes", "Linear4bit")])
def test_two_cpu_ranks_quantized_verified_against_tp1_with_its_texts(quant, threshold, fast, matmul, layer, tmp_path):
    """deepspeed --num_gpus=2 extensions/tensor_parallel.py --tp-size 2 --quant ...: AutoTP shards, each rank quantizes its
    slices, the engine passes verification against the same model quantized at tp 1 (rank 0) with the same matmul,
    its greedy texts (left-padded batch of two) are tp 1's, and both ranks exit. With --fast-decode the loop is
    verified too. 4-bit and plain int8 shards multiply weight-only by default; --matmul bitsandbytes keeps
    bitsandbytes' layers."""
    prompts, new_tokens = ["tensor parallel", "two ranks, one quantized model"], 12
    args = ["--model", "random:tiny", "--quant", quant, "--dtype", "fp32", "--max-new-tokens", str(new_tokens),
            "--iters", "1", "--warmup", "0", "--batch-size", "2", "--json", str(tmp_path / "tp2.json")]
    args += ["--int8-threshold", str(threshold)] if quant == "8bit" else []
    args += ["--fast-decode"] if fast else []
    args += ["--matmul", "bitsandbytes"] if matmul == "bitsandbytes" else []
    for p in prompts:
        args += ["--prompt", p]
    r = _launch(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "tp2.json").read_text())
    engine, verify = report["engine"], report["engine"]["verify"]
    assert report["hardware"]["world_size"] == 2 and engine["quant"] == quant and "14 linears" in engine["notes"][1]
    assert verify["passed"] and verify["tolerance"] == m.KERNEL_TOL["bf16" if quant == "4bit" else "fp32"] and verify["greedy_tokens_matching"] == 16
    assert verify["reference"] == f"layers 1-2 of 2 quantized {quant} at tp 1, {matmul} matmul (rank 0, cpu, " \
                                  "torch.float32)"
    assert engine["notes"][-1] == f"{matmul} matmul: 14 {layer}"          # counted from the shards' modules
    assert ("decoder" in verify and verify["decoder"]["passed"]) == fast
    assert [o["text"] for o in report["outputs"]] == _tp1_quantized_texts(quant, threshold, prompts, new_tokens,
                                                                          matmul)
    assert (r.stdout + r.stderr).count("exits successfully") == 2


@pytest.mark.parametrize("args, words", [
    (["--quant", "4bit", "--fast-decode", "--do-sample"], "loop is greedy; drop --do-sample"),
    (["--tp-size", "1"], "unquantized at --tp-size 1 is the lesson's own run"),
    (["--tp-size", "1", "--kernel-inject"], "without kernel injection"),
    (["--tp-size", "2", "--quant", "4bit", "--int8-threshold", "0"], "--int8-threshold applies to --quant 8bit"),
    (["--tp-size", "2", "--quant", "8bit", "--kernel-inject"], "without kernel injection"),
    (["--tp-size", "2", "--quant", "4bit", "--bnb-4bit-quant-type", "fp4"], "shards 4-bit as nf4"),
    (["--tp-size", "2", "--quant", "8bit", "--step", "eager"], "add --fast-decode"),
    (["--tp-size", "2", "--quant", "8bit", "--matmul", "weight-only"], "or --quant 8bit --int8-threshold 0"),
    (["--tp-size", "2", "--quant", "8bit"], "needs 2 ranks but 1 were launched")])
def test_bad_input_is_one_sentence_and_exit_2(args, words):
    r = run_cli("--model", "random:tiny", "--dtype", "fp32", *args, script=TP)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_tp1_quantizes_each_linear_as_soon_as_it_is_filled(quant, monkeypatch):
    """--tp-size 1 (a 70B model on one GPU): while the skeleton is filled, no filled linear is left unquantized
    when the next matrix comes; the model gives the lesson's quantized model's very logits."""
    built, unquantized = [], []
    skeleton, sources = tp.skeleton, tp.sources
    monkeypatch.setattr(tp, "skeleton", lambda *a: built.append(skeleton(*a)) or built[-1])

    def watched(*a):
        for item in sources(*a):
            model = built[0]
            unquantized.append([n for n, x in model.named_modules() if type(x) is torch.nn.Linear
                                and not x.weight.is_meta and x is not model.get_output_embeddings()])
            yield item
    monkeypatch.setattr(tp, "sources", watched)
    config = m.DeployConfig(model_name="random:tiny", quant=quant, dtype="fp32", int8_threshold=0.0, device="cpu")
    model, count = filled_and_quantized(config, "cpu", torch.float32)
    assert count == 14 and len(unquantized) == 16 and not any(unquantized)    # 14 linears, embedding, head
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        mine = model(input_ids=ids).logits
        lessons = m.load_model(config, quant, "cpu")(input_ids=ids).logits
    torch.testing.assert_close(mine, lessons, rtol=0, atol=1e-6)


def test_tp1_with_fast_decode_is_verified_with_the_lessons_texts(tmp_path):
    """python extensions/tensor_parallel.py --tp-size 1 --quant 4bit --fast-decode: verified at depth against the lesson's
    quantized layers, the decode loop against the engine, and the greedy texts are the lesson's."""
    prompts, new_tokens = ["one device", "quantized while filled"], 12
    args = ["--model", "random:tiny", "--quant", "4bit", "--dtype", "fp32", "--max-new-tokens", str(new_tokens),
            "--iters", "1", "--warmup", "0", "--batch-size", "2", "--fast-decode", "--json", str(tmp_path / "tp1.json")]
    for p in prompts:
        args += ["--prompt", p]
    r = run_cli(*args, script=TP)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "tp1.json").read_text())
    engine, verify = report["engine"], report["engine"]["verify"]
    assert "quantized 4bit as they were filled" in engine["notes"][0] and engine["decode"] == "eager"
    assert engine["notes"][1] == "weight-only matmul: 14 Int4WeightOnly"
    assert verify["passed"] and verify["decoder"]["passed"] and "decoding against the engine" in verify["summary"]
    assert [o["text"] for o in report["outputs"]] == _tp1_quantized_texts("4bit", 6.0, prompts, new_tokens)


@pytest.mark.parametrize("matmul, layer", [("auto", "Int4WeightOnly"), ("bitsandbytes", "Linear4bit")])
def test_tp1_4bit_shards_multiply_weight_only_unless_bitsandbytes_is_asked_for(matmul, layer):
    """--tp-size 1 --quant 4bit in this process: the engine's 4-bit linears are Int4WeightOnly over the very packed
    codes and scales (auto), or bitsandbytes' Linear4bit (--matmul bitsandbytes); either passes the depth check
    against the lesson's 4-bit layers multiplied the same way."""
    import bitsandbytes as bnb
    config = TensorParallelConfig(model_name="random:tiny", quant="4bit", dtype="fp32", device="cpu", matmul=matmul,
                                  max_new_tokens=4, prompts=["one device"])
    engine, _, info = tp.init_engine(config)
    kinds = {type(x.linear).__name__ for x in engine.module.modules() if isinstance(x, tp.shard_class())}
    assert kinds == {layer} and info.verify["passed"]
    assert any(isinstance(x, bnb.nn.Linear4bit) for x in engine.module.modules()) == (layer == "Linear4bit")
    if layer == "Int4WeightOnly":               # exact at tp 1: the same weights, the same matmul
        # (the decode steps within fp32's rounding: 0 on CPUs with AVX-512, 1.5e-7 on one with AVX2 alone, where
        # torch's CPU kernels for the engine's steps may sum in another order; a wrong weight is orders above)
        assert info.verify["prefill_rel_error"] == 0 and info.verify["decode_rel_error"] < 1e-6
    assert info.notes[-1] == f"{'weight-only' if matmul == 'auto' else matmul} matmul: 14 {layer}"


@pytest.mark.parametrize("quant, threshold, mode", [("4bit", 6.0, "cuda-graph"), ("8bit", 0.0, "cuda-graph"),
                                                    ("8bit", 6.0, "eager")])
def test_fast_decode_would_capture_the_quantized_shards_on_a_gpu(quant, threshold, mode):
    """fast_decode.py picks its step by the layers it finds: tensor_parallel.py's bitsandbytes layers (no transformers
    quantizer behind them) are captured as a CUDA graph on a GPU - torch.compile of them fails verification - and
    LLM.int8 with outliers stays eager; swapped to weight-only (--matmul auto) they compile. (Choosing touches no
    GPU, so a CPU checks it.)"""
    config = m.DeployConfig(model_name="random:tiny", quant=quant, dtype="fp32", int8_threshold=threshold,
                            device="cpu")
    model, _ = filled_and_quantized(config, "cpu", torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    assert decode_step(model, torch.device("cuda"), FastDecodeConfig())[1] == mode
    if quant == "4bit" or threshold == 0:       # weight-only shards (--matmul auto): plain torch, compiled
        weight_only(model)
        assert decode_step(model, torch.device("cuda"), FastDecodeConfig())[1] == "compiled"
