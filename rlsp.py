"""RLSP: rewards, advantages, losses and rollouts for the RL stage (Ye et al., 2025).

One RL step, each arrow a function below:
    rollout -> grade (verifier.py) -> exploration reward -> combine -> advantages -> policy loss -> step

Deviations from the paper and its released code (OpenRLHF PPO with a critic):
- No critic, no GAE: advantages come from the REINFORCE / GRPO family (group or batch baselines).
  With `--group-size 1 --advantage reinforce` the setting is closest to the paper's 1 sample per prompt.
- The KL penalty to the initial model is optional (`--kl-coef`, default 0 as in GRPO-style runs; the
  paper used 0.05 with k1 inside the reward, available as `--kl-placement reward --kl-estimator k1`).
- The exploration length L counts tokens before the first \\boxed{} exactly (the released
  `orm_server_efficient.py` used characters / 4).
- `--exploration difficulty` and the repetition guard go beyond the paper (see their docstrings).
"""
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------- rollouts


@dataclass
class Episode:
    """One sampled response: the sampler's own token ids and log-probs (the loss uses exactly these,
    never a re-tokenisation of the decoded text), its text, and everything the reward needs."""
    record: object          # data.Record
    prompt_ids: list
    tokens: list
    logprobs: list
    finished: bool
    text: str
    group: int              # index of the prompt in the batch; episodes of one group share a prompt
    verdict: object = None  # verifier.Verdict
    rewards: dict = field(default_factory=dict)


def rollout(model, tokenizer, records, group_size, max_new_tokens, temperature=0.7, top_p=1.0, prompt="paper", seed=None):
    """Sample `group_size` responses to each record with rlsp's batched sampler."""
    from data import render_prompt
    from model import generate
    prompts = [render_prompt(tokenizer, r.problem, prompt) for r in records]
    flat = [p for p in prompts for _ in range(group_size)]
    outs = generate(model, flat, max_new_tokens, temperature=temperature, top_p=top_p,
                    stop_token_ids=tokenizer.stop_token_ids, seed=seed, pad_id=tokenizer.pad_token_id)
    stops = set(tokenizer.stop_token_ids)
    return [Episode(records[i // group_size], flat[i], c.tokens, c.logprobs, c.finished,
                    tokenizer.decode([t for t in c.tokens if t not in stops]), i // group_size)
            for i, c in enumerate(outs)]


def grade_episodes(episodes, workers=None, timeout=1.0):
    """Verdicts of the outcome verifier: the last \\boxed{} against the gold answer."""
    from verifier import grade_batch
    for e, v in zip(episodes, grade_batch([e.text for e in episodes], [e.record.answer for e in episodes],
                                          mode="last_boxed", workers=workers, timeout=timeout)):
        e.verdict = v


# ----------------------------------------------------------------------------- rewards

def outcome_reward(verdict, no_answer=-0.5):
    """1 if correct, `no_answer` when no \\boxed{} answer was given (released code: -0.5), else 0."""
    if verdict.correct:
        return 1.0
    return no_answer if verdict.status == "no_answer" else 0.0


def length_before_box(text, n_tokens, tokenizer):
    """L: tokens before the first \\boxed{} (released code: talk after the answer earns nothing);
    the whole response when there is no box."""
    i = text.find("\\boxed")
    return n_tokens if i < 0 else max(1, len(tokenizer.encode(text[:i])))


def length_reward(L, C=1000.0):
    """R_ex = -C / L (paper Eq. 1 with App. B.4's C = 1000): longer thinking earns more, with
    diminishing returns; 0 is approached from below."""
    return -C / max(L, 1)


def repetition_fraction(text, n=10):
    """Share of word n-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop. The paper
    reports length hacking by repetition; the guard subtracts `repetition_coef` times this."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


JUDGE_SYSTEM = """You grade the THINKING EFFORT in a solution to a math problem, not whether it is correct.
Ignore correctness entirely: a wrong answer reached after careful, varied, persistent work scores high;
a correct answer stated with no visible work scores low. Consider:
- diversity of strategies: were several approaches or representations tried?
- depth of exploration: were ideas followed through, sub-cases examined, intermediate results checked?
- creativity: were non-obvious angles, constructions or reformulations considered?
- persistence and rigour: after a setback, did the solver backtrack, verify, and try again?
Scale: 0.0 no effort (bare answer); 0.2-0.4 a single shallow attempt; 0.5-0.7 a solid attempt with some
checking or one alternative; 0.8-0.9 several strategies, explicit verification and self-correction;
1.0 exhaustive, creative, self-critical exploration.
Reply with JSON only: {"rationale": "<one or two sentences>", "grade": <number between 0 and 1>}"""


class Judge:
    """Exploration scores from an OpenAI-compatible chat-completions endpoint (`--judge-url`), with
    the API key read from an environment variable and never logged. Timeouts, HTTP errors, malformed
    JSON and grades outside [0, 1] are retried with exponential back-off, then scored `fallback`
    (0.5, as the released code)."""

    def __init__(self, url, model="gpt-4o-mini", key_env="OPENAI_API_KEY", timeout=30.0, retries=3,
                 backoff=1.0, fallback=0.5):
        self.url, self.model, self.key_env = url, model, key_env
        self.timeout, self.retries, self.backoff, self.fallback = timeout, retries, backoff, fallback
        self.failures = 0

    def request(self, problem, response):
        body = {"model": self.model, "temperature": 0.0, "messages": [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Problem: {problem}\n\n---\n\nSolution: {response}"}]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"]

    @staticmethod
    def parse(content):
        """The grade in a reply: a JSON object (possibly in a ```json block) with `grade` or `score`,
        else a `"grade": x` pattern. Raises ValueError when absent or outside [0, 1]."""
        m = re.search(r"\{.*\}", content, re.DOTALL)
        grade = None
        if m:
            try:
                obj = json.loads(m.group(0))
                grade = obj.get("grade", obj.get("score"))
            except json.JSONDecodeError:
                pass
        if grade is None:
            m = re.search(r'"?(?:grade|score)"?\s*[:=]\s*(-?[\d.]+)', content)
            grade = m and m.group(1)
        try:
            grade = float(grade)
        except (TypeError, ValueError):
            raise ValueError("no grade in the judge's reply") from None
        if not 0.0 <= grade <= 1.0 or math.isnan(grade):
            raise ValueError(f"judge grade {grade} outside [0, 1]")
        return grade

    def score(self, problem, response):
        for attempt in range(self.retries + 1):
            try:
                return self.parse(self.request(problem, response))
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError):
                if attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
        self.failures += 1
        return self.fallback

    def scores(self, problems, responses, workers=8):
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(self.score, problems, responses))


def combine(outcome, exploration, form="paper", alpha=0.8, judge=None, clip=10.0):
    """The total reward.
    paper (Eq. 1):   R = alpha * outcome + (1 - alpha) * R_ex, R_ex the length reward or the judge score.
    code (released): r = outcome + length reward (full weight); with a judge r = 0.8 r + 0.2 judge.
    Both clipped to [-clip, clip] (OpenRLHF's reward clip range)."""
    if form == "paper":
        ex = judge if judge is not None else exploration
        r = alpha * outcome + (1 - alpha) * ex
    elif form == "code":
        r = outcome + exploration
        if judge is not None:
            r = 0.8 * r + 0.2 * judge
    else:
        raise ValueError(f"unknown reward form {form!r}: paper | code")
    return max(-clip, min(clip, r))


def difficulty_scale(group_correct):
    """Exploration weight for one prompt's group: its failure rate under the current policy (beyond the
    paper). Length pays where the policy fails and not where it already succeeds."""
    return 1.0 - sum(group_correct) / len(group_correct)


def score_episodes(episodes, tokenizer, args, judge=None, alpha=None):
    """Fill each episode's reward components and total, per the flags in `args` (`alpha`, when given,
    replaces `args.alpha`: the decayed value of the current step)."""
    alpha = args.alpha if alpha is None else alpha
    groups = {}
    for e in episodes:
        groups.setdefault(e.group, []).append(e.verdict.correct)
    judged = judge.scores([e.record.problem for e in episodes], [e.text for e in episodes]) if judge else None
    for i, e in enumerate(episodes):
        r = {"outcome": outcome_reward(e.verdict, args.no_answer_reward)}
        r["length"] = length_before_box(e.text, len(e.tokens), tokenizer)
        ex = length_reward(r["length"], args.length_c) if args.exploration in ("length", "difficulty") else 0.0
        if args.exploration == "difficulty":
            ex *= difficulty_scale(groups[e.group])
        r["exploration"] = ex
        r["repetition"] = repetition_fraction(e.text)
        judge_score = judged[i] if judged else None
        if judge_score is not None:
            r["judge"] = judge_score
        total = combine(r["outcome"], ex, args.reward_form, alpha, judge_score, args.reward_clip)
        r["total"] = total - args.repetition_coef * r["repetition"]
        e.rewards = r


# ----------------------------------------------------------------------------- advantages

def advantages(rewards, group_size, estimator="grpo", eps=1e-6):
    """Per-episode advantages from rewards laid out as [group0 x G, group1 x G, ...].
    grpo:      (r - mean_group) / (std_group + eps)                 (DeepSeekMath, Shao et al. 2024)
    drgrpo:    r - mean_group, no std division                     (Dr. GRPO, Liu et al. 2025)
    rloo:      r - mean of the *other* G-1 rewards of the group     (Ahmadian et al. 2024)
    reinforce: r - mean over the whole batch (works with G = 1, the paper's setting)
    Returns (advantages, number of groups whose rewards are all equal, i.e. with no signal)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if estimator == "reinforce":
        g = r.view(1, -1)
        adv = g - g.mean()
    else:
        if len(r) % group_size:
            raise ValueError(f"{len(r)} rewards do not split into groups of {group_size}")
        g = r.view(-1, group_size)
        if estimator == "grpo":
            std = g.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(g[:, :1])
            adv = (g - g.mean(dim=1, keepdim=True)) / (std + eps)
        elif estimator == "drgrpo":
            adv = g - g.mean(dim=1, keepdim=True)
        elif estimator == "rloo":
            if group_size < 2:
                raise ValueError("rloo needs --group-size of at least 2")
            adv = g - (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
        else:
            raise ValueError(f"unknown advantage estimator {estimator!r}")
    groups = r.view(-1, group_size)
    zero_var = int((groups.max(dim=1).values == groups.min(dim=1).values).sum())
    return adv.reshape(-1).float(), zero_var


# ----------------------------------------------------------------------------- losses

def kl_terms(logp, ref_logp, estimator="k3"):
    """Per-token KL(pi || pi_ref) estimates at the sampled tokens (Schulman, "Approximating KL").
    k1 = log pi - log pi_ref (unbiased, can be negative; the paper's, inside the reward);
    k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (unbiased, always >= 0; GRPO's, in the loss)."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k3":
        return d.exp() - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r}: k1 | k3")


def aggregate(x, mask, mode="token-mean", norm=None):
    """Reduce per-token values (B x T) under `mask`:
    token-mean:           sum over all tokens / number of tokens (DAPO)
    seq-mean-token-mean:  mean over sequences of each sequence's token mean (GRPO, OpenRLHF)
    constant:             sum over all tokens / (B * norm), norm a fixed length (Dr. GRPO)."""
    m = mask.to(x.dtype)
    if mode == "token-mean":
        return (x * m).sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return ((x * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    if mode == "constant":
        return (x * m).sum() / (x.shape[0] * (norm or x.shape[1]))
    raise ValueError(f"unknown loss aggregation {mode!r}")


def policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.2, agg="token-mean", norm=None):
    """PPO-clip with separate low / high clip ranges (DAPO's clip-higher):
    L = -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A), rho = exp(logp - old_logp),
    with A broadcast over each sequence's tokens. Returns (loss, fraction of tokens clipped)."""
    ratio = (logp - old_logp).exp()
    a = adv[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a
    loss = aggregate(-torch.minimum(unclipped, clipped), mask, agg, norm)
    clip_frac = aggregate((clipped < unclipped).float(), mask, "token-mean")
    return loss, clip_frac


def episode_batch(episodes, pad_id, device):
    """Right-padded prompt + response ids, the targets, a mask over the response tokens (the sampler's
    own tokens, nothing re-tokenised), and the sampler's log-probs laid out on the same positions."""
    T = max(len(e.prompt_ids) + len(e.tokens) for e in episodes)
    ids = torch.full((len(episodes), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(episodes), T - 1, dtype=torch.bool)
    old = torch.zeros(len(episodes), T - 1)
    for i, e in enumerate(episodes):
        p, n = len(e.prompt_ids), len(e.tokens)
        ids[i, :p + n] = torch.tensor(e.prompt_ids + e.tokens)
        mask[i, p - 1:p - 1 + n] = True
        old[i, p - 1:p - 1 + n] = torch.tensor(e.logprobs)
    return ids[:, :-1].to(device), ids[:, 1:].to(device), mask.to(device), old.to(device)
