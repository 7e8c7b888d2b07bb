"""Rows over pretraining seeds: each seed's figure is the mean over its draws, the gaps are
paired by seed against the stronger random-init row and against pixels."""

import numpy as np
import pytest
from scipy import stats

from evaluation import seed_table
from evaluation.random_init import AT_INIT, CALIBRATED


def _seed(pretrained, at_init, calibrated, pixels):
    return {"pretrained": pretrained, AT_INIT: at_init, CALIBRATED: calibrated,
            "pixels": pixels}


def test_a_frozen_row_pairs_each_seed_with_its_own_stronger_twin_and_pixels():
    per_seed = [_seed([0.80, 0.84], [0.70, 0.72], [0.75, 0.77], [0.78, 0.80]),
                _seed([0.83, 0.83], [0.71, 0.71], [0.74, 0.78], [0.79, 0.79]),
                _seed([0.86, 0.88], [0.72, 0.70], [0.77, 0.77], [0.80, 0.78])]
    row = seed_table.frozen_row("nat", "linear, 10/class", per_seed)
    mine = np.array([0.82, 0.83, 0.87])
    calibrated = np.array([0.76, 0.76, 0.77])  # the stronger: mean 0.763 against 0.71
    pixels = np.array([0.79, 0.79, 0.79])
    assert row["against"] == CALIBRATED
    np.testing.assert_allclose(row["pretrained"], [mine.mean(), mine.std()])
    np.testing.assert_allclose(row["baseline"], [calibrated.mean(), calibrated.std()])
    np.testing.assert_allclose(row["random inits"][AT_INIT], [0.71, 0.0], atol=1e-12)
    diff = mine - calibrated
    assert row["gap"]["mean"] == pytest.approx(diff.mean())
    assert row["gap"]["sd"] == pytest.approx(diff.std(ddof=1))
    assert row["gap"]["p"] == pytest.approx(stats.ttest_rel(mine, calibrated).pvalue)
    assert row["gap"]["over"] == "pretraining seeds" and row["gap"]["n"] == 3
    assert row["gap to pixels"]["mean"] == pytest.approx((mine - pixels).mean())
    assert seed_table.verdict(row["gap"]) == ("gap > spread" if row["gap"]["p"] < 0.05
                                              else "no difference")


def test_a_finetune_row_pairs_pretrained_and_scratch_by_seed_and_names_the_labels():
    per_seed = [{"pretrained": 0.80, "scratch": 0.78}, {"pretrained": 0.81, "scratch": 0.80},
                {"pretrained": 0.79, "scratch": 0.80}]
    row = seed_table.finetune_row("sc", "labels100", per_seed)
    assert row["view"] == "fine-tuned, 100/class" and row["against"] == "scratch"
    assert row["gap"]["mean"] == pytest.approx(np.mean([0.02, 0.01, -0.01]))
    assert seed_table.verdict(row["gap"]) == "no difference"
    everything = seed_table.finetune_row("sc", "all_labels", per_seed)
    assert everything["view"] == "fine-tuned, all labels"
    assert seed_table.supervised([row, everything]) == everything["baseline"]
    assert seed_table.supervised([row]) is None


def test_the_table_says_where_it_was_scored_and_marks_too_few_seeds():
    per_seed = [_seed([0.8], [0.7], [0.6], [0.75])]
    rows = [seed_table.frozen_row("nat", "linear, all labels", per_seed),
            seed_table.finetune_row("nat", "all_labels", [{"pretrained": 0.9, "scratch": 0.91}])]
    text = seed_table.table_text("fashion_mnist", "validation", rows, 1)
    assert "a validation holdout carved from train" in text
    assert "too few seeds" in text and "BN at init" in text
    assert "supervised (the same network trained from scratch with every label): 91.0 ± 0.0" \
        in text
    assert "the test split" in seed_table.table_text("fashion_mnist", "test", rows, 1)
    capped = seed_table.table_text("fashion_mnist", "test", rows, 1, supervised_epochs=8)
    assert "from scratch with every label, at most 8 epochs): 91.0 ± 0.0" in capped
