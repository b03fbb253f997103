"""Figures drawn from result files (never from live state), so any run can be re-plotted."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

if "ipykernel" not in sys.modules:  # scripts draw to files; notebooks keep their inline figures
    matplotlib.use("Agg")
import matplotlib.pyplot as plt


def num(v: Any) -> float | None:
    """A CSV/JSON cell as a float; None when empty, not a number or NaN."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def read_csv(path: str | Path) -> list[dict[str, float | str]]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        row: dict[str, float | str] = {}
        for key, value in r.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                row[key] = value
        out.append(row)
    return out


ACCURACY_WORDS = ("acc", "exact", "elementwise")


def metric_panels(keys: list[str]) -> tuple[list[str], list[str]]:
    """Split metric names into (loss-like, accuracy-like): a name holding one of
    ``ACCURACY_WORDS`` (``val_acc``, ``val_exact``, ``test_elementwise``) is an accuracy."""
    acc = [k for k in keys if any(word in k for word in ACCURACY_WORDS)]
    return [k for k in keys if k not in acc], acc


def plot_learning_curves(metrics_csv: str | Path, out_png: str | Path, title: str = "") -> None:
    """One panel per metric family (loss-like, accuracy-like) against the epoch."""
    rows = read_csv(metrics_csv)
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    keys = [
        k
        for k in rows[0]
        if k not in ("epoch", "step")
        and not k.endswith("seconds")  # timings: not curves
        and isinstance(rows[0][k], float)
    ]
    panels = [p for p in metric_panels(keys) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, group in zip(axes[0], panels):
        for k in group:
            values = [r[k] if isinstance(r[k], float) else float("nan") for r in rows]
            ax.plot(epochs, values, marker="o", ms=3, label=k)  # nan: not recorded then
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
