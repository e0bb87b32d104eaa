"""Train a LoRA rating classifier, one run per command; with no arguments, run the demo experiment.

    python train.py                                     # the demo: label vs explanation, on CPU, in minutes
    python train.py --model DIR --data train.jsonl --variant explanation --out runs/expl-s0
    python train.py --model DIR --data train.jsonl --variant label --out runs/x --dry-run
    python train.py grid --model DIR --data train.jsonl --variants label,explanation,shuffled --seeds 0,1,2 --out runs/grid
    torchrun --nproc_per_node=2 train.py --model DIR --data train.jsonl --out runs/ddp
    torchrun --nproc_per_node=4 train.py --model DIR --data train.jsonl --out runs/big --shard

One loop serves every case: bf16 autocast and activation checkpointing on CUDA, fp32 on CPU; the
loss of a global batch is the sum over its target tokens divided by the number of target tokens in
the whole global batch (every micro-batch, every rank), so neither the micro-batch size nor the
number of processes changes the result. Under torchrun every rank holds the whole frozen base (data
parallel), or with `--shard` 1/N of it, and of the LoRA weights and AdamW state (FSDP2, shard.py):
the loop is the same. `--full` trains every weight with loss on every token of a
plain-text corpus: the demo pretrains its tiny base model that way.

A run folder (runs.py: `train_config.json`, `metrics.jsonl`, `last/` and `best/` PEFT-format
adapters, `done.json` when finished) is claimed, written and resumed through `runs.Run`: one writer
at a time, checkpoints renamed into place, so a crash never leaves half of one.
Left out: model code (model.py, lora.py), data handling (data.py), metrics (eval.py), the folder's
files (runs.py).

Length: ~715 lines, one concern: a training run as a user launches it. Its config and checks, the
stages of `run` in the order they happen, the grid of variants x seeds and the command line.
"""
import cli  # first, so that Ctrl-C while torch loads is one line too (cli.py)
import contextlib
import gc
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import data
import lora
import runs
import shard
from data import ORDERS, TEMPLATES, VARIANTS
from eval import rating_logits
from model import DTYPES, Transformer, load_config, load_model, save_model
from runs import Run


@dataclass
class TrainConfig:
    """Every setting of a run, each with its default. The comment beside a field is its --help text
    (cli.py reads this class's source), so a default and its explanation live in one place."""
    model: str = ""                   # base checkpoint: an HF folder with its tokenizer, or a .gguf file
    data: str = ""                    # training records (.jsonl or .csv); with --full, a plain-text corpus
    out: str = "runs/run"             # run folder
    variant: Literal[VARIANTS] = "explanation"  # what follows the rating in each target (design.md)
    rating_weight: bool = False       # weight the rating token's loss to its share in 'label' (dilution control)
    order: Literal[ORDERS] = "rating_first"    # rating first (read in one pass) or explanation first
    template: Literal[TEMPLATES] = "auto"      # auto: the checkpoint's chat format, else base
    axes: str = ""                    # comma-separated axes to train on; empty: all in the data
    axes_file: str = ""               # descriptions of axes beyond the built-in three (JSON or 'axis: text' lines)
    datasets: str = ""                # comma-separated datasets to train on; empty: all in the data
    full: bool = False                # train every weight, loss on every token (pretraining), no LoRA
    rank: int = 16                    # LoRA rank
    alpha: float = 32.0               # LoRA alpha (scale = alpha / rank)
    lora_dropout: float = 0.05        # dropout on the LoRA path
    targets: str = ",".join(lora.TARGETS)  # linear layers that get LoRA
    rslora: bool = False              # scale = alpha / sqrt(rank)
    lr: float = 2e-4                  # peak learning rate
    min_lr_ratio: float = 0.1         # the cosine schedule ends at lr * this
    warmup: float = 0.05              # linear warm-up, as a fraction of the steps
    weight_decay: float = 0.0         # AdamW weight decay
    grad_clip: float = 1.0            # clip the global gradient norm (0: off)
    batch_size: int = 16              # global batch, in examples (all micro-batches and ranks)
    micro_batch: int = 4              # examples per forward pass on each rank
    epochs: float = 1.0               # passes over the training split
    steps: int = 0                    # optimizer steps; when given, wins over --epochs
    max_len: int = 512                # tokens per example; old conversation turns are cut first
    seed: int = 0                     # LoRA init, dropout, pseudo-explanations and batch order
    val_every: int = 100              # validate every N steps (and at the end)
    save_every: int = 100             # checkpoint every N steps (and at the end)
    log_every: int = 10               # progress line and metrics row every N steps
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    dtype: Literal[("auto", *DTYPES)] = "auto"      # auto: bf16 on CUDA, fp32 on CPU
    quantize: Literal["", "nf4", "nf4-dq"] = ""      # nf4: frozen 4-bit base (QLoRA-style); nf4-dq: its scales in 8 bits too
    checkpointing: bool = True        # activation checkpointing, one block at a time
    shard: bool = False               # under torchrun: split the base, LoRA and AdamW state over the ranks (FSDP2) instead of a whole base each
    compile: bool = False             # torch.compile the model
    skip_bad: bool = False            # skip (and count) malformed records instead of stopping
    resume: bool = False              # continue from the newest complete checkpoint in --out
    overwrite: bool = False           # replace a finished run in --out
    dry_run: bool = False             # print the plan and exit


class TrainError(cli.Error, RuntimeError):
    """A run that cannot start or continue; the message says why and what was kept."""


# ----------------------------------------------------------------------------- pieces of a run

def setup_distributed(device):
    """(rank, world) from torchrun's environment; a process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the device mesh of --shard takes each rank's current device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def resolve_device(cfg):
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def lr_at(step, total, cfg):
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    warm = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def n_targets(example):
    """Loss weight of one example: its target tokens (the positions whose next token carries loss),
    the rating token counted with its weight (1 unless --rating-weight)."""
    return sum(1 for t in example.labels[1:] if t != data.IGNORE_INDEX) - 1 + example.rating_weight


def loss_sum(model, batch, weighted=True):
    """Cross-entropy summed over the target tokens of a collated batch, each with its weight from
    batch["weights"] when there is one (the rating token's differs with --rating-weight); the LM head
    runs only on those positions."""
    mask = batch["targets"] != data.IGNORE_INDEX                                   # (B, T)
    logits = model(batch["input_ids"], logits_at=mask)                              # (N, V)
    loss = F.cross_entropy(logits.float(), batch["targets"][mask], reduction="none")  # (N,)
    return (loss * batch["weights"][mask]).sum() if weighted and "weights" in batch else loss.sum()


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def validate(model, examples, tok, cfg, device, autocast, rank=0, world=1):
    """Validation loss per target token, and rating accuracy read at the decision position
    (teacher-forced for explanation-first runs: the explanation given is the real one). With several
    processes each takes every world-th micro-batch and the sums are added up; all get the result.
    A rank with fewer runs a last pass that counts nothing, so that a sharded model's all-gathers
    meet on every rank."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, target tokens, correct ratings (NCCL: on the GPU)
    rating_ids = data.rating_token_ids(tok)
    micros = data.batch_indices(examples, cfg.micro_batch, seed=0, epoch=0)
    for k in range(rank, -(-len(micros) // world) * world, world):
        idx = micros[k] if k < len(micros) else micros[0]
        batch = to_device(data.collate([examples[i] for i in idx], tok.pad_id), device)
        with autocast:
            loss = loss_sum(model, batch, weighted=False).item()  # per token, comparable across runs
            correct = 0
            if not cfg.full:
                pred = rating_logits(model, batch, rating_ids).argmax(-1) + 1
                correct = (pred == batch["label"]).sum().item()
        if k < len(micros):
            sums += torch.tensor([loss, int((batch["targets"] != data.IGNORE_INDEX).sum()), correct],
                                 dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    total, n_tok, correct = sums.tolist()
    return {"val_loss": total / max(1, n_tok), "val_acc": correct / max(1, len(examples))}


# ----------------------------------------------------------------------------- the run folder

# settings a --resume may change: they leave the trained result as it was (micro-batches up to float
# rounding); every other setting must equal the saved run's
RESUMABLE = ("device", "compile", "checkpointing", "micro_batch", "val_every", "save_every", "log_every")
# (--shard is not among them: a sharded checkpoint keeps its optimizer state as DCP shards)
HOW = ("resume", "overwrite", "dry_run")  # how the command treats the folder, not what the run is


def saved_settings(cfg):
    """The settings as train_config.json stores them: absolute paths, so that eval.py and analysis.py
    find the base and the data from anywhere, and the data file's sha256, so that a --resume on data
    whose contents changed under the same name is refused."""
    settings = asdict(replace(cfg, model=os.path.abspath(cfg.model), data=os.path.abspath(cfg.data)))
    return dict(settings, data_sha256=runs.sha256(cfg.data))


def claim_out(cfg, rank, world):
    """The run folder, claimed by rank 0 (runs.Run.claim: the lock, then resume / overwrite checks);
    every rank gets rank 0's verdict, so a refusal stops all of them and no rank ever reads a folder
    that rank 0 is changing."""
    run, problem = Run(cfg.out), None
    if rank == 0:
        try:
            settings = {k: v for k, v in saved_settings(cfg).items() if k not in HOW}
            run.claim(settings, asdict(TrainConfig()), RESUMABLE, cfg.resume, cfg.overwrite)
        except cli.Error as e:
            problem = str(e)
    if world > 1:
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem:
        raise TrainError(problem)
    return run


def weights(cfg, model, gathered=None):
    """What a checkpoint holds: the adapter in PEFT's format, or with --full the whole model and its
    tokenizer. Returns the function that writes it into a folder; weights that are not all finite are
    never written (the checkpoint already on disk stays). `gathered`: a sharded model's LoRA weights,
    whole (shard.gather_adapter)."""
    def write(folder):
        named = gathered.items() if gathered is not None else (
            (n, p) for n, p in model.named_parameters() if p.requires_grad)
        bad = next((n for n, p in named if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise TrainError(f"{bad}: non-finite weights; not saved. Last good checkpoint: "
                             f"{Run(cfg.out).latest() or 'none yet'}")
        if cfg.full:
            save_model(model, folder)
            shutil.copy(os.path.join(cfg.model, "tokenizer.model"), folder)
        else:
            lora.save_adapter(model, folder, base_model_name=os.path.abspath(cfg.model), state=gathered)
    return write


# ----------------------------------------------------------------------------- building a run

def load_data(cfg, tok):
    """Examples for the train and val splits (the test split is eval.py's)."""
    if cfg.full:
        ex = data.text_examples(cfg.data, tok, cfg.max_len)
        n_val = max(1, len(ex) // 20)
        return ex[n_val:], ex[:n_val]
    axes = cfg.axes_file or None
    records = data.keep(data.load_records(cfg.data, skip_bad=cfg.skip_bad, need_explanation=cfg.variant != "label",
                                          axes=axes), cfg.axes, cfg.datasets)
    split = {"train": [], "val": []}
    for r in records:
        split.get(data.split_of(r["id"]), []).append(r)
    if not split["train"]:
        raise TrainError(f"{cfg.data}: no training records left after the split and the axis/dataset filters")
    build = dict(variant=cfg.variant, order=cfg.order, template=cfg.template, max_len=cfg.max_len, seed=cfg.seed,
                 rating_weight=cfg.rating_weight, axes=axes)
    # pseudo-explanations draw on the training explanations only, so val examples use the same pool
    return (data.build_examples(split["train"], tok, **build),
            data.build_examples(split["val"], tok, pool=split["train"], **build) if split["val"] else [])


def estimate_memory(model_cfg, n_trainable, cfg, dtype, world=1):
    """A rough peak-memory estimate in bytes, per process: weights, LoRA + AdamW state, activations.
    With --shard over `world` processes a rank holds 1/world of the weights and of the LoRA + AdamW
    state, plus two decoder layers gathered whole (the one computing and the next, prefetched)."""
    c = model_cfg
    with torch.device("meta"):  # every base weight, counted (tied embeddings once, q/k/v biases), none stored
        n_base = Transformer(c).n_params()
    # bytes per weight: 4-bit codes + an fp32 scale per 64 (nf4), or an 8-bit scale + fp32 per 256 of those (nf4-dq)
    per = {"nf4": 0.5 + 4 / 64, "nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256)}.get(cfg.quantize, torch.finfo(dtype).bits / 8)
    weights = n_base * per
    trainable = n_trainable * 4 * 4  # fp32 weight, gradient, two Adam moments
    if cfg.shard:
        layer = (n_base - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)) / c.n_layers * per
        weights, trainable = weights / world + 2 * layer, trainable / world
    tokens = cfg.micro_batch * cfg.max_len
    act_bytes = 2 if dtype == torch.bfloat16 else 4
    per_layer = tokens * (10 * c.hidden_size + 4 * c.intermediate_size) * act_bytes
    acts = tokens * c.hidden_size * act_bytes * c.n_layers + per_layer if cfg.checkpointing else per_layer * c.n_layers
    return weights + trainable + acts


# dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name;
# the first match wins, so the longer names come first ("H100 PCIe" before "H100", "L40S" before "L4")
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H100", 989e12),
                   ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
                   ("L4", 121e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12)]


def peak_flops(device):
    """The datasheet bf16 peak of a CUDA device (the MFU denominator); None elsewhere or when unknown."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


# ----------------------------------------------------------------------------- the run, stage by stage

# every number a run takes, with the range it must lie in: (low, high, whether low itself is allowed);
# NaN and infinities fail every comparison, so they are refused here too, before anything is written
RANGES = {"rank": (0, 4096, False), "alpha": (0, 1e6, False), "lora_dropout": (0, 1 - 1e-9, True),
          "lr": (0, 10, False), "min_lr_ratio": (0, 1, True), "warmup": (0, 1 - 1e-9, True),
          "weight_decay": (0, 10, True), "grad_clip": (0, 1e6, True), "batch_size": (0, 1 << 20, False),
          "micro_batch": (0, 1 << 20, False), "epochs": (0, 1e6, False), "steps": (0, 1 << 40, True),
          "max_len": (0, 1 << 24, False), "val_every": (0, 1 << 40, False), "save_every": (0, 1 << 40, False),
          "log_every": (0, 1 << 40, False)}


def check_options(cfg, world):
    if cfg.variant not in data.VARIANTS:
        raise TrainError(f"unknown variant {cfg.variant!r}; variants: {', '.join(data.VARIANTS)}")
    for name, (low, high, closed) in RANGES.items():
        x = getattr(cfg, name)
        if not (isinstance(x, (int, float)) and (low <= x if closed else low < x) and x <= high):
            where = f"{'[' if closed else '('}{low:g}, {high:g}]"
            raise TrainError(f"--{name.replace('_', '-')} must be a finite number in {where}, got {x}")
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume and --overwrite contradict each other: continue the run, or replace it")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise TrainError(f"--out {cfg.out} is a file, not a run folder")
    if cfg.batch_size < world:
        raise TrainError(f"--batch-size {cfg.batch_size} is smaller than the number of processes ({world})")
    if cfg.shard and not cfg.dry_run and "WORLD_SIZE" not in os.environ:
        raise TrainError("--shard splits the model over the processes of torchrun: launch it with "
                         "torchrun --nproc_per_node=N train.py ... --shard")
    if cfg.shard and (cfg.full or cfg.compile):
        raise TrainError(f"--shard trains LoRA weights without torch.compile; it does not take "
                         f"{'--full' if cfg.full else '--compile'}")


def build(cfg, device, dtype, rank=0, world=1):
    """(tokenizer, train examples, val examples, model, trainable count): everything that can fail on
    bad input, done before anything in --out is touched."""
    model_cfg = load_config(cfg.model)
    tok = data.Tokenizer(cfg.model)
    data.check_vocab(tok, model_cfg.vocab_size, cfg.model)
    train_ex, val_ex = load_data(cfg, tok)
    if cfg.dry_run:  # the plan needs shapes, not weights
        with torch.device("meta"):
            model = Transformer(model_cfg)
    elif cfg.shard:  # built on the meta device, LoRA added, sharded, then each rank reads its rows
        box = []

        def add_adapter(skeleton):  # LoRA made whole on the device: the same initial values as unsharded
            torch.manual_seed(cfg.seed)
            box.append(lora.add_lora(skeleton, cfg.rank, cfg.alpha, cfg.lora_dropout,
                                     targets=tuple(cfg.targets.split(",")), rslora=cfg.rslora, device=device))
        model = shard.build(cfg.model, device, dtype, cfg.quantize or None, add_adapter, world, rank)
        model.gradient_checkpointing = cfg.checkpointing
        return tok, train_ex, val_ex, model, box[0]
    else:
        # --full trains every weight: fp32 master weights (autocast still computes in bf16 on CUDA)
        model = load_model(cfg.model, device=device, dtype=torch.float32 if cfg.full else dtype,
                           quantize=cfg.quantize or None)
    if cfg.full:
        model.float().requires_grad_(True)
        n_trainable = model.n_params()
    else:
        torch.manual_seed(cfg.seed)  # the LoRA initialisation depends on the seed only
        n_trainable = lora.add_lora(model, cfg.rank, cfg.alpha, cfg.lora_dropout,
                                    targets=tuple(cfg.targets.split(",")), rslora=cfg.rslora)
    model.gradient_checkpointing = cfg.checkpointing
    return tok, train_ex, val_ex, model, n_trainable


def print_plan(log, cfg, model, n_trainable, train_ex, val_ex, total, device, dtype, world):
    """The numbers worth a look before a long run (nanoGPT prints the same kind at start-up)."""
    tokens_epoch = sum(len(e.input_ids) for e in train_ex)
    targets_epoch = sum(n_targets(e) for e in train_ex)
    log(f"model      {cfg.model}  {model.config.arch}, {model.n_params() / 1e6:.1f}M parameters, "
        f"{cfg.quantize.upper() + ' base, ' if cfg.quantize else ''}{dtype} on {device}{f' x {world} processes' if world > 1 else ''}"
        f"{', sharded (FSDP2)' if cfg.shard else ''}")
    log(f"trainable  {n_trainable:,} ({'all weights' if cfg.full else f'LoRA r={cfg.rank} alpha={cfg.alpha:g} on {cfg.targets}'})")
    log(f"data       {len(train_ex)} train / {len(val_ex)} val examples, {tokens_epoch:,} tokens "
        f"({targets_epoch:,.0f} target) per epoch, " + ("plain text" if cfg.full else f"variant {cfg.variant}, {cfg.order}"
                                                        + (", rating token weighted" if cfg.rating_weight else "")))
    log(f"schedule   {total} steps of {cfg.batch_size} examples ({cfg.micro_batch} per micro-batch), "
        f"~{tokens_epoch / max(1, len(train_ex)) * cfg.batch_size:,.0f} tokens/step, lr {cfg.lr:g}, "
        f"checkpointing {'on' if cfg.checkpointing else 'off'}, fused AdamW {'on' if device.type == 'cuda' else 'off'}")
    per_rank = " per process" if world > 1 or cfg.shard else ""
    log(f"memory     ~{estimate_memory(model.config, n_trainable, cfg, dtype, world) / 2**30:.2f} GiB estimated peak"
        f"{per_rank}")
    if cfg.shard:  # what another torchrun --nproc_per_node would take
        log("           with --shard: " + ", ".join(
            f"{n} processes ~{estimate_memory(model.config, n_trainable, cfg, dtype, n) / 2**30:.2f} GiB each"
            for n in sorted({1, 2, 4, 8, world})))


def plan(cfg, device, dtype, rank, world, log):
    """Check the options, build the model, adapter and examples, print the plan. Returns (tokenizer,
    train examples, val examples, model, steps per epoch, total steps)."""
    check_options(cfg, world)
    torch.manual_seed(cfg.seed)
    tok, train_ex, val_ex, model, n_trainable = build(cfg, device, dtype, rank, world)
    if not train_ex:
        raise TrainError(f"{cfg.data}: no training example fits in --max-len {cfg.max_len}")
    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    print_plan(log, cfg, model, n_trainable, train_ex, val_ex, total, device, dtype, world)
    return tok, train_ex, val_ex, model, steps_per_epoch, total


@dataclass
class Loop:
    """What every step of a run uses and nothing changes: the module that trains (compiled and/or in
    DDP), its trainable parameters, AdamW, the autocast context (bf16 when the run is bf16, else none)."""
    cfg: TrainConfig
    run: Run
    model: torch.nn.Module          # the Transformer itself: what is saved and validated
    train_model: torch.nn.Module    # what the forward passes go through
    params: list
    opt: torch.optim.Optimizer
    autocast: object
    device: torch.device
    rank: int
    world: int
    loss_hook: object = None        # loss_hook(step, loss) may replace the loss (the tests inject a NaN)

    @property
    def log(self):
        return print if self.rank == 0 else (lambda *a, **k: None)


def setup(cfg, run, model, device, dtype, rank, world, loss_hook=None):
    if world > 1:  # a distinct dropout stream per rank (the LoRA initialisation was the same on all)
        torch.manual_seed(cfg.seed * 1_000_003 + rank)
    train_model = torch.compile(model) if cfg.compile else model
    if world > 1 and not cfg.shard:  # (a sharded model reduces its gradients itself)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16
                else contextlib.nullcontext())
    return Loop(cfg, run, model, train_model, params, opt, autocast, device, rank, world, loss_hook)


def resume(loop):
    """(step, best) from the newest checkpoint in the run folder, with the optimizer and every rank's
    RNG state restored; (0, None) when there is none or --resume was not given."""
    cfg, model, device = loop.cfg, loop.model, loop.device
    state, ckpt = loop.run.load_state() if cfg.resume else (None, None)
    if state is None:
        return 0, None
    ranks = state.get("rng_ranks") or [(state["rng"], state.get("cuda_rng"))]
    if len(ranks) != loop.world:  # each rank's dropout stream goes on where it stopped: as many ranks
        raise TrainError(f"{ckpt}: saved by {len(ranks)} process(es), resumed with {loop.world}; resume with as many")
    if cfg.shard:  # LoRA and AdamW from the ranks' shards
        shard.load_state(model, loop.opt, os.path.join(ckpt, runs.SHARDS))
    elif cfg.full:
        model.load_state_dict(load_model(ckpt, device=device, dtype=torch.float32).state_dict())
        loop.opt.load_state_dict(state["optimizer"])
    else:
        lora.load_adapter(model, ckpt)
        loop.opt.load_state_dict(state["optimizer"])
    cpu_rng, cuda_rng = ranks[loop.rank]
    torch.set_rng_state(cpu_rng)
    if device.type == "cuda" and cuda_rng is not None:  # LoRA dropout on CUDA draws from this one
        torch.cuda.set_rng_state(cuda_rng, device)
    loop.log(f"resumed    from {ckpt} at step {state['step']}")
    return state["step"], state["best"]


def optimizer_step(loop, train_ex, global_batch, pad_id, step, total):
    """Forward and backward over this rank's micro-batches of one global batch, then one AdamW step.
    Returns (mean loss per target token over the global batch, tokens this rank saw)."""
    cfg, rank, world = loop.cfg, loop.rank, loop.world
    n_tok = sum(n_targets(train_ex[i]) for i in global_batch)                    # whole global batch
    mine = global_batch[rank * len(global_batch) // world:(rank + 1) * len(global_batch) // world]
    # a rank left without examples (a short last batch) still runs one pass with zero weight, so that
    # every rank meets DDP's gradient all-reduce: otherwise the others would wait for it for ever
    weight = 1.0 if mine else 0.0
    mine = mine or global_batch[:1]
    micros = [mine[i:i + cfg.micro_batch] for i in range(0, len(mine), cfg.micro_batch)]
    for group in loop.opt.param_groups:
        group["lr"] = lr_at(step, total, cfg)
    step_loss, tokens = torch.zeros((), device=loop.device), 0
    for j, micro in enumerate(micros):
        batch = to_device(data.collate([train_ex[i] for i in micro], pad_id), loop.device)
        sync = j == len(micros) - 1 or world == 1
        if cfg.shard:  # gradients reduce-scattered after the last micro-batch only, as DDP's no_sync
            loop.train_model.set_requires_gradient_sync(sync)
        with (contextlib.nullcontext() if sync or cfg.shard else loop.train_model.no_sync()), loop.autocast:
            loss = loss_sum(loop.train_model, batch) * weight
            if loop.loss_hook is not None:
                loss = loop.loss_hook(step, loss)
            # DDP and FSDP2 average gradients over ranks; scaling by world makes that a sum
            (loss * world / n_tok).backward()
        step_loss += loss.detach()
        tokens += int(batch["attention_mask"].sum()) if weight else 0
    if world > 1:
        dist.all_reduce(step_loss)
    gnorm = torch.nn.utils.clip_grad_norm_(loop.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if isinstance(gnorm, DTensor):  # sharded gradients: the norm over all ranks' shards
        gnorm = gnorm.full_tensor()
    if not (torch.isfinite(step_loss) and torch.isfinite(gnorm)):
        raise TrainError(f"step {step + 1}: non-finite {'loss' if not torch.isfinite(step_loss) else 'gradient'}; "
                         f"stopped without updating. Last good checkpoint: {loop.run.latest() or 'none yet'}")
    loop.opt.step()
    loop.opt.zero_grad(set_to_none=True)
    return step_loss.item() / n_tok, tokens


def training_state(loop, step, best):
    """What --resume needs besides the adapter; the CPU and CUDA RNG states of every rank (gathered
    on all ranks: each rank draws its own dropout masks). A sharded run's AdamW state is not here:
    each rank writes its part into the checkpoint's shards/ (shard.save_state)."""
    device = loop.device
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None)
    ranks = [mine]
    if loop.world > 1:
        ranks = [None] * loop.world
        dist.all_gather_object(ranks, mine)
    return {"optimizer": None if loop.cfg.shard else loop.opt.state_dict(), "step": step, "best": best,
            "rng": ranks[0][0], "cuda_rng": ranks[0][1], "rng_ranks": ranks if loop.world > 1 else None}


def validate_and_keep_best(loop, val_ex, tok, step, best):
    """Validation, its micro-batches shared among the ranks; best/ is rewritten (by rank 0) when
    (rating accuracy, -loss) improves. Returns (the validation metrics, the best key so far)."""
    last_val = validate(loop.model, val_ex, tok, loop.cfg, loop.device, loop.autocast, loop.rank, loop.world)
    loop.log(f"  val loss {last_val['val_loss']:.4f} | rating accuracy {last_val['val_acc']:.3f}", flush=True)
    if not math.isfinite(last_val["val_loss"]):  # best/ and last/ keep the last finite model
        raise TrainError(f"step {step}: non-finite validation loss; stopped. Last good checkpoint: "
                         f"{loop.run.latest() or 'none yet'}")
    if loop.rank == 0:
        loop.run.log({"step": step, **last_val})
    if best is None or (last_val["val_acc"], -last_val["val_loss"]) > tuple(best):  # the same on every rank
        best = [last_val["val_acc"], -last_val["val_loss"]]
        gathered = shard.gather_adapter(loop.model) if loop.cfg.shard else None  # (every rank takes part)
        if loop.rank == 0:
            loop.run.save(runs.BEST, weights(loop.cfg, loop.model, gathered))
    if loop.world > 1:
        dist.barrier()
    return last_val, best


def checkpoint(loop, step, best):
    """last/ with the training state, written by rank 0 (the first one retires a run that
    --overwrite moved aside). A sharded run's ranks first write their shards of LoRA and AdamW into
    last.tmp/shards/ together, then rank 0 adds the gathered adapter and renames it into place."""
    state = training_state(loop, step, best)
    gathered = None
    if loop.cfg.shard:
        if loop.rank == 0:
            loop.run.stage(runs.LAST)
        if loop.world > 1:
            dist.barrier()
        shard.save_state(loop.model, loop.opt, loop.run.file(runs.LAST + ".tmp", runs.SHARDS))
        gathered = shard.gather_adapter(loop.model)
    if loop.rank == 0:
        loop.run.save(runs.LAST, weights(loop.cfg, loop.model, gathered), state, staged=loop.cfg.shard)
    if loop.world > 1:
        dist.barrier()


def progress_row(step, total, first_step, loss, lr, tokens_seen, elapsed, model, device, world):
    """One metrics row and its progress line: loss, speed, memory and MFU on CUDA, time left."""
    tps = tokens_seen * world / elapsed
    row, extra = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tps}, ""
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        extra += f" | {row['peak_mem_gib']:.1f} GiB"
        if peak := peak_flops(device):  # LoRA on a frozen base: forward 2N + backward to activations 2N per token
            n_base = model.n_params() - sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
            row["mfu"] = 4 * n_base * tps / world / peak
            extra += f" | MFU {row['mfu']:.1%}"
    eta = elapsed / (step - first_step) * (total - step)
    line = (f"step {step:>5}/{total} | loss {loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s{extra} "
            f"| {eta / 60:.1f} min left")
    return row, line


class Interrupt:
    """The first Ctrl-C (SIGINT) is noted and the run stops after the step in progress, with a
    checkpoint; a second one interrupts at once. Only in one process, on the main thread: with
    several, torchrun's ranks would not agree on the step."""

    def __init__(self, enabled=True):
        self.requested, self.old = False, None
        if enabled and threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._note)

    def _note(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def close(self):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
            self.old = None


# ----------------------------------------------------------------------------- the run

def run(cfg, loss_hook=None):
    """Train one run as configured; returns its final validation metrics. loss_hook(step, loss),
    when given, may replace the loss (the tests inject a NaN with it)."""
    device, dtype = resolve_device(cfg)
    rank, world = setup_distributed(device)
    log = print if rank == 0 else (lambda *a, **k: None)
    # build and plan: every check of the model, tokenizer, data and options before --out is touched
    tok, train_ex, val_ex, model, steps_per_epoch, total = plan(cfg, device, dtype, rank, world, log)
    if cfg.dry_run:
        return None
    run_dir = claim_out(cfg, rank, world)
    stop = Interrupt(enabled=world == 1)  # Ctrl-C ends the run after the step in progress, with a checkpoint
    loop = None
    try:
        if run_dir.finished:  # --resume of a finished run: nothing to do, and done.json stays as it is
            log(f"{cfg.out}: finished already ({runs.DONE}); nothing to resume")
            return {k: v for k, v in (run_dir.done or {}).items() if k.startswith("val_")} or None
        loop = setup(cfg, run_dir, model, device, dtype, rank, world, loss_hook)
        # resume: the checkpoint first, then the record of the settings (checked equal by claim_out)
        step, best = resume(loop)
        if rank == 0:
            run_dir.write_config(saved_settings(cfg))
            run_dir.keep_metrics_until(step)
        loop.train_model.train()
        batches, t0, tokens_seen, losses, last_val, first_step = {}, time.time(), 0, [], None, step
        while step < total:
            # one optimizer step on the next global batch (a pure function of seed, epoch and step)
            epoch, k = divmod(step, steps_per_epoch)
            if epoch not in batches:
                batches = {epoch: data.batch_indices(train_ex, cfg.batch_size, seed=cfg.seed, epoch=epoch)}
            loss, tokens = optimizer_step(loop, train_ex, batches[epoch][k], tok.pad_id, step, total)
            step, tokens_seen = step + 1, tokens_seen + tokens
            losses.append(loss)
            # log: the mean loss since the last line
            if step % cfg.log_every == 0 or step == total:
                row, line = progress_row(step, total, first_step, sum(losses) / len(losses),
                                         loop.opt.param_groups[0]["lr"], tokens_seen, time.time() - t0, model,
                                         device, world)
                log(line, flush=True)
                if rank == 0:
                    run_dir.log(row)
                losses = []
            # validate, and keep the best adapter by (rating accuracy, -loss)
            if val_ex and (step % cfg.val_every == 0 or step == total):
                last_val, best = validate_and_keep_best(loop, val_ex, tok, step, best)
            # checkpoint: what --resume continues from
            if step % cfg.save_every == 0 or step == total or stop.requested:
                checkpoint(loop, step, best)
            if stop.requested:
                raise TrainError(f"interrupted at step {step} of {total}; saved {cfg.out}/last; "
                                 "continue with the same command and --resume")
        if rank == 0:
            run_dir.finish({"step": step, **(last_val or {}), "seconds": time.time() - t0})
        return last_val
    except BaseException:
        if rank == 0:  # a failure before the first checkpoint gives a replaced run back
            run_dir.restore_replaced()
        raise
    finally:
        stop.close()
        run_dir.release()
        if world > 1:
            # DDP's C++ Reducer holds the process group; were it the last holder, its destructor
            # (which keeps the GIL) would join Gloo's worker threads while one waits for the GIL
            # to free a finished collective's tensors: a finished run whose rank never exits (seen,
            # about one 2-process run in ten; gdb showed both threads). So the Reducer goes first,
            # and the group is destroyed through its own binding, which lets go of the GIL. A
            # sharded model holds the group too (FSDP, in reference cycles): freed here as well, not
            # at interpreter exit, where the same free aborts the process.
            loop = model = None
            gc.collect()
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- grid and command line

@dataclass
class GridConfig(TrainConfig):
    variants: str = "label,explanation"  # comma-separated variants, each into --out/<variant>-s<seed>
    seeds: str = "0"                  # comma-separated seeds


def grid(cfg):
    """Every variant x seed into cfg.out/<variant>-s<seed>, skipping runs already finished and
    resuming those a crash left unfinished."""
    base = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    for variant in cfg.variants.split(","):
        for seed in (int(s) for s in cfg.seeds.split(",")):
            out = Run(os.path.join(cfg.out, f"{variant}-s{seed}"))
            if out.finished:
                print(f"== {out.path}: finished, skipped")
                continue
            print(f"== {out.path}")
            run(TrainConfig(**dict(base, variant=variant, seed=seed, out=out.path, resume=out.latest() is not None)))


COMMANDS = {"run": cli.Command(TrainConfig, run, "train one run (the default: train.py --model ... --data ...)"),
            "grid": cli.Command(GridConfig, grid, "run variants x seeds into one folder, skipping finished runs")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a shortcut for `python demo.py`, run as its own program: train.py never imports the demo
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the demo's to report (it gets it too)
        try:
            return subprocess.call([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")])
        finally:
            signal.signal(signal.SIGINT, old)
    return cli.main("train.py", __doc__, COMMANDS, argv, default="run")


if __name__ == "__main__":
    sys.exit(main())
