"""Differentiable kNN (NeuralSort paper, Table 3): train an embedding through a relaxed top-k.

    python tasks/run_dknn.py --dataset mnist --data-dir ../shared/data --k 3 --tau 16 --nloglr 3
    torchrun --nproc_per_node 2 tasks/run_dknn.py --dataset mnist5k     # DistributedDataParallel

Each step embeds ``--num_train_queries`` queries and ``--num_train_neighbors`` candidates drawn
from the training split, and minimises minus the relaxed number of same-label candidates in each
query's top k. Validation and test classify by hard kNN in the learned embedding against the
whole training split; the best epoch on validation is tested. Writes config.json, metrics.csv,
ckpt.pt, best.pt, curves.png and results.json to ``--out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.common.cli import check_ranges, parse_config, run_main
from tasks.common.training import ImageTaskFlags
from tasks.knn.dknn import SORTS, run


@dataclass
class DKNNConfig(ImageTaskFlags):
    """Differentiable kNN: learn an embedding whose hard kNN classifies well."""

    k: int = field(default=3, metadata={"help": "number of neighbours"})
    tau: float = field(default=16.0, metadata={"help": "temperature of the sort relaxation"})
    nloglr: float = field(default=3.0, metadata={"help": "learning rate = 10**-nloglr"})
    method: str = field(
        default="deterministic",
        metadata={"choices": ["deterministic", "stochastic"], "help": "NeuralSort variant"},
    )
    sort: str = field(default="neuralsort", metadata={"choices": SORTS, "help": "relaxation"})
    num_train_queries: int = field(default=100, metadata={"help": "queries per step"})
    num_train_neighbors: int = field(default=100, metadata={"help": "candidates per step"})
    num_samples: int = field(default=5, metadata={"help": "Plackett-Luce samples (stochastic)"})
    num_epochs: int = field(default=20, metadata={"help": "epochs"})
    baselines: bool = field(
        default=True,
        metadata={"help": "also test pixel kNN and the untrained embedding (off: tuning sweeps)"},
    )
    steps_per_epoch: int = field(
        default=0, metadata={"help": "steps per epoch (0: training size / num_train_queries)"}
    )

    def validate(self) -> None:
        super().validate()
        # 0 steps: one epoch's worth; nloglr <= 0 is a learning rate >= 1, which diverges
        check_ranges(self, at_least={"steps_per_epoch": 0}, above={"nloglr": 0})
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if self.k > self.num_train_neighbors:
            raise ValueError(
                f"--k {self.k} is larger than --num_train_neighbors {self.num_train_neighbors}: "
                "each query's top k is taken among those candidates"
            )
        if not self.tau > 0:
            raise ValueError(f"--tau must be > 0, got {self.tau}")
        if self.method == "stochastic" and self.sort != "neuralsort":
            raise ValueError("--method stochastic applies to --sort neuralsort only")
        for name in ("num_train_queries", "num_samples", "num_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        self.out = self.out or (
            f"results/dknn/{self.dataset}-{self.sort}-{self.method}-k{self.k}-t{self.tau:g}"
            f"-lr{self.nloglr:g}"
        )


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(DKNNConfig, argv))


if __name__ == "__main__":
    run_main(main)
