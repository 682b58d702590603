"""What only a GPU would show, reproduced on CPU wherever the condition can be: fused AdamW, the attention
shapes CUDA's kernels need, the sampler's peak memory and host syncs, collectives every rank must
reach, the in-loop eval under torchrun, and the device flags. The rest runs on a GPU in
tests/test_gpu.py; where a condition has no CPU reproduction, the test below says so."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import model as model_module
import rlsp
import train
from model import Config, Tokenizer, Transformer, generate, kv_cache_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# At temperature 30 the tiny model's draws are nearly uniform: some responses stop early, so lengths and
# length rewards differ within groups and every step trains.
RL = ["--stage", "rl", "--data", "gsm8k", "--limit", "16", "--prompts-per-step", "2", "--group-size", "4",
      "--max-new-tokens", "40", "--temperature", "30", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "0",
      "--save-every", "100"]


def torchrun(*argv, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,  # a hang guard only
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def peak_bytes(fn):
    """fn's result and the peak of its live CPU tensor bytes above what was live when it started, read off
    the profiler's allocation events in time order (frees are negative allocations)."""
    from torch._C._profiler import _EventType
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)
    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return result, peak


# ----------------------------------------------------------------------------- 1. fused AdamW

def test_fused_adamw_updates_reach_the_sampler(tiny_llama, tmp_path):
    """Fused AdamW (train.py's, on every device) writes the weights without bumping their version counters;
    the sampler must still read the updated policy. In fp32 on CPU the sampler is the policy itself
    (through its packed copies of the weights), so its log-probs equal the trainer's at every step unless
    it samples from stale weights; with a high learning rate stale weights would be far off."""
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    torch.optim.AdamW([p], fused=True).step()
    assert p._version == 0  # the condition: nothing but an explicit signal says the weights moved
    # 16 responses a step: a step trains unless all 16 run to the token limit with equal rewards
    train.main(["--model", tiny_llama, *RL, "--prompts-per-step", "4", "--max-steps", "4", "--out", str(tmp_path / "run")])
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert sum(r["grad_norm"] > 0 for r in rows[:-1]) >= 2, [r["grad_norm"] for r in rows]  # updates, then samples
    assert max(r["logprob_gap"] for r in rows) < 1e-4, [r["logprob_gap"] for r in rows]
    # the bf16 copy on GPU: tests/test_rl_step.py::test_rollout_weights_bf16_copy_follows_the_policy


# ----------------------------------------------------------------------------- 2. resume

def test_resume_reads_trainer_state_onto_the_cpu(tiny_llama, tmp_path, monkeypatch):
    """No CPU reproduction: on a GPU, trainer.pt loaded with map_location=cuda put the random state on the
    GPU, and torch.set_rng_state (CPU tensors only) raised on every --resume. Checked here: the state is
    read onto the CPU (and without running code from the file); tests/test_gpu.py resumes on a GPU."""
    common = ["--model", tiny_llama, *RL, "--max-steps", "2", "--save-every", "1", "--out", str(tmp_path / "run")]
    train.main(common)
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append((a, kw)) or real(*a, **kw))
    train.main([*common, "--resume"])
    (file,), kw = next((a, kw) for a, kw in loads if str(a[0]).endswith("trainer.pt"))
    assert file == os.path.join(tmp_path, "run", "step-000002", "trainer.pt")
    assert kw["map_location"] == "cpu" and kw["weights_only"] is True


# ----------------------------------------------------------------------------- 3. attention shapes

@pytest.fixture
def cuda_shapes(monkeypatch):
    """Turn on the shapes attention() gives CUDA's kernels, and record every SDPA call's arguments."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((q.shape, k.shape, attn_mask is not None, enable_gqa))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)

    def switch(on):
        monkeypatch.setattr(model_module, "CUDA_ATTENTION_SHAPES", on)
        calls.clear()
        return calls
    return switch


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen", "tiny_qwen3"])
def test_cuda_attention_shapes_equal_the_plain_ones(fixture, request, cuda_shapes):
    """Each masked attention with grouped-query heads (SFT's packed rows, prefill, decode steps, the RL
    continuation pass) computed in the shapes CUDA needs (decode: heads folded into the query axis;
    longer queries: K/V expanded) equals the plain call; and in those shapes no call combines a mask
    with grouped heads, which on CUDA only the math kernel accepts."""
    path = request.getfixturevalue(fixture)
    model = Transformer.from_pretrained(path, device="cpu")
    tok = Tokenizer.from_pretrained(path)
    ids = torch.randint(0, 700, (2, 18), generator=torch.Generator().manual_seed(0))  # two packed rows, 2 examples each
    doc = torch.tensor([[0] * 10 + [1] * 8, [0] * 5 + [1] * 13])
    pos = torch.tensor([list(range(10)) + list(range(8)), list(range(5)) + list(range(13))])
    packed = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(18, 18, dtype=torch.bool).tril())[:, None]
    prompts = [tok.encode("Problem: 2+2"), tok.encode("Problem: what is 17 times 3, then add 5?")]
    results = {}
    for on in (False, True):
        calls = cuda_shapes(on)
        model.zero_grad()
        logits = model(ids, pos, packed)
        logits.sum().backward()
        grad = model.model.layers[0].self_attn.k_proj.weight.grad.clone()
        outs = generate(model, prompts, 12, temperature=0)
        cont = model(prompts, continuations=[c.tokens for c in outs], prompt_of=[0, 1])
        results[on] = logits.detach(), grad, [c.tokens for c in outs], cont.detach()
        if on:
            assert calls and not any(masked and gqa for _, _, masked, gqa in calls), calls
            assert any(q[2] == model.config.num_attention_heads // model.config.num_key_value_heads and k[1] == q[1]
                       for q, k, masked, _ in calls if masked)  # a folded decode step ran
    (a, ga, ta, ca), (b, gb, tb, cb) = results[False], results[True]
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ga, gb, atol=1e-5) and ta == tb
    assert torch.allclose(ca, cb, atol=1e-5)


# ----------------------------------------------------------------------------- 4. sampler memory

def test_generate_peak_memory_is_one_kv_cache(tiny_llama):
    """When half the rows have stopped, generate drops them from the batch. Rebuilding every layer's cache
    from the kept rows before freeing the old ones held 1.5x the cache at that moment; compacting each
    layer into the front of its own buffers holds one cache plus one layer's rows in flight."""
    cfg = Config.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 700, "hidden_size": 64,
                            "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-5,
                            "max_position_embeddings": 1024})
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    prompts = [torch.randint(3, 700, (16,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(32)]
    free = generate(m, prompts, 8, temperature=0)  # the first 8 greedy tokens of every row, nothing stops
    counts = {}
    for c in free:
        for t in set(c.tokens):
            counts[t] = counts.get(t, 0) + 1
    stops, stopped = set(), set()  # stop tokens that end between half and all but one of the rows by step 8
    for t in sorted(counts, key=lambda t: -counts[t]):
        rows = {i for i, c in enumerate(free) if t in c.tokens}
        if len(stopped | rows) < len(prompts):
            stops.add(t)
            stopped |= rows
        if len(stopped) >= len(prompts) // 2:
            break
    assert len(prompts) // 2 <= len(stopped) < len(prompts)
    outs, peak = peak_bytes(lambda: generate(m, prompts, 496, temperature=0, stop_token_ids=stops))
    assert sum(len(c.tokens) < 496 for c in outs) >= len(stopped)  # the early stops happened
    cache = kv_cache_bytes(cfg, len(prompts), 16 + 496, 4)
    assert peak < 1.2 * cache, (peak / cache)


# ----------------------------------------------------------------------------- 8. host syncs

class HostTraffic(TorchDispatchMode):
    """Counts the ops that move data between host and device on a GPU: a tensor made from Python values
    (lift_fresh: a host-to-device copy there) and a tensor read into Python (_local_scalar_dense: the host
    waits for the device)."""

    def __init__(self):
        super().__init__()
        self.counts = {"to_device": 0, "to_host": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("lift_fresh", "lift_fresh_copy"):
            self.counts["to_device"] += 1
        if name in ("item", "is_nonzero", "_local_scalar_dense"):
            self.counts["to_host"] += 1
        return func(*args, **(kwargs or {}))


def test_decode_loop_makes_no_host_transfer_per_token(tiny_qwen):
    """No CPU reproduction of the stall itself (a CPU has no device to wait for), but the cause is visible:
    the traffic between Python and tensors. 8 or 64 new tokens: the same host-to-device copies; reads into
    Python only once per `check_every` tokens."""
    model = Transformer.from_pretrained(tiny_qwen, device="cpu")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    counts = {}
    for n in (8, 64):
        with HostTraffic() as mode:
            generate(model, prompts, n, temperature=1.0, seed=0, check_every=8)
        counts[n] = dict(mode.counts)
    assert counts[64]["to_device"] == counts[8]["to_device"], counts
    assert 0 < counts[64]["to_host"] - counts[8]["to_host"] <= (64 - 8) // 8, counts


# ----------------------------------------------------------------------------- 5, 6, 7. collectives, DDP buckets

def test_fsdp_rank_with_one_token_responses_runs_the_same_passes(tiny_llama):
    """FSDP over 2 gloo processes: rank 1's micro-batch holds only one-token responses. Its continuation
    pass used to be skipped, so it issued fewer weight gathers than rank 0 (on NCCL: blocks paired with the
    wrong gathers, then a hang). Also: the reference's root weights are sharded again after its pass."""
    p = torchrun(os.path.join(ROOT, "tests", "dist_worker.py"), "one_token_rank", tiny_llama)
    assert p.returncode == 0 and "ok one_token_rank" in p.stdout, p.stderr[-3000:]


def test_ddp_keeps_gradients_in_its_buckets(tiny_llama):
    p = torchrun(os.path.join(ROOT, "tests", "dist_worker.py"), "ddp_bucket_view", tiny_llama)
    assert p.returncode == 0 and "ok ddp_bucket_view" in p.stdout, p.stderr[-3000:]


# ----------------------------------------------------------------------------- 9. in-loop eval

@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_in_loop_eval_is_shared_by_the_ranks(tiny_llama, tmp_path, sharding):
    """Under torchrun every rank samples its share of the eval problems from the sampler's weights (no rank
    waits out another's eval in a barrier); rank 0 writes one folder with every problem once. The
    result equals eval.py on the same checkpoint."""
    import eval as eval_module
    out = tmp_path / "run"
    p = torchrun(os.path.join(ROOT, "train.py"), "--model", tiny_llama, *RL, "--max-steps", "1", "--eval-data",
                 "gsm8k", "--eval-limit", "5", "--eval-every", "1", "--eval-max-new-tokens", "16",
                 "--out", str(out), *sharding)
    assert p.returncode == 0, p.stderr[-3000:]
    samples = [json.loads(x) for x in open(out / "eval-000001" / "samples.jsonl")]
    assert sorted(s["id"] for s in samples) == sorted({s["id"] for s in samples}) and len(samples) == 5
    row = json.loads(open(out / "metrics.jsonl").readline())
    alone = eval_module.main(["--model", str(out / "final"), "--data", "gsm8k", "--limit", "5", "--max-new-tokens",
                              "16", "--out", str(tmp_path / "alone")])
    assert [s["response"] for s in samples] == [s["response"] for s in eval_module.read_samples(tmp_path / "alone")]
    assert row["eval_gsm8k_accuracy"] == alone["accuracy"]


# ----------------------------------------------------------------------------- 10. bench

def test_bench_rollout_measure_runs_in_bf16(tiny_qwen, capsys):
    """bench.py --device cuda asserted token-identical rollouts between one prefill per group and G prefills;
    in bf16 the GEMMs of 4 and 32 rows round differently and a flipped draw diverges. bf16 on CPU shows the
    same: the measure reports how many rows agree and finishes."""
    import bench
    model = Transformer.from_pretrained(tiny_qwen, device="cpu", dtype=torch.bfloat16)
    args = types.SimpleNamespace(group_prompts=2, group_size=4, new_tokens=16, repeats=1)
    a, b = bench.bench_group_rollout(args, model, [[5, 6, 7, 8, 9], [10, 11, 12]], torch.device("cpu"))
    assert a > 0 and b > 0 and "rows token-identical" in capsys.readouterr().out


def test_bench_sampling_tables_on_cpu(tiny_llama, capsys):
    """The sampling measure as `python bench.py` runs it, small: both prompt sets (the uniform one of similar
    lengths), the ratio table and each side's share of the measured bandwidth, for every precision the CPU
    samples in."""
    import bench
    from model import native_bf16
    bench.main(["--model", tiny_llama, "--measures", "sampling", "--batch", "3", "--new-tokens", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert out.count("| sampling, mixed-length prompts, new tokens/s") == (2 if native_bf16() else 1)
    assert out.count("| sampling, uniform prompts, new tokens/s") == out.count("| uniform prompts ")
    assert "share of the memory-bandwidth limit" in out and "GB/s measured" in out
    assert "rlsp samples this model on this CPU in float32" in out  # tiny: fits the caches
    assert f"({torch.backends.cpu.get_cpu_capability()}" in out  # the CPU named beside its figures
    bench.main(["--model", tiny_llama, "--measures", "sampling", "--batch", "3", "--new-tokens", "4", "--repeats", "1",
                "--no-compile"])
    out = capsys.readouterr().out
    assert "rlsp compiled" in out and "nan" not in out  # the untimed compiled column reads "-"


# ----------------------------------------------------------------------------- 11. device flags

def test_cuda_index_is_kept_for_one_process(monkeypatch):
    """No CUDA here: torch.cuda is stood in for, to check which device a single process picks."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(train, "TORCHRUN", False)
    assert train.setup_distributed("cuda:1")[2] == torch.device("cuda", 1) and chosen == [1]
    assert train.setup_distributed("cuda")[2] == torch.device("cuda", 0)


def test_device_flag_checks(monkeypatch, capsys):
    p = cli.Parser()
    for device, message in (("tpu", "must be cpu, cuda or cuda:N"), ("cpu:1", "must be cpu, cuda or cuda:N"),
                            ("cuda:x", "must be cpu, cuda or cuda:N")):
        with pytest.raises(SystemExit):
            cli.check_device(p, device)
        assert message in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device, torchrun_, message in (("cuda:2", False, "sees 2 GPU(s), cuda:0 to cuda:1"),
                                       ("cuda:1", True, "under torchrun each process takes the GPU of its local rank")):
        with pytest.raises(SystemExit):
            cli.check_device(p, device, torchrun=torchrun_)
        assert message in capsys.readouterr().err
    cli.check_device(p, "cuda:1")


def test_demo_stages_run_on_the_device_given(tmp_path):
    """`python train.py --device cpu` on a GPU machine trained on the GPU: the demo did not pass --device
    to its SFT and RL runs. Each run's args.json now says where it ran."""
    train.main(["--device", "cpu", "--out", str(tmp_path / "demo"), "--demo-problems", "200", "--demo-heldout", "8",
                "--demo-sft-steps", "2", "--demo-rl-steps", "1"])
    for stage in ("sft", "rlsp"):
        assert json.load(open(tmp_path / "demo" / stage / "args.json"))["device"] == "cpu"


# ----------------------------------------------------------------------------- the memory plan

def plan_model(tmp_path, tiny_llama):
    """A 1M-parameter Llama (GQA, 4 query heads per KV head) with the tiny fixture's tokenizer. Small: bf16
    matrix products on a CPU without bf16 units are ~20x slower than fp32."""
    import shutil
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 700, "hidden_size": 128, "intermediate_size": 384,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False}
    torch.manual_seed(0)
    path = str(tmp_path / "plan-model")
    Transformer(Config.from_dict(raw)).save_pretrained(path)
    for f in os.listdir(tiny_llama):
        if f not in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(tiny_llama, f), path)
    return path


def held_bytes(*tensors):
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


@pytest.mark.parametrize("checkpointing,kl", [(False, False), (True, True)])
def test_rl_step_peak_memory_matches_the_plan(tiny_llama, tmp_path, monkeypatch, checkpointing, kl):
    """One RL step as on a GPU (bf16 autocast over fp32 weights, the bf16 rollout copy, CUDA's attention
    shapes), on CPU: its peak live tensor bytes against rlsp.memory_estimate's plan for the same settings,
    within 15% (tests/test_gpu.py checks the same on a GPU). Every response runs to the token limit (no
    stop ids), and the verdicts alternate so that every micro-batch trains."""
    from bench import uniform_problems
    from verifier import Verdict
    monkeypatch.setattr(model_module, "CUDA_ATTENTION_SHAPES", True)
    monkeypatch.setattr(rlsp, "grade_episodes", lambda eps, **kw: [
        setattr(e, "verdict", Verdict(i % 3 == 0, "1", "correct" if i % 3 == 0 else "wrong")) for i, e in enumerate(eps)])
    path = plan_model(tmp_path, tiny_llama)
    model = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32).train()
    model.gradient_checkpointing = checkpointing
    tok = Tokenizer.from_pretrained(path)
    tok.stop_token_ids = []
    run = types.SimpleNamespace(model=model, ddp=model, tokenizer=tok, rank=0, world=1, device=torch.device("cpu"),
                                judge=None, ref=None, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    run.rollout = rlsp.RolloutWeights(model, torch.bfloat16)
    s = rlsp.Settings(group_size=4, max_new_tokens=128, temperature=1.0, micro_batch_tokens=1024, exploration="none",
                      kl_coef=0.05 if kl else 0.0, kl_placement="reward")
    if kl:
        run.ref = rlsp.reference_model(path, "cpu", torch.bfloat16)
    optimizer = train.make_optimizer(model, 1e-4)

    def step(loss):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm
    prompt = 256  # one length for every prompt, as the plan assumes
    records = uniform_problems(tok, 8, prompt)
    rlsp.rl_step(run, records[:4], s, 0, 0, step)  # AdamW's moments exist from here on
    held = held_bytes(*model.parameters(), *run.rollout.copy.parameters(),
                      *(run.ref.parameters() if kl else ()),
                      *(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)))
    _, peak = peak_bytes(lambda: rlsp.rl_step(run, records[4:], s, 1, 1, step))
    _, plan_held, sampling, training = rlsp.memory_estimate(model.config, s, 4, checkpointing, prompt_tokens=prompt)
    assert held == pytest.approx(sum(plan_held.values()), rel=0.01)
    plan = sum(plan_held.values()) + max(sum(sampling.values()), sum(training.values()))
    print(f"measured {(held + peak) / 2**20:.1f} MiB, planned {plan / 2**20:.1f} MiB")
    assert held + peak == pytest.approx(plan, rel=0.15), (held + peak, plan, training)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_step_peak_memory_matches_the_plan(tmp_path, checkpointing, monkeypatch):
    """The same for an SFT step of packed rows (two examples per row, block-diagonal masks)."""
    monkeypatch.setattr(model_module, "CUDA_ATTENTION_SHAPES", True)
    torch.manual_seed(0)
    model = Transformer(Config.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 700, "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 2048})).train()
    model.gradient_checkpointing = checkpointing
    T = 512
    g = torch.Generator().manual_seed(0)
    rows = [{"ids": torch.randint(0, 700, (T,), generator=g).tolist(), "mask": [1] * T,
             "positions": list(range(T // 2)) * 2, "doc": [0] * (T // 2) + [1] * (T // 2)} for _ in range(4)]
    args = train.parse_args(["--model", "unused", "--seq-len", str(T), "--batch-size", "4", "--micro-batch-size", "2",
                             *(["--grad-checkpointing"] if checkpointing else [])])
    optimizer = train.make_optimizer(model, 1e-4)
    run = types.SimpleNamespace(model=model, ddp=model, optimizer=optimizer, train_rows=rows, rank=0, world=1,
                                device=torch.device("cpu"), autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    train.sft_step(run, args, 0)
    held = held_bytes(*model.parameters(), *(t for st in optimizer.state.values() for t in st.values()
                                             if torch.is_tensor(t)))
    _, peak = peak_bytes(lambda: train.sft_step(run, args, 1))
    _, parts = train.memory_estimate(model.config, args)
    print(f"measured {(held + peak) / 2**20:.1f} MiB, planned {sum(parts.values()) / 2**20:.1f} MiB")
    assert held + peak == pytest.approx(sum(parts.values()), rel=0.15)
