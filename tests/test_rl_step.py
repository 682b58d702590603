"""The RL step as a user drives it (rlsp.py): micro-batched gradients equal the unsplit ones for every
loss aggregation, old and reference log-probs match the loss forward exactly (bf16 autocast too), the
bf16 rollout copy follows the policy, statistics average over what ran, the trained reward is the
logged one, bad flag combinations are refused, and --filter-solved survives --resume."""
import json
import os
import types

import pytest
import torch

import rlsp
import train
from data import load_dataset
from model import Config, Transformer, Tokenizer
from verifier import Verdict


def make_run(path, autocast=None):
    model = Transformer.from_pretrained(path, device="cpu").train()
    run = types.SimpleNamespace(model=model, ddp=model, tokenizer=Tokenizer.from_pretrained(path), rank=0, world=1,
                                device=torch.device("cpu"), judge=None, ref=None,
                                autocast=autocast or torch.autocast("cpu", enabled=False))
    run.rollout = rlsp.RolloutWeights(model, torch.float32)
    return run


def episodes_for(run, s, n_prompts=4, seed=0, rewards=None):
    eps = rlsp.rollout(run.model, run.tokenizer, load_dataset("gsm8k", limit=n_prompts), s, seed)
    for i, e in enumerate(eps):
        e.verdict = Verdict(False, None, "no_answer")
        e.rewards = {"total": rewards[i] if rewards else float(len(e.tokens) % 5)}
    return eps


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def capture(model, store):
    """An optimizer_step that records the accumulated gradient and applies nothing."""
    def step(loss):
        store.append((loss, grads(model)))
        model.zero_grad(set_to_none=True)
        return 0.0
    return step


def episode_batch(episodes):
    """Right-padded prompt + response ids, their targets, and a mask over the response positions."""
    T = max(len(e.prompt_ids) + len(e.tokens) for e in episodes)
    ids = torch.zeros(len(episodes), T, dtype=torch.long)
    mask = torch.zeros(len(episodes), T - 1, dtype=torch.bool)
    for i, e in enumerate(episodes):
        p, n = len(e.prompt_ids), len(e.tokens)
        ids[i, :p + n] = torch.tensor(e.prompt_ids + e.tokens)
        mask[i, p - 1:p - 1 + n] = True
    return ids[:, :-1], ids[:, 1:], mask


def reference_loss(model, episodes, adv, s):
    """The minibatch loss computed directly: one right-padded forward over every whole episode (prompt
    + response, no sharing), the PPO-clip loss at ratio 1, aggregated over the masked tokens by the
    textbook formula of each mode."""
    x, y, mask = episode_batch(episodes)
    logp = model(x, targets=y, temperature=s.temperature)
    keep = torch.tensor([e.finished or not s.overlong_filter for e in episodes])
    m = (mask & keep[:, None]).float()
    ratio = (logp - logp.detach()).exp()
    a = adv[:, None]
    per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - s.clip_low, 1 + s.clip_high) * a)
    if s.loss_agg == "token-mean":
        return (per_tok * m).sum() / m.sum()
    if s.loss_agg == "seq-mean-token-mean":
        return ((per_tok * m).sum(1)[keep] / m.sum(1)[keep]).mean()
    return (per_tok * m).sum() / (keep.sum() * s.max_new_tokens)


@pytest.mark.parametrize("fixture,agg,overlong", [
    ("tiny_llama", "token-mean", False), ("tiny_llama", "seq-mean-token-mean", False), ("tiny_llama", "constant", False),
    ("tiny_llama", "token-mean", True), ("tiny_llama", "seq-mean-token-mean", True), ("tiny_qwen3", "token-mean", False)])
def test_micro_batched_gradient_equals_unsplit(fixture, agg, overlong, request):
    """The update's gradient (micro-batches, each group's prompt computed once, the projection only at
    response positions) equals one padded forward over every whole episode."""
    run = make_run(request.getfixturevalue(fixture))
    s = rlsp.Settings(group_size=4, max_new_tokens=24, temperature=1.0, loss_agg=agg, overlong_filter=overlong,
                      micro_batch_tokens=60)
    eps = episodes_for(run, s, rewards=[1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 2.0, 1.0, 0.0, 0.0, 3.0, 0.0, 1.0, 0.0])
    if overlong:
        assert any(not e.finished for e in eps) and any(e.finished for e in eps)
    adv, zero_var = rlsp.advantages([e.rewards["total"] for e in eps], 4, "grpo")
    assert zero_var == 1 and adv[:4].tolist() == [0, 0, 0, 0]  # group 0 is skipped by the update
    plan = rlsp.update_plan(eps, s)
    assert len(plan) == 1 and len(plan[0]) > 3  # really split
    store = []
    stats = rlsp.update_policy(run, eps, plan, adv, None, None, s, capture(run.model, store))
    assert stats["computed_fraction"] < 1.0 and stats["updates"] == 1
    loss = reference_loss(run.model, eps, adv, s)
    loss.backward()
    ref = grads(run.model)
    assert store[0][0] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    for name, g in ref.items():
        got = store[0][1][name]
        assert (got - g).abs().max() <= 1e-5 * g.abs().max() + 1e-8, name


def test_old_and_reference_logprobs_match_the_loss_forward_in_bf16(tiny_llama):
    """Under bf16 autocast: with two minibatches and no update in between, every token's ratio is exactly 1
    (the old pass uses the loss's own forward and batch shapes), and KL to the reference (the same
    checkpoint, its Linear weights stored in bf16) is exactly 0, while the fp32 sampler's log-probs differ
    from the trainer's."""
    run = make_run(tiny_llama, torch.autocast("cpu", dtype=torch.bfloat16))
    run.ref = rlsp.reference_model(tiny_llama, "cpu", torch.bfloat16)  # bf16 Linear weights, fp32 embeddings
    assert run.ref.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert run.ref.model.embed_tokens.weight.dtype == torch.float32
    s = rlsp.Settings(group_size=4, max_new_tokens=24, temperature=1.0, minibatches=2, micro_batch_tokens=80,
                      clip_low=1e-7, clip_high=1e-7, kl_coef=0.1, kl_placement="loss")
    eps = episodes_for(run, s)
    plan = rlsp.update_plan(eps, s)
    old = rlsp.policy_logprobs(run, eps, plan, s)
    ref = rlsp.policy_logprobs(run, eps, plan, s, model=run.ref)
    assert all(torch.equal(a, b) for a, b in zip(old, ref))
    adv, _ = rlsp.advantages([e.rewards["total"] for e in eps], 4)
    stats = rlsp.update_policy(run, eps, plan, adv, old, ref, s, capture(run.model, []))
    assert stats["clip_frac"] == 0.0 and stats["kl"] == 0.0 and stats["updates"] == 2
    assert stats["logprob_gap"] > 1e-4  # the fp32 sampler vs the bf16 trainer: why the ratio uses the trainer's


def test_rollout_weights_bf16_copy_follows_the_policy(tiny_qwen):
    model = Transformer.from_pretrained(tiny_qwen, device="cpu").train()  # tied embeddings
    rw = rlsp.RolloutWeights(model, torch.bfloat16)
    copy = rw()
    assert copy is not model and copy.lm_head.weight is copy.model.embed_tokens.weight
    assert copy.inv_freq.dtype == torch.float32
    for (n, c), p in zip(copy.named_parameters(), model.parameters()):
        assert c.dtype == torch.bfloat16 and torch.equal(c, p.detach().to(torch.bfloat16)), n
    before = copy.model.layers[0].mlp.up_proj.weight.clone()
    assert rw() is copy and torch.equal(copy.model.layers[0].mlp.up_proj.weight, before)
    opt = train.make_optimizer(model, 1e-2)  # fused AdamW: no version counter moves, the step hook tells
    model.logprobs(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]])).sum().backward()
    opt.step()
    assert rw() is copy
    for (n, c), p in zip(copy.named_parameters(), model.parameters()):
        assert torch.equal(c, p.detach().to(torch.bfloat16)), n
    assert not torch.equal(copy.model.layers[0].mlp.up_proj.weight, before)
    assert rlsp.RolloutWeights(model, torch.float32)() is model  # fp32 (CPU): the policy itself


def test_ppo_epochs_and_minibatches_average_what_ran(tiny_llama):
    """5 episodes, --minibatches 4 -> 3 minibatches of 2, 2, 1 episodes; 2 PPO epochs -> 6 updates. The
    logged loss is the mean of the 6 minibatch losses and the KL the per-token mean (not a sum over passes)."""
    run = make_run(tiny_llama)
    run.ref = Transformer.from_pretrained(tiny_llama, device="cpu")
    with torch.no_grad():
        for p in run.ref.parameters():
            p.mul_(1.05)
    s = rlsp.Settings(group_size=1, advantage="reinforce", max_new_tokens=16, temperature=1.0, ppo_epochs=2,
                      minibatches=4, kl_coef=0.1, kl_placement="loss", kl_estimator="k3")
    eps = episodes_for(run, s, n_prompts=5)
    plan = rlsp.update_plan(eps, s)
    assert [sum(len(p) for p in parts) for parts in plan] == [2, 2, 1]
    old = rlsp.policy_logprobs(run, eps, plan, s)
    ref = rlsp.policy_logprobs(run, eps, plan, s, model=run.ref)
    adv, _ = rlsp.advantages([e.rewards["total"] for e in eps], 1, "reinforce")
    store = []
    stats = rlsp.update_policy(run, eps, plan, adv, old, ref, s, capture(run.model, store))
    assert stats["updates"] == len(store) == 6
    assert stats["loss"] == pytest.approx(sum(x for x, _ in store) / 6)
    kl = torch.cat([rlsp.kl_terms(o, r, "k3") for o, r in zip(old, ref)]).mean().item()
    assert kl > 1e-3 and stats["kl"] == pytest.approx(kl, rel=1e-4)


def test_logprob_gap_is_measured_before_any_update(tiny_llama):
    """With --minibatches 2 and a large step after the first minibatch, the logged sampler-trainer gap is
    still the pre-update one."""
    run = make_run(tiny_llama)
    s = rlsp.Settings(group_size=4, max_new_tokens=16, temperature=1.0, minibatches=2)
    eps = episodes_for(run, s)
    for i, e in enumerate(eps):  # rewards that differ within every group, whatever was drawn: every group trains
        e.rewards["total"] = float(i % 2)
    plan = rlsp.update_plan(eps, s)
    old = rlsp.policy_logprobs(run, eps, plan, s)
    want = sum((o - torch.tensor(e.logprobs)).abs().sum().item() for o, e in zip(old, eps)) / sum(len(e.tokens) for e in eps)
    opt = torch.optim.SGD(run.model.parameters(), lr=50.0)

    def step(loss):
        opt.step()
        opt.zero_grad()
        return 0.0
    adv, _ = rlsp.advantages([e.rewards["total"] for e in eps], 4)
    stats = rlsp.update_policy(run, eps, plan, adv, old, None, s, step)
    assert want < 1e-4 and stats["logprob_gap"] == pytest.approx(want, abs=1e-9)
    after = rlsp.policy_logprobs(run, eps, plan, s)
    assert max((a - o).abs().max().item() for a, o in zip(after, old)) > 1e-2  # the update did move the policy


def test_kl_in_reward_is_the_trained_and_logged_reward(tiny_llama):
    """--kl-placement reward (the paper): each episode's reward is total - beta * sum_t k1, the advantages
    are computed from that, and the logged `reward` is that trained reward with `reward_kl` its KL part."""
    run = make_run(tiny_llama)
    run.ref = Transformer.from_pretrained(tiny_llama, device="cpu")
    with torch.no_grad():
        for p in run.ref.parameters():
            p.mul_(1.05)
    s = rlsp.Settings(group_size=4, max_new_tokens=16, temperature=1.0, exploration="none", kl_coef=0.05,
                      kl_placement="reward", kl_estimator="k1", micro_batch_tokens=64)
    problems = load_dataset("gsm8k", limit=2)
    row = rlsp.rl_step(run, problems, s, 0, seed=3, optimizer_step=capture(run.model, []))
    # redo the step's pieces by hand from the same seed and the same (unchanged) weights
    eps = rlsp.rollout(run.model, run.tokenizer, problems, s, 3)
    rlsp.grade_episodes(eps)
    rlsp.score_episodes(eps, run.tokenizer, s, 0.8)
    x_old = [rlsp.policy_logprobs(run, [e], [[[0]]], s)[0] for e in eps]
    x_ref = [rlsp.policy_logprobs(run, [e], [[[0]]], s, model=run.ref)[0] for e in eps]
    penalty = [0.05 * (o - r).sum().item() for o, r in zip(x_old, x_ref)]
    task = [e.rewards["total"] for e in eps]
    assert any(abs(p) > 1e-3 for p in penalty)
    assert row["reward"] == pytest.approx(sum(t - p for t, p in zip(task, penalty)) / len(eps), abs=1e-4)
    assert row["reward_kl"] == pytest.approx(-sum(penalty) / len(eps), abs=1e-4)
    assert row["outcome"] == pytest.approx(sum(e.rewards["outcome"] for e in eps) / len(eps))


@pytest.mark.parametrize("flags,message", [
    (["--group-size", "1"], "--advantage grpo needs --group-size >= 2"),
    (["--group-size", "1", "--advantage", "rloo"], "--advantage rloo needs --group-size >= 2"),
    (["--temperature", "0"], "argument --temperature: must be a number > 0"),
    (["--kl-coef", "0.1", "--kl-estimator", "k1"], "--kl-estimator k1 in the loss has zero expected gradient"),
    (["--minibatches", "9", "--prompts-per-step", "2", "--group-size", "4"], "--minibatches 9 exceeds the 8"),
    (["--micro-batch-tokens", "0"], "argument --micro-batch-tokens: must be an integer >= 1"),
    (["--overlong-buffer", "64", "--max-new-tokens", "64"], "--overlong-buffer must be in"),
])
def test_invalid_rl_flags_are_refused_at_start(tiny_llama, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "rl", "--model", tiny_llama, "--data", "gsm8k", "--out", str(tmp_path / "r"), *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


RL = ["--stage", "rl", "--data", "gsm8k", "--limit", "12", "--prompts-per-step", "2", "--group-size", "2",
      "--max-new-tokens", "8", "--temperature", "1.0", "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "0"]


def test_filter_solved_ids_are_kept_and_reused_on_resume(tiny_llama, tmp_path, capsys):
    out = tmp_path / "rl"
    argv = [*RL, "--model", tiny_llama, "--out", str(out), "--filter-solved", "--max-steps", "2", "--save-every", "1",
            "--keep", "3"]
    train.main(argv)
    ids = json.load(open(out / "problems.json"))
    assert len(ids) == 12  # the random model solves nothing
    assert "--filter-solved: kept 12 of 12" in capsys.readouterr().out
    # resume from step 1 with a trimmed id list: the resumed run must read it, not filter again
    import shutil
    shutil.rmtree(out / "step-000002")
    json.dump(ids[:4], open(out / "problems.json", "w"))
    train.main([*argv, "--resume"])
    printed = capsys.readouterr().out
    assert "--filter-solved" not in printed and "4 RL problems" in printed
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2]


def test_rl_steps_on_qwen3_load_in_transformers(tiny_qwen3, tmp_path):
    """Two RL steps of a Qwen3 checkpoint through train.py; the result loads in transformers with the same
    logits. (The random model's rewards are all equal, so the weights may not move here; the gradient
    itself is checked against a direct forward in test_micro_batched_gradient_equals_unsplit.)"""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "rl"
    train.main([*RL, "--model", tiny_qwen3, "--out", str(out), "--max-steps", "2"])
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2]
    ours = Transformer.from_pretrained(str(out / "final"), device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(out / "final"), dtype=torch.float32).eval()
    ids = torch.randint(0, 700, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(ids), ref(ids).logits, atol=1e-4)


def test_resume_refuses_changed_algorithm_flags(tiny_llama, tmp_path):
    out = tmp_path / "rl"
    base = [*RL, "--model", tiny_llama, "--out", str(out), "--max-steps", "1"]
    train.main(base)
    for flag, value in (("--clip-high", "0.2"), ("--temperature", "0.9"), ("--length-c", "10"),
                        ("--loss-agg", "seq-mean-token-mean"), ("--overlong-buffer", "2")):
        with pytest.raises(ValueError, match=f"{flag} "):
            train.main([*base, "--resume", flag, value])
    train.main([*base, "--resume", "--micro-batch-tokens", "64"])  # a memory knob is not part of the run


def test_rollout_dtype_keeps_the_runs_precision(tiny_llama):
    """--rollout-dtype: a name given is used; auto keeps what a resumed run sampled in (its trainer.pt says),
    else model.sampling_dtype decides (fp32 for a model within the CPU's caches, with no timing)."""
    cfg = Config.from_pretrained(tiny_llama)
    assert train.rollout_dtype("bfloat16", cfg, "cpu", 0, resumed="float32") == "bfloat16"
    assert train.rollout_dtype("auto", cfg, "cpu", 0, resumed="bfloat16") == "bfloat16"
    assert train.rollout_dtype("auto", cfg, "cpu", 0) == "float32"


def test_readme_single_gpu_recipe_fits_80gb_by_dry_run(tmp_path, capsys):
    """The README's one-GPU recipe (Qwen2.5-1.5B-Instruct shapes) fits an 80 GB card by --dry-run; the
    8B config is planned too."""
    qwen15 = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 1536,
              "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 1e6, "tie_word_embeddings": True}
    os.makedirs(tmp_path / "q")
    json.dump(qwen15, open(tmp_path / "q" / "config.json", "w"))
    recipe = ["--stage", "rl", "--model", str(tmp_path / "q"), "--data", "math_train", "--prompts-per-step", "8",
              "--group-size", "8", "--max-new-tokens", "2048", "--grad-checkpointing", "--dry-run"]
    args = train.parse_args(recipe)
    assert args.micro_batch_tokens == 16384  # --dry-run plans for a GPU
    from model import Config, parameter_count
    assert parameter_count(Config.from_pretrained(str(tmp_path / "q"))) == 1_543_714_304  # Qwen2.5-1.5B's count
    total = train.dry_run(args, 1)
    printed = capsys.readouterr().out
    assert total < 70 * 2**30 and "a 80 GB card (79.1 GiB): fits" in printed and "KV cache" in printed
    assert "gradients (fp32)" in printed and "while sampling" in printed
