"""cli.py: the one shape every command has (a settings dataclass, a function, one error handler) and
the one way files are written."""
import importlib
import os
from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

import cli

# every command module, its subcommands (the first is the default, if it has one) and whether it has a default
COMMANDS = {"train": (["run", "grid"], True), "eval": (["score", "compare"], True),
            "rate": (["rate", "summarize", "check"], True), "data": (["validate", "aggregate", "preview"], False),
            "importers": ([], True), "damage": (["make", "check"], False), "analysis": ([], True),
            "study": ([], True), "demo": ([], True)}


@dataclass
class Example:
    POSITIONAL: ClassVar = ("files",)
    files: list                       # input files
    name: str                         # required, not positional
    # (a comment-only line continues the help of the field above)
    level: Literal["low", "high"] = "low"  # how much
    n: int | None = None              # how many (default: all)
    out: str = "x.out"                # where to write
    fast: bool = False                # go fast


def test_a_dataclass_becomes_its_options():
    p = cli.parser("ex", "example", Example)
    cfg = Example(**vars(p.parse_args(["a", "b", "--name", "z", "--level", "high", "--n", "3", "-o", "y", "--fast"])))
    assert cfg == Example(files=["a", "b"], name="z", level="high", n=3, out="y", fast=True)
    assert Example(**vars(p.parse_args(["a", "--name", "z"]))) == Example(files=["a"], name="z")
    helps = cli.field_help(Example)
    assert helps["name"] == "required, not positional (a comment-only line continues the help of the field above)"
    assert helps["n"] == "how many (default: all)"
    text = p.format_help()
    assert "{low,high}" in text and "go fast" in text and "-o OUT" in text


@pytest.mark.parametrize("argv, says", [(["a", "--name", "z", "--level", "mid"], "invalid choice: 'mid'"),
                                       (["a"], "the following arguments are required: --name"),
                                       (["a", "--name", "z", "--n", "x"], "invalid int value: 'x'")])
def test_a_bad_argument_is_one_line_and_status_2(argv, says, capsys):
    assert cli.main("ex", "Example.", {"go": cli.Command(Example, lambda cfg: None)}, argv, default="go") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ex: ") and says in err


def test_errors_and_interrupts_are_one_line(capsys):
    def fail(cfg):
        raise cli.Error(f"{cfg.files[0]}: line 3: bad")

    def interrupted(cfg):
        raise KeyboardInterrupt
    commands = {"fail": cli.Command(Example, fail), "stop": cli.Command(Example, interrupted)}
    assert cli.main("ex", "Example.", commands, ["fail", "f.jsonl", "--name", "z"]) == 2
    assert capsys.readouterr().err == "error: f.jsonl: line 3: bad\n"
    assert cli.main("ex", "Example.", commands, ["stop", "f", "--name", "z"]) == 130
    assert capsys.readouterr().err.count("\n") == 1
    assert cli.main("ex", "Example.", commands, ["nope"]) == 2  # no default: the command must be named
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "f.json")
    cli.write_atomic(path, "one")
    with pytest.raises(ZeroDivisionError):
        cli.write_atomic(path, lambda tmp: (open(tmp, "w").write("half"), 1 / 0))
    assert open(path).read() == "one" and os.listdir(tmp_path) == ["f.json"]  # no .tmp left behind
    cli.write_atomic(path, b"two")
    assert open(path).read() == "two"
    folder = str(tmp_path / "d")
    os.makedirs(folder)
    open(os.path.join(folder, "old"), "w").close()
    os.makedirs(folder + ".tmp")  # left by a kill
    cli.write_atomic(folder, lambda tmp: (os.makedirs(tmp), open(os.path.join(tmp, "new"), "w").close()))
    assert os.listdir(folder) == ["new"] and not os.path.exists(folder + ".tmp")


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_every_command_answers_a_bad_argument_with_one_line(module, capsys):
    subcommands, has_default = COMMANDS[module]
    main = importlib.import_module(module).main
    for argv in ([["--no-such-option"]] + [[s, "--no-such-option"] for s in subcommands]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), (argv, err)


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_every_command_lists_its_subcommands_in_help(module, capsys):
    subcommands, _ = COMMANDS[module]
    assert importlib.import_module(module).main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    for s in subcommands:
        assert f"\n  {s}" in out, f"{module}.py --help does not list {s}"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDER = """
import sys, time
import cli
path, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
try:
    cli.Lock(path).acquire()
    print("won", flush=True)
    time.sleep(1.0)
except cli.Error:
    print("refused", flush=True)
"""


def test_a_dead_holders_lock_is_taken_over_by_exactly_one_contender(tmp_path):
    """The takeover raced: two trainings both held a dead process's lock in 3 of 25 trials."""
    import subprocess
    import sys
    import time
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for trial in range(3):
        path = tmp_path / f"t{trial}" / "lock"
        path.parent.mkdir()
        path.write_text(str(dead.pid))
        start = time.time() + 0.6  # every contender starts its attempt at the same moment
        procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(path), str(start)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(4)]
        outcomes = sorted(p.communicate()[0].strip() for p in procs)
        assert outcomes == ["refused"] * 3 + ["won"], (trial, outcomes)


def test_a_second_study_on_one_folder_is_refused(tmp_path, capsys):
    """Two study.py on one --out interleaved their appends (80 of 96 ratings duplicated)."""
    import subprocess
    import sys
    import study
    out = tmp_path / "study"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, cli; cli.Lock(sys.argv[1]).acquire(); "
                               "print('held', flush=True); time.sleep(30)", str(out / "lock")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert study.main(["--smoke", "--out", str(out), "--results", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"being written by process {holder.pid}" in err
        assert os.listdir(out) == ["lock"]  # nothing of the study was written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", [["train.py", "--help"], ["study.py", "--dry-run"], ["eval.py", "--run", "nowhere"]])
def test_ctrl_c_while_a_command_starts_is_one_line(command):
    """Ctrl-C during start-up (torch takes a second or more to import) printed a traceback."""
    import signal
    import subprocess
    import sys
    import time
    p = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(0.25)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err[-500:]
