"""eval.py: metrics against hand-computed values, scoring against a plain full forward pass, the
comparison on synthetic runs with known differences, and scoring throughput."""
import json
import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch

import data
from demo import write_demo
import eval as ev
import lora
from runs import Run
from model import Config, Transformer, load_model, save_model


def read(path):
    with open(path) as f:
        return f.read()


def read_jsonl(path):
    return [json.loads(line) for line in read(path).splitlines()]


# ----------------------------------------------------------------------------- metrics

def test_metrics_against_hand_values():
    gold, pred = np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 4, 4])
    assert ev.accuracy(gold, pred) == 0.8
    assert ev.mae(gold, pred) == pytest.approx(0.2)
    assert ev.macro_f1(gold, pred) == pytest.approx((3 + 2 / 3 + 0) / 5)  # rating 4: 2/3, rating 5: 0
    # sum(W*O) = 1/16; sum(W*E) = (30 + 15 + 10 + 2 * 15) / 16 / 5 = 17/16 -> kappa = 1 - 1/17
    assert ev.qwk(gold, pred) == pytest.approx(16 / 17)
    assert ev.qwk(gold, gold) == 1.0
    assert ev.qwk(gold, 6 - gold) == pytest.approx(-1.0)  # inverted: sum(W*O) = 40/16, sum(W*E) = 20/16

    probs = np.array([[0.6, 0.1, 0.1, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]])
    gold2 = np.array([1, 2])
    assert ev.brier(probs, gold2) == pytest.approx((0.2 + 1.2) / 2)  # .16+4*.01 ; .36+.81+3*.01
    assert ev.nll(probs, gold2) == pytest.approx(-(np.log(0.6) + np.log(0.1)) / 2)


def test_metrics_single_class_and_perfect():
    three = np.array([3, 3, 3, 3])
    assert ev.qwk(three, three) == 1.0            # 0/0 by the formula: defined as perfect agreement
    assert ev.qwk(three, np.array([3, 3, 4, 2])) == pytest.approx(0.0)  # observed == expected
    assert ev.macro_f1(three, three) == 1.0
    assert ev.macro_f1(three, np.array([3, 3, 4, 2])) == pytest.approx((0 + 4 / 6 + 0) / 3)
    onehot = np.eye(5)[three - 1]
    assert ev.ece(onehot, three) == 0.0 and ev.brier(onehot, three) == 0.0
    assert ev.nll(onehot, three) == pytest.approx(0.0)
    assert ev.nll(np.eye(5)[[0, 0, 0, 0]], three) == pytest.approx(-np.log(1e-12))  # clipped, finite


def test_ece_and_reliability_bins():
    # confidences 0.9 (right), 0.9 (wrong), 0.35 (right), 0.35 (right)
    probs = np.array([[0.9, .025, .025, .025, .025]] * 2 + [[0.35, 0.30, 0.15, 0.1, 0.1]] * 2)
    gold = np.array([1, 2, 1, 1])
    assert ev.ece(probs, gold) == pytest.approx(0.5 * 0.4 + 0.5 * 0.65)
    rel = ev.reliability(probs, gold)
    assert rel[9] == (pytest.approx(0.9), 0.5, 2) and rel[3] == (pytest.approx(0.35), 1.0, 2)
    assert sum(n for _, _, n in rel) == 4 and rel[0][2] == 0


def test_unparsed_prediction_counts_as_wrong():
    rows = [{"id": "a", "dataset": "d", "axis": "x", "gold": 2, "predicted": None, "probs": [0.2] * 5},
            {"id": "b", "dataset": "d", "axis": "x", "gold": 4, "predicted": 4, "probs": [0, 0, 0, 1, 0]}]
    m = ev.metrics_by_setting(rows)
    assert m["overall"]["accuracy"] == 0.5 and m["overall"]["mae"] == 1.5   # scored as rating 5: |2 - 5| = 3
    assert list(m["settings"]) == ["d/x"] and m["settings"]["d/x"]["n"] == 2


def test_sign_test_and_bootstrap():
    assert ev.sign_test(4, 0) == pytest.approx(2 / 16)
    assert ev.sign_test(18, 0) == pytest.approx(2 / 2**18)
    assert ev.sign_test(3, 3) == 1.0 and ev.sign_test(0, 0) == 1.0
    assert ev.sign_test(1, 5) == pytest.approx(2 * 7 / 64)
    lo, hi = ev.paired_bootstrap(np.array([1.0] * 30 + [0.0] * 70), n_boot=500, seed=1)
    assert 0 < lo < 0.3 < hi < 0.5
    assert ev.paired_bootstrap(np.array([1.0] * 30 + [0.0] * 70), n_boot=500, seed=1) == (lo, hi)


# ----------------------------------------------------------------------------- scoring

def tiny_checkpoint(path, tokenizer_file, vocab_size, seed=0):
    torch.manual_seed(seed)
    cfg = Config(arch="mistral", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, n_layers=2,
                 n_heads=4, n_kv_heads=2, max_position_embeddings=1024, torch_dtype="float32")
    save_model(Transformer(cfg), path)
    shutil.copy(tokenizer_file, os.path.join(path, "tokenizer.model"))
    return path


def fake_run(tmp_path, tokenizer_file, vocab_size, data_file):
    """A run folder as train.py leaves it: train_config.json and a best/ adapter (non-zero LoRA B)."""
    base = tiny_checkpoint(str(tmp_path / "base"), tokenizer_file, vocab_size)
    model = load_model(base)
    torch.manual_seed(1)
    lora.add_lora(model, rank=4, alpha=8)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    run = tmp_path / "run"
    lora.save_adapter(model, str(run / "best"))
    cfg = {"model": base, "data": data_file, "variant": "explanation", "order": "rating_first", "template": "base",
           "axes": "", "datasets": "", "max_len": 512, "seed": 0, "quantize": "", "skip_bad": False, "full": False}
    (run / "train_config.json").write_text(json.dumps(cfg))
    return str(run), base


def full_forward_probs(model, example, rating_ids):
    """The reference: every position's logits, read at the decision position."""
    with torch.no_grad():
        logits = model(torch.tensor([example.input_ids]))[0, example.decision_pos]    # (V,)
    return torch.softmax(logits[rating_ids].double(), -1).numpy()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo corpus, small: 144 rated records and a tokenizer trained on its text."""
    return write_demo(str(tmp_path_factory.mktemp("demo")), n_per_dataset=8, n_corpus=300, vocab_size=500)


@pytest.mark.parametrize("which", ["mistral_v1", "demo"])
def test_score_run_equals_full_forward_at_decision_position(which, demo, tmp_path, request):
    tok_file = request.getfixturevalue("mistral_v1_model") if which == "mistral_v1" else demo["tokenizer"]
    tok = data.Tokenizer(tok_file)
    run, base = fake_run(tmp_path, tok_file, tok.vocab_size, demo["train"])
    m = ev.score_run(run, split="test", batch_size=4)

    rows = read_jsonl(os.path.join(run, "eval-test", "predictions.jsonl"))
    records = data.load_records(demo["train"])
    test = [r for r in records if data.split_of(r["id"]) == "test"]
    assert len(rows) == len(test) == m["overall"]["n"] > 0
    assert {r["dataset"] + "/" + r["axis"] for r in test} == set(m["settings"])
    model = load_model(base)
    lora.load_adapter(model, os.path.join(run, "best"))
    model.eval()
    rating_ids = data.rating_token_ids(tok)
    examples = {(e.id, e.axis): e for e in data.build_examples(test, tok, "explanation", max_len=512)}
    for r in rows:
        e = examples[r["id"], r["axis"]]
        assert e.input_ids[e.decision_pos + 1] == rating_ids[e.label - 1]  # the position predicts the rating
        np.testing.assert_allclose(r["probs"], full_forward_probs(model, e, rating_ids), atol=1e-5)
        assert r["predicted"] == int(np.argmax(r["probs"])) + 1 and r["gold"] == e.label
    saved = json.loads(read(os.path.join(run, "eval-test", "metrics.json")))
    assert saved["overall"] == m["overall"] and set(m["overall"]) == {*ev.METRICS, "n"}
    assert m["examples_per_s"] > 0 and m["unparsed"] == 0

    # zero-shot through the command line: the base model alone
    out = tmp_path / "zero"
    ev.main(["--model", base, "--data", demo["train"], "--out", str(out)])
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == len(test)
    plain = load_model(base)
    examples = {(e.id, e.axis): e for e in data.build_examples(test, tok, "label")}
    for r in rows:
        np.testing.assert_allclose(r["probs"], full_forward_probs(plain, examples[r["id"], r["axis"]], rating_ids),
                                   atol=1e-5)


def test_explain_first_parses_generated_rating(mistral_v1_model, demo, tmp_path, monkeypatch):
    tok = data.Tokenizer(mistral_v1_model)
    rating_ids = data.rating_token_ids(tok)
    answer = lambda text, r: tok.encode(text) + tok.continuation("\nRating:") + tok.encode(str(r))
    assert ev.find_rating(answer(" Fluent, 3 words.", 4), tok) == len(answer(" Fluent, 3 words.", 4)) - 1
    assert ev.find_rating(tok.encode(" Fluent, 3 words. Rating 4"), tok) is None
    assert ev.find_rating(answer(" Fine.", 4)[:-1], tok) is None

    records = data.load_records(demo["train"])[:12]
    model = load_model(tiny_checkpoint(str(tmp_path / "base"), mistral_v1_model, tok.vocab_size))
    examples = data.build_examples(records, tok, "explanation", order="explain_first")
    outputs = [answer(" Fine.", 1 + i % 5) + [tok.eos_id] if i % 4 else tok.encode(" no rating") for i in range(12)]
    by_prompt = {tuple(e.input_ids[:e.n_prompt]): o for e, o in zip(examples, outputs)}
    monkeypatch.setattr(ev, "generate", lambda model, prompts, **kw: [by_prompt[tuple(p)] for p in prompts])
    probs, pred = ev.score_examples(model, examples, tok, batch_size=5, order="explain_first")
    for i, (e, out) in enumerate(zip(examples, outputs)):
        if i % 4 == 0:
            assert pred[i] == 0 and np.allclose(probs[i], 0.2)
            continue
        assert pred[i] == 1 + i % 5
        seq = e.input_ids[:e.n_prompt] + out[:-2]   # the prompt and the answer up to the rating token
        ref = data.Example(e.id, e.dataset, e.axis, e.label, seq, seq, len(seq) - 1, e.n_prompt)
        np.testing.assert_allclose(probs[i], full_forward_probs(model, ref, rating_ids), atol=1e-5)


def test_scoring_runs_the_lm_head_at_one_position_per_example(mistral_v1_model):
    """Scoring equals full-sequence logits read at the decision position, with the LM head run on one
    position per example (how much faster that is: bench/score.py, beside transformers)."""
    tok = data.Tokenizer(mistral_v1_model)
    torch.manual_seed(0)
    model = Transformer(Config(arch="mistral", vocab_size=32000, hidden_size=64, intermediate_size=128, n_layers=1,
                               n_heads=4, n_kv_heads=2, max_position_embeddings=1024, torch_dtype="float32")).eval()
    rng = random.Random(0)
    examples = [data.Example(f"x{i}", "d", "naturalness", 3, ids, ids, len(ids) - 2, len(ids) - 2)
                for i in range(16) for ids in [[rng.randrange(3, 32000) for _ in range(384)]]]
    rating_ids = data.rating_token_ids(tok)

    def full_sequence(batch):
        logits = model(batch["input_ids"])                                            # (B, T, V)
        return logits[torch.arange(len(batch["label"])), batch["decision_pos"]][:, rating_ids].softmax(-1)

    head_inputs = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: head_inputs.append(tuple(args[0].shape)))
    with torch.no_grad():
        for i in range(0, len(examples), 4):
            part = examples[i:i + 4]
            probs, _ = ev.score_examples(model, part, tok, batch_size=4)
            assert head_inputs.pop() == (4, 64)  # (B, D): one position per example, not (B, T, D)
            full = full_sequence(data.collate(part, tok.pad_id))
            head_inputs.pop()
            np.testing.assert_allclose(probs, full.double().numpy(), atol=1e-5)
    hook.remove()


# ----------------------------------------------------------------------------- comparison

SETTINGS = [(d, a) for d in ("amazonqa", "coqa") for a in ("naturalness", "on_topic")]


def write_fake_predictions(root, variant, seed, n_correct, n_items=10, drop=0):
    """A run whose every setting has n_correct of n_items right (n_correct: int or per-setting list)."""
    run = os.path.join(root, f"{variant}-s{seed}")
    os.makedirs(os.path.join(run, "eval-test"))
    with open(os.path.join(run, "train_config.json"), "w") as f:
        json.dump({"variant": variant, "seed": seed, "order": "rating_first"}, f)
    with open(os.path.join(run, "done.json"), "w") as f:
        json.dump({"step": 1}, f)
    rows = []
    for k, (d, a) in enumerate(SETTINGS):
        right = n_correct[k] if isinstance(n_correct, list) else n_correct
        for i in range(n_items):
            gold = 1 + i % 5
            pred = gold if i < right else 1 + (gold % 5)
            probs = [0.1] * 5
            probs[pred - 1] = 0.6
            rows.append({"id": f"{d}-{i}", "dataset": d, "axis": a, "gold": gold, "predicted": pred, "probs": probs})
    with open(os.path.join(run, "eval-test", "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[drop:])
    return run


@pytest.fixture
def grid(tmp_path):
    root = str(tmp_path / "grid")
    runs = []
    for seed in (0, 1):
        runs.append(write_fake_predictions(root, "label", seed, 5))
        runs.append(write_fake_predictions(root, "explanation", seed, 8))
        runs.append(write_fake_predictions(root, "shuffled", seed, 6 + seed))    # 0.65 +- 0.0707
        runs.append(write_fake_predictions(root, "random", seed, [4, 4, 5, 4]))  # worse than label
    return root, runs


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_compare_reproduces_known_differences(grid, tmp_path, monkeypatch, capsys, with_matplotlib):
    if with_matplotlib:
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    _, runs = grid
    out = str(tmp_path / "cmp")
    s = ev.compare(ev.CompareConfig(runs, out, n_boot=500))

    t = s["table"]
    assert t["coqa/naturalness"]["label"]["accuracy"]["mean"] == pytest.approx(0.5)
    assert t["coqa/naturalness"]["explanation"]["accuracy"] == {"mean": pytest.approx(0.8), "std": 0.0,
                                                                 "values": [0.8, 0.8]}
    assert t["amazonqa/on_topic"]["shuffled"]["accuracy"]["std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert t["overall"]["random"]["accuracy"]["mean"] == pytest.approx(17 / 40)
    v = s["versus_label"]
    assert list(v) == ["explanation", "shuffled", "random"]
    assert (v["explanation"]["wins"], v["shuffled"]["wins"], v["random"]["wins"]) == (4, 4, 0)
    assert (v["random"]["losses"], v["random"]["settings"]) == (3, 4)               # one tie
    assert v["explanation"]["gap_closed"] == pytest.approx(1.0)
    assert v["shuffled"]["gap_closed"] == pytest.approx(0.5)
    assert v["random"]["gap_closed"] == pytest.approx((17 / 40 - 0.5) / 0.3)
    assert v["explanation"]["ci95"][0] > 0 and v["shuffled"]["ci95"][0] > 0 and v["random"]["ci95"][1] < 0.01
    assert v["explanation"]["sign_p"] == pytest.approx(0.125) and v["random"]["sign_p"] == pytest.approx(0.25)

    md = read(os.path.join(out, "compare.md"))
    assert s["majority"] == {k: pytest.approx(0.2) for k in [f"{d}/{a}" for d, a in SETTINGS] + ["overall"]}  # 1..5 twice
    assert "| coqa | naturalness | 0.200 | 0.500 ± 0.000 | 0.800 ± 0.000 | 0.650 ± 0.071 | 0.500 ± 0.000 |" in md
    assert "| shuffled | 4/4 | 50% | +0.150 [" in md
    assert "| coqa/naturalness | +0.300 | +0.150 | +0.000 |" in md and "## Reliability" in md
    csv = read(os.path.join(out, "compare.csv")).splitlines()
    assert csv[0] == "setting,variant,metric,mean,std,n_seeds" and "overall,label,accuracy,0.500000,0.000000,2" in csv
    assert json.loads(read(os.path.join(out, "compare.json")))["versus_label"]["shuffled"]["wins"] == 4
    pictures = {"reliability.png", "differences.png"} & set(os.listdir(out))
    assert pictures == ({"reliability.png", "differences.png"} if with_matplotlib else set())
    assert ("pip install matplotlib" in capsys.readouterr().out) != with_matplotlib


def test_compare_refuses_different_test_items(grid, tmp_path, capsys):
    _, runs = grid
    odd = write_fake_predictions(str(tmp_path / "other"), "label", 7, 5, drop=1)
    with pytest.raises(ev.EvalError, match="different test items"):
        ev.compare(ev.CompareConfig(runs + [odd], str(tmp_path / "cmp")))
    assert ev.main(["compare", *runs, odd, "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "different test items" in err and err.count("\n") == 1


def test_command_line_errors_are_one_line(tmp_path, capsys):
    for argv in (["--run", str(tmp_path)], ["--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl")]):
        assert ev.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_calibration_uses_the_prediction_accuracy_scores():
    """An unparsed answer (uniform probabilities, counted wrong) is wrong in the reliability bins and
    ECE too, even when gold is 1, the rating argmax would pick from a uniform row."""
    rows = [{"id": "a", "dataset": "d", "axis": "x", "gold": 1, "predicted": None, "probs": [0.2] * 5}]
    m = ev.metrics_by_setting(rows)["overall"]
    assert m["accuracy"] == 0.0 and m["ece"] == pytest.approx(0.2)  # confidence 0.2, accuracy 0
    assert ev.reliability(np.array([[0.2] * 5]), np.array([1]))[2][1] == 1.0  # argmax alone: wrongly right


def test_gap_closed_is_undefined_when_explanation_loses(tmp_path):
    root = str(tmp_path / "grid")
    runs = [write_fake_predictions(root, "label", 0, 6), write_fake_predictions(root, "explanation", 0, 4),
            write_fake_predictions(root, "shuffled", 0, 5)]
    s = ev.compare(ev.CompareConfig(runs, str(tmp_path / "cmp"), n_boot=100))
    assert s["gap"] == pytest.approx(-0.2)
    assert s["versus_label"]["shuffled"]["gap_closed"] is None  # not (0.5 - 0.6) / -0.2 = +50%
    md = read(str(tmp_path / "cmp" / "compare.md"))
    assert "| shuffled | 0/4 | n/a |" in md and "explanation does not beat label-only here" in md


def test_rating_weight_runs_form_their_own_column(tmp_path):
    root = str(tmp_path / "grid")
    runs = [write_fake_predictions(root, "label", 0, 5), write_fake_predictions(root, "explanation", 0, 8)]
    rw = write_fake_predictions(root, "explanation", 1, 7)
    os.rename(rw, rw.replace("explanation-s1", "explanation+rw-s0"))
    rw = rw.replace("explanation-s1", "explanation+rw-s0")
    cfg_path = os.path.join(rw, "train_config.json")
    with open(cfg_path, "w") as f:
        json.dump({"variant": "explanation", "seed": 0, "order": "rating_first", "rating_weight": True}, f)
    s = ev.compare(ev.CompareConfig(runs + [rw], str(tmp_path / "cmp"), n_boot=100))
    assert list(s["table"]["overall"]) == ["label", "explanation", "explanation+rw"]
    assert s["table"]["overall"]["explanation+rw"]["accuracy"]["mean"] == pytest.approx(0.7)


def test_compare_rescores_predictions_of_a_changed_checkpoint(demo, tmp_path, capsys):
    """Predictions are tied to the adapter they came from: after the run's best/ changes, compare
    scores it again instead of reporting the old model's figures under the new run's name."""
    tok = data.Tokenizer(demo["tokenizer"])
    run, _ = fake_run(tmp_path, demo["tokenizer"], tok.vocab_size, demo["train"])
    first = ev.score_run(run)
    assert first["checkpoint_sha256"] == ev.fingerprint(os.path.join(run, "best"))
    ev.load_grid([run])
    assert "rescoring" not in capsys.readouterr().out  # unchanged: the saved predictions serve
    model = load_model(json.load(open(os.path.join(run, "train_config.json")))["model"])
    torch.manual_seed(7)  # "retrained": another adapter in best/
    lora.add_lora(model, rank=4, alpha=8)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    lora.save_adapter(model, os.path.join(run, "best"))
    assert "has changed since it was scored" in Run(run).stale_reason("test")
    ev.load_grid([run])
    assert "rescoring" in capsys.readouterr().out
    second = json.load(open(os.path.join(run, "eval-test", "metrics.json")))
    assert second["checkpoint_sha256"] != first["checkpoint_sha256"] and Run(run).stale_reason("test") is None


def _corrupt(path, line_no, text):
    lines = read(path).splitlines()
    lines[line_no - 1] = text
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("bad,why", [("{not json", "not valid JSON"),
                                     (json.dumps({"id": "x", "dataset": "coqa", "axis": "on_topic", "gold": 2,
                                                  "predicted": 2}), "missing field 'probs'"),
                                     (json.dumps([1, 2]), "expected a JSON object"),
                                     (json.dumps({"id": "x", "dataset": "coqa", "axis": "on_topic", "gold": 7,
                                                  "predicted": 2, "probs": [0.2] * 5}), "'gold'")])
def test_compare_names_the_file_and_line_of_a_corrupt_prediction(grid, tmp_path, capsys, bad, why):
    """Without a checkpoint to score it again from, a corrupt predictions.jsonl is refused in one line
    that names the file and the line."""
    _, runs = grid
    path = os.path.join(runs[1], "eval-test", "predictions.jsonl")
    _corrupt(path, 3, bad)
    assert ev.main(["compare", *runs, "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"{path}: line 3: " in err and why in err and "no checkpoint" in err


def test_compare_rescores_a_corrupt_prediction_file_from_the_checkpoint(demo, tmp_path, capsys):
    tok = data.Tokenizer(demo["tokenizer"])
    run, _ = fake_run(tmp_path, demo["tokenizer"], tok.vocab_size, demo["train"])
    ev.score_run(run)
    path = os.path.join(run, "eval-test", "predictions.jsonl")
    good = read(path)
    _corrupt(path, 2, '{"id": "truncated', )
    grid = ev.load_grid([run])
    out = capsys.readouterr().out
    assert f"rescoring {run}" in out and f"{path} is not the file that was scored" in out  # (its sha256)
    assert read(path) == good and len(grid["explanation"][0][1]) == len(good.splitlines())


def test_eval_run_refuses_an_unfinished_run(demo, tmp_path, capsys):
    tok = data.Tokenizer(demo["tokenizer"])
    run, _ = fake_run(tmp_path, demo["tokenizer"], tok.vocab_size, demo["train"])   # no done.json
    assert ev.main(["--run", run]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "done.json" in err and "--allow-unfinished" in err
    assert not os.path.exists(os.path.join(run, "eval-test"))
    ev.main(["--run", run, "--allow-unfinished"])
    assert os.path.exists(os.path.join(run, "eval-test", "predictions.jsonl"))
    with open(os.path.join(run, "done.json"), "w") as f:
        json.dump({"step": 2}, f)
    ev.main(["--run", run])
    assert "wrote" in capsys.readouterr().out


def test_compare_skips_unfinished_runs_unless_allowed(grid, tmp_path, capsys):
    _, runs = grid
    os.remove(os.path.join(runs[1], "done.json"))  # explanation-s0 still training
    ev.main(["compare", *runs, "--out", str(tmp_path / "cmp"), "--n-boot", "50"])
    out = capsys.readouterr().out
    assert f"skipping {runs[1]}: unfinished (no done.json)" in out
    table = json.load(open(tmp_path / "cmp" / "compare.json"))
    ev.main(["compare", *runs, "--out", str(tmp_path / "cmp2"), "--n-boot", "50", "--allow-unfinished"])
    assert "skipping" not in capsys.readouterr().out
    assert json.load(open(tmp_path / "cmp2" / "compare.json")) != table  # the run counts again
    for r in runs[:1] + runs[2:]:
        os.remove(os.path.join(r, "done.json"))
    assert ev.main(["compare", *runs, "--out", str(tmp_path / "cmp3")]) == 2
    assert "no finished run folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- nothing silently wrong (issue 29)

def test_compare_rescores_after_the_data_labels_change(demo, tmp_path, capsys):
    """Predictions are tied to the data file's contents: relabelled data (same path) is scored again,
    so the reported accuracy is the new labels', not the old ones' (0.130 vs 0.426 in the probe)."""
    tok = data.Tokenizer(demo["tokenizer"])
    records = read_jsonl(demo["train"])
    path = str(tmp_path / "train.jsonl")
    data.write_jsonl(records, path)
    run, _ = fake_run(tmp_path, demo["tokenizer"], tok.vocab_size, path)
    ev.score_run(run)
    data.write_jsonl([dict(r, label=1 + r["label"] % 5) for r in records], path)  # every label changed
    assert "has changed since it was scored" in Run(run).stale_reason("test")
    grid = ev.load_grid([run])
    assert "rescoring" in capsys.readouterr().out
    rows = grid["explanation"][0][1]
    relabelled = {(r["id"], r["axis"]): r["label"] for r in read_jsonl(path)}
    assert all(r["gold"] == relabelled[r["id"], r["axis"]] for r in rows)


def test_a_hand_edited_predictions_file_is_rescored_or_refused(demo, tmp_path, capsys):
    tok = data.Tokenizer(demo["tokenizer"])
    run, _ = fake_run(tmp_path, demo["tokenizer"], tok.vocab_size, demo["train"])
    ev.score_run(run)
    path = Run(run).predictions("test")
    honest = read_jsonl(path)
    forged = [dict(r, predicted=r["gold"]) for r in honest]  # accuracy 1.000
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in forged)
    assert "edited since" in Run(run).stale_reason("test")
    rows = ev.load_grid([run])["explanation"][0][1]
    assert "rescoring" in capsys.readouterr().out
    key = lambda r: (r["id"], r["axis"])  # noqa: E731
    assert sorted(rows, key=key) == sorted(honest, key=key)  # the checkpoint's own predictions again
    with open(path, "w") as f:  # and with no checkpoint to score again from: refused, by name
        f.writelines(json.dumps(r) + "\n" for r in forged)
    shutil.rmtree(os.path.join(run, "best"))
    (tmp_path / "run" / "done.json").write_text("{}")
    assert ev.main(["compare", run, "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "edited since" in err and "no checkpoint" in err


def test_runs_on_different_base_models_are_compared_with_a_warning(grid, capsys):
    _, runs = grid
    for i, run in enumerate(runs):
        cfg = json.load(open(os.path.join(run, "train_config.json")))
        with open(os.path.join(run, "train_config.json"), "w") as f:
            json.dump(dict(cfg, model=f"/models/base-{i % 2}"), f)
    ev.load_grid(runs)
    err = capsys.readouterr().err
    assert "warning: the runs were trained on different base models" in err and "/models/base-1" in err


@pytest.mark.parametrize("field,value,says", [("lora_alpha", float("nan"), "lora_alpha must be a finite number"),
                                              ("lora_alpha", "8", "lora_alpha must be a finite number"),
                                              ("r", 0, "r must be a positive integer"),
                                              ("weights", float("nan"), "non-finite values")])
def test_an_adapter_with_non_finite_weights_or_settings_is_refused(demo, tmp_path, capsys, field, value, says):
    """A NaN lora_alpha was scored silently (accuracy 0.000, nll nan without a word)."""
    tok = data.Tokenizer(demo["tokenizer"])
    run, base = fake_run(tmp_path, demo["tokenizer"], tok.vocab_size, demo["train"])
    adapter = os.path.join(run, "best")
    if field == "weights":
        from safetensors.torch import load_file, save_file
        tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        next(iter(tensors.values()))[0, 0] = value
        save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"))
    else:
        cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
        with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
            json.dump(dict(cfg, **{field: value}), f)
    assert ev.main(["--model", base, "--adapter", adapter, "--data", demo["train"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err


@pytest.mark.parametrize("edit", [{"variant": 5}, {"seed": "0"}, {"max_len": None}, {"model": ["x"]}, "[1, 2]",
                                  '{"variant": "label", "seed": 0, "model": "m", "data": "d", "order": "rating_first"'])
def test_a_hand_edited_train_config_is_one_line(demo, tmp_path, capsys, edit):
    tok = data.Tokenizer(demo["tokenizer"])
    run, _ = fake_run(tmp_path, demo["tokenizer"], tok.vocab_size, demo["train"])
    path = os.path.join(run, "train_config.json")
    text = edit if isinstance(edit, str) else json.dumps(dict(json.load(open(path)), **edit))
    with open(path, "w") as f:
        f.write(text)
    (tmp_path / "run" / "done.json").write_text("{}")
    assert ev.main(["--run", run]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_config.json" in err
