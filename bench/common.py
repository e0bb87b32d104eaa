"""Helpers shared by the three benchmarks: timing, resident memory, fresh-subprocess workers, tables.

Nothing here is imported by the project's modules; the scripts in bench/ import it as `common`.
Memory on CPU is read from /proc/self/status: VmHWM is the peak resident set size of the process,
and writing "5" to /proc/self/clear_refs resets it to the current RSS, so one worker process can
measure the peak of one phase (loading, or a few training steps) on its own.
"""
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # model.py, lora.py, quant.py, eval.py live at the top level

RESULTS = os.path.join(ROOT, "bench", "results")


# ----------------------------------------------------------------------------- memory

def _status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def rss_bytes():
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes():
    """Peak resident set size since the process started or since the last reset_peak_rss()."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss():
    """Make VmHWM equal to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class RssSampler:
    """Polls anonymous and file-backed RSS in a thread (every `interval` s) and keeps their maxima:
    VmHWM has no split, and file-backed pages (a mapped safetensors shard) are page cache the kernel
    can drop, so it is worth knowing how much of a peak they were."""

    def __init__(self, interval=0.002):
        import threading
        self.interval, self.max_anon, self.max_file = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.max_anon = max(self.max_anon, _status_kib("RssAnon") * 1024)
            self.max_file = max(self.max_file, _status_kib("RssFile") * 1024)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- workers

# glibc keeps freed heap memory for reuse, so after a few steps the RSS of a PyTorch process sits well
# above the bytes it holds. With this setting every allocation of 64 KiB or more is its own mapping,
# returned to the OS when the tensor is freed: RSS then follows the live bytes (the CPU analogue of
# torch.cuda.max_memory_allocated). The benchmarks report peak RSS both ways.
LIVE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_worker(argv, timeout=3600, env=None):
    """Run `python argv...` in a fresh process; it prints one JSON object on its last stdout line."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"worker {' '.join(argv)} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_reply(obj):
    print(json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------- timing and reports

def median(xs):
    return statistics.median(xs)


def paired_ratio(a, b):
    """Median over repetitions of a[i] / b[i], where a[i] and b[i] ran back to back. On a shared
    machine whose load comes and goes, this is steadier than the ratio of the two medians."""
    return statistics.median(x / y for x, y in zip(a, b))


def synchronize(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds one call of fn() takes, waiting for the GPU when there is one."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def machine(device="cpu"):
    """What the numbers were measured on, for the JSON and the table header."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "python": platform.python_version()}
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # not installed, or broken on this machine: the report says so
            info[pkg] = None
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def verdict(ok):
    return "PASS" if ok else "MISS"


def table(rows, header):
    """Print rows (lists of cells) under a header, columns padded to fit."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def gib(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def write_json(path, name, obj):
    path = path or os.path.join(RESULTS, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print(f"\nwrote {os.path.relpath(path)}")
    return path


def tempdir(prefix):
    return tempfile.TemporaryDirectory(prefix=prefix)


# ----------------------------------------------------------------------------- models with the same weights

def mistral_56m():
    """The CPU profile of issue 8: Mistral-shaped, about 56M parameters, fp32."""
    from model import Config
    return Config(name="mistral-56m", arch="mistral", vocab_size=32000, hidden_size=512, intermediate_size=1376,
                  n_layers=8, n_heads=8, n_kv_heads=4, torch_dtype="float32")


def init_weights_(model, seed=0):
    """The same random weights in any model with HF parameter names: norms 1, the rest N(0, 0.02),
    each tensor from a generator seeded by its name (the order of construction does not matter).
    LoRA tensors are left alone."""
    import zlib
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                g = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.normal_(0.0, 0.02, generator=g)
    return model


def synthetic_ours(config, device, dtype, seed=0):
    """model.Transformer built on the meta device and filled on `device`: never on disk or host."""
    import torch
    from model import Transformer
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    return init_weights_(model.to_empty(device=device), seed)


def hf_config(config):
    """The transformers config of a model.Config: its own model_type's class (Mistral, Llama, Qwen2)."""
    import transformers
    hf = config.to_hf()
    return transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)


def synthetic_hf(config, device, dtype, seed=0):
    """The same weights as synthetic_ours, in a transformers model built on meta and filled on `device`."""
    import torch
    import transformers
    cfg = hf_config(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    model = model.to_empty(device=device)
    rotary = model.model.rotary_emb  # its inv_freq buffers are not parameters: compute them again
    model.model.rotary_emb = type(rotary)(cfg).to(device)
    return init_weights_(model, seed)


def write_checkpoint(config, path, dtype, seed=0, max_shard_size="1GB"):
    """A Hugging Face-format folder with init_weights_'s weights in `dtype`, which both sides load."""
    from model import save_model
    save_model(synthetic_ours(config, "cpu", dtype, seed), path, max_shard_size=max_shard_size)
    return path


def warm_up_torch(device):
    """Pay torch's one-time costs (thread pools, kernel libraries, the autograd engine) before a
    memory baseline is read, so that no side is charged for them: a tiny forward, backward, AdamW."""
    import torch
    import torch.nn.functional as F
    w = torch.nn.Linear(64, 64, device=device)
    x = torch.randn(2, 4, 8, 64, device=device)
    y = F.scaled_dot_product_attention(x, x, x, is_causal=True)
    F.cross_entropy(w(F.silu(y)).flatten(0, 2), torch.zeros(64, dtype=torch.long, device=device)).backward()
    torch.optim.AdamW(w.parameters(), fused=True if torch.device(device).type == "cuda" else None).step()
    synchronize(device)
