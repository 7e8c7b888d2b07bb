"""Rows measured over pretraining seeds, each seed paired with its own baselines.

A frozen view of one seed holds accuracies per label draw for the pretrained network, both
random-init readings of its twin (evaluation/random_init.py) and raw pixels, all on the same
draws; a seed's figure is the mean over its draws. Over the seeds, the pretrained network is
compared pair by pair (the same seed) with the stronger random-init row (the higher mean over
the seeds, named) and with pixels (`report.paired_gap` over "pretraining seeds"). A
fine-tuning row pairs the pretrained init with the same network from scratch, seed by seed;
scratch with every label is the supervised reference.
"""

from __future__ import annotations

import numpy as np

from evaluation import report
from evaluation.random_init import RANDOM_INITS, stronger

OVER = "pretraining seeds"
ALL_LABELS = "all_labels"


def _mean_sd(values) -> list[float]:
    return [float(np.mean(values)), float(np.std(values))]


def _gap(a, b) -> dict:
    gap = report.paired_gap(a, b, OVER)
    return {**gap.__dict__, "text": gap.describe()}


def frozen_row(method: str, view: str, per_seed: list[dict[str, list[float]]]) -> dict:
    """The row of one frozen view: `per_seed` = [{"pretrained", AT_INIT, CALIBRATED,
    "pixels": accuracies per draw}] per seed."""
    seed_means = {name: [float(np.mean(s[name])) for s in per_seed] for name in per_seed[0]}
    randoms = {name: seed_means[name] for name in RANDOM_INITS if name in seed_means}
    against = stronger(randoms)
    return {"method": method, "view": view, "kind": "frozen", "seeds": len(per_seed),
            "pretrained": _mean_sd(seed_means["pretrained"]),
            "random inits": {name: _mean_sd(v) for name, v in randoms.items()},
            "against": against, "baseline": _mean_sd(randoms[against]),
            "gap": _gap(seed_means["pretrained"], randoms[against]),
            "pixels": _mean_sd(seed_means["pixels"]),
            "gap to pixels": _gap(seed_means["pretrained"], seed_means["pixels"])}


def finetune_row(method: str, labels: str, per_seed: list[dict[str, float]]) -> dict:
    """The row of one fine-tuning: `per_seed` = [{"pretrained", "scratch": accuracy}]."""
    pretrained = [s["pretrained"] for s in per_seed]
    scratch = [s["scratch"] for s in per_seed]
    view = ("fine-tuned, all labels" if labels == ALL_LABELS
            else f"fine-tuned, {labels.removeprefix('labels')}/class")
    return {"method": method, "view": view, "kind": "finetune", "labels": labels,
            "seeds": len(per_seed), "pretrained": _mean_sd(pretrained), "against": "scratch",
            "baseline": _mean_sd(scratch), "gap": _gap(pretrained, scratch)}


def verdict(gap: dict) -> str:
    """"gap > spread", "no difference" or "too few seeds" (fewer than report.MIN_PAIRS)."""
    if gap["p"] != gap["p"]:  # NaN
        return "too few seeds"
    return "gap > spread" if gap["p"] < 0.05 else "no difference"


def _percent(pair) -> str:
    return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"


def _points(gap: dict) -> str:
    sd = "-" if gap["sd"] != gap["sd"] else f"{100 * gap['sd']:.1f}"
    return f"{100 * gap['mean']:+.1f} ± {sd}"


def _p(gap: dict) -> str:
    return "-" if gap["p"] != gap["p"] else f"{gap['p']:.3f}"


def _baseline_name(row: dict) -> str:
    names = {"random init, BN at init": "BN at init", "random init, BN calibrated":
             "BN calibrated"}
    return names.get(row["against"], row["against"])


def supervised(rows: list[dict]) -> list[float] | None:
    """Scratch with every label (mean, sd over seeds): the supervised network, or None."""
    for row in rows:
        if row["kind"] == "finetune" and row["labels"] == ALL_LABELS:
            return row["baseline"]
    return None


def table_text(dataset: str, eval_split: str, rows: list[dict], seeds: int,
               supervised_epochs: int | None = None) -> str:
    """The console (and markdown-able) table, with its title and reading notes;
    `supervised_epochs`: the most epochs of the fine-tuning with every label, when capped."""
    headers = ["view", "method", "pretrained %", "baseline %", "baseline", "gap (points)",
               "p", "verdict", "pixels %", "gap to pixels", "p", "verdict"]
    body = []
    for r in rows:
        pixels = r.get("gap to pixels")
        body.append([r["view"], r["method"], _percent(r["pretrained"]),
                     _percent(r["baseline"]), _baseline_name(r), _points(r["gap"]),
                     _p(r["gap"]), verdict(r["gap"]),
                     _percent(r["pixels"]) if pixels else "-",
                     _points(pixels) if pixels else "-", _p(pixels) if pixels else "-",
                     verdict(pixels) if pixels else "-"])
    split = "the test split" if eval_split == "test" else "a validation holdout carved from train"
    lines = [f"{dataset}, scored on {split}; mean ± sd over {seeds} pretraining seeds, each "
             "paired with its own baselines",
             report.format_table(headers, body),
             "baseline: the stronger random-init reading of the run's twin (BN at init or BN "
             "calibrated), or the same network fine-tuned from scratch; gaps are paired by seed "
             "(p: paired t-test); a gap inside its spread is no difference"]
    sup = supervised(rows)
    if sup is not None:
        cap = f", at most {supervised_epochs} epochs" if supervised_epochs else ""
        lines.append(f"supervised (the same network trained from scratch with every label{cap}): "
                     f"{_percent(sup)}")
    return "\n".join(lines)
