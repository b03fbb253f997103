"""The tuning protocol of the sorting task: every relaxation's temperature from one grid.

Each relaxation in ``--sorts`` is trained once per value of ``--taus`` (the NeuralSort
temperature, the LP regularization strength, the Sinkhorn temperature: each relaxation's
``tau``) with the recipe given by the other flags (those of ``tasks/run_sort.py``), for the same
short budget of ``--steps`` steps (one epoch, cosine learning rate), and scored on the same
validation sequences. The value with the best validation exact-match accuracy is the
relaxation's ``tau`` for its full runs (ties: the smaller tau).

    python tasks/tune_sort.py --n 5 --sorts neuralsort lp-permutahedron \\
        --taus 0.1 0.3 1 3 10 --steps 1200 --data_dir ../shared/data --out results/sort/tuning-n5

Writes one run folder per (relaxation, tau) under ``--out`` (default
``results/sort/tuning-n<n>``; a point is skipped when its results.json
exists, so an interrupted sweep continues), then ``tuning.csv``, ``tuning.json`` (rows and the
choice per relaxation; with each point's ``score_spread``, the spread of its best model's scores
within a validation sequence, and ``spread_over_tau``) and ``tuning.png`` (validation accuracy
against tau).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tasks.common.cli import parse_config, run_main
from tasks.common.data import MultiDigitSequences, load_dataset
from tasks.common.models import SortCNN
from tasks.common.tuning import check_grid, sweep
from tasks.sort.config import SORTS, SortConfig
from tasks.sort.train import run

FIELDS = (
    "sort",
    "tau",
    "val_exact",
    "score_spread",
    "spread_over_tau",
    "seconds_per_step",
    "minutes",
    "run",
)


@dataclass
class TuneConfig(SortConfig):
    """Choose each relaxation's tau on validation from one grid at one short budget."""

    sorts: list[str] = field(
        default_factory=lambda: ["neuralsort", "lp-permutahedron"],
        metadata={"help": f"relaxations to tune (of {', '.join(SORTS)})"},
    )
    taus: list[float] = field(
        default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0],
        metadata={"help": "the grid of temperatures / regularization strengths"},
    )
    steps: int = field(default=1200, metadata={"help": "training steps per grid point"})

    def validate(self) -> None:
        self.out = self.out or f"results/sort/tuning-n{self.n}"  # before SortConfig's default
        super().validate()
        check_grid(self.sorts, SORTS, self.taus, self.steps)


def point_config(cfg: TuneConfig, sort: str, tau: float) -> SortConfig:
    """The run of one grid point: the recipe's flags, one epoch of ``--steps`` steps."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SortConfig)}
    base.update(
        sort=sort,
        tau=tau,
        num_epochs=1,
        steps_per_epoch=cfg.steps,
        out=str(Path(cfg.out) / f"{sort}-tau{tau:g}"),
        resume=False,
    )
    return SortConfig(**base)


def score_spread(cfg: TuneConfig, runs: list[str], sequences: int = 300) -> list[float]:
    """For each run folder, the spread of its best model's scores within a validation sequence
    (the standard deviation of the centred scores over ``sequences`` fixed sequences): set
    against ``tau``, it says where on the relaxation's scale the network settled."""
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=0)
    x, _ = MultiDigitSequences(data.val_x, data.val_y, cfg.n, cfg.num_digits).fixed(
        sequences, seed=1
    )
    net = SortCNN(cfg.num_digits).eval()
    out = []
    for run_dir in runs:
        best = torch.load(Path(run_dir) / "best.pt", map_location="cpu", weights_only=False)
        net.load_state_dict(best["model"])
        with torch.no_grad():
            s = net(x.flatten(0, 1)).view(x.shape[:2])
        out.append(float((s - s.mean(-1, keepdim=True)).std()))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(TuneConfig, argv)  # runs validate()
    title = f"sorting, n = {cfg.n}, {cfg.steps} steps"
    return sweep(cfg, point_config, run, score_spread, "val_exact", FIELDS, title)


if __name__ == "__main__":
    run_main(main)
