"""extensions/kv_cache.py (第十节 KV Cache 启用/验证): the same greedy tokens with the cache on and off, every step
timed (the times themselves are measured on the device and in benchmarks/, not asserted here)."""
import json

from conftest import ROOT, run_cli

KV = ROOT / "extensions" / "kv_cache.py"


def test_cache_on_and_off_give_the_same_tokens_and_every_step_is_timed(tmp_path):
    r = run_cli("--model", "random:tiny", "--max-new-tokens", "32", "--json", str(tmp_path / "kv.json"), script=KV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "greedy tokens equal with and without the cache: 32/32" in r.stdout
    result = json.loads((tmp_path / "kv.json").read_text())
    assert result["tokens_equal"] == result["tokens"] == 32
    assert set(result["step_s"]) == {"on", "off"} and all(len(s) == 32 for s in result["step_s"].values())
    assert result["rows"]["on"]["total_s"] == sum(result["step_s"]["on"])


def test_bad_input_is_one_sentence():
    r = run_cli("--model", "random:tiny", "--json", "/proc/kv.json", script=KV)
    assert r.returncode == 2 and "cannot write --json /proc/kv.json" in r.stderr and "Traceback" not in r.stderr
