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


def test_load_gguf_smoke(tmp_path, smollm2_gguf):
    """bench/load.py --gguf: the real SmolLM2 file, one load per side; both sides hold the same weights."""
    result, stdout = run_bench("load", tmp_path, "--reps", "1", "--gguf")
    assert result["benchmark"] == "load_gguf" and result["file"] == smollm2_gguf and result["same_weights"]
    assert result["model_bytes"] == 4 * 134515008 or result["model_bytes"] > 5e8
    for side in ("ours", "hf"):
        assert 0 < result["sides"][side]["load_s"] <= result["sides"][side]["ready_s"]
    assert "from_pretrained(gguf_file=)" in stdout
    check_targets(result)


def test_shard_smoke(tmp_path):
    """bench/shard.py --smoke: the whole model in one process, then sharded over 1 and 2 ranks; each
    rank reports what it holds, its peak RSS while loading and its step time."""
    result, stdout = run_bench("shard", tmp_path, "--worlds", "1,2", "--steps", "1")
    assert result["benchmark"] == "shard" and result["profile"] == "smoke"
    assert [r["name"] for r in result["runs"]] == ["whole, 1 process", "sharded, 1 rank", "sharded, 2 ranks"]
    assert [len(r["ranks"]) for r in result["runs"]] == [1, 1, 2]
    for run in result["runs"]:
        for rank in run["ranks"]:
            assert rank["held_bytes"] > 0 and rank["load_peak_bytes"] > 0 and rank["step_s"] > 0
    whole, two = result["runs"][0]["max_held_bytes"], result["runs"][2]["max_held_bytes"]
    assert two <= 0.55 * whole  # measured, not assumed: each of 2 ranks holds half (LoRA included)
    check_targets(result)
    assert "peak RSS loading" in stdout


# ----------------------------------------------------------------------------- bench/gpu.py

GPU_STAGES = ["matmul", "cuda_tests", "train_bf16", "train_nf4", "score", "real_run", "sharded"]


def test_gpu_smoke(tmp_path):
    """bench/gpu.py --smoke: every stage present, each with figures or a stated reason; off CUDA the
    CUDA-test stage is skipped (not an error) and every other stage runs at tiny sizes."""
    import importlib.util

    import torch
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--smoke", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OUT": str(tmp_path / "not-here")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu.json").read_text())
    assert doc["benchmark"] == "gpu" and doc["mode"] == "smoke"
    assert {"torch", "device_name", "capability"} <= set(doc["machine"])
    assert list(doc["stages"]) == GPU_STAGES
    for name, stage in doc["stages"].items():
        assert stage["status"] in ("ok", "skipped", "error"), name
        if stage["status"] == "skipped":
            assert stage["reason"], name
        if stage["status"] == "error":
            assert stage["error"], name
    st = doc["stages"]
    cuda = torch.cuda.is_available()
    if not cuda:
        assert st["cuda_tests"]["status"] == "skipped" and "CUDA" in st["cuda_tests"]["reason"]
    # everything else runs on the CPU; an error here would be an error on the GPU machine too
    errors = {n: s.get("error") for n, s in st.items() if s["status"] != "ok" and n != "cuda_tests"}
    assert not errors, errors
    assert st["matmul"]["flops_per_s"] > 0 and st["matmul"]["copy_bytes_per_s"] > 0
    fields = {"step_s", "tokens_per_s", "peak_bytes", "first_loss", "split_s", "mfu"}
    for stage, sides in (("train_bf16", ["ours", "hf"]), ("train_nf4", ["ours-nf4", "hf-nf4"])):
        for side in sides:
            s = st[stage]["sides"][side]
            if side == "hf-nf4" and importlib.util.find_spec("bitsandbytes") is None:
                assert s["status"] == "skipped" and "bitsandbytes" in s["reason"]
                continue
            assert s["status"] == "ok" and fields <= set(s) and s["step_s"] > 0, (stage, side, s.get("error"))
        if len([s for s in st[stage]["sides"].values() if s["status"] == "ok"]) == 2:
            assert st[stage]["first_loss_spread"] < 1e-4  # the same weights and batch on both sides
    assert st["score"]["ratio"] > 0 and st["score"]["max_logit_diff"] < 1e-4
    run = st["real_run"]
    assert run["steps"] > 0 and run["eval"]["n"] > 0 and "random base" in run["base"]
    assert [r["run"] for r in st["sharded"]["runs"]] == ["whole, 1 process", "sharded, 2 ranks"]
    assert all(isinstance(t["pass"], bool) for t in doc["targets"])
    table = (out / "gpu.md").read_text()
    assert "| stage | status |" in table and "| figure | this project | transformers | ratio |" in table
    assert (out / "gpu_trace.txt").exists() and (out / "gpu_real_run.txt").exists()
    assert not (tmp_path / "not-here").exists()  # --out wins over $OUT


def test_gpu_stage_guard(tmp_path, monkeypatch):
    """A stage that raises, or runs past its budget, records why; the report is still written."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import time

    import torch

    import gpu

    report = gpu.Report(str(tmp_path), torch.device("cpu"), True, ["--smoke"])

    def boom(report, res, limit):
        res["partial"] = 1
        raise ValueError("broken on purpose")

    def slow(report, res, limit):
        time.sleep(limit + 5)

    gpu.run_stage(report, "score", boom, 30, time.time() + 60)
    gpu.run_stage(report, "real_run", slow, 1, time.time() + 60)
    gpu.run_stage(report, "matmul", gpu.stage_matmul, 30, time.time() + 1)  # past the run's deadline
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["stages"]["score"]["status"] == "error" and "broken on purpose" in doc["stages"]["score"]["error"]
    assert doc["stages"]["score"]["partial"] == 1                         # what it had measured is kept
    assert doc["stages"]["real_run"]["status"] == "error" and "budget" in doc["stages"]["real_run"]["error"]
    assert doc["stages"]["matmul"]["status"] == "skipped" and "deadline" in doc["stages"]["matmul"]["reason"]
    assert "broken on purpose" in (tmp_path / "gpu.md").read_text()
