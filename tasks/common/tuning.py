"""The tuning protocol's shared half: one grid of temperatures per relaxation, one short run per
point, the choice on validation, and the sweep's files (tuning.csv, tuning.json, tuning.png).

``tasks/tune_sort.py`` (the sorting task) and ``tasks/tune_dknn.py`` (differentiable kNN) build
the runs; this module only turns their rows into a choice and files, so both tasks choose alike.
A row is a dict with at least ``sort``, ``tau`` and the validation metric.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.common.cli import write_json
from tasks.common.plots import plt

__all__ = ["check_grid", "choose", "edge_choices", "sweep", "write_sweep"]


def check_grid(sorts: list[str], known: list[str], taus: list[float], steps: int) -> None:
    """The sweep's own flags: ``--sorts`` names some of ``known``, ``--taus`` are positive,
    ``--steps`` >= 1 (``ValueError`` naming the flag otherwise)."""
    if not sorts or any(s not in known for s in sorts):
        raise ValueError(f"--sorts must name some of {', '.join(known)}, got {sorts}")
    if not taus or any(not t > 0 for t in taus):  # not `<= 0`: NaN fails this too
        raise ValueError(f"--taus must be positive, got {taus}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")


def choose(rows: list[dict[str, Any]], metric: str = "val_exact") -> dict[str, float]:
    """The chosen tau per relaxation: the best ``metric`` on validation, ties to the smaller
    tau (the sharper relaxation)."""
    best: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["sort"], r["tau"])):
        if r["sort"] not in best or r[metric] > best[r["sort"]][metric]:
            best[r["sort"]] = r
    return {s: r["tau"] for s, r in best.items()}


def edge_choices(rows: list[dict[str, Any]], chosen: dict[str, float]) -> list[str]:
    """The relaxations whose chosen tau is the smallest or largest of their grid (with more than
    one point): their best value may lie outside it, so the protocol extends the grid there."""
    edge = []
    for sort, tau in chosen.items():
        taus = [r["tau"] for r in rows if r["sort"] == sort]
        if len(taus) > 1 and tau in (min(taus), max(taus)):
            edge.append(sort)
    return edge


def write_sweep(
    out: str | Path,
    rows: list[dict[str, Any]],
    fields: tuple[str, ...],
    config: dict[str, Any],
    metric: str,
    title: str,
) -> dict[str, float]:
    """Write ``tuning.csv`` (``fields`` per row), ``tuning.json`` (config, rows, choice) and
    ``tuning.png`` (``metric`` against tau, one line per relaxation) to ``out``; print one line per
    point and return the choice."""
    out = Path(out)
    chosen = choose(rows, metric)
    edge = edge_choices(rows, chosen)
    with open(out / "tuning.csv", "w") as fh:
        fh.write(",".join(fields) + "\n")
        for r in rows:
            fh.write(",".join("" if r[k] is None else str(r[k]) for k in fields) + "\n")
    write_json(
        out / "tuning.json",
        {"config": config, "rows": rows, "chosen": chosen, "chosen_at_grid_edge": edge},
    )
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for sort in dict.fromkeys(r["sort"] for r in rows):
        pts = sorted((r["tau"], r[metric]) for r in rows if r["sort"] == sort)
        ax.plot(*zip(*pts), marker="o", label=f"{sort} (chosen {chosen[sort]:g})")
    ax.set(xscale="log", xlabel="tau", ylabel=f"validation {metric.removeprefix('val_')}")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tuning.png", dpi=120)
    plt.close(fig)
    for r in rows:
        spread = r.get("spread_over_tau")
        print(
            f"{r['sort']:>22} tau {r['tau']:<6g} {metric} {r[metric]:.4f}"
            + ("" if spread is None else f"  score spread / tau {spread:.3g}")
        )
    print("chosen:", chosen)
    for sort in edge:
        print(
            f"warning: {sort}'s tau {chosen[sort]:g} is at the edge of its grid; add values "
            "beyond it to --taus (finished points are kept)"
        )
    return chosen


def sweep(
    cfg: Any,
    point_config: Callable[[Any, str, float], Any],
    run: Callable[[Any], dict[str, Any]],
    score_spread: Callable[[Any, list[str]], list[float]],
    metric: str,
    fields: tuple[str, ...],
    title: str,
) -> dict[str, Any]:
    """Train (or read, where its results.json exists) the run ``point_config(cfg, sort, tau)`` of
    every relaxation in ``cfg.sorts`` and tau in ``cfg.taus``, add each point's score spread
    (``score_spread(cfg, run folders)``) and its ratio to tau, and write the sweep's files to
    ``cfg.out``. Returns ``{"rows": ..., "chosen": ...}``."""
    out = Path(cfg.out)
    rows = []
    for sort in cfg.sorts:
        for tau in cfg.taus:
            pc = point_config(cfg, sort, tau)
            done = Path(pc.out) / "results.json"
            res = json.loads(done.read_text()) if done.exists() else run(pc)
            rows.append(
                {
                    "sort": sort,
                    "tau": tau,
                    metric: res[metric],
                    "seconds_per_step": res["seconds_per_step"],
                    "minutes": res["minutes"],
                    "run": Path(pc.out).name,
                }
            )
    spreads = score_spread(cfg, [str(out / r["run"]) for r in rows])
    for r, spread in zip(rows, spreads):
        r["score_spread"], r["spread_over_tau"] = spread, spread / r["tau"]
    chosen = write_sweep(out, rows, fields, dataclasses.asdict(cfg), metric, title)
    return {"rows": rows, "chosen": chosen}
