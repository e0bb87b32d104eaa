"""What every command shares: one shape, one error class, one handler, one way to write a file.

A command is a dataclass of its settings and a function that takes it. The comment beside each
field is that option's --help text, so a default and its explanation live in one place:

    @dataclass
    class CompareConfig:
        POSITIONAL: ClassVar = ("runs",)
        runs: list                 # run folders (any variant and seed)
        split: str = "test"        # the split the runs were scored on

    def compare(cfg: CompareConfig): ...

    def main(argv=None):
        return cli.main("eval.py", __doc__, {"score": Command(ScoreConfig, score, "..."),
                                             "compare": Command(CompareConfig, compare, "...")},
                        argv, default="score")

Field types map to options: `bool` -> --x / --no-x, `int | None` -> an int that may be left out,
`Literal[...]` -> a choice, `list` -> several values (a positional list when named in POSITIONAL).
A field with no default is required. `out` also answers to `-o`. The first argument picks the
subcommand; a command with a `default` runs it when the first argument names none, and every
subcommand is listed in the parent's --help.

Every expected failure is an `Error` (each module subclasses it: ModelError, DataError, ...) or an
OSError, and `main` turns it into one line, `error: ...`, and exit status 2; so does a bad argument
(argparse's usage block is in --help, not in front of every mistake), and Ctrl-C is one line and
status 130. `main` returns the status instead of exiting, so that tests and scripts can call it.

`write_atomic` is the one way files are written: through a temporary name and a rename, so a crash
never leaves half a file under the real name. `Lock` keeps a second process from writing the same
output (a run folder, a raw ratings file, a study folder) while the first runs.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import inspect
import os
import shutil
import signal
import sys
import threading
import types
import typing
from dataclasses import dataclass


def _exit_at_once(signum, frame):
    print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
    os._exit(130)  # nothing is written before main runs; no half-imported module is left to trip over


# When one of this project's commands is the program, Ctrl-C while it starts (importing torch takes
# seconds) ends it at once with one line: a KeyboardInterrupt raised inside an import can leave a
# library half-initialised and print another library's traceback. Each command imports cli.py
# first; main() hands Ctrl-C back to Python's KeyboardInterrupt (caught there) before the work starts.
if os.path.dirname(os.path.abspath(getattr(sys.modules["__main__"], "__file__", None) or "-")) == \
        os.path.dirname(os.path.abspath(__file__)) and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _exit_at_once)


class Error(Exception):
    """An expected failure: bad input, a refused option, a folder in use. The message says which file,
    line, field or option, and what was kept; `main` prints it as one line."""


@dataclass
class Command:
    config: type          # the dataclass of its settings
    function: object      # called with an instance of `config`
    help: str = ""        # one line, for the parent's --help


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block (that is what --help is for)
        raise Error(f"{self.prog}: {message} (see {self.prog} --help)")


def field_help(cls):
    """{field name: the comment beside it in cls's source}, a comment-only line after a field
    continuing its text."""
    helps, current = {}, None
    for klass in reversed(cls.__mro__[:-1]):  # a subclass's fields after its base's
        for line in inspect.getsource(klass).splitlines()[1:]:
            code, _, comment = line.strip().partition("#")
            name = code.split(":")[0].strip() if ":" in code else ""
            if name.isidentifier():
                current = name
                helps[name] = comment.strip()
            elif not code and current:
                helps[current] = (helps[current] + " " + comment.strip()).strip()
    return helps


def _kind(annotation):
    """(argparse type, choices, several) of a field's annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # int | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices, False
    if annotation is list or typing.get_origin(annotation) is list:
        inner = typing.get_args(annotation)
        return (inner[0] if inner else str), None, True
    return annotation, None, False


def add_options(parser, cls):
    """One argument per field of the dataclass cls."""
    helps, positional = field_help(cls), getattr(cls, "POSITIONAL", ())
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, choices, several = _kind(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"help": helps.get(f.name, "") + ("" if required or default is None or default is False or default in ("", [], ()) else
                                              f" (default: {default})")}
        if kind is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=default, **kw)
            continue
        kw.update(type=kind, choices=choices)
        if several:
            kw["nargs"] = "+" if required else "*"
        if f.name in positional:
            parser.add_argument(f.name, default=default, **kw)
        else:
            flags = ["--" + f.name.replace("_", "-")] + (["-o"] if f.name == "out" else [])
            parser.add_argument(*flags, default=default, required=required, **kw)


def parser(prog, description, cls, epilog=None):
    p = _Parser(prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, cls)
    return p


def parse(cls, argv, prog="", description=None):
    """An instance of the dataclass cls from command-line arguments."""
    return cls(**vars(parser(prog, description, cls).parse_args(argv)))


def main(prog, doc, commands, argv=None, default=None):
    """Run the command that argv names (or `default`) and return the exit status: 0, 2 for any
    expected failure (one line on stderr), 130 for Ctrl-C. `doc` (the module's docstring) is the
    --help text: its first paragraph above the options, the rest below them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    summary, _, rest = (doc or "").strip().partition("\n\n")
    rest = "\n\n".join(p for p in rest.split("\n\n") if not p.startswith("Length:"))  # for readers of the file
    listing = "commands:\n" + "\n".join(f"  {(name if name != default else name + ' (default)'):<20} {c.help}"
                                        for name, c in commands.items())
    try:
        if argv and argv[0] in commands and not (argv[0] == default and len(commands) == 1):
            name, argv = argv[0], argv[1:]
            sub_prog = f"{prog} {name}"
        elif default is not None:
            name, sub_prog = default, prog
        else:
            p = _Parser(prog=prog, description=summary, epilog=listing + "\n\n" + rest,
                        formatter_class=argparse.RawDescriptionHelpFormatter, usage=f"{prog} COMMAND [options]")
            p.add_argument("command", choices=list(commands), help="what to do (each has its own --help)")
            p.parse_args(argv[:1])
            raise Error(f"{prog}: unknown command {argv[0]!r}")  # not reached: parse_args refused it
        command = commands[name]
        description = command.help if sub_prog != prog else summary
        epilog = "\n\n".join(x for x in ((listing if len(commands) > 1 and sub_prog == prog else ""),
                                         rest if sub_prog == prog else "") if x)
        cfg = command.config(**vars(parser(sub_prog, description, command.config, epilog).parse_args(argv)))
        if signal.getsignal(signal.SIGINT) is _exit_at_once:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on: caught below
        command.function(cfg)
        return 0
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (Error, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


def write_atomic(path, content):
    """Write `content` (str, bytes, or a function that writes the file, or builds the folder, at the
    path it is given) to a temporary name beside `path`, then rename it to `path`: a crash never
    leaves half a file under the real name, and a failed write leaves no temporary file behind."""
    tmp = path + ".tmp"
    _remove(tmp)  # what a kill left
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb" if isinstance(content, bytes) else "w", encoding=None if isinstance(content, bytes)
                      else "utf-8") as f:
                f.write(content)
        if os.path.isdir(tmp) and os.path.isdir(path):
            shutil.rmtree(path)  # a folder is replaced whole
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


class Lock:
    """`path` (e.g. runs/x/lock) holds the pid of the process writing an output, so that two processes
    never write one; a second one gets an Error naming the holder. The lock of a process that is gone
    (killed, crashed machine) is taken over, with a message. Creating, checking and taking over happen
    under an flock of the containing folder (released by the kernel if the process dies), so two
    processes that find the same dead holder's lock cannot both take it, and none ever reads a lock
    that another is still writing."""

    def __init__(self, path, what=None):
        self.path, self.held = path, False
        self.what = what or os.path.dirname(path) or "."  # what the lock protects, for the message

    def acquire(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        guard = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)  # held for the few lines below, one process at a time
            if os.path.lexists(self.path):
                pid = _lock_pid(self.path)
                if pid is not None and _alive(pid):
                    raise Error(f"{self.what} is being written by process {pid} (lock file {self.path}); "
                                "wait for it to finish or stop it")
                print(f"taking over {self.path}: process {pid} that held it is gone", file=sys.stderr)
                os.remove(self.path)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
        finally:
            os.close(guard)  # and with it the flock
        return self

    def release(self):
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *_):
        self.release()


def _lock_pid(path):
    try:
        with open(path) as f:
            return int(f.read(32).strip())
    except (OSError, ValueError):
        return None


def _alive(pid):
    """Whether process pid runs (not this one: commands are synchronous, so its own old lock is stale)."""
    if pid == os.getpid() or pid <= 0:  # (0 and negatives name process groups, never a writer)
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: gone all the same
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
