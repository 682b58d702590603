"""FSDP2 for `torchrun train.py --fsdp`: weights, gradients and AdamW state sharded over the ranks.

The model is sharded with `fully_shard` per decoder block and at the root: each rank keeps 1/world of
every fp32 tensor, a block's full weights exist only while it computes (gathered in bf16 on GPU,
gradients reduce-scattered in fp32). Checkpoints stay HF folders, gathered to rank 0; the exact trainer
state (sharded weights and optimizer) is saved by every rank with torch.distributed.checkpoint. The
sampler reads a plain copy of the full weights, gathered again after each update (rlsp.RolloutWeights).
"""
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from model import Config, Linear, Transformer, rope_frequencies


def load_sharded(path, device, offload=False):
    """The checkpoint at `path`, sharded over the ranks. Only rank 0 reads the files (into CPU memory);
    every other rank starts from an empty model and receives just its shards, so no rank but 0 ever
    holds the full fp32 model. `offload` (--offload): the shards, their gradients and so AdamW's moments
    and step live in CPU memory (FSDP2's CPUOffloadPolicy): each block's shards are copied to the GPU for
    its all-gather, its gradients back after the reduce-scatter, and the optimizer steps on the CPU. The
    process group then needs a CPU backend beside NCCL (train.setup_distributed)."""
    cfg = Config.from_pretrained(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for block in model.model.layers:
        fully_shard(block, mp_policy=mixed, offload_policy=policy)
    fully_shard(model, mp_policy=mixed, offload_policy=policy)
    model.to_empty(device="cpu" if offload else device)
    full = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32).state_dict() \
        if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.inv_freq = rope_frequencies(cfg).to(device)  # a buffer to_empty left unset
    for m in model.modules():
        if isinstance(m, Linear):
            m.packable = False  # its weight is a gathered buffer that FSDP refills: no packed copy can track it
    return model


def full_state(model):
    """The full fp32 state dict on rank 0's CPU ({} on the other ranks); every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_into(copy, model):
    """Copy the sharded `model`'s full weights into `copy` (a plain Transformer of the same config), one
    tensor at a time, so no rank holds a second full fp32 model; every rank must call it."""
    with torch.no_grad():
        for c, p in zip(copy.parameters(), model.parameters()):
            c.copy_(on_device(p, c.device).full_tensor())


def on_device(p, device):
    """A sharded weight whose shard is on `device` (an offloaded shard is copied there first), so that its
    all-gather runs on the GPU's collectives rather than the CPU's."""
    return p.to(device) if p.device != device else p


def save_state(model, optimizer, folder):
    """The sharded weights and AdamW state, each rank writing its own shards (a folder every rank can
    write: one filesystem for all nodes)."""
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=folder)


def load_state(model, optimizer, folder):
    """Inverse of save_state, on the same world size: the run continues exactly."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def rank_file(folder, rank):
    return os.path.join(folder, f"rng-{rank}.pt")


def load_rank_state(folder, rank):
    """This rank's random state from a checkpoint folder; a missing or unreadable file is a one-line error."""
    file = rank_file(folder, rank)
    try:
        return torch.load(file, weights_only=True)  # a run folder may come from someone else: no pickled code
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} not found: the checkpoint lacks this rank's random state") from None
    except Exception as e:  # a truncated or corrupt file: torch.load raises several kinds
        raise ValueError(f"{file}: cannot read this rank's random state ({type(e).__name__}: {e})"[:400]) from None
