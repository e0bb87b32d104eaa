"""The benchmark scripts in bench/ keep working: each runs in --smoke mode (tiny sizes) as a subprocess,
exits 0, prints its table and writes JSON with the fields the README's tables are copied from.
The numbers themselves are not checked: smoke sizes say nothing about speed."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script, tmp_path, *args):
    out = tmp_path / f"{script}.json"
    # one thread: on a busy machine, waiting for a second OpenMP thread costs more than tiny ops do
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), "--smoke", "--threads", "1",
                           "--json", str(out), *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_targets(result):
    for t in result["targets"]:
        assert set(t) >= {"target", "value", "goal", "pass"} and isinstance(t["pass"], bool)


SIDE_FIELDS = {"step_s", "step_s_all", "tokens_per_s", "peak_bytes", "peak_live_bytes", "first_loss"}


@pytest.mark.parametrize("extra", [[], ["--synthetic", "--checkpointing", "on"]], ids=["checkpoint", "synthetic"])
def test_train_step_smoke(tmp_path, extra):
    result, stdout = run_bench("train_step", tmp_path, *extra)
    assert result["benchmark"] == "train_step" and result["profile"] == "smoke"
    assert [r["checkpointing"] for r in result["runs"]] == ([True] if extra else [False, True])
    for run in result["runs"]:
        assert set(run["sides"]) == {"ours", "hf"}
        for side in run["sides"].values():
            assert SIDE_FIELDS <= set(side) and side["step_s"] > 0 and side["peak_bytes"] > 0
        # the same weights and batch: a fresh adapter changes nothing, so the first losses agree
        assert run["first_loss_spread"] < 1e-4
    assert {t["target"] for t in result["targets"]} == {
        "time vs transformers+peft", "peak RSS vs transformers+peft", "peak live memory vs transformers+peft"}
    check_targets(result)
    assert "ratio (ours / hf)" in stdout and ("PASS" in stdout or "MISS" in stdout)


def test_train_step_nf4_smoke(tmp_path):
    pytest.importorskip("bitsandbytes")
    result, stdout = run_bench("train_step", tmp_path, "--quantize", "nf4", "--checkpointing", "on")
    (run,) = result["runs"]
    assert set(run["sides"]) == {"ours-nf4", "hf-nf4", "ours"}
    for side in run["sides"].values():
        assert SIDE_FIELDS <= set(side)
    nf4 = [run["sides"][s]["first_loss"] for s in ("ours-nf4", "hf-nf4")]
    assert abs(nf4[0] - nf4[1]) < 1e-4
    assert "ratio (ours-nf4 / hf-nf4)" in stdout


def test_score_smoke(tmp_path):
    result, stdout = run_bench("score", tmp_path)
    assert result["benchmark"] == "score"
    for side in ("ours", "hf"):
        assert result["sides"][side]["examples_per_s"] > 0 and len(result["sides"][side]["pass_s_all"]) == 2
    assert result["max_logit_diff"] < 1e-4  # both sides scored the same thing
    assert [t["target"] for t in result["targets"]] == ["examples/s vs transformers"]
    check_targets(result)


def test_load_smoke(tmp_path):
    result, stdout = run_bench("load", tmp_path, "--reps", "1")
    assert result["benchmark"] == "load" and result["n_shards"] > 1 and result["same_weights"]
    for side in ("ours", "hf"):
        r = result["sides"][side]
        assert {"load_s", "ready_s", "peak_bytes", "peak_over_ckpt", "peak_anon_bytes", "peak_file_bytes"} <= set(r)
        assert 0 < r["load_s"] <= r["ready_s"]
    assert [t["target"] for t in result["targets"]] == [
        "load + first forward time vs transformers", "load call time vs transformers", "peak RSS / checkpoint bytes"]
    check_targets(result)
