"""Compare the solver backends of every optimization layer: one command, one report.

    python tasks/compare_backends.py --quick            # small versions of every problem (CI)
    python tasks/compare_backends.py --threads 1        # the full problem set, on a quiet machine
    python tasks/compare_backends.py --device cuda      # where a GPU is lent: adds GPU columns

Problems (full size; ``--quick`` shrinks each, see ``PROBLEMS``), grouped by the layer whose
default backend they decide:

* ``qp``: the OptNet QP (:func:`layers.qp.qp`) at the three sizes of ``tasks/bench_qp.py``.
* ``tv``: TV denoising (:func:`layers.tv.tv_denoise`), n = 100 and 500, batch 32, gradients for
  ``y``, ``D`` and ``lam``; 2-D 28 x 28 images, batch 8 (:func:`layers.tv.tv_denoise_2d`).
* ``lp-sort``: the regularized-LP sort relaxations (:func:`layers.sort.sort_qp_layer`): the
  permutahedron projection (isotonic QP, behind ``soft_sort``, ``soft_rank`` and
  ``lp_permutahedron_sort``) and the Birkhoff QP at n = 16, and the top-k QP at n = 100,
  batch 100. Closed-form NeuralSort is timed beside them as the reference point (it solves a
  different relaxation, so it has no error columns).

Methods: every backend the layer supports, with the library's tuned settings (the backend's
name) and with the solver's own defaults (``name (defaults)``, where they differ), run in one
process on the same data, so ratios are comparable even on a busy machine.

Reference: every problem here is a QP. Its inputs map to QP data ``(Q, q, G, h, A, b)`` by a
differentiable function (``tasks/backends/compare.py``); ``tasks.backends.reference`` (Clarabel
called directly to find the active set, then the exact KKT solve, sharing no code with the
backends) gives the solution and the gradients for the QP data, and autograd carries them back to
the inputs. Errors are relative (Frobenius) over the whole batch; the gradient error is over all
inputs stacked, for the loss ``<w, x>`` with a fixed random ``w``.

Recommendation: for each layer, among the tuned methods that solved all of its problems with
solution and gradient errors <= 1e-5, the one with the smallest geometric-mean forward+backward
time. ``recommended.json`` records it; ``tests/tasks/test_compare_backends.py`` fails when a layer's
default backend differs from the committed ``results/backends/recommended.json``.

Writes to ``--out`` (default ``results/backends``, or ``results/backends-quick`` with
``--quick``): ``results-<device>.json`` (every figure, with the machine's description),
``results-<device>.csv``, ``report.md`` (a table per problem, winner marked, one column group per
device measured so far), ``time_vs_error.png`` (one point per backend and problem) and
``recommended.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.backends.compare import PROBLEMS, run
from tasks.common.cli import check_ranges, parse_config, run_main


@dataclass
class CompareConfig:
    """Run every layer on every backend; write report.md, JSON, plots and recommended.json."""

    quick: bool = field(default=False, metadata={"help": "small problems, one repeat (CI)"})
    problems: list[str] = field(
        default_factory=list, metadata={"help": "subset of problems (default: all)"}
    )
    methods: list[str] = field(
        default_factory=list, metadata={"help": "subset of methods (default: all)"}
    )
    repeats: int = field(default=3, metadata={"help": "timed runs per point (median reported)"})
    warmup: int = field(default=1, metadata={"help": "untimed runs per point (>= 1)"})
    max_seconds: float = field(
        default=60.0, metadata={"help": "after a first call slower than this, no more repeats"}
    )
    max_call_seconds: float = field(
        default=300.0,
        metadata={"help": "stop a method whose runs on one problem take longer (0: no limit)"},
    )
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    seed: int = field(default=0, metadata={"help": "problem seed"})
    memory: bool = field(default=True, metadata={"help": "measure peak memory"})
    max_diffcp_n: int = field(
        default=256,
        metadata={"help": "QP: skip the cvxpylayers backends (diffcp, moreau) above this n"},
    )
    out: str = field(default="", metadata={"help": "output folder"})
    merge: bool = field(
        default=False,
        metadata={
            "help": "merge into the existing results-<device>.json: the rows measured now "
            "replace the same (problem, method) rows there"
        },
    )
    merge_from: list[str] = field(
        default_factory=list,
        metadata={"help": "with --report_only: folders whose results-<device>.json to merge in"},
    )
    report_only: bool = field(
        default=False,
        metadata={"help": "rebuild report.md and the plot from the results-*.json in --out"},
    )

    def validate(self) -> None:
        if self.repeats < 1 or self.warmup < 1:
            raise ValueError("--repeats and --warmup must be >= 1")
        check_ranges(
            self,
            at_least={"threads": 0, "max_diffcp_n": 1, "max_call_seconds": 0},
            above={"max_seconds": 0},
        )
        bad = [p for p in self.problems if p not in PROBLEMS]
        if bad:
            raise ValueError(f"unknown problems {bad}; choose from {list(PROBLEMS)}")
        if self.quick:
            self.repeats, self.memory = 1, False
        self.out = self.out or ("results/backends-quick" if self.quick else "results/backends")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_config(CompareConfig, argv, description=__doc__.split("\n\n")[0]), argv)


if __name__ == "__main__":
    run_main(main)
