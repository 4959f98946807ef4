"""measure/compare.py (第十节): every mode in its own process, one table, JSON and chart; failures are rows."""
import json

import pytest

from conftest import HIDE, ROOT, run_cli

COMPARE = ROOT / "measure" / "compare.py"


def compare(*args, **kw):
    return run_cli(*args, script=COMPARE, timeout=900, **kw)


def test_compare_runs_each_mode_and_reports_failures(tmp_path):
    r = compare("--model", "random:tiny", "--max-new-tokens", "8", "--iters", "2", "--warmup", "0",
                "--modes", "hf,ds-4bit,ds-inject,hf-static,hf-compile,hf-8bit-t0-compile", "--json", str(tmp_path / "c.json"),
                "--plot", str(tmp_path / "c.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "c.json").read_text())
    assert {"card", "date", "versions", "bandwidth_gb_s", "rows"} <= set(result) and result["bandwidth_gb_s"] > 0
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["hf", "ds-4bit", "ds-inject", "hf-static", "hf-compile", "hf-8bit-t0-compile"]
    assert rows["hf-static"]["decode"] == "static-generate" and rows["hf-static"]["verified"] is True
    assert rows["ds-inject"]["status"] == "failed"
    assert "kernel_inject on cannot be used" in rows["ds-inject"]["reason"]
    assert rows["hf"]["verified"] == "reference" and rows["ds-4bit"]["verified"] is True
    assert rows["hf-compile"]["decode"] == "eager" and rows["hf-compile"]["verified"] is True
    assert rows["ds-4bit"]["quant"] == "4bit" and rows["ds-4bit"]["weight_gb"] < rows["hf"]["weight_gb"]
    t0 = rows["hf-8bit-t0-compile"]                          # plain int8: the mode passes --int8-threshold 0 on
    assert (t0["quant"], t0["int8_threshold"], t0["verified"]) == ("8bit", 0.0, True)
    assert rows["ds-4bit"]["int8_threshold"] is None
    for row in (rows["hf"], rows["ds-4bit"], rows["hf-compile"]):
        assert row["decode_tokens_per_s"] > 0 and 0 < row["mbu"] < 1 and row["p50_s"] <= row["p95_s"]
        assert row["roofline_decode_tokens_per_s"] == pytest.approx(
            row["decode_tokens_per_s"] / row["mbu"], rel=1e-6)      # both from the same bytes per step
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert "FAILED" in r.stdout and "MBU" in r.stdout


def test_when_every_mode_fails_nothing_is_written(tmp_path):
    r = compare("--model", "random:tiny", "--max-new-tokens", "4", "--iters", "1", "--modes", "ds-inject",
                "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png"))
    assert r.returncode == 1 and "error: every mode failed (ds-inject: " in r.stderr
    assert list(tmp_path.iterdir()) == [] and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--modes", "hf,turbo"], "unknown mode(s) turbo"),
    (["--quant", "4bit"], "--quant is set by each mode"),
    (["--bnb-4bit-compute-dtype", "fp16"], "--bnb-4bit-compute-dtype is set by each mode"),
    (["--plot", "/no/such/dir/c.png"], "--plot /no/such/dir/c.png: its folder does not exist"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_input_is_one_sentence(tiny, args, words):
    r = compare(*tiny, *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_plot_without_matplotlib_is_one_sentence(tiny):
    r = compare(*tiny, "--modes", "hf", "--plot", "x.png", prelude=HIDE.format(name="matplotlib"))
    assert r.returncode == 2 and "pip install matplotlib" in r.stderr and "Traceback" not in r.stderr
