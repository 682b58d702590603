"""Training: the SFT and RL stages of RLSP, on one process or many (torchrun); with no --model, the demo.

    python train.py                                          # the offline CPU demo: SFT then RLSP from scratch
    python train.py --stage sft --model DIR --data math_train --out runs/sft
    python train.py --stage rl --model runs/sft/final --data math_train --out runs/rl
    torchrun --nproc_per_node 8 train.py --stage sft --model DIR --data math_train --out runs/sft
    python train.py --stage rl --model DIR --dry-run         # memory per GPU, before spending any compute
    python train.py --plot runs/sft                          # PNG curves of metrics.jsonl

SFT step: a global batch of packed rows (each example attends only to itself), cross-entropy on
assistant tokens only, normalised by the global number of such tokens (so any split over GPUs and
micro-batches gives the same gradient). RL step: rlsp.rl_step (sample, grade, rewards, KL, advantages,
PPO updates). Both: AdamW(0.9, 0.95), cosine schedule with warm-up and a floor at 10% of peak, clipping
at 1.0; bf16 autocast on GPU with fp32 master weights. Checkpoints are HF folders plus trainer state,
written to a temporary folder and renamed; `--resume` continues exactly.
"""
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import shutil
import time
import uuid

import torch
import torch.distributed as dist

import cli
import rlsp

DEFAULTS = dict(stage="sft", data="math_train", prompt="paper", seq_len=2048, batch_size=32, micro_batch_size=4,
                lr=1e-5, min_lr_ratio=0.1, warmup_steps=20, weight_decay=0.0, grad_clip=1.0, max_steps=1000,
                epochs=None, save_every=200, keep=2, heldout=64, eval_every=100, seed=0)
# Arguments that define a run: resuming with different values would silently train something else.
# (Memory knobs such as --micro-batch-size / --micro-batch-tokens are not: they leave the gradient unchanged.)
RUN_IDENTITY = ("stage", "model", "data", "prompt", "prompt_field", "response_field", "limit", "seq_len",
                "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "max_steps", "heldout",
                "seed", "prompts_per_step",
                "filter_solved", "judge_model", "rollout_dtype",
                *(f.name for f in dataclasses.fields(rlsp.Settings) if f.name != "micro_batch_tokens"))


# Flags the demo reads; any other flag without --model is a mistake (the stages need a checkpoint).
DEMO_FLAGS = ("out", "seed", "exploration", "alpha", "device")


def parser():
    from cli import fraction, non_negative, number, positive
    p = cli.Parser(description=__doc__)
    g = p.add_argument_group("run")
    g.add_argument("--stage", default=DEFAULTS["stage"], choices=["sft", "rl"], help="training stage")
    g.add_argument("--model", help="HF model folder to start from (without it: the demo)")
    g.add_argument("--data", default=DEFAULTS["data"],
                   help="SFT: math_train (its solutions) or a JSONL of chat `messages`, ShareGPT `conversations` "
                        "or (prompt, response) pairs; RL: a dataset name (math_train, gsm8k_train, ...) or a JSONL "
                        "of (problem, answer)")
    g.add_argument("--prompt-field", default="prompt", help="SFT pairs: the prompt's field")
    g.add_argument("--response-field", default="response", help="SFT pairs: the response's field (QwQ traces: qwq)")
    g.add_argument("--data-dir", default=None, help="dataset folder (default $RLSP_DATA_DIR, else download)")
    g.add_argument("--prompt", default=DEFAULTS["prompt"], help="paper | boxed | a template with {problem}")
    g.add_argument("--limit", type=positive, default=None, help="use only the first N demonstrations / problems")
    g.add_argument("--out", default=None, help="run folder (default: runs/sft, runs/rl or runs/demo)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=number(int, 2), default=DEFAULTS["seq_len"], help="SFT: tokens per packed row")
    g.add_argument("--batch-size", type=positive, default=DEFAULTS["batch_size"],
                   help="SFT: rows per optimizer step (global)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and AdamW state over the ranks (FSDP2; under torchrun with 2+ "
                        "processes)")
    g.add_argument("--micro-batch-size", type=positive, default=DEFAULTS["micro_batch_size"],
                   help="SFT: rows per forward pass (memory only; at most the rows per GPU)")
    g.add_argument("--lr", type=number(float, 0, low_open=True), default=DEFAULTS["lr"], help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=number(float, 0, 1), default=DEFAULTS["min_lr_ratio"], help="cosine floor / peak")
    g.add_argument("--warmup-steps", type=non_negative, default=DEFAULTS["warmup_steps"])
    g.add_argument("--weight-decay", type=number(float, 0), default=DEFAULTS["weight_decay"])
    g.add_argument("--grad-clip", type=number(float, 0, low_open=True), default=DEFAULTS["grad_clip"])
    g.add_argument("--max-steps", type=positive, default=DEFAULTS["max_steps"])
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available, else cpu)")
    g = p.add_argument_group("RL stage (rlsp.py; paper values in the README)")
    g.add_argument("--prompts-per-step", type=positive, default=8, help="problems per rank and step")
    g.add_argument("--group-size", type=positive, default=8, help="samples per problem (1 = the paper)")
    g.add_argument("--max-new-tokens", type=positive, default=1024, help="paper: 4096")
    g.add_argument("--temperature", type=number(float, 0, low_open=True), default=0.7,
                   help="sampling and scoring temperature (paper: 0.7)")
    g.add_argument("--top-p", type=fraction, default=1.0)
    g.add_argument("--exploration", default="length", choices=["length", "judge", "difficulty", "none"],
                   help="exploration reward: -C/L, an LLM judge, -C/L scaled by the group's failure rate, or none")
    g.add_argument("--reward-form", default="paper", choices=["paper", "code"],
                   help="paper: alpha*outcome + (1-alpha)*R_ex (Eq. 1); code: outcome - C/L (released code)")
    g.add_argument("--alpha", type=number(float, 0, 1), default=0.8, help="weight of correctness in Eq. 1 (paper: 0.8)")
    g.add_argument("--alpha-decay", type=number(float, 0, 1), default=1.0,
                   help="(1 - alpha) is multiplied by this each step")
    g.add_argument("--length-c", type=number(float, 0), default=1000.0, help="C in R_ex = -C/L (paper: 1000)")
    g.add_argument("--no-answer-reward", type=float, default=-0.5, help="outcome when no \\boxed{} (code: -0.5)")
    g.add_argument("--reward-clip", type=number(float, 0, low_open=True), default=10.0,
                   help="total reward clipped to [-x, x] (paper: 10)")
    g.add_argument("--repetition-coef", type=number(float, 0), default=0.0, help="penalty x share of repeated 10-grams")
    g.add_argument("--advantage", default="grpo", choices=["grpo", "drgrpo", "rloo", "reinforce"])
    g.add_argument("--clip-low", type=number(float, 0, 1, high_open=True), default=0.2, help="PPO clip below 1 (paper: 0.2)")
    g.add_argument("--clip-high", type=number(float, 0), default=0.28, help="PPO clip above 1 (DAPO clip-higher; paper: 0.2)")
    g.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean", "constant"])
    g.add_argument("--overlong-filter", action="store_true",
                   help="leave responses cut off at --max-new-tokens out of the loss (DAPO)")
    g.add_argument("--overlong-buffer", type=non_negative, default=0,
                   help="soft overlong penalty over the last N tokens before the cap, 0 = off (DAPO: 4096 of 20480)")
    g.add_argument("--overlong-penalty", type=number(float, 0), default=1.0, help="the soft penalty at the cap")
    g.add_argument("--ppo-epochs", type=positive, default=1, help="passes over each rollout batch")
    g.add_argument("--minibatches", type=positive, default=1, help="optimizer updates per pass")
    g.add_argument("--micro-batch-tokens", type=positive, default=None,
                   help="tokens per forward/backward in the RL update (memory only; default 16384 on GPU, 4096 on CPU)")
    g.add_argument("--rollout-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights the sampler reads: auto = a bf16 copy on GPU, the fp32 policy on CPU")
    g.add_argument("--kl-coef", type=number(float, 0), default=0.0,
                   help="beta; > 0 loads the frozen initial model (paper: 0.05)")
    g.add_argument("--kl-estimator", default="k3", choices=["k1", "k3"], help="for --kl-placement loss")
    g.add_argument("--kl-placement", default="loss", choices=["loss", "reward"], help="paper: reward (k1)")
    g.add_argument("--judge-url", default=None, help="OpenAI-compatible /v1/chat/completions URL")
    g.add_argument("--judge-model", default="gpt-4o-mini")
    g.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--filter-solved", action="store_true", help="drop problems the start model solves greedily")
    g.add_argument("--episodes-every", type=non_negative, default=10,
                   help="steps between sampled episodes written out (0 = never)")
    g.add_argument("--episodes-logged", type=non_negative, default=4)
    g = p.add_argument_group("checkpoints, evaluation, logs")
    g.add_argument("--save-every", type=positive, default=DEFAULTS["save_every"], help="steps between checkpoints")
    g.add_argument("--keep", type=positive, default=DEFAULTS["keep"], help="checkpoints kept")
    g.add_argument("--heldout", type=non_negative, default=DEFAULTS["heldout"],
                   help="SFT: demonstrations held out for the held-out loss (0 = none)")
    g.add_argument("--eval-every", type=non_negative, default=DEFAULTS["eval_every"],
                   help="steps between held-out / benchmark evals (0 = never)")
    g.add_argument("--eval-data", default=None, help="also run eval.py's benchmark eval (e.g. math500)")
    g.add_argument("--eval-limit", type=positive, default=100)
    g.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log every metrics row to this wandb project (WANDB_MODE=offline works; "
                        "pip install wandb)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write every metrics row as TensorBoard scalars to OUT/tensorboard "
                        "(pip install tensorboard)")
    g.add_argument("--eval-max-new-tokens", type=positive, default=1024)
    g.add_argument("--dry-run", action="store_true", help="print the memory the run needs per GPU and exit")
    g.add_argument("--dry-run-gpus", type=positive, default=None,
                   help="--dry-run: plan for this many GPUs (default: the torchrun world size, else 1)")
    g.add_argument("--plot", metavar="RUN_DIR", help="draw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl and exit")
    g = p.add_argument_group("the demo (python train.py with no --model)")
    g.add_argument("--demo-problems", type=number(int, 4), default=20000, help="synthetic problems: half SFT, half RL")
    g.add_argument("--demo-heldout", type=positive, default=500, help="held-out problems for the final table")
    g.add_argument("--demo-sft-steps", type=positive, default=500)
    g.add_argument("--demo-rl-steps", type=positive, default=40)
    g.add_argument("--demo-rl-lr", type=number(float, 0, low_open=True), default=1e-4)
    g.add_argument("--demo-rl-temperature", type=number(float, 0, low_open=True), default=1.0,
                   help="sampling temperature (paper: 0.7)")
    g.add_argument("--demo-sft", metavar="DEMO_OUT", default=None,
                   help="start RL from that finished demo's SFT model instead of training SFT again (the same "
                        "--seed, --demo-mix and SFT flags give the same model): compare --exploration values")
    g.add_argument("--demo-mix", default="direct:3,steps:1,checked:1",
                   help="demonstration styles and weights: direct (box only), steps, checked (steps + verify)")
    g.add_argument("--demo-length-c", type=number(float, 0), default=16.0,
                   help="C for 64-token responses: the paper's 1000 for 4096 tokens, scaled (1000 * 64 / 4096)")
    return p


def parse_args(argv=None):
    """Flags, checked: each alone by its type, then the combinations (one line naming the flag, exit 2)."""
    p = parser()
    args = p.parse_args(argv)
    if not args.model and not args.dry_run and not args.plot:
        extra = [k for k, v in vars(args).items() if v != p.get_default(k) and k not in DEMO_FLAGS
                 and not k.startswith("demo_")]
        if extra:
            p.error(f"--model is required with --{extra[0].replace('_', '-')} (without --model, python train.py runs "
                    f"the demo, which reads only --out, --seed, --exploration, --alpha, --device and --demo-* flags)")
    if args.dry_run and not args.model:
        p.error("--dry-run needs --model (a folder with config.json)")
    if args.device and args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:N] (got {args.device!r})")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch build sees no CUDA device (torch.cuda.is_available() is False)")
    if args.out is None:
        args.out = os.path.join("runs", "demo" if not args.model else args.stage)
    if args.fsdp and not args.dry_run and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        p.error("--fsdp shards over the processes of torchrun: run it as torchrun --nproc_per_node N train.py ... "
                "with N >= 2 (one process has nothing to shard over)")
    if args.fsdp and args.eval_data:
        p.error("--eval-data with --fsdp: the in-loop benchmark eval runs on rank 0 alone; evaluate the saved "
                "checkpoints with eval.py instead")
    for package in ("wandb", "tensorboard"):  # each flag is named after its package
        if getattr(args, package) and importlib.util.find_spec(package) is None:
            p.error(f"--{package} needs the {package} package: pip install {package}")
    if args.micro_batch_tokens is None:
        on_gpu = args.dry_run or (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.micro_batch_tokens = 16384 if on_gpu else 4096  # --dry-run plans for a GPU
    if args.stage == "rl":
        errors = rlsp.Settings.from_args(args).errors(args.prompts_per_step)
        if errors:
            p.error(errors[0])
    return args


# ----------------------------------------------------------------------------- distributed

def setup_distributed(device_arg):
    """(rank, world, device). Under torchrun: one process per GPU with NCCL, or gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available() and (device_arg or "cuda").startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def all_reduce_sum(x):
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------- data

def build_rows(args, tokenizer):
    """Packed training rows and held-out rows (the first `--heldout` demonstrations)."""
    from data import demonstrations, pack, sft_example
    demos = demonstrations(args.data, args.data_dir, prompt=args.prompt, limit=args.limit,
                           prompt_field=args.prompt_field, response_field=args.response_field)
    if len(demos) <= args.heldout:
        raise ValueError(f"{args.data}: {len(demos)} demonstrations, but --heldout {args.heldout} needs more than that")
    examples = [sft_example(tokenizer, messages) for messages in demos]
    heldout = pack(examples[:args.heldout], args.seq_len, tokenizer.pad_token_id)
    train = pack(examples[args.heldout:], args.seq_len, tokenizer.pad_token_id)
    return train, heldout


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    return tuple(random.Random(seed * 1_000_003 + epoch).sample(range(n), n))


def step_rows(rows, step, batch_size, seed):
    """Indices of the global batch for `step`: epochs are fresh permutations, a function of seed and
    step only, so a resumed run reads exactly the rows it would have read."""
    return [epoch_order(seed, i // len(rows), len(rows))[i % len(rows)]
            for i in range(step * batch_size, (step + 1) * batch_size)]


def to_batch(rows, device):
    """input ids, targets, loss mask, positions and a per-example causal mask (B x 1 x T x T)."""
    ids = torch.tensor([r["ids"] for r in rows], device=device)
    doc = torch.tensor([r["doc"] for r in rows], device=device)
    pos = torch.tensor([r["positions"] for r in rows], device=device)
    loss_mask = torch.tensor([r["mask"] for r in rows], device=device, dtype=torch.bool)
    x, y, d = ids[:, :-1], ids[:, 1:], doc[:, :-1]
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    same = (d[:, :, None] == d[:, None, :]) & causal
    same |= torch.eye(T, dtype=torch.bool, device=device)  # padding queries see themselves (never in the loss)
    # the target at t belongs to the same example as the input at t, and is an assistant token
    target_mask = loss_mask[:, 1:] & (doc[:, 1:] == d) & (d >= 0)
    return x, y, target_mask, pos[:, :-1], same[:, None]


def token_losses(model, batch, autocast):
    """Per-token negative log-likelihood (B x T-1) under the model; see model.logprobs."""
    x, y, _, pos, mask = batch
    with autocast:
        return -model(x, pos, mask, targets=y)  # through forward(), so DDP's gradient hooks see it


@torch.no_grad()
def heldout_loss(model, rows, args, device, autocast, progress=False):
    from tqdm import tqdm
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for i in tqdm(range(0, len(rows), args.micro_batch_size), desc="held-out loss", leave=False, disable=not progress,
                  dynamic_ncols=True):
        batch = to_batch(rows[i:i + args.micro_batch_size], device)
        nll = token_losses(model, batch, autocast)
        total += torch.stack([(nll * batch[2]).sum().double(), batch[2].sum().double()])
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------- schedule, checkpoints

def lr_at(step, args):
    """Linear warm-up to --lr, then cosine down to --min-lr-ratio * lr at --max-steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    floor = args.min_lr_ratio * args.lr
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def checkpoints(out):
    if not os.path.isdir(out):
        return []
    return sorted(d for d in os.listdir(out) if d.startswith("step-") and not d.endswith(".tmp")
                  and os.path.isfile(os.path.join(out, d, "trainer.pt")))


def save_checkpoint(run, tokenizer, optimizer, step, args, out=None):
    """RUN_DIR/step-NNNNNN: HF model + tokenizer files + trainer state, written under a .tmp name and
    renamed, so an interrupted save never replaces a good checkpoint. Keeps the last --keep. Every rank
    calls it: with --fsdp the weights are gathered to rank 0 for the HF files and each rank writes its
    shards of the weights and AdamW state (`sharded/`) and its random state (`rng-R.pt`); without,
    rank 0 writes everything."""
    final = out or os.path.join(args.out, f"step-{step:06d}")
    tmp = final + ".tmp"
    state = {"step": step, "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(), "args": vars(args),
             "world": run.world, "fsdp": args.fsdp}
    if args.fsdp:
        import fsdp
        if run.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        full = fsdp.full_state(run.model)
        if out is None:
            fsdp.save_state(run.model, optimizer, os.path.join(tmp, "sharded"))
            torch.save({k: state.pop(k) for k in ("rng_torch", "rng_python")}, fsdp.rank_file(tmp, run.rank))
        dist.barrier()
    elif run.rank != 0:
        return final
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        full = None
        state["optimizer"] = optimizer.state_dict()
    if run.rank == 0:
        run.model.save_pretrained(tmp, state=full)
        tokenizer.save_pretrained(tmp)
        if out is None:
            torch.save(state, os.path.join(tmp, "trainer.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if out is None:
            for old in checkpoints(args.out)[:-args.keep]:
                shutil.rmtree(os.path.join(args.out, old))
    if args.fsdp:
        dist.barrier()  # nobody reads or writes the run folder until rank 0 has renamed
    return final


def check_run_folder(args):
    """Refuse to mix runs: a folder with another run's args.json needs --resume with the same arguments."""
    saved = os.path.join(args.out, "args.json")
    if not os.path.isfile(saved):
        if args.resume:
            raise FileNotFoundError(f"--resume: {args.out} holds no run (no args.json)")
        return None
    if not args.resume:
        raise FileExistsError(f"{args.out} already holds a run; pass --resume to continue it, or choose another --out")
    with open(saved) as f:
        old = json.load(f)
    changed = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {getattr(args, k)!r}" for k in RUN_IDENTITY
               if k in old and old[k] != getattr(args, k)]  # a flag newer than the run: not known there
    if changed:
        raise ValueError(f"--resume with arguments that differ from the run in {args.out}: {'; '.join(changed)}")
    found = checkpoints(args.out)
    return os.path.join(args.out, found[-1]) if found else None


# ----------------------------------------------------------------------------- memory estimate

def memory_estimate(cfg, args, shards=1):
    """SFT bytes per GPU: fp32 weights, gradients and AdamW moments (DDP replicates them on every GPU;
    FSDP splits them `shards` ways and gathers the blocks it computes), bf16 activations of one
    micro-batch, the packed rows' attention mask and the log-prob head."""
    from model import activation_bytes, gathered_bytes, logits_chunk_bytes, parameter_count
    n = parameter_count(cfg)
    tokens = args.micro_batch_size * args.seq_len
    return n, {"weights (fp32)": 4 * n / shards, "gradients (fp32)": 4 * n / shards,
               "AdamW moments (fp32)": 8 * n / shards,
               "gathered blocks (bf16)": gathered_bytes(cfg) if shards > 1 else 0,
               "activations (bf16)": activation_bytes(cfg, tokens, args.grad_checkpointing),
               "attention mask": args.micro_batch_size * args.seq_len ** 2,
               "log-prob head": logits_chunk_bytes(cfg, tokens=tokens)}


def dry_run(args, world):
    """Print the memory the run needs per GPU, part by part, and which cards it fits; returns the peak."""
    from model import Config
    cfg = Config.from_pretrained(args.model)
    gib = 2 ** 30
    ckpt = ", gradient checkpointing" if args.grad_checkpointing else ""
    gpus = args.dry_run_gpus or world
    shards = gpus if args.fsdp else 1
    how = f"FSDP over {gpus} GPUs shards model and optimizer" if args.fsdp else "DDP replicates model and optimizer"
    if args.stage == "sft":
        n, parts = memory_estimate(cfg, args, shards)
        print(f"{args.model}: {n / 1e9:.2f}B parameters; SFT per GPU ({how}), "
              f"micro-batch {args.micro_batch_size} x {args.seq_len}{ckpt}:")
        phases = [("", parts)]
    else:
        n, held, sampling, training = rlsp.memory_estimate(cfg, rlsp.Settings.from_args(args), args.prompts_per_step,
                                                           args.grad_checkpointing, shards=shards)
        print(f"{args.model}: {n / 1e9:.2f}B parameters; RL per GPU ({how}), "
              f"{args.prompts_per_step} x {args.group_size} rollouts of 512 + {args.max_new_tokens} tokens, "
              f"micro-batches of {args.micro_batch_tokens} tokens{ckpt}:")
        phases = [("held", held), ("while sampling", sampling), ("while training", training)]
    for name, parts in phases:
        if name:
            print(f"  {name}: {sum(parts.values()) / gib:.2f} GiB")
        for k, v in parts.items():
            if v:
                print(f"    {k:26s} {v / gib:8.2f} GiB")
    total = sum(phases[0][1].values()) + max(sum(p.values()) for _, p in phases[1:]) if len(phases) > 1 \
        else sum(phases[0][1].values())
    print(f"  {'peak':28s} {total / gib:8.2f} GiB (plus allocator slack and the CUDA context, ~1-3 GiB)")
    for card in (24, 40, 80, 141):
        verdict = "fits" if total * 1.1 + 2 * gib <= card * gib else "does not fit"
        print(f"  a {card} GB card: {verdict}")
    return total


# ----------------------------------------------------------------------------- plots

PANELS = (("reward", ("reward", "outcome", "exploration", "reward_kl", "overlong")),
          ("accuracy", ("accuracy",)), ("response length, tokens", ("mean_length", "max_length")),
          ("loss", ("loss", "heldout_loss")), ("KL to the reference", ("kl",)), ("entropy estimate", ("entropy_est",)),
          ("clip fraction", ("clip_frac",)), ("gradient norm", ("grad_norm",)), ("learning rate", ("lr",)),
          ("truncated / no answer", ("truncation_rate", "no_answer_rate")),
          ("tokens/s", ("tokens_per_s", "rollout_tokens_per_s", "train_tokens_per_s")),
          ("peak memory, GiB", ("peak_mem_gib",)))


def plot(run_dir):
    """RUN_DIR/curves.png: one figure, a grid of the key curves of metrics.jsonl (benchmark accuracies join
    the accuracy panel); panels with no data are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (--plot takes a run folder)")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = tuple(sorted({k for r in rows for k in r if k.startswith("eval_") and k.endswith("_accuracy")}))
    panels = [(title, [k for k in keys + (evals if title == "accuracy" else ()) if any(k in r for r in rows)])
              for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4 * cols, 2.8 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"curves: {out}")
    return out


# ----------------------------------------------------------------------------- training

class Run:
    """What a step needs: the model (and its DDP wrapper), optimizer, tokenizer, data and devices."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def sft_setup(run, args):
    run.train_rows, run.heldout_rows = build_rows(args, run.tokenizer)
    return (f"{len(run.train_rows)} packed rows of {args.seq_len} tokens "
            f"({len(run.heldout_rows)} held out)")


def sft_step(run, args, step):
    """One optimizer step of SFT; returns the metrics row."""
    per_rank = args.batch_size // run.world
    idx = step_rows(run.train_rows, step, args.batch_size, args.seed)
    global_targets = sum(sum(run.train_rows[i]["mask"][1:]) for i in idx)  # known to every rank
    mine = idx[run.rank * per_rank:(run.rank + 1) * per_rank]
    loss_sum = torch.zeros((), device=run.device, dtype=torch.float64)
    for m in range(0, per_rank, args.micro_batch_size):
        batch = to_batch([run.train_rows[i] for i in mine[m:m + args.micro_batch_size]], run.device)
        last = m + args.micro_batch_size >= per_rank
        # DDP averages gradients over ranks; scaling by world makes that the global token mean.
        with (run.ddp.no_sync() if hasattr(run.ddp, "no_sync") and not last else contextlib.nullcontext()):
            nll = token_losses(run.ddp, batch, run.autocast)
            loss = (nll * batch[2]).sum() / max(global_targets, 1)
            (loss * run.world).backward()
        loss_sum += loss.detach().double()
    loss = all_reduce_sum(loss_sum).item()
    return {"loss": loss, "grad_norm": optimizer_update(run, args, step, loss), "assistant_tokens": global_targets,
            "tokens": args.batch_size * (args.seq_len - 1)}


def rl_setup(run, args):
    from data import load_dataset
    records = load_dataset(args.data, args.data_dir, limit=args.limit)
    if args.exploration == "judge" and not args.judge_url:
        raise ValueError("--exploration judge needs --judge-url (an OpenAI-compatible chat-completions endpoint)")
    judge = rlsp.Judge(args.judge_url, args.judge_model, args.judge_key_env) if args.exploration == "judge" else None
    rollout_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.rollout_dtype, torch.bfloat16 if run.device.type == "cuda" else torch.float32)
    run.settings = rlsp.Settings.from_args(args)
    records = rlsp.setup(run, run.settings, records, args.model, args.out, args.resume, args.filter_solved, judge,
                         rollout_dtype, torch.bfloat16 if run.device.type == "cuda" else None)
    return f"{len(records)} RL problems, {args.prompts_per_step} x {args.group_size} samples per rank and step"


def rl_step(run, args, step):
    """This rank's problems of the step (a function of seed and step only, so resume reads the same), then
    rlsp.rl_step, which also makes every optimizer update of the step."""
    P = args.prompts_per_step
    idx = step_rows(run.records, step, P * run.world, args.seed)[run.rank * P:(run.rank + 1) * P]
    log = run.rank == 0 and args.episodes_every and step % args.episodes_every == 0
    return rlsp.rl_step(run, [run.records[i] for i in idx], run.settings, step,
                        seed=args.seed * 1_000_003 + step * run.world + run.rank,
                        optimizer_step=functools.partial(optimizer_update, run, args, step),
                        episodes_file=os.path.join(args.out, "episodes.jsonl") if log else None,
                        episodes_logged=args.episodes_logged)


def optimizer_update(run, args, step, loss):
    """Clip, check, step, zero; returns the gradient norm. A non-finite loss or gradient stops the run,
    naming the step and the last good checkpoint (nothing non-finite is ever applied or saved)."""
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # sharded (FSDP): a DTensor
    bad = [k for k, v in (("loss", loss), ("gradient norm", grad_norm)) if not math.isfinite(v)]
    if bad:
        last_good = checkpoints(args.out)
        raise FloatingPointError(f"non-finite {bad[0]} at step {step + 1} (loss {loss}, grad norm {grad_norm}); "
                                 f"stopping. Last good checkpoint: "
                                 f"{os.path.join(args.out, last_good[-1]) if last_good else 'none (saved every --save-every steps)'}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


STAGES = {"sft": (sft_setup, sft_step), "rl": (rl_setup, rl_step)}


def train(args):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm
    from model import Config, Tokenizer, Transformer

    rank, world, device = setup_distributed(args.device)
    if args.dry_run:
        if rank == 0:
            dry_run(args, world)
        return None
    if args.stage == "sft":
        if args.batch_size % world:
            raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the world size {world}")
        args.micro_batch_size = min(args.micro_batch_size, args.batch_size // world)  # a memory knob, never an error
    Config.from_pretrained(args.model)  # a folder that is no checkpoint fails here, before any work
    resume_from = check_run_folder(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = Tokenizer.from_pretrained(args.model)
    if args.fsdp:  # fp32 master weights sharded over the ranks; rank 0 alone reads the checkpoint
        import fsdp
        model = fsdp.load_sharded(resume_from or args.model, device)
    else:
        model = Transformer.from_pretrained(resume_from or args.model, device=device, dtype=torch.float32)  # fp32 master
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    step = 0
    if resume_from:
        state = torch.load(os.path.join(resume_from, "trainer.pt"), map_location=device, weights_only=False)
        if state.get("world", world) != world or bool(state.get("fsdp")) != args.fsdp:
            raise ValueError(f"--resume: {resume_from} was written by {state.get('world', 1)} process(es)"
                             f"{' with --fsdp' if state.get('fsdp') else ''}; resume it the same way")
        if args.fsdp:  # each rank reads its own shards and random state
            fsdp.load_state(model, optimizer, os.path.join(resume_from, "sharded"))
            state.update(fsdp.load_rank_state(resume_from, rank))
        else:
            optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        step = state["step"]
    run = Run(model=model, ddp=DDP(model) if world > 1 and not args.fsdp else model, optimizer=optimizer,
              tokenizer=tokenizer, rank=rank, world=world, device=device, sharded=args.fsdp,
              autocast=torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"))
    setup, step_fn = STAGES[args.stage]
    described = setup(run, args)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        log = os.path.join(args.out, "metrics.jsonl")
        if os.path.isfile(log):  # steps after the checkpoint are redone: drop their old lines
            with open(log) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(log, "w") as f:
                f.writelines(kept)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        print(f"{args.stage}: {described}; world {world} on {device}; steps {step} -> {args.max_steps}" +
              (f"; resumed from {resume_from}" if resume_from else ""))
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None
    tracker = Tracker(args) if rank == 0 else None
    if not resume_from:
        cli.interrupt_note = (f"no checkpoint yet in {args.out} (one every --save-every {args.save_every} steps); "
                              f"rerun the same command with --resume to start it again")
    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc=args.stage)
    t_start, first_step = time.perf_counter(), step
    while step < args.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        row = step_fn(run, args, step)  # makes the step's optimizer update(s)
        step += 1
        dt = time.perf_counter() - t0
        row = {"step": step, **row, "lr": lr, "tokens_per_s": row["tokens"] / dt, "peak_mem_gib": peak_memory_gib(device)}
        eval_now = args.eval_every and (step % args.eval_every == 0 or step == args.max_steps)
        if eval_now and args.stage == "sft" and run.heldout_rows:
            row["heldout_loss"] = heldout_loss(model, run.heldout_rows, args, device, run.autocast, rank == 0)
        if eval_now and args.eval_data and rank == 0:
            row.update(benchmark_eval(model, tokenizer, args, step))
            model.train()
        if rank == 0:
            eta = (time.perf_counter() - t_start) / (step - first_step) * (args.max_steps - step)
            bar.update(1)
            bar.write(log_line(row, eta))
            metrics.write(json.dumps(row) + "\n")
            tracker.log(row)
            metrics.flush()
        if step % args.save_every == 0 or step == args.max_steps:  # every rank: FSDP ranks save their shards
            saved = save_checkpoint(run, tokenizer, optimizer, step, args)
            cli.interrupt_note = f"the last checkpoint is {saved}; rerun the same command with --resume to continue"
        if dist.is_initialized():
            dist.barrier()
    final = save_checkpoint(run, tokenizer, optimizer, step, args, out=os.path.join(args.out, "final"))
    if rank == 0:
        bar.close()
        metrics.close()
        tracker.close()
        print(f"final model: {final}")
        plot(args.out)
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


class Tracker:
    """The rows of metrics.jsonl, also sent to wandb (--wandb PROJECT; the run's id is kept in
    OUT/wandb-id so --resume continues the same wandb run) and/or TensorBoard (--tensorboard: scalars in
    OUT/tensorboard), each value at its step. Neither package is needed unless its flag is given."""

    def __init__(self, args):
        self.wandb = self.tb = None
        if args.wandb:  # both packages were checked for by parse_args
            import wandb
            id_file = os.path.join(args.out, "wandb-id")
            run_id = open(id_file).read().strip() if os.path.isfile(id_file) else uuid.uuid4().hex[:8]
            with open(id_file, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(project=args.wandb, id=run_id, resume="allow", dir=args.out, config=vars(args),
                                    name=os.path.basename(os.path.normpath(args.out)))
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(args.out, "tensorboard"))

    def log(self, row):
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])

    def close(self):
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()


def peak_memory_gib(device):
    """Peak memory so far: the CUDA allocator's on GPU; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


LOG_KEYS = ("loss", "reward", "accuracy", "exploration", "mean_length", "truncation_rate", "kl", "entropy_est",
            "clip_frac", "logprob_gap", "grad_norm", "lr", "tokens_per_s", "heldout_loss", "peak_mem_gib")


def log_line(row, eta):
    """One dense line per step."""
    parts = [f"step {row['step']:6d}"]
    for k in LOG_KEYS:
        if k in row:
            v = row[k]
            parts.append(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.0f}" if k.endswith("per_s") or k == "mean_length"
                         else f"{k} {v:.4f}")
    return " | ".join(parts) + f" | eta {eta / 60:.1f} min"


def benchmark_eval(model, tokenizer, args, step):
    from data import load_dataset
    from eval import evaluate
    model.eval()
    records = load_dataset(args.eval_data, args.data_dir, limit=args.eval_limit)
    s = evaluate(model, tokenizer, records, os.path.join(args.out, f"eval-{step:06d}"), max_new_tokens=args.eval_max_new_tokens,
                 prompt=args.prompt)
    return {f"eval_{args.eval_data}_accuracy": s["accuracy"], f"eval_{args.eval_data}_mean_length": s["mean_length"]}


# ----------------------------------------------------------------------------- the CPU demo

DEMO_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_demo_model(path, seed=0):
    """A small Llama from scratch in HF layout: a character-level tokenizer trained with `tokenizers`
    on the task's alphabet, a chat template, and randomly initialised weights."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from model import Config, Transformer
    specials = ["<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    alphabet = "0123456789+=\n\\boxed{}Problem: system verify"
    tk.train_from_iterator([alphabet], trainers.BpeTrainer(vocab_size=len(specials) + len(set(alphabet)),
                                                           special_tokens=specials))
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": DEMO_TEMPLATE, "eos_token": "<|end|>", "pad_token": "<|pad|>"}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [tk.token_to_id("<|end|>")]}, f)
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": tk.get_vocab_size(),
           "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
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


def demo(args):
    """`python train.py`: SFT then RLSP on synthetic arithmetic, from scratch, on a CPU, in minutes."""
    from data import arithmetic
    from eval import evaluate, mean_ci95, read_samples
    from model import Tokenizer, Transformer
    out = args.out
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise FileExistsError(f"{out} is not empty: remove it or pass another --out")
    cli.interrupt_note = f"the demo's partial run is in {out}; remove it to run the demo again"
    t0 = time.perf_counter()
    base = build_demo_model(os.path.join(out, "base"), args.seed)
    problems = arithmetic(args.demo_problems + args.demo_heldout, seed=args.seed, terms=10, digits=1)
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
    common = ["--seed", str(args.seed), "--eval-every", "0", "--save-every", "1000000", "--warmup-steps", "10"]
    sft = os.path.join(args.demo_sft or out, "sft")
    if args.demo_sft:  # that demo's SFT model, if it was trained on exactly these demonstrations for as long
        prev = os.path.join(args.demo_sft, "sft.jsonl")
        if not (os.path.isfile(prev) and os.path.isfile(os.path.join(sft, "final", "model.safetensors"))):
            raise FileNotFoundError(f"--demo-sft {args.demo_sft}: no finished demo there (sft.jsonl and sft/final)")
        with open(prev) as a, open(os.path.join(out, "sft.jsonl")) as b, open(os.path.join(sft, "args.json")) as c:
            if a.read() != b.read() or json.load(c)["max_steps"] != args.demo_sft_steps:
                raise ValueError(f"--demo-sft {args.demo_sft}: its SFT stage differs from this run's (another --seed, "
                                 f"--demo-mix, --demo-problems or --demo-sft-steps)")
    else:
        main(["--stage", "sft", "--model", base, "--data", os.path.join(out, "sft.jsonl"), "--out", sft,
              "--seq-len", "256", "--batch-size", "16", "--micro-batch-size", "16", "--lr", "3e-3", "--heldout", "64",
              "--max-steps", str(args.demo_sft_steps), *common])
    main(["--stage", "rl", "--model", os.path.join(sft, "final"), "--data", os.path.join(out, "rl.jsonl"),
          "--out", os.path.join(out, "rlsp"), "--prompts-per-step", "16", "--group-size", "8", "--max-new-tokens", "128",
          "--temperature", str(args.demo_rl_temperature), "--lr", str(args.demo_rl_lr),
          "--max-steps", str(args.demo_rl_steps), "--exploration", args.exploration,
          "--length-c", str(args.demo_length_c), "--alpha", str(args.alpha), "--episodes-every", "10", *common])
    table = {}
    for stage in ("sft", "rlsp"):
        folder = os.path.join(sft if stage == "sft" else os.path.join(out, stage), "final")
        s = evaluate(Transformer.from_pretrained(folder, device="cpu"), Tokenizer.from_pretrained(folder), heldout,
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
    print(f"\nheld-out synthetic arithmetic, {len(heldout)} problems, greedy ({summary['seconds']:.0f} s in all)")
    print("| stage | accuracy | 95% CI | mean length | verifies |\n|---|---:|---:|---:|---:|")
    for stage, name in (("sft", "SFT"), ("rlsp", f"SFT + RLSP ({args.exploration})")):
        lo, hi = summary[f"{stage}_ci95"]
        print(f"| {name} | {summary[f'{stage}_accuracy']:.1%} | [{lo:.1%}, {hi:.1%}] | "
              f"{summary[f'{stage}_mean_length']:.1f} | {summary[f'{stage}_verification_rate']:.1%} |")
    lo, hi = summary["gain_ci95"]
    print(f"gain {summary['gain']:+.1%} (paired 95% CI [{lo:+.1%}, {hi:+.1%}]); summary: {os.path.join(out, 'summary.json')}")
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        return plot(args.plot)
    if not args.model and not args.dry_run:  # no model: the offline demo, the project's main job
        return demo(args)
    return train(args)


if __name__ == "__main__":
    cli.run(main)
