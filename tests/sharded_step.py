"""Run by tests/test_shard.py under torchrun: one training step, sharded (shard.build, FSDP2) against
the same step in one process, on every rank. Prints one JSON line per case from rank 0.

    torchrun --nproc_per_node=N tests/sharded_step.py BASE_DIR [TIED_BASE_DIR]

Each rank builds the unsharded reference itself (load_model + add_lora with the same seed) and runs
the whole global batch through it; the sharded model takes this rank's slice of the batch, scaled
as train.optimizer_step scales it, so that FSDP2's averaging reduce-scatter gives the gradient of
the whole batch's token-normalised loss.
"""
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import shard  # noqa: E402
import train  # noqa: E402
from model import load_model  # noqa: E402


def batch_of(rows, vocab):
    """A batch whose later positions carry loss (targets = next token there, ignored elsewhere)."""
    g = torch.Generator().manual_seed(rows * 7919)
    ids = torch.randint(0, vocab, (rows, 24), generator=g)
    targets = torch.full_like(ids, -100)
    targets[:, 10:-1] = ids[:, 11:]
    targets[rows // 2:, 5:10] = ids[rows // 2:, 6:11]  # rows with different numbers of targets
    return {"input_ids": ids, "targets": targets}


def main(base, tied=None):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = torch.device("cpu")
    cases = [(base, q, c) for q in (None, "nf4") for c in (False, True)] + [(base, "nf4-dq", True)]
    cases += [(tied, None, True)] if tied else []
    for base, quantize, checkpointing in cases:
        torch.manual_seed(3)
        ref = load_model(base, quantize=quantize)
        lora.add_lora(ref, 4, 8, 0.0)

        def add(m):
            torch.manual_seed(3)
            lora.add_lora(m, 4, 8, 0.0, device=cpu)
        model = shard.build(base, cpu, torch.float32, quantize, add, world, rank)
        for m in (ref, model):  # B != 0, so that A gets a gradient too
            m.gradient_checkpointing = checkpointing
            m.train()
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if "lora_B" in name:
                        b = torch.linspace(-0.05, 0.05, p.numel()).view(p.shape)
                        p.copy_(distribute_tensor(b, p.device_mesh, p.placements) if m is model else b)
        batch = batch_of(2 * world + 1, ref.config.vocab_size)  # not a multiple of world: uneven slices
        n_tok = int((batch["targets"] != -100).sum())
        (train.loss_sum(ref, batch) / n_tok).backward()
        rows = len(batch["input_ids"])
        mine = {k: v[rank * rows // world:(rank + 1) * rows // world] for k, v in batch.items()}
        loss = train.loss_sum(model, mine)
        (loss * world / n_tok).backward()
        loss = loss.detach()
        dist.all_reduce(loss)
        want = train.loss_sum(ref, batch).detach()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        grad_err = max(((p.grad - grads[n]).norm() / p.grad.norm()).item()
                       for n, p in ref.named_parameters() if p.requires_grad)
        whole = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*ref.parameters(), *ref.buffers()]}.values())
        most = torch.tensor([shard.resident_bytes(model)], dtype=torch.float64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)  # the fullest rank
        if rank == 0:
            print(json.dumps({"quantize": quantize, "checkpointing": checkpointing, "world": world,
                              "tied": ref.config.tie_word_embeddings,
                              "loss_err": abs(loss.item() - want.item()) / abs(want.item()),
                              "grad_err": grad_err, "n_grads": len(grads),
                              "held_fraction": most.item() / whole}), flush=True)
    del model, ref
    gc.collect()  # the sharded model holds the process group: freed first (see train.run's end)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
