"""LoRA for the decoder in model.py: a wrapper layer, add / merge, and PEFT-format adapter files.

LoRA (Hu et al., 2021) freezes a pretrained weight W (out x in) and learns a low-rank update
B @ A with A (r x in) and B (out x r), r much smaller than in and out, so a 7B model trains ~40M
parameters instead of 7B. B starts at zero, so a fresh adapter changes nothing.

Adapters are written in PEFT's on-disk layout (`adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight`, plus `adapter_config.json`), so `peft.PeftModel
.from_pretrained` loads ours and `load_adapter` loads PEFT's. Left out on purpose: several
adapters per model, DoRA, trainable biases, per-module rank/alpha patterns, LoRA on embeddings,
fan_in_fan_out (GPT-2 Conv1D) layers. Adapters that use them are refused, not half-loaded.

Usage (train.py does the first three steps for you):
    from model import load_model, save_model
    model = load_model("ckpt/Mistral-7B-v0.1")
    n = add_lora(model, rank=16, alpha=32)             # wraps q/k/v/o/gate/up/down, freezes the rest
    ... train ...
    save_adapter(model, "runs/x/adapter", base_model_name="mistralai/Mistral-7B-v0.1")
    load_adapter(load_model("ckpt/Mistral-7B-v0.1"), "runs/x/adapter")  # or an adapter from PEFT
    save_model(merge_lora(model), "merged/")           # a standalone checkpoint
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from cli import Error
from quant import is_4bit

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model inside a PeftModel


class AdapterError(Error, ValueError):
    """A LoRA request or adapter file that does not fit the model; the message names tensor or file."""


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update, kept as two small matrices:

        y = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))

             x (..., in)
             |
             +-----------------------------+
             |                             |
      base_layer: W x (frozen)        dropout(x)          in training only
             |                             |
             |                      lora_A: (in -> r)     Kaiming-uniform
             |                             |
             |                      lora_B: (r -> out)    zeros at start
             |                             |
             |                         * scaling          alpha / r  (or alpha / sqrt(r), rsLoRA)
             |                             |
             +------------- + -------------+
                            |
                       y (..., out)

    B @ A (out x in) is never formed in forward: A then B costs r * (in + out) per token.
    `base_layer` is an nn.Linear or any frozen layer with in_features / out_features / forward /
    dequantize() (quant.NF4Linear). The LoRA weights stay fp32 whatever the base dtype; under
    bf16 autocast both paths run in bf16, without autocast the input is cast to fp32 for A and B
    and the update back to the base output's dtype.

    Two methods compute that sum. `forward` is the formula above as PEFT computes it (F.dropout,
    then A, B, the scale, the add); it runs on CUDA and any other device not in `fused_devices`.
    On CPU, forward hands over to `forward_fused`: the same sum in fewer passes over memory (a
    cheaper dropout mask whose 1 / (1 - p) is folded into the scale, the scale on the (N, r)
    activation, the update accumulated into the base output), each step measured faster on a
    2-core CPU. Its dropout draws other masks than F.dropout and rounds p to a multiple of 1/65536
    (see `dropout`); with dropout off the two paths agree to rounding (tests/test_lora.py).
    There is no switch to turn the update off: no command needs one (the base model alone is
    load_model without load_adapter).
    """

    fused_devices = ("cpu",)  # device types where forward runs forward_fused: where it was measured faster

    def __init__(self, base_layer, rank, alpha, dropout=0.0, rslora=False, device=None):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device = device or next(iter([*base_layer.parameters(), *base_layer.buffers()])).device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and nn.Linear do
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = dropout  # the probability p, on the input of the LoRA path, in training only
        self.rank = rank
        self.set_scaling(alpha, rslora)

    def set_scaling(self, alpha, rslora=False):
        self.scaling = alpha / math.sqrt(self.rank) if rslora else alpha / self.rank

    def forward(self, x):
        """base_layer(x) + scaling * lora_B(lora_A(dropout(x))), as PEFT computes it; (..., in) -> (..., out)."""
        if x.device.type in self.fused_devices:
            return self.forward_fused(x)  # the same sum, fused: faster on CPU
        y = self.base_layer(x)  # (..., out)
        if not torch.is_autocast_enabled(x.device.type):  # (autocast runs A and B in bf16 by itself)
            x = x.to(self.lora_A.weight.dtype)  # the fp32 LoRA weights take an fp32 input
        return y + (self.scaling * self.lora_B(self.lora_A(F.dropout(x, self.dropout, self.training)))).to(y.dtype)

    def forward_fused(self, x):
        """forward's sum in fewer passes over memory, as measured on CPU (see the class docstring).

        - one row per token, (N, in), the shape the matmuls take;
        - dropout() draws its mask from 16-bit uniforms, far cheaper than torch's Bernoulli sampler
          on CPU, and returns the 1 / (1 - p) it owes, folded into the scale;
        - the scale multiplies the (N, r) activation, not the (N, out) update: the same product
          (A and B are linear), r / out of the work;
        - addmm_ accumulates h @ B.T into the base output's own memory: no second (N, out) tensor.
        """
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # (N, in): one row per token, the shape the matmuls take
        y = self.base_layer(x)  # (N, out)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        scale = self.scaling
        if self.training and self.dropout > 0:
            x, rescale = dropout(x, self.dropout)
            scale = scale * rescale
        h = self.lora_A(x) * scale  # (N, r)
        if h.dtype == y.dtype:
            # y += h @ B.T, accumulated by the matmul into the base output's own memory: no second
            # (N, out) tensor to allocate, fill and add (the base layer keeps nothing that needs y)
            y.addmm_(h, self.lora_B.weight.t().to(h.dtype))
        else:  # a bf16 base without autocast: the update was computed in fp32
            y = y + self.lora_B(h).to(y.dtype)
        return y.view(*lead, self.out_features)  # (..., out)

    def merged_weight(self):
        """W + scaling * B @ A, summed in fp32, in W's dtype; an NF4 base is dequantised first."""
        base = self.base_layer
        w = base.dequantize() if is_4bit(base) else base.weight.detach()
        delta = self.lora_B.weight @ self.lora_A.weight  # (out, r) @ (r, in) -> (out, in)
        return (w.float() + self.scaling * delta).to(w.dtype)

    def extra_repr(self):
        return f"rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout:g}"


def dropout(x, p):
    """Zero each element of x with probability ~p: (dropped x, the factor still owed to the rest).

    Inverted dropout scales what it keeps by 1 / (1 - p). On CUDA, F.dropout does that itself
    (factor 1). On CPU, torch's Bernoulli sampler costs ~5 ns an element, which made dropout 15% of
    a SmolLM2 LoRA step; here one 64-bit draw of the same generator gives four 16-bit uniforms, so
    p is rounded to a multiple of 1/65536 (0.05 -> 0.0500031), and the 1 / (1 - p) of that rounded
    p is returned for the caller to fold into LoRA's scaling, on r numbers a token instead of `in`.
    Seeded by torch.manual_seed like every other draw.
    """
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True), 1.0
    cut = round(p * 65536)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # the full 64-bit range
    drop = bits.view(torch.int16)[:n].view(x.shape) < cut - 32768
    # where, not x * mask (a bool factor is first cast to a float copy) nor masked_fill (a clone, then
    # a fill): one pass forward and one backward
    return torch.where(drop, 0.0, x), 65536 / (65536 - cut)


def _is_linear(module):
    return isinstance(module, nn.Linear) or is_4bit(module)


def _matches(name, targets):
    """PEFT's rule: a string is a regex on the full module name; a list matches by name suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lora_layers(model):
    """{module name: LoRALinear} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model, rank=16, alpha=32, dropout=0.05, targets=TARGETS, rslora=False, device=None):
    """Wrap every linear layer named in `targets` in a LoRALinear, freeze everything else.

    `targets` is a list of names matched against the end of each module name ("q_proj" matches
    model.layers.3.self_attn.q_proj), or, as in PEFT, one string used as a regex on the full
    name; "all-linear" means every linear layer except lm_head. The LoRA weights are made on
    `device`, by default beside each base layer; a base still on the meta device (train.py
    --shard loads it after sharding) takes a real one, so that the initialisation draws the same
    numbers, in the same order, as on a loaded model. Returns the trainable count.
    """
    if lora_layers(model):
        raise AdapterError("model already has LoRA layers (merge_lora it first)")
    linears = [n for n, m in model.named_modules() if _is_linear(m)]
    if targets == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for n in linears} - {"lm_head"})
    targets = targets if isinstance(targets, str) else sorted(set(targets))
    for t in [targets] if isinstance(targets, str) else [[t] for t in targets]:
        if not any(_matches(n, t) for n in linears):
            existing = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears}))
            raise AdapterError(f"LoRA target {t if isinstance(t, str) else t[0]!r} matches no linear "
                               f"layer; linear layers: {existing}")
    model.requires_grad_(False)
    for name in linears:
        if _matches(name, targets):
            base = model.get_submodule(name)
            layer = LoRALinear(base, rank, alpha, dropout, rslora, device)
            _set_module(model, name, layer.train(base.training))  # in an eval() model: no dropout
    model.lora_config = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_lora(model):
    """Fold each adapter into its base weight and put a plain nn.Linear back; returns the model.

    The merged weight keeps the base weight's dtype and stays frozen. An NF4 base (one with
    dequantize()) is dequantised and comes back as a plain nn.Linear in its compute dtype, so
    merging a 4-bit model gives a full-precision one.
    """
    for name, layer in lora_layers(model).items():
        bias = getattr(layer.base_layer, "bias", None)
        merged = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
        merged.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        if bias is not None:
            merged.bias = nn.Parameter(bias.detach(), requires_grad=False)
        _set_module(model, name, merged)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_state_dict(model):
    """The LoRA tensors only, under the model's names: {'model.layers.0.mlp.up_proj.lora_A.weight': ...}."""
    return {f"{name}.{ab}.weight": getattr(layer, ab).weight.detach()
            for name, layer in lora_layers(model).items() for ab in ("lora_A", "lora_B")}


def save_adapter(model, path, base_model_name=None, state=None):
    """Write `path`/adapter_model.safetensors and `path`/adapter_config.json as PEFT 0.21 does.
    `state` is what to write, {name: tensor} as lora_state_dict gives it; by default the model's own
    (train.py --shard passes the tensors gathered from its ranks)."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise AdapterError("model has no LoRA layers to save (add_lora or load_adapter first)")
    os.makedirs(path, exist_ok=True)
    state = lora_state_dict(model) if state is None else state
    tensors = {PEFT_PREFIX + k: v.float().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": cfg["rank"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
        "target_modules": cfg["targets"], "use_rslora": cfg["rslora"], "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False, "revision": None,
    }
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


# adapter_config.json fields whose non-default values this file does not implement
_UNSUPPORTED = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False,
                "modules_to_save": None, "layers_to_transform": None, "exclude_modules": None,
                "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None,
                "trainable_token_indices": None, "alora_invocation_tokens": None}


def _read_adapter(path):
    cfg_file, weights_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    for f in (cfg_file, weights_file):
        if not os.path.isfile(f):
            raise AdapterError(f"{f}: file not found")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, RecursionError) as e:  # bad syntax or UTF-8, a 5000-digit number, deep nesting
        raise AdapterError(f"{cfg_file}: not valid JSON ({(str(e) or type(e).__name__).splitlines()[0][:200]})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise AdapterError(f"{cfg_file}: missing field {key!r}")
    for key, default in _UNSUPPORTED.items():
        if cfg.get(key) not in (None, default, [], {}):  # (not `in (False, ...)`: 0 == False)
            raise AdapterError(f"{cfg_file}: {key}={cfg[key]!r} is not supported by lora.py")
    r, alpha, dropout = cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0)
    if not (isinstance(r, int) and not isinstance(r, bool) and 0 < r <= 1 << 16):
        raise AdapterError(f"{cfg_file}: r must be a positive integer, got {r!r}")
    for key, x in (("lora_alpha", alpha), ("lora_dropout", dropout)):  # NaN and infinities fail both tests
        if not (isinstance(x, (int, float)) and not isinstance(x, bool) and -1e6 < x < 1e6):
            raise AdapterError(f"{cfg_file}: {key} must be a finite number, got {x!r}")
    if not 0 <= dropout < 1:
        raise AdapterError(f"{cfg_file}: lora_dropout must be in [0, 1), got {dropout!r}")
    targets = cfg["target_modules"]
    if not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{cfg_file}: target_modules must be a list of module names or one regex string")
    try:
        with safe_open(weights_file, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise AdapterError(f"{weights_file}: cannot read ({e})") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(f"{weights_file}: tensor {key} is {t.dtype}, not a floating-point weight")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{weights_file}: tensor {key} has non-finite values (NaN or infinity)")
    return cfg, tensors, weights_file


@torch.no_grad()
def load_adapter(model, path):
    """Load a PEFT-format LoRA adapter folder into `model`, adding LoRA layers if it has none.

    Every tensor must land on a LoRA layer with the same shape, and every LoRA layer must get
    both of its tensors; otherwise AdapterError names the tensor, before any weight is copied
    (LoRA layers it added stay, with B == 0). The file's alpha and rsLoRA flag set the scaling.
    Returns the model.
    """
    cfg, tensors, weights_file = _read_adapter(path)
    rank, alpha, rslora = cfg["r"], cfg["lora_alpha"], cfg.get("use_rslora", False)
    if not lora_layers(model):
        try:
            add_lora(model, rank, alpha, cfg.get("lora_dropout", 0.0), cfg["target_modules"], rslora)
        except AdapterError as e:
            raise AdapterError(f"{os.path.join(path, ADAPTER_CONFIG)}: {e}") from None
    params = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}
    for key in sorted(tensors):
        if key not in params:
            raise AdapterError(f"{weights_file}: unexpected tensor {key} (no such LoRA weight here)")
        shape, need = tuple(tensors[key].shape), tuple(params[key].shape)
        r_dim = 0 if key.endswith("lora_A.weight") else 1  # A is (r, in), B is (out, r)
        if shape != need or need[r_dim] != rank:
            raise AdapterError(f"{weights_file}: tensor {key} has shape {shape}, the model needs {need} "
                               f"(adapter_config.json r={rank})")
    for key in params:
        if key not in tensors:
            raise AdapterError(f"{weights_file}: missing tensor {key}")
    for key, p in params.items():
        p.copy_(tensors[key])
    for layer in lora_layers(model).values():
        layer.set_scaling(alpha, rslora)
    model.lora_config.update(alpha=alpha, rslora=rslora)
    return model
