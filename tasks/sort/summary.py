"""The comparison over finished sort runs: summary.md, summary.json, accuracy_vs_n.png and
accuracy_vs_minutes.png beside them, with the NeuralSort paper's numbers."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.common.cli import atomic_write_text, write_json
from tasks.common.plots import read_csv

PAPER = {
    3: (0.930, 0.951),
    5: (0.837, 0.927),
    7: (0.738, 0.909),
    9: (0.649, 0.896),
    15: (0.386, 0.857),
}  # NeuralSort Table 1, deterministic NeuralSort: exact (element-wise)


def _best_on_validation(runs: list[dict]) -> dict[tuple[str, int], dict]:
    """``(relaxation, n) -> run``: of several runs of one relaxation at one n, the one with the
    best validation exact accuracy (the first on ties)."""
    best: dict[tuple[str, int], dict] = {}
    for r in runs:
        key = (r["sort"], r["n"])
        if key not in best or r["val_exact"] > best[key]["val_exact"]:
            best[key] = r
    return best


def _by_relaxation_and_n(runs: list[dict]) -> list[str]:
    """Markdown rows: one per relaxation, one column per n; each cell the test exact
    (element-wise) accuracy and ms per step of the run best on validation."""
    ns = sorted({r["n"] for r in runs})
    best = _best_on_validation(runs)
    lines = [
        "| relaxation | " + " | ".join(f"n = {n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for name in sorted({r["sort"] for r in runs}):
        cells = [
            f"{r['test_exact']:.3f} ({r['test_elementwise']:.3f}), {r['ms_per_step']:.0f} ms"
            if (r := best.get((name, n)))
            else "-"
            for n in ns
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    paper = [f"{PAPER[n][0]:.3f} ({PAPER[n][1]:.3f})" if n in PAPER else "-" for n in ns]
    lines.append("| paper (NeuralSort) | " + " | ".join(paper) + " |")
    return lines


def summarize(root: str | Path) -> None:
    """Collect every ``*/results.json`` under ``root`` into summary.md / .json and a plot."""
    root = Path(root)
    runs = []
    for f in sorted(root.glob("*/results.json")):
        r = json.loads(f.read_text())
        c = r["config"]
        runs.append(
            {
                "run": f.parent.name,
                "n": c["n"],
                "sort": c["sort"],
                "tau": c["tau"],
                "lr": c["lr"],
                "groupings": c.get("groupings", 1),
                "near_groupings": c.get("near_groupings", 0),
                "digit_reuse": c.get("digit_reuse", 1),
                "val_exact": r.get("val_exact", 0.0),
                "test_exact": r["test_exact"],
                "test_elementwise": r["test_elementwise"],
                "ms_per_step": 1000 * r["seconds_per_step"],
                "steps": r.get("steps"),
                "minutes_to_best": r.get("minutes_to_best"),
                "loss_floor": c.get("loss_floor", 1e-20),
            }
        )
    if not runs:
        return
    runs.sort(key=lambda r: (r["n"], r["sort"]))
    lines = [
        "| n | relaxation | run | tau | lr | groupings | near groupings | digit reuse | "
        "loss floor | test exact | test element-wise | paper (NeuralSort) | ms/step | steps | "
        "minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        paper = PAPER.get(r["n"])
        ptxt = f"{paper[0]:.3f} ({paper[1]:.3f})" if paper else "-"
        minutes = "-" if r["minutes_to_best"] is None else f"{r['minutes_to_best']:.0f}"
        lines.append(
            f"| {r['n']} | {r['sort']} | {r['run']} | {r['tau']:g} | {r['lr']:g} | "
            f"{r['groupings']} | {r['near_groupings']} | {r['digit_reuse']} | "
            f"{r['loss_floor']:g} | {r['test_exact']:.3f} | {r['test_elementwise']:.3f} | {ptxt} | "
            f"{r['ms_per_step']:.0f} | {r['steps']} | {minutes} |"
        )
    lines += ["", *_by_relaxation_and_n(runs)]
    atomic_write_text(root / "summary.md", "\n".join(lines) + "\n")
    write_json(root / "summary.json", runs)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best_on_validation(runs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, paper_col, title in (
        (axes[0], "test_exact", 0, "whole sequence sorted (exact)"),
        (axes[1], "test_elementwise", 1, "numbers in their place (element-wise)"),
    ):
        for name in sorted({r["sort"] for r in runs}):
            points = sorted((n, r[key]) for (sort, n), r in best.items() if sort == name)
            ax.plot(*zip(*points), marker="o", label=name)
        ax.plot(list(PAPER), [v[paper_col] for v in PAPER.values()], "k--", label="paper")
        ax.set_xlabel("n (numbers per sequence)")
        ax.set_ylabel("test accuracy")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_n.png", dpi=110)
    plt.close(fig)
    _plot_against_minutes(root, best, plt)


def _plot_against_minutes(root: Path, best: dict[tuple[str, int], dict], plt) -> None:
    """accuracy_vs_minutes.png: validation exact accuracy against wall-clock minutes (the
    epochs' ``seconds`` in metrics.csv, summed), one panel per n, the run of each relaxation
    that is best on validation."""
    ns = sorted({n for _, n in best})
    fig, axes = plt.subplots(1, len(ns), figsize=(4 * len(ns), 3.4), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for (name, rn), r in sorted(best.items()):
            if rn != n:
                continue
            path = root / r["run"] / "metrics.csv"
            if not path.exists():
                continue
            rows = read_csv(path)
            minutes = [
                sum(float(x["seconds"]) for x in rows[: i + 1]) / 60 for i in range(len(rows))
            ]
            ax.plot(minutes, [float(x["val_exact"]) for x in rows], marker=".", label=name)
        if n in PAPER:
            ax.axhline(PAPER[n][0], color="k", ls="--", lw=1, label="paper (test)")
        ax.set(title=f"n = {n}", xlabel="minutes", ylabel="validation exact", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_minutes.png", dpi=110)
    plt.close(fig)
