"""The main job: `python train.py` trains a small Llama from scratch by SFT, then RLSP, on a CPU in
minutes. RLSP must beat SFT on 500 held-out problems by 10+ points, beyond twice the standard error,
and the length exploration reward must buy longer answers during RL than no exploration."""
import json
import os
import subprocess
import sys

import pytest

from demo import parse_mix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(out, *extra):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=3600)  # a hang guard, not a speed limit
    assert p.returncode == 0, p.stderr[-3000:]
    return json.load(open(os.path.join(out, "summary.json"))), p.stdout


@pytest.fixture(scope="module")
def length_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "length"
    return out, *run_demo(out)


def test_demo_rlsp_beats_sft(length_run):
    out, s, stdout = length_run
    for key in ("heldout_n", "sft_accuracy", "rlsp_accuracy", "sft_mean_length", "rlsp_mean_length", "seconds"):
        assert key in s
    assert s["heldout_n"] >= 500
    se = (s["gain_ci95"][1] - s["gain"]) / 1.96  # paired standard error of the gain
    assert s["gain"] >= 0.10 and s["gain"] > 2 * se, s
    assert abs(s["rlsp_accuracy"] - s["sft_accuracy"] - s["gain"]) < 1e-9
    assert s["rlsp_mean_length"] > s["sft_mean_length"]  # RLSP learned to write the partial sums
    assert "| SFT + RLSP (length) |" in stdout
    for stage in ("sft", "rlsp"):
        assert os.path.isfile(out / stage / "final" / "model.safetensors")
    assert os.path.isfile(out / "rlsp" / "curves.png")


def rl_lengths(folder):
    return [r["mean_length"] for r in map(json.loads, open(os.path.join(folder, "rlsp", "metrics.jsonl")))]


def test_demo_length_reward_lengthens_answers(length_run, tmp_path):
    """Same SFT model (same seed), RL without the exploration reward: the same steps on the same problems, so
    the runs differ only in the reward. The length reward pays for every token before the box, the outcome
    reward for none of them: over the RL steps, the length run's answers are longer on average (the paper's
    Fig. 6, at toy scale)."""
    out, s_len, _ = length_run
    s_none, stdout = run_demo(tmp_path / "none", "--exploration", "none", "--demo-sft", str(out))  # its SFT model
    assert "| SFT + RLSP (none) |" in stdout
    assert s_none["sft_accuracy"] == s_len["sft_accuracy"]  # the runs differ only in the RL reward
    assert not os.path.exists(tmp_path / "none" / "sft")
    a, b = rl_lengths(out), rl_lengths(tmp_path / "none")
    assert len(a) == len(b) == 40 and a[0] == b[0]  # step 1 samples from the same model with the same seed
    assert sum(a) / len(a) > sum(b) / len(b), (a, b)


def test_demo_sft_must_match(length_run, tmp_path, capsys):
    out, _, _ = length_run
    import train
    with pytest.raises(ValueError, match="its SFT stage differs from this run's"):
        train.main(["--out", str(tmp_path / "other"), "--demo-sft", str(out), "--seed", "1"])
    with pytest.raises(FileNotFoundError, match="no finished demo there"):
        train.main(["--out", str(tmp_path / "other2"), "--demo-sft", str(tmp_path)])


def test_demo_mix_parsing():
    assert parse_mix("direct:2,steps:1,checked:1") == (["direct", "steps", "checked"], [2.0, 1.0, 1.0])
    assert parse_mix("steps") == (["steps"], [1.0])
    for bad, msg in (("direct:x", "not a number"), ("foo:1", "unknown style 'foo'"), ("steps:0", "positive sum")):
        with pytest.raises(ValueError, match=msg):
            parse_mix(bad)
