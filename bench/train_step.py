"""One LoRA training step, this project vs transformers + peft, on the same weights and batch.

    python bench/train_step.py                    # CPU: Mistral-shaped 56M model, batch 4 x 256, fp32
    python bench/train_step.py --quantize nf4     # the same with a 4-bit base: quant.NF4Linear vs bitsandbytes
    python bench/train_step.py --device cuda      # Mistral-7B shape, bf16, micro-batch 8 x 512 (GPU only)
    python bench/train_step.py --smoke            # tiny sizes, seconds (tests/test_bench.py)

The work, identical on both sides: rank-16 LoRA (alpha 32, dropout 0.05) on q/k/v/o/gate/up/down, a
frozen base, cross-entropy on the last 32 tokens of each sequence only, backward, one AdamW step.
This project: model.Transformer + lora.add_lora, the loss of train.py (`loss_sum`: the LM head runs
only on the positions that carry loss). transformers + peft: MistralForCausalLM + get_peft_model,
labels -100 except the last 32 tokens. Both load one checkpoint written here (CPU, and every NF4
run), or, for the 7B bf16 profile, are built on the meta device and filled on the GPU by the same
seeded initialisation (no 14 GB file).

Time: the sides alternate step by step in one process (order flipped every repetition), after a
warm-up; the median is reported. Peak memory: each side again in a fresh subprocess that runs a
few steps: on CPU the peak resident set size (VmHWM) over the process's RSS after its imports (so
it counts weights, LoRA, optimizer state and activations); on CUDA torch.cuda.max_memory_allocated.
Left out: data loading, gradient accumulation, distributed training (train.py has them).
"""
import argparse
import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass, replace

import common  # noqa: F401  (puts the project root on sys.path)
import torch

import lora
from model import DTYPES, PRESETS, Config, Transformer, load_model

IGNORE_INDEX = -100  # the label value transformers and data.py both skip
SIDE_NAMES = {"ours": "this project", "hf": "transformers+peft",
              "ours-nf4": "this project, NF4 base", "hf-nf4": "transformers+peft+bitsandbytes NF4"}


@dataclass
class Profile:
    name: str
    config: Config
    batch: int              # sequences per step
    seq: int                # tokens per sequence
    loss_tokens: int        # the last this many tokens of each sequence carry loss
    dtype: str              # base weights; bf16 runs under autocast, as train.py does
    checkpointing: tuple    # activation checkpointing settings to measure
    warmup: int             # untimed steps per side before the timed ones
    reps: int               # timed steps per side
    mem_steps: int = 3      # steps run by each memory worker
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05


PROFILES = {
    "cpu": Profile("cpu", Config(name="mistral-56m", arch="mistral", vocab_size=32000, hidden_size=512,
                                 intermediate_size=1376, n_layers=8, n_heads=8, n_kv_heads=4,
                                 torch_dtype="float32"),
                   batch=4, seq=256, loss_tokens=32, dtype="float32", checkpointing=(False, True), warmup=2, reps=10),
    # the study's student: SmolLM2-135M's shape (random weights), a batch like the study's
    "smollm2": Profile("smollm2", Config(name="smollm2-135m-shape", arch="llama", vocab_size=49152, hidden_size=576,
                                         intermediate_size=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                                         tie_word_embeddings=True, rope_theta=100000.0, torch_dtype="float32"),
                       batch=8, seq=128, loss_tokens=32, dtype="float32", checkpointing=(False, True), warmup=2, reps=10),
    "cuda": Profile("cuda", replace(PRESETS["mistral-7b-v0.1"]),
                    batch=8, seq=512, loss_tokens=32, dtype="bfloat16", checkpointing=(True,), warmup=3, reps=10),
    # the bases people fine-tune now, the same work (issue 28): GPU only, like "cuda"
    "cuda-llama3": Profile("cuda-llama3", replace(PRESETS["llama-3.1-8b"]),
                           batch=8, seq=512, loss_tokens=32, dtype="bfloat16", checkpointing=(True,), warmup=3, reps=10),
    "cuda-qwen2": Profile("cuda-qwen2", replace(PRESETS["qwen2.5-7b"]),
                          batch=8, seq=512, loss_tokens=32, dtype="bfloat16", checkpointing=(True,), warmup=3, reps=10),
    "smoke": Profile("smoke", replace(PRESETS["tiny"]),
                     batch=2, seq=32, loss_tokens=8, dtype="float32", checkpointing=(False, True), warmup=1, reps=2,
                     mem_steps=2, rank=4, alpha=8.0),
}

# the training loss exactly as train.py computes it, and its one table of datasheet peaks
from train import loss_sum, peak_flops as gpu_peak_flops  # noqa: E402
LOSS_FN = "train.loss_sum"


# ----------------------------------------------------------------------------- weights and batch

def make_batch(profile, device, seed=0):
    """Random tokens; ours gets `targets` (already shifted: targets[:, t] is the token after t),
    transformers gets `labels` (unshifted; it shifts inside its loss). Same 32 predictions per row."""
    B, T, L = profile.batch, profile.seq, profile.loss_tokens
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, profile.config.vocab_size, (B, T), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, T - L:] = ids[:, T - L:]                              # the last L tokens are the targets
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]                                 # logits at t predict token t + 1
    return {k: v.to(device) for k, v in dict(input_ids=ids, labels=labels, targets=targets).items()}


# ----------------------------------------------------------------------------- the two sides

def build_ours(profile, device, ckpt, quantize, checkpointing, seed):
    dtype = DTYPES[profile.dtype]
    if ckpt is not None:
        model = load_model(ckpt, device=device, dtype=dtype, quantize="nf4" if quantize else None)
    else:  # built on meta, filled on the device: a 7B model never touches the disk or the host
        model = common.synthetic_ours(profile.config, device, dtype, seed)
    torch.manual_seed(seed)
    lora.add_lora(model, rank=profile.rank, alpha=profile.alpha, dropout=profile.dropout)
    model.gradient_checkpointing = checkpointing
    model.train()
    n_tok = profile.batch * profile.loss_tokens

    def loss(batch):
        return loss_sum(model, batch) / n_tok
    return model, loss


def build_hf(profile, device, ckpt, quantize, checkpointing, seed):
    import transformers
    dtype = DTYPES[profile.dtype]
    if quantize:
        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            ckpt, quantization_config=bnb, dtype=dtype, device_map=str(device))
    elif ckpt is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device)
    else:
        model = common.synthetic_hf(profile.config, device, dtype, seed)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_lora(model, profile, seed)


def peft_lora(model, profile, seed):
    """(PEFT model, loss function): the profile's LoRA on all seven projections of a transformers model."""
    import peft
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=profile.rank, lora_alpha=profile.alpha, lora_dropout=profile.dropout,
                          target_modules=list(lora.TARGETS), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    model.train()

    def loss(batch):
        return model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    return model, loss


def build_side(side, profile, device, ckpt, checkpointing, seed=0):
    """(model, step, trainable count) for one side; step() runs forward, backward and AdamW, returns the loss."""
    build = build_ours if side.startswith("ours") else build_hf
    model, loss = build(profile, device, ckpt, side.endswith("nf4"), checkpointing, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if device.type == "cuda" else None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if profile.dtype in ("bfloat16", "bf16")
                else contextlib.nullcontext())
    batch = make_batch(profile, device, seed)

    def step():
        with autocast:
            value = loss(batch)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value.detach()
    return model, step, sum(p.numel() for p in params)


def n_base_params(config):
    """Parameters of the unquantised base (a 4-bit layer's packed codes would undercount them)."""
    with torch.device("meta"):
        return Transformer(config).n_params()


# ----------------------------------------------------------------------------- measuring

def memory_worker(spec):
    """Runs in a fresh process: build one side, run a few steps, report peak memory."""
    device = torch.device(spec["device"])
    profile = Profile(**{**spec["profile"], "config": Config(**spec["profile"]["config"]),
                         "checkpointing": tuple(spec["profile"]["checkpointing"])})
    if spec["side"].startswith("hf"):  # imports belong to the baseline, not to the measurement
        import peft.tuners.lora  # noqa: F401
        import transformers.models.mistral.modeling_mistral  # noqa: F401
        if spec["side"].endswith("nf4"):
            import bitsandbytes  # noqa: F401
    else:
        import quant  # noqa: F401
    common.warm_up_torch(device)
    base = common.rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, step, _ = build_side(spec["side"], profile, device, spec["ckpt"], spec["checkpointing"])
    loaded = common.rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    common.reset_peak_rss()
    for _ in range(profile.mem_steps):
        step()
    common.synchronize(device)
    if device.type == "cuda":
        common.worker_reply({"peak_bytes": torch.cuda.max_memory_allocated(device), "loaded_bytes": loaded})
    else:
        common.worker_reply({"peak_bytes": common.peak_rss_bytes() - base, "loaded_bytes": loaded - base})


def trace(step, device, rows=15):
    """One step under torch.profiler: the ops that take the time."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        step()
        common.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def measure(profile, sides, device, ckpt, checkpointing, args):
    """Alternate the sides step by step; then one memory worker per side."""
    built = {s: build_side(s, profile, device, ckpt, checkpointing) for s in sides}
    times, first_loss = {s: [] for s in sides}, {}
    for rep in range(profile.warmup + profile.reps):
        for s in (sides if rep % 2 == 0 else sides[::-1]):
            seconds, loss = common.timed(built[s][1], device)
            first_loss.setdefault(s, loss.item())
            if rep >= profile.warmup:
                times[s].append(seconds)
    traces = {s: trace(built[s][1], device) for s in sides} if args.trace else {}
    n_params = n_base_params(profile.config)
    n_trainable = {s: built[s][2] for s in sides}
    del built
    if device.type == "cuda":
        torch.cuda.empty_cache()

    results = {"paired_time_ratio": common.paired_ratio(times[sides[0]], times[sides[1]])}
    tokens = profile.batch * profile.seq
    for s in sides:
        spec = {"side": s, "profile": asdict(profile), "device": str(device), "ckpt": ckpt,
                "checkpointing": checkpointing}
        argv = [os.path.abspath(__file__), "--worker", json.dumps(spec)]
        argv += ["--threads", str(args.threads)] if args.threads else []
        mem = common.run_worker(argv)
        live = mem if device.type == "cuda" else common.run_worker(argv, env=common.LIVE_MALLOC_ENV)
        t = common.median(times[s])
        results[s] = {"step_s": t, "step_s_min": min(times[s]), "step_s_all": times[s], "tokens_per_s": tokens / t,
                      "first_loss": first_loss[s],
                      "params": n_params, "trainable": n_trainable[s], "peak_bytes": mem["peak_bytes"],
                      "peak_live_bytes": live["peak_bytes"], "loaded_bytes": mem["loaded_bytes"]}
        if device.type == "cuda" and (peak := gpu_peak_flops(device)):
            # frozen-base LoRA: forward 2N + backward to activations 2N FLOPs per token; recompute not counted
            results[s]["mfu"] = 4 * n_params * tokens / t / peak
    return results, traces


def targets_for(profile, device, quantize, checkpointing, res):
    """(name, value, limit, ok) for each target of issues 8 and 13 that this run can check."""
    out = []
    if device.type == "cpu" and not quantize:
        out.append(("time vs transformers+peft", res["paired_time_ratio"], "<= 0.70x", 0.70))
        out.append(("peak RSS vs transformers+peft", res["ours"]["peak_bytes"] / res["hf"]["peak_bytes"],
                    "<= 0.80x", 0.80))
        out.append(("peak live memory vs transformers+peft",
                    res["ours"]["peak_live_bytes"] / res["hf"]["peak_live_bytes"], "<= 0.80x", 0.80))
    if device.type == "cuda" and not quantize:
        if "mfu" in res["ours"]:
            out.append(("model FLOPs utilisation", res["ours"]["mfu"], ">= 45%", -0.45))
        out.append(("peak memory (GB)", res["ours"]["peak_bytes"] / 1e9, "<= 20 GB", 20.0))
    if device.type == "cuda" and quantize:
        q = res["ours-nf4"]
        out.append(("NF4 peak memory (GB)", q["peak_bytes"] / 1e9, "<= 8 GB", 8.0))
        out.append(("NF4 tokens/s vs bitsandbytes QLoRA", 1 / res["paired_time_ratio"], ">= 1.00x", -1.0))
        out.append(("NF4 tokens/s vs own bf16 LoRA", q["tokens_per_s"] / res["ours"]["tokens_per_s"],
                    ">= 0.80x", -0.80))
    # a negative limit means "at least |limit|"
    return [{"target": n, "value": v, "goal": g, "pass": v <= lim if lim > 0 else v >= -lim,
             "checkpointing": checkpointing} for n, v, g, lim in out]


def report(profile, sides, checkpointing, res, targets, device):
    print(f"\n== activation checkpointing {'on' if checkpointing else 'off'}")
    cuda = device.type == "cuda"
    mem = ["peak memory"] if cuda else ["peak RSS", "peak live"]
    header = ["side", "step (median)", "min", "tokens/s", *mem, "first loss"] + (["MFU"] if cuda else [])
    rows = []
    for s in sides:
        r = res[s]
        rows.append([SIDE_NAMES[s], f"{r['step_s'] * 1000:.0f} ms", f"{r['step_s_min'] * 1000:.0f} ms",
                     f"{r['tokens_per_s']:,.0f}", common.gib(r["peak_bytes"]),
                     *([] if cuda else [common.gib(r["peak_live_bytes"])]), f"{r['first_loss']:.5f}"]
                    + ([f"{r['mfu']:.1%}" if "mfu" in r else "?"] if cuda else []))
    ref = "hf-nf4" if "hf-nf4" in sides else "hf"
    mine = "ours-nf4" if "ours-nf4" in sides else "ours"
    a, b = res[mine], res[ref]
    rows.append([f"ratio ({mine} / {ref})", f"{a['step_s'] / b['step_s']:.2f}x", f"{a['step_s_min'] / b['step_s_min']:.2f}x",
                 f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x",
                 f"{a['peak_bytes'] / b['peak_bytes']:.2f}x",
                 *([] if cuda else [f"{a['peak_live_bytes'] / b['peak_live_bytes']:.2f}x"]), ""] + ([""] if cuda else []))
    common.table(rows, header)
    print(f"  paired time ratio (median of {mine}/{ref} over back-to-back steps): {res['paired_time_ratio']:.2f}x")
    for t in targets:
        v = f"{t['value']:.1%}" if "utilisation" in t["target"] else f"{t['value']:.2f}"
        print(f"  {common.verdict(t['pass'])}  {t['target']}: {v} (goal {t['goal']})")
    if not targets:
        print("  (no target for this profile on this device: issue 13's NF4 goals are for CUDA)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="4-bit base on both sides")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    p.add_argument("--profile", choices=["cpu", "smollm2", "cuda", "cuda-llama3", "cuda-qwen2"], default=None,
                   help="model shape and batch (default: the device's; smollm2: the study's student, on CPU)")
    p.add_argument("--checkpointing", choices=["both", "on", "off"], default=None,
                   help="activation checkpointing settings to run (default: the profile's)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per side (default: the profile's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side first")
    p.add_argument("--lora-dropout", type=float, default=None,
                   help="dropout on the LoRA path, both sides (default 0.05, train.py's default)")
    p.add_argument("--synthetic", action="store_true",
                   help="build the weights on the device instead of loading a checkpoint (the 7B default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--trace", action="store_true", help="print a torch.profiler table of one step per side")
    p.add_argument("--json", default=None, help="where to write the results (default bench/results/train_step[_nf4].json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return memory_worker(json.loads(args.worker))

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    profile = PROFILES["smoke" if args.smoke else args.profile or device.type]
    settings = {"both": (False, True), "on": (True,), "off": (False,), None: profile.checkpointing}[args.checkpointing]
    profile = replace(profile, checkpointing=settings, reps=args.reps or profile.reps,
                      warmup=profile.warmup if args.warmup is None else args.warmup,
                      dropout=profile.dropout if args.lora_dropout is None else args.lora_dropout)
    quantize = args.quantize == "nf4"
    sides = ["ours-nf4", "hf-nf4", "ours"] if quantize else ["ours", "hf"]
    synthetic = args.synthetic or (device.type == "cuda" and not quantize and not args.smoke)
    if quantize and synthetic:
        p.error("--quantize nf4 loads both sides from a checkpoint; drop --synthetic")

    c = profile.config
    print(f"train step: {profile.name} profile on {device}; {c.n_layers} layers, hidden {c.hidden_size}, "
          f"{c.n_heads} heads / {c.n_kv_heads} KV, intermediate {c.intermediate_size}, vocab {c.vocab_size}; "
          f"batch {profile.batch} x {profile.seq}, loss on the last {profile.loss_tokens} tokens, {profile.dtype}"
          f"{', NF4 base' if quantize else ''}; LoRA r={profile.rank} (dropout {profile.dropout:g}) on "
          f"{len(lora.TARGETS)} projections, AdamW")
    print(f"time: median of {profile.reps} steps after {profile.warmup} warm-up, sides alternating; memory: "
          + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
             "peak RSS (VmHWM) over the post-import RSS, with glibc's default malloc and again with "
             "MALLOC_MMAP_THRESHOLD_=65536 ('live': freed tensors go back to the OS)")
          + f"; a fresh subprocess per side and measurement, {profile.mem_steps} steps each")
    print(f"loss: {LOSS_FN}; {torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")

    runs, all_targets = [], []
    with common.tempdir("bench-train-") as tmp:
        ckpt = None if synthetic else common.write_checkpoint(
            replace(c, torch_dtype=profile.dtype), os.path.join(tmp, "ckpt"), DTYPES[profile.dtype])
        for checkpointing in profile.checkpointing:
            res, traces = measure(profile, sides, device, ckpt, checkpointing, args)
            targets = targets_for(profile, device, quantize, checkpointing, res)
            report(profile, sides, checkpointing, res, targets, device)
            for s, text in traces.items():
                print(f"\n-- torch.profiler, one step, {SIDE_NAMES[s]}, checkpointing {'on' if checkpointing else 'off'}\n{text}")
            losses = [res[s]["first_loss"] for s in sides]
            paired = res.pop("paired_time_ratio")
            runs.append({"checkpointing": checkpointing, "sides": res, "paired_time_ratio": paired,
                         "targets": targets, "first_loss_spread": max(losses) - min(losses)})
            all_targets += targets
    out = {"benchmark": "train_step", "profile": profile.name, "device": str(device), "quantize": args.quantize,
           "weights": "synthetic (seeded, built on the device)" if synthetic else "one checkpoint loaded by both",
           "config": asdict(profile), "loss_fn": LOSS_FN, "machine": common.machine(device),
           "method": {"time": f"median of {profile.reps} alternating steps after {profile.warmup} warm-up; the time "
                              "target uses the median of back-to-back step-time ratios", "threads": torch.get_num_threads(),
                      "memory": "torch.cuda.max_memory_allocated in a fresh process per side" if device.type == "cuda"
                      else "VmHWM minus RSS after imports, fresh process per side; peak_bytes with glibc's default "
                      "malloc, peak_live_bytes with MALLOC_MMAP_THRESHOLD_=65536 (RSS follows the live bytes)"},
           "runs": runs, "targets": all_targets}
    common.write_json(args.json, "train_step" + ("_" + args.profile if args.profile else "") + ("_nf4" if quantize else "")
                      + ("_smoke" if args.smoke else ""), out)
    return out


if __name__ == "__main__":
    main()
