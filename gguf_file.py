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
"""
import os
import struct
from dataclasses import dataclass

import numpy as np

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


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message names the file and, where there is one, the tensor."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple      # PyTorch order (outermost first): a (out, in) weight is stored with dims (in, out)
    type: int         # ggml type id, see TYPES
    offset: int       # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self):
        return TYPES[self.type][0] if self.type in TYPES else f"type {self.type}"


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
