"""Look inside trained runs: entropy layer by layer, and how sharp the rating is at the output.

The paper explains its result from the inside: explanation-trained models show higher activation
entropy in their intermediate layers and a sharper distribution at the output. This file measures
those quantities on any run, from one forward pass per batch with forward hooks (model.py is not
changed), at the decision position (the position whose logits give the rating):

  per layer L (the residual stream after block L, L = 1..n_layers)
    act_entropy          entropy of p_i = h_i^2 / sum_j h_j^2 over the hidden dimensions (nats):
                         log(d) when every dimension carries the same energy, 0 when one carries all
    act_entropy_norm     the same divided by log(d), in [0, 1]
    lens_entropy         logit lens: final norm + LM head on that layer's state; entropy over the vocabulary
    lens_rating_entropy  ... entropy of the five-way rating distribution (the five rating logits, softmaxed)
    lens_gold_prob       ... the gold rating's probability in that five-way distribution
    attn_entropy         entropy of the decision position's attention over the keys, mean over heads
    attn_entropy_norm    the same divided by log(n), n the keys that position sees (its position + 1,
                         at most the sliding window), in [0, 1]; 0 when it sees one key
  at the output
    top_prob, rating_entropy, gold_prob   of the five-way distribution; correct (argmax == gold)
    rating_mass          the share of the full-vocabulary probability that falls on the five rating tokens

Attention weights are not materialised by the model (it uses scaled_dot_product_attention), so a
hook on each `self_attn` recomputes them from its input for the decision query only: one row of
softmax(q k^T / sqrt(head_dim)), with the same rotary tables and mask the model used.

Explanation-first runs are read teacher-forced: the decision position comes after the run's own
target text (the real or pseudo explanation), as in train.py's validation, so their `correct` is
teacher-forced (eval.py scores them by generating the explanation instead). Left out: gradients,
attributions, probing classifiers, per-head results (heads are averaged).

    python analysis.py runs/grid/* --out analysis/               # test split, every example, best/
    python analysis.py runs/demo/label runs/demo/explanation --split val --n 200 --out analysis/demo

Runs are grouped by variant (--rating-weight runs apart, as "explanation+rw"; explanation-first runs
apart, as "explanation/explain_first"); the runs (seeds) of a variant are averaged example by example.
Runs whose base models differ in depth are refused before anything is loaded. Written to --out:
  per_layer.csv   every metric x layer, per run and per variant: mean and bootstrap 95% interval
  summary.csv     the middle third of the layers against the output, and each variant's difference
                  from `label` on the same examples, with a paired bootstrap interval
  analysis.json   all of the above, plus the settings
  entropy_by_layer.png   with matplotlib installed: four panels, one line per variant

Differences from `label` are reported for rating-first groups only. Their decision position is the
last prompt token, the same position in the same prompt for every variant, so a difference there is
the training's. An explanation-first group's decision position comes after the explanation: many
more keys, and the run's own explanation (or pseudo-explanation) among them, so every quantity there
differs from label's for reasons other than training. Dividing attention entropy by log(keys) does
not remove that: it fixes only the ceiling, and attention spread over a fixed k keys still reads
log k / log n, falling as n grows. So those groups get their levels (attn_entropy_norm beside the raw
one) but no `minus_label`; analysis.json says why in `minus_label_omitted`.
"""
import cli  # first, so that Ctrl-C while torch loads is one line too (cli.py)
import contextlib
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

import data
import eval as evaluate
from cli import write_atomic
from model import apply_rope, load_config
from runs import CONFIG, Run

LAYER_METRICS = ("act_entropy", "act_entropy_norm", "lens_entropy", "lens_rating_entropy", "lens_gold_prob",
                 "attn_entropy", "attn_entropy_norm")
OUTPUT_METRICS = ("top_prob", "rating_entropy", "gold_prob", "correct", "rating_mass")
N_BOOT = 1000  # bootstrap resamples for every interval


class AnalysisError(cli.Error, ValueError):
    """A run folder or request that cannot be analysed; the message says which and why."""


# ----------------------------------------------------------------------------- the measures

def activation_entropy(h):
    """Entropy (nats) of the energy distribution p_i = h_i^2 / sum_j h_j^2 over the last dimension.
    Scale-free: h and c * h give the same value. (..., d) -> (...)."""
    energy = h.float().pow(2)
    p = energy / energy.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.xlogy(p, p).sum(-1)  # xlogy: 0 * log 0 = 0


def softmax_entropy(logits):
    """Entropy (nats) of softmax(logits) over the last dimension, computed in fp32. (..., n) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def decision_attention(attn, x, cos, sin, mask, pos):
    """The attention probabilities of the query at `pos` in each row, recomputed the way
    model.Attention computes them. x (B, T, D) is the attention's input (after input_layernorm),
    cos/sin (B, 1, T, hd) the rotary tables, mask None (causal) or bool (B, 1, T, S), pos (B,).
    Returns (B, n_heads, T) in fp32."""
    B, T, _ = x.shape
    allowed = visible_keys(mask, pos, T)                                               # (B, T)
    rows = torch.arange(B, device=x.device)
    q = attn.q_proj(x[rows, pos]).view(B, attn.n_heads, 1, attn.head_dim)             # (B, H, 1, hd)
    q = apply_rope(q, cos[rows, :, pos][:, :, None], sin[rows, :, pos][:, :, None])     # tables (B, 1, 1, hd)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)      # (B, KV, T, hd)
    k = apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)                    # (B, H, T, hd)
    scores = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) / math.sqrt(attn.head_dim)  # (B, H, T)
    return torch.softmax(scores.masked_fill(~allowed[:, None, :], float("-inf")), dim=-1)


def visible_keys(mask, pos, T):
    """Which of the T keys the query at `pos` (B,) may attend to: (B, T) bool, from the model's mask
    (None: causal; bool (B or 1, 1, T, S): causal, sliding window, padding)."""
    if mask is None:
        return torch.arange(T, device=pos.device)[None, :] <= pos[:, None]            # (B, T) causal
    rows = torch.arange(len(pos), device=pos.device)
    return mask.expand(len(pos), -1, -1, -1)[rows, 0, pos]                             # (B, T)


@contextlib.contextmanager
def capture(model, decision_pos):
    """Forward hooks that record, for each block, the residual stream at `decision_pos` (B,) in
    `hidden` (a list of (B, D)), the decision query's attention probabilities in `attn` (a list of
    (B, H, T)), and how many keys that query sees in `n_keys` (B,) (the same in every layer). The
    hooks are removed on exit."""
    rec = {"hidden": [], "attn": [], "n_keys": None}
    rows = torch.arange(len(decision_pos), device=decision_pos.device)

    def on_block(module, args, out):                                                   # out (B, T, D)
        rec["hidden"].append(out[rows, decision_pos])

    def on_attn(module, args, out):  # args: x, cos, sin, mask, cache, layer (see model.Block)
        x, cos, sin, mask = args[:4]
        rec["attn"].append(decision_attention(module, x, cos, sin, mask, decision_pos))
        rec["n_keys"] = visible_keys(mask, decision_pos, x.shape[1]).sum(-1)

    handles = []
    try:
        for block in model.model.layers:
            handles.append(block.register_forward_hook(on_block))
            handles.append(block.self_attn.register_forward_hook(on_attn))
        yield rec
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def measure_batch(model, batch, rating_ids):
    """Every per-layer and output measure for one collated batch: {metric: (B, n_layers) or (B,)}."""
    model.eval()
    pos, gold = batch["decision_pos"], batch["label"] - 1                              # gold in 0..4
    rating_ids = torch.as_tensor(rating_ids, device=pos.device)
    with capture(model, pos) as rec:
        final = model(batch["input_ids"], logits_at=pos).float()                       # (B, V)
    h = torch.stack(rec["hidden"], 1)                                                  # (B, L, D)
    lens = model.lm_head(model.model.norm(h)).float()                                 # (B, L, V)
    rows = torch.arange(len(pos), device=pos.device)
    attn = torch.stack(rec["attn"], 1)                                                 # (B, L, H, T)
    out = {
        "act_entropy": activation_entropy(h),
        "act_entropy_norm": activation_entropy(h) / math.log(h.shape[-1]),
        "lens_entropy": softmax_entropy(lens),
        "lens_rating_entropy": softmax_entropy(lens[..., rating_ids]),
        "lens_gold_prob": torch.softmax(lens[..., rating_ids], -1)[rows, :, gold],   # (B, L)
        "attn_entropy": -torch.xlogy(attn, attn).sum(-1).mean(-1),                    # (B, L)
    }
    log_n = rec["n_keys"].double().log()[:, None]                                      # (B, 1)
    out["attn_entropy_norm"] = torch.where(log_n > 0, out["attn_entropy"] / log_n.clamp_min(1e-30), 0.0)
    p5 = torch.softmax(final[:, rating_ids], -1)                                        # (B, 5)
    out.update(top_prob=p5.max(-1).values, rating_entropy=softmax_entropy(final[:, rating_ids]),
               gold_prob=p5[rows, gold],
               correct=(p5.argmax(-1) == gold).float(),
               rating_mass=torch.softmax(final, -1)[:, rating_ids].sum(-1))
    return {k: v.cpu().double().numpy() for k, v in out.items()}


# ----------------------------------------------------------------------------- runs

def load_run(run_dir, checkpoint="best", device="auto"):
    """(model, tokenizer, device, train config) of a run folder, opened as eval.py opens it."""
    return evaluate.open_run(run_dir, checkpoint, device)[:4]


def run_examples(cfg, tok, split="test", n=None):
    """The first n examples of one split, built as the run built its training examples: same
    variant, order, template and length limit (bow draws its words from the training split)."""
    return data.build_examples(evaluate.run_records(cfg, split)[:n], tok, variant=cfg["variant"], order=cfg["order"],
                               template=cfg["template"], max_len=cfg["max_len"], seed=cfg["seed"],
                               axes=cfg.get("axes_file") or None,
                               pool=evaluate.run_records(cfg, "train") if cfg["variant"] == "bow" else None)


@torch.no_grad()
def analyse_run(run_dir, split="test", n=None, checkpoint="best", batch_size=8, device="auto"):
    """Per-example measures of one run: {"ids": [(id, axis)...], "variant": ..., "order": ...,
    metric: array (N, n_layers) or (N,)}."""
    model, tok, device, cfg = load_run(run_dir, checkpoint, device)
    examples = run_examples(cfg, tok, split, n)
    if not examples:
        raise AnalysisError(f"{run_dir}: no {split} examples fit in max_len={cfg['max_len']}")
    rating_ids = data.rating_token_ids(tok)
    parts, order = [], []
    for idx in data.batch_indices(examples, batch_size, seed=0, epoch=0):
        batch = {k: v.to(device) for k, v in data.collate([examples[i] for i in idx], tok.pad_id).items()}
        parts.append(measure_batch(model, batch, rating_ids))
        order += idx
    back = np.argsort(order)  # the batches were length-bucketed: restore the examples' order
    res = {k: np.concatenate([p[k] for p in parts])[back] for k in parts[0]}
    # runs are grouped as eval.py compare groups them (variant, '+rw' with --rating-weight); explanation-first
    # runs form groups of their own ("explanation/explain_first")
    group = evaluate.run_group(cfg) + ("/explain_first" if cfg["order"] == "explain_first" and cfg["variant"] != "label" else "")
    res.update(ids=[(e.id, e.axis) for e in examples], variant=group, order=cfg["order"])
    return res


# ----------------------------------------------------------------------------- statistics

def bootstrap(values, seed=0, n_boot=N_BOOT):
    """Mean over the first axis of values (N, ...) and its percentile 95% interval from n_boot
    resamples of the N examples (the same resamples for every column)."""
    values = np.asarray(values, dtype=np.float64)
    N = len(values)
    counts = np.random.default_rng(seed).multinomial(N, np.full(N, 1.0 / N), size=n_boot)  # (n_boot, N)
    means = np.tensordot(counts, values, axes=1) / N                                      # (n_boot, ...)
    lo, hi = np.percentile(means, [2.5, 97.5], axis=0)
    return values.mean(0), lo, hi


def middle_third(n_layers):
    """0-based indices of the middle third of the layers (np.array_split into three parts)."""
    return np.array_split(np.arange(n_layers), 3)[1]


def _shared(results):
    """The (id, axis) keys every result has, in the first one's order, and each result's row of each."""
    where = [{key: i for i, key in enumerate(r["ids"])} for r in results]
    common = [key for key in results[0]["ids"] if all(key in w for w in where)]
    return common, [[w[key] for key in common] for w in where]


def pool_runs(results):
    """The per-example values of several runs of one variant, averaged over the runs, on the examples
    all of them have (runs of a grid use the same split, so normally every one)."""
    common, rows = _shared(results)
    pooled = {"ids": common}
    for k in results[0]:
        if isinstance(results[0][k], np.ndarray) and all(k in r for r in results):
            pooled[k] = np.mean([r[k][i] for r, i in zip(results, rows)], axis=0)
    return pooled


def describe(res):
    """Mean and interval of every metric: per layer, at the output, and the middle-third summary."""
    out = {"n": len(res["ids"]), "per_layer": {}, "output": {}, "middle_third": {}}
    for k in LAYER_METRICS:
        if k in res:
            mean, lo, hi = bootstrap(res[k])
            out["per_layer"][k] = {"mean": mean.tolist(), "lo": lo.tolist(), "hi": hi.tolist()}
            mid = res[k][:, middle_third(res[k].shape[1])].mean(1)
            out["middle_third"][k] = dict(zip(("mean", "lo", "hi"), map(float, bootstrap(mid))))
    for k in OUTPUT_METRICS:
        out["output"][k] = dict(zip(("mean", "lo", "hi"), map(float, bootstrap(res[k]))))
    return out


def paired_difference(res, base):
    """Each summary quantity of `res` minus that of `base` on their shared ids, with a paired
    bootstrap interval: the middle-third layer metrics and the output metrics."""
    _, (mine, theirs) = _shared([res, base])
    diff = {}
    for k in LAYER_METRICS + OUTPUT_METRICS:
        if k in res and k in base:
            a, b = res[k][mine], base[k][theirs]
            if a.ndim == 2:
                mid = middle_third(a.shape[1])
                a, b = a[:, mid].mean(1), b[:, mid].mean(1)
            diff[k] = dict(zip(("mean", "lo", "hi"), map(float, bootstrap(a - b))))
    return diff


# ----------------------------------------------------------------------------- reports

def check_same_depth(runs):
    """Per-layer curves and middle thirds only line up between models of one depth: refuse runs whose
    base models (train_config.json "model", read with model.load_config) differ in layer count,
    before anything is loaded or run."""
    depth = {}
    for run in runs:
        cfg = Run(run).config
        if "model" not in cfg:
            raise AnalysisError(f"{Run(run).file(CONFIG)}: no 'model' (the base checkpoint)")
        depth[run] = load_config(cfg["model"]).n_layers
        first = runs[0]
        if depth[run] != depth[first]:
            raise AnalysisError(f"{first} has {depth[first]} layers but {run} has {depth[run]}: per-layer "
                                "results of models of different depths do not line up; analyse them separately")


@dataclass
class AnalysisConfig:
    POSITIONAL: ClassVar = ("runs",)
    runs: list                        # run folders written by train.py
    out: str                          # folder for per_layer.csv, summary.csv, analysis.json, the plot
    split: Literal["train", "val", "test"] = "test"  # which split's examples
    n: int | None = None              # use only the first N examples of the split (default: all)
    checkpoint: Literal["best", "last"] = "best"  # which checkpoint of each run
    batch_size: int = 8               # examples per forward pass
    device: str = "auto"              # auto | cpu | cuda | cuda:N


def analyse(cfg):
    """Analyse every run, group by variant, write the CSV / JSON (/ PNG) files; returns the JSON dict."""
    if cfg.n is not None and cfg.n < 1:
        raise AnalysisError(f"--n must be at least 1, got {cfg.n}")
    runs, out, split, n, checkpoint = cfg.runs, cfg.out, cfg.split, cfg.n, cfg.checkpoint
    check_same_depth(runs)
    results = {}
    for run in runs:
        name = os.path.normpath(run)
        print(f"== {name}", flush=True)
        results[name] = analyse_run(run, split, n, checkpoint, cfg.batch_size, cfg.device)
    by_variant = {}
    for name, res in results.items():
        by_variant.setdefault(res["variant"], []).append(res)
    pooled = {v: pool_runs(rs) for v, rs in by_variant.items()}
    report = {"settings": {"runs": list(results), "split": split, "n": n, "checkpoint": checkpoint,
                           "bootstrap": N_BOOT},
              "runs": {name: {"variant": r["variant"], "order": r["order"], **describe(r)} for name, r in results.items()},
              "variants": {v: {"runs": len(by_variant[v]), **describe(p)} for v, p in pooled.items()}}
    for v, p in pooled.items():
        if "label" not in pooled or v == "label":
            continue
        if any(r["order"] == "explain_first" for r in by_variant[v]):  # see the docstring
            report["variants"][v]["minus_label_omitted"] = (
                "explanation-first: the decision position follows the explanation, not the prompt as in "
                "label, so no quantity there is paired with label's (attn_entropy_norm included)")
        else:
            report["variants"][v]["minus_label"] = paired_difference(p, pooled["label"])
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "analysis.json"), json.dumps(report, indent=1))
    write_csvs(report, out)
    plot(report, out)
    print_summary(report)
    return report


def write_csvs(report, out):
    """per_layer.csv: one row per (run or variant, layer, metric); summary.csv: one row per (run or
    variant, metric) for the middle third and the output, with the difference from `label`."""
    head = ["scope", "name", "variant", "layer", "metric", "mean", "lo", "hi", "n"]
    with open(os.path.join(out, "per_layer.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for scope, name, variant, d in _groups(report):
            for k, v in d["per_layer"].items():
                for layer, row in enumerate(zip(v["mean"], v["lo"], v["hi"]), 1):
                    w.writerow([scope, name, variant, layer, k, *row, d["n"]])
            for k, v in d["output"].items():
                w.writerow([scope, name, variant, "output", k, v["mean"], v["lo"], v["hi"], d["n"]])
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head[:3] + ["where", "metric", "mean", "lo", "hi", "minus_label", "minus_label_lo",
                               "minus_label_hi", "n"])
        for scope, name, variant, d in _groups(report):
            for where in ("middle_third", "output"):
                for k, v in d[where].items():
                    diff = d.get("minus_label", {}).get(k, {})
                    w.writerow([scope, name, variant, where, k, v["mean"], v["lo"], v["hi"],
                                diff.get("mean", ""), diff.get("lo", ""), diff.get("hi", ""), d["n"]])


def _groups(report):
    for name, d in report["runs"].items():
        yield "run", name, d["variant"], d
    for v, d in report["variants"].items():
        yield "variant", v, v, d


def plot(report, out):
    """entropy_by_layer.png: four panels, one line (with its 95% band) per variant. Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("(matplotlib is not installed: no plot; the numbers are in per_layer.csv)")
        return None
    panels = [("act_entropy_norm", "activation entropy / log d"), ("attn_entropy_norm", "attention entropy / log keys"),
              ("lens_entropy", "logit lens: vocabulary entropy (nats)"),
              ("lens_rating_entropy", "logit lens: rating entropy (nats)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (k, title) in zip(axes.flat, panels):
        for v, d in report["variants"].items():
            s = d["per_layer"][k]
            layers = np.arange(1, len(s["mean"]) + 1)
            ax.plot(layers, s["mean"], marker="o", ms=3, label=v)
            ax.fill_between(layers, s["lo"], s["hi"], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
    for ax in axes[1]:
        ax.set_xlabel("layer")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "entropy_by_layer.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_summary(report):
    keys = [("middle_third", "act_entropy_norm", "mid act H/log d"), ("middle_third", "attn_entropy", "mid attn H"),
            ("middle_third", "attn_entropy_norm", "mid attn H/log n"),
            ("output", "top_prob", "top p"), ("output", "rating_entropy", "out H5"),
            ("output", "rating_mass", "rating mass"), ("output", "correct", "accuracy")]
    width = max(map(len, report["variants"])) + 2
    print(f"\n{'variant':<{width}}{'runs':>5}" + "".join(f"{label:>16}" for *_, label in keys))
    for v, d in report["variants"].items():
        print(f"{v:<{width}}{d['runs']:>5}" + "".join(f"{d[w][k]['mean']:>16.4f}" for w, k, _ in keys))


def main(argv=None):
    return cli.main("analysis.py", __doc__, {"analyse": cli.Command(AnalysisConfig, analyse, "")}, argv,
                    default="analyse")


if __name__ == "__main__":
    sys.exit(main())
