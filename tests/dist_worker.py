"""Run by tests/test_gpu_conditions.py under `torchrun --nproc_per_node 2` (gloo, CPU): checks of what
only many GPUs would otherwise show. `python -m torch.distributed.run ... tests/dist_worker.py CASE MODEL`;
prints `ok CASE` on rank 0 when every assertion held. A collective that one rank misses fails after
the process group's 60 s timeout instead of hanging the suite."""
import datetime
import os
import sys
import types

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlsp  # noqa: E402
import train  # noqa: E402
from model import Tokenizer, Transformer  # noqa: E402
from verifier import Verdict  # noqa: E402


def episodes(tokenizer, lengths, group_size=2):
    """Hand-made episodes: one prompt per group, responses of the given token counts."""
    out = []
    for i, n in enumerate(lengths):
        prompt = tokenizer.encode(f"Problem: {i // group_size} + {i // group_size} = ?")
        e = rlsp.Episode(types.SimpleNamespace(problem="", answer="0"), prompt, [(7 * i + j) % 500 + 5 for j in range(n)],
                         [0.0] * n, True, "", i // group_size)
        e.verdict, e.rewards = Verdict(False, None, "wrong"), {"total": float(i % 3)}
        out.append(e)
    return out


def one_token_rank(path, rank):
    """FSDP: rank 1's responses are all one token long; rank 0's are longer. Every rank must run the same
    sharded passes (each gathers every block's weights with the other ranks), or the gathers pair with the
    wrong blocks. Then the reference's root (embedding, head) must be resharded after its no-grad pass."""
    import fsdp
    from torch.distributed.tensor import DTensor
    device = torch.device("cpu")
    model = fsdp.load_sharded(path, device).train()
    ref = fsdp.load_sharded(path, device).requires_grad_(False)
    run = types.SimpleNamespace(model=model, ddp=model, ref=ref, sharded=True, device=device, rank=rank, world=2,
                                autocast=torch.autocast("cpu", enabled=False))
    s = rlsp.Settings(group_size=2, max_new_tokens=8, temperature=1.0, kl_coef=0.1, kl_placement="reward",
                      micro_batch_tokens=64)
    eps = episodes(Tokenizer.from_pretrained(path), [1, 1, 1, 1] if rank == 1 else [5, 3, 6, 2])
    plan = rlsp.update_plan(eps, s)
    old = rlsp.policy_logprobs(run, eps, plan, s)
    ref_lp = rlsp.policy_logprobs(run, eps, plan, s, model=ref)
    assert isinstance(ref.lm_head.weight, DTensor) and isinstance(ref.model.embed_tokens.weight, DTensor), \
        "the reference's root stayed gathered after its no-grad pass"
    assert all(torch.equal(a, b) for a, b in zip(old, ref_lp))  # policy = reference before any update
    adv, _ = rlsp.advantages([e.rewards["total"] for e in eps], 2)
    optimizer = train.make_optimizer(model, 1e-3)

    def step(loss):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).full_tensor().item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm
    stats = rlsp.update_policy(run, eps, plan, adv, old, ref_lp, s, step)
    assert stats["updates"] == 1


def ddp_bucket_view(path, rank):
    """DDP keeps the gradients in its buckets: after a backward, the parameters' gradients are views of a
    few flat buffers, not tensors of their own beside them."""
    model = Transformer.from_pretrained(path, device="cpu").train()
    ddp = train.data_parallel(model)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):  # the second backward too: zero_grad(set_to_none) must not end the sharing
        ddp(ids, targets=ids).sum().backward()
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        assert len(storages) < len(list(model.parameters())) / 4, f"{len(storages)} gradient storages"
        model.zero_grad(set_to_none=True)


def tp_sampling(paths, rank):
    """--tp 2: every fixture's split copy decodes greedily the tokens the whole model decodes alone, and at
    temperature > 0 every rank of a group draws the same tokens as the whole model with the same seed.
    Ranks of different groups sample different prompts (each group its own work)."""
    import tp
    mesh = tp.mesh(torch.device("cpu"), 2)
    group = dist.get_rank() // 2
    for path in paths.split(","):
        model = Transformer.from_pretrained(path, device="cpu")
        weights = rlsp.RolloutWeights(model, torch.float32, tp_mesh=mesh)
        copy = weights()
        assert copy.model.layers[0].self_attn.n_heads == model.config.num_attention_heads // 2
        tok = Tokenizer.from_pretrained(path)
        prompts = [tok.encode(f"Problem: {group} + {k} = ?") for k in range(3)] + [tok.encode("What is 17 times 3?")]
        from model import generate
        for kw in (dict(temperature=0), dict(temperature=1.5, seed=group, samples=2)):
            split = [c.tokens for c in generate(copy, prompts, 20, **kw)]
            whole = [c.tokens for c in generate(model, prompts, 20, **kw)]
            assert split == whole, (path, kw)
            together = [None] * 2
            dist.all_gather_object(together, split, group=mesh.get_group())
            assert together[0] == together[1]


if __name__ == "__main__":
    case, path = sys.argv[1:3]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    {"one_token_rank": one_token_rank, "ddp_bucket_view": ddp_bucket_view, "tp_sampling": tp_sampling}[case](path, rank)
    dist.barrier()
    if rank == 0:
        print(f"ok {case}")
    dist.destroy_process_group()
