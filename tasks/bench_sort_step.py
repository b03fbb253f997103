"""Time a training step of ``tasks/run_sort.py`` against ``--digit_reuse``.

    python tasks/bench_sort_step.py --data-dir ../shared/data            # R = 1, 2, 4, 5, 8
    python tasks/bench_sort_step.py --dataset mnist5k --reuse 1 4 --steps 20

Each R runs ``run_sort.main`` itself for ``--steps`` training steps (one epoch, tiny validation
and test sets, in a temporary folder) with the sorting flags below, and reads the mean seconds
per step it records. Run it on an idle machine: the figures are only comparable within one run.
Writes ``bench_sort_step.csv`` / ``.json`` (one row per R: ms per step and digit images per step)
and ``bench_sort_step.png`` (ms per step against R) to ``--out``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tasks import run_sort
from tasks.cli import parse_config, run_main, write_csv, write_json
from tasks.plots import plt


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
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(StepBenchConfig, argv)
    torch.set_num_threads(cfg.threads)  # run_sort.main runs in this process
    flags = ["--n", str(cfg.n), "--batch_size", str(cfg.batch_size), "--shift", str(cfg.shift)]
    flags += ["--groupings", str(cfg.groupings), "--near_groupings", str(cfg.near_groupings)]
    flags += ["--dataset", cfg.dataset, "--data-dir", cfg.data_dir]
    flags += ["--num_epochs", "1", "--steps_per_epoch", str(cfg.steps), "--no-progress"]
    flags += ["--val_sequences", "10", "--test_sequences", "10"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in cfg.reuse:
            out = Path(tmp) / f"reuse{r}" / "run"
            result = run_sort.main([*flags, "--digit_reuse", str(r), "--out", str(out)])
            ms = 1000 * result["seconds_per_step"]
            images = cfg.batch_size * cfg.n * result["config"]["num_digits"] // r
            rows.append({"digit_reuse": r, "ms_per_step": ms, "digit_images_per_step": images})
            print(f"--digit_reuse {r}: {ms:.1f} ms/step, {images} digit images a step")
    out = Path(cfg.out)
    write_csv(out / "bench_sort_step.csv", rows)
    write_json(out / "bench_sort_step.json", {"config": asdict(cfg), "rows": rows})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["digit_reuse"] for r in rows], [r["ms_per_step"] for r in rows], marker="o")
    ax.set_xlabel("--digit_reuse (numbers per digit image)")
    ax.set_ylabel("ms per training step")
    ax.set_title(f"n = {cfg.n}, batch {cfg.batch_size}, {cfg.threads} threads", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bench_sort_step.png", dpi=110)
    plt.close(fig)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    run_main(main)
