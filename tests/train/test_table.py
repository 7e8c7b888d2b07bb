"""train.table end to end on the digits: every row of a seed, each with its own twin,
the twins shared between methods only when their weights are the same, nothing recomputed on
a rerun, and a validation table that never reads the test split."""

import json
import os

import pytest

from data import labelled
from evaluation.random_init import AT_INIT, CALIBRATED
from train import table, table_lib

QUICK = dict(dataset="digits", epochs=1, few_labels=(5,), few_splits=2, knn_k=5,
             finetune_labels=(5,), finetune_epochs=2)


def _config(tmp_path, **changes):
    return table.TableConfig(output_dir=str(tmp_path / "table"), **{**QUICK, **changes})


@pytest.mark.slow
def test_the_table_measures_every_view_resumes_and_shares_only_equal_twins(tmp_path, monkeypatch):
    cfg = _config(tmp_path, methods=("nat", "sc"), seeds=(0,))
    rows = table_lib.run(cfg)
    views = {(r["method"], r["view"]) for r in rows}
    for method in ("nat", "sc"):
        assert {(method, v) for v in ("linear, all labels", "5-NN, all labels",
                                      "1-NN, all labels", "linear, 5/class",
                                      "fine-tuned, 5/class")} <= views
    for r in rows:
        assert r["seeds"] == 1 and r["gap"]["n"] == 1
        if r["kind"] == "frozen":
            assert set(r["random inits"]) == {AT_INIT, CALIBRATED}
            assert 0.0 < r["pixels"][0] <= 1.0
    with open(os.path.join(cfg.output_dir, "table.json")) as f:
        written = json.load(f)
    nat_seed0 = written["per_seed"]["nat"][0]["frozen"]["linear, 5/class"]
    assert len(nat_seed0["pretrained"]) == 2  # one accuracy per label draw
    assert os.path.getsize(os.path.join(cfg.output_dir, "table.png")) > 0
    # The twins' rows are one file per question: NAT's and SC's twins start from the same
    # backbone weights (their digests agree), so the views both read from `sc` with the same
    # settings (the linear ones) are measured once per seed; the k-NN views read different
    # features (NAT's embedding, SC's global average of `sc`) and are not shared; the pixel
    # rows are shared by both methods.
    shared = os.listdir(os.path.join(cfg.output_dir, "shared"))
    expected = 0
    for seed in cfg.seeds:
        twins = {m: table_lib.random_twin(table_lib.train_config(cfg, m, seed))
                 for m in ("nat", "sc")}
        same = len({table_lib.weights_digest(t, ["sc"]) for t in twins.values()}) == 1
        expected += 2 * (2 * (1 if same else 2) + 2 * 2) + 4
    assert len(shared) == expected
    # A rerun measures nothing again.
    monkeypatch.setattr(table_lib._Network, "accuracies",
                        lambda *a, **k: pytest.fail("recomputed"))
    monkeypatch.setattr(table_lib, "_finetuned", lambda *a, **k: pytest.fail("recomputed"))
    assert json.dumps(table_lib.run(cfg)) == json.dumps(rows)  # NaN p-values compare equal


@pytest.mark.slow
def test_a_validation_table_never_reads_the_test_split(tmp_path, monkeypatch):
    read = []
    original = labelled.load

    def load(source, split, *args, **kwargs):
        read.append(split)
        return original(source, split, *args, **kwargs)

    monkeypatch.setattr(labelled, "load", load)
    cfg = _config(tmp_path, methods=("nat",), seeds=(0,), eval_split="validation",
                  holdout_per_class=20, finetune_labels=())
    rows = table_lib.run(cfg)
    assert read and "test" not in read
    assert all(r["seeds"] == 1 for r in rows)


def test_a_dataset_without_a_recipe_is_refused_with_its_path(tmp_path):
    with pytest.raises(table.UsageError, match=r"--methods=nat: there is no recipe for "
                       r"--dataset=cifar10 \(.*nat_cifar10\.flags\)"):
        _config(tmp_path, dataset="cifar10")
    with pytest.raises(table.UsageError, match="--few_labels: 0"):
        _config(tmp_path, few_labels=(0,))
