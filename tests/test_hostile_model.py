"""Hostile checkpoints (issue 29: nothing silently wrong, nothing unbounded): damaged or malicious GGUF
files, config.json and shard indexes are refused with one ModelError / GGUFError line naming the
file and the field or tensor, before anything large is allocated. One test per problem a probe found,
then a seeded fuzz over a few hundred mutated files in one memory-capped subprocess, then a few through
real command lines (exit status 2, one `error:` line)."""
import json
import math
import os
import random
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gguf_file
import model as M
from gguf_file import GGUFError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -------------------------------------------------------------------------- tiny files, written by hand

# one layer, hidden 8, 2 heads of 4 sharing 1 KV head, vocabulary 16, tied embeddings
HIDDEN, FFN, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 8, 16, 16, 2, 1, 4
GGUF_SHAPES = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,),
               "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
               "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
               "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
               "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM), "blk.0.ffn_norm.weight": (HIDDEN,),
               "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
               "blk.0.ffn_down.weight": (HIDDEN, FFN)}
HF_SHAPES = {gguf_file.hf_name(k): v for k, v in GGUF_SHAPES.items()}


def _s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


# metadata values as (type id, payload bytes)
def U32(v): return 4, struct.pack("<I", v)
def U64(v): return 10, struct.pack("<Q", v)
def F32(v): return 6, struct.pack("<f", v)
def STR(v): return 8, _s(v)
def ARR(item, n, payload): return 9, struct.pack("<IQ", item, n) + payload


def nested(depth):
    """An array of arrays of ... `depth` deep, the innermost holding one u32."""
    return 9, struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQI", 4, 1, 7)


BASE_META = {"general.architecture": STR("llama"), "llama.block_count": U32(1),
             "llama.embedding_length": U32(HIDDEN), "llama.feed_forward_length": U32(FFN),
             "llama.attention.head_count": U32(HEADS), "llama.attention.head_count_kv": U32(KV_HEADS),
             "llama.attention.layer_norm_rms_epsilon": F32(1e-5), "llama.rope.freq_base": F32(10000.0),
             "llama.context_length": U32(64), "llama.vocab_size": U32(VOCAB)}
# a byte-level BPE vocabulary, enough for tokenizer.py (eval.py loads the tokenizer before the model)
TOKENS = [chr(ord("a") + i) for i in range(VOCAB - 1)] + ["ab"]
TOKENIZER_META = {"tokenizer.ggml.model": STR("gpt2"), "tokenizer.ggml.pre": STR("gpt2"),
                  "tokenizer.ggml.tokens": ARR(8, VOCAB, b"".join(_s(t) for t in TOKENS)),
                  "tokenizer.ggml.token_type": ARR(5, VOCAB, struct.pack(f"<{VOCAB}i", *[1] * VOCAB)),
                  "tokenizer.ggml.merges": ARR(8, 1, _s("a b")),
                  "tokenizer.ggml.bos_token_id": U32(0), "tokenizer.ggml.eos_token_id": U32(1)}


def weights(seed=0):
    """{GGUF name: float32 array} of the tiny model (norms near 1, matrices small)."""
    rng = np.random.default_rng(seed)
    return {k: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.3 * rng.standard_normal(s)).astype(np.float32)
            for k, s in GGUF_SHAPES.items()}


def gguf_bytes(meta=None, tensors=None, offsets=None, n_tensors=None, n_kv=None, align=32):
    """A GGUF file: `meta` {key: (type, payload) or None to drop it} over BASE_META; `tensors`
    {name: (float32 array) or (shape, ggml type, raw bytes)} (or a list of such pairs); `offsets` {name: data offset} to
    place a tensor by hand (else each follows the last, aligned); counts as given, or the true ones."""
    meta = {k: v for k, v in {**BASE_META, **(meta or {})}.items() if v is not None}
    tensors = dict(weights()) if tensors is None else tensors
    tensors = list(tensors.items()) if isinstance(tensors, dict) else tensors   # a list may repeat a name
    kv = b"".join(_s(k) + struct.pack("<I", t) + payload for k, (t, payload) in meta.items())
    infos, placed, pos = b"", [], 0
    for name, t in tensors:
        shape, ggml_type, raw = (t.shape, 0, t.tobytes()) if isinstance(t, np.ndarray) else t
        offset = (offsets or {}).get(name, -(-pos // align) * align)
        infos += _s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
        infos += struct.pack("<IQ", ggml_type, offset)
        if offset < 1 << 24:  # a far-off offset stays a claim of the header: the file has no such bytes
            placed.append((offset, raw))
            pos = max(pos, offset + len(raw))
    data = bytearray(pos)
    for offset, raw in placed:
        data[offset:offset + len(raw)] = raw
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(meta) if n_kv is None else n_kv) + kv + infos
    return head.ljust(-(-len(head) // align) * align, b"\0") + bytes(data)


def write(path, content):
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


BASE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
               "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": 1,
               "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5,
               "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": True,
               "torch_dtype": "float32"}


def folder(path, config=None, tensors=None, index=None):
    """A Hugging Face folder: config.json (a dict, or raw bytes), model.safetensors of the tiny model's
    weights ({HF name: tensor} overrides, None drops), and a model.safetensors.index.json if given."""
    os.makedirs(path, exist_ok=True)
    heads = {"blk.0.attn_q.weight": HEADS, "blk.0.attn_k.weight": KV_HEADS}  # GGUF stores q/k permuted
    state = {gguf_file.hf_name(k): torch.from_numpy(gguf_file.unpermute_qk(v, heads[k]) if k in heads else v)
             for k, v in weights().items()}
    state = {k: v for k, v in {**state, **(tensors or {})}.items() if v is not None}
    save_file(state, os.path.join(path, "model.safetensors"))
    config = BASE_CONFIG if config is None else config
    write(os.path.join(path, "config.json"), config if isinstance(config, bytes) else json.dumps(config).encode())
    if index is not None:
        write(os.path.join(path, "model.safetensors.index.json"), index if isinstance(index, bytes) else
              json.dumps(index).encode())
    return str(path)


def refused(fn, *args, match=None, names=()):
    """fn(*args) must raise a ModelError or GGUFError of one line naming each of `names`."""
    with pytest.raises((M.ModelError, GGUFError)) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    for name in names:
        assert name in msg, msg
    if match:
        assert match in msg, msg
    return msg


def test_the_hand_written_files_load(tmp_path):
    """The baseline the mutations start from: both tiny files load, to the same model."""
    a = M.load_model(write(tmp_path / "t.gguf", gguf_bytes(TOKENIZER_META)))
    b = M.load_model(folder(tmp_path / "hf"))
    x = torch.tensor([[1, 2, 3, 15]])
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)
    assert torch.isfinite(a(x)).all()


# -------------------------------------------------------------------------- GGUF layout

def test_overlapping_tensors_are_refused(tmp_path):
    """Two tensors over the same bytes loaded (one weight read as another, non-finite logits)."""
    w = weights()
    path = write(tmp_path / "overlap.gguf", gguf_bytes(offsets={"blk.0.ffn_up.weight": 0}))
    refused(M.load_model, path, match="overlap", names=[path, "'token_embd.weight'", "'blk.0.ffn_up.weight'"])
    # a tensor that only starts inside another one is caught too
    half = len(w["token_embd.weight"].tobytes()) // 2 // 32 * 32
    path = write(tmp_path / "overlap2.gguf", gguf_bytes(offsets={"output_norm.weight": half}))
    refused(gguf_file.read, path, match="overlap")


@pytest.mark.parametrize("align", [48, 0, 3, 1 << 21, "STR", "ARR"])
def test_alignment_must_be_a_sane_power_of_two(tmp_path, align):
    value = STR("32") if align == "STR" else ARR(4, 1, struct.pack("<I", 32)) if align == "ARR" else U32(align)
    data = gguf_bytes({"general.alignment": value}, align=align if isinstance(align, int) and align else 32)
    path = write(tmp_path / "align.gguf", data)
    refused(M.load_model, path, match="general.alignment", names=[path])


def test_misaligned_offsets_and_bad_tensor_headers(tmp_path):
    path = write(tmp_path / "misaligned.gguf", gguf_bytes(offsets={"output_norm.weight": 4}))
    refused(gguf_file.read, path, match="not a multiple of the alignment", names=["'output_norm.weight'"])
    w = weights()
    norm = w["output_norm.weight"].tobytes()
    for name, extra, match in [("zero", ("extra", ((0, 8), 0, b"")), "shape (0, 8)"),
                               ("dims5", ("extra", ((1, 1, 1, 1, 8), 0, norm)), "5 dimensions"),
                               ("int64", ("extra", ((8,), 27, norm * 2)), "ggml type 27"),
                               ("twice", ("output_norm.weight", ((8,), 0, norm)), "appears twice")]:
        path = write(tmp_path / f"{name}.gguf", gguf_bytes(tensors=[*w.items(), extra]))
        refused(M.load_model, path, match=match, names=[path, repr(extra[0])])


# -------------------------------------------------------------------------- config values

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -1.0])
def test_rope_theta_and_eps_must_be_finite_and_positive(tmp_path, value):
    """NaN or infinite rope_theta was accepted from config.json and GGUF alike (NaN logits)."""
    for field, key in (("rope_theta", "llama.rope.freq_base"),
                       ("rms_norm_eps", "llama.attention.layer_norm_rms_epsilon")):
        d = folder(tmp_path / f"hf-{field}", {**BASE_CONFIG, field: value})   # json writes NaN / Infinity
        refused(M.load_config, d, names=[os.path.join(d, "config.json"), repr(field)])
        path = write(tmp_path / f"{field}.gguf", gguf_bytes({key: F32(value)}))
        refused(M.load_model, path, names=[path, repr(field), repr(key)])
    d = folder(tmp_path / "nested", {**BASE_CONFIG, "rope_theta": None, "rope_parameters": {"rope_theta": value}})
    refused(M.load_config, d, names=["'rope_theta'"])


def test_integer_weights_are_refused_by_name(tmp_path):
    """An int64 (or int32, bool, uint8) tensor was cast to float silently."""
    for dtype in (torch.int64, torch.int32, torch.bool, torch.uint8):
        t = torch.ones(FFN, HIDDEN, dtype=dtype)
        d = folder(tmp_path / str(dtype), tensors={"model.layers.0.mlp.up_proj.weight": t})
        msg = refused(M.load_model, d, names=["model.safetensors", "'model.layers.0.mlp.up_proj.weight'"])
        assert "not as floating-point weights" in msg
    # float16 / bfloat16 / float64 are weights: they load
    d = folder(tmp_path / "f16", tensors={"model.layers.0.mlp.up_proj.weight": torch.zeros(FFN, HIDDEN).half()})
    assert M.load_model(d).model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_a_huge_layer_count_builds_nothing(tmp_path, monkeypatch):
    """block_count 1e8 in a 350 KB GGUF (or num_hidden_layers 1e8) built layers before any check."""
    path = write(tmp_path / "layers.gguf", gguf_bytes({"llama.block_count": U32(10 ** 8)}))
    refused(M.load_model, path, names=[path, "'num_hidden_layers'", "'llama.block_count'", "1024"])
    d = folder(tmp_path / "hf", {**BASE_CONFIG, "num_hidden_layers": 10 ** 8})
    refused(M.load_model, d, names=["config.json", "'num_hidden_layers'"])
    # within the caps but not what the weights hold: refused from the tensor names, before a layer is built
    built = []
    monkeypatch.setattr(M, "Transformer", lambda c: built.append(c) or pytest.fail("built a model"))
    path = write(tmp_path / "layers3.gguf", gguf_bytes({"llama.block_count": U32(1000)}))
    refused(M.load_model, path, match="llama.block_count 1000, but the weights hold 1 layers", names=[path])
    d = folder(tmp_path / "hf3", {**BASE_CONFIG, "num_hidden_layers": 3})
    refused(M.load_model, d, match="num_hidden_layers 3, but the weights hold 1 layers")
    d = folder(tmp_path / "hidden", {**BASE_CONFIG, "hidden_size": 4096, "intermediate_size": 65536})
    refused(M.load_model, d, match="has shape (16, 8), but the config says vocab_size 16 and hidden_size 4096")
    assert not built


@pytest.mark.parametrize("field,value", [
    ("num_hidden_layers", 1025), ("hidden_size", 1 << 17), ("vocab_size", (1 << 24) + 1),
    ("num_attention_heads", 4096), ("intermediate_size", 1 << 21), ("max_position_embeddings", 1 << 30),
    ("head_dim", 3), ("num_key_value_heads", 3), ("eos_token_id", [1, 1 << 40]), ("eos_token_id", []), ("bos_token_id", 1 << 40),
    ("rms_norm_eps", 10 ** 400), ("rope_theta", 10 ** 400), ("torch_dtype", 32)])
def test_sizes_past_their_caps_are_named(tmp_path, field, value):
    d = folder(tmp_path / "hf", {**BASE_CONFIG, field: value})
    refused(M.load_config, d, names=["config.json", field])


def test_every_real_config_passes_the_caps():
    fixtures = "/work/shared/fixtures/configs"
    paths = [os.path.join(fixtures, f) for f in sorted(os.listdir(fixtures)) if f.endswith(".json")] \
        if os.path.isdir(fixtures) else []
    paths += [os.path.join(ROOT, "tests", "fixtures", f) for f in os.listdir(os.path.join(ROOT, "tests", "fixtures"))]
    assert paths
    for path in paths:
        d = json.load(open(path))
        c = M.Config.from_hf(d)                       # Llama-3.1's llama3 scaling and Qwen2 included
        assert c.n_layers == d["num_hidden_layers"] and c.vocab_size == d["vocab_size"], path


# -------------------------------------------------------------------------- GGUF header lengths and counts

BIG = [1 << 63, (1 << 64) - 1, 1 << 40]


def _header(n_tensors, n_kv, rest=b""):
    """A header, padded so that the counts fit and the length under test is the one refused."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + rest + b"\0" * 64


def _gguf_headers():
    """(name, file bytes, what the error says) for each length or count a header can overstate."""
    info = lambda n_dims, dims, t=0, off=0: _s("w") + struct.pack("<I", n_dims) + b"".join(
        struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", t, off)
    cases = []
    for big in BIG:
        cases += [(f"tensors{big}", _header(big, 0), "tensor count"), (f"kv{big}", _header(0, big), "metadata count"),
                  (f"key{big}", _header(0, 1, struct.pack("<Q", big)), "metadata key"),
                  (f"value{big}", _header(0, 1, _s("k") + struct.pack("<IQ", 8, big)), "value of 'k'"),
                  (f"u32s{big}", _header(0, 1, _s("k") + struct.pack("<IIQ", 9, 4, big)), "array length of 'k'"),
                  (f"strs{big}", _header(0, 1, _s("k") + struct.pack("<IIQ", 9, 8, big)), "array length of 'k'"),
                  (f"arrs{big}", _header(0, 1, _s("k") + struct.pack("<IIQ", 9, 9, big)), "array length of 'k'"),
                  (f"name{big}", _header(1, 0, struct.pack("<Q", big)), "tensor name"),
                  (f"dim{big}", _header(1, 0, info(2, [big, big])), "truncated file"),
                  (f"offset{big}", _header(1, 0, info(1, [8], off=big & ~31)), "truncated file")]
    cases += [("ndims", _header(1, 0, info(0xFFFFFFFF, [])), "dimensions"),
              ("tensors-fit", _header(60000, 0, b"\0" * 1000), "truncated header"),
              ("item-type", _header(0, 1, _s("k") + struct.pack("<IIQ", 9, 77, 1)), "unknown value type 77"),
              ("value-type", _header(0, 1, _s("k") + struct.pack("<I", 77)), "unknown value type 77"),
              ("utf8", _header(0, 1, _s(b"\xff\xfe") + struct.pack("<IB", 0, 1)), "not UTF-8")]
    return cases


@pytest.mark.parametrize("name,data,match", _gguf_headers(), ids=[c[0] for c in _gguf_headers()])
def test_oversized_lengths_and_counts_are_refused_before_allocating(tmp_path, name, data, match):
    """Such headers raised MemoryError or OverflowError (or allocated gigabytes) instead of one line."""
    path = write(tmp_path / f"{name}.gguf", data)
    t = time.perf_counter()
    refused(M.load_model, path, match=match, names=[path])
    assert time.perf_counter() - t < 1


def test_nested_arrays_are_capped(tmp_path):
    """Arrays of arrays 10^5 deep raised RecursionError; now anything past MAX_DEPTH is one line."""
    ok = write(tmp_path / "deep4.gguf", gguf_bytes({"x.nested": nested(gguf_file.MAX_DEPTH)}))
    value = gguf_file.read(ok).metadata["x.nested"]  # three lists around a numeric array (array.array)
    assert len(value) == len(value[0]) == len(value[0][0]) == 1 and list(value[0][0][0]) == [7]
    for depth in (gguf_file.MAX_DEPTH + 1, 100_000):
        path = write(tmp_path / f"deep{depth}.gguf", gguf_bytes({"x.nested": nested(depth)}))
        refused(M.load_model, path, match="nests arrays more than 4 deep", names=[path, "'x.nested'"])


def _peak_mb(fn, *args):
    """Peak memory Python allocated (numpy included) while fn(*args) ran, in MB; fn's exceptions pass."""
    tracemalloc.start()
    try:
        fn(*args)
    except GGUFError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return peak


def test_metadata_arrays_are_bounded(tmp_path):
    """A 64 MB int8 array took 8-36x its size as a list of Python ints; now metadata arrays hold at
    most MAX_ITEMS items in all (refused before reading them), and a real-sized vocabulary costs little."""
    n = 64 << 20
    path = write(tmp_path / "big-array.gguf", _header(0, 1, _s("x.big") + struct.pack("<IIQ", 9, 1, n)))
    os.truncate(path, os.path.getsize(path) + n)    # sparse: n bytes of items, no disk space
    refused(gguf_file.read, path, match=f"more than {gguf_file.MAX_ITEMS} items", names=[path, "'x.big'"])
    assert _peak_mb(gguf_file.read, path) < 1
    # a 262k-token vocabulary's scores, types and tokens (Gemma-sized) is well inside the cap (~26 MB
    # of Python objects for a 5.6 MB file, measured with _peak_mb; too slow under tracemalloc to repeat here)
    v = 262_144
    meta = {"tokenizer.ggml.scores": ARR(6, v, np.arange(v, dtype="<f4").tobytes()),
            "tokenizer.ggml.token_type": ARR(5, v, np.full(v, 1, "<i4").tobytes()),
            "tokenizer.ggml.tokens": ARR(8, v, b"".join(_s(f"t{i}") for i in range(v)))}
    path = write(tmp_path / "vocab.gguf", gguf_bytes(meta))
    md = gguf_file.read(path).metadata
    assert md["tokenizer.ggml.scores"][-1] == v - 1 and len(md["tokenizer.ggml.tokens"]) == v


def test_numeric_metadata_arrays_take_their_size_in_memory(tmp_path):
    """Numeric arrays (token scores and types) took ~9x their bytes in the file as lists of Python
    numbers; they are array.array now: about their size in the file (numpy's read buffer included)."""
    v = 1 << 20
    meta = {"tokenizer.ggml.scores": ARR(6, v, np.arange(v, dtype="<f4").tobytes()),
            "tokenizer.ggml.token_type": ARR(5, v, np.full(v, 1, "<i4").tobytes())}
    path = write(tmp_path / "numbers.gguf", gguf_bytes(meta))
    assert _peak_mb(gguf_file.read, path) < 3 * 8 * v / 2**20  # 8 MB of numbers in the file
    md = gguf_file.read(path).metadata
    assert md["tokenizer.ggml.scores"][12345] == 12345.0 and md["tokenizer.ggml.token_type"][-1] == 1


# -------------------------------------------------------------------------- config.json and the shard index

DEEP = b"[" * 100_000 + b"]" * 100_000
NOT_UTF8 = b'{"model_type": "llama\xff\xfe"}'
DIGITS = b'{"vocab_size": ' + b"7" * 5000 + b"}"


@pytest.mark.parametrize("content,match", [
    (DEEP, "not valid JSON"), (b'{"x": ' + DEEP + b"}", "not valid JSON"), (NOT_UTF8, "not valid JSON"),
    (DIGITS, "not valid JSON"), (b"[1, 2]", "expected a JSON object"), (b"null", "expected a JSON object"),
    (b'"config"', "expected a JSON object"), (b"", "not valid JSON")], ids=lambda x: str(x)[:20])
def test_config_json_that_is_not_a_config(tmp_path, content, match):
    """Deep nesting (RecursionError), non-UTF-8 bytes, a 5000-digit integer (ValueError) or a list were
    tracebacks."""
    d = folder(tmp_path / "hf", content)
    refused(M.load_model, d, match=match, names=[os.path.join(d, "config.json")])


@pytest.mark.parametrize("field,value", [
    ("num_hidden_layers", "x"), ("num_hidden_layers", None), ("hidden_size", [8]), ("vocab_size", {"n": 16}),
    ("intermediate_size", 16.0), ("num_attention_heads", True), ("architectures", "LlamaForCausalLM"),
    ("architectures", [5]), ("architectures", {"a": 1}), ("model_type", ["llama"]), ("rope_scaling", [1]),
    ("rope_parameters", "x"), ("tie_word_embeddings", "yes"), ("rope_theta", "1e4"), ("rms_norm_eps", [1e-5]),
    ("pad_token_id", "0"), ("sliding_window", "4096")])
def test_wrong_json_types_are_named(tmp_path, field, value):
    """"num_hidden_layers": "x", a list or null where a number belongs: one line naming file and field."""
    config = {**BASE_CONFIG, field: value}
    if field == "sliding_window":
        config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    d = folder(tmp_path / "hf", config)
    refused(M.load_model, d, names=[os.path.join(d, "config.json"), repr(field)])


@pytest.mark.parametrize("content", [b"[]", b"null", b'{"weight_map": []}', b'{"weight_map": null}', b"{}",
                                     b'{"weight_map": {"a": 5}}', DEEP, NOT_UTF8, DIGITS, b"\x00\x01"],
                         ids=lambda x: str(x)[:20])
def test_shard_index_that_is_not_an_index(tmp_path, content):
    d = folder(tmp_path / "hf", index=content)
    refused(M.load_model, d, names=[os.path.join(d, "model.safetensors.index.json")])


def test_a_huge_config_json_is_not_read(tmp_path):
    d = folder(tmp_path / "hf")
    with open(os.path.join(d, "config.json"), "ab") as f:
        f.truncate(M.MAX_JSON_BYTES + 1)   # sparse: no disk space used
    refused(M.load_config, d, match="more than a config.json can be", names=["config.json"])


# -------------------------------------------------------------------------- fuzz

HOSTILE_META = [STR("x"), STR(""), U32(0), U32(10 ** 8), U32(0xFFFFFFFF), U64(1 << 63), F32(math.nan), F32(math.inf),
                F32(-1.0), F32(1e30), (7, b"\x01"), (12, struct.pack("<d", 1e300)), (11, struct.pack("<q", -5)),
                ARR(4, 2, struct.pack("<II", 1, 2)), ARR(8, 1, _s("x")), ARR(6, 0, b""), nested(3), nested(9), None]
HOSTILE_JSON = ["x", None, [], {}, [1], True, False, -1, 0, 2.5, 1e308, math.nan, math.inf, 10 ** 30, 2 ** 63,
                1025, 65537, "LlamaForCausalLM", "__RAW__DEEP", "__RAW__DIGITS", "__RAW__BIGINT"]
RAW = {'"__RAW__DEEP"': DEEP[:4000] + DEEP[-4000:], '"__RAW__DIGITS"': b"9" * 5000, '"__RAW__BIGINT"': b"9" * 400}
CONFIG_FIELDS = [*BASE_CONFIG, "head_dim", "sliding_window", "rope_parameters", "rope_scaling", "bos_token_id",
                 "eos_token_id", "pad_token_id", "hidden_act", "dtype"]
SPECIAL = [0, 1, 0xFFFFFFFF, 1 << 31, 1 << 63, (1 << 64) - 1, 10 ** 8, 1 << 40]


def _gguf_case(rng, base, header_end):
    kind = rng.choice(["flip", "number", "truncate", "splice", "meta", "tensor", "data"])
    b = bytearray(base)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(header_end)] = rng.randrange(256)
    elif kind == "number":
        width = rng.choice([4, 8])
        v = rng.choice(SPECIAL + [rng.getrandbits(64)]) & ((1 << 8 * width) - 1)
        at = rng.randrange(header_end - width)
        b[at:at + width] = v.to_bytes(width, "little")
    elif kind == "truncate":
        del b[rng.randrange(len(b)):]
    elif kind == "splice":
        at, n = rng.randrange(header_end), rng.randint(1, 64)
        b[at:at] = bytes(b[at:at + n]) if rng.random() < 0.5 else b""
        if rng.random() < 0.5:
            del b[at:at + n]
    elif kind == "meta":
        key = rng.choice([*BASE_META, *TOKENIZER_META, "general.alignment"])
        b = gguf_bytes({**TOKENIZER_META, key: rng.choice(HOSTILE_META)})
    elif kind == "tensor":
        w = list(weights().items())
        i = rng.randrange(len(w))
        name, a = w[i]
        shape = rng.choice([a.shape, a.shape[::-1], (a.size * 2,), (a.size // 2,), (1 << 40, 8), (3, 3, 3, 3)])
        t = (shape, rng.choice([0, 0, 1, 2, 8, 27, 6, 99]), a.tobytes())
        names = [name, name, "blk.1." + name[6:], "blk.99999999.attn_q.weight", "x" * 300, "blk.٣.attn_q.weight"]
        w[i] = (rng.choice(names), t)
        offsets = {w[i][0]: rng.choice([0, 4, 32, 1 << 40])} if rng.random() < 0.3 else None
        b = gguf_bytes(TOKENIZER_META, tensors=w, offsets=offsets)
    else:  # data: the weights change, the file still loads
        for _ in range(8):
            b[rng.randrange(header_end, len(b))] = rng.randrange(256)
    return kind, bytes(b)


def _json_case(rng):
    kind = rng.choice(["field", "field", "drop", "whole", "text"])
    d = dict(BASE_CONFIG)
    if kind == "field":
        for _ in range(rng.randint(1, 2)):
            d[rng.choice(CONFIG_FIELDS)] = rng.choice(HOSTILE_JSON)
    elif kind == "drop":
        del d[rng.choice(list(d))]
    elif kind == "whole":
        return kind, rng.choice([b"[]", b"null", b'"x"', b"5", DEEP, NOT_UTF8, DIGITS, b"", rng.randbytes(64)])
    text = json.dumps(d).encode()
    for placeholder, raw in RAW.items():
        text = text.replace(placeholder.encode(), raw)
    if kind == "text":
        text = bytearray(text)
        for _ in range(rng.randint(1, 5)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        text = bytes(text[:rng.randint(1, len(text))] if rng.random() < 0.3 else text)
    return kind, text


def _index_case(rng):
    weight_map = {k: "model.safetensors" for k in HF_SHAPES}
    weight_map[rng.choice(list(weight_map))] = rng.choice(HOSTILE_JSON[:12] + ["../x", "/etc/passwd", "nope"])
    whole = rng.choice([None, None, b"[]", b"null", b"{}", DEEP, NOT_UTF8, DIGITS, b'{"weight_map": 5}'])
    return "index", whole if whole is not None else json.dumps({"weight_map": weight_map}).encode()


def fuzz(workdir, n_gguf, n_json, seed=0):
    """Load n_gguf mutated GGUF files and n_json mutated config.json / index / safetensors folders.
    Returns {"cases", "loaded", "refused", "bad": [what escaped], "max_s", "seconds"}."""
    rng = random.Random(seed)
    base = gguf_bytes(TOKENIZER_META)
    header_end = min(t.offset for t in gguf_file.read(write(os.path.join(workdir, "base.gguf"), base)).tensors.values())
    hf = folder(os.path.join(workdir, "hf"))
    shard = open(os.path.join(hf, "model.safetensors"), "rb").read()
    cases = [("gguf",) + _gguf_case(rng, base, header_end) for _ in range(n_gguf)]
    for i in range(n_json):
        r = rng.random()
        cases.append(("index",) + _index_case(rng) if r < 0.2 else
                     ("shard", "shard", bytes(x if rng.random() > 0.02 else rng.randrange(256) for x in shard[:400])
                      + shard[400:]) if r < 0.3 else ("config",) + _json_case(rng))
    out = {"cases": len(cases), "loaded": 0, "refused": 0, "bad": [], "max_s": 0.0}
    start = time.perf_counter()
    for i, (what, kind, data) in enumerate(cases):
        if what == "gguf":
            path = write(os.path.join(workdir, f"case{i}.gguf"), data)
        else:
            path = hf
            write(os.path.join(hf, {"config": "config.json", "index": "model.safetensors.index.json",
                                    "shard": "model.safetensors"}[what]), data)
        t = time.perf_counter()
        try:
            c = M.load_model(path).config
            out["loaded"] += 1
            if not (math.isfinite(c.rope_theta) and math.isfinite(c.norm_eps) and c.rope_theta > 0 < c.norm_eps):
                out["bad"].append(f"case {i} ({what}/{kind}): loaded with rope_theta {c.rope_theta}, eps {c.norm_eps}")
        except (M.ModelError, GGUFError, OSError) as e:
            out["refused"] += 1
            if "\n" in str(e) or not str(e):
                out["bad"].append(f"case {i} ({what}/{kind}): message of {str(e).count(chr(10)) + 1} lines: {e}")
        except BaseException as e:  # noqa: B036 (what the test is looking for: anything else, even a panic)
            out["bad"].append(f"case {i} ({what}/{kind}): {type(e).__name__}: {str(e)[:200]}")
        if time.perf_counter() - t > out["max_s"]:
            out["max_s"], out["slowest"] = time.perf_counter() - t, f"case {i} ({what}/{kind})"
        if what == "gguf":
            os.remove(path)
        else:  # back to the good folder
            write(os.path.join(hf, "config.json"), json.dumps(BASE_CONFIG).encode())
            write(os.path.join(hf, "model.safetensors"), shard)
            if os.path.exists(os.path.join(hf, "model.safetensors.index.json")):
                os.remove(os.path.join(hf, "model.safetensors.index.json"))
    out["seconds"] = time.perf_counter() - start
    return out


FUZZ = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))   # a runaway allocation fails fast
sys.path.insert(0, "tests")
import test_hostile_model as T
out = T.fuzz(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
# this process's peak RSS: VmHWM, since Linux carries ru_maxrss over from the parent (pytest) through exec
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")] if sys.platform == "linux" else []
out["max_rss_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def test_fuzz_only_one_line_errors_escape_and_memory_stays_bounded(tmp_path):
    """Hundreds of mutated GGUF files, config.json, shard indexes and safetensors headers (byte flips,
    truncations, huge numbers, wrong types, deep nesting; seeded): each loads or is refused with one
    ModelError/GGUFError/OSError line, fast, under a 3 GB address-space limit and a 1 GB peak RSS."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path), "500", "300", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    print(f"fuzz: {out['cases']} cases, {out['loaded']} loaded, {out['refused']} refused in {out['seconds']:.1f} s "
          f"(slowest {out['max_s'] * 1000:.0f} ms, {out['slowest']}), peak RSS {out['max_rss_mb']:.0f} MB, "
          f"{time.perf_counter() - t:.1f} s with start-up")
    assert not out["bad"], "\n".join(out["bad"][:20])
    assert out["refused"] > out["cases"] // 2 and out["loaded"] > 0
    assert out["max_s"] < 2 and out["max_rss_mb"] < 1024


# -------------------------------------------------------------------------- through real command lines

def test_commands_print_one_error_line_and_exit_2(tmp_path):
    """eval.py and train.py on hostile files: exit status 2 and exactly one stderr line, `error: ...`
    (run side by side: each is a fresh interpreter importing torch)."""
    data = write(tmp_path / "d.jsonl", b"{}\n")
    out = str(tmp_path / "out")
    gguf = lambda name, **kw: write(tmp_path / name, gguf_bytes({**TOKENIZER_META, **kw.pop("meta", {})}, **kw))
    count = write(tmp_path / "count.gguf", _header(0, 1, _s("k") + struct.pack("<IIQ", 9, 4, 1 << 62)))
    cases = {  # argv -> what the line says
        ("eval.py", "--model", gguf("layers.gguf", meta={"llama.block_count": U32(10 ** 8)})): "'llama.block_count'",
        ("eval.py", "--model", gguf("rope.gguf", meta={"llama.rope.freq_base": F32(math.nan)})): "'rope_theta'",
        ("eval.py", "--model", gguf("overlap.gguf", offsets={"blk.0.ffn_up.weight": 0})): "overlap",
        ("eval.py", "--model", count): "array length of 'k'",
        ("train.py", "--out", out, "--model", folder(tmp_path / "utf8", NOT_UTF8)): "not valid JSON",
        ("train.py", "--out", out, "--model", folder(tmp_path / "deep", DEEP)): "not valid JSON",
        ("train.py", "--out", out, "--model", folder(tmp_path / "x", {**BASE_CONFIG, "num_hidden_layers": "x"})):
            "'num_hidden_layers'",
    }
    procs = {argv: subprocess.Popen([sys.executable, *argv, "--data", data], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for argv in cases}
    for argv, p in procs.items():
        _, err = p.communicate(timeout=60)
        lines = err.splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, p.returncode, err)
        assert cases[argv] in lines[0] and argv[-1] in lines[0], (argv, lines[0])
    assert not os.path.exists(out)
