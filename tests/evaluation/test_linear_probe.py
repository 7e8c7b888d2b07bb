"""The linear_probe binary: outputs, loading a run folder, defaults, and one-line errors."""

import json
import os

import pytest

from evaluation import linear_probe, linear_probe_lib
from tests.helpers import make_run_dir, run_module


def test_probe_of_a_run_writes_table_json_and_markdown(tmp_path, capsys):
    run, _ = make_run_dir(tmp_path / "run", input_shape=(12, 12, 1), head="nat", feature_dim=8)
    linear_probe.main(["linear_probe", f"--pretrained={run}", "--dataset=digits",
                       "--endpoints=sc,embedding,pixels", "--labels_per_class=3", "--splits=2",
                       "--max_test_examples=50"])
    printed = capsys.readouterr().out
    assert "ckpt-1" in printed and "embedding" in printed
    out = tmp_path / "run" / "probe"  # the default output folder of a run
    assert f"wrote {out}/probe.md" in printed
    result = json.loads((out / "probe.json").read_text())
    assert result["test_examples"] == 50 and result["train_examples"] <= 60
    assert [e["endpoint"] for e in result["endpoints"]] == ["sc", "embedding", "pixels"]
    for e in result["endpoints"]:
        accuracies = [s["test_accuracy"] for s in e["splits"]]
        assert len(accuracies) == 2
        assert e["mean"] == pytest.approx(sum(accuracies) / 2)
        assert all(s["fit_examples"] + s["val_examples"] == 30 for s in e["splits"])
    markdown = (out / "probe.md").read_text()
    assert markdown.count("\n| ") == 5  # header, rule and three rows
    assert json.loads((out / "config.json").read_text())["labels_per_class"] == 3
    # The folder belongs to this configuration: another one is refused, and writes nothing.
    written = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(SystemExit) as exit_info:
        linear_probe.main(["linear_probe", f"--pretrained={run}", "--dataset=digits",
                           "--endpoints=sc,embedding,pixels", "--labels_per_class=3",
                           "--splits=1", "--max_test_examples=50"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        f"evaluation.linear_probe: error: {out} holds a run with other settings (splits: 2 -> "
        "1): rerun with the recorded settings, or use another --output_dir\n")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == written


def test_default_output_folders():
    cfg = linear_probe.ProbeConfig
    assert cfg(pretrained="runs/a").out == os.path.join("runs/a", "probe")
    assert cfg(pretrained="runs/a", init="random").out == os.path.join("runs/a", "probe_random")
    assert cfg(model="nin_mnist", init="random").out == os.path.join("runs",
                                                                      "probe_nin_mnist_random")
    assert cfg(saved_model="runs/a/export/nin_mnist/3").out == os.path.join(
        "runs", "probe_nin_mnist_v3")
    assert cfg(pretrained="runs/a", output_dir="elsewhere").out == "elsewhere"


@pytest.mark.parametrize("argv, expected", [
    (["--pretrained={empty}"], "--pretrained={empty}: no checkpoint in directory"),
    (["--model=nin_mnist", "--init=random", "--endpoints=conv9"],
     "--endpoints: unknown endpoint 'conv9' of nin_mnist; choose from block1, block2, sc, "
     "head, logits, pixels"),
    (["--model=nin_mnist", "--init=random", "--dataset=svhn"],
     "--dataset=svhn: value should be one of "
     "<digits|mnist|fashion_mnist|cifar10|stl10|imagenet2012>"),
    (["--model=nin_mnist", "--init=random", "--labels_per_class=200"],
     "--labels_per_class=200: 200 labels per class is more than class"),
    (["--init=pretrained"], "--init=pretrained needs --pretrained or --saved_model"),
    (["--init=checkpoint"], "--init=checkpoint: value should be one of <pretrained|random>"),
    (["--model=resnet", "--init=random"], "--model=resnet: choose one of alexnet, nin_stl10"),
    (["--pretrained={tmp}/missing"], "run folder {tmp}/missing does not exist"),
])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, capsys, argv, expected):
    empty = tmp_path / "empty"  # a run folder with its config.json but no checkpoint
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model": "nin_mnist", "model_kwargs": {}}))
    argv = [a.format(empty=empty, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        linear_probe.main(["linear_probe", *argv, f"--output_dir={tmp_path / 'out'}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evaluation.linear_probe: error: ")
    assert expected.format(empty=empty, tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()  # a refused run writes nothing


@pytest.mark.slow
def test_program_runs_as_a_module(tmp_path):
    out = tmp_path / "out"
    run = run_module("evaluation.linear_probe", "--model=nin_mnist", "--init=random",
                     '--model_kwargs={"input_shape": [12, 12, 1]}', "--endpoints=sc,pixels",
                     "--labels_per_class=2", "--splits=1", "--max_test_examples=30",
                     f"--output_dir={out}", timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr == ""
    assert "test acc %" in run.stdout and "pixels" in run.stdout
    assert {"config.json", "probe.json", "probe.md"} <= set(os.listdir(out))
    bad = run_module("evaluation.linear_probe", f"--pretrained={tmp_path}", timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"evaluation.linear_probe: error: --pretrained={tmp_path}: {tmp_path} has no "
        "config.json: not a run folder"]


def test_random_init_is_the_runs_seeded_twin_probed_at_init_and_calibrated(tmp_path, capsys):
    import numpy as np

    from evaluation import random_init
    from models.weights import named_variables

    assert (linear_probe_lib.AT_INIT, linear_probe_lib.CALIBRATED) == random_init.RANDOM_INITS
    # The network a run with seed 3 starts from is the one make_run_dir builds under seed 3.
    run, start = make_run_dir(tmp_path / "run", seed=3, config={"seed": 3, "dataset": "digits"},
                              input_shape=(12, 12, 1), head="nat", feature_dim=8)
    cfg = linear_probe.ProbeConfig(pretrained=run, init="random", seed=9)
    for _ in range(2):  # every call: the same weights, the run's twin's
        model, _, weights, _ = linear_probe_lib.load_model(cfg)
        assert weights == "random init, seed 3"
        for key, variable in named_variables(start).items():
            np.testing.assert_array_equal(named_variables(model)[key].numpy(), variable.numpy())
    images = list(linear_probe_lib.calibration_images(cfg, (12, 12, 1)))
    assert len(images) == 1198  # the run's pretraining images: every train digit
    linear_probe.main(["linear_probe", f"--pretrained={run}", "--init=random", "--dataset=digits",
                       "--endpoints=sc", "--labels_per_class=3", "--splits=2",
                       "--max_test_examples=60"])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "probe_random" / "probe.json").read_text())
    means = {init: r["endpoints"][0]["mean"] for init, r in result["random_inits"].items()}
    assert list(means) == [linear_probe_lib.AT_INIT, linear_probe_lib.CALIBRATED]
    assert result["stronger"] == {"sc": max(means, key=means.get)}
    assert f"sc: the stronger random-init row is {result['stronger']['sc']}" in printed
    assert printed.count("random init, BN ") >= 3  # two rows and the note
