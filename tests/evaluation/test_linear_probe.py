"""The linear_probe binary: outputs, loading a run folder, defaults, and one-line errors."""

import dataclasses
import json
import os

import numpy as np
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


def test_new_flags_at_their_defaults_keep_older_folders_and_otherwise_count():
    cfg = linear_probe.ProbeConfig(model="nin_mnist", init="random")
    older = linear_probe_lib.fingerprint_of(cfg, cfg.RESUMABLE)
    for flag in linear_probe_lib.LATER_FLAGS:
        del older[flag]
    assert linear_probe_lib.fingerprint(cfg) == older
    changed = dataclasses.replace(cfg, eval_split="validation", knn_temperature=0.07)
    assert linear_probe_lib.fingerprint(changed) == {
        **older, "eval_split": "validation", "knn_temperature": 0.07}


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
    (["--model=nin_mnist", "--init=random", "--eval_split=train"],
     "--eval_split=train: value should be one of <test|validation>"),
    (["--model=nin_mnist", "--init=random", "--holdout_per_class=0"],
     "--holdout_per_class=0: 0 is not a positive integer"),
    (["--model=nin_mnist", "--init=random", "--knn_temperature=-1"],
     "--knn_temperature=-1: -1.0 is not a non-negative number"),
    (["--model=nin_mnist", "--init=random", "--eval_split=validation", "--max_test_examples=5"],
     "--max_test_examples applies to --eval_split=test, not --eval_split=validation"),
    (["--model=nin_mnist", "--init=random", "--eval_split=validation"],
     "--holdout_per_class=1000: class 8 of digits train has only 111 examples; the validation "
     "holdout must leave some to draw labels from"),
    (["--model=nin_mnist", "--init=random", "--eval_split=validation", "--holdout_per_class=100",
      "--labels_per_class=20"], "--labels_per_class=20: 20 labels per class is more than class "
     "8 of digits train outside the holdout has (11 examples)"),
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


def _knn_oracle(bank, bank_labels, queries, k, temperature):
    """Cosine k-NN by brute force: one vote per neighbour, or exp(similarity / T); ties go
    to the class of the nearest neighbour."""
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sims = unit(queries.astype(np.float64)) @ unit(bank.astype(np.float64)).T
    predictions = []
    for row in sims:
        top = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        votes = np.zeros(10)
        for j in top:
            votes[bank_labels[j]] += np.exp(row[j] / temperature) if temperature else 1.0
        tied = [c for c in range(10) if np.isclose(votes[c], votes.max(), rtol=1e-9, atol=0)]
        predictions.append(next(bank_labels[j] for j in top if bank_labels[j] in tied))
    return np.asarray(predictions)


def test_knn_temperature_on_a_validation_holdout_matches_brute_force(tmp_path, capsys,
                                                                     monkeypatch):
    from data import labelled
    from evaluation import probe

    load, load_labels = labelled.load, labelled.load_labels

    def train_only(reader):
        def read(dataset, split, *args, **kwargs):
            assert split == "train", "the test split was read"
            return reader(dataset, split, *args, **kwargs)
        return read

    monkeypatch.setattr(labelled, "load", train_only(load))
    monkeypatch.setattr(labelled, "load_labels", train_only(load_labels))
    images, labels = labelled.load_arrays("digits", "train", (12, 12, 1))
    holdout = probe.validation_holdout(labels, 20, 5, 10)
    rest = np.setdiff1d(np.arange(len(labels)), holdout)
    x = images.reshape(len(images), -1)
    accuracies = []
    for temperature in (0.0, 0.07):
        out = tmp_path / f"t{temperature}"
        linear_probe.main(["linear_probe", "--model=nin_mnist", "--init=random",
                           '--model_kwargs={"input_shape": [12, 12, 1]}', "--endpoints=pixels",
                           "--head=knn", "--knn_k=200", f"--knn_temperature={temperature}",
                           "--labels_per_class=0", "--splits=1", "--seed=5",
                           "--eval_split=validation", "--holdout_per_class=20",
                           f"--output_dir={out}"])
        printed = capsys.readouterr().out
        result = json.loads((out / "probe.json").read_text())
        votes = f"T={temperature:g}" if temperature else "one vote each"
        assert f"knn (k=200, {votes}) probe of nin_mnist" in printed
        assert "validation holdout of 200 train images" in printed and "holdout acc %" in printed
        assert (result["scored_split"], result["scored_examples"], result["test_examples"],
                result["holdout_per_class"]) == ("validation", 200, 0, 20)
        assert result["train_examples"] == len(rest)
        assert result["config"]["knn_temperature"] == temperature
        (split,) = result["endpoints"][0]["splits"]
        assert split["hyper"] == ({"k": 200, "temperature": 0.07} if temperature else {"k": 200})
        expected = _knn_oracle(x[rest], labels[rest], x[holdout], 200, temperature)
        assert split["test_accuracy"] == pytest.approx(np.mean(expected == labels[holdout]))
        accuracies.append(split["test_accuracy"])
    assert accuracies[1] > accuracies[0]  # 200 neighbours: weighting by similarity helps
    # the flags are configuration: another temperature in the same folder is refused
    with pytest.raises(SystemExit):
        linear_probe.main(["linear_probe", "--model=nin_mnist", "--init=random",
                           '--model_kwargs={"input_shape": [12, 12, 1]}', "--endpoints=pixels",
                           "--head=knn", "--knn_k=200", "--knn_temperature=0.5",
                           "--labels_per_class=0", "--splits=1", "--seed=5",
                           "--eval_split=validation", "--holdout_per_class=20",
                           f"--output_dir={tmp_path / 't0.07'}"])
    assert "(knn_temperature: 0.07 -> 0.5)" in capsys.readouterr().err
