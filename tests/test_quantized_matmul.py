"""extensions/quantized_matmul.py (第七节/第十节) and the lesson's 4-bit settings: bitsandbytes' plain int8 weights
multiplied weight-only (int8 weights, activations in their own dtype), or bitsandbytes' own kernels under any 4-bit
setting, in fast_decode.py's loop, each verified and with its error against the unquantized weights; compare.py's
hf-8bit-wo-compile and hf-4bit-* rows."""
import json

import bitsandbytes.functional as F
import torch

import ds_bnb_infer as m
from conftest import ROOT, run_cli
from extensions.quantized_matmul import QuantizedMatmulConfig, matmul_of, weight_only

QMM = ROOT / "extensions" / "quantized_matmul.py"


def test_weight_only_layers_hold_bitsandbytes_int8_weights_and_come_nearer_the_unquantized_model():
    """Each Linear8bitLt becomes a layer over its very int8 rows and scales (bitsandbytes' own dequantization gives
    its weight); without the activations' rounding to int8 the logits come nearer the unquantized model's."""
    config = m.DeployConfig(model_name="random:tiny", quant="8bit", int8_threshold=0.0, dtype="fp32", device="cpu")
    ids = torch.tensor([[1, 5, 9, 2, 7, 11, 13, 4]])
    with torch.no_grad():
        plain = m.load_model(config, "none", "cpu")(input_ids=ids).logits
        model = m.load_model(config, "8bit", "cpu")
        bnb = model(input_ids=ids).logits.clone()
        layer = model.model.layers[0].mlp.up_proj
        cb, scb = layer.weight.data.clone(), layer.state.SCB.clone()
        assert weight_only(model) == 14
        mine = model.model.layers[0].mlp.up_proj
        assert type(mine).__name__ == "Int8WeightOnly" and mine.weight.dtype == torch.int8
        assert torch.equal(mine.weight, cb)
        x = torch.randn(3, cb.shape[1])
        torch.testing.assert_close(mine(x), x @ F.int8_vectorwise_dequant(cb, scb).T, rtol=1e-5, atol=1e-6)
        wo = model(input_ids=ids).logits
    assert m.rel_error(wo, plain) < m.rel_error(bnb, plain)


def test_weight_only_run_is_verified_with_its_error_against_the_unquantized_weights(tmp_path):
    path = tmp_path / "wo.json"
    r = run_cli("--model", "random:tiny", "--quant", "8bit", "--int8-threshold", "0", "--max-new-tokens", "8",
                "--iters", "1", "--warmup", "0", "--json", str(path), script=QMM)
    assert r.returncode == 0, r.stderr[-3000:]
    engine = json.loads(path.read_text())["engine"]
    assert engine["verify"]["passed"] and engine["decode"] == "eager" and engine["quant"] == "8bit"
    assert 0 < engine["verify"]["vs_unquantized"]["prefill_rel_error"] < 0.1
    assert "8bit weights, weight-only matmul" in engine["notes"][-1]


def test_the_4bit_flags_are_the_lessons_and_build_the_bitsandbytes_config():
    """第七节's BitsAndBytesConfig fields are DeployConfig fields and flags of every script built on the lesson."""
    c = m.config_from_args(["--quant", "4bit", "--bnb-4bit-quant-type", "fp4", "--no-bnb-4bit-use-double-quant",
                            "--bnb-4bit-compute-dtype", "fp16"])
    b = m.bnb_config(c, "4bit")
    assert (b.bnb_4bit_quant_type, b.bnb_4bit_use_double_quant, b.bnb_4bit_compute_dtype) == ("fp4", False,
                                                                                             torch.float16)
    default = m.bnb_config(m.DeployConfig(), "4bit")            # the tutorial's: nf4, double quant, bf16
    assert (default.bnb_4bit_quant_type, default.bnb_4bit_use_double_quant, default.bnb_4bit_compute_dtype) == (
        "nf4", True, torch.bfloat16)
    assert m.bnb_config(m.DeployConfig(int8_threshold=0.0), "8bit").llm_int8_threshold == 0.0
    assert matmul_of(QuantizedMatmulConfig(quant="8bit", int8_threshold=0.0)) == "weight-only"
    assert matmul_of(QuantizedMatmulConfig(quant="4bit")) == "weight-only"
    assert matmul_of(QuantizedMatmulConfig(quant="8bit")) == "bitsandbytes"     # LLM.int8: outliers in fp16


def _run(tmp_path, quant_type):
    path = tmp_path / f"{quant_type}.json"
    r = run_cli("--model", "random:tiny", "--quant", "4bit", "--matmul", "bitsandbytes", "--bnb-4bit-quant-type",
                quant_type, "--bnb-4bit-compute-dtype", "fp32", "--max-new-tokens", "8", "--iters", "1", "--warmup",
                "0", "--json", str(path), script=QMM)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(path.read_text())


def test_nf4_and_fp4_load_verified_with_their_own_error_against_the_unquantized_weights(tmp_path):
    """Each setting is really loaded (another code book: another error against the same fp32 weights), verified
    against itself unwrapped, in the fast loop."""
    nf4, fp4 = _run(tmp_path, "nf4"), _run(tmp_path, "fp4")
    for report, name in ((nf4, "nf4"), (fp4, "fp4")):
        verify = report["engine"]["verify"]
        assert verify["passed"] and report["engine"]["quant"] == "4bit" and report["engine"]["decode"] == "eager"
        assert verify["vs_unquantized"]["of"] == "the same weights unquantized (float32)"
        assert 0 < verify["vs_unquantized"]["prefill_rel_error"] < 1
        assert f"4-bit {name}, double quant True, compute fp32, bitsandbytes matmul" in report["engine"]["notes"][-1]
        assert report["config"]["bnb_4bit_quant_type"] == name
    assert nf4["engine"]["verify"]["vs_unquantized"] != fp4["engine"]["verify"]["vs_unquantized"]


def test_4bit_with_fp16_compute_is_checked_at_fp16s_rounding(tmp_path):
    """A 4-bit matmul rounds in its compute dtype: the loop's static-cache attention (equal in fp32) feeds it inputs
    that round to other fp16 numbers, so fp16 compute (no double quant: compare.py's hf-4bit-fp16-nodq-compile) is
    checked at fp16's tolerance, not the fp32 model's (where it failed: decode error 1.5e-3 > 1e-4)."""
    path = tmp_path / "fp16.json"
    r = run_cli("--model", "random:tiny", "--backend", "hf", "--quant", "4bit", "--matmul", "bitsandbytes",
                "--bnb-4bit-compute-dtype", "fp16", "--no-bnb-4bit-use-double-quant", "--max-new-tokens", "8",
                "--iters", "1", "--warmup", "0", "--json", str(path), script=QMM)
    assert r.returncode == 0, r.stderr[-3000:]
    verify = json.loads(path.read_text())["engine"]["verify"]
    assert verify["passed"] and verify["tolerance"] == m.KERNEL_TOL["fp16"] > m.KERNEL_TOL["fp32"]
    assert verify["decode_rel_error"] < m.KERNEL_TOL["fp16"]
    assert m.kernel_tol(torch.float32, "bf16") == m.KERNEL_TOL["bf16"] and m.kernel_tol(torch.float16) == 2e-2


def test_compare_rows_for_settings_and_torch_compile_are_flag_sets(tmp_path):
    r = run_cli("--model", "random:tiny", "--max-new-tokens", "8", "--iters", "1", "--warmup", "0", "--modes",
                "hf-4bit-nodq-compile,hf-4bit-torch-compile", "--json", str(tmp_path / "c.json"),
                script=ROOT / "measure" / "compare.py", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["mode"]: row for row in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert rows["hf-4bit-nodq-compile"]["verified"] is True and rows["hf-4bit-nodq-compile"]["vs_unquantized"]
    assert rows["hf-4bit-torch-compile"]["verified"] is True
    assert "hf-4bit-torch-compile: extensions/fast_decode.py --model random:tiny --max-new-tokens 8 --iters 1 " \
           "--warmup 0 --backend hf --quant 4bit --step compiled" in r.stderr


def test_bad_input_is_one_sentence_and_exit_2():
    for args, words in [(["--quant", "8bit", "--matmul", "weight-only"], "or --quant 8bit --int8-threshold 0"),
                        ([], "add --quant 8bit or 4bit"),
                        (["--quant", "8bit", "--bnb-4bit-quant-type", "fp4"], "applies to --quant 4bit only"),
                        (["--quant", "4bit", "--bnb-4bit-quant-type", "int3"], "invalid choice")]:
        r = run_cli("--model", "random:tiny", *args, script=QMM)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
