"""train.py: checkpointing gradients, learning, kill-and-resume, data parallel, failure handling."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import data
import lora
import runs
import train
from model import Config, Transformer, load_model, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["apple", "river", "stone", "cloud", "flame"]  # the word in the response decides the rating
FILL = "the a we so it is very quite then here there and but or of to in on at".split()


def keyword_records(n, seed=0):
    """A learnable task: the rating is given by the response's last word."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.randint(1, 5)
        words = rng.sample(FILL, 6) + [WORDS[label - 1]]  # the last word, a fixed distance from the decision
        out.append({"id": f"kw-{i:04d}", "dataset": "kw", "context": ["Tell me something."],
                    "response": " ".join(words) + ".", "axis": "naturalness", "label": label,
                    "explanation": f"The reply mentions {WORDS[label - 1]}, which earns a {label}."})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer trained on the task's text, a tiny random base model, and a training file."""
    d = tmp_path_factory.mktemp("train")
    records = keyword_records(400)
    data.write_jsonl(records, str(d / "train.jsonl"))
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(data._prompt_body(r, data.AXES) + "\n\nRating: " + str(r["label"]) + " " + r["explanation"]
                                for r in records))
    tok_path = data.train_tokenizer(str(corpus), str(d / "tok"), vocab_size=400)
    tok = data.Tokenizer(tok_path)
    torch.manual_seed(0)
    cfg = replace(Config.from_name("tiny"), vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    base = d / "base"
    model = Transformer(cfg)
    with torch.no_grad():  # a pretrained model's head makes confident predictions; a fresh one cannot
        model.lm_head.weight.mul_(8)
    save_model(model, str(base))
    (base / "tokenizer.model").write_bytes(open(tok_path, "rb").read())
    return {"dir": d, "base": str(base), "data": str(d / "train.jsonl"), "tok": tok}


def config(setup, out, **kw):
    base = dict(model=setup["base"], data=setup["data"], out=str(out), variant="label", rank=4, alpha=8,
                lora_dropout=0.0, lr=1e-2, batch_size=8, micro_batch=4, steps=6, max_len=128,
                val_every=1000, save_every=2, log_every=1, checkpointing=True)
    return train.TrainConfig(**{**base, **kw})


def adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def assert_same_adapter(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol, k


def test_checkpointing_gradients_match(setup):
    tok = setup["tok"]
    from model import load_model

    model = load_model(setup["base"])
    lora.add_lora(model, rank=4, alpha=8, dropout=0.0)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)  # a live adapter, not a zero one
    ex = data.build_examples(keyword_records(6), tok, "explanation", max_len=128)
    batch = data.collate(ex, tok.pad_id)
    grads = []
    for ckpt in (False, True):
        model.train()
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        train.loss_sum(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n  # every LoRA weight gets a gradient through the checkpoints
        assert (grads[0][n] - grads[1][n]).abs().max().item() < 1e-5, n


def test_run_learns_and_changes_only_lora(setup, tmp_path):
    before = open(os.path.join(setup["base"], "model.safetensors"), "rb").read()
    cfg = config(setup, tmp_path / "run", steps=150, batch_size=16, micro_batch=16, lr=1e-2, val_every=150,
                 save_every=150, log_every=10, checkpointing=False)
    result = train.run(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert result["val_acc"] > 0.6  # chance is 0.2
    assert open(os.path.join(setup["base"], "model.safetensors"), "rb").read() == before
    saved = adapter(tmp_path / "run" / "last")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert json.load(open(tmp_path / "run" / "train_config.json"))["variant"] == "label"
    assert os.path.exists(tmp_path / "run" / "best" / "adapter_model.safetensors")


def test_micro_batch_split_does_not_change_the_result(setup, tmp_path):
    # 12 examples per step split 4+4+4 or 6+6: the micro-batches hold different numbers of target tokens
    a = train.run(config(setup, tmp_path / "a", variant="explanation", batch_size=12, micro_batch=4, steps=3))
    b = train.run(config(setup, tmp_path / "b", variant="explanation", batch_size=12, micro_batch=6, steps=3))
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert_same_adapter(adapter(tmp_path / "a" / "last"), adapter(tmp_path / "b" / "last"), 1e-5)


def _cli(setup, out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--model", setup["base"], "--data", setup["data"],
            "--out", str(out), "--variant", "explanation", "--rank", "4", "--lora-dropout", "0.1",
            "--batch-size", "8", "--micro-batch", "4", "--max-len", "128", "--lr", "1e-2",
            "--save-every", "2", "--val-every", "1000", "--log-every", "1", *extra]


def test_kill_and_resume_gives_the_same_adapter(setup, tmp_path):
    steps = ["--steps", "40"]
    subprocess.run(_cli(setup, tmp_path / "whole", *steps), check=True, capture_output=True, cwd=ROOT)
    proc = subprocess.Popen(_cli(setup, tmp_path / "killed", *steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 9:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "done.json").exists(), "the run finished before it was killed"
    state = torch.load(tmp_path / "killed" / "last" / "state.pt", weights_only=True)
    assert 0 < state["step"] < 40 and state["step"] % 2 == 0
    adapter(tmp_path / "killed" / "last")  # a complete, readable checkpoint
    # without --resume the unfinished run is protected
    r = subprocess.run(_cli(setup, tmp_path / "killed", *steps), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    subprocess.run(_cli(setup, tmp_path / "killed", *steps, "--resume"), check=True, capture_output=True, cwd=ROOT)
    assert_same_adapter(adapter(tmp_path / "whole" / "last"), adapter(tmp_path / "killed" / "last"), 1e-6)
    rows = [json.loads(x) for x in open(metrics)]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))  # no step logged twice


def test_torchrun_two_processes_equal_one(setup, tmp_path):
    args = ["--steps", "3", "--lora-dropout", "0", "--checkpointing"]
    subprocess.run(_cli(setup, tmp_path / "one", *args), check=True, capture_output=True, cwd=ROOT)
    r = _torchrun(setup, tmp_path / "two", *args)
    assert "x 2 processes" in r.stdout
    assert_same_adapter(adapter(tmp_path / "one" / "last"), adapter(tmp_path / "two" / "last"), 1e-5)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    def poison(step, loss):
        return loss * float("nan") if step == 4 else loss

    with pytest.raises(train.TrainError, match=r"step 5: non-finite loss; .*Last good checkpoint: .*last"):
        train.run(config(setup, tmp_path / "nan", steps=8), loss_hook=poison)
    state = torch.load(tmp_path / "nan" / "last" / "state.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in adapter(tmp_path / "nan" / "last").values())


def test_finished_runs_bad_data_and_dry_run(setup, tmp_path):
    out = tmp_path / "run"
    train.run(config(setup, out, steps=2))
    r = subprocess.run(_cli(setup, out, "--steps", "2"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "holds a finished run; pass --overwrite" in r.stderr
    bad = tmp_path / "bad.jsonl"
    lines = open(setup["data"]).read().splitlines()
    lines[2] = lines[2].replace('"label": ', '"label": 9, "x": ')
    bad.write_text("\n".join(lines) + "\n")
    r = subprocess.run(_cli(setup, tmp_path / "b", "--data", str(bad)), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "bad.jsonl:3" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "b" / "last").exists()
    r = subprocess.run(_cli(setup, tmp_path / "dry", "--dry-run"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "trainable" in r.stdout and "estimated peak" in r.stdout
    assert not (tmp_path / "dry").exists()


def test_help_documents_every_flag():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for f in train.fields(train.TrainConfig):
        assert "--" + f.name.replace("_", "-") in r.stdout


def _rating_share(model, example):
    """The rating token's share of the gradient that train.py's normalised loss sends to the logits:
    |dL/dlogits| at the decision position over |softmax - onehot| there (the gradient of that
    position's own cross-entropy), i.e. the weight that position gets in the loss."""
    batch = data.collate([example], pad_id=0)
    mask = batch["targets"] != data.IGNORE_INDEX
    logits = model(batch["input_ids"], logits_at=mask).detach().requires_grad_(True)   # (N, V)
    targets = batch["targets"][mask]
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    ((losses * batch["weights"][mask]).sum() / train.n_targets(example)).backward()   # train.py's scaling
    row = int(mask[0, :example.decision_pos].sum())  # the decision position's row among the targets
    own = torch.softmax(logits[row].detach(), -1) - torch.nn.functional.one_hot(targets[row], logits.shape[-1])
    return (logits.grad[row].norm() / own.norm()).item(), targets[row].item()


def test_rating_weight_gives_the_rating_token_the_label_variants_share(setup):
    """With --rating-weight, the rating token of an explanation example gets the same share of the
    gradient as in the label variant; without it, about 1/len(target) of it (label dilution)."""
    tok, model = setup["tok"], train.load_model(setup["base"])
    rec = data.check_record(keyword_records(1)[0])
    (label,) = data.build_examples([rec], tok, "label")
    (plain,) = data.build_examples([rec], tok, "explanation")
    (weighted,) = data.build_examples([rec], tok, "explanation", rating_weight=True)
    assert plain.input_ids == weighted.input_ids and plain.labels == weighted.labels
    share_label, tgt = _rating_share(model, label)
    share_plain, tgt_plain = _rating_share(model, plain)
    share_weighted, tgt_weighted = _rating_share(model, weighted)
    assert tgt == tgt_plain == tgt_weighted == data.rating_token_ids(tok)[rec["label"] - 1]
    n_label = len(label.input_ids) - label.n_prompt
    n_expl = len(plain.input_ids) - plain.n_prompt
    assert n_expl > 3 * n_label  # the dilution is real in this example
    assert share_label == pytest.approx(1 / n_label, rel=1e-5)
    assert share_plain == pytest.approx(1 / n_expl, rel=1e-5)
    assert share_weighted == pytest.approx(share_label, rel=1e-5)
    assert label.rating_weight == 1.0 and weighted.rating_weight > 1.0


def test_rating_weight_runs_and_is_saved(setup, tmp_path):
    """A run with --rating-weight trains, records the option, and its loss differs from one without."""
    losses = {}
    for flag in (False, True):
        out = tmp_path / f"rw-{flag}"
        train.run(config(setup, out, variant="explanation", steps=2, rating_weight=flag))
        assert json.load(open(out / "train_config.json"))["rating_weight"] is flag
        losses[flag] = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl") if "loss" in json.loads(x)]
    assert losses[True][0] != pytest.approx(losses[False][0], rel=1e-4)


# ----------------------------------------------------------------------------- run-folder safety

def _finished(setup, out, **kw):
    train.run(config(setup, out, steps=2, **kw))
    return adapter(out / "last")


def test_overwrite_checks_everything_before_touching_the_old_run(setup, tmp_path):
    out = tmp_path / "run"
    kept = _finished(setup, out)
    for bad in (["--model", setup["base"] + "-typo"], ["--data", str(tmp_path / "missing.jsonl")],
                ["--variant", "nonsense"]):
        r = subprocess.run(_cli(setup, out, "--steps", "2", "--overwrite", *bad), capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert (out / "done.json").exists() and (out / "metrics.jsonl").exists()
        assert_same_adapter(adapter(out / "last"), kept, 0.0)


def test_overwrite_that_fails_before_its_first_checkpoint_gives_the_old_run_back(setup, tmp_path):
    out = tmp_path / "run"
    kept = _finished(setup, out)
    (out / "eval-test").mkdir()

    def crash(step, loss):
        raise RuntimeError("power cut")
    with pytest.raises(RuntimeError, match="power cut"):
        train.run(config(setup, out, steps=4, lr=5e-2, overwrite=True), loss_hook=crash)
    assert (out / "done.json").exists() and (out / "eval-test").exists() and not (out / "replaced").exists()
    assert_same_adapter(adapter(out / "last"), kept, 0.0)
    # a SIGKILL leaves replaced/ behind: the next start puts it back before deciding anything
    (out / "replaced").mkdir()
    for name in ("done.json", "last", "best", "metrics.jsonl", "train_config.json"):
        if (out / name).exists():
            os.replace(out / name, out / "replaced" / name)
    with pytest.raises(train.TrainError, match="holds a finished run"):
        train.run(config(setup, out, steps=2))
    assert_same_adapter(adapter(out / "last"), kept, 0.0)
    # a successful overwrite retires the old run and its stale predictions
    train.run(config(setup, out, steps=2, lr=5e-2, overwrite=True))
    assert not (out / "replaced").exists() and not (out / "eval-test").exists()
    assert any((adapter(out / "last")[k] != kept[k]).any() for k in kept)


def _unfinished(setup, out, **kw):
    """A run stopped by a NaN at step 3, with its checkpoint of step 2."""
    with pytest.raises(train.TrainError):
        train.run(config(setup, out, steps=6, **kw), loss_hook=lambda s, loss: loss * float("nan") if s == 2 else loss)
    newest = runs.Run(str(out)).latest()
    assert newest and not (out / "done.json").exists()
    return newest


def test_resume_refuses_changed_settings_and_allows_the_harmless_ones(setup, tmp_path):
    out = tmp_path / "run"
    _unfinished(setup, out)
    saved = (out / "train_config.json").read_text()
    with pytest.raises(train.TrainError, match=r"differ from the saved run \(--variant 'label' -> 'explanation'; --lr 0.01 -> 0.001\)"):
        train.run(config(setup, out, steps=6, lr=1e-3, variant="explanation", resume=True))
    assert (out / "train_config.json").read_text() == saved  # not rewritten by the refused resume
    train.run(config(setup, out, steps=6, resume=True, log_every=3, micro_batch=8))
    assert json.load(open(out / "done.json"))["step"] == 6


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(setup, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "lock").write_text(str(alive.pid))
        with pytest.raises(train.TrainError, match=f"being written by process {alive.pid}"):
            train.run(config(setup, out, steps=2))
        assert (out / "lock").read_text() == str(alive.pid)  # someone else's lock is left alone
    finally:
        alive.kill()
        alive.wait()
    train.run(config(setup, out, steps=2))
    assert f"process {alive.pid} that held it is gone" in capsys.readouterr().err
    assert not (out / "lock").exists() and (out / "done.json").exists()


def kill_torchrun(proc):
    """SIGKILL a torchrun launched with start_new_session, and its ranks: they run in sessions of their
    own (torch.distributed.elastic starts them so), so killing torchrun's group alone leaves them
    training on. Returns once all are gone."""
    ranks = [int(d) for d in os.listdir("/proc") if d.isdigit() and _parent(d) == proc.pid]
    for pid in [*ranks, proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    while any(os.path.exists(f"/proc/{pid}") and _parent(str(pid)) == proc.pid for pid in ranks):
        time.sleep(0.01)


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def torchrun(n, args, popen=False, timeout=300):
    """`torchrun --standalone --nproc_per_node=n` (a free port of its own) with one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def _torchrun(setup, out, *extra, popen=False):
    """train.py with _cli's settings on 2 ranks; a finished one must have succeeded."""
    r = torchrun(2, _cli(setup, out, *extra)[1:], popen=popen)
    if not popen:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_short_last_batch_does_not_hang(setup, tmp_path):
    """A last global batch of one example leaves rank 1 with nothing: it runs a zero-weight pass so
    that both ranks meet in the gradient all-reduce, and the result equals one process."""
    records = data.load_records(setup["data"])
    kept = [r for r in records if data.split_of(r["id"]) == "train"][:17] + \
        [r for r in records if data.split_of(r["id"]) == "val"][:4]
    small = str(tmp_path / "small.jsonl")
    data.write_jsonl(kept, small)  # 17 training examples: batches of 8, 8 and 1
    args = ["--data", small, "--epochs", "1", "--batch-size", "8", "--micro-batch", "8", "--lora-dropout", "0"]
    subprocess.run(_cli(setup, tmp_path / "one", *args), check=True, capture_output=True, cwd=ROOT)
    _torchrun(setup, tmp_path / "two", *args)
    assert json.load(open(tmp_path / "two" / "done.json"))["step"] == 3
    assert_same_adapter(adapter(tmp_path / "one" / "last"), adapter(tmp_path / "two" / "last"), 1e-5)


def test_two_processes_kill_resume_and_overwrite(setup, tmp_path):
    """With dropout, per-rank RNG streams saved and restored: a killed and resumed 2-process run
    equals the uninterrupted one; --overwrite of a finished 2-process run trains again."""
    args = ["--steps", "12", "--lora-dropout", "0.1"]
    _torchrun(setup, tmp_path / "whole", *args)
    state = torch.load(tmp_path / "whole" / "last" / "state.pt", weights_only=True)
    (cpu0, _), (cpu1, _) = state["rng_ranks"]  # (CPU, CUDA) RNG state of each rank
    assert not torch.equal(cpu0, cpu1)
    proc = _torchrun(setup, tmp_path / "killed", *args, popen=True)
    deadline = time.time() + 200
    while time.time() < deadline and not (tmp_path / "killed" / "last" / "state.pt").exists():
        time.sleep(0.01)
    kill_torchrun(proc)
    assert not (tmp_path / "killed" / "done.json").exists(), "finished before it was killed"
    _torchrun(setup, tmp_path / "killed", *args, "--resume")
    assert_same_adapter(adapter(tmp_path / "whole" / "last"), adapter(tmp_path / "killed" / "last"), 1e-6)
    r = _torchrun(setup, tmp_path / "whole", *args, "--overwrite")
    assert "x 2 processes" in r.stdout and (tmp_path / "whole" / "done.json").exists()


def test_max_len_too_small_for_any_prompt_is_one_line(setup, tmp_path):
    r = subprocess.run(_cli(setup, tmp_path / "run", "--max-len", "8"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no training example fits in --max-len 8" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes(setup, tmp_path):
    steps = ["--steps", "30", "--save-every", "100"]
    subprocess.run(_cli(setup, tmp_path / "whole", *steps), check=True, capture_output=True, cwd=ROOT)
    proc = subprocess.Popen(_cli(setup, tmp_path / "stopped", *steps), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and sum(1 for _ in open(metrics)) >= 5):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: interrupted at step ") and "--resume" in line
    step = int(line.split("interrupted at step ")[1].split()[0])
    assert 5 <= step < 30  # no checkpoint was due before step 100: this one was written for the interrupt
    assert torch.load(tmp_path / "stopped" / "last" / "state.pt", weights_only=True)["step"] == step
    subprocess.run(_cli(setup, tmp_path / "stopped", *steps, "--resume"), check=True, capture_output=True, cwd=ROOT)
    assert_same_adapter(adapter(tmp_path / "whole" / "last"), adapter(tmp_path / "stopped" / "last"), 1e-6)


def test_corrupt_state_falls_back_to_last_old_or_says_so(setup, tmp_path):
    out = tmp_path / "run"
    _unfinished(setup, out)
    shutil.copytree(out / "last", out / "last.old")
    (out / "last" / "state.pt").write_bytes(b"\x80\x02 not a checkpoint")
    train.run(config(setup, out, steps=6, resume=True))  # resumes from last.old
    assert json.load(open(out / "done.json"))["step"] == 6
    out2 = tmp_path / "run2"
    _unfinished(setup, out2)
    state = out2 / "last" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    with pytest.raises(runs.RunError, match="no readable checkpoint to resume from"):
        train.run(config(setup, out2, steps=6, resume=True))


@pytest.mark.parametrize("flag,value", [("rank", 0), ("micro_batch", -1), ("lr", 0.0), ("batch_size", 0),
                                        ("steps", -3), ("lr", float("inf")), ("lr", float("nan")),
                                        ("min_lr_ratio", float("nan")), ("min_lr_ratio", -5.0),
                                        ("weight_decay", float("nan")), ("lora_dropout", 1.0), ("epochs", float("inf")),
                                        ("alpha", float("nan")), ("warmup", 1.0), ("grad_clip", -1.0)])
def test_options_out_of_range_are_one_line_before_anything_is_written(setup, tmp_path, flag, value):
    """--lr inf trained to NaN weights and exited 0; --min-lr-ratio -5 trained by gradient ascent."""
    with pytest.raises(train.TrainError, match=f"--{flag.replace('_', '-')} must be a finite number in "):
        train.run(config(setup, tmp_path / "run", **{flag: value}))
    assert not (tmp_path / "run").exists()


def test_a_bad_number_on_the_command_line_is_one_line(setup, tmp_path):
    r = subprocess.run(_cli(setup, tmp_path / "run", "--lr", "inf", "--steps", "1"), capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--lr must be a finite number" in r.stderr
    assert not (tmp_path / "run").exists()


def test_resume_and_overwrite_together_are_refused(setup, tmp_path):
    with pytest.raises(train.TrainError, match="contradict"):
        train.run(config(setup, tmp_path / "run", resume=True, overwrite=True))


def test_tokenizer_larger_than_the_model_is_refused(setup, tmp_path):
    base = tmp_path / "small"
    shutil.copytree(setup["base"], base)
    cfg = json.load(open(base / "config.json"))
    cfg["vocab_size"] = setup["tok"].vocab_size - 10
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(data.DataError, match=rf"has {setup['tok'].vocab_size} tokens but the model .* only"):
        train.run(config(setup, tmp_path / "run", model=str(base)))


def _custom_axis_files(setup, tmp_path, n):
    """(records file, descriptions file): the first n records moved to a custom axis 'politeness'."""
    path = str(tmp_path / "polite.jsonl")
    data.write_jsonl([dict(r, axis="politeness") for r in data.load_records(setup["data"])[:n]], path)
    axes = tmp_path / "axes.txt"
    axes.write_text("politeness: courteous and respectful\n")
    return path, axes


def test_custom_axis_trains_with_its_descriptions_file(setup, tmp_path):
    path, axes = _custom_axis_files(setup, tmp_path, 60)
    with pytest.raises(data.DataError, match="politeness"):
        train.run(config(setup, tmp_path / "no-axes", data=path, steps=1))
    train.run(config(setup, tmp_path / "run", data=path, steps=1, axes_file=str(axes)))
    assert json.load(open(tmp_path / "run" / "train_config.json"))["axes_file"] == str(axes)


def test_custom_axis_run_scores_and_analyses(setup, tmp_path):
    """eval.py and analysis.py read a custom-axis run with the run's own descriptions file."""
    import analysis
    import eval as ev
    path, axes = _custom_axis_files(setup, tmp_path, 80)
    train.run(config(setup, tmp_path / "run", data=path, steps=1, axes_file=str(axes)))
    m = ev.score_run(str(tmp_path / "run"))
    assert list(m["settings"]) == ["kw/politeness"]
    assert analysis.analyse(analysis.AnalysisConfig([str(tmp_path / "run")], str(tmp_path / "an"), n=2)) is not None


def test_disk_full_names_the_path_keeps_last_and_resumes(setup, tmp_path, monkeypatch):
    """A checkpoint write that fails (ENOSPC at the second save) is one error naming the folder; the
    first checkpoint stays intact, no half-written folder is left, and --resume finishes the run."""
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(runs.RunError) as e:
        train.run(config(setup, out, steps=6))
    assert "last.tmp: cannot write the checkpoint (No space left on device)" in str(e.value)
    assert "last from before is intact" in str(e.value)
    assert not (out / "last.tmp").exists()
    assert torch.load(out / "last" / "state.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    train.run(config(setup, out, steps=6, resume=True))
    assert json.load(open(out / "done.json"))["step"] == 6


def test_out_that_is_a_file_is_one_line(setup, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    r = subprocess.run(_cli(setup, out, "--steps", "2"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: --out {out} is a file, not a run folder"
    assert out.read_text() == "keep me"


# ----------------------------------------------------------------------------- nothing silently wrong (issue 29)

def test_a_full_disk_inside_torch_save_is_the_same_clear_line(setup, tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError (its stream writer), which passed the OSError
    handler and left last.tmp behind."""
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(runs.RunError, match="last.tmp: cannot write the checkpoint .*last from before is intact"):
        train.run(config(setup, out, steps=6))
    assert not (out / "last.tmp").exists()
    assert torch.load(out / "last" / "state.pt", weights_only=True)["step"] == 2


def test_a_non_finite_validation_loss_keeps_best_and_last_as_they_were(setup, tmp_path, monkeypatch):
    """best/ was rewritten with a model whose validation loss was NaN, and done.json said NaN."""
    out = tmp_path / "run"
    real = train.validate
    calls = []

    def poisoned(*a, **kw):
        calls.append(1)
        m = real(*a, **kw)
        return dict(m, val_loss=float("nan")) if len(calls) == 2 else m
    monkeypatch.setattr(train, "validate", poisoned)
    with pytest.raises(train.TrainError, match=r"step 4: non-finite validation loss; stopped. Last good checkpoint: .*last"):
        train.run(config(setup, out, steps=6, val_every=2))
    assert not (out / "done.json").exists()
    assert torch.load(out / "last" / "state.pt", weights_only=True)["step"] == 2
    assert all(math.isfinite(r.get("val_loss", 0)) for r in map(json.loads, open(out / "metrics.jsonl")))


def test_non_finite_weights_are_never_saved(setup, tmp_path):
    out = tmp_path / "run"
    train.run(config(setup, out, steps=2))
    kept = adapter(out / "last")
    model = load_model(setup["base"])
    lora.add_lora(model, rank=4, alpha=8)
    next(p for p in model.parameters() if p.requires_grad).data[0, 0] = float("nan")
    cfg = config(setup, out)
    with pytest.raises(train.TrainError, match="non-finite weights; not saved"):
        runs.Run(str(out)).save("last", train.weights(cfg, model))
    assert all(torch.equal(adapter(out / "last")[k], kept[k]) for k in kept)


def test_resume_of_a_finished_run_keeps_its_record(setup, tmp_path):
    """--resume on a finished run rewrote done.json without its validation figures."""
    out = tmp_path / "run"
    train.run(config(setup, out, steps=2, val_every=2))
    before = json.load(open(out / "done.json"))
    assert "val_acc" in before
    again = train.run(config(setup, out, steps=2, val_every=2, resume=True))
    assert json.load(open(out / "done.json")) == before and again["val_acc"] == before["val_acc"]


def test_resume_with_changed_data_contents_is_refused(setup, tmp_path):
    """--resume compared the data file's path, not its contents."""
    out = tmp_path / "run"
    path = tmp_path / "train.jsonl"
    shutil.copy(setup["data"], path)
    _unfinished(setup, out, data=str(path))
    records = [json.loads(x) for x in open(path)]
    data.write_jsonl([dict(r, label=1 + r["label"] % 5) for r in records], str(path))
    with pytest.raises(train.TrainError, match="--data-sha256"):
        train.run(config(setup, out, steps=6, data=str(path), resume=True))
