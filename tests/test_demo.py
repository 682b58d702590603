"""The main job: `python train.py` trains a small Llama from scratch by SFT, then RLSP, on a CPU in
minutes, and RLSP must beat SFT on 500 held-out problems by 10+ points, beyond twice the standard error."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(out, *extra):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.load(open(os.path.join(out, "summary.json"))), p.stdout


def test_demo_rlsp_beats_sft(tmp_path):
    s, out = run_demo(tmp_path / "demo")
    for key in ("heldout_n", "sft_accuracy", "rlsp_accuracy", "sft_mean_length", "rlsp_mean_length", "seconds"):
        assert key in s
    assert s["heldout_n"] >= 500 and s["seconds"] < 600
    se = (s["gain_ci95"][1] - s["gain"]) / 1.96  # paired standard error of the gain
    assert s["gain"] >= 0.10 and s["gain"] > 2 * se, s
    assert s["rlsp_accuracy"] - s["sft_accuracy"] == s["gain"] or abs(s["rlsp_accuracy"] - s["sft_accuracy"] - s["gain"]) < 1e-9
    assert s["rlsp_mean_length"] > s["sft_mean_length"]  # RLSP learned to write the partial sums
    assert "| SFT + RLSP (length) |" in out
    for stage in ("sft", "rlsp"):
        assert os.path.isfile(tmp_path / "demo" / stage / "final" / "model.safetensors")
    assert any(f.endswith(".png") for f in os.listdir(tmp_path / "demo" / "rlsp"))
