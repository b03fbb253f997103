"""Time-series denoising (OptNet, Table 1): FC net, tuned TV, OptNet-tuned TV, pure OptNet.

    python tasks/run_denoise.py                      # the full comparison (results/denoise)
    python tasks/run_denoise.py --quick              # CI smoke run
    python tasks/run_denoise.py --models tv optnet_tv --num_epochs 5 --resume

Models (``--models``):

* ``fc``: OptNet's ReLU net ``n -> fc_hidden -> n``, Adam (``--lr_fc``), ``--fc_epochs`` (it is
  cheap, so it gets 100 epochs).
* ``tv``: total variation with ``lam`` tuned on the training set (grid, then golden section, with
  exact solves); no training.
* ``optnet_tv``: the TV layer started as exactly that TV (``D`` = first differences, ``lam`` =
  the tuned value), then learned (``--lr_tv``; ``--lr_lam`` on ``log lam``). With ``--tv_maps``
  (default) it is wrapped as OptNet's parameterization is: ``x = (I + P) TV_{D,lam}((I + W) y +
  b)`` with ``W, b, P`` learned and started at 0. This is the family OptNet's QP spans on its
  ``x`` block: a learned metric ``Q = R'R`` turns ``1/2 x'Qx + p'x + ||D x||_1`` into TV of
  ``R x`` with ``D R^-1``, i.e. an output map ``R^-1``, and ``p = fc1(y)`` is the input map.
  ``--no-tv_maps`` learns ``D`` and ``lam`` only.
* ``optnet``: pure OptNet, ``D`` random (``0.3 N(0, 1)``), ``lam`` fixed at ``--optnet_lam`` as
  in the reference code, ``D`` learned with an L1 penalty ``--d_penalty ||D||_1``.

Data: OptNet's generator (``tasks.common.data.denoising_splits``): 9,000 training and 1,000 test
signals of length 100. The metric is the per-entry mean squared error (``nn.MSELoss``).

Each trained model runs the shared loop (``tasks.common.training.Trainer``) in its own sub-folder of
``--out`` (config.json, metrics.csv, ckpt.pt, best.pt, curves.png); ``best.pt`` is chosen on the
training error of a fixed 1,000-signal training subset, never on the test set, and the table
reports the last epoch. The TV tuning goes to ``tv/`` (lam_search.csv). At the top level:
``results.json``, ``report.md`` (train/test MSE per model), ``examples.pt`` and the figures
``examples.png``, ``D_heatmap.png``, ``loss_curves.png``, ``lam_search.png`` (drawn from those
files by :func:`plot_all`, so ``python tasks/run_denoise.py --plot_only`` redraws them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layers import TV_BACKENDS
from tasks.common.cli import check_ranges, parse_config, run_main
from tasks.denoise.train import MODELS, run


@dataclass
class DenoiseConfig:
    """OptNet's denoising comparison (Table 1)."""

    models: list[str] = field(
        default_factory=lambda: list(MODELS), metadata={"choices": MODELS, "help": "what to run"}
    )
    num_epochs: int = field(default=20, metadata={"help": "epochs of optnet_tv and optnet"})
    fc_epochs: int = field(default=100, metadata={"help": "epochs of the FC net (cheap)"})
    batch_size: int = field(default=150, metadata={"help": "signals per step (OptNet: 150)"})
    lr_fc: float = field(default=1e-3, metadata={"help": "Adam learning rate of the FC net"})
    lr_tv: float = field(default=1e-4, metadata={"help": "Adam learning rate (optnet_tv)"})
    tv_maps: bool = field(
        default=True, metadata={"help": "optnet_tv: learned input/output maps around TV"}
    )
    lr_lam: float = field(default=1e-3, metadata={"help": "Adam learning rate of log lam"})
    lr_optnet: float = field(default=1e-2, metadata={"help": "Adam learning rate of D (optnet)"})
    d_penalty: float = field(default=0.1, metadata={"help": "L1 penalty on D (optnet)"})
    optnet_lam: float = field(default=13.0, metadata={"help": "lam of pure OptNet"})
    optnet_learn_lam: bool = field(default=False, metadata={"help": "learn lam in optnet"})
    fc_hidden: int = field(default=500, metadata={"help": "hidden units of the FC net"})
    lam_min: float = field(default=1.0, metadata={"help": "lower end of the lam search"})
    lam_max: float = field(default=60.0, metadata={"help": "upper end of the lam search"})
    lam_tol: float = field(default=0.25, metadata={"help": "golden-section tolerance on lam"})
    backend: str = field(
        default="native", metadata={"choices": list(TV_BACKENDS), "help": "TV solver backend"}
    )
    n_train: int = field(default=9000, metadata={"help": "training signals (OptNet: 9000)"})
    n_test: int = field(default=1000, metadata={"help": "test signals (OptNet: 1000)"})
    eval_batch: int = field(default=1000, metadata={"help": "signals per evaluation batch"})
    data_seed: int = field(default=0, metadata={"help": "seed of the data generator"})
    quick: bool = field(
        default=False, metadata={"help": "CI smoke run: 300/100 signals, 1 epoch, coarse lam"}
    )
    plot_only: bool = field(default=False, metadata={"help": "redraw the figures of --out"})
    resume: bool = field(default=False, metadata={"help": "continue the runs in --out"})
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda)"})
    out: str = field(default="", metadata={"help": "output folder (default results/denoise)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and sampling"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def validate(self) -> None:
        for name in (
            "num_epochs",
            "fc_epochs",
            "batch_size",
            "n_train",
            "n_test",
            "eval_batch",
            "fc_hidden",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        check_ranges(
            self,
            at_least={"d_penalty": 0},
            above={
                n: 0 for n in ("lr_fc", "lr_tv", "lr_lam", "lr_optnet", "optnet_lam", "lam_tol")
            },
        )
        if not 0 < self.lam_min < self.lam_max:
            raise ValueError(f"need 0 < --lam_min < --lam_max, got {self.lam_min}, {self.lam_max}")
        if "optnet_tv" in self.models and "tv" not in self.models:
            raise ValueError("--models optnet_tv starts from the tuned TV: add tv to --models")
        if self.n_train + self.n_test > 10_000:
            raise ValueError("the generator makes 10,000 signals: --n_train + --n_test <= 10000")
        if self.quick:
            self.n_train, self.n_test = min(self.n_train, 300), min(self.n_test, 100)
            self.num_epochs, self.fc_epochs, self.lam_tol = 1, 1, 2.0
            self.fc_hidden = min(self.fc_hidden, 50)
        self.models = [m for m in MODELS if m in self.models]  # canonical order
        self.out = self.out or ("results/denoise-quick" if self.quick else "results/denoise")


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(DenoiseConfig, argv))


if __name__ == "__main__":
    run_main(main)
