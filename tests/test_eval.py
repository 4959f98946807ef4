"""measure/lm_eval_check.py: lm-evaluation-harness (model local-completions, which sends token ids and asks for echo
and logprobs) scores extensions/serve.py --model real:smollm2-135m on the repository's multiple-choice task, in fp32,
8-bit and 4-bit (bitsandbytes' matmul, and serve.py's default weight-only one), and the lesson's model scored
directly gives the same log-likelihoods and the same acc. A server without prompts as token ids, echo or logprobs
fails the check (lm-eval's requests are refused)."""
import json

import pytest

from conftest import HIDE, ROOT, run_cli
from measure import lm_eval_check as check
from setup import real_model

CHECK = ROOT / "measure" / "lm_eval_check.py"


@pytest.fixture(scope="module")
def converted():
    return real_model.convert(check.MODEL)        # once per machine (~40 s); the README's setup command does it first


def test_lm_eval_through_the_server_equals_the_lessons_model(converted, tmp_path):
    out = tmp_path / "check.json"
    r = run_cli("--json", str(out), script=CHECK, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = {row["quant"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["none", "8bit", "4bit"]
    for quant, row in rows.items():
        assert row["agree"] and row["max_abs_delta_loglikelihood"] <= 1e-4, (quant, row)
        assert row["lm_eval"] == row["direct"] and row["questions"] == 36
        # the trained model answers well above chance (1 in 4): the scores are the model's, not noise
        assert row["direct"]["acc"] > 0.5, (quant, row["direct"])
        lls = [x for q in row["loglikelihoods"]["lm_eval"] for x in q]
        assert all(x < 0 for x in lls) and len(set(lls)) == len(lls), quant
    # the three formats are three models: their log-likelihoods differ by more than the tolerance
    first = lambda quant: rows[quant]["loglikelihoods"]["direct"][0][0]  # noqa: E731
    assert abs(first("none") - first("8bit")) > 1e-3 and abs(first("none") - first("4bit")) > 1e-3
    assert "fp32" in r.stdout and "4-bit" in r.stdout and r.stdout.count(" yes") == 3


def test_served_4bit_weight_only_matmul_equals_the_same_matmul_here(converted, tmp_path):
    """serve.py's default 4-bit matmul (extensions/kernel_4bit.py's weight-only; in torch on a CPU, slow: 4
    questions) against the lesson's model with the same matmul swapped in."""
    out = tmp_path / "check.json"
    r = run_cli("--quant", "4bit", "--matmul", "weight-only", "--limit", "4", "--json", str(out), script=CHECK,
                timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["matmul"] == "weight-only" and row["questions"] == 4 and row["agree"], row


def test_this_files_tokenization_is_lm_evals(converted):
    """The direct scorer splits context and continuation into tokens exactly as lm-eval's local-completions does."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    harness = LocalCompletionsAPI(base_url="http://127.0.0.1:9/v1/completions", model=check.MODEL,
                                  tokenizer_backend="huggingface", tokenizer=converted)
    import ds_bnb_infer as m
    tokenizer = m.load_tokenizer(m.DeployConfig(model_name=check.MODEL))
    questions = check.requests_of(check.load_task())
    assert len(questions) == 36 and all(len(q["choices"]) == 4 and 0 <= q["gold"] < 4 for q in questions)
    for q in questions:
        for continuation in q["continuations"]:
            assert check.encode_pair(tokenizer, q["context"], continuation) == \
                tuple(harness._encode_pair(q["context"], continuation))


def test_without_lm_eval_one_sentence_names_the_requirements_file():
    r = run_cli(prelude=HIDE.format(name="lm_eval"), script=CHECK)
    assert r.returncode == 2 and "pip install -r requirements-eval.txt" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("flags", [["--quant", "3bit"], ["--tol", "-1"], ["--limit", "0"], ["--max-model-len", "8"]])
def test_bad_flags_are_one_sentence(flags, converted):
    r = run_cli(*flags, script=CHECK)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
