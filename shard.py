"""FSDP2 for `train.py --shard`: a base too big for one device, spread over the ranks of `torchrun`.

Plain `torchrun train.py` is data parallel: every rank holds the whole frozen base. With `--shard`
each rank holds 1/N of it. This is PyTorch's own engine, FSDP2 (`fully_shard` over a one-dimensional
`DeviceMesh`): every parameter becomes a DTensor cut along its first dimension, rank r keeping
rows chunk r of `torch.chunk(rows, N)`. Before a decoder layer runs, its rows are all-gathered
into whole weights, and freed again after its forward and backward:

    rank 0:  [layer 0 rows 0..k) ] [layer 1 rows 0..k) ] ...      ~1/N of every weight, always
    rank 1:  [layer 0 rows k..2k)] [layer 1 rows k..2k)] ...
                     |
        all-gather   v   (in forward, again in backward)
             [layer i, whole]      one or two layers at a time, then dropped

What is here:
- `build`: the model made on the meta device (no memory), LoRA added, each decoder layer and then
  the whole model wrapped with `fully_shard`, and only then the weights read: each rank reads just
  its own rows of each tensor from the safetensors shards (a GGUF tensor or a weight quantised to
  NF4 is made whole first and cut: the peak is one tensor, never the model).
- NF4 (`--quantize nf4`): an NF4Linear keeps its packed codes and fp32 block scales as buffers,
  and FSDP2 shards parameters only; here they become frozen parameters, 1-D, sharded like any other
  (dequantisation needs whole blocks, so it happens after the all-gather, per layer, as it does
  unsharded). Each NF4 layer is its own FSDP unit with no mixed-precision cast, so that the fp32
  scales are never rounded to bf16 and the uint8 codes are gathered as bytes.
- `gather_adapter`: the LoRA weights as whole tensors (a collective), for PEFT-format adapter files.
- `save_state` / `load_state`: the LoRA weights and AdamW state, each rank writing and reading its
  own shards with `torch.distributed.checkpoint` (DCP).
- `resident_bytes`: what this rank holds (the tests and bench/ measure it).

Left out: tensor or pipeline parallelism, CPU offload, torch.compile with sharding, --full training
(only LoRA weights train here). train.py owns the loop: the loss and the step are the same code
as data parallel.
"""
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

import lora
from cli import Error
from model import Checkpoint, skeleton
from quant import is_4bit

NF4_PARTS = ("codes", "absmax", "absmax_codes", "absmax_scale")  # NF4Linear buffers that are sharded
TRAINABLE = StateDictOptions(ignore_frozen_params=True)          # DCP saves LoRA and AdamW, never the base
INTO = StateDictOptions(ignore_frozen_params=True, strict=False)  # ... and loads them back beside it


class ShardError(Error, RuntimeError):
    """A sharded checkpoint that cannot be written or read; the message names the folder."""


def rows_of(n, rank, world):
    """The rows [start, stop) of a first dimension of n that rank `rank` holds: torch.chunk's split,
    as FSDP2 cuts it (ceil(n / world) rows each; the last ranks may get fewer, or none)."""
    size = -(-n // world)
    return min(n, rank * size), min(n, (rank + 1) * size)


def _nf4_as_parameters(layer):
    """Re-register an NF4Linear's codes and scales as frozen Parameters (FSDP2 shards only those).
    absmax_offset, one number, and the bias, one row, stay buffers: every rank keeps them whole."""
    for name in NF4_PARTS:
        if name in layer._buffers:
            t = layer._buffers.pop(name)
            layer.register_parameter(name, nn.Parameter(t, requires_grad=False))


def build(path, device, dtype, quantize, add_adapter, world, rank):
    """The model of the checkpoint at `path`, sharded over `world` ranks, this rank's rows loaded.

    add_adapter(model) adds the LoRA layers (their weights made whole on `device`, where they draw
    the same initial values as on an unsharded model); fully_shard then cuts them too. Returns the
    model, whose parameters are DTensors: call it on every rank together."""
    ckpt = Checkpoint(path)
    model = skeleton(ckpt.config, dtype, quantize)
    add_adapter(model)
    mesh = init_device_mesh(device.type, (world,))
    # on CUDA: gather bf16 weights for compute, reduce gradients in fp32; on CPU (fp32): no casts
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if dtype == torch.bfloat16 else MixedPrecisionPolicy())
    for block in model.model.layers:
        for m in block.modules():
            if is_4bit(m):
                _nf4_as_parameters(m)
                fully_shard(m, mesh=mesh)  # its own unit: no mixed-precision cast of the fp32 scales
        fully_shard(block, mesh=mesh, mp_policy=policy)
    if not ckpt.config.tie_word_embeddings:  # units of their own, gathered only while used (a shared
        fully_shard(model.model.embed_tokens, mesh=mesh, mp_policy=policy)  # weight stays in the root's)
        fully_shard(model.lm_head, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: final norm (and a tied embedding)

    # read the weights into the sharded skeleton: names as the file has them (a LoRA-wrapped layer's
    # weight lives under .base_layer), each sharded tensor's rows for this rank only
    sharded = model.state_dict()  # DTensors on the meta device, global shapes; buffers as they are
    wrapped = set(lora.lora_layers(model))

    def ours(name):
        module, _, leaf = name.rpartition(".")
        return f"{module}.base_layer.{leaf}" if module in wrapped else name

    def rows(name, shape):
        return rows_of(shape[0], rank, world) if isinstance(sharded[ours(name)], DTensor) else None

    state = {}
    for name, t in ckpt.state(skeleton(ckpt.config, dtype, quantize), dtype, device, rows):
        meta = sharded[ours(name)]
        state[ours(name)] = (DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=meta.shape,
                                                stride=meta.stride()) if isinstance(meta, DTensor) else t)
    if ckpt.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    still_meta = next((n for n, p in model.state_dict().items() if p.device.type == "meta"), None)
    if still_meta is not None:  # Checkpoint.state names a missing tensor first; this is a last guard
        raise ShardError(f"{path}: tensor {still_meta} was not loaded")
    return model


def gather_adapter(model):
    """{name: whole CPU tensor} of the LoRA weights, as lora.lora_state_dict names them. A collective:
    every rank must call it; each gets the whole adapter (a few MB to a few hundred)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in lora.lora_state_dict(model).items()}


def save_state(model, opt, folder):
    """The LoRA weights and AdamW state into `folder`, each rank writing its own shards (DCP)."""
    msd, osd = get_state_dict(model, opt, options=TRAINABLE)
    try:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)
    except Exception as e:  # DCP gathers every rank's failure into one CheckpointException
        raise ShardError(f"{folder}: cannot write the sharded checkpoint ({str(e).splitlines()[0][:300]})") from None


def load_state(model, opt, folder):
    """The LoRA weights and AdamW state from `folder` (written by save_state), each rank reading its
    own shards; DCP reads them into however this run is sharded."""
    msd, osd = get_state_dict(model, opt, options=TRAINABLE)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=folder)
    except Exception as e:
        raise ShardError(f"{folder}: cannot read the sharded checkpoint ({str(e).splitlines()[0][:300]})") from None
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=INTO)


def resident_bytes(model):
    """Bytes of parameters and buffers this rank holds: its shards, and whatever is not sharded."""
    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t
    tensors = {id(t): local(t) for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
