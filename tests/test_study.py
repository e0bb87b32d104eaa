"""study.py: the smoke study end to end, killed (SIGKILL) in several stages and resumed without
redoing finished work or duplicating any, --labels, refused mixed settings, and the plans."""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace

import pytest

import data
import demo
import rate
import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = study.SIZES["smoke"]
CORPORA = study.corpora(SMOKE)  # damage-6, damage-12, chitchat, demo (smoke keeps every axis: drop_blind off)
N_RUNS = len(CORPORA) * len(study.run_names(SMOKE))


def events(out):
    return study.Log(os.path.join(out, "study.log.jsonl")).events()


def rating_keys(raw):
    with open(raw) as f:
        return [(r["id"], x["axis"], x["rater"], x["prompt"], x.get("sample", 0))
                for r in map(json.loads, f) for x in r.get("ratings", [])]


def summary_keys(raw):
    with open(raw) as f:
        return [(r["id"], axis) for r in map(json.loads, f) for axis in r.get("summaries", {})]


def start(out, results, log):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "a") as f:  # to a file: a full pipe would stall the study
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "study.py"), "--smoke", "--out", out,
                                 "--results", results], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def kill_when(proc, ready, timeout=180):
    """SIGKILL proc as soon as ready() holds; False if it finished first."""
    t0 = time.time()
    while proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        assert time.time() - t0 < timeout, "the smoke study hung"
        time.sleep(0.01)
    return False


def check_finished(out, results):
    """Every output there, no rating or summary twice, every run trained (to the end) at most once."""
    keys = rating_keys(os.path.join(out, "raw.jsonl"))
    assert len(keys) == len(set(keys)) == 8 * 3 * 4 * 1  # conversations x axes x strategies x samples
    sums = summary_keys(os.path.join(out, "raw.jsonl"))
    assert len(sums) == len(set(sums))
    runs = sorted(glob.glob(os.path.join(out, "*", "runs", "*")))
    assert len(runs) == N_RUNS and all(os.path.exists(os.path.join(r, "done.json")) for r in runs)
    for r in runs:
        with open(os.path.join(r, "metrics.jsonl")) as f:
            steps = [row["step"] for row in map(json.loads, f) if "loss" in row]
        assert steps == sorted(set(steps)), r  # a resumed run logs each step once
    trained = Counter(e["what"] for e in events(out) if e["stage"] == "training" and e["event"] == "unit")
    assert max(trained.values()) == 1
    for corpus in CORPORA:
        for name in ("compare.md", "compare.json", "summary.csv", "analysis.json"):
            assert os.path.exists(os.path.join(results, corpus, name)), (corpus, name)
        with open(os.path.join(results, corpus, "compare.json")) as f:
            columns = list(json.load(f)["table"]["overall"])
        assert "explanation+rw" in columns and "random+rw" in columns and columns.index("explanation+rw") == \
            columns.index("explanation") + 1  # the dilution control beside the variant it controls
    with open(os.path.join(results, "study.json")) as f:
        s = json.load(f)
    assert s["seeds"] == [0, 1] and s["runs_per_corpus"] == N_RUNS // len(CORPORA) and s["conversations"] == 8
    assert set(s["wall_s"]) == set(study.STAGES) and s["machine"]["cpu_count"] and s["machine"]["torch"]
    assert s["items"]["chitchat"]["all"] == 24 and s["items"]["demo"]["all"] == 72
    small, large = (s["items"][f"damage-{n}"] for n in SMOKE.train_sizes)
    assert (small["train"], large["train"]) == tuple(3 * n for n in SMOKE.train_sizes)
    assert small["test"] == large["test"] > 0 and small["val"] == large["val"] == 3 * SMOKE.val_conversations
    assert s["corpora"] == CORPORA and set(s["sources"]) == {"chitchat", "damage"}
    return s


def test_smoke_end_to_end(tmp_path, capsys):
    out, results = str(tmp_path / "s"), str(tmp_path / "r")
    t0 = time.time()
    assert study.main(["--smoke", "--out", out, "--results", results]) == 0
    seconds = time.time() - t0
    text = capsys.readouterr().out
    assert "estimate" in text and "[6/6 results]" in text
    assert "===== chitchat: variants x seeds" in text and "===== demo: variants x seeds" in text
    assert "Against label-only" in text and "label (2 seeds)" in text
    assert "label distribution per axis" in open(os.path.join(results, "aggregation.txt")).read()
    with open(os.path.join(results, "rater_check.json")) as f:  # every axis x strategy, real vs worsened
        check = json.load(f)
    assert {(r["axis"], r["prompt"]) for r in check["rows"]} == {(a, p) for a in data.AXES for p in rate.STRATEGIES}
    assert all(r["n"] >= 2 for r in check["rows"])
    assert "rater check (AUC" in open(os.path.join(results, "aggregation.txt")).read()
    check_finished(out, results)
    with capsys.disabled():  # how long it took is printed, never asserted: the suite holds no wall clock
        print(f"\nsmoke study: {seconds:.1f} s")

    # a finished study reruns as a no-op: every stage skipped, nothing rewritten
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
              if os.path.isfile(p) and not p.endswith("study.log.jsonl")}
    assert study.main(["--smoke", "--out", out, "--results", results]) == 0
    assert "===== chitchat" in capsys.readouterr().out
    last = events(out)[-len(study.STAGES):]
    assert [e["event"] for e in last] == ["skip"] * len(study.STAGES)
    assert before == {p: os.path.getmtime(p) for p in before}


@pytest.mark.slow
def test_smoke_killed_and_resumed(tmp_path):
    out, results, log = str(tmp_path / "s"), str(tmp_path / "r"), str(tmp_path / "log.txt")
    raw = os.path.join(out, "raw.jsonl")

    def has_rating():
        return os.path.exists(raw) and os.path.getsize(raw) > 0

    def n_done():
        return len(glob.glob(os.path.join(out, "*", "runs", "*", "done.json")))

    kills = [("ratings", has_rating),                                      # inside rate.py's appends
             ("training", lambda: n_done() >= 1),                          # between or inside runs
             ("training", lambda: n_done() >= N_RUNS // len(CORPORA) + 1),  # in the second corpus
             ("results", lambda: bool(glob.glob(os.path.join(out, "*", "runs", "*", "eval-test")))),
             ("results", lambda: os.path.isdir(os.path.join(out, "chitchat", "analysis")))]
    killed, mtimes = [], None
    for stage, ready in kills:
        killed.append((stage, kill_when(start(out, results, log), ready)))
        if mtimes is None:  # written before the first kill: never written again
            mtimes = {p: os.path.getmtime(os.path.join(out, p)) for p in
                      ("conversations.jsonl", "demo/train.jsonl", "models.json", "settings.json")}
    assert killed[0] == ("ratings", True)
    proc = start(out, results, log)
    assert proc.wait(timeout=300) == 0, open(log).read()[-3000:]
    text = open(log).read()
    assert "===== chitchat: variants x seeds" in text
    check_finished(out, results)
    assert mtimes == {p: os.path.getmtime(os.path.join(out, p)) for p in mtimes}
    done = Counter(e["stage"] for e in events(out) if e["event"] == "done")
    assert all(done[s] == 1 for s in study.STAGES), done  # each stage finished exactly once
    starts = Counter(e["stage"] for e in events(out) if e["event"] == "start")
    assert starts["conversations"] == starts["corpus"] == starts["models"] == 1
    print("killed in:", killed)


def test_labels_skip_conversations_and_ratings(tmp_path, monkeypatch, capsys):
    """--labels FILE starts from labelled records: stage 1 and the rater's ratings are skipped, the rest runs."""
    labels = tmp_path / "labels.jsonl"
    recs = [{"id": f"chitchat-x{i}", "dataset": "chitchat", "context": ["Hi!", "Hello, how was your day?"],
             "response": f"Long, but good {i}.", "axis": axis, "label": 1 + i % 5,
             "explanation": "Friendly and on topic."} for i in range(20) for axis in ("naturalness", "on_topic")]
    labels.write_text("".join(json.dumps(r) + "\n" for r in recs))
    small = replace(study.SIZES["smoke"], seeds=(0,), variants=("label", "explanation"), rw_variants=("explanation",))
    monkeypatch.setitem(study.SIZES, "smoke", small)
    out, results = str(tmp_path / "s"), str(tmp_path / "r")
    assert study.main(["--smoke", "--labels", str(labels), "--out", out, "--results", results]) == 0
    text = capsys.readouterr().out
    assert "[1/6 conversations] done, skipped (--labels" in text
    assert "  chitchat: axes kept naturalness, on_topic\n" in text  # the labels' own axes, nothing rated
    assert not os.path.exists(os.path.join(out, "raw.jsonl"))
    with open(os.path.join(out, "chitchat-train.jsonl")) as f:
        assert [json.loads(line) for line in f] == recs
    with open(os.path.join(results, "study.json")) as f:
        s = json.load(f)
    assert s["settings"]["labels"] == str(labels) and s["items"]["chitchat"]["all"] == 40
    assert len(glob.glob(os.path.join(out, "*", "runs", "*", "done.json"))) == len(study.corpora(small)) * 3


def test_other_settings_refused(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"size": {"name": "quick"}, "labels": None}))
    assert study.main(["--smoke", "--out", str(out), "--results", str(tmp_path / "r")]) == 2
    assert "started with other settings" in capsys.readouterr().err


def test_dry_run_prints_every_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert study.main(["--dry-run"]) == 0
    text = capsys.readouterr().out
    for name in study.SIZES:
        assert f"study '{name}'" in text
    assert text.count("  estimate  ") == len(study.SIZES)
    assert os.listdir(tmp_path) == []  # nothing ran, nothing written
    est = {name: study.estimate(size) for name, size in study.SIZES.items()}
    assert sum(est["smoke"].values()) < 60
    assert sum(est["quick"].values()) <= 10 * 60                # the budgets on 2 cores
    assert sum(est["default"].values()) <= 120 * 60
    assert "N >= (1.96 / 0.04)^2 x q" in text                  # the power arithmetic is part of the plan
    assert est["paper"]["training"] is None                    # GPU speeds were never measured
    assert study.main(["--dry-run", "--quick", "--labels", "x.jsonl"]) == 0
    assert "none (--labels)" in capsys.readouterr().out


def test_label_collapse_warning():
    recs = [{"axis": "naturalness", "label": 4}] * 9 + [{"axis": "naturalness", "label": 3}] + \
           [{"axis": "on_topic", "label": k} for k in (1, 2, 3, 4, 5)]
    dist, warnings = study.label_distribution(recs)
    assert dist["naturalness"] == {"1": 0, "2": 0, "3": 1, "4": 9, "5": 0}
    assert len(warnings) == 1 and "naturalness" in warnings[0] and "90%" in warnings[0]


def test_smoke_rater_answers_in_format(tmp_path):
    """The scripted rater's sampled answers parse, with varied scores."""
    import data
    import rate
    from model import load_model

    text = tmp_path / "text.txt"
    text.write_text("Hi there, how are you doing today?\nFine, thanks for asking.\n")
    path = demo.build_smoke_rater(str(tmp_path / "rater"), str(text))
    model, tok = load_model(path), data.Tokenizer(path)
    conv = {"context": ["Hi there, how are you doing today?"], "response": "Fine, thanks for asking."}
    prompt = tok.chat(rate.rating_prompt(conv, "naturalness", data.AXES["naturalness"], rate.STRATEGIES["scale5"]),
                      template=tok.template or "inst")  # as rate.py asks
    out = rate.rate_batch(model, tok, [prompt] * 32, [5] * 32, list(range(32)), start=rate.EXPLANATION_START,
                          max_new_tokens=20, temperature=0.7, retries=0, seed=0)
    assert all(status == "ok" for status, _ in out)
    assert {v[2] for _, v in out} == {"Fluent reply."} and len({v[0] for _, v in out}) >= 3


def test_committed_comparison_is_recomputed_from_the_committed_predictions(tmp_path):
    """results/default holds, per corpus, every run's train_config.json and test predictions: eval.py
    compare on those folders gives the committed compare.json again, figure for figure."""
    import eval as evaluate

    results = os.path.join(ROOT, "results", "default")
    with open(os.path.join(results, "study.json")) as f:
        summary = json.load(f)
    assert summary["corpora"]
    for corpus in summary["corpora"]:
        runs = sorted(glob.glob(os.path.join(results, corpus, "runs", "*")))
        assert len(runs) == summary["runs_per_corpus"]
        again = evaluate.compare(evaluate.CompareConfig(runs, out=str(tmp_path / corpus)))
        with open(os.path.join(results, corpus, "compare.json")) as f:
            committed = json.load(f)
        assert json.loads(json.dumps(again["table"])) == committed["table"]
        assert json.loads(json.dumps(again["versus_label"])) == committed["versus_label"]


def test_committed_damage_labels_are_made_again_from_the_package():
    """The committed damage corpora are damage.make_records of the chitchat-dataset package at the
    study's seed and size, subset as study.py subsets them: a reader can rebuild every label."""
    import damage

    results = os.path.join(ROOT, "results", "default")
    size = study.SIZES["default"]
    made = damage.make_records(study.study_conversations(size), seed=size.seed, n=size.damage_conversations)
    pilot = {r["id"] for r in data.load_records(os.path.join(ROOT, "results", "pilot", "pilot-all.jsonl"))}
    assert pilot and not pilot & {r["id"] for r in made}  # the pilot's conversations are never the study's
    with open(os.path.join(results, "sources.json")) as f:
        kept = json.load(f)["damage"]["kept"]
    for n in size.train_sizes:
        committed = data.load_records(os.path.join(results, f"damage-{n}.jsonl"))
        assert committed == damage.subset([r for r in made if r["axis"] in kept], n, size.seed, size.val_conversations)
