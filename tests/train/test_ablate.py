"""The ablation's caches answer only their own question; its gaps use the stronger twin."""

import json
import os

import pytest
import tensorflow as tf

from train import ablate, ablate_lib, cached


def _checkpoint(model_dir: str, value: float, step: int) -> None:
    variable = tf.Variable(value)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable), model_dir, 3)
    manager.save(checkpoint_number=step)


@pytest.fixture
def counted(monkeypatch):
    calls = []

    def evaluate(cfg, config, views, prefix):
        # every view and row reads the one checkpoint the cache is keyed by
        assert prefix == tf.train.latest_checkpoint(config.model_dir)
        calls.append((cfg.labels_per_class, cfg.splits))
        return {"linear": {"pretrained": 0.5 + 0.01 * len(calls)}}

    monkeypatch.setattr(ablate_lib, "_evaluate", evaluate)
    return calls


def test_a_run_is_reevaluated_when_its_settings_or_its_checkpoint_change(tmp_path, counted):
    cfg = ablate.AblateConfig(variants=("nat",), seeds=(0,), output_dir=str(tmp_path))
    config = ablate_lib.train_config(cfg, "nat", 0)
    _checkpoint(config.model_dir, 1.0, 1)
    first = ablate_lib.evaluate_run(cfg, config)
    assert ablate_lib.evaluate_run(cfg, config) == first and len(counted) == 1  # cached
    for changed in (dict(splits=3), dict(labels_per_class=4)):
        other = ablate.AblateConfig(variants=("nat",), seeds=(0,), output_dir=str(tmp_path),
                                    **changed)
        assert ablate_lib.evaluate_run(other, ablate_lib.train_config(other, "nat", 0)) != first
    assert counted == [(10, 5), (10, 3), (4, 5)]
    ablate_lib.evaluate_run(cfg, config)  # back to the first settings: the file now holds others'
    assert len(counted) == 4
    ablate_lib.evaluate_run(cfg, config)
    assert len(counted) == 4
    _checkpoint(config.model_dir, 2.0, 2)  # trained further (a larger --epochs): a new checkpoint
    ablate_lib.evaluate_run(cfg, config)
    assert len(counted) == 5
    path = os.path.join(config.model_dir, "ablation.json")
    with open(path) as f:
        stored = json.load(f)
    assert stored["key"]["checkpoint"] == cached.checkpoint_identity(config.model_dir)
    assert stored["key"]["checkpoint"]["step"] == 2
    with open(path, "w") as f:  # a cache from before the keys: recomputed
        json.dump({"linear": {"pretrained": 0.9}}, f)
    assert ablate_lib.evaluate_run(cfg, config) != {"linear": {"pretrained": 0.9}}
    assert len(counted) == 6


def test_the_scratch_accuracy_is_recomputed_for_other_labels(tmp_path, monkeypatch):
    from evaluation import finetune_lib

    runs = []

    class Result:
        def __init__(self, accuracy):
            self.test_accuracy = accuracy

    def run(ft):
        runs.append((ft.pretrained if ft.init == "pretrained" else ft.init, ft.labels_per_class,
                     ft.output_dir))
        return {"run": [Result(0.1 * len(runs))]}, ""

    monkeypatch.setattr(finetune_lib, "run", run)
    cfg = ablate.AblateConfig(variants=("sc",), seeds=(1,), output_dir=str(tmp_path))
    config = ablate_lib.train_config(cfg, "sc", 1)
    prefix = os.path.join(config.model_dir, "ckpt-3")
    ablate_lib._finetune(cfg, config, prefix)
    ablate_lib._finetune(cfg, config, prefix)
    assert [r[0] for r in runs] == ["random", prefix, prefix]  # scratch once
    fewer = ablate.AblateConfig(variants=("sc",), seeds=(1,), output_dir=str(tmp_path),
                                labels_per_class=3)
    result = ablate_lib._finetune(fewer, ablate_lib.train_config(fewer, "sc", 1), prefix)
    assert [r[:2] for r in runs[3:]] == [("random", 3), (prefix, 3)]
    assert result["random init"] == pytest.approx(0.4)
    assert len({r[2] for r in runs if r[0] == "random"}) == 2  # a folder per setting


def test_the_gap_is_taken_against_the_stronger_random_row_over_the_seeds():
    at, cal = "random init, BN at init", "random init, BN calibrated"
    runs = [{"linear": {"pretrained": p, at: a, cal: c, "pixels": 0.5},
             "finetune": {"pretrained": p, "random init": a}}
            for p, a, c in ((0.9, 0.8, 0.85), (0.92, 0.82, 0.8), (0.91, 0.79, 0.83))]
    rows = ablate_lib.summarise({"nat": runs})
    linear, finetune = rows
    assert linear["against"] == cal and linear["random init"][0] == pytest.approx(0.8266667)
    assert set(linear["random inits"]) == {at, cal}
    assert linear["gap"]["mean"] == pytest.approx(0.91 - 0.8266667)
    assert finetune["against"] == "random init"
    text = ablate_lib.table(rows)
    assert "BN calibrated (stronger)" in text and "scratch" in text
