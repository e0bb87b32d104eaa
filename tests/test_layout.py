"""The layout a reader relies on: imports run one way, the light modules stay light, and a module
that outgrows ~600 lines says why in its docstring."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
LIBRARY = {"model", "gguf_file", "tokenizer", "lora", "quant", "data", "cli", "runs", "shard"}  # what commands build on
COMMANDS = {"train", "eval", "analysis", "rate", "damage", "importers", "study", "demo"}
DRIVERS = {"study", "demo"}  # the experiments: they call the other commands' functions


def imports(module):
    """The project modules that `module` imports, at the top or inside functions."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py"), encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_every_module_is_placed():
    assert set(MODULES) == LIBRARY | COMMANDS


@pytest.mark.parametrize("module", sorted(LIBRARY))
def test_library_modules_import_no_command(module):
    assert not imports(module) & COMMANDS, f"{module}.py imports {sorted(imports(module) & COMMANDS)}"


def test_only_the_experiment_drivers_import_train():
    assert {m for m in MODULES if "train" in imports(m)} <= DRIVERS
    assert not {m for m in MODULES if imports(m) & DRIVERS} - DRIVERS, "a module imports an experiment driver"


def test_the_import_graph_has_no_circle():
    def visit(module, path):
        assert module not in path, "import circle: " + " -> ".join(path[path.index(module):] + [module])
        for m in sorted(imports(module)):
            visit(m, path + [module])
    for module in MODULES:
        visit(module, [])


def test_no_module_calls_another_modules_main():
    """Commands call each other's functions with typed configs, never through argv."""
    for module in MODULES:
        text = open(os.path.join(ROOT, module + ".py"), encoding="utf-8").read()
        calls = set(re.findall(r"\b(\w+)\.main\(", text)) - {"cli"}
        assert not calls, f"{module}.py calls {sorted(calls)}.main"


RUN_FILE_NAMES = ("train_config.json", "done.json", "metrics.jsonl", "state.pt", "eval-", "last.old", "replaced")


def code_strings(module):
    """The string constants of a module's code (docstrings left out: prose may name files)."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py"), encoding="utf-8").read())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"runs"}))
def test_the_run_folder_is_named_in_runs_py_only(module):
    typed = [s for s in code_strings(module) for name in RUN_FILE_NAMES if name in s]
    assert not typed, f"{module}.py types run-folder file names: {typed[:3]}"


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"cli", "runs"}))
def test_one_atomic_write_helper(module):
    """Files are renamed into place by cli.write_atomic (runs.Run.save rotates checkpoint folders)."""
    text = open(os.path.join(ROOT, module + ".py"), encoding="utf-8").read()
    assert "os.replace(" not in text and "os.rename(" not in text, f"{module}.py renames files itself"


@pytest.mark.parametrize("module", ["data", "tokenizer", "importers", "gguf_file", "cli"])
def test_light_modules_start_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]


@pytest.mark.parametrize("module", MODULES)
def test_a_long_module_says_why_and_its_count_is_true(module):
    path = os.path.join(ROOT, module + ".py")
    n = sum(1 for _ in open(path, encoding="utf-8"))
    doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read())) or ""
    said = re.search(r"^Length: ~([\d,]+) lines", doc, flags=re.M)
    if n > 640:
        assert said, f"{module}.py has {n} lines and no 'Length: ~N lines' paragraph saying why"
    if said:
        stated = int(said.group(1).replace(",", ""))
        assert abs(stated - n) <= 0.05 * n, f"{module}.py says ~{stated} lines, has {n}"
