"""Rating-first scoring throughput, this project vs a transformers + peft forward pass, same batches.

    python bench/score.py                  # CPU: Mistral-shaped 56M model, fp32, 64 prompts of 128-256 tokens
    python bench/score.py --device cuda    # Mistral-7B shape, bf16, 128 prompts of 256-512 tokens (GPU only)
    python bench/score.py --smoke          # tiny sizes, seconds (tests/test_bench.py)

Scoring a rating-first model reads the distribution over the five rating tokens at each example's
decision position, from one forward pass. This project: `eval.rating_logits` (model(ids,
logits_at=decision_pos): the LM head runs at one position per example), then a softmax over the five
rating logits. transformers: `model(input_ids, attention_mask).logits` (the LM head at every
position, as a plain forward pass gives it), gathered at the same positions. Both carry the same
rank-16 LoRA adapter, unmerged, on the same random weights; prompts are sorted by length and
right-padded, as eval.py batches them. The two sides alternate pass by pass (order flipped each
repetition) after a warm-up; examples/s is the number of prompts over the median time of a pass.
"""
import argparse
import os
from dataclasses import asdict, dataclass, replace

import common  # puts the project root on sys.path
import torch

import lora
from model import PRESETS, Config, load_model

try:
    from eval import rating_logits
    SCORER = "eval.rating_logits"
except ImportError:  # eval.py (or data.py, which it imports) missing or broken
    def rating_logits(model, batch, rating_ids):
        logits = model(batch["input_ids"], logits_at=batch["decision_pos"])  # (B, V)
        return logits.float()[:, torch.as_tensor(rating_ids, device=logits.device)]
    SCORER = "copy of eval.rating_logits (eval.py not importable here)"

RATING_IDS = [28740, 28750, 28770, 28781, 28782]  # stand-ins for "1".."5" (ids do not change the cost)


@dataclass
class Profile:
    name: str
    config: Config
    n_examples: int       # prompts scored per pass
    batch: int            # prompts per forward pass (eval.py's default is 16)
    min_len: int          # prompt lengths are uniform in [min_len, max_len]
    max_len: int
    dtype: str
    warmup: int
    reps: int
    rank: int = 16


PROFILES = {
    "cpu": Profile("cpu", common.mistral_56m(), n_examples=64, batch=16, min_len=128, max_len=256,
                   dtype="float32", warmup=1, reps=5),
    "cuda": Profile("cuda", replace(PRESETS["mistral-7b-v0.1"]), n_examples=128, batch=16, min_len=256,
                    max_len=512, dtype="bfloat16", warmup=2, reps=10),
    "smoke": Profile("smoke", replace(PRESETS["tiny"], vocab_size=32000), n_examples=8, batch=4, min_len=8,
                     max_len=24, dtype="float32", warmup=1, reps=2, rank=4),
}


def make_batches(profile, device, seed=0):
    """Random prompts, sorted by length and right-padded: the batches eval.py would form."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(profile.min_len, profile.max_len + 1, (profile.n_examples,), generator=g)
    prompts = [torch.randint(3, profile.config.vocab_size, (int(n),), generator=g) for n in lengths]
    prompts.sort(key=len)
    batches = []
    for i in range(0, len(prompts), profile.batch):
        chunk = prompts[i:i + profile.batch]
        ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)      # (B, T), pad id 0
        mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, :len(p)], mask[j, :len(p)] = p, 1
        decision_pos = torch.tensor([len(p) - 1 for p in chunk])                    # (B,) the last prompt token
        batches.append({k: v.to(device) for k, v in
                        dict(input_ids=ids, attention_mask=mask, decision_pos=decision_pos).items()})
    return batches


def random_lora(model, seed=1):
    """Non-zero adapter weights (a fresh adapter's B is zero), the same for both sides by name."""
    import zlib
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                key = name.replace("base_model.model.", "").replace(".default", "")  # PEFT's name -> ours
                g = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.01)


def build(side, profile, device, ckpt):
    from model import DTYPES
    dtype = DTYPES[profile.dtype]
    if side == "ours":
        model = load_model(ckpt, device=device, dtype=dtype) if ckpt else \
            common.synthetic_ours(profile.config, device, dtype)
        lora.add_lora(model, rank=profile.rank, alpha=2 * profile.rank, dropout=0.0)
        random_lora(model)
        model.eval()

        def score(batch):  # eval.py's scoring: one position per example
            return rating_logits(model, batch, RATING_IDS)
        return model, score
    import peft
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device) if ckpt else \
        common.synthetic_hf(profile.config, device, dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=profile.rank, lora_alpha=2 * profile.rank,
                                                       target_modules=list(lora.TARGETS), lora_dropout=0.0,
                                                       task_type="CAUSAL_LM"))
    random_lora(model)
    model.eval()
    ids = torch.tensor(RATING_IDS, device=device)

    def score(batch):  # a plain forward pass: logits at every position, then the decision positions
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        rows = torch.arange(len(logits), device=device)
        return logits[rows, batch["decision_pos"]].float()[:, ids]
    return model, score


@torch.no_grad()
def measure(profile, device, ckpt):
    sides = ["ours", "hf"]
    batches = make_batches(profile, device)
    built = {s: build(s, profile, device, ckpt) for s in sides}

    def one_pass(side):  # the rating distribution of every prompt: (n_examples, 5)
        return torch.cat([torch.softmax(built[side][1](b), -1) for b in batches])

    logits = {s: torch.cat([built[s][1](b) for b in batches]) for s in sides}   # (n_examples, 5)
    times, probs = {s: [] for s in sides}, {}
    for rep in range(profile.warmup + profile.reps):
        for s in (sides if rep % 2 == 0 else sides[::-1]):
            seconds, p = common.timed(lambda: one_pass(s), device)
            probs[s] = p
            if rep >= profile.warmup:
                times[s].append(seconds)
    res = {}
    for s in sides:
        t = common.median(times[s])
        res[s] = {"pass_s": t, "pass_s_all": times[s], "examples_per_s": profile.n_examples / t}
    res["paired_ratio"] = common.paired_ratio(times["hf"], times["ours"])   # examples/s, ours over hf
    res["max_prob_diff"] = (probs["ours"] - probs["hf"]).abs().max().item()
    res["max_logit_diff"] = (logits["ours"] - logits["hf"]).abs().max().item()
    res["logit_scale"] = logits["hf"].abs().max().item()
    res["tokens_per_pass"] = sum(int(b["attention_mask"].sum()) for b in batches)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    p.add_argument("--reps", type=int, default=None, help="timed passes per side (default: the profile's)")
    p.add_argument("--synthetic", action="store_true",
                   help="build the weights on the device instead of loading a checkpoint (the 7B default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--json", default=None, help="where to write the results (default bench/results/score.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    profile = PROFILES["smoke" if args.smoke else device.type]
    profile = replace(profile, reps=args.reps or profile.reps)
    synthetic = args.synthetic or (device.type == "cuda" and not args.smoke)
    c = profile.config
    print(f"scoring: {profile.name} profile on {device}; {c.n_layers} layers, hidden {c.hidden_size}, vocab "
          f"{c.vocab_size}, {profile.dtype}, LoRA r={profile.rank} (unmerged); {profile.n_examples} prompts of "
          f"{profile.min_len}-{profile.max_len} tokens in batches of {profile.batch}")
    print(f"time: median of {profile.reps} alternating passes after {profile.warmup} warm-up; ours: {SCORER}; "
          f"transformers: full logits with attention_mask")
    print(f"{torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    from model import DTYPES
    with common.tempdir("bench-score-") as tmp:
        ckpt = None if synthetic else common.write_checkpoint(
            replace(c, torch_dtype=profile.dtype), os.path.join(tmp, "ckpt"), DTYPES[profile.dtype])
        res = measure(profile, device, ckpt)

    ratio = res["paired_ratio"]
    print()
    common.table([["this project (LM head at the decision position)", f"{res['ours']['pass_s'] * 1000:.0f} ms",
                   f"{res['ours']['examples_per_s']:,.1f}"],
                  ["transformers+peft (full logits)", f"{res['hf']['pass_s'] * 1000:.0f} ms",
                   f"{res['hf']['examples_per_s']:,.1f}"],
                  ["ratio (ours / transformers)", f"{res['hf']['pass_s'] / res['ours']['pass_s']:.2f}x faster",
                   f"{res['ours']['examples_per_s'] / res['hf']['examples_per_s']:.2f}x"]],
                 ["side", "pass (median)", "examples/s"])
    print(f"  paired ratio (median of transformers/ours pass times, back to back): {ratio:.2f}x")
    print(f"  same answers: rating logits differ by at most {res['max_logit_diff']:.1e} (largest |logit| "
          f"{res['logit_scale']:.2f}), probabilities by {res['max_prob_diff']:.1e}")
    target = {"target": "examples/s vs transformers", "value": ratio, "goal": ">= 2.00x", "pass": ratio >= 2.0}
    print(f"  {common.verdict(target['pass'])}  {target['target']}: {ratio:.2f} (goal {target['goal']})")
    out = {"benchmark": "score", "profile": profile.name, "device": str(device), "config": asdict(profile),
           "scorer": SCORER, "weights": "synthetic (seeded, built on the device)" if synthetic else
           "one checkpoint loaded by both", "machine": common.machine(device),
           "method": f"median of {profile.reps} alternating passes over the same batches after {profile.warmup} "
                     "warm-up; the target uses the median of back-to-back time ratios",
           "threads": torch.get_num_threads(), "paired_ratio": ratio,
           "sides": {s: res[s] for s in ("ours", "hf")}, "max_prob_diff": res["max_prob_diff"],
           "max_logit_diff": res["max_logit_diff"],
           "tokens_per_pass": res["tokens_per_pass"], "targets": [target]}
    common.write_json(args.json, "score" + ("_smoke" if args.smoke else ""), out)
    return out


if __name__ == "__main__":
    main()
