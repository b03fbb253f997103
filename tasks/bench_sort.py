"""Benchmark the sort relaxations: forward and forward+backward time and peak memory against n
and batch size, with ``torch.sort`` (the hard limit), a plain softmax over a ``(batch, n, n)``
tensor, the paper's naive NeuralSort and torchsort (when installed) as references.

    python tasks/bench_sort.py --quick                  # tiny sizes
    python tasks/bench_sort.py                          # the full sweep (CPU)
    python tasks/bench_sort.py --device cuda --out results/bench_sort_cuda

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
from tasks.common.cli import check_ranges, parse_config, run_main
from tasks.common.library import DEFAULT_LP_BACKEND
from tasks.sort.bench import METHODS, run


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
        metadata={"choices": list(BACKENDS), "help": "solver backend of the LP relaxations"},
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
            },
            above={"tau": 0, "max_seconds": 0, "max_mem_gb": 0},
        )
        if self.quick:
            self.ns, self.batches = [8, 16], [4]
            self.repeats, self.warmup = min(self.repeats, 2), min(self.warmup, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_config(BenchConfig, argv))


if __name__ == "__main__":
    run_main(main)
