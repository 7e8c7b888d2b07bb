"""Result tables of the evaluation binaries: console text, markdown and JSON, and the paired
comparison of two initialisations measured on the same label draws or seeds.

A table is a list of headers and rows of strings. `write_report(output_dir, name, ...)` writes
`<name>.json` (every figure, as given) and `<name>.md` (the table), each atomically, and
returns the console text of the table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from runtime.files import write_json_atomic, write_text_atomic

MIN_PAIRS = 3  # fewer pairs cannot tell a gap from its spread


@dataclass(frozen=True)
class PairedGap:
    """a - b compared pair by pair: the same label draws (or seeds) for both, so the spread
    that matters is that of the n differences, not of either side."""

    over: str  # what the pairs share: "label draws", "seeds"
    n: int
    mean: float  # mean of a_i - b_i (accuracies in [0, 1])
    sd: float  # sample standard deviation (ddof 1) of the differences
    p: float  # two-sided paired t-test (NaN for one pair)

    @property
    def significant(self) -> bool:
        """A two-sided paired t-test at 5% (False when there are too few pairs)."""
        return bool(self.p < 0.05)

    def describe(self) -> str:
        """One line: the gap, its spread, the test and what it means."""
        text = f"{100 * self.mean:+.1f} points"
        if self.n < 2:
            return f"{text} (one pair: no spread, no test)"
        if self.n < MIN_PAIRS:
            return (f"{text} ± {100 * self.sd:.1f} (sd of {self.n} differences: too few pairs "
                    "to test)")
        verdict = ("larger than its spread" if self.significant
                   else "within its spread: no difference")
        p = "p < 0.001" if self.p < 0.001 else f"p = {self.p:.3f}"
        return (f"{text} ± {100 * self.sd:.1f} (mean ± sd of the {self.n} differences over the "
                f"same {self.over}; paired t-test {p}): {verdict}")


def paired_gap(a, b, over: str) -> PairedGap:
    """The PairedGap of accuracies a and b measured on the same `over` (label draws, seeds)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_gap needs two equal-length lists; got {a.shape}, {b.shape}")
    diff = a - b
    if len(diff) < 2:
        return PairedGap(over, len(diff), float(diff.mean()), float("nan"), float("nan"))
    sd = float(diff.std(ddof=1))
    if len(diff) < MIN_PAIRS:
        return PairedGap(over, len(diff), float(diff.mean()), sd, float("nan"))
    if sd == 0.0:
        p = 1.0 if diff.mean() == 0.0 else 0.0
    else:
        p = float(stats.ttest_rel(a, b).pvalue)
    return PairedGap(over, len(diff), float(diff.mean()), sd, p)


def percent(mean: float, std: float | None = None) -> str:
    """Accuracy in [0, 1] as "89.32" or "89.32 ± 0.64" (percent, two decimals)."""
    text = f"{100 * mean:.2f}"
    return text if std is None else f"{text} ± {100 * std:.2f}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof 0) of repeated measurements."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std())


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, a dashed rule under the header."""
    cells = [list(map(str, headers)), *[list(map(str, row)) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, headers)) + " |",
             "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(path: str, payload) -> None:
    """Write `payload` (dicts, lists, dataclasses, numpy scalars) as indented JSON."""
    write_json_atomic(path, _jsonable(payload))


def write_report(output_dir: str, name: str, payload: dict, headers: Sequence[str],
                 rows: Sequence[Sequence[str]], title: str = "") -> str:
    """Write <output_dir>/<name>.json and <name>.md; return the console table."""
    write_json(os.path.join(output_dir, f"{name}.json"), payload)
    markdown = markdown_table(headers, rows)
    write_text_atomic(os.path.join(output_dir, f"{name}.md"),
                      (f"{title}\n\n" if title else "") + markdown + "\n")
    return format_table(headers, rows)
