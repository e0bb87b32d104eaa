"""The demo: a synthetic corpus whose labels are set by cues its explanations name, and the whole
experiment in miniature on it, with no download and in minutes on a laptop CPU.

    python demo.py                # (or python train.py with no arguments) -> runs/demo
    python demo.py --corpus-only --out demo/     # the corpus alone

The corpus (write_demo) stands in for the paper's data: six datasets x three axes, each response
with four hidden binary cues per axis and its true rating 1 + the number of good cues, three
simulated raters x four prompting strategies that score it noisily and explain it by naming the
cues they noticed, and the LLM summary of their explanations. It goes through the same files as real
data (conversations.jsonl, raw.jsonl, data.aggregate -> train.jsonl), so every command can be tried
on it. study.py uses it as its controlled corpus: there an explanation carries the very features
that set the label, which LLM explanations may or may not.

The experiment (experiment): a SentencePiece tokenizer and a 0.7M-parameter Mistral-shaped base
model pretrained from scratch on the corpus text, then LoRA with the label and explanation
variants, each scored on the test split.
"""
import cli  # first, so that Ctrl-C while torch loads is one line too (cli.py)
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, replace

import torch

import data
import eval as evaluate
import rate
import train
from data import AXES, _prompt_body, aggregate, load_records, stable_hash, train_tokenizer, write_jsonl
from model import Config, Transformer, save_model
from runs import LAST, Run

# ----------------------------------------------------------------------------- the corpus

# A synthetic stand-in for the paper's data. Each response has four hidden binary cues per axis and
# its true rating on an axis is 1 + the number of good cues there, so no single word decides it.
# Simulated raters score it noisily and explain it by naming the cues they noticed, in varied words.
CUES = {"naturalness": ("fluent", "no_repeat", "human", "complete"),
        "comprehensiveness": ("detail1", "detail2", "reason", "example"),
        "on_topic": ("topic", "asked", "focus", "closing")}
# per topic: "noun:goal" pairs (the goal names the noun), advice, reasons, examples
TOPICS = {
    "cooking": ("soup:thicken a soup|bread:bake softer bread|pasta:stop pasta sticking",
                "stir in flour|simmer it longer|use a heavy pot|salt it at the end",
                "slow heat builds flavour|starch binds the liquid", "lentil soup thickens fast|my aunt rests her dough"),
    "gardening": ("roses:keep roses healthy|tomatoes:grow bigger tomatoes|lawn:fix a patchy lawn",
                  "water in the morning|add compost|cut dead leaves|give them sun",
                  "roots drink before the heat|compost feeds the soil",
                  "my neighbour doubled her harvest|old gardeners swear by it"),
    "travel": ("train:book a cheap train|passport:renew a passport fast|hotel:find a quiet hotel",
               "book 6 weeks ahead|use the official site|travel midweek|read recent reviews",
               "prices climb near the date|midweek is less busy", "my Rome ticket was half price|my cousin waited 5 days"),
    "music": ("guitar:tune a guitar by ear|piano:learn piano faster|song:write a first song",
              "practise 15 minutes daily|start with the low string|record yourself|learn three chords",
              "daily practice builds memory|the low string sets the pitch",
              "most pop songs use four chords|my teacher did this"),
    "fitness": ("running:start running again|knees:protect sore knees|sleep:sleep better after sport",
                "walk before you run|stretch for 5 minutes|rest every third day|drink more water",
                "muscles grow during rest|warm joints bend easily", "I reached 10 kilometres in a month|coaches plan rest days"),
    "computers": ("laptop:speed up a laptop|photos:back up photos|password:pick a strong password",
                  "remove unused programs|keep two copies|use a password manager|restart it weekly",
                  "idle programs still run|one copy is never enough",
                  "my laptop boots in 30 seconds|a friend lost 3 years of photos"),
    "pets": ("puppy:teach a puppy to sit|cat:stop a cat scratching|fish:keep a fish tank clean",
             "reward it at once|offer a scratching post|change some water weekly|keep lessons short",
             "pets link rewards to actions|cats scratch to mark space", "our puppy learned in 3 days|a post saved my sofa"),
    "money": ("budget:keep to a budget|savings:build savings|debt:clear a credit card debt",
              "write down every purchase|save on payday|pay the highest rate first|cancel unused subscriptions",
              "small costs add up|interest grows fastest on high rates",
              "I found 40 pounds a month|my sister cleared hers in a year"),
}
PHRASES = {  # cue -> (verb phrases when good, when bad); explanations say "The reply <phrases>, but it <phrases>."
    "fluent": ("reads fluently|has clean grammar", "has broken grammar|makes a grammar mistake"),
    "no_repeat": ("says each thing once|avoids repetition", "repeats its advice|says the same thing twice"),
    "human": ("sounds like a real person|has a warm tone", "sounds robotic|opens like a machine"),
    "complete": ("ends cleanly|finishes its thought", "trails off at the end|stops mid-sentence"),
    "reason": ("explains why it works|gives a reason", "never says why|gives no reason"),
    "example": ("includes an example|backs it up with an example", "has no example|lacks a concrete example"),
    "topic": ("fits the subject|stays on the subject", "drifts to another subject|gives advice on something else"),
    "asked": ("answers the actual question|addresses what was asked", "mistakes what was asked|answers about the wrong thing"),
    "focus": ("stays focused|has no digressions", "wanders off on a tangent|adds an unrelated aside"),
    "closing": ("closes on the question|wraps up on point", "ends with an off-topic question|closes on something unrelated"),
    "details": ("gives two extra tips|adds several concrete steps", "adds only one extra tip|gives just one more step",
                "gives no extra detail|stops after a single tip"),  # 2, 1, 0 extra details
}
DEMO_SETS = {  # dataset -> (id prefix, probability that each cue is good on each axis)
    "chatbot-arena": ("arena", (0.6, 0.6, 0.6)), "hh-rlhf-chosen": ("hhc", (0.8, 0.7, 0.8)),
    "hh-rlhf-rejected": ("hhr", (0.45, 0.35, 0.4)), "amazonqa": ("aqa", (0.65, 0.45, 0.7)),
    "coqa": ("coqa", (0.7, 0.5, 0.75)), "cornell-movie": ("movie", (0.5, 0.5, 0.45))}
RATERS = (("sim-titan", 0.35, 0.7, 0.7), ("sim-mixtral", 0.0, 0.5, 0.9), ("sim-mistral", -0.3, 0.8, 0.6))
PROMPTS = (("scale4", 4, 1.0), ("scale4-examples", 4, 0.7), ("scale5", 5, 1.0), ("scale5-examples", 5, 0.7))
NAMES = ("Anna", "Ben", "Carla", "Dev", "Elif", "Femi", "Greta", "Hugo")


def _pick(rng, choices):
    return rng.choice(choices.split("|") if isinstance(choices, str) else choices)


def _demo_item(rng, dataset, probs):
    """One conversation with hidden cues: (context, response, cues)."""
    topic, other, third = rng.sample(sorted(TOPICS), 3)
    noun, goal = _pick(rng, TOPICS[topic][0]).split(":")
    cues = {c: rng.random() < p for axis, p in zip(CUES, probs) for c in CUES[axis]}
    name = rng.choice(NAMES)
    context = {
        "chatbot-arena": [f"I have a question about my {noun}.", "Sure, go ahead."] * (rng.random() < 0.5)
        + [_pick(rng, f"How can I {goal}?|What is the best way to {goal}?|Any tips to {goal}?")],
        "hh-rlhf-chosen": [_pick(rng, f"I want to {goal}. What should I do?|Can you tell me how to {goal}?")],
        "amazonqa": [f"Will this kit help me {goal}?"],
        "coqa": [f"{name} wanted to {goal} and asked a friend.\n\nHow can {name} {goal}?"],
        "cornell-movie": [f"{name}, I must {goal} tonight.", "Why tonight?", f"Just tell me how to {goal}."],
    }[dataset.replace("rejected", "chosen")]  # both HH-RLHF sets ask alike; they differ in quality
    # Every cue but one shows in the text through a few set phrases; 'topic' (advice about another
    # subject) must be judged against the conversation.
    src = TOPICS[topic if cues["topic"] else other]  # where the advice comes from
    advice = rng.sample(src[1].split("|"), 3)
    wrong = rng.choice([x.split(":")[0] for x in src[0].split("|") if not x.startswith(noun + ":")])
    grammar = "" if cues["fluent"] else _pick(rng, "you must to |it are good to |you is should ")
    main = (f"For your {noun}, " if cues["asked"] else f"If you mean your {wrong}, ") + grammar + advice[0] + "."
    out = [_pick(rng, "Sure!|Good question.|Happy to help.|Oh, nice one." if cues["human"] else
                 "QUERY RECEIVED.|OUTPUT FOLLOWS.|PROCESSING REQUEST."), main]
    out += [f"{_pick(rng, 'Also,|Then|Next,')} {a}." for a in advice[1:1 + cues["detail1"] + cues["detail2"]]]
    if cues["reason"]:
        out.append(f"{_pick(rng, 'This works because|That helps since')} {_pick(rng, src[2])}.")
    if cues["example"]:
        out.append(f"{_pick(rng, 'For example,|For instance,')} {_pick(rng, src[3])}.")
    if not cues["no_repeat"]:
        out.append(f"{_pick(rng, 'Again,|As I said,|I repeat,')} {advice[0]}.")
    other_noun = _pick(rng, TOPICS[third][0]).split(":")[0]
    if not cues["focus"]:
        out.append(_pick(rng, [f"By the way, I love {other_noun}.", f"Unrelated, but {other_noun} is my favourite thing."]))
    out.append(_pick(rng, [f"Good luck with the {noun}!", f"Hope the {noun} works out."] if cues["closing"] else
                     [f"Anyway, do you like {other_noun}?", f"Have you ever tried {other_noun}?"]))
    if not cues["complete"]:
        out.append(_pick(rng, "and then the|so if you|but the the|which is why"))
    return context, " ".join(out), cues


def _demo_explanation(rng, axis, cues, mention=1.0, flip=0.0):
    """An explanation naming the cues behind a rating, each mentioned with probability `mention`
    and stated the wrong way round with probability `flip`."""
    names = [c for c in CUES[axis] if not c.startswith("detail")] + (["details"] if axis == "comprehensiveness" else [])
    good, bad = [], []
    for c in rng.sample(names, len(names)):
        if rng.random() >= mention:
            continue
        ok = cues["detail1"] + cues["detail2"] if c == "details" else int(cues[c])
        ok = (2 - ok if c == "details" else 1 - ok) if rng.random() < flip else ok
        phrase = _pick(rng, PHRASES[c][::-1][ok] if c == "details" else PHRASES[c][1 - ok])
        (good if ok == (2 if c == "details" else 1) else bad).append(phrase)
    join = lambda xs: ", ".join(xs[:-1]) + " and " + xs[-1] if len(xs) > 1 else xs[0]
    subject = _pick(rng, "The reply|This response|The answer|It")
    if good and bad:
        return f"{subject} {join(good)}, but it {join(bad)}."
    return f"{subject} {join(good or bad or [_pick(rng, 'is hard to judge|is unclear')])}."


def write_demo(out_dir, seed=0, n_per_dataset=150, n_corpus=3000, vocab_size=2000):
    """Write the demo corpus into out_dir and return the paths: conversations.jsonl (rate.py's
    input), raw.jsonl (3 simulated raters x 4 prompts x 3 axes, one line per rater and item, plus
    summaries), train.jsonl (aggregate() of raw.jsonl; split_of() splits it), golden.jsonl (true
    labels of ~10% of items), corpus.txt (unlabelled text for a tokenizer and a tiny base model) and
    tokenizer.model (train_tokenizer on corpus.txt). Deterministic for a seed."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(stable_hash("demo", seed))
    convs, golden, summaries = [], [], []
    raw = [[] for _ in RATERS]  # per rater, one line per item with its 12 ratings
    for dataset, (prefix, probs) in DEMO_SETS.items():
        for i in range(n_per_dataset):
            context, response, cues = _demo_item(rng, dataset, probs)
            conv = {"id": f"{prefix}-{i:04d}", "dataset": dataset, "context": context, "response": response}
            convs.append(conv)
            lines = [{**conv, "ratings": []} for _ in RATERS]
            for axis, names in CUES.items():
                truth = 1 + sum(cues[c] for c in names)
                if stable_hash("golden", conv["id"]) % 10 == 0:
                    golden.append({"id": conv["id"], "axis": axis, "label": truth})
                for k, (rater, bias, noise, mention) in enumerate(RATERS):
                    for prompt, scale, calm in PROMPTS:
                        v = truth + bias + rng.gauss(0, noise * calm)
                        score = min(scale, max(1, round(1 + (v - 1) * (scale - 1) / 4)))
                        r = {"rater": rater, "prompt": prompt, "axis": axis, "scale": scale, "score": score,
                             "explanation": _demo_explanation(rng, axis, cues, mention, flip=0.05)}
                        if rng.random() < 0.015:
                            r.update(score=None, explanation="", error="unparseable reply")
                        lines[k]["ratings"].append(r)
            for k, line in enumerate(lines):
                raw[k].append(line)
            if rng.random() < 0.9:  # the LLM summary of the 12 explanations: every cue, stated right
                summaries.append({**conv, "ratings": [], "summaries": {
                    axis: _demo_explanation(rng, axis, cues) for axis in CUES}})
    raw = [line for rater_lines in raw for line in rater_lines] + summaries
    paths = {k: os.path.join(out_dir, f"{k}.jsonl") for k in ("conversations", "raw", "train", "golden")}
    write_jsonl(convs, paths["conversations"])
    # rate.py appends one line per rater and item; summaries come last, from 'rate.py summarize'
    write_jsonl(raw, paths["raw"])
    write_jsonl(golden, paths["golden"])
    write_jsonl(aggregate(load_records(paths["raw"], kind="raw"))[0], paths["train"])
    # unlabelled text: fresh conversations in the prompts' layout, and explanation-style sentences
    # about no conversation in particular (so the base model knows the words, not the task)
    paths["corpus"] = os.path.join(out_dir, "corpus.txt")
    crng = random.Random(stable_hash("corpus", seed))
    with open(paths["corpus"], "w", encoding="utf-8") as f:
        for i in range(n_corpus):
            dataset = crng.choice(sorted(DEMO_SETS))
            context, response, cues = _demo_item(crng, dataset, DEMO_SETS[dataset][1])
            rec = {"id": str(i), "axis": crng.choice(sorted(AXES)), "context": context, "response": response}
            f.write(_prompt_body(rec, AXES) + "\n\n")
            f.write(_demo_explanation(crng, rec["axis"], {c: crng.random() < 0.5 for c in cues}) + "\n\n")
    paths["tokenizer"] = train_tokenizer(paths["corpus"], os.path.join(out_dir, "tokenizer"), vocab_size)
    return paths

# ----------------------------------------------------------------------------- the experiment

DEMO_BASE = Config(name="demo-tiny", arch="mistral", hidden_size=96, intermediate_size=256, n_layers=3,
                   n_heads=4, n_kv_heads=2, max_position_embeddings=1024, torch_dtype="float32")
DEMO_PRETRAIN = dict(full=True, lr=3e-3, warmup=0.05, weight_decay=0.01, batch_size=16, micro_batch=16,
                     steps=120, max_len=256, checkpointing=False, val_every=120, save_every=120, log_every=40)
DEMO_LORA = dict(rank=16, alpha=32, lora_dropout=0.0, lr=3e-3, steps=400, batch_size=16, micro_batch=16,
                 max_len=256, checkpointing=False, val_every=200, save_every=200, log_every=100)


# ----------------------------------------------------------------------------- tiny models for study.py --smoke

SMOKE_ANSWER = "Score:{}\nExplanation:Fluent reply."  # what the scripted smoke rater says, score sampled


def build_smoke_rater(path, text_path, seed=0, gain=2.0):
    """A scripted tiny rater: every layer's output projection is zero, so each next token depends on
    the current one only (a bigram table in the embedding and the LM head). From any token that is
    not part of the answer it starts SMOKE_ANSWER; after 'Score:' the five digits are equally likely,
    so sampling gives varied scores (rate.py reads them from the digit distribution). Its tokenizer keeps 'Score:' and 'Explanation:' as single pieces, which makes every
    other piece of the answer have one successor."""
    os.makedirs(path, exist_ok=True)
    example = {"context": ["Hi there!", "Hello, how are you?"], "response": "Fine, thanks."}
    lines = [rate.rating_prompt(example, a, d, s) for a, d in data.AXES.items() for s in rate.STRATEGIES.values()]
    lines += [SMOKE_ANSWER.format(k) for k in range(1, 6)] * 4
    with open(os.path.join(path, "text.txt"), "w") as f:  # the prompts' words and the conversations'
        f.write("\n".join(lines) + "\n" + open(text_path).read())
    tok_file = train_tokenizer(os.path.join(path, "text.txt"), os.path.join(path, "sp"), 1000,
                               symbols=["Score:", "Explanation:"])
    tok = data.Tokenizer(tok_file)
    answers = [tok.continuation(SMOKE_ANSWER.format(k)) for k in range(1, 6)]  # no leading '▁'
    successors = {}
    for ids in answers:
        for a, b in zip(ids, ids[1:] + [tok.eos_id]):
            successors.setdefault(a, set()).add(b)
    branching = [a for a, b in successors.items() if len(b) > 1]
    if len(branching) != 1 or len(successors[branching[0]]) != 5:
        raise cli.Error(f"smoke rater: the answer's pieces {[tok.piece(i) for i in answers[0]]} do not form a chain")
    cfg = Config(name="smoke-rater", arch="llama", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64,
                 n_layers=1, n_heads=4, n_kv_heads=4, max_position_embeddings=2048, torch_dtype="float32",
                 bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    chain = sorted(successors)
    if len(chain) + 1 > cfg.hidden_size:
        raise cli.Error(f"smoke rater: {len(chain)} answer pieces do not fit in {cfg.hidden_size} dimensions")
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.zero_()  # zero projections: each block adds nothing
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight  # (V, D) each
        emb[:, 0] = 1.0                       # dimension 0: "not in the answer"
        head[answers[0][0], 0] = gain         # ... is followed by the answer's first piece
        for k, a in enumerate(chain, 1):      # dimension k: piece a of the answer
            emb[a] = 0.0
            emb[a, k] = 1.0
            for b in successors[a]:
                head[b, k] = gain             # RMSNorm scales a one-hot to sqrt(64): logit 16, others 0
    save_model(model, path)
    shutil.copyfile(tok_file, os.path.join(path, "tokenizer.model"))
    return path


def build_smoke_student(path, text_path, seed=0):
    """A tiny random Mistral-shaped student and a SentencePiece tokenizer trained on both corpora."""
    os.makedirs(path, exist_ok=True)
    tok_file = train_tokenizer(text_path, os.path.join(path, "sp"), vocab_size=1000)
    tok = data.Tokenizer(tok_file)
    torch.manual_seed(seed)
    cfg = replace(Config.from_name("tiny"), name="smoke-student", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                  eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_model(Transformer(cfg), path)
    shutil.copyfile(tok_file, os.path.join(path, "tokenizer.model"))
    return path



# ----------------------------------------------------------------------------- the demo experiment

def experiment(out="runs/demo", seed=0):
    """The whole experiment in miniature: corpus, tokenizer, a tiny base model, two LoRA variants.
    Finished steps (a base or run folder with done.json) are kept when it is run again."""
    t0 = time.time()
    paths = write_demo(os.path.join(out, "data"), seed=seed)
    base = os.path.join(out, "base")
    if not Run(base).finished:
        init = os.path.join(out, "init")
        tok_path = paths["tokenizer"]
        tok = data.Tokenizer(tok_path)
        torch.manual_seed(seed)
        model = Transformer(replace(DEMO_BASE, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
        save_model(model, init)
        shutil.copy(tok_path, os.path.join(init, "tokenizer.model"))
        print(f"== pretraining a {model.n_params() / 1e6:.1f}M-parameter base model on the demo conversations")
        train.run(train.TrainConfig(model=init, data=paths["corpus"], out=base, overwrite=True, **DEMO_PRETRAIN))
    results = {}
    for variant in ("label", "explanation"):
        run_dir = os.path.join(out, variant)
        if not Run(run_dir).finished:
            print(f"== LoRA training, variant {variant}")
            train.run(train.TrainConfig(model=Run(base).checkpoint(LAST), data=paths["train"], out=run_dir,
                                        variant=variant, seed=seed, overwrite=True, **DEMO_LORA))
        results[variant] = evaluate.score_run(run_dir, split="test")
    print(f"\nDemo results on the test split ({time.time() - t0:.0f} s in all):")
    print(f"{'variant':<13} {'accuracy':>8} {'macro-F1':>8} {'MAE':>6} {'NLL':>6}")
    for variant, m in results.items():
        o = m["overall"]
        print(f"{variant:<13} {o['accuracy']:>8.3f} {o['macro_f1']:>8.3f} {o['mae']:>6.3f} {o['nll']:>6.3f}")
    return results


@dataclass
class DemoConfig:
    out: str = "runs/demo"            # where the corpus, base model and runs go
    seed: int = 0                     # corpus, base model, LoRA initialisation and batch order
    corpus_only: bool = False         # write the corpus (conversations, raw, train, golden, corpus, tokenizer) and stop
    n_per_dataset: int = 150          # with --corpus-only: items per dataset


def demo(cfg):
    if cfg.corpus_only:
        paths = write_demo(cfg.out, seed=cfg.seed, n_per_dataset=cfg.n_per_dataset)
        print("\n".join(f"{k:14} {v}" for k, v in paths.items()))
        return paths
    return experiment(cfg.out, cfg.seed)


def main(argv=None):
    return cli.main("demo.py", __doc__, {"demo": cli.Command(DemoConfig, demo, "")}, argv, default="demo")


if __name__ == "__main__":
    sys.exit(main())
