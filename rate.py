r"""The labelling step: an ensemble of local instruction models rates and explains each response.

The paper's training data came from three LLM raters x four prompting strategies (a 1-4 scale, 1-4
with rated examples, 1-5, 1-5 with examples): 12 scores and 12 explanations per conversation and
axis, averaged into the label, with the explanations summarised into one by an LLM. This file does
both model-driven steps with checkpoints on disk:

    python rate.py --raters RATER_DIR_OR_GGUF [...] --input conversations.jsonl \
        --axes naturalness,comprehensiveness,on_topic --out raw.jsonl
    python rate.py summarize --model MODEL_DIR_OR_GGUF --input raw.jsonl --out raw.jsonl
    python data.py aggregate raw.jsonl -o train.jsonl

and, before the hours that rating takes, whether a rater's score sees the response at all (the AUC
of each response against a copy of it made worse on the axis):

    python rate.py check --raters RATER_DIR_OR_GGUF [...] --input conversations.jsonl --out check.json

Each rater (a Llama/Mistral instruction checkpoint folder with its tokenizer, or a GGUF file such as
SmolLM2-135M-Instruct's, loaded one at a time with `model.load_model`) sees the axis rubric in its own
chat format (ChatML for SmolLM2, `[INST] ... [/INST]` for Mistral/Llama-2 and for checkpoints that
declare none). Small raters do not follow an answer format: asked for "Score: N / Explanation: ...",
SmolLM2-135M continues the conversation instead and almost never writes a parsable answer (2 of 8
in one test, 0 of 12 in another). So the structure is in the prompt, not left to the model, and
the answer comes in two guided phases of the assistant's turn (with SmolLM2, 240 of 240 ratings of
20 chitchat conversations x 4 strategies x 3 axes then parse):

  1. score        the reply is prefilled with "Score:" (and the pieces every number starts with,
                  'Ġ' for SmolLM2, '▁' for SentencePiece), and one forward pass gives the logits of
                  the scale's digit tokens there. The score is their argmax (greedy), or a draw from
                  their softmax at --temperature with a generator seeded per rating (so --samples
                  are independent and reproducible); "score_prob" is the chosen digit's probability
                  among the digits at temperature 1. Every score is on the scale by construction.
  2. explanation  "Score: N\nExplanation: The response" is fed (the opening words, --explanation-start,
                  keep a small model from starting a numbered list or copying the format's
                  placeholder) and the rest is generated. Kept: up to a blank line, a line that
                  starts another part of the prompt ("Score:", "User:", ...) or two sentences,
                  without a cut-off last fragment. An explanation with no words of its own is
                  retried (sampling, seeded) a few times and then recorded as a failed rating
                  (`"score": null, "error": ...`), never guessed.

`rate.py summarize` does the same for the merged explanation ("Explanation: The response" prefilled).
Results are appended to the raw file batch by batch, so rerunning the same command resumes where a
crash left off (only an unterminated last line is taken for a crash's and cut; any other bad line is
an error). While one rate.py appends, RAW.lock beside the raw file holds its pid and a second one on
the same file is refused. Options are bounded (LIMITS): a batch of 10^6 or a temperature of nan is
refused by name rather than run.

Left out: aggregation (`data.py aggregate` averages the scores), any API or remote model, free-form
answers parsed from text (the digit distribution is read instead, for large raters too), scales whose
numbers are not one token each after a shared prefix (above 9 for most tokenizers), chat formats other
than ChatML and `[INST]`, and a retry of ratings already recorded as failed (delete their lines to
redo them). Strategies beyond the four built in come from `--prompts-file`, a JSON object (a scale
of 2-9, so that every score is one digit token):
    {"strict5": {"scale": 5, "instructions": "Be strict.",
                 "examples": [{"axis": "naturalness", "context": ["Hi"], "response": "Hello!",
                               "score": 4, "explanation": "Friendly and fluent."}]}}
("examples": true uses the built-in rated examples, which exist for scales 4 and 5).

Length: ~835 lines, one concern: the labelling step. Prompting strategies (checked), prompts cut
to fit, the two-phase rating, the resumable raw file and its lock, the rater check, the summaries
and the bounded settings of the three commands.
"""
import cli  # first, so that Ctrl-C while the command starts is one line too (cli.py)
import json
import os
import random
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

import data
from model import DTYPES, generate, load_model

# ----------------------------------------------------------------------------- defaults
BATCH_SIZE = 8            # prompts answered together (one forward for the scores, one KV cache for the explanations)
MAX_NEW_TOKENS = 64       # explanation tokens: two sentences
MAX_PROMPT_TOKENS = 2048  # longer prompts lose their oldest context turns
RETRIES = 2               # extra attempts for an explanation that does not parse
RETRY_TEMPERATURE = 0.7   # retries sample (a greedy retry would repeat the same answer)
SUMMARY_TOKENS = 96
SCORE_CUE = "Score:"                # what the assistant's reply is prefilled with
EXPLANATION_CUE = "\nExplanation:"  # fed after the chosen score
EXPLANATION_START = "The response"  # the explanation's first words, also prefilled ("" for none)
MAX_SENTENCES = 2                   # an explanation keeps at most this many
LIMITS = {  # option -> (lowest, highest) accepted: beyond these a run is meaningless or its cost unbounded
    "batch_size": (1, 1024), "max_new_tokens": (1, 4096), "max_prompt_tokens": (1, 131072),
    "retries": (0, 20), "samples": (1, 100)}
MAX_TEMPERATURE = 100.0


class RateError(cli.Error, ValueError):
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
    """The chosen strategies by name: the built-in ones plus those of a JSON file, each checked
    (see strategy_problem)."""
    table = dict(STRATEGIES)
    if path:
        try:
            text = data.read_text(path, "file of prompting strategies")
        except OSError as e:
            raise RateError(f"{path}: cannot read prompting strategies ({e})") from None
        try:
            extra = data.parse_json(text)
        except data.DataError as e:
            raise RateError(f"{path}: cannot read prompting strategies ({e})") from None
        if not isinstance(extra, dict):
            raise RateError(f"{path}: expected a JSON object of prompting strategies by name")
        for name, s in extra.items():
            problem = strategy_problem(s)
            if problem:
                raise RateError(f"{path}: strategy {name!r} {problem}")
            table[name] = s
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise RateError(f"unknown prompting strategy {unknown[0]!r}; known: {', '.join(table)}")
    return {n: table[n] for n in names}


def _int_in(x, lo, hi):
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def strategy_problem(s):
    """What is wrong with a strategy of --prompts-file, or None: it needs a scale of 2-9 (every score
    is read as one digit token), may have 'instructions' (a string) and 'examples' (true for the
    built-in ones, or a list of rated examples, each score on the scale)."""
    if not isinstance(s, dict):
        return f"must be an object, got {type(s).__name__}"
    scale = s.get("scale")
    if not _int_in(scale, 2, 9):
        return f"needs an integer 'scale' from 2 to 9 (each score is read as one digit token), got {scale!r:.40}"
    if not isinstance(s.get("instructions", ""), str):
        return "has 'instructions' that are not a string"
    examples = s.get("examples", False)
    if not isinstance(examples, (bool, list)):
        return "has 'examples' that are neither true, false nor a list of rated examples"
    for i, ex in enumerate(examples if isinstance(examples, list) else []):
        if not isinstance(ex, dict) or not all(k in ex for k in ("axis", "context", "response", "score", "explanation")):
            return f"example {i} needs axis, context, response, score and explanation"
        context = [ex["context"]] if isinstance(ex["context"], str) else ex["context"]
        if not (all(isinstance(ex[k], str) for k in ("axis", "response", "explanation"))
                and isinstance(context, list) and all(isinstance(t, str) for t in context)):
            return f"example {i}: axis, response and explanation must be strings, context a string or a list of them"
        if not _int_in(ex["score"], 1, scale):
            return f"example {i}: 'score' must be an integer from 1 to {scale}, got {ex['score']!r:.40}"
    return None


def strategy_examples(strategy, axis):
    if strategy.get("examples") is True:
        return builtin_examples(axis, strategy["scale"])
    return [e for e in strategy.get("examples") or [] if e["axis"] == axis]


# ----------------------------------------------------------------------------- prompts

def conversation_text(context, response):
    """Turns labelled as data.py labels them: backwards from the response, so the turn it answers is 'User'."""
    context = [context] if isinstance(context, str) else context
    return "Conversation:\n" + "".join(t + "\n" for t in data.turn_lines(context)) + f"Response to rate: {response}"


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


# ----------------------------------------------------------------------------- parsing explanations

# A line where the model starts another part of the prompt instead of explaining further.
NEXT_PART = re.compile(r"^\W*((score|explanation|user|assistant|conversation|response to rate|rated examples"
                       r"|their explanations)\s*:|now rate this)", re.IGNORECASE)
OWN_LABEL = re.compile(r"^\W*explanation\s*:\s*", re.IGNORECASE)
LABEL = re.compile(r"^\s*(explanation\s*:\s*)?(\d+[.):]\s+)?", re.IGNORECASE)  # a repeated label, a list number
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')])\s+")


def parse_explanation(text, start=""):
    """The explanation in a generated continuation of "Explanation:" (text begins with the prefilled
    `start`, when there is one), or raise ValueError saying what is wrong.

    Kept: the text up to a blank line or a line that starts another part of the prompt ("Score: 3",
    "User: ...", "Explanation: ..."), at most MAX_SENTENCES sentences, and a cut-off last fragment
    only when no whole sentence comes before it. A model that ignores the prefilled words and writes
    the answer format itself ("Score: 3\nExplanation: X", the scripted smoke rater of study.py) gets
    its X. Markdown bold, quotes around the whole and (with no `start`) a leading "Explanation:" or
    list number ("1. ") are dropped, whitespace is collapsed. Rejected: no letter in what the model
    wrote (beyond `start`)."""
    text = text.replace("**", "").replace("__", "").lstrip()
    if start and text.startswith(start):
        text = text[len(start):]
    else:
        start, text = "", LABEL.sub("", text)
    block = text.split("\n\n")[0].split("\n")
    j = next((j for j, line in enumerate(block) if OWN_LABEL.match(line)), None)
    if NEXT_PART.match(block[0]) and j is not None:  # it wrote the format itself ("Score: 3\nExplanation: ...")
        start, block = "", [OWN_LABEL.sub("", block[j])] + block[j + 1:]
    kept = []
    for line in block:
        if NEXT_PART.match(line):
            break
        kept.append(line)
    sentences = SENTENCE_END.split(" ".join(" ".join(kept).split()))
    if len(sentences) > 1 and not re.search(r"[.!?][\"')]?$", sentences[-1]):
        sentences = sentences[:-1]  # cut off by max_new_tokens
    own = " ".join(sentences[:MAX_SENTENCES])
    if not re.search(r"[^\W\d_]", own):
        raise ValueError(f"empty explanation: {text[:40]!r}")
    if len(own) > 1 and own[0] == own[-1] and own[0] in "\"'":
        own = own[1:-1].strip()  # quoted whole
    return start + ("" if own[0] in "',.;:!?)" else " ") + own if start else own


# ----------------------------------------------------------------------------- the raw file

def read_jsonl(path, repair=False):
    """Records of a raw JSONL file, each checked as far as resuming needs. Only an unterminated last
    line is taken for one cut off by a crash: it is ignored and, with repair=True, truncated away (a
    complete one that only lacks its newline gets one), so appending continues cleanly. Any other
    bad line (not UTF-8, not JSON, not a raw record, longer than data.MAX_LINE_BYTES) is an error
    naming it, and nothing is changed."""
    if not os.path.exists(path):
        return []
    records, good, n, last = [], 0, 0, b""  # good: bytes up to the end of the last complete record
    with open(path, "rb") as f:
        while line := f.readline(data.MAX_LINE_BYTES + 1):
            n += 1
            if len(line) > data.MAX_LINE_BYTES and not line.endswith(b"\n"):
                raise RateError(f"{path}:{n}: a line longer than {data.MAX_LINE_BYTES:,} bytes, far more than "
                                "any raw record; nothing was changed")
            try:
                if line.strip():
                    records.append(_raw_record(line))
            except ValueError as e:
                if line.endswith(b"\n"):
                    raise RateError(f"{path}:{n}: {e}; fix or delete the line (nothing was changed)") from None
                break  # the unterminated last line: cut off by a crash
            good += len(line)
            last = line
    size = os.path.getsize(path)
    if repair and good < size:
        with open(path, "r+b") as f:
            f.truncate(good)
    elif repair and good and not last.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


def _raw_record(line):
    """The record of one raw line, or ValueError: rate() reads the keys of its ratings."""
    try:
        rec = data.parse_json(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("id"), bool) or not isinstance(rec.get("id"), (str, int)):
        raise ValueError("field 'id': must be a string or an integer")
    ratings = rec.get("ratings", [])
    if not isinstance(ratings, list) or not all(
            isinstance(x, dict) and all(isinstance(x.get(k), str) for k in ("axis", "rater", "prompt"))
            and _int_in(x.get("sample", 0), 0, 10**6) for x in ratings):
        raise ValueError("field 'ratings': must be a list of ratings, each with a string axis, rater and prompt")
    return rec


def append_lines(path, records):
    """Append records as JSON lines in one write, flushed to disk: a crash loses at most this batch."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- the two phases

def cue_ids(tok, text):
    """Ids of text at the start of the assistant's reply, as data.py writes its cues: right after
    'assistant\\n' in ChatML and after Llama-3's assistant header, after a space following '[/INST]'."""
    return tok.continuation(text) if (tok.template or "inst") in ("chatml", "llama3") else tok.spaced(text)


def score_tokens(tok, scale):
    """(prefix, ids): the numbers 1..scale after "Score:" encode as a shared prefix (SmolLM2: 'Ġ';
    SentencePiece: '▁'; none where ' 4' is one token) and then one distinguishing token each, the
    same split data.py uses for ratings 1-5."""
    enc = [tok.spaced(str(k)) for k in range(1, scale + 1)]
    p = 0
    while all(len(e) > p + 1 for e in enc) and len({e[p] for e in enc}) == 1:
        p += 1
    ids = [e[p] if len(e) == p + 1 else None for e in enc]
    if None in ids or len(set(ids)) != scale:
        raise RateError(f"{tok.path}: the scores 1-{scale} do not encode as a shared prefix plus one "
                        f"distinct token each: {[[tok.piece(i) for i in e] for e in enc]}")
    return enc[0][:p], ids


@torch.no_grad()
def score_logits(model, seqs, digit_ids):
    """Logits of each sequence's digit tokens at its last position: a list of (scale,) fp32 tensors.
    One forward pass, right-padded (attention is causal, so padding never reaches a real position);
    the LM head runs at the last positions only."""
    device = next(model.parameters()).device
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)         # (B, T)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    last = torch.tensor([len(s) - 1 for s in seqs])                                 # (B,)
    logits = model(tokens.to(device), logits_at=last.to(device)).float().cpu()      # (B, V)
    return [logits[i, ids] for i, ids in enumerate(digit_ids)]


def choose_score(logits, temperature=0.0, seed=0):
    """(score, probability): the argmax of the digit logits (temperature 0), or a draw from their
    softmax at `temperature` with a generator seeded for this one rating; the probability is the
    chosen digit's among the digits at temperature 1."""
    logits = logits.double()
    if temperature == 0:
        k = int(logits.argmax())
    else:
        generator = torch.Generator().manual_seed(seed)
        k = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
    return k + 1, float(torch.softmax(logits, -1)[k])


def complete(model, tok, prompts, max_new_tokens, temperature=0.0, seed=None, lead=0):
    """Generated text for each prompt (token ids), all in one batch with one KV cache; with lead,
    the text begins with the decoded last `lead` prompt tokens (the prefilled start of the answer)."""
    out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                   eos_id=tok.eos_id, seed=seed)
    return [tok.decode([i for i in p[len(p) - lead:] + ids if i < tok.vocab_size])  # ids past the tokenizer: dropped
            for p, ids in zip(prompts, out)]


def answer_all(model, tok, prompts, parse, *, max_new_tokens, temperature, retries, seed, lead=0, first=None):
    """Generate for every prompt, retrying the ones whose answer does not parse (sampling, seeded).
    prompts: per item token ids, or None for one too long to ask. parse(text) -> result or ValueError.
    first: {item: text} of a first attempt already generated (rate_batch's, in the scoring pass).
    Returns per item ("ok", parse's result) or ("error", what was wrong with the last answer)."""
    results = [("error", "prompt too long even without context turns") if p is None else None for p in prompts]
    todo = [i for i, p in enumerate(prompts) if p is not None]
    for attempt in range(retries + 1):
        if not todo:
            break
        temp = temperature if attempt == 0 else max(temperature, RETRY_TEMPERATURE)
        if attempt == 0 and first is not None:
            texts = [first[i] for i in todo]
        else:
            texts = complete(model, tok, [prompts[i] for i in todo], max_new_tokens, temp,
                             seed=None if temp == 0 else seed + attempt, lead=lead)
        failed = []
        for i, text in zip(todo, texts):
            try:
                results[i] = ("ok", parse(text))
            except ValueError as e:
                results[i] = ("error", f"{e} (attempt {attempt + 1} of {retries + 1})")
                failed.append(i)
        todo = failed
    return results


def rate_batch(model, tok, prompts, scales, seeds, *, start, max_new_tokens, temperature, retries, seed):
    """Both phases for a batch, reading each prompt once: prompts (chat ids, or None when too long),
    the scale and the score seed of each. One pass with a KV cache reads the digit logits after
    "Score:", the chosen score and "\nExplanation: The response" are fed into the same cache, and the
    explanation is generated from there (model.generate's insert). Retries start again from the
    whole text. Returns per item ("ok", (score, score_prob, explanation)) or ("error", message)."""
    splits = {s: score_tokens(tok, s) for s in set(scales)}  # scale -> (prefix, digit ids)
    seqs = [None if p is None else p + cue_ids(tok, SCORE_CUE) + splits[s][0] for p, s in zip(prompts, scales)]
    asked = [i for i, q in enumerate(seqs) if q is not None]
    start_ids = tok.spaced(start) if start else []
    tail = tok.continuation(EXPLANATION_CUE) + start_ids   # after the score's digit: the same for every item
    picked = {}                                            # item -> (score, score_prob)

    def insert(logits):                                    # (B, V) after "Score:" -> (B, 1 + len(tail))
        rows = []
        for j, i in enumerate(asked):
            digits = splits[scales[i]][1]
            picked[i] = choose_score(logits[j, digits].float().cpu(), temperature, seeds[i])
            rows.append([digits[picked[i][0] - 1]] + tail)
        return torch.tensor(rows)

    first = {}
    if asked:
        out = generate(model, [seqs[i] for i in asked], max_new_tokens=max_new_tokens, temperature=temperature,
                       eos_id=tok.eos_id, seed=None if temperature == 0 else seed, insert=insert,
                       insert_len=1 + len(tail))
        first = {i: tok.decode([t for t in start_ids + ids if t < tok.vocab_size]) for i, ids in zip(asked, out)}
    follow = [None if q is None else q + [splits[scales[i]][1][picked[i][0] - 1]] + tail  # for the retries
              for i, q in enumerate(seqs)]
    results = answer_all(model, tok, follow, partial(parse_explanation, start=start),
                         max_new_tokens=max_new_tokens, temperature=temperature, retries=retries,
                         seed=seed, lead=len(start_ids), first=first)
    return [(status, picked[i] + (value,)) if status == "ok" else (status, value)
            for i, (status, value) in enumerate(results)]


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


# ----------------------------------------------------------------------------- check: does the score see the response?

def corrupt(records, axis, seed=0):
    """Each record with its response made worse on `axis` by construction: on_topic, the response of
    the record half the list away (another conversation's); naturalness, its words shuffled (seeded);
    comprehensiveness and any other axis, only its first two words. check() leaves out the pairs
    where this changed nothing (a one-word response)."""
    n, rng = len(records), random.Random(seed)
    def shuffled(text):
        words = text.split()
        rng.shuffle(words)
        return " ".join(words if words != text.split() else words[::-1])  # a shuffle that moved nothing
    if axis == "on_topic":
        return [dict(r, response=records[(i + n // 2) % n]["response"]) for i, r in enumerate(records)]
    if axis == "naturalness":
        return [dict(r, response=shuffled(r["response"])) for r in records]
    return [dict(r, response=" ".join(r["response"].split()[:2])) for r in records]


def expected_scores(model, tok, records, axis, description, strategy, max_tokens, batch_size):
    """The score's mean under the rater's digit distribution (temperature 1) for each record, or
    None where the prompt does not fit."""
    prefix, digits = score_tokens(tok, strategy["scale"])
    seqs = [fit_prompt(tok, r, axis, description, strategy, max_tokens) for r in records]
    seqs = [None if q is None else q + cue_ids(tok, SCORE_CUE) + prefix for q in seqs]
    asked = [i for i, q in enumerate(seqs) if q is not None]
    out = [None] * len(records)
    for b in range(0, len(asked), batch_size):
        idx = asked[b:b + batch_size]
        for i, x in zip(idx, score_logits(model, [seqs[i] for i in idx], [digits] * len(idx))):
            out[i] = float(torch.softmax(x.double(), -1) @ torch.arange(1, strategy["scale"] + 1).double())
    return out


def auc(better, worse):
    """P(a score of `better` > one of `worse`), ties half: 0.5 is a rater blind to the difference."""
    pairs = [(a > b) + 0.5 * (a == b) for a in better for b in worse]
    return sum(pairs) / len(pairs) if pairs else None


def check(cfg):
    """For each rater, axis and strategy: how well the expected score tells each response from its
    corrupted copy (AUC over all real x corrupted pairs, with a rough 95% interval half-width)."""
    axes = chosen_axes(cfg.axes, cfg.axes_file)
    strategies = load_strategies(cfg.prompts.split(","), cfg.prompts_file)
    if not os.path.isfile(cfg.input):
        raise RateError(f"{cfg.input}: no such file")
    if cfg.n < 2:
        raise RateError(f"--n {cfg.n}: the check needs at least two conversations")
    data.refuse_overwrite(cfg.out, {"--input": cfg.input, "--raters": cfg.raters, "--prompts-file": cfg.prompts_file,
                                    "--axes-file": cfg.axes_file})
    records = data.load_records(cfg.input, kind="conversation", axes=axes)[:cfg.n]
    if len(records) < 2:
        raise RateError(f"{cfg.input}: the check needs at least two conversations")
    rows = []
    for path in cfg.raters:
        check_rater(path)
        tok = data.Tokenizer(path)
        model = load_model(path, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
        for axis in axes:
            worse = corrupt(records, axis, cfg.seed)
            for name, s in strategies.items():
                score = partial(expected_scores, model, tok, axis=axis, description=axes[axis], strategy=s,
                                max_tokens=cfg.max_prompt_tokens, batch_size=cfg.batch_size)
                pairs = [(a, b) for a, b, r, w in zip(score(records=records), score(records=worse), records, worse)
                         if a is not None and b is not None and r["response"] != w["response"]]
                a, b = [p[0] for p in pairs], [p[1] for p in pairs]
                value, n = auc(a, b), len(pairs)
                # Hanley & McNeil's standard error at AUC 0.5, as a yardstick for "no signal"
                half = 1.96 * ((n + n + 1) / (12 * n * n)) ** 0.5 if n else None
                rows.append({"rater": rater_name(path), "axis": axis, "prompt": name, "n": n, "auc": value,
                             "half_width_at_chance": half, "mean_real": sum(a) / n if n else None,
                             "mean_corrupted": sum(b) / n if n else None})
                print(f"  {rows[-1]['rater']} {axis:18} {name:16} " + (
                      f"AUC {value:.2f} (chance 0.50 +- {half:.2f}), expected score {rows[-1]['mean_real']:.2f} "
                      f"real vs {rows[-1]['mean_corrupted']:.2f} corrupted" if n else
                      "no pair: no prompt fits, or the worsened copy equals the response (one word)"),
                      file=sys.stderr, flush=True)
        del model
    cli.write_atomic(cfg.out, json.dumps({"n": len(records), "corruption": " ".join(corrupt.__doc__.split()),
                                          "rows": rows}, indent=2))
    print(f"wrote {cfg.out}", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- rate

def rate(cfg):
    axes = chosen_axes(cfg.axes, cfg.axes_file)
    strategies = load_strategies(cfg.prompts.split(","), cfg.prompts_file)
    for name, s in strategies.items():
        for axis in axes:
            if s.get("examples") and not strategy_examples(s, axis):
                raise RateError(f"strategy {name!r} has no rated examples for axis {axis!r}; add some in --prompts-file")
    for path in cfg.raters:
        check_rater(path)
    names = [rater_name(p) for p in cfg.raters]  # the rater's name in the output
    if len(set(names)) < len(names):
        raise RateError(f"two raters share the folder name {max(names, key=names.count)!r}; rename one")
    if cfg.samples > 1 and cfg.temperature == 0:
        raise RateError("--samples above 1 needs --temperature above 0 (greedy samples would be identical)")
    if not os.path.isfile(cfg.input):
        raise RateError(f"{cfg.input}: no such file")
    if data.same_file(cfg.out, cfg.input):
        raise RateError(f"--out {cfg.out} is the --input file: ratings would be appended to the conversations")
    data.refuse_overwrite(cfg.out, {"--raters": cfg.raters, "--prompts-file": cfg.prompts_file,
                                    "--axes-file": cfg.axes_file})
    conversations = [{k: c[k] for k in ("id", "dataset", "context", "response")}
                     for c in data.load_records(cfg.input, kind="conversation", axes=axes)]
    counts = Counter()  # (rater, prompt, "ok" | "failed") -> ratings written by this run
    with out_lock(cfg.out):  # one writer at a time: from reading what is done to the last append
        done = {(str(r["id"]).strip(), x["axis"], x["rater"], x["prompt"], x.get("sample", 0))
                for r in read_jsonl(cfg.out, repair=True) for x in r.get("ratings", [])}
        for path, name in zip(cfg.raters, names):
            jobs = [(c, axis, p, k) for c in conversations for axis in axes for p in strategies
                    for k in range(cfg.samples) if (c["id"], axis, name, p, k) not in done]
            n_all = len(conversations) * len(axes) * len(strategies) * cfg.samples
            print(f"rater {name}: {len(jobs)} ratings to make, {n_all - len(jobs)} already in {cfg.out}", file=sys.stderr)
            if jobs:
                rate_with(path, name, jobs, axes, strategies, cfg, counts)
    for name in names:
        for p in strategies:
            print(f"  {name} {p}: {counts[name, p, 'ok']} rated, {counts[name, p, 'failed']} failed", file=sys.stderr)
    n_failed = sum(n for (_, _, status), n in counts.items() if status == "failed")
    print(f"wrote {sum(counts.values())} ratings ({n_failed} failed) to {cfg.out}", file=sys.stderr)
    return counts


def out_lock(out):
    """The lock that keeps a second rate.py from appending to the same raw file (a symlink to it
    included) while this one runs: a second one is refused with the holder's pid."""
    return cli.Lock(os.path.realpath(out) + ".lock", what=out)


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


def rate_with(path, name, jobs, axes, strategies, cfg, counts):
    """Load one rater, answer its jobs (conversation, axis, strategy, sample) batch by batch, append."""
    tok = data.Tokenizer(path)
    for s in strategies.values():
        score_tokens(tok, s["scale"])  # a scale this tokenizer cannot score fails before the model loads
    model = load_model(path, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
    jobs = sorted(jobs, key=lambda j: (j[2], len(str(j[0]["context"])) + len(j[0]["response"])))  # less padding
    print(f"rater {name}: {model.n_params() / 1e6:.1f}M parameters on {cfg.device} "
          f"({next(model.parameters()).dtype}{', nf4' if cfg.quantize else ''}), {len(jobs)} prompts "
          f"in batches of {cfg.batch_size}: the score from the digit logits after {SCORE_CUE!r}, then up to "
          f"{cfg.max_new_tokens} tokens of explanation after {(EXPLANATION_CUE.strip() + ' ' + cfg.explanation_start).strip()!r}",
          file=sys.stderr)
    progress = Progress(f"rater {name}", len(jobs))
    for b in range(0, len(jobs), cfg.batch_size):
        batch = jobs[b:b + cfg.batch_size]
        prompts = [fit_prompt(tok, c, axis, axes[axis], strategies[p], cfg.max_prompt_tokens) for c, axis, p, _ in batch]
        c, axis, p, k = batch[0]
        results = rate_batch(model, tok, prompts, [strategies[p]["scale"] for _, _, p, _ in batch],
                             [batch_seed(cfg.seed, "score", name, c["id"], axis, p, k) for c, axis, p, k in batch],
                             start=cfg.explanation_start, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, retries=cfg.retries,
                             seed=batch_seed(cfg.seed, name, c["id"], axis, p, k))
        lines = {}
        for (c, axis, p, k), (status, value) in zip(batch, results):
            rating = {"rater": name, "prompt": p, "axis": axis, "scale": strategies[p]["scale"]}
            rating.update({"score": value[0], "score_prob": round(value[1], 4), "explanation": value[2]}
                          if status == "ok" else {"score": None, "error": value})
            if cfg.samples > 1:
                rating["sample"] = k
            lines.setdefault(c["id"], dict(c, ratings=[]))["ratings"].append(rating)  # one line per item
            counts[name, p, "ok" if status == "ok" else "failed"] += 1
        append_lines(cfg.out, list(lines.values()))
        progress.update(len(batch), sum(s != "ok" for s, _ in results))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next rater needs the memory


def known_axes(path=None):
    """data.AXES plus the axes described in `path` (JSON {axis: description} or 'axis: description' lines)."""
    try:
        return data.load_axes(path or None)
    except OSError as e:  # (a bad file is a DataError naming it)
        raise RateError(f"{path}: cannot read axis descriptions ({e})") from None


def chosen_axes(names, path=None):
    known = known_axes(path)
    for a in names.split(","):
        if a.strip() not in known:
            raise RateError(f"unknown axis {a.strip()!r}: describe it in --axes-file (known: {', '.join(known)})")
    return {a.strip(): known[a.strip()] for a in names.split(",")}


# ----------------------------------------------------------------------------- summarize

def summarize(cfg):
    out = cfg.out or cfg.input
    if not os.path.isfile(cfg.input):
        raise RateError(f"{cfg.input}: no such file")
    check_rater(cfg.model)
    data.refuse_overwrite(out, {"--model": cfg.model, "--axes-file": cfg.axes_file})
    with out_lock(out):  # one writer at a time: from the copy and the repair to the last append
        return _summarize(cfg, out)


def _summarize(cfg, out):
    """summarize's work, under the lock of `out`."""
    if not data.same_file(out, cfg.input) and not os.path.exists(out):
        shutil.copyfile(cfg.input, out)  # a different --out starts as a copy, then gains summaries
    read_jsonl(out, repair=True)  # drop a line cut off by a crash, then read it as data.py does
    axes = known_axes(cfg.axes_file)
    items = {it["id"]: it for it in data.merge_raw(data.load_records(out, kind="raw", axes=axes))}
    records, _ = data.aggregate(list(items.values()), method="mean")  # the consensus each summary must agree with
    jobs = [(r["id"], r["axis"], r["label"]) for r in records if r["axis"] not in items[r["id"]]["summaries"]]
    print(f"summarize: {len(jobs)} (item, axis) pairs to summarise, {len(records) - len(jobs)} already done",
          file=sys.stderr)
    counts = {"ok": 0, "failed": 0}
    if not jobs:
        return counts
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
    tok = data.Tokenizer(cfg.model)
    start_ids = tok.spaced(cfg.explanation_start) if cfg.explanation_start else []  # prefilled after "Explanation:"
    progress = Progress("summarize", len(jobs))
    for b in range(0, len(jobs), cfg.batch_size):
        batch = jobs[b:b + cfg.batch_size]
        prompts = []
        for i, axis, label in batch:
            ok = [x for x in items[i]["ratings"] if x["axis"] == axis and x.get("score") is not None]
            ids = fit(tok, partial(summary_prompt, items[i], axis, axes[axis], label, ok),
                      len(items[i]["context"]), cfg.max_prompt_tokens)
            prompts.append(None if ids is None else ids + cue_ids(tok, EXPLANATION_CUE.strip()) + start_ids)
        results = answer_all(model, tok, prompts, partial(parse_explanation, start=cfg.explanation_start),
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             retries=cfg.retries, seed=batch_seed(cfg.seed, *batch[0][:2]), lead=len(start_ids))
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

@dataclass
class Raters:
    """Who rates what: the inputs of `rate` and `check`."""
    raters: list                        # rater checkpoints: folders with their tokenizer, or .gguf files
    input: str                          # conversations (JSONL: id, dataset, context, response)
    out: str                            # the raw ratings file (JSONL), appended to and resumed
    axes: str = ",".join(data.AXES)     # comma-separated axes to rate
    prompts: str = ",".join(STRATEGIES)  # comma-separated prompting strategies
    prompts_file: str = ""              # JSON file of extra prompting strategies


@dataclass
class Generation:
    """How each model is loaded and asked: every command's."""
    axes_file: str = ""                 # JSON {axis: description} for axes beyond the built-in three
    batch_size: int = BATCH_SIZE        # prompts answered together
    max_new_tokens: int = MAX_NEW_TOKENS  # explanation tokens generated
    max_prompt_tokens: int = MAX_PROMPT_TOKENS  # longer prompts lose their oldest context turns
    explanation_start: str = EXPLANATION_START  # the explanation's prefilled first words ('' for none)
    retries: int = RETRIES              # extra attempts for an explanation that does not parse
    temperature: float = 0.0            # 0: greedy (the most likely score); above 0: scores and
    #                                     explanations are sampled
    seed: int = 0                       # seeds the samples and the retries
    quantize: Literal["nf4", "nf4-dq"] | None = None  # load the model's linear layers in 4 bits
    device: str = "auto"                # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    dtype: Literal[tuple(sorted(DTYPES))] | None = None  # default: float32 on cpu, else bfloat16

    def __post_init__(self):
        for name, (lo, hi) in LIMITS.items():
            value = getattr(self, name, None)
            if value is not None and not lo <= value <= hi:
                raise RateError(f"--{name.replace('_', '-')} must be from {lo} to {hi}, got {value}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # (nan fails too)
            raise RateError(f"--temperature must be a number from 0 to {MAX_TEMPERATURE}, got {self.temperature}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class RateConfig(Generation, Raters):
    samples: int = 1                    # answers per rater and strategy (needs --temperature above 0)


@dataclass
class CheckConfig(Generation, Raters):
    out: str                            # the JSON report
    n: int = 40                         # conversations checked (the first n of --input)


@dataclass
class Summaries:
    """What `summarize` reads and writes."""
    model: str                          # instruction checkpoint: a folder with its tokenizer, or a .gguf file
    input: str                          # raw ratings file (JSONL)
    out: str = ""                       # where summaries are appended (default: --input)


@dataclass
class SummarizeConfig(Generation, Summaries):
    max_new_tokens: int = SUMMARY_TOKENS  # summary tokens generated


COMMANDS = {"rate": cli.Command(RateConfig, rate, "rate each conversation with each rater"),
            "summarize": cli.Command(SummarizeConfig, summarize, "merge each item's explanations into one per axis"),
            "check": cli.Command(CheckConfig, check, "does each rater's score tell a response from a worsened copy? (AUC)")}


def main(argv=None):
    return cli.main("rate.py", __doc__, COMMANDS, argv, default="rate")


if __name__ == "__main__":
    sys.exit(main())
