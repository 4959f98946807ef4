"""extensions/int8_weight_only.py (第七节/第十节): bitsandbytes' plain int8 weights multiplied weight-only (int8
weights, activations in their own dtype), in fast_decode.py's loop; compare.py's hf-8bit-wo-compile row."""
import json

import bitsandbytes.functional as F
import torch

import ds_bnb_infer as m
from conftest import ROOT, run_cli
from extensions.int8_weight_only import weight_only

WO = ROOT / "extensions" / "int8_weight_only.py"


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


def test_run_is_verified_with_its_error_against_the_unquantized_weights(tmp_path):
    path = tmp_path / "wo.json"
    r = run_cli("--model", "random:tiny", "--quant", "8bit", "--int8-threshold", "0", "--max-new-tokens", "8",
                "--iters", "1", "--warmup", "0", "--json", str(path), script=WO)
    assert r.returncode == 0, r.stderr[-3000:]
    engine = json.loads(path.read_text())["engine"]
    assert engine["verify"]["passed"] and engine["decode"] == "eager" and engine["quant"] == "8bit"
    assert 0 < engine["verify"]["vs_unquantized"]["prefill_rel_error"] < 0.1
    assert "14 bitsandbytes int8 linears multiplied weight-only" in engine["notes"][-1]


def test_llm_int8_with_outliers_is_refused_in_one_sentence():
    r = run_cli("--model", "random:tiny", "--quant", "8bit", script=WO)
    assert r.returncode == 2 and "add --quant 8bit --int8-threshold 0" in r.stderr and "Traceback" not in r.stderr
