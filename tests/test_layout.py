"""The layout keeps one home per concept: data flows down the package list, modules and
functions stay small, and modules import at their top. Imports are read from the source (those
inside functions included)."""

import ast
import os

import pytest

from tests.helpers import ROOT

# Which of the zoo's packages each package may import.
# runtime is at the bottom: every package may import it, and it imports none of them.
ALLOWED = {
    "runtime": {"runtime"},
    "data": {"runtime", "data"},
    "models": {"runtime", "models"},
    "losses": {"runtime", "losses"},
    "train": {"runtime", "data", "models", "losses", "train"},
    "serving": {"runtime", "data", "models", "serving"},
    "evaluation": {"runtime", "data", "models", "losses", "serving", "evaluation"},
}
# The composition roots of pretraining build the probe hook, the export and the tables.
COMPOSITION_ROOTS = {"train/pretrain_lib.py": {"serving", "evaluation"},
                     "train/ablate_lib.py": {"evaluation"},
                     "train/table_lib.py": {"evaluation"}}
PACKAGES = set(ALLOWED) | {"benchmarks", "tests"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
LONG_MODULES = {"losses/nat.py", "losses/spatial_contrasting.py"}
# An import inside a function needs a reason, in a comment on its line or just above its block
# of imports: an optional dependency, or an import deferred to keep a light module free of
# TensorFlow. quiet_tensorflow's import of TensorFlow is its job.
IMPORT_REASONS = ("# optional", "# deferred")
IMPORTING_FUNCTIONS = {("runtime/cli.py", "quiet_tensorflow")}


def _sources(packages=tuple(ALLOWED)):
    for package in packages:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    yield package, os.path.relpath(path, ROOT), path


def _imported_packages(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PACKAGES


SOURCES = list(_sources())


@pytest.mark.parametrize("package, relative, path", SOURCES, ids=[s[1] for s in SOURCES])
def test_imports_flow_down_the_package_list(package, relative, path):
    with open(path) as f:
        imported = _imported_packages(ast.parse(f.read()))
    allowed = ALLOWED[package] | COMPOSITION_ROOTS.get(relative, set())
    assert imported <= allowed, f"{relative} imports {sorted(imported - allowed)}"


def test_modules_and_functions_stay_small():
    too_long = []
    for _, relative, path in SOURCES:
        with open(path) as f:
            source = f.read()
        if source.count("\n") > MAX_MODULE_LINES and relative not in LONG_MODULES:
            too_long.append(f"{relative}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{relative}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, too_long


def _unexplained_imports(relative: str, source: str) -> list[str]:
    """`relative:line` of each import inside a function without a reason (IMPORT_REASONS)."""
    lines = source.splitlines()
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef) or \
                (relative, function.name) in IMPORTING_FUNCTIONS:
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            first = node.lineno - 1  # the first line of its block of imports
            while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                first -= 1
            context = lines[max(first - 1, 0):node.end_lineno]
            if not any(reason in line for line in context for reason in IMPORT_REASONS):
                found.append(f"{relative}:{node.lineno} {lines[node.lineno - 1].strip()}")
    return sorted(set(found))


def test_modules_import_at_their_top():
    unexplained = []
    for _, relative, path in _sources((*ALLOWED, "benchmarks")):
        with open(path) as f:
            unexplained += _unexplained_imports(relative, f.read())
    assert not unexplained, unexplained


def test_an_unexplained_import_inside_a_function_is_found():
    source = ("def f():\n    import os\n\n    return os\n\n\n"
              "def g():\n    # optional: only g needs it\n    import cv2\n    import grpc\n\n"
              "    return cv2, grpc\n\n\n"
              "def h():\n    x = 1\n    import json  # deferred: keeps this module light\n"
              "    return json, x\n")
    assert _unexplained_imports("m.py", source) == ["m.py:2 import os"]


def test_tests_share_helpers_only_through_tests_helpers():
    """A test module imports nothing from another test module: what tests share lives in
    tests/helpers.py (and fixtures in conftest.py, which pytest provides by name)."""
    borrowed = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if (isinstance(node, ast.ImportFrom) and node.module
                        and node.module.startswith("tests.") and node.module != "tests.helpers"):
                    borrowed.append(f"{os.path.relpath(path, ROOT)}: from {node.module}")
    assert not borrowed, borrowed
