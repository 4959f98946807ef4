"""real:smollm2-135m (setup/real_model.py): a trained model offline. Its answer comes through its chat template;
8-bit and 4-bit keep its perplexity within stated bounds (a broken quantization lands far outside them), and nf4
multiplied weight-only (Int4WeightOnly) keeps bitsandbytes' perplexity; the fast_decode loop and tensor parallel
(two CPU ranks) give the very tokens of plain generate(), every one of them."""
import json

import pytest

from conftest import ROOT, launch, run_cli
from measure import quality
from setup import real_model

MODEL = "real:smollm2-135m"
PROMPT = "What is tensor parallelism? Answer in one sentence."
RUN = ["--model", MODEL, "--prompt", PROMPT, "--max-new-tokens", "48", "--iters", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def converted():
    return real_model.convert(MODEL)       # once per machine (~40 s); the README's setup command does it first


def test_a_preset_not_converted_yet_is_one_sentence(tmp_path):
    r = run_cli("--model", MODEL, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert r.returncode == 2 and "run python setup/real_model.py once" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def report(r, path):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(path.read_text())


def test_fast_decode_and_tensor_parallel_give_every_token_of_generate(converted, tmp_path):
    plain = report(run_cli(*RUN, "--json", str(tmp_path / "plain.json")), tmp_path / "plain.json")
    answer = plain["outputs"][0]
    assert answer["text"].startswith("Tensor parallelism is") and answer["new_tokens"] < 48     # ended at its EOS
    assert plain["engine"]["verify"]["passed"] and plain["note"] is None                         # real weights
    from transformers import AutoTokenizer
    import ds_bnb_infer as m
    tokenizer = AutoTokenizer.from_pretrained(converted)
    templated = m.as_chat(tokenizer, [PROMPT])[0]
    assert templated != PROMPT and PROMPT in templated                           # the prompt became a user turn
    assert plain["metrics"]["per_run"][0]["prompt_tokens"] == len(tokenizer(templated)["input_ids"])   # and was sent
    fast = report(run_cli(*RUN, "--backend", "hf", "--json", str(tmp_path / "fast.json"),
                          script=ROOT / "extensions" / "fast_decode.py"), tmp_path / "fast.json")
    tp2 = report(launch(*RUN, "--json", str(tmp_path / "tp2.json")), tmp_path / "tp2.json")
    for other in (fast, tp2):
        assert other["engine"]["verify"]["passed"]
        assert other["outputs"][0] == answer                     # same text, same count: every token agrees


@pytest.fixture(scope="module")
def ids(converted):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(converted)
    return tokenizer(open(quality.TEXT, encoding="utf-8").read(), return_tensors="pt")["input_ids"][:, :256], tokenizer


@pytest.fixture(scope="module")
def rows(ids):
    return {fmt: quality.evaluate(fmt, *ids, new_tokens=0) for fmt in ("fp32", "int8", "nf4-dq", "nf4-dq-wo")}


def test_quantized_perplexity_stays_within_stated_bounds(rows):
    """Bounds (README 第七节): LLM.int8 within 5% of fp32, 4-bit nf4 below twice fp32; measured -0.5% and +46%."""
    fp32, int8, nf4 = (rows[f]["perplexity"] for f in ("fp32", "int8", "nf4-dq"))
    assert 5 < fp32 < 50
    assert abs(int8 / fp32 - 1) < 0.05
    assert 1.0 < nf4 / fp32 < 2.0
    assert rows["nf4-dq"]["weight_gb"] < rows["int8"]["weight_gb"] < rows["fp32"]["weight_gb"]
    assert all(r["deepspeed_bit_identical"] for r in rows.values())


def test_nf4_multiplied_weight_only_keeps_bitsandbytes_perplexity(rows, ids):
    """Quality unchanged (issue 25): nf4-dq-wo multiplies nf4-dq's stored weights with Int4WeightOnly (our
    dequantization, then one matmul in bf16). The honest comparison is bitsandbytes' own matmul of the same stored
    weights: its generic path (dequantize_4bit, then one matmul - a GPU's prefill, a CPU without AVX512-BF16),
    selected here by the flag bitsandbytes itself sets from the CPU's features. Tolerance 0: the dequantized weights
    are equal bit for bit and the matmul is the same, so the perplexity is the same float. Against the nf4-dq row as
    measured (bitsandbytes' AVX512-BF16 kernel where the CPU has it: the same codes, scales rounded to bf16) the bound
    is 1% - measured -0.11% on such a CPU, 0 on others - a fiftieth of what nf4 itself costs (+46% over fp32). The
    stored bytes are the same, plus Int4WeightOnly's double-quantization offset kept once per output row (fp32, so
    that fused layers each keep their own)."""
    import bitsandbytes as bnb
    wo, theirs = rows["nf4-dq-wo"], rows["nf4-dq"]
    assert (wo["matmul"], theirs["matmul"]) == ("weight-only", "bitsandbytes") and not wo["bnb_cpu_repack"]
    model = quality.load("nf4-dq")
    layers = [x for x in model.modules() if isinstance(x, bnb.nn.Linear4bit)]
    assert len(layers) == 210
    offsets = 4 * sum(layer.out_features for layer in layers)
    assert round(wo["weight_gb"] * 1e9) == round(theirs["weight_gb"] * 1e9) + offsets and wo["deepspeed_bit_identical"]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False        # bitsandbytes' generic path, as on a CPU without AVX512-BF16
    assert quality.perplexity(model, ids[0]) == wo["perplexity"]
    assert not quality.bnb_cpu_repack(model)
    assert abs(wo["perplexity"] / theirs["perplexity"] - 1) < 0.01
