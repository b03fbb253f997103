"""Benchmark the OptNet QP layer's backends against qpth and raw cvxpylayers.

    python tasks/bench_qp.py --quick                 # tiny sizes
    python tasks/bench_qp.py                         # small, dense and sparse sizes
    python tasks/bench_qp.py --sizes small dense --methods torch-ipm qpth-default

Sizes (batch, n, inequalities, equalities, density):

* ``small``  -- OptNet-sized: 64, 20, 10, 5, dense.
* ``dense``  -- the cvxpylayers paper's dense QP: 128, 128, 128, 0, dense.
* ``sparse`` -- the cvxpylayers paper's sparse QP: 32, 1024, 1024, 1024, 1% nonzeros. With as
  many equalities as variables, ``x`` is pinned by ``A x = b`` (``A`` is made full rank): the
  gradients for ``Q, q, G, h`` are zero and a solver that eliminates equalities has little left
  to do. Hence the optional
* ``sparse-p512`` -- the same with 512 equalities (not run by default).

Methods: every backend of :func:`layers.qp.qp` (``torch-ipm``, ``moreau``, ``diffcp-*``,
``qpth``, ``proxsuite``, each with the library's settings), plus the peers used the way their
documentation shows: ``cvxpylayers-default`` (``CvxpyLayer`` with no solver arguments: diffcp,
with ``Q`` entering as a Cholesky factor), ``qpth-default`` (``QPFunction()``) and
``proxsuite-default`` (proxsuite's QPLayer, ``QPFunction()``, with ``-1e20 <= Gx <= h``); and
beside them
``moreau-default`` (the same layer with ``solver="MOREAU"`` and moreau's own settings: its
active-set method on small QPs), a backend used untuned rather than a peer. All run side by
side in one process on the same problems, so their ratios are comparable on a busy machine.

Each measurement: a forward pass with every input requiring grad, then ``(x * g).sum().backward()``
for a fixed random ``g``. Times are medians over ``--repeats`` runs after ``--warmup`` runs (the
first call, which canonicalizes CVXPY problems, is reported as ``first_call_s``). Peak memory on
CPU is the largest increase of the process's resident memory during one forward+backward (sampled
every 0.5 ms after returning freed memory to the OS), so it includes the solvers' C/C++ memory;
on CUDA it is ``torch.cuda.max_memory_allocated`` above the starting point.

Gradient error: the relative error (Frobenius) of the gradients with respect to each of
``Q, q, G, h, A, b`` against a high-accuracy reference that shares no code with the backends:
Clarabel (tolerances 1e-12, called directly) finds the active set of each element, then the
equality-constrained KKT system of that active set is solved exactly (LU, float64) for ``x`` and
for the adjoint, which gives the gradients in closed form (OptNet, eqs. 6-8).

Writes to ``--out``: ``config.json``; ``bench_qp.csv`` (one row per measurement, appended as the
run goes; ``--resume`` skips rows already there); ``bench_qp.json`` (rows, machine info and the
issue's targets); ``bench_qp.png`` (time and gradient error per method and size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.backends.qp_bench import DEFAULT_SIZES, METHODS, SIZES, run
from tasks.common.cli import check_ranges, parse_config, run_main


@dataclass
class BenchConfig:
    """Time, memory and gradient error of the QP backends and their peers."""

    sizes: list[str] = field(
        default_factory=lambda: list(DEFAULT_SIZES), metadata={"help": f"any of {list(SIZES)}"}
    )
    methods: list[str] = field(
        default_factory=lambda: list(METHODS), metadata={"help": f"any of {list(METHODS)}"}
    )
    quick: bool = field(default=False, metadata={"help": "tiny sizes, one repeat (smoke test)"})
    repeats: int = field(default=5, metadata={"help": "timed runs per point"})
    warmup: int = field(default=1, metadata={"help": "untimed runs per point (>= 1)"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    seed: int = field(default=0, metadata={"help": "problem seed"})
    max_seconds: float = field(
        default=600.0, metadata={"help": "after a first call slower than this, no more repeats"}
    )
    memory: bool = field(default=True, metadata={"help": "measure peak memory"})
    max_diffcp_n: int = field(
        default=256,
        metadata={
            "help": "skip the CVXPY-based methods above this n: CVXPY canonicalizes the n x n "
            "factor parameter into ~3 n^3 integers (24 GiB at n = 1024)"
        },
    )
    resume: bool = field(default=False, metadata={"help": "skip rows already in bench_qp.csv"})
    out: str = field(default="results/bench_qp", metadata={"help": "output folder"})

    def validate(self) -> None:
        bad = [s for s in self.sizes if s not in SIZES]
        if bad:
            raise ValueError(f"unknown sizes {bad}; choose from {list(SIZES)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {list(METHODS)}")
        if self.repeats < 1 or self.warmup < 1:
            raise ValueError("--repeats and --warmup must be >= 1")
        check_ranges(self, at_least={"threads": 0, "max_diffcp_n": 1}, above={"max_seconds": 0})
        if self.quick:
            self.repeats = 1


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_config(BenchConfig, argv, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    run_main(main)
