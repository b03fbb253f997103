"""Benchmark the sort relaxations: forward and forward+backward time and peak memory against n
and batch size, with ``torch.sort`` (the hard limit), a plain softmax over a ``(batch, n, n)``
tensor, the paper's naive NeuralSort and torchsort (when installed) as references.

    python tasks/bench_sort.py --quick                  # tiny sizes
    python tasks/bench_sort.py                          # the full sweep (CPU)
    python tasks/bench_sort.py --device cuda --out results/bench_sort_cuda
    python tasks/bench_sort.py --race --threads 1 --out results/bench_sort_race

``--race`` instead races the LP relaxations (``soft_sort``, ``soft_rank``, ``lp_topk``,
``lp_permutahedron_sort``, ``lp_birkhoff_sort``; the ``native`` backend and the CVXPY path of
``--race_cvxpy_backend``) against torchsort and diffsort (when installed), NeuralSort beside them,
at batch ``--race_batch`` x n in ``--race_ns``, all interleaved in one process
(:mod:`tasks.sort.race`); it writes ``race.csv``, ``race.json`` (rows, ratios, the peak memory of
``lp_permutahedron_sort`` at batch 128 x n 1024) and ``race.png``.

Every measurement runs ``op(scores)`` and a loss on its top-k part, then ``backward``. Times are
the median (and minimum) over ``--repeats`` runs after ``--warmup`` runs; the first call of an LP
relaxation, which builds its CVXPY problem, is reported separately (``first_call_s``). Peak
memory is the torch allocations made by one forward+backward above what existed before it:
``torch.cuda.max_memory_allocated`` on CUDA, the profiler's allocation timeline on CPU. It does
not count the solvers' own (C/C++) memory for the LP relaxations.

Writes to ``--out``: ``config.json``; ``bench_sort.csv``, one row per measurement, appended as the
sweep runs (``--resume`` skips the rows already there); ``bench_sort.json``, all rows plus the
issue's targets; ``bench_sort.png``, log-log time and memory against n, one column per batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from layers import BACKENDS
from layers.sort_lp import DEFAULT_LP_BACKEND, LP_SORT_BACKENDS
from tasks.common.cli import check_ranges, parse_config, run_main
from tasks.sort.bench import METHODS, run
from tasks.sort.race import race


@dataclass
class BenchConfig:
    """Time and memory of the sort relaxations against n and batch size."""

    quick: bool = field(default=False, metadata={"help": "tiny sizes (a smoke run)"})
    ns: list[int] = field(
        default_factory=lambda: [8, 16, 32, 100, 128, 512, 1024],
        metadata={"help": "numbers of items"},
    )
    batches: list[int] = field(default_factory=lambda: [1, 100, 128], metadata={"help": "batch"})
    methods: list[str] = field(
        default_factory=lambda: list(METHODS), metadata={"help": "what to measure"}
    )
    k: int = field(default=5, metadata={"help": "top-k rows in the loss (clamped to n)"})
    tau: float = field(default=1.0, metadata={"help": "temperature / regularization strength"})
    sinkhorn_iters: int = field(default=20, metadata={"help": "Sinkhorn iterations"})
    lp_backend: str = field(
        default=DEFAULT_LP_BACKEND,
        metadata={
            "choices": list(LP_SORT_BACKENDS),
            "help": "solver backend of the LP relaxations",
        },
    )
    repeats: int = field(default=5, metadata={"help": "timed runs per point"})
    warmup: int = field(default=1, metadata={"help": "untimed runs per point"})
    dtype: str = field(
        default="float32", metadata={"choices": ["float32", "float64"], "help": "dtype"}
    )
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    lp_max_n: int = field(default=128, metadata={"help": "largest n for the LP relaxations"})
    birkhoff_max_n: int = field(default=32, metadata={"help": "largest n for lp-birkhoff"})
    max_seconds: float = field(
        default=120.0, metadata={"help": "a point slower than this skips larger n (same batch)"}
    )
    max_mem_gb: float = field(
        default=8.0, metadata={"help": "skip points whose estimated memory exceeds this"}
    )
    memory: bool = field(default=True, metadata={"help": "measure peak memory"})
    out: str = field(default="results/bench_sort", metadata={"help": "output folder"})
    resume: bool = field(default=False, metadata={"help": "skip points already in the CSV"})
    seed: int = field(default=0, metadata={"help": "seed"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    race: bool = field(
        default=False,
        metadata={
            "help": "race the LP relaxations (native and --race_cvxpy_backend) against "
            "torchsort, diffsort and NeuralSort instead of the sweep (writes race.*)"
        },
    )
    race_ns: list[int] = field(
        default_factory=lambda: [16, 100, 1000], metadata={"help": "race: numbers of items"}
    )
    race_batch: int = field(default=100, metadata={"help": "race: batch size"})
    race_cvxpy_backend: str = field(
        default="moreau",
        metadata={"choices": list(BACKENDS), "help": "race: the CVXPY-path backend raced"},
    )
    cvxpy_max_n: int = field(default=100, metadata={"help": "race: largest n on the CVXPY path"})
    cvxpy_birkhoff_max_n: int = field(
        default=16, metadata={"help": "race: largest n of lp_birkhoff_sort on the CVXPY path"}
    )
    native_birkhoff_max_n: int = field(
        default=100, metadata={"help": "race: largest n of the native lp_birkhoff_sort"}
    )
    diffsort_max_n: int = field(default=128, metadata={"help": "race: largest n for diffsort"})
    race_memory: bool = field(
        default=True,
        metadata={"help": "race: peak memory of lp_permutahedron_sort at batch 128 x n 1024"},
    )

    def validate(self) -> None:  # the flags as given, before --quick replaces some of them
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
        check_ranges(
            self,
            at_least={
                "ns": 2,
                "batches": 1,
                "repeats": 1,
                "k": 1,
                "warmup": 0,
                "sinkhorn_iters": 1,
                "lp_max_n": 2,
                "birkhoff_max_n": 2,
                "threads": 0,
                "race_ns": 2,
                "race_batch": 1,
                "cvxpy_max_n": 2,
                "cvxpy_birkhoff_max_n": 2,
                "native_birkhoff_max_n": 2,
                "diffsort_max_n": 2,
            },
            above={"tau": 0, "max_seconds": 0, "max_mem_gb": 0},
        )
        if self.quick:
            self.ns, self.batches = [8, 16], [4]
            self.race_ns, self.race_batch, self.race_memory = [8, 16], 4, False
            self.repeats, self.warmup = min(self.repeats, 2), min(self.warmup, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(BenchConfig, argv)
    return race(cfg) if cfg.race else run(cfg)


if __name__ == "__main__":
    run_main(main)
