"""model.py against transformers on tiny random checkpoints: logits, generation, loading, saving, errors."""
import json
import os

import pytest
import torch

import model as M

transformers = pytest.importorskip("transformers")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def hf_tiny(arch="mistral", **kw):
    """A random transformers model of a tiny Llama (multi-head) or Mistral (grouped-query) config."""
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if arch == "mistral":
        cfg = transformers.MistralConfig(**{**common, "num_key_value_heads": 2, "sliding_window": None, **kw})
        return transformers.MistralForCausalLM(cfg).eval()
    cfg = transformers.LlamaConfig(**{**common, "num_key_value_heads": 4, **kw})
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "mistral"])
def pair(request, tmp_path_factory):
    hf = hf_tiny(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, max_shard_size="100KB")  # several shards and an index
    return hf, str(path)


def test_sharded_checkpoint_logits_match_transformers(pair):
    hf, path = pair
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    ours = M.load_model(path, dtype=torch.float32)
    x = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() < 1e-4


def test_sliding_window_matches_transformers(tmp_path):
    hf = hf_tiny("mistral", sliding_window=6)
    hf.save_pretrained(tmp_path)
    ours = M.load_model(str(tmp_path))
    assert ours.config.sliding_window == 6
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = ours(x)
        assert (hf(x).logits - full).abs().max().item() < 1e-4
        ours.config.sliding_window = None  # the window really changes the result past 6 tokens
        assert (ours(x) - full)[:, 8:].abs().max().item() > 1e-3


def test_bf16_load_gives_bf16_weights(pair):
    _, path = pair
    ours = M.load_model(path, dtype="bfloat16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def _mapped_from(t):
    """The file a tensor's memory is mapped from (Linux's /proc/self/maps), or None for anonymous memory."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            span, *rest = line.split()
            lo, hi = (int(a, 16) for a in span.split("-"))
            if lo <= ptr < hi:
                return rest[4] if len(rest) > 4 and rest[4].startswith("/") else None
    return None


def test_weights_already_in_dtype_stay_mapped_and_writes_never_reach_the_file(pair, tmp_path):
    _, src = pair
    path = str(tmp_path / "ckpt")
    _copy(src, path)
    before = M.load_model(path).state_dict()
    ours = M.load_model(path)  # the checkpoint is fp32, so nothing is cast: views of the mapped shards
    assert _mapped_from(ours.model.layers[0].mlp.up_proj.weight).endswith(".safetensors")
    assert _mapped_from(M.load_model(path, dtype="bfloat16").model.layers[0].mlp.up_proj.weight) is None
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)  # copy-on-write: the file keeps its bytes
    again = M.load_model(path).state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)
    M.save_model(ours, path)  # over the folder its own weights are mapped from, now as one shard
    assert sorted(f for f in os.listdir(path) if "safetensors" in f) == ["model.safetensors"]  # no stale index
    saved = M.load_model(path).state_dict()
    assert all(torch.equal(before[k] + 1, saved[k]) for k in before)


def test_greedy_generate_matches_transformers(pair):
    hf, path = pair
    ours = M.load_model(path)
    prompts = [[5, 17, 33, 2 + 40, 9, 11, 12], [7, 8], [100, 200, 3]]  # different lengths: left padding
    got = M.generate(ours, prompts, max_new_tokens=20, eos_id=-1)
    for p, g in zip(prompts, got):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert g == ref


def test_generate_stops_at_eos_and_sampling_is_seeded(pair):
    _, path = pair
    ours = M.load_model(path)
    first = M.generate(ours, [[5, 6, 7]], max_new_tokens=10, eos_id=-1)[0]
    stopped = M.generate(ours, [[5, 6, 7]], max_new_tokens=10, eos_id=first[3])[0]
    assert stopped == first[:first.index(first[3])]
    a = M.generate(ours, [[5, 6, 7]] * 2, max_new_tokens=15, temperature=1.0, top_p=0.9, seed=3, eos_id=-1)
    b = M.generate(ours, [[5, 6, 7]] * 2, max_new_tokens=15, temperature=1.0, top_p=0.9, seed=3, eos_id=-1)
    assert a == b and a[0] != a[1]


def test_logits_at_selects_positions(pair):
    _, path = pair
    ours = M.load_model(path)
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        full = ours(x)
        pos = torch.tensor([3, 11])
        assert torch.allclose(ours(x, logits_at=pos), full[torch.arange(2), pos], atol=1e-5)
        mask = torch.zeros(2, 12, dtype=torch.bool)
        mask[0, 2], mask[1, 5], mask[1, 7] = True, True, True
        assert torch.allclose(ours(x, logits_at=mask), full[mask], atol=1e-5)


def test_left_padding_and_cache_equal_plain_forward(pair):
    _, path = pair
    ours = M.load_model(path)
    x = torch.randint(0, 300, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], 1)
    with torch.no_grad():
        ref = ours(x)
        assert (ours(padded, attention_mask=mask)[:, 4:] - ref).abs().max() < 1e-5
        cache = M.KVCache(ours, 1, 16)
        a = ours(x[:, :6], cache=cache)
        b = ours(x[:, 6:], cache=cache)
        assert (torch.cat([a, b], 1) - ref).abs().max() < 1e-5


def test_save_model_loads_in_transformers(pair, tmp_path):
    hf, path = pair
    ours = M.load_model(path)
    M.save_model(ours, str(tmp_path), max_shard_size=60_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert (back(x).logits - ours(x)).abs().max().item() < 1e-5
    again = M.load_model(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_tied_embeddings_roundtrip(tmp_path):
    hf = hf_tiny("llama", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    ours = M.load_model(str(tmp_path / "hf"))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() < 1e-4
    M.save_model(ours, str(tmp_path / "ours"))
    assert M.load_model(str(tmp_path / "ours")).lm_head.weight is not None


# -------------------------------------------------------------------------- configs and counts

COUNTS = {"llama-2-7b": (6_738_415_616, 291), "mistral-7b-v0.1": (7_241_732_096, 291),
          "mistral-7b-v0.3": (7_248_023_552, 291)}


def test_the_70b_preset_has_the_published_count():
    """Llama-3.1-70B, the README's example of a base for --shard: 70,553,706,496 parameters."""
    with torch.device("meta"):
        m = M.Transformer(M.Config.from_name("llama-3.1-70b"))
    assert (m.n_params(), len(m.state_dict())) == (70_553_706_496, 80 * 9 + 3)


@pytest.mark.parametrize("name", list(COUNTS))
def test_presets_and_fixture_configs_have_the_published_counts(name):
    fixture = M.Config.from_hf(json.load(open(os.path.join(FIXTURES, f"{name}.json"))))
    for cfg in (M.Config.from_name(name), fixture):
        with torch.device("meta"):
            m = M.Transformer(cfg)
        assert (m.n_params(), len(m.state_dict())) == COUNTS[name]
    preset = M.Config.from_name(name)
    assert {k: v for k, v in vars(fixture).items() if k not in ("name", "torch_dtype", "pad_token_id")} == \
           {k: v for k, v in vars(preset).items() if k not in ("name", "torch_dtype", "pad_token_id")}


@pytest.mark.parametrize("name", list(COUNTS))
def test_loader_key_set_equals_transformers(name):
    hf_cfg = transformers.AutoConfig.for_model(**json.load(open(os.path.join(FIXTURES, f"{name}.json"))))
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        ours = M.Transformer(M.Config.from_hf(hf_cfg.to_dict()))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_both_config_styles_read_alike():
    old = json.load(open(os.path.join(FIXTURES, "mistral-7b-v0.3.json")))
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "torch_dtype")}
    new.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, dtype="bfloat16")
    a, b = M.Config.from_hf(old), M.Config.from_hf(new)
    assert a == b and a.rope_theta == 1e6 and a.torch_dtype == "bfloat16"
    # and what to_hf writes, transformers reads back as the same architecture
    back = transformers.AutoConfig.for_model(**M.Config.from_name("mistral-7b-v0.1").to_hf())
    assert M.Config.from_hf(back.to_dict()).sliding_window == 4096


# -------------------------------------------------------------------------- bad input, one clear line

def _error(path, **kw):
    with pytest.raises(M.ModelError) as e:
        M.load_model(str(path), **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unsupported_architecture_is_named():
    with pytest.raises(M.ModelError, match="GPT2LMHeadModel"):
        M.Config.from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_bad_folders_name_the_file_or_tensor(pair, tmp_path):
    _, good = pair
    assert "not a checkpoint folder" in _error(tmp_path / "nowhere")
    assert "no config.json" in _error(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _error(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert "'BertModel'" in _error(tmp_path)
    cfg = json.load(open(os.path.join(good, "config.json")))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "no *.safetensors" in _error(tmp_path)


def _copy(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def test_missing_or_truncated_shard(pair, tmp_path):
    _, good = pair
    d = _copy(good, tmp_path / "a")
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(d, shard))
    assert f"{shard}: shard named in model.safetensors.index.json is missing" in _error(d)
    d = _copy(good, tmp_path / "b")
    data = open(os.path.join(d, shard), "rb").read()
    open(os.path.join(d, shard), "wb").write(data[: len(data) // 2])
    assert f"{shard}: unreadable safetensors file" in _error(d)


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_tiny("mistral")
    hf.save_pretrained(tmp_path)
    f = str(tmp_path / "model.safetensors")
    state = load_file(f)
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, f)
    assert "lacks tensor 'model.layers.1.mlp.up_proj.weight'" in _error(tmp_path)
    save_file({**state, "model.layers.0.self_attn.rotary.bias": torch.zeros(3)}, f)
    assert "unexpected tensor 'model.layers.0.self_attn.rotary.bias'" in _error(tmp_path)
    save_file({**state, "model.norm.weight": torch.ones(65)}, f)
    assert "'model.norm.weight' has shape (65,), expected (64,)" in _error(tmp_path)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", "64"), ("num_hidden_layers", 2.5), ("num_attention_heads", [4]), ("rope_theta", "10000.0"),
    ("num_attention_heads", 0), ("num_hidden_layers", -1), ("intermediate_size", 0), ("vocab_size", True),
    ("num_key_value_heads", 0), ("rms_norm_eps", "1e-6"), ("max_position_embeddings", 0),
    ("head_dim", 15.0), ("tie_word_embeddings", "yes")])
def test_config_json_with_a_bad_field_is_named(pair, tmp_path, field, value):
    _, good = pair
    d = _copy(good, tmp_path / "bad")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _error(d)
    assert "config.json" in msg and repr(field) in msg, msg
    with pytest.raises(M.ModelError, match=field):
        M.load_config(str(d))


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "config.json: expected a JSON object" in _error(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors",
                                   "sub/../../outside.safetensors", 7])
def test_index_shard_outside_the_folder_is_refused(pair, tmp_path, shard):
    _, good = pair
    d = _copy(good, tmp_path / "ckpt")
    index = json.load(open(d / "model.safetensors.index.json"))
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = _error(d)
    assert "model.safetensors.index.json" in msg and str(shard) in msg and key in msg, msg


def test_sliding_window_kv_cache_generation_matches_transformers_and_full_forward(tmp_path):
    """Mistral with a 4-token window: greedy decoding of 12 tokens from an 8-token prompt with the
    KV cache equals transformers' greedy generate and a full forward pass per step without a cache."""
    hf = hf_tiny("mistral", sliding_window=4)
    hf.save_pretrained(tmp_path)
    ours = M.load_model(str(tmp_path))
    assert ours.config.sliding_window == 4
    prompt = [5, 17, 33, 42, 9, 11, 12, 250]
    got = M.generate(ours, [prompt], max_new_tokens=12, eos_id=-1)[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref and len(got) == 12
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # no cache: every step recomputes the whole sequence
            seq.append(ours(torch.tensor([seq]))[0, -1].argmax().item())
        assert seq[len(prompt):] == got
        # and the cache's logits at every step equal the full forward's, past the window too
        full = ours(torch.tensor([seq]))
        cache = M.KVCache(ours, 1, len(seq))
        steps = [ours(torch.tensor([seq[:8]]), cache=cache)] + \
                [ours(torch.tensor([[t]]), cache=cache) for t in seq[8:]]
        assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
        ours.config.sliding_window = None  # the window matters for this prompt
        assert (ours(torch.tensor([seq])) - full)[:, 5:].abs().max().item() > 1e-3
