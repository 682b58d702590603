"""Training: the SFT and RL stages of RLSP, on one process or many (torchrun); with no --model, the demo.

    python train.py                                          # the offline CPU demo: SFT then RLSP from scratch
    python train.py --tiny --stage rl --advantage rloo       # two RL steps of a 2-layer model, in seconds
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
import argparse
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
RUN_IDENTITY = ("stage", "model", "data", "prompt", "prompt_field", "response_field", "problem_field",
                "answer_field", "limit", "seq_len",
                "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "max_steps", "heldout",
                "seed", "prompts_per_step",
                "filter_solved", "judge_model", "rollout_dtype",
                *(f.name for f in dataclasses.fields(rlsp.Settings) if f.name != "micro_batch_tokens"))


# Flags that only one stage reads: given to the other stage, they are refused rather than ignored.
STAGE_FLAGS = {
    "sft": ("seq_len", "batch_size", "micro_batch_size", "heldout", "prompt_field", "response_field"),
    "rl": ("prompts_per_step", *(f.name for f in dataclasses.fields(rlsp.Settings) if f.name != "prompt"),
           "judge_url", "judge_model", "judge_key_env", "filter_solved", "episodes_every",
           "episodes_logged", "problem_field", "answer_field"),
}


def parser():
    from cli import non_negative, number, positive
    p = cli.Parser(description=__doc__)
    g = p.add_argument_group("run")
    g.add_argument("--stage", default=DEFAULTS["stage"], choices=["sft", "rl"], help="training stage")
    g.add_argument("--model", help="HF model folder or hub id to start from (without it: the demo)")
    g.add_argument("--tiny", action="store_true",
                   help="instead of --model: a 2-layer model and synthetic data, two steps of --stage with the other "
                        "flags given, in seconds (demo.py): to try a change")
    g.add_argument("--data", default=DEFAULTS["data"],
                   help="SFT: math_train (its solutions) or a JSONL of chat `messages`, ShareGPT `conversations` "
                        "or (prompt, response) pairs; RL: a dataset name (math_train, gsm8k_train, ...) or a JSONL "
                        "of (problem, answer)")
    g.add_argument("--data-dir", default=None,
                   help="folder of dataset files (default: $RLSP_DATA_DIR, else a download into ~/.cache/rlsp/data)")
    g.add_argument("--prompt", **rlsp.Settings.argument("prompt", default=DEFAULTS["prompt"]))
    g.add_argument("--limit", type=positive, default=None, help="use only the first N demonstrations / problems "
                   "(default: all)")
    g.add_argument("--out", default=None, help="run folder (default: runs/sft, runs/rl or runs/demo; --tiny: a new "
                   "temporary folder)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--extend", action="store_true",
                   help="with --resume: train past the run's --max-steps; the learning rate stays at the floor "
                        "its schedule ended on (--min-lr-ratio x --lr)")
    g.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="data order, sampling, initialisation")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and AdamW state over the processes of torchrun (FSDP2)")
    g.add_argument("--offload", action="store_true",
                   help="with --fsdp: keep the shards, gradients and AdamW state in CPU memory, the optimizer "
                        "stepping there (FSDP2's CPUOffloadPolicy): GPU memory for models whose state does not fit")
    g.add_argument("--lr", type=number(float, 0, low_open=True), default=DEFAULTS["lr"], help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=number(float, 0, 1), default=DEFAULTS["min_lr_ratio"],
                   help="cosine floor / peak")
    g.add_argument("--warmup-steps", type=non_negative, default=DEFAULTS["warmup_steps"],
                   help="linear warm-up from 0 to --lr over these steps")
    g.add_argument("--weight-decay", type=number(float, 0), default=DEFAULTS["weight_decay"], help="AdamW's")
    g.add_argument("--grad-clip", type=number(float, 0, low_open=True), default=DEFAULTS["grad_clip"],
                   help="the gradient's norm is clipped to this")
    g.add_argument("--max-steps", type=positive, default=DEFAULTS["max_steps"],
                   help="optimizer steps (RL: rollout steps) of the run; the schedule ends here")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g = p.add_argument_group("SFT stage")
    g.add_argument("--seq-len", type=number(int, 2), default=DEFAULTS["seq_len"], help="tokens per packed row")
    g.add_argument("--batch-size", type=positive, default=DEFAULTS["batch_size"], help="rows per optimizer step (global)")
    g.add_argument("--micro-batch-size", type=positive, default=DEFAULTS["micro_batch_size"],
                   help="rows per forward pass (memory only; at most the rows per GPU)")
    g.add_argument("--heldout", type=non_negative, default=DEFAULTS["heldout"],
                   help="demonstrations held out for the held-out loss (0 = none)")
    g.add_argument("--prompt-field", default="prompt", help="(prompt, response) pairs: the prompt's field")
    g.add_argument("--response-field", default="response", help="(prompt, response) pairs: the response's field "
                   "(QwQ traces: qwq)")
    g = p.add_argument_group("RL stage (rlsp.Settings; paper values in docs/method.md)")
    g.add_argument("--problem-field", default="problem", help="a JSONL file's problem field")
    g.add_argument("--answer-field", default="answer", help="a JSONL file's answer field")
    g.add_argument("--prompts-per-step", type=positive, default=8, help="problems per rank and step")
    for f in dataclasses.fields(rlsp.Settings):  # each knob of the RL step, as rlsp.Settings defines it
        if f.name == "micro_batch_tokens":  # its default depends on the device: set by parse_args
            g.add_argument("--micro-batch-tokens", **rlsp.Settings.argument(
                f.name, default=None, help="tokens per forward/backward in the update (memory only; default: "
                                           "16384 on GPU, 4096 on CPU)"))
        elif f.name != "prompt":  # a flag of both stages, above
            g.add_argument("--" + f.name.replace("_", "-"), **rlsp.Settings.argument(f.name))
    g.add_argument("--judge-url", default=None, help="OpenAI-compatible /v1/chat/completions URL (--exploration judge)")
    g.add_argument("--judge-model", default="gpt-4o-mini", help="the judge's model name")
    g.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--filter-solved", action="store_true", help="drop problems the start model solves greedily")
    g.add_argument("--episodes-every", type=non_negative, default=10,
                   help="steps between sampled episodes written out (0 = never)")
    g.add_argument("--episodes-logged", type=non_negative, default=4, help="episodes written out each time")
    g = p.add_argument_group("the sampler (RL rollouts and the in-loop eval)")
    g.add_argument("--rollout-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights the sampler reads: auto = a bf16 copy on GPU; on CPU the fp32 policy, or a bf16 "
                        "copy where the CPU has bf16 units and it measures faster (model.sampling_dtype)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the sampler's decode step (torch.compile; CUDA graphs on GPU): default on GPU, off "
                        "on CPU; compile time is logged (compile_s)")
    g.add_argument("--tp", type=positive, default=1,
                   help="sample from a copy of the policy split over groups of this many ranks (tensor parallel, "
                        "tp.py; under torchrun): each holds 1/N of the copy and of its KV cache")
    g = p.add_argument_group("checkpoints, evaluation, logs")
    g.add_argument("--save-every", type=positive, default=DEFAULTS["save_every"], help="steps between checkpoints")
    g.add_argument("--keep", type=positive, default=DEFAULTS["keep"], help="checkpoints kept")
    g.add_argument("--eval-every", type=non_negative, default=DEFAULTS["eval_every"],
                   help="steps between held-out / benchmark evals (0 = never)")
    g.add_argument("--eval-data", default=None, help="also run eval.py's benchmark eval (e.g. math500)")
    g.add_argument("--eval-limit", type=positive, default=100, help="problems of the benchmark eval")
    g.add_argument("--eval-max-new-tokens", type=positive, default=1024, help="tokens per answer in the benchmark eval")
    g.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log every metrics row to this wandb project (WANDB_MODE=offline works; "
                        "pip install wandb)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write every metrics row as TensorBoard scalars to OUT/tensorboard "
                        "(pip install tensorboard)")
    g.add_argument("--dry-run", action="store_true", help="print the memory the run needs per GPU and exit")
    g.add_argument("--dry-run-gpus", type=positive, default=None,
                   help="--dry-run: plan for this many GPUs (default: the torchrun world size, else 1)")
    g.add_argument("--plot", metavar="RUN_DIR", help="draw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl and exit")
    import demo
    demo.add_arguments(p)
    return p


def parse_args(argv=None):
    """Flags, checked: each alone by its type, then the combinations (one line naming the flag, exit 2)."""
    p = parser()
    args = p.parse_args(argv)
    if args.model or args.tiny:  # a stage's run: the other stage's flags would be silently ignored
        other = "rl" if args.stage == "sft" else "sft"
        unused = [k for k in STAGE_FLAGS[other] if getattr(args, k) != p.get_default(k)]
        if unused:
            p.error(f"--{unused[0].replace('_', '-')} is a flag of the {other.upper()} stage; --stage {args.stage} "
                    f"does not use it")
    if args.extend and not args.resume:
        p.error("--extend continues a finished run: use it with --resume")
    if args.tiny:
        import demo
        if args.model:
            p.error("--tiny builds its own model: drop --model (or drop --tiny to train that model)")
        for k, v in demo.TINY.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    elif not args.model and not args.dry_run and not args.plot:
        import demo
        extra = [k for k, v in vars(args).items() if v != p.get_default(k) and k not in demo.FLAGS
                 and not k.startswith("demo_")]
        if extra:
            p.error(f"--model is required with --{extra[0].replace('_', '-')} (without --model, python train.py runs "
                    f"the demo, which reads only --out, --seed, --exploration, --alpha, --device and --demo-* flags)")
    if args.dry_run and not args.model:
        p.error("--dry-run needs --model (a folder with config.json)")
    cli.check_device(p, args.device, torchrun=TORCHRUN)
    if args.out is None and not args.tiny:
        args.out = os.path.join("runs", "demo" if not args.model else args.stage)
    if args.tp > 1 and not args.dry_run and not TORCHRUN:
        p.error(f"--tp {args.tp} splits the sampler over the processes of torchrun: run it as torchrun "
                f"--nproc_per_node N train.py ... with N a multiple of {args.tp}")
    if args.tp > 1 and args.compile:
        p.error(f"--compile covers the whole-model sampler only; --tp {args.tp} samples eagerly (its split "
                f"copy's collectives are not captured): drop one of them")
    if args.offload and not args.fsdp:
        p.error("--offload moves FSDP's shards to CPU memory: add --fsdp")
    if args.fsdp and not args.dry_run and not TORCHRUN:
        p.error("--fsdp shards over the processes of torchrun: run it as torchrun --nproc_per_node N train.py ...")
    for package in ("wandb", "tensorboard"):  # each flag is named after its package
        if getattr(args, package) and importlib.util.find_spec(package) is None:
            p.error(f"--{package} needs the {package} package: pip install {package}")
    if args.micro_batch_tokens is None:
        from model import default_device
        on_gpu = args.dry_run or default_device(args.device).startswith("cuda")
        args.micro_batch_tokens = 16384 if on_gpu else 4096  # --dry-run plans for a GPU
    if args.stage == "rl":
        errors = rlsp.Settings.from_args(args).errors(args.prompts_per_step)
        if errors:
            p.error(errors[0])
    args.schedule_steps = args.max_steps  # where the learning rate's cosine ends (--extend keeps the first run's)
    return args


# ----------------------------------------------------------------------------- distributed

TORCHRUN = "WORLD_SIZE" in os.environ  # started by torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE)


def setup_distributed(device_arg, offload=False):
    """(rank, world, device). Under torchrun, however many processes: a process group (NCCL, or gloo on
    CPU) and one GPU per process (cuda:LOCAL_RANK); the model is then DDP's or FSDP's. A plain
    `python train.py` has no process group and takes the GPU --device names (cuda:N), else cuda:0."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available() and (device_arg or "cuda").startswith("cuda")
    if cuda:
        index = int(os.environ["LOCAL_RANK"]) if TORCHRUN else torch.device(device_arg or "cuda").index or 0
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if TORCHRUN:  # --offload: CPU tensors meet in collectives too (gradient norms of offloaded shards)
        dist.init_process_group(("cpu:gloo,cuda:nccl" if offload else "nccl") if cuda else "gloo")
    return rank, world, device


def data_parallel(model):
    """DDP over the ranks, the gradients kept in its all-reduce buckets (gradient_as_bucket_view) rather
    than in a second full copy beside them."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, gradient_as_bucket_view=True)


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
    if hasattr(model, "reshard"):  # FSDP: a forward without backward leaves the root's weights gathered
        model.reshard()
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------- schedule, checkpoints

def lr_at(step, args):
    """Linear warm-up to --lr, then cosine down to --min-lr-ratio * lr at the schedule's end (--max-steps;
    a run extended with --extend keeps its first --max-steps as the end and stays at the floor after it)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.schedule_steps - args.warmup_steps))
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
    state = {"step": step, "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(), "args": saved_args(args),
             "world": run.world, "fsdp": args.fsdp, "rollout_dtype": getattr(run, "rollout_dtype", None)}
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
        for folder, _, files in os.walk(tmp):  # every file on disk before the rename makes the folder count
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if out is None:
            for old in checkpoints(args.out)[:-args.keep]:
                shutil.rmtree(os.path.join(args.out, old))
        fsync_dir(os.path.dirname(final) or ".")
    if args.fsdp:
        dist.barrier()  # nobody reads or writes the run folder until rank 0 has renamed
    return final


def read_trainer_state(file):
    """A checkpoint's trainer.pt, onto the CPU (the random state must stay a CPU tensor; load_state_dict
    moves the optimizer's tensors to their parameters' device) and as data only: weights_only refuses
    pickled code, since a run folder may come from someone else."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} not found: the checkpoint lacks its trainer state") from None
    except Exception as e:  # a truncated file, or pickled objects a weights-only load refuses
        raise ValueError(f"{file}: cannot read it as trainer state ({type(e).__name__}: {e})"[:400]) from None


def read_metrics(path):
    """The rows of a run's metrics.jsonl. A last line without its newline was cut off by a kill and is
    dropped (its step is redone); any other bad line is an error naming the file and the line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for n, line in enumerate(lines[:-1], 1):  # the part after the last newline is complete only when empty
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a metrics row ({e.msg} at column {e.colno})") from None
            if not isinstance(rows[-1], dict) or not isinstance(rows[-1].get("step"), int):
                raise ValueError(f"{path}:{n}: not a metrics row (a JSON object with an integer 'step')")
    return rows


def write_atomic(path, text):
    """Write `text` to `path` through a temporary file, fsync'd and renamed: an interruption leaves the old
    file or the new one, never a half-written mix."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path):
    """Make a rename or removal in `path` durable (the directory entry itself is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def saved_args(args):
    """The flags as written to args.json, trainer.pt and a tracker's config: without the secrets a judge URL
    may hold (user info, query; see rlsp.redact_url)."""
    return {**vars(args), "judge_url": rlsp.redact_url(args.judge_url)}


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
    args.schedule_steps = old.get("schedule_steps", old["max_steps"])  # a resumed run keeps its schedule's end
    if args.extend and args.max_steps <= old["max_steps"]:
        raise ValueError(f"--extend trains past the run's end: --max-steps {args.max_steps} must be more than the "
                         f"run's {old['max_steps']}")
    changed = cli.changed_flags(old, args, [k for k in RUN_IDENTITY if not (args.extend and k == "max_steps")],
                                vars(parser().parse_args([])))
    if changed == [f"--max-steps {old['max_steps']!r} -> {args.max_steps!r}"] and args.max_steps > old["max_steps"]:
        raise ValueError(f"--resume with --max-steps {old['max_steps']} -> {args.max_steps}: the learning-rate schedule "
                         f"(warm-up, then cosine to --min-lr-ratio at --max-steps) is part of the run in {args.out}. "
                         f"To train on where it ended, add --extend (the learning rate stays at its final floor); for "
                         f"a fresh schedule, start a new run from {os.path.join(args.out, 'final')} with another --out")
    if changed:
        raise ValueError(f"--resume with arguments that differ from the run in {args.out}: {'; '.join(changed)} "
                         f"(they define what the run learns; resume with the run's values, or start a new run from "
                         f"{os.path.join(args.out, 'final')} with another --out)")
    found = checkpoints(args.out)
    return os.path.join(args.out, found[-1]) if found else None


# ----------------------------------------------------------------------------- memory estimate

def memory_estimate(cfg, args, shards=1):
    """SFT bytes per GPU: fp32 weights, gradients and AdamW moments (DDP replicates them on every GPU;
    FSDP splits them `shards` ways and gathers the blocks it computes in bf16), autocast's bf16 copy of
    every Linear weight (DDP only: FSDP computes in bf16 already), the activations of one micro-batch of
    packed rows with their masks and the log-prob head (model.packed_activation_bytes), and with
    --eval-data the sampler's bf16 copy of the weights."""
    from model import gathered_bytes, linear_parameter_count, packed_activation_bytes, parameter_count
    n = parameter_count(cfg)
    on_gpu = 0 if args.offload else 1  # --offload: the shards, gradients and AdamW state are in CPU memory
    return n, {"weights (fp32)": 4 * n / shards * on_gpu, "gradients (fp32)": 4 * n / shards * on_gpu,
               "AdamW moments (fp32)": 8 * n / shards * on_gpu,
               "autocast bf16 weights": 2 * linear_parameter_count(cfg) if shards == 1 else 0,
               "gathered blocks (bf16)": gathered_bytes(cfg) if shards > 1 else 0,
               "activations and log-prob head": packed_activation_bytes(
                   cfg, args.micro_batch_size, args.seq_len, args.grad_checkpointing, expand_kv=True),
               "rollout weights (bf16, --eval-data)": 2 * n if args.eval_data else 0}


def dry_run(args, world):
    """Print the memory the run needs per GPU, part by part, and which cards it fits; returns the peak."""
    from model import Config
    cfg = Config.from_pretrained(args.model)
    gib = 2 ** 30
    ckpt = ", gradient checkpointing" if args.grad_checkpointing else ""
    gpus = args.dry_run_gpus or world
    shards = gpus if args.fsdp else 1
    how = f"FSDP over {gpus} GPUs shards model and optimizer" if args.fsdp else "DDP replicates model and optimizer"
    if args.offload:
        how += ", offloaded to CPU memory"
    if args.stage == "sft":
        n, parts = memory_estimate(cfg, args, shards)
        print(f"{args.model}: {n / 1e9:.2f}B parameters; SFT per GPU ({how}), "
              f"micro-batch {args.micro_batch_size} x {args.seq_len}{ckpt}:")
        phases = [("", parts)]
    else:
        if args.tp > 1:
            import tp
            if tp.problems(cfg, args.tp, gpus):
                raise ValueError(tp.problems(cfg, args.tp, gpus)[0])
            how += f"; the sampler split over groups of {args.tp} GPUs (--tp)"
        n, held, sampling, training = rlsp.memory_estimate(cfg, rlsp.Settings.from_args(args), args.prompts_per_step,
                                                           args.grad_checkpointing, shards=shards, tp=args.tp,
                                                           offload=args.offload)
        prompts, N = rlsp.micro_batch_shape(rlsp.Settings.from_args(args), 512, args.prompts_per_step * args.group_size)
        print(f"{args.model}: {n / 1e9:.2f}B parameters; RL per GPU ({how}), "
              f"{args.prompts_per_step} x {args.group_size} rollouts of 512 + {args.max_new_tokens} tokens, "
              f"micro-batches of {args.micro_batch_tokens} tokens (the largest: {N} responses, {prompts} prompt"
              f"{'s' if prompts > 1 else ''}){ckpt}:")
        phases = [("held", held), ("while sampling", sampling), ("while training", training)]
    for name, parts in phases:
        if name:
            print(f"  {name}: {sum(parts.values()) / gib:.2f} GiB")
        for k, v in parts.items():
            if v:
                print(f"    {k:36s} {v / gib:8.2f} GiB")
    total = sum(phases[0][1].values()) + max(sum(p.values()) for _, p in phases[1:]) if len(phases) > 1 \
        else sum(phases[0][1].values())
    print(f"  {'peak (allocated)':38s} {total / gib:8.2f} GiB")
    if args.offload:  # fp32 shards, gradients and AdamW moments (and the reference): split over the ranks
        host = (16 + (4 if args.stage == "rl" and args.kl_coef > 0 else 0)) * n / shards
        print(f"  in CPU memory (--offload): {host / gib:.1f} GiB per GPU, {host * min(gpus, 8) / gib:.0f} GiB for "
              f"a node of {min(gpus, 8)} GPUs (pinned)")
    for card, usable in CARDS.items():
        margin = usable - total / gib
        verdict = "fits" if margin >= MARGIN * usable else "does not fit"
        print(f"  a {card} card ({usable} GiB): {verdict}, margin {margin:.1f} GiB ({margin / usable:.0%})")
    return total


# What a CUDA program can allocate on common cards (GiB: a "80 GB" H100 has 79.1), and the share of it a
# plan leaves free for what allocated bytes do not show: the caching allocator's block rounding and
# fragmentation, the CUDA context, NCCL's buffers.
CARDS = {"24 GB": 23.6, "40 GB": 39.4, "80 GB": 79.1, "141 GB": 139.8}
MARGIN = 0.10


# ----------------------------------------------------------------------------- plots

# The panels of curves.png, each (title, series). The reward's parts sit on scales of their own: the
# exploration term (-C/L near -11 at the start of a run) would flatten the others into one line.
PANELS = (("reward and outcome", ("reward", "outcome")), ("exploration reward R_ex", ("exploration", "judge")),
          ("penalties", ("reward_kl", "overlong")), ("accuracy", ("accuracy",)),
          ("response length, tokens", ("mean_length", "max_length")), ("loss", ("loss", "heldout_loss")),
          ("KL to the reference", ("kl",)), ("entropy estimate", ("entropy_est",)), ("clip fraction", ("clip_frac",)),
          ("groups with equal rewards", ("zero_variance_groups",)), ("gradient norm", ("grad_norm",)),
          ("learning rate", ("lr",)), ("truncated / no answer", ("truncation_rate", "no_answer_rate")),
          ("tokens/s", ("tokens_per_s", "rollout_tokens_per_s", "train_tokens_per_s")),
          ("peak memory, GiB", ("peak_mem_gib", "peak_host_gib")))


def panels_for(rows):
    """The panels worth drawing for these metrics rows: each with the series the rows hold that are not
    zero throughout (benchmark accuracies join the accuracy panel); a panel left with none is left out."""
    evals = tuple(sorted({k for r in rows for k in r if k.startswith("eval_") and k.endswith("_accuracy")}))
    panels = [(title, [k for k in keys + (evals if title == "accuracy" else ()) if any(r.get(k) for r in rows)])
              for title, keys in PANELS]
    return [(title, keys) for title, keys in panels if keys]


def plot(run_dir):
    """RUN_DIR/curves.png: one figure, a grid of the key curves of metrics.jsonl (panels_for)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (--plot takes a run folder)")
    rows = read_metrics(path)
    panels = panels_for(rows)
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
    records = load_dataset(args.data, args.data_dir, limit=args.limit, problem_field=args.problem_field,
                           answer_field=args.answer_field)
    needs_judge = rlsp.EXPLORATION[args.exploration].judge
    if needs_judge and not args.judge_url:
        raise ValueError(f"--exploration {args.exploration} needs --judge-url (an OpenAI-compatible chat-completions "
                         f"endpoint)")
    judge = rlsp.Judge(args.judge_url, args.judge_model, args.judge_key_env) if needs_judge else None
    if judge:
        judge.check()
    run.settings = rlsp.Settings.from_args(args)
    records = rlsp.setup(run, run.settings, records, args.model, args.out, args.resume, args.filter_solved, judge,
                         torch.bfloat16 if run.device.type == "cuda" else None)
    return f"{len(records)} RL problems, {args.prompts_per_step} x {args.group_size} samples per rank and step"


def rl_step(run, args, step):
    """This rank's problems of the step (a function of seed and step only, so resume reads the same), then
    rlsp.rl_step, which also makes every optimizer update of the step."""
    P = args.prompts_per_step
    idx = step_rows(run.records, step, P * run.world, args.seed)[run.rank * P:(run.rank + 1) * P]
    log = run.rank == 0 and args.episodes_every and step % args.episodes_every == 0
    row = rlsp.rl_step(run, [run.records[i] for i in idx], run.settings, step,
                       seed=args.seed * 1_000_003 + step * run.world + run.rank,
                       optimizer_step=functools.partial(optimizer_update, run, args, step),
                       episodes_file=os.path.join(args.out, "episodes.jsonl") if log else None,
                       episodes_logged=args.episodes_logged)
    if run.rollout.compiled:  # so far in this process: a compile after the first steps would show here
        from model import COMPILE_STATS
        row.update(compiles=COMPILE_STATS["compiles"], compile_s=COMPILE_STATS["seconds"],
                   cuda_graphs=COMPILE_STATS["graphs"])
    return row


def make_optimizer(model, lr, weight_decay=0.0):
    """AdamW(0.9, 0.95), fused (one kernel for every tensor, on GPU and CPU alike). After every step the
    model is told its weights changed (Transformer.weights_changed): fused AdamW writes them without
    bumping their version counters, so nothing else would notice."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                  fused=True)
    optimizer.register_step_post_hook(lambda *_: model.weights_changed())
    return optimizer


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
    from tqdm import tqdm
    from model import Config, Tokenizer, Transformer, compile_decode

    rank, world, device = setup_distributed(args.device, args.offload)
    if args.dry_run:
        if rank == 0:
            dry_run(args, world)
        return None
    if args.stage == "sft":
        if args.batch_size % world:
            raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the world size {world}")
        args.micro_batch_size = min(args.micro_batch_size, args.batch_size // world)  # a memory knob, never an error
    cfg = Config.from_pretrained(args.model)  # a folder that is no checkpoint fails here, before any work
    if args.tp > 1:
        import tp
        if tp.problems(cfg, args.tp, world):
            raise ValueError(tp.problems(cfg, args.tp, world)[0])
    resume_from = check_run_folder(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = Tokenizer.from_pretrained(args.model)
    if args.fsdp:  # fp32 master weights sharded over the ranks; rank 0 alone reads the checkpoint
        import fsdp
        model = fsdp.load_sharded(resume_from or args.model, device, args.offload)
    else:
        model = Transformer.from_pretrained(resume_from or args.model, device=device, dtype=torch.float32)  # fp32 master
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    step = 0
    if resume_from:
        # On the CPU: the random state must stay a CPU tensor, and load_state_dict moves the optimizer's
        # tensors to their parameters' device.
        state = read_trainer_state(os.path.join(resume_from, "trainer.pt"))
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
    run = Run(model=model, ddp=data_parallel(model) if TORCHRUN and not args.fsdp else model, optimizer=optimizer,
              tokenizer=tokenizer, rank=rank, world=world, device=device, sharded=args.fsdp, offload=args.offload,
              autocast=torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"))
    if args.stage == "rl" or args.eval_data:  # the weights the sampler reads (rollouts, the benchmark eval)
        run.rollout_dtype = name = rollout_dtype(args.rollout_dtype, model.config, device, rank,
                                                 state.get("rollout_dtype") if resume_from else None)
        run.rollout = rlsp.RolloutWeights(model, getattr(torch, name), args.fsdp,
                                          tp.mesh(device, args.tp) if args.tp > 1 else None,
                                          compile_decode(args.compile, device) and args.tp == 1)
    setup, step_fn = STAGES[args.stage]
    described = setup(run, args)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        log = os.path.join(args.out, "metrics.jsonl")
        if os.path.isfile(log):  # steps after the checkpoint are redone: drop their old lines
            write_atomic(log, "".join(json.dumps(r) + "\n" for r in read_metrics(log) if r["step"] <= step))
        write_atomic(os.path.join(args.out, "args.json"), json.dumps(saved_args(args), indent=2))
        print(f"{args.stage}: {described}; world {world} on {device}; steps {step} -> {args.max_steps}" +
              (f"; resumed from {resume_from}" if resume_from else ""))
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None
    tracker = Tracker(args) if rank == 0 else None
    if not resume_from:
        cli.interrupt_note = (f"no checkpoint yet in {args.out} (one every --save-every {args.save_every} steps); "
                              f"rerun the same command with --resume to start it again")
    if rank == 0 and args.max_steps <= args.warmup_steps and not resume_from:
        print(f"warning: --max-steps {args.max_steps} ends before the --warmup-steps {args.warmup_steps} do: the learning "
              f"rate never reaches --lr {args.lr:g} (it stops at {lr_at(args.max_steps - 1, args):.2e})")
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
        if args.offload and device.type == "cuda":  # the offloaded state is host memory, which the GPU's peak omits
            row["peak_host_gib"] = peak_memory_gib(torch.device("cpu"))
        eval_now = args.eval_every and (step % args.eval_every == 0 or step == args.max_steps)
        if eval_now and args.stage == "sft" and run.heldout_rows:
            row["heldout_loss"] = heldout_loss(model, run.heldout_rows, args, device, run.autocast, rank == 0)
        if eval_now and args.eval_data:
            row.update(benchmark_eval(run, args, step))
        if rank == 0:
            eta = (time.perf_counter() - t_start) / (step - first_step) * (args.max_steps - step)
            bar.update(1)
            bar.write(log_line(row, eta))
            if args.stage == "rl" and (row["grad_norm"] == 0 or row["zero_variance_groups"] * args.group_size ==
                                       row["episodes"]):
                bar.write(f"warning: step {step} {'trained nothing' if row['grad_norm'] == 0 else 'trained only the KL term'}"
                          f": {nothing_learned(row)}")
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
            self.wandb = wandb.init(project=args.wandb, id=run_id, resume="allow", dir=args.out, config=saved_args(args),
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


LOG_KEYS = ("loss", "reward", "accuracy", "exploration", "mean_length", "truncation_rate", "zero_variance_groups",
            "kl", "entropy_est", "clip_frac", "logprob_gap", "grad_norm", "lr", "tokens_per_s", "heldout_loss",
            "peak_mem_gib")


def nothing_learned(row):
    """Why an RL step's rewards gave no signal: every group's rewards were equal (with a group baseline,
    every advantage is then 0), and what they had in common."""
    if row["truncation_rate"] == 1.0:
        why = "every response was cut off at --max-new-tokens (raise it, or see --overlong-buffer)"
    elif row["accuracy"] == 0.0:
        why = "every response was wrong"
    elif row["accuracy"] == 1.0:
        why = "every response was right (--filter-solved drops problems the model already solves)"
    else:
        why = "the responses of each problem scored the same"
    return f"each group's rewards were all equal, so every advantage was 0: {why}"


def log_line(row, eta):
    """One dense line per step."""
    parts = [f"step {row['step']:6d}"]
    for k in LOG_KEYS:
        if k in row:
            v = row[k]
            parts.append(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.0f}" if k.endswith("per_s") or k == "mean_length"
                         else f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}")
    return " | ".join(parts) + f" | eta {eta / 60:.1f} min"


def benchmark_eval(run, args, step):
    """eval.py's greedy benchmark eval of the current policy, from the sampler's weights (a bf16 copy on
    GPU; gathered when sharded), each rank sampling its share of the problems: no rank waits on a long
    eval by another, past the collectives' timeout. Rank 0 writes OUT/eval-STEP (samples.jsonl,
    summary.json) and returns the accuracy and mean length for the metrics row; the other ranks {}."""
    from data import load_dataset
    from eval import append_samples, sample_records, write_summary
    records = load_dataset(args.eval_data, args.data_dir, limit=args.eval_limit)
    lines = run.rollout.together(  # every rank: gathering the weights, or sampling split with --tp, is collective
        lambda weights, mine: sample_records(weights, run.tokenizer, mine, max_new_tokens=args.eval_max_new_tokens,
                                             prompt=args.prompt, progress=False, compiled=run.rollout.compiled),
        records[run.rank::run.world])
    if dist.is_initialized():
        parts = [None] * run.world
        dist.all_gather_object(parts, lines)
        order = {r.id: i for i, r in enumerate(records)}
        lines = sorted((x for p in parts for x in p), key=lambda x: order[x["id"]])
    if run.rank != 0:
        return {}
    out = os.path.join(args.out, f"eval-{step:06d}")
    shutil.rmtree(out, ignore_errors=True)  # a step redone after --resume evaluates again
    os.makedirs(out)
    append_samples(os.path.join(out, "samples.jsonl"), lines)
    s = write_summary(lines, "strict", out)
    return {f"eval_{args.eval_data}_accuracy": s["accuracy"], f"eval_{args.eval_data}_mean_length": s["mean_length"]}


def rollout_dtype(flag, cfg, device, rank, resumed=None):
    """--rollout-dtype: the weights the sampler reads, by name. auto: what the run sampled in before a resume,
    else rank 0's choice (model.sampling_dtype) for every rank: on CPU it is a measurement, ranks timing at
    once on shared cores could disagree, and --tp's collectives need one dtype."""
    from model import sampling_dtype
    if flag != "auto":
        return flag
    if resumed is not None:
        return resumed
    name = [str(sampling_dtype(cfg, device)).removeprefix("torch.") if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    return name[0]


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        return plot(args.plot)
    if args.tiny or (not args.model and not args.dry_run):  # the tiny run, or the offline demo (the main job)
        import demo
        return demo.tiny(args) if args.tiny else demo.run(args)
    return train(args)


if __name__ == "__main__":
    cli.run(main)
