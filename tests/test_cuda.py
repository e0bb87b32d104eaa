"""The CUDA-only paths, on tiny models: bf16 autocast training, activation checkpointing, fused AdamW
(and train.py choosing it), NF4 quantisation and NF4Linear on the device, KV-cache generation.

Every test here is marked `cuda` and skipped where torch sees no CUDA device, so the CPU suite only
collects them. On a GPU machine:

    python -m pytest -m cuda tests/test_cuda.py        # bench/gpu.py runs exactly this as its first stage

Each test compares the device with a reference it can trust: the same model in fp32, the same
computation on the CPU, or an independent path (no KV cache, dequantise-then-matmul, unfused AdamW).
"""
import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch

import data
from demo import write_demo
import lora
import quant as Q
import train
from model import PRESETS, Transformer, generate, load_model, save_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")


# ----------------------------------------------------------------------------- tiny pieces

def tiny_model(seed=0, **overrides):
    """A random tiny Mistral-shaped model (fp32, CPU) whose head is confident enough for greedy
    decoding to have no near-ties (a fresh head's logits are all close to each other)."""
    torch.manual_seed(seed)
    model = Transformer(replace(PRESETS["tiny"], **overrides))
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def with_live_lora(model, seed=1, dropout=0.0):
    """LoRA on all seven projections with a non-zero B, so the adapter path carries gradient."""
    torch.manual_seed(seed)
    lora.add_lora(model, rank=4, alpha=8, dropout=dropout)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model


def loss_batch(vocab, B=3, T=40, n_loss=12, seed=0):
    """input_ids and already-shifted targets, the loss on the last n_loss positions of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    targets = torch.full_like(ids, data.IGNORE_INDEX)
    targets[:, T - n_loss - 1:-1] = ids[:, T - n_loss:]
    return {"input_ids": ids, "targets": targets}


def to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def lora_grads(model, batch, autocast_dtype=None):
    """(mean loss per target token, {name: gradient}) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    n_tok = int((batch["targets"] != data.IGNORE_INDEX).sum())
    ctx = torch.autocast(DEVICE.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with ctx:
        loss = train.loss_sum(model, batch) / n_tok
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


# ----------------------------------------------------------------------------- bf16 autocast

def test_bf16_autocast_step_matches_fp32_and_stays_finite():
    """train.py on CUDA: bf16 base weights, fp32 LoRA weights, bf16 autocast, fused AdamW."""
    ref = with_live_lora(tiny_model()).to(DEVICE).train()
    bf16 = copy.deepcopy(ref)
    for name, p in bf16.named_parameters():
        if "lora_" not in name:               # the base as load_model(dtype=bf16) gives it; LoRA stays fp32
            p.data = p.data.to(torch.bfloat16)
    batch = to(loss_batch(ref.config.vocab_size), DEVICE)
    loss32, g32 = lora_grads(ref, batch)
    loss16, g16 = lora_grads(bf16, batch, torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in bf16.named_parameters() if "lora_" in n)
    assert abs(loss16 - loss32) < 0.02 * abs(loss32), (loss16, loss32)
    assert g16.keys() == g32.keys() and len(g16) == 2 * 7 * ref.config.n_layers
    for n in g32:
        assert torch.isfinite(g16[n]).all(), n
        assert rel_err(g16[n], g32[n]) < 0.1, (n, rel_err(g16[n], g32[n]))
    params = [p for p in bf16.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        lora_grads(bf16, batch, torch.bfloat16)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16), torch.no_grad():
        assert torch.isfinite(train.loss_sum(bf16, batch))


# ----------------------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_checkpointing_gradients_equal_plain_on_cuda(dtype):
    """With LoRA dropout on: the recomputed forward must draw the same CUDA dropout masks."""
    model = with_live_lora(tiny_model(), dropout=0.1).to(DEVICE).train()
    batch = to(loss_batch(model.config.vocab_size), DEVICE)
    results = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        torch.manual_seed(123)               # the same dropout masks in both passes
        results.append(lora_grads(model, batch, dtype))
    (loss_a, ga), (loss_b, gb) = results
    tol = 1e-5 if dtype is None else 1e-2
    assert abs(loss_a - loss_b) <= tol * abs(loss_a)
    for n in ga:
        assert ga[n].abs().sum() > 0, n
        assert rel_err(gb[n], ga[n]) < tol, (n, rel_err(gb[n], ga[n]))


def test_checkpointing_saves_memory_on_cuda():
    model = with_live_lora(tiny_model(n_layers=4, hidden_size=128, intermediate_size=512)).to(DEVICE).train()
    batch = to(loss_batch(model.config.vocab_size, B=8, T=256, n_loss=8), DEVICE)
    peaks = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        lora_grads(model, batch)             # warm-up: kernels and allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        lora_grads(model, batch)
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] < 0.7 * peaks[0], peaks


# ----------------------------------------------------------------------------- fused AdamW

def test_fused_adamw_steps_like_unfused():
    torch.manual_seed(0)
    params = [torch.randn(64, 32, device=DEVICE, requires_grad=True), torch.randn(32, device=DEVICE, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    fused = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=True)
    plain = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.01, foreach=False)
    for step in range(5):
        g = [torch.randn_like(p) for p in params]
        for p, t, gi in zip(params, twins, g):
            p.grad, t.grad = gi.clone(), gi.clone()
        fused.step()
        plain.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)
    assert all(s["step"].device.type == DEVICE.type for s in fused.state.values())  # fused keeps its step on the device


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    """A tiny demo corpus (tokenizer and records) and a random base folder that train.py can load."""
    d = tmp_path_factory.mktemp("cuda-demo")
    paths = write_demo(str(d / "data"), n_per_dataset=8, n_corpus=300, vocab_size=500)
    tok = data.Tokenizer(paths["tokenizer"])
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                eos_token_id=tok.eos_id, max_position_embeddings=1024))
    save_model(model, str(d / "base"))
    shutil.copy(paths["tokenizer"], d / "base" / "tokenizer.model")
    return {"base": str(d / "base"), "data": paths["train"]}


def test_train_run_on_cuda_uses_bf16_checkpointing_and_fused_adamw(demo_base, tmp_path, monkeypatch):
    """train.run end to end on the device: it must pick fused AdamW, train in bf16 with checkpointing,
    log peak memory, and leave a finite validation loss and an adapter that loads back."""
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    out = tmp_path / "run"
    cfg = train.TrainConfig(model=demo_base["base"], data=demo_base["data"], out=str(out), variant="explanation",
                            rank=4, alpha=8, lr=5e-3, batch_size=8, micro_batch=4, steps=6, max_len=256,
                            val_every=6, save_every=6, log_every=1, device=str(DEVICE), checkpointing=True)
    result = train.run(cfg)
    (opt,) = made
    assert opt.defaults["fused"] is True
    assert all(s["step"].device.type == DEVICE.type for s in opt.state.values()) and opt.state
    assert result is not None and torch.isfinite(torch.tensor(result["val_loss"]))
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert all(r["peak_mem_gib"] > 0 for r in rows if "loss" in r)
    model = load_model(demo_base["base"], device=DEVICE)           # bf16 on CUDA, as train.py trained it
    lora.load_adapter(model, str(out / "last"))
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora.lora_layers(model).values())


# ----------------------------------------------------------------------------- NF4 on the device

@pytest.mark.parametrize("shape,std", [((96, 64), 1.0), ((256, 1024), 0.02), ((6, 22), 1.0)])
def test_nf4_quantisation_on_cuda_equals_cpu(shape, std):
    torch.manual_seed(0)
    w = torch.randn(shape) * std
    codes, absmax = Q.quantize_nf4(w)
    codes_d, absmax_d = Q.quantize_nf4(w.to(DEVICE))
    assert codes_d.device.type == DEVICE.type
    assert torch.equal(codes_d.cpu(), codes) and torch.equal(absmax_d.cpu(), absmax)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(Q.dequantize_nf4(codes_d, absmax_d, shape, dtype).cpu(),
                           Q.dequantize_nf4(codes, absmax, shape, dtype))
    # double quantisation subtracts the scales' mean, a reduction whose order differs by device: its
    # last bit may move a scale lying on a boundary of the 8-bit map to the neighbouring code
    dq, dq_d = Q.quantize_absmax(absmax), Q.quantize_absmax(absmax_d)
    assert (dq_d[0].cpu() != dq[0]).sum() <= max(1, absmax.numel() // 1000)
    torch.testing.assert_close(Q.dequantize_absmax(*dq_d).cpu(), Q.dequantize_absmax(*dq), rtol=0.02, atol=1e-6)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_on_cuda_equals_dequantise_matmul_and_cpu(double_quant):
    torch.manual_seed(0)
    w, x = torch.randn(96, 64) * 0.05, torch.randn(3, 5, 64)
    cpu = Q.NF4Linear.from_weight(w, compute_dtype=torch.float32, double_quant=double_quant)
    dev = Q.NF4Linear.from_weight(w, compute_dtype=torch.bfloat16, double_quant=double_quant, device=DEVICE)
    assert dev.codes.device.type == DEVICE.type and torch.equal(dev.codes.cpu(), cpu.codes)
    xd = x.to(DEVICE).requires_grad_(True)
    y = dev(xd)
    assert y.dtype == torch.bfloat16 and y.device.type == DEVICE.type
    w_bf16 = dev.dequantize(torch.bfloat16)
    assert torch.equal(y, torch.nn.functional.linear(xd.detach().bfloat16(), w_bf16))   # exactly what it computes
    torch.testing.assert_close(y.float().cpu(), cpu(x), rtol=2e-2, atol=2e-2)            # and what the CPU does
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(xd.grad.float(), (g @ w_bf16).float(), rtol=1e-2, atol=1e-2)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert dev(x.to(DEVICE)).dtype == torch.bfloat16
    here = Q.NF4Linear.from_weight(w, compute_dtype=torch.bfloat16, double_quant=double_quant)
    moved = copy.deepcopy(here).to(DEVICE)                                               # .to(device) keeps the scales
    assert torch.equal(moved.dequantize().cpu(), here.dequantize())


def test_nf4_load_model_on_cuda_equals_cpu(tmp_path):
    model = tiny_model()
    save_model(model, str(tmp_path / "ckpt"))
    cpu = load_model(str(tmp_path / "ckpt"), device="cpu", dtype=torch.bfloat16, quantize="nf4")
    dev = load_model(str(tmp_path / "ckpt"), device=DEVICE, dtype=torch.bfloat16, quantize="nf4")
    layers = {n: m for n, m in dev.named_modules() if isinstance(m, Q.NF4Linear)}
    assert len(layers) == 7 * model.config.n_layers
    for n, m in cpu.named_modules():
        if isinstance(m, Q.NF4Linear):
            assert torch.equal(layers[n].codes.cpu(), m.codes), n
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = cpu(ids).float(), dev(ids.to(DEVICE)).float().cpu()
    assert rel_err(b, a) < 0.05
    lora.add_lora(dev, rank=4, alpha=8, dropout=0.0)
    dev.train()
    dev.gradient_checkpointing = True
    _, grads = lora_grads(dev, to(loss_batch(model.config.vocab_size), DEVICE), torch.bfloat16)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_nf4_codes_on_cuda_equal_bitsandbytes():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = (torch.randn(512, 256) * 0.02).to(DEVICE, torch.bfloat16)
    try:
        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    except Exception as e:  # a CPU-only bitsandbytes build
        pytest.skip(f"bitsandbytes cannot quantise on this device: {e}")
    codes, absmax = Q.quantize_nf4(w)
    assert torch.equal(absmax, state.absmax.float())
    assert (codes != packed.view(-1)).float().mean().item() <= 1e-5


# ----------------------------------------------------------------------------- KV-cache generation

@pytest.mark.parametrize("window", [None, 6], ids=["full", "sliding-window"])
def test_generate_on_cuda_equals_cpu_greedy(window):
    model = tiny_model(sliding_window=window).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9, 3)]   # left padding
    cpu = generate(model, prompts, max_new_tokens=16, eos_id=-1)
    dev = generate(copy.deepcopy(model).to(DEVICE), prompts, max_new_tokens=16, eos_id=-1)
    assert [len(o) for o in cpu] == [16, 16, 16]
    assert dev == cpu


def test_generate_on_cuda_equals_no_cache_greedy():
    model = tiny_model().to(DEVICE).eval()
    prompt = torch.randint(3, 256, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    (cached,) = generate(model, [prompt], max_new_tokens=12, eos_id=-1)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq], device=DEVICE))[0, -1].argmax()))
    assert cached == seq[len(prompt):]


def test_generate_bf16_and_sampling_on_cuda():
    model = tiny_model().to(DEVICE, torch.bfloat16).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    (a, b) = generate(model, prompts, max_new_tokens=10, eos_id=-1)
    assert len(a) == len(b) == 10 and all(0 <= t < 256 for t in a + b)
    s1 = generate(model, prompts, max_new_tokens=10, temperature=0.8, top_p=0.9, eos_id=-1, seed=3)
    s2 = generate(model, prompts, max_new_tokens=10, temperature=0.8, top_p=0.9, eos_id=-1, seed=3)
    assert s1 == s2                                  # a seeded generator on the device
