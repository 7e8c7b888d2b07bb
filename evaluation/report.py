"""Result tables of the evaluation binaries: console text, markdown and JSON.

A table is a list of headers and rows of strings. `write_report(output_dir, name, ...)` writes
`<name>.json` (every figure, as given) and `<name>.md` (the table) and returns the console
text of the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from models.runs import write_text_atomic


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
    """Write `payload` (dicts, lists, dataclasses, numpy scalars) as indented JSON, atomically
    (models/runs.py)."""
    write_text_atomic(path, json.dumps(_jsonable(payload), indent=2, sort_keys=True) + "\n")


def write_report(output_dir: str, name: str, payload: dict, headers: Sequence[str],
                 rows: Sequence[Sequence[str]], title: str = "") -> str:
    """Write <output_dir>/<name>.json and <name>.md (atomically); return the console table."""
    write_json(os.path.join(output_dir, f"{name}.json"), payload)
    markdown = markdown_table(headers, rows)
    write_text_atomic(os.path.join(output_dir, f"{name}.md"),
                      (f"{title}\n\n" if title else "") + markdown + "\n")
    return format_table(headers, rows)
