"""train.py --shard (FSDP2) against world size: what each rank holds and how long a LoRA step takes.

    python bench/shard.py                 # a ~1.1B Llama-shaped model (TinyLlama's shape), fp32, CPU + Gloo
    python bench/shard.py --smoke         # a few MB, seconds (tests/test_bench.py)
    python bench/shard.py --device cuda --worlds 1,2,4,8   # on a multi-GPU machine: bf16, NCCL (bench/gpu.py's stage)

The checkpoint (bf16 safetensors, random weights, 1 GB shards) is written into a temporary folder.
Then, each in fresh processes: the model loaded whole in one process (`load_model`, no sharding:
the reference), and sharded (`shard.build`, as train.py --shard builds it) on 1, 2 and 4 ranks
under torchrun, loaded in fp32 (each rank casting only its own rows). Every rank reports:
- its peak RSS while loading (VmHWM over its post-import baseline) and after the steps;
- the bytes of parameters and buffers it holds once loaded (`shard.resident_bytes`);
- the median time of a LoRA training step (rank 16 on the seven projections, the global batch of
  4 x 64 tokens split over the ranks, loss on every position, backward, AdamW; activation
  checkpointing on), after one warm-up step.
The step time of several ranks on this 2-core machine is not a speed-up figure: the ranks share two
cores, and Gloo moves every all-gathered weight through local TCP. What the table shows is the
memory: each rank's share of the model, and that loading never holds the whole of it.
With --device cuda each rank takes its own GPU (bf16 weights, NCCL) and also reports
torch.cuda.max_memory_allocated.
"""
import argparse
import contextlib
import gc
import os
import time

import common  # puts the project root on sys.path
import torch

from model import Config, Transformer

PROFILES = {
    "cpu": Config(name="tinyllama-1.1b-shape", arch="llama", vocab_size=32000, hidden_size=2048,
                  intermediate_size=5632, n_layers=22, n_heads=32, n_kv_heads=4, torch_dtype="bfloat16"),
    "smoke": Config(name="smoke", arch="llama", vocab_size=1000, hidden_size=128, intermediate_size=256,
                    n_layers=2, n_heads=4, n_kv_heads=2, torch_dtype="bfloat16"),
}
BATCH, TOKENS, STEPS = 4, 64, 3


def worker(path, sharded, steps, device_type):
    """One rank (or the one process): load, report memory, time `steps` LoRA steps after a warm-up."""
    import torch.distributed as dist

    import lora
    import shard
    import train
    from model import load_model
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device_type, int(os.environ.get("LOCAL_RANK", 0))) if device_type == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if sharded and world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    common.warm_up_torch(device)
    base = common.rss_bytes()
    common.reset_peak_rss()
    t0 = time.perf_counter()

    def add(m):
        torch.manual_seed(0)
        lora.add_lora(m, 16, 32, 0.0, device=device)
    if sharded:
        model = shard.build(path, device, dtype, None, add, world, rank)
    else:
        model = load_model(path, device=device, dtype=dtype)
        add(model)
    load_s = time.perf_counter() - t0
    load_peak = common.peak_rss_bytes() - base
    held = shard.resident_bytes(model)
    model.gradient_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, TOKENS), generator=g).to(device)
    mine = ids[rank * BATCH // world:(rank + 1) * BATCH // world]
    batch = {"input_ids": mine, "targets": torch.roll(mine, -1, 1)}
    n_tok = BATCH * TOKENS
    times = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    for i in range(steps + 1):
        t = time.perf_counter()
        with autocast:
            loss = train.loss_sum(model, batch) * world / n_tok
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.synchronize(device)
        if dist.is_initialized():
            dist.barrier()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    reply = {"rank": rank, "world": world, "sharded": sharded, "load_s": load_s, "load_peak_bytes": load_peak,
             "held_bytes": held, "peak_bytes": common.peak_rss_bytes() - base, "step_s": common.median(times),
             "step_s_all": times}
    if device.type == "cuda":
        reply["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    if dist.is_initialized():
        replies = [None] * world
        dist.all_gather_object(replies, reply)
        del model, opt, params
        gc.collect()  # the sharded model holds the process group: freed first (see train.run's end)
        dist.destroy_process_group()
        reply = replies
    else:
        reply = [reply]
    if rank == 0:
        common.worker_reply(reply)


def launch(path, world, sharded, steps, threads, device):
    """The worker in a fresh process (world 0), or under torchrun on `world` ranks; rank 0's reply."""
    argv = [os.path.abspath(__file__), "--worker", path, "--steps", str(steps), "--device", device]
    argv += ["--sharded"] if sharded else []
    if world:  # common.run_worker runs `python argv...`: here `python -m torch.distributed.run ...`
        argv = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *argv]
    return common.run_worker(argv, env={"BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    ap.add_argument("--worlds", default="1,2,4", help="comma-separated rank counts to shard over")
    ap.add_argument("--steps", type=int, default=STEPS, help="timed steps per run, after one warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (1 rank per core is the fair split)")
    ap.add_argument("--device", default="cpu", help="cpu (Gloo) or cuda (one GPU per rank, NCCL, bf16)")
    ap.add_argument("--json", help="where to write the results (default bench/results/shard[_smoke].json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.sharded, args.steps, args.device)

    config = PROFILES["smoke" if args.smoke else "cpu"]
    info = common.machine(args.device)
    print(f"{config.name}: {info['cpu']}, {info['cores']} cores, load average {info['load_avg_1m']} at start")
    with torch.device("meta"):
        n_params = Transformer(config).n_params()
    fp32_bytes = 4 * n_params
    with common.tempdir("bench-shard-") as d:
        path = common.write_checkpoint(config, os.path.join(d, "ckpt"), torch.bfloat16)
        for f in os.listdir(path):  # warm the page cache: every run reads the same file pages
            with open(os.path.join(path, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass
        runs = [{"name": "whole, 1 process", "ranks": launch(path, 0, False, args.steps, args.threads, args.device)}]
        for world in (int(w) for w in args.worlds.split(",")):
            runs.append({"name": f"sharded, {world} rank{'s' * (world > 1)}",
                         "ranks": launch(path, world, True, args.steps, args.threads, args.device)})
    rows = []
    for run in runs:
        ranks = run["ranks"]
        run["max_load_peak_bytes"] = max(r["load_peak_bytes"] for r in ranks)
        run["max_peak_bytes"] = max(r["peak_bytes"] for r in ranks)
        run["max_held_bytes"] = max(r["held_bytes"] for r in ranks)
        run["step_s"] = max(r["step_s"] for r in ranks)
        rows.append([run["name"], common.gib(run["max_held_bytes"]), f"{run['max_held_bytes'] / fp32_bytes:.2f}",
                     common.gib(run["max_load_peak_bytes"]), f"{run['max_load_peak_bytes'] / fp32_bytes:.2f}",
                     common.gib(run["max_peak_bytes"]), f"{run['step_s']:.2f} s",
                     f"{min(t for r in ranks for t in r['step_s_all']):.2f}-{max(t for r in ranks for t in r['step_s_all']):.2f}"])
    print(f"\nfp32 model {common.gib(fp32_bytes)}; per rank, the fullest rank's figures:")
    common.table(rows, ["run", "held", "/ model", "peak RSS loading", "/ model", "peak RSS", "step (median)", "range"])
    one = runs[0]["max_held_bytes"]
    targets = [{"target": f"held bytes, {r['name']}, vs 1/N of the whole model",
                "value": r["max_held_bytes"] / one, "goal": 1.05 / len(r["ranks"]),
                "pass": r["max_held_bytes"] / one <= 1.05 / len(r["ranks"])} for r in runs[1:]]
    targets += [{"target": f"peak RSS while loading, {r['name']}, vs the whole fp32 model",
                 "value": r["max_load_peak_bytes"] / fp32_bytes, "goal": "< 1 for 2 ranks or more",
                 "pass": len(r["ranks"]) == 1 or r["max_load_peak_bytes"] < fp32_bytes} for r in runs[1:]]
    for t in targets:
        print(f"{common.verdict(t['pass'])}  {t['target']}: {t['value']:.3f}")
    common.write_json(args.json, "shard_smoke" if args.smoke else f"shard_{args.device}",
                      {"benchmark": "shard", "profile": "smoke" if args.smoke else "cpu", "config": config.name,
                       "n_params": n_params, "fp32_bytes": fp32_bytes, "device": args.device, "machine": info,
                       "load_avg_1m_end": round(os.getloadavg()[0], 2), "batch": [BATCH, TOKENS],
                       "runs": runs, "targets": targets})


if __name__ == "__main__":
    main()
