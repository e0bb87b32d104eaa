"""Hostile input to the data path (data.py, importers.py, rate.py, damage.py): nothing silently wrong,
nothing unbounded. Each expected failure is one `error: ...` line and status 2 naming the file,
line, field or option; an input is never overwritten; a second writer is refused; huge or deep
input is refused cheaply. Ends with a seeded fuzz run over mutated record files in a subprocess
with bounded address space. CPU only, seconds."""
import json
import os
import subprocess
import sys
import time
import tracemalloc

import pytest

import cli
import damage
import data
import importers
import rate
from data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV = {"id": "c1", "dataset": "d", "context": ["Hi there!"], "response": "Hello, how are you?"}
REC = dict(CONV, axis="naturalness", label=4, explanation="Fluent and friendly.")
RATING = {"rater": "m", "prompt": "scale5", "axis": "naturalness", "scale": 5, "score": 4, "explanation": "Fine."}
RAW = dict(CONV, ratings=[RATING])


def write(path, lines):
    """lines: dicts (as JSON), str or bytes, each followed by a newline."""
    with open(path, "wb") as f:
        for x in lines:
            x = x if isinstance(x, (str, bytes)) else json.dumps(x)
            f.write((x.encode() if isinstance(x, str) else x) + b"\n")
    return str(path)


def one_error(capsys, main, argv):
    """Run a command's main: status 2 and exactly one stderr line, `error: ...`; returns that line."""
    status = main(argv)
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), (status, err)
    return err[0]


@pytest.fixture
def fake_rater(tmp_path):
    """A folder that passes rate.check_rater (config.json + tokenizer.model) but loads nothing: every
    case below must fail before a model is read."""
    path = tmp_path / "rater"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "tokenizer.model").write_bytes(b"not a model")
    return str(path)


@pytest.fixture
def convs(tmp_path):
    return write(tmp_path / "conversations.jsonl", [CONV, dict(CONV, id="c2")])


# ----------------------------------------------------------------------------- two writers

def hold_lock(path):
    """A child process holding cli.Lock(path) until killed; returns it once the lock is taken."""
    code = "import sys, time, cli; cli.Lock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code, path], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_rate_on_the_same_raw_file_is_refused_naming_the_holder(tmp_path, capsys, fake_rater, convs):
    out = tmp_path / "raw.jsonl"
    write(out, [RAW])
    before = out.read_bytes()
    child = hold_lock(os.path.realpath(out) + ".lock")
    try:
        err = one_error(capsys, rate.main, ["--raters", fake_rater, "--input", convs, "--out", str(out)])
        assert f"process {child.pid}" in err and str(out) in err
        link = tmp_path / "link.jsonl"  # the same file under another name: the same lock
        link.symlink_to(out)
        assert f"process {child.pid}" in one_error(capsys, rate.main, ["--raters", fake_rater, "--input", convs,
                                                                       "--out", str(link)])
        err = one_error(capsys, rate.main, ["summarize", "--model", fake_rater, "--input", str(out)])
        assert f"process {child.pid}" in err
    finally:
        child.kill()
        child.wait()
    assert out.read_bytes() == before


def test_the_lock_is_released_when_rate_fails(tmp_path, capsys, fake_rater, convs):
    out = write(tmp_path / "raw.jsonl", [RAW, b'{"id": "c2", "ratings": []}\xff'])
    assert ":2: not UTF-8 text" in one_error(capsys, rate.main, ["--raters", fake_rater, "--input", convs, "--out", out])
    assert not os.path.exists(os.path.realpath(out) + ".lock")


# ----------------------------------------------------------------------------- inputs destroyed or merged

def test_aggregate_never_writes_over_an_input(tmp_path, capsys):
    raw = write(tmp_path / "raw.jsonl", [RAW])
    golden = write(tmp_path / "golden.jsonl", [{"id": "c1", "axis": "naturalness", "label": 4}])
    axes = tmp_path / "axes.txt"
    axes.write_text("politeness: courteous\n")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.jsonl"
    link.symlink_to(raw)
    before = {p: open(p, "rb").read() for p in (raw, golden, str(axes))}
    for out in (raw, str(link), str(tmp_path / "sub" / ".." / "raw.jsonl")):
        err = one_error(capsys, data.main, ["aggregate", raw, "-o", out])
        assert "is the raw ratings file" in err
    assert "is the --golden file" in one_error(capsys, data.main, ["aggregate", raw, "--golden", golden, "-o", golden])
    assert "is the --axes file" in one_error(capsys, data.main, ["aggregate", raw, "--axes", str(axes), "-o", str(axes)])
    assert {p: open(p, "rb").read() for p in before} == before
    assert data.main(["aggregate", raw, "-o", str(tmp_path / "train.jsonl")]) == 0


def test_importers_and_damage_never_write_over_an_input(tmp_path, capsys):
    qa = write(tmp_path / "qa.jsonl", [{"qid": "1", "questionText": "Why?", "answers": [{"answerText": "So."}]}])
    hard = tmp_path / "hard.jsonl"
    os.link(qa, hard)
    before = open(qa, "rb").read()
    for out in (qa, str(hard)):
        assert "is the input file" in one_error(capsys, importers.main, ["amazonqa", qa, "-o", out])
    convs = write(tmp_path / "c.jsonl", [CONV])
    assert "is the --input file" in one_error(capsys, damage.main, ["make", "--input", convs, "--out", convs])
    assert open(qa, "rb").read() == before and open(convs).read() == json.dumps(CONV) + "\n"


def test_rate_never_writes_over_an_input(tmp_path, capsys, fake_rater, convs):
    axes = tmp_path / "axes.txt"
    axes.write_text("politeness: courteous\n")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"strict": {"scale": 5}}))
    base = ["--raters", fake_rater, "--input", convs]
    before = {p: open(p, "rb").read() for p in (convs, str(axes), str(prompts))}
    assert "is the --input file" in one_error(capsys, rate.main, [*base, "--out", str(tmp_path / "." / "conversations.jsonl")])
    assert "is the --axes-file" in one_error(capsys, rate.main, [*base, "--axes-file", str(axes), "--out", str(axes)])
    assert "is the --prompts-file" in one_error(capsys, rate.main, [*base, "--prompts-file", str(prompts),
                                                                     "--prompts", "strict", "--out", str(prompts)])
    assert "is the --input" in one_error(capsys, rate.main, ["check", *base, "--out", convs])
    assert "is the --axes-file" in one_error(capsys, rate.main, ["summarize", "--model", fake_rater, "--input", convs,
                                                                 "--axes-file", str(axes), "--out", str(axes)])
    assert {p: open(p, "rb").read() for p in before} == before


def test_aggregate_refuses_one_id_with_two_conversations(tmp_path, capsys):
    raw = write(tmp_path / "raw.jsonl", [RAW, dict(RAW, ratings=[dict(RATING, rater="n")]),
                                         dict(RAW, response="Something else entirely.")])
    out = str(tmp_path / "train.jsonl")
    err = one_error(capsys, data.main, ["aggregate", raw, "-o", out])
    assert f"{raw}:3: field 'id': 'c1'" in err and "than on line 1" in err and "response" in err
    assert not os.path.exists(out)
    with pytest.raises(DataError, match="'c1': two raw records hold different conversations"):
        data.aggregate([dict(RAW), dict(RAW, context=["Another start"])])


def test_rate_keeps_a_complete_last_line_it_cannot_read(tmp_path, capsys, fake_rater, convs):
    """A newline-terminated last line with a byte that is not UTF-8 is no crash's work: one error
    naming it, nothing deleted. Only an unterminated last line is cut (and a complete one without
    its newline gets one)."""
    out = tmp_path / "raw.jsonl"
    write(out, [RAW, b'{"id": "c2", "dataset": "d\xff", "ratings": []}'])
    before = out.read_bytes()
    err = one_error(capsys, rate.main, ["--raters", fake_rater, "--input", convs, "--out", str(out)])
    assert f"{out}:2: not UTF-8 text" in err and out.read_bytes() == before
    write(out, [RAW, "[1, 2]", RAW])
    with pytest.raises(rate.RateError, match=r"raw.jsonl:2: expected a JSON object"):
        rate.read_jsonl(str(out), repair=True)
    write(out, [RAW, dict(RAW, ratings=[{"axis": "naturalness"}])])
    with pytest.raises(rate.RateError, match=r"raw.jsonl:2: field 'ratings'"):
        rate.read_jsonl(str(out), repair=True)
    out.write_bytes(json.dumps(RAW).encode() + b'\n{"id": "c2", "dataset": "d\xc3')  # cut inside a character
    assert len(rate.read_jsonl(str(out), repair=True)) == 1 and out.read_bytes() == json.dumps(RAW).encode() + b"\n"


# ----------------------------------------------------------------------------- unbounded

def test_a_huge_line_is_refused_while_reading_without_building_it(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps(REC).encode() + b"\n")
        f.write(b'{"id": "big", "response": "' + b"x" * (data.MAX_LINE_BYTES + 2**20) + b'"}\n')
        f.write(json.dumps(dict(REC, id="c3")).encode() + b"\n")
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(DataError, match=r"big.jsonl:2: line longer than 16,777,216 bytes"):
            data.load_records(str(path))
        skipped = []
        assert [r["id"] for r in data.load_records(str(path), skip_bad=True, skipped=skipped)] == ["c1", "c3"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(skipped) == 1 and time.perf_counter() - t < 5
    assert peak < 2.5 * data.MAX_LINE_BYTES  # the line was never built whole (it is 17 MiB)


def test_a_field_far_longer_than_any_context_is_rejected_before_tokenising(tmp_path, capsys, mistral_v1_model):
    long = "word " * 250_000  # 1,250,000 characters, within the line cap
    path = write(tmp_path / "x.jsonl", [REC, dict(REC, id="c2", response=long), dict(REC, id="c3", context=[long[:600_000]] * 2)])
    with pytest.raises(DataError, match=r"x.jsonl:2: field 'response': 1,250,000 characters, more than the 1,000,000"):
        data.load_records(path)
    skipped = []
    assert [r["id"] for r in data.load_records(path, skip_bad=True, skipped=skipped)] == ["c1"]
    assert "x.jsonl:3: field 'context': 1,200,000 characters" in skipped[1]
    assert "x.jsonl:2: field 'response'" in one_error(capsys, data.main, ["preview", path, "--tokenizer", mistral_v1_model])

    class Counting:  # the real tokenizer, counting the characters it is given
        def __init__(self, tok):
            self.tok, self.calls, self.longest = tok, 0, 0

        def __getattr__(self, name):
            attr = getattr(self.tok, name)
            if not callable(attr):
                return attr

            def call(*args, **kw):
                self.calls += 1
                self.longest = max([self.longest] + [len(a) for a in args if isinstance(a, str)])
                return attr(*args, **kw)
            return call
    tok = Counting(data.Tokenizer(mistral_v1_model))
    ok = data.check_record(REC)
    huge = dict(ok, id="huge", response="word " * 20_000)  # 100,000 characters: far past 64 x 256 tokens
    chatty = dict(ok, id="chatty", context=[f"turn {i}" for i in range(5000)])  # 5000 turns, 42,000 characters
    t = time.perf_counter()
    examples = data.build_examples([ok, huge, chatty], tok, "explanation", max_len=256)
    assert [e.id for e in examples] == ["c1", "chatty"] and time.perf_counter() - t < 5
    assert tok.longest < 2.5 * data.CHARS_PER_TOKEN * 256 and tok.calls < 100  # bisection, not 5000 tries
    assert "dropped 1 records longer than max_len=256" in capsys.readouterr().err
    assert len(examples[1].input_ids) <= 256 and "turn 4999" in tok.tok.decode(examples[1].input_ids)


@pytest.mark.parametrize("scale", [10, 1, 10**7, 2.5, "5", True, None])
def test_a_strategy_scale_must_be_one_digit(tmp_path, capsys, fake_rater, convs, scale):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"wide": {"scale": scale}}))
    err = one_error(capsys, rate.main, ["--raters", fake_rater, "--input", convs, "--out", str(tmp_path / "raw.jsonl"),
                                        "--prompts-file", str(prompts), "--prompts", "wide"])
    assert f"{prompts}: strategy 'wide' needs an integer 'scale' from 2 to 9" in err


# ----------------------------------------------------------------------------- one line, not a traceback

HOSTILE_LINES = [  # (a record line, what the error says)
    ("[" * 100_000 + "]" * 100_000, "nested more than 16 levels deep"),
    (json.dumps(dict(REC, meta=[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]])), "nested more than 16 levels deep"),
    ('{"id": "a", "label": ' + "1" * 5000 + "}", "Exceeds the limit (4300 digits)"),
    (json.dumps(dict(REC, id=["a"])), "field 'id': must be a string"),
    (json.dumps(dict(REC, id=1.5)), "field 'id': must be a string"),
    (json.dumps(dict(REC, id="x" * 5000)), "field 'id': must be a string (at most 1000 characters)"),
    (json.dumps(dict(REC, label=1e999)), "field 'label': must be an integer 1-5, got inf"),
    (json.dumps(dict(REC, label=["x" * 10**6])), "field 'label': must be an integer 1-5, got a list of 1"),
    (json.dumps(dict(REC, response="ok \ud800")), "field 'response': holds a lone surrogate"),
    (json.dumps(dict(RAW, ratings=[dict(RATING, explanation=5)])), "field 'ratings[0].explanation': must be a string"),
    (json.dumps(dict(RAW, ratings=[dict(RATING, sample=-1)])), "field 'ratings[0].sample': must be an integer"),
    (json.dumps(dict(RAW, summaries={"naturalness": ["a"]})), "field 'summaries': must map axis names to strings"),
]


@pytest.mark.parametrize("line,message", HOSTILE_LINES, ids=[m[:30] for _, m in HOSTILE_LINES])
def test_each_hostile_record_is_one_line_naming_file_and_line(tmp_path, capsys, line, message):
    path = write(tmp_path / "x.jsonl", [RAW if "ratings" in line else REC, line])
    kind = "raw" if "ratings" in line else "labelled"
    with pytest.raises(DataError) as e:
        data.load_records(path, kind=kind)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value) and len(str(e.value)) < 400
    err = one_error(capsys, data.main, ["aggregate", path, "-o", str(tmp_path / "out.jsonl")])
    assert err.startswith(f"error: {path}:") and len(err) < 400


def test_csv_hostile_cells(tmp_path, capsys):
    header = "id,dataset,context,response,axis,label,explanation\n"
    path = tmp_path / "x.csv"
    path.write_text(header + "a,d,Hi,Hello,naturalness,4,Fine.\n" + f"b,d,Hi,{'y' * 200_000},naturalness,4,Fine.\n")
    with pytest.raises(DataError, match=r"x.csv:3: not valid CSV \(field larger than field limit"):
        data.load_records(str(path))
    assert "x.csv:3: not valid CSV" in one_error(capsys, data.main, ["validate", str(path)])
    for label in ("1" * 5000, "²", "٣"):
        path.write_text(header + f"a,d,Hi,Hello,naturalness,{label},Fine.\n")
        with pytest.raises(DataError, match=r"x.csv:2: field 'label': must be an integer 1-5, got '"):
            data.load_records(str(path))
    path.write_text(header + "a,d," + "[" * 50_000 + ",Hello,naturalness,4,Fine.\n")  # a '[' cell kept as text
    assert data.load_records(str(path))[0]["context"] == ["[" * 50_000]


def test_side_files_of_the_wrong_kind_are_one_line(tmp_path, capsys, fake_rater, convs):
    recs = write(tmp_path / "x.jsonl", [REC])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("politeness: courtois\nnaturalness: naturel, fluide et idiomatique \xe9".encode("latin-1"))
    assert f"{latin}:2: not UTF-8 text" in one_error(capsys, data.main, ["validate", recs, "--axes", str(latin)])
    assert f"{latin}:2: not UTF-8 text" in one_error(capsys, rate.main, ["--raters", fake_rater, "--input", convs,
                                                                         "--out", str(tmp_path / "r.jsonl"),
                                                                         "--axes-file", str(latin)])
    out = str(tmp_path / "r.jsonl")
    base = ["--raters", fake_rater, "--input", convs, "--out", out]
    for content, message in [(json.dumps(["a"]), "expected {axis: description}"),
                             (json.dumps({"politeness": 3}), "expected {axis: description}"),
                             ("[" * 100_000, "expected {axis: description}"),
                             ("x" * (data.MAX_SIDE_BYTES + 1), "too large")]:
        latin.write_text(content)
        assert message in one_error(capsys, data.main, ["validate", recs, "--axes", str(latin)])
        assert message in one_error(capsys, rate.main, [*base, "--axes-file", str(latin)])
    prompts = tmp_path / "prompts.json"
    for content, message in [(b"\xff{}", f"{prompts}:1: not UTF-8 text"),
                             (b"[1, 2]", "expected a JSON object of prompting strategies"),
                             (b"[" * 100_000, "nested more than 16 levels deep"),
                             (b'{"s": {"scale": ' + b"1" * 5000 + b"}}", "Exceeds the limit"),
                             (b'{"s": 5}', "strategy 's' must be an object"),
                             (b'{"s": {"scale": 5, "instructions": 3}}', "'instructions' that are not a string"),
                             (b'{"s": {"scale": 5, "examples": "yes"}}', "'examples' that are neither"),
                             (b'{"s": {"scale": 5, "examples": ["axis context response score explanation"]}}',
                              "example 0 needs axis, context"),
                             (b'{"s": {"scale": 5, "examples": [{"axis": "naturalness", "context": [3], "response": "r",'
                              b' "score": 4, "explanation": "e"}]}}', "example 0: axis, response and explanation"),
                             (b'{"s": {"scale": 4, "examples": [{"axis": "naturalness", "context": "c", "response": "r",'
                              b' "score": 5, "explanation": "e"}]}}', "example 0: 'score' must be an integer from 1 to 4")]:
        prompts.write_bytes(content)
        assert message in one_error(capsys, rate.main, [*base, "--prompts-file", str(prompts), "--prompts", "s"])
    assert not os.path.exists(out)


def test_importer_inputs_of_the_wrong_kind(tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    listing = tmp_path / "qa.json"
    listing.write_bytes(json.dumps([{"qid": "1", "questionText": "Caf\xe9?", "answers": [{"answerText": "So."}]}],
                                   ensure_ascii=False).encode("latin-1"))
    assert f"{listing}: not UTF-8 text" in one_error(capsys, importers.main, ["amazonqa", str(listing), "-o", out])
    good = {"qid": "1", "questionText": "Why?", "answers": [{"answerText": "So."}]}
    lines = write(tmp_path / "qa.jsonl", [good, b'{"qid": "2", "questionText": "Caf\xe9?"}', "[" * 100_000,
                                          '{"qid": ' + "9" * 5000 + "}", dict(good, qid="3", answers="many")])
    assert importers.main(["amazonqa", lines, "-o", out]) == 0
    err = capsys.readouterr().err
    for n, message in [(2, "not UTF-8 text"), (3, "JSON nested more than 16 levels deep"), (4, "a JSON number too long"), (5, "")]:
        assert f"warning: {lines}:{n}: {message}" in err
    assert [json.loads(x)["id"] for x in open(out)] == ["amazonqa-1"]
    cornell = tmp_path / "cornell"
    cornell.mkdir()
    (cornell / "movie_lines.txt").write_text("L1 +++$+++ u0 +++$+++ m0 +++$+++ A +++$+++ Hi\n"
                                             "L2 +++$+++ u1 +++$+++ m0 +++$+++ B +++$+++ Hello\n", encoding="latin-1")
    (cornell / "movie_conversations.txt").write_text("u0 +++$+++ u1 +++$+++ m0 +++$+++ ['L1', 'L2']\n"
                                                     "u0 +++$+++ u1 +++$+++ m0 +++$+++ [['L1'], 'L2']\n"
                                                     "u0 +++$+++ u1 +++$+++ m0 +++$+++ " + "[" * 10_000 + "\n",
                                                     encoding="latin-1")
    assert importers.main(["cornell-movie", str(cornell / "movie_lines.txt"), str(cornell / "movie_conversations.txt"),
                           "-o", out]) == 0
    err = capsys.readouterr().err
    assert "movie_conversations.txt:2: expected 4 fields" in err and "movie_conversations.txt:3: expected 4 fields" in err


OPTIONS = [  # (main, argv, the option the error names)
    (rate.main, ["--batch-size", "0"], "--batch-size"), (rate.main, ["--batch-size", "1000000000"], "--batch-size"),
    (rate.main, ["--samples", "-1"], "--samples"), (rate.main, ["--retries", "-2"], "--retries"),
    (rate.main, ["--retries", "1000000"], "--retries"), (rate.main, ["--max-new-tokens", "0"], "--max-new-tokens"),
    (rate.main, ["--max-new-tokens", "100000000"], "--max-new-tokens"),
    (rate.main, ["--max-prompt-tokens", "-5"], "--max-prompt-tokens"),
    (rate.main, ["--temperature", "nan"], "--temperature"), (rate.main, ["--temperature", "inf"], "--temperature"),
    (rate.main, ["--temperature", "-1"], "--temperature"),
    (rate.main, ["check", "--n", "-3"], "--n"), (rate.main, ["summarize", "--batch-size", "-1"], "--batch-size"),
    (data.main, ["aggregate", "{raw}", "-o", "{out}", "--max-spread", "nan"], "--max-spread"),
    (data.main, ["aggregate", "{raw}", "-o", "{out}", "--max-spread", "inf"], "--max-spread"),
    (data.main, ["aggregate", "{raw}", "-o", "{out}", "--max-spread", "-1"], "--max-spread"),
    (data.main, ["preview", "{raw}", "--n", "-1"], "--n"), (data.main, ["preview", "{raw}", "--max-len", "0"], "--max-len"),
    (importers.main, ["amazonqa", "{raw}", "-o", "{out}", "--n", "-1"], "--n"),
    (damage.main, ["make", "--input", "{raw}", "--out", "{out}", "--n", "-1"], "--n"),
    (damage.main, ["check", "--model", "m", "--data", "{raw}", "--n", "-1"], "--n"),
]


@pytest.mark.parametrize("main,argv,option", OPTIONS, ids=[" ".join(a) for _, a, _ in OPTIONS])
def test_negative_absurd_or_non_finite_options_are_one_line(tmp_path, capsys, fake_rater, convs, main, argv, option):
    raw = write(tmp_path / "raw.jsonl", [RAW])
    out = str(tmp_path / "out.jsonl")
    argv = [a.format(raw=raw, out=out) for a in argv]
    if main is rate.main:
        argv += ["--model", fake_rater, "--input", convs] if argv[0] == "summarize" else \
                ["--raters", fake_rater, "--input", convs, "--out", out]
    assert option in one_error(capsys, main, argv)
    assert not os.path.exists(out) and open(raw).read() == json.dumps(RAW) + "\n"


# ----------------------------------------------------------------------------- fuzz

FUZZ = r'''
import contextlib, io, json, os, random, resource, sys, time, traceback
LIMIT = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
sys.path.insert(0, sys.argv[1])
import data, importers
from data import DataError

folder, rng = sys.argv[2], random.Random(1234)
rec = {"id": "a", "dataset": "d", "context": ["Hi there!", "Hello?"], "response": "Fine, thanks.",
       "axis": "naturalness", "label": 4, "explanation": "Fluent."}
raw = {"id": "r", "dataset": "d", "context": ["Hi"], "response": "Yo", "summaries": {"naturalness": "ok"},
       "ratings": [{"rater": "m", "prompt": "scale4", "axis": "naturalness", "scale": 4, "score": 3,
                    "explanation": "Fine."}, {"rater": "n", "prompt": "scale5", "axis": "on_topic", "scale": 5,
                                              "score": None, "error": "x"}]}
base = [dict(rec, id=f"a{i}") for i in range(4)] + [dict(raw, id=f"r{i % 2}") for i in range(3)]
values = [None, True, -1, 0, 7, 3.5, 1e308, float("inf"), "", " ", "x", [], {}, ["a", 3], {"a": {"b": []}},
          "é\u2028\x00", "\ud800"]
nums = ["1" * 5000, "-" + "9" * 4400, "1e999", "-1e999", "NaN", "Infinity", "1" * 4300, "0." + "1" * 10000]

def mutate():
    """One hostile JSONL file (bytes) from the base records."""
    recs = [json.loads(json.dumps(r)) for r in rng.sample(base, rng.randint(1, len(base)))]
    what = rng.choice(["type", "type", "number", "deep", "giant", "flip", "cut", "junk"])
    if what == "type":
        for _ in range(rng.randint(1, 3)):
            r = rng.choice(recs)
            target = rng.choice(r["ratings"]) if "ratings" in r and r["ratings"] and rng.random() < .5 else r
            target[rng.choice(list(target) + ["extra"])] = rng.choice(values)
    text = [json.dumps(r, ensure_ascii=rng.random() < .5) for r in recs]
    k = rng.randrange(len(text))
    if what == "number":
        text[k] = text[k].replace(rng.choice(['4', '"a', '3', 'null']), rng.choice(nums), 1)
    if what == "deep":
        d = rng.choice([17, 50, 900, 5000, 200000])
        nest = rng.choice(["[" * d + "1" + "]" * d, '{"k":' * d + "1" + "}" * d, "[" * d])
        text[k] = text[k].replace('"Fluent."', nest, 1).replace('"Fine."', nest, 1)
    if what == "giant":
        size = rng.choice([200_000, 1_000_001, 3_000_000, data.MAX_LINE_BYTES + 10])
        text[k] = text[k].replace("Fine, thanks.", "w" * size, 1).replace('"Yo"', '"' + "y" * size + '"', 1)
    blob = ("\r\n" if rng.random() < .2 else "\n").join(text).encode("utf-8", "surrogatepass") + b"\n"
    if rng.random() < .1:
        blob = b"\xef\xbb\xbf" + blob
    if what == "flip":
        blob = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        blob = bytes(blob)
    if what == "cut":
        blob = blob[:rng.randrange(len(blob))]
    if what == "junk":
        blob = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    return blob

stats, start = {"files": 0, "ok": 0, "refused": 0}, time.time()
sink = io.StringIO()
for i in range(int(sys.argv[4])):
    path = os.path.join(folder, f"f{i}.jsonl" if i % 10 else f"f{i}.csv")
    blob = mutate()
    if path.endswith(".csv"):  # the same content as CSV cells, or the bytes as they are
        blob = blob if i % 20 == 0 else b"id,dataset,context,response,axis,label,explanation\n" + blob.replace(b'", "', b'","')
    with open(path, "wb") as f:
        f.write(blob)
    stats["files"] += 1
    for kind in ("labelled", "raw", "conversation"):
        try:
            with contextlib.redirect_stderr(sink):
                recs = data.load_records(path, kind=kind, skip_bad=bool(i % 2))
            data.write_jsonl(recs, path + ".out")
            if kind == "raw":
                data.aggregate(recs)
            stats["ok"] += 1
        except (DataError, OSError):
            stats["refused"] += 1
    for run in (lambda: data.validate(data.ValidateConfig(file=path)),
                lambda: importers.import_conversations("amazonqa", [path])):
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                run()
        except (DataError, OSError):
            pass
    sink.seek(0)
    sink.truncate()
    os.remove(path)
usage = resource.getrusage(resource.RUSAGE_SELF)
# this process's own peak: VmHWM (Linux carries ru_maxrss over from the parent, pytest, through exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")] if sys.platform == "linux" else []
peak_kb = int(hwm[0].split()[1]) if hwm else usage.ru_maxrss
print(json.dumps(dict(stats, seconds=round(time.time() - start, 2), maxrss_mb=round(peak_kb / 1024))))
'''


def test_fuzzed_record_files_raise_only_data_errors_quickly_in_bounded_memory(tmp_path):
    """A few hundred seeded mutations of a record file (wrong types, huge numbers, deep nesting, giant
    strings and lines, flipped bytes, cut files, junk) through load_records (+ write_jsonl and
    aggregate on what passed), `data.py validate`'s function and the importers' reader: anything but
    DataError/OSError escaping is a traceback in the subprocess. Its address space is capped at
    1.5 GiB, and its peak resident memory must stay far below."""
    limit = 3 * 2**29
    r = subprocess.run([sys.executable, "-c", FUZZ, ROOT, str(tmp_path), str(limit), "300"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    print(stats)
    assert stats["files"] == 300 and stats["ok"] and stats["refused"]
    assert stats["maxrss_mb"] < 600 and stats["seconds"] < 60
