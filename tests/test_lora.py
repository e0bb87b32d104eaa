"""lora.py against PEFT: adapters load both ways, merging keeps logits, gradients reach LoRA only.

Everything is a tiny random Mistral built here; nothing is downloaded.
"""
import contextlib
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
import model as M
from lora import AdapterError, LoRALinear, add_lora, load_adapter, lora_state_dict, merge_lora, save_adapter

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def hf_tiny():
    cfg = transformers.MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=None, rms_norm_eps=1e-5)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-mistral"))
    hf_tiny().save_pretrained(path)
    return path


def ours(ckpt):
    return M.load_model(ckpt, dtype=torch.float32)


def randomize(model, seed=1):
    """Non-zero random LoRA weights (B starts at zero, which would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model):
    with torch.no_grad():
        out = model(TOKENS)
    return (out.logits if hasattr(out, "logits") else out).float()


def peft_adapter(tmp_path, rslora=False, targets=SEVEN):
    pm = peft.get_peft_model(hf_tiny(), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets, use_rslora=rslora, task_type="CAUSAL_LM"))
    randomize(pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    return pm, str(tmp_path / "peft")


@pytest.mark.parametrize("rslora,targets,n_wrapped", [(False, SEVEN, 14), (True, SEVEN, 14),
                                                      (False, r".*\.(q_proj|down_proj)", 4), (False, "all-linear", 14)])
def test_peft_adapter_loads_into_ours(ckpt, tmp_path, rslora, targets, n_wrapped):
    pm, path = peft_adapter(tmp_path, rslora, targets)
    m = load_adapter(ours(ckpt), path)
    assert len(lora.lora_layers(m)) == n_wrapped
    assert m.lora_config["rslora"] == rslora and m.lora_config["rank"] == 4
    torch.testing.assert_close(logits(m), logits(pm), atol=1e-4, rtol=0)
    assert (logits(m) - logits(hf_tiny())).abs().max() > 1e-3  # the adapter really does something


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_into_peft(ckpt, tmp_path, rslora):
    m = ours(ckpt)
    add_lora(m, rank=4, alpha=8, dropout=0.05, rslora=rslora)
    randomize(m)
    m.eval()
    save_adapter(m, str(tmp_path / "ours"), base_model_name=ckpt)
    pm = peft.PeftModel.from_pretrained(hf_tiny(), str(tmp_path / "ours")).eval()
    cfg = pm.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, set(cfg.target_modules)) == (4, 8, rslora, set(SEVEN))
    assert cfg.base_model_name_or_path == ckpt
    torch.testing.assert_close(logits(pm), logits(m), atol=1e-4, rtol=0)
    # our own round trip, into a model without LoRA and (as when train.py resumes) one that has it
    torch.testing.assert_close(logits(load_adapter(ours(ckpt), str(tmp_path / "ours"))), logits(m), atol=0, rtol=0)
    again = ours(ckpt)
    add_lora(again, rank=4, alpha=32, dropout=0.0)
    load_adapter(again, str(tmp_path / "ours"))
    assert again.lora_config["alpha"] == 8 and again.model.layers[1].mlp.up_proj.scaling == 8 / (4 ** 0.5 if rslora else 4)
    torch.testing.assert_close(logits(again), logits(m), atol=0, rtol=0)


def test_merge_keeps_logits_and_leaves_no_lora(ckpt):
    m = ours(ckpt)
    plain_keys = set(m.state_dict())
    add_lora(m, rank=4, alpha=8)
    randomize(m)
    m.eval()
    before = logits(m)
    assert merge_lora(m) is m
    torch.testing.assert_close(logits(m), before, atol=1e-4, rtol=0)
    assert set(m.state_dict()) == plain_keys
    assert not lora.lora_layers(m) and not lora_state_dict(m) and not hasattr(m, "lora_config")
    assert all(type(mod) is torch.nn.Linear for name, mod in m.named_modules() if name.endswith("_proj"))
    assert not any(p.requires_grad for p in m.parameters())


def test_merge_save_load_round_trip_matches_peft(ckpt, tmp_path):
    """PEFT adapter -> load_adapter -> merge_lora -> save_model -> load_model and transformers agree
    with PEFT's merge_and_unload."""
    pm, path = peft_adapter(tmp_path)
    m = merge_lora(load_adapter(ours(ckpt), path))
    ref = pm.merge_and_unload()
    ours_sd, ref_sd = m.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd)
    for k in ours_sd:
        torch.testing.assert_close(ours_sd[k], ref_sd[k], atol=1e-6, rtol=0, msg=k)
    M.save_model(m, str(tmp_path / "merged"))
    again = M.load_model(str(tmp_path / "merged"), dtype=torch.float32)
    torch.testing.assert_close(logits(again), logits(ref), atol=1e-4, rtol=0)
    hf = transformers.MistralForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf), logits(ref), atol=1e-4, rtol=0)
    # merging again changes nothing, and LoRA can be added anew on the merged model
    assert lora.lora_layers(merge_lora(again)) == {}
    add_lora(again, rank=2, alpha=2)
    torch.testing.assert_close(logits(again), logits(ref), atol=1e-4, rtol=0)  # fresh B == 0


def test_only_lora_trains(ckpt):
    m = ours(ckpt)
    n = add_lora(m, rank=4, alpha=8, dropout=0.05)
    c = m.config
    kv = c.n_kv_heads * c.head_dim
    per_layer = sum(4 * (i + o) for i, o in [(c.hidden_size, c.hidden_size), (c.hidden_size, kv), (c.hidden_size, kv),
                                                (c.hidden_size, c.hidden_size), (c.hidden_size, c.intermediate_size),
                                                (c.hidden_size, c.intermediate_size), (c.intermediate_size, c.hidden_size)])
    assert n == c.n_layers * per_layer
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert trainable == {k for k in dict(m.named_parameters()) if ".lora_" in k}
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in trainable)
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in m.state_dict()
    randomize(m)
    m.train()
    m(TOKENS).float().logsumexp(-1).mean().backward()
    for k, p in m.named_parameters():
        if k in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, k
        else:
            assert p.grad is None, k


@pytest.mark.parametrize("name,expected", [("llama-2-7b", 39_976_960), ("mistral-7b-v0.1", 41_943_040),
                                           ("mistral-7b-v0.3", 41_943_040)])
def test_trainable_count_7b_on_meta(name, expected):
    with torch.device("meta"):
        m = M.Transformer(M.Config.from_name(name))
    assert add_lora(m, rank=16, alpha=32) == expected
    assert all(p.is_meta for p in m.parameters())
    # PEFT's own count, on the same config built by transformers on the meta device
    hf_cfg = transformers.AutoConfig.for_model(**m.config.to_hf())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN, task_type="CAUSAL_LM"))
    assert pm.get_nb_trainable_parameters()[0] == expected


def test_unknown_target_lists_what_exists(ckpt):
    with pytest.raises(AdapterError, match=r"'qkv_proj' matches no linear layer; linear layers: down_proj, "
                                           r"gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        add_lora(ours(ckpt), targets=("q_proj", "qkv_proj"))
    m = ours(ckpt)
    add_lora(m, targets=("q_proj", "self_attn.v_proj"))
    assert sorted({k.rsplit(".", 1)[1] for k in lora.lora_layers(m)}) == ["q_proj", "v_proj"]
    with pytest.raises(AdapterError, match="already has LoRA"):
        add_lora(m)


def test_lora_linear_basics():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=True)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.0)
    x = torch.randn(3, 5, 16)
    assert layer.scaling == 2.0 and LoRALinear(torch.nn.Linear(16, 24), 4, 8, rslora=True).scaling == 4.0
    torch.testing.assert_close(layer(x), base(x))  # B == 0 at start
    assert layer.lora_A.weight.abs().sum() > 0 and not base.weight.requires_grad
    torch.nn.init.normal_(layer.lora_B.weight)
    expected = base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    assert not hasattr(layer, "disabled") and "disabled" not in repr(layer)  # no switch that no command uses
    torch.testing.assert_close(torch.nn.functional.linear(x, layer.merged_weight(), base.bias), expected)


def test_dropout_keeps_the_expectation_and_is_seeded():
    x = torch.ones(400, 1000)
    torch.manual_seed(3)
    dropped, rescale = lora.dropout(x, 0.05)
    zeroed = (dropped == 0).float().mean().item()
    assert abs(zeroed - 0.05) < 0.002 and set(dropped.unique().tolist()) == {0.0, 1.0}  # 6 sigma
    assert abs((dropped * rescale).mean().item() - 1.0) < 0.002 and rescale == pytest.approx(1 / 0.95, abs=1e-5)
    torch.manual_seed(3)
    assert torch.equal(lora.dropout(x, 0.05)[0], dropped)  # the same seed, the same mask
    assert not torch.equal(lora.dropout(x, 0.05)[0], dropped)
    assert (lora.dropout(x, 0.5)[0] == 0).float().mean().item() == pytest.approx(0.5, abs=0.003)


def test_lora_dropout_in_training_only_and_on_the_lora_path_only():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.3)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 64, requires_grad=True)
    clean = base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer.eval()(x), clean)  # eval: no dropout
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    kept, rescale = lora.dropout(x.detach(), 0.3)
    torch.testing.assert_close(y, base(x) + 2.0 * rescale * kept @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert not torch.allclose(y, clean)
    y.sum().backward()  # the base path's gradient reaches every input; only kept inputs get LoRA's
    mask = kept != 0
    expected = base.weight.sum(0) + (2.0 * rescale * layer.lora_B.weight @ layer.lora_A.weight).sum(0) * mask
    torch.testing.assert_close(x.grad, expected)


def test_a_training_step_copies_no_activation():
    """Forward and backward of a LoRA layer with dropout copy no activation-sized tensor (the profiler
    sees copies made inside other ops too): the update is accumulated into the base output's memory,
    not into a new tensor nor through a view, and the dropout mask is no bool cast to float."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(48, 96, bias=False), rank=4, alpha=8, dropout=0.1).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 16, 48, requires_grad=True)
    with torch.profiler.profile(record_shapes=True) as prof:
        torch.autograd.backward(layer(x), torch.randn(4, 16, 96))
    copies = [(e.name, e.input_shapes) for e in prof.events() if e.name in ("aten::copy_", "aten::clone")
              and e.input_shapes and e.input_shapes[0] and math.prod(e.input_shapes[0]) >= 64 * 48]
    assert copies == [] and layer.lora_A.weight.grad is not None and x.grad.shape == x.shape


def test_bf16_base_fp32_lora_under_autocast():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 24, bias=False).to(torch.bfloat16), rank=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.dtype == layer.lora_A.weight.grad.dtype == torch.float32
    assert layer.base_layer.weight.grad is None
    seen = []
    hook = layer.lora_A.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    y2 = layer(x.to(torch.bfloat16))  # no autocast: the LoRA path runs in fp32, the result is bf16
    hook.remove()
    assert seen == [(torch.float32, torch.float32)] and y2.dtype == torch.bfloat16
    torch.testing.assert_close(y2.float(), y.float(), atol=0.1, rtol=0.02)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape", [(6, 48), (2, 5, 48)], ids=["2d", "3d"])
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-6), ("bf16-autocast", 1e-2), ("bf16-base", 4e-3)])
@pytest.mark.parametrize("drop", ["p=0", "eval", "p=0.3"])
def test_fused_path_equals_the_textbook_path(monkeypatch, shape, precision, tol, drop):
    """forward_fused (what runs on CPU) and forward's textbook path (what runs on CUDA) give the same
    output and gradients: with dropout off, and with it on when the textbook path's F.dropout applies
    the mask that dropout() draws for the fused path (an fp32 test fails if either path scaled twice)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40, bias=True).to(torch.float32 if precision == "fp32" else torch.bfloat16)
    layer = LoRALinear(base, rank=4, alpha=6, dropout=0.0 if drop == "p=0" else 0.3).train(drop != "eval")
    torch.nn.init.normal_(layer.lora_B.weight, std=0.5)  # an update as large as the base output
    x0 = torch.randn(shape, dtype=torch.bfloat16 if precision == "bf16-base" else torch.float32)
    dy = torch.randn(*shape[:-1], 40)
    if drop == "p=0.3":
        torch.manual_seed(5)
        kept, rescale = lora.dropout(torch.ones(shape), 0.3)  # the mask forward_fused draws after the same seed
        assert 0 < (kept == 0).float().mean() < 0.5

        def same_mask(t, p, training):
            assert p == 0.3 and training
            return t * kept * rescale
        monkeypatch.setattr(lora.F, "dropout", same_mask)
    runs = {}
    for path, devices in [("textbook", ()), ("fused", ("cpu",))]:
        layer.fused_devices = devices
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else contextlib.nullcontext():
            y = layer(x)
        y.backward(dy.to(y.dtype))
        runs[path] = y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad
    (y, *grads), (y_fused, *grads_fused) = runs["textbook"], runs["fused"]
    assert y.shape == y_fused.shape == (*shape[:-1], 40) and y.dtype == y_fused.dtype == base.weight.dtype
    for name, a, b in zip(["y", "x.grad", "lora_A.grad", "lora_B.grad"], [y, *grads], [y_fused, *grads_fused]):
        assert a.dtype == b.dtype and rel_err(b, a) < tol, (name, rel_err(b, a))


class FakeNF4(torch.nn.Module):
    """The duck type of quant.NF4Linear: a frozen base with in/out_features, forward, dequantize()."""

    def __init__(self, w):
        super().__init__()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("w", w.to(torch.bfloat16))

    def dequantize(self):
        return self.w

    def forward(self, x):
        return x @ self.w.to(x.dtype).T


def test_merge_dequantises_a_quantised_base():
    torch.manual_seed(0)
    m = torch.nn.Sequential()
    m.add_module("q_proj", FakeNF4(torch.randn(8, 12)))
    assert add_lora(m, rank=2, alpha=4, dropout=0.0, targets=["q_proj"]) == 2 * (8 + 12)
    torch.nn.init.normal_(m.q_proj.lora_B.weight)
    x = torch.randn(3, 12)
    before = m(x)
    merge_lora(m)
    assert type(m.q_proj) is torch.nn.Linear and m.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m(x.to(torch.bfloat16)).float(), before, atol=0.1, rtol=0.02)


def test_real_nf4_base_merges(ckpt):
    import quant

    torch.manual_seed(0)
    m = torch.nn.Sequential()
    m.add_module("down_proj", quant.NF4Linear.from_weight(torch.randn(32, 64), compute_dtype=torch.float32))
    add_lora(m, rank=4, alpha=8, dropout=0.0, targets=["down_proj"])
    torch.nn.init.normal_(m.down_proj.lora_B.weight)
    x = torch.randn(5, 64)
    before = m(x)
    merge_lora(m)
    assert type(m.down_proj) is torch.nn.Linear
    torch.testing.assert_close(m(x), before, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- bad adapters


@pytest.fixture
def saved(ckpt, tmp_path):
    m = ours(ckpt)
    add_lora(m, rank=4, alpha=8)
    randomize(m)
    save_adapter(m, str(tmp_path / "a"))
    return str(tmp_path / "a")


def _edit(path, fn):
    f = os.path.join(path, "adapter_model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_wrong_rank_names_the_tensor(ckpt, saved):
    m = ours(ckpt)
    add_lora(m, rank=8, alpha=8)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: tensor base_model\.model\.model\.layers\.0\."
                                           r"mlp\.down_proj\.lora_A\.weight has shape \(4, 48\), the model needs \(8, 48\)"):
        load_adapter(m, saved)


def test_config_rank_disagreeing_with_tensors(ckpt, saved):
    cfg_file = os.path.join(saved, "adapter_config.json")
    cfg = json.load(open(cfg_file))
    json.dump(dict(cfg, r=8), open(cfg_file, "w"))
    with pytest.raises(AdapterError, match=r"lora_A\.weight has shape \(4, 48\), the model needs \(8, 48\)"):
        load_adapter(ours(ckpt), saved)


def test_wrong_shape_names_the_tensor(ckpt, saved):
    _edit(saved, lambda sd: sd.update({Q_A: torch.zeros(4, 40)}))
    with pytest.raises(AdapterError, match=rf"tensor {Q_A} has shape \(4, 40\), the model needs \(4, 32\)"):
        load_adapter(ours(ckpt), saved)


def test_unexpected_and_missing_tensors(ckpt, saved):
    extra = "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"
    _edit(saved, lambda sd: sd.update({extra: torch.zeros(4, 32)}))
    with pytest.raises(AdapterError, match=rf"unexpected tensor {extra}"):
        load_adapter(ours(ckpt), saved)
    _edit(saved, lambda sd: (sd.pop(extra), sd.pop(Q_A)))
    with pytest.raises(AdapterError, match=rf"missing tensor {Q_A}"):
        load_adapter(ours(ckpt), saved)


def test_missing_or_corrupt_files_name_the_file(ckpt, saved):
    weights, cfg = os.path.join(saved, "adapter_model.safetensors"), os.path.join(saved, "adapter_config.json")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=rf"{weights}: cannot read"):
        load_adapter(ours(ckpt), saved)
    os.remove(weights)
    with pytest.raises(AdapterError, match=rf"{weights}: file not found"):
        load_adapter(ours(ckpt), saved)
    open(weights, "wb").write(data)
    for text in ("{not json", "[" * 100_000, '{"r": 1' + "0" * 5000 + "}", b"{\"r\": \"\xff\"}"):
        open(cfg, "wb").write(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(AdapterError, match=rf"{cfg}: not valid JSON"):  # (deep nesting and 5000-digit
            load_adapter(ours(ckpt), saved)                                   # numbers were tracebacks)
    os.remove(cfg)
    with pytest.raises(AdapterError, match=rf"{cfg}: file not found"):
        load_adapter(ours(ckpt), saved)


@pytest.mark.parametrize("field,value", [("use_dora", True), ("bias", "all"), ("layers_to_transform", 0),
                                         ("peft_type", "IA3"), ("target_modules", ["c_attn"])])
def test_unsupported_config_is_refused(ckpt, saved, field, value):
    cfg_file = os.path.join(saved, "adapter_config.json")
    json.dump(dict(json.load(open(cfg_file)), **{field: value}), open(cfg_file, "w"))
    with pytest.raises(AdapterError, match=rf"adapter_config\.json: .*{field if field != 'target_modules' else 'c_attn'}"):
        load_adapter(ours(ckpt), saved)
