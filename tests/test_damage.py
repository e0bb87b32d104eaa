"""damage.py: labels by construction. Each grade changes the reply by the stated amount and nothing
else, grades are balanced, every axis of a conversation shares its split, subsets nest, the signal
check separates a grade the model can see from one it cannot, and the commands answer in one line."""
import json
import random
from collections import Counter

import numpy as np
import pytest

import damage
import data

WORDS = "so I went to the market this morning and bought some apples for a pie".split()  # 15 words


def convs(n=120):
    rng = random.Random(0)
    vocab = "the a cat dog ran home quickly today we they sang loud music every night under stars".split()
    return [{"id": f"c{i}", "dataset": "chitchat", "context": ["Hi, what did you do today?", f"Turn {i} before."],
             "response": " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 40)))} for i in range(n)]


@pytest.mark.parametrize("grade", [1, 2, 3, 4, 5])
def test_comprehensiveness_keeps_the_stated_prefix(grade):
    out, why = damage.comprehensiveness(WORDS, grade, None, random.Random(0))
    keep = max(2, round(damage.FRACTIONS["comprehensiveness"][grade] * len(WORDS)))
    assert out == WORDS[:keep]
    assert ("complete" in why) == (grade == 5) and " ".join(out[-2:]) in why


@pytest.mark.parametrize("grade", [1, 2, 3, 4, 5])
def test_naturalness_moves_the_stated_share_of_words_and_keeps_them_all(grade):
    out, why = damage.naturalness(WORDS, grade, None, random.Random(grade))
    assert sorted(out) == sorted(WORDS)  # same words, other order
    moved = sum(a != b for a, b in zip(out, WORDS))
    want = len(WORDS) - round(damage.FRACTIONS["naturalness"][grade] * len(WORDS))
    assert moved == (0 if grade == 5 else max(want, 2))  # every chosen word leaves its place


@pytest.mark.parametrize("grade", [1, 2, 3, 4, 5])
def test_on_topic_splices_the_stated_share_of_another_reply(grade):
    other = "completely different words about football scores and the weather in spain last week".split()
    out, why = damage.on_topic(WORDS, grade, other, random.Random(0))
    keep = round(damage.FRACTIONS["on_topic"][grade] * len(WORDS))
    assert out[:keep] == WORDS[:keep] and not set(out[keep:]) & set(WORDS) - set(other)
    assert out[keep:] == other[len(other) - len(out[keep:]):]  # the other reply's end
    assert ("another conversation" in why) == (grade == 1) and ("whole reply answers" in why) == (grade == 5)


def test_records_grades_splits_and_determinism():
    recs = damage.make_records(convs(), seed=3)
    assert recs == damage.make_records(convs(), seed=3)  # a pure function of (conversations, seed)
    assert recs != damage.make_records(convs(), seed=4)
    assert Counter(r["axis"] for r in recs) == {a: 120 for a in damage.DAMAGE}
    grades = Counter(r["label"] for r in recs)
    assert set(grades) == set(damage.GRADES) and min(grades.values()) > 0.2 * len(recs)
    for r in recs:
        data.check_record(r, need_explanation=True)  # valid training records
        assert len(r["context"]) == damage.KEEP_TURNS
        original = next(c for c in convs() if c["id"] == r["id"])["response"]
        assert (r["response"] == original) == (r["label"] == 5) or r["axis"] == "naturalness"
    by_id = {}
    for r in recs:  # the axes of one conversation share its id, hence its split
        by_id.setdefault(r["id"], set()).add(data.split_of(r["id"]))
    assert all(len(s) == 1 for s in by_id.values())


def test_skip_takes_other_conversations_and_short_replies_are_left_out():
    cs = convs() + [{"id": "short", "dataset": "chitchat", "context": ["Hi"], "response": "too short"}]
    a = {r["id"] for r in damage.make_records(cs, n=40)}
    b = {r["id"] for r in damage.make_records(cs, n=40, skip=40)}
    assert len(a) == len(b) == 40 and not a & b and "short" not in a | b
    with pytest.raises(data.DataError, match="only 80 conversations"):
        damage.make_records(cs, n=100, skip=40)


def test_subsets_nest_and_share_the_test_split():
    recs = damage.make_records(convs(300))
    small, large = damage.subset(recs, 20, n_val=5), damage.subset(recs, 60, n_val=5)
    split = lambda rs, s: [r for r in rs if data.split_of(r["id"]) == s]  # noqa: E731
    assert split(small, "test") == split(large, "test") == split(recs, "test")
    assert len({r["id"] for r in split(small, "train")}) == 20 and len(split(large, "train")) == 3 * 60
    assert all(r in large for r in split(small, "train")) and split(small, "val") == split(large, "val")


def test_spearman():
    x = np.array([1, 1, 3, 3, 5, 5])
    assert damage._spearman(x, np.array([0.1, 0.2, 0.5, 0.4, 0.9, 1.0])) == pytest.approx(16 / (16 * 17.5) ** 0.5, abs=1e-9)  # ranks by hand, ties averaged
    assert damage._spearman(x, -np.arange(6.0)) == pytest.approx(-damage._spearman(x, np.arange(6.0)))


def test_check_sees_a_grade_the_model_can_read_and_not_one_it_cannot(tmp_path, smollm2_gguf):
    """With the real SmolLM2: replies cut to two words end where no reply ends (low log-probability
    of the end of turn), so the grade correlates; labels shuffled at random do not."""
    import importers

    real, _ = importers.import_conversations("chitchat", [], n=200)
    recs = [r for r in damage.make_records(real, seed=0, n=60) if r["axis"] == "comprehensiveness"]
    real = damage.check(smollm2_gguf, recs, n=60)["comprehensiveness"]
    assert real["signal"] and real["spearman"] > 0.3 and real["ci95"][0] > 0
    rng = random.Random(1)
    shuffled = [dict(r, label=rng.choice(damage.GRADES)) for r in recs]
    blind = damage.check(smollm2_gguf, shuffled, n=60)["comprehensiveness"]
    assert not blind["signal"] and blind["ci95"][0] <= 0 and abs(blind["spearman"]) < real["spearman"]


def test_command_line(tmp_path, capsys):
    src = tmp_path / "convs.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in convs(30)))
    out = tmp_path / "d.jsonl"
    assert damage.main(["make", "--input", str(src), "--out", str(out), "--n", "10"]) == 0
    assert len(data.load_records(str(out))) == 30
    assert damage.main(["make", "--input", str(src), "--out", str(out), "--n", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: only 30 conversations")


@pytest.mark.parametrize("argv", [["--bogus"], ["make", "--out", "x.jsonl", "--bogus"], ["check", "--bogus"],
                                  ["check", "--model", "nowhere", "--data", "missing.jsonl"]])
def test_bad_arguments_and_missing_files_are_one_error_line(argv, capsys):
    assert damage.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:")


def test_help_lists_the_commands(capsys):
    assert damage.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "\n  make " in out and "\n  check " in out
