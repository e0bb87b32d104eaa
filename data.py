r"""data.py: everything between rating data and the token ids a model trains on.

In the order the data flows:
  (Tokenizer            in tokenizer.py: SentencePiece and byte-level BPE, from files or GGUF, chat formats)
  (import_conversations in importers.py: the public datasets' files -> conversations, rate.py's input)
  aggregate             the paper's ensemble step: 12 ratings per item and axis -> one label and explanation
  load_records          training records (JSONL or CSV), validated; bad input is one line naming
                        file, line and field: "train.jsonl:7: field 'label': must be an integer 1-5, got 7"
  build_examples        prompt + target for one of the six variants, tokenised, with the loss mask and
                        the decision position; collate() pads a batch and does the one input/target shift
  text_examples         plain text cut into language-model examples (pretraining the demo's base model)
  split_of, batch_indices   hash splits, length-bucketed resumable batches
  train_tokenizer       a SentencePiece model trained on a text file (the demo's, tests')
  (write_demo           in demo.py: a synthetic corpus so the whole project runs with no outside data)

Aggregation stays here rather than in rate.py: it is pure bookkeeping over records (rescale,
average, agree, report), needs no model, and `data.py aggregate` runs on any raw file, the demo's
simulated raters' included; rate.py is the part that runs models.

Prompt and target. The prompt is the same for every variant. The base template:
  <s>Rate the response's naturalness (fluent, idiomatic and human-sounding) from 1 to 5.\n\n
  User: Hi there!\nAssistant: Hello, how are you?\nResponse: Fine, thanks.\n\nRating:
The inst template wraps the same text in <s>[INST] ... [/INST] and puts the cue after it; chatml
(SmolLM2, Qwen) in <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n; llama3 (Llama-3.x) in
<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n ... <|eot_id|> and the assistant's
header; auto, the default, takes the one the checkpoint's tokenizer declares, else base.
Targets follow the cue (pieces for Mistral v1; the decision position is the '▁' before the digit;
the byte-level BPEs of SmolLM2, Llama-3 and Qwen2 never join a space to a digit, so there it is the
'Ġ' before the digit):
  label          " 4</s>"                                        = ['▁', '4', '</s>']
  rating_first   " 4\nExplanation: Fluent and idiomatic.</s>"    (default: the rating is scored in one pass)
  explain_first  the cue is "Explanation:", the target " Fluent and idiomatic.\nRating: 4</s>"
('label' has no explanation, so it always uses the rating-first prompt.)
The pseudo-explanation variants replace the explanation's tokens with the same number of tokens
(within 2): its own words shuffled, words drawn from all explanations' unigram distribution, uniformly
random vocabulary pieces, or one filler piece repeated.

Hostile input costs little and fails in one line. A JSONL line over MAX_LINE_BYTES (16 MiB) is
refused while it is read, never built whole; a text field over MAX_FIELD_CHARS (a fixed 1,000,000
characters, far beyond any context), nesting past MAX_DEPTH, a 5000-digit number or a lone surrogate
is a bad record like any other (skipped with skip_bad); build_examples drops, untokenised, a record
whose response and explanation exceed CHARS_PER_TOKEN x max_len characters. The raw lines of one id
must hold one conversation. No command writes over one of its inputs (refuse_overwrite).

Left out on purpose: downloading anything (point the importers at files you have), the raters
themselves (rate.py), and model code.

Commands:
  python data.py validate FILE [--kind labelled|raw|conversation] [--need-explanation] [--axes FILE]
  python data.py aggregate RAW.jsonl -o TRAIN.jsonl [--method mean|median|majority|best] [--golden FILE]
  python data.py preview TRAIN.jsonl --variant explanation --n 3 [--tokenizer PATH]
  (python importers.py FORMAT FILE... -o CONVERSATIONS.jsonl   the public datasets' files -> conversations)
  (python demo.py --corpus-only --out demo/   writes the demo corpus alone)

Length: ~1005 lines, more than the ~600 the other modules keep to, because the design gives this
one file the whole data path: records and their checks (with the bounded readers every command's
input goes through), aggregation (rate.py must not aggregate), the six variants, prompts, examples
and batches, and the `data.py` commands over them. What was
here and is not the data path (the tokenizer, the importers, the demo corpus) has its own file.
"""
import cli  # first, so that Ctrl-C while the command starts is one line too (cli.py)
import csv
import functools
import gzip
import hashlib
import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Literal

import sentencepiece as spm

from tokenizer import Tokenizer, TokenizerError  # noqa: F401  (data.Tokenizer, data.TokenizerError: what the modules use)

IGNORE_INDEX = -100  # label of every position that carries no loss: prompt and padding
AXES = {  # built-in axes and the description each prompt states; users add others with --axes
    "naturalness": "fluent, idiomatic and human-sounding",
    "comprehensiveness": "complete and informative",
    "on_topic": "sticks to the topic of the conversation",
}
VARIANTS = ("label", "explanation", "shuffled", "bow", "random", "filler")
ORDERS = ("rating_first", "explain_first")
CONVERSATION = ("dataset", "context", "response")  # what the lines of one raw item must agree on
TEMPLATES = ("auto", "base", "inst", "chatml", "llama3")  # auto: the checkpoint's own chat format, else base
METHODS = ("mean", "median", "majority")
FILLER = "."  # the filler variant repeats the last piece of encode(FILLER) ('▁.' for Mistral)
# Bounds on what is read, each far beyond any real record, so that hostile input costs little:
MAX_FIELD_CHARS = 1_000_000  # characters in one text field (context: all its turns together)
MAX_ID_CHARS = 1_000         # characters in an id (error messages quote it)
MAX_LINE_BYTES = 16 * 2**20  # bytes in one JSONL or CSV line; a longer line is refused unread past this
MAX_DEPTH = 16               # nesting of lists and objects in a record (a raw record needs 3)
MAX_SIDE_BYTES = 2**20       # bytes in a side file (--axes, rate.py's --prompts-file)
CHARS_PER_TOKEN = 64         # no tokenizer's pieces average more: build_examples' bound before tokenising
SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate: JSON may escape one, but no text holds it


class DataError(cli.Error, ValueError):
    """Bad data or arguments; the message is one line naming the file, line and field."""


def stable_hash(*parts):
    """A stable 64-bit hash of the parts (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


# ----------------------------------------------------------------------------------------- tokenizer

def _rating_split(tok):
    """(p, ids): the five ratings encode as a shared prefix of p tokens and then one distinguishing
    token each (Mistral: '4' -> ['▁', '4'], so p = 1 and ids are the five digit pieces)."""
    enc = [tok.spaced(str(r)) for r in range(1, 6)]
    p = 0
    while all(len(e) > p for e in enc) and len({e[p] for e in enc}) == 1:
        p += 1
    ids = [e[p] if len(e) == p + 1 else None for e in enc]
    if None in ids or len(set(ids)) != 5:
        raise DataError(f"{tok.path}: ratings 1-5 do not encode as a shared prefix plus one distinct "
                        f"token each: {[[tok.piece(i) for i in e] for e in enc]}")
    return p, ids


def rating_token_ids(tok):
    """The five token ids, for ratings 1..5, whose logits at the decision position score a rating."""
    return _rating_split(tok)[1]


def train_tokenizer(corpus_path, out_prefix, vocab_size=2000, symbols=()):
    """Train a Llama-style SentencePiece BPE model on a text file (seconds); returns the .model path.
    `symbols` are kept whole, one piece each (the smoke rater's 'Score:')."""
    spm.SentencePieceTrainer.train(user_defined_symbols=list(symbols),
        input=corpus_path, model_prefix=out_prefix, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, required_chars="0123456789",
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=os.cpu_count() or 1, minloglevel=2)
    return out_prefix + ".model"


# ------------------------------------------------------------------------------ records and checks

def load_axes(axes=None):
    """Built-in AXES plus user ones: a dict, or a JSON file {name: description}, or a text file of
    'name: description' lines (UTF-8, at most MAX_SIDE_BYTES)."""
    out, path = dict(AXES), axes
    if isinstance(axes, str):
        text = read_text(axes, "file of axis descriptions")
        try:
            axes = parse_json(text)
        except DataError:
            axes = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if not isinstance(axes, dict) or not all(isinstance(v, str) for v in axes.values()):
            raise DataError(f"{path}: expected {{axis: description}} or 'axis: description' lines")
        axes = {k.strip(): v.strip() for k, v in axes.items()}
        if not axes or "" in axes:
            raise DataError(f"{path}: expected {{axis: description}} or 'axis: description' lines, "
                            + ("found an axis with no name" if axes else "found none"))
    out.update(axes or {})
    return out


def read_text(path, what="side file", limit=MAX_SIDE_BYTES):
    """The UTF-8 text of a small side file (axes, prompting strategies); one DataError naming the
    file (and line) when it is larger than `limit` bytes or not UTF-8."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise DataError(f"{path}: more than {limit:,} bytes, too large for a {what}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None


def parse_json(text):
    """json.loads with each way it can fail a DataError: bad syntax, nesting deeper than MAX_DEPTH
    (or than Python's recursion limit), an integer past Python's 4,300-digit limit."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise DataError(f"JSON nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # int('1' * 5000): Python's limit on integer digits
        raise DataError(f"a JSON number too long to read ({str(e).split(':')[0]})") from None
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []  # the depth, walked without recursion
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise DataError(f"JSON nested more than {MAX_DEPTH} levels deep")
        for x in v.values() if isinstance(v, dict) else v:
            if isinstance(x, (list, dict)):
                stack.append((x, depth + 1))
    return value


def read_lines(path, encoding="utf-8"):
    """(line number, text or DataError) for each line of a file (gzip-compressed when its name ends
    in .gz), a first byte-order mark dropped. A line longer than MAX_LINE_BYTES is a DataError, read
    no further than that (its rest is skipped in chunks, never built whole); so is one that is not
    valid `encoding`."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        def readline(size):
            try:
                return f.readline(size)
            except (EOFError, zlib.error) as e:  # a .gz file cut short or damaged
                raise DataError(f"{path}:{n}: damaged compressed file ({e})") from None
        for n in itertools.count(1):
            line = readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = readline(2**20)
                yield n, DataError(f"line longer than {MAX_LINE_BYTES:,} bytes, the most a record may take")
                continue
            try:
                yield n, line.decode(encoding)
            except UnicodeDecodeError as e:
                yield n, DataError(f"not UTF-8 text ({e.reason}); save the file as UTF-8")


def _show(v, n=40):
    """A value of a record as an error message shows it: at most n characters, never built whole."""
    if isinstance(v, str):
        return repr(v[:n])[:n]
    if isinstance(v, (list, dict)):
        return f"a {type(v).__name__} of {len(v)}"
    return repr(v)[:n]


def _fail(field, msg):
    raise DataError(f"field '{field}': {msg}")


def _text(rec, field, optional=False):
    v = rec.get(field)
    if v is None and optional:
        return None
    if v is None:
        _fail(field, "missing")
    if not isinstance(v, str) or not v.strip():
        _fail(field, f"must be a non-empty string, got {_show(v)}")
    _sound(field, v)
    return v.strip()


def _sound(field, *texts):
    """Texts a field may hold: MAX_FIELD_CHARS characters in all, and no lone surrogate (JSON can
    escape one, '\\ud800', but it is no text: tokenisers and UTF-8 files refuse it)."""
    if sum(map(len, texts)) > MAX_FIELD_CHARS:
        _fail(field, f"{sum(map(len, texts)):,} characters, more than the {MAX_FIELD_CHARS:,} a record may hold")
    if any(SURROGATE.search(t) for t in texts):
        _fail(field, "holds a lone surrogate (an escape \\ud800-\\udfff that is no character)")


def _int(rec, field, lo, hi, what=None):
    v = rec.get(field)
    if isinstance(v, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", v):  # CSV cells are strings
        v = int(v)
    if v is None:
        _fail(field, "missing")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        _fail(field, f"must be an integer {lo}-{hi}{what or ''}, got {_show(v)}")
    return v


def check_record(rec, kind="labelled", *, need_explanation=False, axes=None):
    """Validate one record and return a normalised copy. Kinds: 'conversation' (id, dataset,
    context, response), 'labelled' (+ axis, label, explanation), 'raw' (+ ratings, summaries),
    'golden' (id, axis, label). Raises DataError("field 'x': ...")."""
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object, got {type(rec).__name__}")
    axes = axes if isinstance(axes, dict) else load_axes(axes)
    out = dict(rec)
    if rec.get("id") is None or rec["id"] == "":
        _fail("id", "missing")
    if isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int)) or len(str(rec["id"]).strip()) > MAX_ID_CHARS:
        _fail("id", f"must be a string (at most {MAX_ID_CHARS} characters) or an integer, got {_show(rec['id'])}")
    out["id"] = str(rec["id"]).strip()
    _sound("id", out["id"])
    if not out["id"]:
        _fail("id", "missing")
    if kind != "golden":
        out["dataset"] = _text(rec, "dataset", optional=True) or "default"
        ctx = rec.get("context", [])
        ctx = [ctx] if isinstance(ctx, str) else ctx
        if not isinstance(ctx, list):
            _fail("context", f"must be a string or a list of strings, got {type(ctx).__name__}")
        for i, turn in enumerate(ctx):
            if not isinstance(turn, str):
                _fail("context", f"turn {i + 1} must be a string, got {type(turn).__name__}")
        _sound("context", *ctx)
        out["context"] = [t.strip() for t in ctx if t.strip()]
        out["response"] = _text(rec, "response")
    if kind in ("labelled", "golden"):
        out["axis"] = _text(rec, "axis")
        if out["axis"] not in axes:
            _fail("axis", f"unknown axis '{out['axis']}' (known: {', '.join(sorted(axes))}; "
                          "describe new ones with --axes)")
        out["label"] = _int(rec, "label", 1, 5)
    if kind == "labelled":
        if rec.get("explanation") in (None, ""):
            if need_explanation:
                _fail("explanation", "missing (the explanation variants need one)")
            out.pop("explanation", None)
        else:
            out["explanation"] = _text(rec, "explanation")
    if kind == "raw":
        if not isinstance(rec.get("ratings"), list):
            _fail("ratings", "must be a list of ratings")
        out["ratings"] = [_check_rating(r, i, axes) for i, r in enumerate(rec["ratings"])]
        summ = rec.get("summaries") or {}
        if not isinstance(summ, dict) or not all(isinstance(v, str) for v in summ.values()):
            _fail("summaries", "must map axis names to strings")
        _sound("summaries", *summ, *summ.values())
    return out


def _check_rating(r, i, axes):
    f = f"ratings[{i}]"
    if not isinstance(r, dict):
        _fail(f, f"must be an object, got {type(r).__name__}")
    try:
        r = dict(r, rater=_text(r, "rater"), prompt=_text(r, "prompt"), axis=_text(r, "axis"),
                 scale=_int(r, "scale", 4, 5))
        if r["axis"] not in axes:
            _fail("axis", f"unknown axis '{r['axis']}'")
        if r.get("score") is not None:  # null score = a failed rating, counted but not used
            r["score"] = _int(r, "score", 1, r["scale"], f" (scale {r['scale']}) or null")
        if r.get("explanation") is not None and not isinstance(r["explanation"], str):
            _fail("explanation", f"must be a string or null, got {_show(r['explanation'])}")
        _sound("explanation", r.get("explanation") or "")
        if r.get("sample") is not None:  # rate.py --samples: which answer of one rater and strategy
            r["sample"] = _int(r, "sample", 0, 10**6)
    except DataError as e:
        raise DataError(str(e).replace("field '", f"field '{f}.", 1)) from None
    return r


def _rows(path):
    """(line number, record or DataError) for each record of a .jsonl or .csv file. A byte-order
    mark is accepted; a line that is not UTF-8, not JSON, nested too deep or longer than
    MAX_LINE_BYTES is a DataError for that line (read no further than the cap)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".csv"):
        yield from _csv_rows(path)
        return
    for n, line in read_lines(path):
        if isinstance(line, DataError) or line.strip():
            try:
                yield n, parse_json(line) if isinstance(line, str) else line
            except DataError as e:
                yield n, e


def _csv_rows(path):
    """The rows of a CSV file with a header. The reader cannot resume after a malformed row (a field
    over csv's 131,072-character limit, say), so that one stops the file: a DataError naming the line."""
    lines = [0]  # physical lines read so far

    def bounded(f):
        while line := f.readline(MAX_LINE_BYTES + 1):
            lines[0] += 1
            if len(line) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lines[0]}: line longer than {MAX_LINE_BYTES:,} characters, the most a record may take")
            yield line
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader, line = csv.DictReader(bounded(f)), 2
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise DataError(f"{path}:{lines[0]}: not valid CSV ({e}; write longer texts as JSONL); "
                                    "the file was read up to here") from None
                row = {k: v for k, v in row.items() if v not in (None, "")}
                if str(row.get("context", "")).startswith("["):
                    try:
                        row["context"] = parse_json(row["context"])
                    except DataError:
                        pass  # a plain string that starts with '['
                yield line, row
                line = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{_first_bad_line(path)}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None


def _first_bad_line(path):
    """The first line of a file that is not valid UTF-8."""
    return next((n for n, line in read_lines(path) if isinstance(line, DataError) and "UTF-8" in str(line)), "?")


def load_records(path, *, skip_bad=False, need_explanation=False, axes=None, kind="labelled",
                 skipped=None):
    """Read and validate records from a .jsonl or .csv file. The first bad record raises
    DataError('FILE:LINE: ...'), unless skip_bad: then each bad record is skipped and its message
    appended to `skipped` (a list you pass) or, without one, counted in one line on stderr. Duplicate (id, axis) pairs are
    an error; in 'raw' files several lines per id are normal (aggregate() merges them), but they must
    hold the same conversation. Bounds (each a bad record): MAX_LINE_BYTES per line, MAX_FIELD_CHARS
    per text field, MAX_DEPTH of nesting."""
    axes, out, seen, bad = load_axes(axes), [], {}, []
    for line, rec in _rows(path):
        try:
            if isinstance(rec, DataError):
                raise rec
            rec = check_record(rec, kind, need_explanation=need_explanation, axes=axes)
            key = (rec["id"], rec.get("axis") if isinstance(rec.get("axis"), str) else None)
            if kind != "raw" and key in seen:
                _fail("id", f"duplicate id '{rec['id']}'" + (f" for axis '{key[1]}'" if key[1] else "")
                      + f" (first on line {seen[key][0]})")
            if kind == "raw" and key in seen:
                first, conversation = seen[key]
                differs = [k for k in CONVERSATION if rec.get(k) != conversation.get(k)]
                if differs:
                    _fail("id", f"'{rec['id']}' holds another conversation than on line {first} (its {differs[0]} "
                                "differs); one id must name one conversation")
            seen.setdefault(key, (line, rec))
            out.append(rec)
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{path}:{line}: {e}") from None
            bad.append(f"{path}:{line}: {e}")
    if skipped is not None:
        skipped.extend(bad)
    elif bad:
        print(f"{path}: skipped {len(bad)} bad records (first: {bad[0]})", file=sys.stderr)
    if not out:
        raise DataError(f"{path}: no valid records")
    return out


def keep(records, axes="", datasets=""):
    """The records on the comma-separated axes and datasets (empty: all)."""
    keep_axes, keep_sets = set(filter(None, axes.split(","))), set(filter(None, datasets.split(",")))
    return [r for r in records if (not keep_axes or r["axis"] in keep_axes) and (not keep_sets or r["dataset"] in keep_sets)]


def check_vocab(tok, vocab_size, model_path):
    """A tokenizer whose ids reach past the model's embedding would index out of range mid-run."""
    if tok.vocab_size > vocab_size:
        raise DataError(f"{tok.path}: the tokenizer has {tok.vocab_size} tokens but the model {model_path} "
                        f"only {vocab_size}: they do not belong together")


def open_text(path, mode="rt"):
    """A UTF-8 text file, gzip-compressed when its name ends in .gz (the importers read releases' .jsonl.gz)."""
    encoding = "utf-8-sig" if "r" in mode else "utf-8"  # a byte-order mark, read, is no part of the text
    if path.endswith(".gz"):
        return gzip.open(path, mode, encoding=encoding)
    return open(path, mode, encoding=encoding)


def write_jsonl(records, path):
    """Records as JSON lines, written atomically (cli.write_atomic)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:  # a lone surrogate in an extra
            for r in records:                                                   # field: written as its JSON escape
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cli.write_atomic(path, write)


def same_file(a, b):
    """Whether two paths name one file: equal after symlinks and '..' are resolved, or (both existing)
    the same inode, as a hard link is."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwrite(out, inputs, option="--out"):
    """A DataError, before anything is written, when the output path `out` is (or resolves to) one
    of the inputs: {option or role: path or list of paths}."""
    for name, paths in inputs.items():
        for path in [paths] if isinstance(paths, str) else paths or []:
            if path and same_file(out, path):
                raise DataError(f"{option} {out} is the {name} {path}: writing it would destroy that input; "
                                "choose another output")


# -------------------------------------------------------------------------------------- aggregation

@functools.lru_cache(maxsize=None)
def rescale(score, scale):
    """A score on a 1-`scale` scale mapped linearly onto 1-5, exactly (a Fraction)."""
    return 1 + Fraction(score - 1) * 4 / (scale - 1)


def _round_half_up(x):
    return math.floor(x + Fraction(1, 2))


def _mean(values):
    """Exact mean of Fractions (summing over a common denominator is much faster than sum())."""
    d = math.lcm(*(v.denominator for v in values))
    return Fraction(sum(v.numerator * (d // v.denominator) for v in values), d * len(values))


def consensus(values, method="mean"):
    """(unrounded consensus, integer label) of rescaled scores. Majority votes on the scores rounded
    half up; a tie goes to the tied score nearest the median, then to the lower one."""
    if method == "mean":
        c = _mean(values)
    elif method == "median":
        c = statistics.median(values)
    elif method == "majority":
        votes, med = Counter(_round_half_up(v) for v in values), statistics.median(values)
        top = max(votes.values())
        c = Fraction(min((k for k, n in votes.items() if n == top), key=lambda k: (abs(k - med), k)))
    else:
        raise DataError(f"unknown aggregation method '{method}' (choose from {', '.join(METHODS)})")
    return c, _round_half_up(c)


def merge_raw(raw_records):
    """Raw lines with the same id merged into one item: ratings concatenated, summaries combined.
    Lines of one id that hold different conversations are a DataError (load_records names the lines)."""
    items = {}
    for r in raw_records:
        it = items.setdefault(str(r["id"]), {**r, "ratings": [], "summaries": {}})
        differs = [k for k in CONVERSATION if it.get(k) != r.get(k)]
        if differs:
            raise DataError(f"id '{r['id']}': two raw records hold different conversations (their {differs[0]} "
                            "differs); one id must name one conversation")
        it["ratings"] += r.get("ratings") or []
        it["summaries"].update(r.get("summaries") or {})
    return list(items.values())


def aggregate(raw_records, method="mean", *, golden=None, max_spread=None):
    """One training record per (item, axis) from raw ensemble records, as the paper did it.
    label = consensus of the valid ratings rescaled to 1-5 (see consensus(); method 'best' picks
    the method with the lowest MAE on `golden`, a {(id, axis): label} dict); explanation = the
    item's summary for the axis, else the explanation of the rating nearest the consensus (ties by
    rater, prompt, text). Items whose rescaled scores have a population std dev above max_spread are
    dropped. Returns (records, report); the report counts ratings per rater and prompt, failures,
    pairwise rater agreement and, with golden, each method's MAE and MSE."""
    items = merge_raw(raw_records)
    groups = []  # (item, axis, valid ratings with their rescaled score)
    report = {"items": len(items), "valid": 0, "failed": 0, "by_rater": defaultdict(Counter),
              "by_prompt": defaultdict(Counter), "dropped": Counter()}
    for it in items:
        per_axis = defaultdict(list)
        for r in it["ratings"]:
            ok = r.get("score") is not None
            report["valid" if ok else "failed"] += 1
            report["by_rater"][r["rater"]]["valid" if ok else "failed"] += 1
            report["by_prompt"][r["prompt"]]["valid" if ok else "failed"] += 1
            per_axis[r["axis"]].append(r)
        for axis in sorted(per_axis):
            valid = [(rescale(r["score"], r["scale"]), r) for r in per_axis[axis] if r.get("score") is not None]
            if not valid:
                report["dropped"]["no valid rating"] += 1
            else:
                groups.append((it, axis, valid))
    if golden:
        report["golden"] = {}
        for m in METHODS:
            errs = [consensus([v for v, _ in valid], m)[1] - golden[(it["id"], ax)]
                    for it, ax, valid in groups if (it["id"], ax) in golden]
            if errs:
                report["golden"][m] = {"n": len(errs), "mae": sum(map(abs, errs)) / len(errs),
                                       "mse": sum(e * e for e in errs) / len(errs)}
    if method == "best":
        if not report.get("golden"):
            raise DataError("--method best needs a golden set that overlaps the raw items")
        method = min(report["golden"], key=lambda m: (report["golden"][m]["mae"], report["golden"][m]["mse"]))
    report["method"] = method
    out, per_rater = [], defaultdict(dict)  # per_rater[(id, axis)][rater] = its mean rescaled score
    for it, axis, valid in groups:
        values = [v for v, _ in valid]
        c, label = consensus(values, method)
        mean = float(_mean(values))
        spread = math.sqrt(sum((float(v) - mean) ** 2 for v in values) / len(values))
        if max_spread is not None and spread > max_spread:
            report["dropped"]["disagreement"] += 1
            continue
        for rater in {r["rater"] for _, r in valid}:
            mine = [float(v) for v, r in valid if r["rater"] == rater]
            per_rater[(it["id"], axis)][rater] = sum(mine) / len(mine)
        rec = {k: it[k] for k in ("id", "dataset", "context", "response") if k in it}
        rec.update(axis=axis, label=label, mean=round(mean, 4),
                   spread=round(spread, 4), n_ratings=len(values))
        summary = (it["summaries"].get(axis) or "").strip()
        said = [(round(abs(float(v - c)), 9), r["rater"], r["prompt"], r["explanation"].strip())
                for v, r in valid if (r.get("explanation") or "").strip()]
        if summary or said:
            rec["explanation"] = summary or min(said)[3]
        out.append(rec)
    report["agreement"] = _agreement(per_rater)
    report["records"] = len(out)
    return out, report


def _agreement(per_rater):
    """Pairwise rater agreement over the (item, axis) pairs both rated: mean |difference| and Pearson r."""
    pairs = defaultdict(list)
    for scores in per_rater.values():
        for a in scores:
            for b in scores:
                if a < b:
                    pairs[f"{a} ~ {b}"].append((scores[a], scores[b]))
    out = {}
    for name, xy in sorted(pairs.items()):
        x, y = zip(*xy)
        r = None
        if len(xy) > 1 and statistics.pstdev(x) > 0 and statistics.pstdev(y) > 0:
            r = round(statistics.correlation(x, y), 3)
        out[name] = {"n": len(xy), "mad": round(sum(abs(a - b) for a, b in xy) / len(xy), 3), "r": r}
    return out


def format_report(rep):
    lines = [f"{rep['items']} items -> {rep['records']} records (method {rep['method']}); "
             f"{rep['valid']} valid ratings, {rep['failed']} failed"]
    for what in ("by_rater", "by_prompt"):
        for k, c in sorted(rep[what].items()):
            lines.append(f"  {what[3:]:6} {k:28} {c['valid']:6} valid {c['failed']:5} failed")
    for k, a in rep["agreement"].items():
        lines.append(f"  agreement {k}: n={a['n']} mean |diff|={a['mad']} r={a['r']}")
    for m, g in rep.get("golden", {}).items():
        lines.append(f"  golden {m:8} n={g['n']} MAE={g['mae']:.3f} MSE={g['mse']:.3f}")
    for why, n in rep["dropped"].items():
        lines.append(f"  dropped {n} (item, axis) pairs: {why}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ prompts and targets

def _cue(order):
    return "Explanation:" if order == "explain_first" else "Rating:"


def turn_lines(context):
    """'User: ...' / 'Assistant: ...' lines of the context turns, labelled backwards from the
    response, so that the turn it answers is always the User's (rate.py's prompts use them too)."""
    return [f"{'User' if (len(context) - i) % 2 else 'Assistant'}: {t}" for i, t in enumerate(context)]


def _prompt_body(record, axes, keep_turns=None):
    axis = record["axis"]
    if axis not in axes:
        raise DataError(f"record '{record['id']}': no description for axis '{axis}' (use --axes)")
    ctx = record["context"] if keep_turns is None else record["context"][len(record["context"]) - keep_turns:]
    return (f"Rate the response's {axis.replace('_', '-')} ({axes[axis]}) from 1 to 5.\n\n"
            + "".join(t + "\n" for t in turn_lines(ctx)) + f"Response: {record['response']}")


def resolve_template(template, tok):
    """'auto' -> the chat format the tokenizer's checkpoint declares ('chatml' for SmolLM2 and Qwen2.5,
    'llama3' for Llama-3.x, 'inst' for Mistral-Instruct), or 'base' when it declares none; any other
    name is kept."""
    if template not in TEMPLATES:
        raise DataError(f"unknown template '{template}' (choose from {', '.join(TEMPLATES)})")
    return (tok.template or "base") if template == "auto" else template


def _prompt_ids(tok, record, axes, keep_turns, template, cue):
    """The prompt's token ids: the axis and the 1-5 scale, the last keep_turns turns of the
    conversation (None: all), the response, in the template's chat format, then the cue where the
    target begins ('Rating:', or 'Explanation:' for explain_first)."""
    body = _prompt_body(record, axes, keep_turns)
    if template == "inst":  # '[INST] body [/INST] Rating:'
        return tok.chat(body, template="inst") + tok.spaced(cue)
    if template == "chatml":  # '<|im_start|>user\nbody<|im_end|>\n<|im_start|>assistant\nRating:'
        return tok.chat(body, template="chatml") + tok.continuation(cue)
    if template == "llama3":  # '...user<|end_header_id|>\n\nbody<|eot_id|>...assistant<|end_header_id|>\n\nRating:'
        return tok.chat(body, template="llama3") + tok.continuation(cue)
    return tok.encode(f"{body}\n\n{cue}", bos=True)  # base: 'body\n\nRating:'


class _Pseudo:
    """Makes the explanation tokens of each variant. Every random choice uses its own generator
    seeded by hash(seed, id, axis), so an example never depends on the other records or their order."""

    def __init__(self, tok, variant, seed, pool):
        self.tok, self.variant, self.seed = tok, variant, seed
        if variant == "bow":  # unigram distribution of all explanations' words
            counts = Counter(w for r in pool if r.get("explanation") for w in r["explanation"].split())
            self.words = sorted(counts)
            self.cum = list(itertools.accumulate(counts[w] for w in self.words))
            self.cost = {w: len(tok.spaced(w)) for w in self.words}
        if variant == "random":
            self.ordinary = tok.ordinary_ids()
        self.filler = tok.spaced(FILLER)[-1]

    def __call__(self, rec, real_ids):
        v, rng, n = self.variant, random.Random(stable_hash(self.seed, rec["id"], rec["axis"])), len(real_ids)
        words = rec["explanation"].split()
        if v == "explanation":
            return real_ids
        if v == "shuffled":  # same words in a new order; both tokenizer kinds encode each
            rng.shuffle(words)  # space-separated word alone, so the token count is unchanged
            return self.tok.spaced(" ".join(words))
        if v == "bow":  # draw words until the token count reaches n, never passing n + 2
            out, total = [], 0
            for _ in range(100 * n):
                if total >= n:
                    break
                w = rng.choices(self.words, cum_weights=self.cum)[0]
                if total + self.cost[w] <= n + 2:
                    out.append(w)
                    total += self.cost[w]
            return self.tok.spaced(" ".join(out))
        if v == "random":
            return [rng.choice(self.ordinary) for _ in range(n)]
        return [self.filler] * n  # filler


@dataclass
class Example:
    id: str
    dataset: str
    axis: str
    label: int
    input_ids: list  # prompt + target token ids (starting with BOS where the tokenizer uses one)
    labels: list  # unshifted: labels[i] == input_ids[i] on target tokens, IGNORE_INDEX on the prompt
    decision_pos: int  # the logits at this position predict the token that tells the ratings apart
    n_prompt: int  # number of prompt tokens (BOS included)
    rating_weight: float = 1.0  # loss weight of the rating token (build_examples(rating_weight=True))


def build_examples(records, tok, variant="label", *, order="rating_first", template="auto",
                   max_len=512, seed=0, axes=None, pool=None, rating_weight=False):
    """Tokenised examples of one variant. Target = rating and (except for 'label') the explanation
    tokens of the variant, then EOS; loss is on the target only. The prompt is identical in every
    variant: when an example would exceed max_len, the oldest turns are dropped as if the target
    were the real explanation plus 2 tokens, so no variant's prompt differs. A record whose prompt is
    too long even without context is dropped (reported on stderr); so is, without being tokenised,
    one whose response and explanation alone hold more than CHARS_PER_TOKEN x max_len characters
    (and context turns past that many characters are never tokenised). `pool` = the records whose
    explanations give the bow word distribution (default: `records`; pass the training records when
    building validation examples).

    rating_weight=True controls for label dilution: with the loss a mean over target tokens, the
    rating token of a 30-token explanation target gets a tenth of the share it has in 'label' (whose
    target is the rating's tokens and EOS). Its weight w is set so that w / (n_target - 1 + w) equals
    the label variant's 1 / n_label: w = (n_target - 1) / (n_label - 1); 1 for 'label' itself."""
    for name, value, allowed in (("variant", variant, VARIANTS), ("order", order, ORDERS),
                                 ("template", template, TEMPLATES)):
        if value not in allowed:
            raise DataError(f"unknown {name} '{value}' (choose from {', '.join(allowed)})")
    axes, template = load_axes(axes), resolve_template(template, tok)
    if variant != "label":
        missing = [r["id"] for r in records if not r.get("explanation")]
        if missing:
            raise DataError(f"variant '{variant}' needs an explanation on every record; "
                            f"{len(missing)} have none (first: '{missing[0]}')")
    order = order if variant != "label" else "rating_first"
    p, _ = _rating_split(tok)
    seps = {"rating_first": tok.continuation("\nExplanation:"), "explain_first": tok.continuation("\nRating:")}
    pseudo = _Pseudo(tok, variant, seed, records if pool is None else pool)
    out, too_long = [], []
    max_chars = CHARS_PER_TOKEN * max_len  # more characters than this cannot fit in max_len tokens
    for rec in records:
        if len(rec["response"]) + len(rec.get("explanation") or "") > max_chars:
            too_long.append(rec["id"])  # never tokenised
            continue
        rating = tok.spaced(str(rec["label"]))  # ' 4' after the cue
        real = tok.spaced(" ".join(rec["explanation"].split())) if rec.get("explanation") else None
        # the longest target any variant can have for this record fixes the prompt's budget
        budget = len(rating) + 1 + (0 if real is None else max(map(len, seps.values())) + len(real) + 2)
        prompt = _fit_prompt(lambda n: _prompt_ids(tok, rec, axes, n, template, _cue(order)),
                             rec["context"], max_len - budget, max_chars)
        if prompt is None:
            too_long.append(rec["id"])
            continue
        if variant == "label":
            target, pos = rating + [tok.eos_id], len(prompt) + p - 1
        elif order == "rating_first":
            target, pos = rating + seps[order] + pseudo(rec, real) + [tok.eos_id], len(prompt) + p - 1
        else:
            head = pseudo(rec, real) + seps[order]
            target, pos = head + rating + [tok.eos_id], len(prompt) + len(head) + p - 1
        n_label = len(rating) + 1  # the label variant's target: the rating's tokens and EOS
        weight = (len(target) - 1) / (n_label - 1) if rating_weight else 1.0
        out.append(Example(rec["id"], rec["dataset"], rec["axis"], rec["label"], prompt + target,
                           [IGNORE_INDEX] * len(prompt) + target, pos, len(prompt), weight))
    if too_long:
        print(f"data.py: dropped {len(too_long)} records longer than max_len={max_len} even without "
              f"context (first: '{too_long[0]}')", file=sys.stderr)
    return out


def _fit_prompt(prompt_ids, context, max_tokens, max_chars):
    """prompt_ids(n) with the most context turns n (the last ones) that keep it within max_tokens,
    or None when even none does. Turns past max_chars characters are never tried, and n is found by
    bisection (a prompt grows with its turns): a few tokenisations even for thousands of turns."""
    n, chars = 0, 0
    for turn in reversed(context):
        chars += len(turn)
        if chars > max_chars:
            break
        n += 1
    prompt = prompt_ids(n)
    if len(prompt) <= max_tokens:
        return prompt
    lo, hi, best = 0, n, None  # hi turns are too many; find the most that fit, below hi
    while lo < hi:
        mid = (lo + hi) // 2
        prompt = prompt_ids(mid)
        if len(prompt) <= max_tokens:
            lo, best = mid + 1, prompt
        else:
            hi = mid
    return best


def text_examples(path, tok, max_len=256):
    """Language-model examples from a plain-text file (pretraining, `train.py --full`): documents are
    separated by blank lines, each encoded as <s> text </s>, all of them concatenated and cut into
    pieces of max_len tokens; every token carries loss."""
    try:
        with open_text(path) as f:
            docs = [d.strip() for d in re.split(r"\n\s*\n", f.read()) if d.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{_first_bad_line(path)}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    if not docs:
        raise DataError(f"{path}: no text")
    ids = [i for d in docs for i in tok.encode(d, bos=True, eos=True)]
    return [Example(f"text-{k}", "text", "", 0, ids[s:s + max_len], ids[s:s + max_len], 0, 0)
            for k, s in enumerate(range(0, len(ids) - 1, max_len))]


def collate(examples, pad_id):
    """Right-padded batch tensors. targets[:, t] is the token the logits at t must predict (labels
    shifted left by one) or IGNORE_INDEX: the one place in the project where the shift happens.
    weights[:, t] is the loss weight of that target: 1, or the example's rating_weight at the
    decision position (whose target is the rating token)."""
    import torch  # only here: the command line starts much faster without it

    B, T = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    weights = torch.ones((B, T))
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        targets[i, :n - 1] = torch.tensor(e.labels[1:])
        attention_mask[i, :n] = 1
        weights[i, e.decision_pos] = e.rating_weight
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attention_mask, "weights": weights,
            "decision_pos": torch.tensor([e.decision_pos for e in examples]),
            "label": torch.tensor([e.label for e in examples])}


def split_of(record_id, val=0.1, test=0.2):
    """'train', 'val' or 'test' from a hash of the id alone: adding, removing or reordering records
    never moves one, and every variant and seed sees the same test items."""
    u = stable_hash("split", record_id) / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def batch_indices(examples, batch_size, seed, epoch):
    """Batches of example indices for one epoch: shuffled, then sorted by length within chunks of
    64 batches (little padding), then the batches shuffled. A pure function of (seed, epoch), so a
    run resumes mid-epoch by skipping the batches it has done."""
    rng = random.Random(stable_hash("batches", seed, epoch))
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches, chunk = [], 64 * batch_size
    for s in range(0, len(order), chunk):
        part = sorted(order[s:s + chunk], key=lambda i: len(examples[i].input_ids))
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------------- command line

KINDS = ("labelled", "raw", "conversation")


@dataclass(kw_only=True)
class AxesOption:
    axes: str | None = None  # JSON or 'name: description' file describing axes beyond the built-in three


@dataclass
class ValidateConfig(AxesOption):
    POSITIONAL: ClassVar = ("file",)
    file: str                                 # a training, conversation or raw file (.jsonl or .csv)
    kind: Literal[KINDS] | None = None        # what the file holds (default: judged from every record)
    need_explanation: bool = False            # every record must have an explanation


@dataclass
class AggregateConfig(AxesOption):
    POSITIONAL: ClassVar = ("raw",)
    raw: str                                  # raw ensemble ratings (rate.py's output)
    out: str                                  # the training records, one per (item, axis)
    method: Literal[METHODS + ("best",)] = "mean"  # mean of the scores rescaled to 1-5 (the paper's), median,
                                              # majority, or the best on --golden
    golden: str | None = None                 # records (id, axis, label) with trusted labels: prints each method's MAE and MSE
    max_spread: float | None = None           # drop items whose rescaled scores' std dev exceeds this


@dataclass
class PreviewConfig(AxesOption):
    POSITIONAL: ClassVar = ("file",)
    file: str                                 # training records
    variant: Literal[VARIANTS] = "explanation"  # which variant's targets
    order: Literal[ORDERS] | None = None      # rating or explanation first (default: build_examples')
    template: Literal[TEMPLATES] | None = None  # the prompt's chat format (default: build_examples')
    n: int = 3                                # examples to print
    tokenizer: str | None = None              # tokenizer.model or model folder (default: tokenizer.model beside FILE)
    max_len: int | None = None                # longest example in tokens (default: build_examples')
    seed: int | None = None                   # the pseudo-explanations' seed (default: build_examples')


def validate(cfg: ValidateConfig):
    """Every bad record on stderr, one line each, then a count; a DataError when any was bad."""
    bad, kind = [], cfg.kind or _kind(cfg.file)
    try:
        recs = load_records(cfg.file, kind=kind, skip_bad=True, skipped=bad,
                            need_explanation=cfg.need_explanation, axes=cfg.axes)
    finally:  # every bad record, one line each, even when none was good
        print("\n".join(f"error: {b}" for b in bad), file=sys.stderr, end="\n" if bad else "")
    settings = {(r["dataset"], r.get("axis") if isinstance(r.get("axis"), str) else "-") for r in recs}
    print(f"{cfg.file}: {len(recs)} valid {kind} records, {len(bad)} bad; {len(settings)} (dataset, axis) "
          f"settings ({'--kind ' + kind if cfg.kind else 'kind judged from every record; --kind to set it'})")
    if bad:
        raise DataError(f"{cfg.file}: {len(bad)} bad records (listed above)")


def aggregate_command(cfg: AggregateConfig):
    """aggregate() on a raw file, its report printed, the records written to cfg.out."""
    refuse_overwrite(cfg.out, {"raw ratings file": cfg.raw, "--golden file": cfg.golden, "--axes file": cfg.axes})
    if cfg.max_spread is not None and not 0 <= cfg.max_spread < math.inf:  # (nan fails too)
        raise DataError(f"--max-spread must be a finite number of at least 0, got {cfg.max_spread}")
    golden = cfg.golden and {(r["id"], r["axis"]): r["label"]
                             for r in load_records(cfg.golden, kind="golden", axes=cfg.axes)}
    records, report = aggregate(load_records(cfg.raw, kind="raw", axes=cfg.axes), cfg.method,
                                golden=golden, max_spread=cfg.max_spread)
    if not records:
        raise DataError(f"{cfg.raw}: aggregation left no training record (no item has a valid rating)")
    write_jsonl(records, cfg.out)
    print(format_report(report) + f"\nwrote {cfg.out}")


def preview(cfg: PreviewConfig):
    """The first cfg.n examples of a variant as text, the target in ⟦ ⟧ and the decision position marked ▶."""
    if cfg.n < 1 or cfg.max_len is not None and cfg.max_len < 1:
        raise DataError(f"--n and --max-len must be at least 1, got {cfg.n} and {cfg.max_len}")
    tok_path = cfg.tokenizer or os.path.join(os.path.dirname(os.path.abspath(cfg.file)), "tokenizer.model")
    if not os.path.exists(tok_path):
        raise DataError("preview needs --tokenizer PATH (a tokenizer.model or a model folder)")
    tok = Tokenizer(tok_path)
    records = load_records(cfg.file, need_explanation=cfg.variant != "label", axes=cfg.axes)
    examples = build_examples(records, tok, cfg.variant, axes=cfg.axes, **_given(
        order=cfg.order, template=cfg.template, max_len=cfg.max_len, seed=cfg.seed))
    cand = rating_token_ids(tok)
    for e in examples[:cfg.n]:
        d, ids = e.decision_pos, e.input_ids
        print(f"=== {e.id} ({e.dataset}, {e.axis}, label {e.label}, split {split_of(e.id)}): "
              f"{e.n_prompt} prompt + {len(ids) - e.n_prompt} target tokens")
        # decode prefixes of the whole sequence (decoding a piece alone would lose its leading space)
        prompt, upto, full = (tok.decode(ids[:k]) for k in (e.n_prompt, d + 1, len(ids)))
        print(f"{prompt}⟦{upto[len(prompt):]}▶{full[len(upto):]}⟧")
        print(f"--- decision position {d} (token {tok.piece(ids[d])!r}) predicts {tok.piece(ids[d + 1])!r}; "
              f"candidates {[tok.piece(i) for i in cand]} = ids {cand}\n")


def _given(**kw):
    """Only the options the user gave, so that each default lives in one place: the function's."""
    return {k: v for k, v in kw.items() if v is not None}


def _kind(path):
    """What a file holds, judged from every record (a first line that lacks a field must not decide):
    raw ratings if any record has 'ratings', labelled if any has 'label', else conversations."""
    if path.endswith(".csv"):
        return "labelled"
    keys = set()
    for _, r in _rows(path):
        if isinstance(r, dict):
            keys.update(r)
    return "raw" if "ratings" in keys else "labelled" if "label" in keys else "conversation"


COMMANDS = {
    "validate": cli.Command(ValidateConfig, validate, "check a training, conversation or raw file; list every bad record"),
    "aggregate": cli.Command(AggregateConfig, aggregate_command, "raw ensemble ratings -> one training record per (item, axis)"),
    "preview": cli.Command(PreviewConfig, preview, "print prompts and targets of a variant, decision position marked ▶"),
}


def main(argv=None):
    return cli.main("data.py", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
