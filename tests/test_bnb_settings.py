"""extensions/bnb_settings.py (第七节/第十节): the lesson's run with other bitsandbytes 4-bit settings, each verified,
each with its error against the same weights unquantized; compare.py's hf-4bit-* rows."""
import json

import torch

from conftest import ROOT, run_cli
from extensions import bnb_settings

BNB = ROOT / "extensions" / "bnb_settings.py"


def test_the_flags_build_the_bitsandbytes_config():
    settings, rest = bnb_settings.settings_parser().parse_known_args(
        ["--bnb-quant-type", "fp4", "--bnb-double-quant", "off", "--bnb-compute-dtype", "fp16", "--model", "x"])
    c = bnb_settings.bnb_config(settings, "4bit", 6.0)
    assert (c.bnb_4bit_quant_type, c.bnb_4bit_use_double_quant, c.bnb_4bit_compute_dtype) == ("fp4", False,
                                                                                             torch.float16)
    assert rest == ["--model", "x"] and bnb_settings.bnb_config(settings, "8bit", 0.0).load_in_8bit


def _run(tmp_path, quant_type):
    path = tmp_path / f"{quant_type}.json"
    r = run_cli("--model", "random:tiny", "--quant", "4bit", "--bnb-quant-type", quant_type, "--bnb-compute-dtype",
                "fp32", "--fast-decode", "--max-new-tokens", "8", "--iters", "1", "--warmup", "0", "--json",
                str(path), script=BNB)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(path.read_text())


def test_nf4_and_fp4_load_verified_with_their_own_error_against_the_unquantized_weights(tmp_path):
    """Each setting is really loaded (another code book: another error against the same fp32 weights), verified
    against itself unwrapped, and the fast loop against generate()."""
    nf4, fp4 = _run(tmp_path, "nf4"), _run(tmp_path, "fp4")
    for report, name in ((nf4, "nf4"), (fp4, "fp4")):
        verify = report["engine"]["verify"]
        assert verify["passed"] and report["engine"]["quant"] == "4bit" and report["engine"]["decode"] == "eager"
        assert verify["vs_unquantized"]["of"] == "the same weights unquantized (float32)"
        assert 0 < verify["vs_unquantized"]["prefill_rel_error"] < 1
        assert f"4-bit {name}, double quant on, compute fp32" in report["engine"]["notes"][-1]
    assert nf4["engine"]["verify"]["vs_unquantized"] != fp4["engine"]["verify"]["vs_unquantized"]


def test_compare_rows_for_settings_and_torch_compile(tmp_path):
    r = run_cli("--model", "random:tiny", "--max-new-tokens", "8", "--iters", "1", "--warmup", "0", "--modes",
                "hf-4bit-nodq-compile,hf-4bit-torch-compile", "--json", str(tmp_path / "c.json"),
                script=ROOT / "extensions" / "compare.py", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["mode"]: row for row in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert rows["hf-4bit-nodq-compile"]["verified"] is True and rows["hf-4bit-nodq-compile"]["vs_unquantized"]
    assert rows["hf-4bit-torch-compile"]["verified"] is True
    assert "FAST_DECODE_MODE=compiled extensions/fast_decode.py" in r.stderr


def test_bad_input_is_one_sentence_and_exit_2():
    r = run_cli("--model", "random:tiny", "--quant", "8bit", script=BNB)
    assert r.returncode == 2 and "add --quant 4bit" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--model", "random:tiny", "--quant", "4bit", "--bnb-quant-type", "int3", script=BNB)
    assert r.returncode == 2 and "Traceback" not in r.stderr
