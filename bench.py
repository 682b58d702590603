"""Speed of rlsp against transformers on the same model, batch, lengths and dtype, in one run.

    python bench.py                                   # CPU: SmolLM2-135M-Instruct fp32, 16 prompts x 128 tokens
    python bench.py --device cuda --dtype bfloat16    # GPU: random weights at Qwen2.5-0.5B / 1.5B shapes

Three measurements, each printed as rlsp, transformers and the ratio: sampling (new tokens/s, every
row forced to full length), prefill (prompt tokens/s) and a training forward+backward (tokens/s). A
fourth compares RL rollouts of G samples per prompt with one prefill per group against G prefills.
`--measures rlstep` times one whole RL step against TRL's GRPOTrainer on the same work (SmolLM2; on GPU
with `--device cuda`, bf16 autocast on both sides).
Sampling runs on two prompt sets (the first MATH-500 prompts, of mixed lengths, and MATH-500 prompts of
similar length) in every precision rlsp may sample in here (fp32, and bf16 where the CPU has bf16 units;
bf16 on GPU), and each side is reported as a share of the memory-bandwidth limit: a decode step must at
least read every weight and the KV cache written so far once, against a measured copy's bytes/s (a GPU
card's spec where known).
"""
import argparse
import functools
import json
import math
import os
import tempfile
import time

import torch

from model import COMPILE_STATS, Config, Tokenizer, Transformer, generate, native_bf16, sampling_dtype

# Real Qwen2.5 shapes (their config.json, minus the vocabulary files), for random-weight GPU runs.
QWEN_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True),
}
# bytes/s by the card's name, the first entry the name contains (so the PCIe and 40 GB parts come first)
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100-PCIE-40GB": 1.555e12,
                  "A100-SXM4-40GB": 1.555e12, "A100": 2.0e12}


def write_qwen_config(path, shape):
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, rms_norm_eps=1e-6,
               max_position_embeddings=32768, rope_theta=1000000.0, use_sliding_window=False,
               bos_token_id=151643, eos_token_id=151645, **QWEN_SHAPES[shape])
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def random_checkpoint(shape, folder):
    """Random weights at a real shape, saved in HF layout so both implementations load the same tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM
    write_qwen_config(folder, shape)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def timed(fn, device, repeats=1):
    fn()  # warm-up (kernels, allocator, lazy init)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def prompts_for(args, vocab_size, uniform=False):
    """Different prompts of different lengths: the first `--batch` MATH-500 problems through the chat template
    when the model has a tokenizer, else random ids of 40-120 tokens. `uniform`: prompts of similar length
    instead, the `--batch` MATH-500 prompts nearest the median length (random ids: all 80 tokens)."""
    g = torch.Generator().manual_seed(0)
    data = os.path.join(args.data_dir, "math500.jsonl")
    if os.path.isfile(os.path.join(args.model, "tokenizer.json")) and os.path.isfile(data):
        tok = Tokenizer.from_pretrained(args.model)
        with open(data) as f:
            problems = [json.loads(line)["problem"] for line in f]
        if not uniform:
            return [tok.apply_chat_template([{"role": "user", "content": p}])[:args.max_prompt]
                    for p in problems[:args.batch]]
        ids = [tok.apply_chat_template([{"role": "user", "content": p}])[:args.max_prompt] for p in problems]
        median = sorted(len(x) for x in ids)[len(ids) // 2]
        return sorted(ids, key=lambda x: (abs(len(x) - median), len(x)))[:args.batch]
    lengths = [80] * args.batch if uniform else torch.randint(40, 121, (args.batch,), generator=g).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def memory_bandwidth(device, mib=512, repeats=5):
    """Bytes/s this machine moves: the best of `repeats` copies of a `mib` MiB buffer (read + write)."""
    a = torch.ones(mib * 2**18, device=device)  # fp32: 4 bytes each
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy faults the pages in
        sync()
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def step_bytes(model, prompts, new_tokens):
    """Bytes a decode step must read at least: every weight once (a tied head once) and the KV cache written
    so far, at the mean context over the run."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * elem
    mean_ctx = sum(len(p) for p in prompts) / len(prompts) + new_tokens / 2
    kv = len(prompts) * mean_ctx * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * elem
    return weights + kv


def bench_sampling(args, ours, ref, prompts, device):
    """New tokens/s of rlsp's sampler (eager, and compiled unless --no-compile) and transformers': a short
    warm-up (where the compiled step compiles: its compile time is printed, not counted), then `--repeats`
    runs interleaved (rlsp, transformers, rlsp compiled, rlsp, ...) so background noise hits all alike;
    each side's best run is reported, as {side: tokens/s}. A compiled run's CUDA graphs are captured
    during the run (each generate call captures its own), so their cost is counted."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)

    def run_ours(n, compiled=False):
        outs = generate(ours, prompts, n, temperature=0, compiled=compiled)
        assert all(len(c.tokens) == n for c in outs)

    def run_ref(n):
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)
        assert out.shape[1] == P + n

    sides = {"rlsp": run_ours, "transformers": run_ref}
    if args.compile:
        sides["rlsp compiled"] = functools.partial(run_ours, compiled=True)
    compile_s, compiles = COMPILE_STATS["seconds"], COMPILE_STATS["compiles"]
    for fn in sides.values():
        fn(2)
    if args.compile:
        print(f"compiled decode step: {COMPILE_STATS['compiles'] - compiles} compile(s), "
              f"{COMPILE_STATS['seconds'] - compile_s:.1f} s (in the warm-up, not timed)")
        compiles = COMPILE_STATS["compiles"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(args.repeats):
        for side, fn in sides.items():
            sync()
            t0 = time.perf_counter()
            fn(args.new_tokens)
            sync()
            best[side] = min(best[side], time.perf_counter() - t0)
    if args.compile and COMPILE_STATS["compiles"] != compiles:
        print(f"warning: the compiled step compiled {COMPILE_STATS['compiles'] - compiles} more time(s) during the "
              f"timed runs (their time is counted)")
    n_new = args.batch * args.new_tokens
    return {side: n_new / t for side, t in best.items()}


def bench_group_rollout(args, ours, prompts, device):
    """RL rollouts of `--group-prompts` prompts x `--group-size` samples (temperature 1, every row forced to
    `--new-tokens`): each prompt prefilled once and its cache copied to its G rows (`samples=G`), against the
    G copies of each prompt prefilled separately (the rollout before group prefill). Best of `--repeats`,
    interleaved. Returns new tokens/s of both."""
    prompts, G = prompts[:args.group_prompts], args.group_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def grouped():
        return generate(ours, prompts, args.new_tokens, temperature=1.0, seed=0, samples=G)

    def duplicated():
        return generate(ours, [p for p in prompts for _ in range(G)], args.new_tokens, temperature=1.0, seed=0)

    same = [a.tokens == b.tokens for a, b in zip(grouped(), duplicated())]
    if device.type == "cpu" and next(ours.parameters()).dtype == torch.float32:
        assert all(same)  # fp32 on CPU: the same rollouts, token for token
    # Elsewhere (bf16, GPU) GEMMs over 4 and 32 rows round differently, and at temperature 1 one flipped
    # draw changes the rest of a row: the two sides then sample equally, not identically.
    print(f"rollout bench: {sum(same)} of {len(same)} rows token-identical between the two ways")
    best = [float("inf"), float("inf")]
    for _ in range(args.repeats):
        for i, fn in enumerate((grouped, duplicated)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    n_new = len(prompts) * G * args.new_tokens
    return n_new / best[0], n_new / best[1]


def bench_verifier(args):
    """Verdicts/s of the outcome verifier: the 500 MATH-500 reference solutions against their answers and
    against the next problem's answer (1,000 verdicts), with 2 worker processes and with 1, mean of 3 after
    a warm-up run."""
    from verifier import grade_batch
    with open(os.path.join(args.data_dir, "math500.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    responses = [r["solution"] for r in rows] * 2
    golds = [r["answer"] for r in rows] + [rows[(i + 1) % len(rows)]["answer"] for i in range(len(rows))]
    print(f"\n| {'verifier, MATH-500 references + mismatches':<44} | {'verdicts/s':>10} |\n|{'-' * 46}|{'-' * 12}|")
    for workers in (2, 1):
        seconds = timed(lambda: grade_batch(responses, golds, workers=workers), torch.device("cpu"), 3)
        label = f"{workers} worker process{'es' if workers > 1 else ''} ({len(responses)} verdicts)"
        print(f"| {label:<44} | {len(responses) / seconds:10.0f} |")


def uniform_problems(tokenizer, n, prompt_tokens, prompt="paper"):
    """n problems ("i: 7 7 7 ...") whose prompts are exactly `prompt_tokens` tokens through the chat template,
    as the memory plan assumes (it plans every prompt at one length); the answer is 0."""
    from data import Record, render_prompt
    out = []
    for i in range(n):
        text, length = f"{i}:", len(render_prompt(tokenizer, f"{i}:", prompt))
        while length < prompt_tokens:  # grow by a piece that adds tokens without passing the target
            grown = [(len(render_prompt(tokenizer, text + piece, prompt)), piece) for piece in (" 7", "7", " x", "x", ".")]
            fits = [(k, piece) for k, piece in grown if length < k <= prompt_tokens]
            if not fits:
                raise ValueError(f"no problem renders to exactly {prompt_tokens} prompt tokens with this tokenizer")
            length, piece = max(fits)
            text += piece
        out.append(Record(str(i), text, "0"))
    return out


def check_rl_memory_plan(args):
    """One real RL run (2 steps) of a random ~156M-parameter Llama on CPU, its peak resident memory above
    the process's footprint before the model was loaded, against rlsp.memory_estimate's CPU plan (fp32
    activations and KV cache, the policy sampling itself) plus the CPU-only packed copy of the weights
    while sampling. The prompts are all 256 tokens long, as the plan assumes one prompt length. Prints
    both and their ratio (resident memory also holds what the C allocator keeps after frees)."""
    import shutil
    import subprocess
    import sys
    import rlsp
    import train
    from model import Config, kv_cache_bytes
    sys.path.insert(0, "tests")
    from conftest import _save_tiny
    prompt = 256
    with tempfile.TemporaryDirectory() as tmp:
        tiny = os.path.join(tmp, "tiny")
        _save_tiny(tiny, "llama")  # only for its tokenizer files
        path = os.path.join(tmp, "model")
        raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 1024,
               "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
               "num_key_value_heads": 4, "head_dim": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
               "rope_theta": 10000.0, "tie_word_embeddings": False}
        torch.manual_seed(0)
        Transformer(Config.from_dict(raw)).save_pretrained(path)
        for f in os.listdir(tiny):
            if f not in ("config.json", "model.safetensors"):
                shutil.copy(os.path.join(tiny, f), path)
        data = os.path.join(tmp, "rl.jsonl")
        with open(data, "w") as f:
            for r in uniform_problems(Tokenizer.from_pretrained(path), 16, prompt):
                f.write(json.dumps({"problem": r.problem, "answer": r.answer}) + "\n")
        argv = ["--stage", "rl", "--model", path, "--data", data, "--prompts-per-step", "8", "--group-size", "8",
                "--max-new-tokens", "128", "--temperature", "1.0", "--micro-batch-tokens", "4096", "--max-steps", "2",
                "--eval-every", "0", "--save-every", "100", "--rollout-dtype", "float32",  # the CPU plan's sampler
                "--out", os.path.join(tmp, "run")]
        code = ("import json, os, sys; sys.path.insert(0, '.'); import train\n"
                "rss = lambda: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS'))) / 2**20\n"
                "base = rss(); train.main(sys.argv[1:])\n"
                "rows = [json.loads(x) for x in open(os.path.join(sys.argv[-1], 'metrics.jsonl'))]\n"
                "print('MEASURED', rows[-1]['peak_mem_gib'] - base)")
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"the RL run failed:\n{p.stderr[-3000:]}")
        measured = float(p.stdout.split("MEASURED")[1])
        cfg = Config.from_dict(raw)
        s = rlsp.Settings.from_args(train.parse_args(argv))
        n, held, sampling, training = rlsp.memory_estimate(cfg, s, 8, False, gpu=False, prompt_tokens=prompt)
        sampling["packed weights (CPU only)"] = 4 * n
        gib = 2 ** 30
        est = sum(held.values()) + max(sum(sampling.values()), sum(training.values()))
        print(f"RL memory plan vs a real CPU run ({n / 1e6:.0f}M parameters, 8 x 8 rollouts of {prompt} + 128 tokens, "
              f"micro-batches of 4096 tokens, fp32):")
        print(f"  estimate {est / gib:.2f} GiB (held {sum(held.values()) / gib:.2f}, sampling "
              f"{sum(sampling.values()) / gib:.2f} incl. KV cache {kv_cache_bytes(cfg, 64, prompt + 128, 4) / gib:.2f}, "
              f"training {sum(training.values()) / gib:.2f})")
        print(f"  measured peak RSS above the pre-load footprint {measured:.2f} GiB: estimate / measured = "
              f"{est / gib / measured:.2f}")


# ----------------------------------------------------------------------------- RL step vs TRL

RL_STEP = dict(prompts=8, group=4, new_tokens=96, temperature=1.0, lr=1e-6, seed=0)  # the issue-16 setting


def rl_step_problems(data_dir, steps):
    """The GSM8K-train problems rlsp's train.py reads at steps 0..steps-1 (P per step), in that order, so
    TRL can be given exactly the same ones (its sampler unshuffled)."""
    import train
    from data import load_dataset
    records = load_dataset("gsm8k_train", data_dir)
    return [records[i] for step in range(steps)
            for i in train.step_rows(records, step, RL_STEP["prompts"], RL_STEP["seed"])]


def rl_steps_ours(model, data_dir, steps, out, device="cpu", rollout_dtype=None):
    """`steps` RL steps of train.py in a fresh process; per step (generation, training, total) seconds and
    the new tokens it sampled, from its metrics.jsonl."""
    import subprocess
    import sys
    c = RL_STEP
    argv = ["--stage", "rl", "--model", model, "--data", "gsm8k_train", "--data-dir", data_dir,
            "--prompts-per-step", str(c["prompts"]), "--group-size", str(c["group"]),
            "--max-new-tokens", str(c["new_tokens"]), "--temperature", str(c["temperature"]), "--lr", str(c["lr"]),
            "--seed", str(c["seed"]), "--advantage", "grpo", "--loss-agg", "token-mean", "--kl-coef", "0",
            "--exploration", "none", "--ppo-epochs", "1", "--minibatches", "1", "--warmup-steps", "0",
            "--grad-clip", "1.0", "--weight-decay", "0",
            "--max-steps", str(steps), "--eval-every", "0", "--save-every", "1000000", "--device", device, "--out", out]
    if rollout_dtype:  # "float32" on CPU: TRL samples from its fp32 policy, so does rlsp (its default may be bf16)
        argv += ["--rollout-dtype", rollout_dtype]
    p = subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"the rlsp RL run failed:\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["rollout_seconds"], r["train_seconds"], r["tokens"] / r["tokens_per_s"], r["tokens"]) for r in rows]


def rl_steps_trl(model, data_dir, steps, out, device="cpu"):
    """The same steps with TRL's GRPOTrainer (no vLLM; fp32 weights, bf16 autocast on GPU as rlsp's
    trainer): the same problems in the same order,
    chat template, G, lengths, sampling, GRPO advantages (group std), token-mean loss (TRL's `dapo`), no KL,
    one update per rollout batch, AdamW at the same learning rate and clip, and rlsp's outcome reward.
    Generation is TRL's `_generate`; a step is the time between the trainer's step-begin and step-end
    callbacks; training is the step minus generation and scoring (the rest of
    `_generate_and_score_completions`). Runs in its own process (see bench_rl_step)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import rlsp
    from data import prompt_messages
    from verifier import grade
    c = RL_STEP
    problems = rl_step_problems(data_dir, steps)
    data = Dataset.from_list([{"prompt": prompt_messages(r.problem), "answer": r.answer} for r in problems])

    def outcome(completions, answer, **kw):
        return [rlsp.outcome_reward(grade(x[0]["content"], a)) for x, a in zip(completions, answer)]

    config = GRPOConfig(output_dir=out, per_device_train_batch_size=c["prompts"] * c["group"],
                        num_generations=c["group"], gradient_accumulation_steps=1,
                        max_completion_length=c["new_tokens"],
                        temperature=c["temperature"], top_p=1.0, top_k=0, beta=0.0, loss_type="dapo",
                        scale_rewards="group", num_iterations=1, learning_rate=c["lr"], lr_scheduler_type="constant",
                        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, max_steps=steps,
                        shuffle_dataset=False, bf16=device != "cpu", use_cpu=device == "cpu", report_to="none",
                        gradient_checkpointing=False,  # GRPOConfig's default is on; rlsp's run has it off
                        logging_steps=1,
                        save_strategy="no", seed=c["seed"], disable_tqdm=True)
    times, marks = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            marks.update(begin=time.perf_counter(), gen=0.0, score=0.0)

        def on_step_end(self, *a, **kw):
            total = time.perf_counter() - marks["begin"]
            times.append((marks["gen"], total - marks["gen"] - marks["score"], total, marks["tokens"]))

    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), reward_funcs=outcome,
                          args=config, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model),
                          callbacks=[Clock()])
    generate, score = trainer._generate, trainer._generate_and_score_completions

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        marks["gen"] += time.perf_counter() - t0
        marks["tokens"] = sum(len(ids) for ids in out[1])  # out: prompt ids, completion ids, ...
        return out

    def timed_score(*a, **kw):
        t0 = time.perf_counter()
        out = score(*a, **kw)
        marks["score"] += time.perf_counter() - t0 - marks["gen"]
        return out

    trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_score
    trainer.train()
    return times


def bench_rl_step(args):
    """One RL step of rlsp against one of TRL's GRPOTrainer on the same work (see rl_steps_trl), each side in
    its own fresh process, alternating (rlsp, TRL, rlsp, TRL, ...) for `--repeats` rounds of `--rl-steps`
    steps; the first step of a run is a warm-up, the others are averaged, and each side's fastest run is
    reported. Training excludes generation and scoring (grading) on both sides; total is the whole step."""
    import subprocess
    import sys
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.path.insert(0, "tests")
        from conftest import smollm2_path
        args.model = smollm2_path()
    steps = args.rl_steps
    best = {}
    cpu = args.device == "cpu"
    # Like for like, rlsp samples in fp32 on CPU as TRL does; where rlsp's own default (model.sampling_dtype)
    # is bf16 on this CPU, a third side shows the step as a user gets it.
    bf16 = cpu and sampling_dtype(Config.from_pretrained(args.model), torch.device("cpu")) == torch.bfloat16
    sides = ("rlsp", "trl") + (("rlsp, bf16 sampler",) if bf16 else ())
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for side in sides:
                out = os.path.join(tmp, f"{side.replace(', ', '-').replace(' ', '-')}-{r}")
                if side.startswith("rlsp"):
                    rows = rl_steps_ours(args.model, args.data_dir, steps, out, args.device,
                                         ("float32" if side == "rlsp" else "bfloat16") if cpu else None)
                else:
                    code = ("import json, sys; sys.path.insert(0, '.'); import bench\n"
                            "rows = bench.rl_steps_trl(*sys.argv[1:3], int(sys.argv[3]), *sys.argv[4:])\n"
                            "print('ROWS', json.dumps(rows))")
                    p = subprocess.run([sys.executable, "-c", code, args.model, args.data_dir, str(steps), out,
                                        args.device], capture_output=True, text=True)
                    if p.returncode:
                        raise SystemExit(f"the TRL run failed:\n{p.stderr[-3000:]}")
                    rows = json.loads(p.stdout.split("ROWS", 1)[1])
                timed_rows = rows[1:] or rows
                mean = [sum(x[k] for x in timed_rows) / len(timed_rows) for k in range(4)]
                steps_text = [f"step {i + 1}: {g:.1f} + {t:.1f} = {tot:.1f} s ({n} tokens)"
                              for i, (g, t, tot, n) in enumerate(rows)]
                print(f"  {side} run {r + 1}: " + ", ".join(steps_text), flush=True)
                if side not in best or mean[2] < best[side][2]:
                    best[side] = mean
    c = RL_STEP
    name = os.path.basename(os.path.normpath(args.model))
    weights = "fp32" if cpu else "fp32 weights, bf16 autocast"
    print(f"\nRL step, {name} {weights}, {device_name(torch.device(args.device))}: "
          f"{c['prompts']} GSM8K-train prompts x G={c['group']} x <= {c['new_tokens']} new tokens, temperature "
          f"{c['temperature']}, GRPO, token-mean loss, no KL, one update")
    print(f"| {'seconds per step':<16} | {'rlsp':>7} | {'TRL GRPOTrainer':>15} | {'ratio':>6} |")
    print(f"|{'-' * 18}|{'-' * 9}|{'-' * 17}|{'-' * 8}|")
    for k, name in enumerate(("generation", "training", "total")):
        a, b = best["rlsp"][k], best["trl"][k]
        print(f"| {name:<16} | {a:7.1f} | {b:15.1f} | {b / a:5.2f}x |")
    print(f"| {'new tokens':<16} | {best['rlsp'][3]:7.0f} | {best['trl'][3]:15.0f} |        |")
    if bf16:
        g, t, tot, n = best["rlsp, bf16 sampler"]
        print(f"rlsp with its default sampler on this CPU (a bf16 copy, model.sampling_dtype): generation {g:.1f} s, "
              f"training {t:.1f} s, total {tot:.1f} s ({best['trl'][2] / tot:.2f}x TRL's fp32 step), {n:.0f} tokens")
    precision = "fp32, no autocast, sampling in fp32 (rlsp --rollout-dtype float32)" if args.device == "cpu" else \
        "fp32 weights, bf16 autocast"
    print(f"Both sides: {precision}; gradient checkpointing off; no KL term (TRL beta 0, so its KL importance "
          f"correction does not apply); one update per rollout batch; AdamW(0.9, 0.95), lr {c['lr']}, no weight "
          f"decay, clip 1.0; the same problems, chat template, G, lengths and sampling; rlsp's outcome reward; "
          f"best of {args.repeats} runs each, the first step of a run a warm-up.")


def bench_prefill(args, ours, ref, device):
    ids = torch.randint(0, ours.config.vocab_size, (args.prefill_batch, args.prefill_len), device=device)
    with torch.inference_mode():
        t_ours = timed(lambda: ours.lm_head(ours.hidden_states(ids)[:, -1]), device, 3)
        t_ref = timed(lambda: ref(ids, logits_to_keep=1), device, 3)
    return ids.numel() / t_ours, ids.numel() / t_ref


def bench_training(args, ours, ref, device):
    ids = torch.randint(0, ours.config.vocab_size, (args.train_batch, args.train_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step_ours():
        with autocast:
            (-ours.logprobs(x, y).mean()).backward()

    def step_ref():
        with autocast:
            logits = ref(x).logits.float()
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()

    ours.train(), ref.train()
    t_ours, t_ref = timed(step_ours, device, 2), timed(step_ref, device, 2)
    ours.eval(), ref.eval()
    ours.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
    return x.numel() / t_ours, x.numel() / t_ref


def run(args, path, label, device, dtype):
    from transformers import AutoModelForCausalLM
    ours = Transformer.from_pretrained(path, device=device, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    measures = args.measures.split(",")
    rows, shares = [], []
    if "sampling" in measures:
        bandwidth = args.bandwidth
        for name, uniform in (("mixed-length prompts", False), ("uniform prompts", True)):
            prompts = prompts_for(args, ours.config.vocab_size, uniform)
            lengths = sorted(len(p) for p in prompts)
            print(f"{label}, {name}: {len(prompts)} of {lengths[0]}-{lengths[-1]} tokens "
                  f"(median {lengths[len(lengths) // 2]})")
            speed = bench_sampling(args, ours, ref, prompts, device)
            b = speed["transformers"]
            rows.append((f"sampling, {name}, new tokens/s", speed["rlsp"], b))
            if "rlsp compiled" in speed:
                rows.append((f"sampling, {name}, rlsp compiled", speed["rlsp compiled"], b))
            per_step = step_bytes(ours, prompts, args.new_tokens)  # one step makes `batch` tokens
            shares.append((name, f"{lengths[0]}-{lengths[-1]}", per_step,
                           *(speed.get(k, float("nan")) / args.batch * per_step / bandwidth
                             for k in ("rlsp", "rlsp compiled", "transformers"))))
    if "prefill" in measures:
        rows.append((f"prefill, tokens/s ({args.prefill_batch} x {args.prefill_len})",
                     *bench_prefill(args, ours, ref, device)))
    if "train" in measures:
        rows.append((f"train fwd+bwd, tokens/s ({args.train_batch} x {args.train_len})",
                     *bench_training(args, ours, ref, device)))
    print(f"\n{label} ({str(dtype).removeprefix('torch.')}, {device_name(device)}); sampling: batch {args.batch} x "
          f"{args.new_tokens} new tokens, greedy, every row to full length")
    if rows:
        print(f"| {'measure':<42} | {'rlsp':>9} | {'transformers':>12} | {'ratio':>6} |")
        print(f"|{'-' * 44}|{'-' * 11}|{'-' * 14}|{'-' * 8}|")
        for name, a, b in rows:
            print(f"| {name:<42} | {a:9.1f} | {b:12.1f} | {a / b:5.2f}x |")
    if shares:
        print(f"\nshare of the memory-bandwidth limit ({args.bandwidth / 1e9:.1f} GB/s {args.bandwidth_source}): bytes a "
              f"decode step must read (weights + mean KV cache) x steps/s")
        print(f"| {'prompts':<18} | {'tokens':>9} | {'MB/step':>8} | {'rlsp':>6} | {'rlsp compiled':>13} | "
              f"{'transformers':>12} |")
        print(f"|{'-' * 20}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 15}|{'-' * 14}|")
        for name, span, per_step, a, c, b in shares:
            compiled = f"{'-':>13}" if math.isnan(c) else f"{c:13.1%}"  # not timed under --no-compile
            print(f"| {name:<18} | {span:>9} | {per_step / 1e6:8.1f} | {a:6.1%} | {compiled} | {b:12.1%} |")
    if "rollout" in measures:
        a, b = bench_group_rollout(args, ours, prompts_for(args, ours.config.vocab_size), device)
        name = f"rollout, new tokens/s ({args.group_prompts} prompts x G={args.group_size} x {args.new_tokens})"
        print(f"\n| {'measure':<50} | {'one prefill per group':>21} | {'G prefills':>10} | {'ratio':>6} |")
        print(f"|{'-' * 52}|{'-' * 23}|{'-' * 12}|{'-' * 8}|")
        print(f"| {name:<50} | {a:21.1f} | {b:10.1f} | {a / b:5.2f}x |")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # the CPU's name and vector units: ratios and even tokens move with them (docs/speed.md)
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    except OSError:
        cpu = "CPU"
    units = torch.backends.cpu.get_cpu_capability() + (", native bf16" if native_bf16() else "")
    return f"{cpu} ({units}), {torch.get_num_threads()} threads"


def main(argv=None):
    import cli
    from cli import Parser, positive
    p = Parser(description=__doc__)
    p.add_argument("--model", default=os.path.join(".cache", "tests", "SmolLM2-135M-Instruct"),
                   help="HF model folder for the CPU run (default: the SmolLM2 test fixture)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="weights and compute (default: "
                   "fp32 on CPU, bf16 on GPU)")
    p.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b", help="GPU: random-weight shapes to bench")
    p.add_argument("--batch", type=positive, default=None, help="prompts (default: 16 on CPU, 64 on GPU)")
    p.add_argument("--new-tokens", type=positive, default=None, help="new tokens per prompt (default: 128 on CPU, "
                   "512 on GPU)")
    p.add_argument("--max-prompt", type=positive, default=4096, help="prompts are cut to this many tokens")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time rlsp's compiled decode step (torch.compile; CUDA graphs on GPU)")
    p.add_argument("--repeats", type=positive, default=3, help="timed sampling runs per implementation (best is kept)")
    p.add_argument("--prefill-batch", type=positive, default=4, help="prefill measure: prompts")
    p.add_argument("--prefill-len", type=positive, default=512, help="prefill measure: tokens per prompt")
    p.add_argument("--train-batch", type=positive, default=4, help="training measure: rows")
    p.add_argument("--train-len", type=positive, default=256, help="training measure: tokens per row")
    p.add_argument("--group-prompts", type=positive, default=4, help="rollout bench: prompts (each sampled G times)")
    p.add_argument("--group-size", type=positive, default=8, help="rollout bench: G, samples per prompt")
    p.add_argument("--rl-steps", type=positive, default=2, help="rlstep: steps per run (the first is a warm-up)")
    p.add_argument("--measures", default="sampling,prefill,train,rollout",
                   help="which measurements to run; `memory` alone checks the RL memory plan on CPU instead, "
                        "`verifier` alone measures the verifier's verdicts/s, `rlstep` alone compares one RL step "
                        "with TRL's GRPOTrainer (CPU, SmolLM2; --repeats rounds)")
    p.add_argument("--data-dir", default=os.environ.get("RLSP_DATA_DIR", os.path.join("..", "shared", "data")),
                   help="folder with math500.jsonl and gsm8k_train.jsonl ($RLSP_DATA_DIR when set)")
    args = p.parse_args(argv)
    measures = set(args.measures.split(","))
    if not measures <= {"sampling", "prefill", "train", "rollout"} and args.measures not in ("memory", "verifier", "rlstep"):
        p.error(f"--measures takes sampling, prefill, train, rollout (comma-separated), or memory, verifier or "
                f"rlstep alone (got {args.measures!r})")
    cli.check_device(p, args.device)
    if args.measures == "memory":
        return check_rl_memory_plan(args)
    if args.measures == "verifier":
        return bench_verifier(args)
    if args.measures == "rlstep":
        return bench_rl_step(args)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    # Every precision rlsp may sample in here, each on both sides: bf16 on GPU; on CPU fp32, and bf16 too
    # where the CPU multiplies bf16 natively (model.sampling_dtype picks between them for a run).
    dtypes = [getattr(torch, args.dtype)] if args.dtype else [torch.bfloat16] if gpu else \
        [torch.float32] + ([torch.bfloat16] if native_bf16() else [])
    args.batch = args.batch or (64 if gpu else 16)
    args.new_tokens = args.new_tokens or (512 if gpu else 128)
    name = torch.cuda.get_device_name(device) if gpu else ""
    spec = next((bw for k, bw in PEAK_BANDWIDTH.items() if k in name), None)
    args.bandwidth, args.bandwidth_source = (spec, "the card's spec") if spec else \
        (memory_bandwidth(device), "measured: a 512 MiB copy") if "sampling" in measures else (None, None)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        for shape in args.shapes.split(","):
            with tempfile.TemporaryDirectory() as folder:
                args.model = random_checkpoint(shape, folder)
                for dtype in dtypes:
                    run(args, folder, f"{shape} (random weights)", device, dtype)
    else:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            import sys
            sys.path.insert(0, "tests")
            from conftest import smollm2_path
            args.model = smollm2_path()
        for dtype in dtypes:
            run(args, args.model, os.path.basename(os.path.normpath(args.model)), device, dtype)
        choice = sampling_dtype(Config.from_pretrained(args.model), device)
        print(f"\nrlsp samples this model on this CPU in {str(choice).removeprefix('torch.')} "
              f"(model.sampling_dtype: native bf16 units {'yes' if native_bf16() else 'no'})")


if __name__ == "__main__":
    import cli
    cli.run(main)
