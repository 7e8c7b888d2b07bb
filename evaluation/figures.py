"""The zoo's figures, drawn with matplotlib: what a researcher would put in a paper.

    plot_filters      first-layer filters, upscaled, in a titled grid (NAT Figure 4)
    plot_retrieval    queries and their nearest neighbours, with labels and cosine similarities;
                      a neighbour of another class is framed in red (NAT Figure 3)
    plot_curves       the training summaries, one panel per tag that changes
    plot_probe_curve  probe accuracy against pretraining epoch, with the random-init and pixel
                      baselines on the same label draws (NAT Figure 2, left)
    plot_ablation     the paired gaps of the ablations, with their spread over seeds
    plot_table        a dataset's table: pretrained, baseline and pixels per view, over seeds

Accuracies are shown in percent; error bars and bands are ± 1 standard deviation, and every
figure says over what.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from runtime.errors import InvalidInput


def _pyplot():
    # optional: matplotlib (slow to import) loads only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # optional: after choosing the Agg backend

    return plt


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)


def plot_filters(grid: np.ndarray, count: int, size: tuple[int, int], title: str, path: str
                 ) -> None:
    """A uint8 RGB filter grid (`visualize.filter_grid`) drawn pixel-exact (nearest
    neighbour) at least 800 pixels wide, under `title`."""
    plt = _pyplot()
    height, width = grid.shape[:2]
    inches = max(8.0, width / 100)
    fig, ax = plt.subplots(figsize=(inches, inches * height / width + 0.8), dpi=100)
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{title}\n{count} filters of {size[0]} x {size[1]} taps, each scaled to its "
                 "own min-max", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# Measured at 8 points: "query: " and 11 lower-case letters (bold) beside 11 letters and
# " · 0.99" fit two 1.25-inch columns; wide capitals may still touch.
CAPTION_CHARS = 11


def short_label(label) -> str:
    """A retrieval caption's label: "?" when unknown; cut to CAPTION_CHARS with "…"."""
    text = "?" if label is None else str(label)
    return text if len(text) <= CAPTION_CHARS else text[:CAPTION_CHARS - 1] + "…"


def plot_retrieval(images: dict, labels: dict, queries: Sequence[int], neighbours: np.ndarray,
                   similarity: np.ndarray, title: str, path: str) -> None:
    """One row per query: the query, then its k nearest neighbours (nearest first), each
    captioned with its label (`short_label`) and cosine similarity; a neighbour whose label
    differs from the query's (compared in full) is framed in red. `images` maps a row index to
    uint8 [h, w, 3]; `labels` to a label (or None when unknown)."""
    plt = _pyplot()
    k = neighbours.shape[1]
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.25 * (k + 1), 1.45 * len(queries)),
                             dpi=110, squeeze=False)
    for row, query in enumerate(queries):
        ax = axes[row, 0]
        ax.imshow(images[query], interpolation="nearest")
        ax.set_title(f"query: {short_label(labels.get(query))}", fontsize=8, fontweight="bold")
        for col, index in enumerate(neighbours[row], start=1):
            ax = axes[row, col]
            ax.imshow(images[index], interpolation="nearest")
            same = labels.get(index) == labels.get(query)
            ax.set_title(f"{short_label(labels.get(index))} · {similarity[row, col - 1]:.2f}",
                         fontsize=8, color="black" if same else "red")
            if not same and labels.get(query) is not None:
                for spine in ax.spines.values():
                    spine.set(color="red", linewidth=2.5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    wrong = sum(labels.get(i) != labels.get(q) for q, row in zip(queries, neighbours, strict=True)
                for i in row)
    fig.suptitle(f"{title}\n{wrong} of {neighbours.size} neighbours are of another class "
                 "(framed in red); caption: label · cosine similarity", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_curves(scalars: dict, path: str, width: int = 960, height: int = 640,
                dpi: int = 100) -> list[str]:
    """One panel per tag whose value changes (value against step); tags of accuracies in
    percent. Returns the constant tags left out (said in the title)."""
    plt = _pyplot()
    constant = [tag for tag, (_, values) in scalars.items() if np.ptp(values) == 0]
    shown = {tag: v for tag, v in scalars.items() if tag not in constant}
    if not shown:
        raise InvalidInput("no scalar summary that changes: nothing to plot")
    columns = min(3, len(shown))
    rows = -(-len(shown) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width / dpi, height / dpi), dpi=dpi,
                             squeeze=False)
    for ax, (tag, (steps, values)) in zip(axes.flat, shown.items(), strict=False):
        percent = "accuracy" in tag
        ax.plot(steps, 100 * values if percent else values, linewidth=1.2,
                marker="o" if len(steps) < 20 else None)
        ax.set_title(tag + (" (%)" if percent else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if constant:
        fig.suptitle("constant, not shown: " + ", ".join(
            f"{tag} = {scalars[tag][1][0]:.4g}" for tag in constant), fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return constant


def _baseline(ax, row: dict, colour: str, label: str) -> None:
    mean, std = 100 * row["mean"], 100 * row["std"]
    ax.axhline(mean, color=colour, linestyle="--", linewidth=1.2,
               label=f"{label}: {mean:.1f}% ± {std:.1f}")
    ax.axhspan(mean - std, mean + std, color=colour, alpha=0.12, linewidth=0)


def plot_probe_curve(history, comparison: dict | None, path: str, title: str) -> None:
    """NAT Figure 2 (left), small: probe accuracy (%) against pretraining epoch.

    `history` is [(epoch, mean, accuracy of every label draw)]: points with error bars of
    ± 1 sd over the draws. `comparison` (evaluation.compare.Comparison.to_json, or None) adds
    the random-init and raw-pixel baselines on the same draws as dashed lines with ± 1 sd
    bands, and a second panel with the final accuracy of every view.
    """
    plt = _pyplot()

    rows = (comparison or {}).get("rows", [])
    views = [v for v in ("linear", "knn") if any(r["view"] == v for r in rows)]
    fig, axes = plt.subplots(1, 1 + bool(views), figsize=(10 if views else 6, 4.2), dpi=110,
                             squeeze=False)
    ax = axes[0, 0]
    epochs = [h[0] for h in history]
    means = [100 * h[1] for h in history]
    sds = [100 * float(np.std(h[2])) if len(h) > 2 else 0.0 for h in history]
    draws = len(history[0][2]) if history and len(history[0]) > 2 else 0
    ax.errorbar(epochs, means, yerr=sds, marker="o", capsize=3, color="C0",
                label=f"pretrained (± sd over {draws} label draws)")
    for row in rows:
        if row["view"] == "linear" and row["init"] in RANDOM_COLOURS:
            _baseline(ax, row, RANDOM_COLOURS[row["init"]], row["init"])
        elif row["view"] == "linear" and row["init"] == "pixels":
            _baseline(ax, row, "C2", "raw pixels")
    endpoint = next((r["endpoint"] for r in rows if r["view"] == "linear"), "the transfer endpoint")
    ax.set(xlabel="pretraining epoch", ylabel="test accuracy (%)",
           title=f"Linear probe on {endpoint} during pretraining")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if views:
        _final_panel(axes[0, 1], rows, views)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


# The random-init rows (evaluation/random_init.py; "random init" alone in older results).
RANDOM_COLOURS = {"random init": "C3", "random init, BN at init": "C3",
                  "random init, BN calibrated": "C1"}


def _final_panel(ax, rows: list[dict], views: list[str]) -> None:
    names = {"linear": "linear probe", "knn": "1-NN (cosine)"}
    colours = {"pretrained": "C0", **RANDOM_COLOURS, "pixels": "C2"}
    legend = {"pretrained": "pretrained", "pixels": "raw pixels, same classifier"}
    inits = list(dict.fromkeys(r["init"] for r in rows))
    width = 0.8 / len(inits)
    for i, init in enumerate(inits):
        values = [next((r for r in rows if r["view"] == v and r["init"] == init), None)
                  for v in views]
        xs = [j + (i - (len(inits) - 1) / 2) * width for j in range(len(views))]
        ax.bar(xs, [100 * v["mean"] if v else 0 for v in values], width,
               yerr=[100 * v["std"] if v else 0 for v in values], capsize=3,
               color=colours[init], label=legend.get(init, init))
    ax.set_xticks(range(len(views)),
                  [f"{names[v]} on {next(r['endpoint'] for r in rows if r['view'] == v)}"
                   for v in views])
    low = min(100 * (r["mean"] - r["std"]) for r in rows)
    ax.set_ylim(max(0.0, low - 5), 104)
    ax.set(ylabel="test accuracy (%)", title="At the end, on the same label draws")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)


def plot_ablation(rows: list[dict], path: str) -> None:
    """One bar per (variant, view): the paired gap pretrained - twin in points, with ± 1 sd
    over the pretraining seeds; a filled bar when the gap is larger than its spread."""
    plt = _pyplot()

    views = list(dict.fromkeys(r["view"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    names = {"linear": "linear probe on sc", "knn": "1-NN on embedding",
             "finetune": "fine-tuned vs scratch"}
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(variants), 4.2), dpi=110)
    width = 0.8 / len(views)
    for i, view in enumerate(views):
        labelled = False  # one legend entry per view, at its first bar
        for j, variant in enumerate(variants):
            row = next((r for r in rows if r["view"] == view and r["variant"] == variant), None)
            if row is None:
                continue
            x = j + (i - (len(views) - 1) / 2) * width
            significant = row["gap"]["p"] < 0.05
            ax.bar(x, 100 * row["gap"]["mean"], width, yerr=100 * (row["gap"]["sd"] or 0),
                   capsize=3, color=f"C{i}" if significant else "white",
                   edgecolor=f"C{i}", linewidth=1.5,
                   label=None if labelled else names[view])
            labelled = True
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(variants)), variants)
    ax.set(ylabel="pretrained - random-init twin (points)",
           title="Ablations on digits: gap ± sd over pretraining seeds "
                 "(filled: larger than its spread)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_table(rows: list[dict], dataset: str, eval_split: str, path: str,
               supervised_epochs: int | None = None) -> None:
    """Per view, one bar per method's pretrained network, its baseline (the stronger random
    init, or scratch) and raw pixels, each ± 1 sd over the pretraining seeds; the supervised
    network (scratch, every label, at most `supervised_epochs`) as a dashed line when it was
    measured."""
    plt = _pyplot()

    views = list(dict.fromkeys(r["view"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    bars = [(m, "pretrained") for m in methods] + [(m, "baseline") for m in methods] + [
        (None, "pixels")]
    fig, ax = plt.subplots(figsize=(2.0 + 1.5 * len(views), 5.0), dpi=110)
    width = 0.8 / len(bars)
    for i, (method, kind) in enumerate(bars):
        xs, heights, errors = [], [], []
        for j, view in enumerate(views):
            row = next((r for r in rows if r["view"] == view and
                        r["method"] == (method or methods[0])), None)
            if row is None or (kind == "pixels" and "pixels" not in row):
                continue
            xs.append(j + (i - (len(bars) - 1) / 2) * width)
            heights.append(100 * row[kind][0])
            errors.append(100 * row[kind][1])
        label = {"pretrained": f"{method} pretrained", "baseline": f"{method}: its baseline",
                 "pixels": "pixels"}[kind]
        color = {"pretrained": f"C{methods.index(method) if method else 0}",
                 "baseline": "white", "pixels": "lightgrey"}[kind]
        ax.bar(xs, heights, width, yerr=errors, capsize=2, color=color, label=label,
               edgecolor=f"C{methods.index(method)}" if method else "grey",
               hatch="//" if kind == "baseline" else None, linewidth=1.0)
    sup = next((r["baseline"] for r in rows if r["kind"] == "finetune" and
                r["labels"] == "all_labels"), None)
    if sup is not None:
        cap = f", at most {supervised_epochs} epochs" if supervised_epochs else ""
        ax.axhline(100 * sup[0], color="black", linestyle="--", linewidth=1,
                   label=f"supervised, all labels{cap} ({100 * sup[0]:.1f}%)")
    low = min(100 * r[k][0] for r in rows for k in ("pretrained", "baseline"))
    ax.set_ylim(max(0.0, low - 15), 100)
    ax.set_xticks(range(len(views)), [v.replace(", ", ",\n") for v in views], fontsize=8)
    split = "test split" if eval_split == "test" else "validation holdout"
    ax.set(ylabel="accuracy (%)", title=f"{dataset} ({split}): mean ± sd over pretraining "
           "seeds; baseline = stronger random init (frozen) or scratch (fine-tuned)")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(bars) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.13),
              frameon=False)  # below the axes, where it hides no bar
    fig.tight_layout()
    _save(fig, path)
