"""The comparison over finished sort runs: summary.md, summary.json, accuracy_vs_n.png and
accuracy_vs_minutes.png beside them, with the NeuralSort paper's numbers."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path

from tasks.common.cli import atomic_write_text, write_json
from tasks.common.plots import read_csv
from tasks.sort.config import SortConfig

# NeuralSort Table 1, test exact (element-wise) by n: each variant's row, with its label
PAPER = {
    "neuralsort": (
        "NeuralSort",
        {
            3: (0.930, 0.951),
            5: (0.837, 0.927),
            7: (0.738, 0.909),
            9: (0.649, 0.896),
            15: (0.386, 0.857),
        },
    ),
    "neuralsort-stochastic": (
        "stochastic NeuralSort",
        {
            3: (0.927, 0.950),
            5: (0.835, 0.926),
            7: (0.741, 0.909),
            9: (0.646, 0.895),
            15: (0.418, 0.862),
        },
    ),
}


def paper_figure(sort: str, n: int) -> tuple[float, float] | None:
    """The paper's test (exact, element-wise) figure to set beside a run of ``sort`` at ``n``:
    its row for that NeuralSort variant, its deterministic row for every other relaxation (the
    paper's Sinkhorn baselines map stacked CNN features to a matrix, a different model from the
    Sinkhorn relaxation of scores here); None where it has no n."""
    return PAPER.get(sort, PAPER["neuralsort"])[1].get(n)


def _paper_text(sort: str, n: int) -> str:
    paper = paper_figure(sort, n)
    return f"{paper[0]:.3f} ({paper[1]:.3f})" if paper else "-"


# Flags that do not change what a run learns: runs equal in every other flag share a recipe, and
# their seeds are averaged in the headline table.
NOT_RECIPE = {"seed", "out", "resume", "progress", "device", "data_dir", "download"}


# What a flag missing from an older run's config was: its default (the run predates the flag).
DEFAULTS = {f.name: f.default for f in fields(SortConfig) if f.default is not MISSING}


def recipe(config: dict) -> str:
    """The run's recipe: its flags (defaults for those it predates) less the seed and the
    bookkeeping ones, as one sorted string."""
    flags = DEFAULTS | config
    return json.dumps({k: v for k, v in flags.items() if k not in NOT_RECIPE}, sort_keys=True)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def headline(runs: list[dict]) -> list[dict]:
    """One row per (relaxation, n): of the recipes run at that n, the one with the best mean
    validation exact accuracy over its seeds (ties: more seeds), with the means over its seeds
    and each seed's test exact accuracy. A headline row wants two seeds: a recipe run with two
    or more seeds beats any recipe run with one, whatever their validation."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["sort"], r["n"], r["recipe"]), []).append(r)
    best: dict[tuple[str, int], tuple[tuple[bool, float, int], list[dict]]] = {}
    for (sort, n, _), rs in sorted(groups.items()):
        score = (len(rs) >= 2, _mean([r["val_exact"] for r in rs]), len(rs))
        if (sort, n) not in best or score > best[sort, n][0]:
            best[sort, n] = (score, rs)
    rows = []
    for (sort, n), (_, rs) in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rs = sorted(rs, key=lambda r: r["seed"] if r["seed"] is not None else -1)
        minutes = [r["minutes"] for r in rs if r["minutes"] is not None]
        rows.append(
            {
                "n": n,
                "sort": sort,
                "tau": rs[0]["tau"],
                "loss_floor": rs[0]["loss_floor"],
                "seeds": len(rs),
                "test_exact": _mean([r["test_exact"] for r in rs]),
                "test_exact_per_seed": [r["test_exact"] for r in rs],
                "test_elementwise": _mean([r["test_elementwise"] for r in rs]),
                "val_exact": _mean([r["val_exact"] for r in rs]),
                "ms_per_step": _mean([r["ms_per_step"] for r in rs]),
                "minutes": _mean(minutes) if minutes else None,
                "runs": [r["run"] for r in rs],
            }
        )
    return rows


def _headline_table(rows: list[dict]) -> list[str]:
    """Markdown: the headline rows, one per (n, relaxation)."""
    lines = [
        "| n | relaxation | tau | loss floor | seeds | test exact (each seed) | "
        "test element-wise | paper (same NeuralSort variant) | ms/step | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in rows:
        ptxt = _paper_text(h["sort"], h["n"])
        each = ", ".join(f"{v:.3f}" for v in h["test_exact_per_seed"])
        minutes = "-" if h["minutes"] is None else f"{h['minutes']:.0f}"
        lines.append(
            f"| {h['n']} | {h['sort']} | {h['tau']:g} | {h['loss_floor']:g} | {h['seeds']} | "
            f"{h['test_exact']:.3f} ({each}) | {h['test_elementwise']:.3f} | {ptxt} | "
            f"{h['ms_per_step']:.0f} | {minutes} |"
        )
    return lines


def _by_relaxation_and_n(rows: list[dict]) -> list[str]:
    """Markdown: one row per relaxation, one column per n; each cell the headline row's mean
    test exact (element-wise) accuracy and its number of seeds."""
    ns = sorted({h["n"] for h in rows})
    cell = {(h["sort"], h["n"]): h for h in rows}
    lines = [
        "| relaxation | " + " | ".join(f"n = {n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for name in sorted({h["sort"] for h in rows}):
        cells = [
            f"{h['test_exact']:.3f} ({h['test_elementwise']:.3f}), {h['seeds']} seed"
            + ("s" if h["seeds"] > 1 else "")
            if (h := cell.get((name, n)))
            else "-"
            for n in ns
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for sort, (label, _) in PAPER.items():
        paper = [_paper_text(sort, n) for n in ns]
        lines.append(f"| paper ({label}) | " + " | ".join(paper) + " |")
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
                "seed": c.get("seed"),
                "minutes": r.get("minutes"),
                "cpu": r.get("machine", {}).get("cpu_model"),
                "recipe": recipe(c),
            }
        )
    if not runs:
        return
    runs.sort(key=lambda r: (r["n"], r["sort"]))
    lines = [
        "| n | relaxation | run | tau | lr | groupings | near groupings | digit reuse | "
        "loss floor | test exact | test element-wise | paper (same NeuralSort variant) | "
        "ms/step | steps | minutes | cpu |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ptxt = _paper_text(r["sort"], r["n"])
        minutes = "-" if r["minutes_to_best"] is None else f"{r['minutes_to_best']:.0f}"
        lines.append(
            f"| {r['n']} | {r['sort']} | {r['run']} | {r['tau']:g} | {r['lr']:g} | "
            f"{r['groupings']} | {r['near_groupings']} | {r['digit_reuse']} | "
            f"{r['loss_floor']:g} | {r['test_exact']:.3f} | {r['test_elementwise']:.3f} | {ptxt} | "
            f"{r['ms_per_step']:.0f} | {r['steps']} | {minutes} | {r['cpu'] or '-'} |"
        )
    top = headline(runs)
    lines += ["", *_by_relaxation_and_n(top), "", *_headline_table(top)]
    atomic_write_text(root / "summary.md", "\n".join(lines) + "\n")
    write_json(root / "summary.json", runs)
    write_json(root / "headline.json", top)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {(h["sort"], h["n"]): h for h in top}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, paper_col, title in (
        (axes[0], "test_exact", 0, "whole sequence sorted (exact)"),
        (axes[1], "test_elementwise", 1, "numbers in their place (element-wise)"),
    ):
        for name in sorted({r["sort"] for r in runs}):
            points = sorted((n, r[key]) for (sort, n), r in best.items() if sort == name)
            ax.plot(*zip(*points), marker="o", label=name)
        for (label, row), style in zip(PAPER.values(), ("k--", "k:")):
            ax.plot(list(row), [v[paper_col] for v in row.values()], style, label=f"paper, {label}")
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
    epochs' ``seconds`` in metrics.csv, summed), one panel per n, every seed of each
    relaxation's headline recipe (one colour per relaxation)."""
    ns = sorted({n for _, n in best})
    fig, axes = plt.subplots(1, len(ns), figsize=(4 * len(ns), 3.4), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for i, ((name, rn), h) in enumerate(sorted(best.items())):
            if rn != n:
                continue
            for j, run in enumerate(h["runs"]):
                path = root / run / "metrics.csv"
                if not path.exists():
                    continue
                rows = read_csv(path)
                seconds = [float(x["seconds"]) for x in rows]
                minutes = [sum(seconds[: k + 1]) / 60 for k in range(len(rows))]
                ax.plot(
                    minutes,
                    [float(x["val_exact"]) for x in rows],
                    marker=".",
                    color=f"C{i}",
                    alpha=1.0 if j == 0 else 0.5,
                    label=name if j == 0 else None,
                )
        paper = paper_figure("neuralsort", n)
        if paper:
            ax.axhline(paper[0], color="k", ls="--", lw=1, label="paper (test)")
        ax.set(title=f"n = {n}", xlabel="minutes", ylabel="validation exact", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_minutes.png", dpi=110)
    plt.close(fig)
