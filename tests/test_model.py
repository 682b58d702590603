"""model.py against transformers: logits, cached decoding, batched sampling, save/load, tokenizer, errors."""
import copy
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from model import Config, Linear, Tokenizer, Transformer, generate, row_groups


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_logits_close(ours, ref, tol=1e-4):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max abs diff {err:.3g} vs logit scale {scale:.3g}"


def random_ids(vocab, B, T, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen", "tiny_qwen3", "smollm2"])
def test_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ours, ref = Transformer.from_pretrained(path, device="cpu"), hf_model(path)
    ids = random_ids(ours.config.vocab_size, 2, 80)
    with torch.no_grad():
        assert_logits_close(ours(ids), ref(ids).logits)


def test_config_fields(tiny_llama, tiny_qwen):
    llama, qwen = Config.from_pretrained(tiny_llama), Config.from_pretrained(tiny_qwen)
    assert (llama.head_dim, llama.num_key_value_heads, llama.tie_word_embeddings, llama.attention_bias) == (32, 2, False, False)
    assert llama.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    assert (qwen.head_dim, qwen.tie_word_embeddings, qwen.attention_bias, qwen.rope_theta) == (16, True, True, 1e6)


def test_qwen3_config_and_parameter_count(tiny_qwen3):
    """Qwen3: q/k RMSNorm per head, head_dim (24) not hidden / heads (16), no qkv bias, untied head; the
    parameter count the memory plan uses equals the loaded model's."""
    cfg = Config.from_pretrained(tiny_qwen3)
    assert (cfg.head_dim, cfg.qk_norm, cfg.attention_bias, cfg.tie_word_embeddings) == (24, True, False, False)
    model = Transformer.from_pretrained(tiny_qwen3, device="cpu")
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (24,)
    from model import parameter_count
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen", "tiny_qwen3"])
def test_batched_greedy_matches_transformers(fixture, request):
    """Prompts of different lengths decoded together, greedy: the same tokens as transformers' generate
    on each prompt alone."""
    path = request.getfixturevalue(fixture)
    ours, ref = Transformer.from_pretrained(path, device="cpu"), hf_model(path)
    prompts = [random_ids(700, 1, n, seed=n)[0].tolist() for n in (5, 17, 9)]
    outs = generate(ours, prompts, 24, temperature=0)
    for p, c in zip(prompts, outs):
        with torch.no_grad():
            r = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert c.tokens == r[0, len(p):].tolist()


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},  # Qwen2.5's long-context setting
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "attention_factor": 1.2},
    {"rope_type": "linear", "factor": 2.0}])
@pytest.mark.parametrize("fixture", ["tiny_qwen", "tiny_qwen3"])
def test_rope_scaling_matches_transformers(fixture, rope, request, tmp_path):
    """Scaled RoPE (YaRN with its cos/sin factor, linear) over 80 positions, past the original 16/32."""
    path = request.getfixturevalue(fixture)
    scaled = edit_config(path, tmp_path / "m", rope_parameters={"rope_theta": 1e6, **rope})
    ours, ref = Transformer.from_pretrained(scaled, device="cpu"), hf_model(scaled)
    assert not torch.allclose(ours.inv_freq, Transformer.from_pretrained(path, device="cpu").inv_freq)
    ids = random_ids(ours.config.vocab_size, 2, 80)
    with torch.no_grad():
        assert_logits_close(ours(ids), ref(ids).logits)


def test_transformers4_config_layout(tiny_llama, tmp_path):
    """The same checkpoint with rope_theta + rope_scaling (transformers 4) instead of rope_parameters."""
    shutil.copytree(tiny_llama, tmp_path, dirs_exist_ok=True)
    cfg = json.load(open(tmp_path / "config.json"))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    a, b = Transformer.from_pretrained(tiny_llama, device="cpu"), Transformer.from_pretrained(str(tmp_path), device="cpu")
    assert torch.equal(a.inv_freq, b.inv_freq)
    ids = random_ids(a.config.vocab_size, 1, 64)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    # llama3 scaling must change the frequencies (a no-op scaling would hide a bug here)
    assert not torch.allclose(a.inv_freq, 1.0 / (1e4 ** (torch.arange(0, 32, 2) / 32)))


def test_kv_cache_decode_equals_full_forward(tiny_qwen):
    model = Transformer.from_pretrained(tiny_qwen, device="cpu")
    cfg = model.config
    ids = random_ids(cfg.vocab_size, 2, 70)
    with torch.no_grad():
        full = model(ids)
        L, P = 70, 40
        caches = [tuple(torch.zeros(2, cfg.num_key_value_heads, L, cfg.head_dim) for _ in range(2))
                  for _ in range(cfg.num_hidden_layers)]
        h = model.hidden_states(ids[:, :P], None, None, [(k[:, :, :P], v[:, :, :P]) for k, v in caches],
                                torch.arange(P))
        steps = [model.lm_head(h)]
        for t in range(P, L):
            mask = (torch.arange(L) <= t)[None, None, None].expand(2, 1, 1, L)
            h = model.hidden_states(ids[:, t:t + 1], torch.full((2, 1), t), mask, caches, torch.tensor([t]))
            steps.append(model.lm_head(h))
    assert_logits_close(torch.cat(steps, 1), full)


@pytest.mark.parametrize("blocks", [(128, 64), (4, 4)])  # (4, 4): rows attend in several padding groups
def test_batched_generation_equals_one_at_a_time(tiny_llama, blocks):
    model = Transformer.from_pretrained(tiny_llama, device="cpu")
    prompts = [random_ids(700, 1, n, seed=n)[0].tolist() for n in (5, 17, 9, 30, 12)]
    # stop on a token that some rows sample early, so the batch gets compacted mid-run
    alone = [generate(model, [p], 24, temperature=0)[0] for p in prompts]
    counts = {}
    for c in alone:
        for t in c.tokens[:8]:
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=counts.get)
    alone = [generate(model, [p], 24, temperature=0, stop_token_ids=[stop])[0] for p in prompts]
    batched = generate(model, prompts, 24, temperature=0, stop_token_ids=[stop], check_every=2,
                       kv_block=blocks[0], group_block=blocks[1])
    assert any(c.finished for c in alone) and not all(c.finished for c in alone)
    for a, b in zip(alone, batched):
        assert a.tokens == b.tokens and a.finished == b.finished
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert len(b.tokens) == len(b.logprobs)
        if b.finished:
            assert b.tokens[-1] == stop and stop not in b.tokens[:-1]
        else:
            assert len(b.tokens) == 24


def test_row_groups():
    # pads 0, 3, 130, 140, 300 with blocks of 128: starts 0, 0, 128, 128, 256
    assert row_groups([0, 3, 130, 140, 300], 128) == [(0, 2, 0), (2, 4, 128), (4, 5, 256)]
    assert row_groups([5, 9], 1000) == [(0, 2, 0)]


def test_sampler_logprobs_equal_full_forward(tiny_qwen):
    model = Transformer.from_pretrained(tiny_qwen, device="cpu")
    prompts = [random_ids(700, 1, n, seed=n)[0].tolist() for n in (6, 11, 3)]
    T = 0.7
    outs = generate(model, prompts, 20, temperature=T, top_p=0.9, top_k=50, seed=3)
    for p, c in zip(prompts, outs):
        seq = torch.tensor([p + c.tokens])
        with torch.no_grad():
            ref = (model(seq)[0, len(p) - 1:-1] / T).log_softmax(-1)
        ref = ref.gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)
        # the training path gives the same numbers
        lp = model.logprobs(seq[:, :-1], seq[:, 1:], temperature=T, chunk_tokens=7)[0, len(p) - 1:]
        assert torch.allclose(lp, ref, atol=1e-4)


def test_sampling_is_seeded_and_filters(tiny_qwen):
    model = Transformer.from_pretrained(tiny_qwen, device="cpu")
    prompts = [[1, 2, 3, 4], [5, 6]]
    # the tiny model's tied embeddings make it very peaked: a high temperature makes draws differ
    a = generate(model, prompts, 16, temperature=20.0, seed=7)
    b = generate(model, prompts, 16, temperature=20.0, seed=7)
    c = generate(model, prompts, 16, temperature=20.0, seed=8)
    assert [x.tokens for x in a] == [x.tokens for x in b] != [x.tokens for x in c]
    greedy = [x.tokens for x in generate(model, prompts, 16, temperature=0)]
    assert [x.tokens for x in generate(model, prompts, 16, temperature=20.0, top_k=1, seed=1)] == greedy
    assert [x.tokens for x in generate(model, prompts, 16, temperature=20.0, top_p=1e-6, seed=1)] == greedy


def test_group_prefill_equals_duplicated_prompts(tiny_qwen):
    """samples=G prefills each prompt once and copies its cache to G rows: the same draws, token for
    token, as G copies of each prompt prefilled separately (same rows, same seed), several prefill chunks."""
    model = Transformer.from_pretrained(tiny_qwen, device="cpu")
    prompts = [random_ids(700, 1, n, seed=n)[0].tolist() for n in (6, 19, 3, 12)]
    G = 3
    grouped = generate(model, prompts, 12, temperature=3.0, seed=5, samples=G, prefill_tokens=40)
    flat = generate(model, [p for p in prompts for _ in range(G)], 12, temperature=3.0, seed=5, prefill_tokens=40)
    assert len(grouped) == len(prompts) * G
    assert [c.tokens for c in grouped] == [c.tokens for c in flat]
    assert all(torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5) for a, b in zip(grouped, flat))
    assert len({tuple(c.tokens) for c in grouped[:G]}) > 1  # the rows of a group draw independently


@pytest.mark.parametrize("keep_bytes", [0, 2**30])  # logits recomputed in backward / kept from forward
def test_logprobs_chunked_gradients(tiny_llama, keep_bytes):
    model = Transformer.from_pretrained(tiny_llama, device="cpu").train()
    ids = random_ids(700, 2, 33)
    h = model.hidden_states(ids[:, :-1])
    lp = model.token_logprobs(h.flatten(0, 1), ids[:, 1:].flatten(), chunk_tokens=5, keep_bytes=keep_bytes)
    lp.sum().backward()
    g_chunked = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    ref = model(ids[:, :-1]).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref.sum().backward()
    assert torch.allclose(lp.view(2, -1), ref, atol=1e-5)
    assert torch.allclose(g_chunked, model.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5)


def test_token_logprob_gradient_is_autograds_bit_for_bit():
    """TokenLogprob's written-out backward gives the very bits autograd gives through logits[target] -
    logsumexp(logits) (so runs before it are reproduced exactly), for repeated targets, rows of extreme
    logits and an upstream gradient with zeros."""
    from model import TokenLogprob
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=gen) * 4
    logits[3] *= 50  # a row whose softmax is one-hot in fp32
    target = torch.randint(0, 1000, (64,), generator=gen)
    target[10:20] = 7
    g = torch.randn(64, generator=gen)
    g[::5] = 0
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = TokenLogprob.apply(a, target)
    ref = b.gather(-1, target[:, None]).squeeze(-1) - b.logsumexp(-1)
    (ours * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.equal(ours, ref) and torch.equal(a.grad, b.grad)
    onehot = F.one_hot(target, 1000).double()  # and the formula itself, in float64
    want = g.double()[:, None] * (onehot - logits.double().softmax(-1))
    assert torch.allclose(a.grad.double(), want, atol=1e-6)


@pytest.mark.parametrize("fixture,checkpointing", [("tiny_llama", False), ("tiny_qwen", False), ("tiny_qwen", True),
                                                   ("tiny_qwen3", False)])
def test_continuation_logprobs_equal_separate_sequences(fixture, checkpointing, request):
    """Each prompt computed once for all its continuations (prompt keys/values shared, projection only at
    continuation positions): the log-probs and the gradient of a weighted sum of them equal transformers'
    over every prompt + continuation run alone, with prompts and continuations of different lengths."""
    path = request.getfixturevalue(fixture)
    model = Transformer.from_pretrained(path, device="cpu").train()
    model.gradient_checkpointing = checkpointing
    ref = hf_model(path).train()
    prompts = [random_ids(700, 1, n, seed=n)[0].tolist() for n in (7, 3, 12)]
    conts = [random_ids(700, 1, n, seed=50 + n)[0].tolist() for n in (5, 1, 9, 4, 6)]
    prompt_of = [0, 0, 2, 1, 2]
    T = 0.8
    lp = model(prompts, continuations=conts, prompt_of=prompt_of, temperature=T)
    weights = torch.linspace(-1.0, 2.0, lp.numel())
    (lp * weights).sum().backward()
    expected = []
    for c, g in zip(conts, prompt_of):
        seq = torch.tensor([prompts[g] + c])
        logits = ref(seq).logits[0, len(prompts[g]) - 1:-1].float() / T
        expected.append(logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
    expected = torch.cat(expected)
    (expected * weights).sum().backward()
    assert torch.allclose(lp, expected, atol=1e-5)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g, r = p.grad, ref_grads[name].grad
        assert (g - r).abs().max() <= 1e-4 * r.abs().max() + 1e-7, name


def test_cpu_packed_linear_follows_weight_changes():
    """Without gradients on CPU, Linear multiplies by a oneDNN-packed copy of its weight: it must give
    F.linear's numbers and be rebuilt after an optimizer step, a load_state_dict and a copy."""
    torch.manual_seed(0)
    lin = Linear(96, 40, bias=True)
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)
    assert torch.float32 not in Linear.unpackable and "_packed" in lin.__dict__  # the fast path ran, not the fallback
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).square().sum().backward()  # with gradients: plain F.linear
    opt.step()
    with torch.inference_mode():  # as in generate
        y = lin(x)
    assert torch.allclose(y, F.linear(x, lin.weight, lin.bias), atol=1e-5)
    lin.load_state_dict({"weight": torch.randn(40, 96), "bias": torch.randn(40)})
    with torch.no_grad():
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)
        twin = copy.deepcopy(lin)
        assert torch.equal(twin(x), lin(x))
        assert torch.allclose(lin.double()(x.double()), F.linear(x.double(), lin.weight, lin.bias), atol=1e-9)


def test_greedy_matches_transformers_generate(smollm2):
    tok = Tokenizer.from_pretrained(smollm2)
    ours, ref = Transformer.from_pretrained(smollm2, device="cpu"), hf_model(smollm2)
    questions = ["What is 2 + 2?", "Name a prime number larger than 10.", "Solve x + 3 = 7.",
                 "What is the capital of France?", "Write a haiku about the sea.", "What is 12 times 12?",
                 "Explain gravity in one sentence.", "List three colors."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    outs = generate(ours, prompts, 64, temperature=0, stop_token_ids=tok.stop_token_ids)
    for p, c in zip(prompts, outs):
        with torch.no_grad():
            r = ref.generate(torch.tensor([p]), max_new_tokens=64, do_sample=False,
                             eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
        assert c.tokens == r[0, len(p):].tolist()


def test_cpu_packed_linear_in_bf16_equals_f_linear():
    """bf16 weights (the CPU sampler where the CPU has bf16 units, model.sampling_dtype) take the packed path
    too: bit-identical to F.linear in bf16 where this torch packs bf16, and F.linear where it cannot."""
    torch.manual_seed(0)
    lin = Linear(96, 40, bias=False).to(torch.bfloat16)
    x = torch.randn(16, 96).bfloat16()
    with torch.inference_mode():
        y = lin(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x, lin.weight)) or torch.allclose(y.float(), F.linear(x, lin.weight).float(), rtol=1e-2)
    assert ("_packed" in lin.__dict__) != (torch.bfloat16 in Linear.unpackable)


def test_sample_token_draws_the_softmax_distribution():
    """The sampler's draw (inverse CDF, one uniform per row): 200k rows of the same 6 logits, temperature 0.7,
    empirical frequencies within 4 standard errors of softmax(logits / 0.7); top-k and top-p never draw a
    token they remove and renormalise over the rest; the reported log-prob is the untruncated one."""
    from model import sample_token
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]).repeat(200_000, 1)
    g = torch.Generator().manual_seed(0)
    p = (logits[0] / 0.7).softmax(-1)
    tok, lp = sample_token(logits, 0.7, 1.0, 0, torch.rand(len(logits), generator=g))
    freq = torch.bincount(tok, minlength=6).double() / len(tok)
    se = (p * (1 - p) / len(tok)).sqrt()
    assert ((freq - p).abs() <= 4 * se + 1e-9).all(), (freq, p)
    assert torch.allclose(lp, p.log()[tok])
    tok, lp = sample_token(logits, 0.7, 1.0, 2, torch.rand(len(logits), generator=g))  # top-k 2: the first two only, renormalised
    freq = torch.bincount(tok, minlength=6).double() / len(tok)
    assert freq[2:].sum() == 0 and abs(freq[0] - p[0] / p[:2].sum()) < 4e-3
    assert torch.allclose(lp, p.log()[tok])
    tok, _ = sample_token(logits, 0.7, 0.8, 0, torch.rand(len(logits), generator=g))  # top-p 0.8: the smallest prefix holding 80% of the mass
    keep = int((p.cumsum(-1) - p < 0.8).sum())
    freq = torch.bincount(tok, minlength=6).double() / len(tok)
    assert freq[keep:].sum() == 0 and (freq[:keep] > 0).all()


def test_bf16_greedy_tokens_follow_fp32_on_cpu(smollm2):
    """The bf16 sampler on CPU (model.sampling_dtype picks it where the CPU has bf16 units): greedy, the first
    32 tokens of each of 8 prompts equal fp32's up to the first near tie. Where a row parts, the test
    recomputes that position in fp32 and asserts the two tokens were within 0.5 logit of each other there:
    a rounding flip, not a broken bf16 path (which parts at confident tokens). SmolLM2's chatty answers meet
    near ties often: on the Intel Xeon VM 5 of 8 rows part within 32 tokens (at tokens 1-26), each at an
    fp32 margin below 0.15 logit. Rows that part are printed with the position and margin."""
    tok = Tokenizer.from_pretrained(smollm2)
    f32 = Transformer.from_pretrained(smollm2, device="cpu", dtype=torch.float32)
    b16 = Transformer.from_pretrained(smollm2, device="cpu", dtype=torch.bfloat16)
    questions = ["What is 2 + 2?", "Name a prime number larger than 10.", "Solve x + 3 = 7.",
                 "What is the capital of France?", "Write a haiku about the sea.", "What is 12 times 12?",
                 "Explain gravity in one sentence.", "List three colors."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    a = generate(f32, prompts, 32, temperature=0)
    b = generate(b16, prompts, 32, temperature=0)
    parted = []
    for p, x, y in zip(prompts, a, b):
        i = next((i for i, (s, t) in enumerate(zip(x.tokens, y.tokens)) if s != t), None)
        if i is None:
            continue
        with torch.no_grad():
            logits = f32(torch.tensor([p + x.tokens[:i]]))[0, -1]
        margin = (logits[x.tokens[i]] - logits[y.tokens[i]]).item()
        parted.append((i, round(margin, 3)))
        assert 0 <= margin < 0.5, (tok.decode(x.tokens[:i + 1]), tok.decode(y.tokens[:i + 1]), margin)
    print(f"bf16 parts from fp32 in {len(parted)} of {len(prompts)} rows (token, fp32 margin): {parted}")


def test_sampling_dtype_choice(tiny_llama, monkeypatch):
    """bf16 on GPU; on CPU fp32 without bf16 units or for weights that fit the caches (no measurement, so
    the choice cannot flip with timing noise); otherwise the measured choice, cached per width."""
    import model as model_module
    tiny = Config.from_pretrained(tiny_llama)
    with open(os.path.join(tiny_llama, "config.json")) as f:
        raw = json.load(f)
    big = Config.from_dict({**raw, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
                            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128})
    assert model_module.sampling_dtype(big, "cuda") == torch.bfloat16
    monkeypatch.setattr(model_module, "native_bf16", lambda: False)
    assert model_module.sampling_dtype(big, "cpu") == torch.float32
    monkeypatch.setattr(model_module, "native_bf16", lambda: True)
    monkeypatch.setattr(model_module, "_sampling_dtypes", {})
    assert model_module.sampling_dtype(tiny, "cpu") == torch.float32 and model_module._sampling_dtypes == {}
    first = model_module.sampling_dtype(big, "cpu")
    assert first in (torch.float32, torch.bfloat16) and list(model_module._sampling_dtypes.values()) == [first]
    assert model_module.sampling_dtype(big, "cpu") == first


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen", "tiny_qwen3", "smollm2"])
def test_chat_template_matches_transformers(fixture, request):
    from transformers import AutoTokenizer
    path = request.getfixturevalue(fixture)
    ours, ref = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    think = "<think>\n2 + 2: count up.\n</think>\n\nIt is $\\boxed{4}$."  # tiny_qwen3 strips it before a user turn
    for messages in ([{"role": "user", "content": "Problem: What is $1+1$?"}],
                     [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": "Hi  there "},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2 + 2 = ?"}],
                     [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": think},
                      {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": think.replace("4", "6")}]):
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == list(expected)
    text = "Let $x^2 = 16$; then x = \\pm 4.  Done!"
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text


def test_stop_ids(tiny_llama, tiny_qwen, smollm2):
    llama = Tokenizer.from_pretrained(tiny_llama)
    want = {llama.tk.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")}
    assert set(llama.stop_token_ids) == want
    qwen = Tokenizer.from_pretrained(tiny_qwen)
    assert set(qwen.stop_token_ids) == {qwen.tk.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert Tokenizer.from_pretrained(smollm2).stop_token_ids == [2]


@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 20_000])
def test_save_pretrained_roundtrip(tiny_qwen, tiny_llama, tmp_path, shard_bytes):
    for src in (tiny_qwen, tiny_llama):
        model = Transformer.from_pretrained(src, device="cpu")
        out = tmp_path / os.path.basename(src)
        model.save_pretrained(str(out), max_shard_bytes=shard_bytes)
        assert os.path.isfile(out / ("model.safetensors" if shard_bytes > 1e6 else "model.safetensors.index.json"))
        ids = random_ids(700, 2, 64)
        with torch.no_grad():
            assert_logits_close(hf_model(str(out))(ids).logits, model(ids), tol=1e-6)
            assert torch.equal(Transformer.from_pretrained(str(out), device="cpu")(ids), model(ids))


def test_bf16_load(tiny_llama):
    model = Transformer.from_pretrained(tiny_llama, device="cpu", dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(random_ids(700, 1, 8)).dtype == torch.float32


def edit_config(src, dst, **changes):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_errors(tiny_llama, tiny_qwen, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"unsupported architecture 'MistralForCausalLM' \(field 'architectures'\)"):
        Transformer.from_pretrained(edit_config(tiny_llama, tmp_path / "a", architectures=["MistralForCausalLM"]))
    with pytest.raises(ValueError, match=r"unsupported rope type 'dynamic'.*rlsp supports default, llama3, linear, yarn"):
        Transformer.from_pretrained(edit_config(tiny_llama, tmp_path / "b", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(ValueError, match=r"sliding-window attention is not supported \(field 'use_sliding_window'"):
        Transformer.from_pretrained(edit_config(tiny_qwen, tmp_path / "c", use_sliding_window=True, sliding_window=64))
    wrong = edit_config(tiny_llama, tmp_path / "d", intermediate_size=100)
    with pytest.raises(ValueError, match=r"wrong shapes: .*model.layers.0.mlp.gate_proj.weight: \(128, 64\) in file, \(100, 64\) expected"):
        Transformer.from_pretrained(wrong)
    more = edit_config(tiny_llama, tmp_path / "e", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"missing tensors: model.layers.2.input_layernorm.weight"):
        Transformer.from_pretrained(more)
    fewer = edit_config(tiny_llama, tmp_path / "f", num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"unexpected tensors: model.layers.1.input_layernorm.weight"):
        Transformer.from_pretrained(fewer)
    sharded = tmp_path / "g"
    Transformer.from_pretrained(tiny_llama, device="cpu").save_pretrained(str(sharded), max_shard_bytes=20_000)
    shards = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(shards) > 2
    os.remove(sharded / shards[1])
    with pytest.raises(FileNotFoundError, match=shards[1] + " not found"):
        Transformer.from_pretrained(str(sharded))
    shutil.copytree(tiny_llama, tmp_path / "h")
    os.remove(tmp_path / "h" / "chat_template.jinja")
    cfg = json.load(open(tmp_path / "h" / "tokenizer_config.json"))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(tmp_path / "h" / "tokenizer_config.json", "w"))
    with pytest.raises(ValueError, match="has no chat template"):
        Tokenizer.from_pretrained(str(tmp_path / "h")).apply_chat_template([{"role": "user", "content": "x"}])
    model = Transformer.from_pretrained(tiny_llama, device="cpu")
    with pytest.raises(ValueError, match="exceeds the model's context of 512 tokens"):
        generate(model, [[1] * 500], 20)
