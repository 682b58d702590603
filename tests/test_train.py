"""train.py (SFT): loss goes down, the masked loss by hand, exact resume after SIGKILL, torchrun parity,
checkpoints that transformers loads, the NaN stop and bad-input errors, dry-run and plots."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from data import pack, prompt_messages, sft_example
from model import Config, Tokenizer, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--data", "math_train", "--limit", "120", "--heldout", "12", "--seq-len", "192", "--batch-size", "8",
         "--micro-batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "0"]


def args_for(model, out, *extra):
    return ["--model", model, "--out", str(out), *SMALL, *extra]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_sft_lowers_heldout_loss(tiny_llama, tmp_path):
    train.main(args_for(tiny_llama, tmp_path / "run", "--max-steps", "16", "--eval-every", "8", "--save-every", "8"))
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 17))
    held = [r["heldout_loss"] for r in rows if "heldout_loss" in r]
    assert len(held) == 2
    tok = Tokenizer.from_pretrained(tiny_llama)
    args = train.parse_args(args_for(tiny_llama, tmp_path / "x"))
    _, heldout_rows = train.build_rows(args, tok)
    before = train.heldout_loss(Transformer.from_pretrained(tiny_llama, device="cpu"), heldout_rows, args,
                                torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert held[-1] < before - 0.5, (before, held)
    assert sorted(os.listdir(tmp_path / "run")).count("final") == 1
    assert os.path.isfile(tmp_path / "run" / "curves.png")


def test_masked_loss_equals_hand_computation(tiny_qwen):
    """Two examples packed in one row: the batch loss is the mean NLL over assistant tokens only,
    each example computed alone (so packing leaks nothing across examples)."""
    tok = Tokenizer.from_pretrained(tiny_qwen)
    model = Transformer.from_pretrained(tiny_qwen, device="cpu")
    ex = [sft_example(tok, prompt_messages("What is 2+3?"), "2 + 3 = 5, so $\\boxed{5}$."),
          sft_example(tok, prompt_messages("Name a prime."), "7 is prime.")]
    rows = pack(ex, 256, tok.pad_token_id)
    assert len(rows) == 1
    batch = train.to_batch(rows, torch.device("cpu"))
    with torch.no_grad():
        nll = train.token_losses(model, batch, torch.autocast("cpu", enabled=False))
        ours = ((nll * batch[2]).sum() / batch[2].sum()).item()
        total, count = 0.0, 0
        for ids, mask in ex:
            logp = model(torch.tensor([ids]))[0].log_softmax(-1)
            for t in range(1, len(ids)):
                if mask[t]:
                    total -= logp[t - 1, ids[t]].item()
                    count += 1
    assert batch[2].sum().item() == count == sum(sum(m[1:]) for _, m in ex)
    assert ours == pytest.approx(total / count, rel=1e-5)


def run_cli(argv, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_sigkill_is_bit_identical(tiny_llama, tmp_path):
    common = ["--max-steps", "8", "--save-every", "2", "--keep", "3"]
    train.main(args_for(tiny_llama, tmp_path / "straight", *common))
    p = run_cli(args_for(tiny_llama, tmp_path / "killed", *common))
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    steps_done = len(log.read_text().splitlines())
    assert 5 <= steps_done < 8, "the kill should land mid-run"
    p = run_cli(args_for(tiny_llama, tmp_path / "killed", *common, "--resume"))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert "resumed from" in out
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "killed" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x)["loss"] for x in open(tmp_path / "straight" / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(log)]
    assert la == lb


def test_interrupted_save_leaves_previous_checkpoint(tiny_llama, tmp_path):
    """A kill while writing step-000004 leaves step-000004.tmp half-written; resume uses step-000002."""
    out = tmp_path / "run"
    train.main(args_for(tiny_llama, out, "--max-steps", "2", "--save-every", "2"))
    partial = out / "step-000004.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 100)  # a torn write
    assert train.checkpoints(str(out)) == ["step-000002"]
    args = train.parse_args(args_for(tiny_llama, out, "--max-steps", "2", "--save-every", "2", "--resume"))
    assert train.check_run_folder(args) == str(out / "step-000002")
    Transformer.from_pretrained(str(out / "step-000002"), device="cpu")


def test_torchrun_two_processes_match_one(tiny_llama, tmp_path):
    common = ["--max-steps", "4", "--save-every", "100"]
    train.main(args_for(tiny_llama, tmp_path / "one", *common))
    # --standalone: a rendezvous on a free local port, so two test runs on one machine cannot collide
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train.py"), *args_for(tiny_llama, tmp_path / "two", *common)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    la = [json.loads(x)["loss"] for x in open(tmp_path / "one" / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-5)
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


@pytest.mark.parametrize("fixture", ["tiny_qwen", "tiny_qwen3"])
def test_checkpoint_loads_in_transformers(fixture, tmp_path, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tiny_qwen = request.getfixturevalue(fixture)
    train.main(args_for(tiny_qwen, tmp_path / "run", "--max-steps", "2", "--save-every", "2"))
    for folder in ("step-000002", "final"):
        path = str(tmp_path / "run" / folder)
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ours = Transformer.from_pretrained(path, device="cpu")
        ids = torch.randint(0, 700, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(ours(ids), ref(ids).logits, atol=1e-4)
        AutoTokenizer.from_pretrained(path)
    trained, start = weights(tmp_path / "run" / "final"), weights(tiny_qwen)
    assert not torch.equal(trained["model.norm.weight"], start["model.norm.weight"])


def wandb_history(run_file):
    """The history rows (step -> {key: value}) of an offline wandb run file: W&B's record log (a 7-byte
    header, then 32 KiB blocks of records, each crc32 / length / type, split over blocks as FIRST, MIDDLE
    and LAST parts), each record a protobuf `Record`."""
    import struct
    from wandb.proto import wandb_internal_pb2
    data, rows, pos, part = open(run_file, "rb").read(), {}, 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows[record.history.step.num] = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                                 for i in record.history.item}
    return rows


def test_wandb_offline_and_tensorboard_log_the_metrics_rows(tiny_llama, tmp_path):
    """--wandb (offline mode) and --tensorboard receive every row of metrics.jsonl at its step, read back
    with each tool's own reader / files; --resume continues the same wandb run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
    argv = [sys.executable, "train.py", "--stage", "sft", *args_for(tiny_llama, out, "--max-steps", "3", "--save-every", "2",
                                                                   "--wandb", "rlsp-test", "--tensorboard")]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "grad_norm", "lr", "tokens_per_s"):
        assert [e.step for e in events.Scalars(key)] == [1, 2, 3]
        assert [e.value for e in events.Scalars(key)] == pytest.approx([r[key] for r in rows], rel=1e-6)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    run_id = open(out / "wandb-id").read().strip()
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    history = wandb_history(runs[0] / f"run-{run_id}.wandb")
    assert sorted(history) == [1, 2, 3]
    for r in rows:
        assert {k: history[r["step"]][k] for k in ("loss", "grad_norm", "lr")} == \
            pytest.approx({k: r[k] for k in ("loss", "grad_norm", "lr")}, rel=1e-12)
    import shutil
    shutil.rmtree(out / "step-000003")
    p = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=env, cwd=ROOT)  # from step 2
    assert p.returncode == 0, p.stderr[-2000:]
    runs = sorted((out / "wandb").glob("offline-run-*"))  # offline, each process writes its own folder
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    assert sorted(wandb_history(runs[1] / f"run-{run_id}.wandb")) == [3]


def test_tracking_flags_name_the_missing_package(tiny_llama, tmp_path, monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        train.main(args_for(tiny_llama, tmp_path / "run", "--wandb", "proj"))
    assert e.value.code == 2 and "--wandb needs the wandb package: pip install wandb" in capsys.readouterr().err


def test_nan_stops_with_step_and_keeps_checkpoint(tiny_llama, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step \d+ .* Last good checkpoint: .*step-000001"):
        train.main(args_for(tiny_llama, tmp_path / "run", "--max-steps", "20", "--save-every", "1", "--lr", "1e20",
                            "--warmup-steps", "1", "--grad-clip", "1e30"))
    good = train.checkpoints(str(tmp_path / "run"))
    assert good and all(torch.isfinite(t).all() for t in weights(tmp_path / "run" / good[0]).values())


def test_bad_inputs(tiny_llama, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"0 demonstrations, but --heldout 12"):
        train.main(["--model", tiny_llama, "--out", str(tmp_path / "a"), "--data", str(empty), "--heldout", "12"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "response": "2"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        train.main(["--model", tiny_llama, "--out", str(tmp_path / "b"), "--data", str(bad)])
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        train.main(["--model", str(tmp_path), "--out", str(tmp_path / "c"), "--data", str(bad)])
    run = tmp_path / "run"
    train.main(args_for(tiny_llama, run, "--max-steps", "1", "--save-every", "1"))
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        train.main(args_for(tiny_llama, run, "--max-steps", "1"))
    with pytest.raises(ValueError, match=r"differ from the run .*--lr 0.003 -> 0.1"):
        train.main(args_for(tiny_llama, run, "--max-steps", "1", "--resume", "--lr", "0.1"))
    with pytest.raises(FileNotFoundError, match="holds no run"):
        train.main(args_for(tiny_llama, tmp_path / "new", "--resume"))


def test_dry_run_memory(tmp_path, capsys):
    """Llama-3.1-8B's real shapes: fp32 AdamW does not fit one 80 GB card."""
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    train.main(["--model", str(tmp_path), "--dry-run", "--micro-batch-size", "1", "--seq-len", "4096", "--grad-checkpointing"])
    out = capsys.readouterr().out
    assert "8.03B parameters" in out and "a 80 GB card (79.1 GiB): does not fit" in out
    n, parts = train.memory_estimate(Config.from_dict(cfg), train.parse_args(["--model", str(tmp_path), "--micro-batch-size", "1"]))
    assert parts["AdamW moments (fp32)"] == 8 * n and n == 8_030_261_248  # Llama-3.1-8B's published count


def test_plot_needs_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        train.plot(str(tmp_path))


def test_resume_reads_only_data_from_a_run_folder(tiny_llama, tmp_path):
    """trainer.pt is loaded weights-only: a checkpoint someone else wrote cannot run code on --resume."""
    common = args_for(tiny_llama, tmp_path / "run", "--max-steps", "2", "--save-every", "1")
    train.main(common)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"step": 1, "payload": Payload()}, tmp_path / "run" / "step-000002" / "trainer.pt")
    with pytest.raises(ValueError, match="step-000002/trainer.pt: cannot read it as trainer state"):
        train.main([*common, "--resume"])
    assert not (tmp_path / "pwned").exists()


def test_metrics_survive_a_cut_last_line_and_name_a_bad_one(tiny_llama, tmp_path):
    common = args_for(tiny_llama, tmp_path / "run", "--max-steps", "2", "--save-every", "1")
    train.main(common)
    log = tmp_path / "run" / "metrics.jsonl"
    rows = log.read_text().splitlines()
    log.write_text("\n".join(rows) + "\n" + rows[-1][:20])  # a kill while a row was being written
    assert [r["step"] for r in train.read_metrics(str(log))] == [1, 2]
    train.main([*common, "--max-steps", "2", "--resume"])
    assert log.read_text().endswith("\n") and [r["step"] for r in train.read_metrics(str(log))] == [1, 2]
    log.write_text(rows[0] + "\nnot json\n" + rows[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics row"):
        train.read_metrics(str(log))
