"""The compiled decode step (generate(compiled=True), --compile): torch.compile with inductor on this CPU, the
same function a GPU compiles and then captures as CUDA graphs (tests/test_gpu.py checks the graphs). It must
draw exactly eager's tokens, and compile once for every batch size and window: never again during a run."""
import json
import os

import torch

import model as model_module
from model import Transformer, generate


def test_compiled_decode_equals_eager(tiny_qwen):
    """Prompts of mixed lengths, groups of samples, stop ids that end rows early (compaction into power-of-two
    buckets, finished rows filling them): the compiled step gives eager's tokens greedily and at temperature 1
    with the same seed (each row draws the same uniforms however the batch is compacted), log-probs to 1e-5,
    and after the first call no call compiles again, whatever its batch, lengths or model object."""
    model = Transformer.from_pretrained(tiny_qwen, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # HF's std 0.02 makes greedy rows repeat one token; std 0.1 gives varied text
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 600, (n,), generator=g).tolist() for n in (5, 40, 17, 90, 3, 60)]
    free = generate(model, prompts, 150, temperature=0)
    stops = sorted({c.tokens[8 + 20 * i] for i, c in enumerate(free)})  # so rows end at different steps
    compiles = None
    for temperature, samples, stop_ids, rows in ((0, 1, (), prompts), (0, 2, stops, prompts),
                                                 (1.0, 3, stops, prompts), (0, 1, stops, prompts[:3])):
        eager = generate(model, rows, 150, temperature=temperature, samples=samples, stop_token_ids=stop_ids, seed=3)
        ours = generate(model, rows, 150, temperature=temperature, samples=samples, stop_token_ids=stop_ids, seed=3,
                        compiled=True)
        assert [c.tokens for c in ours] == [c.tokens for c in eager]
        assert [c.finished for c in ours] == [c.finished for c in eager]
        for a, b in zip(ours, eager):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        if stop_ids:
            assert len({len(c.tokens) for c in eager}) > 2  # rows did stop at different steps
        if compiles is None:
            compiles = model_module.COMPILE_STATS["compiles"]
        assert model_module.COMPILE_STATS["compiles"] == compiles  # one graph for every batch and window
    other = Transformer.from_pretrained(tiny_qwen, device="cpu", dtype=torch.float32)  # the same shapes, other weights
    generate(other, prompts[1:], 40, temperature=0, compiled=True)
    assert model_module.COMPILE_STATS["compiles"] == compiles


def test_rl_run_compiles_once(tmp_path):
    """Three RL steps of `train.py --tiny --stage rl --compile`: rollouts of changing batches (rows ending at
    different steps, windows growing) compile during the first step only; the count and the compile time are
    logged in every metrics row."""
    import train
    train.main(["--tiny", "--stage", "rl", "--compile", "--max-steps", "3", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "rl", "metrics.jsonl"))]
    assert len(rows) == 3
    assert rows[0]["compiles"] >= 1  # this model's shapes are new to the process: its first rollout compiled
    assert rows[0]["compiles"] == rows[1]["compiles"] == rows[2]["compiles"], rows
    assert rows[0]["cuda_graphs"] == 0 and rows[0]["compile_s"] >= 0
    assert len({r["mean_length"] for r in rows}) > 1 or len({r["reward"] for r in rows}) > 1  # batches did change


def test_cuda_graph_buckets_replay_eagers_tokens_and_keep_their_pool(tiny_qwen, monkeypatch):
    """CompiledDecode's CUDA path on this CPU, with torch.cuda's graph calls stood in for by a model of what the
    GPU does: a capture records the step with the tensors it was given, a replay reruns it on whatever those
    same tensors hold then and writes into the same output (so new inputs must be copied into the static
    buffers, never passed as new tensors); and the caching allocator counts each pool's live graphs, refusing
    (an internal assert) a capture into a pool whose graphs were all freed. Greedy tokens must equal eager's
    through several row and window buckets, and every capture must find its pool alive."""
    import contextlib
    pools, capturing = {}, []

    class Graph:
        def capture_begin(self, pool):
            assert pools.get(pool, 1) > 0, "capture into a pool whose graphs were all freed (allocator assert)"
            pools[pool] = pools.get(pool, 0) + 1
            self.pool = pool
            capturing.append(self)

        def capture_end(self):
            capturing.remove(self)

        def replay(self):
            self.out.copy_(step(*self.args))

        def __del__(self):
            pools[self.pool] -= 1

    step = model_module.compiled_decode_step

    def recorded(*args):
        out = step(*args)
        for g in capturing:
            g.args, g.out = args, out
        return out

    class Stream:
        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    handles = iter(range(1000))
    monkeypatch.setattr(model_module, "compiled_decode_step", recorded)
    for name, value in (("CUDAGraph", Graph), ("Stream", Stream), ("current_stream", Stream),
                        ("graph_pool_handle", lambda: next(handles)),
                        ("stream", lambda s: contextlib.nullcontext()), ("device", lambda d: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, value)
    init = model_module.CompiledDecode.__init__

    def on_cuda(self, *args):
        init(self, *args)
        self.cuda = True

    monkeypatch.setattr(model_module.CompiledDecode, "__init__", on_cuda)
    model = Transformer.from_pretrained(tiny_qwen, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 600, (n,), generator=g).tolist() for n in (120, 9, 70, 33)]
    free = generate(model, prompts, 60, temperature=0)
    stops = sorted({c.tokens[10 + 12 * i] for i, c in enumerate(free)})  # rows end at different steps
    eager = generate(model, prompts, 60, temperature=0, samples=2, stop_token_ids=stops)
    graphs = model_module.COMPILE_STATS["graphs"]
    ours = generate(model, prompts, 60, temperature=0, samples=2, stop_token_ids=stops, compiled=True)
    assert [c.tokens for c in ours] == [c.tokens for c in eager]
    assert len({len(c.tokens) for c in eager}) > 2  # rows stopped at different steps: row buckets changed
    assert model_module.COMPILE_STATS["graphs"] - graphs >= 3  # the window crossed 128 slots, rows shrank
    assert list(pools.values()) == [0]  # one pool for the call, released with its last graph
