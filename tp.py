"""Tensor-parallel sampling for `--tp N`: the ranks form groups of N that sample together from one bf16
copy of the policy split across the group (torch.distributed.tensor.parallel), so that no rank holds
the whole copy and each reads 1/N of its weights per token.

The split (Megatron's, as PyTorch's ColwiseParallel / RowwiseParallel plans express it): q_proj, gate_proj
and up_proj by output columns (each rank its heads and its share of the MLP), o_proj and down_proj by
input rows with their outputs summed over the group, the vocabulary projection by rows with the logits
gathered, so every rank of a group holds the same logits and draws the same tokens from the same seed.
Keys and values: each rank computes those of the KV heads its query heads use (a group larger than the
number of KV heads repeats them), and its KV cache holds only those. Embeddings and norms stay whole.
Training is untouched: the policy stays DDP's or FSDP2's over all ranks, and its weights are copied into
this layout after each update, tensor by tensor.
"""
import dataclasses

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from fsdp import on_device
from model import Linear, Transformer


def problems(cfg, tp, world):
    """Why `cfg` cannot be split over groups of `tp` of `world` ranks, one sentence each (none: it can)."""
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    out = []
    if world % tp:
        out.append(f"--tp {tp} must divide the number of processes ({world})")
    if h % tp:
        out.append(f"--tp {tp} must divide the {h} attention heads")
    elif kv % tp and tp % kv:
        out.append(f"--tp {tp} and the {kv} KV heads: one must divide the other")
    for name, n in (("intermediate size", cfg.intermediate_size), ("vocabulary", cfg.vocab_size)):
        if n % tp:
            out.append(f"--tp {tp} must divide the {name} ({n})")
    return out


def mesh(device, tp):
    """The TP groups: ranks [0, tp), [tp, 2 tp), ... as the "tp" dimension of a (dp, tp) device mesh. Every
    rank must call it."""
    world = dist.get_world_size()
    return init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))["tp"]


def kv_heads(cfg, tp, rank):
    """(first, count) of the KV heads rank `rank` of its group needs: its own share, or with more ranks
    than KV heads the one head its query heads share."""
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if kv % tp == 0:
        return rank * kv // tp, kv // tp
    return rank * (h // tp) // (h // kv), 1


def build(cfg, dtype, device, tp_mesh):
    """An empty copy of the model `cfg` describes, in `dtype`, split over `tp_mesh` (see the module's
    docstring); its config holds the local head counts, which the sampler's KV cache takes."""
    tp = tp_mesh.size()
    first, n_kv = kv_heads(cfg, tp, tp_mesh.get_local_rank())
    with torch.device("meta"):
        copy = Transformer(cfg).to(dtype)
        for layer in copy.model.layers:
            att = layer.self_attn
            att.k_proj = Linear(cfg.hidden_size, n_kv * cfg.head_dim, bias=cfg.attention_bias, dtype=dtype)
            att.v_proj = Linear(cfg.hidden_size, n_kv * cfg.head_dim, bias=cfg.attention_bias, dtype=dtype)
            att.n_heads, att.n_kv = cfg.num_attention_heads // tp, n_kv
    plan = {"lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(cfg.num_hidden_layers):
        for name, style in (("self_attn.q_proj", ColwiseParallel()), ("self_attn.o_proj", RowwiseParallel()),
                            ("mlp.gate_proj", ColwiseParallel()), ("mlp.up_proj", ColwiseParallel()),
                            ("mlp.down_proj", RowwiseParallel())):
            plan[f"model.layers.{i}.{name}"] = style
    parallelize_module(copy, tp_mesh, plan)  # a tied head becomes a split copy of its own; the embedding stays whole
    copy = copy.to_empty(device=device).requires_grad_(False).eval()
    for m in copy.modules():
        if isinstance(m, Linear):
            m.packable = False  # DTensor weights, or a few rows: no packed copy
    copy.config = dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // tp, num_key_value_heads=n_kv)
    copy.kv_first = first
    return copy


def gather_into(copy, model, tp_mesh):
    """Copy the policy's weights (whole, or FSDP2 shards gathered one tensor at a time) into this rank's part
    of the split `copy`; every rank must call it, in the same order."""
    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    hd = model.config.head_dim
    kv_rows = slice(copy.kv_first * hd, (copy.kv_first + copy.config.num_key_value_heads) * hd)
    source = dict(model.named_parameters(remove_duplicate=False))  # a tied head by its own name too
    with torch.no_grad():
        for name, c in copy.named_parameters():
            p = source[name]
            full = on_device(p, c.device).full_tensor() if isinstance(p, DTensor) else p  # --offload: gather on the GPU
            if isinstance(c, DTensor):  # split along its placement's dimension, evenly (checked by `problems`)
                c.to_local().copy_(full.chunk(tp, dim=c.placements[0].dim)[rank])
            elif ".k_proj." in name or ".v_proj." in name:
                c.copy_(full[kv_rows])
            else:
                c.copy_(full)


def copy_parameters(cfg, tp):
    """Parameters one rank of a group holds in the split copy: its share of q, o, the MLP and the head,
    the keys and values of its KV heads, the whole embedding and norms."""
    from model import parameter_count
    if tp == 1:
        return parameter_count(cfg)
    h, I, L, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, kv_heads(cfg, tp, 0)[1] * hd
    bias = (q // tp + 2 * kv) if cfg.attention_bias else 0
    norms = 2 * h + (2 * hd if cfg.qk_norm else 0)
    return V * h + V * h // tp + L * (h * q // tp + bias + 2 * h * kv + q * h // tp + 3 * h * I // tp + norms) + h
