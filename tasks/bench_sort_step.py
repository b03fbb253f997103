"""Time a training step of ``tasks/run_sort.py`` against ``--digit_reuse``.

    python tasks/bench_sort_step.py --data-dir ../shared/data            # R = 1, 2, 4, 5, 8
    python tasks/bench_sort_step.py --dataset mnist5k --reuse 1 4 --steps 20

Each R runs the training of ``tasks/run_sort.py`` itself for ``--steps`` training steps (one epoch,
tiny validation and test sets, in a temporary folder) with the sorting flags below, and reads the
mean seconds per step it records. Run it on an idle machine: the figures are only comparable within
one run.
Writes ``bench_sort_step.csv`` / ``.json`` (one row per R: ms per step and digit images per step)
and ``bench_sort_step.png`` (ms per step against R) to ``--out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.common.cli import check_ranges, parse_config, run_main
from tasks.sort.step_bench import run


@dataclass
class StepBenchConfig:
    """Time run_sort's training step for several --digit_reuse values."""

    reuse: list[int] = field(
        default_factory=lambda: [1, 2, 4, 5, 8], metadata={"help": "--digit_reuse values"}
    )
    n: int = field(default=5, metadata={"help": "numbers per sequence"})
    batch_size: int = field(default=10, metadata={"help": "sequences per step"})
    groupings: int = field(default=20, metadata={"help": "--groupings"})
    near_groupings: int = field(default=20, metadata={"help": "--near_groupings"})
    shift: int = field(default=1, metadata={"help": "--shift"})
    steps: int = field(default=60, metadata={"help": "timed training steps per value"})
    dataset: str = field(
        default="mnist", metadata={"choices": ["mnist", "mnist5k"], "help": "digit images"}
    )
    data_dir: str = field(default="data", metadata={"help": "torchvision data folder"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    out: str = field(default="results/bench_sort_step", metadata={"help": "output folder"})

    def validate(self) -> None:
        if not self.reuse or min(self.reuse) < 1:
            raise ValueError(f"--reuse values must be >= 1, got {self.reuse}")
        check_ranges(
            self,
            at_least={"n": 2, "batch_size": 1, "groupings": 1, "near_groupings": 0, "shift": 0},
        )
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")


def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse_config(StepBenchConfig, argv))


if __name__ == "__main__":
    run_main(main)
