"""eval.py: metric hand computations, and real runs of the CLI on SmolLM2 (resume after SIGKILL, compare)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from eval import majority_correct, mean_ci95, pass_at_k, repeats, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pass_at_k_hand_computed():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)          # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)         # 1 - C(3,3)/C(5,3)
    assert pass_at_k(8, 3, 4) == pytest.approx(1 - math.comb(5, 4) / math.comb(8, 4))
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0 and pass_at_k(4, 1, 4) == 1.0


def test_majority_vote():
    assert majority_correct(["2", "3", "2", None], [True, False, True, False]) is True
    assert majority_correct(["3", "2"], [False, True]) is False            # tie: the earliest answer wins
    assert majority_correct(["0.5", ".5", "1"], [True, True, False]) is True  # votes pool by normalised form
    assert majority_correct([None, None], [False, False]) is False


def test_ci_is_the_normal_approximation():
    m, (lo, hi) = mean_ci95([1, 0, 1, 1])
    se = math.sqrt(0.75 * 0.25 / 4)
    assert m == 0.75 and lo == pytest.approx(0.75 - 1.96 * se) and hi == pytest.approx(0.75 + 1.96 * se)


def sample(pid, k, correct, answer="1", level=1, n=10, finished=True, response="ok"):
    s = {"id": pid, "sample": k, "response": response, "num_tokens": n, "finished": finished, "level": level,
         "subject": "Algebra"}
    for m in ("strict", "paper"):
        s[f"correct_{m}"], s[f"extracted_{m}"] = correct, answer
        s[f"status_{m}"] = "correct" if correct else ("no_answer" if answer is None else "incorrect")
    return s


def test_summarize_hand_computed():
    samples = [sample("a", 0, True), sample("a", 1, False, "2"), sample("b", 0, False, None, level=2, n=30, finished=False),
               sample("b", 1, False, "3", level=2, response="wait, let me check " + "x y z w v u t s r q " * 3)]
    s = summarize(samples)
    assert s["accuracy"] == pytest.approx(0.25)  # mean over problems of per-problem accuracy (0.5, 0)
    assert s["pass_at_k"] == {"1": pytest.approx(0.25), "2": pytest.approx(0.5)}
    assert s["maj_at_k"]["2"] == pytest.approx(0.5)  # a: tie of "1" (correct) and "2", earliest wins; b: wrong
    assert s["accuracy_by_level"] == {"1": 0.5, "2": 0.0}
    assert s["mean_length"] == 15 and s["median_length"] == 10 and s["truncation_rate"] == 0.25
    assert s["no_answer_rate"] == 0.25
    assert s["behaviour_rates_proxy"]["backtracking"] == 0.25 and s["behaviour_rates_proxy"]["verification"] == 0.25
    assert "mean_think_length" not in s
    samples[0]["think_tokens"], samples[2]["think_tokens"] = 6, 30  # a reasoning model's <think> blocks
    s = summarize(samples)
    assert s["mean_think_length"] == 9 and s["mean_answer_length"] == 6
    assert s["repetition_rate"] == 0.25 and repeats("a b c d e f g h i j " * 3) and not repeats(" ".join(map(str, range(60))))


def run_eval(model, out, extra=()):
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", model, "--data", "gsm8k", "--limit", "20",
           "--samples", "2", "--temperature", "0.8", "--max-new-tokens", "120", "--batch-size", "4",
           "--prompt", "boxed", "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def stable(summary):
    return {k: v for k, v in summary.items() if k not in ("seconds", "tokens_per_s")}


def test_eval_cli_resumes_after_kill(tiny_llama, tmp_path):
    """The tiny model: the mechanics (kill mid-run, rerun, identical summary) do not need a real one."""
    full = run_eval(tiny_llama, tmp_path / "full")
    out, err = full.communicate(timeout=600)
    assert full.returncode == 0, err
    summary = json.load(open(tmp_path / "full" / "summary.json"))
    lines = [json.loads(x) for x in open(tmp_path / "full" / "samples.jsonl")]
    assert len(lines) == 40 and summary["n_problems"] == 20 and summary["samples_per_problem"] == 2
    for key in ("id", "sample", "prompt", "response", "extracted", "status", "num_tokens", "finished"):
        assert all(key in x for x in lines)
    # the summary is recomputable from the samples alone
    assert summary["accuracy"] == pytest.approx(sum(x["correct_strict"] for x in lines) / 40)
    assert summary["accuracy_paper"] == pytest.approx(sum(x["correct_paper"] for x in lines) / 40)
    assert summary["truncation_rate"] == pytest.approx(sum(not x["finished"] for x in lines) / 40)
    for key in ("accuracy", "ci95", "n_problems", "samples_per_problem", "pass_at_k", "maj_at_k", "mean_length",
                "truncation_rate", "no_answer_rate", "accuracy_strict", "accuracy_paper", "tokens_per_s"):
        assert key in summary
    assert "accuracy (strict)" in out

    killed = run_eval(tiny_llama, tmp_path / "resumed")
    samples = tmp_path / "resumed" / "samples.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (samples.exists() and len(samples.read_text().splitlines()) >= 4):
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    n_before = len(samples.read_text().splitlines())
    assert 4 <= n_before < 40, "the kill should land mid-run"
    resumed = run_eval(tiny_llama, tmp_path / "resumed")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert len(samples.read_text().splitlines()) == 40
    assert stable(json.load(open(tmp_path / "resumed" / "summary.json"))) == stable(summary)

    cmp = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--compare", str(tmp_path / "full"),
                          str(tmp_path / "resumed")], capture_output=True, text=True, cwd=ROOT)
    assert cmp.returncode == 0, cmp.stderr
    assert "paired difference (strict) on 20 problems: +0.0000" in cmp.stdout and "within the noise" in cmp.stdout
