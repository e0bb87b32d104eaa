"""gguf_file.py: llama.cpp's GGUF file format, read by hand with the standard library and numpy.

A GGUF file is, in order (all little-endian):

    magic "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
    n_kv x  key (string) | value type u32 | value          metadata: config, tokenizer, chat template
    n_tensors x  name (string) | n_dims u32 | dims u64[n_dims] (innermost first) | ggml type u32 | offset u64
    padding to `general.alignment` (default 32), then the tensor data, each at its offset

    string = length u64 | UTF-8 bytes;  array = item type u32 | count u64 | items

What is here: `read(path)` -> a `GGUF` holding the metadata dict and the tensor infos, with the raw
bytes of each tensor one `numpy.memmap` slice away. No torch at import time: `tokenizer.py` reads
vocabularies from here without it. (Named gguf_file, not gguf, so that it never shadows the `gguf`
package that `transformers` and the tests use as a reference.)

    import gguf_file
    g = gguf_file.read("SmolLM2-135M-Instruct.Q4_1.gguf")
    g.metadata["llama.block_count"]      # 30
    g.tensors["blk.0.attn_q.weight"]     # TensorInfo(name, shape=(576, 576), type=3, offset=...)
    g.tensor("blk.0.attn_q.weight")      # float32 numpy (576, 576), dequantised, still in GGUF row order

For `model.load_model` it also turns a `llama` file into a Hugging Face checkpoint: `config_dict(g)`
is the `config.json` dict, `hf_tensors(g)` yields each tensor under its Hugging Face name, dequantised
and with llama.cpp's q/k row permutation undone (`unpermute_qk`). The block layouts of the quantised
types are drawn next to `dequantize`; `tests/test_gguf.py` checks them bit for bit against the
`gguf` package.
"""
import os
import struct
from dataclasses import dataclass

import numpy as np

from cli import Error

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# metadata value types: id -> (struct format, size); 8 = string and 9 = array are read apart
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}  # for fast numeric arrays (token scores, types)
STRING, ARRAY = 8, 9

# ggml tensor types this project reads: id -> (name, values per block, bytes per block)
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
         8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}


class GGUFError(Error, ValueError):
    """A GGUF file that cannot be used; the message names the file and, where there is one, the tensor."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple      # PyTorch order (outermost first): a (out, in) weight is stored with dims (in, out)
    type: int         # ggml type id, see TYPES
    offset: int       # absolute byte offset in the file
    nbytes: int


class GGUF:
    """The parsed header of one file: `metadata` (key -> value), `tensors` (name -> TensorInfo)."""

    def __init__(self, path, metadata, tensors):
        self.path, self.metadata, self.tensors = path, metadata, tensors
        self._map = None

    def raw(self, name):
        """The bytes of one tensor as a uint8 numpy view of the memory-mapped file (no copy)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        t = self.tensors[name]
        return self._map[t.offset:t.offset + t.nbytes]

    def tensor(self, name):
        """One tensor dequantised to an owned float32 numpy array of its (PyTorch-order) shape."""
        t = self.tensors[name]
        try:
            return dequantize(self.raw(name), t.type, t.shape)
        except GGUFError as e:
            raise GGUFError(f"{self.path}: tensor {name!r}: {e}") from None


class _Reader:
    def __init__(self, f, path):
        self.f, self.path = f, path

    def take(self, n):
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFError(f"{self.path}: truncated header (wanted {n} bytes at offset {self.f.tell() - len(b)})")
        return b

    def scalar(self, t):
        fmt, size = _SCALARS[t]
        return struct.unpack(fmt, self.take(size))[0]

    def string(self):
        n = self.scalar(10)
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: a metadata string is not UTF-8 ({e})") from None

    def value(self, t, key):
        if t == STRING:
            return self.string()
        if t == ARRAY:
            item, n = self.scalar(4), self.scalar(10)
            if item in _NUMPY:  # numeric arrays in one read
                size = np.dtype(_NUMPY[item]).itemsize
                out = np.frombuffer(self.take(n * size), dtype=_NUMPY[item])
                return out.astype(bool).tolist() if item == 7 else out.tolist()
            return [self.value(item, key) for _ in range(n)]
        if t not in _SCALARS:
            raise GGUFError(f"{self.path}: metadata key {key!r} has unknown value type {t}")
        return self.scalar(t)


def read(path):
    """Parse the header of a GGUF file; the tensor data stays on disk until `GGUF.raw` maps it."""
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such GGUF file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if (magic := f.read(4)) != MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        version = r.scalar(4)
        if version not in VERSIONS:
            raise GGUFError(f"{path}: unsupported GGUF version {version} (this reader knows {VERSIONS})")
        n_tensors, n_kv = r.scalar(10), r.scalar(10)
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar(4), key)
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.scalar(10) for _ in range(r.scalar(4))]
            infos.append((name, tuple(reversed(dims)), r.scalar(4), r.scalar(10)))
        align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-f.tell() // align) * align
    tensors = {}
    for name, shape, t, offset in infos:
        if t not in TYPES:
            raise GGUFError(f"{path}: tensor {name!r} has ggml type {t}, which this reader does not support "
                            f"(supported: {', '.join(n for n, _, _ in TYPES.values())})")
        _, per_block, block_bytes = TYPES[t]
        n = int(np.prod(shape, dtype=np.int64))
        if shape and shape[-1] % per_block:
            raise GGUFError(f"{path}: tensor {name!r} rows of {shape[-1]} values are not whole {TYPES[t][0]} blocks")
        nbytes = n // per_block * block_bytes
        if start + offset + nbytes > size:
            raise GGUFError(f"{path}: truncated file: tensor {name!r} ends at byte {start + offset + nbytes}, "
                            f"the file has {size}")
        tensors[name] = TensorInfo(name, shape, t, start + offset, nbytes)
    return GGUF(path, metadata, tensors)


# ----------------------------------------------------------------------------- dequantisation
#
# A quantised row is cut into blocks of 32 (or, for the K-quants, super-blocks of 256) values; each
# block is stored as a few scale fields followed by packed integers (f16 = IEEE half, little-endian).
# Every function below takes the blocks of many rows at once, (n_blocks, block_bytes) uint8, and
# returns (n_blocks, values_per_block) float32, with numpy over all blocks together. The arithmetic
# is ggml's, in ggml's order (e.g. (d * sc) * q - dmin * m), so the floats come out bit for bit equal.

def _f16(b):
    """(n, 2k) uint8 -> (n, k) float32, reading little-endian halves."""
    return b.view("<f2").astype(np.float32)


def _nibbles(qs):
    """(..., 32k) bytes -> (..., 64k) values: all the low nibbles first, then all the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f32(b):
    return b.view("<f4")


def _bf16(b):  # bfloat16 is the top half of a float32
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _q8_0(b):
    """Q8_0, 34 bytes: d f16 | 32 x int8 q.  x = q * d"""
    d = _f16(b[:, :2])                                       # (n, 1)
    return b[:, 2:].view(np.int8).astype(np.float32) * d     # (n, 32)


def _q4_0(b):
    """Q4_0, 18 bytes: d f16 | 16 bytes, value i in the low nibble of byte i, value 16+i in its high
    nibble.  x = (q - 8) * d"""
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).astype(np.int8) - 8               # (n, 32) in -8..7
    return d * q.astype(np.float32)


def _q4_1(b):
    """Q4_1, 20 bytes: d f16 | m f16 | 16 bytes of nibbles as Q4_0.  x = q * d + m"""
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).astype(np.float32) + m


def _k_scales(s):
    """The 12 scale bytes of a Q4_K/Q5_K super-block -> 6-bit (scale, min) of its 8 sub-blocks.

        byte  0..3   ss SSSSSS   S = scale of sub-block j (j = 0..3), ss = top 2 bits of scale j+4
        byte  4..7   mm MMMMMM   M = min of sub-block j,              mm = top 2 bits of min j+4
        byte  8..11  mmmm ssss   low 4 bits of min j+4 | low 4 bits of scale j+4
    """
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]           # (n, 4) each
    sc = np.concatenate([lo & 63, (hi & 0x0F) | (lo >> 6) << 4], axis=1)    # (n, 8)
    mn = np.concatenate([mid & 63, (hi >> 4) | (mid >> 6) << 4], axis=1)    # (n, 8)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k_low(qs):
    """128 bytes -> 8 sub-blocks of 32 nibbles: bytes 32c..32c+31 hold sub-block 2c in their low
    nibbles and sub-block 2c+1 in their high nibbles."""
    return _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, 8, 32)  # (n, 4, 64) -> (n, 8, 32)


def _q4_k(b):
    """Q4_K, 144 bytes for 256 values: d f16 | dmin f16 | 12 bytes of scales | 128 bytes of nibbles.
    Sub-block j (32 values): x = (d * sc[j]) * q - dmin * m[j]"""
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])                # (n, 1)
    sc, mn = _k_scales(b[:, 4:16])                           # (n, 8)
    q = _q4_k_low(b[:, 16:144]).astype(np.float32)           # (n, 8, 32)
    x = (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]
    return x.reshape(-1, 256)


def _q5_k(b):
    """Q5_K, 176 bytes: d f16 | dmin f16 | 12 bytes of scales | 32 bytes qh | 128 bytes of nibbles.
    The fifth bit of value l of sub-block j is bit j of qh[l]; otherwise as Q4_K."""
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1   # (n, 8, 32)
    q = (_q4_k_low(b[:, 48:176]) | high << 4).astype(np.float32)                     # (n, 8, 32) 0..31
    x = (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]
    return x.reshape(-1, 256)


def _q6_k(b):
    """Q6_K, 210 bytes for 256 values: ql 128 bytes | qh 64 bytes | 16 x int8 scales | d f16.
    Two halves of 128 values, each from 64 bytes of ql and 32 of qh. In a half, value v (0..127)
    takes its low 4 bits from ql[v % 64] (low nibble if v < 64, else high) and its top 2 bits from
    qh[v % 32], bits 2*(v // 32) and up. Each 16 values share one scale: x = (d * scale) * (q - 32)"""
    low = _nibbles(b[:, :128].reshape(-1, 2, 64))                                  # (n, 2, 128)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts & 3).reshape(-1, 2, 128)  # (n, 2, 128)
    q = ((low | high << 4).astype(np.int8) - 32).reshape(-1, 16, 16)               # (n, 16, 16) -32..31
    scale = b[:, 192:208].view(np.int8).astype(np.float32)                         # (n, 16)
    d = _f16(b[:, 208:210])                                                        # (n, 1)
    return ((d * scale)[:, :, None] * q.astype(np.float32)).reshape(-1, 256)


_DEQUANT = {0: _f32, 1: _f16, 30: _bf16, 2: _q4_0, 3: _q4_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k}
_CHUNK = 1 << 20   # values dequantised at a time: bounds the temporaries for a 7B embedding


def dequantize(raw, type, shape):
    """The bytes of one tensor (uint8, as `GGUF.raw` gives them) -> an owned float32 array of
    `shape`. Any type in TYPES; all blocks at once, in chunks of about a million values."""
    if type not in TYPES:
        raise GGUFError(f"ggml type {type} is not supported (supported: {', '.join(n for n, _, _ in TYPES.values())})")
    name, per_block, block_bytes = TYPES[type]
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if n % per_block or raw.size != n // per_block * block_bytes:
        raise GGUFError(f"{raw.size} bytes are not {n} values of {name}")
    blocks = raw.reshape(-1, block_bytes)                    # (n_blocks, block_bytes)
    out = np.empty((len(blocks), per_block), dtype=np.float32)
    step = max(1, _CHUNK // per_block)
    for i in range(0, len(blocks), step):
        out[i:i + step] = _DEQUANT[type](blocks[i:i + step])
    return out.reshape(shape)


# ----------------------------------------------------------------------------- llama files as HF checkpoints

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(name, path="GGUF file"):
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, and so on."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.weight"
    raise GGUFError(f"{path}: tensor {name!r} is not one of a Llama model's (no Hugging Face name for it)")


def config_dict(g):
    """A Hugging Face `config.json` dict for a `llama` GGUF file (Llama, Mistral and SmolLM2 all are)."""
    m = g.metadata
    arch = m.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{g.path}: architecture {arch!r} is not supported (only 'llama' GGUF files load)")

    def need(key):
        if f"llama.{key}" not in m:
            raise GGUFError(f"{g.path}: metadata lacks 'llama.{key}'")
        return m[f"llama.{key}"]

    n_heads, hidden = need("attention.head_count"), need("embedding_length")
    head_dim = m.get("llama.attention.key_length") or m.get("llama.rope.dimension_count") or hidden // n_heads
    if m.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{g.path}: rope.dimension_count {m['llama.rope.dimension_count']} != head size {head_dim} "
                        "(partial rotary embeddings are not supported)")
    vocab = m.get("llama.vocab_size") or len(m.get("tokenizer.ggml.tokens", ())) or \
        (g.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in g.tensors else None)
    if not vocab:
        raise GGUFError(f"{g.path}: no vocabulary size (no llama.vocab_size, tokens or token_embd.weight)")
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
         "hidden_size": hidden, "intermediate_size": need("feed_forward_length"),
         "num_hidden_layers": need("block_count"), "num_attention_heads": n_heads,
         "num_key_value_heads": m.get("llama.attention.head_count_kv", n_heads), "head_dim": head_dim,
         "rope_theta": float(m.get("llama.rope.freq_base", 10000.0)),
         "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
         "max_position_embeddings": m.get("llama.context_length", 4096),
         "tie_word_embeddings": "output.weight" not in g.tensors,
         "torch_dtype": "float32"}   # what the tensors dequantise to
    if m.get("llama.rope.scaling.type", "none") != "none":  # Config.from_hf turns this down by name
        d["rope_scaling"] = {"rope_type": m["llama.rope.scaling.type"]}
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{theirs}" in m:
            d[ours] = m[f"tokenizer.ggml.{theirs}"]
    return d


def unpermute_qk(w, n_heads):
    """Undo llama.cpp's q/k row permutation: (n_heads * head_dim, in) -> the same shape, in HF order.

    Hugging Face rotates the pair (i, i + head_dim/2) of each head; llama.cpp rotates adjacent rows
    (2i, 2i + 1), so its converter reorders each head's rows from [a0 a1 a2 a3 | b0 b1 b2 b3] to
    [a0 b0 a1 b1 a2 b2 a3 b3] (head_dim 8): w.reshape(n_heads, 2, head_dim/2, in).swapaxes(1, 2).
    Here the reverse. For k_proj n_heads is the number of *key/value* heads: with GQA the two differ,
    and using the query head count would scramble k silently.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    if rows % n_heads or head_dim % 2:
        raise GGUFError(f"{rows} rows are not {n_heads} heads of an even size")
    w = w.reshape(n_heads, head_dim // 2, 2, cols)   # (heads, pair i, which of the pair, in): GGUF order
    w = w.swapaxes(1, 2)                             # (heads, 2, head_dim/2, in): first halves, then second
    return w.reshape(rows, cols)                     # a copy, contiguous


def hf_tensors(g):
    """Yield (HF name, shape, read) for each tensor of a llama file, in file order, without reading
    any data: read() dequantises that one tensor to float32 numpy in Hugging Face layout."""
    c = config_dict(g)
    heads = {"q_proj": c["num_attention_heads"], "k_proj": c["num_key_value_heads"]}
    for name, info in g.tensors.items():
        key = hf_name(name, g.path)
        n_heads = heads.get(key.split(".")[-2]) if len(info.shape) == 2 else None

        def read(name=name, n_heads=n_heads):
            w = g.tensor(name)
            if n_heads is None:
                return w
            try:
                return unpermute_qk(w, n_heads)
            except GGUFError as e:
                raise GGUFError(f"{g.path}: tensor {name!r}: {e}") from None
        yield key, info.shape, read
