"""The bases people fine-tune today, model half: tiny random checkpoints shaped like Llama-3.1 (RoPE
scaling "llama3", positions past original_max_position_embeddings), Llama-3.2 (tied embeddings), Qwen2
(q/k/v biases, GQA) and a Llama with attention_bias, against transformers: read from config.json in both
styles and from GGUF files written as llama.cpp's converter writes them; NF4 loads against bitsandbytes;
LoRA adapters trained here and in PEFT, loaded the other way; the two new presets' published counts;
what is not implemented refused in one line naming the field. Nothing is downloaded."""
import json
import math
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lora as L
import model as M
import quant as Q
import train
from test_gguf import add_hparams

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
V = 128
# 96 positions: past original_max_position_embeddings (64) of the llama3-scaled families
TOKENS = torch.randint(0, V, (2, 96), generator=torch.Generator().manual_seed(0))
# head_dim 16 and theta 10^4 give wavelengths 6.3, 20, 63, 199, ...: with original_max_position_embeddings
# 64 and high/low_freq_factor 4/1 (kept below 16, stretched above 64), each of the three bands holds some
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
FAMILIES = {  # name: (transformers config class, its arguments beyond the common ones)
    "llama3.1": ("LlamaConfig", dict(rope_scaling=LLAMA3)),
    "llama3.2": ("LlamaConfig", dict(rope_scaling={**LLAMA3, "factor": 32.0}, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1e6)),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True)),
}


def hf_model(family, seed=0):
    """A random transformers model of the family: 2 layers, 4 query heads sharing 2 KV heads, random norm
    weights and biases (their default init, ones and zeros, would hide a misplaced one). Every layer's
    input size is a multiple of 64: bitsandbytes 0.50.2's CPU dequantize_4bit (its AVX-512 path) gets a
    (64, 96) weight wrong, from the same codes and scales (a (64, 128) one right)."""
    cls, kw = FAMILIES[family]
    kw = {k: dict(v) if isinstance(v, dict) else v for k, v in kw.items()}   # (transformers edits rope dicts)
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**{"rope_theta": 1e4, **kw}, vocab_size=V, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    hf = getattr(transformers, cls.replace("Config", "ForCausalLM"))(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return hf


def old_style(src, dst):
    """The same checkpoint with the config.json of transformers 4.x: top-level rope_theta, rope_scaling,
    torch_dtype (transformers 5 writes rope_parameters and dtype)."""
    shutil.copytree(src, dst)
    d = json.load(open(os.path.join(src, "config.json")))
    assert "rope_parameters" in d and "dtype" in d and "rope_theta" not in d   # what the new style looks like
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] != "default":
        d["rope_scaling"] = rope
    d["torch_dtype"] = d.pop("dtype")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(d, f)
    return str(dst)


def permute(w, n_heads):
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py): q/k rows of each head from HF's half
    rotation to adjacent pairs; a weight (rows, in) or a bias (rows,)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(c):
    """rope_freqs.weight as LlamaModel.generate_extra_tensors computes it: per frequency the divisor
    1, factor, or 1 / ((1 - smooth) / factor + smooth) between, in float32 tensor arithmetic. (It reads
    original_max_position_embeddings from the top level of config.json, default 8192, the value every
    published Llama 3.x nests in rope_scaling; here it is passed as the rope parameters give it.)"""
    p = c.rope_parameters
    dim = c.head_dim
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high, old = (p[k] for k in M.LLAMA3)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def write_gguf(hf, path, meta=None, rope_freqs=True, extra=None):
    """A transformers model written as llama.cpp's convert_hf_to_gguf.py writes it: the tensor names of
    the gguf package's map for the architecture; for `llama` (LlamaModel) q and k rows (weights and
    biases) permuted, rope_freqs.weight for llama3 scaling, key/value length, vocab size and rotary
    dimension; for `qwen2` (Qwen2Model: no modify_tensors of its own) q and k as they are, and the
    base TextModel's keys only. Norms and biases stay F32; matrices F32 here."""
    c = hf.config
    arch = "qwen2" if c.model_type == "qwen2" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    add_hparams(w, c)
    if arch == "llama":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.head_dim)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    for key, value in (meta or {}).items():   # GGUFWriter.add_<key>(value)
        getattr(w, f"add_{key}")(value)
    if rope_freqs is True and c.rope_parameters["rope_type"] == "llama3":
        rope_freqs = llama_cpp_rope_freqs(c)
    if rope_freqs is not True and rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                     c.num_hidden_layers)
    state = hf.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight")
    for key, t in state.items():
        a = t.detach().float().numpy()
        if arch == "llama" and ".q_proj." in key:
            a = permute(a, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in key:
            a = permute(a, c.num_key_value_heads)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), a)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


class Family:
    def __init__(self, name, hf, new, old, gguf):
        self.name, self.hf, self.new, self.old, self.gguf = name, hf, new, old, gguf


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = hf_model(request.param)
    hf.save_pretrained(d / "new")
    return Family(request.param, hf, str(d / "new"), old_style(d / "new", d / "old"), write_gguf(hf, d / "f.gguf"))


def logits(model, x=TOKENS):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out).float()


def max_diff(a, b):
    return (a - b).abs().max().item()


# -------------------------------------------------------------------------- folders, both config.json styles

def test_both_config_styles_load_to_transformers_logits(fam):
    a, b = M.load_config(fam.new), M.load_config(fam.old)
    assert a == M.Config(**{**vars(b), "name": a.name})
    assert a.arch == ("qwen2" if fam.name == "qwen2" else "llama")
    assert a.attention_bias == (fam.name in ("qwen2", "llama-bias")) and a.tie_word_embeddings == (fam.name == "llama3.2")
    assert (a.rope_scaling or {}).get("rope_type", "default") == fam.hf.config.rope_parameters["rope_type"]
    ref = logits(fam.hf)
    for path in (fam.new, fam.old):
        ours = M.load_model(path)
        diff = max_diff(logits(ours), ref)
        print(f"{fam.name} ({os.path.basename(path)} config.json): max |logit diff| vs transformers {diff:.1e}")
        assert diff <= 1e-4
    attn = ours.model.layers[1].self_attn
    assert (attn.q_proj.bias is not None, attn.o_proj.bias is not None) == \
        {"qwen2": (True, False), "llama-bias": (True, True)}.get(fam.name, (False, False))
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == ours.config.tie_word_embeddings
    # piece by piece: the rotary frequencies are transformers' own
    torch.testing.assert_close(M.rope_frequencies(ours.config), fam.hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    if ours.config.rope_scaling:  # and the scaling is not a no-op on these positions
        ours.config.rope_scaling = None
        assert max_diff(logits(ours), ref) > 1e-3


def test_llama3_frequency_bands():
    """The three bands of Llama 3's rule, each non-empty with this test's sizes: wavelengths below
    original/high_freq_factor kept, above original/low_freq_factor stretched `factor` times, blended between."""
    c = M.Config(vocab_size=V, hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4, rope_scaling=LLAMA3)
    base, scaled = M.rope_frequencies(M.Config(**{**vars(c), "rope_scaling": None})), M.rope_frequencies(c)
    ratio, wavelen = (base / scaled).tolist(), (2 * math.pi / base).tolist()
    bands = [r for r, w in zip(ratio, wavelen) if w < 16], [r for r, w in zip(ratio, wavelen) if 16 <= w <= 64], \
        [r for r, w in zip(ratio, wavelen) if w > 64]
    assert all(bands) and bands[0] == [1.0] * len(bands[0]) and bands[2] == pytest.approx([8.0] * len(bands[2]))
    assert all(1 < r < 8 for r in bands[1])


# -------------------------------------------------------------------------- GGUF files

def test_gguf_loads_to_transformers_logits(fam):
    g = M.gguf_file.read(fam.gguf)
    folder, ours = M.load_config(fam.new), M.load_model(fam.gguf)
    c = ours.config
    skip = ("name", "rope_scaling", "torch_dtype", "norm_eps")
    assert {k: v for k, v in vars(c).items() if k not in skip} == {k: v for k, v in vars(folder).items() if k not in skip}
    assert c.norm_eps == pytest.approx(folder.norm_eps, rel=1e-6)               # stored as f32 in GGUF
    if folder.rope_scaling:  # read from rope_freqs.weight, applied as llama.cpp applies it: frequency / factor
        assert list(c.rope_scaling) == ["rope_type", "rope_freqs"] and "rope_freqs.weight" in g.tensors
        torch.testing.assert_close(M.rope_frequencies(c), M.rope_frequencies(folder), rtol=1e-6, atol=0)
    # the test does what the converter does: llama files hold q (and its bias) permuted, qwen2 files do not
    q = fam.hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(g.tensor("blk.0.attn_q.weight"), q) == (fam.name == "qwen2")
    diff = max_diff(logits(ours), logits(fam.hf))
    print(f"{fam.name} GGUF: max |logit diff| vs transformers {diff:.1e}")
    assert diff <= 1e-4
    plain = M.load_model(fam.new).state_dict()
    for key, t in ours.state_dict().items():   # every tensor, biases included, comes back as in the folder
        assert torch.equal(t, plain[key]), key


# -------------------------------------------------------------------------- NF4 against bitsandbytes

def test_nf4_matches_bitsandbytes(fam):
    from test_quant import hf_nf4   # transformers + bitsandbytes, computing in fp32 on every CPU
    ours, hf = M.load_model(fam.new, dtype="float32", quantize="nf4"), hf_nf4(fam.new)
    theirs = dict(hf.named_modules())
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, Q.NF4Linear)}
    assert len(layers) == 2 * 7
    for name, m in layers.items():
        assert torch.equal(m.codes, theirs[name].weight.data.view(-1)), name
        if theirs[name].bias is None:
            assert m.bias is None, name
        else:   # the bias stays in the base layer's dtype, unquantised
            assert m.bias.dtype == torch.float32 and torch.equal(m.bias, theirs[name].bias.data), name
    diff = max_diff(logits(ours), logits(hf))
    print(f"{fam.name} NF4: max |logit diff| vs bitsandbytes {diff:.1e}")
    assert diff <= 1e-4
    assert max_diff(logits(M.load_model(fam.gguf, quantize="nf4")), logits(ours)) <= 1e-4   # the GGUF file alike
    assert ours.n_params() == M.load_model(fam.new).n_params()                    # biases counted too
    if fam.name == "qwen2":
        bf16 = M.load_model(fam.new, dtype="bfloat16", quantize="nf4").model.layers[0].self_attn.q_proj
        assert bf16.bias.dtype == torch.bfloat16 and isinstance(bf16, Q.NF4Linear)


# -------------------------------------------------------------------------- LoRA, trained here and in PEFT

SEVEN = list(L.TARGETS)


def train_steps(model, params, steps=2):
    """A couple of AdamW steps of next-token loss on random tokens (in eval mode: no dropout either side)."""
    opt = torch.optim.AdamW(params, lr=1e-2)
    for i in range(steps):
        x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(10 + i))
        out = model(x)
        out = getattr(out, "logits", out)
        loss = F.cross_entropy(out[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("family", ["llama3.1", "qwen2"])
def test_lora_trained_here_and_in_peft_give_the_same_logits_both_ways(family, tmp_path):
    peft = pytest.importorskip("peft")
    hf_model(family).save_pretrained(tmp_path / "base")
    base = str(tmp_path / "base")
    hf = lambda: transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    # trained here -> PEFT
    ours = M.load_model(base)
    bias = ours.model.layers[0].self_attn.k_proj.bias
    bias = None if bias is None else bias.detach().clone()
    L.add_lora(ours, rank=4, alpha=8, dropout=0.0)
    train_steps(ours, [p for p in ours.parameters() if p.requires_grad])
    layer = ours.model.layers[0].self_attn.k_proj.base_layer
    if bias is not None:   # frozen with its layer
        assert not layer.bias.requires_grad and torch.equal(layer.bias, bias)
    L.save_adapter(ours, str(tmp_path / "ours"), base_model_name=base)
    pm = peft.PeftModel.from_pretrained(hf(), str(tmp_path / "ours")).eval()
    a, b = logits(ours), logits(pm)
    print(f"{family} LoRA trained here, in PEFT: max |logit diff| {max_diff(a, b):.1e}")
    assert max_diff(a, b) <= 1e-4 and max_diff(a, logits(hf())) > 1e-3
    # merged: the bias kept, the same weights as PEFT's merge, and a folder transformers loads
    merged = L.merge_lora(ours)
    assert max_diff(logits(merged), a) <= 1e-4
    ref = pm.merge_and_unload().state_dict()
    for key, t in merged.state_dict().items():
        torch.testing.assert_close(t, ref[key], atol=1e-6, rtol=0, msg=key)
    M.save_model(merged, str(tmp_path / "merged"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert type(again).__name__ == type(pm.base_model.model).__name__ and max_diff(logits(again), a) <= 1e-4
    # trained in PEFT -> here
    theirs = peft.get_peft_model(hf(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=SEVEN))
    train_steps(theirs, [p for p in theirs.parameters() if p.requires_grad])
    theirs.eval().save_pretrained(str(tmp_path / "theirs"))
    back = L.load_adapter(M.load_model(base), str(tmp_path / "theirs"))
    a, b = logits(back), logits(theirs)
    print(f"{family} LoRA trained in PEFT, here: max |logit diff| {max_diff(a, b):.1e}")
    assert max_diff(a, b) <= 1e-4 and max_diff(a, logits(hf())) > 1e-3


# -------------------------------------------------------------------------- presets: the published counts

PUBLISHED = {"llama-3.1-8b": ("llama-3.1-8b.json", 8_030_261_248, 291),
             "qwen2.5-7b": ("qwen2.5-7b-instruct.json", 7_615_616_512, 339)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_have_the_published_counts_and_transformers_shapes(name):
    file, n, tensors = PUBLISHED[name]
    d = json.load(open(os.path.join(FIXTURES, file)))
    fixture, preset = M.Config.from_hf(d), M.Config.from_name(name)
    skip = ("name", "torch_dtype", "pad_token_id")
    assert {k: v for k, v in vars(fixture).items() if k not in skip} == \
           {k: v for k, v in vars(preset).items() if k not in skip}
    with torch.device("meta"):
        ours = M.Transformer(preset)
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d))
        again = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**preset.to_hf()))
    assert (ours.n_params(), len(ours.state_dict())) == (n, tensors)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in again.state_dict().items()}   # what to_hf writes
    # LoRA on the seven projections: biases are not trained
    assert L.add_lora(ours, rank=16, alpha=32) == 16 * preset.n_layers * (
        2 * (preset.hidden_size + preset.n_heads * preset.head_dim)
        + 2 * (preset.hidden_size + preset.n_kv_heads * preset.head_dim) + 3 * (preset.hidden_size + preset.intermediate_size))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_memory_estimate_counts_every_base_weight(name):
    c = M.Config.from_name(name)
    opts = train.TrainConfig(micro_batch=1, max_len=8, checkpointing=True)
    bf16, nf4 = (train.estimate_memory(c, 0, replace(opts, quantize=q), torch.bfloat16) for q in ("", "nf4"))
    n = PUBLISHED[name][1]
    assert 2 * n < bf16 < 2 * n + 2**30 and nf4 < bf16 / 3


# -------------------------------------------------------------------------- eos_token_id as a list

def test_eos_list_is_read_written_and_stops_generation(tmp_path):
    hf_model("llama3.1").save_pretrained(tmp_path)
    d = json.load(open(tmp_path / "config.json"))
    d["eos_token_id"] = [2, 5, 9]                                           # Llama-3.1-Instruct has three
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours = M.load_model(str(tmp_path))
    assert ours.config.eos_token_id == [2, 5, 9] and ours.config.to_hf()["eos_token_id"] == [2, 5, 9]
    free = M.generate(ours, [[7, 8, 9]], max_new_tokens=12, eos_id=-1)[0]
    stop = free[4]
    assert M.generate(ours, [[7, 8, 9]], max_new_tokens=12, eos_id=[V - 1, stop])[0] == free[:free.index(stop)]
    ours.config.eos_token_id = [V - 1, stop]                                # the config's list is the default
    assert M.generate(ours, [[7, 8, 9]], max_new_tokens=12)[0] == free[:free.index(stop)]


# -------------------------------------------------------------------------- what is not implemented: one line

DROP = object()
UNSUPPORTED = [  # (family, config.json changes, what the line must name)
    ("llama3.1", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                      "original_max_position_embeddings": 64}}, "rope_parameters"),
    ("llama3.1", {"rope_parameters": DROP, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling"),
    ("llama3.1", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters"),
    ("llama3.1", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                      "long_factor": [2.0] * 8}}, "rope_parameters"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("qwen2", {"num_experts": 4, "num_experts_per_tok": 2}, "num_experts"),
    ("llama3.1", {"num_local_experts": 8, "num_experts_per_tok": 2}, "num_local_experts"),
    ("llama3.1", {"mlp_bias": True}, "mlp_bias"),
    ("qwen2", {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"}, "Qwen2MoeForCausalLM"),
    ("llama3.1", {"rope_parameters": {**LLAMA3, "factor": math.nan, "rope_theta": 1e4}}, "rope_scaling"),
]


def refused(path, *names):
    with pytest.raises(M.ModelError) as e:
        M.load_model(str(path))
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    print(msg)


@pytest.mark.parametrize("family,change,name", UNSUPPORTED, ids=[f"{c[2]}-{i}" for i, c in enumerate(UNSUPPORTED)])
def test_what_is_not_implemented_is_one_line_naming_the_field(family, change, name, tmp_path_factory):
    src = tmp_path_factory.getbasetemp() / f"unsupported-{family}"
    if not src.exists():
        hf_model(family).save_pretrained(src)
    d = json.load(open(src / "config.json"))
    d.update(change)
    d = {k: v for k, v in d.items() if v is not DROP}
    path = tmp_path_factory.mktemp("bad")
    shutil.copy(src / "model.safetensors", path)
    (path / "config.json").write_text(json.dumps(d))
    refused(path, "config.json", name)


def test_gguf_features_not_implemented_name_the_key_or_tensor(tmp_path):
    qwen, llama = hf_model("qwen2"), hf_model("llama3.1")
    path = write_gguf(qwen, tmp_path / "yarn.gguf", meta={"rope_scaling_type": gguf.RopeScalingType.YARN,
                                                          "rope_scaling_factor": 4.0})
    refused(path, "'yarn'", "'qwen2.rope.scaling.type'")
    path = write_gguf(llama, tmp_path / "moe.gguf", meta={"expert_count": 8})
    refused(path, "'llama.expert_count'", "mixture-of-experts")
    path = write_gguf(llama, tmp_path / "freqs.gguf", rope_freqs=np.ones(5, np.float32))   # head_dim 16: 8 of them
    refused(path, "'rope_freqs.weight'", "8 of them")
    path = write_gguf(llama, tmp_path / "nan.gguf", rope_freqs=np.full(8, np.nan, np.float32))
    refused(path, "'rope_freqs.weight'", "finite positive")
    path = write_gguf(qwen, tmp_path / "qwen-freqs.gguf", rope_freqs=np.ones(8, np.float32))  # qwen2 never has one
    refused(path, "'rope_freqs.weight'")
    with pytest.raises(M.ModelError, match="no config.json form"):   # a GGUF's factors cannot be saved as a folder
        M.save_model(M.load_model(write_gguf(llama, tmp_path / "ok.gguf")), str(tmp_path / "out"))
