"""`python train.py --model <folder>` end to end (train, then eval.py and analysis.py on the run) on tiny
random checkpoints shaped like Llama-3.1 (RoPE scaling llama3, an eos list) and Qwen2 (q/k/v biases),
each with its family's byte-level tokenizer.json and chat template (issue 28): the run trains on the
family's own chat format, reads its rating at the 'Ġ' before the digit, and is scored and analysed."""
import json
import os

import pytest
import torch

import analysis
import damage
import data
import eval as ev
import importers
import train
from test_families_tokenizer import LLAMA31_TEMPLATE, QWEN25_TEMPLATE, family_tokenizer
from test_tokenizer import turns

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    convs, _ = importers.import_conversations("chitchat", [])
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    data.write_jsonl(damage.make_records(convs, seed=0, n=40), str(path))
    return str(path)


def checkpoint(name, folder):
    """A Hugging Face folder: the family's tokenizer.json and tokenizer_config.json (its real chat
    template), and a random 2-layer model written by transformers' save_pretrained."""
    tj = family_tokenizer(name, turns(1500))
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    shape = dict(vocab_size=max(ids.values()) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if name == "llama3":
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA31_TEMPLATE}
        hf = transformers.LlamaConfig(
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64},
            bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]], **shape)
    else:
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "chat_template": QWEN25_TEMPLATE}
        hf = transformers.Qwen2Config(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], rope_theta=1e6,
                                      **shape)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf)
    model.save_pretrained(str(folder), safe_serialization=True)


@pytest.mark.parametrize("name, template", [("llama3", "llama3"), ("qwen2", "chatml")])
def test_train_eval_and_analysis_run_on_the_family(name, template, records, tmp_path, capsys):
    folder = tmp_path / name
    folder.mkdir()
    checkpoint(name, folder)
    assert data.Tokenizer(str(folder)).template == template  # --template auto picks the family's format
    run = str(tmp_path / "run")
    assert train.main(["--model", str(folder), "--data", records, "--out", run, "--variant", "explanation",
                       "--steps", "3", "--batch-size", "4", "--micro-batch", "4", "--max-len", "192", "--rank", "4",
                       "--lr", "1e-3", "--val-every", "3", "--save-every", "3", "--log-every", "1"]) == 0
    assert json.load(open(os.path.join(run, "done.json")))["step"] == 3
    assert ev.main(["--run", run, "--batch-size", "8"]) == 0
    scores = json.load(open(os.path.join(run, "eval-test", "metrics.json")))
    assert scores["overall"]["n"] > 0 and scores["unparsed"] == 0
    assert analysis.main([run, "--out", str(tmp_path / "analysis"), "--n", "4"]) == 0
    report = json.load(open(tmp_path / "analysis" / "analysis.json"))
    assert report["variants"]["explanation"]["runs"] == 1
    assert "error" not in capsys.readouterr().err
