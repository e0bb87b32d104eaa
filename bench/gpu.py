"""Everything a GPU session should measure, in one command that stays under 7 minutes on one H200.

    python bench/gpu.py --out $OUT                 # on the GPU machine: every stage at full size, 400 s at most on one GPU
                                                   # (2 GPUs or more add the sharded stage: 120 s more)
    python bench/gpu.py --smoke --out /tmp/g       # every stage at tiny sizes on the CPU, seconds (tests/test_bench.py)
    python bench/gpu.py --only train_bf16,score    # some stages only

The stages, in order (each one guarded: an exception is recorded with its message and the next stage
still runs; each one has a time budget, and the whole run a deadline):

  matmul      the card's measured bf16 matrix rate (8192^3 products), the denominator of MFU, and
              its device-to-device copy rate; beside them the datasheet peak from
              train.py's PEAK_BF16_FLOPS, the one place that table lives
  cuda_tests  `pytest -m cuda` on the test files that carry the marker (tests/test_cuda.py): bf16
              autocast, checkpointing, fused AdamW, NF4 on the device, the KV cache
  train_bf16  the 7B training profile of bench/train_step.py (Mistral-7B-v0.1 shape, random bf16
              weights built on the device, LoRA r=16 on all seven projections, micro-batch 8 x 512,
              checkpointing on, loss on the last 32 tokens), this project against transformers+peft:
              step time, tokens/s, MFU, peak memory, one step split into forward / backward /
              optimizer, and a torch.profiler table of our step
  train_nf4   the same with a 4-bit NF4 base: quant.NF4Linear against bitsandbytes' Linear4bit under
              peft, when bitsandbytes is installed and works on the device (else the side says why)
  score       bench/score.py's rating-first scoring (LM head at the decision position only) against
              a full transformers forward, same weights and prompts
  real_run    train.py for a few hundred steps (bf16, checkpointing on) on the demo corpus, on
              SmolLM2-135M when `python -m model --smollm2` names its GGUF file and train.py takes
              it, else on a random demo-sized base; then eval.py on the test split
  sharded     on a machine with 2 GPUs or more: bench/shard.py --device cuda, the 1.1B model
              sharded with FSDP2 (train.py --shard's build) over 1, 2, 4, 8 GPUs (as many as there
              are): each rank's held bytes, peak memory while loading and in a LoRA step, step time;
              on one GPU it is skipped (in --smoke it runs bench/shard.py --smoke on the CPU, 2 ranks)

MFU = 4 x base parameters x tokens/s / the bf16 matrix rate measured in `matmul` (frozen-base LoRA:
forward 2N, backward to the activations 2N FLOPs per token; the recomputation of checkpointing is not
counted, HFU counts it). Memory on CUDA is torch.cuda.max_memory_allocated from the end of a side's
build to the end of its steps, over what was allocated before it (so: weights, LoRA, optimizer state,
activations; not the bf16 weights the NF4 sides are quantised from here), the sides built one after
the other and each freed before the next; on the CPU (smoke) it is the peak RSS, which says little. Writes gpu.json (rewritten after every
stage, so a run cut short keeps what it measured), gpu.md (the short table), gpu_trace.txt and the
logs of the two subprocess stages under --out (default: $OUT, else bench/results/).
Left out: multi-GPU training beyond the sharded stage, torch.compile, long-context profiles, the load benchmark (bench/load.py).
"""
import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, replace

import common  # puts the project root on sys.path

ROOT = common.ROOT
STAGES = ("matmul", "cuda_tests", "train_bf16", "train_nf4", "score", "real_run", "sharded")
# seconds each stage may take at full size; the sum is the deadline: on one GPU, where the sharded stage
# is skipped at once, the others' 400 s stay under the 7 minutes asked for
# (sharded runs on a machine with two GPUs or more only; on one it is skipped at once and costs nothing)
BUDGET = {"matmul": 20, "cuda_tests": 75, "train_bf16": 90, "train_nf4": 80, "score": 50, "real_run": 85,
          "sharded": 120}
SMOKE_BUDGET = {"matmul": 10, "cuda_tests": 60, "train_bf16": 40, "train_nf4": 40, "score": 30, "real_run": 60,
                "sharded": 90}
GOALS = {"mfu": 0.45, "bf16_peak_gb": 20.0, "nf4_peak_gb": 8.0, "tokens_vs_hf": 1.0, "nf4_vs_bf16": 0.80,
         "score_vs_hf": 2.0}
REAL_RUN = {  # train.py settings of the real run; lr by base (a random base needs a larger step)
    "full": dict(steps=300, batch_size=16, micro_batch=8, max_len=256, val_every=100, save_every=300,
                 log_every=10, demo=dict(), timeout_share=0.75),
    "smoke": dict(steps=3, batch_size=4, micro_batch=4, max_len=256, val_every=3, save_every=3, log_every=1,
                  demo=dict(n_per_dataset=8, n_corpus=300, vocab_size=500), timeout_share=0.7),
}


class StageTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise StageTimeout in this (main) thread after `seconds`: the stage's safety net."""
    def fire(signum, frame):
        raise StageTimeout(f"stage ran past its budget of {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def free(device):
    gc.collect()
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the report

class Report:
    """The JSON document, rewritten atomically whenever a stage (or a side of one) finishes."""

    def __init__(self, out_dir, device, smoke, argv):
        self.out_dir, self.device, self.smoke = out_dir, device, smoke
        self.t0 = time.time()
        self.doc = {"benchmark": "gpu", "mode": "smoke" if smoke else "full", "device": str(device),
                    "command": " ".join(["python", "bench/gpu.py", *argv]),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "elapsed_s": 0.0,
                    "machine": {}, "stages": {s: {"status": "pending"} for s in STAGES}, "targets": []}
        os.makedirs(out_dir, exist_ok=True)

    @property
    def stages(self):
        return self.doc["stages"]

    def path(self, name):
        return os.path.join(self.out_dir, name)

    def save(self):
        self.doc["elapsed_s"] = round(time.time() - self.t0, 1)
        try:
            self.doc["targets"] = targets(self.doc)
            table = markdown(self.doc)
        except Exception as e:  # noqa: BLE001 (a report bug must not lose the figures)
            self.doc["report_error"] = traceback.format_exc()[-2000:]
            table = f"# bench/gpu.py\n\nthe table could not be made ({type(e).__name__}: {e}); see gpu.json\n"
        for name, text in (("gpu.json", json.dumps(self.doc, indent=2, default=str)), ("gpu.md", table)):
            tmp = self.path(name + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.path(name))


def machine_info(device):
    import torch
    info = common.machine(device)
    info["torch_cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count)
    else:
        info.update(device_name=f"CPU ({info['cpu']})", capability=None)
    return info


def run_stage(report, name, fn, budget, deadline):
    """Run one stage under its budget; whatever it raises becomes its recorded error."""
    res = report.stages[name] = {"status": "running"}
    left = deadline - time.time()
    if left < 5:
        report.stages[name] = {"status": "skipped", "reason": f"the run's deadline was reached before this stage"}
        report.save()
        return
    limit = min(budget, left)
    report.save()
    print(f"\n== {name} (budget {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        with time_limit(limit):
            fn(report, res, limit)
        if res.get("status") == "running":
            res["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 (one stage must never lose the others' figures)
        if isinstance(e, KeyboardInterrupt):
            raise
        res.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
        print(f"   error: {res['error']}", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    with contextlib.suppress(Exception):
        free(report.device)
    report.save()
    print(f"   {res['status']} in {res['seconds']:.0f} s", flush=True)


# ----------------------------------------------------------------------------- stage: matmul

def stage_matmul(report, res, limit):
    import torch
    from train_step import gpu_peak_flops
    dev = report.device
    cuda = dev.type == "cuda"
    n, reps, dtype = (8192, 10, torch.bfloat16) if cuda and not report.smoke else (256, 3, torch.float32)
    if cuda and report.smoke:
        n, dtype = 1024, torch.bfloat16
    g = torch.Generator(dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    c = torch.empty_like(a)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    seconds, _ = common.timed(lambda: [torch.matmul(a, b, out=c) for _ in range(reps)], dev)
    res.update(matmul_n=n, dtype=str(dtype).replace("torch.", ""), reps=reps, seconds_per_matmul=seconds / reps,
               flops_per_s=2 * n**3 * reps / seconds)
    del a, b, c
    x = torch.empty(2**28 if cuda and not report.smoke else 2**22, dtype=torch.uint8, device=dev)  # 256 MiB on CUDA
    y = torch.empty_like(x)
    y.copy_(x)
    seconds, _ = common.timed(lambda: [y.copy_(x) for _ in range(5)], dev)
    res["copy_bytes_per_s"] = 2 * x.numel() * 5 / seconds        # read + written
    res["datasheet_bf16_flops_per_s"] = gpu_peak_flops(dev) if cuda else None
    res["datasheet_source"] = "train.py PEAK_BF16_FLOPS (dense bf16, no sparsity)"
    print(f"   {res['flops_per_s'] / 1e12:.3g} TFLOP/s ({res['dtype']}, {n}^3), copy {res['copy_bytes_per_s'] / 1e9:.0f} GB/s"
          + (f", datasheet {res['datasheet_bf16_flops_per_s'] / 1e12:.0f}" if res["datasheet_bf16_flops_per_s"] else ""))


def measured_rate(report):
    m = report.stages.get("matmul", {})
    return m.get("flops_per_s") if m.get("status") == "ok" else None


# ----------------------------------------------------------------------------- stage: CUDA tests

def stage_cuda_tests(report, res, limit):
    import torch
    if not torch.cuda.is_available():
        res.update(status="skipped", reason="no CUDA device (torch.cuda.is_available() is False)")
        return
    tests = os.path.join(ROOT, "tests")
    files = sorted(os.path.join("tests", f) for f in os.listdir(tests)
                   if f.startswith("test_") and f.endswith(".py") and "mark.cuda" in open(os.path.join(tests, f)).read())
    xml_path = report.path("gpu_pytest.xml.tmp")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfE",
           f"--junitxml={xml_path}", *files]
    if not files:
        res.update(status="error", error="no test file carries the cuda marker")
        return
    res["command"] = "python -m pytest -q -m cuda " + " ".join(files)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, limit - 5),
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    with open(report.path("gpu_pytest.txt"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    cases = []
    if os.path.exists(xml_path):
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome, message = child.tag, (child.get("message") or "")[:300]
            cases.append({"test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}",
                          "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
        os.remove(xml_path)
    count = lambda o: sum(c["outcome"] == o for c in cases)
    res.update(rc=proc.returncode, files=files, passed=count("passed"), failed=count("failure"),
               errors=count("error"), skipped=count("skipped"), cases=cases,
               output_tail=(proc.stdout + proc.stderr)[-2500:], log="gpu_pytest.txt")
    if proc.returncode not in (0, 1):  # 1: some tests failed (recorded above); anything else: pytest itself failed
        res.update(status="error", error=f"pytest exited with status {proc.returncode}")
    print(f"   {res['passed']} passed, {res['failed']} failed, {res['errors']} errors, {res['skipped']} skipped")


# ----------------------------------------------------------------------------- the training stages

def train_profile(report):
    from train_step import PROFILES
    if report.smoke:
        return replace(PROFILES["smoke"], checkpointing=(True,))
    return replace(PROFILES["cuda"], warmup=2, reps=8)


def quantize_lora_bases(model, compute_dtype):
    """Turn the frozen base of every LoRALinear into a quant.NF4Linear. LoRA is added first by
    train_step.build_ours, which does not care what its base is, so this equals add_lora on an NF4 model."""
    import lora
    from quant import NF4Linear
    for layer in lora.lora_layers(model).values():
        w = layer.base_layer.weight
        layer.base_layer = NF4Linear.from_weight(w, compute_dtype=compute_dtype).requires_grad_(False)
        del w
    return model


def build_ours_nf4(profile, device):
    import train_step
    from model import DTYPES
    model, loss = train_step.build_ours(profile, device, None, False, True, 0)
    return quantize_lora_bases(model, DTYPES[profile.dtype]), loss


def bnb_usable(device):
    """(True, version) when bitsandbytes imports and quantises on `device`, else (False, why)."""
    import importlib.util
    import torch
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "bitsandbytes is not installed on this machine"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
        bnbF.quantize_4bit(torch.randn(64, 64, device=device, dtype=torch.bfloat16), blocksize=64, quant_type="nf4")
        return True, bnb.__version__
    except Exception as e:  # installed but without a backend for this device
        return False, f"bitsandbytes does not work on {device}: {type(e).__name__}: {e}"[:500]


def build_hf_nf4(profile, device):
    """transformers + bitsandbytes NF4 + peft, as QLoRA runs it, with the same random weights as ours:
    the model is built by common.synthetic_hf and each projection replaced by a Linear4bit quantised
    on the device (what from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4")) does as it loads; no double quantisation, blocks of 64)."""
    import bitsandbytes as bnb
    import torch
    import lora
    from model import DTYPES
    from train_step import peft_lora
    dtype = DTYPES[profile.dtype]
    model = common.synthetic_hf(profile.config, device, dtype, 0)
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in lora.TARGETS]
    for name in names:
        w = model.get_submodule(name).weight
        q = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=dtype, compress_statistics=False,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w.detach(), requires_grad=False, blocksize=64, compress_statistics=False,
                                     quant_type="nf4", module=q).to(device)
        model.set_submodule(name, q)
        del w
    model.is_loaded_in_4bit = True            # what peft reads to wrap Linear4bit with its 4-bit LoRA layer
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_lora(model, profile, 0)


def top_ops(step, device, rows=15):
    """One step under torch.profiler: the ops that take the time (device time on CUDA)."""
    import torch
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        common.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


class Memory:
    """Memory of one side over a baseline read before it is built: CUDA's allocator counters, or the
    process's RSS on the CPU. The peak is reset once the side is built, so it is the peak of training
    (weights, LoRA, optimizer state, activations), not of the way the weights were made here (the NF4
    sides quantise a bf16 model, which a real NF4 load never holds whole)."""

    def __init__(self, device):
        import torch
        self.torch, self.device, self.cuda = torch, device, device.type == "cuda"
        self.base = self._now()

    def _now(self):
        common.synchronize(self.device)
        return self.torch.cuda.memory_allocated(self.device) if self.cuda else common.rss_bytes()

    def now(self):
        return self._now() - self.base

    def reset_peak(self):
        """After the build: free what building left in the allocator's cache, restart the peak."""
        free(self.device)
        if self.cuda:
            build_peak = self.torch.cuda.max_memory_allocated(self.device) - self.base
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            build_peak = common.peak_rss_bytes() - self.base
            common.reset_peak_rss()
        return build_peak

    def peak(self):
        common.synchronize(self.device)
        if self.cuda:
            return {"peak_bytes": self.torch.cuda.max_memory_allocated(self.device) - self.base,
                    "peak_reserved_bytes": self.torch.cuda.max_memory_reserved(self.device)}
        return {"peak_bytes": common.peak_rss_bytes() - self.base}


def run_side(build, profile, device, allowance, trace=False):
    """Build one side, warm it up, time steps (profile.reps, fewer if `allowance` seconds run out, at
    least 2), split one step into its phases, read the peak memory, optionally trace a step."""
    import torch
    from model import DTYPES
    from train_step import make_batch
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        common.reset_peak_rss()
    mem = Memory(device)
    t0 = time.perf_counter()
    model, loss = build()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if device.type == "cuda" else None)
    bf16 = DTYPES[profile.dtype] == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    batch = make_batch(profile, device, 0)
    common.synchronize(device)
    out = {"status": "ok", "build_s": time.perf_counter() - t0, "build_peak_bytes": mem.reset_peak(),
           "loaded_bytes": mem.now(), "trainable": sum(p.numel() for p in params)}
    marks = {}

    def step(split=False):
        with autocast:
            value = loss(batch)
        if split:
            marks["forward"] = _sync_time(device)
        value.backward()
        if split:
            marks["backward"] = _sync_time(device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value.detach()

    t_side = time.perf_counter()
    losses = [common.timed(step, device)[1].item() for _ in range(max(1, profile.warmup))]
    times = []
    while len(times) < profile.reps and (len(times) < 2 or time.perf_counter() - t_side < allowance):
        times.append(common.timed(step, device)[0])
    start = _sync_time(device)
    step(split=True)
    end = _sync_time(device)
    out.update(first_loss=losses[0], step_s=common.median(times), step_s_min=min(times), step_s_all=times,
               split_s={"forward": marks["forward"] - start, "backward": marks["backward"] - marks["forward"],
                        "optimizer": end - marks["backward"]})
    out.update(mem.peak())
    out["tokens_per_s"] = profile.batch * profile.seq / out["step_s"]
    if trace:
        out["trace"] = top_ops(step, device)
    del model, loss, opt, params, batch
    return out


def _sync_time(device):
    common.synchronize(device)
    return time.perf_counter()


def add_flops(res, profile, rate, datasheet):
    """MFU against the measured matrix rate (and the datasheet's), HFU with checkpointing's recompute."""
    from train_step import n_base_params
    n = n_base_params(profile.config)
    res["base_params"] = n
    for side in res["sides"].values():
        if side.get("status") != "ok":
            continue
        per_token = 4 * n                                  # forward 2N + backward to the activations 2N
        if rate:
            side["mfu"] = per_token * side["tokens_per_s"] / rate
            side["hfu"] = (per_token + 2 * n) * side["tokens_per_s"] / rate   # + the recomputed forward
        if datasheet:
            side["mfu_datasheet"] = per_token * side["tokens_per_s"] / datasheet


def train_stage(report, res, limit, sides):
    """Measure each side in turn (the others freed first); a side that fails records why and the rest go on."""
    profile = train_profile(report)
    dev = report.device
    c = profile.config
    res.update(profile=profile.name, config=asdict(profile),
               work=f"{c.name}: {c.n_layers} layers, hidden {c.hidden_size}, {profile.batch} x {profile.seq} tokens, "
                    f"loss on the last {profile.loss_tokens}, LoRA r={profile.rank} on 7 projections, "
                    f"{profile.dtype}, checkpointing on, AdamW" + (" (fused)" if dev.type == "cuda" else ""),
               sides={})
    t0 = time.perf_counter()
    for i, (name, build, trace, why_not) in enumerate(sides):
        if why_not:
            res["sides"][name] = {"status": "skipped", "reason": why_not}
            continue
        left = limit - (time.perf_counter() - t0)
        allowance = max(1.0, 0.45 * left / (len(sides) - i))   # timed steps; build, split and trace take the rest
        print(f"   {name}: building and timing (up to {allowance:.0f} s of steps)", flush=True)
        try:
            side = run_side(lambda: build(profile, dev), profile, dev, allowance, trace)
        except StageTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            side = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        free(dev)
        if "trace" in side:
            with open(report.path("gpu_trace.txt"), "a") as f:
                f.write(f"== {report.doc['mode']} {res['profile']} {name}: torch.profiler, one training step\n{side['trace']}\n\n")
            side["trace"] = side["trace"].splitlines()[:20]
        res["sides"][name] = side
        if side["status"] == "ok":
            print(f"   {name}: {side['step_s'] * 1000:.0f} ms/step, {side['tokens_per_s']:,.0f} tokens/s, "
                  f"peak {side['peak_bytes'] / 1e9:.2f} GB, first loss {side['first_loss']:.4f}", flush=True)
        else:
            print(f"   {name}: {side['status']}: {side.get('error', side.get('reason'))}", flush=True)
        add_flops(res, profile, measured_rate(report), report.stages.get("matmul", {}).get("datasheet_bf16_flops_per_s"))
        report.save()
    ok = {n: s for n, s in res["sides"].items() if s.get("status") == "ok"}
    if len(ok) >= 2:
        a, b = list(ok)[:2]
        res["ratios"] = {f"{a}/{b}": {k: _div(ok[a][k], ok[b][k]) for k in ("tokens_per_s", "step_s", "peak_bytes")}}
        res["first_loss_spread"] = abs(ok[a]["first_loss"] - ok[b]["first_loss"])
    if not ok:
        res.update(status="error", error="no side ran: " + "; ".join(
            f"{n}: {s.get('error', s.get('reason'))}" for n, s in res["sides"].items()))


def stage_train_bf16(report, res, limit):
    import train_step
    res["loss_fn"] = train_step.LOSS_FN
    sides = [("ours", lambda p, d: train_step.build_ours(p, d, None, False, True, 0), True, None),
             ("hf", lambda p, d: train_step.build_hf(p, d, None, False, True, 0), False, _hf_missing())]
    train_stage(report, res, limit, sides)


def stage_train_nf4(report, res, limit):
    ok, why = bnb_usable(report.device)
    res["bitsandbytes"] = why if ok else None
    sides = [("ours-nf4", build_ours_nf4, True, None),
             ("hf-nf4", build_hf_nf4, False, _hf_missing() or (None if ok else why))]
    train_stage(report, res, limit, sides)
    bf16 = report.stages.get("train_bf16", {}).get("sides", {}).get("ours", {})
    nf4 = res["sides"].get("ours-nf4", {})
    if bf16.get("status") == "ok" and nf4.get("status") == "ok":
        res["ours_nf4_vs_ours_bf16"] = {k: _div(nf4[k], bf16[k]) for k in ("tokens_per_s", "peak_bytes")}


def _hf_missing():
    import importlib.util
    gone = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(gone)} not installed" if gone else None


# ----------------------------------------------------------------------------- stage: scoring

def stage_score(report, res, limit):
    if _hf_missing():
        res.update(status="skipped", reason=_hf_missing())
        return
    import score
    profile = score.PROFILES["smoke" if report.smoke else "cuda"]
    if not report.smoke:
        profile = replace(profile, warmup=1, reps=5)
    c = profile.config
    res.update(profile=profile.name, scorer=score.SCORER, config=asdict(profile),
               work=f"{c.name}: {profile.n_examples} prompts of {profile.min_len}-{profile.max_len} tokens in batches "
                    f"of {profile.batch}, {profile.dtype}, LoRA r={profile.rank} unmerged")
    out = score.measure(profile, report.device, None)
    res.update(sides={s: out[s] for s in ("ours", "hf")}, paired_ratio=out["paired_ratio"],
               ratio=out["hf"]["pass_s"] / out["ours"]["pass_s"], max_logit_diff=out["max_logit_diff"],
               max_prob_diff=out["max_prob_diff"], tokens_per_pass=out["tokens_per_pass"])
    for s in ("ours", "hf"):
        res["sides"][s]["tokens_per_s"] = out["tokens_per_pass"] / out[s]["pass_s"]
    print(f"   ours {out['ours']['examples_per_s']:,.1f} examples/s, transformers {out['hf']['examples_per_s']:,.1f}: "
          f"{res['ratio']:.2f}x; rating logits differ by {out['max_logit_diff']:.1e}")


# ----------------------------------------------------------------------------- stage: a real run

def smollm2_gguf():
    """(path, None) when `python -m model --smollm2` prints an existing GGUF path, else (None, why)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "model", "--smollm2"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None, "`python -m model --smollm2` did not answer within 60 s"
    lines = proc.stdout.strip().splitlines()
    path = lines[-1].strip() if lines else ""
    if proc.returncode == 0 and path.endswith(".gguf") and os.path.isfile(path):
        return path, None
    return None, (f"`python -m model --smollm2` exited {proc.returncode} without naming a GGUF file"
                  + (f": {(proc.stderr or proc.stdout).strip().splitlines()[-1][:300]}" if (proc.stderr or proc.stdout).strip() else ""))


def random_base(path, tokenizer, smoke, seed=0):
    """A random base saved with model.save_model: train.py's demo shape, or model.py's tiny preset."""
    import torch
    import data
    from model import PRESETS, Transformer, save_model
    from demo import DEMO_BASE
    tok = data.Tokenizer(tokenizer)
    torch.manual_seed(seed)
    shape = replace(PRESETS["tiny"], max_position_embeddings=1024) if smoke else DEMO_BASE
    model = Transformer(replace(shape, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                pad_token_id=tok.pad_id))
    save_model(model, path)
    shutil.copy(tokenizer, os.path.join(path, "tokenizer.model"))
    return path, model.n_params()


def run_logged(cmd, log, timeout):
    """Run `python cmd...` from the project root; its output goes to `log`. A run past `timeout` is
    killed and comes back with returncode None and what it had printed."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired as e:
        text = lambda b: (b.decode(errors="replace") if isinstance(b, bytes) else b) or ""
        proc = subprocess.CompletedProcess(e.cmd, None, text(e.stdout),
                                           text(e.stderr) + f"\n(killed after {timeout:.0f} s, its share of the stage's budget)")
    with open(log, "a") as f:
        f.write(f"$ python {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n(exit status {proc.returncode})\n\n")
    return proc, time.perf_counter() - t0


def stage_real_run(report, res, limit):
    from runs import Run  # the run folder's files (imports torch: not at start-up)
    import demo
    settings = REAL_RUN["smoke" if report.smoke else "full"]
    dev = report.device
    t0 = time.perf_counter()
    log = report.path("gpu_real_run.txt")
    open(log, "w").close()
    work = tempfile.mkdtemp(prefix="gpu-real-run-")
    try:
        paths = demo.write_demo(os.path.join(work, "data"), **settings["demo"])
        res["data"] = {"records": sum(1 for _ in open(paths["train"])), "demo_sizes": settings["demo"] or "defaults"}
        gguf, why = smollm2_gguf()
        res["smollm2"] = gguf or why
        candidates = []
        if gguf and not report.smoke:
            candidates.append(("SmolLM2-135M-Instruct (GGUF)", gguf, 1e-3))
        base, n_params = random_base(os.path.join(work, "base"), paths["tokenizer"], report.smoke)
        shape = "model.PRESETS['tiny']" if report.smoke else "demo.DEMO_BASE"
        candidates.append((f"random base, {shape} shape ({n_params / 1e6:.2f}M parameters)", base, 3e-3))
        for k, (label, model_path, lr) in enumerate(candidates):
            out = os.path.join(work, f"run{k}")
            cmd = ["train.py", "--model", model_path, "--data", paths["train"], "--out", out, "--variant", "explanation",
                   "--rank", "16", "--alpha", "32", "--lr", str(lr), "--checkpointing", "--device", dev.type,
                   "--dtype", "bfloat16" if dev.type == "cuda" else "float32", "--overwrite",
                   *[f"--{key.replace('_', '-')}={v}" for key, v in settings.items() if key not in ("demo", "timeout_share")]]
            left = limit - (time.perf_counter() - t0)
            proc, seconds = run_logged(cmd, log, max(5, left * settings["timeout_share"]))
            attempt = {"base": label, "train_rc": proc.returncode, "train_s": seconds,
                       "command": "python " + " ".join(cmd)}
            res.setdefault("attempts", []).append(attempt)
            if proc.returncode != 0:
                attempt["train_error"] = (proc.stderr or proc.stdout).strip()[-1500:]
                continue
            rows = Run(out).metrics()
            losses = [r for r in rows if "loss" in r]
            last = losses[-1]
            attempt.update(steps=last["step"], loss_first=losses[0]["loss"], loss_last=last["loss"],
                           loss_fell=last["loss"] < losses[0]["loss"], tokens_per_s=last.get("tokens_per_s"),
                           peak_mem_gib=last.get("peak_mem_gib"), mfu=last.get("mfu"),
                           val=[r for r in rows if "val_loss" in r][-1:] or None)
            left = limit - (time.perf_counter() - t0)
            proc, seconds = run_logged(["eval.py", "--run", out, "--split", "test", "--device", dev.type], log,
                                       max(5, left - 3))
            attempt.update(eval_rc=proc.returncode, eval_s=seconds)
            m = Run(out).scores("test")
            if proc.returncode == 0 and m is not None:
                attempt["eval"] = {k: m["overall"][k] for k in ("accuracy", "macro_f1", "mae", "nll", "n")}
                attempt["eval"].update(examples_per_s=m.get("examples_per_s"), unparsed=m.get("unparsed"))
            else:
                attempt["eval_error"] = (proc.stderr or proc.stdout).strip()[-1500:]
            res.update(base=label, steps=attempt["steps"], loss_first=attempt["loss_first"],
                       loss_last=attempt["loss_last"], loss_fell=attempt["loss_fell"], eval=attempt.get("eval"))
            print(f"   {label}: loss {attempt['loss_first']:.3f} -> {attempt['loss_last']:.3f} over {attempt['steps']} steps"
                  + (f"; test accuracy {attempt['eval']['accuracy']:.3f}" if attempt.get("eval") else "; eval failed"))
            if attempt.get("eval") is None:
                res.update(status="error", error="eval.py failed: " + attempt["eval_error"][-500:])
            break
        else:
            res.update(status="error", error="train.py failed on every base: " + " | ".join(
                a.get("train_error", "")[-400:] for a in res.get("attempts", [])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["log"] = "gpu_real_run.txt"


# ----------------------------------------------------------------------------- goals and the table

def targets(doc):
    """(target, value, goal, pass) for each goal of issue 18 whose figures exist."""
    st, out = doc["stages"], []

    def add(name, value, goal, ok):
        out.append({"target": name, "value": value, "goal": goal, "pass": bool(ok)})
    bf16 = st.get("train_bf16", {}).get("sides", {})
    ours, hf = bf16.get("ours", {}), bf16.get("hf", {})
    if ours.get("status") == "ok":
        if "mfu" in ours:
            add("bf16 LoRA MFU (of the measured bf16 rate)", ours["mfu"], f">= {GOALS['mfu']:.0%}", ours["mfu"] >= GOALS["mfu"])
        add("bf16 LoRA peak memory (GB)", ours["peak_bytes"] / 1e9, f"<= {GOALS['bf16_peak_gb']:g} GB",
            ours["peak_bytes"] / 1e9 <= GOALS["bf16_peak_gb"])
        if hf.get("status") == "ok":
            r = ours["tokens_per_s"] / hf["tokens_per_s"]
            add("bf16 LoRA tokens/s vs transformers+peft", r, ">= 1.00x", r >= GOALS["tokens_vs_hf"])
    nf4 = st.get("train_nf4", {})
    q, qhf = nf4.get("sides", {}).get("ours-nf4", {}), nf4.get("sides", {}).get("hf-nf4", {})
    if q.get("status") == "ok":
        add("NF4 LoRA peak memory (GB)", q["peak_bytes"] / 1e9, f"<= {GOALS['nf4_peak_gb']:g} GB",
            q["peak_bytes"] / 1e9 <= GOALS["nf4_peak_gb"])
        if qhf.get("status") == "ok":
            r = q["tokens_per_s"] / qhf["tokens_per_s"]
            add("NF4 LoRA tokens/s vs transformers+peft+bitsandbytes", r, ">= 1.00x", r >= GOALS["tokens_vs_hf"])
        if "ours_nf4_vs_ours_bf16" in nf4:
            r = nf4["ours_nf4_vs_ours_bf16"]["tokens_per_s"]
            add("NF4 LoRA tokens/s vs own bf16 LoRA", r, f">= {GOALS['nf4_vs_bf16']:.2f}x", r >= GOALS["nf4_vs_bf16"])
    sc = st.get("score", {})
    if sc.get("status") == "ok":
        add("scoring examples/s vs a full transformers forward", sc["ratio"], f">= {GOALS['score_vs_hf']:.2f}x",
            sc["ratio"] >= GOALS["score_vs_hf"])
    ct = st.get("cuda_tests", {})
    if ct.get("status") == "ok":
        add("CUDA tests pass", ct["passed"], f"{ct['passed'] + ct['failed'] + ct['errors']} of them",
            ct["failed"] == ct["errors"] == 0 and ct["passed"] > 0)
    rr = st.get("real_run", {})
    if "loss_fell" in rr:
        add("real run: the training loss falls", rr["loss_last"] - rr["loss_first"], "< 0", rr["loss_fell"])
    return out


def _ms(s):
    return f"{s * 1000:,.0f} ms" if s is not None else "-"


def _gb(b):
    return f"{b / 1e9:.2f} GB" if b is not None else "-"


def _pct(x):
    return f"{x:.1%}" if x is not None else "-"


def _div(a, b):
    """a / b, or None where b is 0 (a CPU peak over the baseline can be 0 bytes at smoke sizes)."""
    return a / b if b else None


def _ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b else "-"


def markdown(doc):
    st, m = doc["stages"], doc["machine"]
    lines = [f"# bench/gpu.py ({doc['mode']}): {m.get('device_name', doc['device'])}"
             + (f", capability {m['capability']}" if m.get("capability") else ""),
             "",
             f"torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), transformers {m.get('transformers')}, "
             f"peft {m.get('peft')}, bitsandbytes {m.get('bitsandbytes') or 'not installed'}; {doc['started']}, "
             f"{doc['elapsed_s']:.0f} s in all; `{doc['command']}`"]
    if doc["mode"] == "smoke":
        lines.append("\nSmoke sizes: the figures show that every stage runs, not how fast anything is.")
    mm = st.get("matmul", {})
    if mm.get("status") == "ok":
        ds = mm.get("datasheet_bf16_flops_per_s")
        rate = (f"{mm['flops_per_s'] / 1e12:.1f} TFLOP/s" if mm["flops_per_s"] >= 1e12 else
                f"{mm['flops_per_s'] / 1e9:.1f} GFLOP/s")
        lines.append(f"\nMeasured matrix rate {rate} ({mm['dtype']} {mm['matmul_n']}^3)"
                     + (f", datasheet {ds / 1e12:.0f}" if ds else "") + f"; copy {mm['copy_bytes_per_s'] / 1e9:,.0f} GB/s.")
    rows = []
    for key in ("train_bf16", "train_nf4"):
        s = st.get(key, {})
        title = f"LoRA, {'NF4' if key == 'train_nf4' else s.get('config', {}).get('dtype', '?')} base"
        sides = s.get("sides", {})
        names = list(sides)
        if len(names) < 2:
            continue
        a, b = sides[names[0]], sides[names[1]]
        ga, gb = (a if a.get("status") == "ok" else {}), (b if b.get("status") == "ok" else {})
        note_b = "" if gb else f" ({b.get('status')}: {b.get('reason') or b.get('error', '')[:80]})"
        rows += [[f"{title}: step (median)", _ms(ga.get("step_s")), _ms(gb.get("step_s")) + note_b,
                  _ratio(ga.get("step_s"), gb.get("step_s"))],
                 [f"{title}: tokens/s", f"{ga['tokens_per_s']:,.0f}" if ga else "-",
                  f"{gb['tokens_per_s']:,.0f}" if gb else "-", _ratio(ga.get("tokens_per_s"), gb.get("tokens_per_s"))],
                 [f"{title}: MFU of measured rate (HFU)", f"{_pct(ga.get('mfu'))} ({_pct(ga.get('hfu'))})",
                  f"{_pct(gb.get('mfu'))} ({_pct(gb.get('hfu'))})", ""],
                 [f"{title}: peak memory", _gb(ga.get("peak_bytes")), _gb(gb.get("peak_bytes")),
                  _ratio(ga.get("peak_bytes"), gb.get("peak_bytes"))],
                 [f"{title}: forward / backward / optimizer",
                  " / ".join(_ms(v) for v in ga["split_s"].values()) if ga else "-",
                  " / ".join(_ms(v) for v in gb["split_s"].values()) if gb else "-", ""],
                 [f"{title}: first loss", f"{ga['first_loss']:.4f}" if ga else "-",
                  f"{gb['first_loss']:.4f}" if gb else "-", ""]]
    sc = st.get("score", {})
    if sc.get("status") == "ok":
        o, h = sc["sides"]["ours"], sc["sides"]["hf"]
        rows.append(["scoring: examples/s", f"{o['examples_per_s']:,.1f}", f"{h['examples_per_s']:,.1f}",
                     f"{sc['ratio']:.2f}x"])
    if rows:
        lines += ["", "| figure | this project | transformers | ratio |", "| --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "| stage | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name in STAGES:
        s = st.get(name, {})
        note = s.get("reason") or s.get("error") or ""
        if name == "cuda_tests" and s.get("status") == "ok":
            note = f"{s['passed']} passed, {s['failed']} failed, {s['errors']} errors, {s['skipped']} skipped"
            note += "".join(f"; FAILED {c['test']}: {c['message'][:120]}" for c in s["cases"] if c["outcome"] in ("failure", "error"))
        if name == "real_run" and "loss_fell" in s:
            note = (f"{s['base']}: loss {s['loss_first']:.3f} -> {s['loss_last']:.3f} in {s['steps']} steps"
                    + (f", test accuracy {s['eval']['accuracy']:.3f}" if s.get("eval") else ""))
        if name == "sharded" and s.get("runs"):
            note = "; ".join(f"{r['run']}: holds {common.gib(r['held_bytes'])}, step {r['step_s']:.2f} s" for r in s["runs"])
        if name == "train_nf4" and s.get("sides", {}).get("hf-nf4", {}).get("status") == "skipped":
            note = note or f"hf-nf4 skipped: {s['sides']['hf-nf4']['reason']}"
        note = note.replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {name} | {s.get('status')} | {s.get('seconds', '-')} | {note} |")
    if doc["targets"]:
        lines += ["", "| goal | value | target | verdict |", "| --- | --- | --- | --- |"]
        for t in doc["targets"]:
            v = t["value"]
            v = f"{v:.1%}" if "MFU" in t["target"] else (f"{v:.2f}" if isinstance(v, float) else str(v))
            lines.append(f"| {t['target']} | {v} | {t['goal']} | {common.verdict(t['pass'])} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- stage: sharded

def stage_sharded(report, res, limit):
    import torch
    n = torch.cuda.device_count() if report.device.type == "cuda" else 0
    if report.smoke:
        args, device = ["--smoke", "--worlds", "2"], "cpu"
    elif n < 2:
        res.update(status="skipped", reason=f"needs 2 GPUs or more; this machine has {n}")
        return
    else:
        args, device = ["--worlds", ",".join(str(w) for w in (1, 2, 4, 8) if w <= n)], "cuda"
    path = report.path("gpu_shard.json")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "shard.py"), *args, "--device", device, "--json", path]
    res["command"] = " ".join(["python bench/shard.py", *args, "--device", device])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, limit - 5),
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    with open(report.path("gpu_shard.txt"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        res.update(status="error", error=f"bench/shard.py exited with status {proc.returncode}: "
                                         f"{(proc.stdout + proc.stderr)[-400:]}")
        return
    doc = json.load(open(path))
    res.update(log="gpu_shard.txt", result="gpu_shard.json", runs=[
        {"run": r["name"], "held_bytes": r["max_held_bytes"], "load_peak_bytes": r["max_load_peak_bytes"],
         "cuda_peak_bytes": max(x.get("cuda_peak_bytes", 0) for x in r["ranks"]), "step_s": r["step_s"]}
        for r in doc["runs"]])
    for r in res["runs"]:
        print(f"   {r['run']}: holds {common.gib(r['held_bytes'])}, step {r['step_s']:.2f} s")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or common.RESULTS,
                   help="output folder (default: $OUT, else bench/results/)")
    p.add_argument("--smoke", action="store_true", help="every stage at tiny sizes (the CPU, seconds)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one) | cpu | cuda")
    p.add_argument("--only", default="", help=f"comma-separated stages to run, of {','.join(STAGES)}")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole run (default: the sum of the stage budgets, 400 at full size)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    if bad := set(only) - set(STAGES):
        p.error(f"unknown stage(s) {', '.join(sorted(bad))}; stages: {', '.join(STAGES)}")

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type != "cuda" and not args.smoke:
        p.error("the full-size stages need a CUDA device (7B models); on the CPU run --smoke")
    budget = SMOKE_BUDGET if args.smoke else BUDGET
    report = Report(os.path.abspath(args.out), device, args.smoke, argv)
    with contextlib.suppress(FileNotFoundError):
        os.remove(report.path("gpu_trace.txt"))
    try:
        report.doc["machine"] = machine_info(device)
    except Exception as e:  # noqa: BLE001
        report.doc["machine"] = {"error": f"{type(e).__name__}: {e}", "torch": torch.__version__}
    print(f"bench/gpu.py ({report.doc['mode']}) on {report.doc['machine'].get('device_name', device)}; "
          f"torch {torch.__version__}; writing {report.out_dir}/gpu.json and gpu.md", flush=True)
    deadline = time.time() + (args.deadline or sum(budget.values()))
    funcs = {"matmul": stage_matmul, "cuda_tests": stage_cuda_tests, "train_bf16": stage_train_bf16,
             "train_nf4": stage_train_nf4, "score": stage_score, "real_run": stage_real_run,
             "sharded": stage_sharded}
    for name in STAGES:
        if only and name not in only:
            report.stages[name] = {"status": "skipped", "reason": "not in --only"}
            continue
        run_stage(report, name, funcs[name], budget[name], deadline)
    report.save()
    print("\n" + markdown(report.doc))
    print(f"wrote {report.path('gpu.json')} and gpu.md ({report.doc['elapsed_s']:.0f} s)")
    return report.doc


if __name__ == "__main__":
    main()
