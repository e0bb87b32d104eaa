"""NF4: the 4-bit NormalFloat data type of QLoRA, and a frozen linear layer stored in it.

What is here: the 16 NF4 values, block-wise absmax quantisation of a weight to 4-bit codes (two per
byte) and back, QLoRA's optional double quantisation of the per-block scales, and `NF4Linear`, a
frozen linear layer that keeps only the codes and dequantises its weight on the fly, in forward and
again in backward. The code assignment matches `bitsandbytes` (`quantize_4bit(w, blocksize=64,
quant_type="nf4")`) bit for bit on CPU, so `tests/test_quant.py` can compare with it directly.

What is not: fused CUDA kernels (the weight is dequantised with plain indexing, then a normal matmul),
FP4, paged optimizers, training of the quantised weight (it is frozen; only the input gets a
gradient, which is all LoRA needs). Loading a model in 4 bits is `model.load_model(path,
quantize="nf4")`, with double-quantised scales `quantize="nf4-dq"`; `train.py --quantize nf4` uses it.

    from quant import NF4Linear
    layer = NF4Linear.from_weight(linear.weight, compute_dtype=torch.bfloat16)   # 4.5 bits per weight
    y = layer(x)                                                                   # = x @ W_nf4.T

How a weight (out, in) is packed (blocksize 64, the row-major flattening of the matrix):

    w.view(-1):  [ w0  w1 ... w63 | w64 ... w127 | ... ]        blocks of 64 values
    absmax[b]  = max |w| over block b                             (numel/64,) fp32
    code(wi)   = index of the NF4 value nearest wi / absmax[b]    0..15, ties go to the lower one
    codes[j]   = code(w_2j) << 4 | code(w_2j+1)                   (numel/2,) uint8

                 bit  7 6 5 4 | 3 2 1 0
                     code w_2j|code w_2j+1      (high nibble first, as bitsandbytes)

    dequantised wi = NF4_VALUES[code(wi)] * absmax[b], computed in fp32, then cast

Double quantisation stores the absmax constants themselves in 8 bits: subtract their mean, then
quantise them block-wise (256 per block) to bitsandbytes' signed 8-bit "dynamic" map. That takes a
weight from 4 + 32/64 = 4.5 bits to 4 + 8/64 + 32/(64*256) = 4.127 bits. Here each scale takes the
nearest 8-bit code; bitsandbytes' CPU search is approximate and differs on ~0.2% of them.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The 16 NF4 values: quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0 (QLoRA, appendix E).
NF4_VALUES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
# A value is given the nearest code: the boundaries are the midpoints between neighbours (in fp32).
NF4_BOUNDS = (NF4_VALUES[:-1] + NF4_VALUES[1:]) / 2
# Dequantisation looks up one byte at a time: byte -> (value of its high nibble, value of its low).
_BYTE_TABLE = torch.stack([NF4_VALUES[torch.arange(256) >> 4], NF4_VALUES[torch.arange(256) & 15]], 1)
_ON_DEVICE = {}   # (name, device) -> a table copied there once, not on every forward


def _table(name, t, device):
    if (name, device) not in _ON_DEVICE:
        _ON_DEVICE[name, device] = t.to(device)
    return _ON_DEVICE[name, device]


def quantize_nf4(w, blocksize=64):
    """w (any shape, numel even) -> codes (numel/2,) uint8, absmax (ceil(numel/blocksize),) fp32."""
    flat = w.reshape(-1)
    assert flat.numel() % 2 == 0, f"NF4 packs two values per byte; got {flat.numel()} values"
    step = blocksize * 2**14      # 1M values at a time: the fp32 temporaries stay small, even for 7B
    parts = [_quantize_nf4(flat[i:i + step], blocksize) for i in range(0, flat.numel(), step)]
    return torch.cat([c for c, _ in parts]), torch.cat([a for _, a in parts])


def _quantize_nf4(flat, blocksize):
    n = flat.numel()
    flat = F.pad(flat.float(), (0, -n % blocksize))         # a last, partial block: pad with zeros
    blocks = flat.view(-1, blocksize)                        # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)                        # (n_blocks,)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]   # times the reciprocal, as bitsandbytes
    idx = torch.bucketize(scaled.clamp_(-1, 1), _table("bounds", NF4_BOUNDS, flat.device), out_int32=True)
    idx = idx.view(-1)[:n].to(torch.uint8)                   # (n,) codes 0..15
    return idx[0::2] << 4 | idx[1::2], absmax                # (n/2,) uint8, high nibble first


def dequantize_nf4(codes, absmax, shape, dtype=torch.float32, blocksize=64):
    """codes (numel/2,) uint8, absmax (n_blocks,) fp32 -> a tensor of `shape` in `dtype`."""
    n = math.prod(shape)
    table = _table("bytes", _BYTE_TABLE, codes.device)
    values = table[codes.int()].view(-1)                  # (numel,) fp32: each byte -> two NF4 values
    if values.numel() < absmax.numel() * blocksize:       # a last, partial block
        values = F.pad(values, (0, absmax.numel() * blocksize - values.numel()))
    w = values.view(-1, blocksize).mul_(absmax[:, None])  # (n_blocks, blocksize) fp32
    return w.view(-1)[:n].to(dtype).view(shape)


# ----------------------------------------------------------------------------- double quantisation

def dynamic_map():
    """bitsandbytes' signed 8-bit 'dynamic' map (create_dynamic_map()): 256 sorted values in [-1, 1]:
    0, 1, and +-10^e times the midpoints of 2^(e+6) equal steps of [0.1, 1], for e = -6..0."""
    values = [0.0, 1.0]
    for i in range(7):
        steps = torch.linspace(0.1, 1, 2**i + 1)
        means = (steps[:-1] + steps[1:]) / 2.0
        values += (10.0 ** (i - 6) * means).tolist() + (-(10.0 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values))


_DYNAMIC = dynamic_map()


def quantize_absmax(absmax, blocksize=256):
    """fp32 absmax (n,) -> (codes (n,) uint8, scale (ceil(n/blocksize),) fp32, offset () fp32)."""
    offset = absmax.mean()
    x = absmax - offset
    n, code = x.numel(), _table("dynamic", _DYNAMIC, x.device)
    blocks = F.pad(x, (0, -n % blocksize)).view(-1, blocksize)     # (n_blocks, blocksize)
    scale = blocks.abs().amax(dim=1)                                # (n_blocks,)
    normed = (blocks / scale.clamp(min=1e-38)[:, None]).view(-1)[:n]
    # nearest of the 256 values; a tie keeps the lower one (bitsandbytes' CPU binary search)
    i = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, 254)
    i += ((code[i + 1] - normed).abs() < (normed - code[i]).abs()).long()
    return i.to(torch.uint8), scale, offset


def dequantize_absmax(codes, scale, offset, blocksize=256):
    n = codes.numel()
    values = F.pad(_table("dynamic", _DYNAMIC, codes.device)[codes.int()], (0, -n % blocksize))
    return (values.view(-1, blocksize) * scale[:, None]).view(-1)[:n] + offset


# ----------------------------------------------------------------------------- the layer

class _DequantLinear(torch.autograd.Function):
    """y = x @ W.T, W dequantised in forward and again in backward, so no (out, in) tensor is saved
    between them. W is frozen: backward returns the gradient of x only."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer                    # only a reference to the 4-bit codes: nothing weight-sized
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None    # (..., out) @ (out, in)


class NF4Linear(nn.Module):
    """A frozen nn.Linear stand-in whose weight is kept as NF4 codes (buffers, no Parameters).

    The input is cast to the compute dtype (autocast's dtype while autocast is on), the weight is
    dequantised to it, and the output comes back in it. Build one with `NF4Linear.from_weight`."""

    def __init__(self, in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                 blocksize=64, double_quant=False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.blocksize, self.double_quant = compute_dtype, blocksize, double_quant
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("codes", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // 256), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_weight(cls, weight, compute_dtype=torch.bfloat16, bias=None, blocksize=64,
                    double_quant=False, device=None):
        """Quantise an (out, in) weight (any float dtype), on `device` if given, else where it is."""
        weight = weight.detach().to(device or weight.device)
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                    blocksize=blocksize, double_quant=double_quant, device="meta")
        layer.codes, absmax = quantize_nf4(weight, blocksize)
        if double_quant:
            layer.absmax_codes, layer.absmax_scale, layer.absmax_offset = quantize_absmax(absmax)
        else:
            layer.absmax = absmax
        if bias is not None:
            layer.bias = bias.detach().to(weight.device, compute_dtype)
        return layer

    def get_absmax(self):
        """The fp32 scale of each block of `blocksize` weights."""
        if self.double_quant:
            return dequantize_absmax(self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return self.absmax

    def dequantize(self, dtype=None):
        """The (out, in) weight in `dtype` (default: the compute dtype). A new tensor every call."""
        return dequantize_nf4(self.codes, self.get_absmax(), (self.out_features, self.in_features),
                              dtype or self.compute_dtype, self.blocksize)

    def forward(self, x):
        on = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if on else self.compute_dtype
        y = _DequantLinear.apply(x.to(dtype), self)           # (..., out_features)
        return y if self.bias is None else y + self.bias.to(dtype)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move the fp32 scales, never round them: re-take the originals.
        keep = {k: b for k, b in self._buffers.items() if k != "bias" and b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for k, b in keep.items():
            self._buffers[k] = b.to(self._buffers[k].device)
        return self

    def extra_repr(self):
        dq = ", double_quant=True" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, nf4{dq}")


def is_4bit(module):
    """The one test for "a frozen 4-bit base layer" (it holds codes, not a weight Parameter), used by
    model.py (parameter counts, save_model) and lora.py (wrapping, merging): NF4Linear, or any layer
    that, like it, is not an nn.Linear but has in_features, out_features and dequantize()."""
    return isinstance(module, NF4Linear) or (not isinstance(module, nn.Linear) and all(
        hasattr(module, a) for a in ("in_features", "out_features", "dequantize")))
