"""rlsp.py: rewards, advantages, KL and losses by hand; the judge client against a loopback server;
a short end-to-end RL run in which the reward must rise."""
import http.server
import json
import math
import threading
import time

import pytest
import torch

import cli
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
    # thinking counts in full: the box drafted inside it is not where L stops
    think = "<think>Try \\boxed{4}? Check: 2+3=5.</think>So \\boxed{5}."
    assert rlsp.length_before_box(think, 99, tok) == len(tok.encode(think[:think.rindex("\\boxed")]))
    assert rlsp.repetition_fraction(" ".join(map(str, range(30)))) == 0.0
    assert rlsp.repetition_fraction("a b c d e f g h i j " * 5) == pytest.approx(1 - 10 / 41)


def test_combine_forms():
    # paper Eq. 1: alpha * outcome + (1 - alpha) * R_ex
    assert rlsp.combine(1.0, -2.0, "paper", 0.8) == pytest.approx(0.8 - 0.4)
    # released code: outcome + R_ex at full weight; clipped to [-10, 10]
    assert rlsp.combine(-0.5, -10.0, "code") == -10.0
    assert rlsp.combine(1.0, -1.0, "code") == 0.0
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
    with pytest.raises(ValueError, match="group-size"):  # G = 1 GRPO has no baseline: refused, not all zero
        rlsp.advantages([1.0, 2.0], 1, "grpo")
    with pytest.raises(ValueError, match="groups of 3"):
        rlsp.advantages([1.0, 2.0], 3)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert rlsp.kl_terms(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert rlsp.kl_terms(logp, ref, "k3").tolist() == pytest.approx(k3)
    assert rlsp.kl_terms(logp, logp, "k3").tolist() == [0.0, 0.0]


def test_token_weights_are_the_aggregations():
    """sum_i w_i sum_t x_it equals each aggregation of the minibatch computed directly."""
    x = [[1.0, 2.0, 3.0], [4.0], [5.0, 6.0]]
    lengths, keep = [3, 1, 2], [True, True, True]

    def agg(w):
        return sum(wi * sum(xi) for wi, xi in zip(w, x))
    assert agg(rlsp.token_weights(lengths, keep, "token-mean")) == pytest.approx(21 / 6)
    assert agg(rlsp.token_weights(lengths, keep, "seq-mean-token-mean")) == pytest.approx((2 + 4 + 5.5) / 3)
    assert agg(rlsp.token_weights(lengths, keep, "constant", norm=5)) == pytest.approx(21 / (3 * 5))
    # DAPO's overlong filter: a dropped episode weighs 0 and leaves the normalisers
    w = rlsp.token_weights(lengths, [True, False, True], "token-mean")
    assert w[1] == 0 and agg(w) == pytest.approx((6 + 11) / 5)
    assert rlsp.token_weights([2], [False], "token-mean") == [0.0]


def test_policy_loss_clip_higher():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))  # ratios; episode 0 = tokens 0-1, episode 1 = tokens 2-3
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    weight = torch.full((4,), 0.25)  # token-mean over 4 tokens
    loss, clipped = rlsp.policy_loss(logp, old, adv, weight, clip_low=0.2, clip_high=0.28)
    # A=+1: min(1.5, 1.28) = 1.28, min(0.5, 0.8) = 0.5; A=-1: min(-1.1, -1.1), min(-0.7, -0.8) = -0.8
    assert loss.item() == pytest.approx(-(1.28 + 0.5 - 1.1 - 0.8) / 4, rel=1e-5)
    assert clipped.tolist() == [True, False, False, True]  # 1.5 clipped (A>0), 0.7 clipped (A<0)
    lp = logp.clone().requires_grad_(True)  # the gradient flows only through unclipped tokens
    rlsp.policy_loss(lp, old, adv, weight, 0.2, 0.28)[0].backward()
    assert lp.grad[0] == 0 and lp.grad[3] == 0 and lp.grad[1] != 0 and lp.grad[2] != 0


def test_overlong_penalty_and_alpha_decay():
    # DAPO Eq. 13 with a cap of 100 and a buffer of 20: 0 up to 80 tokens, then linear to -coef at 100
    assert [rlsp.overlong_penalty(n, 100, 20, 1.0) for n in (50, 80, 90, 100)] == [0, 0, -0.5, -1.0]
    assert rlsp.overlong_penalty(100, 100, 0) == 0.0
    s = rlsp.Settings(alpha=0.8, alpha_decay=0.5)
    assert [rlsp.decayed_alpha(s, k) for k in (0, 1, 2)] == pytest.approx([0.8, 0.9, 0.95])


def test_micro_batches_respect_the_budget():
    # (prompt key, prompt length, response length): groups 0 and 1 of prompts 10 and 4 tokens
    shapes = [(0, 10, 5), (0, 10, 40), (0, 10, 7), (1, 4, 12), (1, 4, 33), (1, 4, 6)]
    parts = rlsp.micro_batches(shapes, 60)
    assert sorted(i for p in parts for i in p) == list(range(6))
    for p in parts:  # longest response first; distinct prompts x longest + responses x longest <= budget
        prompts = {shapes[i][0]: shapes[i][1] for i in p}
        cost = len(prompts) * max(prompts.values()) + len(p) * max(shapes[i][2] for i in p)
        assert len(p) == 1 or cost <= 60
        assert shapes[p[0]][2] == max(shapes[i][2] for i in p)
    assert parts == [[1], [4], [3, 2, 5], [0]]  # 10 + 40; 4 + 33; 2 x 10 + 3 x 12 = 56; 10 + 5
    assert rlsp.micro_batches([(0, 50, 5)], 10) == [[0]]
    # equal lengths keep their order: a group's episodes share one micro-batch and one prompt pass
    assert rlsp.micro_batches([(g, 20, 8) for g in (0, 0, 1, 1)], 100) == [[0, 1, 2, 3]]


# ----------------------------------------------------------------------------- the judge

@pytest.fixture
def judge_server():
    """A loopback chat-completions server whose replies the test scripts, one per request: ("ok", content),
    ("raw", body), ("status", code), ("sleep", seconds), ("redirect", url), ("truncated", content: a
    Content-Length longer than the body, then the connection closes), ("drip", seconds between bytes),
    ("huge", bytes), ("need_key", content: 401 unless the request carries a key)."""
    state = {"replies": [], "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append((dict(self.headers), body))
            kind, payload = state["replies"].pop(0) if state["replies"] else ("ok", '{"grade": 0.5}')
            if kind == "sleep":
                time.sleep(payload)
                kind, payload = "ok", '{"grade": 0.9}'
            if kind == "need_key":
                kind, payload = ("ok", payload) if self.headers.get("Authorization") else ("status", 401)
            if kind in ("status", "redirect"):
                self.send_response(payload if kind == "status" else 302)
                if kind == "redirect":
                    self.send_header("Location", payload)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = payload.encode() if kind == "raw" else b"x" * payload if kind == "huge" else \
                json.dumps({"choices": [{"message": {"content": payload}}]}).encode() if kind != "drip" else \
                json.dumps({"choices": [{"message": {"content": '{"grade": 0.9}'}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if kind == "truncated":  # half the body, then the connection closes
                data = data[:len(data) // 2]
            if kind == "drip":
                for byte in data:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(payload)
                return
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    yield state
    server.shutdown()


def _second_server():
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append(dict(self.headers))
            data = json.dumps({"choices": [{"message": {"content": '{"grade": 1.0}'}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions", "received": received}
    server.shutdown()


def test_judge_client(judge_server, monkeypatch, capsys):
    monkeypatch.setenv("RLSP_TEST_KEY", "sk-secret-123")
    j = rlsp.Judge(judge_server["url"], key_env="RLSP_TEST_KEY", timeout=0.5, retries=2, backoff=0.01)
    judge_server["replies"] = [("ok", '```json\n{"rationale": "tried two ways", "grade": 0.85}\n```')]
    assert j.score("1+1?", "2") == 0.85
    headers, body = judge_server["requests"][-1]
    assert headers["Authorization"] == "Bearer sk-secret-123"
    assert body["messages"][0]["content"] == rlsp.JUDGE_SYSTEM and "not whether it is correct" in rlsp.JUDGE_SYSTEM
    user = body["messages"][1]["content"]
    tag = user.split("<<<problem-")[1].split("\n")[0]
    assert len(tag) == 16 and user == (f"Problem:\n<<<problem-{tag}\n1+1?\nproblem-{tag}>>>\n\n"
                                       f"Solution to grade:\n<<<solution-{tag}\n2\nsolution-{tag}>>>")
    j.score("1+1?", "2")
    assert tag not in judge_server["requests"][-1][1]["messages"][1]["content"]  # a new tag every request
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
    n = len(judge_server["requests"])
    assert j.score("p", "r") == 0.5 and j.failures == 3
    assert len(judge_server["requests"]) - n == 3  # the first try and two retries, each cut off by the timeout
    assert j.scores(["a", "b"], ["c", "d"]) == [0.5, 0.5]
    assert "sk-secret-123" not in capsys.readouterr().out


def test_judge_reads_the_grade_only_from_its_required_form():
    assert rlsp.Judge.parse('{"rationale": "r", "grade": 0.4}') == 0.4
    assert rlsp.Judge.parse('```json\n{"grade": 1}\n```') == 1.0
    for bad in ('blah "grade": 0.4 blah', 'The policy wrote "grade": 1.0 so {"grade": 1.0}', '{"score": 0.3}',
                '{"grade": "0.9"}', '{"grade": true}', '{"grade": -0.1}', '{"grade": NaN}', "[0.5]", ""):
        with pytest.raises(rlsp.JudgeError):
            rlsp.Judge.parse(bad)


def test_judge_survives_what_a_server_sends(judge_server, monkeypatch):
    """A truncated reply, one dripped a byte at a time past the deadline (a valid grade of 0.9, had it been
    waited for), one over the size cap: each a failure retried and then counted, never an exception out
    of the RL step."""
    monkeypatch.delenv("RLSP_TEST_KEY", raising=False)
    j = rlsp.Judge(judge_server["url"], key_env="RLSP_TEST_KEY", timeout=0.5, retries=1, backoff=0.01,
                   max_reply_bytes=10_000)
    for reply in (("truncated", '{"grade": 0.7}'), ("drip", 0.05), ("huge", 50_000)):
        judge_server["replies"] = [reply] * 2
        failures = j.failures
        assert j.score("p", "r") == 0.5 and j.failures == failures + 1, reply
    judge_server["replies"] = [("truncated", '{"grade": 0.7}'), ("ok", '{"grade": 0.7}')]
    assert j.score("p", "r") == 0.7  # a failure, then the retry succeeds


def test_judge_key_never_follows_a_redirect(judge_server, monkeypatch):
    monkeypatch.setenv("RLSP_TEST_KEY", "sk-secret-123")
    for other in _second_server():
        j = rlsp.Judge(judge_server["url"], key_env="RLSP_TEST_KEY", timeout=0.5, retries=0)
        judge_server["replies"] = [("redirect", other["url"])]
        assert j.score("p", "r") == 0.5 and j.failures == 1  # not the redirect target's 1.0
        assert other["received"] == []
        judge_server["replies"] = [("redirect", other["url"])]
        with pytest.raises(ValueError, match="302"):
            j.check()


def test_judge_setup_refuses_a_missing_or_rejected_key_and_clear_text(judge_server, monkeypatch, tiny_llama, tmp_path,
                                                                      capsys):
    monkeypatch.delenv("RLSP_TEST_KEY", raising=False)
    judge_server["replies"] = [("need_key", '{"grade": 0.5}')]
    with pytest.raises(ValueError, match=r"refused the request \(HTTP 401\): it needs an API key: set \$RLSP_TEST_KEY"):
        rlsp.Judge(judge_server["url"], key_env="RLSP_TEST_KEY", retries=0).check()
    monkeypatch.setenv("RLSP_TEST_KEY", "sk-wrong")
    judge_server["replies"] = [("status", 401)]
    with pytest.raises(ValueError, match=r"check the API key in \$RLSP_TEST_KEY"):
        rlsp.Judge(judge_server["url"], key_env="RLSP_TEST_KEY", retries=0).check()
    judge_server["replies"] = [("need_key", '{"grade": 0.5}')]
    rlsp.Judge(judge_server["url"], key_env="RLSP_TEST_KEY", retries=0).check()  # with the key: fine
    with pytest.raises(ValueError, match="http:// would send the API key"):
        rlsp.Judge("http://judge.example.com/v1/chat/completions?key=abc", key_env="RLSP_TEST_KEY")
    # from train.py: one line at setup, and the URL's secrets never reach args.json
    monkeypatch.delenv("RLSP_TEST_KEY", raising=False)
    judge_server["replies"] = [("need_key", '{"grade": 0.5}')]
    with pytest.raises(ValueError, match="credentials in the URL are not sent"):
        rlsp.Judge(judge_server["url"].replace("http://", "http://user:pw@"))
    url = judge_server["url"] + "?api-key=sk-in-url"
    with pytest.raises(SystemExit):
        cli.run(train.main, ["--stage", "rl", "--model", tiny_llama, "--data", "gsm8k", "--limit", "4",
                             "--exploration", "judge", "--judge-url", url, "--judge-key-env", "RLSP_TEST_KEY",
                             "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "it needs an API key" in err[0] and "sk-in-url" not in err[0]
    assert rlsp.redact_url(url) == judge_server["url"]
    # a run that uses such a URL: the saved arguments and checkpoints hold it without its secrets
    train.main(["--stage", "rl", "--model", tiny_llama, "--data", "gsm8k", "--limit", "4", "--prompts-per-step", "1",
                "--group-size", "2", "--max-new-tokens", "4", "--temperature", "1.0", "--exploration", "judge",
                "--judge-url", url, "--max-steps", "1", "--save-every", "1", "--eval-every", "0",
                "--out", str(tmp_path / "ok")])
    saved = json.load(open(tmp_path / "ok" / "args.json"))
    assert saved["judge_url"] == judge_server["url"]
    state = torch.load(tmp_path / "ok" / "step-000001" / "trainer.pt", weights_only=True)
    assert state["args"]["judge_url"] == judge_server["url"]


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
    train.main(["--stage", "rl", "--model", str(start), "--data", "gsm8k", "--limit", "64", "--out", str(tmp_path / "rl"),
                "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "24", "--temperature", "1.0",
                "--exploration", "length", "--reward-form", "code", "--length-c", "20", "--lr", "1e-2",
                "--warmup-steps", "1", "--max-steps", "20", "--save-every", "10", "--eval-every", "0"])
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


@pytest.mark.parametrize("exploration", ["length", "difficulty", "judge", "none"])
@pytest.mark.parametrize("form", ["paper", "code"])
def test_score_episodes_every_exploration_and_form(tiny_qwen, judge_server, exploration, form):
    """Reward parts and totals by hand for each exploration x form: the judge is the loopback server
    (grade 0.6 for every response), the length term -C/L uses exact tokens before the box."""
    tok = Tokenizer.from_pretrained(tiny_qwen)

    class R:
        problem, answer = "What is 2+3?", "5"
    texts = ["2 plus 3 is 5, so \\boxed{5}", "I think \\boxed{6}", "no box here at all, just words words words",
             "words " * 30 + "\\boxed{5}"]
    statuses = ["correct", "incorrect", "no_answer", "correct"]
    eps = [rlsp.Episode(R(), [1], tok.encode(t), [], True, t, 0) for t in texts]
    for e, st in zip(eps, statuses):
        e.verdict = v(st)
    judge = rlsp.Judge(judge_server["url"], retries=0) if exploration == "judge" else None
    judge_server["replies"] = [("ok", '{"grade": 0.6}')] * 4
    s = rlsp.Settings(exploration=exploration, reward_form=form, length_c=10.0, repetition_coef=0.5, max_new_tokens=64,
                      overlong_buffer=40, overlong_penalty=0.3)
    rlsp.score_episodes(eps, tok, s, alpha=0.7, judge=judge)
    fail_rate = 2 / 4  # two of the group's four are correct
    for e, t, st in zip(eps, texts, statuses):
        L = len(tok.encode(t[:t.find("\\boxed")])) if "\\boxed" in t else len(e.tokens)
        outcome = {"correct": 1.0, "incorrect": 0.0, "no_answer": -0.5}[st]
        length = -10.0 / L
        if exploration == "difficulty":
            length *= fail_rate
        if exploration == "none" or (exploration == "judge" and form == "paper"):
            length = 0.0  # the paper form with a judge: R_ex is the judge's score
        if form == "paper":
            total = 0.7 * outcome + 0.3 * (0.6 if exploration == "judge" else length)
        else:  # the released code: outcome - C/L, and 0.8 of that + 0.2 judge (the length term stays)
            total = outcome + length
            if exploration == "judge":
                total = 0.8 * total + 0.2 * 0.6
        total = max(-10.0, min(10.0, total))
        # R_ex as it enters the form: the total above is alpha * outcome + (1 - alpha) * R_ex, or outcome + R_ex
        explore = (0.6 if exploration == "judge" else length) if form == "paper" else \
            (0.8 * length + 0.2 * (0.6 - outcome) if exploration == "judge" else length)
        rep = rlsp.repetition_fraction(t)
        over = -0.3 * min(1.0, max(0, len(e.tokens) - 24) / 40)
        assert e.rewards["outcome"] == outcome and e.rewards["length"] == L
        assert e.rewards["exploration"] == pytest.approx(explore)
        assert e.rewards["overlong"] == pytest.approx(over)
        assert e.rewards["total"] == pytest.approx(total - 0.5 * rep + over), (exploration, form, t)
        assert ("judge" in e.rewards) == (exploration == "judge")
    assert eps[3].rewards["repetition"] > 0.5 and eps[3].rewards["overlong"] < 0


def test_a_new_estimator_is_one_table_entry(tiny_llama, monkeypatch, capsys):
    """What adding an estimator touches: one ADVANTAGES entry and its function. The parser's choices and
    help, the refusal of a group size it cannot use, the advantages and the update plan's handling of
    groups with equal rewards all follow the entry."""
    def batchstd(g):  # group mean subtracted, divided by the batch's std
        return (g - g.mean(dim=1, keepdim=True)) / (g.std() + 1e-6)
    monkeypatch.setitem(rlsp.ADVANTAGES, "batchstd", rlsp.Estimator(batchstd, True, 2, "(r - group mean) / batch std",
                                                                    "one sample has no group mean to subtract"))
    args = train.parse_args(["--stage", "rl", "--model", tiny_llama, "--advantage", "batchstd"])
    assert args.advantage == "batchstd"
    assert "batchstd: (r - group mean) / batch std" in train.parser().format_help().replace("\n", " ").replace("  ", " ")
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "rl", "--model", tiny_llama, "--advantage", "batchstd", "--group-size", "1"])
    assert "--advantage batchstd needs --group-size >= 2: one sample has no group mean" in capsys.readouterr().err
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    adv, zero = rlsp.advantages(rewards, 4, "batchstd")
    std = torch.tensor(rewards, dtype=torch.float64).std().item()
    assert adv[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], rel=1e-5)
    assert adv[4:].tolist() == [0.0] * 4 and zero == 1

    class Rec:
        problem, answer = "", ""
    eps = [rlsp.Episode(Rec(), [1, 2], [3, 4, 5], [0.0] * 3, True, "", i // 4) for i in range(8)]
    for e, r in zip(eps, rewards):
        e.rewards = {"total": r}
    s = rlsp.Settings(group_size=4, advantage="batchstd")
    plan = rlsp.update_plan(eps, s)  # the group baseline: the equal group gets micro-batches of its own
    assert [sorted(p) for p in plan[0]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    monkeypatch.setitem(rlsp.ADVANTAGES, "batchstd", rlsp.Estimator(batchstd, False, 1, "a batch baseline"))
    assert [sorted(p) for p in rlsp.update_plan(eps, s)[0]] == [list(range(8))]  # no group baseline: trained
    assert rlsp.advantages(rewards, 4, "batchstd")[0][4:].abs().sum() == 0  # batchstd's own zero, not the mask
    assert rlsp.Settings(group_size=1, advantage="batchstd").errors() == []


def test_a_new_exploration_reward_is_one_table_entry(tiny_qwen, monkeypatch):
    """The same for an exploration reward: a bonus per self-verification line, one EXPLORATION entry."""
    def verify_lines(episodes, s, judge=None):
        return [0.5 * e.text.count("verify:") for e in episodes]
    monkeypatch.setitem(rlsp.EXPLORATION, "verify", rlsp.Exploration(verify_lines, "0.5 per verification line"))
    args = train.parse_args(["--stage", "rl", "--model", tiny_qwen, "--exploration", "verify"])
    s = rlsp.Settings.from_args(args)
    tok = Tokenizer.from_pretrained(tiny_qwen)

    class Rec:
        problem, answer = "", "5"
    texts = ["2+3=5\nverify: 2+3=5\n\\boxed{5}", "\\boxed{5}"]
    eps = [rlsp.Episode(Rec(), [1], tok.encode(t), [], True, t, 0) for t in texts]
    for e in eps:
        e.verdict = v("correct")
    rlsp.score_episodes(eps, tok, s, alpha=0.8)
    assert [e.rewards["exploration"] for e in eps] == [0.5, 0.0]
    assert [e.rewards["total"] for e in eps] == pytest.approx([0.8 + 0.2 * 0.5, 0.8])
