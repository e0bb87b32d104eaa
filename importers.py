"""The public releases of the paper's six datasets and the chit-chat package -> conversation records.

    python importers.py FORMAT [FILE...] -o conversations.jsonl [--n N] [--seed S]

Each format has one function that turns an entry of the release's own files (JSON, JSONL or
.jsonl.gz; Cornell's two text files) into records {id, dataset, context, response}: the input of
rate.py. Where a release has whole dialogues (CoQA, Cornell, chit-chat), each is cut at a turn chosen
by a hash of its id, so the cut is stable and does not depend on file order. A malformed entry is
reported as 'FILE:LINE: ...' (or 'FILE: item N: ...') and skipped, never dropped silently; so is a
line over data.py's MAX_LINE_BYTES (read no further) or one that is not UTF-8. An output path that is
(or resolves to) one of the input files is refused before anything is written.

Left out: downloading anything (point the importers at files you have; chit-chat is read from the
installed `chitchat-dataset` package) and the ratings (rate.py).
"""
import cli  # first, so that Ctrl-C while the command starts is one line too (cli.py)
import ast
import gzip
import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from data import DataError, check_record, open_text, parse_json, read_lines, refuse_overwrite, stable_hash, write_jsonl


def _items(path, key=None):
    """(where, object or DataError) for each item of a JSON list, a {key: [...]} JSON file or JSONL
    (read line by line, each line bounded as data.read_lines bounds it)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        head = _read(path, f, 4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    doc = None
    if head == b"[" or head == b"{" and key:  # one JSON document, read whole
        doc = _try_json(_whole(path))
        if isinstance(doc, dict):
            doc = doc.get(key)
    if isinstance(doc, list):
        yield from ((f"{path}: item {i}", x) for i, x in enumerate(doc))
        return
    for n, line in read_lines(path):
        if isinstance(line, DataError) or line.strip():
            try:
                yield f"{path}:{n}", line if isinstance(line, DataError) else parse_json(line)
            except DataError as e:
                yield f"{path}:{n}", e


def _whole(path):
    try:
        with open_text(path) as f:
            return _read(path, f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None


def _read(path, f, size=-1):
    try:
        return f.read(size)
    except (EOFError, zlib.error) as e:  # a .gz file cut short or damaged
        raise DataError(f"{path}: damaged compressed file ({e})") from None


def _try_json(text):
    try:
        return parse_json(text)
    except DataError:
        return None  # not one document: JSON lines


# One function per format: a public entry -> conversation records; a malformed entry raises.

def _arena(x, seed):  # {"question_id", "conversation_a"/"_b": [{"role", "content"}, ...], "model_a"/"_b"}
    out = []
    for side in "ab":
        turns = x[f"conversation_{side}"]
        if not turns or turns[-1]["role"] != "assistant":
            raise ValueError(f"conversation_{side} must end with an assistant turn")
        out.append({"id": f"arena-{x['question_id']}-{side}", "dataset": "chatbot-arena", "model": x.get(f"model_{side}"),
                    "context": [t["content"] for t in turns[:-1]], "response": turns[-1]["content"]})
    return out


def _hh(x, seed):  # {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}: two datasets
    out = []
    for part in ("chosen", "rejected"):
        bits = re.split(r"\n\n(Human|Assistant): ", "\n\n" + x[part].lstrip("\n"))
        turns = [(who, said.strip()) for who, said in zip(bits[1::2], bits[2::2])]
        if len(turns) < 2 or turns[-1][0] != "Assistant":
            raise ValueError(f"{part}: no 'Human:' turn followed by a final 'Assistant:' turn")
        out.append({"id": f"hh-{part}-{stable_hash(x[part]) % 16**12:012x}", "dataset": f"hh-rlhf-{part}",
                    "context": [t for _, t in turns[:-1]], "response": turns[-1][1]})
    return out


def _amazonqa(x, seed):  # {"qid"?, "asin", "questionText", "answers": [{"answerText"}], "review_snippets"}
    q, answers = x["questionText"].strip(), [a["answerText"] for a in x["answers"]]
    if not q or not answers:
        raise ValueError("empty question or no answers")
    qid = x.get("qid") or f"{x.get('asin', '')}-{stable_hash(q) % 16**8:08x}"
    return [{"id": f"amazonqa-{qid}", "dataset": "amazonqa", "context": [q], "response": answers[0]}]


def _coqa(x, seed):  # {"id", "story", "questions": [{"input_text"}], "answers": [...]}: cut at a hashed turn
    qs, ans = [q["input_text"] for q in x["questions"]], [a["input_text"] for a in x["answers"]]
    if not qs or len(qs) != len(ans):
        raise ValueError(f"{len(qs)} questions but {len(ans)} answers")
    k = stable_hash(seed, x["id"]) % len(qs)
    turns = [t for qa in zip(qs[:k], ans[:k]) for t in qa] + [qs[k]]
    turns[0] = f"{x['story'].strip()}\n\n{turns[0]}"
    return [{"id": f"coqa-{x['id']}-{k + 1}", "dataset": "coqa", "context": turns, "response": ans[k]}]


def _cornell(x, seed):  # built by _cornell_entries from the two files
    return [{"id": f"cornell-{x['movie']}-{x['ids'][0]}", "dataset": "cornell-movie",
             "context": x["turns"][:-1], "response": x["turns"][-1]}]


def _cornell_entries(paths):
    """movie_lines.txt + movie_conversations.txt (fields separated by ' +++$+++ ', Latin-1) ->
    (where, {"movie", "ids", "turns"} or an error) per conversation."""
    files = {os.path.basename(p): p for p in paths}
    if set(files) != {"movie_lines.txt", "movie_conversations.txt"}:
        raise DataError("cornell-movie needs the two files movie_lines.txt and movie_conversations.txt")
    lines = {}
    for n, row in read_lines(files["movie_lines.txt"], encoding="iso-8859-1"):
        where = f"{files['movie_lines.txt']}:{n}"
        if isinstance(row, DataError):  # a line past the length cap
            yield where, row
            continue
        fields = row.rstrip("\r\n").split(" +++$+++ ")
        if len(fields) != 5:
            yield where, ValueError(f"expected 5 fields, got {len(fields)}")
        lines[fields[0]] = fields[-1].strip() if len(fields) == 5 else ""
    for n, row in read_lines(files["movie_conversations.txt"], encoding="iso-8859-1"):
        where = f"{files['movie_conversations.txt']}:{n}"
        fields = [] if isinstance(row, DataError) else row.rstrip("\r\n").split(" +++$+++ ")
        try:
            ids = ast.literal_eval(fields[3]) if len(fields) == 4 else None
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            ids = None
        if isinstance(row, DataError):
            yield where, row
        elif not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(i, str) for i in ids):
            yield where, ValueError("expected 4 fields ending in a list of at least two line ids")
        elif not all(lines.get(i) for i in ids):
            yield where, ValueError(f"unknown or empty line id {next(i for i in ids if not lines.get(i))}")
        else:
            yield where, {"movie": fields[2], "ids": ids, "turns": [lines[i] for i in ids]}


def _chitchat(x, seed):  # built by _chitchat_entries: {"id", "messages": [[{"text", "sender"}, ...], ...]}
    turns = [" ".join(u["text"].strip() for u in turn if u["text"].strip()) for turn in x["messages"]]
    turns = [t for t in turns if t]
    if len(turns) < 2:
        raise ValueError(f"{len(turns)} non-empty turn(s); a conversation needs a context and a response")
    k = 1 + stable_hash(seed, x["id"]) % (len(turns) - 1)  # the response: a hashed turn after the first
    return [{"id": f"chitchat-{x['id']}-{k}", "dataset": "chitchat", "context": turns[:k], "response": turns[k]}]


def chitchat_path():
    """dataset.json of the installed chitchat-dataset package (7,168 human conversations, MIT),
    found without importing it; None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("chitchat_dataset")
    return os.path.join(spec.submodule_search_locations[0], "dataset.json") if spec else None


def _chitchat_entries(paths):
    """The Chit Chat Challenge's dataset.json ({conversation id: {"messages": [...]}}) -> entries.
    A conversation of one person alone (a single turn) cannot be cut, and is reported as such."""
    for path in paths:
        text = _whole(path)
        try:
            conversations = parse_json(text)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        if not isinstance(conversations, dict):
            raise DataError(f"{path}: expected an object of conversations by id (chitchat-dataset's dataset.json)")
        for cid, conv in conversations.items():
            yield f"{path}: conversation {cid}", dict(conv, id=cid) if isinstance(conv, dict) else ValueError("not an object")


IMPORTERS = {"chatbot-arena": _arena, "hh-rlhf": _hh, "amazonqa": _amazonqa, "coqa": _coqa, "cornell-movie": _cornell,
             "chitchat": _chitchat}


def import_conversations(fmt, paths, *, n=None, seed=0):
    """Conversation records (id, dataset, context, response) from a public release's own files
    (JSON, JSONL or .jsonl.gz; Cornell's two text files). Returns (records, problems): each malformed
    entry is one 'FILE:LINE: ...' (or 'FILE: item N: ...') string, never dropped silently. With n,
    keep the n records per dataset with the smallest hash(seed, id): a seeded sample that does not
    depend on file order. Ids are stable: the release's own, or a hash of the text."""
    if fmt not in IMPORTERS:
        raise DataError(f"unknown format '{fmt}' (choose from {', '.join(IMPORTERS)})")
    if not paths and fmt == "chitchat" and chitchat_path():
        paths = [chitchat_path()]
    if not paths:
        raise DataError(f"import {fmt}: name the dataset's file(s)"
                        + (" (or pip install chitchat-dataset)" if fmt == "chitchat" else ""))
    entries = (_cornell_entries(paths) if fmt == "cornell-movie" else _chitchat_entries(paths) if fmt == "chitchat"
               else (e for p in paths for e in _items(p, key="data" if fmt == "coqa" else None)))
    records, problems, seen = [], [], set()
    for where, x in entries:
        try:
            if isinstance(x, Exception):
                raise x
            new = [check_record(r, "conversation") for r in IMPORTERS[fmt](x, seed)]
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:  # DataError is a ValueError
            problems.append(f"{where}: " + (f"missing field {e}" if isinstance(e, KeyError) else str(e)))
            continue
        for r in new:
            if r["id"] in seen:
                problems.append(f"{where}: duplicate of an earlier conversation ('{r['id']}'), skipped")
            else:
                seen.add(r["id"])
                records.append(r)
    if n:
        keep = set()
        for ds in {r["dataset"] for r in records}:
            keep.update(sorted((r["id"] for r in records if r["dataset"] == ds), key=lambda i: stable_hash(seed, i))[:n])
        records = [r for r in records if r["id"] in keep]
    return records, problems


# ------------------------------------------------------------------------------------- command line

@dataclass
class ImportConfig:
    POSITIONAL: ClassVar = ("format", "files")
    format: Literal[tuple(sorted(IMPORTERS))]  # which release the files come from
    out: str                                   # the conversation records (JSONL): rate.py's input
    files: list = field(default_factory=list)  # the release's files (chitchat: default, the installed package's)
    n: int | None = None                       # keep a seeded sample of N conversations per dataset
    seed: int = 0                              # which sample, and where dialogues are cut


def import_command(cfg: ImportConfig):
    """import_conversations() to a JSONL file; each skipped entry is one warning line on stderr."""
    if cfg.n is not None and cfg.n < 1:
        raise DataError(f"--n must be at least 1, got {cfg.n}")
    refuse_overwrite(cfg.out, {"input file": cfg.files or ([chitchat_path()] if cfg.format == "chitchat" else [])})
    records, problems = import_conversations(cfg.format, cfg.files, n=cfg.n, seed=cfg.seed)
    print("\n".join(f"warning: {m}" for m in problems), file=sys.stderr, end="\n" if problems else "")
    if not records:
        raise DataError(f"import {cfg.format}: no conversation could be read from {', '.join(cfg.files) or 'the package'}")
    write_jsonl(records, cfg.out)
    print(f"wrote {len(records)} conversations to {cfg.out} ({len(problems)} entries skipped, listed above)")


def main(argv=None):
    command = cli.Command(ImportConfig, import_command, "a public dataset's own files -> conversations.jsonl")
    return cli.main("importers.py", __doc__, {"import": command}, argv, default="import")


if __name__ == "__main__":
    sys.exit(main())
