"""quant.py against bitsandbytes (the pinned dev-only oracle, whose CPU path runs here): NF4 codes,
scales and dequantisation, double quantisation; NF4Linear's gradients, autocast, checkpointing; and
a model loaded with load_model(quantize="nf4") against transformers + BitsAndBytesConfig."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import lora as L
import model as M
import quant as Q

bnbF = pytest.importorskip("bitsandbytes.functional")


def bnb_nf4(w, double_quant=False):
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return packed.view(-1), state


def bnb_dequant(packed, state, dtype):
    state.dtype = dtype  # dequantize_4bit returns state.dtype, so it can be asked for any of the three
    return bnbF.dequantize_4bit(packed.view(-1, 1), state)


def boundary_distance(w, absmax):
    """|w / absmax - nearest midpoint between two NF4 values|, per element (row-major)."""
    scaled = w.reshape(-1).float() / absmax.repeat_interleave(64)[: w.numel()]
    return (scaled[:, None] - Q.NF4_BOUNDS).abs().amin(dim=1)


def test_the_tables_are_bitsandbytes():
    assert torch.equal(Q.NF4_VALUES, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(Q.dynamic_map(), bnbF.create_dynamic_map())


SHAPES = [
    ((64, 256), torch.float32, 1.0),      # random
    ((4, 4096), torch.bfloat16, 0.02),    # rows of a 7B q/k/v/o/gate/up weight, in the dtype it ships in
    ((2, 14336), torch.float32, 0.02),    # rows of a 7B down_proj weight
    ((256, 512), torch.float16, 0.02),
    ((6, 22), torch.float32, 1.0),        # 132 values: the last block of 64 is partial
]


@pytest.mark.parametrize("shape,dtype,std", SHAPES)
def test_codes_and_dequantisation_equal_bitsandbytes(shape, dtype, std):
    torch.manual_seed(0)
    w = (torch.randn(shape) * std).to(dtype)
    codes, absmax = Q.quantize_nf4(w)
    packed, state = bnb_nf4(w)
    assert codes.dtype == torch.uint8 and codes.shape == (w.numel() // 2,)
    assert torch.equal(absmax, state.absmax)
    # Codes may only differ for a value exactly on a boundary between two NF4 values, where one
    # rounding of w / absmax decides. The bound: at most 1 in 10^5 values, each within 1e-6 of a
    # midpoint. Observed with bitsandbytes 0.50.2: 0 (its CPU quantiser is the same arithmetic).
    diff = (codes != packed).nonzero().view(-1)
    mismatched = torch.cat([2 * diff, 2 * diff + 1])
    assert mismatched.numel() <= w.numel() * 1e-5
    if mismatched.numel():
        assert boundary_distance(w, absmax)[mismatched].max() < 1e-6
    same = codes == packed
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        ours = Q.dequantize_nf4(codes, absmax, shape, out_dtype)
        ref = bnb_dequant(packed, state, out_dtype)
        assert ours.shape == shape and ours.dtype == out_dtype
        both = torch.stack([same, same], 1).view(-1)[: w.numel()]      # per value, from per byte
        assert torch.equal(ours.view(-1)[both], ref.reshape(-1)[both])


def test_values_on_a_boundary_take_the_lower_code_as_bitsandbytes():
    # each block: its absmax (1.0) and the 15 midpoints themselves, so w / absmax is exact
    row = torch.cat([torch.tensor([1.0]), Q.NF4_BOUNDS, -Q.NF4_BOUNDS, torch.zeros(33)])   # 64 values
    w = torch.stack([row, row.flip(0)])
    codes, _ = Q.quantize_nf4(w)
    packed, _ = bnb_nf4(w)
    assert torch.equal(codes, packed)
    low = torch.stack([codes >> 4, codes & 15], 1).view(-1)[1:16]
    assert low.tolist() == list(range(15))          # midpoint i -> code i, the lower neighbour


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_double_quantisation_equals_bitsandbytes(dtype):
    torch.manual_seed(0)
    w = (torch.randn(256, 4096) * 0.02).to(dtype)      # 7B-wide rows; 16384 scales
    codes, absmax = Q.quantize_nf4(w)
    aq, scale, offset = Q.quantize_absmax(absmax)
    packed, state = bnb_nf4(w, double_quant=True)
    assert torch.equal(codes, packed)
    assert torch.equal(offset, state.offset) and torch.equal(scale, state.state2.absmax)
    # bitsandbytes' CPU 8-bit quantiser finds the code by an approximate search (a uniform grid,
    # BinSearch's Direct2), so it sometimes takes a farther code: next to a midpoint, or near 0 where
    # the codes are denser than its grid. Here the nearest always wins. The bound: < 1% of the
    # scales differ, ours is never farther, and theirs is farther by < 1e-4 of the block's range.
    # Observed with bitsandbytes 0.50.2: 0.1-0.3% of scales; at most 3e-5 farther.
    code, ref = Q.dynamic_map(), state.absmax
    bad = (aq != ref).nonzero().view(-1)
    assert bad.numel() < 0.01 * aq.numel()
    normed = ((absmax - offset) / scale.repeat_interleave(256)[: absmax.numel()])[bad]
    ours, theirs = (normed - code[aq[bad].long()]).abs(), (normed - code[ref[bad].long()]).abs()
    assert (ours <= theirs).all() and (theirs - ours).max() < 1e-4
    # dequantised: equal wherever the 8-bit scale codes agree
    got = Q.dequantize_nf4(codes, Q.dequantize_absmax(aq, scale, offset), w.shape)
    want = bnb_dequant(packed, state, torch.float32)
    agree = (aq == ref).repeat_interleave(64)
    assert torch.equal(got.view(-1)[agree], want.view(-1)[agree])


# ----------------------------------------------------------------------------- NF4Linear

@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4linear_gradients_equal_nn_linear(double_quant):
    torch.manual_seed(0)
    layer = Q.NF4Linear.from_weight(torch.randn(96, 128), bias=torch.randn(96),
                                    compute_dtype=torch.float32, double_quant=double_quant)
    assert list(layer.parameters()) == [] and layer.dequantize().shape == (96, 128)
    ref = nn.Linear(128, 96)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantize())
        ref.bias.copy_(layer.bias)
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_nothing_weight_sized_is_saved_for_backward():
    layer = Q.NF4Linear.from_weight(torch.randn(256, 64), compute_dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(torch.randn(2, 64, requires_grad=True)).sum().backward()
    assert all(torch.Size(s).numel() < 256 * 64 for s in saved), saved


def test_bf16_autocast_and_checkpointing():
    torch.manual_seed(0)
    layer = Q.NF4Linear.from_weight(torch.randn(64, 32), compute_dtype=torch.float32)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ layer.dequantize().T, rtol=2e-2, atol=5e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    # checkpointing recomputes forward (dequantising a third time): same gradient
    x1, x2 = (x.detach().clone().requires_grad_(True) for _ in range(2))
    layer(x1).tanh().sum().backward()
    checkpoint(lambda t: layer(t).tanh(), x2, use_reentrant=False).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_to_dtype_moves_but_never_rounds_the_scales():
    layer = Q.NF4Linear.from_weight(torch.randn(64, 64), compute_dtype=torch.bfloat16, double_quant=True)
    before = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.codes.dtype == torch.uint8 and layer.absmax_scale.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), before)
    fresh = Q.NF4Linear(64, 64, double_quant=True)       # and the buffers round-trip a state dict
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize(torch.float32), before)


# ----------------------------------------------------------------------------- whole models

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=256, hidden_size=128, intermediate_size=320,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=128, sliding_window=None)
    path = tmp_path_factory.mktemp("tiny_nf4")
    transformers.MistralForCausalLM(cfg).save_pretrained(path, max_shard_size="200KB")   # fp32 shards
    return str(path)


def hf_nf4(path):
    """transformers + bitsandbytes 4-bit model of a checkpoint, computing in fp32.

    On CPUs with AVX512-BF16, bitsandbytes registers a fused CPU kernel for its 4-bit matmul that
    rounds the activations and block scales to bf16 first (bitsandbytes/backends/cpu/ops.py, "cpu
    fused op only support bf16"), whatever the compute dtype: its logits then carry bf16 error
    (~4e-3 here) and cannot serve as an fp32 reference. There each 4-bit layer computes with
    bitsandbytes' own exact dequantisation and an fp32 matmul instead, which is what it does on
    every other CPU."""
    transformers = pytest.importorskip("transformers")
    import bitsandbytes as bnb

    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config,
                                                              device_map="cpu").eval()
    if bnb.functional.has_avx512bf16():
        def exact(self, x):
            w = bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)
            return torch.nn.functional.linear(x, w.to(x.dtype), self.bias)
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.forward = exact.__get__(m)
    return model


TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def test_load_model_nf4_matches_transformers_bitsandbytes(tiny_checkpoint):
    ours = M.load_model(tiny_checkpoint, dtype="float32", quantize="nf4")
    hf = hf_nf4(tiny_checkpoint)
    hf_modules = dict(hf.named_modules())
    n = 0
    for name, m in ours.named_modules():
        if isinstance(m, Q.NF4Linear):
            assert torch.equal(m.codes, hf_modules[name].weight.data.view(-1)), name
            n += 1
    assert n == 2 * 7
    assert not isinstance(ours.lm_head, Q.NF4Linear) and ours.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max().item() < 1e-4


def random_lora_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_adapters_interoperate_with_peft_on_a_bitsandbytes_base(tiny_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    # trained here on an NF4 base -> PEFT on the transformers + bitsandbytes 4-bit base
    ours = M.load_model(tiny_checkpoint, dtype="float32", quantize="nf4")
    L.add_lora(ours, rank=4, alpha=8, dropout=0.0, targets=TARGETS)
    random_lora_(ours, seed=2)
    L.save_adapter(ours, tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(hf_nf4(tiny_checkpoint), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max().item() < 1e-4
    # and the reverse: a PEFT adapter on the bitsandbytes base -> load_adapter on our NF4 base
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    theirs = peft.get_peft_model(hf_nf4(tiny_checkpoint), cfg).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = M.load_model(tiny_checkpoint, dtype="float32", quantize="nf4")
    L.load_adapter(ours, tmp_path / "theirs")
    with torch.no_grad():
        assert (ours(TOKENS) - theirs(TOKENS).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_through_nf4_equal_nn_linear(tiny_checkpoint, checkpointing):
    quantised = M.load_model(tiny_checkpoint, dtype="float32", quantize="nf4")
    plain = M.load_model(tiny_checkpoint, dtype="float32")        # nn.Linear holding the same weights
    for name, m in quantised.named_modules():
        if isinstance(m, Q.NF4Linear):
            plain.get_submodule(name).weight.data.copy_(m.dequantize())
    grads = []
    for model in (quantised, plain):
        L.add_lora(model, rank=4, alpha=8, dropout=0.0, targets=TARGETS)
        random_lora_(model, seed=3)
        model.train()
        model.gradient_checkpointing = checkpointing and model is quantised
        logits = model(TOKENS)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * 7
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-5, msg=name)


MEASURE = """
import sys, torch, model
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
model.load_model(sys.argv[2], dtype="bfloat16", quantize="nf4")   # warm-up: thread pools, lazy inits
base = kib("VmRSS:")
m = model.load_model(sys.argv[1], dtype="bfloat16", quantize="nf4")
print((kib("VmHWM:") - base) * 1024)
"""


def write_random_checkpoint(path, transformers, shard_bytes=20e6, **kw):
    """A bf16 Mistral checkpoint of random weights, in shards of about shard_bytes, written tensor by
    tensor (never a whole model in memory). Returns {name: shape}."""
    import json
    from safetensors.torch import save_file
    cfg = transformers.MistralConfig(num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                                     sliding_window=None, **kw)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in transformers.MistralForCausalLM(cfg).named_parameters()}
    g = torch.Generator().manual_seed(0)
    shard, index = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        shard[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if sum(t.numel() for t in shard.values()) * 2 > shard_bytes or i == len(shapes) - 1:
            file = f"model-{len(set(index.values())) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, file))
            shard = {}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    return shapes


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux /proc")
def test_loading_nf4_grows_memory_by_less_than_the_bf16_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    # ~110 MB in bf16, nearly all of it in the seven projections, in 20 MB shards
    (tmp_path / "big").mkdir(), (tmp_path / "tiny").mkdir()
    shapes = write_random_checkpoint(tmp_path / "big", transformers, vocab_size=512, hidden_size=1024,
                                     intermediate_size=3072, num_hidden_layers=4)
    write_random_checkpoint(tmp_path / "tiny", transformers, vocab_size=512, hidden_size=64,
                            intermediate_size=192, num_hidden_layers=2)
    projections = sum(shape.numel() for n, shape in shapes.items() if n.endswith("_proj.weight"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A fixed mmap threshold makes glibc hand freed temporaries back at once; its default, adaptive
    # threshold keeps a varying amount of freed memory resident and the peak jitters by 80 MB.
    env = {**os.environ, "PYTHONPATH": root, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big"), str(tmp_path / "tiny")],
                         capture_output=True, text=True, cwd=root, env=env, check=True)
    grown = int(out.stdout.split()[-1])
    # what it may hold: 4.5 bits per projection weight, embeddings, one shard's mapped pages, one
    # tensor's temporaries; what it must not: anything near the bf16 weights (109 MB here)
    assert grown < 2 * projections, f"peak grew {grown / 1e6:.0f} MB; bf16 weights are {2 * projections / 1e6:.0f} MB"


def test_load_model_nf4_dq_double_quantises_every_layer(tiny_checkpoint):
    """quantize="nf4-dq": the same 4-bit codes as nf4, the block scales stored in 8 bits, and logits
    within the scales' 8-bit rounding of nf4's."""
    nf4 = M.load_model(tiny_checkpoint, dtype="float32", quantize="nf4")
    dq = M.load_model(tiny_checkpoint, dtype="float32", quantize="nf4-dq")
    plain = dict(nf4.named_modules())
    layers = {n: m for n, m in dq.named_modules() if isinstance(m, Q.NF4Linear)}
    assert len(layers) == 2 * 7 and all(m.double_quant for m in layers.values())
    for name, m in layers.items():
        assert "absmax" not in dict(m.named_buffers()) and m.absmax_codes.dtype == torch.uint8
        assert torch.equal(m.codes, plain[name].codes), name
        assert (m.get_absmax() - plain[name].absmax).abs().max() < 0.01 * plain[name].absmax.max()
    with torch.no_grad():
        a, b = nf4(TOKENS), dq(TOKENS)
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item() and not torch.equal(a, b)
    assert "nf4-dq" in str(pytest.raises(M.ModelError, M.load_model, tiny_checkpoint, quantize="int8").value)
