"""damage.py: labels with known signal, by construction. Each real human reply is damaged on one axis
at a grade chosen by a hash, so the label is exact and the text is real; the explanation says what
was done to this reply, quoting it.

    python damage.py make --out damage.jsonl --n 1700          # chit-chat conversations -> labelled records
    python damage.py check --model M.gguf --data damage.jsonl  # does the base model see the grade? (before training)

The grades (5 = the reply as written, 1 = the most damage), per axis:
  on_topic           the reply's first fraction f of words, then the end of a reply from another
                     conversation: f = 1, 3/4, 1/2, 1/4, 0 (grade 1: wholly the other conversation's reply)
  naturalness        a fraction of the words moved out of order: 0, 1/5, 2/5, 3/5, all of them
  comprehensiveness  the reply cut to its first 1, 3/4, 1/2, 1/4 of its words, or two words
Replies of MIN_WORDS to MAX_WORDS words are used, so that every grade changes the text. Each
conversation gives one record per axis, under its own id: every axis of a conversation falls in the
same split (data.split_of), and the grade of each (conversation, axis) is uniform over 1-5.

`check` is the agreement figure printed before any training: the Spearman correlation between the
grade and the base model's mean log-probability per token of the reply and its end-of-turn given
the conversation, with a bootstrap interval. An axis whose interval does not lie above 0 carries no
signal the model can see, and study.py drops it.

Left out: LLM-written rationales for the known grade (a 135M rater's explanations were blind in
rate.py check; the plain statement here names what changed and quotes it), and any other dataset
(the functions take any conversation records).
"""
import cli  # first, so that Ctrl-C while the command starts is one line too (cli.py)
import random
import sys
from dataclasses import dataclass

import numpy as np

import data
import importers

MIN_WORDS, MAX_WORDS = 8, 40  # replies this long: every grade of every axis changes the text
KEEP_TURNS = 1  # context turns kept in a record: the turn the reply answers (short prompts, cheap runs)
CONTEXT_WORDS = 30  # ... cut to its last 30 words (marked '...'), so that no prompt loses it to max_len
GRADES = (1, 3, 5)  # the grades made: three damage levels far enough apart for a 135M student to learn
                    # in minutes (an exploratory five-level run stayed at chance after 60 steps)
FRACTIONS = {  # grade -> the share of the reply left intact
    "on_topic": {5: 1.0, 4: 0.75, 3: 0.5, 2: 0.25, 1: 0.0},
    "naturalness": {5: 1.0, 4: 0.8, 3: 0.6, 2: 0.4, 1: 0.0},
    "comprehensiveness": {5: 1.0, 4: 0.75, 3: 0.5, 2: 0.25, 1: 0.0},
}


def _quote(words, n=4, tail=False):
    part = words[-n:] if tail else words[:n]
    return ("..." if tail and len(words) > n else "") + " ".join(part) + ("..." if not tail and len(words) > n else "")


def on_topic(words, grade, other, rng):
    """The first f of the reply's words, then the last words of `other` (another conversation's reply)
    to about the same length."""
    keep = round(FRACTIONS["on_topic"][grade] * len(words))
    foreign = other[-max(len(words) - keep, 2):] if keep < len(words) else []
    out = words[:keep] + foreign
    if grade == 5:
        why = f"The whole reply answers the last turn; '{_quote(words)}' follows from what was said."
    elif grade == 1:
        why = (f"The reply belongs to another conversation: '{_quote(foreign)}' has nothing to do "
               f"with the turn it answers.")
    else:
        why = (f"The reply starts on topic ('{_quote(words[:keep], 3)}') but after {keep} words turns to "
               f"an unrelated exchange ('{_quote(foreign, 3)}').")
    return out, why


def naturalness(words, grade, other, rng):
    """A fraction of the word positions chosen and their words moved round a random cycle through
    them, so that no chosen word stays in its place."""
    n_moved = len(words) - round(FRACTIONS["naturalness"][grade] * len(words))
    if grade < 5:
        n_moved = max(n_moved, 2)
    pos = rng.sample(range(len(words)), n_moved)  # the chosen positions, in random order
    out = list(words)
    for i, p in enumerate(pos):  # one cycle through them: each takes the next one's word
        out[p] = words[pos[(i + 1) % n_moved]]
    pos.sort()
    if grade == 5:
        why = f"It reads the way a person writes: '{_quote(words, 5)}' keeps its natural word order."
    elif grade == 1:
        why = f"Every word is out of order; '{_quote(out, 5)}' reads as word salad, not as a sentence."
    else:
        why = (f"{n_moved} of its {len(words)} words are out of place, so parts such as "
               f"'{_quote(out[pos[0]:], 3)}' do not read naturally.")
    return out, why


def comprehensiveness(words, grade, other, rng):
    keep = max(2, round(FRACTIONS["comprehensiveness"][grade] * len(words)))
    out = words[:keep]
    if grade == 5:
        why = f"The reply is complete: it says all it set out to, ending with '{_quote(words, 4, tail=True)}'."
    else:
        why = (f"The reply stops after '{_quote(out, 4, tail=True)}'; about {1 - keep / len(words):.0%} of "
               f"what it set out to say is missing.")
    return out, why


DAMAGE = {"on_topic": on_topic, "naturalness": naturalness, "comprehensiveness": comprehensiveness}


def grade_of(seed, record_id, axis):
    return GRADES[data.stable_hash("grade", seed, record_id, axis) % len(GRADES)]


def make_records(conversations, seed=0, n=None, skip=0, axes=tuple(DAMAGE)):
    """Labelled records from conversation records: one per (conversation, axis), damaged at
    grade_of(seed, id, axis). Conversations whose reply has MIN_WORDS to MAX_WORDS words are taken in
    the order of a seeded hash of their ids; `skip` of them are passed over first (the pilot takes
    conversations the study never sees), then n are kept (None: all)."""
    usable = [c for c in conversations if MIN_WORDS <= len(c["response"].split()) <= MAX_WORDS]
    usable.sort(key=lambda c: data.stable_hash("damage", seed, c["id"]))
    chosen = usable[skip:None if n is None else skip + n]
    if n is not None and len(chosen) < n:
        raise data.DataError(f"only {len(chosen)} conversations with a reply of {MIN_WORDS}-{MAX_WORDS} words "
                             f"after skipping {skip}; {n} asked for")
    donors = [c["response"].split() for c in usable]  # another conversation's reply, for on_topic
    if chosen and len({tuple(d) for d in donors}) < 2:  # (the donor draw below would never end)
        raise data.DataError(f"{len(usable)} usable conversation(s), all with one reply: damage needs two different replies")
    out = []
    for c in chosen:
        words = c["response"].split()
        context = [t if len(t.split()) <= CONTEXT_WORDS else "... " + " ".join(t.split()[-CONTEXT_WORDS:])
                   for t in c["context"][-KEEP_TURNS:]]
        for axis in axes:
            grade = grade_of(seed, c["id"], axis)
            rng = random.Random(data.stable_hash("damage-rng", seed, c["id"], axis))
            other = donors[rng.randrange(len(donors))]
            while other == words:
                other = donors[rng.randrange(len(donors))]
            reply, why = DAMAGE[axis](words, grade, other, rng)
            out.append({"id": c["id"], "dataset": c["dataset"], "context": context,
                        "response": " ".join(reply), "axis": axis, "label": grade, "explanation": why})
    return out


def subset(records, n_train, seed=0, n_val=None):
    """Every test record, n_val validation records (None: all) and the records of n_train training
    conversations (all their axes), chosen by a seeded hash: a smaller subset is part of a larger one."""
    by_split = {"train": [], "val": [], "test": []}
    for r in records:
        by_split[data.split_of(r["id"])].append(r)
    def first(recs, n_ids):
        ids = sorted({r["id"] for r in recs}, key=lambda i: data.stable_hash("subset", seed, i))
        keep = set(ids if n_ids is None else ids[:n_ids])
        if n_ids is not None and len(keep) < n_ids:
            raise data.DataError(f"{len(keep)} conversations in the split, {n_ids} asked for")
        return [r for r in recs if r["id"] in keep]
    return first(by_split["train"], n_train) + first(by_split["val"], n_val) + by_split["test"]


# ----------------------------------------------------------------------------- the signal check

def _spearman(x, y):
    rx, ry = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float) for v in (x, y))
    # average ranks for ties in x (the grades): replace each rank by its group's mean
    for v, r in ((x, rx), (y, ry)):
        for val in np.unique(v):
            r[v == val] = r[v == val].mean()
    return float(np.corrcoef(rx, ry)[0, 1])


def check(model_path, records, n=None, seed=0, dtype="bfloat16", batch_size=32):
    """{axis: {"n", "spearman", "ci95", "signal"}}: the correlation between each record's grade and the
    base model's mean log-probability per token of the response and its end-of-turn, given the
    context in the model's chat format (the last n records per axis, None: all)."""
    import torch
    import torch.nn.functional as F

    from model import load_model

    tok = data.Tokenizer(model_path)
    model = load_model(model_path, dtype=getattr(torch, dtype)).eval()
    turn_end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(tok.template)  # the end of the reply's turn
    end = tok.encode(turn_end, bos=False)[-1] if turn_end else tok.eos_id
    out = {}
    for axis in sorted({r["axis"] for r in records}):
        recs = [r for r in records if r["axis"] == axis][:n]
        if len({r["label"] for r in recs}) < 2:  # (a correlation with one grade is nan, not a finding)
            raise data.DataError(f"axis '{axis}': {len(recs)} record(s) with one grade; the check needs two grades")
        seqs, starts = [], []
        for r in recs:
            ctx = "\n".join(data.turn_lines(r["context"])) + "\nResponse:"
            prompt = tok.chat(ctx) if tok.template else tok.encode(ctx, bos=True)
            seqs.append(prompt + tok.spaced(r["response"]) + [end])
            starts.append(len(prompt))
        scores = np.zeros(len(recs))
        with torch.no_grad():
            for b in range(0, len(recs), batch_size):
                group = seqs[b:b + batch_size]
                ids = torch.zeros(len(group), max(map(len, group)), dtype=torch.long)   # (B, T), right-padded
                for i, s in enumerate(group):
                    ids[i, :len(s)] = torch.tensor(s)
                at = torch.zeros_like(ids, dtype=torch.bool)                             # (B, T)
                tgt = torch.zeros_like(ids)                                              # (B, T)
                for i, s in enumerate(group):
                    k = starts[b + i]
                    at[i, k - 1:len(s) - 1] = True  # the positions that predict the reply and its end
                    tgt[i, k - 1:len(s) - 1] = torch.tensor(s[k:])
                logp = F.log_softmax(model(ids, logits_at=at).float(), -1)              # (N, V)
                per_tok = logp.gather(1, tgt[at][:, None])[:, 0]                         # (N,)
                for i, part in enumerate(per_tok.split(at.sum(1).tolist())):
                    scores[b + i] = part.mean().item()
        grades = np.array([r["label"] for r in recs])
        rho = _spearman(grades, scores)
        rng = np.random.default_rng(seed)
        boots = []
        for _ in range(1000):
            i = rng.integers(0, len(recs), len(recs))
            if len(set(grades[i])) > 1:
                boots.append(_spearman(grades[i], scores[i]))
        lo, hi = np.percentile(boots, [2.5, 97.5])
        out[axis] = {"n": len(recs), "spearman": rho, "ci95": [float(lo), float(hi)], "signal": bool(lo > 0)}
    return out


def format_check(result):
    lines = ["signal check (Spearman of the grade with the base model's mean log-probability of the reply "
             "and its end of turn, 95% bootstrap interval; signal when the interval is above 0):"]
    lines += [f"  {axis:18} {x['spearman']:+.2f} [{x['ci95'][0]:+.2f}, {x['ci95'][1]:+.2f}] n {x['n']}  "
              f"{'signal' if x['signal'] else 'NO SIGNAL'}" for axis, x in result.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

@dataclass
class MakeConfig:
    out: str                  # output JSONL
    input: str | None = None  # conversation records (default: the chitchat-dataset package)
    n: int | None = None      # conversations to use (default: all usable)
    seed: int = 0             # which conversations and grades


@dataclass
class CheckConfig:
    model: str                # base checkpoint (folder or .gguf)
    data: str                 # labelled records (damage.py make's output)
    n: int = 200              # records per axis


def make(cfg: MakeConfig):
    """make_records on the conversations of cfg.input (or the chit-chat package), written to cfg.out."""
    if cfg.n is not None and cfg.n < 1:
        raise data.DataError(f"--n must be at least 1, got {cfg.n}")
    data.refuse_overwrite(cfg.out, {"--input file": cfg.input or importers.chitchat_path()})
    if cfg.input:
        convs = data.load_records(cfg.input, kind="conversation")
    else:
        convs, _ = importers.import_conversations("chitchat", [])
    recs = make_records(convs, cfg.seed, cfg.n)
    if not recs:
        raise data.DataError(f"no conversation with a reply of {MIN_WORDS}-{MAX_WORDS} words in {cfg.input or 'the package'}")
    data.write_jsonl(recs, cfg.out)
    print(f"{len(recs)} records ({len(recs) // len(DAMAGE)} conversations x {len(DAMAGE)} axes) -> {cfg.out}")


def check_command(cfg: CheckConfig):
    """check() on the records of cfg.data, printed as format_check's table."""
    if cfg.n < 2:
        raise data.DataError(f"--n must be at least 2 (a correlation needs two records per axis), got {cfg.n}")
    print(format_check(check(cfg.model, data.load_records(cfg.data), cfg.n)))


COMMANDS = {"make": cli.Command(MakeConfig, make, "damaged chit-chat replies -> labelled records (JSONL)"),
            "check": cli.Command(CheckConfig, check_command, "the grade against the base model's log-probability, per axis")}


def main(argv=None):
    return cli.main("damage.py", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
