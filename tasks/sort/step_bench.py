"""Time run_sort's training step against --digit_reuse."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from tasks.common.cli import parse_config, write_csv, write_json
from tasks.common.plots import plt
from tasks.sort.config import SortConfig
from tasks.sort.train import run as train_sort


def run(cfg) -> list[dict]:
    torch.set_num_threads(cfg.threads)  # the sort runs in this process
    flags = ["--n", str(cfg.n), "--batch_size", str(cfg.batch_size), "--shift", str(cfg.shift)]
    flags += ["--groupings", str(cfg.groupings), "--near_groupings", str(cfg.near_groupings)]
    flags += ["--dataset", cfg.dataset, "--data-dir", cfg.data_dir]
    flags += ["--num_epochs", "1", "--steps_per_epoch", str(cfg.steps), "--no-progress"]
    flags += ["--val_sequences", "10", "--test_sequences", "10"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in cfg.reuse:
            out = Path(tmp) / f"reuse{r}" / "run"
            argv = [*flags, "--digit_reuse", str(r), "--out", str(out)]
            result = train_sort(parse_config(SortConfig, argv))
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
