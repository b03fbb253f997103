"""Benchmark of the TV layer's backends on OptNet's denoising workload.

    python tasks/bench_tv.py                                  # all backends, results/bench_tv
    python tasks/bench_tv.py --backends native --full_epoch   # time a whole epoch of native
    python tasks/bench_tv.py --quick                          # tiny, for CI

Workload: batches of ``--batch_size`` (150) signals of length 100 from OptNet's generator, a
dense learned-looking ``D`` (first differences plus ``--d_noise`` N(0, 1), or ``--d_kind
random``: 0.3 N(0, 1)), ``lam`` = 21, loss = MSE to the clean signals. For each backend, after a
warm-up batch: the forward time (no gradient) and the forward+backward time per batch, the epoch
time they imply (``9000 / batch_size`` batches), the solution error against a tight direct CVXPY
Clarabel solve, the certified error bound, and the gradient against central finite differences of
tight reference solves (in ``D`` along the gradient and random unit directions, errors relative to
the gradient's norm; and in ``lam``). Peers: the cvxpylayers backends
and qpth (OptNet's QP over ``[x; t]``), plus ``qp`` (layers.qp) when it is available.

Writes ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out``. Times on a shared machine
drift; compare backends by their ratios within one run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layers import TV_BACKENDS
from tasks.common.cli import check_ranges, parse_config, run_main
from tasks.denoise.bench import run


@dataclass
class BenchConfig:
    """Speed and accuracy of the TV backends (forward, forward+backward, gradients)."""

    backends: list[str] = field(
        default_factory=lambda: ["native", "moreau", "diffcp-clarabel", "qpth", "qp"],
        metadata={"choices": list(TV_BACKENDS), "help": "backends to compare"},
    )
    batch_size: int = field(default=150, metadata={"help": "signals per batch"})
    batches: int = field(default=2, metadata={"help": "timed batches per backend"})
    full_epoch: bool = field(
        default=False, metadata={"help": "time native over a whole epoch (9000 signals)"}
    )
    d_kind: str = field(
        default="dense", metadata={"choices": ["dense", "random"], "help": "the operator D"}
    )
    d_noise: float = field(default=0.05, metadata={"help": "dense D = diff + d_noise N(0,1)"})
    lam: float = field(default=21.0, metadata={"help": "TV weight"})
    ref_signals: int = field(default=10, metadata={"help": "signals checked against references"})
    fd_directions: int = field(default=3, metadata={"help": "finite-difference directions in D"})
    fd_eps: float = field(
        default=1e-5,
        metadata={
            "help": "finite-difference step in D (unit directions); the solution map has kinks "
            "where the active set changes, so keep it small"
        },
    )
    qpth_eps: float = field(default=1e-8, metadata={"help": "Q = diag(1, eps) for qpth / qp"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: leave as is)"})
    quick: bool = field(default=False, metadata={"help": "tiny run for CI"})
    out: str = field(default="results/bench_tv", metadata={"help": "output folder"})
    seed: int = field(default=0, metadata={"help": "seed of D and of the directions"})

    def validate(self) -> None:
        for name in ("batch_size", "batches", "ref_signals"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        check_ranges(
            self,
            at_least={"d_noise": 0, "fd_directions": 0, "threads": 0},
            above={"lam": 0, "fd_eps": 0, "qpth_eps": 0},
        )
        if self.quick:
            self.batch_size, self.batches, self.ref_signals = 20, 1, 3
            self.fd_directions, self.full_epoch = 1, False
        self.ref_signals = min(self.ref_signals, self.batch_size)


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(BenchConfig, argv))


if __name__ == "__main__":
    run_main(main)
