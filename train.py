"""Training: the SFT stage of RLSP, on one process or many (torchrun).

    python train.py --stage sft --model DIR --data math_train --out runs/sft
    torchrun --nproc_per_node 8 train.py --stage sft --model DIR --data math_train --out runs/sft
    python train.py --stage sft --model DIR --dry-run        # memory per GPU, before spending any compute
    python train.py --plot runs/sft                          # PNG curves of metrics.jsonl

Each step: a global batch of packed rows (each example attends only to itself), cross-entropy on
assistant tokens only, normalised by the global number of such tokens (so any split over GPUs and
micro-batches gives the same gradient), AdamW(0.9, 0.95), cosine schedule with warm-up and a floor at
10% of peak, clipping at 1.0; bf16 autocast on GPU with fp32 master weights. Checkpoints are HF folders
plus trainer state, written to a temporary folder and renamed; `--resume` continues exactly.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist

DEFAULTS = dict(stage="sft", data="math_train", prompt="paper", seq_len=2048, batch_size=32, micro_batch_size=4,
                lr=1e-5, min_lr_ratio=0.1, warmup_steps=20, weight_decay=0.0, grad_clip=1.0, max_steps=1000,
                epochs=None, save_every=200, keep=2, heldout=64, eval_every=100, seed=0)
# Arguments that define a run: resuming with different values would silently train something else.
RUN_IDENTITY = ("stage", "model", "data", "prompt", "seq_len", "batch_size", "lr", "min_lr_ratio", "warmup_steps",
                "weight_decay", "max_steps", "heldout", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--stage", default=DEFAULTS["stage"], choices=["sft"], help="training stage")
    g.add_argument("--model", help="HF model folder to start from")
    g.add_argument("--data", default=DEFAULTS["data"], help="math_train, or a JSONL of (prompt, response) pairs")
    g.add_argument("--data-dir", default=None, help="dataset folder (default $RLSP_DATA_DIR, else download)")
    g.add_argument("--prompt", default=DEFAULTS["prompt"], help="paper | boxed | a template with {problem}")
    g.add_argument("--limit", type=int, default=None, help="use only the first N demonstrations")
    g.add_argument("--out", default="runs/sft", help="run folder")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="tokens per packed row")
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="rows per optimizer step (global)")
    g.add_argument("--micro-batch-size", type=int, default=DEFAULTS["micro_batch_size"], help="rows per forward pass")
    g.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=DEFAULTS["min_lr_ratio"], help="cosine floor / peak")
    g.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"])
    g.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    g.add_argument("--grad-clip", type=float, default=DEFAULTS["grad_clip"])
    g.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"])
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g = p.add_argument_group("checkpoints, evaluation, logs")
    g.add_argument("--save-every", type=int, default=DEFAULTS["save_every"], help="steps between checkpoints")
    g.add_argument("--keep", type=int, default=DEFAULTS["keep"], help="checkpoints kept")
    g.add_argument("--heldout", type=int, default=DEFAULTS["heldout"], help="demonstrations held out for loss")
    g.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"], help="steps between held-out evals")
    g.add_argument("--eval-data", default=None, help="also run eval.py's benchmark eval (e.g. math500)")
    g.add_argument("--eval-limit", type=int, default=100)
    g.add_argument("--eval-max-new-tokens", type=int, default=1024)
    g.add_argument("--dry-run", action="store_true", help="print the memory the run needs per GPU and exit")
    g.add_argument("--gpus", type=int, default=None, help="--dry-run: GPUs to plan for (default: world size)")
    g.add_argument("--plot", metavar="RUN_DIR", help="draw PNG curves of RUN_DIR/metrics.jsonl and exit")
    return p.parse_args(argv)


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
    demos = demonstrations(args.data, args.data_dir, prompt=args.prompt, limit=args.limit)
    if len(demos) <= args.heldout:
        raise ValueError(f"{args.data}: {len(demos)} demonstrations, but --heldout {args.heldout} needs more than that")
    examples = [sft_example(tokenizer, m, r) for m, r in demos]
    heldout = pack(examples[:args.heldout], args.seq_len, tokenizer.pad_token_id)
    train = pack(examples[args.heldout:], args.seq_len, tokenizer.pad_token_id)
    return train, heldout


def step_rows(rows, step, batch_size, seed):
    """Indices of the global batch for `step`: epochs are fresh permutations, a function of seed and
    step only, so a resumed run reads exactly the rows it would have read."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, len(rows))
        perm = random.Random(seed * 1_000_003 + epoch).sample(range(len(rows)), len(rows))
        out.append(perm[j])
    return out


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
def heldout_loss(model, rows, args, device, autocast):
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for i in range(0, len(rows), args.micro_batch_size):
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


def save_checkpoint(model, tokenizer, optimizer, step, args, out=None):
    """RUN_DIR/step-NNNNNN: HF model + tokenizer files + trainer state, written under a .tmp name and
    renamed, so an interrupted save never replaces a good checkpoint. Keeps the last --keep."""
    final = out or os.path.join(args.out, f"step-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out is None:
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng_torch": torch.get_rng_state(),
                    "rng_python": random.getstate(), "args": vars(args)}, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if out is None:
        for old in checkpoints(args.out)[:-args.keep]:
            shutil.rmtree(os.path.join(args.out, old))
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
               if old.get(k) != getattr(args, k)]
    if changed:
        raise ValueError(f"--resume with arguments that differ from the run in {args.out}: {'; '.join(changed)}")
    found = checkpoints(args.out)
    return os.path.join(args.out, found[-1]) if found else None


# ----------------------------------------------------------------------------- memory estimate

def memory_estimate(cfg, args, gpus):
    """Bytes per GPU: fp32 weights, gradients and AdamW moments (sharded when FSDP-style sharding is
    used; here DDP replicates them), bf16 activations of one micro-batch, and one chunk of logits."""
    h, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    n_params = V * h * (1 if cfg.tie_word_embeddings else 2) + L * (h * (q + 2 * kv) + q * h + 3 * h * I + 2 * h) + h
    tokens = args.micro_batch_size * args.seq_len
    # saved for backward per token and layer, bf16: norm inputs (fp32), q/k/v, attention output, MLP in/gate/up/act
    per_layer = 2 * (3 * h + q + 2 * kv + q + 4 * I) + 4 * 2 * h
    acts = tokens * (L * 2 * h * 2 + per_layer) if args.grad_checkpointing else tokens * L * per_layer
    mask = args.micro_batch_size * args.seq_len ** 2
    logits = args.micro_batch_size * 1024 * V * 4 * 3
    parts = {"weights (fp32)": 4 * n_params, "gradients (fp32)": 4 * n_params, "AdamW moments (fp32)": 8 * n_params,
             "activations (bf16)": acts, "attention mask": mask, "logits chunk": logits}
    return n_params, parts


def dry_run(args, world):
    from model import Config
    cfg = Config.from_pretrained(args.model)
    gpus = args.gpus or world
    n, parts = memory_estimate(cfg, args, gpus)
    total = sum(parts.values())
    print(f"{args.model}: {n / 1e9:.2f}B parameters; per GPU (DDP replicates model and optimizer), "
          f"micro-batch {args.micro_batch_size} x {args.seq_len}{', gradient checkpointing' if args.grad_checkpointing else ''}:")
    for k, v in parts.items():
        print(f"  {k:24s} {v / 2**30:8.2f} GiB")
    print(f"  {'total':24s} {total / 2**30:8.2f} GiB (plus allocator slack and the CUDA context, ~1-3 GiB)")
    for gib in (24, 40, 80, 141):
        verdict = "fits" if total * 1.1 + 2 * 2**30 <= gib * 2**30 else "does not fit"
        print(f"  a {gib} GB card: {verdict}")
    return total


# ----------------------------------------------------------------------------- plots

def plot(run_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install matplotlib")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"{path} not found")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
    files = []
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(k)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(os.path.join(run_dir, f"plot_{k}.png"))
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    print(f"wrote {len(files)} plots to {run_dir}")
    return files


# ----------------------------------------------------------------------------- training

def train(args):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm
    from model import Config, Tokenizer, Transformer

    rank, world, device = setup_distributed(args.device)
    if args.dry_run:
        if rank == 0:
            dry_run(args, world)
        return None
    if not args.model:
        raise SystemExit("--model is required")
    if args.batch_size % (world * args.micro_batch_size):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of world size {world} x "
                         f"--micro-batch-size {args.micro_batch_size}")
    Config.from_pretrained(args.model)  # a folder that is no checkpoint fails here, before any work
    resume_from = check_run_folder(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = Tokenizer.from_pretrained(args.model)
    train_rows, heldout_rows = build_rows(args, tokenizer)
    start = resume_from or args.model
    model = Transformer.from_pretrained(start, device=device, dtype=torch.float32)  # fp32 master weights
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    step = 0
    if resume_from:
        state = torch.load(os.path.join(resume_from, "trainer.pt"), map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        step = state["step"]
    ddp = DDP(model) if world > 1 else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
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
        print(f"{len(train_rows)} packed rows of {args.seq_len} tokens ({len(heldout_rows)} held out); "
              f"world {world} on {device}; steps {step} -> {args.max_steps}" + (f"; resumed from {resume_from}" if resume_from else ""))
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc="sft")
    per_rank = args.batch_size // world
    t_start, tokens_seen = time.perf_counter(), 0
    while step < args.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = step_rows(train_rows, step, args.batch_size, args.seed)
        global_targets = sum(sum(train_rows[i]["mask"][1:]) for i in idx)  # known to every rank
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for m in range(0, per_rank, args.micro_batch_size):
            batch = to_batch([train_rows[i] for i in mine[m:m + args.micro_batch_size]], device)
            last = m + args.micro_batch_size >= per_rank
            # DDP averages gradients over ranks; scaling by world makes that the global token mean.
            with (ddp.no_sync() if world > 1 and not last else contextlib.nullcontext()):
                nll = token_losses(ddp, batch, autocast)
                loss = (nll * batch[2]).sum() / max(global_targets, 1)
                (loss * world).backward()
            loss_sum += loss.detach().double()
        loss_value = all_reduce_sum(loss_sum).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            last_good = checkpoints(args.out)
            raise FloatingPointError(f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} "
                                     f"at step {step + 1} (loss {loss_value}, grad norm {grad_norm}); stopping. "
                                     f"Last good checkpoint: "
                                     f"{os.path.join(args.out, last_good[-1]) if last_good else 'none (saved every --save-every steps)'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_tok = args.batch_size * (args.seq_len - 1)
        tokens_seen += n_tok
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": n_tok / dt,
               "assistant_tokens": global_targets}
        if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
            row["heldout_loss"] = heldout_loss(model, heldout_rows, args, device, autocast)
            if args.eval_data and rank == 0:
                row.update(benchmark_eval(model, tokenizer, args, step))
            model.train()
        if rank == 0:
            elapsed = time.perf_counter() - t_start
            eta = elapsed / tokens_seen * (args.max_steps - step) * n_tok
            bar.update(1)
            bar.write(f"step {step:6d} | loss {loss_value:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
                      f"{row['tokens_per_s']:.0f} tok/s | eta {eta / 60:.1f} min" +
                      (f" | heldout {row['heldout_loss']:.4f}" if "heldout_loss" in row else ""))
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if step % args.save_every == 0 or step == args.max_steps:
                save_checkpoint(model, tokenizer, optimizer, step, args)
        if dist.is_initialized():
            dist.barrier()
    if rank == 0:
        bar.close()
        metrics.close()
        final = save_checkpoint(model, tokenizer, optimizer, step, args, out=os.path.join(args.out, "final"))
        print(f"final model: {final}")
        try:
            plot(args.out)
        except SystemExit as e:
            print(e)
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


def benchmark_eval(model, tokenizer, args, step):
    from data import load_dataset
    from eval import evaluate
    model.eval()
    records = load_dataset(args.eval_data, args.data_dir, limit=args.eval_limit)
    s = evaluate(model, tokenizer, records, os.path.join(args.out, f"eval-{step:06d}"), max_new_tokens=args.eval_max_new_tokens,
                 prompt=args.prompt, progress=False)
    return {f"eval_{args.eval_data}_accuracy": s["accuracy"], f"eval_{args.eval_data}_mean_length": s["mean_length"]}


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    train(args)


if __name__ == "__main__":
    main()
