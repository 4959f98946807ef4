"""extensions/tp_load.py (第六节): tensor parallel where each rank builds only its own shard. Two CPU ranks build a
preset and a safetensors checkpoint shard by shard; the engine is verified against the unsharded model's first
layers, and its greedy texts are the lesson's at tp 1."""
import json
import socket
import subprocess

import pytest
import torch

import ds_bnb_infer as m
from conftest import ROOT, launch_cmd, run_cli
from extensions import tp_load

TP_LOAD = ROOT / "extensions" / "tp_load.py"
PROMPTS = ["tensor parallel", "two ranks, each with its own shard"]


def _launch(*args):
    with socket.socket() as s:          # a free port: the launcher's default may be held by another run here
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = launch_cmd(*args, script=TP_LOAD)
    return subprocess.run([cmd[0], "--master_port", str(port), *cmd[1:]], capture_output=True, text=True,
                          timeout=400, cwd=ROOT)


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
    model = tp_load.skeleton(m.DeployConfig(model_name="random:llama-2-70b"), torch.float16)
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values() if p.dim() >= 2) and len(params) == 80 * 9 + 3
    assert not params["model.norm.weight"].is_meta and torch.equal(params["model.norm.weight"],
                                                                   torch.ones(8192, dtype=torch.float16))
    assert not model.model.rotary_emb.inv_freq.is_meta


def test_a_preset_filled_unsharded_is_the_lessons_model():
    """preset_tensors() draws what the lesson's random_weights() draws, in its order: a shard is a slice of it."""
    config = m.DeployConfig(model_name="random:tiny", dtype="fp32", seed=3)
    lesson_model = m.load_model(config, "none", "cpu")
    model = tp_load.skeleton(config, torch.float32)
    plan = tp_load.plan_of(model)
    model.to_empty(device="cpu")
    tp_load.materialize(model, plan, tp_load.sources(config, plan, [], "cpu"))
    expected = lesson_model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())


def test_two_cpu_ranks_build_a_preset_shard_by_shard_verified_with_tp1_texts(tmp_path):
    """deepspeed --num_gpus=2 extensions/tp_load.py --tp-size 2 --fast-decode: the preset's shards drawn per rank,
    verified against the unsharded model, the fast loop against the engine, the texts tp 1's."""
    report = _run_two_ranks("random:tiny", tmp_path, "--fast-decode")
    verify = report["engine"]["verify"]
    assert verify["passed"] and verify["reference"].startswith("layers 1-2 of 2 unsharded (rank 0, cpu")
    assert verify["decoder"]["passed"] and verify["decoder"]["greedy_tokens_matching"] == m.VERIFY_TOKENS
    assert report["engine"]["decode"] == "eager" and "each rank built only its shard" in report["engine"]["notes"][0]
    assert "4 groups of projections fused" in report["engine"]["notes"][1]      # q/k/v, gate/up: AutoTP shards
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


@pytest.mark.parametrize("args, words", [
    (["--tp-size", "1"], "over --tp-size N > 1 ranks"),
    (["--tp-size", "1", "--kernel-inject"], "drop --quant, --backend hf and --kernel-inject")])
def test_bad_input_is_one_sentence_and_exit_2(args, words):
    r = run_cli("--model", "random:tiny", "--dtype", "fp32", *args, script=TP_LOAD)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
