"""Score rating classifiers, and compare fine-tuning variants across the dataset-task settings.

Scoring reads each example's distribution over the ratings 1-5 from the logits at its decision
position (the position whose next token is the rating): one batched forward pass per batch, the LM
head run at that position only. Runs trained explanation-first are decoded greedily with the KV cache
instead, and the rating is parsed from what they write; an output with no rating counts as wrong (it is
scored as the rating farthest from gold, with uniform probabilities) and is reported. Every run is
scored on the same prompts: data.build_examples makes the prompt independent of the variant.

Metrics, overall and per (dataset, axis): accuracy, macro-F1, quadratic weighted kappa, mean absolute
error, negative log-likelihood, expected calibration error (10 equal-width bins of the top rating's
probability) and the multi-class Brier score.

`compare` groups runs by variant and seed. Rows are the (dataset, axis) settings, columns the
variants, cells mean +- std of accuracy over seeds; then, per variant, the settings where it beats
label-only, the share of the label -> explanation gap it closes, a paired bootstrap 95% interval of its
accuracy difference from label-only over the same test items, and an exact sign test across settings.
Left out: corrections for testing several variants, bootstrap over seeds (an item's correctness is
first averaged over a variant's seeds), training (train.py).

    python eval.py --run runs/expl-s0 [--split test] [--checkpoint best] [--allow-unfinished]
    python eval.py --model DIR [--adapter DIR] --data FILE [--split all] [--out DIR]  # no adapter: zero-shot
    python eval.py compare runs/grid/* [--out DIR]

Length: ~660 lines for the three things eval.py owns: the metrics (numpy only, readable
alone), scoring, and the comparison tables across variants and seeds.
"""
import cli  # first, so that Ctrl-C while torch loads is one line too (cli.py)
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

import data
import lora
from cli import write_atomic
from data import ORDERS, TEMPLATES
from model import generate, load_model
from runs import CONFIG, DONE, PREDICTIONS, SCORES, Run, fingerprint, sha256

METRICS = ("accuracy", "macro_f1", "qwk", "mae", "nll", "ece", "brier")
N_BINS = 10  # calibration bins


class EvalError(cli.Error, ValueError):
    """Runs, predictions or options that cannot be scored or compared; the message says which."""


# ----------------------------------------------------------------------------- metrics (numpy)
# gold and pred are integer arrays of ratings 1..5; probs is (N, 5), row i the distribution of item i.

def accuracy(gold, pred):
    return float(np.mean(gold == pred))


def macro_f1(gold, pred):
    """Mean F1 over the ratings that occur in gold or pred (scikit-learn's convention)."""
    f1 = [2 * np.sum((gold == c) & (pred == c)) / (np.sum(gold == c) + np.sum(pred == c))
          for c in np.union1d(gold, pred)]
    return float(np.mean(f1))


def qwk(gold, pred, k=5):
    """Quadratic weighted kappa, 1 - sum(W * O) / sum(W * E): O the confusion counts, E the counts
    expected from the two marginals, W_ij = (i - j)^2 / (k - 1)^2. When gold and pred both use one
    and the same rating the ratio is 0/0; the agreement is then perfect and we return 1."""
    observed = np.zeros((k, k))
    np.add.at(observed, (gold - 1, pred - 1), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2 / (k - 1) ** 2
    chance = (weights * expected).sum()
    return 1.0 if chance == 0 else float(1 - (weights * observed).sum() / chance)


def mae(gold, pred):
    return float(np.mean(np.abs(gold - pred)))


def nll(probs, gold):
    p = probs[np.arange(len(gold)), gold - 1]
    return float(-np.mean(np.log(np.clip(p, 1e-12, None))))


def reliability(probs, gold, pred=None, n_bins=N_BINS):
    """Per bin of the top rating's probability ([0, 0.1), ..., [0.9, 1]): (mean confidence,
    accuracy, count); empty bins are (None, None, 0). pred is the prediction that accuracy scores
    (default: the top rating); passing it keeps an unparsed answer, whose probabilities are uniform
    and whose prediction is counted wrong, wrong here too."""
    conf = probs.max(1)
    correct = (probs.argmax(1) + 1 if pred is None else np.asarray(pred)) == gold
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = bins == b
        rows.append((float(conf[sel].mean()), float(correct[sel].mean()), int(sel.sum())) if sel.any()
                    else (None, None, 0))
    return rows


def ece(probs, gold, pred=None, n_bins=N_BINS):
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by the bin's share."""
    return float(sum(n / len(gold) * abs(acc - conf) for conf, acc, n in reliability(probs, gold, pred, n_bins) if n))


def brier(probs, gold):
    """Multi-class Brier score: mean squared distance to the one-hot gold rating (0 best, 2 worst)."""
    onehot = np.eye(probs.shape[1])[gold - 1]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def all_metrics(gold, pred, probs):
    gold, pred, probs = np.asarray(gold), np.asarray(pred), np.asarray(probs, dtype=np.float64)
    return {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred), "qwk": qwk(gold, pred),
            "mae": mae(gold, pred), "nll": nll(probs, gold), "ece": ece(probs, gold, pred),
            "brier": brier(probs, gold), "n": len(gold)}


def metrics_by_setting(rows):
    """rows: prediction dicts -> {"overall": metrics, "settings": {"dataset/axis": metrics}}."""
    groups = {}
    for r in rows:
        groups.setdefault(f"{r['dataset']}/{r['axis']}", []).append(r)

    def score(rs):
        return all_metrics(*_gold_pred(rs), [r["probs"] for r in rs])
    return {"overall": score(rows), "settings": {k: score(groups[k]) for k in sorted(groups)}}


def _gold_pred(rows):
    """(gold, pred) arrays of prediction rows; an answer with no rating counts as the worst one."""
    gold = np.array([r["gold"] for r in rows])
    return gold, np.array([r["predicted"] or _worst(r["gold"]) for r in rows])


def _worst(gold):
    return 5 if gold <= 3 else 1


# ----------------------------------------------------------------------------- scoring

def rating_logits(model, batch, rating_ids):
    """The logits of the five rating tokens at each example's decision position: (B, 5), fp32.
    One forward pass; the LM head runs at the decision position only."""
    logits = model(batch["input_ids"], logits_at=batch["decision_pos"])       # (B, V)
    return logits.float()[:, torch.as_tensor(rating_ids, device=logits.device)]


def _rating_probs(model, seqs, rating_ids, device):
    """Distribution over the ratings after each token sequence: (B, 5) float64. Right padding needs
    no mask (attention is causal), so the pad id does not matter."""
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)        # (B, T)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    last = torch.tensor([len(s) - 1 for s in seqs])                              # (B,)
    batch = {"input_ids": tokens.to(device), "decision_pos": last.to(device)}
    return torch.softmax(rating_logits(model, batch, rating_ids), -1).double().cpu().numpy()


def find_rating(new_tokens, tok):
    """Index of the rating token in a generated explanation-first answer ('... explanation.\nRating:
    4</s>', as data.build_examples writes it): the token after the last '\nRating:' and the pieces
    every rating starts with ('▁' for Mistral, 'Ġ' for SmolLM2). None when that token is not one of the five."""
    cue = tok.continuation("\nRating:") + tok.spaced("1")[:-1]
    for j in range(len(new_tokens) - len(cue) - 1, -1, -1):
        if new_tokens[j:j + len(cue)] == cue:
            k = j + len(cue)
            return k if new_tokens[k] in data.rating_token_ids(tok) else None
    return None


@torch.no_grad()
def score_examples(model, examples, tok, batch_size=16, device=None, order="rating_first", max_new_tokens=160):
    """Each example's distribution over the ratings 1..5 and its predicted rating (0: none found).
    Returns (probs (N, 5) float64, pred (N,) int), in the order of `examples`.

    rating_first: the input is cut right after the decision position (the rating itself is not fed)
    and the logits there are read. explain_first: greedy generation from the prompt; the distribution
    is the one at the position that produced the rating."""
    device = device or next(model.parameters()).device
    rating_ids = data.rating_token_ids(tok)
    probs, pred = np.full((len(examples), 5), 0.2), np.zeros(len(examples), dtype=int)
    by_length = sorted(range(len(examples)), key=lambda i: examples[i].n_prompt)  # little padding
    for start in range(0, len(examples), batch_size):
        idx = by_length[start:start + batch_size]
        if order == "rating_first":
            p = _rating_probs(model, [examples[i].input_ids[:examples[i].decision_pos + 1] for i in idx],
                              rating_ids, device)
            probs[idx], pred[idx] = p, p.argmax(1) + 1
            continue
        prompts = [examples[i].input_ids[:examples[i].n_prompt] for i in idx]
        outs = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
        found = [(i, prompt + out[:j], rating_ids.index(out[j]) + 1) for i, prompt, out in zip(idx, prompts, outs)
                 if (j := find_rating(out, tok)) is not None]
        if found:
            idx, seqs, parsed = map(list, zip(*found))
            probs[idx], pred[idx] = _rating_probs(model, seqs, rating_ids, device), parsed
    return probs, pred


def split_records(path, split="test", axes="", datasets="", skip_bad=False, axes_file=None):
    """The records of one split ("all": every record), kept to the comma-separated axes and datasets
    (axes_file: descriptions of axes beyond the built-in three)."""
    records = [r for r in data.keep(data.load_records(path, skip_bad=skip_bad, axes=axes_file), axes, datasets)
               if split == "all" or data.split_of(r["id"]) == split]
    if not records:
        raise EvalError(f"{path}: no records in the {split!r} split (after the axis and dataset filters)")
    return records


def load_scorer(model_dir, adapter=None, device="auto", quantize=None, dtype=None):
    """(model in eval mode, tokenizer, device): a base checkpoint (in `dtype`, default load_model's),
    with a LoRA adapter when given."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    tok = data.Tokenizer(model_dir)
    model = load_model(model_dir, device=device, dtype=dtype, quantize=quantize or None)
    data.check_vocab(tok, model.config.vocab_size, model_dir)
    if adapter:
        lora.load_adapter(model, adapter)
    return model.eval(), tok, device


def evaluate(model, tok, records, device, batch_size=16, order="rating_first", **build):
    """Score records (build: template, max_len) -> (prediction rows, metrics). The prompt is the same
    in every variant (data.build_examples makes sure of it, truncation included), so the label
    variant's serves; explanation-first prompts end in 'Explanation:', so they are taken from the
    explanation variant, and the records need explanations."""
    variant = "explanation" if order == "explain_first" else "label"
    examples = data.build_examples(records, tok, variant=variant, order=order, **build)
    t0 = time.perf_counter()
    probs, pred = score_examples(model, examples, tok, batch_size, device, order=order)
    seconds = time.perf_counter() - t0
    rows = [{"id": e.id, "dataset": e.dataset, "axis": e.axis, "gold": e.label, "predicted": int(k) or None,
             "probs": p.tolist()} for e, p, k in zip(examples, probs, pred)]
    metrics = metrics_by_setting(rows)
    metrics.update(unparsed=int(np.sum(pred == 0)), order=order, examples_per_s=len(rows) / seconds)
    return rows, metrics


def write_results(out_dir, rows, metrics):
    """predictions.jsonl and metrics.json in out_dir (a run's own go through runs.Run.write_scores)."""
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, PREDICTIONS), "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(os.path.join(out_dir, SCORES), json.dumps(metrics, indent=2))


def run_records(cfg, split):
    """The records of one split of a run's data, filtered as the run was trained (train_config.json)."""
    return split_records(cfg["data"], split, cfg["axes"], cfg["datasets"], cfg.get("skip_bad") is True,
                         cfg.get("axes_file") or None)


# what scoring reads of train_config.json, with the type each must have (a file edited by hand is
# named with the field, never a KeyError); comparing needs only the first two
RUN_FIELDS = {"variant": str, "seed": int, "model": str, "data": str, "order": str, "template": str, "max_len": int,
              "axes": str, "datasets": str}


def run_config(run_dir, fields=tuple(RUN_FIELDS)):
    cfg = Run(run_dir).config
    for k in fields:
        kind = RUN_FIELDS[k]
        if not isinstance(cfg.get(k), kind) or isinstance(cfg.get(k), bool):
            raise EvalError(f"{Run(run_dir).file(CONFIG)}: field {k!r} must be a {kind.__name__}, got {cfg.get(k)!r}")
    return cfg


def open_run(run_dir, checkpoint="best", device="auto", quantize=None):
    """What eval.py, analysis.py and study.py read of a run folder: (model, tokenizer, device,
    train config, checkpoint folder), the base model with the adapter of run_dir/<checkpoint> (best/,
    or last/ for a run without a validation split), in 4 bits if the run was (or `quantize` says),
    and in the dtype the run trained in when it named one (a bf16 CPU run is scored in bf16, as it
    trained; "auto" keeps load_model's default)."""
    run = Run(run_dir)
    cfg = run_config(run_dir)
    if cfg.get("full"):
        raise EvalError(f"{run_dir}: a full (pretraining) run rates nothing; score its checkpoint zero-shot "
                        f"with --model {os.path.join(run_dir, checkpoint)} --data FILE")
    ckpt = run.checkpoint(checkpoint)
    dtype = cfg.get("dtype") if cfg.get("dtype", "auto") != "auto" else None
    model, tok, device = load_scorer(cfg["model"], ckpt, device, cfg.get("quantize") if quantize is None else quantize,
                                     dtype)
    return model, tok, device, cfg, ckpt


def score_run(run_dir, split="test", checkpoint="best", batch_size=16, device="auto", quantize=None):
    """Score a run folder's checkpoint on a split of its own data; write predictions.jsonl and
    metrics.json (with the sha256 of the checkpoint and of the data file) into run_dir/eval-<split>/
    and return the metrics. One scorer per run and split at a time (runs.Run.score_lock)."""
    with Run(run_dir).score_lock(split):
        return _score_run(run_dir, split, checkpoint, batch_size, device, quantize)


def _score_run(run_dir, split, checkpoint, batch_size, device, quantize):
    model, tok, device, cfg, ckpt = open_run(run_dir, checkpoint, device, quantize)
    data_sha256 = sha256(cfg["data"])  # before reading it: a change after this is seen as stale later
    records = run_records(cfg, split)
    order = cfg["order"] if cfg["variant"] != "label" else "rating_first"  # as data.build_examples trains it
    rows, metrics = evaluate(model, tok, records, device, batch_size, order=order,
                             template=cfg["template"], max_len=cfg["max_len"], axes=cfg.get("axes_file") or None)
    metrics.update(run=run_dir, checkpoint=ckpt, checkpoint_sha256=fingerprint(ckpt), split=split,
                   variant=cfg["variant"], seed=cfg["seed"], data=cfg["data"], data_sha256=data_sha256,
                   base_model=cfg["model"])
    Run(run_dir).write_scores(split, rows, metrics)
    return metrics


# ----------------------------------------------------------------------------- comparing runs

PREDICTION_FIELDS = ("id", "dataset", "axis", "gold", "predicted", "probs")


def read_predictions(path):
    """The rows of a predictions.jsonl; a line that is not a prediction is an EvalError naming the
    file and the line (blank lines are skipped)."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}: line {n}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                r = json.loads(line)
            except ValueError as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
                raise EvalError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(r, dict):
                raise EvalError(f"{where}: expected a JSON object")
            if missing := [k for k in PREDICTION_FIELDS if k not in r]:
                raise EvalError(f"{where}: missing field {missing[0]!r}")
            if r["gold"] not in (1, 2, 3, 4, 5) or r["predicted"] not in (None, 1, 2, 3, 4, 5):
                raise EvalError(f"{where}: 'gold' and 'predicted' must be ratings 1..5 "
                                f"(predicted may be null), got {r['gold']!r} and {r['predicted']!r}")
            if not (isinstance(r["probs"], list) and len(r["probs"]) == 5
                    and all(isinstance(p, (int, float)) for p in r["probs"])):
                raise EvalError(f"{where}: 'probs' must be a list of 5 numbers")
            rows.append(r)
    if not rows:
        raise EvalError(f"{path}: no predictions")
    return rows


def _can_score(run, cfg):
    try:
        return "model" in cfg and "data" in cfg and bool(Run(run).checkpoint())
    except cli.Error:
        return False


def load_grid(runs, split="test"):
    """{variant: {seed: (run_dir, prediction rows sorted by item)}}. Runs not yet scored, whose
    predictions no longer describe what produced them (runs.Run.stale_reason: an edited predictions
    file, changed data, a changed checkpoint), or whose predictions.jsonl is corrupt, are scored first;
    without a checkpoint to score again from, that is an error naming the file. Runs scored on
    different items (or gold labels) are refused, never mixed; runs on different base models are
    compared with a warning."""
    grid, ref, bases = {}, None, {}
    for run in runs:
        cfg = run_config(run, ("variant", "seed"))
        path = Run(run).predictions(split)
        if not os.path.exists(path):
            print(f"scoring {run} on the {split} split")
            score_run(run, split)
        elif reason := Run(run).stale_reason(split):
            if not _can_score(run, cfg):
                raise EvalError(f"{run}: {reason}; it has no checkpoint to score it again from")
            print(f"rescoring {run} on the {split} split: {reason}")
            score_run(run, split)
        try:
            rows = read_predictions(path)
        except EvalError as e:
            if not _can_score(run, cfg):
                raise EvalError(f"{e}; {run} has no checkpoint to score it again from") from None
            print(f"rescoring {run} on the {split} split: {e}")
            score_run(run, split)
            rows = read_predictions(path)
        rows = sorted(rows, key=lambda r: (r["dataset"], r["id"], r["axis"]))
        items = [(r["dataset"], r["id"], r["axis"], r["gold"]) for r in rows]
        if ref is None:
            ref = (run, items)
        elif items != ref[1]:
            raise EvalError(f"{run} was scored on different test items than {ref[0]} ({len(items)} vs "
                            f"{len(ref[1])} items, {len(set(items) ^ set(ref[1]))} not in both); "
                            "compare only runs scored on the same split of the same data")
        seeds = grid.setdefault(run_group(cfg), {})
        if cfg["seed"] in seeds:
            raise EvalError(f"{run} and {seeds[cfg['seed']][0]} are both variant {run_group(cfg)}, seed {cfg['seed']}")
        seeds[cfg["seed"]] = (run, rows)
        bases.setdefault(cfg.get("model"), []).append(run)
    if not grid:
        raise EvalError("no runs to compare")
    if len(bases) > 1:
        print("warning: the runs were trained on different base models: "
              + "; ".join(f"{base} ({len(rs)} runs, e.g. {rs[0]})" for base, rs in bases.items()), file=sys.stderr)
    return grid


def run_group(cfg):
    """The column a run goes in: its variant, with '+rw' when trained with --rating-weight."""
    return cfg["variant"] + ("+rw" if cfg.get("rating_weight") is True else "")


def paired_bootstrap(diff, n_boot=2000, seed=0):
    """95% percentile interval of mean(diff) when the items are resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n_boot)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def sign_test(wins, losses):
    """Two-sided exact binomial test of wins vs losses under p = 1/2 (ties are left out)."""
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _mean_std(values):
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values}


@dataclass
class CompareConfig:
    POSITIONAL: ClassVar = ("runs",)
    runs: list                        # run folders (any variant and seed); folders that are not runs are skipped
    out: str = ""                     # output folder (default: <common parent of the runs>/compare)
    split: str = "test"               # the split the runs were scored on (unscored runs are scored first)
    n_boot: int = 2000                # bootstrap resamples
    seed: int = 0                     # bootstrap seed
    allow_unfinished: bool = False    # include runs with no done.json yet (scored on their latest checkpoint)


def compare(cfg):
    """Compare runs across variants and seeds; writes compare.md, .csv, .json (and .png with
    matplotlib) into cfg.out and returns the summary dict."""
    runs = [r for r in cfg.runs if Run(r).is_run]
    for r in sorted(set(cfg.runs) - set(runs)):
        print(f"skipping {r}: not a run folder")
    unfinished = [r for r in runs if not Run(r).finished]
    if unfinished and not cfg.allow_unfinished:
        for r in unfinished:
            print(f"skipping {r}: unfinished (no {DONE}); --allow-unfinished includes it")
        runs = [r for r in runs if r not in unfinished]
    if not runs:
        raise EvalError("no finished run folder among the arguments")
    split, n_boot, seed = cfg.split, cfg.n_boot, cfg.seed
    grid = load_grid(runs, split)
    def column_order(v):  # data.VARIANTS' order; 'explanation+rw' right after 'explanation'
        name = v.split("+")[0]
        return data.VARIANTS.index(name) if name in data.VARIANTS else 99, v
    variants = sorted(grid, key=column_order)
    scores = {v: [metrics_by_setting(rows) for _, rows in grid[v].values()] for v in variants}
    settings = list(scores[variants[0]][0]["settings"]) + ["overall"]

    def pick(m, setting):
        return m["overall"] if setting == "overall" else m["settings"][setting]
    table = {s: {v: {k: _mean_std([pick(m, s)[k] for m in scores[v]]) for k in METRICS} for v in variants}
             for s in settings}

    versus, gap = {}, None
    if "label" in grid:
        def correct(v):  # (N,) per item, averaged over the variant's seeds
            return np.mean([[r["predicted"] == r["gold"] for r in rows] for _, rows in grid[v].values()], axis=0)
        acc = {v: table["overall"][v]["accuracy"]["mean"] for v in variants}
        gap = acc.get("explanation", acc["label"]) - acc["label"]  # the method's gain over label-only
        for v in [v for v in variants if v != "label"]:
            diffs = [round(table[s][v]["accuracy"]["mean"] - table[s]["label"]["accuracy"]["mean"], 12)
                     for s in settings[:-1]]  # rounded: equal means in another summation order tie
            wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            versus[v] = {"wins": wins, "losses": losses, "settings": len(diffs),
                         # defined only when there is a gap to close: explanation beats label
                         "gap_closed": (acc[v] - acc["label"]) / gap if gap > 0 else None,
                         "accuracy_diff": acc[v] - acc["label"],
                         "ci95": paired_bootstrap(correct(v) - correct("label"), n_boot, seed),
                         "sign_p": sign_test(wins, losses), "per_setting": dict(zip(settings[:-1], diffs))}

    calibration = {}
    for v in variants:
        pooled = [r for _, rows in grid[v].values() for r in rows]
        gold, pred = _gold_pred(pooled)
        calibration[v] = reliability(np.array([r["probs"] for r in pooled]), gold, pred)
    rows = next(iter(next(iter(grid.values())).values()))[1]  # every run was scored on these items
    by_setting = {s: [r["gold"] for r in rows if s == "overall" or f"{r['dataset']}/{r['axis']}" == s] for s in settings}
    majority = {s: Counter(g).most_common(1)[0][1] / len(g) for s, g in by_setting.items()}
    summary = {"split": split, "runs": {v: {str(s): run for s, (run, _) in grid[v].items()} for v in variants},
               "table": table, "versus_label": versus, "reliability": calibration,
               "gap": gap, "majority": majority}
    out = cfg.out or os.path.join(os.path.commonpath([os.path.abspath(r) for r in runs]), "compare")
    write_comparison(out, summary, variants, settings)
    return summary


def markdown(summary, variants, settings):
    table, versus = summary["table"], summary["versus_label"]
    n_seeds = {v: len(summary["runs"][v]) for v in variants}

    def cell(s, v, k="accuracy"):
        x = table[s][v][k]
        return f"{x['mean']:.3f} ± {x['std']:.3f}" if n_seeds[v] > 1 else f"{x['mean']:.3f}"

    def row(*cells):
        return "| " + " | ".join(cells) + " |"
    majority = summary.get("majority", {})
    lines = [f"# Accuracy on the {summary['split']} split, mean ± std over seeds", "",
             row("dataset", "axis", "majority class", *(f"{v} ({n_seeds[v]} seeds)" for v in variants)),
             row(*["---"] * (3 + len(variants)))]
    lines += [row(*(s.rsplit("/", 1) if s != "overall" else ["**overall**", ""]),
                  f"{majority[s]:.3f}" if s in majority else "", *(cell(s, v) for v in variants))
              for s in settings]
    if versus:
        lines += ["", "## Against label-only", "",
                  row("variant", "settings won", "gap closed", "accuracy diff [95% CI]", "sign test p"),
                  row(*["---"] * 5)]
        for v, x in versus.items():
            gap = f"{x['gap_closed']:.0%}" if x["gap_closed"] is not None else "n/a"
            lines.append(row(v, f"{x['wins']}/{x['settings']}", gap,
                             f"{x['accuracy_diff']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]", f"{x['sign_p']:.3g}"))
        if summary["gap"] is not None and summary["gap"] <= 0:
            lines += ["", f"Gap closed is n/a: explanation does not beat label-only here (accuracy difference "
                          f"{summary['gap']:+.3f}), so there is no gap for a pseudo-explanation to close."]
        lines += ["", "## Per-setting accuracy difference from label-only", "",
                  row("setting", *versus), row(*["---"] * (1 + len(versus)))]
        lines += [row(s, *(f"{x['per_setting'][s]:+.3f}" for x in versus.values())) for s in settings[:-1]]
    lines += ["", "## All metrics, overall", "", row("variant", *METRICS), row(*["---"] * (1 + len(METRICS)))]
    lines += [row(v, *(cell("overall", v, k) for k in METRICS)) for v in variants]
    lines += ["", f"## Reliability: top-rating confidence vs accuracy in {N_BINS} bins, seeds pooled", "",
              row("confidence", *variants), row(*["---"] * (1 + len(variants)))]
    for b in range(N_BINS):
        cells = [f"{c:.2f} / {a:.2f} (n={n})" if n else "-" for c, a, n in (summary["reliability"][v][b] for v in variants)]
        lines.append(row(f"[{b / N_BINS:.1f}, {(b + 1) / N_BINS:.1f})", *cells))
    return "\n".join(lines) + "\n"


def write_comparison(out, summary, variants, settings):
    os.makedirs(out, exist_ok=True)
    text = markdown(summary, variants, settings)
    write_atomic(os.path.join(out, "compare.md"), text)
    write_atomic(os.path.join(out, "compare.json"), json.dumps(summary, indent=2))
    write_atomic(os.path.join(out, "compare.csv"), "setting,variant,metric,mean,std,n_seeds\n" + "".join(
        f"{s},{v},{k},{x['mean']:.6f},{x['std']:.6f},{len(x['values'])}\n"
        for s in settings for v in variants for k, x in summary["table"][s][v].items()))
    print(text)
    print(f"wrote {out}/compare.md, .csv, .json" + (", reliability.png, differences.png"
                                                     if plot(out, summary, variants, settings) else
                                                     " (pip install matplotlib for the pictures)"))


def plot(out, summary, variants, settings):
    """reliability.png (one diagram per variant) and differences.png; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(variants), figsize=(3 * len(variants), 3.2), squeeze=False)
    centers = (np.arange(N_BINS) + 0.5) / N_BINS
    for ax, v in zip(axes[0], variants):
        acc = [a if n else 0.0 for _, a, n in summary["reliability"][v]]
        ax.bar(centers, acc, width=1 / N_BINS, edgecolor="black", alpha=0.7)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(title=v, xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reliability.png"), dpi=120)
    plt.close(fig)
    versus = summary["versus_label"]
    if versus:
        x, width = np.arange(len(settings) - 1), 0.8 / len(versus)
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(x)), 4))
        for j, (v, d) in enumerate(versus.items()):
            ax.bar(x + j * width, list(d["per_setting"].values()), width, label=v)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x + 0.4 - width / 2, settings[:-1], rotation=60, ha="right")
        ax.set_ylabel("accuracy - label-only")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "differences.png"), dpi=120)
        plt.close(fig)
    return True


# ----------------------------------------------------------------------------- command line

def _print_metrics(m):
    print(f"{'setting':<36} {'n':>5} " + " ".join(f"{k:>8}" for k in METRICS))
    for name, x in [*m["settings"].items(), ("overall", m["overall"])]:
        print(f"{name:<36} {x['n']:>5} " + " ".join(f"{x[k]:>8.3f}" for k in METRICS))
    print(f"{m['examples_per_s']:.1f} examples/s ({m['order']})" +
          (f"; {m['unparsed']} outputs without a rating, counted wrong" if m["unparsed"] else ""))


@dataclass
class ScoreConfig:
    run: str = ""                     # run folder written by train.py
    checkpoint: Literal["best", "last"] = "best"  # which checkpoint of --run
    model: str = ""                   # base checkpoint folder or .gguf (with --data; no --adapter: zero-shot)
    adapter: str = ""                 # LoRA adapter folder (PEFT format), with --model
    data: str = ""                    # records to score (.jsonl/.csv), with --model
    split: str = "test"               # train | val | test (data.split_of's hash of the id) | all
    order: Literal[ORDERS] = "rating_first"  # with --model
    template: Literal[TEMPLATES] | None = None  # with --model (default: data.py's)
    max_len: int | None = None        # prompt + rating token limit, with --model (default: data.py's)
    out: str = ""                     # where --model writes predictions.jsonl and metrics.json
    batch_size: int = 16              # examples per forward pass
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    quantize: Literal["nf4", "nf4-dq"] | None = None  # 4-bit base; nf4-dq with 8-bit scales (default: as the run trained)
    allow_unfinished: bool = False    # with --run: score a run that has no done.json yet (its latest checkpoint)


def score(cfg):
    """Score a run folder (into <run>/eval-<split>/), or a base model with an optional adapter on a
    data file; print the metrics."""
    if cfg.run:
        if not cfg.allow_unfinished and not Run(cfg.run).finished:
            Run(cfg.run).config  # not a run folder at all: say that first
            raise EvalError(f"{cfg.run}: the run is unfinished (no {DONE}); pass --allow-unfinished "
                            "to score its latest checkpoint anyway")
        m = score_run(cfg.run, cfg.split, cfg.checkpoint, cfg.batch_size, cfg.device, cfg.quantize)
        out = Run(cfg.run).eval_dir(cfg.split)
    elif cfg.model and cfg.data:
        model, tok, device = load_scorer(cfg.model, cfg.adapter or None, cfg.device, cfg.quantize)
        build = {k: v for k, v in (("template", cfg.template), ("max_len", cfg.max_len)) if v is not None}
        rows, m = evaluate(model, tok, split_records(cfg.data, cfg.split), device, cfg.batch_size, order=cfg.order,
                           **build)
        m.update(model=cfg.model, adapter=cfg.adapter or None, data=cfg.data, split=cfg.split)
        out = cfg.out
        if out:
            write_results(out, rows, m)
    else:
        raise EvalError("give --run RUN, or --model DIR --data FILE (see eval.py --help)")
    _print_metrics(m)
    if out:
        print(f"wrote {out}/{PREDICTIONS} and {SCORES}")
    return m


COMMANDS = {"score": cli.Command(ScoreConfig, score, "score a run, or a model on a data file"),
            "compare": cli.Command(CompareConfig, compare, "compare runs across variants and seeds")}


def main(argv=None):
    return cli.main("eval.py", __doc__, COMMANDS, argv, default="score")


if __name__ == "__main__":
    sys.exit(main())
