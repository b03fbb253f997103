"""The tuning protocol of differentiable kNN: every relaxation's temperature from one grid.

The protocol of ``tasks/tune_sort.py`` applied to dKNN: each relaxation in ``--sorts``
(``neuralsort``, ``neuralsort-stochastic``, ``lp-topk``) is trained once per value of ``--taus``
with the recipe given by the other flags (those of ``tasks/run_dknn.py``), for the same short
budget of ``--steps`` steps (one epoch, the recipe's learning-rate schedule over it), and scored
by hard kNN on the validation split. The value with the best validation accuracy is the
relaxation's ``tau`` for its full runs (ties: the smaller tau).

    python tasks/tune_dknn.py --dataset mnist --data_dir ../shared/data --k 3 --nloglr 2 \\
        --augment 1 --lr_schedule cosine --taus 1 4 16 64 256 --steps 550

Writes one run folder per (relaxation, tau) under ``--out`` (default
``results/dknn/tuning-<dataset>``; a point whose results.json exists is read, not retrained), then
``tuning.csv``, ``tuning.json`` (rows and the choice; each point's ``score_spread``, the spread of
its best model's scores, minus squared distances, over a validation query's candidates, and
``spread_over_tau``) and ``tuning.png``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layers import pairwise_sq_dists
from tasks.common.cli import parse_config, run_main
from tasks.common.data import load_dataset
from tasks.common.models import embed, make_backbone
from tasks.common.tuning import check_grid, sweep
from tasks.knn.dknn import run
from tasks.run_dknn import DKNNConfig

RELAXATIONS = {  # --sorts name -> (--sort, --method) of run_dknn.py
    "neuralsort": ("neuralsort", "deterministic"),
    "neuralsort-stochastic": ("neuralsort", "stochastic"),
    "lp-topk": ("lp-topk", "deterministic"),
    "sinkhorn": ("sinkhorn", "deterministic"),
}
FIELDS = (
    "sort",
    "tau",
    "val_acc",
    "score_spread",
    "spread_over_tau",
    "seconds_per_step",
    "minutes",
    "run",
)


@dataclass
class TuneDKNNConfig(DKNNConfig):
    """Choose each dKNN relaxation's tau on validation from one grid at one short budget."""

    sorts: list[str] = field(
        default_factory=lambda: ["neuralsort", "neuralsort-stochastic", "lp-topk"],
        metadata={"help": f"relaxations to tune (of {', '.join(RELAXATIONS)})"},
    )
    taus: list[float] = field(
        default_factory=lambda: [1.0, 4.0, 16.0, 64.0, 256.0],
        metadata={"help": "the grid of temperatures / regularization strengths"},
    )
    steps: int = field(default=550, metadata={"help": "training steps per grid point"})

    def validate(self) -> None:
        self.out = self.out or f"results/dknn/tuning-{self.dataset}"  # before DKNNConfig's default
        super().validate()
        check_grid(self.sorts, list(RELAXATIONS), self.taus, self.steps)


def point_config(cfg: TuneDKNNConfig, sort: str, tau: float) -> DKNNConfig:
    """The run of one grid point: the recipe's flags, one epoch of ``--steps`` steps, no
    baselines."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DKNNConfig)}
    name, method = RELAXATIONS[sort]
    base.update(
        sort=name,
        method=method,
        tau=tau,
        num_epochs=1,
        steps_per_epoch=cfg.steps,
        baselines=False,
        out=str(Path(cfg.out) / f"{sort}-tau{tau:g}"),
        resume=False,
    )
    return DKNNConfig(**base)


def score_spread(cfg: TuneDKNNConfig, runs: list[str], queries: int = 100) -> list[float]:
    """For each run folder, the spread of its best model's scores (minus squared distances from
    ``queries`` fixed validation queries to as many fixed validation candidates; the standard
    deviation over each query's candidates, averaged): set against ``tau``, it says where on the
    relaxation's scale the embedding settled."""
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=0)
    x = data.val_x[: 2 * queries]
    net = make_backbone(cfg.backbone, data.image_shape).eval()
    out = []
    for run_dir in runs:
        best = torch.load(Path(run_dir) / "best.pt", map_location="cpu", weights_only=False)
        net.load_state_dict(best["model"])
        e = embed(net, x, torch.device("cpu"))
        scores = -pairwise_sq_dists(e[:queries], e[queries:])
        out.append(float(scores.std(-1).mean()))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(TuneDKNNConfig, argv)  # runs validate()
    title = f"dKNN, {cfg.dataset}, k = {cfg.k}, {cfg.steps} steps"
    return sweep(cfg, point_config, run, score_spread, "val_acc", FIELDS, title)


if __name__ == "__main__":
    run_main(main)
