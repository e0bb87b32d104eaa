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
LIBRARY = {"model", "gguf_file", "tokenizer", "lora", "quant", "data", "importers"}  # what commands build on
COMMANDS = {"train", "eval", "analysis", "rate", "damage", "study", "demo"}


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
    assert {m for m in MODULES if "train" in imports(m)} <= {"study", "demo"}
    assert "demo" not in set().union(*(imports(m) for m in LIBRARY))


@pytest.mark.parametrize("module", ["data", "tokenizer", "importers", "gguf_file"])
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
