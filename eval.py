"""Benchmark evaluation: sample, grade, and report what papers report.

    python eval.py --model DIR --data math500 --samples 4 --temperature 0.6 --out runs/eval-math500
    python eval.py --compare runs/a runs/b

Writes OUT/samples.jsonl (one line per sample, appended as batches finish, so the same command
resumes an interrupted run) and OUT/summary.json: accuracy = pass@1 averaged over samples with a
95% interval, unbiased pass@k, maj@k, per-level / per-subject accuracy, response lengths,
truncation and no-answer rates, behaviour-proxy rates and tokens/s. Both grading harnesses are
always reported: `strict` (the last \\boxed{} only) and `paper` (the Qwen2.5-Math harness the RLSP
authors used: the box, else "the answer is", else the last number).
"""
import argparse
import json
import math
import os
import statistics
import time
from collections import Counter, defaultdict

import cli
from data import load_dataset
from verifier import BEHAVIOURS, grade_batch, normalize, split_thinking

REPEAT_NGRAM = 10  # words; a response "repeats" when some 10-word n-gram occurs 3+ times


def repeats(text, n=REPEAT_NGRAM, times=3):
    words = text.split()
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(counts) and max(counts.values()) >= times


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(answers, correct):
    """maj@k for one problem: the most frequent extracted answer (by normalised form; the earliest wins
    ties) decides; None answers do not vote. Returns whether that answer was graded correct."""
    votes = Counter()
    first = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        key = normalize(a)
        votes[key] += 1
        first.setdefault(key, i)
    if not votes:
        return False
    best = max(votes, key=lambda k: (votes[k], -first[k]))
    return correct[first[best]]


def mean_ci95(values):
    """Mean and normal-approximation 95% interval mean +- 1.96 * sd / sqrt(n) (population sd)."""
    n = len(values)
    m = sum(values) / n
    se = math.sqrt(sum((v - m) ** 2 for v in values) / n / n)
    return m, [m - 1.96 * se, m + 1.96 * se]


def summarize(samples, mode="strict"):
    """summary.json from the sample lines (which alone determine it, so it can be recomputed; each line
    carries its share of its batch's sampling time, so tokens/s covers every run that added to the folder)."""
    by_problem = defaultdict(list)
    for s in samples:
        by_problem[s["id"]].append(s)
    groups = [sorted(v, key=lambda s: s["sample"]) for v in by_problem.values()]
    K = min(len(g) for g in groups)
    out = {"n_problems": len(groups), "samples_per_problem": K, "n_samples": len(samples), "extract": mode}
    for m in ("strict", "paper"):
        per_problem = [sum(s[f"correct_{m}"] for s in g) / len(g) for g in groups]
        acc, ci = mean_ci95(per_problem)
        out[f"accuracy_{m}"] = acc
        out[f"ci95_{m}"] = ci
    out["accuracy"], out["ci95"] = out[f"accuracy_{mode}"], out[f"ci95_{mode}"]
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= K]
    out["pass_at_k"] = {str(k): sum(pass_at_k(len(g), sum(s[f"correct_{mode}"] for s in g), k) for g in groups)
                        / len(groups) for k in ks}
    out["maj_at_k"] = {str(k): sum(majority_correct([s[f"extracted_{mode}"] for s in g[:k]],
                                                    [s[f"correct_{mode}"] for s in g[:k]]) for g in groups)
                       / len(groups) for k in ks}
    for key in ("level", "subject"):
        buckets = defaultdict(list)
        for g in groups:
            if g[0].get(key) is not None:
                buckets[str(g[0][key])].append(sum(s[f"correct_{mode}"] for s in g) / len(g))
        if buckets:
            out[f"accuracy_by_{key}"] = {k: sum(v) / len(v) for k, v in sorted(buckets.items())}
    lengths = [s["num_tokens"] for s in samples]
    out["mean_length"] = sum(lengths) / len(lengths)
    out["median_length"] = statistics.median(lengths)
    think = [s.get("think_tokens", 0) for s in samples]
    if any(think):  # a reasoning model's <think> block and the answer after it, separately
        out["mean_think_length"] = sum(think) / len(think)
        out["mean_answer_length"] = out["mean_length"] - out["mean_think_length"]
    out["truncation_rate"] = sum(not s["finished"] for s in samples) / len(samples)
    out["no_answer_rate"] = sum(s[f"status_{mode}"] == "no_answer" for s in samples) / len(samples)
    out["status_counts"] = dict(Counter(s[f"status_{mode}"] for s in samples))
    out["behaviour_rates_proxy"] = {b: sum(bool(rx.search(s["response"])) for s in samples) / len(samples)
                                    for b, rx in BEHAVIOURS.items()}
    out["repetition_rate"] = sum(repeats(s["response"]) for s in samples) / len(samples)
    seconds = sum(s.get("seconds", 0.0) for s in samples)
    if seconds:
        out["seconds"] = seconds
        out["tokens_per_s"] = sum(lengths) / seconds
    return out


def evaluate(model, tokenizer, records, out_dir=None, extract="strict", **kw):
    """Sample and grade (sample_records; `kw` are its settings), then summarise: the summary dict, also
    written to out_dir/summary.json."""
    return write_summary(sample_records(model, tokenizer, records, out_dir, extract=extract, **kw), extract, out_dir)


def write_summary(lines, extract, out_dir=None):
    summary = summarize(lines, extract)
    if out_dir:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def append_samples(path, lines):
    """Sample lines added to samples.jsonl and flushed to disk, so a kill loses at most the batch in flight
    (a line it cut off is dropped first, so that the next line starts on a line of its own)."""
    if os.path.isfile(path):
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(s) + "\n" for s in lines))
        f.flush()
        os.fsync(f.fileno())


def sample_records(model, tokenizer, records, out_dir=None, samples=1, temperature=0.0, top_p=1.0,
                   max_new_tokens=1024, prompt="paper", extract="strict", batch_size=32, seed=0, progress=True,
                   workers=None, compiled=False):
    """Sample `samples` responses per record and grade them in both harnesses; returns the sample lines,
    record by record. With `out_dir`, lines are appended to out_dir/samples.jsonl batch by batch and
    finished batches are skipped on a rerun. `compiled`: generate's compiled decode step (--compile)."""
    from tqdm import tqdm
    from rlsp import sample
    work = [(r, k) for r in records for k in range(samples)]
    path = os.path.join(out_dir, "samples.jsonl") if out_dir else None
    done = {(s["id"], s["sample"]): s for s in read_samples(out_dir)} if path and os.path.isfile(path) else {}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if all((r.id, k) in done for r, k in work):
        return [done[(r.id, k)] for r, k in work]
    bar = tqdm(total=len(work), desc="eval", disable=not progress, dynamic_ncols=True)
    bar.update(sum((r.id, k) in done for r, k in work))
    for b, start in enumerate(range(0, len(work), batch_size)):
        # What this batch still needs: all of it, or (after a larger --limit) the problems past the old end.
        batch = [(r, k) for r, k in work[start:start + batch_size] if (r.id, k) not in done]
        if not batch:
            continue
        t0 = time.perf_counter()
        # The seed depends on the batch index only, so a resumed run redraws exactly the same samples.
        outs = sample(model, tokenizer, [r.problem for r, _ in batch], 1, max_new_tokens, temperature, top_p,
                      prompt, seed=seed + b, compiled=compiled)
        share = (time.perf_counter() - t0) / len(batch)
        responses = [c.text for c in outs]
        golds = [r.answer for r, _ in batch]
        verdicts = {m: grade_batch(responses, golds, mode="last_boxed" if m == "strict" else "paper", workers=workers)
                    for m in ("strict", "paper")}
        lines = []
        for i, ((r, k), c, text) in enumerate(zip(batch, outs, responses)):
            thinking = split_thinking(text)[0]
            s = {"id": r.id, "sample": k, "prompt": tokenizer.decode(c.prompt_ids), "response": text, "answer": r.answer,
                 "num_tokens": len(c.tokens), "finished": c.finished, "seconds": share,
                 "think_tokens": min(len(c.tokens), len(tokenizer.encode(thinking))) if thinking else 0,
                 "level": r.meta.get("level"), "subject": r.meta.get("subject")}
            for m, vs in verdicts.items():
                s[f"extracted_{m}"], s[f"status_{m}"], s[f"correct_{m}"] = vs[i].answer, vs[i].status, vs[i].correct
            s["extracted"], s["status"], s["correct"] = s[f"extracted_{extract}"], s[f"status_{extract}"], s[f"correct_{extract}"]
            lines.append(s)
            done[(r.id, k)] = s
        if path:
            append_samples(path, lines)
        bar.update(len(batch))
        finished = [done[(r.id, k)] for r, k in work if (r.id, k) in done]
        bar.set_postfix(acc=f"{sum(s['correct'] for s in finished) / len(finished):.3f}")
    bar.close()
    return [done[(r.id, k)] for r, k in work]


def read_samples(run_dir):
    """A run folder's sample lines, one per (problem, sample): a last line cut off by a kill is left out
    (its batch is redone); any other bad line is an error naming the file and the line."""
    path = os.path.join(run_dir, "samples.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (an eval run folder holds samples.jsonl)")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = {}
    for n, line in enumerate(lines[:-1], 1):  # the part after the last newline is complete only when empty
        if line.strip():
            try:
                s = json.loads(line)
                out[(s["id"], s["sample"])] = s
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: not a sample line (JSON with 'id' and 'sample')") from None
    return list(out.values())


def compare(run_a, run_b):
    """Print two runs side by side, and the paired per-problem difference with its 95% interval."""
    sa, sb = read_samples(run_a), read_samples(run_b)
    A, B = summarize(sa), summarize(sb)
    mode = A["extract"]
    acc = defaultdict(lambda: [[], []])
    for i, samples in enumerate((sa, sb)):
        for s in samples:
            acc[s["id"]][i].append(s[f"correct_{mode}"])
    paired = [sum(b) / len(b) - sum(a) / len(a) for a, b in acc.values() if a and b]
    if not paired:
        raise ValueError(f"{run_a} and {run_b} share no problems (different datasets?): nothing to compare")
    rows = [("accuracy_strict", "accuracy (strict)"), ("accuracy_paper", "accuracy (paper)"),
            ("mean_length", "mean length"), ("mean_think_length", "mean thinking length"),
            ("mean_answer_length", "mean answer length"), ("truncation_rate", "truncation rate"),
            ("no_answer_rate", "no-answer rate")]
    print(f"{'':24s} {os.path.basename(os.path.normpath(run_a)):>14s} {os.path.basename(os.path.normpath(run_b)):>14s} {'B - A':>10s}")
    for key, label in rows:
        if key in A or key in B:  # thinking lengths: reasoning models only
            a, b = A.get(key, 0.0), B.get(key, 0.0)
            print(f"{label:24s} {a:14.4f} {b:14.4f} {b - a:+10.4f}")
    diff, ci = mean_ci95(paired)
    verdict = "exceeds the noise" if ci[0] > 0 or ci[1] < 0 else "within the noise"
    print(f"paired difference ({mode}) on {len(paired)} problems: {diff:+.4f}, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]: {verdict}")
    return diff, ci


# Settings that decide what a run folder's samples are: adding to a folder written with other values
# would mix two experiments in one summary. (The seed of a batch is seed + batch index, so the batch
# size is one of them.)
RUN_SETTINGS = ("model", "data", "limit", "samples", "temperature", "top_p", "max_new_tokens", "prompt", "seed",
                "batch_size", "problem_field", "answer_field")


def check_out_folder(out, args):
    """Refuse to add samples to a folder written with other settings, naming each difference. A larger
    --limit is no other setting: the folder's samples are the first problems' and stay; the new problems
    are added. Returns the folder's saved settings ({} for a new folder)."""
    saved = os.path.join(out, "args.json")
    if not os.path.isfile(saved):
        if os.path.isfile(os.path.join(out, "samples.jsonl")):
            raise FileExistsError(f"{out} holds samples but no args.json saying how they were made; "
                                  f"choose another --out")
        return {}
    with open(saved) as f:
        old = json.load(f)
    grows = old.get("limit") is not None and (args.limit is None or args.limit > old["limit"])
    changed = cli.changed_flags(old, args, [k for k in RUN_SETTINGS if not (grows and k == "limit")],
                                vars(parser().parse_args([])))
    if changed:
        raise ValueError(f"{out} holds samples made with other settings ({'; '.join(changed)}); rerun with the "
                         f"same settings to resume it (a larger --limit adds problems), or choose another --out")
    return old


def parser():
    from cli import fraction, number, positive
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", help="HF model folder")
    p.add_argument("--data", default="math500", help="dataset name (math500, aime24, gsm8k, ...) or a JSONL file")
    p.add_argument("--data-dir", default=None, help="folder of dataset files (default: $RLSP_DATA_DIR, else download)")
    p.add_argument("--samples", type=positive, default=1, help="samples per problem")
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--max-new-tokens", type=positive, default=1024, help="tokens per answer at most")
    p.add_argument("--prompt", default="paper", help="paper | boxed | a template with {problem}")
    p.add_argument("--extract", default="strict", choices=("strict", "paper"), help="grading harness for `accuracy`")
    p.add_argument("--limit", type=positive, default=None, help="first N problems")
    p.add_argument("--batch-size", type=positive, default=32, help="responses sampled at once")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (batch b draws with seed + b)")
    p.add_argument("--out", default=None, help="run folder (default: runs/eval-DATA)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights the sampler reads: auto = bf16 on GPU; on CPU fp32, or bf16 where the CPU has bf16 "
                        "units and it measures faster (model.sampling_dtype)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (torch.compile; CUDA graphs on GPU): default on GPU, off on CPU")
    p.add_argument("--problem-field", default="problem", help="for a JSONL file")
    p.add_argument("--answer-field", default="answer", help="for a JSONL file")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two finished runs")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.model:
        p.error("--model is required (or --compare RUN_A RUN_B)")
    if args.temperature == 0 and args.samples > 1:
        p.error(f"--samples {args.samples} with --temperature 0 draws the same greedy response {args.samples} times; "
                f"use --temperature > 0 (e.g. 0.6) or --samples 1")
    import torch
    from model import (Config, Tokenizer, Transformer, compile_decode, default_device, default_dtype, local_folder,
                       sampling_dtype)
    cli.check_device(p, args.device)
    out = args.out or os.path.join("runs", f"eval-{os.path.splitext(os.path.basename(args.data))[0]}")
    records = load_dataset(args.data, args.data_dir, limit=args.limit, problem_field=args.problem_field,
                           answer_field=args.answer_field)
    if not records:
        raise ValueError(f"{args.data}: no problems to evaluate")
    saved = check_out_folder(out, args)
    done = {(s["id"], s["sample"]) for s in read_samples(out)} if os.path.isfile(os.path.join(out, "samples.jsonl")) \
        else set()
    if all((r.id, k) in done for r in records for k in range(args.samples)):
        print(f"{out} is complete: all {len(records)} problems x {args.samples} samples were evaluated; its summary:")
        s = write_summary([s for s in read_samples(out) if s["id"] in {r.id for r in records}], args.extract, out)
        print_summary(args, s, out)
        return s
    device = default_device(args.device)
    path = local_folder(args.model)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else sampling_dtype(Config.from_pretrained(path), device)
    used = str(dtype).removeprefix("torch.")
    if saved:  # the precision the folder's samples were drawn in (before --dtype: the default)
        before = saved.get("dtype_used", str(default_dtype(device)).removeprefix("torch."))
        if before != used:
            raise ValueError(f"{out} holds samples drawn in {before}; this run would sample in {used} (--dtype "
                             f"{args.dtype}): pass --dtype {before} to resume it, or choose another --out")
    model = Transformer.from_pretrained(path, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump({**vars(args), "dtype_used": used}, f, indent=2)
    cli.interrupt_note = f"finished batches are kept in {os.path.join(out, 'samples.jsonl')}; rerun the same command to continue"
    s = evaluate(model, tokenizer, records, out, args.extract, samples=args.samples, temperature=args.temperature,
                 top_p=args.top_p, max_new_tokens=args.max_new_tokens, prompt=args.prompt, batch_size=args.batch_size,
                 seed=args.seed, compiled=compile_decode(args.compile, device))
    print_summary(args, s, out)
    return s


def print_summary(args, s, out):
    lo, hi = s["ci95"]
    print(f"{args.data}: accuracy ({args.extract}) {s['accuracy']:.4f} [95% CI {lo:.4f}, {hi:.4f}] | "
          f"strict {s['accuracy_strict']:.4f} paper {s['accuracy_paper']:.4f} | n={s['n_problems']} x {s['samples_per_problem']} | "
          f"mean length {s['mean_length']:.0f}" +
          (f" (thinking {s['mean_think_length']:.0f}, answer {s['mean_answer_length']:.0f})" if "mean_think_length" in s else "") +
          f" | truncated {s['truncation_rate']:.3f} | no answer {s['no_answer_rate']:.3f}")
    print(f"summary: {os.path.join(out, 'summary.json')}")


if __name__ == "__main__":
    cli.run(main)
