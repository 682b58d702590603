"""rlsp.py: rewards, advantages, KL and losses by hand; the judge client against a loopback server;
a short end-to-end RL run in which the reward must rise."""
import http.server
import json
import math
import threading
import time

import pytest
import torch

import rlsp
import train
from model import Tokenizer, Transformer
from verifier import Verdict


def v(status):
    return Verdict(status == "correct", None if status == "no_answer" else "x", status)


def test_outcome_and_length_rewards(tiny_qwen):
    assert [rlsp.outcome_reward(v(s)) for s in ("correct", "incorrect", "no_answer", "unparseable")] == [1, 0, -0.5, 0]
    assert rlsp.outcome_reward(v("no_answer"), no_answer=0.0) == 0.0
    assert rlsp.length_reward(100) == -10.0 and rlsp.length_reward(4000) == -0.25
    tok = Tokenizer.from_pretrained(tiny_qwen)
    text = "First add 2 and 3. So \\boxed{5}. Then chat on and on and on."
    assert rlsp.length_before_box(text, 99, tok) == len(tok.encode("First add 2 and 3. So "))
    assert rlsp.length_before_box("no box at all", 7, tok) == 7
    assert rlsp.repetition_fraction(" ".join(map(str, range(30)))) == 0.0
    assert rlsp.repetition_fraction("a b c d e f g h i j " * 5) == pytest.approx(1 - 10 / 41)


def test_combine_forms():
    # paper Eq. 1: alpha * outcome + (1 - alpha) * R_ex
    assert rlsp.combine(1.0, -2.0, "paper", 0.8) == pytest.approx(0.8 - 0.4)
    assert rlsp.combine(1.0, -2.0, "paper", 0.8, judge=0.5) == pytest.approx(0.8 + 0.1)  # judge replaces R_ex
    # released code: outcome - C/L at full weight; 0.8 * that + 0.2 * judge; clipped to [-10, 10]
    assert rlsp.combine(-0.5, -10.0, "code") == -10.0
    assert rlsp.combine(1.0, -1.0, "code") == 0.0
    assert rlsp.combine(1.0, -1.0, "code", judge=1.0) == pytest.approx(0.2)
    assert rlsp.combine(0.0, -50.0, "paper", 0.8, clip=5.0) == -5.0
    with pytest.raises(ValueError, match="unknown reward form"):
        rlsp.combine(1, 1, "other")
    assert rlsp.difficulty_scale([True, False, False, False]) == 0.75 and rlsp.difficulty_scale([True, True]) == 0.0


def test_advantages_hand_computed():
    r = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    adv, zero = rlsp.advantages(r, 4, "grpo")
    std = math.sqrt(sum((x - 0.5) ** 2 for x in r[:4]) / 3)  # unbiased
    assert adv[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], rel=1e-5)
    assert adv[4:].tolist() == [0, 0, 0, 0] and zero == 1  # an all-equal group carries no signal
    adv, _ = rlsp.advantages(r, 4, "drgrpo")
    assert adv[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    adv, _ = rlsp.advantages([3.0, 1.0, 2.0], 3, "rloo")
    assert adv.tolist() == pytest.approx([3 - 1.5, 1 - 2.5, 2 - 2.0])
    adv, zero = rlsp.advantages([1.0, 0.0, 0.0, 3.0], 1, "reinforce")  # G = 1: batch-mean baseline
    assert adv.tolist() == [0.0, -1.0, -1.0, 2.0] and zero == 4
    adv, _ = rlsp.advantages([1.0, 2.0], 1, "grpo")  # G = 1 GRPO has no baseline: all zero
    assert adv.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 3"):
        rlsp.advantages([1.0, 2.0], 3)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert rlsp.kl_terms(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert rlsp.kl_terms(logp, ref, "k3").tolist() == pytest.approx(k3)
    assert rlsp.kl_terms(logp, logp, "k3").tolist() == [0.0, 0.0]


def test_aggregation_modes():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert rlsp.aggregate(x, m, "token-mean").item() == pytest.approx(10 / 4)
    assert rlsp.aggregate(x, m, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert rlsp.aggregate(x, m, "constant", norm=5).item() == pytest.approx(10 / (2 * 5))


def test_policy_loss_clip_higher():
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.1, 0.7]]))  # ratios
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, frac = rlsp.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token-mean")
    # row 0 (A=+1): min(1.5, 1.28) = 1.28, min(0.5, 0.8) = 0.5; row 1 (A=-1): min(-1.1, -1.1), min(-0.7, -0.8) = -0.8
    want = -(1.28 + 0.5 - 1.1 - 0.8) / 4
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert frac.item() == pytest.approx(2 / 4)  # 1.5 clipped (A>0), 0.7 clipped (A<0)
    # the gradient flows only through unclipped tokens
    lp = logp.clone().requires_grad_(True)
    rlsp.policy_loss(lp, old, adv, mask, 0.2, 0.28)[0].backward()
    assert lp.grad[0, 0] == 0 and lp.grad[1, 1] == 0 and lp.grad[0, 1] != 0 and lp.grad[1, 0] != 0


def test_episode_batch_layout():
    class R:
        answer = "1"
    eps = [rlsp.Episode(R(), [5, 6, 7], [8, 9], [-0.1, -0.2], True, "", 0),
           rlsp.Episode(R(), [5], [4, 3, 2], [-1.0, -2.0, -3.0], False, "", 0)]
    x, y, mask, old = rlsp.episode_batch(eps, 0, "cpu")
    assert x.tolist() == [[5, 6, 7, 8], [5, 4, 3, 2]] and y.tolist() == [[6, 7, 8, 9], [4, 3, 2, 0]]
    assert mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert torch.allclose(old, torch.tensor([[0, 0, -0.1, -0.2], [-1, -2, -3, 0]]))
    assert [t for t, m in zip(y[0].tolist(), mask[0].tolist()) if m] == [8, 9]  # the sampler's own ids


# ----------------------------------------------------------------------------- the judge

@pytest.fixture
def judge_server():
    """A loopback chat-completions server whose replies the test scripts, one per request."""
    state = {"replies": [], "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append((dict(self.headers), body))
            kind, payload = state["replies"].pop(0) if state["replies"] else ("ok", '{"grade": 0.5}')
            if kind == "sleep":
                time.sleep(payload)
                kind, payload = "ok", '{"grade": 0.9}'
            if kind == "status":
                self.send_response(payload)
                self.end_headers()
                return
            data = payload if kind == "raw" else json.dumps({"choices": [{"message": {"content": payload}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    yield state
    server.shutdown()


def test_judge_client(judge_server, monkeypatch, capsys):
    monkeypatch.setenv("RLSP_TEST_KEY", "sk-secret-123")
    j = rlsp.Judge(judge_server["url"], key_env="RLSP_TEST_KEY", timeout=0.5, retries=2, backoff=0.01)
    judge_server["replies"] = [("ok", 'Here you go:\n```json\n{"rationale": "tried two ways", "grade": 0.85}\n```')]
    assert j.score("1+1?", "2") == 0.85
    headers, body = judge_server["requests"][-1]
    assert headers["Authorization"] == "Bearer sk-secret-123"
    assert body["messages"][0]["content"] == rlsp.JUDGE_SYSTEM and "not whether it is correct" in rlsp.JUDGE_SYSTEM
    assert body["messages"][1]["content"] == "Problem: 1+1?\n\n---\n\nSolution: 2"
    judge_server["replies"] = [("ok", '{"score": 0.3}')]
    assert j.score("p", "r") == 0.3
    # malformed JSON, then a 500, then a good reply: retried
    judge_server["replies"] = [("raw", "{not json"), ("status", 500), ("ok", '{"grade": 0.6}')]
    assert j.score("p", "r") == 0.6
    # out of range on every try: the fallback 0.5, counted as a failure
    judge_server["replies"] = [("ok", '{"grade": 7}')] * 3
    assert j.score("p", "r") == 0.5 and j.failures == 1
    judge_server["replies"] = [("ok", "no grade here")] * 3
    assert j.score("p", "r") == 0.5 and j.failures == 2
    # a timeout on every try
    judge_server["replies"] = [("sleep", 1.0)] * 3
    t0 = time.monotonic()
    assert j.score("p", "r") == 0.5 and j.failures == 3
    assert time.monotonic() - t0 < 3 * 1.0 + 1
    assert j.scores(["a", "b"], ["c", "d"]) == [0.5, 0.5]
    assert "sk-secret-123" not in capsys.readouterr().out
    assert rlsp.Judge.parse('blah "grade": 0.4 blah') == 0.4
    with pytest.raises(ValueError, match="outside"):
        rlsp.Judge.parse('{"grade": -0.1}')


def test_judge_needs_url(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="--judge-url"):
        train.main(["--stage", "rl", "--model", tiny_llama, "--data", "gsm8k", "--limit", "4", "--out",
                    str(tmp_path / "r"), "--exploration", "judge"])


# ----------------------------------------------------------------------------- end to end

def test_rl_run_raises_mean_reward(tiny_llama, tmp_path):
    """The tiny Llama, made to stop early (a large end-of-turn logit), trained with the exploration
    reward alone (every response lacks a box, so the outcome is a constant -0.5): RL must learn to
    write longer responses, and the mean reward must rise."""
    model = Transformer.from_pretrained(tiny_llama, device="cpu")
    tok = Tokenizer.from_pretrained(tiny_llama)
    eot = tok.tk.token_to_id("<|eot_id|>")
    with torch.no_grad():  # point the end-of-turn row along the mean hidden state: p(eot) ~ 1/4 everywhere
        ids = torch.randint(0, 700, (8, 32), generator=torch.Generator().manual_seed(0))
        h = model.hidden_states(ids).reshape(-1, model.config.hidden_size)
        target = model.lm_head(h).logsumexp(-1).mean() - 1.1
        mean_h = h.mean(0)
        model.lm_head.weight[eot] = mean_h * target / mean_h.pow(2).sum()
    start = tmp_path / "start"
    model.save_pretrained(str(start))
    tok.save_pretrained(str(start))
    t0 = time.monotonic()
    train.main(["--stage", "rl", "--model", str(start), "--data", "gsm8k", "--limit", "64", "--out", str(tmp_path / "rl"),
                "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "24", "--temperature", "1.0",
                "--exploration", "length", "--reward-form", "code", "--length-c", "20", "--lr", "1e-2",
                "--warmup-steps", "1", "--max-steps", "20", "--save-every", "10", "--eval-every", "0"])
    assert time.monotonic() - t0 < 120
    rows = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    assert len(rows) == 20
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "reward") > mean(first, "reward") + 0.5, [round(r["reward"], 2) for r in rows]
    assert mean(last, "mean_length") > mean(first, "mean_length")
    for key in ("reward", "outcome", "exploration", "accuracy", "no_answer_rate", "mean_length", "max_length",
                "truncation_rate", "repetition", "zero_variance_groups", "entropy_est", "clip_frac", "logprob_gap",
                "rollout_tokens_per_s", "train_tokens_per_s", "backtracking_proxy", "grad_norm", "lr"):
        assert key in rows[0], key
    assert rows[0]["logprob_gap"] < 1e-3  # sampler and trainer agree on the same weights
    assert (tmp_path / "rl" / "episodes.jsonl").exists()
