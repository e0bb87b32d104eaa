"""The paper's experiment end to end at a chosen size, in one resumable command.

    python study.py --dry-run                      # every size's plan, power arithmetic and time estimate
    python study.py --smoke --out /tmp/s           # tiny scripted models (demo.py's), seconds (the tests run it)
    python study.py --quick                        # SmolLM2-135M-Instruct, every stage at toy size, minutes
    python study.py --pilot                        # what set the default's length and test size (PILOT)
    python study.py --default                      # the CPU study, <= 120 min on 2 cores, 3 seeds
    python study.py --paper --student models/Mistral-7B-v0.1   # on a GPU: every conversation
    python study.py --quick --labels FILE.jsonl    # chit-chat labels from a file instead of the rater

Stages, each skipped when its output is complete (so a killed study continues where it stopped):
  1 conversations  importers.import_conversations("chitchat"): real human chit-chat, cut at a hashed turn
                   -> conversations.jsonl (the rater's input)
  2 corpus         demo.write_demo: the controlled corpus (explanations name the cues that set each
                   label), a sample of it -> demo/
  3 models         the rater and the student: SmolLM2's GGUF (model.smollm2_path()), or for --smoke a
                   scripted tiny rater and a tiny random student (demo.build_smoke_*) -> models/
  4 ratings        the labels of each source, and before any training the figure that says whether
                   an axis carries signal (an axis without it is dropped and reported):
                   rater:  rate.py check (AUC, real reply vs a worsened copy), then rate.py on the kept
                           axes x four strategies x K samples, summarize, data.aggregate(mean)
                   damage: damage.make_records (graded damage to real replies, grade known), then
                           damage.check (grade vs the student's log-probability of the reply), one file
                           per training size -> sources.json, damage-<n>.jsonl, chitchat-train.jsonl
  5 training       per corpus, train.run for every variant x seed (+ the label-dilution control
                   where a size asks for it) -> <corpus>/runs/<variant>[+rw]-s<seed>
  6 results        eval.py (each run scored, then compare) and analysis.py per corpus -> <corpus>/compare,
                   <corpus>/analysis; the small files, every run's predictions included, copied to
                   --results with study.json
Outputs are written under a temporary name and renamed; rate.py and train.py resume by themselves
(rate.py appends and skips ratings it has, train.py continues from its last checkpoint). Every stage
start, unit of work and end is appended to study.log.jsonl, the wall times in study.json come from it.

The sizes are fixed below (SIZES). The default's length (STEPS) and test size (DAMAGE_CONVERSATIONS)
follow from the pilot's measurements (PILOT, `--pilot`, on conversations the study never uses) by the
power arithmetic of power(), printed by --dry-run; they are not tuned towards any answer. The chit-chat
package has 4,017 conversations that can be cut, ~2,700 of them with a reply of 8-40 words (damage.py).
Known: SmolLM2-135M-Instruct as a rater is blind (rate.py check: AUC inside chance on every axis
and strategy), so its labels are checked and dropped; the damage labels are exact by construction.
Left out: the work itself (data.py, rate.py, damage.py, train.py, eval.py and analysis.py do it; this
file calls them), the other five datasets (their files are not on this machine), and any download.

Length: ~1,000 lines, one concern: the experiment's stages as methods of `Study` (~370 lines) with
its sizes, plan, power arithmetic, pilot, time estimate and log. The work of each stage is in the
other files; the tiny scripted models of --smoke are demo.py's.
"""
import cli  # first, so that Ctrl-C while torch loads is one line too (cli.py)
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

import analysis
import damage
import data
import demo
import importers
import eval as evaluate
import rate
import train
from cli import Error, write_atomic
from model import smollm2_path
from runs import LAST, Run


@dataclass(frozen=True)
class Size:
    name: str
    conversations: int | None   # chit-chat conversations kept (None: all that can be cut, 4,017)
    samples: int                # sampled ratings per (conversation, axis, strategy)
    demo_per_dataset: int       # demo items per each of the six demo datasets
    seeds: tuple                # training seeds of every variant
    steps: int                  # optimizer steps per run (0: `epochs` passes over the training split)
    batch_size: int             # examples per optimizer step
    micro_batch: int            # examples per forward pass
    max_len: int                # training tokens per example (old turns cut first)
    analysis_n: int | None      # test examples per run that analysis.py reads (None: all)
    rater: str = "smollm2"      # "smollm2", "smoke" (demo.build_smoke_rater) or a checkpoint path
    student: str = "smollm2"    # the same choices; one pretrained student for both corpora
    epochs: float = 1.0         # with steps = 0
    lr: float = 2e-4            # LoRA peak learning rate
    rank: int = 16              # LoRA rank (alpha = 2 x rank)
    checkpointing: bool = False  # activation checkpointing (on for the GPU size)
    variants: tuple = data.VARIANTS               # every target variant
    rw_variants: tuple = ("explanation", "random")  # trained again with rating_weight=True
    temperature: float = 0.7    # rater sampling temperature (> 0: the K samples differ)
    rate_batch: int = 16        # prompts generated together
    rate_new_tokens: int = 48   # the explanation of a sentence or two (the score is read, not generated)
    rate_prompt_tokens: int = 384  # longer rating prompts lose their oldest turns
    summary_new_tokens: int = 64
    check_n: int = 20           # conversations of the rater check (real vs corrupted response, score only)
    seed: int = 0               # the conversation sample, the demo corpus and the rater's sampling
    device: str = "auto"        # train.py / eval.py / analysis.py device
    sources: tuple = ("rater", "demo")  # label sources: "damage" (graded damage to real replies, damage.py),
                                # "rater" (chit-chat rated by the rater, corpus 'chitchat'), "demo"
    damage_conversations: int = 0  # chit-chat conversations damaged (3 records each, one per axis)
    train_sizes: tuple = ()     # training conversations of each damage corpus 'damage-<n>' (x3 axes = items)
    val_conversations: int = 20  # validation conversations of each damage corpus (None: the whole split)
    signal_n: int = 150         # records per axis of damage.check (the signal printed before training)
    damage_axes: tuple = tuple(damage.DAMAGE)  # the damage axes trained on (the pilot may leave one out)
    drop_blind: bool = True     # leave out (and report) every axis whose labels show no signal before training
    dtype: str = "auto"         # train.py --dtype (bfloat16 on a CPU with AMX/AVX512-BF16: ~2x a step)
    lora_dropout: float = 0.05  # train.py --lora-dropout


# The power analysis, fixed before the default study ran. HALF_WIDTH: the 95% half-width wanted on the
# pooled paired accuracy difference (variant minus label). PILOT: what `python study.py --pilot`
# measured (results/pilot/pilot.json) on damage labels of conversations the study never uses, with the
# default size's settings: the label-only learning curve and the share of test items on which
# label-only and explanation runs disagree. STEPS and DAMAGE_CONVERSATIONS follow from them (power()).
HALF_WIDTH = 0.04
PILOT = {"steps": 120, "majority": 0.354, "label_accuracy": 0.606, "disagreement": 0.669}
STEPS = 120
DAMAGE_CONVERSATIONS = 1700

SIZES = {
    "smoke": Size("smoke", conversations=8, samples=1, demo_per_dataset=4, seeds=(0, 1), steps=2,
                  batch_size=4, micro_batch=4, max_len=256, analysis_n=4, rater="smoke", student="smoke",
                  lr=1e-3, rank=4, rate_new_tokens=20, rate_prompt_tokens=512, summary_new_tokens=20,
                  sources=("damage", "rater", "demo"), damage_conversations=40, train_sizes=(6, 12),
                  val_conversations=3, signal_n=12,
                  drop_blind=False),  # a random tiny student and a scripted rater: the plumbing, not signal
    "quick": Size("quick", conversations=3, samples=2, demo_per_dataset=3, seeds=(0,), steps=2,
                  batch_size=4, micro_batch=4, max_len=160, analysis_n=4, rate_prompt_tokens=320, check_n=3,
                  sources=("damage", "rater", "demo"), damage_conversations=60, train_sizes=(10, 20),
                  val_conversations=3, signal_n=30, variants=("label", "explanation", "shuffled", "random"),
                  rw_variants=(), dtype="bfloat16", lora_dropout=0.0),
    # The CPU answer. Damage labels (the rater's are checked, and dropped where blind, as SmolLM2-135M's
    # were; the demo corpus is left out for time), on the two axes the pilot's label-only student
    # learnt in STEPS steps (on_topic stayed at its majority class: PILOT). Two training sizes at
    # equal compute: 40 conversations (80 items) seen 12 times, and 320 (640 items) seen 1.5 times,
    # in STEPS steps of 8. Test: every test-split conversation of DAMAGE_CONVERSATIONS (~680 items).
    # Variants: label, explanation, and random tokens, the pseudo-explanation that keeps nothing of
    # the explanation but its length (the paper's most surprising control); shuffled, bow and filler
    # do not fit the 2-hour budget on 2 cores (each is 6 more runs of ~4 minutes).
    "default": Size("default", conversations=32, samples=2, demo_per_dataset=6, seeds=(0, 1, 2), steps=STEPS,
                    batch_size=8, micro_batch=8, max_len=176, analysis_n=40, lr=1e-3, rate_prompt_tokens=384,
                    rate_new_tokens=32, summary_new_tokens=48, check_n=16, sources=("damage", "rater"),
                    damage_conversations=DAMAGE_CONVERSATIONS, train_sizes=(40, 320), val_conversations=20,
                    damage_axes=("comprehensiveness", "naturalness"),
                    variants=("label", "explanation", "random"), rw_variants=(),
                    dtype="bfloat16", lora_dropout=0.0),
    "paper": Size("paper", conversations=None, samples=3, demo_per_dataset=150, seeds=(0, 1, 2), steps=0,
                  batch_size=16, micro_batch=8, max_len=512, analysis_n=500, checkpointing=True,
                  rate_batch=64, rate_prompt_tokens=1024, rate_new_tokens=96, summary_new_tokens=128,
                  device="cuda", sources=("damage", "rater", "demo"), damage_conversations=DAMAGE_CONVERSATIONS,
                  train_sizes=(200, 1000), val_conversations=100),
}
STAGES = ("conversations", "corpus", "models", "ratings", "training", "results")
COLLAPSE = 0.8  # warn when one label holds more than this share of an axis
RAW_MAX_BYTES = 5 << 20  # the raw ratings go into --results too when smaller than this
CHITCHAT_CONVERSATIONS = 4017  # of the package's 7,168, those with two turns or more
Z_FAMILY = 2.50  # the rater check keeps an axis when one of its 4 strategies beats chance at this z
                 # (Bonferroni: 4 tests at 95% together), not 1.96 for each

# Speeds for the time estimates, measured on the 2-core CPU development machines (torch 2.13 CPU):
# SmolLM2 fp32 (AMD EPYC): LoRA training ~130 tokens/s (batch 8 x ~100-130 tokens), a scoring
# forward ~230 tokens/s, 48 ratings in 63 s: 1.3 s each, reading each prompt once. A rating is
# assumed to cost rating_s x (prompt + 3 x new) / 320 seconds. SmolLM2 bf16 (Intel Xeon with AMX,
# 2026-12-07, the pilot): LoRA training ~400 tokens/s (batch 8 x ~80-110 tokens, dropout 0), scoring ~1,700.
# "smoke" from its own runs. No GPU speeds: unmeasured.
SPEED = {
    "smollm2": {"load_s": 1.5, "train_tok_s": 130.0, "forward_tok_s": 230.0, "rating_s": 1.3, "run_s": 2.0},
    "smollm2-bf16": {"load_s": 2.0, "train_tok_s": 400.0, "forward_tok_s": 1700.0, "rating_s": 1.3, "run_s": 2.0},
    "smoke": {"load_s": 0.02, "train_tok_s": 10000.0, "forward_tok_s": 50000.0, "rating_s": 0.015, "run_s": 0.15},
}
TOKENS = {"chitchat": 55, "demo": 120, "prompt": 40, "explanation": 30,  # typical, SmolLM2's tokenizer
          "rubric": 90, "examples": 160, "rated_explanation": 35, "damage": 35}


class StudyError(Error, RuntimeError):
    """A study that cannot start or continue; the message says why."""


# ----------------------------------------------------------------------------- files, atomically

def write_json(obj, path):
    write_atomic(path, json.dumps(obj, indent=2))


def write_jsonl(records, path):
    write_atomic(path, lambda tmp: data.write_jsonl(records, tmp))


def copy_file(src, dst):
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def build_dir(path, build):
    """build(folder) into path + '.tmp', then renamed to path (what a kill left under path is replaced)."""
    result = []
    write_atomic(path, lambda tmp: (os.makedirs(tmp), result.append(build(tmp))))
    return result[0]


def _json_ok(path):
    try:
        read_json(path)
        return True
    except (OSError, StudyError):
        return False


def read_json(path, kind=dict):
    """A JSON file of the study's own, as the kind it must be; one StudyError naming it otherwise (a
    file edited by hand, say)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise StudyError(f"{path}: not valid JSON ({str(e)[:200]}); delete it to redo its stage") from None
    if not isinstance(value, kind):
        raise StudyError(f"{path}: expected a JSON {kind.__name__}; delete it to redo its stage")
    return value


class Log:
    """study.log.jsonl: one line per stage start, unit of work, skip and end, appended as it happens."""

    def __init__(self, path):
        self.path, self.run = path, f"{os.getpid()}-{time.time():.6f}"  # one id per invocation
        if os.path.exists(path):
            with open(path, "rb") as f:
                tail = f.read()[-1:]
            if tail and tail != b"\n":  # a line cut off by a kill: end it, readers skip it
                with open(path, "a") as f:
                    f.write("\n")

    def __call__(self, stage, event, what=""):
        with open(self.path, "a") as f:
            f.write(json.dumps({"t": time.time(), "run": self.run, "stage": stage, "event": event,
                                "what": what}) + "\n")

    def events(self):
        out = []
        if os.path.exists(self.path):
            for line in open(self.path):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def unit_seconds(self, stage):
        """{unit: seconds} of one stage: each unit's end minus the end of the unit (or the stage start)
        before it in the same invocation; the last invocation that finished a unit wins."""
        out, last = {}, {}
        for e in self.events():
            if e["stage"] != stage:
                continue
            if e["event"] == "start":
                last[e["run"]] = e["t"]
            elif e["event"] == "unit" and e["run"] in last:
                out[e["what"]] = e["t"] - last[e["run"]]
                last[e["run"]] = e["t"]
        return out

    def seconds(self):
        """Wall time per stage, summed over the invocations that worked on it (start to their last
        unit or end: a killed invocation counts up to its last finished unit)."""
        spans = {}
        for e in self.events():
            key = (e["run"], e["stage"])
            if e["event"] == "start":
                spans[key] = [e["t"], e["t"]]
            elif key in spans and e["event"] in ("unit", "done"):
                spans[key][1] = e["t"]
        total = Counter()
        for (_, stage), (a, b) in spans.items():
            total[stage] += b - a
        return dict(total)


def _clock(s):
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------- the plan

def _kind(model):
    """The row of SPEED a rater or student runs at: 'smoke', 'smollm2' (or its file), else None."""
    return model if model in SPEED else "smollm2" if os.path.basename(model).lower().startswith("smollm2") else None


def run_names(size):
    """(folder name, variant, seed, rating_weight) of every run of one corpus, seed by seed."""
    out = []
    for s in size.seeds:
        out += [(f"{v}-s{s}", v, s, False) for v in size.variants]
        out += [(f"{v}+rw-s{s}", v, s, True) for v in size.rw_variants]
    return out


def corpora(size):
    """The corpora a size trains on, in order: 'damage-<n>' per training size, 'chitchat', 'demo'."""
    out = [f"damage-{n}" for n in size.train_sizes] if "damage" in size.sources else []
    return out + ["chitchat"] * ("rater" in size.sources) + ["demo"] * ("demo" in size.sources)


def counts(size, labels=None):
    """Conversations, and items per corpus and split as planned (data.split_of: 70% train, 10% val,
    20% test); with labels, the chit-chat items are that file's records. A damage corpus keeps
    n training conversations, val_conversations of the validation split and the whole test split."""
    n_conv = size.conversations or CHITCHAT_CONVERSATIONS
    n_labels = None
    if labels and os.path.isfile(labels):
        with open(labels) as f:
            n_labels = sum(1 for line in f if line.strip())
    items = {"chitchat": n_labels or 3 * n_conv, "demo": 3 * 6 * size.demo_per_dataset}
    out = {c: {"all": n, "train": round(0.7 * n), "val": round(0.1 * n), "test": round(0.2 * n)}
           for c, n in items.items()}
    n_axes = len(size.damage_axes)
    for n in size.train_sizes:
        val = min(size.val_conversations or size.damage_conversations, round(0.1 * size.damage_conversations))
        split = {"train": n_axes * n, "val": n_axes * val, "test": n_axes * round(0.2 * size.damage_conversations)}
        out[f"damage-{n}"] = dict(split, all=sum(split.values()))
    return n_conv, out


def _tokens(corpus):
    return TOKENS["damage" if corpus.startswith("damage") else corpus]


def speed(size, role):
    """The SPEED row a rater or student runs at (the bf16 row when the size trains in bf16), None
    where unmeasured (any GPU)."""
    if size.device.startswith("cuda") or (size.device == "auto" and torch.cuda.is_available()):
        return None
    kind = _kind(getattr(size, role))
    if kind and role == "student" and size.dtype == "bfloat16" and kind + "-bf16" in SPEED:
        kind += "-bf16"
    return SPEED.get(kind)


def estimate(size, labels=None):
    """Planned seconds per stage (None where the speeds are unmeasured, e.g. any GPU)."""
    rater, student = speed(size, "rater"), speed(size, "student")
    n_conv, items = counts(size, labels)
    est = {"conversations": 2.0, "corpus": 1.0 + 0.002 * items["demo"]["all"], "models": 2.0}
    est["ratings"] = 0.0
    if "damage" in size.sources:  # damage.check: one forward over signal_n records per axis
        est["ratings"] = (student["load_s"] + 3 * size.signal_n * TOKENS["damage"] / student["forward_tok_s"]
                          if student else None)
    if "rater" not in size.sources or labels:
        est["conversations"] = 0.0 if labels else est["conversations"]
    elif rater and est["ratings"] is not None:
        rater = speed(size, "student") if size.dtype == "bfloat16" and _kind(size.rater) == _kind(size.student) else rater
        def gen(prompt, new):  # seconds per generated answer
            return rater["rating_s"] * (prompt + 3 * new) / 320
        prompt = min(size.rate_prompt_tokens, TOKENS["rubric"] + TOKENS["chitchat"] + TOKENS["examples"] / 2)
        summary = min(size.rate_prompt_tokens, TOKENS["rubric"] + TOKENS["chitchat"]
                      + 4 * size.samples * TOKENS["rated_explanation"])
        n_ratings = n_conv * len(data.AXES) * len(rate.STRATEGIES) * size.samples
        n_check = 2 * min(size.check_n, n_conv) * len(data.AXES) * len(rate.STRATEGIES)  # forwards, no generation
        est["ratings"] += 3 * rater["load_s"] + n_check * prompt / rater["forward_tok_s"]
        if not size.drop_blind:  # else: planned as dropped, as SmolLM2's blind ratings are (the check decides)
            est["ratings"] += (n_ratings * gen(prompt, size.rate_new_tokens)
                               + n_conv * len(data.AXES) * gen(summary, size.summary_new_tokens))
    else:
        est["ratings"] = None
    if student is None:
        est["training"] = est["results"] = None
        return est
    train_s = results_s = 0.0
    planned = [c for c in corpora(size) if c != "chitchat" or labels or not size.drop_blind]
    for corpus in planned:
        n = items[corpus]
        per_ex = min(size.max_len, _tokens(corpus) + TOKENS["prompt"])
        steps = size.steps or math.ceil(size.epochs * n["train"] / size.batch_size)
        for _, variant, _, _ in run_names(size):
            tokens = per_ex + (TOKENS["explanation"] if variant != "label" else 0)
            train_s += (student["load_s"] + student["run_s"] + steps * size.batch_size * tokens / student["train_tok_s"]
                        + n["val"] * tokens / student["forward_tok_s"])
        n_runs = len(run_names(size))
        n_an = min(size.analysis_n or n["test"], n["test"])
        results_s += (n_runs * (student["load_s"] + n["test"] * per_ex / student["forward_tok_s"])
                      + n_runs * (student["load_s"] + 2 * n_an * per_ex / student["forward_tok_s"]) + 0.5)
    est["training"], est["results"] = train_s, results_s
    return est


def power(size):
    """The power arithmetic behind a size's test set, from PILOT's disagreement rate (None without a
    damage corpus). The paired difference of one item, variant minus label, is -1, 0 or +1; its
    variance is at most the share q of items where the two disagree (less once averaged over seeds),
    so the 95% half-width of the pooled mean is at most 1.96 sqrt(q / N), and N >= (1.96 / h)^2 q
    items keep it under h."""
    if "damage" not in size.sources or not size.train_sizes:
        return None
    q = PILOT["disagreement"]
    need = math.ceil((1.96 / HALF_WIDTH) ** 2 * q)
    n_test = counts(size)[1][f"damage-{size.train_sizes[0]}"]["test"]
    return {"disagreement": q, "half_width": HALF_WIDTH, "needed": need, "planned": n_test,
            "expected_half_width": 1.96 * math.sqrt(q / n_test)}


def describe(size, labels=None, rater=None, student=None):
    """The plan, as printed before a study starts (and by --dry-run)."""
    size = replace(size, rater=rater or size.rater, student=student or size.student)
    n_conv, items = counts(size, labels)
    est = estimate(size, labels)
    runs = len(run_names(size))
    total = None if None in est.values() else sum(est.values())
    lines = [f"study '{size.name}': rater {size.rater}, student {size.student}, label sources "
             + ", ".join(size.sources)]
    for c in corpora(size):
        n = items[c]
        what = ({"chitchat": "chit-chat " + (f"labels from {labels}" if labels else "rated by the rater"),
                 "demo": f"demo corpus (6 datasets x {size.demo_per_dataset} x 3 axes)"}.get(c)
                or f"graded damage to chit-chat replies, {c.split('-')[1]} training conversations")
        lines.append(f"  {c:<11} {what}: ~{n['train']} train / {n['val']} val / {n['test']} test items")
    if "rater" in size.sources:
        lines.append("  ratings   " + ("none (--labels)" if labels else
                     f"{n_conv * 12 * size.samples} = {n_conv} x 3 axes x 4 strategies x {size.samples} samples "
                     f"(temperature {size.temperature}), {n_conv * 3} summaries, on the axes where the rater "
                     f"check ({size.check_n} conversations) " + ("finds signal" if size.drop_blind else "(all axes)")))
    lines.append(f"  training  {runs} runs per corpus = ({len(size.variants)} variants + {len(size.rw_variants)} "
                 f"rating-weighted) x {len(size.seeds)} seeds, "
                 + (f"{size.steps} steps" if size.steps else f"{size.epochs:g} epoch(s)")
                 + f" of {size.batch_size} examples, max_len {size.max_len}, LoRA r={size.rank}, lr {size.lr:g}, "
                 f"dropout {size.lora_dropout:g}, {size.dtype}")
    if pw := power(size):
        lines += [f"  power     pilot (results/pilot, runs not reused): label-only and explanation disagree on "
                  f"q = {pw['disagreement']:.2f} of items; for a 95% half-width <= {pw['half_width']} on the "
                  f"paired accuracy difference, N >= (1.96 / {pw['half_width']})^2 x q = {pw['needed']} test "
                  f"items pooled; planned {pw['planned']} (half-width <= {pw['expected_half_width']:.3f} before "
                  f"averaging over {len(size.seeds)} seeds)"
                  + (", short: the package has no more usable conversations outside the pilot's"
                     if pw["planned"] < pw["needed"] and size.damage_conversations >= DAMAGE_CONVERSATIONS else ""),
                  f"            length: the pilot's label-only accuracy after {PILOT['steps']} steps "
                  f"{PILOT['label_accuracy']:.3f} vs majority {PILOT['majority']:.3f} (+{PILOT['label_accuracy'] - PILOT['majority']:.3f}; "
                  f"the study needs +0.15)"]
    lines.append("  estimate  " + ", ".join(f"{s} {_clock(est[s])}" for s in STAGES) + f"; total {_clock(total)}"
                 + ("" if total is not None else " (speeds for this model or device were not measured)"))
    return "\n".join(lines), est


# ----------------------------------------------------------------------------- stage 3: models

def _texts(records):
    for r in records:
        yield from ([r["context"]] if isinstance(r["context"], str) else r["context"])
        yield r["response"]
        if r.get("explanation"):
            yield r["explanation"]


# ----------------------------------------------------------------------------- the study

class Study:
    """One study: its size, folders and log; each stage is a method, run in STAGES order by run()."""

    def __init__(self, size, out, results, labels=None, rater=None, student=None):
        self.size = replace(size, rater=rater or size.rater, student=student or size.student)
        self.out, self.results, self.labels = out, results, labels
        self.plan_text, self.est = describe(self.size, labels)
        self.done_stages = set()
        self.p = {k: os.path.join(out, v) for k, v in {
            "settings": "settings.json", "log": "study.log.jsonl", "conversations": "conversations.jsonl",
            "demo": "demo", "models": "models", "models.json": "models.json", "raw": "raw.jsonl",
            "chitchat": "chitchat-train.jsonl", "report": "aggregation.txt", "labels": "labels.json",
            "check": "rater_check.json", "sources": "sources.json", "damage": "damage-all.jsonl",
            "signal": "damage_check.json", "study": "study.json"}.items()}

    # -- bookkeeping
    def settings(self):
        s = {"size": asdict(self.size), "labels": self.labels}
        if self.labels:
            with open(self.labels, "rb") as f:
                s["labels_sha256"] = hashlib.sha256(f.read()).hexdigest()
        return json.loads(json.dumps(s))  # tuples as lists, as read back

    def left(self, stage, stage_left):
        """Seconds left: this stage's, then the planned ones of the stages after it."""
        later = [self.est[s] for s in STAGES[STAGES.index(stage) + 1:] if s not in self.done_stages]
        return None if stage_left is None or None in later else stage_left + sum(later)

    def stage(self, stage, what, done):
        k = STAGES.index(stage) + 1
        if done:
            self.done_stages.add(stage)
            self.log(stage, "skip", what)
            print(f"[{k}/{len(STAGES)} {stage}] done, skipped ({what})")
            return False
        self.log(stage, "start", what)
        print(f"[{k}/{len(STAGES)} {stage}] {what}: ~{_clock(self.est[stage])} for this stage, "
                   f"~{_clock(self.left(stage, self.est[stage]))} left in the study")
        return True

    def finish(self, stage, what=""):
        self.log(stage, "done", what)
        self.done_stages.add(stage)

    def units(self, stage, todo, label, share=1.0, rest=0.0):
        """Yield each unit of todo, printing a progress line with the time left: planned at first, then
        measured on the units done. share, rest: the parts of the stage's planned time that these
        units take and that the work after them takes."""
        t0, n, est = time.time(), len(todo), self.est[stage]
        per = est * share / n if est is not None and n else None
        after = est * rest if est is not None else None
        for i, unit in enumerate(todo):
            if i:
                per = (time.time() - t0) / i
            left = per * (n - i) + after if per is not None and after is not None else None
            print(f"[{STAGES.index(stage) + 1}/{len(STAGES)} {stage}] {i + 1}/{n} {label(unit)}: "
                       f"~{_clock(left)} left in this stage, ~{_clock(self.left(stage, left))} in the study")
            yield unit
            self.log(stage, "unit", label(unit))

    # -- the run
    def run(self):
        """Every stage in order, holding the study folder's lock: a second study on the same --out is
        refused while this one runs (its appends and files would interleave with these)."""
        with cli.Lock(os.path.join(self.out, "lock"), what=self.out):
            self._run()

    def _run(self):
        os.makedirs(self.out, exist_ok=True)
        mine = self.settings()
        if os.path.exists(self.p["settings"]):
            theirs = read_json(self.p["settings"])
            if theirs != mine:
                raise StudyError(f"{self.out} holds a study started with other settings "
                                 f"({self.p['settings']}); give another --out")
        else:
            write_json(mine, self.p["settings"])
        self.log = Log(self.p["log"])
        print(self.plan_text)
        t0 = time.time()
        self.conversations()
        self.corpus()
        self.models()
        self.ratings()
        self.training()
        self.report()
        print(f"study '{self.size.name}' complete in {_clock(time.time() - t0)} this time; "
                   f"results in {self.results}")

    def conversations(self):
        path = self.p["conversations"]
        if not self.stage("conversations", f"--labels {self.labels}" if self.labels else path,
                          self.labels or os.path.exists(path)):
            return
        records, problems = importers.import_conversations("chitchat", [], n=self.size.conversations, seed=self.size.seed)
        if not records:
            raise StudyError("no chit-chat conversations (pip install chitchat-dataset)")
        write_jsonl(records, path)
        print(f"  {len(records)} conversations -> {path} ({len(problems)} entries of the package skipped: "
                   "conversations of a single turn cannot be cut into context and response)")
        self.finish("conversations", f"{len(records)} conversations")

    def corpus(self):
        path = self.p["demo"]
        if not self.stage("corpus", path, os.path.isdir(path)):
            return
        build_dir(path, lambda tmp: demo.write_demo(tmp, seed=self.size.seed, n_per_dataset=self.size.demo_per_dataset,
                                                     n_corpus=max(200, 20 * self.size.demo_per_dataset)))
        n = sum(1 for _ in open(os.path.join(path, "train.jsonl")))
        print(f"  demo corpus: {n} labelled records -> {path}/train.jsonl")
        self.finish("corpus", f"{n} records")

    def models(self):
        path = self.p["models.json"]
        if not self.stage("models", path, os.path.exists(path)):
            self.model_paths = read_json(path)
            return
        paths = {}
        for role in ("rater", "student"):
            name = getattr(self.size, role)
            if name == "smollm2":
                paths[role] = smollm2_path()
            elif name != "smoke":
                if not os.path.exists(name):
                    raise StudyError(f"--{role} {name}: no such checkpoint")
                paths[role] = os.path.abspath(name)
        if "smoke" in (self.size.rater, self.size.student):
            def build(tmp):
                text = os.path.join(tmp, "text.txt")
                with open(text, "w") as f:  # both corpora's words, so the student's tokenizer knows them
                    source = self.labels or self.p["conversations"]
                    kind = "labelled" if self.labels else "conversation"
                    f.write("\n".join(_texts(data.load_records(source, kind=kind))) + "\n")
                    f.write(open(os.path.join(self.p["demo"], "corpus.txt")).read())
                demo.build_smoke_rater(os.path.join(tmp, "smoke-rater"), text, self.size.seed)
                demo.build_smoke_student(os.path.join(tmp, "smoke-student"), text, self.size.seed)
            build_dir(self.p["models"], build)
            for role in ("rater", "student"):
                if getattr(self.size, role) == "smoke":
                    paths[role] = os.path.abspath(os.path.join(self.p["models"], "smoke-" + role))
        write_json(paths, path)
        self.model_paths = paths
        print("  " + ", ".join(f"{k} {v}" for k, v in paths.items()))
        self.finish("models")

    def ratings(self):
        """The labels of every source, each axis kept only where a figure printed here shows signal
        (unless drop_blind is off): the rater's (rate.py check, then rating on the kept axes) and the
        damage corpora's (damage.check). sources.json, written last, marks the stage done."""
        if not self.stage("ratings", self.p["sources"], _json_ok(self.p["sources"])):
            self.sources = read_json(self.p["sources"])
            return
        sources = {}
        if "rater" in self.size.sources:
            sources["chitchat"] = self.rater_labels()
        if "damage" in self.size.sources:
            sources["damage"] = self.damage_labels()
        write_json(sources, self.p["sources"])
        self.sources = sources
        for name, x in sources.items():
            print(f"  {name}: axes kept {', '.join(x['kept']) or 'none'}"
                  + (f"; dropped (no signal before training) {', '.join(x['dropped'])}" if x["dropped"] else ""))
        self.finish("ratings")

    def rater_labels(self):
        final = self.p["chitchat"]
        if self.labels:
            if not os.path.exists(final):
                data.load_records(self.labels, need_explanation=True)  # a bad file fails here, naming the record
                copy_file(self.labels, final)
            axes = sorted({r["axis"] for r in data.load_records(final)})
            return {"kept": axes, "dropped": [], "labels": self.labels}
        s, rater = self.size, self.model_paths["rater"]
        gen = dict(batch_size=s.rate_batch, max_prompt_tokens=s.rate_prompt_tokens, seed=s.seed,
                   dtype=None if s.dtype == "auto" else s.dtype)
        if not _json_ok(self.p["check"]):  # does the rater's score see the response at all? (written first)
            print(f"  rater check: {min(s.check_n, self.n_conversations())} conversations, each response against "
                  "a copy made worse on the axis")
            rate.check(rate.CheckConfig(raters=[rater], input=self.p["conversations"], out=self.p["check"],
                                        axes=",".join(data.AXES), prompts=",".join(rate.STRATEGIES), n=s.check_n, **gen))
            self.log("ratings", "unit", "checked")
        check, blind = format_check(self.p["check"])
        print("  " + check.replace("\n", "\n  "))
        kept = [a for a in data.AXES if a not in blind or not s.drop_blind]
        result = {"kept": kept, "dropped": [a for a in data.AXES if a not in kept]}
        if not kept:
            write_atomic(self.p["report"], check + "\n\nno axis kept: nothing rated\n")
            return result
        if not os.path.exists(final):
            rate.rate(rate.RateConfig(raters=[rater], input=self.p["conversations"], out=self.p["raw"],
                                      axes=",".join(kept), prompts=",".join(rate.STRATEGIES), samples=s.samples,
                                      temperature=s.temperature, max_new_tokens=s.rate_new_tokens, **gen))
            self.log("ratings", "unit", "rated")
            rate.summarize(rate.SummarizeConfig(model=rater, input=self.p["raw"], max_new_tokens=s.summary_new_tokens,
                                                **gen))
            self.log("ratings", "unit", "summarised")
            records, rep = data.aggregate(data.load_records(self.p["raw"], kind="raw"), method="mean")
            if not records:
                raise StudyError(f"{self.p['raw']}: no item has a valid rating; nothing to train on")
            dist, warnings = label_distribution(records)
            if rep["failed"] > rep["valid"]:
                warnings.append(f"WARNING: most ratings failed ({rep['failed']} of {rep['valid'] + rep['failed']}): "
                                "the rater wrote no usable explanation (see the errors in raw.jsonl)")
            warnings += [f"WARNING: no strategy's score on {a} tells a response from its worsened copy better than "
                         "chance: the labels of this axis carry no measured signal" for a in blind]
            text = (data.format_report(rep) + "\n\n" + format_distribution(dist) + "\n\n" + check
                    + "".join(f"\n{w}" for w in warnings))
            write_atomic(self.p["report"], text + "\n")
            write_json({"distribution": dist, "warnings": warnings}, self.p["labels"])
            write_jsonl(records, final)  # last: it marks the labels done
            print("  " + text.replace("\n", "\n  "))
        return result

    def damage_labels(self):
        """damage.make_records on the chit-chat package's conversations, damage.check with the student,
        then one file per training size (the kept axes only)."""
        s = self.size
        if not os.path.exists(self.p["damage"]):
            records = damage.make_records(study_conversations(s), seed=s.seed, n=s.damage_conversations)
            write_jsonl(records, self.p["damage"])
        records = data.load_records(self.p["damage"])
        if not _json_ok(self.p["signal"]):
            print(f"  damage check: {s.signal_n} records per axis, the grade against the student's log-probability "
                  "of the reply (before any training)")
            write_json(damage.check(self.model_paths["student"], [r for r in records if data.split_of(r["id"]) == "train"],
                                    s.signal_n, s.seed, "bfloat16" if s.dtype == "bfloat16" else "float32"),
                       self.p["signal"])
            self.log("ratings", "unit", "damage checked")
        signal = read_json(self.p["signal"])
        print("  " + damage.format_check(signal).replace("\n", "\n  "))
        kept = [a for a in s.damage_axes if signal[a]["signal"] or not s.drop_blind]
        for n in s.train_sizes:
            path = self.corpus_paths()[f"damage-{n}"]
            if not os.path.exists(path):
                part = damage.subset([r for r in records if r["axis"] in kept], n, s.seed, s.val_conversations)
                write_jsonl(part, path)
        return {"kept": kept, "dropped": [a for a in s.damage_axes if a not in kept], "signal": signal,
                "left_out_by_pilot": [a for a in damage.DAMAGE if a not in s.damage_axes]}

    def n_conversations(self):
        with open(self.p["conversations"]) as f:
            return sum(1 for line in f if line.strip())

    def corpus_paths(self):
        paths = {"chitchat": self.p["chitchat"], "demo": os.path.join(self.p["demo"], "train.jsonl")}
        return paths | {f"damage-{n}": os.path.join(self.out, f"damage-{n}.jsonl") for n in self.size.train_sizes}

    def corpora(self):
        """The corpora this study trains on: corpora(size) less any source whose every axis was dropped."""
        source = {"chitchat": "chitchat", "demo": None}
        return [c for c in corpora(self.size)
                if (src := source.get(c, "damage")) is None or self.sources.get(src, {}).get("kept")]

    def run_dir(self, corpus, name):
        return os.path.join(self.out, corpus, "runs", name)

    def train_config(self, corpus):
        s = self.size
        steps = s.steps
        return train.TrainConfig(
            model=self.model_paths["student"], data=self.corpus_paths()[corpus], out=os.path.join(self.out, corpus, "runs"),
            rank=s.rank, alpha=2.0 * s.rank, lr=s.lr, batch_size=s.batch_size, micro_batch=s.micro_batch,
            steps=steps, epochs=s.epochs, max_len=s.max_len, checkpointing=s.checkpointing, device=s.device,
            dtype=s.dtype, lora_dropout=s.lora_dropout,
            val_every=steps or 10 ** 9, save_every=steps or 100, log_every=max(1, steps // 5) if steps else 10)

    def training(self):
        todo = [(c, *r) for c in self.corpora() for r in run_names(self.size)
                if not Run(self.run_dir(c, r[0])).finished]
        n_all = len(self.corpora()) * len(run_names(self.size))
        if not self.stage("training", f"{n_all - len(todo)} of {n_all} runs finished", not todo):
            return
        for corpus, name, variant, seed, rw in self.units("training", todo, lambda u: f"{u[0]}/{u[1]}"):
            run = Run(self.run_dir(corpus, name))  # resumed when a crash left it unfinished
            train.run(replace(self.train_config(corpus), variant=variant, seed=seed, out=run.path, rating_weight=rw,
                              resume=run.latest() is not None))
        self.finish("training", f"{len(todo)} runs")

    def report(self):
        if not self.stage("results", self.p["study"], os.path.exists(self.p["study"])):
            self.publish()
            return
        runs = {c: [self.run_dir(c, name) for name, *_ in run_names(self.size)] for c in self.corpora()}
        todo = [r for rs in runs.values() for r in rs if Run(r).scores("test") is None]
        for r in self.units("results", todo, lambda r: f"scoring {os.path.relpath(r, self.out)}",
                            share=0.4, rest=0.6):
            Run(r).clear_scores("test")  # a scoring cut off by a kill
            evaluate.score_run(r, split="test", batch_size=32)
        s = self.size
        # eval.py and analysis.py give the rating-weighted runs columns of their own ("explanation+rw")
        jobs = [(c, what, runs[c]) for c in runs for what in ("compare", "analysis")]
        jobs = [j for j in jobs if j[2] and not os.path.isdir(os.path.join(self.out, j[0], j[1]))]
        for c, what, rs in self.units("results", jobs, lambda j: f"{j[0]}/{j[1]} ({len(j[2])} runs)", share=0.6):
            path = os.path.join(self.out, c, what)
            if what.startswith("compare"):
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    build_dir(path, lambda tmp: evaluate.compare(evaluate.CompareConfig(runs=rs, out=tmp)))
            else:
                build_dir(path, lambda tmp: analysis.analyse(analysis.AnalysisConfig(
                    runs=rs, out=tmp, split="test", n=s.analysis_n, device=s.device)))
        write_json(self.summary(), self.p["study"])
        self.finish("results")
        self.publish()

    def summary(self):
        n_conv = sum(1 for _ in open(self.p["conversations"])) if os.path.exists(self.p["conversations"]) else None
        items = {}
        for c in self.corpora():
            recs = data.load_records(self.corpus_paths()[c])
            items[c] = dict(Counter(data.split_of(r["id"]) for r in recs), all=len(recs))
        seconds = self.log.seconds()
        return {"run_cost": self.run_cost(),
            "settings": self.settings(), "out": os.path.abspath(self.out), "models": self.model_paths,
            "estimate_s": self.est, "wall_s": {s: round(seconds.get(s, 0.0), 1) for s in STAGES},
            "wall_total_s": round(sum(seconds.values()), 1), "conversations": n_conv, "items": items,
            "seeds": list(self.size.seeds), "runs_per_corpus": len(run_names(self.size)),
            "corpora": self.corpora(), "sources": self.sources, "power": power(self.size), "pilot": PILOT,
            "machine": machine(), "git": _git_head(), "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }

    def run_cost(self):
        """Where a run's time goes, mean seconds per run: the whole training unit, its loop (steps, the
        final validation, the checkpoint: done.json), the rest (load, tokenising, set-up), and scoring."""
        train_s, score_s = self.log.unit_seconds("training"), self.log.unit_seconds("results")
        rows = []
        for c in self.corpora():
            for name, *_ in run_names(self.size):
                done = Run(self.run_dir(c, name)).done
                wall = train_s.get(f"{c}/{name}")
                score = score_s.get(f"scoring {os.path.join(c, 'runs', name)}")
                if wall is not None and done is not None:
                    rows.append((wall, done["seconds"], score))
        if not rows:
            return None
        mean = lambda xs: round(sum(xs) / len(xs), 2) if xs else None  # noqa: E731
        return {"runs": len(rows), "train_unit_s": mean([r[0] for r in rows]), "loop_s": mean([r[1] for r in rows]),
                "outside_loop_s": mean([r[0] - r[1] for r in rows]),
                "scoring_s": mean([r[2] for r in rows if r[2] is not None])}

    def publish(self):
        """Copy the small result files into --results: per corpus the comparison, the analysis and,
        under runs/<run>/, each run's train_config.json and test predictions (enough for eval.py
        compare to recompute the tables: tests/test_study.py does); print each corpus's comparison."""
        files = {"compare": ("compare.md", "compare.csv", "compare.json", "reliability.png", "differences.png"),
                 "analysis": ("summary.csv", "analysis.json", "per_layer.csv", "entropy_by_layer.png")}
        for c in self.corpora():
            dst = os.path.join(self.results, c)
            os.makedirs(dst, exist_ok=True)
            for what, names in files.items():
                for name in names:
                    src = os.path.join(self.out, c, what, name)
                    if os.path.exists(src):
                        copy_file(src, os.path.join(dst, name))
            for name, *_ in run_names(self.size):
                run, kept = self.run_dir(c, name), os.path.join(dst, "runs", name)
                for part in Run(run).scored_files("test"):
                    if os.path.exists(os.path.join(run, part)):
                        os.makedirs(os.path.dirname(os.path.join(kept, part)), exist_ok=True)
                        copy_file(os.path.join(run, part), os.path.join(kept, part))
        for key, name in (("chitchat", "chitchat-train.jsonl"), ("report", "aggregation.txt"),
                          ("labels", "labels.json"), ("check", "rater_check.json"), ("study", "study.json"),
                          ("raw", "raw.jsonl"), ("sources", "sources.json"), ("signal", "damage_check.json"),
                          ("log", "study.log.jsonl")):
            if os.path.exists(self.p[key]) and (key != "raw" or os.path.getsize(self.p[key]) < RAW_MAX_BYTES):
                copy_file(self.p[key], os.path.join(self.results, name))
        for c in self.corpora():
            if c.startswith("damage-"):  # the labelled records: the test split is every corpus's own
                copy_file(self.corpus_paths()[c], os.path.join(self.results, f"{c}.jsonl"))
            md = os.path.join(self.out, c, "compare", "compare.md")
            if os.path.exists(md):
                print(f"\n===== {c}: variants x seeds; '+rw': rating token weighted, the label-dilution "
                      f"control ({os.path.join(self.results, c)}) =====\n"
                      + open(md).read().split("\n## Reliability")[0].rstrip())
        print(f"\nwrote {self.results}/ (compare.*, analysis files, per-run predictions, study.json)")


PILOT_CONVERSATIONS = 700  # the pilot's own conversations: in damage.make_records' order, the 700 after the
PILOT_SKIP = 1250           # first 1,250; the study passes over them (study_conversations)
PILOT_SEED = 100  # the pilot's training seed (the study's are 0, 1, 2)
LEARNED = 0.05  # an axis counts as learnt when label-only beats its majority class by this much


def study_conversations(size):
    """The chit-chat conversations a damage study draws from: all of them but the pilot's, so that
    no conversation the pilot trained or tested on is ever in the study."""
    convs, _ = importers.import_conversations("chitchat", [])
    used = {r["id"] for r in damage.make_records(convs, seed=size.seed, n=PILOT_CONVERSATIONS, skip=PILOT_SKIP)}
    return [c for c in convs if c["id"] not in used]


def pilot(out, results, size=None):
    """Set the default study's length and test size before it runs, on conversations it never uses:
    label-only at both training sizes with a learning curve (validation accuracy every steps/5), and
    explanation at the large size; all scored on the pilot's test split. Writes results/pilot.json
    with the majority-class share, the curves, the accuracies and the label/explanation disagreement."""
    size = size or SIZES["default"]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "pilot-all.jsonl")
    if not os.path.exists(path):
        convs, _ = importers.import_conversations("chitchat", [])
        recs = damage.make_records(convs, seed=size.seed, n=PILOT_CONVERSATIONS, skip=PILOT_SKIP)
        write_jsonl(recs, path)
    records = data.load_records(path)
    model = smollm2_path() if size.student == "smollm2" else size.student
    runs, curves = {}, {}
    for n, variant in [(max(size.train_sizes), "label"), (min(size.train_sizes), "label"),
                       (max(size.train_sizes), "explanation")]:
        name = f"{variant}-{n}"
        file = os.path.join(out, f"pilot-{n}.jsonl")
        if not os.path.exists(file):
            part = damage.subset(records, n, size.seed, n_val=2 * size.val_conversations)
            write_jsonl(part, file)
        run = Run(os.path.join(out, "runs", name))
        if not run.finished:
            train.run(train.TrainConfig(
                model=model, data=file, out=run.path, variant=variant, seed=PILOT_SEED, rank=size.rank, alpha=2.0 * size.rank,
                lr=size.lr, batch_size=size.batch_size, micro_batch=size.micro_batch, steps=size.steps,
                max_len=size.max_len, checkpointing=size.checkpointing, dtype=size.dtype, lora_dropout=size.lora_dropout,
                val_every=max(1, size.steps // 5), save_every=size.steps, log_every=max(1, size.steps // 5),
                overwrite=True))
        if run.scores("test") is None:
            evaluate.score_run(run.path, split="test", checkpoint=LAST, batch_size=32)
        curves[name] = [(r["step"], r["val_acc"]) for r in run.metrics() if "val_acc" in r]
        runs[name] = evaluate.read_predictions(run.predictions("test"))
    big = max(size.train_sizes)
    lab, exp = (sorted(runs[f"{v}-{big}"], key=lambda r: (r["id"], r["axis"])) for v in ("label", "explanation"))

    def majority(rows):
        return Counter(r["gold"] for r in rows).most_common(1)[0][1] / len(rows)

    def accuracy(rows):
        return sum(r["predicted"] == r["gold"] for r in rows) / len(rows)
    axes = sorted({r["axis"] for r in lab})
    per_axis = {a: {"majority": majority([r for r in lab if r["axis"] == a]),
                    "accuracy": {name: accuracy([r for r in rows if r["axis"] == a]) for name, rows in runs.items()}}
                for a in axes}
    # an axis the label-only student has not learnt at this length (within LEARNED of its majority
    # class at either size) can show no regulariser's effect: the default study leaves it out
    learned = [a for a in axes if all(per_axis[a]["accuracy"][f"label-{n}"] - per_axis[a]["majority"] >= LEARNED
                                      for n in size.train_sizes)]
    keep = [i for i, r in enumerate(lab) if r["axis"] in learned]
    result = {"steps": size.steps, "test_items": len(keep), "axes_learned": learned, "per_axis": per_axis,
              "majority": majority([lab[i] for i in keep]),
              "accuracy": {name: accuracy([r for r in rows if r["axis"] in learned]) for name, rows in runs.items()},
              "disagreement": sum(lab[i]["predicted"] != exp[i]["predicted"] for i in keep) / len(keep),
              "curves": curves, "conversations": PILOT_CONVERSATIONS, "skipped": PILOT_SKIP,
              "seed": PILOT_SEED, "machine": machine(), "git": _git_head()}
    result["label_accuracy"] = min(result["accuracy"][f"label-{n}"] for n in size.train_sizes)
    os.makedirs(results, exist_ok=True)
    copy_file(path, os.path.join(results, "pilot-all.jsonl"))  # its labelled records and predictions
    for name in runs:
        copy_file(Run(os.path.join(out, "runs", name)).predictions("test"),
                  os.path.join(results, f"predictions-{name}.jsonl"))
    write_json(result, os.path.join(results, "pilot.json"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=1))
    return result


def label_distribution(records):
    """{axis: {label: count}} and a warning for each axis where one label holds > COLLAPSE of the items."""
    dist, warnings = {}, []
    for axis in sorted({r["axis"] for r in records}):
        c = Counter(r["label"] for r in records if r["axis"] == axis)
        dist[axis] = {str(k): c.get(k, 0) for k in range(1, 6)}
        label, n = c.most_common(1)[0]
        if n / sum(c.values()) > COLLAPSE:
            warnings.append(f"WARNING: the {axis} labels collapse onto one rating: {n} of {sum(c.values())} "
                            f"items ({n / sum(c.values()):.0%}) are {label}; a classifier that always says {label} "
                            "scores as well, so accuracy differences on this axis mean little")
    return dist, warnings


def format_distribution(dist):
    lines = [f"label distribution per axis ({'/'.join(str(k) for k in range(1, 6))}):"]
    lines += [f"  {axis:18} " + " ".join(f"{c[str(k)]:5}" for k in range(1, 6)) for axis, c in dist.items()]
    return "\n".join(lines)


def format_check(path):
    """The rater check as text, and the axes where no strategy's AUC beats chance (0.5 + the rough
    half-width scaled from z 1.96 to Z_FAMILY: four strategies tested at 95% together)."""
    if not _json_ok(path):
        return "rater check: not run", []
    rows = read_json(path).get("rows")
    if not isinstance(rows, list):
        raise StudyError(f"{path}: no list of 'rows'; delete it to check the rater again")
    lines = [f"rater check (AUC of the expected score, real response vs a copy made worse on the axis; 0.5 = blind; "
             f"an axis is kept when one strategy's AUC is above 0.5 + the chance half-width x {Z_FAMILY / 1.96:.2f}):"]
    lines += [f"  {r['axis']:18} {r['prompt']:16} {r['auc']:.2f} (chance +- {r['half_width_at_chance']:.2f}, "
              f"n {r['n']})" for r in rows if r["auc"] is not None]
    blind = [axis for axis in dict.fromkeys(r["axis"] for r in rows)
             if not any(r["auc"] is not None and r["auc"] - 0.5 > r["half_width_at_chance"] * Z_FAMILY / 1.96
                        for r in rows if r["axis"] == axis)]
    lines += [f"  {axis}: no signal" for axis in blind]
    return "\n".join(lines), blind


def machine():
    m = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
         "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
         "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        m["cuda"] = torch.cuda.get_device_name(0)
    return m


def _git_head():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- command line

@dataclass
class StudyConfig:
    size: Literal[tuple(SIZES)] | None = None  # which preset (SIZES in study.py); --smoke, --quick, --default and
    # --paper are short for --size NAME
    out: str = ""                     # study folder, resumed when rerun (default: runs/study-<size>)
    results: str = ""                 # where the small result files go (default: results/<size>)
    labels: str = ""                  # labelled chit-chat records (a study's chitchat-train.jsonl): skip stages 1 and 4
    rater: str = ""                   # rater checkpoint instead of the size's (a folder or a .gguf)
    student: str = ""                 # student checkpoint instead of the size's (a folder or a .gguf)
    dry_run: bool = False             # print the plan and its time estimate, run nothing
    pilot: bool = False               # the pilot that set the default study's length and test size (PILOT in
    # study.py), on conversations the study never uses -> results/pilot/pilot.json


def study(cfg):
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines as they happen, through a pipe too
    if cfg.dry_run:
        for name in ([cfg.size] if cfg.size else SIZES):
            print(describe(SIZES[name], cfg.labels or None, cfg.rater or None, cfg.student or None)[0] + "\n")
        return
    if cfg.pilot:
        return pilot(cfg.out or os.path.join("runs", "pilot"), cfg.results or os.path.join("results", "pilot"))
    if not cfg.size:
        raise StudyError("choose a size: --smoke, --quick, --default or --paper (--dry-run shows each plan)")
    if cfg.labels and not os.path.isfile(cfg.labels):
        raise StudyError(f"--labels {cfg.labels}: no such file")
    Study(SIZES[cfg.size], cfg.out or os.path.join("runs", f"study-{cfg.size}"),
          cfg.results or os.path.join("results", cfg.size), labels=cfg.labels and os.path.abspath(cfg.labels),
          rater=cfg.rater or None, student=cfg.student or None).run()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    argv = [f"--size={a[2:]}" if a.startswith("--") and a[2:] in SIZES else a for a in argv]  # --smoke: --size smoke
    return cli.main("study.py", __doc__, {"study": cli.Command(StudyConfig, study)}, argv, default="study")


if __name__ == "__main__":
    sys.exit(main())
