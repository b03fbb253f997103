"""Classical kNN baseline of the NeuralSort paper (Table 3, "kNN" and "kNN+PCA" rows).

Pixel kNN and kNN on PCA(50) features, for every k in ``--k`` and both uniform and
distance-weighted votes. (k, weighting) is chosen on the validation split with the training split
as reference set; test accuracy uses train+val as the reference set (the usual refit).

    python tasks/run_knn.py --dataset mnist --data-dir ../shared/data

Writes ``results.json`` and ``results.csv`` to ``--out`` (default ``results/knn/<dataset>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.common.cli import check_ranges, parse_config, run_main
from tasks.common.data import DATASETS
from tasks.knn.knn import run


@dataclass
class KNNConfig:
    """Classical kNN (pixels and PCA features) on one data set."""

    dataset: str = field(
        default="mnist5k", metadata={"choices": list(DATASETS), "help": "data set"}
    )
    data_dir: str = field(default="data", metadata={"help": "torchvision data folder"})
    download: bool = field(default=False, metadata={"help": "download the data set if missing"})
    k: list[int] = field(default_factory=lambda: [1, 3, 5, 9], metadata={"help": "values of k"})
    pca_dim: int = field(default=50, metadata={"help": "PCA dimension (0 disables the PCA rows)"})
    out: str = field(default="", metadata={"help": "output folder (default results/knn/<dataset>)"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    seed: int = field(default=0, metadata={"help": "seed of the data split"})
    chunk_size: int = field(default=1024, metadata={"help": "queries per distance block"})

    def validate(self) -> None:
        bad = [k for k in self.k if k < 1]
        if bad:
            raise ValueError(f"--k values must be positive integers, got {bad}")
        check_ranges(self, at_least={"chunk_size": 1})
        if self.pca_dim < 0:
            raise ValueError(f"--pca_dim must be >= 0, got {self.pca_dim}")
        self.out = self.out or f"results/knn/{self.dataset}"


def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse_config(KNNConfig, argv))


if __name__ == "__main__":
    run_main(main)
