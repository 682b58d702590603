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
    (["--model", "M", "--device", "tpu"], "--device must be cpu, cuda or cuda:N (got 'tpu')"),
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
    code, err = fails(evaluation.main, [*base[:5], "3", *base[6:], "--dtype", "bfloat16"], capsys)  # more problems
    assert code == 1 and err == [f"error: {out} holds samples drawn in float32; this run would sample in bfloat16 "
                                 f"(--dtype bfloat16): pass --dtype float32 to resume it, or choose another --out"], err
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
    (bench.main, ["--device", "tpu"], "--device must be cpu, cuda or cuda:N (got 'tpu')"),
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


def test_tiny_run_tries_a_flag_in_seconds(tmp_path):
    """The README's "Change it" command: a 2-layer model and synthetic data, two RL steps with the flags
    given, each step's line printed; nothing downloaded (RLSP_DATA_DIR unset)."""
    env = {k: v for k, v in os.environ.items() if k != "RLSP_DATA_DIR"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--tiny", "--stage", "rl", "--advantage", "rloo",
                        "--loss-agg", "seq-mean-token-mean", "--out", str(tmp_path / "t")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [line for line in (p.stdout + p.stderr).splitlines() if line.lstrip().startswith("step ")]
    assert [s.split("|")[0].split()[1] for s in steps] == ["1", "2"], p.stdout
    saved = json.load(open(tmp_path / "t" / "rl" / "args.json"))
    assert saved["advantage"] == "rloo" and saved["loss_agg"] == "seq-mean-token-mean" and saved["max_steps"] == 2
    assert os.path.isfile(tmp_path / "t" / "rl" / "final" / "model.safetensors")


def test_tiny_refuses_a_model(capsys):
    code, err = fails(train.main, ["--tiny", "--model", "M"], capsys)
    assert code == 2 and len(err) == 1 and "--tiny builds its own model" in err[0], err


# ----------------------------------------------------------------------------- a newcomer's first hour

RL_RUN = ["--stage", "rl", "--data", "gsm8k", "--limit", "8", "--prompts-per-step", "2", "--group-size", "2",
          "--max-new-tokens", "8", "--temperature", "1.0", "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "0",
          "--save-every", "1"]


def test_a_finished_run_is_extended_only_when_asked(tiny_llama, tmp_path, capsys):
    """--max-steps 2 -> 3 on --resume: refused, saying why (the schedule) and what to do instead; with
    --extend the run goes on, its learning rate at the floor its schedule ended on."""
    base = ["--model", tiny_llama, *RL_RUN, "--out", str(tmp_path / "r")]
    train.main([*base, "--max-steps", "2", "--min-lr-ratio", "0.25"])
    capsys.readouterr()
    code, err = fails(train.main, [*base, "--max-steps", "3", "--min-lr-ratio", "0.25", "--resume"], capsys)
    assert code == 1 and len(err) == 1, err
    assert "--max-steps 2 -> 3: the learning-rate schedule" in err[0] and "add --extend" in err[0]
    assert f"start a new run from {tmp_path / 'r' / 'final'} with another --out" in err[0]
    code, err = fails(train.main, [*base, "--max-steps", "2", "--min-lr-ratio", "0.25", "--resume", "--extend"], capsys)
    assert code == 1 and "--max-steps 2 must be more than the run's 2" in err[0]
    code, err = fails(train.main, [*base, "--max-steps", "3", "--extend"], capsys)
    assert code == 2 and "--extend continues a finished run: use it with --resume" in err[0]
    train.main([*base, "--max-steps", "3", "--min-lr-ratio", "0.25", "--resume", "--extend"])
    rows = train.read_metrics(str(tmp_path / "r" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["lr"] == pytest.approx(0.25e-3)
    assert json.load(open(tmp_path / "r" / "args.json"))["schedule_steps"] == 2


def test_eval_limit_grows_into_a_finished_folder(tiny_llama, tmp_path, capsys):
    out = tmp_path / "e"
    base = ["--model", tiny_llama, "--data", "gsm8k", "--max-new-tokens", "8", "--batch-size", "3", "--out", str(out)]
    evaluation.main([*base, "--limit", "4"])
    first = {s["id"]: s for s in evaluation.read_samples(out)}
    s = evaluation.main([*base, "--limit", "6"])
    now = {s["id"]: s for s in evaluation.read_samples(out)}
    assert len(now) == 6 and s["n_problems"] == 6 and all(now[k] == v for k, v in first.items())
    alone = evaluation.main([*base[:-1], str(tmp_path / "fresh"), "--limit", "6"])  # greedy: as a fresh run
    assert alone["accuracy"] == s["accuracy"] and alone["mean_length"] == s["mean_length"]
    capsys.readouterr()
    evaluation.main([*base, "--limit", "6"])
    out_text = capsys.readouterr()
    assert f"{out} is complete: all 6 problems x 1 samples were evaluated" in out_text.out
    assert "it/s" not in out_text.err  # no progress bar over nothing
    code, err = fails(evaluation.main, [*base, "--limit", "5"], capsys)
    assert code == 1 and "--limit 6 -> 5" in err[0] and "a larger --limit adds problems" in err[0]


def test_a_step_that_trained_nothing_says_why(tiny_llama, tmp_path):
    """Every answer cut off at 2 tokens: all wrong, all truncated, each group's rewards equal: the step
    line shows the equal groups and a warning says why nothing was learned; and a --max-steps shorter
    than the warm-up is announced at the start."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", tiny_llama, *RL_RUN,
                        "--max-new-tokens", "2", "--exploration", "none", "--max-steps", "1", "--warmup-steps", "20",
                        "--out", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("rl: ")  # no blank lines before the first
    assert any("warning: --max-steps 1 ends before the --warmup-steps 20 do" in x for x in lines)
    step = next(x for x in lines if x.startswith("step "))
    assert "zero_variance_groups 2" in step and "grad_norm 0.0000" in step
    assert any(x.startswith("warning: step 1 trained nothing: each group's rewards were all equal, so every "
                            "advantage was 0: every response was cut off at --max-new-tokens") for x in lines), lines


def test_errors_name_the_real_cause(tiny_llama, tmp_path, capsys):
    rows = tmp_path / "qa.jsonl"
    rows.write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2", "a": "4"}\n')
    for argv, message in (
            (["--data", "gsm8k", "--data-dir", str(tmp_path / "dat")], f"error: --data-dir {tmp_path / 'dat'}: no such folder"),
            (["--data", str(tmp_path / "missing.jsonl")], f"error: {tmp_path / 'missing.jsonl'}: no such file"),
            (["--data", str(rows)], "no 'problem' field; the row has 'q', 'a'. Each row needs a problem and its "
                                    "answer: name their fields with --problem-field and --answer-field")):
        code, err = fails(train.main, ["--stage", "rl", "--model", tiny_llama, "--out", str(tmp_path / "o"), *argv], capsys)
        assert code == 1 and len(err) == 1 and message in err[0], err
    train.main(["--model", tiny_llama, *RL_RUN, "--data", str(rows), "--problem-field", "q", "--answer-field", "a",
                "--max-steps", "1", "--out", str(tmp_path / "ok")])
    capsys.readouterr()
    code, err = fails(evaluation.main, ["--model", tiny_llama, "--data", str(rows), "--out", str(tmp_path / "e")], capsys)
    assert code == 1 and "--problem-field and --answer-field" in err[0] and "skip_missing" not in err[0]


@pytest.mark.parametrize("argv,message", [
    (["--stage", "rl", "--prompt-field", "q"], "--prompt-field is a flag of the SFT stage; --stage rl does not use it"),
    (["--stage", "sft", "--group-size", "4"], "--group-size is a flag of the RL stage; --stage sft does not use it"),
    (["--stage", "sft", "--problem-field", "q"], "--problem-field is a flag of the RL stage"),
])
def test_a_flag_of_the_other_stage_is_refused(tiny_llama, argv, message, capsys):
    code, err = fails(train.main, ["--model", tiny_llama, *argv], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("main", [train.main, evaluation.main, bench.main, verifier.main])
def test_help_shows_one_default_for_every_flag(main, capsys):
    """Every flag's help ends with one "(default: ...)": its value, or what the help says it depends on."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    blocks, current = [], None
    for line in options.splitlines():
        if line.startswith("  -"):
            current = [line]
            blocks.append(current)
        elif current is not None and line.startswith("      "):
            current.append(line)
        else:
            current = None
    flags = [b for b in blocks if not b[0].lstrip().startswith("-h, --help")]
    assert len(flags) > 5
    for b in flags:
        assert " ".join(b).count("(default") == 1, b


def test_the_run_figure_shows_what_the_run_has():
    """Reward parts on panels of their own (the exploration term's scale would flatten the rest), and a
    panel whose series are zero throughout is left out."""
    rows = [{"step": s, "reward": 0.1 * s, "outcome": 0.2, "exploration": -11.0 + s, "reward_kl": 0.0, "overlong": 0.0,
             "clip_frac": 0.0, "accuracy": 0.5, "loss": 1.0, "lr": 1e-5} for s in (1, 2, 3)]
    panels = dict(train.panels_for(rows))
    assert panels["reward and outcome"] == ["reward", "outcome"] and panels["exploration reward R_ex"] == ["exploration"]
    assert "penalties" not in panels and "clip fraction" not in panels
    rows[1]["reward_kl"], rows[2]["clip_frac"] = -0.01, 0.05
    panels = dict(train.panels_for(rows))
    assert panels["penalties"] == ["reward_kl"] and panels["clip fraction"] == ["clip_frac"]
