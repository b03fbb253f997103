"""The CNN baseline of the NeuralSort dKNN table: the same backbone with a linear head, trained
with cross-entropy and SGD (momentum 0.9, weight decay 5e-4).

    python tasks/run_baseline.py --dataset mnist --data-dir ../shared/data --nloglr 2

Writes config.json, metrics.csv, ckpt.pt, best.pt, curves.png and results.json to ``--out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.common.cli import check_ranges, parse_config, run_main
from tasks.common.training import ImageTaskFlags
from tasks.knn.baseline import run


@dataclass
class BaselineConfig(ImageTaskFlags):
    """CNN baseline: backbone + linear head + cross-entropy."""

    nloglr: float = field(default=2.0, metadata={"help": "learning rate = 10**-nloglr"})
    batch_size: int = field(default=100, metadata={"help": "images per step"})
    num_epochs: int = field(default=10, metadata={"help": "epochs"})
    steps_per_epoch: int = field(
        default=0, metadata={"help": "steps per epoch (0: training size / batch_size)"}
    )

    def validate(self) -> None:
        super().validate()
        # 0 steps: one epoch's worth; nloglr <= 0 is a learning rate >= 1, which diverges
        check_ranges(self, at_least={"steps_per_epoch": 0}, above={"nloglr": 0})
        for name in ("batch_size", "num_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        self.out = self.out or f"results/baseline/{self.dataset}-lr{self.nloglr:g}"


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(BaselineConfig, argv))


if __name__ == "__main__":
    run_main(main)
