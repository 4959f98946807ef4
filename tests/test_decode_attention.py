"""extensions/decode_attention.py: the split-KV decode attention (Triton's interpreter on a CPU; the kernel on a
GPU), and fast_decode.py's --attention flag."""
import json
import sys

import pytest

from conftest import ROOT, run_cli, run_group

FAST = ROOT / "extensions" / "fast_decode.py"

# Triton's interpreter is chosen when triton is imported: a fresh interpreter.
INTERPRETED = r'''
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
import torch
import torch.nn.functional as F
from extensions import decode_attention as A
torch.manual_seed(0)
out = {}
# the kernel alone: grouped-query heads (4 query heads, 2 key/value heads), 2 batch rows, 150 slots (3 ranges, the
# last one part-filled), row 0 left-padded, the last slots not yet written; the query a transposed view
B, H, KV, L, D = 2, 4, 2, 150, 16
q = torch.randn(B, 1, H, D).transpose(1, 2)
k, v = torch.randn(B, KV, L, D), torch.randn(B, KV, L, D)
keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
keep[..., 97:] = False
keep[0, ..., :5] = False
for name, mask in (("masked", keep), ("unmasked", None), ("mask expanded", keep[:1].expand(B, 1, 1, L))):
    got = A.decode_attention(q, k, v, mask, D ** -0.5)
    kk, vv = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    want = F.scaled_dot_product_attention(q.double(), kk.double(), vv.double(), attn_mask=mask).transpose(1, 2)
    out[name] = [list(got.shape), float((got.double() - want).abs().max())]
# a whole model: a tiny grouped-query Llama, greedy on a static cache with transformers' sdpa and with this file's
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
model = LlamaForCausalLM(config).eval()
ids = torch.randint(1, 64, (2, 7))
mask = torch.ones_like(ids)
mask[0, :2] = 0
runs = {}
for name in ("sdpa", "triton"):
    if name == "triton":
        out["used"] = A.use(model)
    with torch.no_grad():
        g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    runs[name] = g
out["model tokens equal"] = bool(torch.equal(runs["sdpa"].sequences, runs["triton"].sequences))
out["model logits error"] = max(float((a - b).abs().max()) for a, b in zip(runs["sdpa"].logits, runs["triton"].logits))
out["implementation"] = model.config._attn_implementation
print(json.dumps(out))
'''


def test_split_kv_attention_is_sdpa_under_the_interpreter():
    """The very kernels a GPU runs, interpreted: one query token's attention over a static cache (grouped-query
    heads, padded and unfilled slots masked, no mask, an expanded mask, a strided query) equals SDPA's in fp64 within
    fp32 rounding; and a tiny grouped-query Llama given it (decode_attention.use) decodes the same greedy tokens as
    with transformers' sdpa, left padding included, its logits within fp32 rounding."""
    r = run_group([sys.executable, "-c", INTERPRETED, str(ROOT)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("masked", "unmasked", "mask expanded"):
        assert out[name][0] == [2, 1, 4, 16] and out[name][1] < 1e-5, (name, out[name])
    assert out["used"] and out["implementation"] == "ds_bnb_decode", out
    assert out["model tokens equal"] and out["model logits error"] < 1e-4, out


def test_triton_attention_needs_a_gpu_and_this_files_loop():
    """--attention triton on a CPU (fast_decode.py, serve.py), with --loop transformers, or in tensor_parallel.py
    without its fast loop: one sentence, exit 2."""
    for script in (FAST, ROOT / "extensions" / "serve.py"):
        r = run_cli("--model", "random:tiny", "--backend", "hf", "--attention", "triton", "--device", "cpu",
                    script=script)
        assert r.returncode == 2 and "--attention triton runs a GPU kernel" in r.stderr, (script, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
    r = run_cli("--model", "random:tiny", "--backend", "hf", "--attention", "triton", "--loop", "transformers",
                "--device", "cpu", script=FAST)
    assert r.returncode == 2 and "drop --loop transformers" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("--model", "random:tiny", "--tp-size", "2", "--attention", "triton", "--device", "cpu",
                script=ROOT / "extensions" / "tensor_parallel.py")
    assert r.returncode == 2 and "add --fast-decode" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.gpu
def test_triton_attention_decodes_verified_on_the_gpu(tmp_path):
    """On a GPU: the compiled fast loop with the split-KV attention (fp16, and 4-bit weight-only) is verified against
    the model's own sdpa attention, and the kernel ran in the step (its registration names the implementation)."""
    for extra in ([], ["--quant", "4bit"]):
        path = tmp_path / "a.json"
        script = FAST if not extra else ROOT / "extensions" / "quantized_matmul.py"
        r = run_cli("--model", "random:tiny", "--backend", "hf", "--attention", "triton", "--max-new-tokens", "16",
                    "--iters", "1", "--warmup", "1", "--json", str(path), *extra, script=script, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        engine = json.loads(path.read_text())["engine"]
        assert engine["verify"]["passed"] and engine["decode"] == "compiled", engine
