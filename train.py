"""Train a LoRA rating classifier, one run per command; with no arguments, run the demo experiment.

    python train.py                                     # the demo: label vs explanation, on CPU, in minutes
    python train.py --model DIR --data train.jsonl --variant explanation --out runs/expl-s0
    python train.py --model DIR --data train.jsonl --variant label --out runs/x --dry-run
    python train.py grid --model DIR --data train.jsonl --variants label,explanation,shuffled --seeds 0,1,2 --out runs/grid
    torchrun --nproc_per_node=2 train.py --model DIR --data train.jsonl --out runs/ddp

One loop serves every case: bf16 autocast and activation checkpointing on CUDA, fp32 on CPU; the
loss of a global batch is the sum over its target tokens divided by the number of target tokens in
the whole global batch (every micro-batch, every rank), so neither the micro-batch size nor the
number of processes changes the result. `--full` trains every weight with loss on every token of a
plain-text corpus: the demo pretrains its tiny base model that way.

A run folder holds `train_config.json` (everything resolved), `metrics.jsonl`, `last/` and `best/`
(PEFT-format adapter; `last/` also the training state for `--resume`) and `done.json` when finished.
Checkpoints are written to a temporary folder and renamed, so a crash never leaves half of one.
Left out: model code (model.py, lora.py), data handling (data.py), metrics (eval.py).
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import lora
from eval import rating_logits
from model import DTYPES, Config, ModelError, Transformer, load_config, load_model, save_model


@dataclass
class TrainConfig:
    model: str = ""                   # base checkpoint: an HF folder with its tokenizer, or a .gguf file
    data: str = ""                    # training records (.jsonl or .csv); with --full, a plain-text corpus
    out: str = "runs/run"             # run folder
    variant: str = "explanation"      # label | explanation | shuffled | bow | random | filler
    rating_weight: bool = False       # weight the rating token's loss to its share in 'label' (dilution control)
    order: str = "rating_first"       # rating_first | explain_first
    template: str = "auto"            # auto (the checkpoint's chat format, else base) | base | inst | chatml
    axes: str = ""                    # comma-separated axes to train on; empty: all in the data
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
    dtype: str = "auto"               # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    quantize: str = ""                # "nf4": frozen 4-bit base (QLoRA-style)
    checkpointing: bool = True        # activation checkpointing, one block at a time
    compile: bool = False             # torch.compile the model
    skip_bad: bool = False            # skip (and count) malformed records instead of stopping
    resume: bool = False              # continue from the newest complete checkpoint in --out
    overwrite: bool = False           # replace a finished run in --out
    dry_run: bool = False             # print the plan and exit


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message says why and what was kept."""


def _parser(prog=None, description=__doc__):
    comments = {}  # the comment beside each field of TrainConfig is its --help text
    for line in inspect.getsource(TrainConfig).splitlines()[1:]:
        name, _, comment = line.strip().partition("#")
        comments[name.split(":")[0].strip()] = comment.strip()
    p = argparse.ArgumentParser(prog=prog, description=description.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=comments[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=kind, default=f.default, help=comments[f.name])
    return p


# ----------------------------------------------------------------------------- pieces of a run

def setup_distributed(device):
    """(rank, world) from torchrun's environment; a process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
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
def validate(model, examples, tok, cfg, device, autocast):
    """Validation loss per target token, and rating accuracy read at the decision position
    (teacher-forced for explanation-first runs: the explanation given is the real one)."""
    was_training = model.training
    model.eval()
    total, n_tok, correct = 0.0, 0, 0
    rating_ids = data.rating_token_ids(tok)
    for idx in data.batch_indices(examples, cfg.micro_batch, seed=0, epoch=0):
        batch = to_device(data.collate([examples[i] for i in idx], tok.pad_id), device)
        with autocast:
            total += loss_sum(model, batch, weighted=False).item()  # per token, comparable across runs
            if not cfg.full:
                pred = rating_logits(model, batch, rating_ids).argmax(-1) + 1
                correct += (pred == batch["label"]).sum().item()
        n_tok += int((batch["targets"] != data.IGNORE_INDEX).sum())
    model.train(was_training)
    return {"val_loss": total / max(1, n_tok), "val_acc": correct / max(1, len(examples))}


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(out, name, model, state, cfg):
    """Write out/<name>/ through a temporary folder: adapter (or, with --full, the whole model) and
    training state. The old folder is moved aside before the new one takes its name, then removed."""
    final, tmp, old = (os.path.join(out, name + s) for s in ("", ".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if cfg.full:
        save_model(model, tmp)
        shutil.copy(os.path.join(cfg.model, "tokenizer.model"), tmp)
    else:
        lora.save_adapter(model, tmp, base_model_name=os.path.abspath(cfg.model))
    if state is not None:
        torch.save(state, os.path.join(tmp, "state.pt"))
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def newest_checkpoint(out):
    """out/last, or out/last.old when a crash fell between the two renames."""
    for name in ("last", "last.old"):
        if os.path.exists(os.path.join(out, name, "state.pt")):
            return os.path.join(out, name)
    return None


def prepare_out(cfg, rank):
    done, last = os.path.join(cfg.out, "done.json"), newest_checkpoint(cfg.out)
    if cfg.overwrite and rank == 0:
        old = ("done.json", "metrics.jsonl", "last", "last.old", "last.tmp", "best", "best.old", "best.tmp")
        evals = [n for n in os.listdir(cfg.out) if n.startswith("eval-")] if os.path.isdir(cfg.out) else []
        for name in old + tuple(evals):  # predictions of the old model go with it
            p = os.path.join(cfg.out, name)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
    elif os.path.exists(done) and not cfg.resume:
        raise TrainError(f"{cfg.out} holds a finished run; pass --overwrite to replace it")
    elif last and not cfg.resume:
        raise TrainError(f"{cfg.out} holds an unfinished run ({last}); pass --resume to continue it "
                         "or --overwrite to start again")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)


def load_data(cfg, tok):
    """Examples for the train and val splits (the test split is eval.py's)."""
    if cfg.full:
        ex = data.text_examples(cfg.data, tok, cfg.max_len)
        n_val = max(1, len(ex) // 20)
        return ex[n_val:], ex[:n_val]
    records = data.load_records(cfg.data, skip_bad=cfg.skip_bad, need_explanation=cfg.variant != "label")
    keep_axes = set(filter(None, cfg.axes.split(",")))
    keep_sets = set(filter(None, cfg.datasets.split(",")))
    records = [r for r in records if (not keep_axes or r["axis"] in keep_axes)
               and (not keep_sets or r["dataset"] in keep_sets)]
    split = {"train": [], "val": []}
    for r in records:
        split.get(data.split_of(r["id"]), []).append(r)
    if not split["train"]:
        raise TrainError(f"{cfg.data}: no training records left after the split and the axis/dataset filters")
    build = dict(variant=cfg.variant, order=cfg.order, template=cfg.template, max_len=cfg.max_len, seed=cfg.seed,
                 rating_weight=cfg.rating_weight)
    # pseudo-explanations draw on the training explanations only, so val examples use the same pool
    return (data.build_examples(split["train"], tok, **build),
            data.build_examples(split["val"], tok, pool=split["train"], **build) if split["val"] else [])


def estimate_memory(model_cfg, n_trainable, cfg, dtype):
    """A rough peak-memory estimate in bytes: weights, LoRA + AdamW state, activations."""
    c = model_cfg
    n_base = sum(v for v in (c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2),) ) + \
        c.n_layers * (c.hidden_size * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.hidden_size * c.intermediate_size)
    per = 0.5625 if cfg.quantize == "nf4" else torch.finfo(dtype).bits / 8
    weights = n_base * per
    trainable = n_trainable * 4 * 4  # fp32 weight, gradient, two Adam moments
    tokens = cfg.micro_batch * cfg.max_len
    act_bytes = 2 if dtype == torch.bfloat16 else 4
    per_layer = tokens * (10 * c.hidden_size + 4 * c.intermediate_size) * act_bytes
    acts = tokens * c.hidden_size * act_bytes * c.n_layers + per_layer if cfg.checkpointing else per_layer * c.n_layers
    return weights + trainable + acts


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- the run

def run(cfg, loss_hook=None):
    """Train one run as configured; returns its final validation metrics. loss_hook(step, loss),
    when given, may replace the loss (the tests inject a NaN with it)."""
    device, dtype = resolve_device(cfg)
    rank, world = setup_distributed(device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    if cfg.variant not in data.VARIANTS:
        raise TrainError(f"unknown variant {cfg.variant!r}; variants: {', '.join(data.VARIANTS)}")
    if cfg.batch_size < world:
        raise TrainError(f"--batch-size {cfg.batch_size} is smaller than the number of processes ({world})")
    if not cfg.dry_run:
        prepare_out(cfg, rank)

    # everything that can fail on bad input fails here, before any training
    model_cfg = load_config(cfg.model)
    tok = data.Tokenizer(cfg.model)
    train_ex, val_ex = load_data(cfg, tok)
    if cfg.dry_run:
        with torch.device("meta"):
            model = Transformer(model_cfg)
    else:
        model = load_model(cfg.model, device=device, dtype=dtype, quantize=cfg.quantize or None)
    if cfg.full:
        model.float().requires_grad_(True)
        n_trainable = model.n_params()
    else:
        torch.manual_seed(cfg.seed)  # the LoRA initialisation depends on the seed only
        n_trainable = lora.add_lora(model, cfg.rank, cfg.alpha, cfg.lora_dropout,
                                    targets=tuple(cfg.targets.split(",")), rslora=cfg.rslora)
    model.gradient_checkpointing = cfg.checkpointing

    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    tokens_epoch = sum(len(e.input_ids) for e in train_ex)
    targets_epoch = sum(n_targets(e) for e in train_ex)
    fused = device.type == "cuda"
    log(f"model      {cfg.model}  {model_cfg.arch}, {model.n_params() / 1e6:.1f}M parameters, "
        f"{'NF4 base, ' if cfg.quantize else ''}{dtype} on {device}{f' x {world} processes' if world > 1 else ''}")
    log(f"trainable  {n_trainable:,} ({'all weights' if cfg.full else f'LoRA r={cfg.rank} alpha={cfg.alpha:g} on {cfg.targets}'})")
    log(f"data       {len(train_ex)} train / {len(val_ex)} val examples, {tokens_epoch:,} tokens "
        f"({targets_epoch:,} target) per epoch, " + ("plain text" if cfg.full else f"variant {cfg.variant}, {cfg.order}"))
    log(f"schedule   {total} steps of {cfg.batch_size} examples ({cfg.micro_batch} per micro-batch), "
        f"~{tokens_epoch / max(1, len(train_ex)) * cfg.batch_size:,.0f} tokens/step, lr {cfg.lr:g}, "
        f"checkpointing {'on' if cfg.checkpointing else 'off'}, fused AdamW {'on' if fused else 'off'}")
    log(f"memory     ~{estimate_memory(model_cfg, n_trainable, cfg, dtype) / 2**30:.2f} GiB estimated peak")
    if cfg.dry_run:
        return None

    if master:  # absolute paths, so eval.py and analysis.py find the base and data from anywhere
        saved = replace(cfg, model=os.path.abspath(cfg.model), data=os.path.abspath(cfg.data))
        write_atomic(os.path.join(cfg.out, "train_config.json"), json.dumps(asdict(saved), indent=2))
    train_model = torch.compile(model) if cfg.compile else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16
                else contextlib.nullcontext())

    step, best = 0, None
    ckpt = newest_checkpoint(cfg.out) if cfg.resume else None
    if ckpt:
        state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
        if cfg.full:
            model.load_state_dict(load_model(ckpt, device=device).float().state_dict())
        else:
            lora.load_adapter(model, ckpt)
        opt.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        log(f"resumed    from {ckpt} at step {step}")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if master:  # drop rows a crashed run logged after its last checkpoint
        rows = [json.loads(x) for x in open(metrics_path)] if os.path.exists(metrics_path) else []
        write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))

    def record(row):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint_state(step):
        return {"optimizer": opt.state_dict(), "step": step, "best": best, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    train_model.train()
    epoch_batches, t0, tokens_seen, loss_acc, peak = {}, time.time(), 0, 0.0, peak_flops(device)
    last_val, first_step = None, step
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: data.batch_indices(train_ex, cfg.batch_size, seed=cfg.seed, epoch=epoch)}
        global_batch = epoch_batches[epoch][k]
        n_tok = sum(n_targets(train_ex[i]) for i in global_batch)                    # whole global batch
        mine = global_batch[rank * len(global_batch) // world:(rank + 1) * len(global_batch) // world]
        micros = [mine[i:i + cfg.micro_batch] for i in range(0, len(mine), cfg.micro_batch)]
        for param_group in opt.param_groups:
            param_group["lr"] = lr_at(step, total, cfg)
        step_loss = torch.zeros((), device=device)
        for j, micro in enumerate(micros):
            batch = to_device(data.collate([train_ex[i] for i in micro], tok.pad_id), device)
            sync = j == len(micros) - 1 or world == 1
            with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast:
                loss = loss_sum(train_model, batch)
                if loss_hook is not None:
                    loss = loss_hook(step, loss)
                # DDP averages gradients over ranks; scaling by world makes that a sum
                (loss * world / n_tok).backward()
            step_loss += loss.detach()
            tokens_seen += int(batch["attention_mask"].sum())
        if world > 1:
            dist.all_reduce(step_loss)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not (torch.isfinite(step_loss) and torch.isfinite(gnorm)):
            kept = newest_checkpoint(cfg.out)
            raise TrainError(f"step {step + 1}: non-finite {'loss' if not torch.isfinite(step_loss) else 'gradient'}; "
                             f"stopped without updating. Last good checkpoint: {kept or 'none yet'}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_acc += step_loss.item() / n_tok

        if step % cfg.log_every == 0 or step == total:
            elapsed = time.time() - t0
            tps = tokens_seen * world / elapsed
            row = {"step": step, "loss": loss_acc / (cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every),
                   "lr": opt.param_groups[0]["lr"], "tokens_per_s": tps}
            extra = ""
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                extra += f" | {row['peak_mem_gib']:.1f} GiB"
                if peak:  # LoRA on a frozen base: forward 2N + backward to activations 2N per token
                    row["mfu"] = 4 * model.n_params() * tps / world / peak
                    extra += f" | MFU {row['mfu']:.1%}"
            eta = elapsed / (step - first_step) * (total - step)
            log(f"step {step:>5}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | {tps:,.0f} tok/s{extra} "
                f"| {eta / 60:.1f} min left", flush=True)
            record(row)
            loss_acc = 0.0
        if val_ex and (step % cfg.val_every == 0 or step == total):
            if master:
                last_val = validate(model, val_ex, tok, cfg, device, autocast)
                score = (last_val["val_acc"], -last_val["val_loss"])
                log(f"  val loss {last_val['val_loss']:.4f} | rating accuracy {last_val['val_acc']:.3f}", flush=True)
                record({"step": step, **last_val})
                if best is None or score > tuple(best):
                    best = list(score)
                    save_checkpoint(cfg.out, "best", model, None, cfg)
            if world > 1:
                dist.barrier()
        if step % cfg.save_every == 0 or step == total:
            if master:
                save_checkpoint(cfg.out, "last", model, checkpoint_state(step), cfg)
            if world > 1:
                dist.barrier()
    if master:
        write_atomic(os.path.join(cfg.out, "done.json"),
                     json.dumps({"step": step, **(last_val or {}), "seconds": time.time() - t0}, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return last_val


# ----------------------------------------------------------------------------- grid and demo

def grid(cfg, variants, seeds):
    """Every variant x seed into cfg.out/<variant>-s<seed>, skipping runs already finished."""
    for variant in variants:
        for seed in seeds:
            out = os.path.join(cfg.out, f"{variant}-s{seed}")
            if os.path.exists(os.path.join(out, "done.json")):
                print(f"== {out}: finished, skipped")
                continue
            print(f"== {out}")
            run(replace(cfg, variant=variant, seed=seed, out=out, resume=newest_checkpoint(out) is not None))


DEMO_BASE = Config(name="demo-tiny", arch="mistral", hidden_size=96, intermediate_size=256, n_layers=3,
                   n_heads=4, n_kv_heads=2, max_position_embeddings=1024, torch_dtype="float32")
DEMO_PRETRAIN = dict(full=True, lr=3e-3, warmup=0.05, weight_decay=0.01, batch_size=16, micro_batch=16,
                     steps=120, max_len=256, checkpointing=False, val_every=120, save_every=120, log_every=40)
DEMO_LORA = dict(rank=16, alpha=32, lora_dropout=0.0, lr=3e-3, steps=400, batch_size=16, micro_batch=16,
                 max_len=256, checkpointing=False, val_every=200, save_every=200, log_every=100)


def demo(out="runs/demo", seed=0):
    """The whole experiment in miniature: corpus, tokenizer, a tiny base model, two LoRA variants."""
    import eval as evaluate

    t0 = time.time()
    paths = data.write_demo(os.path.join(out, "data"), seed=seed)
    base = os.path.join(out, "base")
    if not os.path.exists(os.path.join(base, "done.json")):
        init = os.path.join(out, "init")
        tok_path = paths["tokenizer"]
        tok = data.Tokenizer(tok_path)
        torch.manual_seed(seed)
        model = Transformer(replace(DEMO_BASE, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
        save_model(model, init)
        shutil.copy(tok_path, os.path.join(init, "tokenizer.model"))
        print(f"== pretraining a {model.n_params() / 1e6:.1f}M-parameter base model on the demo conversations")
        run(TrainConfig(model=init, data=paths["corpus"], out=base, overwrite=True, **DEMO_PRETRAIN))
    results = {}
    for variant in ("label", "explanation"):
        run_dir = os.path.join(out, variant)
        if not os.path.exists(os.path.join(run_dir, "done.json")):
            print(f"== LoRA training, variant {variant}")
            run(TrainConfig(model=os.path.join(base, "last"), data=paths["train"], out=run_dir, variant=variant,
                            seed=seed, overwrite=True, **DEMO_LORA))
        results[variant] = evaluate.score_run(run_dir, split="test")
    print(f"\nDemo results on the test split ({time.time() - t0:.0f} s in all):")
    print(f"{'variant':<13} {'accuracy':>8} {'macro-F1':>8} {'MAE':>6} {'NLL':>6}")
    for variant, m in results.items():
        o = m["overall"]
        print(f"{variant:<13} {o['accuracy']:>8.3f} {o['macro_f1']:>8.3f} {o['mae']:>6.3f} {o['nll']:>6.3f}")
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv:
            demo()
        elif argv[0] == "grid":
            p = _parser("train.py grid", "Run variants x seeds into one folder, skipping finished runs.")
            p.add_argument("--variants", default="label,explanation", help="comma-separated variants")
            p.add_argument("--seeds", default="0", help="comma-separated seeds")
            a = vars(p.parse_args(argv[1:]))
            variants, seeds = a.pop("variants").split(","), [int(s) for s in a.pop("seeds").split(",")]
            grid(TrainConfig(**a), variants, seeds)
        else:
            run(TrainConfig(**vars(_parser().parse_args(argv))))
    except (TrainError, ModelError, data.DataError, lora.AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
