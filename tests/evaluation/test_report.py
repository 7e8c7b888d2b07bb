"""Report helpers: the paired comparison against its formula, tables and atomic files."""

import math
import os

import numpy as np
import pytest
from scipy import stats

from evaluation import report


def test_paired_gap_is_the_t_test_of_the_differences():
    a = [0.91, 0.93, 0.90, 0.94, 0.92]
    b = [0.89, 0.90, 0.89, 0.91, 0.88]
    gap = report.paired_gap(a, b, "label draws")
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert gap.mean == pytest.approx(d.mean()) and gap.sd == pytest.approx(d.std(ddof=1))
    assert gap.p == pytest.approx(2 * stats.t.sf(abs(t), df=len(d) - 1))
    assert gap.significant
    assert gap.describe() == (f"+2.6 points ± {100 * d.std(ddof=1):.1f} (mean ± sd of the 5 "
                              f"differences over the same label draws; paired t-test p = "
                              f"{gap.p:.3f}): larger than its spread")


def test_a_gap_inside_its_spread_is_no_difference():
    gap = report.paired_gap([0.9, 0.8, 0.95], [0.85, 0.86, 0.9], "seeds")
    assert not gap.significant and gap.describe().endswith("within its spread: no difference")
    assert report.paired_gap([0.5], [0.4], "seeds").describe() == (
        "+10.0 points (one pair: no spread, no test)")
    assert report.paired_gap([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], "seeds").p == 1.0
    two = report.paired_gap([0.5, 0.6], [0.4, 0.5], "seeds")
    assert not two.significant and "too few pairs to test" in two.describe()
    with pytest.raises(ValueError, match="equal-length"):
        report.paired_gap([0.5, 0.6], [0.5], "seeds")


def test_write_report_leaves_no_temporary_file(tmp_path):
    text = report.write_report(str(tmp_path / "out"), "probe", {"x": np.float32(1.5)},
                               ["a", "b"], [["1", "22"]], "title")
    assert text.splitlines()[0].split() == ["a", "b"]
    assert sorted(os.listdir(tmp_path / "out")) == ["probe.json", "probe.md"]
    assert (tmp_path / "out" / "probe.md").read_text().startswith("title\n\n| a | b |")
