"""The labelling step: an ensemble of local instruction models rates and explains each response.

The paper's training data came from three LLM raters x four prompting strategies (a 1-4 scale, 1-4
with rated examples, 1-5, 1-5 with examples): 12 scores and 12 explanations per conversation and
axis, averaged into the label, with the explanations summarised into one by an LLM. This file does
both model-driven steps with checkpoints on disk:

    python rate.py --raters RATER_DIR [RATER_DIR ...] --input conversations.jsonl \
        --axes naturalness,comprehensiveness,on_topic --out raw.jsonl
    python rate.py summarize --model MODEL_DIR --input raw.jsonl --out raw.jsonl
    python data.py aggregate raw.jsonl -o train.jsonl

Each rater (a Llama/Mistral instruction checkpoint folder with its tokenizer, or a GGUF file such as
SmolLM2-135M-Instruct's, loaded one at a time with `model.load_model`) sees the axis rubric in its own
chat format (ChatML for SmolLM2, `[INST] ... [/INST]` for Mistral/Llama-2 and for checkpoints that
declare none) and must answer "Score: N" and "Explanation: ...". Answers are parsed strictly: a score off the strategy's
scale, a missing explanation or a broken format is retried (sampling, seeded) a few times and then
recorded as a failed rating (`"score": null, "error": ...`), never guessed. Results are appended
to the raw file batch by batch, so rerunning the same command resumes where a crash left off.

Left out: aggregation (`data.py aggregate` averages the scores), any API or remote model, chat
formats other than ChatML and `[INST]`, and a retry of ratings already recorded as failed (delete their lines
to redo them). Strategies beyond the four built in come from `--prompts-file`, a JSON object:
    {"strict5": {"scale": 5, "instructions": "Be strict.",
                 "examples": [{"axis": "naturalness", "context": ["Hi"], "response": "Hello!",
                               "score": 4, "explanation": "Friendly and fluent."}]}}
("examples": true uses the built-in rated examples, which exist for scales 4 and 5).
"""
import argparse
import json
import os
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from functools import partial

import torch

import data
from model import DTYPES, ModelError, generate, load_model

# ----------------------------------------------------------------------------- defaults
BATCH_SIZE = 8            # prompts generated together (left-padded, one KV cache)
MAX_NEW_TOKENS = 96       # enough for "Score: N" and two sentences
MAX_PROMPT_TOKENS = 2048  # longer prompts lose their oldest context turns
RETRIES = 2               # extra attempts for an answer that does not parse
RETRY_TEMPERATURE = 0.7   # retries sample (a greedy retry would repeat the same answer)
SUMMARY_TOKENS = 128


class RateError(ValueError):
    """Bad input to rate.py: the message names the file, line or option."""


# ----------------------------------------------------------------------------- prompting strategies

STRATEGIES = {  # name -> how the question is asked; "examples": show the built-in rated examples
    "scale4": {"scale": 4, "examples": False},
    "scale4-examples": {"scale": 4, "examples": True},
    "scale5": {"scale": 5, "examples": False},
    "scale5-examples": {"scale": 5, "examples": True},
}

# Two hand-rated responses, a good one and a poor one: {axis: ({scale: score}, explanation)}.
EXAMPLES = [
    {"context": ["Do you know a good way to keep basil fresh?"],
     "response": "Trim the stems and stand it in a glass of water on the counter, like cut flowers; "
                 "the fridge turns the leaves black.",
     "ratings": {"naturalness": ({5: 5, 4: 4}, "Fluent, casual and idiomatic, like a friend's tip."),
                 "comprehensiveness": ({5: 4, 4: 3}, ("Gives a concrete method and says why to avoid "
                                                      "the fridge, but not how long the basil will keep.")),
                 "on_topic": ({5: 5, 4: 4}, "Answers exactly the question about keeping basil fresh.")}},
    {"context": ["I just adopted a cat!", "Congratulations! What's her name?"],
     "response": "The weather was nice yesterday. Cats are mammals. Cats are mammals.",
     "ratings": {"naturalness": ({5: 2, 4: 2}, "Stilted and repetitive; no person would answer like this."),
                 "comprehensiveness": ({5: 1, 4: 1}, "Gives neither the name nor anything else that was asked."),
                 "on_topic": ({5: 1, 4: 1}, "Ignores the question about the cat's name and drifts to the weather.")}},
]


def builtin_examples(axis, scale):
    return [{"context": e["context"], "response": e["response"], "axis": axis,
             "score": e["ratings"][axis][0][scale], "explanation": e["ratings"][axis][1]}
            for e in EXAMPLES if axis in e["ratings"] and scale in e["ratings"][axis][0]]


def load_strategies(names, path=None):
    """The chosen strategies by name: the built-in ones plus those of a JSON file."""
    table = dict(STRATEGIES)
    if path:
        try:
            with open(path) as f:
                extra = json.load(f)
        except (OSError, ValueError) as e:
            raise RateError(f"{path}: cannot read prompting strategies ({e})") from None
        for name, s in (extra.items() if isinstance(extra, dict) else [(None, None)]):
            if not isinstance(s, dict) or not isinstance(s.get("scale"), int) or s["scale"] < 2:
                raise RateError(f"{path}: strategy {name!r} needs an integer 'scale' of at least 2")
            for i, ex in enumerate(s["examples"] if isinstance(s.get("examples"), list) else []):
                if not all(k in ex for k in ("axis", "context", "response", "score", "explanation")):
                    raise RateError(f"{path}: strategy {name!r} example {i} needs axis, context, "
                                    "response, score and explanation")
            table[name] = s
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise RateError(f"unknown prompting strategy {unknown[0]!r}; known: {', '.join(table)}")
    return {n: table[n] for n in names}


def strategy_examples(strategy, axis):
    if strategy.get("examples") is True:
        return builtin_examples(axis, strategy["scale"])
    return [e for e in strategy.get("examples") or [] if e["axis"] == axis]


# ----------------------------------------------------------------------------- prompts

def conversation_text(context, response):
    """Turns labelled as data.py labels them: backwards from the response, so the turn it answers is 'User'."""
    context = [context] if isinstance(context, str) else context
    turns = [f"{'User' if (len(context) - i) % 2 else 'Assistant'}: {t}\n" for i, t in enumerate(context)]
    return "Conversation:\n" + "".join(turns) + f"Response to rate: {response}"


def answer_text(score, explanation):
    return f"Score: {score}\nExplanation: {explanation}"


def rating_prompt(record, axis, description, strategy, drop_turns=0):
    """The instruction asking for one score on `strategy`'s scale, with the oldest `drop_turns`
    context turns left out."""
    scale = strategy["scale"]
    parts = [f"Rate the response in a conversation for {axis.replace('_', '-')}: {description}",
             f"Use a whole-number scale from 1 (worst) to {scale} (best). {strategy.get('instructions', '')}".strip()]
    examples = strategy_examples(strategy, axis)
    if examples:
        parts.append("Rated examples:")
        parts += [conversation_text(e["context"], e["response"]) + "\n" + answer_text(e["score"], e["explanation"])
                  for e in examples]
        parts.append("Now rate this one.")
    parts.append(conversation_text(record["context"][drop_turns:], record["response"]))
    parts.append(f"Answer in exactly this format and nothing else:\nScore: <a whole number from 1 to {scale}>\n"
                 "Explanation: <one or two sentences>")
    return "\n\n".join(parts)


def summary_prompt(record, axis, description, label, ratings, drop_turns=0):
    lines = [f"- ({r['score']} on 1-{r['scale']}) {r['explanation']}" for r in ratings]
    return (f"Several raters judged the response in this conversation for {axis.replace('_', '-')}: {description}\n\n"
            + conversation_text(record["context"][drop_turns:], record["response"])
            + "\n\nTheir explanations:\n" + "\n".join(lines)
            + f"\n\nThe consensus score is {label} on a scale from 1 to 5. Merge the explanations into one "
              "short explanation (one or two sentences) that agrees with this score. Answer in exactly "
              "this format:\nExplanation: <one or two sentences>")


def fit(tok, make_text, n_turns, max_tokens):
    """Token ids of make_text(drop) in the rater's chat format, dropping the oldest context turns
    until it fits in max_tokens; None if even no context is too long."""
    for drop in range(n_turns + 1):
        ids = tok.chat(make_text(drop), template=tok.template or "inst")
        if len(ids) <= max_tokens:
            return ids
    return None


def fit_prompt(tok, record, axis, description, strategy, max_tokens):
    return fit(tok, partial(rating_prompt, record, axis, description, strategy),
               len(record["context"]), max_tokens)


# ----------------------------------------------------------------------------- parsing answers

SCORE = re.compile(r"\bscore\s*:\s*", re.IGNORECASE)
EXPLANATION = re.compile(r"\bexplanation\s*:\s*", re.IGNORECASE)
NUMBER = re.compile(r"(-?\d+(?:[.,]\d+)?)(\s*(?:-|–|to|or)\s*\d)?(?:\s*(?:/|out of)\s*(\d+))?", re.IGNORECASE)


def parse_rating(text, scale):
    """(score, explanation) from a rater's answer, or raise ValueError saying what is wrong.

    Accepted: "Score: N" (also "**Score:** N", "N/scale", "N out of scale") and "Explanation: ..."
    in either order, on separate lines or one. Rejected: no score, a non-integer, a range, a score
    off 1..scale, two different scores, no explanation or an empty one."""
    text = text.replace("**", "").replace("__", "")
    scores = []
    for m in SCORE.finditer(text):
        n = NUMBER.match(text, m.end())
        if n is None:
            raise ValueError(f"score is not a number: {text[m.end():m.end() + 20]!r}")
        value, is_range, out_of = n.groups()
        if is_range:
            raise ValueError(f"a range instead of one score: {n.group(0)!r}")
        if not value.lstrip("-").isdigit():
            raise ValueError(f"score {value} is not a whole number")
        if out_of is not None and int(out_of) != scale:
            raise ValueError(f"score given out of {out_of}, the scale is 1-{scale}")
        if not 1 <= int(value) <= scale:
            raise ValueError(f"score {value} outside 1-{scale}")
        scores.append(int(value))
    if not scores:
        raise ValueError("no 'Score:' in the answer")
    if len(set(scores)) > 1:
        raise ValueError(f"conflicting scores {sorted(set(scores))}")
    m = EXPLANATION.search(text)
    if m is None:
        raise ValueError("no 'Explanation:' in the answer")
    rest = text[m.end():]
    ends = [len(rest)] + [s.start() for s in SCORE.finditer(rest)]  # up to a Score line after it,
    if "\n\n" in rest:                                                # or a blank line
        ends.append(rest.index("\n\n"))
    explanation = " ".join(rest[:min(ends)].split()).strip("\"' ")
    if not re.search(r"[^\W\d_]", explanation):
        raise ValueError("empty explanation")
    return scores[0], explanation


def parse_summary(text, scale=None):
    """The merged explanation: the text after an optional 'Explanation:', whitespace collapsed."""
    text = text.replace("**", "")
    m = EXPLANATION.search(text)
    text = text[m.end():] if m else text
    text = " ".join(text.split("\n\n")[0].split()).strip("\"' ")
    if not re.search(r"[^\W\d_]", text):
        raise ValueError("empty summary")
    return text


# ----------------------------------------------------------------------------- the raw file

def read_jsonl(path, repair=False):
    """Records of a JSONL file. A last line cut off by a crash is ignored and, with repair=True,
    truncated away (a complete last line missing its newline gets one), so appending continues
    cleanly. A bad line anywhere else is an error naming it."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")  # ends with b"" when the file ends with a newline
    records, good = [], 0      # good: bytes up to the end of the last complete record
    for n, line in enumerate(lines, 1):
        try:
            if line.strip():
                records.append(json.loads(line))
        except ValueError as e:
            if any(rest.strip() for rest in lines[n:]):
                raise RateError(f"{path}:{n}: not valid JSON ({e})") from None
            break
        good += len(line) + 1
    if repair and good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    elif repair and raw and not raw.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


def append_lines(path, records):
    """Append records as JSON lines in one write, flushed to disk: a crash loses at most this batch."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- generation

def complete(model, tok, prompts, max_new_tokens, temperature=0.0, seed=None):
    """Generated text for each prompt (token ids), all in one batch with one KV cache."""
    out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                   eos_id=tok.eos_id, seed=seed)
    return [tok.decode([i for i in ids if i < tok.vocab_size]) for ids in out]  # ids past the tokenizer: dropped


def answer_all(model, tok, prompts, parse, *, max_new_tokens, temperature, retries, seed):
    """Generate for every prompt, retrying the ones whose answer does not parse (sampling, seeded).
    prompts: per item (token ids, parse's second argument), or None for one too long to ask.
    Returns per item ("ok", parse's result) or ("error", what was wrong with the last answer)."""
    results = [("error", "prompt too long even without context turns") if p is None else None for p in prompts]
    todo = [i for i, p in enumerate(prompts) if p is not None]
    for attempt in range(retries + 1):
        if not todo:
            break
        temp = temperature if attempt == 0 else max(temperature, RETRY_TEMPERATURE)
        texts = complete(model, tok, [prompts[i][0] for i in todo], max_new_tokens, temp,
                         seed=None if temp == 0 else seed + attempt)
        failed = []
        for i, text in zip(todo, texts):
            try:
                results[i] = ("ok", parse(text, prompts[i][1]))
            except ValueError as e:
                results[i] = ("error", f"{e} (attempt {attempt + 1} of {retries + 1})")
                failed.append(i)
        todo = failed
    return results


class Progress:
    def __init__(self, label, total):
        self.label, self.total, self.done, self.failed, self.start = label, total, 0, 0, time.time()

    def update(self, done, failed):
        self.done += done
        self.failed += failed
        elapsed = time.time() - self.start
        left = elapsed / max(self.done, 1) * (self.total - self.done)
        tty = sys.stderr.isatty()
        print(f"{self.label}: {self.done}/{self.total} done, {self.failed} failed, "
              f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d} left", file=sys.stderr,
              end="\r" if tty and self.done < self.total else "\n", flush=True)


def batch_seed(seed, *key):
    return (seed * 1_000_003 + zlib.crc32("|".join(map(str, key)).encode())) % 2**31


# ----------------------------------------------------------------------------- rate

def rate(args):
    axes = chosen_axes(args.axes, args.axes_file)
    strategies = load_strategies(args.prompts.split(","), args.prompts_file)
    for name, s in strategies.items():
        for axis in axes:
            if s.get("examples") and not strategy_examples(s, axis):
                raise RateError(f"strategy {name!r} has no rated examples for axis {axis!r}; add some in --prompts-file")
    for path in args.raters:
        check_rater(path)
    names = [rater_name(p) for p in args.raters]  # the rater's name in the output
    if len(set(names)) < len(names):
        raise RateError(f"two raters share the folder name {max(names, key=names.count)!r}; rename one")
    if args.samples > 1 and args.temperature == 0:
        raise RateError("--samples above 1 needs --temperature above 0 (greedy samples would be identical)")
    if not os.path.isfile(args.input):
        raise RateError(f"{args.input}: no such file")
    conversations = [{k: c[k] for k in ("id", "dataset", "context", "response")}
                     for c in data.load_records(args.input, kind="conversation", axes=axes)]
    done = {(r["id"], x["axis"], x["rater"], x["prompt"], x.get("sample", 0))
            for r in read_jsonl(args.out, repair=True) for x in r.get("ratings", [])}
    counts = Counter()  # (rater, prompt, "ok" | "failed") -> ratings written by this run
    for path, name in zip(args.raters, names):
        jobs = [(c, axis, p, k) for c in conversations for axis in axes for p in strategies
                for k in range(args.samples) if (c["id"], axis, name, p, k) not in done]
        n_all = len(conversations) * len(axes) * len(strategies) * args.samples
        print(f"rater {name}: {len(jobs)} ratings to make, {n_all - len(jobs)} already in {args.out}", file=sys.stderr)
        if jobs:
            rate_with(path, name, jobs, axes, strategies, args, counts)
    for name in names:
        for p in strategies:
            print(f"  {name} {p}: {counts[name, p, 'ok']} rated, {counts[name, p, 'failed']} failed", file=sys.stderr)
    n_failed = sum(n for (_, _, status), n in counts.items() if status == "failed")
    print(f"wrote {sum(counts.values())} ratings ({n_failed} failed) to {args.out}", file=sys.stderr)
    return counts


def check_rater(path):
    """A rater is a .gguf file, or a folder with config.json and a tokenizer (tokenizer.model or .json)."""
    if path.endswith(".gguf") and os.path.isfile(path):
        return
    if not (os.path.isfile(os.path.join(path, "config.json")) and
            any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.model", "tokenizer.json"))):
        raise RateError(f"{path}: not a rater (a .gguf file, or a folder with config.json, *.safetensors "
                        "and tokenizer.model or tokenizer.json)")


def rater_name(path):
    """'SmolLM2-135M-Instruct.Q4_1' for a GGUF file, the folder's name for a checkpoint folder."""
    base = os.path.basename(os.path.normpath(path))
    return base[:-len(".gguf")] if base.endswith(".gguf") else base


def rate_with(path, name, jobs, axes, strategies, args, counts):
    """Load one rater, answer its jobs (conversation, axis, strategy, sample) batch by batch, append."""
    model = load_model(path, device=args.device, dtype=args.dtype, quantize=args.quantize)
    tok = data.Tokenizer(path)
    jobs = sorted(jobs, key=lambda j: (j[2], len(str(j[0]["context"])) + len(j[0]["response"])))  # less padding
    print(f"rater {name}: {model.n_params() / 1e6:.1f}M parameters on {args.device} "
          f"({next(model.parameters()).dtype}{', nf4' if args.quantize else ''}), {len(jobs)} prompts "
          f"in batches of {args.batch_size}, up to {args.max_new_tokens} new tokens", file=sys.stderr)
    progress = Progress(f"rater {name}", len(jobs))
    for b in range(0, len(jobs), args.batch_size):
        batch = jobs[b:b + args.batch_size]
        prompts = []
        for c, axis, p, _ in batch:
            ids = fit_prompt(tok, c, axis, axes[axis], strategies[p], args.max_prompt_tokens)
            prompts.append(None if ids is None else (ids, strategies[p]["scale"]))
        c, axis, p, k = batch[0]
        results = answer_all(model, tok, prompts, parse_rating, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, retries=args.retries,
                             seed=batch_seed(args.seed, name, c["id"], axis, p, k))
        lines = {}
        for (c, axis, p, k), (status, value) in zip(batch, results):
            rating = {"rater": name, "prompt": p, "axis": axis, "scale": strategies[p]["scale"]}
            rating.update({"score": value[0], "explanation": value[1]} if status == "ok" else
                          {"score": None, "error": value})
            if args.samples > 1:
                rating["sample"] = k
            lines.setdefault(c["id"], dict(c, ratings=[]))["ratings"].append(rating)  # one line per item
            counts[name, p, "ok" if status == "ok" else "failed"] += 1
        append_lines(args.out, list(lines.values()))
        progress.update(len(batch), sum(s != "ok" for s, _ in results))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next rater needs the memory


def known_axes(path=None):
    """data.AXES plus the axes described in `path` (JSON {axis: description} or 'axis: description' lines)."""
    try:
        return data.load_axes(path)
    except (OSError, ValueError) as e:
        raise RateError(f"{path}: cannot read axis descriptions ({e})") from None


def chosen_axes(names, path=None):
    known = known_axes(path)
    for a in names.split(","):
        if a.strip() not in known:
            raise RateError(f"unknown axis {a.strip()!r}: describe it in --axes-file (known: {', '.join(known)})")
    return {a.strip(): known[a.strip()] for a in names.split(",")}


# ----------------------------------------------------------------------------- summarize

def summarize(args):
    out = args.out or args.input
    if not os.path.isfile(args.input):
        raise RateError(f"{args.input}: no such file")
    check_rater(args.model)
    if os.path.abspath(out) != os.path.abspath(args.input) and not os.path.exists(out):
        shutil.copyfile(args.input, out)  # a different --out starts as a copy, then gains summaries
    read_jsonl(out, repair=True)  # drop a line cut off by a crash, then read it as data.py does
    axes = known_axes(args.axes_file)
    items = {it["id"]: it for it in data.merge_raw(data.load_records(out, kind="raw", axes=axes))}
    records, _ = data.aggregate(list(items.values()), method="mean")  # the consensus each summary must agree with
    jobs = [(r["id"], r["axis"], r["label"]) for r in records if r["axis"] not in items[r["id"]]["summaries"]]
    print(f"summarize: {len(jobs)} (item, axis) pairs to summarise, {len(records) - len(jobs)} already done",
          file=sys.stderr)
    counts = {"ok": 0, "failed": 0}
    if not jobs:
        return counts
    model = load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    tok = data.Tokenizer(args.model)
    progress = Progress("summarize", len(jobs))
    for b in range(0, len(jobs), args.batch_size):
        batch = jobs[b:b + args.batch_size]
        prompts = []
        for i, axis, label in batch:
            ok = [x for x in items[i]["ratings"] if x["axis"] == axis and x.get("score") is not None]
            ids = fit(tok, partial(summary_prompt, items[i], axis, axes[axis], label, ok),
                      len(items[i]["context"]), args.max_prompt_tokens)
            prompts.append(None if ids is None else (ids, None))
        results = answer_all(model, tok, prompts, parse_summary, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, retries=args.retries,
                             seed=batch_seed(args.seed, *batch[0][:2]))
        lines = {}
        for (i, axis, _), (status, value) in zip(batch, results):
            counts["ok" if status == "ok" else "failed"] += 1
            if status == "ok":  # a whole raw record, so that data.py validates the line on its own
                conversation = {k: items[i][k] for k in ("id", "dataset", "context", "response")}
                lines.setdefault(i, dict(conversation, ratings=[], summaries={}))["summaries"][axis] = value
            else:
                print(f"summary of {i} / {axis} failed: {value}", file=sys.stderr)
        append_lines(out, list(lines.values()))
        progress.update(len(batch), sum(s != "ok" for s, _ in results))
    print(f"wrote {counts['ok']} summaries to {out}; {counts['failed']} failed (a rerun tries them again)",
          file=sys.stderr)
    return counts


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    summarizing = bool(argv) and argv[0] == "summarize"
    p = argparse.ArgumentParser(prog="rate.py" + (" summarize" if summarizing else ""),
                                description=__doc__.split("\n\n")[0])
    if summarizing:
        argv = argv[1:]
        p.add_argument("--model", required=True, help="instruction checkpoint: a folder with its tokenizer, or a .gguf file")
        p.add_argument("--input", required=True, help="raw ratings file (JSONL)")
        p.add_argument("--out", help="where summaries are appended (default: --input)")
    else:
        p.add_argument("--raters", nargs="+", required=True, help="rater checkpoints: folders with their tokenizer, or .gguf files")
        p.add_argument("--input", required=True, help="conversations (JSONL: id, dataset, context, response)")
        p.add_argument("--out", required=True, help="raw ratings file (JSONL), appended to and resumed")
        p.add_argument("--axes", default=",".join(data.AXES), help="comma-separated axes to rate")
        p.add_argument("--prompts", default=",".join(STRATEGIES), help="comma-separated prompting strategies")
        p.add_argument("--prompts-file", help="JSON file of extra prompting strategies")
        p.add_argument("--samples", type=int, default=1, help="answers per rater and strategy (needs --temperature)")
    p.add_argument("--axes-file", help="JSON {axis: description} for axes beyond the built-in three")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--max-new-tokens", type=int, default=SUMMARY_TOKENS if summarizing else MAX_NEW_TOKENS)
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS)
    p.add_argument("--retries", type=int, default=RETRIES)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", choices=["nf4"], help="load the model's linear layers in 4 bits")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on cpu, else bfloat16")
    args = p.parse_args(argv)
    try:
        return summarize(args) if summarizing else rate(args)
    except (RateError, ModelError, data.DataError, data.TokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
