"""The GPU checks, one command on a machine with a CUDA GPU:

    python -m pytest -q tests/test_gpu.py

Skipped where torch sees no CUDA device. Built for a stock CUDA PyTorch stack with no network: every
model is made here by transformers with random weights at real shapes, the tokenizer is trained here
on synthetic text, the data is synthetic arithmetic; nothing the other tests download or convert is
read. What each check means is in the README ("First run on a GPU"); tests/test_gpu_conditions.py
reproduces on CPU whatever of this a CPU can show. RLSP_GPU_TESTS_ON_CPU=1 runs the checks' logic on
the CPU (the CUDA-only assertions skipped), to check this file itself without a GPU.
"""
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import demo
import rlsp
import train
from bench import uniform_problems
from conftest import QWEN2_TEMPLATE, _redraw
from model import Tokenizer, Transformer, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu" if os.environ.get("RLSP_GPU_TESTS_ON_CPU") else None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (run on a GPU machine; RLSP_GPU_TESTS_ON_CPU=1 "
                                                       "checks this file's logic on the CPU)")
cuda_only = pytest.mark.skipif(not CUDA, reason="a CUDA-only assertion")

# Real shapes (their config.json's), random weights.
SHAPES = {
    "smollm2-135m": ("LlamaForCausalLM", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                              num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                              rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                             rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                             use_sliding_window=False)),
    "qwen3-0.6b": ("Qwen3ForCausalLM", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                           num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                           head_dim=128, rope_theta=1000000.0, tie_word_embeddings=True,
                                           rms_norm_eps=1e-6)),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(path):
    """A byte-level BPE trained on synthetic arithmetic with a Qwen-style chat template (its ids fill the
    first few hundred of the model's vocabulary; ids beyond it decode to nothing)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from data import arithmetic
    texts = [f"{r.problem} = {r.meta['steps']}" for r in arithmetic(2000, seed=1, terms=4)]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts + ["Problem: What is the answer?"] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    demo.write_tokenizer(path, tk, QWEN2_TEMPLATE, "<|im_end|>", "<|endoftext|>")


def checkpoint(path, shape, layers=None):
    """A random-weight HF checkpoint at `shape` (optionally fewer layers), with the synthetic tokenizer."""
    import transformers
    arch, kw = SHAPES[shape]
    kw = dict(kw, max_position_embeddings=4096, bos_token_id=0, eos_token_id=2)
    if layers:
        kw["num_hidden_layers"] = layers
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**kw)
    hf = getattr(transformers, arch)(config)
    _redraw(hf, seed=0)
    with torch.no_grad():  # N(0, 1) tied embeddings make every next-token distribution one-hot: no gradient
        hf.get_input_embeddings().weight.mul_(0.1)
    hf.save_pretrained(path)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return {"smollm2": checkpoint(str(root / "smollm2"), "smollm2-135m"),
            "qwen2.5": checkpoint(str(root / "qwen2.5"), "qwen2.5-0.5b"),
            "qwen3": checkpoint(str(root / "qwen3"), "qwen3-0.6b", layers=8),
            "small": checkpoint(str(root / "small"), "smollm2-135m", layers=4)}


def arithmetic_jsonl(path, n=64):
    from data import arithmetic
    with open(path, "w") as f:
        for r in arithmetic(n, seed=0, terms=3, digits=1):
            f.write(json.dumps({"problem": r.problem, "answer": r.answer}) + "\n")
    return str(path)


def hf_model(path, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(DEVICE).eval()


# ----------------------------------------------------------------------------- the model against transformers

@pytest.mark.parametrize("name", ["smollm2", "qwen2.5", "qwen3"])
def test_bf16_logits_match_transformers(folders, name):
    ours = Transformer.from_pretrained(folders[name], device=DEVICE, dtype=torch.bfloat16)
    ref = hf_model(folders[name], torch.bfloat16)
    ids = torch.randint(3, ours.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits.float()
    assert (a - b).abs().mean() < 0.02 * b.abs().mean(), ((a - b).abs().mean(), b.abs().mean())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.98


def test_batched_greedy_decoding_matches_transformers(folders):
    """fp32 (no TF32), prompts of different lengths left-padded for transformers: the same tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = Transformer.from_pretrained(folders["smollm2"], device=DEVICE, dtype=torch.float32)
    ref = hf_model(folders["smollm2"], torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (7, 31, 64, 18)]
    outs = generate(ours, prompts, 32, temperature=0)
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              pad_token_id=0)[:, P:].tolist()
    assert [c.tokens for c in outs] == theirs


def test_compiled_decode_step_equals_eager(folders):
    """generate(compiled=True): torch.compile's inductor kernels, replayed as a CUDA graph per (rows, window)
    bucket. fp32 without TF32, mixed prompt lengths, groups of samples, stop ids that end rows early (so the
    batch shrinks through several row buckets and the window grows through several): eager's tokens, up to
    near ties. Then bf16 at temperature 1 with other prompts and lengths (one compile for the bf16 weights):
    new graphs, no further compile."""
    import model as model_module
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = Transformer.from_pretrained(folders["smollm2"], device=DEVICE, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (7, 31, 64, 18, 130, 3)]
    free = generate(ours, prompts, 300, temperature=0)
    stops = sorted({c.tokens[10 + 45 * i] for i, c in enumerate(free)})  # tokens the rows write: they end apart
    eager = generate(ours, prompts, 300, temperature=0, samples=2, stop_token_ids=stops)
    compiled = generate(ours, prompts, 300, temperature=0, samples=2, stop_token_ids=stops, compiled=True)
    assert len({len(c.tokens) for c in eager}) > 2
    # cuBLAS may pick other kernels for the compiled step's row buckets than for eager's live rows (rounding
    # only): a row may part from eager's at a near tie, never at a confident token.
    for i, (x, y) in enumerate(zip(eager, compiled)):
        j = next((j for j, (s, t) in enumerate(zip(x.tokens, y.tokens)) if s != t), None)
        if j is None:
            assert x.tokens == y.tokens
            continue
        with torch.no_grad():
            logits = ours(torch.tensor([prompts[i // 2] + x.tokens[:j]], device=DEVICE))[0, -1]
        assert abs((logits[x.tokens[j]] - logits[y.tokens[j]]).item()) < 1e-3, (i, j)
    compiles, graphs = model_module.COMPILE_STATS["compiles"], model_module.COMPILE_STATS["graphs"]
    assert graphs > 0 or not CUDA
    sampler = Transformer.from_pretrained(folders["smollm2"], device=DEVICE, dtype=torch.bfloat16)
    generate(sampler, prompts[:3], 200, temperature=1.0, seed=0, samples=4, stop_token_ids=stops, compiled=True)
    generate(sampler, prompts[2:], 100, temperature=1.0, seed=1, samples=3, stop_token_ids=stops, compiled=True)
    assert model_module.COMPILE_STATS["compiles"] <= compiles + 1  # the bf16 weights: one graph more at most
    assert model_module.COMPILE_STATS["graphs"] > graphs or not CUDA


# ----------------------------------------------------------------------------- attention kernels

@cuda_only
@pytest.mark.parametrize("name", ["smollm2", "qwen2.5", "qwen3"])
def test_attention_never_needs_the_math_kernel(folders, name):
    """With SDPA's math kernel disabled, every attention path still runs: SFT's packed rows (forward and
    backward, bf16 autocast), the sampler's prefill and decode steps (bf16), the RL continuation pass
    (forward and backward). The math kernel is what a mask together with grouped-query heads falls to."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    policy = Transformer.from_pretrained(folders[name], device=DEVICE, dtype=torch.float32).train()
    sampler = Transformer.from_pretrained(folders[name], device=DEVICE, dtype=torch.bfloat16)
    ids = torch.randint(3, 400, (2, 256), device=DEVICE)
    doc = (torch.arange(256, device=DEVICE) >= 100).long().expand(2, -1)
    pos = torch.cat([torch.arange(100), torch.arange(156)]).to(DEVICE).expand(2, -1)
    packed = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(256, 256, dtype=torch.bool, device=DEVICE).tril())
    prompts = [ids[0, :40].tolist(), ids[1, :90].tolist()]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            policy(ids, pos, packed[:, None], targets=ids).sum().backward()
        outs = generate(sampler, prompts, 48, temperature=1.0, seed=0, samples=2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            policy(prompts, continuations=[c.tokens for c in outs], prompt_of=[0, 0, 1, 1]).sum().backward()


def test_decode_loop_syncs_once_per_check(folders):
    """The host waits for the GPU once every `check_every` tokens (to see which rows stopped), not per token."""
    if not CUDA:
        pytest.skip("CUDA's sync debug mode; on CPU see test_gpu_conditions.py")
    import warnings
    sampler = Transformer.from_pretrained(folders["small"], device=DEVICE, dtype=torch.bfloat16)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate(sampler, [[5, 6, 7], [8, 9, 10, 11]], 64, temperature=1.0, seed=0, check_every=8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # one per check (7 before the last token), plus the set-up's and the results' copies (~7 now): never one a token
    assert len(syncs) <= 64 // 8 + 12, len(syncs)


# ----------------------------------------------------------------------------- the RL step

def rl_run(path, checkpointing=False):
    """What train.py builds for an RL step on one GPU: fp32 master weights, fused AdamW, bf16 autocast, the
    sampler's bf16 copy; responses run to the token limit (no stop ids)."""
    m = Transformer.from_pretrained(path, device=DEVICE, dtype=torch.float32).train()
    m.gradient_checkpointing = checkpointing
    tok = Tokenizer.from_pretrained(path)
    tok.stop_token_ids = []
    run = types.SimpleNamespace(model=m, ddp=m, tokenizer=tok, rank=0, world=1, device=torch.device(DEVICE),
                                judge=None, ref=None, autocast=torch.autocast(DEVICE, dtype=torch.bfloat16))
    run.rollout = rlsp.RolloutWeights(m, torch.bfloat16)
    run.optimizer = train.make_optimizer(m, 1e-3)

    def step(loss):
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0).item()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        return norm
    run.step = step
    return run


def alternate_verdicts(episodes, **kw):
    """A stand-in verifier that marks every third response correct, so that every group trains."""
    from verifier import Verdict
    for i, e in enumerate(episodes):
        e.verdict = Verdict(i % 3 == 0, "0", "correct" if i % 3 == 0 else "wrong")


def test_second_rl_step_samples_from_the_updated_weights(folders, monkeypatch):
    """Fused AdamW updates the fp32 weights without bumping their version counters; after each step the
    sampler's bf16 copy must equal the updated policy, and differ from the step-0 weights."""
    monkeypatch.setattr(rlsp, "grade_episodes", alternate_verdicts)
    run = rl_run(folders["small"])
    s = rlsp.Settings(group_size=4, max_new_tokens=32, temperature=2.0, exploration="none")
    records = uniform_problems(run.tokenizer, 4, 160)
    start = [p.detach().clone() for p in run.rollout().parameters()]
    for step in range(2):
        row = rlsp.rl_step(run, records[2 * step:2 * step + 2], s, step, step, run.step)
        assert row["grad_norm"] > 0
        copy = run.rollout()
        for c, p in zip(copy.parameters(), run.model.parameters()):
            assert torch.equal(c, p.detach().to(torch.bfloat16))
    assert any(not torch.equal(a, b) for a, b in zip(start, copy.parameters()))


@cuda_only
@pytest.mark.parametrize("checkpointing", [False, True])
def test_rl_step_peak_memory_matches_dry_run(folders, monkeypatch, checkpointing, tmp_path):
    """One RL step at Qwen2.5-0.5B's shape: torch.cuda.max_memory_allocated within 15% of what --dry-run
    prints for the same settings (512-token prompts, every response at the limit)."""
    monkeypatch.setattr(rlsp, "grade_episodes", alternate_verdicts)
    run = rl_run(folders["qwen2.5"], checkpointing)
    argv = ["--stage", "rl", "--model", folders["qwen2.5"], "--prompts-per-step", "4", "--group-size", "4",
            "--max-new-tokens", "256", "--micro-batch-tokens", "4096", "--exploration", "none", "--dry-run",
            *(["--grad-checkpointing"] if checkpointing else [])]
    args = train.parse_args(argv)
    s = rlsp.Settings.from_args(args)
    records = uniform_problems(run.tokenizer, 8, 512)
    rlsp.rl_step(run, records[:4], s, 0, 0, run.step)  # AdamW's moments exist from here on
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rlsp.rl_step(run, records[4:], s, 1, 1, run.step)
    measured = torch.cuda.max_memory_allocated()
    planned = train.dry_run(args, 1)
    print(f"peak allocated {measured / 2**30:.2f} GiB, planned {planned / 2**30:.2f} GiB")
    assert measured == pytest.approx(planned, rel=0.15)


# ----------------------------------------------------------------------------- train.py end to end

def train_argv(path, data, out, *extra):
    return ["--model", path, "--data", data, "--out", str(out), "--eval-every", "0", "--device", DEVICE, *extra]


SFT = ["--stage", "sft", "--heldout", "8", "--seq-len", "256", "--batch-size", "4", "--micro-batch-size", "2",
       "--lr", "1e-3", "--warmup-steps", "1"]
RL = ["--stage", "rl", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "32", "--temperature", "3",
      "--lr", "1e-3", "--warmup-steps", "1"]


def sft_jsonl(path, n=64):
    from data import arithmetic
    with open(path, "w") as f:
        for r in arithmetic(n, seed=0, terms=3, digits=1):
            f.write(json.dumps({"prompt": r.problem, "response": r.meta["steps"]}) + "\n")
    return str(path)


def test_sigkill_and_resume_equals_the_straight_run(folders, tmp_path):
    """--resume on a GPU (it crashed when the random state was loaded onto the GPU): a run SIGKILLed after
    its second of four checkpoints and resumed ends where the straight run ends. Not bit for bit as on CPU
    (tests/test_train.py): the memory-efficient attention's backward adds with atomics in any order, and AdamW
    turns a near-zero gradient's rounding into a full step; so the two runs' final weights must differ by under
    1% of how far training moved them (a lost optimizer state or a replayed batch moves them by far more)."""
    data = sft_jsonl(tmp_path / "sft.jsonl")
    common = [*SFT, "--max-steps", "40", "--save-every", "10", "--keep", "3"]
    train.main(train_argv(folders["small"], data, tmp_path / "straight", *common))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *train_argv(folders["small"], data, tmp_path / "killed", *common)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.isdir(tmp_path / "killed" / "step-000020"):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.isdir(tmp_path / "killed" / "final"), "the kill should land mid-run"
    p = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    from safetensors.torch import load_file
    a = load_file(os.path.join(tmp_path, "straight", "final", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "killed", "final", "model.safetensors"))
    start = load_file(os.path.join(folders["small"], "model.safetensors"))
    keys = a.keys() & start.keys()  # the same HF names (a tied head saved by neither)
    assert len(keys) == len(a)
    apart = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in keys) ** 0.5
    moved = sum(((a[k].float() - start[k].float()) ** 2).sum() for k in keys) ** 0.5
    assert moved > 0 and apart < 0.01 * moved, (apart, moved)
    la = [json.loads(x)["loss"] for x in open(tmp_path / "straight" / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "killed" / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-3)


@pytest.mark.parametrize("sharding", [[], ["--fsdp"], ["--fsdp", "--offload"]], ids=["ddp", "fsdp", "offload"])
def test_torchrun_one_process_sft_and_rl_step(folders, tmp_path, sharding):
    """torchrun with one process: NCCL (gloo on CPU), DDP or FSDP2 over a world of one, one SFT step and one
    RL step (bf16 gathers under FSDP, the sampler's copy gathered from the shards). --offload: the shards in
    pinned host memory, gathered to the GPU, the optimizer stepping on the CPU, the cpu:gloo,cuda:nccl group
    for the gradient norm, and the host's peak logged."""
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            os.path.join(ROOT, "train.py")]
    sft = subprocess.run([*base, *train_argv(folders["small"], sft_jsonl(tmp_path / "sft.jsonl"), tmp_path / "sft",
                                             *SFT, "--max-steps", "1", *sharding)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert sft.returncode == 0, sft.stderr[-3000:]
    rl = subprocess.run([*base, *train_argv(str(tmp_path / "sft" / "final"), arithmetic_jsonl(tmp_path / "rl.jsonl"),
                                            tmp_path / "rl", *RL, "--max-steps", "1", *sharding)],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rl.returncode == 0, rl.stderr[-3000:]
    row = json.loads(open(tmp_path / "rl" / "metrics.jsonl").readline())
    assert row["tokens"] > 0 and row["updates"] == 1
    assert ("peak_host_gib" in row) == ("--offload" in sharding and CUDA)


# ----------------------------------------------------------------------------- bench

def test_bench_on_the_gpu_prints_its_table():
    """bench.py --device cuda at one shape, small: finishes (its rollout measure asserted token-identical
    rollouts, which bf16 GEMMs at two batch sizes cannot promise) and prints the comparison table."""
    if not CUDA:
        pytest.skip("bench.py --device cuda needs a GPU")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device", "cuda", "--shapes", "qwen2.5-0.5b",
                        "--batch", "8", "--new-tokens", "64", "--repeats", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| sampling, uniform prompts, new tokens/s" in p.stdout and "rows token-identical" in p.stdout
    assert "share of the memory-bandwidth limit" in p.stdout
    assert "| sampling, uniform prompts, rlsp compiled" in p.stdout and "compiled decode step:" in p.stdout
    print(p.stdout)
