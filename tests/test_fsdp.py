"""`torchrun train.py --fsdp` on CPU with gloo, 2 processes: SFT equals one process on the same global
batch, RL equals the same run without sharding (DDP), a SIGKILLed run resumes to the same weights,
checkpoints load in transformers, a failing rank stops every rank with a line naming it, and --dry-run
plans the sharded memory."""
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
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = ["--data", "math_train", "--limit", "120", "--heldout", "12", "--seq-len", "192", "--batch-size", "8",
       "--micro-batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "0"]
# At temperature 30 the tiny model's draws are nearly uniform: some responses hit a stop token early, so
# lengths and length rewards differ, some groups have rewards that all agree (skipped), and the ranks run
# different numbers of micro-batches.
RL = ["--stage", "rl", "--data", "gsm8k", "--limit", "16", "--prompts-per-step", "2", "--group-size", "4",
      "--max-new-tokens", "40", "--temperature", "30", "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "0",
      "--micro-batch-tokens", "200"]


def torchrun(*argv, popen=False):
    # --standalone: a rendezvous on a free local port, so two test runs on one machine cannot collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *argv]
    kw = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
              env=dict(os.environ, OMP_NUM_THREADS="1"))
    if popen:
        return subprocess.Popen(cmd, start_new_session=True, **kw)  # its own group: SIGKILL reaches every rank
    p = subprocess.run(cmd, timeout=900, **kw)  # a hang guard, not a speed limit
    return p


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def losses(run):
    return [json.loads(x)["loss"] for x in open(run / "metrics.jsonl")]


def test_fsdp_sft_matches_one_process_and_loads_in_transformers(tiny_qwen, tmp_path):
    from transformers import AutoModelForCausalLM
    common = ["--model", tiny_qwen, *SFT, "--max-steps", "4", "--save-every", "2"]
    train.main([*common, "--out", str(tmp_path / "one")])
    p = torchrun(*common, "--fsdp", "--out", str(tmp_path / "two"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    # the sharded checkpoint: an HF folder (gathered), the shards of weights + AdamW, one random state per rank
    step = tmp_path / "two" / "step-000004"
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer.pt", "rng-0.pt", "rng-1.pt",
            "sharded"} <= set(os.listdir(step))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two" / "final"), dtype=torch.float32).eval()
    ids = torch.randint(0, 700, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(Transformer.from_pretrained(str(step), device="cpu")(ids), ref(ids).logits, atol=1e-4)


@pytest.mark.parametrize("extra", [[], ["--kl-coef", "0.05", "--kl-placement", "reward", "--minibatches", "2"]],
                         ids=["no-kl", "kl-in-reward"])
def test_fsdp_rl_matches_ddp(tiny_llama, tmp_path, extra):
    """The same RL run (2 ranks, fixed seed, ranks sampling their own problems) with the weights sharded
    and replicated: the same rewards, losses and final weights. Tiny micro-batches make the ranks run
    different numbers of passes, which FSDP must even out; with a KL term the sharded reference and the
    old log-prob pass run too."""
    common = [*RL, "--model", tiny_llama, "--max-steps", "3", "--save-every", "100", *extra]
    p = torchrun(*common, "--out", str(tmp_path / "ddp"))
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun(*common, "--fsdp", "--out", str(tmp_path / "fsdp"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {k: [json.loads(x) for x in open(tmp_path / k / "metrics.jsonl")] for k in ("ddp", "fsdp")}
    for key in ("reward", "loss", "grad_norm", "mean_length", "computed_fraction", *(["kl"] if extra else [])):
        assert [r[key] for r in rows["fsdp"]] == pytest.approx([r[key] for r in rows["ddp"]], rel=1e-4, abs=1e-6)
    a, b = weights(tmp_path / "ddp" / "final"), weights(tmp_path / "fsdp" / "final")
    start = load_file(os.path.join(tiny_llama, "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the run trained
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_fsdp_resume_after_sigkill_matches_a_straight_run(tiny_llama, tmp_path):
    common = ["--model", tiny_llama, *SFT, "--max-steps", "6", "--save-every", "2", "--keep", "3", "--fsdp"]
    p = torchrun(*common, "--out", str(tmp_path / "straight"))
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun(*common, "--out", str(tmp_path / "killed"), popen=True)
    deadline = time.time() + 600
    while time.time() < deadline and not train.checkpoints(str(tmp_path / "killed")):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = train.checkpoints(str(tmp_path / "killed"))
    assert done and "step-000006" not in done, "the kill should land mid-run"
    p = torchrun(*common, "--out", str(tmp_path / "killed"), "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "killed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")


def test_a_failing_rank_stops_every_rank_naming_it(tiny_llama, tmp_path):
    """Rank 1's random state is corrupt: it stops with one line naming the rank and the file, and rank 0,
    waiting for it in a collective, is stopped too (torchrun ends the group), never left hanging."""
    common = ["--model", tiny_llama, *SFT, "--max-steps", "4", "--save-every", "2", "--fsdp",
              "--out", str(tmp_path / "run")]
    p = torchrun(*common)
    assert p.returncode == 0, p.stderr[-3000:]
    (tmp_path / "run" / "step-000004" / "rng-1.pt").write_bytes(b"not a checkpoint")
    p = torchrun(*common, "--resume")
    assert p.returncode != 0
    assert f"error: rank 1: {tmp_path / 'run' / 'step-000004' / 'rng-1.pt'}: cannot read this rank's random state" \
        in p.stderr


def test_fsdp_flags(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", tiny_llama, "--fsdp", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "--fsdp shards over the processes of torchrun" in capsys.readouterr().err


def test_dry_run_plans_fsdp_per_gpu(tmp_path, capsys):
    """Llama-3.1-8B shapes: SFT with DDP needs a 141 GB card; with FSDP over 8 GPUs each holds 1/8 of the
    fp32 weights, gradients and AdamW and fits 80 GB; the paper's RL recipe too."""
    llama8b = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
               "rope_theta": 500000.0, "tie_word_embeddings": False}
    os.makedirs(tmp_path / "m")
    json.dump(llama8b, open(tmp_path / "m" / "config.json", "w"))
    sft = ["--model", str(tmp_path / "m"), "--micro-batch-size", "1", "--seq-len", "8192", "--grad-checkpointing",
           "--dry-run"]
    ddp = train.dry_run(train.parse_args(sft), 8)
    sharded = train.dry_run(train.parse_args([*sft, "--fsdp", "--dry-run-gpus", "8"]), 1)
    gib = 2 ** 30
    assert ddp > 120 * gib and sharded < 0.25 * ddp
    out = capsys.readouterr().out
    assert "FSDP over 8 GPUs" in out and out.count("a 80 GB card (79.1 GiB): fits") == 1
    rl = ["--stage", "rl", "--model", str(tmp_path / "m"), "--prompts-per-step", "64", "--group-size", "1",
          "--advantage", "reinforce", "--max-new-tokens", "4096", "--kl-coef", "0.05", "--kl-placement", "reward",
          "--grad-checkpointing", "--dry-run", "--fsdp", "--dry-run-gpus", "8"]
    assert train.dry_run(train.parse_args(rl), 1) <= (1 - train.MARGIN) * train.CARDS["80 GB"] * gib
