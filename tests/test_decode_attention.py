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
def check(name, q, k, v, mask):
    got = A.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    kk, vv = (x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
    want = F.scaled_dot_product_attention(q.double(), kk.double(), vv.double(), attn_mask=mask).transpose(1, 2)
    out[name] = [list(got.shape), float((got.double() - want).abs().max())]
for name, mask in (("masked", keep), ("unmasked", None), ("mask expanded", keep[:1].expand(B, 1, 1, L)),
                   ("one mask row for both", keep[1:])):
    check(name, q, k, v, mask)
# the ranges joined in torch (join(), a compiled step's form by default: JOIN_IN_GRAPH) and by combine(), eager and
# compiled (the branch that takes join() runs only while torch.compile traces)
scale = D ** -0.5
want = A.decode_attention(q, k, v, keep, scale)
out["join"] = float((A.join(*A.decode_attention_ranges(q, k, v, keep, scale), B, q.dtype) - want).abs().max())
graphs = []
def backend(gm, inputs):
    graphs.append(gm.code)
    return gm.forward
joined = torch.compile(lambda q, k, v, keep: A.attention_forward(None, q, k, v, keep)[0], fullgraph=True,
                       backend=backend)
out["join compiled"] = float((joined(q, k, v, keep) - want).abs().max())
out["ranges op traced"] = "decode_attention_ranges" in graphs[0]
# 2100 slots: 33 ranges, joined in two chunks
long_keep = torch.rand(1, 1, 1, 2100) < 0.7
check("33 ranges", q, torch.randn(B, KV, 2100, D), torch.randn(B, KV, 2100, D), long_keep)
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
        out["used"] = A.use(model) is None
    with torch.no_grad():
        g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    runs[name] = g
out["model tokens equal"] = bool(torch.equal(runs["sdpa"].sequences, runs["triton"].sequences))
out["model logits error"] = max(float((a - b).abs().max()) for a, b in zip(runs["sdpa"].logits, runs["triton"].logits))
out["implementation"] = model.config._attn_implementation
small = dict(vocab_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
out["heads of 24"] = A.use(LlamaForCausalLM(LlamaConfig(hidden_size=96, attn_implementation="sdpa", **small)))
out["eager"] = A.use(LlamaForCausalLM(LlamaConfig(hidden_size=64, attn_implementation="eager", **small)))
print(json.dumps(out))
'''


def test_split_kv_attention_is_sdpa_under_the_interpreter():
    """The very kernels a GPU runs, interpreted: one query token's attention over a static cache (grouped-query
    heads, padded and unfilled slots masked, no mask, a mask of one row for every row, expanded or not, a strided
    query, 33 ranges of slots joined in two chunks, and by default joined in torch inside a compiled call) equals
    SDPA's in fp64 within fp32 rounding; and a tiny grouped-query Llama given it (decode_attention.use) decodes the
    same greedy tokens as with transformers' sdpa, left padding included, its logits within fp32 rounding; a model
    it cannot take is refused with the reason."""
    r = run_group([sys.executable, "-c", INTERPRETED, str(ROOT)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("masked", "unmasked", "mask expanded", "one mask row for both", "33 ranges"):
        assert out[name][0] == [2, 1, 4, 16] and out[name][1] < 1e-5, (name, out[name])
    assert out["join"] < 1e-6 and out["join compiled"] < 1e-6 and out["ranges op traced"], out
    assert out["used"] and out["implementation"] == "ds_bnb_decode", out
    assert out["model tokens equal"] and out["model logits error"] < 1e-4, out
    # models it cannot serve are named, not silently left on sdpa
    assert "power-of-two" in out["heads of 24"] and "does not use" in out["eager"], out


# A compiled decode step of a tiny Llama with this file's attention: which buffer each layer's kernel is given as its
# mask (decode_attention or, joined in the graph, decode_attention_ranges), and the logits, with MASK_ONCE as the
# module sets it (argv[2] "default") or off.
MASK_STEP = r'''
import json, os, re, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
import torch
from torch._inductor.utils import run_and_get_code
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
from extensions import decode_attention as A
A.MASK_ONCE = A.MASK_ONCE if sys.argv[2] == "default" else False
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
model = LlamaForCausalLM(config).eval()
A.use(model)
cache = StaticCache(config=config, max_cache_len=32)
with torch.no_grad():
    model(input_ids=torch.randint(1, 64, (1, 5)), past_key_values=cache, cache_position=torch.arange(5))
    step = torch.compile(lambda tok, pos: model(input_ids=tok, past_key_values=cache, cache_position=pos).logits)
    logits, code = run_and_get_code(step, torch.tensor([[3]]), torch.tensor([5]))
masks = re.findall(r"ds_bnb_infer\.decode_attention(?:_ranges)?\.default\(\w+, \w+, \w+, (\w+),", "\n".join(code))
print(json.dumps({"masks": masks, "logits": logits.flatten().tolist()}))
'''


def test_mask_once_gives_every_layer_the_steps_one_mask():
    """MASK_ONCE, on by default: in a compiled step (inductor, here for the CPU) each of 3 layers' attention kernels
    reads the one mask buffer the step computed, where without it inductor writes a mask for each layer (what
    MASK_ONCE is for); the logits are the same bit for bit."""
    out = {}
    for setting in ("off", "default"):
        r = run_group([sys.executable, "-c", MASK_STEP, str(ROOT), setting], timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        out[setting] = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["default"]["masks"]) == 3 and len(set(out["default"]["masks"])) == 1, out["default"]["masks"]
    assert len(set(out["off"]["masks"])) == 3, out["off"]["masks"]
    assert out["default"]["logits"] == out["off"]["logits"]


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


def test_auto_attention_takes_the_kernel_only_where_it_was_measured_faster():
    """--attention auto (the default): the split-KV kernel on a GPU at one row a step and tp 1, sdpa with more rows, on
    several ranks or on a CPU; triton always asks for it, sdpa never; on a CPU the default runs, on sdpa."""
    from extensions.fast_decode import FastDecodeConfig, kernel_attention_wanted
    assert FastDecodeConfig.attention == "auto"
    assert kernel_attention_wanted("auto", True, 1, 1)
    assert not any(kernel_attention_wanted("auto", *case) for case in ((False, 1, 1), (True, 16, 1), (True, 1, 2)))
    assert kernel_attention_wanted("triton", True, 16, 2) and not kernel_attention_wanted("sdpa", True, 1, 1)
    r = run_cli("--model", "random:tiny", "--backend", "hf", "--device", "cpu", "--max-new-tokens", "4", "--iters",
                "1", script=FAST)
    assert r.returncode == 0 and "[attention]" not in r.stderr, r.stderr[-2000:]


@pytest.mark.gpu
def test_triton_attention_decodes_verified_on_the_gpu(tmp_path):
    """On a GPU: the kernel compiled for it equals SDPA in fp64 within fp16 rounding at the 7B's decode shapes and with
    grouped-query heads; the compiled fast loop with it (fp16, and 4-bit weight-only) is verified against the model's
    own sdpa attention."""
    import torch
    import torch.nn.functional as F
    from extensions import decode_attention
    torch.manual_seed(0)
    for b, heads, kv_heads, slots, filled in ((1, 32, 32, 160, 96), (2, 8, 2, 700, 650)):
        q = torch.randn(b, heads, 1, 128, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(b, kv_heads, slots, 128, device="cuda", dtype=torch.float16) for _ in range(2))
        keep = (torch.arange(slots, device="cuda") < filled).expand(b, 1, 1, slots).clone()
        keep[0, ..., :3] = False
        got = decode_attention.decode_attention(q, k, v, keep, 128 ** -0.5)
        kk, vv = (x.repeat_interleave(heads // kv_heads, 1).double() for x in (k, v))
        want = F.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=keep).transpose(1, 2)
        assert float((got.double() - want).abs().max()) < 2e-3, (b, heads, kv_heads, slots)
    for extra in ([], ["--quant", "4bit"]):
        path = tmp_path / "a.json"
        script = FAST if not extra else ROOT / "extensions" / "quantized_matmul.py"
        r = run_cli("--model", "random:tiny", "--backend", "hf", "--attention", "triton", "--max-new-tokens", "16",
                    "--iters", "1", "--warmup", "1", "--json", str(path), *extra, script=script, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        engine = json.loads(path.read_text())["engine"]
        assert engine["verify"]["passed"] and engine["decode"] == "compiled", engine
    r = run_cli("--model", "random:tiny", "--backend", "hf", "--max-new-tokens", "8", "--iters", "1", script=FAST,
                timeout=900)
    assert r.returncode == 0 and "--attention auto: the split-KV kernel" in r.stderr, r.stderr[-3000:]
