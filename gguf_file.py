"""gguf_file.py: llama.cpp's GGUF file format, read by hand with the standard library and numpy.

A GGUF file is, in order (all little-endian):

    magic "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
    n_kv x  key (string) | value type u32 | value          metadata: config, tokenizer, chat template
    n_tensors x  name (string) | n_dims u32 | dims u64[n_dims] (innermost first) | ggml type u32 | offset u64
    padding to `general.alignment` (default 32), then the tensor data, each at its offset

    string = length u64 | UTF-8 bytes;  array = item type u32 | count u64 | items

What is here: `read(path)` -> a `GGUF` holding the metadata dict and the tensor infos, with the raw
bytes of each tensor one `numpy.memmap` slice away. The header is not trusted: every length and count
is checked against the bytes left in the file and a cap (MAX_TENSORS, ...) before it is allocated,
and the tensors must lie inside the file, aligned (a power of two) and without overlapping. Arrays
come back as lists (what `tokenizer.py` checks for), at most MAX_ITEMS items in all. No torch at import
time: `tokenizer.py` reads vocabularies from here without it. (Named gguf_file, not gguf, so that it
never shadows the `gguf` package that `transformers` and the tests use as a reference.)

    import gguf_file
    g = gguf_file.read("SmolLM2-135M-Instruct.Q4_1.gguf")
    g.metadata["llama.block_count"]      # 30
    g.tensors["blk.0.attn_q.weight"]     # TensorInfo(name, shape=(576, 576), type=3, offset=...)
    g.tensor("blk.0.attn_q.weight")      # float32 numpy (576, 576), dequantised, still in GGUF row order

For `model.load_model` it also turns a `llama` or `qwen2` file into a Hugging Face checkpoint:
`config_dict(g)` is the `config.json` dict (Llama 3.1's RoPE scaling read from its rope_freqs tensor),
`hf_tensors(g)` yields each tensor under its Hugging Face name, dequantised and, in a `llama` file,
with llama.cpp's q/k row permutation undone (`unpermute_qk`; llama.cpp's converter does not permute
Qwen2's q and k). The block layouts of the quantised
types are drawn next to `dequantize`; `tests/test_gguf.py` checks them bit for bit against the
`gguf` package.
"""
import array
import math
import os
import re
import reprlib
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
_ARRAY_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d"}  # array.array's
STRING, ARRAY = 8, 9

# What a header may claim, checked before anything is allocated; every length and count must also fit
# in the bytes left in the file. The caps are far above any real file (a 405B model has ~1,100
# tensors and ~40 metadata keys; llama.cpp caps tensor names at 64 bytes and dimensions at 4).
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_NAME = 1 << 16        # bytes in a metadata key or a tensor name
MAX_DIMS = 4
MAX_DEPTH = 4             # arrays of arrays of ... (real files nest 1 deep)
MAX_ITEMS = 1 << 22       # array items in all the metadata (a 262k vocabulary holds ~800k): arrays
                          # come back as lists, ~8-36 bytes of Python objects an item, so this bounds them
MAX_ALIGNMENT = 1 << 20   # general.alignment: a power of two up to this (default 32)
# the fewest bytes one item can take: a metadata pair (key length, type, a 1-byte value), a tensor
# info (name length, n_dims, type, offset), an array item of type string or array (length / header)
_MIN_KV, _MIN_TENSOR, _MIN_ITEM = 8 + 4 + 1, 8 + 4 + 4 + 8, {STRING: 8, ARRAY: 4 + 8}

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


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def short(value, n=100):
    """repr(value) of bounded size and depth (a few items of a list, the ends of a long string), for
    messages about a value read from a file."""
    r = _REPR.repr(value)
    return r if len(r) <= n else r[:n] + "..."


class _Reader:
    """Reads the header, refusing any length or count that the rest of the file cannot hold."""

    def __init__(self, f, path, size):
        self.f, self.path, self.size = f, path, size
        self.items = 0   # array items read so far

    def left(self):
        return self.size - self.f.tell()

    def take(self, n):
        if n > self.left():
            raise GGUFError(f"{self.path}: truncated header (wanted {n} bytes at offset {self.f.tell()}, "
                            f"the file has {self.size})")
        return self.f.read(n)

    def scalar(self, t):
        fmt, size = _SCALARS[t]
        return struct.unpack(fmt, self.take(size))[0]

    def count(self, what, n, item_bytes, cap=None):
        """A u64 count just read: at most cap, and n items of item_bytes each must fit in the file."""
        if cap is not None and n > cap:
            raise GGUFError(f"{self.path}: {what} {n} at offset {self.f.tell() - 8} is more than {cap}")
        if n * item_bytes > self.left():
            raise GGUFError(f"{self.path}: truncated header: {what} {n} at offset {self.f.tell() - 8} needs at "
                            f"least {n * item_bytes} bytes, {self.left()} are left of the file")
        return n

    def string(self, what="a metadata string", cap=None):
        n = self.count(f"length of {what}", self.scalar(10), 1, cap)
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: {what} is not UTF-8 ({e})") from None

    def value(self, t, key, depth=0):
        if t == STRING:
            return self.string(f"the value of {short(key)}")
        if t == ARRAY:
            if depth == MAX_DEPTH:
                raise GGUFError(f"{self.path}: metadata key {short(key)} nests arrays more than {MAX_DEPTH} deep")
            item = self.scalar(4)
            if item not in _SCALARS and item not in (STRING, ARRAY):
                raise GGUFError(f"{self.path}: metadata key {short(key)} is an array of unknown value type {item}")
            n = self.count(f"array length of {short(key)}", self.scalar(10), _MIN_ITEM.get(item) or _SCALARS[item][1])
            self.items += n
            if self.items > MAX_ITEMS:
                raise GGUFError(f"{self.path}: metadata arrays hold more than {MAX_ITEMS} items in all "
                                f"(at {short(key)})")
            if item in _NUMPY:  # numeric arrays in one read, kept as compact as the file holds them
                out = np.frombuffer(self.take(n * _SCALARS[item][1]), dtype=_NUMPY[item])
                if item == 7:
                    return out.astype(bool).tolist()
                # array.array: 4 bytes a float32 score, not a 32-byte Python float in a list (a 262k
                # vocabulary's scores and types took ~9x their size in the file)
                return array.array(_ARRAY_CODES[item], out.astype(out.dtype.newbyteorder("=")).tobytes())
            return [self.value(item, key, depth + 1) for _ in range(n)]
        if t not in _SCALARS:
            raise GGUFError(f"{self.path}: metadata key {short(key)} has unknown value type {t}")
        return self.scalar(t)


def read(path):
    """Parse the header of a GGUF file; the tensor data stays on disk until `GGUF.raw` maps it. Every
    length, count and offset is checked against the file's size before it is used, so a damaged or
    hostile header is a GGUFError naming what is wrong, never a huge allocation."""
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such GGUF file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        if (magic := f.read(4)) != MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        version = r.scalar(4)
        if version not in VERSIONS:
            raise GGUFError(f"{path}: unsupported GGUF version {version} (this reader knows {VERSIONS})")
        n_tensors = r.count("tensor count", r.scalar(10), _MIN_TENSOR, MAX_TENSORS)
        n_kv = r.count("metadata count", r.scalar(10), _MIN_KV, MAX_KV)
        metadata = {}
        for _ in range(n_kv):
            key = r.string("a metadata key", MAX_NAME)
            if key in metadata:
                raise GGUFError(f"{path}: metadata key {short(key)} appears twice")
            metadata[key] = r.value(r.scalar(4), key)
        infos = []
        for _ in range(n_tensors):
            name = r.string("a tensor name", MAX_NAME)
            n_dims = r.scalar(4)
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{path}: tensor {short(name)} has {n_dims} dimensions (1 to {MAX_DIMS} are possible)")
            dims = [r.scalar(10) for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), r.scalar(4), r.scalar(10)))
        align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(align) is not int or not 0 < align <= MAX_ALIGNMENT or align & (align - 1):
            raise GGUFError(f"{path}: general.alignment {short(align)} is not a power of two up to {MAX_ALIGNMENT}")
        start = -(-f.tell() // align) * align
    tensors = {}
    for name, shape, t, offset in infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {short(name)} appears twice")
        if t not in TYPES:
            raise GGUFError(f"{path}: tensor {short(name)} has ggml type {t}, which this reader does not support "
                            f"(supported: {', '.join(n for n, _, _ in TYPES.values())})")
        type_name, per_block, block_bytes = TYPES[t]
        if min(shape) < 1 or shape[-1] % per_block:
            raise GGUFError(f"{path}: tensor {short(name)} has shape {shape}: rows must be whole {type_name} blocks "
                            f"of {per_block} values")
        if offset % align:
            raise GGUFError(f"{path}: tensor {short(name)} starts at data offset {offset}, not a multiple of the "
                            f"alignment {align}")
        nbytes = math.prod(shape) // per_block * block_bytes   # Python ints: no overflow
        if start + offset + nbytes > size:
            raise GGUFError(f"{path}: truncated file: tensor {short(name)} ends at byte {start + offset + nbytes}, "
                            f"the file has {size}")
        tensors[name] = TensorInfo(name, shape, t, start + offset, nbytes)
    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.nbytes > b.offset:
            raise GGUFError(f"{path}: tensors {short(a.name)} and {short(b.name)} overlap (bytes {b.offset} to "
                            f"{min(a.offset + a.nbytes, b.offset + b.nbytes)} belong to both)")
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


# ----------------------------------------------------------------------------- llama and qwen2 files as HF checkpoints

# general.architecture -> the Hugging Face class; the two store the same tensors (qwen2 adds q/k/v biases)
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+: the divisor of each rotary frequency (read into the config)


def hf_name(name, path="GGUF file"):
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, `blk.3.attn_q.bias` -> `...q_proj.bias`."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if (len(parts) == 4 and parts[0] == "blk" and re.fullmatch(r"0|[1-9][0-9]{0,5}", parts[1])
            and parts[2] in _BLOCK and parts[3] in ("weight", "bias")):
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    raise GGUFError(f"{path}: tensor {short(name)} is not one of a Llama or Qwen2 model's (no Hugging Face name for it)")


# config.json field -> the GGUF metadata key it is read from, "{arch}" standing for general.architecture
# (model.py names the key in its errors)
CONFIG_KEYS = {"hidden_size": "{arch}.embedding_length", "intermediate_size": "{arch}.feed_forward_length",
               "num_hidden_layers": "{arch}.block_count", "num_attention_heads": "{arch}.attention.head_count",
               "num_key_value_heads": "{arch}.attention.head_count_kv", "head_dim": "{arch}.attention.key_length",
               "rope_theta": "{arch}.rope.freq_base", "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
               "max_position_embeddings": "{arch}.context_length", "vocab_size": "{arch}.vocab_size",
               "num_local_experts": "{arch}.expert_count", "bos_token_id": "tokenizer.ggml.bos_token_id",
               "eos_token_id": "tokenizer.ggml.eos_token_id", "pad_token_id": "tokenizer.ggml.padding_token_id"}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps")
_DEFAULTS = {"rope_theta": 10000.0, "max_position_embeddings": 4096}
MAX_ROPE_FREQS = 1 << 12  # values in rope_freqs.weight: head_dim / 2 (64 for Llama 3.1), read before any check


def config_keys(g):
    """CONFIG_KEYS for this file's architecture, plus where its RoPE scaling was read from: a scaling type
    (refused) or Llama 3.1's rope_freqs tensor."""
    arch = g.metadata.get("general.architecture")
    arch = arch if arch in ARCHS else "llama"
    scaling = f"{arch}.rope.scaling.type"
    return {**{k: v.format(arch=arch) for k, v in CONFIG_KEYS.items()},
            "rope_scaling": scaling if g.metadata.get(scaling, "none") != "none" or ROPE_FREQS not in g.tensors
            else ROPE_FREQS}


def config_dict(g):
    """A Hugging Face `config.json` dict for a `llama` (Llama, Mistral, SmolLM2 all are) or `qwen2` GGUF
    file. Values are passed on as the file holds them: `model.Config` checks their types and sizes, and
    refuses a RoPE scaling type or an expert count by name. Llama 3.1's RoPE scaling is no metadata key
    but the tensor rope_freqs.weight (llama.cpp's converter computes the divisor of each frequency from
    the four llama3 numbers of config.json): it goes into rope_scaling as {"rope_type": "llama3",
    "rope_freqs": [...]}, which model.rope_frequencies applies as llama.cpp does."""
    m = g.metadata
    arch = m.get("general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"{g.path}: architecture {short(arch)} is not supported (only 'llama' and 'qwen2' GGUF "
                        "files load)")
    keys = config_keys(g)
    d = {"architectures": [ARCHS[arch]], "model_type": arch}
    for field in CONFIG_KEYS:
        if keys[field] in m:
            d[field] = m[keys[field]]
        elif field in _REQUIRED:
            raise GGUFError(f"{g.path}: metadata lacks {keys[field]!r}")
        elif field in _DEFAULTS:
            d[field] = _DEFAULTS[field]
    # head size: key_length, else the rotary dimension, else (left out) hidden_size / heads
    rope_dim = m.get(f"{arch}.rope.dimension_count")
    d["head_dim"] = d.get("head_dim") or rope_dim
    if rope_dim is not None and rope_dim != d["head_dim"]:
        raise GGUFError(f"{g.path}: rope.dimension_count {short(rope_dim)} != head size {short(d['head_dim'])} "
                        "(partial rotary embeddings are not supported)")
    if not d.get("vocab_size"):
        tokens, embd = m.get("tokenizer.ggml.tokens"), g.tensors.get("token_embd.weight")
        d["vocab_size"] = len(tokens) if isinstance(tokens, list) and tokens else embd.shape[0] if embd else None
    if not d["vocab_size"]:
        raise GGUFError(f"{g.path}: no vocabulary size ({arch}.vocab_size, tokens or token_embd.weight)")
    d["tie_word_embeddings"] = "output.weight" not in g.tensors
    d["attention_bias"] = arch == "qwen2" or "blk.0.attn_q.bias" in g.tensors   # Llama: q, k, v and o
    d["torch_dtype"] = "float32"   # what the tensors dequantise to
    if m.get(keys["rope_scaling"], "none") != "none":  # linear, yarn, ...: Config.from_hf turns it down by name
        d["rope_scaling"] = {"rope_type": m[keys["rope_scaling"]]}
    elif arch == "llama" and ROPE_FREQS in g.tensors:  # (llama.cpp's qwen2 never reads one: unexpected there)
        info = g.tensors[ROPE_FREQS]
        if len(info.shape) != 1 or info.shape[0] > MAX_ROPE_FREQS:
            raise GGUFError(f"{g.path}: tensor {ROPE_FREQS!r} has shape {info.shape}, not (head_dim / 2,)")
        d["rope_scaling"] = {"rope_type": "llama3", "rope_freqs": g.tensor(ROPE_FREQS).tolist()}
    return d


def unpermute_qk(w, n_heads):
    """Undo llama.cpp's q/k row permutation: (n_heads * head_dim, ...) -> the same shape, in HF order.

    Hugging Face rotates the pair (i, i + head_dim/2) of each head; llama.cpp rotates adjacent rows
    (2i, 2i + 1), so its converter reorders each head's rows from [a0 a1 a2 a3 | b0 b1 b2 b3] to
    [a0 b0 a1 b1 a2 b2 a3 b3] (head_dim 8): w.reshape(n_heads, 2, head_dim/2, ...).swapaxes(1, 2).
    Here the reverse. It applies to a weight (rows, in) and to a bias (rows,) alike. For k_proj n_heads
    is the number of *key/value* heads: with GQA the two differ, and using the query head count would
    scramble k silently. Only `llama` files are permuted (LlamaModel.modify_tensors in llama.cpp's
    convert_hf_to_gguf.py); its Qwen2Model writes q and k as Hugging Face stores them.
    """
    rows, rest = w.shape[0], w.shape[1:]
    if type(n_heads) is not int or n_heads < 1 or rows % n_heads or rows // n_heads % 2:
        raise GGUFError(f"{rows} rows are not {short(n_heads)} heads of an even size")
    head_dim = rows // n_heads
    w = w.reshape(n_heads, head_dim // 2, 2, *rest)  # (heads, pair i, which of the pair, ...): GGUF order
    w = w.swapaxes(1, 2)                             # (heads, 2, head_dim/2, ...): first halves, then second
    return w.reshape(rows, *rest)                    # a copy, contiguous


def hf_tensors(g):
    """Yield (HF name, shape, read) for each tensor of a llama or qwen2 file, in file order, without
    reading any data: read() dequantises that one tensor to float32 numpy in Hugging Face layout.
    rope_freqs.weight of a llama file is not a weight: config_dict has read it."""
    c = config_dict(g)
    heads = {"q_proj": c["num_attention_heads"], "k_proj": c.get("num_key_value_heads") or c["num_attention_heads"]}
    llama = g.metadata.get("general.architecture") == "llama"
    for name, info in g.tensors.items():
        if llama and name == ROPE_FREQS:
            continue
        key = hf_name(name, g.path)
        n_heads = heads.get(key.split(".")[-2]) if llama else None

        def read(name=name, n_heads=n_heads):
            w = g.tensor(name)
            if n_heads is None:
                return w
            try:
                return unpermute_qk(w, n_heads)
            except GGUFError as e:
                raise GGUFError(f"{g.path}: tensor {name!r}: {e}") from None
        yield key, info.shape, read
