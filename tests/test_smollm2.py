"""SmolLM2-135M-Instruct, a real pretrained model, through the whole pipeline on CPU: the ChatML
prompt, LoRA training from the GGUF file, the adapter in PEFT on transformers' model of the same
weights, scoring, the entropy analysis and the raters."""
import json
import os

import pytest
import torch

import analysis
import data
from demo import write_demo
import eval as ev
import lora
import rate
import train
from model import generate, load_model

peft = pytest.importorskip("peft")
# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" (test_gguf.py's)
PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def smol_run(smollm2_gguf, tmp_path_factory):
    """Two LoRA steps of the explanation variant on a small demo corpus, SmolLM2 as the base."""
    d = tmp_path_factory.mktemp("smol")
    demo = write_demo(str(d / "demo"), n_per_dataset=3, n_corpus=60, vocab_size=500)
    cfg = train.TrainConfig(model=smollm2_gguf, data=demo["train"], out=str(d / "run"), variant="explanation",
                            rank=4, alpha=8, lora_dropout=0.0, lr=2e-2, warmup=0.0, batch_size=2, micro_batch=2,
                            steps=2, max_len=320, val_every=2, save_every=2, log_every=1, checkpointing=True)
    result = train.run(cfg)
    return {"dir": d, "run": cfg.out, "demo": demo, "result": result}


def test_chat_prompt_and_generation_match_transformers(smollm2_gguf, smollm2_pair):
    ours, theirs, _ = smollm2_pair
    tok = data.Tokenizer(smollm2_gguf)
    assert tok.template == "chatml" and tok.chat("What is the capital of France?") == PROMPT
    new = generate(ours, [PROMPT], max_new_tokens=12)[0]
    out = theirs.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, pad_token_id=2)[0, len(PROMPT):]
    ref = out.tolist()[:out.tolist().index(2)] if 2 in out.tolist() else out.tolist()
    assert new == ref and "Paris" in tok.decode(new)


def test_rating_examples_use_chatml_and_the_digit_after_the_cue(smollm2_gguf, smol_run):
    tok = data.Tokenizer(smollm2_gguf)
    records = data.load_records(smol_run["demo"]["train"])[:6]
    for e in data.build_examples(records, tok, "explanation"):
        text = tok.decode(e.input_ids[:e.n_prompt])
        assert text.startswith("<|im_start|>user\nRate the response's") and text.endswith("<|im_start|>assistant\nRating:")
        assert tok.piece(e.input_ids[e.decision_pos]) == "Ġ"
        assert e.input_ids[e.decision_pos + 1] == data.rating_token_ids(tok)[e.label - 1]
        assert e.input_ids[-1] == tok.eos_id == 2  # <|im_end|> closes the assistant's turn


def test_training_on_the_gguf_writes_a_peft_adapter(smollm2_gguf, smol_run):
    run = smol_run["run"]
    assert smol_run["result"] is not None and json.load(open(os.path.join(run, "done.json")))["step"] == 2
    config = json.load(open(os.path.join(run, "last", "adapter_config.json")))
    assert config["base_model_name_or_path"] == os.path.abspath(smollm2_gguf)


def test_adapter_in_peft_on_transformers_gives_our_logits(smollm2_gguf, smol_run, smollm2_pair):
    _, theirs, _ = smollm2_pair
    ours = load_model(smollm2_gguf)
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        base = ours(x)
        lora.load_adapter(ours, os.path.join(smol_run["run"], "last"))
        adapted = ours(x)
        wrapped = peft.PeftModel.from_pretrained(theirs, os.path.join(smol_run["run"], "last")).eval()
        try:
            diff = (wrapped(x).logits - adapted).abs().max().item()
        finally:
            wrapped.unload()  # transformers' model goes back to the other tests as it was
    assert (adapted - base).abs().max().item() > 1e-2  # the adapter changes the logits: a real check
    assert diff < 1e-3, diff


def test_eval_analysis_and_rater_run_on_smollm2(smollm2_gguf, smol_run, tmp_path):
    run = smol_run["run"]
    m = ev.score_run(run, split="test", batch_size=8)
    n_test = len(ev.split_records(smol_run["demo"]["train"], "test"))
    assert m["overall"]["n"] == n_test > 0 and m["unparsed"] == 0
    rows = [json.loads(x) for x in open(os.path.join(run, "eval-test", "predictions.jsonl"))]
    assert all(abs(sum(r["probs"]) - 1) < 1e-6 and 1 <= r["predicted"] <= 5 for r in rows)

    out = str(tmp_path / "analysis")
    result = analysis.analyse(analysis.AnalysisConfig([run], out, split="test", n=3, batch_size=3))
    per_layer = open(os.path.join(out, "per_layer.csv")).read()
    assert "act_entropy" in per_layer and ",30," in per_layer  # SmolLM2's 30 layers
    assert result is not None

    conversations = [{"id": f"c{i}", "dataset": "chitchat", "context": c, "response": r} for i, (c, r) in enumerate([
        (["hey how was your weekend?"], "It was great, I went hiking with my sister."),
        (["Do you like pizza?", "I love it! You?"], "The stock market closed higher today.")])]
    conv = str(tmp_path / "conversations.jsonl")
    data.write_jsonl(conversations, conv)
    raw = str(tmp_path / "raw.jsonl")
    rate.main(["--raters", smollm2_gguf, "--input", conv, "--out", raw, "--axes", "on_topic",
               "--max-new-tokens", "40", "--retries", "0", "--batch-size", "8"])
    ratings = [x for r in rate.read_jsonl(raw) for x in r["ratings"]]
    assert sorted((x["prompt"]) for x in ratings) == sorted(list(rate.STRATEGIES) * 2)
    assert all(x["rater"] == "SmolLM2-135M-Instruct.Q4_1" for x in ratings)
    assert all((x["score"] is None) == ("error" in x) for x in ratings)
    parsed = [x for x in ratings if x["score"] is not None]
    print(f"SmolLM2 rater: {len(parsed)} of {len(ratings)} answers parsed:\n" + "\n".join(
        f"  {x['prompt']}: {x['score']} (p {x.get('score_prob')}) {x.get('explanation') or x['error']}" for x in ratings))
    # rate.py reads the score from the digit logits after a prefilled "Score:" and prefills
    # "Explanation: The response", so only an explanation with no words of its own can fail
    assert len(parsed) >= 7, f"only {len(parsed)} of 8 SmolLM2 ratings parsed"
    assert all(1 <= x["score"] <= x["scale"] and 0 < x["score_prob"] <= 1 for x in parsed)
