"""Bad input, as a user types it: every CLI (train, eval, bench, verifier) answers a bad flag or file with
exit status != 0 and one line naming the problem, never a traceback (RLSP_DEBUG=1 shows it); Ctrl-C says
what was kept; a folder of other settings is never added to."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import bench
import cli
import eval as evaluation
import train
import verifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fails(main, argv, capsys):
    """(exit status, the lines on stderr) of a CLI run in this process."""
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return e.value.code, err


@pytest.mark.parametrize("argv,message", [
    (["--stage", "sft", "--model", "M", "--batch-size", "-2"], "argument --batch-size: must be an integer >= 1 (got '-2')"),
    (["--stage", "sft", "--model", "M", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1 (got '0')"),
    (["--model", "M", "--micro-batch-size", "0"], "argument --micro-batch-size: must be an integer >= 1"),
    (["--stage", "rl", "--model", "M", "--max-new-tokens", "-5"], "argument --max-new-tokens: must be an integer >= 1"),
    (["--stage", "rl", "--model", "M", "--temperature", "-1"], "argument --temperature: must be a number > 0"),
    (["--stage", "rl", "--model", "M", "--top-p", "0"], "argument --top-p: must be a number > 0 and <= 1"),
    (["--model", "M", "--limit", "0"], "argument --limit: must be an integer >= 1"),
    (["--model", "M", "--lr", "abc"], "argument --lr: must be a number > 0 (got 'abc')"),
    (["--stage", "rl", "--data", "gsm8k_train", "--max-steps", "2"], "--model is required with --stage"),
    (["--dry-run"], "--dry-run needs --model"),
    (["--model", "M", "--device", "tpu"], "--device must be cpu or cuda"),
    (["--stage", "rl", "--model", "M", "--group-size", "1"], "--advantage grpo needs --group-size >= 2"),
])
def test_train_flags(argv, message, capsys):
    code, err = fails(train.main, argv, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(capsys):
    for main, argv in ((train.main, ["--model", "M", "--device", "cuda"]),
                       (evaluation.main, ["--model", "M", "--device", "cuda"])):
        code, err = fails(main, argv, capsys)
        assert code == 2 and len(err) == 1 and "sees no CUDA device" in err[0], err


def test_train_user_errors(tiny_llama, tmp_path, capsys):
    code, err = fails(train.main, ["--model", tiny_llama, "--data", "math5000", "--out", str(tmp_path / "a")], capsys)
    assert code == 1 and len(err) == 1 and "'math5000' is neither a dataset name (math500, math_train" in err[0], err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = fails(train.main, ["--model", tiny_llama, "--data", str(empty), "--out", str(tmp_path / "b")], capsys)
    assert code == 1 and len(err) == 1 and "0 demonstrations" in err[0] and not (tmp_path / "b").exists()
    code, err = fails(train.main, ["--stage", "sft", "--model", str(tmp_path / "nope")], capsys)
    assert code == 1 and err == [f"error: model folder {str(tmp_path / 'nope')!r} does not exist"]
    code, err = fails(train.main, ["--plot", str(tmp_path)], capsys)
    assert code == 1 and len(err) == 1 and "metrics.jsonl not found" in err[0]
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "x").write_text("")
    code, err = fails(train.main, ["--out", str(tmp_path / "demo")], capsys)
    assert code == 1 and err == [f"error: {tmp_path / 'demo'} is not empty: remove it or pass another --out"]


def test_truncated_checkpoint_names_the_file(tiny_llama, tmp_path, capsys):
    import shutil
    shutil.copytree(tiny_llama, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    code, err = fails(evaluation.main, ["--model", str(tmp_path / "m"), "--data", "gsm8k", "--limit", "1",
                                        "--out", str(tmp_path / "e")], capsys)
    assert code == 1 and len(err) == 1 and f"{f}: cannot read it as safetensors" in err[0], err


def test_small_batch_size_is_not_an_error(tiny_llama, tmp_path):
    """--batch-size 2 with the default --micro-batch-size 4: the memory knob is clamped, not an error."""
    train.main(["--model", tiny_llama, "--data", "math_train", "--limit", "20", "--heldout", "4", "--seq-len", "128",
                "--batch-size", "2", "--max-steps", "1", "--eval-every", "0", "--out", str(tmp_path / "r")])
    assert json.load(open(tmp_path / "r" / "args.json"))["micro_batch_size"] == 2
    assert (tmp_path / "r" / "final" / "model.safetensors").exists()


def test_help_shows_defaults_and_both_stages(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "--batch-size BATCH_SIZE" in out and "(default: 32)" in out and "(default: 0.7)" in out
    assert "--stage rl" in out and "RL:" in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "M", "--temperature", "-1"], "argument --temperature: must be a number >= 0"),
    (["--model", "M", "--samples", "0"], "argument --samples: must be an integer >= 1"),
    (["--model", "M", "--samples", "4"], "--samples 4 with --temperature 0 draws the same greedy response 4 times"),
    (["--model", "M", "--limit", "0"], "argument --limit: must be an integer >= 1"),
    (["--model", "M", "--max-new-tokens", "-5"], "argument --max-new-tokens: must be an integer >= 1"),
    (["--model", "M", "--top-p", "1.5"], "argument --top-p: must be a number > 0 and <= 1"),
    (["--model", "M", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    ([], "--model is required"),
])
def test_eval_flags(argv, message, capsys):
    code, err = fails(evaluation.main, argv, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_eval_refuses_other_settings_and_bad_data(tiny_llama, tmp_path, capsys):
    out = tmp_path / "e"
    base = ["--model", tiny_llama, "--data", "gsm8k", "--limit", "2", "--max-new-tokens", "8", "--out", str(out)]
    s = evaluation.main(base)
    assert s["n_samples"] == 2 and s["tokens_per_s"] > 0
    saved = (out / "args.json").read_text()
    capsys.readouterr()
    code, err = fails(evaluation.main, [*base, "--max-new-tokens", "16", "--prompt", "boxed"], capsys)
    assert code == 1 and len(err) == 1
    assert "--max-new-tokens 8 -> 16" in err[0] and "--prompt 'paper' -> 'boxed'" in err[0], err
    assert (out / "args.json").read_text() == saved  # nothing rewritten
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = fails(evaluation.main, ["--model", tiny_llama, "--data", str(empty), "--out", str(tmp_path / "x")], capsys)
    assert code == 1 and err == [f"error: {empty}: no problems to evaluate"] and not (tmp_path / "x").exists()
    other = tmp_path / "o"
    evaluation.main(["--model", tiny_llama, "--data", "math500", "--limit", "2", "--max-new-tokens", "8", "--out", str(other)])
    capsys.readouterr()
    code, err = fails(evaluation.main, ["--compare", str(out), str(other)], capsys)
    assert code == 1 and len(err) == 1 and "share no problems" in err[0]
    assert capsys.readouterr().out == ""  # no table printed before the error


@pytest.mark.parametrize("main,argv,message", [
    (bench.main, ["--batch", "0"], "argument --batch: must be an integer >= 1"),
    (bench.main, ["--measures", "speed"], "--measures takes sampling, prefill, train, rollout"),
    (bench.main, ["--device", "tpu"], "--device tpu: expected cpu, or cuda"),
    (verifier.main, ["f.jsonl", "--timeout", "0"], "argument --timeout: must be a number > 0"),
    (verifier.main, ["f.jsonl", "--workers", "0"], "argument --workers: must be an integer >= 1"),
])
def test_bench_and_verifier_flags(main, argv, message, capsys):
    code, err = fails(main, argv, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_verifier_file_errors(tmp_path, capsys):
    code, err = fails(verifier.main, [str(tmp_path / "none.jsonl")], capsys)
    assert code == 1 and err == [f"error: {tmp_path / 'none.jsonl'} not found"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "1", "answer": "1"}\n{oops\n')
    code, err = fails(verifier.main, [str(bad)], capsys)
    assert code == 1 and len(err) == 1 and f"{bad}:2: not valid JSON" in err[0]


def cmd(script, *argv, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_no_traceback_unless_rlsp_debug(tmp_path):
    p = cmd("train.py", "--stage", "sft", "--model", str(tmp_path / "nope"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.strip().splitlines() == [f"error: model folder {str(tmp_path / 'nope')!r} does not exist"]
    p = cmd("train.py", "--stage", "sft", "--model", str(tmp_path / "nope"), env=dict(os.environ, RLSP_DEBUG="1"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" in err and "FileNotFoundError" in err


def wait_for(predicate, proc, seconds=300):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)


def test_ctrl_c_says_what_was_kept(tiny_llama, tmp_path):
    out = tmp_path / "e"
    p = cmd("eval.py", "--model", tiny_llama, "--data", "gsm8k", "--limit", "200", "--max-new-tokens", "120",
            "--batch-size", "4", "--out", str(out))
    wait_for(lambda: (out / "samples.jsonl").exists() and (out / "samples.jsonl").read_text().count("\n") >= 4, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert p.returncode == 130 and "Traceback" not in err
    assert last == f"interrupted: finished batches are kept in {out / 'samples.jsonl'}; rerun the same command to continue"

    run = tmp_path / "t"
    p = cmd("train.py", "--model", tiny_llama, "--data", "math_train", "--limit", "200", "--heldout", "4",
            "--seq-len", "128", "--batch-size", "4", "--max-steps", "1000", "--save-every", "1", "--eval-every", "0",
            "--out", str(run))
    # any finished checkpoint (with --save-every 1 and --keep 2 each one lives only a few steps)
    wait_for(lambda: run.exists() and any(d.name.startswith("step-") and not d.name.endswith(".tmp")
                                          for d in run.iterdir()), p)
    time.sleep(0.5)  # past the instant between a checkpoint's rename and the note naming it
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert p.returncode == 130 and "Traceback" not in err
    assert last.startswith(f"interrupted: the last checkpoint is {run}{os.sep}step-0") and last.endswith(
        "rerun the same command with --resume to continue")
