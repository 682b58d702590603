"""Llama / Qwen2 / Qwen3 decoder in plain PyTorch: HF checkpoint load/save, tokenizer + chat template,
a static KV cache and a batched sampler.

The module tree and tensor names are Hugging Face's (`model.layers.N.self_attn.q_proj.weight`, ...)
and RoPE uses HF's rotate-half layout, so safetensors load with `assign=True` and no permutation.
Attention goes through `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU).
"""
import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import safetensors
from safetensors import safe_open
from safetensors.torch import save_file

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SafetensorError = getattr(safetensors, "SafetensorError", RuntimeError)  # a bad file's error (own class since 0.4)
ROPE_TYPES = ("default", "llama3", "linear", "yarn")
KEEP_LOGITS_BYTES = 2**30  # the log-prob head keeps its fp32 logits for backward up to this size (token_logprobs)


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3", "factor": 32.0, ...}
    attention_bias: bool = False  # q/k/v bias: always on for Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    tie_word_embeddings: bool = False
    raw: dict = field(default_factory=dict, repr=False)  # config.json as read, written back on save

    @classmethod
    def from_dict(cls, d, source="config.json"):
        arch = (d.get("architectures") or [None])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"{source}: unsupported architecture {arch!r} (field 'architectures'); "
                             f"rlsp supports {', '.join(ARCHITECTURES)}")
        if d.get("use_sliding_window") and d.get("sliding_window"):
            raise ValueError(f"{source}: sliding-window attention is not supported "
                             f"(field 'use_sliding_window' = true, 'sliding_window' = {d['sliding_window']})")
        if d.get("mlp_bias"):
            raise ValueError(f"{source}: MLP biases are not supported (field 'mlp_bias' = true)")
        # transformers 5 keeps rope settings in `rope_parameters`; transformers 4 in rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{source}: unsupported rope type {rope_type!r} (field 'rope_scaling' / "
                             f"'rope_parameters'); rlsp supports {', '.join(ROPE_TYPES)}")
        rope["rope_type"] = rope_type
        n_heads = d["num_attention_heads"]
        return cls(
            architecture=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads, num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads, rms_norm_eps=d["rms_norm_eps"],
            max_position_embeddings=d.get("max_position_embeddings", 2048), rope_theta=float(theta),
            rope_scaling=rope, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM", raw=dict(d))

    @classmethod
    def from_pretrained(cls, path):
        path = local_folder(path, ["config.json"])  # a hub id: --dry-run needs no weights
        file = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder {path!r} does not exist")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: a model folder needs a Hugging Face config.json")
        with open(file) as f:
            return cls.from_dict(json.load(f), source=file)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def default_device(device=None):
    """`device` if given (--device), else the first GPU where there is one, else the CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device):
    """The weights' precision where none is asked for: bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def local_folder(model, files=HUB_FILES):
    """A model folder on disk: `model` itself, or for a hub id (`org/name`, `org/name@revision`) the
    folder its `files` (patterns; all checkpoint files by default) are downloaded to once, in the
    Hugging Face cache (HF_HOME; HF_ENDPOINT for a mirror, HF_TOKEN for gated models, HF_HUB_OFFLINE=1
    to use only the cache). Later calls read the cache (online: after one metadata request). A name that
    looks like a path (starting with /, ~ or ., holding ./ or ../, or under a folder that exists here) is
    never taken for a hub id: a mistyped or unmounted local folder must fail, not fetch a stranger's repo."""
    looks_local = model.startswith(("/", "~", ".")) or "./" in model or os.path.isdir(model.split("/")[0])
    if os.path.exists(model) or looks_local or not HUB_ID.fullmatch(model):
        return model
    repo, _, revision = model.partition("@")
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(f"{model!r} is no folder here; to download it from the Hugging Face hub, "
                         f"pip install huggingface_hub") from None
    where = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        return huggingface_hub.snapshot_download(repo, revision=revision or None, allow_patterns=list(files))
    except errors.RevisionNotFoundError:
        raise ValueError(f"{model}: the hub ({where}) has no revision {revision!r} of {repo}") from None
    except errors.RepositoryNotFoundError:  # gated or private repos answer the same
        raise ValueError(f"{model!r}: no such folder here, and no model {repo} on the hub ({where}) that this "
                         f"account may read (a gated or private one needs `hf auth login` or HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError:
        hub = huggingface_hub.constants
        why = "HF_HUB_OFFLINE is set" if hub.HF_HUB_OFFLINE else "no connection"
        raise ValueError(f"{model!r}: no such folder here, not in the Hugging Face cache ({hub.HF_HUB_CACHE}), and the "
                         f"hub ({where}) cannot be reached ({why}); download it where there is a connection "
                         f"(`hf download {repo}`) into a shared HF_HOME, or pass a local folder") from None
    except errors.HfHubHTTPError as e:
        raise ValueError(f"{model}: the hub ({where}) answered: {str(e).splitlines()[0]}") from None


def rope_frequencies(cfg: Config):
    """Inverse frequencies theta^(-2i/d), rescaled per `rope_type` (Llama-3's 'llama3' scheme:
    long wavelengths divided by `factor`, short ones kept, a smooth blend between)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    s = cfg.rope_scaling
    if s["rope_type"] == "linear":
        inv_freq = inv_freq / s["factor"]
    elif s["rope_type"] == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif s["rope_type"] == "yarn":  # YaRN (Qwen2.5 / Qwen3 long context): blend by wavelength, as transformers
        d, factor = cfg.head_dim, yarn_factor(cfg)
        old = s.get("original_max_position_embeddings") or cfg.max_position_embeddings

        def dim_of(rotations):  # the dimension whose wavelength fits `rotations` times into `old` positions
            return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        lo, hi = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq.float()


def yarn_factor(cfg: Config):
    s = cfg.rope_scaling
    return s.get("factor") or cfg.max_position_embeddings / s["original_max_position_embeddings"]


def rope_attention_factor(cfg: Config):
    """YaRN's scale on cos and sin (1 for every other rope type): `attention_factor`, else from the factor."""
    s = cfg.rope_scaling
    if s["rope_type"] != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    factor = yarn_factor(cfg)
    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    return mscale(factor)


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalised in fp32, cast back, then scaled: the reference implementation's order.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear; on CPU without gradients (sampling, evaluation) it multiplies by a oneDNN-packed copy
    of an fp32 or bf16 weight, rebuilt whenever the weight changes (new storage or a bumped version counter,
    or Transformer.weights_changed after an optimizer step). The blocked layout streams from memory far
    better than a row-major GEMM: ~1.7x faster at decode batch sizes in fp32, ~1.15x in prefill (AMD EPYC
    VM), ~1.5-2x in bf16 on AMX (Intel Xeon VM), with bit-identical results (bench.py). It costs one extra
    copy of the weights while the model is on CPU; moving the model drops it."""
    packable = True  # a layer whose weight no packed copy can track turns it off (fsdp.py, tp.py)
    unpackable = set()  # dtypes this torch build could not pack (then F.linear, for every layer)

    def forward(self, x):
        # Not under autocast (F.linear runs it in bf16) nor torch.compile (inductor picks its own kernels).
        if x.device.type == "cpu" and not torch.is_grad_enabled() and self.weight.dtype == x.dtype \
                and x.dtype in (torch.float32, torch.bfloat16) and x.dtype not in self.unpackable \
                and self.packable and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling():
            w = self.packed_weight()
            if w is not None:
                return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def packed_weight(self):
        """The packed copy in `_packed` = (key, storage, packed): the key is the weight's data pointer and
        version; its storage is held so that the address cannot come back as another weight's."""
        w = self.weight
        key = (w.data_ptr(), w._version)
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)  # 16: a batch-size hint
            except (AttributeError, RuntimeError):  # no oneDNN in this torch build, or not for this dtype
                Linear.unpackable.add(w.dtype)
                return None
            self._packed = cached = (key, w.untyped_storage(), packed)
        return cached[2]

    def __getstate__(self):  # copy.deepcopy and pickle leave the packed copy behind
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): the packed copy is stale
        self.__dict__.pop("_packed", None)
        return super()._apply(fn, *args, **kwargs)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.hd, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None, prefix=None):
        """Attention output and this call's own keys and values (B x n_kv x T x hd, after RoPE). `cache`:
        decoding buffers, written at cache_pos, attended whole. `prefix`: keys/values of a shared prompt
        (training, see Transformer.continuation_logprobs), attended before this call's own."""
        B, T, _ = x.shape
        q, k = self.q_proj(x).view(B, T, self.n_heads, self.hd), self.k_proj(x).view(B, T, self.n_kv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        own = k, v
        if cache is not None:  # write this step's keys/values at cache_pos, attend over the whole cache
            cache[0].index_copy_(2, cache_pos, k)
            cache[1].index_copy_(2, cache_pos, v)
            k, v = cache
        if prefix is not None and prefix[0] is not None:
            k, v = torch.cat((prefix[0], k), 2), torch.cat((prefix[1], v), 2)
        if isinstance(mask, list):  # decoding, rows in groups: rows a:b attend to keys s: onward (generate)
            y = torch.cat([attention(q[a:b], k[a:b, :, s:], v[a:b, :, s:], m) for a, b, s, m in mask])
        else:
            y = attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), *own


# Tests set this to give CPU runs the shapes attention() picks on CUDA, and check them against the plain ones.
CUDA_ATTENTION_SHAPES = False


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v by scaled_dot_product_attention, for q (B x H x T x d) and k, v
    (B x H_kv x S x d) with H a multiple of H_kv (grouped-query heads); `mask` boolean (B x 1 x T x S,
    True = attend) or None for causal. On CUDA the shapes decide the kernel: flash takes grouped heads
    but no mask, the memory-efficient kernel takes a mask but not grouped heads, and what neither takes
    falls to the math kernel (fp32 scores, K/V expanded per head, T x S matrices: gigabytes per layer at
    RL lengths). So on CUDA a masked grouped call is reshaped: a one-token query (a decode step) folds
    its H / H_kv heads into the query axis, T = H / H_kv against the shared keys with no copy; a longer
    query (prefill, SFT's packed rows, the RL continuation pass) gets K/V expanded to H heads. On CPU,
    SDPA's own kernel takes masks and grouped heads as they are."""
    rep = q.shape[1] // k.shape[1]
    if mask is None or rep == 1 or not (q.is_cuda or CUDA_ATTENTION_SHAPES):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=rep > 1)
    B, H, T, d = q.shape
    if T == 1:  # head h = j * rep + r of query row 0 becomes head j, query row r; the mask broadcasts over r
        y = F.scaled_dot_product_attention(q.reshape(B, H // rep, rep, d), k, v, attn_mask=mask)
        return y.reshape(B, H, 1, d)  # reshape: CUDA kernels may return (B, rep, H_kv, d) memory, transposed
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None, prefix=None):
        """The block's output and its attention's own keys and values (see Attention.forward)."""
        y, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos, prefix)
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Decoder(nn.Module):  # HF's `model.` prefix
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TokenLogprob(torch.autograd.Function):
    """log softmax(logits)[target] per row, with its gradient written out: g * (onehot(target) - softmax(logits)).
    The same bits as autograd through `logits[target] - logsumexp(logits)` in three passes over the N x V
    logits instead of ~6 (a zero fill, a scatter, subtract, exp, multiply, an add; docs/speed.md)."""

    @staticmethod
    def forward(ctx, logits, target):
        lse = logits.logsumexp(-1)
        ctx.save_for_backward(logits, lse, target)
        return logits.gather(-1, target[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, g):
        logits, lse, target = ctx.saved_tensors
        grad = (logits - lse[:, None]).exp_().mul_(-g[:, None])
        return grad.scatter_add_(-1, target[:, None], g[:, None]), None


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.rope_scale = rope_attention_factor(cfg)
        self.gradient_checkpointing = False
        self.updates = 0  # weight updates so far (weights_changed); copies of the weights compare against it

    def weights_changed(self):
        """Say that the weights were changed in place: train.py calls it after every optimizer step. A
        tensor's version counter is not enough to notice: fused AdamW (CUDA, and CPU) writes the weights
        without bumping it. Drops the packed CPU copies and counts the update (see rlsp.RolloutWeights)."""
        self.updates += 1
        for m in self.modules():
            m.__dict__.pop("_packed", None)

    def hidden_states(self, input_ids, positions=None, mask=None, caches=None, cache_pos=None, prefix=None):
        """Final-norm hidden states B x T x D. `positions` (B x T) default to 0..T-1; `mask` is a
        boolean B x 1 x T x S attention mask (None: causal), or a list of row groups (a, b, s, mask of
        rows a:b over keys s:) when decoding; `caches` are per-layer (k, v) buffers. `prefix` (training):
        per-layer (k, v) of a prompt that these tokens continue, attended before their own, or
        (None, None) per layer for the prompt itself; then each layer's own (k, v) are returned too."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        freqs = positions[..., None].float() * self.inv_freq  # B x T x hd/2, in fp32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos(), emb.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        kv = []
        for i, layer in enumerate(self.model.layers):
            cache = None if caches is None else caches[i]
            pre = None if prefix is None else prefix[i]
            if self.gradient_checkpointing and self.training:
                x, k, v = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, None, pre,
                                                            use_reentrant=False)
            else:
                x, k, v = layer(x, cos, sin, mask, cache, cache_pos, pre)
            if prefix is not None:
                kv.append((k, v))
        return self.model.norm(x) if prefix is None else (self.model.norm(x), kv)

    def forward(self, input_ids, positions=None, mask=None, targets=None, temperature=1.0, continuations=None,
                prompt_of=None):
        """Logits B x T x V in fp32; with `targets`, their log-probs B x T instead (see logprobs); with
        `continuations`, input_ids is a list of prompts and the result continuation_logprobs'."""
        if continuations is not None:
            return self.continuation_logprobs(input_ids, continuations, prompt_of, temperature)
        if targets is not None:
            return self.logprobs(input_ids, targets, temperature, positions=positions, mask=mask)
        return self.lm_head(self.hidden_states(input_ids, positions, mask)).float()

    def logprobs(self, input_ids, targets, temperature=1.0, chunk_tokens=2048, positions=None, mask=None):
        """log softmax(logits / temperature) at `targets` (B x T), in fp32 (see token_logprobs)."""
        h = self.hidden_states(input_ids, positions, mask)
        return self.token_logprobs(h.flatten(0, 1), targets.flatten(), temperature, chunk_tokens).view(targets.shape)

    def token_logprobs(self, h, targets, temperature=1.0, chunk_tokens=2048, keep_bytes=KEEP_LOGITS_BYTES):
        """log softmax(lm_head(h) / temperature) at `targets`, for flat hidden states h (N x D), in fp32,
        `chunk_tokens` rows at a time, never holding more than one chunk's temporaries. With gradients on,
        the chunks' fp32 logits are kept for backward when all N x V of them fit `keep_bytes` (the
        projection runs once); beyond that each chunk is recomputed in backward (twice, but memory stays
        one chunk at any length: 16k tokens x a 152k vocabulary would be 9.3 GiB)."""
        V = self.lm_head.weight.shape[0]
        recompute = torch.is_grad_enabled() and h.shape[0] * V * 4 > keep_bytes

        def chunk_logprobs(hc, tc):
            logits = self.lm_head(hc).float()
            if temperature != 1.0:  # a pass over N x V floats saved at T = 1
                logits = logits / temperature
            return TokenLogprob.apply(logits, tc)

        out = []
        for s in range(0, h.shape[0], chunk_tokens):
            hc, tc = h[s:s + chunk_tokens], targets[s:s + chunk_tokens]
            if recompute:
                out.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, hc, tc, use_reentrant=False))
            else:
                out.append(chunk_logprobs(hc, tc))
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)

    def continuation_logprobs(self, prompts, continuations, prompt_of, temperature=1.0, chunk_tokens=2048):
        """log p(token | prompt, the continuation's earlier tokens) / temperature-scaled, of every token of
        every continuation, flat (continuation 0's tokens, then 1's, ...). Continuation i follows
        prompts[prompt_of[i]]; each prompt runs once however many continuations share it (a prompt pass
        keeps every layer's keys and values; the continuation rows attend to their prompt's, then causally
        to their own), and the vocabulary projection runs only where a continuation token is predicted.
        Equal to one pass over each prompt + continuation (test)."""
        dev = self.inv_freq.device
        # A last token is only a target. At least one position runs even when every continuation is one token
        # long: under FSDP each pass gathers every block's weights with the other ranks, so every rank must
        # run the same passes whatever its continuations' lengths.
        P, R = max(map(len, prompts)), max(1, max(map(len, continuations)) - 1)
        p_len = torch.tensor([len(p) for p in prompts], device=dev)
        p_ids = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=dev)  # right-padded: causal suffices
        h, kv = self.hidden_states(p_ids, prefix=[(None, None)] * len(self.model.layers))
        flat = [h[torch.arange(len(prompts), device=dev), p_len - 1]]  # each prompt's last position
        index = []  # where each continuation token's hidden state sits in cat(flat)
        for i, c in enumerate(continuations):
            index += [prompt_of[i]] * bool(c) + [len(prompts) + i * R + j for j in range(len(c) - 1)]
        g = torch.tensor(prompt_of, device=dev)
        c_ids = torch.tensor([(c[:-1] + [0] * R)[:R] for c in continuations], device=dev)
        positions = p_len[g][:, None] + torch.arange(R, device=dev)
        prompt_keys = (torch.arange(P, device=dev) < p_len[g][:, None])[:, None, None, :].expand(-1, 1, R, P)
        own_keys = torch.ones(R, R, dtype=torch.bool, device=dev).tril().expand(len(continuations), 1, R, R)
        mask = torch.cat((prompt_keys, own_keys), dim=-1)
        hc, _ = self.hidden_states(c_ids, positions, mask, prefix=[(k[g], v[g]) for k, v in kv])
        flat.append(hc.flatten(0, 1))
        targets = torch.tensor([t for c in continuations for t in c], device=dev)
        h = torch.cat(flat)[torch.tensor(index, dtype=torch.long, device=dev)]
        return self.token_logprobs(h, targets, temperature, chunk_tokens)

    # ------------------------------------------------------------------------- HF checkpoints

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """Load a HF Llama / Qwen2 / Qwen3 folder (`model.safetensors` or shards listed in
        `model.safetensors.index.json`). Tensors stream from disk straight into the module in
        `dtype` (default fp32 on CPU, bf16 on GPU): no second full copy is ever held."""
        path = local_folder(path)
        cfg = Config.from_pretrained(path)
        device = torch.device(default_device(device))
        dtype = dtype or default_dtype(device)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            for name in files:  # shards are files of this folder, never a path out of it
                if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                    raise ValueError(f"{index}: shard {name!r} in weight_map is not a file name in the model folder")
        else:
            files = ["model.safetensors"]
        loaded, unexpected, bad_shape = set(), [], []
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file} not found (weights of {path}; "
                                        f"expected model.safetensors or the shards in model.safetensors.index.json)")
            try:
                part = load_tensors(file, expected, cfg, loaded, unexpected, bad_shape, device, dtype)
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{file}: cannot read it as safetensors ({e}); truncated or corrupt?") from None
            model.load_state_dict(part, strict=False, assign=True)
        missing = sorted(set(expected) - loaded)
        problems = ([f"missing tensors: {', '.join(missing)}"] if missing else []) + \
                   ([f"unexpected tensors: {', '.join(sorted(unexpected))}"] if unexpected else []) + \
                   ([f"wrong shapes: {'; '.join(bad_shape)}"] if bad_shape else [])
        if problems:
            raise ValueError(f"checkpoint {path} does not match its config.json ({cfg.architecture}): " +
                             " | ".join(problems))
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_frequencies(cfg).to(device)
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30, state=None):
        """Write config.json + safetensors in HF layout (sharded with an index above `max_shard_bytes`),
        loadable by transformers, vLLM and `Transformer.from_pretrained`. `state`: the full state dict to
        write instead of the module's own (a sharded model's, gathered; see fsdp.full_state)."""
        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in (state or self.state_dict()).items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        shards, size = [{}], 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        raw = dict(self.config.raw) or {"architectures": [self.config.architecture]}
        raw["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(raw, f, indent=2)


def load_tensors(file, expected, cfg, loaded, unexpected, bad_shape, device, dtype):
    """The tensors of one safetensors file that the model expects, in `dtype` on `device`; names it does
    not expect and shapes that differ are collected in `unexpected` and `bad_shape`."""
    part = {}
    with safe_open(file, framework="pt", device="cpu") as f:
        for key in f.keys():
            if key not in expected:
                if not (cfg.tie_word_embeddings and key == "lm_head.weight"):
                    unexpected.append(key)
                continue
            t = f.get_tensor(key)
            loaded.add(key)
            if tuple(t.shape) != expected[key]:
                bad_shape.append(f"{key}: {tuple(t.shape)} in file, {expected[key]} expected")
                continue
            part[key] = t.to(device=device, dtype=dtype)
    return part


# ----------------------------------------------------------------------------- memory arithmetic

def parameter_count(cfg: Config):
    """Parameters of the model `cfg` describes (embeddings, attention, MLP, norms, an untied head)."""
    h, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    bias = (q + 2 * kv) if cfg.attention_bias else 0
    norms = 2 * h + (2 * cfg.head_dim if cfg.qk_norm else 0)
    return V * h * (1 if cfg.tie_word_embeddings else 2) + L * (h * (q + 2 * kv) + bias + q * h + 3 * h * I + norms) + h


def linear_parameter_count(cfg: Config):
    """Parameters that go through a Linear (what autocast casts to bf16 at every forward): all but the
    norms and an untied input embedding."""
    norms = cfg.num_hidden_layers * (2 * cfg.hidden_size + (2 * cfg.head_dim if cfg.qk_norm else 0)) + cfg.hidden_size
    return parameter_count(cfg) - norms - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def layer_activation_bytes(cfg: Config, tokens, elem=2, mixed=True, expand_kv=False):
    """Bytes one decoder layer keeps for backward per forward over `tokens` tokens: the two norms' input and
    output (fp32 under mixed precision: the residual stream stays fp32), each Linear's input cast to
    `elem` bytes (mixed precision: five casts), q, k, v and the attention output as SDPA keeps them
    (k and v expanded to every query head where CUDA needs that, see attention()), the output
    reshaped for o_proj, the MLP's four intermediates; Qwen3's q/k norms."""
    h, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    k = q if expand_kv else kv
    norms = 16 * h if mixed else 4 * elem * h
    casts = 5 * elem * h if mixed else 0
    qk_norm = (4 + elem) * (q + kv) if cfg.qk_norm else 0
    return tokens * (norms + casts + qk_norm + elem * (3 * q + 2 * k + 4 * I))


def continuation_activation_bytes(cfg: Config, prompts, P, N, R, checkpointing=False, elem=2, mixed=True,
                                  expand_kv=False, chunk_tokens=2048):
    """Peak bytes of one micro-batch of Transformer.continuation_logprobs kept for backward, the log-prob head
    included: `prompts` prompts of P tokens and N continuations of R tokens. Every layer keeps its
    activations over all prompts x P + N x R tokens (layer_activation_bytes), the prompt's keys and values
    as each continuation row attends to them (N x P keys) and the N x R x (P + R) mask as SDPA's
    additive bias; each layer's prompt keys (fp32 after RoPE under mixed precision) and values stay alive
    for the continuation pass, and one boolean mask serves every layer. With gradient checkpointing each
    layer keeps only its input (fp32 under mixed precision), and the peak is the larger of the end of the
    forward (with the log-prob head) and one layer's recompute in backward (the head is done by then)."""
    L, h = cfg.num_hidden_layers, cfg.hidden_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    tokens = prompts * P + N * R
    mask = N * R * (P + R)
    layer = layer_activation_bytes(cfg, tokens, elem, mixed, expand_kv) + \
        2 * elem * (q if expand_kv else kv) * N * P + elem * mask
    kept = L * prompts * P * kv * ((4 if mixed else elem) + elem) + mask
    head = logits_chunk_bytes(cfg, N * R, chunk_tokens)
    if checkpointing:
        inputs = tokens * L * (4 if mixed else elem) * h
        return inputs + kept + max(head, layer)
    return L * layer + kept + head


def packed_activation_bytes(cfg: Config, rows, T, checkpointing=False, elem=2, mixed=True, expand_kv=False,
                            chunk_tokens=2048):
    """The same for SFT's packed rows: rows x T tokens, each row's T x T block-diagonal mask (boolean, shared
    by the layers, and as SDPA's additive bias per layer), the head over every position."""
    L, h = cfg.num_hidden_layers, cfg.hidden_size
    mask = rows * T * T
    layer = layer_activation_bytes(cfg, rows * T, elem, mixed, expand_kv) + elem * mask
    head = logits_chunk_bytes(cfg, rows * T, chunk_tokens)
    if checkpointing:
        return rows * T * L * (4 if mixed else elem) * h + mask + max(head, layer)
    return L * layer + mask + head


def prefill_bytes(cfg: Config, tokens, longest, elem=2):
    """The sampler's largest transient while prefilling a chunk of `tokens` prompt tokens (rows of at most
    `longest`): the MLP's intermediates, q and the expanded k, v, the chunk's mask and its bias."""
    q, I = cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size
    return tokens * elem * (3 * I + 3 * q + 2 * cfg.hidden_size) + tokens * longest * (1 + elem)


def gathered_bytes(cfg: Config, dtype_bytes=2):
    """FSDP's full copies while computing: two decoder blocks (the current one and the next, prefetched)
    and the root's embedding, head and final norm, gathered in the compute dtype."""
    h, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    block = h * (q + 2 * kv) + q * h + 3 * h * I + 2 * h
    return dtype_bytes * (2 * block + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2))


def kv_cache_bytes(cfg: Config, rows, length, dtype_bytes=2):
    """The sampler's static KV cache: keys and values of every layer for rows x length positions."""
    return 2 * cfg.num_hidden_layers * rows * length * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def logits_chunk_bytes(cfg: Config, tokens, chunk_tokens=2048):
    """The log-prob head (`Transformer.token_logprobs`) over `tokens` positions: one chunk's fp32 logits and
    ~2 temporaries, every chunk's logits kept for backward where they fit KEEP_LOGITS_BYTES, and the
    final hidden states it reads (fp32)."""
    kept = tokens * cfg.vocab_size * 4
    return min(chunk_tokens, tokens) * cfg.vocab_size * 4 * 3 + (kept if kept <= KEEP_LOGITS_BYTES else 0) + \
        tokens * cfg.hidden_size * 4 * 3


# ----------------------------------------------------------------------------- tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def _token_text(t):
    return t.get("content") if isinstance(t, dict) else t


class Tokenizer:
    """`tokenizer.json` through the `tokenizers` library; the chat template rendered with jinja2
    the way transformers renders it; every stop id from tokenizer_config / generation_config."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        path = self.path = local_folder(path, TOKENIZER_FILES)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: rlsp needs a fast-tokenizer tokenizer.json")
        self.tk = HFTokenizer.from_file(file)
        tc = self._json("tokenizer_config.json")
        self.bos_token, self.eos_token = _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))
        self.pad_token = _token_text(tc.get("pad_token"))
        self.special = {k: _token_text(v) for k, v in tc.items() if k.endswith("_token")}
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                template = f.read()
        self.chat_template = template
        ids = set()
        gc = self._json("generation_config.json")
        cfg = self._json("config.json")
        for src in (gc.get("eos_token_id"), cfg.get("eos_token_id")):
            ids.update([src] if isinstance(src, int) else (src or []))
        if self.eos_token is not None and self.tk.token_to_id(self.eos_token) is not None:
            ids.add(self.tk.token_to_id(self.eos_token))
        self.stop_token_ids = sorted(ids)
        self.eos_token_id = self.tk.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self.tk.token_to_id(self.bos_token) if self.bos_token else None
        pad = self.tk.token_to_id(self.pad_token) if self.pad_token else None
        self.pad_token_id = pad if pad is not None else (self.stop_token_ids or [0])[0]

    def _json(self, name):
        file = os.path.join(self.path, name)
        if not os.path.isfile(file):
            return {}
        with open(file) as f:
            return json.load(f)

    @classmethod
    def from_pretrained(cls, path):
        return cls(path)

    @property
    def vocab_size(self):
        return self.tk.get_vocab_size()

    def encode(self, text, add_special_tokens=False):
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages, add_generation_prompt=True):
        """The chat template rendered to text, as transformers does (sandboxed jinja2, trim_blocks,
        lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, `tojson`)."""
        if not self.chat_template:
            raise ValueError(f"{self.path} has no chat template (no 'chat_template' in tokenizer_config.json "
                             f"and no chat_template.jinja); pass raw text prompts instead")
        if self.__dict__.get("_compiled", (None,))[0] != self.chat_template:  # compiled once per template
            self._compiled = (self.chat_template, _jinja_env().from_string(self.chat_template))
        return self._compiled[1].render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def save_pretrained(self, path):
        import shutil
        os.makedirs(path, exist_ok=True)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(self.path, name)):
                shutil.copyfile(os.path.join(self.path, name), os.path.join(path, name))


def _jinja_env():
    import datetime
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


# ----------------------------------------------------------------------------- sampling

def native_bf16():
    """True where the CPU multiplies bf16 matrices in hardware: AMX tiles or AVX-512-BF16 (torch's own
    check, else the flags in /proc/cpuinfo). Without them bf16 is emulated and slower than fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(c is not None for c in checks):
        return any(c() for c in checks)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


CACHE_BYTES = 64 * 2**20  # fp32 weights below this stay in the CPU's caches: sampling is compute-bound there
_sampling_dtypes = {}


def sampling_dtype(cfg: Config, device, rows=16, margin=1.15):
    """The weights' dtype that samples fastest: bf16 on GPU; on CPU fp32, except where the CPU has native
    bf16 units (`native_bf16`), the weights are too big for its caches (decode then streams them from
    memory every step, and bf16 halves the bytes) and a decode-shaped product of this model's MLP width,
    `rows` rows, measures at least `margin` times faster in bf16 than in packed fp32. Measured once per
    width and process; a model small enough for the caches keeps fp32 without a measurement, so the
    choice never depends on timing noise there. The trainer recomputes log-probs in its own precision,
    so the sampler's dtype changes which tokens are drawn, never the update's math."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type != "cpu" or not native_bf16() or linear_parameter_count(cfg) * 4 < CACHE_BYTES:
        return torch.float32
    key = (cfg.hidden_size, cfg.intermediate_size, rows)
    if key not in _sampling_dtypes:
        with torch.random.fork_rng(devices=[]):  # its random weights leave the run's random stream alone
            _sampling_dtypes[key] = _measure_sampling_dtype(cfg, rows, margin)
    return _sampling_dtypes[key]


def _measure_sampling_dtype(cfg: Config, rows, margin):
    """bf16 if a decode-shaped product of `cfg`'s MLP width over more weights than the caches hold runs at
    least `margin` times faster in packed bf16 than in packed fp32, else fp32 (see sampling_dtype)."""
    n = max(2, math.ceil(4 * CACHE_BYTES / (cfg.hidden_size * cfg.intermediate_size * 4)))  # > the caches
    layers = [Linear(cfg.hidden_size, cfg.intermediate_size, bias=False) for _ in range(n)]
    x = torch.randn(rows, cfg.hidden_size)

    def seconds(dtype):
        mods = [layer.to(dtype) for layer in layers]
        xs = x.to(dtype)
        with torch.inference_mode():
            for m in mods:  # warm-up: packing, oneDNN primitives
                m(xs)
            t0 = time.perf_counter()
            for _ in range(5):
                for m in mods:
                    m(xs)
            return time.perf_counter() - t0
    fp32 = seconds(torch.float32)
    bf16 = seconds(torch.bfloat16)
    return torch.bfloat16 if fp32 >= margin * bf16 else torch.float32


@dataclass
class Completion:
    tokens: list    # new token ids, the stop token included when the row stopped
    logprobs: list  # log softmax(logits / temperature) at each token (log softmax(logits) when greedy)
    finished: bool  # True: ended on a stop id; False: cut off at max_new_tokens


def sample_token(logits, temperature, top_p, top_k, u=None):
    """Next tokens (B,) and their log-probs under softmax(logits / temperature), drawn with the uniforms
    `u` (B,) in [0, 1) (unused when greedy). Top-k / top-p only restrict which tokens may be drawn; the
    reported log-prob is the one the trainer recomputes."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.gather(-1, tok[:, None]).squeeze(-1) - logits.logsumexp(-1)
    logp = (logits / temperature).log_softmax(-1)
    filtered = logp
    if top_k and top_k < logits.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, -float("inf"))
    if top_p < 1.0:
        sorted_lp, idx = filtered.sort(dim=-1, descending=True)
        p = sorted_lp.softmax(-1)
        drop = (p.cumsum(-1) - p) > top_p  # keep the smallest prefix whose mass reaches top_p
        filtered = filtered.scatter(-1, idx, sorted_lp.masked_fill(drop, -float("inf")))
    # Inverse CDF: one uniform per row against the running sum of the (kept) probabilities, with no host
    # sync. One draw per row instead of noise over the whole vocabulary (Gumbel-max): on CPU exponential
    # noise for 32 rows x 49k tokens costs ~27 ms a step, this ~1.3 ms.
    probs = filtered.exp()
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1).clamp_(max=cdf.shape[-1] - 1)
    # u can round up to the total (about once in 2^24 draws): never return a token top-k / top-p removed
    tok = torch.where(probs.gather(-1, tok[:, None]).squeeze(-1) > 0, tok, filtered.argmax(-1))
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def prefill_chunks(lengths, max_tokens, min_ratio=0.75):
    """Cut rows sorted by decreasing length into chunks [start, end) of similar lengths (each at least
    `min_ratio` of the chunk's longest, at most `max_tokens` padded tokens), so prefill computes few pads."""
    chunks, start = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] < min_ratio * lengths[start] or (i - start + 1) * lengths[start] > max_tokens:
            chunks.append((start, i))
            start = i
    return chunks


def row_groups(pads, block):
    """Rows (sorted by ascending left padding) grouped by padding rounded down to `block`: (a, b, s)
    means rows a:b skip the first s keys, all padding, so short prompts do not read long ones' cache."""
    starts = [p // block * block for p in pads]
    groups, a = [], 0
    for i in range(1, len(starts) + 1):
        if i == len(starts) or starts[i] != starts[a]:
            groups.append((a, i, starts[a]))
            a = i
    return groups


# ----------------------------------------------------------------------------- the decode step

def decode_step(model, caches, tok, pad, cache_pos, keys, groups=None):
    """One decode step of generate, for rows i < B = len(tok): token tok[i] goes into cache slot `cache_pos`
    (position cache_pos - pad[i]) and attends over the slots `keys` (0 .. S-1) from its row's first real
    one (pad[i]) to its own. `caches` are the whole buffers (rows from B on and slots from S on are not
    read). `groups` (eager, CPU): rows a:b skip their first s slots, all padding (row_groups). Returns the
    next-token logits, B x V in fp32. CompiledDecode runs this same function compiled."""
    B, S = tok.shape[0], keys.shape[0]
    mask = ((keys[None] >= pad[:, None]) & (keys[None] <= cache_pos))[:, None, None]
    if groups is not None:
        mask = [(a, b, s, mask[a:b, ..., s:]) for a, b, s in groups]
    h = model.hidden_states(tok[:, None], (cache_pos - pad)[:, None], mask,
                            [(k[:B, :, :S], v[:B, :, :S]) for k, v in caches], cache_pos)
    return model.lm_head(h[:, -1]).float()


COMPILE_STATS = {"compiles": 0, "seconds": 0.0, "graphs": 0}  # this process's: inductor compiles of
_compiled_step = None                                          # decode_step, time in them, CUDA graphs captured


def _inductor(gm, example_inputs):  # torch.compile's inductor backend, counted
    from torch._inductor.compile_fx import compile_fx
    COMPILE_STATS["compiles"] += 1
    return compile_fx(gm, example_inputs)


def compiled_decode_step(*args):
    """decode_step compiled by torch.compile (inductor, whole graph), timing the calls that compile. Only the
    dimensions CompiledDecode marks are dynamic: a model of other shapes compiles a graph of its own rather
    than making its head counts and widths symbolic (torch.compile's automatic dynamic shapes)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(decode_step, backend=_inductor, fullgraph=True)
    before, t0 = COMPILE_STATS["compiles"], time.perf_counter()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        logits = _compiled_step(*args)
    if COMPILE_STATS["compiles"] != before:
        COMPILE_STATS["seconds"] += time.perf_counter() - t0
    return logits


def compile_decode(flag, device):
    """--compile / --no-compile, else the default: compiled on GPU, where an eager decode loop is bound by
    kernel launches; eager on CPU, where compiling measured no faster for real models (docs/speed.md)."""
    return flag if flag is not None else torch.device(device).type == "cuda"


class CompiledDecode:
    """generate's decode step compiled once for every batch size and window: the row and slot dimensions
    are marked dynamic, so neither a new rollout batch nor a growing window recompiles (a test counts).
    On CUDA each (rows, window) bucket is captured as a CUDA graph and replayed: one launch a token instead
    of ~12 kernels a layer, the launch-bound part of an eager decode loop. generate keeps buckets few
    (rows in powers of two, windows in eighths of the cache), and only the bucket in use holds a graph:
    within a call rows only shrink and windows only grow. The graphs live as long as the call, as its
    caches do; torch.compile's own graphs (mode="reduce-overhead") would re-record at every call's new
    cache addresses, and stop after 128 re-recordings."""

    def __init__(self, model, caches, rows, length):
        device = caches[0][0].device
        self.model, self.caches, self.cuda, self.device = model, caches, device.type == "cuda", device
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)  # the graphs' inputs, at fixed addresses
        self.pad = torch.zeros(rows, dtype=torch.long, device=device)
        self.keys = torch.arange(length, device=device)
        self.bucket = self.graph = self.logits = None
        for c in (c for kv in caches for c in kv):
            torch._dynamo.maybe_mark_dynamic(c, 0)
            torch._dynamo.maybe_mark_dynamic(c, 2)

    def __call__(self, tok, pad, cache_pos, window):
        """Logits of the first len(tok) rows. At least 2 rows run: a batch of one would compile a graph of its
        own (torch.compile specializes sizes 0 and 1); the spare row's tokens and logits are left over."""
        n = max(2, len(tok))
        self.tok[:len(tok)].copy_(tok)
        self.pad[:len(tok)].copy_(pad)
        args = (self.model, self.caches, self.tok[:n], self.pad[:n], cache_pos, self.keys[:window])
        for x in (args[2], args[3], args[5]):
            torch._dynamo.maybe_mark_dynamic(x, 0)
        if not self.cuda:
            return compiled_decode_step(*args)[:len(tok)]
        with torch.cuda.device(self.device):  # streams and graphs on the caches' GPU, whichever is current
            if self.bucket != (n, window):
                self.capture(args)
                self.bucket = (n, window)
            self.graph.replay()
        return self.logits[:len(tok)]

    def capture(self, args):
        """A new bucket's graph, after a warm-up on a side stream (compiling, autotuning, cuBLAS workspaces
        happen outside the capture). The warm-up runs the step, the capture only records it, and the replay
        that follows runs it again: harmless, as the step writes only slot cache_pos, from the same inputs.
        capture_begin/capture_end rather than torch.cuda.graph, whose entry empties the allocator's caches
        (the trainer's blocks and pinned host memory) at every capture. Every bucket of the call records into
        one memory pool, reusing the last bucket's memory; that graph is dropped only once the new capture
        holds the pool: the allocator counts a pool's graphs, and a pool whose count fell to zero cannot be
        captured into again (an internal assert)."""
        old, self.graph, self.logits = self.graph, None, None  # the old logits' memory goes back to the pool
        if not hasattr(self, "stream"):
            self.stream, self.pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            compiled_decode_step(*args)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.pool)
            try:
                self.logits = compiled_decode_step(*args)
            finally:
                graph.capture_end()
        self.graph = graph
        del old  # never replayed again
        torch.cuda.current_stream().wait_stream(self.stream)
        COMPILE_STATS["graphs"] += 1


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=(),
             seed=None, pad_id=0, samples=1, check_every=8, prefill_tokens=4096, kv_block=128, group_block=64,
             compiled=False):
    """Sample continuations of many prompts (lists of token ids) at once: `samples` of each, returned
    prompt by prompt (prompt 0's samples, then prompt 1's, ...). Each prompt is prefilled once and its
    KV cache copied to its `samples` rows (a GRPO group shares one prefill).

    Rows are sorted by prompt length and left-padded into one batch with per-row positions and a
    padding mask, so each row is computed exactly as if alone. Prefill runs over chunks of
    similar-length prompts (padding a 40-token prompt to 400 would cost 10x); decoding then steps
    the whole batch against a preallocated KV cache (batch x max length) with the same shapes every
    step. Every `check_every` steps the host looks at which rows have hit a stop id: it stops when all
    have, and drops finished rows from the batch once at least half are done, so short answers stop
    costing compute. `compiled`: the decode step runs compiled (CompiledDecode; CUDA graphs on GPU), rows
    and windows in buckets; the same tokens as eager at temperature 0 in fp32 (test)."""
    cfg = model.config
    device = model.inv_freq.device
    dtype = model.model.embed_tokens.weight.dtype
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate: needs at least one prompt, and every prompt at least one token")
    order = sorted(range(len(prompts)), key=lambda b: -len(prompts[b]))
    prompts = [list(prompts[b]) for b in order]
    G = samples
    B, P = len(prompts) * G, len(prompts[0])
    L = P + max_new_tokens
    if L > cfg.max_position_embeddings:
        raise ValueError(f"generate: prompt length {P} + max_new_tokens {max_new_tokens} = {L} exceeds the "
                         f"model's context of {cfg.max_position_embeddings} tokens (max_position_embeddings)")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    stops = torch.tensor(sorted(set(stop_token_ids)) or [-1], device=device)

    lengths = [len(p) for p in prompts]
    pad = torch.tensor([P - n for n in lengths], device=device).repeat_interleave(G)
    # Compiled: windows of a multiple of 8 slots (on CUDA the memory-efficient kernel's mask alignment is a
    # guard of the graph), one spare slot so that no window spans the whole buffer, at least 2 rows
    # (CompiledDecode): each would otherwise compile a second graph.
    Lw = -(-L // 8) * 8 if compiled else L  # the last window
    kv_shape = (max(B, 2) if compiled else B, cfg.num_key_value_heads, Lw + 1 if compiled else L, cfg.head_dim)
    caches = [(torch.zeros(kv_shape, device=device, dtype=dtype), torch.zeros(kv_shape, device=device, dtype=dtype))
              for _ in range(cfg.num_hidden_layers)]
    logits = torch.empty(B, cfg.vocab_size, device=device)
    for r0, r1 in prefill_chunks(lengths, prefill_tokens):
        # Chunk rows are left-padded to the chunk's longest prompt Pc and fill cache slots P-Pc .. P-1
        # of the first row of each prompt's group (rows r*G); the group's other rows are copied below.
        Pc = lengths[r0]
        ids = torch.tensor([[pad_id] * (Pc - n) + p for n, p in zip(lengths[r0:r1], prompts[r0:r1])], device=device)
        cpad = pad[r0 * G:r1 * G:G] - (P - Pc)
        q_idx = torch.arange(Pc, device=device)
        valid = q_idx[None] >= cpad[:, None]
        # causal over real tokens; pad queries attend to themselves only (their outputs are never used)
        mask = (valid[:, None, :] | torch.eye(Pc, dtype=torch.bool, device=device)) & (q_idx[None, :] <= q_idx[:, None])
        positions = (q_idx[None] - cpad[:, None]).clamp(min=0)
        views = [(k[r0 * G:r1 * G:G, :, P - Pc:P], v[r0 * G:r1 * G:G, :, P - Pc:P]) for k, v in caches]
        h = model.hidden_states(ids, positions, mask[:, None], views, q_idx)
        logits[r0 * G:r1 * G:G] = model.lm_head(h[:, -1]).float()
    if G > 1:  # every row of a group starts from its first row's prompt cache and next-token logits
        for k, v in caches:
            for c in (k, v):
                grouped = c[:, :, :P].unflatten(0, (-1, G))
                grouped[:, 1:] = grouped[:, :1]
        logits.unflatten(0, (-1, G))[:, 1:] = logits.unflatten(0, (-1, G))[:, :1]

    key_idx = torch.arange(L, device=device)
    rows = torch.arange(B, device=device)  # original row index of each live batch row
    out_tok = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
    out_lp = torch.zeros((B, max_new_tokens), device=device)
    n_steps = torch.zeros(B, dtype=torch.long, device=device)
    live_done = torch.zeros(B, dtype=torch.bool, device=device)
    # On CPU, rows whose prompts are much shorter than the longest skip their all-padding cache slots,
    # in groups of rows whose padding agrees to `group_block` slots (one attention call per group);
    # on GPU one call for the whole batch (kernel launches cost more than reading padding).
    group_block = group_block if device.type == "cpu" else L
    groups = row_groups(pad.tolist(), group_block)
    if compiled:  # windows in eighths of the cache (kv_block multiples): few buckets, few CUDA graphs
        kv_block = kv_block * math.ceil(L / (8 * kv_block))
        step = CompiledDecode(model, caches, max(B, 2), Lw + 1)
    cache_pos = torch.full((1,), P - 1, device=device)  # the slot this step's token is written to
    for t in range(max_new_tokens):
        # A uniform for every row of the call, live or not: a row's draws never depend on which rows are
        # still in the batch, so compacting (eagerly, or to the compiled step's buckets) changes no token.
        u = torch.rand(B, generator=generator, device=device)[rows] if temperature else None
        tok, lp = sample_token(logits, temperature, top_p, top_k, u)
        tok = torch.where(live_done, pad_id, tok)
        out_tok[rows, t] = torch.where(live_done, -1, tok)
        out_lp[rows, t] = lp
        n_steps[rows] += (~live_done).long()
        live_done = live_done | torch.isin(tok, stops)
        if t == max_new_tokens - 1:
            break
        if (t + 1) % check_every == 0:  # the loop's only host-device sync: every `check_every` tokens
            n_done = int(live_done.sum())
            if n_done == len(rows):
                break
            # Compiled, rows come in powers of two: finished rows fill the bucket (they stay finished).
            size = len(rows) - n_done if not compiled else 1 << (len(rows) - n_done - 1).bit_length()
            if n_done * 2 >= len(rows) and size < len(rows):  # compact: drop finished rows from the batch
                keep = torch.cat(((~live_done).nonzero(), live_done.nonzero()[:size - len(rows) + n_done])).squeeze(1)
                rows, pad, tok, live_done = rows[keep], pad[keep], tok[keep], live_done[keep]
                # Layer by layer, into the front of the same buffers: one layer's rows in flight at a time,
                # never a second cache.
                for c in (c for kv in caches for c in kv):
                    c[:size].copy_(c[keep])
                groups = row_groups(pad.tolist(), group_block)
        cur = P + t
        # Attend over the cache prefix rounded up to `kv_block` keys: no reading of slots not yet
        # written, and only L / kv_block distinct windows.
        S = min(Lw, (cur // kv_block + 1) * kv_block)
        cache_pos += 1  # on the device: no host-to-device copy per token
        if compiled:
            logits = step(tok, pad, cache_pos, S)
        else:
            logits = decode_step(model, caches, tok, pad, cache_pos, key_idx[:S], groups)

    out_tok, out_lp, n_steps = out_tok.cpu(), out_lp.cpu(), n_steps.cpu()
    stop_set = set(stop_token_ids)
    result = [None] * B
    for i in range(B):
        n = int(n_steps[i])
        toks = out_tok[i, :n].tolist()
        result[order[i // G] * G + i % G] = Completion(toks, out_lp[i, :n].tolist(), bool(toks) and toks[-1] in stop_set)
    return result
