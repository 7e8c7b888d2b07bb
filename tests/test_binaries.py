"""Every binary checks its flags before TensorFlow loads: `main` parses the flags into the
config with the light module alone, and names its run as "package.module:function" for
runtime/cli.py to import afterwards; and the flags they share mean one thing in each."""

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from runtime import cli, vocabulary

# tests.helpers imports Keras: this file does not, so that it stays fast on its own.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each binary with flags its config accepts (required ones set; nothing is read or written).
BINARIES = {
    "train.pretrain": [],
    "train.ablate": [],
    "train.data_service": ["worker", "--dispatcher=localhost:5050"],
    "evaluation.finetune": ["--init=random", "--model=nin_mnist"],
    "evaluation.linear_probe": ["--model=nin_mnist", "--init=random"],
    "evaluation.visualize": ["retrieval", "--features=f.npy", "--output=o.png"],
    "evaluation.voc.classification": ["--model_dir=voc_run"],
    "evaluation.voc.detection": ["--model_dir=voc_run"],
    "serving.export": ["--init=random", "--model=nin_mnist", "--export_base=exports"],
    "serving.extract_features": ["--digits", "--saved_model=export/1", "--output_dir=out"],
}
HEAVY = ("tensorflow", "keras", "tensorflow_datasets")

# Runs every binary's main with --check_flags, with a bad flag and with --help, in ONE fresh
# process; prints {binary: {case: [exit status, stdout, stderr]}} and the heavy modules loaded.
SCRIPT = """
import contextlib, importlib, io, json, sys
out = {}
for name, flags in json.loads(sys.argv[1]).items():
    binary = importlib.import_module(name)
    cases = {"check": [*flags, "--check_flags"], "bad": [*flags, "--no_such_flag=1"],
             "help": ["--help"]}
    for case, argv in cases.items():
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                binary.main([name, *argv])
                code = None
            except SystemExit as exit:
                code = exit.code
        out.setdefault(name, {})[case] = [code, stdout.getvalue(), stderr.getvalue()]
print(json.dumps({"runs": out, "loaded": [m for m in sys.argv[2:] if m in sys.modules]}))
"""


@pytest.mark.slow
def test_no_binary_loads_tensorflow_to_check_its_flags(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(BINARIES), *HEAVY],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["loaded"] == [], report["loaded"]
    assert set(report["runs"]) == set(BINARIES)
    for name, runs in report["runs"].items():
        code, stdout, stderr = runs["check"]
        assert (code, stdout, stderr) == (0, f"{name}: the flags are valid\n", ""), name
        code, stdout, stderr = runs["bad"]
        assert code == cli.EXIT_ERROR and stdout == "", name
        assert stderr.startswith(f"{name}: error: ") and "no_such_flag" in stderr, stderr
        assert stderr.count("\n") == 1, stderr
        code, stdout, _ = runs["help"]
        assert code == 0 and "check_flags: Check the flags" in stdout, name


def _defined_functions(module: str) -> set[str]:
    """The top-level functions of `module`'s source, read without importing it."""
    with open(importlib.util.find_spec(module).origin) as f:
        tree = ast.parse(f.read())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("name", sorted(BINARIES))
def test_each_binary_names_a_run_of_its_lib_module(name, monkeypatch):
    called = []
    monkeypatch.setattr(cli, "run_or_fail", lambda program, run, config, verbosity: called.append(
        (program, run, type(config).__name__)))
    importlib.import_module(name).main([name, *BINARIES[name]])
    [(program, run, _)] = called
    module, _, function = run.partition(":")
    assert program == name and module == f"{name}_lib", run
    assert function in _defined_functions(module), run


# ------------------------------------------------------------------------------ vocabulary
# One name per meaning across the binaries (runtime/vocabulary.py): --model_dir is the run a
# binary trains and resumes, --output_dir where it writes results, --pretrained the run it
# reads, --init=pretrained|random; each shared flag is declared once, in one base.

# Who has which shared flag (the module docstring of runtime/vocabulary.py).
MODEL_DIR = {"train.pretrain", "evaluation.voc.classification", "evaluation.voc.detection"}
OUTPUT_DIR = {"evaluation.linear_probe", "evaluation.finetune", "train.ablate",
              "serving.extract_features"}
PRETRAINED = {"train.pretrain", "evaluation.voc.classification", "evaluation.voc.detection",
              "serving.export", "evaluation.linear_probe", "evaluation.visualize",
              "evaluation.finetune"}
INIT = {"evaluation.linear_probe", "serving.export", "evaluation.finetune",
        "evaluation.visualize"}
OLD = ("init_checkpoint", "checkpoint")  # names that meant --pretrained


def _config_type(name: str, monkeypatch) -> type:
    """The config dataclass that `name`'s main hands to runtime.cli.main."""
    seen = []
    monkeypatch.setattr(cli, "main", lambda program, config_type, *a, **k: seen.append(
        config_type))
    importlib.import_module(name).main([name])
    return seen[0]


def _base_field(base: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(base)}[name]


SHARED = {"model_dir": vocabulary.RunFolder, "output_dir": vocabulary.OutputFolder,
          "pretrained": vocabulary.Pretrained, "init": vocabulary.PretrainedInput,
          "data_dir": vocabulary.DataDir, "manual_dir": vocabulary.DataLocation}


@pytest.mark.parametrize("name", sorted(BINARIES))
def test_each_shared_flag_has_one_meaning_and_one_declaration(name, monkeypatch):
    fields = {f.name: f for f in cli.flag_fields(_config_type(name, monkeypatch))}
    assert ("model_dir" in fields) == (name in MODEL_DIR)
    assert ("output_dir" in fields) == (name in OUTPUT_DIR)
    assert ("pretrained" in fields) == (name in PRETRAINED)
    assert ("init" in fields) == (name in INIT)
    assert not set(OLD) & set(fields)
    if "init" in fields:
        assert fields["init"].metadata["choices"] == ("pretrained", "random")
        assert fields["init"].default == "pretrained"
    for flag, base in SHARED.items():
        if flag in fields:  # the base's own field: one default, one help text
            shared = _base_field(base, flag)
            assert fields[flag] is shared, flag
            assert fields[flag].metadata["help"] is shared.metadata["help"], flag


@pytest.mark.parametrize("name", sorted(BINARIES))
def test_an_old_flag_name_is_one_line_naming_it(name, monkeypatch, capsys):
    fields = {f.name for f in cli.flag_fields(_config_type(name, monkeypatch))}
    monkeypatch.undo()
    old = "init_checkpoint" if "model_dir" in fields else "model_dir"
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(name).main([name, f"--{old}=runs/x"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{name}: error: ") and old in err
