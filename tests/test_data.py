"""data.py: records and their errors, aggregation, importers, variants, prompts, examples, splits,
batches, the demo corpus and the command line. CPU only, a few seconds."""
import collections
import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import data
import importers
from demo import DEMO_SETS, write_demo
from importers import import_conversations
from data import IGNORE_INDEX, VARIANTS, DataError, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo(str(tmp_path_factory.mktemp("demo")), n_per_dataset=12, n_corpus=400, vocab_size=600)


@pytest.fixture(scope="module")
def demo_records(demo):
    return data.load_records(demo["train"])


@pytest.fixture(scope="module", params=["mistral-v1", "demo"])
def tok(request, mistral_v1_model, demo):
    return Tokenizer(mistral_v1_model if request.param == "mistral-v1" else demo["tokenizer"])


def rec(**kw):
    r = {"id": "a", "dataset": "d", "context": ["Hi there!", "Hello, how are you?"], "response": "Fine, thanks.",
         "axis": "naturalness", "label": 4, "explanation": "Fluent and idiomatic, though a little curt."}
    r.update(kw)
    return r


def parts(ex, tok, order="rating_first"):
    """(rating tokens, explanation tokens) of an example's target (EOS dropped)."""
    target = ex.input_ids[ex.n_prompt:-1]
    n_rating = len(tok.encode(str(ex.label)))
    if order == "rating_first":
        return target[:n_rating], target[n_rating + len(tok.continuation("\nExplanation:")):]
    return target[-n_rating:], target[:-n_rating - len(tok.continuation("\nRating:"))]


# -------------------------------------------------------------------------------- examples, variants

@pytest.mark.parametrize("order", data.ORDERS)
def test_variants_share_the_prompt_and_mask_exactly_the_target(tok, demo_records, order):
    by_variant = {v: data.build_examples(demo_records, tok, v, order=order, seed=3) for v in VARIANTS}
    ids = [(e.id, e.axis) for e in by_variant["label"]]
    assert len(ids) == len(demo_records) == len(set(ids))
    for v, examples in by_variant.items():
        assert [(e.id, e.axis) for e in examples] == ids
        for e, base in zip(examples, by_variant["explanation"]):
            assert e.input_ids[:e.n_prompt] == base.input_ids[:base.n_prompt] or (v == "label" and order != "rating_first")
            assert e.input_ids[0] == tok.bos_id and e.input_ids[-1] == tok.eos_id
            assert e.labels == [IGNORE_INDEX] * e.n_prompt + e.input_ids[e.n_prompt:]
            rating, _ = parts(e, tok, order if v != "label" else "rating_first")
            assert rating == tok.encode(str(e.label))


def test_target_text_and_tokens_are_what_plain_encoding_gives(mistral_v1_model, demo):
    """The pieces (prompt, rating, separator, explanation) concatenate to the tokenisation of the whole text."""
    for path in (mistral_v1_model, demo["tokenizer"]):
        tok = Tokenizer(path)
        r = data.check_record(rec(explanation="Fluent  and\nidiomatic, though a little curt."))
        expl = "Fluent and idiomatic, though a little curt."  # whitespace normalised
        cases = {("label", "rating_first"): "4",
                 ("explanation", "rating_first"): f"4\nExplanation: {expl}",
                 ("explanation", "explain_first"): f"{expl}\nRating: 4"}
        for (variant, order), target in cases.items():
            (e,) = data.build_examples([r], tok, variant, order=order)
            prompt = data._prompt_body(r, data.AXES) + ("\n\nRating:" if target[0] == "4" else "\n\nExplanation:")
            assert e.input_ids == tok.encode(f"{prompt} {target}", bos=True, eos=True)
            assert tok.decode(e.input_ids[e.n_prompt:-1]) == target


def test_decision_position_predicts_the_digit_under_mistral_v1(mistral_v1_model, demo_records):
    tok = Tokenizer(mistral_v1_model)
    cand = data.rating_token_ids(tok)
    assert cand == [tok.sp.piece_to_id(str(d)) for d in range(1, 6)]
    for variant in ("label", "explanation", "random"):
        for order in data.ORDERS:
            examples = data.build_examples(demo_records[:40], tok, variant, order=order)
            batch = data.collate(examples, tok.pad_id)
            rows = torch.arange(len(examples))
            predicted = batch["targets"][rows, batch["decision_pos"]]
            assert predicted.tolist() == [cand[e.label - 1] for e in examples]
            assert batch["input_ids"][rows, batch["decision_pos"]].eq(tok.sp.piece_to_id("▁")).all()
            if order == "rating_first":  # one forward pass: nothing but '▁' comes before the digit
                assert all(e.decision_pos == e.n_prompt for e in examples)


def test_pseudo_explanations_match_length_vocabulary_and_words(tok, demo_records):
    pool_words = {w for r in demo_records for w in r["explanation"].split()}
    ordinary = set(tok.ordinary_ids())
    real = {(e.id, e.axis): parts(e, tok)[1] for e in data.build_examples(demo_records, tok, "explanation")}
    for variant in VARIANTS[2:]:
        for e in data.build_examples(demo_records, tok, variant, seed=7):
            mine, theirs = parts(e, tok)[1], real[(e.id, e.axis)]
            assert abs(len(mine) - len(theirs)) <= 2, (variant, e.id)
            if variant == "shuffled":  # the same words in another order, hence the same token count
                assert sorted(tok.decode(mine).split()) == sorted(tok.decode(theirs).split())
                assert len(mine) == len(theirs)
            elif variant == "bow":
                assert set(tok.decode(mine).split()) <= pool_words
            elif variant == "random":
                assert len(mine) == len(theirs) and set(mine) <= ordinary
            else:  # filler: one piece, repeated
                assert len(mine) == len(theirs) and set(mine) == {tok.encode(data.FILLER)[-1]}
    shuffled = [parts(e, tok)[1] for e in data.build_examples(demo_records, tok, "shuffled")]
    assert sum(s != r for s, r in zip(shuffled, real.values())) > len(real) // 2  # really reordered


def test_variants_are_deterministic_and_independent_of_record_order(mistral_v1_model, demo_records):
    tok = Tokenizer(mistral_v1_model)
    records = demo_records[:100]
    shuffled = random.Random(0).sample(records, len(records))
    for variant in ("shuffled", "bow", "random"):
        a = {(e.id, e.axis): e.input_ids for e in data.build_examples(records, tok, variant, seed=1)}
        b = {(e.id, e.axis): e.input_ids for e in data.build_examples(shuffled, tok, variant, seed=1, pool=records)}
        c = {(e.id, e.axis): e.input_ids for e in data.build_examples(records, tok, variant, seed=2)}
        assert a == b
        assert sum(a[k] != c[k] for k in a) > len(a) // 2  # the seed matters


def test_inst_template(mistral_v1_model):
    tok, r = Tokenizer(mistral_v1_model), data.check_record(rec())
    (e,) = data.build_examples([r], tok, "explanation", template="inst")
    text = f"[INST] {data._prompt_body(r, data.AXES)} [/INST] Rating:"  # the chat encoding is the text's
    assert e.input_ids[:e.n_prompt] == tok.encode(text, bos=True)
    assert e.decision_pos == e.n_prompt and tok.decode(e.input_ids[e.n_prompt:]) == "4\nExplanation: " + r["explanation"]


def test_prompt_labels_turns_backwards_from_the_response(mistral_v1_model):
    tok, r = Tokenizer(mistral_v1_model), data.check_record(rec(context=["a", "b", "c"], axis="on_topic"))
    prompt = lambda e: tok.decode(e.input_ids[:e.n_prompt])  # noqa: E731
    (e,) = data.build_examples([r], tok, "explanation")
    assert prompt(e) == ("Rate the response's on-topic (sticks to the topic of the conversation) "
                         "from 1 to 5.\n\nUser: a\nAssistant: b\nUser: c\nResponse: Fine, thanks.\n\nRating:")
    (e,) = data.build_examples([r], tok, "explanation", order="explain_first")
    assert prompt(e).endswith("from 1 to 5.\n\nUser: a\nAssistant: b\nUser: c\nResponse: Fine, thanks.\n\nExplanation:")
    assert data._prompt_body(r, data.AXES, keep_turns=1).endswith("from 1 to 5.\n\nUser: c\nResponse: Fine, thanks.")


def test_truncation_drops_oldest_turns_never_response_or_target(mistral_v1_model, capsys):
    tok = Tokenizer(mistral_v1_model)
    turns = [f"Turn number {i} says something fairly long about the weather today." for i in range(30)]
    r = data.check_record(rec(context=turns))
    by_variant = {v: data.build_examples([r], tok, v, max_len=120)[0] for v in VARIANTS}
    e = by_variant["explanation"]
    assert len(e.input_ids) <= 120
    text = tok.decode(e.input_ids[:e.n_prompt])
    assert "Turn number 29" in text and "Turn number 0 " not in text and "Response: Fine, thanks." in text
    assert tok.decode(e.input_ids[e.n_prompt:]) == "4\nExplanation: " + r["explanation"]
    assert len({tuple(x.input_ids[:x.n_prompt]) for x in by_variant.values()}) == 1  # same cut everywhere
    assert all(len(x.input_ids) <= 120 for x in by_variant.values())
    # a response too long for max_len on its own is dropped, and said so
    long = data.check_record(rec(id="long", response="word " * 200))
    assert [x.id for x in data.build_examples([long, r], tok, "label", max_len=120)] == ["a"]
    assert "dropped 1 records longer than max_len=120" in capsys.readouterr().err


def test_explanation_variants_need_explanations(mistral_v1_model):
    tok, r = Tokenizer(mistral_v1_model), data.check_record(rec(explanation=None))
    assert len(data.build_examples([r], tok, "label")) == 1
    with pytest.raises(DataError, match="variant 'bow' needs an explanation on every record; 1 have none"):
        data.build_examples([r], tok, "bow")
    with pytest.raises(DataError, match="unknown variant 'lable'"):
        data.build_examples([r], tok, "lable")


def test_collate_shifts_once_and_pads(mistral_v1_model):
    tok = Tokenizer(mistral_v1_model)
    records = [data.check_record(rec(id=str(i), response="ok " * (i + 1), label=i + 1)) for i in range(3)]
    ex = data.build_examples(records, tok, "explanation")
    b = data.collate(ex, tok.pad_id)
    T = max(len(e.input_ids) for e in ex)
    assert b["input_ids"].shape == b["targets"].shape == b["attention_mask"].shape == (3, T)
    for i, e in enumerate(ex):
        n = len(e.input_ids)
        assert b["input_ids"][i, :n].tolist() == e.input_ids and b["input_ids"][i, n:].eq(tok.pad_id).all()
        assert b["targets"][i, :n - 1].tolist() == e.labels[1:] and b["targets"][i, n - 1:].eq(IGNORE_INDEX).all()
        assert b["attention_mask"][i].sum() == n
    assert b["label"].tolist() == [1, 2, 3] and b["decision_pos"].tolist() == [e.decision_pos for e in ex]


def test_text_examples(tmp_path, mistral_v1_model):
    tok = Tokenizer(mistral_v1_model)
    (tmp_path / "c.txt").write_text("First document.\nStill first.\n\n\nSecond one.\n")
    ex = data.text_examples(str(tmp_path / "c.txt"), tok, max_len=4)
    ids = tok.encode("First document.\nStill first.", bos=True, eos=True) + tok.encode("Second one.", bos=True, eos=True)
    assert [i for e in ex for i in e.input_ids] == ids and all(e.labels == e.input_ids for e in ex)
    assert max(len(e.input_ids) for e in ex) == 4


# ------------------------------------------------------------------------------------ splits, batches

def test_split_is_a_function_of_the_id_alone():
    ids = [f"item-{i}" for i in range(5000)]
    before = {i: data.split_of(i) for i in ids}
    more = ids[::2] + [f"new-{i}" for i in range(500)]
    random.Random(1).shuffle(more)
    after = {i: data.split_of(i) for i in more}
    assert all(after[i] == before[i] for i in ids[::2])
    share = collections.Counter(before.values())
    assert abs(share["test"] / 5000 - 0.2) < 0.03 and abs(share["val"] / 5000 - 0.1) < 0.03


def test_batches_are_bucketed_deterministic_and_resumable():
    ex = [data.Example(str(i), "d", "naturalness", 3, [1] * n, [1] * n, 0, 1)
          for i, n in enumerate(random.Random(0).choices(range(5, 300), k=1000))]
    b = data.batch_indices(ex, 8, seed=0, epoch=0)
    assert sorted(i for batch in b for i in batch) == list(range(1000))
    assert b == data.batch_indices(ex, 8, seed=0, epoch=0)
    assert b != data.batch_indices(ex, 8, seed=0, epoch=1) != data.batch_indices(ex, 8, seed=1, epoch=0)
    spread = sum(max(len(ex[i].input_ids) for i in x) - min(len(ex[i].input_ids) for i in x) for x in b) / len(b)
    assert spread < 30  # random batches of 8 from 5..300 would spread ~230


# ----------------------------------------------------------------------------- records and their errors

def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


BAD = [  # (second line of the file, kind, expected message after "FILE:2: ")
    ('{"id": "b", oops', "labelled", "not valid JSON (Expecting property name enclosed in double quotes, column 13)"),
    ("[1, 2]", "labelled", "expected a JSON object, got list"),
    (rec(id=None), "labelled", "field 'id': missing"),
    (rec(id="b", response=None), "labelled", "field 'response': missing"),
    (rec(id="b", response="  "), "labelled", "field 'response': must be a non-empty string, got '  '"),
    (rec(id="b", context={"a": 1}), "labelled", "field 'context': must be a string or a list of strings, got dict"),
    (rec(id="b", context=["x", 3]), "labelled", "field 'context': turn 2 must be a string, got int"),
    (rec(id="b", axis="fluency"), "labelled", "field 'axis': unknown axis 'fluency' (known: comprehensiveness, "
                                              "naturalness, on_topic; describe new ones with --axes)"),
    (rec(id="b", axis=None), "labelled", "field 'axis': missing"),
    (rec(id="b", label=7), "labelled", "field 'label': must be an integer 1-5, got 7"),
    (rec(id="b", label=3.5), "labelled", "field 'label': must be an integer 1-5, got 3.5"),
    (rec(id="b", label=True), "labelled", "field 'label': must be an integer 1-5, got True"),
    (rec(id="b", label=None), "labelled", "field 'label': missing"),
    (rec(id="b", explanation=5), "labelled", "field 'explanation': must be a non-empty string, got 5"),
    (rec(id="b", dataset=3), "labelled", "field 'dataset': must be a non-empty string, got 3"),
    (rec(), "labelled", "field 'id': duplicate id 'a' for axis 'naturalness' (first on line 1)"),
    ({**rec(id="b"), "ratings": [{"rater": "r", "prompt": "p", "axis": "naturalness", "scale": 7, "score": 3}]},
     "raw", "field 'ratings[0].scale': must be an integer 4-5, got 7"),
    ({**rec(id="b"), "ratings": [{"rater": "r", "prompt": "p", "axis": "naturalness", "scale": 4, "score": 5}]},
     "raw", "field 'ratings[0].score': must be an integer 1-4 (scale 4) or null, got 5"),
    ({**rec(id="b"), "ratings": [{"prompt": "p", "axis": "naturalness", "scale": 4, "score": 2}]},
     "raw", "field 'ratings[0].rater': missing"),
    ({**rec(id="b"), "ratings": "many"}, "raw", "field 'ratings': must be a list of ratings"),
]


@pytest.mark.parametrize("line,kind,message", BAD, ids=[m.split(":")[0][:40] for _, _, m in BAD])
def test_each_bad_record_has_its_one_line_message(tmp_path, line, kind, message):
    first = {**rec(), "ratings": []} if kind == "raw" else rec()
    path = write(tmp_path / "bad.jsonl", [first, line])
    with pytest.raises(DataError) as e:
        data.load_records(path, kind=kind)
    assert str(e.value) == f"{path}:2: {message}"


def test_missing_explanation_is_an_error_only_when_needed(tmp_path):
    path = write(tmp_path / "x.jsonl", [rec(), rec(id="b", explanation="")])
    assert "explanation" not in data.load_records(path)[1]
    with pytest.raises(DataError, match=r"x.jsonl:2: field 'explanation': missing \(the explanation variants need one\)"):
        data.load_records(path, need_explanation=True)


def test_skip_bad_counts_and_reports(tmp_path, capsys):
    path = write(tmp_path / "x.jsonl", [rec(), rec(id="b", label=9), "", "not json", rec(id="c")])
    skipped = []
    got = data.load_records(path, skip_bad=True, skipped=skipped)
    assert [r["id"] for r in got] == ["a", "c"]
    assert skipped == [f"{path}:2: field 'label': must be an integer 1-5, got 9",
                       f"{path}:4: not valid JSON (Expecting value, column 1)"]
    assert capsys.readouterr().err == ""  # the caller reports what it asked to collect
    assert len(data.load_records(path, skip_bad=True)) == 2
    assert f"{path}: skipped 2 bad records (first: {path}:2: field 'label'" in capsys.readouterr().err
    with pytest.raises(DataError, match="no valid records"):
        data.load_records(write(tmp_path / "y.jsonl", ["{}"]), skip_bad=True)


def test_csv_records(tmp_path):
    path = tmp_path / "x.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "dataset", "context", "response", "axis", "label", "explanation"])
        w.writerow(["a", "d", json.dumps(["Hi", "Ça va ?"]), "Oui,\nmerci.", "naturalness", "4", "Fluent."])
        w.writerow(["b", "d", "just one turn", "Sure.", "on_topic", "2", ""])
        w.writerow(["c", "d", "x", "y", "on_topic", "six", ""])
    with pytest.raises(DataError, match=r"x.csv:5: field 'label': must be an integer 1-5, got 'six'"):
        data.load_records(str(path))  # line 5: the quoted response of line 2 spans two lines
    a, b = data.load_records(str(path), skip_bad=True)
    assert a["context"] == ["Hi", "Ça va ?"] and a["label"] == 4 and a["response"] == "Oui,\nmerci."
    assert b["context"] == ["just one turn"] and "explanation" not in b


def test_custom_axes(tmp_path, mistral_v1_model):
    path = write(tmp_path / "x.jsonl", [rec(axis="politeness")])
    with pytest.raises(DataError, match="unknown axis 'politeness'"):
        data.load_records(path)
    (tmp_path / "axes.json").write_text(json.dumps({"politeness": "courteous and respectful"}))
    (tmp_path / "axes.txt").write_text("politeness: courteous and respectful\n")
    for axes in ({"politeness": "courteous and respectful"}, str(tmp_path / "axes.json"), str(tmp_path / "axes.txt")):
        (r,) = data.load_records(path, axes=axes)
        assert "politeness (courteous and respectful) from 1 to 5" in data._prompt_body(r, data.load_axes(axes))
        assert len(data.build_examples([r], Tokenizer(mistral_v1_model), "explanation", axes=axes)) == 1


# ------------------------------------------------------------------------------------------ aggregation

def raw_item(id, ratings, summaries=None, axis="naturalness"):
    """ratings: (rater, prompt, scale, score, explanation) tuples."""
    return {"id": id, "dataset": "d", "context": ["q"], "response": "r", "summaries": summaries or {},
            "ratings": [{"rater": a, "prompt": p, "axis": axis, "scale": s, "score": x, "explanation": e}
                        for a, p, s, x, e in ratings]}


def labels(items, **kw):
    records, report = data.aggregate(items, **kw)
    return {r["id"]: r["label"] for r in records}, records, report


def scores(id, *pairs):
    return raw_item(id, [(f"r{i}", "p", scale, s, f"e{i}") for i, (scale, s) in enumerate(pairs)])


def test_mean_rescales_mixed_scales_and_rounds_half_up():
    got, records, _ = labels([
        scores("mixed", (4, 4), (4, 1), (5, 3)),             # 5, 1, 3 -> 3
        scores("half", (5, 2), (5, 3)),                      # 2.5 -> 3 (round() would give 2)
        scores("thirds", (4, 2), (4, 2), (4, 2), (5, 3)),    # 7/3 * 3 + 3 = 10, / 4 = 2.5 exactly -> 3
        scores("below", (4, 2), (5, 4), (5, 4)),             # (7/3 + 8) / 3 = 3.44 -> 3
        scores("top", (4, 4), (5, 5)),                       # 5
    ])
    assert got == {"mixed": 3, "half": 3, "thirds": 3, "below": 3, "top": 5}
    by_id = {r["id"]: r for r in records}
    assert by_id["thirds"]["mean"] == 2.5 and by_id["below"]["mean"] == pytest.approx(3.4444, abs=1e-4)
    assert by_id["top"]["spread"] == 0 and by_id["mixed"]["n_ratings"] == 3


def test_median_and_majority_with_ties():
    items = [scores("odd", (5, 1), (5, 2), (5, 5)), scores("even", (5, 2), (5, 3)),
             scores("major", (5, 2), (5, 2), (5, 4), (5, 5)),
             scores("tie_median", (5, 2), (5, 2), (5, 4), (5, 4), (5, 5)),   # median 4 -> 4
             scores("tie_lower", (5, 2), (5, 2), (5, 4), (5, 4)),            # median 3, both 1 away -> 2
             scores("rescaled", (4, 3), (4, 3), (5, 3))]                     # 11/3 rounds to 4 twice -> 4
    assert labels(items, method="median")[0] == {"odd": 2, "even": 3, "major": 3, "tie_median": 4,
                                                 "tie_lower": 3, "rescaled": 4}
    assert labels(items, method="majority")[0] == {"odd": 2, "even": 2, "major": 2, "tie_median": 4,
                                                   "tie_lower": 2, "rescaled": 4}
    with pytest.raises(DataError, match="unknown aggregation method 'vote'"):
        data.aggregate(items, method="vote")


def test_golden_report_and_best():
    items = [scores("a", (5, 1), (5, 1), (5, 4)),   # mean 2, median 1
             scores("b", (5, 5), (5, 5), (5, 2)),   # mean 4, median 5
             scores("c", (5, 3), (5, 3), (5, 3))]
    golden = {("a", "naturalness"): 1, ("b", "naturalness"): 5, ("c", "naturalness"): 3}
    got, _, report = labels(items, method="best", golden=golden)
    assert report["golden"]["mean"] == {"n": 3, "mae": pytest.approx(2 / 3), "mse": pytest.approx(2 / 3)}
    assert report["golden"]["median"]["mae"] == 0 and report["method"] == "median"
    assert got == {"a": 1, "b": 5, "c": 3}
    with pytest.raises(DataError, match="needs a golden set"):
        data.aggregate(items, method="best")


def test_disagreement_threshold_drops_and_counts():
    items = [scores("split", (5, 1), (5, 5)), scores("calm", (5, 3), (5, 4))]
    got, records, report = labels(items, max_spread=1.0)
    assert got == {"calm": 4} and report["dropped"]["disagreement"] == 1
    assert {r["id"]: r["spread"] for r in data.aggregate(items)[0]} == {"split": 2.0, "calm": 0.5}


def test_explanation_choice():
    ratings = [("zed", "p", 5, 2, "far"), ("bob", "p", 5, 4, "close B"), ("amy", "p", 5, 4, "close A"),
               ("cat", "p", 5, 3, ""), ("dan", "p", 5, None, "failed")]   # mean of valid = 13/4 -> 3
    for order in (ratings, ratings[::-1]):
        (r,), _ = data.aggregate([raw_item("x", order)])
        assert r["explanation"] == "close A"  # |4 - 3.25| beats |2 - 3.25|; tie broken by rater name
    (r,), _ = data.aggregate([raw_item("x", ratings, summaries={"naturalness": "merged"})])
    assert r["explanation"] == "merged"


def test_merge_and_report():
    a = raw_item("x", [("m1", "scale4", 4, 4, "e"), ("m1", "scale5", 5, None, "")])
    b = raw_item("x", [("m2", "scale4", 4, 1, "e"), ("m2", "scale5", 5, 1, "e")], summaries={"naturalness": "s"})
    c = raw_item("y", [("m1", "scale4", 4, 3, "e"), ("m2", "scale4", 4, 3, "e")], axis="on_topic")
    records, report = data.aggregate([a, c, b])
    assert [(r["id"], r["axis"], r["n_ratings"]) for r in records] == [("x", "naturalness", 3), ("y", "on_topic", 2)]
    assert report["by_rater"]["m1"] == {"valid": 2, "failed": 1} and report["by_prompt"]["scale5"]["failed"] == 1
    assert report["agreement"]["m1 ~ m2"]["n"] == 2
    assert report["agreement"]["m1 ~ m2"]["mad"] == pytest.approx((4 + 0) / 2)
    assert "m1 ~ m2: n=2" in data.format_report(report)


# --------------------------------------------------------------------------------------------- importers

def test_import_chatbot_arena(tmp_path):
    good = {"question_id": "q1", "model_a": "m-a", "model_b": "m-b",
            "conversation_a": [{"role": "user", "content": "Wie spät ist es?"}, {"role": "assistant", "content": "Zwölf Uhr."}],
            "conversation_b": [{"role": "user", "content": "Wie spät ist es?"}, {"role": "assistant", "content": "Keine Ahnung 🤷"}]}
    bad = {**good, "question_id": "q2", "conversation_b": [{"role": "user", "content": "hi"}]}
    path = tmp_path / "arena.json"
    path.write_text(json.dumps([good, bad]), encoding="utf-8")
    records, problems = import_conversations("chatbot-arena", [str(path)])
    assert [r["id"] for r in records] == ["arena-q1-a", "arena-q1-b"]
    assert records[1]["context"] == ["Wie spät ist es?"] and records[1]["response"] == "Keine Ahnung 🤷"
    assert problems == [f"{path}: item 1: conversation_b must end with an assistant turn"]


def test_import_hh_rlhf(tmp_path):
    chosen = "\n\nHuman: ¿Qué hora es?\n\nAssistant: Son las doce.\n\nHuman: ¿Seguro?\n\nAssistant: Sí."
    path = write(tmp_path / "train.jsonl", [{"chosen": chosen, "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
                                           "{broken", {"chosen": "no turns here", "rejected": chosen}])
    records, problems = import_conversations("hh-rlhf", [path])
    assert [r["dataset"] for r in records] == ["hh-rlhf-chosen", "hh-rlhf-rejected"]
    assert records[0]["context"] == ["¿Qué hora es?", "Son las doce.", "¿Seguro?"] and records[0]["response"] == "Sí."
    assert records[0]["id"].startswith("hh-chosen-") and records[1]["id"].startswith("hh-rejected-")
    assert problems == [f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes, column 2)",
                        f"{path}:3: chosen: no 'Human:' turn followed by a final 'Assistant:' turn"]


def test_import_amazonqa(tmp_path):
    path = write(tmp_path / "qa.jsonl", [
        {"qid": "7", "asin": "B01", "questionText": "Est-ce étanche ?", "answers": [{"answerText": "Oui, très."}],
         "review_snippets": ["Great"]},
        {"asin": "B02", "questionText": "Does it fit?", "answers": []}])
    records, problems = import_conversations("amazonqa", [path])
    assert records == [{"id": "amazonqa-7", "dataset": "amazonqa", "context": ["Est-ce étanche ?"], "response": "Oui, très."}]
    assert problems == [f"{path}:2: empty question or no answers"]


def test_import_coqa(tmp_path):
    story = {"id": "s1", "story": "Åsa had a red bike.", "questions": [{"input_text": "What did Åsa have?"},
             {"input_text": "What colour?"}], "answers": [{"input_text": "a bike"}, {"input_text": "red"}]}
    path = tmp_path / "coqa.json"
    path.write_text(json.dumps({"version": "1.0", "data": [story, {**story, "id": "s2", "answers": []}]}), encoding="utf-8")
    records, problems = import_conversations("coqa", [str(path)], seed=0)
    (r,) = records
    k = int(r["id"].rsplit("-", 1)[1])  # the cut turn, chosen by hash(seed, story id)
    assert r["response"] == ["a bike", "red"][k - 1] and r["context"][0].startswith("Åsa had a red bike.\n\nWhat did")
    assert len(r["context"]) == 2 * k - 1
    assert problems == [f"{path}: item 1: 2 questions but 0 answers"]


def test_import_cornell_movie(tmp_path):
    sep = " +++$+++ "
    (tmp_path / "movie_lines.txt").write_bytes("\n".join([
        sep.join(["L1", "u0", "m0", "BIANCA", "Tu es allé au café ?"]), sep.join(["L2", "u2", "m0", "CAMERON", "Non."]),
        "L3 +++$+++ broken line", sep.join(["L4", "u0", "m0", "BIANCA", "Pourquoi ?"])]).encode("latin-1"))
    (tmp_path / "movie_conversations.txt").write_text("\n".join([
        sep.join(["u0", "u2", "m0", "['L1', 'L2', 'L4']"]), sep.join(["u0", "u2", "m0", "['L1', 'L9']"])]), encoding="latin-1")
    paths = [str(tmp_path / "movie_lines.txt"), str(tmp_path / "movie_conversations.txt")]
    records, problems = import_conversations("cornell-movie", paths)
    assert records == [{"id": "cornell-m0-L1", "dataset": "cornell-movie", "context": ["Tu es allé au café ?", "Non."],
                        "response": "Pourquoi ?"}]
    assert problems == [f"{paths[0]}:3: expected 5 fields, got 2", f"{paths[1]}:2: unknown or empty line id L9"]


def test_import_chitchat(tmp_path):
    said = lambda who, *texts: [{"text": t, "timestamp": "2018-05-02T19:38:15Z", "sender": who} for t in texts]
    convs = {"c1": {"messages": [said("a", "Hello", "How are you?"), said("b", "Fine!"), said("a", "Good to hear"),
                                 said("b", "  ", "And you?")]},
             "c2": {"messages": [said("a", "Anyone there?")]}}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(convs), encoding="utf-8")
    records, problems = import_conversations("chitchat", [str(path)], seed=0)
    (r,) = records
    k = int(r["id"].rsplit("-", 1)[1])  # the response turn, chosen by hash(seed, conversation id)
    turns = ["Hello How are you?", "Fine!", "Good to hear", "And you?"]  # a turn's messages joined, blanks dropped
    assert 1 <= k <= 3 and r["context"] == turns[:k] and r["response"] == turns[k] and r["dataset"] == "chitchat"
    assert problems == [f"{path}: conversation c2: 1 non-empty turn(s); a conversation needs a context and a response"]
    ks = {int(import_conversations("chitchat", [str(path)], seed=s)[0][0]["id"].rsplit("-", 1)[1]) for s in range(20)}
    assert len(ks) > 1  # the cut moves with the seed


def test_import_chitchat_from_the_installed_package():
    """With no file named, the chitchat-dataset package's own dataset.json (7,168 conversations, of
    which those of two or more turns can be cut)."""
    records, problems = import_conversations("chitchat", [])
    assert len(records) + len(problems) == 7168 and len(records) > 4000
    assert all(r["context"] and r["response"] for r in records)
    assert len({r["id"] for r in records}) == len(records)


def test_import_sampling_is_seeded_and_order_free(tmp_path):
    lines = [{"qid": str(i), "questionText": f"q{i}?", "answers": [{"answerText": "a"}]} for i in range(50)]
    a = write(tmp_path / "a.jsonl", lines)
    b = write(tmp_path / "b.jsonl", lines[::-1])
    pick = lambda p, seed: sorted(r["id"] for r in import_conversations("amazonqa", [p], n=10, seed=seed)[0])
    assert pick(a, 0) == pick(b, 0) and len(pick(a, 0)) == 10 and pick(a, 0) != pick(a, 1)
    out = str(tmp_path / "conv.jsonl")  # what rate.py reads
    data.write_jsonl(import_conversations("amazonqa", [a])[0], out)
    assert len(data.load_records(out, kind="conversation")) == 50


# ----------------------------------------------------------------------------------------- demo corpus

def test_demo_is_consistent_and_deterministic(demo, demo_records, tmp_path):
    assert len(demo_records) == 6 * 12 * 3
    assert {(r["dataset"], r["axis"]) for r in demo_records} == {(d, a) for d in DEMO_SETS for a in data.AXES}
    raw = data.load_records(demo["raw"], kind="raw")
    assert len(raw) > 6 * 12 * 3  # one line per rater and item, plus summary lines: merged by aggregate
    again = write_demo(str(tmp_path), n_per_dataset=12, n_corpus=400, vocab_size=600)
    for k in ("train", "raw", "corpus"):
        assert open(again[k], "rb").read() == open(demo[k], "rb").read()
    golden = {(r["id"], r["axis"]): r["label"] for r in data.load_records(demo["golden"], kind="golden")}
    _, report = data.aggregate(raw, golden=golden)
    assert report["golden"]["mean"]["mae"] <= report["golden"]["majority"]["mae"]  # as in the paper
    assert report["golden"]["mean"]["mae"] < 0.25
    assert Tokenizer(demo["tokenizer"]).vocab_size <= 600


def test_demo_label_needs_several_cues(tmp_path):
    """Every axis uses all five labels, and no single word of the response fixes the label."""
    paths = write_demo(str(tmp_path), n_per_dataset=60, n_corpus=10, vocab_size=400)
    records = data.load_records(paths["train"])
    for axis in data.AXES:
        mine = [r for r in records if r["axis"] == axis]
        assert set(r["label"] for r in mine) == {1, 2, 3, 4, 5}
        by_word = collections.defaultdict(collections.Counter)
        for r in mine:
            for w in set(r["response"].lower().split()):
                by_word[w][r["label"]] += 1
        for w, c in by_word.items():
            if sum(c.values()) >= 20:
                assert max(c.values()) / sum(c.values()) < 0.8, (axis, w, c)
                assert len(c) >= 3, (axis, w, c)
        # the explanations name what decided the label: good words rise with it
        good = [sum(p in r["explanation"] for p in ("fluent", "clean", "once", "real person", "warm", "ends cleanly",
                                                       "finishes", "two extra", "several", "reason", "why it works",
                                                       "includes an", "backs it", "fits", "stays", "actual", "what was asked",
                                                       "no digressions", "closes on the", "wraps up"))
                for r in mine]
        low = [g for g, r in zip(good, mine) if r["label"] <= 2]
        high = [g for g, r in zip(good, mine) if r["label"] >= 4]
        assert sum(high) / len(high) > sum(low) / len(low) + 1


def test_train_tokenizer(demo):
    tok = Tokenizer(demo["tokenizer"])
    line = "Rate the response's naturalness (fluent) from 1 to 5."
    assert tok.decode(tok.encode(line)) == line
    assert [tok.piece(i) for i in data.rating_token_ids(tok)] == ["1", "2", "3", "4", "5"]
    assert len(tok.encode("the response")) == 2  # common words are single pieces


# ---------------------------------------------------------------------------------------- command line

def test_cli(tmp_path, demo, capsys):
    assert data.main(["validate", demo["train"]]) == 0
    assert "216 valid labelled records, 0 bad; 18 (dataset, axis) settings" in capsys.readouterr().out
    assert data.main(["validate", demo["raw"]]) == 0 and "valid raw records" in capsys.readouterr().out
    bad = write(tmp_path / "bad.jsonl", [rec(), rec(id="b", label=0)])
    assert data.main(["validate", bad]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"error: {bad}:2: field 'label': must be an integer 1-5, got 0"
    out = str(tmp_path / "agg.jsonl")
    assert data.main(["aggregate", demo["raw"], "-o", out, "--method", "best", "--golden", demo["golden"]]) == 0
    assert "golden mean" in capsys.readouterr().out and len(data.load_records(out)) == 216
    assert data.main(["preview", demo["train"], "--variant", "shuffled", "--n", "2"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("=== ") == 2 and "Rating:⟦ ▶" in shown and "decision position" in shown
    assert data.main(["preview", demo["train"], "--tokenizer", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert data.main(["aggregate", str(tmp_path / "missing.jsonl"), "-o", out]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    qa = write(tmp_path / "qa.jsonl", [{"qid": "1", "questionText": "Why?", "answers": [{"answerText": "So."}]}, "{"])
    assert importers.main(["amazonqa", qa, "-o", out]) == 0
    assert capsys.readouterr().err == f"warning: {qa}:2: not valid JSON (Expecting property name enclosed in double quotes, column 1)\n"
    assert data.main(["validate", out]) == 0 and "1 valid conversation records" in capsys.readouterr().out


def test_cli_errors_are_one_line_and_help_lists_commands(tmp_path, capsys):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "validate", str(tmp_path / "none.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert data.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {c} " in out for c in ("validate", "aggregate", "preview")) and "importers.py" in out
    assert importers.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: importers.py") and all(f in out for f in importers.IMPORTERS) and "--out" in out


@pytest.mark.parametrize("main,argv", [(data.main, ["--bogus"]), (data.main, ["validate", "x.jsonl", "--bogus"]),
                                       (data.main, ["aggregate", "x.jsonl", "-o", "y.jsonl", "--bogus"]),
                                       (data.main, ["preview", "x.jsonl", "--bogus"]),
                                       (importers.main, ["--bogus"]), (importers.main, ["amazonqa", "-o", "y", "--bogus"])])
def test_a_bad_argument_is_one_error_line(main, argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:")


def test_byte_order_mark_is_accepted_and_bad_bytes_name_the_line(tmp_path):
    good = json.dumps(rec())
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n")
    assert data.load_records(str(bom))[0]["id"] == rec()["id"]
    csv_bom = tmp_path / "bom.csv"
    csv_bom.write_bytes(b"\xef\xbb\xbfid,dataset,context,response,axis,label\nx1,d,Hi,Hello,naturalness,4\n")
    assert data.load_records(str(csv_bom))[0]["id"] == "x1"
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes((good + "\n" + good.replace("Fine", "Caf\xe9")).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 text"):
        data.load_records(str(bad))
    with pytest.raises(DataError, match=r"missing.jsonl: no such file"):
        data.load_records(str(tmp_path / "missing.jsonl"))


def test_validate_judges_the_kind_from_every_record(tmp_path, capsys):
    """A first record without 'label' must not make the file a conversation file in which a later
    'label': 9 passes unchecked; --kind says it outright."""
    conv = {k: v for k, v in rec().items() if k not in ("label", "explanation", "axis")}
    path = write(tmp_path / "mixed.jsonl", [conv, rec(id="b", label=9)])
    assert data.main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "mixed.jsonl:1: field 'axis'" in err and "mixed.jsonl:2: field 'label': must be an integer 1-5, got 9" in err
    assert data.main(["validate", path, "--kind", "conversation"]) == 0
    shown = capsys.readouterr().out
    assert "2 valid conversation records" in shown and "(--kind conversation)" in shown


def test_import_and_aggregate_that_produce_nothing_fail(tmp_path, capsys):
    empty = write(tmp_path / "qa.jsonl", ["{"])
    out = str(tmp_path / "out.jsonl")
    assert importers.main(["amazonqa", empty, "-o", out]) == 2
    assert "no conversation could be read" in capsys.readouterr().err and not os.path.exists(out)
    assert importers.main(["amazonqa", empty, "-o", out, "--n", "-1"]) == 2
    assert "--n must be at least 1, got -1" in capsys.readouterr().err
    raw = write(tmp_path / "raw.jsonl", [{"id": "r1", "dataset": "d", "context": ["Hi"], "response": "Hello",
                                          "ratings": [{"rater": "m", "prompt": "scale5", "axis": "naturalness",
                                                       "scale": 5, "score": None, "error": "no score"}]}])
    assert data.main(["aggregate", raw, "-o", out]) == 2
    assert "aggregation left no training record" in capsys.readouterr().err and not os.path.exists(out)


def test_demo_corpus_only_command_writes_the_corpus_and_trains_nothing(tmp_path, capsys):
    import demo
    assert demo.main(["--corpus-only", "--out", str(tmp_path), "--n-per-dataset", "3"]) == 0
    records = data.load_records(str(tmp_path / "train.jsonl"))
    assert len(records) == 3 * 6 * 3 and "train.jsonl" in capsys.readouterr().out  # 3 items x 6 datasets x 3 axes
    assert sorted(os.listdir(tmp_path)) == ["conversations.jsonl", "corpus.txt", "golden.jsonl", "raw.jsonl",
                                            "tokenizer.model", "tokenizer.vocab", "train.jsonl"]  # no base/, no runs
