"""analysis.py: entropy functions on constructed vectors, hooks against a hand-stepped forward pass
and against transformers' eager attention, the logit lens at the last layer, and whole runs."""
import importlib.util
import json
import math
import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch

import analysis as A
import data
import model as M

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- the measures

def test_entropy_functions_give_analytic_values_and_ignore_scale():
    d = 64
    uniform, one_hot, two = torch.ones(d), torch.zeros(d), torch.zeros(d)
    one_hot[3] = 5.0
    two[1], two[40] = 2.0, -2.0  # equal energy, opposite signs
    h = torch.stack([uniform, one_hot, two])
    assert torch.allclose(A.activation_entropy(h), torch.tensor([math.log(d), 0.0, math.log(2)]), atol=1e-6)
    x = torch.randn(5, 7, d, generator=torch.Generator().manual_seed(0))
    for c in (1e-3, -3.0, 1e4):
        assert torch.allclose(A.activation_entropy(c * x), A.activation_entropy(x), atol=1e-5)
    assert (A.activation_entropy(x) <= math.log(d) + 1e-6).all()
    assert A.activation_entropy(torch.zeros(d)).item() == 0.0  # no energy: no NaN
    logits = torch.tensor([[0.0] * 5, [0, -1e9, -1e9, -1e9, -1e9], [3.0, 3.0, -1e9, -1e9, -1e9]])
    assert torch.allclose(A.softmax_entropy(logits), torch.tensor([math.log(5), 0.0, math.log(2)]), atol=1e-6)
    assert torch.allclose(A.softmax_entropy(logits[:1] + 7.0), A.softmax_entropy(logits[:1]))


def test_bootstrap_interval_and_middle_third():
    mean, lo, hi = A.bootstrap(np.full((20, 3), 2.5))
    assert np.allclose(mean, 2.5) and np.allclose(lo, 2.5) and np.allclose(hi, 2.5)
    x = np.random.default_rng(0).normal(size=(400, 2))
    mean, lo, hi = A.bootstrap(x)
    assert (lo < mean).all() and (mean < hi).all() and np.allclose(hi - lo, 2 * 1.96 / 20, rtol=0.25)
    assert np.array_equal(A.bootstrap(x)[1], lo)  # seeded
    assert list(A.middle_third(2)) == [1] and list(A.middle_third(6)) == [2, 3]
    assert list(A.middle_third(32)) == list(range(11, 22))


def test_runs_pool_by_example_and_differences_pair_them():
    ids = [("a", "naturalness"), ("a", "on_topic"), ("b", "naturalness")]
    run = lambda order, act, top: {"ids": [ids[i] for i in order], "act_entropy": np.array(act, float),
                                   "top_prob": np.array(top, float)}
    one = run([0, 1, 2], [[1, 2, 3]] * 3, [0.5, 0.6, 0.7])
    two = run([2, 0, 1], [[3, 4, 5]] * 3, [0.9, 0.7, 0.8])  # same examples, another order
    pooled = A.pool_runs([one, two])
    assert pooled["ids"] == ids and np.allclose(pooled["top_prob"], [0.6, 0.7, 0.8])
    label = run([1, 0], [[0, 0, 0]] * 2, [0.1, 0.2])  # a subset: only shared examples are paired
    diff = A.paired_difference(pooled, label)
    assert np.isclose(diff["act_entropy"]["mean"], 3.0)  # middle third of 3 layers = layer 2
    assert np.isclose(diff["top_prob"]["mean"], ((0.6 - 0.2) + (0.7 - 0.1)) / 2)


# ----------------------------------------------------------------------------- hooks

def tiny_pair(tmp_path, sliding_window=None, layers=3):
    """A random transformers Mistral (GQA) saved to disk, ours loaded from it, and eager-attention HF."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256, sliding_window=sliding_window)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path)
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    return M.load_model(str(tmp_path)), hf


def test_hooked_states_equal_blocks_stepped_by_hand(tmp_path):
    ours, _ = tiny_pair(tmp_path)
    x = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    pos, rows = torch.tensor([11, 4, 7]), torch.arange(3)
    with torch.no_grad():
        with A.capture(ours, pos) as rec:
            final = ours(x, logits_at=pos)
        assert not ours.model.layers[0]._forward_hooks  # removed on exit
        h = ours.model.embed_tokens(x)                                                  # (B, T, D)
        cos, sin = M.rope_tables(torch.arange(12).expand(3, 12), M.rope_frequencies(ours.config))
        for i, block in enumerate(ours.model.layers):
            h = block(h, cos, sin, None)
            assert torch.equal(rec["hidden"][i], h[rows, pos])
        # the last layer's logit lens is the model's own output
        assert torch.equal(ours.lm_head(ours.model.norm(rec["hidden"][-1])), final)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_matches_transformers_eager(tmp_path, window):
    ours, hf = tiny_pair(tmp_path, sliding_window=window)
    x = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(2))
    pos, rows = torch.tensor([11, 4, 8]), torch.arange(3)
    with torch.no_grad(), A.capture(ours, pos) as rec:
        ours(x, logits_at=pos)
        ref = hf(x, output_attentions=True, output_hidden_states=True)
    for i in range(3):
        want = ref.attentions[i][rows, :, pos]                                          # (B, H, T)
        assert (rec["attn"][i] - want).abs().max().item() < 1e-5
        assert (rec["attn"][i][:, :, 9:].sum(-1)[1:] == 0).all()  # nothing after the query is seen
        if i < 2:  # HF's last hidden state is after the final norm
            assert (rec["hidden"][i] - ref.hidden_states[i + 1][rows, pos]).abs().max().item() < 1e-5
    if window:  # keys outside the window get no weight
        assert (rec["attn"][0][0, :, : 11 - window + 1] == 0).all()


def test_attention_entropy_is_normalised_by_the_keys_in_the_window(tmp_path):
    ours, _ = tiny_pair(tmp_path, sliding_window=5)
    x = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": x, "decision_pos": torch.tensor([11, 0, 3]), "label": torch.tensor([1, 2, 3])}
    m = A.measure_batch(ours, batch, [10, 11, 12, 13, 14])
    keys = np.array([[5], [1], [4]])  # min(position + 1, window)
    assert np.allclose(m["attn_entropy_norm"][[0, 2]], (m["attn_entropy"] / np.log(keys.clip(2)))[[0, 2]])
    assert (m["attn_entropy_norm"][1] == 0).all() and (m["attn_entropy"][1] == 0).all()  # one key
    assert (m["attn_entropy_norm"] <= 1 + 1e-6).all()


def test_measure_batch_is_consistent_with_the_model(tmp_path):
    ours, hf = tiny_pair(tmp_path)
    x = torch.randint(0, 300, (4, 10), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": x, "decision_pos": torch.tensor([9, 3, 6, 9]), "label": torch.tensor([1, 5, 3, 2])}
    rating_ids = [10, 11, 12, 13, 14]
    m = A.measure_batch(ours, batch, rating_ids)
    assert m["act_entropy"].shape == (4, 3) and m["top_prob"].shape == (4,)
    p5 = torch.softmax(ours(x, logits_at=batch["decision_pos"]).detach()[:, rating_ids], -1).double().numpy()
    assert np.allclose(m["top_prob"], p5.max(1)) and np.allclose(m["gold_prob"], p5[np.arange(4), [0, 4, 2, 1]])
    assert np.allclose(m["lens_rating_entropy"][:, -1], m["rating_entropy"])
    assert np.allclose(m["lens_gold_prob"][:, -1], m["gold_prob"])
    with torch.no_grad():
        ref = hf(x, output_attentions=True, output_hidden_states=True)
    att = ref.attentions
    want = [-torch.xlogy(a, a).sum(-1).mean(1)[torch.arange(4), batch["decision_pos"]] for a in att]
    assert np.allclose(m["attn_entropy"], torch.stack(want, 1).numpy(), atol=1e-5)
    # normalised by log(keys seen): the query at position p sees p + 1 keys
    assert np.allclose(m["attn_entropy_norm"], m["attn_entropy"] / np.log([[10], [4], [7], [10]]))
    assert "act_entropy_norm_response" not in m  # never computed (data.Example has no response span)
    assert "act_entropy_norm_response" not in A.__doc__ and "act_entropy_norm_response" not in A.LAYER_METRICS
    assert ((0 < m["rating_mass"]) & (m["rating_mass"] < 1)).all()


# ----------------------------------------------------------------------------- whole runs

WORDS = ["the", "reply", "is", "clear", "short", "polite", "vague", "helpful", "rude", "long", "fluent", "odd",
         "kind", "wrong", "apt"]


def write_records(path, n=60):
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
            f.write(json.dumps({"id": f"r{i:03d}", "dataset": "toy", "context": [words(6), words(5)],
                                "response": words(7), "axis": rng.choice(sorted(data.AXES)),
                                "label": rng.randint(1, 5), "explanation": words(rng.randint(4, 9))}) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mistral_v1_model):
    """Three tiny trained runs on one base: label, explanation (rating first), explanation first."""
    import train  # tests may drive train.py; the modules never import it

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    base = os.path.join(root, "base")
    M.save_model(M.Transformer(M.Config(vocab_size=32000, hidden_size=32, intermediate_size=64, n_layers=3,
                                        n_heads=4, n_kv_heads=2, torch_dtype="float32")), base)
    shutil.copy(mistral_v1_model, os.path.join(base, "tokenizer.model"))
    records = os.path.join(root, "train.jsonl")
    write_records(records)
    out = {}
    for name, variant, order in (("label", "label", "rating_first"), ("expl", "explanation", "rating_first"),
                                 ("expl-first", "explanation", "explain_first")):
        out[name] = os.path.join(root, name)
        train.run(train.TrainConfig(model=base, data=records, out=out[name], variant=variant, order=order,
                                    rank=4, lr=1e-2, steps=2, batch_size=8, micro_batch=8, max_len=256,
                                    checkpointing=False, val_every=2, save_every=2, log_every=2, device="cpu"))
    return out


def test_analysis_of_runs_is_deterministic_and_complete(runs, tmp_path, capsys):
    argv = [runs["label"], runs["expl"], runs["expl-first"], "--n", "6", "--batch-size", "4"]
    A.main(argv + ["--out", str(tmp_path / "a")])
    A.main(argv + ["--out", str(tmp_path / "b")])
    first, second = (json.loads((tmp_path / d / "analysis.json").read_text()) for d in ("a", "b"))
    assert first == second
    assert (tmp_path / "a" / "per_layer.csv").read_text() == (tmp_path / "b" / "per_layer.csv").read_text()
    assert list(first["variants"]) == ["label", "explanation", "explanation/explain_first"]
    assert [r["order"] for r in first["runs"].values()] == ["rating_first", "rating_first", "explain_first"]
    for r in first["runs"].values():
        assert r["n"] == 6 and len(r["per_layer"]["act_entropy"]["mean"]) == 3
        layer = r["per_layer"]
        # the normalised entropy is the entropy over log(d), d = 32 hidden dimensions (computed in fp32)
        np.testing.assert_allclose(layer["act_entropy_norm"]["mean"], np.array(layer["act_entropy"]["mean"]) / np.log(32),
                                   rtol=1e-6)
        assert max(layer["lens_entropy"]["mean"]) <= np.log(32000) and max(layer["lens_rating_entropy"]["mean"]) <= np.log(5)
    # the output's rating mass, recomputed with a plain full forward pass at the decision positions
    model, tok, _, cfg = A.load_run(runs["label"])
    rating_ids = data.rating_token_ids(tok)
    with torch.no_grad():
        mass = [torch.softmax(model(torch.tensor([e.input_ids]))[0, e.decision_pos], -1)[rating_ids].sum().item()
                for e in A.run_examples(cfg, tok, "test", n=6)]
    by_dir = {os.path.basename(k): v for k, v in first["runs"].items()}
    assert by_dir["label"]["output"]["rating_mass"]["mean"] == pytest.approx(np.mean(mass), rel=1e-6)
    # explanation-first: levels (normalised attention entropy beside the raw one), no difference from label
    ef = first["variants"]["explanation/explain_first"]
    assert "minus_label" not in ef and "explanation-first" in ef["minus_label_omitted"]
    assert {"attn_entropy", "attn_entropy_norm"} <= set(ef["middle_third"])
    assert "attn_entropy_norm" in first["variants"]["explanation"]["minus_label"]
    assert 0 < ef["middle_third"]["attn_entropy_norm"]["mean"] <= 1
    rows = (tmp_path / "a" / "per_layer.csv").read_text().splitlines()
    assert rows[0] == "scope,name,variant,layer,metric,mean,lo,hi,n" and len(rows) > 3 * 3 * 6
    assert "middle_third" in (tmp_path / "a" / "summary.csv").read_text()
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "a" / "entropy_by_layer.png").exists() == has_matplotlib
    with pytest.MonkeyPatch.context() as mp:  # without matplotlib: no plot, no error
        mp.setitem(sys.modules, "matplotlib", None)
        assert A.plot(first, str(tmp_path / "c")) is None


def test_explain_first_run_reads_the_rating_after_the_explanation(runs):
    _, tok, _, cfg = A.load_run(runs["expl-first"])
    ex = A.run_examples(cfg, tok, "test", n=3)
    for e in ex:  # the decision position predicts the rating, which follows the explanation
        assert e.input_ids[e.decision_pos + 1] in data.rating_token_ids(tok)
        assert e.decision_pos > e.n_prompt + 3


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert A.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train_config.json" in err and "\n" not in err
    assert A.main(["--help"]) == 0


def test_runs_of_different_depths_are_refused_before_any_forward_pass(tmp_path, capsys, monkeypatch):
    runs = []
    for name, layers in (("two", 2), ("three", 3)):
        base = tmp_path / f"base-{name}"
        base.mkdir()
        (base / "config.json").write_text(json.dumps(M.Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                              n_layers=layers, n_heads=2).to_hf()))
        run = tmp_path / name
        run.mkdir()
        (run / "train_config.json").write_text(json.dumps({"model": str(base), "variant": "label"}))
        runs.append(str(run))
    monkeypatch.setattr(A, "analyse_run", lambda *a, **k: pytest.fail("a run was analysed"))
    assert A.main(runs + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"{runs[0]} has 2 layers" in err and f"{runs[1]} has 3" in err
    assert not (tmp_path / "o").exists()
