"""train.py --shard (FSDP2, shard.py) on CPU with Gloo: a sharded step equals one process, sharded runs
equal single-process and data-parallel ones, kill and resume, and the exported adapter in PEFT."""
import json
import os
import subprocess
import time

import pytest
import torch

import data
import train
from test_train import _cli, adapter, config, kill_torchrun, setup, torchrun  # noqa: F401  (setup: the tiny base and data)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# dropout off, so that 1, 2 and 4 processes draw nothing different (the rest is _cli's: LoRA r=4, lr 1e-2)
RUN = ["--lora-dropout", "0", "--batch-size", "8", "--micro-batch", "4", "--save-every", "5", "--val-every", "10",
       "--log-every", "5"]


def train_cli(setup, out, *extra, n=0):
    """train.py with the test's settings: in one process (n=0) or under torchrun with n ranks."""
    cmd = _cli(setup, out, *RUN, *extra)
    r = torchrun(n, cmd[1:]) if n else subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def relative_error(a, b):
    """The largest per-tensor ||a - b|| / ||a|| of two adapters with the same tensors."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)


@pytest.fixture(scope="module")
def tied_gguf(tmp_path_factory):
    """A tiny Llama with its head tied to the embedding (as SmolLM2 and Llama-3.2 are), as a llama.cpp
    GGUF file: sharded loading cuts each of its tensors after dequantising it whole."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from test_gguf import tiny_hf, write_gguf
    return write_gguf(tiny_hf(tied=True), tmp_path_factory.mktemp("tied") / "tied.gguf")


@pytest.mark.parametrize("world", [2, 4])
def test_a_sharded_step_equals_one_process_and_each_rank_holds_its_share(setup, tied_gguf, world):
    """Loss and every LoRA gradient of one step on `world` ranks (the batch not a multiple of world)
    against the same step in one process, with the base in fp32, NF4 and NF4 with 8-bit scales,
    activation checkpointing off and on, and a tied head read from a GGUF file; and the bytes of parameters and buffers the
    fullest rank holds."""
    r = torchrun(world, [os.path.join(ROOT, "tests", "sharded_step.py"), setup["base"], tied_gguf])
    assert r.returncode == 0, r.stderr[-3000:]
    cases = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(c["quantize"], c["checkpointing"], c["tied"]) for c in cases] == [
        (None, False, False), (None, True, False), ("nf4", False, False), ("nf4", True, False),
        ("nf4-dq", True, False), (None, True, True)]
    for c in cases:
        assert c["world"] == world and c["n_grads"] == 2 * 7 * 2  # A and B of 7 projections, 2 layers
        assert c["loss_err"] <= 1e-5 and c["grad_err"] <= 1e-5, c
        # every tensor of the tiny model is cut in rows, so a rank holds 1/world of it (ceil rounding)
        assert c["held_fraction"] <= 1 / world + 0.01, c


@pytest.fixture(scope="module")
def small(setup, tmp_path_factory):
    """17 training examples (batches of 8, 8 and 1: a short last batch every epoch), 4 for validation."""
    records = data.load_records(setup["data"])
    kept = [r for r in records if data.split_of(r["id"]) == "train"][:17] + \
        [r for r in records if data.split_of(r["id"]) == "val"][:4]
    path = str(tmp_path_factory.mktemp("small") / "small.jsonl")
    data.write_jsonl(kept, path)
    return path


@pytest.fixture(scope="module")
def twenty_steps(setup, small, tmp_path_factory):
    """20-step runs on the small data: one process, data parallel on 2, sharded on 2 and on 4
    (checkpointing on, off), and NF4 in one process and sharded on 2."""
    d = tmp_path_factory.mktemp("twenty")
    common = ["--data", small, "--steps", "20"]
    runs = {"one": ([], 0), "ddp2": ([], 2), "shard2": (["--shard"], 2),
            "shard4": (["--shard", "--no-checkpointing"], 4),
            "one-nf4": (["--quantize", "nf4"], 0), "shard2-nf4": (["--shard", "--quantize", "nf4"], 2)}
    out = {}
    for name, (extra, n) in runs.items():
        r = train_cli(setup, d / name, *common, *extra, n=n)
        out[name] = {"dir": d / name, "stdout": r.stdout}
    return out


def test_twenty_sharded_steps_give_the_adapter_of_one_process_and_of_data_parallel(twenty_steps):
    one = adapter(twenty_steps["one"]["dir"] / "last")
    ddp = adapter(twenty_steps["ddp2"]["dir"] / "last")
    for name in ("shard2", "shard4"):
        run = twenty_steps[name]
        assert "sharded (FSDP2)" in run["stdout"] and json.load(open(run["dir"] / "done.json"))["step"] == 20
        got = adapter(run["dir"] / "last")
        # on as many ranks as data parallel: the same sums in the same order; otherwise 20 Adam steps
        # apart by the float rounding of summing over ranks (data parallel differs from one alike)
        assert relative_error(ddp, got) <= (1e-6 if name == "shard2" else 1e-4), name
        assert relative_error(one, got) <= 1e-4, name
    assert relative_error(one, ddp) <= 1e-4
    nf4 = relative_error(adapter(twenty_steps["one-nf4"]["dir"] / "last"), adapter(twenty_steps["shard2-nf4"]["dir"] / "last"))
    assert nf4 <= 1e-4
    assert relative_error(one, adapter(twenty_steps["one-nf4"]["dir"] / "last")) > 1e-3  # NF4 is a different base
    # best/ was chosen from the same validation on every run
    assert relative_error(adapter(twenty_steps["one"]["dir"] / "best"), adapter(twenty_steps["shard2"]["dir"] / "best")) <= 1e-4


def test_a_sharded_checkpoint_is_each_ranks_shards_plus_one_peft_adapter(twenty_steps):
    last = twenty_steps["shard2"]["dir"] / "last"
    assert sorted(os.listdir(last)) == ["adapter_config.json", "adapter_model.safetensors", "shards", "state.pt"]
    shards = sorted(os.listdir(last / "shards"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # DCP: each rank wrote its own file
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["optimizer"] is None and state["step"] == 20 and len(state["rng_ranks"]) == 2


def test_the_exported_adapter_loads_in_peft_with_the_same_logits(setup, twenty_steps):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import lora
    from model import load_model

    ckpt = str(twenty_steps["shard2"]["dir"] / "last")
    ours = lora.load_adapter(load_model(setup["base"]), ckpt).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(setup["base"], torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, ckpt).eval()
    tokens = torch.tensor([setup["tok"].encode("Tell me something. The reply mentions river.")])
    with torch.no_grad():
        want, got = theirs(tokens).logits, ours(tokens)
    assert all(t.abs().max() > 0 for t in adapter(ckpt).values())  # trained: B is no longer zero
    assert (want - got).abs().max().item() <= 1e-5


def test_a_killed_sharded_run_resumes_to_the_same_adapter(setup, tmp_path):
    """Dropout on: each rank's RNG stream is saved and restored, the AdamW shards read back by DCP."""
    args = ["--steps", "12", "--lora-dropout", "0.1", "--save-every", "2", "--shard"]
    train_cli(setup, tmp_path / "whole", *args, n=2)
    proc = torchrun(2, _cli(setup, tmp_path / "killed", *RUN, *args)[1:], popen=True)
    deadline = time.time() + 200
    while time.time() < deadline and not (tmp_path / "killed" / "last" / "state.pt").exists():
        time.sleep(0.01)
    kill_torchrun(proc)
    assert not (tmp_path / "killed" / "done.json").exists(), "finished before it was killed"
    step = torch.load(tmp_path / "killed" / "last" / "state.pt", weights_only=True)["step"]
    assert step < 12
    # resumed with another number of ranks, or without --shard: refused by name, nothing changed
    r = torchrun(4, _cli(setup, tmp_path / "killed", *RUN, *args, "--resume")[1:])
    assert r.returncode != 0 and "saved by 2 process(es), resumed with 4" in r.stderr
    r = torchrun(2, _cli(setup, tmp_path / "killed", *RUN, *args[:-1], "--resume")[1:])
    assert r.returncode != 0 and "shard" in r.stderr
    train_cli(setup, tmp_path / "killed", *args, "--resume", n=2)
    rel = relative_error(adapter(tmp_path / "whole" / "last"), adapter(tmp_path / "killed" / "last"))
    assert rel <= 1e-6
    logged = [row["step"] for row in map(json.loads, open(tmp_path / "killed" / "metrics.jsonl")) if "loss" in row]
    assert logged == [5, 10, 12]  # no step logged twice


def test_shard_refuses_what_it_does_not_do(setup, tmp_path, monkeypatch):
    r = subprocess.run(_cli(setup, tmp_path / "x", "--shard"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "launch it with torchrun" in r.stderr and "Traceback" not in r.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the checks that come next
    for flag in ("full", "compile"):
        with pytest.raises(train.TrainError, match=f"does not take --{flag}"):
            train.check_options(config(setup, tmp_path / "x", shard=True, **{flag: True}), 2)
    monkeypatch.delenv("WORLD_SIZE")
    assert not (tmp_path / "x").exists()
    r = subprocess.run(_cli(setup, tmp_path / "x", "--shard", "--dry-run"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "8 processes" in r.stdout, r.stderr
