"""Datasets, prompts and SFT examples; no torch.

Each benchmark item becomes a `Record(id, problem, answer, meta)`. Files are found in a data folder
(`--data-dir` or $RLSP_DATA_DIR), else in the cache (~/.cache/rlsp/data), else downloaded once from the
dataset's public source and checked against its sha256.
"""
import hashlib
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass, field

from verifier import boxed_answers

GITHUB = "https://raw.githubusercontent.com"
QWEN_EVAL = f"{GITHUB}/QwenLM/Qwen2.5-Math/a45202bd16f1ec06f433442dc1152d0074773465/evaluation/data"
GSM8K = f"{GITHUB}/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data"


@dataclass
class Record:
    id: str
    problem: str
    answer: str
    meta: dict = field(default_factory=dict)  # level, subject, solution, ...


def _math(row):
    answer = row["answer"]
    if answer == "" and row["unique_id"] in ("train/number_theory/7115.json", "train/number_theory/7117.json"):
        answer = "0"  # MATH's solution ends in an empty \boxed{}; the intended answer is 0 (choice A)
    return row["unique_id"], row["problem"], answer, {"level": row["level"], "subject": row["subject"],
                                                      "solution": row["solution"]}


def _gsm8k(row):
    return None, row["question"], row["answer"].split("####")[-1].strip().replace(",", ""), {"solution": row["answer"]}


def _qwen(row):  # AIME 2024, AMC 2023: answers as digit strings or floats (27.0)
    a = row["answer"]
    a = str(int(a)) if isinstance(a, float) and a.is_integer() else str(a)
    return str(row["id"]), row["problem"], a, {"solution": row.get("solution", "")}


def _minerva(row):
    boxes = boxed_answers(row["solution"])
    return str(row["idx"]), row["problem"], boxes[-1] if boxes else "", {"subject": row["type"], "solution": row["solution"]}


def _olympiad(row):
    problem = (row["context"] + "\n\n" if row.get("context") else "") + row["question"]
    return str(row["id"]), problem, ", ".join(a.strip("$") for a in row["final_answer"]), {"subject": row["subfield"]}


# name -> (file, url, sha256 of the downloaded file, row parser)
DATASETS = {
    "math500": ("math500.jsonl", f"{GITHUB}/MobileLLM/BudgetThinker/f0466b9d37595f46603387baa5930e312fefb7f5/"
                "evaluation/data/math500/test_ori.jsonl",
                "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132", _math),
    # The PRM800K 12k train split lives in Git LFS; the sha is the original's (a local rebuilt copy differs).
    "math_train": ("math_train.jsonl", "https://media.githubusercontent.com/media/openai/prm800k/"
                   "7ecc794703b2877f63226f2477a49b34f9b25163/prm800k/math_splits/train.jsonl",
                   "90d96daeac3fe343ebb1e22ce93dd99690f75983e957f88de42f87cffe1e8076", _math),
    "gsm8k": ("gsm8k_test.jsonl", f"{GSM8K}/test.jsonl",
              "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", _gsm8k),
    "gsm8k_train": ("gsm8k_train.jsonl", f"{GSM8K}/train.jsonl",
                    "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", _gsm8k),
    "aime24": ("aime24.jsonl", f"{QWEN_EVAL}/aime24/test.jsonl",
               "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac", _qwen),
    "amc23": ("amc23.jsonl", f"{QWEN_EVAL}/amc23/test.jsonl",
              "43707e1ca784602d8479de24ee8ce36609dbebc46dd152b0b12a46611aa898a4", _qwen),
    "minerva_math": ("minerva_math.jsonl", f"{QWEN_EVAL}/minerva_math/test.jsonl",
                     "0e656b430d3a0a1dab6aa853f453ba3805e28e2cabe4fc72486a897cc09d8ba2", _minerva),
    "olympiadbench": ("olympiadbench.jsonl", f"{QWEN_EVAL}/olympiadbench/test.jsonl",
                      "bb8c1e38a16ea9eacb77530315a674d883f267fbff79183effc53681b4fcc416", _olympiad),
}
DATASETS["gsm8k_test"] = DATASETS["gsm8k"]


def cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rlsp", "data")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url, dest, expected_sha256):
    """Fetch `url` to `dest` through a temporary file, with a progress bar; keep it only if its
    sha256 matches."""
    from tqdm import tqdm
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        r = urllib.request.urlopen(url, timeout=60)
    except OSError as e:  # URLError, HTTPError, timeouts
        raise ConnectionError(f"could not download {url} ({e}); without network, put {os.path.basename(dest)} "
                              f"in a folder and pass --data-dir (or set RLSP_DATA_DIR)") from e
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {os.path.basename(dest)}") as bar:
                for block in iter(lambda: r.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
        got = sha256(tmp)
        if got != expected_sha256:
            raise ValueError(f"checksum mismatch for {url}: sha256 {got}, expected {expected_sha256}; "
                             f"the file was not kept")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def dataset_path(name, data_dir=None):
    """Local path of a named dataset: the data folder, else the cache, else a verified download."""
    file, url, digest, _ = DATASETS[name]
    if data_dir and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data-dir {data_dir}: no such folder")
    data_dir = data_dir or os.environ.get("RLSP_DATA_DIR")
    if data_dir and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"RLSP_DATA_DIR={data_dir}: no such folder")
    if data_dir and os.path.isfile(os.path.join(data_dir, file)):
        return os.path.join(data_dir, file)
    cached = os.path.join(cache_dir(), file)
    if os.path.isfile(cached) and sha256(cached) == digest:
        return cached
    return download(url, cached, digest)


def read_jsonl(path):
    """Rows of a JSONL file; a malformed line is an error naming file and line. A path that is not a file
    is an error listing the dataset names, in case a name was meant."""
    if not os.path.isfile(path):
        if os.path.splitext(path)[1] or os.sep in path:  # meant as a file
            raise FileNotFoundError(f"{path}: no such file" + (" (a folder: name a JSONL file in it)"
                                                               if os.path.isdir(path) else ""))
        raise FileNotFoundError(f"{path!r} is neither a dataset name ({', '.join(DATASETS)}) nor a JSONL file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    return rows


def load_dataset(name, data_dir=None, limit=None, skip_missing=False, problem_field="problem",
                 answer_field="answer", id_field="id"):
    """Records of a named dataset (see DATASETS) or of any JSONL file (field names configurable).
    An item without an answer is an error, or with `skip_missing` skipped and counted in
    `load_dataset.skipped`."""
    if name in DATASETS:
        path, parse = dataset_path(name, data_dir), DATASETS[name][3]
    else:
        path = name

        def parse(row):
            return row.get(id_field), row[problem_field], row.get(answer_field), {
                k: v for k, v in row.items() if k not in (problem_field, answer_field, id_field)}
    records, skipped = [], 0
    for n, row in read_jsonl(path):
        try:
            rid, problem, answer, meta = parse(row)
        except KeyError as e:
            raise ValueError(f"{path}:{n}: no {e.args[0]!r} field; the row has {', '.join(map(repr, row)) or 'none'}. "
                             f"Each row needs a problem and its answer: name their fields with --problem-field and "
                             f"--answer-field (now {problem_field!r} and {answer_field!r})") from None
        answer = "" if answer is None else str(answer).strip()
        if not answer:
            if skip_missing:
                skipped += 1
                continue
            raise ValueError(f"{path}:{n}: no answer in field {answer_field!r}; the row has "
                             f"{', '.join(map(repr, row))} (--answer-field names the answer's field)")
        records.append(Record(str(rid) if rid is not None else f"{os.path.basename(path)}:{n}", problem, answer, meta))
        if limit and len(records) >= limit:
            break
    load_dataset.skipped = skipped
    return records


# ----------------------------------------------------------------------------- prompts

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPTS = {
    "paper": "Problem: {problem}",  # the RLSP authors' format: one user turn, no system prompt
    "boxed": "{problem}\n" + BOXED_INSTRUCTION.replace("{}", "{{}}"),  # Qwen2.5-Math style
}


def prompt_messages(problem, prompt="paper"):
    """Chat messages for a problem: a named prompt (`paper`, `boxed`) or a template with {problem}."""
    template = PROMPTS.get(prompt, prompt)
    if "{problem}" not in template:
        raise ValueError(f"prompt {prompt!r} is neither one of {sorted(PROMPTS)} nor a template with {{problem}}")
    return [{"role": "user", "content": template.format(problem=problem)}]


def render_prompt(tokenizer, problem, prompt="paper"):
    """Token ids of the prompt through the model's own chat template, ending where the answer starts."""
    return tokenizer.apply_chat_template(prompt_messages(problem, prompt), add_generation_prompt=True)


# ----------------------------------------------------------------------------- SFT

def sft_example(tokenizer, messages, response=None):
    """(ids, mask) of a conversation (`response`: a last assistant turn to add): what the chat template
    renders, tokenized piece by piece so that each assistant turn starts exactly where the sampler
    starts generating (after the template's generation prompt). mask is 1 on every assistant turn's
    tokens up to and including its first stop token (what the model must learn to produce), else 0;
    the ids end at the last assistant turn's stop token."""
    if response is not None:
        messages = messages + [{"role": "assistant", "content": response}]
    stops = set(tokenizer.stop_token_ids)
    ids, mask, done, last = [], [], "", 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:k], add_generation_prompt=True)
        through = tokenizer.render_chat(messages[:k + 1], add_generation_prompt=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError("the chat template does not render each assistant turn as a continuation of the "
                             "conversation before it (with its generation prompt); rlsp cannot tell which tokens "
                             "are the assistant's")
        context, reply = tokenizer.encode(before[len(done):]), tokenizer.encode(through[len(before):])
        end = next((i + 1 for i, t in enumerate(reply) if t in stops), len(reply))
        ids += context + reply
        mask += [0] * len(context) + [1] * end + [0] * (len(reply) - end)
        done, last = through, len(ids) - len(reply) + end
    return ids[:last], mask[:last]


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def conversation(row, where, prompt="paper", prompt_field="prompt", response_field="response"):
    """One JSONL row as chat messages: `messages` ([{"role", "content"}], system / user / assistant,
    any number of turns), ShareGPT `conversations` ([{"from", "value"}], human / gpt / system), or a
    (prompt, response) pair in `prompt_field` / `response_field` (the prompt through `prompt`, as for RL).
    `where` (file:line) starts every error."""
    if "messages" in row or "conversations" in row:
        chat = {r: r for r in SHAREGPT_ROLES.values()}  # system, user, assistant
        field_name, role_key, text_key, roles = ("messages", "role", "content", chat) if "messages" in row \
            else ("conversations", "from", "value", SHAREGPT_ROLES)
        turns = row[field_name]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: '{field_name}' must be a non-empty list of turns")
        messages = []
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or t.get(role_key) not in roles or not isinstance(t.get(text_key), str):
                raise ValueError(f"{where}: '{field_name}'[{j}]: expected {{{role_key!r}: one of {sorted(roles)}, "
                                 f"{text_key!r}: text}}, got {json.dumps(t)[:120]}")
            messages.append({"role": roles[t[role_key]], "content": t[text_key]})
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: no assistant turn to learn from")
        return messages
    if prompt_field in row and response_field in row:
        return prompt_messages(row[prompt_field], prompt) + [{"role": "assistant", "content": row[response_field]}]
    raise ValueError(f"{where}: expected 'messages', 'conversations' or the fields {prompt_field!r} and "
                     f"{response_field!r} (--prompt-field / --response-field); the row has {sorted(row)}")


def demonstrations(name="math_train", data_dir=None, prompt="paper", limit=None,
                   prompt_field="prompt", response_field="response"):
    """Conversations to learn from (chat messages with at least one assistant turn): MATH train problems
    with their reference solutions, or a JSONL file of rows in any form `conversation` reads."""
    if name in DATASETS:
        return [prompt_messages(r.problem, prompt) + [{"role": "assistant", "content": r.meta["solution"]}]
                for r in load_dataset(name, data_dir, limit=limit) if r.meta.get("solution")]
    out = []
    for n, row in read_jsonl(name):
        out.append(conversation(row, f"{name}:{n}", prompt, prompt_field, response_field))
        if limit and len(out) >= limit:
            break
    return out


def pack(examples, seq_len, pad_id):
    """Pack (ids, mask) examples in order into rows of exactly `seq_len` tokens. Returns rows of
    dicts with `ids`, `mask` (loss on), `positions` (restarting at 0 for each example, so attention
    and RoPE can treat examples separately) and `doc` (example index within the row, -1 on padding).
    An example longer than seq_len is truncated; counted in `pack.truncated`."""
    rows, cur, truncated = [], None, 0

    def new_row():
        return {"ids": [], "mask": [], "positions": [], "doc": []}

    for ids, mask in examples:
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            truncated += 1
        if cur is None or len(cur["ids"]) + len(ids) > seq_len:
            if cur is not None:
                rows.append(cur)
            cur = new_row()
        doc = (max(cur["doc"]) + 1) if cur["doc"] else 0
        cur["ids"] += ids
        cur["mask"] += mask
        cur["positions"] += list(range(len(ids)))
        cur["doc"] += [doc] * len(ids)
    if cur is not None:
        rows.append(cur)
    for r in rows:
        n = seq_len - len(r["ids"])
        r["ids"] += [pad_id] * n
        r["mask"] += [0] * n
        r["positions"] += list(range(n))
        r["doc"] += [-1] * n
    pack.truncated = truncated
    return rows


# ----------------------------------------------------------------------------- synthetic task (the CPU demo)

def arithmetic(n, seed=0, terms=3, digits=2, labels=False):
    """`n` problems "a+b+c" with exact answers and three demonstrations each: `steps` writes every partial
    sum ("47+85=132\\n132+36=168\\n\\boxed{168}"), `checked` re-does the last addition as a check
    before the box ("verify: 132+36=168"), `direct` writes only the box. Writing the partial sums is
    the path to the right answer for a small model: each line is one two-number addition. `labels`: each
    term carries a letter, in the problem and in the steps ("a7+b3+c5", "a7+b3=10\\n10+c5=15"), so a small
    model finds the next term by its letter (a copy it learns early) rather than by its position."""
    import random
    if labels and terms > 26:
        raise ValueError(f"arithmetic: labels name at most 26 terms, not {terms}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        xs = [rng.randint(10 ** (digits - 1), 10 ** digits - 1) for _ in range(terms)]
        shown = [f"{chr(97 + j)}{x}" if labels else str(x) for j, x in enumerate(xs)]
        lines, acc = [f"{shown[0]}+{shown[1]}={xs[0] + xs[1]}"], xs[0] + xs[1]
        for x, s in zip(xs[2:], shown[2:]):
            lines.append(f"{acc}+{s}={acc + x}")
            acc += x
        problem, answer = "+".join(shown), str(acc)
        steps = "\n".join(lines)
        out.append(Record(f"arith-{seed}-{i}", problem, answer,
                          {"steps": f"{steps}\n\\boxed{{{answer}}}", "direct": f"\\boxed{{{answer}}}",
                           "checked": f"{steps}\nverify: {lines[-1]}\n\\boxed{{{answer}}}"}))
    return out
