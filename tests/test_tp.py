"""`--tp N`: sampling from a copy of the policy split over groups of N ranks (tp.py), on CPU with gloo:
greedy tokens equal to the whole model's for Llama, Qwen2 (fewer KV heads than ranks) and Qwen3, the
same draws on every rank of a group, an RL step with --fsdp --tp 2 (and --offload) equal to --fsdp alone, its checkpoint
loading in transformers, bad combinations refused at start, and a two-node launch on loopback."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = ["--stage", "rl", "--data", "gsm8k", "--limit", "16", "--prompts-per-step", "1", "--group-size", "4",
      "--max-new-tokens", "24", "--temperature", "30", "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "0",
      "--micro-batch-tokens", "200", "--save-every", "100"]


def torchrun(*argv, nproc=4, launcher=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", *(launcher or ["--standalone"]), "--nproc_per_node",
           str(nproc), *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,  # a hang guard only
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_split_sampler_draws_what_the_whole_model_draws(tiny_llama, tiny_qwen, tiny_qwen3):
    """4 processes: two groups of 2, each sampling its own prompts (one group alone is the 2-process case)."""
    p = torchrun(os.path.join(ROOT, "tests", "dist_worker.py"), "tp_sampling", ",".join((tiny_llama, tiny_qwen, tiny_qwen3)))
    assert p.returncode == 0 and "ok tp_sampling" in p.stdout, p.stderr[-3000:]


def test_rl_step_with_tp_equals_fsdp_alone(tiny_llama, tmp_path):
    """4 processes, FSDP over all of them: the same 2 RL steps with the sampler whole on every rank, split
    over groups of 2 (each member's problems sampled in turn with its own seed), and split with the shards,
    gradients and AdamW state offloaded (--offload: on CPU the same memory, but FSDP2's offload path, the
    optimizer on the offloaded shards and the copy gathered from them): the same rewards, losses and
    weights; the checkpoint loads in transformers."""
    from transformers import AutoModelForCausalLM
    from model import Transformer
    common = [os.path.join(ROOT, "train.py"), *RL, "--model", tiny_llama, "--max-steps", "2", "--fsdp"]
    runs = (("fsdp", []), ("tp", ["--tp", "2"]), ("offload", ["--tp", "2", "--offload"]))
    for name, extra in runs:
        p = torchrun(*common, *extra, "--out", str(tmp_path / name))
        assert p.returncode == 0, p.stderr[-3000:]
    rows = {k: [json.loads(x) for x in open(tmp_path / k / "metrics.jsonl")] for k, _ in runs}
    for name in ("tp", "offload"):
        for key in ("reward", "loss", "grad_norm", "mean_length"):
            assert [r[key] for r in rows[name]] == pytest.approx([r[key] for r in rows["fsdp"]], rel=1e-4, abs=1e-6), \
                (name, key)
        a, b = load_file(tmp_path / "fsdp" / "final" / "model.safetensors"), \
            load_file(tmp_path / name / "final" / "model.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a), name
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tp" / "final"), dtype=torch.float32).eval()
    ids = torch.randint(0, 700, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(Transformer.from_pretrained(str(tmp_path / "tp" / "final"))(ids), ref(ids).logits, atol=1e-4)


def test_bad_tp_combinations_are_refused_at_start(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", tiny_llama, *RL, "--tp", "2", "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "--tp 2 splits the sampler over the processes of torchrun" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--tp 3 must divide the 4 attention heads"):
        train.main(["--model", tiny_llama, *RL, "--tp", "3", "--dry-run", "--dry-run-gpus", "6"])
    p = torchrun(os.path.join(ROOT, "train.py"), "--model", tiny_llama, *RL, "--tp", "4", "--out", str(tmp_path / "b"),
                 nproc=2)
    assert p.returncode != 0 and "error: rank 0: --tp 4 must divide the number of processes (2)" in p.stderr
    with pytest.raises(SystemExit) as e:
        train.main(["--model", tiny_llama, *RL, "--offload", "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "--offload moves FSDP's shards to CPU memory: add --fsdp" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main(["--model", tiny_llama, *RL, "--tp", "2", "--compile", "--dry-run", "--dry-run-gpus", "2"])
    assert e.value.code == 2 and "--compile covers the whole-model sampler only" in capsys.readouterr().err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback(tiny_llama, tmp_path):
    """The README's two-node command, as two launchers on this machine: --nnodes 2, a c10d rendezvous on
    loopback, 2 processes each; one RL step with --fsdp --tp 2 (each TP group inside a node)."""
    port = free_port()
    argv = [os.path.join(ROOT, "train.py"), *RL, "--model", tiny_llama, "--max-steps", "1", "--fsdp", "--tp", "2",
            "--out", str(tmp_path / "run")]
    launcher = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                f"rlsp-{port}"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", "2",
                               *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(2)]
    outs = [n.communicate(timeout=900) for n in nodes]  # a hang guard only
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 1 and rows[0]["tokens"] > 0


def test_dry_run_plans_the_32b_recipe(tmp_path, capsys):
    """Qwen2.5-32B-Instruct's shapes, the README's 32B recipe: with --tp 8 it plans under 90% of an 80 GB card
    on 16 GPUs; on 8 only with --offload, whose state moves to CPU memory (16 bytes a parameter, 20 with the
    KL term's reference, / 8 per GPU)."""
    qwen32b = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 5120,
               "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
               "num_key_value_heads": 8, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
               "rope_theta": 1000000.0, "tie_word_embeddings": False}
    os.makedirs(tmp_path / "m")
    json.dump(qwen32b, open(tmp_path / "m" / "config.json", "w"))
    recipe = ["--stage", "rl", "--model", str(tmp_path / "m"), "--max-new-tokens", "4096", "--micro-batch-tokens", "8192",
              "--group-size", "1", "--prompts-per-step", "16", "--advantage", "reinforce", "--reward-form", "code",
              "--exploration", "length", "--kl-coef", "0.05", "--kl-placement", "reward", "--grad-checkpointing",
              "--dry-run", "--fsdp", "--tp", "8"]
    limit = (1 - train.MARGIN) * train.CARDS["80 GB"] * 2 ** 30
    assert train.dry_run(train.parse_args([*recipe, "--dry-run-gpus", "16"]), 1) < limit
    assert train.dry_run(train.parse_args([*recipe, "--dry-run-gpus", "8"]), 1) > limit
    capsys.readouterr()
    offloaded = train.dry_run(train.parse_args([*recipe, "--dry-run-gpus", "8", "--offload"]), 1)
    out = capsys.readouterr().out
    from model import Config, parameter_count
    n = parameter_count(Config.from_pretrained(str(tmp_path / "m")))
    assert offloaded < limit and "a 80 GB card (79.1 GiB): fits" in out
    assert f"in CPU memory (--offload): {20 * n / 8 / 2 ** 30:.1f} GiB per GPU" in out
    assert "weights (fp32)" not in out and "AdamW moments" not in out and "reference model" not in out
