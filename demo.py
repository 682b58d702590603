"""The CPU demo, and the tiny run for trying a change; both started by train.py.

    python train.py                               # the demo: SFT then RLSP from scratch, offline, ~5 minutes
    python train.py --tiny --stage rl --advantage rloo   # two steps of a 2-layer model, in seconds

The demo builds a small Llama (a character-level tokenizer, 4 layers x 128) and teaches it synthetic
arithmetic (sums of ten one-digit numbers) by SFT on three styles of demonstration, then improves it with
RLSP, and prints SFT against SFT + RLSP on 500 held-out problems. The tiny run is the same model with 2
layers and the same task: two steps of either stage with whatever flags are given, for seeing a change to
rlsp.py work end to end before a real run.
"""
import json
import os
import random
import tempfile
import time

import torch

import cli

# Flags the demo reads; any other flag without --model is a mistake (the stages need a checkpoint).
FLAGS = ("out", "seed", "exploration", "alpha", "device")


def add_arguments(p):
    """The demo's flags, in train.py's parser."""
    from cli import number, positive
    g = p.add_argument_group("the demo (python train.py with no --model)")
    g.add_argument("--demo-problems", type=number(int, 4), default=20000, help="synthetic problems: half SFT, half RL")
    g.add_argument("--demo-heldout", type=positive, default=500, help="held-out problems for the final table")
    g.add_argument("--demo-sft-steps", type=positive, default=1000, help="SFT steps")
    g.add_argument("--demo-sft-batch", type=positive, default=8, help="SFT rows of 256 tokens per step")
    g.add_argument("--demo-rl-steps", type=positive, default=40, help="RL steps (16 problems x 8 samples)")
    g.add_argument("--demo-rl-lr", type=number(float, 0, low_open=True), default=1e-4, help="the RL stage's peak "
                   "learning rate")
    g.add_argument("--demo-rl-temperature", type=number(float, 0, low_open=True), default=1.0,
                   help="sampling temperature (paper: 0.7)")
    g.add_argument("--demo-sft", metavar="DEMO_OUT", default=None,
                   help="start RL from that finished demo's SFT model instead of training SFT again (the same "
                        "--seed, --demo-mix and SFT flags give the same model): compare --exploration values")
    g.add_argument("--demo-mix", default="direct:3,steps:1,checked:1",
                   help="demonstration styles and weights: direct (box only), steps, checked (steps + verify)")
    g.add_argument("--demo-length-c", type=number(float, 0), default=16.0,
                   help="C for 64-token responses: the paper's 1000 for 4096 tokens, scaled (1000 * 64 / 4096)")


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tokenizer(path, tk, chat_template, eos, pad):
    """A `tokenizers` tokenizer saved as a model folder's tokenizer files: tokenizer.json, its chat template,
    end and padding tokens in tokenizer_config.json, the end token as the stop id in generation_config.json."""
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": chat_template, "eos_token": eos, "pad_token": pad}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [tk.token_to_id(eos)]}, f)


def build_model(path, seed=0, layers=4):
    """A small Llama from scratch in HF layout (128 wide): a character-level tokenizer trained with
    `tokenizers` on the task's alphabet, a chat template, and randomly initialised weights."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from model import Config, Transformer
    specials = ["<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    alphabet = "0123456789+=\n\\boxed{}Problem: system verify abcdefghij"
    tk.train_from_iterator([alphabet], trainers.BpeTrainer(vocab_size=len(specials) + len(set(alphabet)),
                                                           special_tokens=specials, show_progress=False))
    write_tokenizer(path, tk, TEMPLATE, "<|end|>", "<|pad|>")
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": tk.get_vocab_size(),
           "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
           "rope_theta": 10000.0, "tie_word_embeddings": False, "eos_token_id": tk.token_to_id("<|end|>"),
           "pad_token_id": tk.token_to_id("<|pad|>")}
    torch.manual_seed(seed)
    model = Transformer(Config.from_dict(raw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(path)
    return path


def parse_mix(text):
    """--demo-mix "direct:2,steps:1,checked:1" -> (["direct", "steps", "checked"], [2.0, 1.0, 1.0])."""
    styles, weights = [], []
    for part in text.split(","):
        name, _, w = (s.strip() for s in part.partition(":"))
        if name not in ("direct", "steps", "checked"):
            raise ValueError(f"--demo-mix {text!r}: unknown style {name!r} (expected direct, steps or checked)")
        try:
            weights.append(float(w or 1))
        except ValueError:
            raise ValueError(f"--demo-mix {text!r}: weight {w!r} of {name} is not a number") from None
        styles.append(name)
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--demo-mix {text!r}: weights must be >= 0 with a positive sum")
    return styles, weights


def run(args):
    """`python train.py`: SFT then RLSP on synthetic arithmetic, from scratch, on a CPU, in minutes."""
    import train
    from data import arithmetic
    from eval import evaluate, mean_ci95, read_samples
    from model import Tokenizer, Transformer, default_device
    out = args.out
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise FileExistsError(f"{out} is not empty: remove it or pass another --out")
    cli.interrupt_note = f"the demo's partial run is in {out}; remove it to run the demo again"
    t0 = time.perf_counter()
    base = build_model(os.path.join(out, "base"), args.seed)
    problems = arithmetic(args.demo_problems + args.demo_heldout, seed=args.seed, terms=10, digits=1, labels=True)
    heldout, pool = problems[:args.demo_heldout], problems[args.demo_heldout:]
    half = len(pool) // 2
    styles, weights = parse_mix(args.demo_mix)
    rng = random.Random(args.seed)
    with open(os.path.join(out, "sft.jsonl"), "w") as f:
        for r in pool[:half]:
            f.write(json.dumps({"prompt": r.problem, "response": r.meta[rng.choices(styles, weights)[0]]}) + "\n")
    with open(os.path.join(out, "rl.jsonl"), "w") as f:
        for r in pool[half:]:
            f.write(json.dumps({"problem": r.problem, "answer": r.answer}) + "\n")
    device = default_device(args.device)  # every stage and the eval on it
    common = ["--seed", str(args.seed), "--eval-every", "0", "--save-every", "1000000", "--warmup-steps", "10",
              "--device", device]
    sft = os.path.join(args.demo_sft or out, "sft")
    if args.demo_sft:  # that demo's SFT model, if it was trained on exactly these demonstrations for as long
        prev = os.path.join(args.demo_sft, "sft.jsonl")
        if not (os.path.isfile(prev) and os.path.isfile(os.path.join(sft, "final", "model.safetensors"))):
            raise FileNotFoundError(f"--demo-sft {args.demo_sft}: no finished demo there (sft.jsonl and sft/final)")
        with open(prev) as a, open(os.path.join(out, "sft.jsonl")) as b, open(os.path.join(sft, "args.json")) as c:
            saved = json.load(c)
            if a.read() != b.read() or (saved["max_steps"], saved["batch_size"]) != (args.demo_sft_steps, args.demo_sft_batch):
                raise ValueError(f"--demo-sft {args.demo_sft}: its SFT stage differs from this run's (another --seed, "
                                 f"--demo-mix, --demo-problems, --demo-sft-steps or --demo-sft-batch)")
    else:
        train.main(["--stage", "sft", "--model", base, "--data", os.path.join(out, "sft.jsonl"), "--out", sft,
                    "--seq-len", "256", "--batch-size", str(args.demo_sft_batch), "--micro-batch-size",
                    str(args.demo_sft_batch), "--lr", "3e-3",
                    "--heldout", "64", "--max-steps", str(args.demo_sft_steps), *common,
                    "--eval-every", "100"])  # the held-out loss every 100 steps (a no-grad pass: training is unchanged)
    train.main(["--stage", "rl", "--model", os.path.join(sft, "final"), "--data", os.path.join(out, "rl.jsonl"),
                "--out", os.path.join(out, "rlsp"), "--prompts-per-step", "16", "--group-size", "8",
                "--max-new-tokens", "128", "--temperature", str(args.demo_rl_temperature), "--lr", str(args.demo_rl_lr),
                "--max-steps", str(args.demo_rl_steps), "--exploration", args.exploration,
                "--length-c", str(args.demo_length_c), "--alpha", str(args.alpha), "--episodes-every", "10", *common])
    table = {}
    for stage in ("sft", "rlsp"):
        folder = os.path.join(sft if stage == "sft" else os.path.join(out, stage), "final")
        s = evaluate(Transformer.from_pretrained(folder, device=device), Tokenizer.from_pretrained(folder), heldout,
                     os.path.join(out, f"eval-{stage}"), max_new_tokens=128, batch_size=250, progress=False)
        table[stage] = s
    summary = {"heldout_n": len(heldout), "exploration": args.exploration, "seconds": time.perf_counter() - t0}
    for stage, s in table.items():
        summary[f"{stage}_accuracy"], summary[f"{stage}_ci95"] = s["accuracy"], s["ci95"]
        summary[f"{stage}_mean_length"] = s["mean_length"]
        summary[f"{stage}_verification_rate"] = s["behaviour_rates_proxy"]["verification"]
    by_id = [sorted(read_samples(os.path.join(out, f"eval-{stage}")), key=lambda x: (x["id"], x["sample"]))
             for stage in ("sft", "rlsp")]
    paired = [b["correct"] - a["correct"] for a, b in zip(*by_id)]
    summary["gain"], summary["gain_ci95"] = mean_ci95(paired)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    figure = summary_figure(summary, os.path.join(out, "summary.png"))
    print(f"\nheld-out synthetic arithmetic, {len(heldout)} problems, greedy")
    print("| stage | accuracy | 95% CI | mean length | verifies |\n|---|---:|---:|---:|---:|")
    for stage, name in (("sft", "SFT"), ("rlsp", f"SFT + RLSP ({args.exploration})")):
        lo, hi = summary[f"{stage}_ci95"]
        print(f"| {name} | {summary[f'{stage}_accuracy']:.1%} | [{lo:.1%}, {hi:.1%}] | "
              f"{summary[f'{stage}_mean_length']:.1f} | {summary[f'{stage}_verification_rate']:.1%} |")
    lo, hi = summary["gain_ci95"]
    print(f"gain {summary['gain']:+.1%} (paired 95% CI [{lo:+.1%}, {hi:+.1%}])")
    print(f"demo: {summary['seconds']:.0f} s in all; {os.path.join(out, 'summary.json')}, {figure}; each stage's "
          f"curves in {os.path.join(out, 'sft', 'curves.png')} and {os.path.join(out, 'rlsp', 'curves.png')}")
    return summary


def summary_figure(summary, path):
    """The demo's result as a picture: held-out accuracy of SFT and SFT + RLSP with 95% intervals, their mean
    response length and the share of answers with a verification line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["SFT", f"SFT + RLSP\n({summary['exploration']})"]
    stages = ("sft", "rlsp")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    acc = [summary[f"{s}_accuracy"] * 100 for s in stages]
    err = [[a - summary[f"{s}_ci95"][0] * 100 for a, s in zip(acc, stages)],
           [summary[f"{s}_ci95"][1] * 100 - a for a, s in zip(acc, stages)]]
    axes[0].bar(names, acc, yerr=err, capsize=6, color=["#999999", "#3b75af"])
    lo, hi = summary["gain_ci95"]
    axes[0].set_title(f"held-out accuracy, % (95% CI)\ngain {summary['gain']:+.1%} [{lo:+.1%}, {hi:+.1%}]", fontsize=10)
    axes[1].bar(names, [summary[f"{s}_mean_length"] for s in stages], color=["#999999", "#3b75af"])
    axes[1].set_title("mean response length, tokens", fontsize=10)
    axes[2].bar(names, [summary[f"{s}_verification_rate"] * 100 for s in stages], color=["#999999", "#3b75af"])
    axes[2].set_title("answers with a verification line, %", fontsize=10)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"the demo: {summary['heldout_n']} held-out problems, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# Defaults of the tiny run, for flags left at train.py's defaults: two quick steps of either stage.
TINY = dict(max_steps=2, warmup_steps=1, lr=1e-3, seq_len=128, batch_size=8, micro_batch_size=8, heldout=8,
            prompts_per_step=4, group_size=4, max_new_tokens=24, temperature=1.0, length_c=4.0, eval_every=0,
            episodes_every=0)


def tiny(args):
    """`python train.py --tiny [--stage rl] [flags]`: a 2-layer model of the demo's kind with its tokenizer,
    200 synthetic arithmetic problems (SFT: worked solutions; RL: problem and answer), then train.py's
    stage with the given flags (TINY's defaults where none is given), each step's line printed. In a new
    temporary folder unless --out names one; nothing is downloaded."""
    import train
    from data import arithmetic
    args.out = args.out or tempfile.mkdtemp(prefix="rlsp-tiny-")
    args.model = build_model(os.path.join(args.out, "model"), args.seed, layers=2)
    args.data = os.path.join(args.out, f"{args.stage}.jsonl")
    with open(args.data, "w") as f:
        for r in arithmetic(200, seed=args.seed, terms=3, digits=1):
            row = {"prompt": r.problem, "response": r.meta["steps"]} if args.stage == "sft" else \
                {"problem": r.problem, "answer": r.answer}
            f.write(json.dumps(row) + "\n")
    args.out = os.path.join(args.out, args.stage)
    return train.train(args)
