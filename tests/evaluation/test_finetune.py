"""Fine-tuning (SC protocol): every layer trains, only the init differs, augmentation, errors."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from data import labelled
from data.augment import translate_and_flip
from evaluation import finetune, finetune_lib
from models import build_model
from models.weights import named_variables
from runtime import cli
from runtime.ownership import RunMismatch
from tests.helpers import make_run_dir

SHAPE = [12, 12, 1]


def config(tmp_path, pretrained="", **changes):
    init = "pretrained" if pretrained else "random"
    base = dict(pretrained=pretrained, init=init, model="nin_mnist",
                output_dir=str(tmp_path / "out") if tmp_path else "",
                model_kwargs=json.dumps({"input_shape": SHAPE}), labels_per_class=3,
                seeds=(0,), epochs=1, batch_size=10, max_test_examples=40)
    return finetune.FinetuneConfig(**{**base, **changes})


def test_protocol_defaults_and_the_flags_agree():
    fv = flags.FlagValues()
    cli.define_flags(finetune.FinetuneConfig, fv, "finetune")
    fv(["finetune", "--init=random", "--model=nin_mnist", "--dataset=cifar10"])
    cfg = cli.config_from_flags(finetune.FinetuneConfig, fv)
    assert cfg == finetune.FinetuneConfig(init="random", model="nin_mnist",
                                         dataset="cifar10")
    assert (cfg.learning_rate, cfg.labels, cfg.mirrored) == (0.01, 400, True)
    assert finetune.PROTOCOL_LABELS["stl10"] == 0 and finetune.PROTOCOL_LABELS["mnist"] == 0
    assert not finetune.MIRROR["mnist"] and not finetune.MIRROR["digits"]
    assert finetune.MIRROR["stl10"]


def augment(image, seed, translate, mirror):
    return translate_and_flip(image, translate, mirror, seed, seed + 1)


def test_augment_translates_and_mirrors():
    image = tf.reshape(tf.range(36, dtype=tf.float32), (6, 6, 1))
    seed = tf.constant([3, 4], tf.int64)
    np.testing.assert_array_equal(augment(image, seed, 0, False), image)
    padded = np.pad(image.numpy(), [(2, 2), (2, 2), (0, 0)], mode="reflect")
    shifts = [padded[r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
    flips = {True: 0, False: 0}
    for s in range(20):
        out = augment(image, tf.constant([s, 1], tf.int64), 2, True).numpy()
        flipped = any(np.array_equal(out, shift[:, ::-1]) for shift in shifts)
        assert flipped or any(np.array_equal(out, shift) for shift in shifts)
        flips[flipped] += 1
    assert flips[True] and flips[False]
    again = augment(image, seed, 2, True)
    np.testing.assert_array_equal(again, augment(image, seed, 2, True))


@pytest.mark.parametrize("mixed_precision", ["none", "fp16"])
def test_fine_tuning_updates_every_layer(tmp_path, mixed_precision):
    cfg = config(tmp_path, mixed_precision=mixed_precision)
    name, kwargs = finetune_lib.model_spec(cfg)
    model, loaded = finetune_lib.initial_model(name, kwargs, None, 0, mixed_precision)
    assert loaded is None
    assert model.get_layer("conv2_1").compute_dtype == {"none": "float32",
                                                         "fp16": "float16"}[mixed_precision]
    data = finetune_lib.labelled_data(cfg, tuple(SHAPE), seed=0)
    # 3 labels per class cannot spare 5 per class for validation: all 30 train
    assert len(data.y_fit) == 30 and len(data.y_val) == 0
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    kept, converged, history = finetune_lib.train(model, data, cfg, seed=0)
    assert kept == 1 and not converged and len(history) == 1
    layers = {path.split("/")[0] for path in before}
    assert {"conv1_1", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_2_bn"} <= layers
    for variable in model.trainable_variables:
        assert not np.array_equal(variable.numpy(), before[variable.path]), variable.path


@pytest.mark.parametrize("labels, min_val, watched", [(3, 5, "train_loss"),
                                                      (10, 1, "val_loss")])
def test_plateau_cuts_the_learning_rate_on_the_watched_loss(tmp_path, labels, min_val, watched):
    cfg = config(tmp_path, epochs=8, patience=2, max_cuts=5, learning_rate=1e-6,
                 labels_per_class=labels, min_val_per_class=min_val)
    name, kwargs = finetune_lib.model_spec(cfg)
    model, _ = finetune_lib.initial_model(name, kwargs, None, seed=0)
    data = finetune_lib.labelled_data(cfg, tuple(SHAPE), seed=0)
    assert (len(data.y_val) > 0) == (watched == "val_loss")
    _, _, history = finetune_lib.train(model, data, cfg, 0)
    # the rule, replayed on the recorded losses
    lr, best, wait, expected = 1e-6, np.inf, 0, []
    for h in history:
        expected.append(lr)
        if h[watched] < best - 1e-4:
            best, wait = h[watched], 0
        else:
            wait += 1
            if wait >= 2:
                lr, wait = lr * 0.1, 0
    rates = [h["learning_rate"] for h in history]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    assert len(history) == 8 and rates[-1] < 1e-6  # a tiny lr plateaus: at least one cut


def test_batches_never_exceed_the_labelled_set_and_cover_it_each_epoch():
    x = np.random.default_rng(0).uniform(size=(7, 4, 4, 1)).astype(np.float32)
    y = np.arange(7)
    batches = list(labelled.train_stream(x, y, 3, seed=1, epochs=2, translate=0, mirror=False))
    assert [len(b[1]) for b in batches] == [3, 3, 1, 3, 3, 1]
    for epoch in (0, 1):
        labels = np.concatenate([b[1].numpy() for b in batches[3 * epoch:3 * epoch + 3]])
        assert sorted(labels) == list(range(7))  # each epoch visits every example once
        np.testing.assert_array_equal(
            labels, np.random.default_rng([1, 2, epoch + 1]).permutation(7))
    cfg = config(None, batch_size=128, labels_per_class=1, output_dir="unused")
    assert finetune_lib.validation_fraction(np.arange(10) % 10, cfg) == 0.0
    plenty = config(None, labels_per_class=50, output_dir="unused")
    assert finetune_lib.validation_fraction(np.arange(500) % 10, plenty) == 0.1


def test_warnings_name_unconverged_and_failed_runs():
    def result(seed, converged, accuracy):
        return finetune_lib.RunResult(seed, "none", 0, 300, 300, converged, "training", 0.0, 0.0,
                                  0.0, accuracy, ())

    notes = finetune_lib.warnings({"scratch": [result(0, True, 0.9), result(1, False, 0.12)]}, 10)
    assert notes == [
        "scratch seed 1: stopped at the 300-epoch limit before converging (the training loss "
        "was still improving); raise --epochs",
        "scratch seed 1: test accuracy 12.0% is near chance (10%): this run failed"]


def test_pretrained_and_scratch_differ_only_in_the_init(tmp_path, monkeypatch):
    model_dir, saved = make_run_dir(tmp_path / "pretrain", seed=5, input_shape=SHAPE, head="nat",
                                    feature_dim=8)
    cfg = config(tmp_path, pretrained=model_dir, model="", model_kwargs="{}", compare_scratch=True)
    starts, batches = [], []
    initial_model, train_stream = finetune_lib.initial_model, labelled.train_stream

    def recording_initial_model(name, kwargs, init, seed, *args):
        model, loaded = initial_model(name, kwargs, init, seed, *args)
        starts.append((init, {k: v.numpy().copy() for k, v in named_variables(model).items()}))
        return model, loaded

    def recording_batches(*args, **kwargs):
        ds = train_stream(*args, **kwargs)
        batches.append([(x.numpy(), y.numpy()) for x, y in ds])
        return ds

    monkeypatch.setattr(finetune_lib, "initial_model", recording_initial_model)
    monkeypatch.setattr(labelled, "train_stream", recording_batches)
    results, table = finetune_lib.run(cfg)
    assert "pretrained" in table and "none (scratch)" in table
    assert "pretrained - scratch: " in table and "(one pair: no spread, no test)" in table

    # run() checks the checkpoint once up front, then one pretrained and one scratch run
    (_, pretrained), (init_b, scratch) = starts[1:]
    assert init_b is None and len(batches) == 2
    for (xa, ya), (xb, yb) in zip(batches[0], batches[1], strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    stored = named_variables(saved)
    for key, value in pretrained.items():
        if key in stored:  # the backbone comes from the checkpoint
            np.testing.assert_array_equal(value, stored[key].numpy())
        else:  # the classifier: the same draw in both runs
            np.testing.assert_array_equal(value, scratch[key], err_msg=key)
    assert not np.array_equal(pretrained["conv1_1.kernel"], scratch["conv1_1.kernel"])
    a, b = results["pretrained"][0], results["scratch"][0]
    assert a.loaded > 0 and b.loaded == 0
    same = {f.name for f in dataclasses.fields(a)} - {"init", "loaded", "history", "best_epoch",
                                                      "epochs", "val_loss", "val_accuracy",
                                                      "test_loss", "test_accuracy", "converged"}
    assert same == {"seed", "watched"} and a.seed == b.seed and a.watched == b.watched
    written = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert set(written["runs"]) == {"pretrained", "scratch"}
    assert (tmp_path / "out" / "finetune.md").read_text().count("|") > 10
    # The output folder now holds this configuration: another one is refused before any work.
    starts.clear()
    with pytest.raises(RunMismatch, match=r"out holds a run with other settings \("
                       r"learning_rate: 0.01 -> 0.5\): rerun with the recorded settings, or "
                       "use another --output_dir$"):
        finetune_lib.run(dataclasses.replace(cfg, learning_rate=0.5))
    assert starts == []


@pytest.mark.parametrize("argv, expected", [
    (["--pretrained={empty}"], "--pretrained={empty}: no checkpoint in directory"),
    (["--init=random", "--dataset=svhn"], "--dataset"),
    (["--init=random", "--model=nin_mnist", "--labels_per_class=500"],
     "--labels_per_class=500: 500 labels per class is more than class"),
    (["--init=random"], "--init=random needs --model"),
    (["--init=random", "--model=vgg"], "--model=vgg: choose one of alexnet"),
    (["--init=random", "--mixed_precision=fp8"], "--mixed_precision=fp8"),
    ([], "--pretrained is required (see --help)"),
    (["--init=none", "--model=nin_mnist"], "--init=none"),
    (["--init=runs/x"], "--init=runs/x"),
    (["--init=random", "--model=nin_mnist", "--eval_split=test2"], "--eval_split=test2"),
    (["--init=random", "--model=nin_mnist", "--eval_split=validation", "--max_test_examples=5"],
     "--max_test_examples applies to --eval_split=test, not --eval_split=validation"),
    (["--init=random", "--model=nin_mnist", "--eval_split=validation"],
     "--holdout_per_class=1000: class 8 of digits train has only 111 examples"),
    (["--init=random", "--model=nin_mnist", "--holdout_per_class=0"],
     "--holdout_per_class=0: 0 is not a positive integer"),
])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, capsys, argv, expected):
    empty = tmp_path / "empty"  # a run folder with its config.json but no checkpoint
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model": "nin_mnist", "model_kwargs": {}}))
    argv = [a.format(empty=empty) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["finetune", *argv, f"--output_dir={tmp_path / 'out'}", "--epochs=1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evaluation.finetune: error: ")
    assert expected.format(empty=empty) in err
    if "--dataset" in expected:
        assert "digits" in err and "imagenet2012" in err


def test_scratch_model_loads_nothing():
    model, loaded = finetune_lib.initial_model("nin_mnist", {"input_shape": SHAPE}, None, 1)
    again, _ = finetune_lib.initial_model("nin_mnist", {"input_shape": SHAPE}, None, 1)
    assert loaded is None
    for a, b in zip(model.variables, again.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert build_model("nin_mnist", input_shape=SHAPE).count_params() == model.count_params()


def test_a_diverged_fine_tune_stops_with_one_line_naming_the_step(tmp_path, capsys):
    model_dir, _ = make_run_dir(tmp_path / "pretrain", seed=5, input_shape=SHAPE, head="nat",
                                feature_dim=8)
    checkpoint = {p.name: p.read_bytes() for p in (tmp_path / "pretrain").iterdir()
                  if p.is_file()}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["finetune", f"--pretrained={model_dir}", f"--output_dir={out}",
                       "--labels_per_class=3", "--batch_size=10", "--epochs=5",
                       "--learning_rate=1e30", "--max_test_examples=40"])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines[-1].split("\r")) == 1 and lines[-1].startswith(
        "evaluation.finetune: error: fine-tuning pretrained, seed 0 (epoch ")
    assert "loss is not finite at step " in lines[-1] and "--learning_rate" in lines[-1]
    step = int(lines[-1].split("at step ")[1].split()[0])
    assert 1 < step <= 15  # 3 steps an epoch: the first step is finite, the 1e30 update is not
    assert {p.name: p.read_bytes() for p in (tmp_path / "pretrain").iterdir()
            if p.is_file()} == checkpoint  # the pretraining checkpoint is intact
    assert not out.exists() or not {"config.json", "finetune.json", "finetune.md"} & set(
        p.name for p in out.iterdir())  # nothing written


def test_the_epoch_stops_before_the_first_non_finite_step():
    model = build_model("nin_mnist", input_shape=SHAPE, head="softmax", num_classes=10)
    optimizer = tf.keras.optimizers.SGD(1e30)  # the first step is finite, then it diverges
    optimizer.build(model.trainable_variables)
    x = np.random.default_rng(0).uniform(size=(6, 4, *SHAPE)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, (6, 4))
    batches = iter(tf.data.Dataset.from_tensor_slices((x, y)))
    _, bad_loss, bad = finetune_lib._train_epoch(model, optimizer)(batches, tf.constant(6))
    assert 1 <= int(bad) < 6 and not np.isfinite(float(bad_loss))
    assert int(optimizer.iterations) == int(bad)  # the steps before it, none from it on


def test_every_seed_starts_from_one_checkpoint_read_once(tmp_path, monkeypatch):
    """A live run writes a newer checkpoint between the seeds: both seeds still start from the
    checkpoint read at the start, read once, and finetune.json records its path and step."""
    from models import checkpoints
    from models.checkpoints import open_checkpoints

    model_dir, saved = make_run_dir(tmp_path / "pretrain", seed=5, input_shape=SHAPE,
                                    head="nat", feature_dim=8)
    first = tf.train.latest_checkpoint(model_dir)
    _, writer, _ = open_checkpoints(model_dir, {"model": named_variables(saved)}, keep=1)
    reads, starts = [], []
    check, run_seed = checkpoints.check_checkpoint, finetune_lib.run_seed

    def counted_check(prefix, want=None):
        reads.append(prefix)
        return check(prefix, want)

    def run_seed_then_train_on(cfg, name, kwargs, init, seed, *args):
        result = run_seed(cfg, name, kwargs, init, seed, *args)
        starts.append(result.init)
        for variable in saved.trainable_variables:  # the run trains on and saves
            variable.assign(variable + 1.0)
        writer.save(checkpoint_number=len(starts) + 1)
        return result

    monkeypatch.setattr(checkpoints, "check_checkpoint", counted_check)
    monkeypatch.setattr(finetune_lib, "run_seed", run_seed_then_train_on)
    results, _ = finetune_lib.run(config(tmp_path, pretrained=model_dir, model="",
                                         model_kwargs="{}", seeds=(0, 1)))
    assert reads == [first]
    assert starts == [first, first] and first.endswith("ckpt-1")
    assert not os.path.exists(first + ".index")  # rotated away meanwhile (keep=1)
    assert [r.init for r in results["pretrained"]] == [first, first]
    written = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert written["checkpoint"] == {"path": first, "step": 1}


def test_validation_holdout_is_scored_the_same_for_every_seed_and_test_is_never_read(
        tmp_path, monkeypatch):
    from evaluation import probe

    reads, load, load_labels = [], labelled.load, labelled.load_labels

    def spy(reader, log):
        def read(dataset, split, *args, **kwargs):
            assert split == "train", "the test split was read"
            if log:
                reads.append(np.asarray(args[1] if len(args) > 1 else kwargs["indices"]))
            return reader(dataset, split, *args, **kwargs)
        return read

    monkeypatch.setattr(labelled, "load", spy(load, True))  # every image read
    monkeypatch.setattr(labelled, "load_labels", spy(load_labels, False))
    cfg = config(tmp_path, eval_split="validation", holdout_per_class=20, max_test_examples=0,
                 seeds=(0, 1), labels_per_class=4)
    results, text = finetune_lib.run(cfg)
    holdout = probe.validation_holdout(load_labels("digits", "train"), 20, 0, 10)
    # per seed: its draw (4 per class), then the scored holdout
    assert [len(positions) for positions in reads] == [40, 200, 40, 200]
    drawn, scored = reads[0::2], reads[1::2]
    for positions in scored:
        np.testing.assert_array_equal(positions, holdout)
    for positions in drawn:
        assert not np.isin(positions, holdout).any()
    assert not np.array_equal(drawn[0], drawn[1])  # each seed its own draw
    assert "scored on a validation holdout of 200 train images" in text
    assert "holdout acc %" in text and [r.seed for r in results["scratch"]] == [0, 1]
    written = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert (written["scored_split"], written["scored_examples"]) == ("validation", 200)
