"""data.py: dataset counts and errors, download against a loopback server, prompts, SFT masks, packing."""
import hashlib
import http.server
import json
import os
import threading

import pytest

import data
from data import load_dataset, pack, prompt_messages, render_prompt, sft_example
from model import Tokenizer

COUNTS = {"math500": 500, "math_train": 12000, "gsm8k": 1319, "gsm8k_train": 7473, "aime24": 30, "amc23": 40,
          "minerva_math": 272, "olympiadbench": 675}


@pytest.mark.parametrize("name,count", COUNTS.items())
def test_dataset_counts(name, count, data_dir):
    records = load_dataset(name, data_dir)
    assert len(records) == count
    assert len({r.id for r in records}) == count
    assert all(r.problem and r.answer for r in records)


def test_record_fields(data_dir):
    m = load_dataset("math500", data_dir)[0]
    assert (m.id, m.answer, m.meta["level"], m.meta["subject"]) == (
        "test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)", 2, "Precalculus")
    g = load_dataset("gsm8k", data_dir)[0]
    assert g.answer == "18" and g.problem.startswith("Janet")
    assert load_dataset("aime24", data_dir)[0].answer == "204"
    assert load_dataset("amc23", data_dir)[0].answer == "27"  # the file stores 27.0
    quirks = {r.id: r.answer for r in load_dataset("math_train", data_dir)}
    assert quirks["train/number_theory/7115.json"] == "0"  # empty \boxed{} in MATH; intended answer 0
    assert load_dataset("math500", data_dir, limit=7)[-1].id == load_dataset("math500", data_dir)[6].id


def test_loader_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "x", "answer": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_dataset(str(bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n{"problem": "3+3", "answer": ""}\n')
    with pytest.raises(ValueError, match=r"missing.jsonl:2: no answer in field 'answer'; the row has 'problem' "
                                         r"\(--answer-field names the answer's field\)"):
        load_dataset(str(missing))
    assert [r.answer for r in load_dataset(str(missing), skip_missing=True)] == ["2"]
    assert load_dataset.skipped == 2
    noprob = tmp_path / "noprob.jsonl"
    noprob.write_text('{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"noprob.jsonl:1: no 'problem' field; the row has 'question', 'answer'. "
                                         r"Each row needs a problem and its answer: name their fields with "
                                         r"--problem-field and --answer-field"):
        load_dataset(str(noprob))
    assert load_dataset(str(noprob), problem_field="question")[0].problem == "1+1"
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="'math5000' is neither a dataset name"):
        load_dataset("math5000")
    with pytest.raises(FileNotFoundError, match="--data-dir .*dat: no such folder"):
        load_dataset("gsm8k", str(tmp_path / "dat"))
    arr = tmp_path / "arr.jsonl"
    arr.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"arr.jsonl:1: expected a JSON object"):
        load_dataset(str(arr))


@pytest.fixture
def loopback_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_checksum(loopback_server, tmp_path, monkeypatch, data_dir):
    root, base = loopback_server
    body = open(os.path.join(data_dir, "aime24.jsonl"), "rb").read()
    (root / "aime.jsonl").write_bytes(body)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RLSP_DATA_DIR")
    file, _, digest, parse = data.DATASETS["aime24"]
    assert hashlib.sha256(body).hexdigest() == digest
    monkeypatch.setitem(data.DATASETS, "aime24", (file, f"{base}/aime.jsonl", digest, parse))
    records = load_dataset("aime24")  # no data dir: downloaded into the cache
    assert len(records) == 30
    cached = tmp_path / "cache" / "rlsp" / "data" / "aime24.jsonl"
    assert cached.read_bytes() == body
    (root / "aime.jsonl").write_bytes(b"{}\n")  # the cache is used from now on: no request needed
    assert len(load_dataset("aime24")) == 30
    # a corrupted cache is fetched again; a wrong checksum from the server is refused and not kept
    cached.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checksum mismatch .* the file was not kept"):
        load_dataset("aime24")
    assert not cached.exists() or cached.read_bytes() == b"garbage"
    assert not [f for f in os.listdir(cached.parent) if f.endswith(".part")]
    (root / "aime.jsonl").write_bytes(body)
    assert len(load_dataset("aime24")) == 30 and cached.read_bytes() == body
    # a missing file on the server (404) or no network: a clear error naming the URL and --data-dir
    cached.unlink()
    monkeypatch.setitem(data.DATASETS, "aime24", (file, f"{base}/missing.jsonl", digest, parse))
    with pytest.raises(ConnectionError, match=r"could not download .*/missing.jsonl .*HTTP Error 404.*--data-dir"):
        load_dataset("aime24")
    assert not [f for f in os.listdir(cached.parent) if f.endswith(".part")]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen", "smollm2"])
@pytest.mark.parametrize("prompt", ["paper", "boxed", "Solve: {problem}\nThink."])
def test_prompt_rendering_matches_transformers(fixture, prompt, request):
    from transformers import AutoTokenizer
    path = request.getfixturevalue(fixture)
    ours, ref = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    problem = "If $x^2 = 16$ and $x > 0$, what is $x$?"
    expected = ref.apply_chat_template(prompt_messages(problem, prompt), add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert render_prompt(ours, problem, prompt) == list(expected)
    if prompt == "paper":
        assert prompt_messages(problem, prompt) == [{"role": "user", "content": "Problem: " + problem}]
    if prompt == "boxed":
        assert prompt_messages(problem, prompt)[0]["content"].endswith("final answer within \\boxed{}.")


def test_bad_prompt():
    with pytest.raises(ValueError, match="neither one of"):
        prompt_messages("x", "nonsense")


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen", "smollm2"])
def test_sft_mask_covers_exactly_the_assistant_turn(fixture, request):
    tok = Tokenizer.from_pretrained(request.getfixturevalue(fixture))
    messages = prompt_messages("What is 2+3?")
    reply = "We add: 2 + 3 = 5. The answer is $\\boxed{5}$."
    ids, mask = sft_example(tok, messages, reply)
    assert len(ids) == len(mask)
    n_prompt = mask.index(1)
    assert ids[:n_prompt] == render_prompt(tok, "What is 2+3?")  # exactly what the sampler is given
    assert all(mask[n_prompt:]) and not any(mask[:n_prompt])
    assistant = tok.decode(ids[n_prompt:])
    assert assistant.startswith(reply.strip()) and ids[-1] in tok.stop_token_ids
    assert tok.decode(ids[n_prompt:-1]).strip() == reply.strip()


def test_demonstrations_and_packing(tiny_qwen, data_dir, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_qwen)
    demos = data.demonstrations("math_train", data_dir, limit=6)
    assert len(demos) == 6 and demos[0][0]["content"].startswith("Problem: ") and demos[0][1]["role"] == "assistant"
    examples = [sft_example(tok, m) for m in demos]
    rows = pack(examples, 512, tok.pad_token_id)
    assert all(len(r["ids"]) == len(r["mask"]) == len(r["positions"]) == len(r["doc"]) == 512 for r in rows)
    # every example appears once, in order, unchanged (unless longer than a row)
    flat = [(tuple(r["ids"][i] for i in range(512) if r["doc"][i] == d)) for r in rows for d in sorted(set(r["doc"]) - {-1})]
    want = [tuple(ids[:512]) for ids, _ in examples]
    assert flat == want
    assert sum(sum(r["mask"]) for r in rows) == sum(sum(m[:512]) for _, m in examples)
    assert pack.truncated == sum(len(ids) > 512 for ids, _ in examples)
    for r in rows:  # positions restart at each example
        for i in range(1, 512):
            if r["doc"][i] == r["doc"][i - 1] and r["doc"][i] >= 0:
                assert r["positions"][i] == r["positions"][i - 1] + 1
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "1+1?", "response": "2"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: expected 'messages', 'conversations' or the fields 'prompt' "
                                         r"and 'response' \(--prompt-field / --response-field\); the row has \['prompt'\]"):
        data.demonstrations(str(pairs))


TURNS = [{"role": "system", "content": "You are a careful tutor."},
         {"role": "user", "content": "What is 2+3?"},
         {"role": "assistant", "content": "2 + 3 = 5, so $\\boxed{5}$."},
         {"role": "user", "content": "And 4 times that?"},
         {"role": "assistant", "content": "4 x 5 = 20.  The answer is $\\boxed{20}$."}]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen", "tiny_qwen3", "smollm2"])
def test_sft_formats_mask_every_assistant_turn(fixture, request, tmp_path):
    """`messages`, ShareGPT `conversations` and (prompt, response) pairs under other field names (QwQ's
    `prompt` / `qwq`): the ids are transformers' rendering of the conversation up to the last stop token,
    and the mask covers exactly each assistant turn and its stop token, every turn of a multi-turn
    conversation."""
    from transformers import AutoTokenizer
    path = request.getfixturevalue(fixture)
    tok, ref = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]}
                for t in TURNS]
    file = tmp_path / "sft.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in ({"messages": TURNS}, {"conversations": sharegpt},
                                                      {"question": "What is 2+3?", "qwq": "It is $\\boxed{5}$."})))
    convs = data.demonstrations(str(file), prompt_field="question", response_field="qwq")
    assert convs[0] == convs[1] == TURNS
    assert convs[2] == prompt_messages("What is 2+3?") + [{"role": "assistant", "content": "It is $\\boxed{5}$."}]
    for conv in convs:
        ids, mask = sft_example(tok, conv)
        rendered = ref.apply_chat_template(conv, tokenize=False)
        text = tok.decode(ids)
        assert rendered.startswith(text) and not rendered[len(text):].strip()
        spans, start = [], None
        for i, m in enumerate(mask + [0]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                spans.append((start, i))
                start = None
        replies = [t["content"] for t in conv if t["role"] == "assistant"]
        assert len(spans) == len(replies)
        for (a, b), reply in zip(spans, replies):
            assert ids[b - 1] in tok.stop_token_ids and tok.decode(ids[a:b - 1]).strip() == reply.strip()
        first = next(i for i, t in enumerate(conv) if t["role"] == "assistant")  # the sampler's prompt, exactly
        assert ids[:spans[0][0]] == tok.encode(ref.apply_chat_template(conv[:first], tokenize=False,
                                                                       add_generation_prompt=True))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"from": "robot", "value": "hi"}]}) + "\n" +
                   json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'conversations'\[0\]: expected \{'from': one of"):
        data.demonstrations(str(bad))
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no assistant turn to learn from"):
        data.demonstrations(str(bad))


def test_arithmetic_demonstrations():
    from verifier import grade
    problems = data.arithmetic(200, seed=3, terms=4, digits=2)
    assert len({r.problem for r in problems}) == 200 and problems == data.arithmetic(200, seed=3, terms=4, digits=2)
    for r in problems:
        xs = [int(x) for x in r.problem.split("+")]
        assert len(xs) == 4 and all(10 <= x <= 99 for x in xs) and int(r.answer) == sum(xs)
        lines = r.meta["steps"].split("\n")
        assert len(lines) == 4 and lines[-1] == f"\\boxed{{{sum(xs)}}}" and r.meta["direct"] == lines[-1]
        acc = xs[0]
        for line, x in zip(lines, xs[1:]):  # every line adds one more term to the running sum
            assert line == f"{acc}+{x}={acc + x}"
            acc += x
        assert r.meta["checked"] == "\n".join(lines[:-1] + [f"verify: {lines[-2]}", lines[-1]])
        for style in ("steps", "direct", "checked"):
            assert grade(r.meta[style], r.answer).correct
    from verifier import BEHAVIOURS
    assert BEHAVIOURS["verification"].search(problems[0].meta["checked"])
    assert not BEHAVIOURS["verification"].search(problems[0].meta["steps"])
    labelled = data.arithmetic(200, seed=3, terms=4, digits=2, labels=True)  # the same sums, each term lettered
    for r, plain in zip(labelled, problems):
        assert r.problem == "+".join(f"{c}{x}" for c, x in zip("abcd", plain.problem.split("+")))
        assert r.answer == plain.answer and grade(r.meta["checked"], r.answer, mode="last_boxed").correct
        xs = plain.problem.split("+")
        assert r.meta["steps"].split("\n")[:2] == [f"a{xs[0]}+b{xs[1]}={int(xs[0]) + int(xs[1])}",
                                                    f"{int(xs[0]) + int(xs[1])}+c{xs[2]}={sum(map(int, xs[:3]))}"]
    with pytest.raises(ValueError, match="at most 26 terms"):
        data.arithmetic(1, terms=27, labels=True)


def test_sft_with_thinking(tiny_qwen3):
    """A reasoning trace in the last assistant turn is learned, <think> block included (the template keeps
    it there); a conversation whose template drops an earlier turn's thinking once a user turn follows
    cannot be split into turns as the model sees them, and says so."""
    from transformers import AutoTokenizer
    tok, ref = Tokenizer.from_pretrained(tiny_qwen3), AutoTokenizer.from_pretrained(tiny_qwen3)
    reply = "<think>\n2 + 3: five.\n</think>\n\nSo $\\boxed{5}$."
    conv = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": reply}]
    ids, mask = sft_example(tok, conv)
    assert tok.decode(ids) == ref.apply_chat_template(conv, tokenize=False).rstrip("\n")
    start = mask.index(1)
    assert tok.decode(ids[start:]) == reply + "<|im_end|>" and all(mask[start:])
    with pytest.raises(ValueError, match="does not render each assistant turn as a continuation"):
        sft_example(tok, conv + [{"role": "user", "content": "Times 2?"}, {"role": "assistant", "content": "10"}])
