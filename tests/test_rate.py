"""rate.py on tiny random raters: the score read from the digit logits after "Score:" (argmax, seeded
samples), explanation parsing, prompts, plumbing and accounting, resume after a crash, summaries,
and generation equal to model.generate. CPU only, seconds."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import sentencepiece as spm
import torch

import cli
import data
import model as M
import rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = ["naturalness", "on_topic"]
STRATEGIES = list(rate.STRATEGIES)
CONVERSATIONS = [
    {"id": "c1", "dataset": "demo", "context": ["Hi, can you recommend a book?"], "response": "Try Dune, it is great."},
    {"id": "c2", "dataset": "demo", "context": ["What's the capital of France?", "Paris.", "And of Spain?"],
     "response": "Madrid, since 1561."},
    {"id": "c3", "dataset": "demo", "context": ["Tell me a joke."], "response": "Why did the chicken cross the road?"},
    {"id": "c4", "dataset": "demo", "context": [], "response": "Café au lait, s'il vous plaît."},
]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and far faster than on two when the CPU is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def raters(tmp_path_factory):
    """Two tiny random raters sharing a SentencePiece tokenizer trained on the prompts themselves."""
    root = tmp_path_factory.mktemp("raters")
    text = [rate.rating_prompt(c, a, data.AXES[a], s) for c in CONVERSATIONS for a in AXES
            for s in rate.STRATEGIES.values()]
    text += [rate.answer_text(3, "The reply sounds fluent and natural.")] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter("\n".join(text).split("\n")),
                                   model_prefix=str(root / "sp"), vocab_size=300, hard_vocab_limit=False,
                                   character_coverage=1.0, required_chars="0123456789", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   split_digits=True, minloglevel=2)  # ' 4' -> ['▁', '4'], as Llama's and Mistral's
    paths = []
    for i, name in enumerate(["rater-a", "rater-b"]):
        torch.manual_seed(i)
        cfg = M.Config.from_name("tiny")
        cfg.vocab_size = spm.SentencePieceProcessor(model_file=str(root / "sp.model")).get_piece_size()
        path = root / name
        M.save_model(M.Transformer(cfg), str(path))
        shutil.copy(root / "sp.model", path / "tokenizer.model")
        paths.append(str(path))
    return paths


@pytest.fixture
def conversations(tmp_path):
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    return str(path)


def run_rate(raters, conversations, out, **settings):
    """rate.rate's counts for the tiny raters; settings are RateConfig fields."""
    cfg = dict(raters=list(raters), input=conversations, out=str(out), axes=",".join(AXES), batch_size=5,
               max_new_tokens=12, retries=1)
    return rate.rate(rate.RateConfig(**dict(cfg, **settings)))


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def rating_keys(path):
    return [(r["id"], x["axis"], x["rater"], x["prompt"], x.get("sample", 0)) for r in lines(path) for x in r["ratings"]]


def all_keys(raters, samples=1, axes=AXES):
    return {(c["id"], a, os.path.basename(r), p, k) for c in CONVERSATIONS for a in axes for r in raters
            for p in STRATEGIES for k in range(samples)}


class StubGenerate:
    """Stands in for model.generate, which rate.py now calls for explanations only (the score comes
    from the tiny model's digit logits): " sounds fluent." for every prompt, except an answer with
    no words ("42") for prompts containing a word of `always_bad`, and of `bad_greedy` under greedy
    decoding only (so the sampled retry fixes it); raises after `crash_after` calls."""

    def __init__(self, tok, bad_greedy=(), always_bad=(), crash_after=None):
        self.tok, self.bad_greedy, self.always_bad, self.crash_after = tok, bad_greedy, always_bad, crash_after
        self.calls = 0

    def __call__(self, model, prompts, max_new_tokens=32, temperature=0.0, eos_id=None, seed=None,
                 insert=None, insert_len=0, **kw):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        out, self.last_prompt = [], prompts[-1]
        if insert is not None:  # rate_batch reads the score here: the real model's logits, and what it writes
            with torch.no_grad():
                forced = insert(torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts]))
            prompts = [p + f.tolist() for p, f in zip(prompts, forced)]
            self.last_prompt = prompts[-1]
        for p in prompts:
            text = self.tok.decode(p)
            bad = any(w in text for w in self.always_bad) or temperature == 0 and any(w in text for w in self.bad_greedy)
            out.append(self.tok.encode("42" if bad else "sounds fluent."))
        return out


def stub(raters, monkeypatch, **kw):
    gen = StubGenerate(data.Tokenizer(raters[0]), **kw)
    monkeypatch.setattr(rate, "generate", gen)
    return gen


def reference_digit_logits(model, tok, conversation, axis, strategy, max_tokens=rate.MAX_PROMPT_TOKENS):
    """The scale's digit logits after "Score:" from a plain full forward pass of one unpadded prompt."""
    prefix, digits = rate.score_tokens(tok, strategy["scale"])
    ids = rate.fit_prompt(tok, conversation, axis, data.AXES[axis], strategy, max_tokens) + rate.cue_ids(tok, "Score:") + prefix
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1, digits]


# ----------------------------------------------------------------------------- parsing explanations

START = rate.EXPLANATION_START
PARSE_CASES = [  # (generated text, prefilled start, expected explanation or an error substring)
    (f"{START} is fluent and friendly.", START, f"{START} is fluent and friendly."),
    (f" {START} sounds natural.", START, f"{START} sounds natural."),    # byte-level BPE decodes 'ĠThe' with its space
    (f"{START}'s tone is warm.", START, f"{START}'s tone is warm."),
    (f"{START} is fluent,\n  and idiomatic.", START, f"{START} is fluent, and idiomatic."),     # lines joined
    (f"{START} is short.\n\nUser: I went hiking.\nResponse to rate: ...", START, f"{START} is short."),
    (f"{START} is short.\nScore: 3", START, f"{START} is short."),                          # a trailing Score line
    (f"{START} is stiff.\nExplanation: again", START, f"{START} is stiff."),
    (f"{START} is clear. It is short. It repeats. It is", START, f"{START} is clear. It is short."),  # two sentences
    (f"{START} is clear, friendly and", START, f"{START} is clear, friendly and"),  # cut off, nothing whole before
    (f"{START} is **very** natural.", START, f"{START} is very natural."),
    (f"{START} user-friendly, not a new part.", START, f"{START} user-friendly, not a new part."),
    ("Fluent and friendly.", "", "Fluent and friendly."),                                   # no prefilled start
    (f"{START}Score:3\nExplanation:Fluent reply.", START, "Fluent reply."),  # wrote the format itself
    ("Score: 3\nExplanation: Fluent reply.\nScore: 3", "", "Fluent reply."),
    ("Explanation: Stays on the question.", "", "Stays on the question."),
    ("1. The answer is a mix of both.", "", "The answer is a mix of both."),                # a list number
    (' "Fluent and idiomatic."\n', "", "Fluent and idiomatic."),
    (f"{START} 1.\n\nUser: hi", START, "empty explanation"),                              # a list number only
    (f"{START} 42", START, "empty explanation"),
    (START, START, "empty explanation"),                                                      # EOS at once
    ("", "", "empty explanation"),
    ("   \n\nUser: hello", "", "empty explanation"),
    ("Score: 4", "", "empty explanation"),                                               # the format again
]


@pytest.mark.parametrize("text,start,expected", PARSE_CASES)
def test_parse_explanation(text, start, expected):
    if expected.startswith("empty"):
        with pytest.raises(ValueError, match=expected):
            rate.parse_explanation(text, start)
    else:
        assert rate.parse_explanation(text, start) == expected


def test_score_tokens_split_like_data_py(raters):
    tok = data.Tokenizer(raters[0])
    prefix, digits = rate.score_tokens(tok, 5)
    assert digits == data.rating_token_ids(tok) and [tok.piece(i) for i in prefix] == ["▁"]
    assert [tok.piece(i) for i in digits] == list("12345") and rate.score_tokens(tok, 4)[1] == digits[:4]
    with pytest.raises(rate.RateError, match="1-10 do not encode as a shared prefix"):
        rate.score_tokens(tok, 10)  # '10' is two digit pieces


# ----------------------------------------------------------------------------- prompts and options

def test_prompts_show_scale_rubric_and_examples():
    c = CONVERSATIONS[1]
    plain = rate.rating_prompt(c, "on_topic", "ADHERENCE", rate.STRATEGIES["scale4"])
    shown = rate.rating_prompt(c, "on_topic", "ADHERENCE", rate.STRATEGIES["scale5-examples"])
    assert "ADHERENCE" in plain and "from 1 to 4" in plain and "Rated examples" not in plain
    assert "from 1 to 5" in shown and "Rated examples" in shown and "Score: 1\nExplanation: Ignores" in shown
    assert "Response to rate: Madrid, since 1561." in plain  # turns labelled backwards from the response:
    assert "User: What's the capital" in plain and "Assistant: Paris." in plain and "User: And of Spain?" in plain
    assert "capital" not in rate.rating_prompt(c, "on_topic", "x", rate.STRATEGIES["scale4"], drop_turns=2)


def test_prompts_file_and_unknown_strategy(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"scale3": {"scale": 3, "instructions": "Be strict.", "examples": [
        {"axis": "naturalness", "context": ["Hi"], "response": "Yo", "score": 2, "explanation": "Curt."}]}}))
    s = rate.load_strategies(["scale3", "scale5"], str(f))
    p = rate.rating_prompt(CONVERSATIONS[0], "naturalness", "d", s["scale3"])
    assert "Be strict." in p and "from 1 to 3" in p and "Score: 2\nExplanation: Curt." in p
    with pytest.raises(rate.RateError, match="unknown prompting strategy 'scale7'"):
        rate.load_strategies(["scale7"], str(f))
    f.write_text(json.dumps({"bad": {"examples": True}}))
    with pytest.raises(rate.RateError, match="integer 'scale'"):
        rate.load_strategies(["bad"], str(f))


def expect_error(capsys, argv, message):
    assert rate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err


def test_bad_inputs_are_one_line_errors(raters, conversations, tmp_path, capsys):
    out = str(tmp_path / "raw.jsonl")
    expect_error(capsys, ["--raters", str(tmp_path / "nope"), "--input", conversations, "--out", out], "nope: not a rater (a .gguf file, or a folder")
    before = open(conversations).read()
    expect_error(capsys, ["--raters", raters[0], "--input", conversations, "--out", conversations],
                 "is the --input file: ratings would be appended to the conversations")
    assert open(conversations).read() == before
    empty = tmp_path / "empty-config"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    (empty / "tokenizer.model").write_bytes(open(os.path.join(raters[0], "tokenizer.model"), "rb").read())
    expect_error(capsys, ["--raters", str(empty), "--input", conversations, "--out", out], "config.json")
    expect_error(capsys, ["--raters", raters[0], "--input", conversations, "--out", out, "--prompts", "scale4,zero-shot"],
                 "unknown prompting strategy 'zero-shot'")
    expect_error(capsys, ["--raters", raters[0], "--input", conversations, "--out", out, "--axes", "humour"],
                 "unknown axis 'humour'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CONVERSATIONS[0]) + "\n" + json.dumps({"id": "x", "context": [], "response": ""}) + "\n")
    expect_error(capsys, ["--raters", raters[0], "--input", str(bad), "--out", out], f"{bad}:2: field 'response'")
    bad.write_text(json.dumps(CONVERSATIONS[0]) + "\n{not json\n")
    expect_error(capsys, ["--raters", raters[0], "--input", str(bad), "--out", out], f"{bad}:2: not valid JSON")
    expect_error(capsys, ["--raters", raters[0], "--input", str(tmp_path / "missing.jsonl"), "--out", out], "no such file")
    assert not os.path.exists(out)


def test_command_line_shape(capsys):
    """One line and status 2 for a bad argument; --help lists the subcommands."""
    assert rate.main(["--bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert rate.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "summarize" in out and "check" in out
    assert issubclass(rate.RateError, cli.Error) and issubclass(rate.RateError, ValueError)


def test_read_jsonl_repairs_only_a_cut_off_last_line(tmp_path):
    f = tmp_path / "raw.jsonl"
    f.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "rat')
    assert [r["id"] for r in rate.read_jsonl(str(f))] == ["a", "b"] and f.read_text().endswith("rat")
    assert [r["id"] for r in rate.read_jsonl(str(f), repair=True)] == ["a", "b"]
    assert f.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    f.write_text('{"id": "a"}\n{"id": "b"}')  # complete, but the newline was not written yet
    assert len(rate.read_jsonl(str(f), repair=True)) == 2 and f.read_text().endswith("}\n")
    f.write_text('{"id": "a"}\n{"id": \n{"id": "b"}\n')
    with pytest.raises(rate.RateError, match="raw.jsonl:2: not valid JSON"):
        rate.read_jsonl(str(f), repair=True)


# ----------------------------------------------------------------------------- end to end

def test_random_raters_all_strategies_accounting(raters, conversations, tmp_path, capsys):
    out = tmp_path / "raw.jsonl"
    counts = run_rate(raters, conversations, out)
    keys = rating_keys(out)
    assert len(keys) == len(set(keys)) and set(keys) == all_keys(raters)
    ratings = [x for r in lines(out) for x in r["ratings"]]
    for x in ratings:
        assert x["scale"] == rate.STRATEGIES[x["prompt"]]["scale"]
        assert (x["score"] is None) == ("error" in x) and (x["score"] is None) != ("explanation" in x)
    n_failed = sum(x["score"] is None for x in ratings)
    assert n_failed == sum(n for (_, _, status), n in counts.items() if status == "failed")
    assert f"({n_failed} failed)" in capsys.readouterr().err
    assert n_failed == 0  # the score is on the scale by construction; random tokens still hold a letter
    assert all(x["explanation"].startswith(rate.EXPLANATION_START + " ") for x in ratings)
    run_rate(raters, conversations, out)  # a rerun has nothing left to do
    assert len(rating_keys(out)) == len(keys)
    records, report = data.aggregate(data.load_records(str(out), kind="raw"))  # validates every line
    assert (report["failed"], report["valid"]) == (n_failed, len(ratings) - n_failed)
    assert {r["id"] for r in records} <= {c["id"] for c in CONVERSATIONS}
    assert data.main(["aggregate", str(out), "-o", str(tmp_path / "train.jsonl")]) == 0  # the command line too


def test_greedy_score_is_the_argmax_of_the_digit_logits(raters, conversations, tmp_path, monkeypatch):
    """Batched and right-padded in rate.py; here one prompt at a time, every position's logits."""
    stub(raters, monkeypatch)  # explanations do not matter here
    out = tmp_path / "raw.jsonl"
    run_rate(raters, conversations, out)
    models = {os.path.basename(r): (M.load_model(r), data.Tokenizer(r)) for r in raters}
    conversation = {c["id"]: c for c in CONVERSATIONS}
    ratings = [(r["id"], x) for r in lines(out) for x in r["ratings"]]
    assert len(ratings) == len(all_keys(raters))
    for i, x in ratings:
        ref = reference_digit_logits(*models[x["rater"]], conversation[i], x["axis"], rate.STRATEGIES[x["prompt"]])
        assert x["score"] == int(ref.argmax()) + 1
        assert abs(x["score_prob"] - torch.softmax(ref.double(), -1).max().item()) < 1e-4
    assert len({x["score"] for _, x in ratings}) > 1  # not one constant answer


def test_sampled_scores_are_seeded_per_rating_and_vary(raters, conversations, tmp_path, monkeypatch, capsys):
    expect_error(capsys, ["--raters", raters[0], "--input", conversations, "--out", str(tmp_path / "r"),
                          "--samples", "2"], "--temperature")
    stub(raters, monkeypatch)

    def scores(name, **extra):
        out = tmp_path / f"{name}.jsonl"
        run_rate(raters[:1], conversations, out, samples=3, temperature=1.0, **extra)
        keys = rating_keys(out)
        assert len(keys) == len(set(keys)) and set(keys) == all_keys(raters[:1], samples=3)
        return dict(zip(keys, (x["score"] for r in lines(out) for x in r["ratings"])))

    first = scores("a")
    assert all(1 <= s <= rate.STRATEGIES[k[3]]["scale"] for k, s in first.items())
    assert scores("b") == first                              # the same seed: the same samples
    assert scores("c", batch_size=3) == first                # seeded per rating, not per batch
    assert scores("d", seed=1) != first                      # another seed: other samples
    per_question = {}
    for (i, axis, _, p, k), s in first.items():
        per_question.setdefault((i, axis, p), set()).add(s)
    assert any(len(v) > 1 for v in per_question.values())    # the samples of one question differ
    assert len(set(first.values())) > 2


def test_stub_explanations_are_parsed_retried_and_aggregate(raters, conversations, tmp_path, monkeypatch):
    gen = stub(raters, monkeypatch, bad_greedy=("Madrid",), always_bad=("chicken",))
    out = tmp_path / "raw.jsonl"
    counts = run_rate(raters, conversations, out)
    by_id, conversation = {}, {c["id"]: c for c in CONVERSATIONS}
    for r in lines(out):  # every line is a whole raw record: the conversation and some of its ratings
        by_id.setdefault(r["id"], []).extend(r["ratings"])
        assert {k: r[k] for k in ("id", "dataset", "context", "response")} == conversation[r["id"]]
    assert all(1 <= x["score"] <= x["scale"] and x["explanation"] == "The response sounds fluent."
               for i in ("c1", "c2", "c4") for x in by_id[i])                          # c2 fixed by a retry
    assert all(x["score"] is None and "empty explanation" in x["error"] for x in by_id["c3"])  # failed twice
    assert sum(n for (_, _, s), n in counts.items() if s == "failed") == len(AXES) * 4 * 2
    records, _ = data.aggregate(lines(out))
    assert {(r["id"], r["axis"]) for r in records} == {(i, a) for i in ("c1", "c2", "c4") for a in AXES}
    assert all(1 <= r["label"] <= 5 for r in records)
    prompt = gen.tok.decode(gen.last_prompt)  # the explanation phase sees the chosen score and the cue
    assert prompt.endswith(rate.EXPLANATION_START) and "Score:" in prompt


def test_custom_axis_from_a_file(raters, conversations, tmp_path, monkeypatch, capsys):
    axes = tmp_path / "axes.json"
    axes.write_text(json.dumps({"politeness": "courteous and respectful"}))
    argv = ["--raters", raters[0], "--input", conversations, "--out", str(tmp_path / "raw.jsonl"),
            "--axes", "politeness", "--axes-file", str(axes)]
    expect_error(capsys, argv, "no rated examples for axis 'politeness'")  # the built-in examples rate 3 axes
    gen = stub(raters, monkeypatch)
    assert rate.main([*argv, "--prompts", "scale4,scale5"]) == 0
    assert "politeness: courteous and respectful" in gen.tok.decode(gen.last_prompt)
    raw = data.load_records(str(tmp_path / "raw.jsonl"), kind="raw", axes=str(axes))
    records, report = data.aggregate(raw)
    assert report["valid"] == len(CONVERSATIONS) * 2 and {r["axis"] for r in records} == {"politeness"}


def test_crash_and_rerun_gives_no_duplicates_and_no_gaps(raters, conversations, tmp_path, monkeypatch):
    ref = tmp_path / "ref.jsonl"
    stub(raters, monkeypatch, bad_greedy=("Madrid",))
    run_rate(raters, conversations, ref)
    out = tmp_path / "raw.jsonl"
    stub(raters, monkeypatch, bad_greedy=("Madrid",), crash_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_rate(raters, conversations, out)
    partial = rating_keys(out)
    assert 0 < len(partial) < len(all_keys(raters))
    with open(out, "a") as f:  # the crash also left half a line behind
        f.write('{"id": "c1", "dataset": "demo", "ratings": [{"rater": "rater-a", "pro')
    stub(raters, monkeypatch, bad_greedy=("Madrid",))
    run_rate(raters, conversations, out)
    keys = rating_keys(out)
    assert len(keys) == len(set(keys)) and set(keys) == all_keys(raters)
    scores = lambda p: sorted((k, x["score"]) for k, x in zip(rating_keys(p), [x for r in lines(p) for x in r["ratings"]]))
    assert scores(out) == scores(ref)


def test_sigkill_midway_then_rerun(raters, conversations, tmp_path):
    out = tmp_path / "raw.jsonl"
    cmd = [sys.executable, "rate.py", "--raters", raters[0], "--input", conversations, "--out", str(out),
           "--axes", "naturalness", "--batch-size", "1", "--max-new-tokens", "32", "--retries", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not (out.exists() and out.stat().st_size):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = len(rating_keys(out))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    keys = rating_keys(out)
    assert len(keys) == len(set(keys)) and set(keys) == all_keys(raters[:1], axes=["naturalness"])
    assert killed_after < len(keys)  # it really was killed midway


# ----------------------------------------------------------------------------- summaries

def test_summarize_resumes_and_feeds_aggregate(raters, conversations, tmp_path, monkeypatch):
    out = tmp_path / "raw.jsonl"
    stub(raters, monkeypatch, always_bad=("chicken",))
    run_rate(raters, conversations, out)
    n_lines = len(lines(out))

    def summary_stub(model, prompts, temperature=0.0, **kw):
        summary_stub.calls += 1
        if summary_stub.calls == 2:
            raise KeyboardInterrupt("simulated crash")
        return [tok.encode("is fluent and natural.") for _ in prompts]
    summary_stub.calls = 0
    tok = data.Tokenizer(raters[0])
    monkeypatch.setattr(rate, "generate", summary_stub)
    assert rate.main(["summarize", "--model", raters[1], "--input", str(out), "--batch-size", "2"]) == 130  # Ctrl-C
    with open(out, "a") as f:
        f.write('{"id": "c2", "summ')
    cfg = rate.SummarizeConfig(model=raters[1], input=str(out), batch_size=2)
    counts = rate.summarize(cfg)
    assert counts == {"ok": 4, "failed": 0}  # 3 items x 2 axes; the first batch of 2 survived the crash
    assert rate.summarize(cfg) == {"ok": 0, "failed": 0}
    new = lines(out)[n_lines:]
    pairs = [(r["id"], a) for r in new for a in r["summaries"]]
    assert len(pairs) == len(set(pairs)) and set(pairs) == {(i, a) for i in ("c1", "c2", "c4") for a in AXES}
    records, _ = data.aggregate(lines(out))
    assert {r["explanation"] for r in records} == {"The response is fluent and natural."}


def test_summarize_with_a_random_model_to_another_file(raters, conversations, tmp_path, monkeypatch):
    raw = tmp_path / "raw.jsonl"
    stub(raters, monkeypatch)
    run_rate(raters[:1], conversations, raw)
    monkeypatch.setattr(rate, "generate", M.generate)
    out = tmp_path / "summarised.jsonl"
    counts = rate.summarize(rate.SummarizeConfig(model=raters[1], input=str(raw), out=str(out), max_new_tokens=8))
    assert counts["ok"] + counts["failed"] == len(CONVERSATIONS) * len(AXES)
    assert lines(out)[:len(lines(raw))] == lines(raw)  # --out starts as a copy of the input
    assert sum(len(r.get("summaries", {})) for r in lines(out)) == counts["ok"]


# ----------------------------------------------------------------------------- generation

def test_batched_generation_equals_model_generate(raters):
    model, tok = M.load_model(raters[0]), data.Tokenizer(raters[0])
    prompts = [rate.fit_prompt(tok, c, "naturalness", "d", rate.STRATEGIES[s], 4096)
               for c, s in zip(CONVERSATIONS, ["scale4", "scale5-examples", "scale5", "scale4-examples"])]
    assert len({len(p) for p in prompts}) == 4  # different lengths: the batch is left-padded
    texts = rate.complete(model, tok, prompts, max_new_tokens=20)
    for p, text in zip(prompts, texts):
        alone = M.generate(model, [p], max_new_tokens=20, eos_id=tok.eos_id)[0]
        assert text == tok.decode(alone)
    assert any(texts)


def test_prompts_longer_than_the_limit_drop_old_turns_then_fail(raters):
    tok = data.Tokenizer(raters[0])
    c = CONVERSATIONS[1]
    full = rate.fit_prompt(tok, c, "naturalness", "d", rate.STRATEGIES["scale4"], 4096)
    shorter = rate.fit_prompt(tok, c, "naturalness", "d", rate.STRATEGIES["scale4"], len(full) - 1)
    assert shorter is not None and len(shorter) < len(full)
    assert rate.fit_prompt(tok, c, "naturalness", "d", rate.STRATEGIES["scale4"], 10) is None


# ----------------------------------------------------------------------------- rate.py check

def test_corruptions_make_each_axis_worse_by_construction():
    recs = [dict(c, response=f"{c['response']} extra words here") for c in CONVERSATIONS]
    swapped = rate.corrupt(recs, "on_topic")
    assert [r["response"] for r in swapped] == [recs[(i + 2) % 4]["response"] for i in range(4)]
    shuffled = rate.corrupt(recs, "naturalness", seed=1)
    assert all(sorted(a["response"].split()) == sorted(b["response"].split()) for a, b in zip(recs, shuffled))
    assert any(a["response"] != b["response"] for a, b in zip(recs, shuffled))
    assert [r["response"] for r in rate.corrupt(recs, "comprehensiveness")] == \
        [" ".join(r["response"].split()[:2]) for r in recs]
    assert [r["context"] for r in swapped] == [r["context"] for r in recs]  # only the response changes


def test_auc_counts_pairs_and_ties():
    assert rate.auc([3, 4], [1, 2]) == 1.0
    assert rate.auc([1, 2], [3, 4]) == 0.0
    assert rate.auc([2, 2], [2, 2]) == 0.5
    assert rate.auc([1, 3], [2]) == 0.5


def test_expected_score_is_the_mean_of_the_digit_distribution(raters):
    model, tok = M.load_model(raters[0]), data.Tokenizer(raters[0])
    for name in ("scale4", "scale5-examples"):
        s = rate.STRATEGIES[name]
        got = rate.expected_scores(model, tok, CONVERSATIONS, "on_topic", data.AXES["on_topic"], s, 2048, 3)
        for c, g in zip(CONVERSATIONS, got):
            p = torch.softmax(reference_digit_logits(model, tok, c, "on_topic", s).double(), -1)
            assert g == pytest.approx(float(p @ torch.arange(1, s["scale"] + 1).double()), abs=1e-5)


def test_check_scores_real_against_corrupted(raters, conversations, tmp_path, monkeypatch):
    """A rater that scores every original response 4 and every corrupted one 2 gets AUC 1 on each axis
    and strategy; the report names them all."""
    originals = {c["response"] for c in CONVERSATIONS}
    monkeypatch.setattr(rate, "expected_scores", lambda model, tok, records, **kw:
                        [4.0 if r["response"] in originals and r["response"] == c["response"] else 2.0
                         for r, c in zip(records, CONVERSATIONS)])
    out = tmp_path / "check.json"
    assert rate.main(["check", "--raters", raters[0], "--input", conversations, "--out", str(out),
                      "--axes", ",".join(AXES)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["axis"], r["prompt"]) for r in rows} == {(a, p) for a in AXES for p in STRATEGIES}
    assert all(r["auc"] == 1.0 and r["n"] == 4 and r["mean_real"] == 4.0 for r in rows)


def test_check_bad_input_is_one_line(raters, conversations, tmp_path, capsys):
    expect_error(capsys, ["check", "--raters", raters[0], "--input", conversations, "--out",
                          str(tmp_path / "c.json"), "--n", "1"], "--n 1")
    expect_error(capsys, ["check", "--raters", raters[0], "--input", str(tmp_path / "nope.jsonl"), "--out",
                          str(tmp_path / "c.json")], "no such file")


def test_one_pass_rating_equals_reading_the_prompt_twice(raters):
    """rate_batch reads each prompt once (score, then explanation from the same KV cache): the same
    greedy scores and explanations as scoring with a full forward pass and then generating from the
    whole "... Score: N\\nExplanation: The response" text."""
    model, tok = M.load_model(raters[0]), data.Tokenizer(raters[0])
    s = rate.STRATEGIES["scale5"]
    prompts = [rate.fit_prompt(tok, c, "naturalness", data.AXES["naturalness"], s, 2048) for c in CONVERSATIONS]
    got = rate.rate_batch(model, tok, prompts, [5] * 4, [0] * 4, start=START, max_new_tokens=12,
                          temperature=0.0, retries=0, seed=0)
    prefix, digits = rate.score_tokens(tok, 5)
    start_ids = tok.spaced(START)
    for c, p, (status, value) in zip(CONVERSATIONS, prompts, got):
        score = int(reference_digit_logits(model, tok, c, "naturalness", s, 2048).argmax()) + 1
        follow = p + rate.cue_ids(tok, "Score:") + prefix + [digits[score - 1]] + \
            tok.continuation(rate.EXPLANATION_CUE) + start_ids
        text = rate.complete(model, tok, [follow], 12, lead=len(start_ids))[0]
        try:
            want = ("ok", rate.parse_explanation(text, start=START))
        except ValueError as e:
            want = ("error", f"{e} (attempt 1 of 1)")
        assert status == want[0]
        assert (value[0], value[2]) == (score, want[1]) if status == "ok" else value == want[1]


def test_generate_insert_feeds_tokens_chosen_from_the_first_logits(raters):
    model = M.load_model(raters[0])
    prompts = [[1, 5, 9, 12, 40], [1, 7, 30]]
    seen = []

    def insert(logits):
        seen.append(logits)
        return torch.tensor([[11, 12], [13, 14]])
    out = M.generate(model, prompts, max_new_tokens=6, insert=insert, insert_len=2)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            torch.testing.assert_close(seen[0][i], model(torch.tensor([p]))[0, -1], atol=1e-5, rtol=1e-5)
    forced = [p + f for p, f in zip(prompts, [[11, 12], [13, 14]])]
    assert out == [M.generate(model, [f], max_new_tokens=6)[0] for f in forced]
    with pytest.raises(ValueError, match="insert returned shape"):
        M.generate(model, prompts, max_new_tokens=2, insert=lambda logits: torch.tensor([[1]]), insert_len=2)


def test_check_with_no_pair_left_reports_none_without_crashing(raters, tmp_path):
    """One-word responses are unchanged by the comprehensiveness corruption: those pairs are left
    out, and an axis with none left gets n 0 and AUC None, not a traceback."""
    path = tmp_path / "one_word.jsonl"
    path.write_text("".join(json.dumps({"id": f"w{i}", "dataset": "demo", "context": ["Hi"], "response": "Hello"}) + "\n"
                            for i in range(3)))
    out = tmp_path / "check.json"
    rate.check(rate.CheckConfig(raters=[raters[0]], input=str(path), out=str(out), axes="comprehensiveness",
                                prompts="scale5"))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n"], r["auc"]) for r in rows] == [(0, None)]
