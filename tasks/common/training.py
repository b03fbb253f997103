"""One training loop for every task: epochs, progress bar, metrics.csv, atomic checkpoints,
exact ``--resume``, model selection on validation, and DistributedDataParallel under torchrun.

A task supplies two callables:

* ``train_step(model, generator) -> dict[str, float]``: one optimisation step (the loop calls
  ``optimizer.zero_grad()`` before and ``optimizer.step()`` after; the step calls ``backward``).
  ``generator`` is a ``torch.Generator`` seeded by (seed, epoch, rank): draw every random batch
  from it, and a resumed run replays exactly the batches a straight run would have seen.
* ``evaluate(model) -> dict[str, float]``: validation metrics, run on rank 0 only.

Files in ``out``: ``config.json``, ``metrics.csv`` (a row per epoch), ``ckpt.pt`` (the last epoch:
model, optimizer, epoch, best_val, config, RNG state), ``best.pt`` (the best model on validation),
``curves.png``.
"""

from __future__ import annotations

import csv
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from tasks.common.cli import (
    UserError,
    append_csv,
    atomic_save,
    check_ranges,
    remove_stale_temps,
    write_csv,
    write_json,
)
from tasks.common.data import DATASETS
from tasks.common.plots import plot_learning_curves

__all__ = [
    "ImageTaskFlags",
    "RunFlags",
    "Trainer",
    "distributed_context",
    "epoch_minutes",
    "seed_everything",
]

# Flags that may differ between a run and its resumption.
RESUMABLE_KEYS = {"resume", "num_epochs", "device", "out", "progress"}


@dataclass
class RunFlags:
    """Flags every training task shares; task configs inherit them (``--resume --device --out
    --seed --progress``) and ``Trainer.from_flags`` reads them."""

    resume: bool = field(default=False, metadata={"help": "continue from --out/ckpt.pt"})
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda)"})
    out: str = field(default="", metadata={"help": "output folder"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and sampling"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    lr_schedule: str = field(
        default="constant",
        metadata={
            "choices": ["constant", "cosine"],
            "help": "learning rate over training: constant, or cosine decay to 0 by the last step",
        },
    )


@dataclass
class ImageTaskFlags(RunFlags):
    """Flags of the image tasks trained with SGD (dKNN and its CNN baseline)."""

    dataset: str = field(default="mnist5k", metadata={"choices": list(DATASETS), "help": "data"})
    data_dir: str = field(default="data", metadata={"help": "torchvision data folder"})
    download: bool = field(default=False, metadata={"help": "download the data set if missing"})
    backbone: str = field(
        default="auto",
        metadata={"choices": ["auto", "convnet", "resnet18"], "help": "network"},
    )
    augment: int = field(
        default=0,
        metadata={"help": "random translations of up to this many pixels (0: none, as the paper)"},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})

    def validate(self) -> None:
        check_ranges(self, at_least={"augment": 0, "weight_decay": 0, "momentum": 0})
        if not self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """``torch.load`` of a checkpoint; an unreadable file (empty, truncated: a write killed
    before atomic writes, a full disk, a copy cut short) is a one-line error naming it."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise UserError(
            f"{path} is not a readable checkpoint ({str(err).splitlines()[0][:80] or 'empty'}); "
            "delete it to start that run over, or pass another --out"
        ) from None


def epoch_minutes(metrics: list[dict[str, Any]], best_epoch: int) -> dict[str, float]:
    """``minutes_to_best`` and ``minutes`` of a run: the ``seconds`` of its metrics.csv rows
    (training and validation), summed to the best epoch and over all epochs, in minutes."""
    seconds = [float(row["seconds"]) for row in metrics]
    return {"minutes_to_best": sum(seconds[:best_epoch]) / 60, "minutes": sum(seconds) / 60}


def mean_step_seconds(metrics: list[dict[str, Any]]) -> float:
    """Mean seconds of one ``train_step`` call over the epochs of a run's metrics.csv rows that
    timed them (``train_step_seconds``; rows from before that column are blank there), so a
    resumed run counts every epoch; nan when none did."""
    timed = [
        r["train_step_seconds"] for r in metrics if isinstance(r.get("train_step_seconds"), float)
    ]
    return sum(timed) / len(timed) if timed else float("nan")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed_context(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under ``torchrun`` joins the process group (gloo on CPU,
    nccl on CUDA, each rank on its own GPU); otherwise (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world == 1:
        return 0, 1, dev
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


class Trainer:
    """Runs epochs of ``train_step`` calls with validation, checkpoints and resume.

    Args:
        model: the module to train (wrapped in DDP when ``WORLD_SIZE > 1``).
        optimizer: its optimizer.
        out: output folder.
        config: the run's resolved flags (saved; a resumed run must match them).
        resume: continue from ``out/ckpt.pt``.
        monitor: validation metric that selects the best epoch (higher is better).
        device: torch device string.
        seed: seed of the per-epoch batch generators.
        progress: show a progress bar (rank 0 only).
        lr_schedule: ``"constant"``, or ``"cosine"`` decay to 0 by the last step.
        defaults: each flag's default, which a checkpoint written before that flag existed
            is taken to have had.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        out: str | Path,
        config: dict[str, Any],
        resume: bool = False,
        monitor: str = "val_acc",
        device: str = "cpu",
        seed: int = 0,
        progress: bool = True,
        lr_schedule: str = "constant",
        defaults: dict[str, Any] | None = None,
    ):
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.rank, self.world, self.device = distributed_context(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.out = Path(out)
        self.config = config
        self.defaults = defaults or {}
        self.monitor = monitor
        self.seed = seed
        self.progress = progress and self.rank == 0
        self.start_epoch, self.best_val, self.best_epoch = 0, -math.inf, -1
        self.ckpt_path, self.best_path = self.out / "ckpt.pt", self.out / "best.pt"
        self.metrics_path = self.out / "metrics.csv"
        if self.rank == 0:  # left by a run killed while writing a checkpoint
            remove_stale_temps(self.out)
        if resume:
            self._resume()
        elif self.ckpt_path.exists():
            raise UserError(
                f"{self.out} already holds a checkpoint; pass --resume to continue it, "
                "or --out to start a new run elsewhere (nothing was overwritten)"
            )
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids
            )
        else:
            self.train_model = self.model
        if self.rank == 0:
            write_json(self.out / "config.json", self.config)

    @classmethod
    def from_flags(
        cls, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunFlags, **kwargs: Any
    ) -> Trainer:
        """A trainer configured by a task's config (a ``RunFlags`` dataclass), saved whole."""
        return cls(
            model,
            optimizer,
            out=cfg.out,
            config=asdict(cfg),
            resume=cfg.resume,
            device=cfg.device,
            seed=cfg.seed,
            progress=cfg.progress,
            lr_schedule=getattr(cfg, "lr_schedule", "constant"),
            defaults={f.name: f.default for f in fields(cfg) if f.default is not MISSING},
            **kwargs,
        )

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        if not self.ckpt_path.exists():
            raise UserError(f"--resume: no checkpoint at {self.ckpt_path}")
        ckpt = load_checkpoint(self.ckpt_path, self.device)
        # a flag added after the checkpoint was written counts as having had its default
        written = {**self.defaults, **ckpt["config"]}
        saved = {k: v for k, v in written.items() if k not in RESUMABLE_KEYS}
        now = {k: v for k, v in self.config.items() if k not in RESUMABLE_KEYS}
        diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        if diff:
            detail = ", ".join(f"--{k} {saved.get(k)!r} (now {now.get(k)!r})" for k in diff[:4])
            raise UserError(
                f"--resume: the checkpoint in {self.out} was written with other flags: {detail}; "
                "use the same flags or another --out (nothing was overwritten)"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.start_epoch = ckpt["epoch"]
        self.best_val, self.best_epoch = ckpt["best_val"], ckpt["best_epoch"]
        torch.set_rng_state(ckpt["torch_rng"])
        if self.rank == 0 and self.metrics_path.exists():  # drop rows of an unfinished epoch
            with open(self.metrics_path, newline="") as fh:  # the cells as written: no rounding
                rows = list(csv.DictReader(fh))
            rows = [r for r in rows if float(r["epoch"]) <= self.start_epoch]
            if rows:
                write_csv(self.metrics_path, rows)
            else:
                self.metrics_path.unlink()
        if self.rank == 0:
            print(f"resumed from {self.ckpt_path} after epoch {self.start_epoch}")

    def _save(self, epoch: int) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "config": self.config,
            "torch_rng": torch.get_rng_state(),
        }
        atomic_save(state, self.ckpt_path)

    def load_best(self) -> int:
        """Load the best-on-validation weights into the model; returns their epoch."""
        best = load_checkpoint(self.best_path, self.device)
        self.model.load_state_dict(best["model"])
        return best["epoch"]

    # ------------------------------------------------------------------ loop
    def fit(
        self,
        num_epochs: int,
        steps_per_epoch: int,
        train_step: Callable[[nn.Module, torch.Generator], dict[str, float]],
        evaluate: Callable[[nn.Module], dict[str, float]],
    ) -> dict[str, float]:
        """Train until ``num_epochs`` epochs are done; returns the best validation record."""
        for epoch in range(self.start_epoch + 1, num_epochs + 1):
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + self.rank)
            self.model.train()
            sums: dict[str, float] = {}
            step_seconds = 0.0
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"epoch {epoch}/{num_epochs}",
                disable=not self.progress,
                leave=False,
            )
            for i in bar:
                self._set_lr((epoch - 1) * steps_per_epoch + i, num_epochs * steps_per_epoch)
                self.optimizer.zero_grad(set_to_none=True)
                t_step = time.perf_counter()
                logs = train_step(self.train_model, gen)
                step_seconds += time.perf_counter() - t_step
                self.optimizer.step()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
            row: dict[str, Any] = {"epoch": epoch}
            row.update({f"train_{k}": v / steps_per_epoch for k, v in sums.items()})
            row["train_step_seconds"] = step_seconds / steps_per_epoch  # forward and backward
            if self.rank == 0:
                self.model.eval()
                with torch.no_grad():
                    val = evaluate(self.model)
                row.update(val)
                row["seconds"] = time.perf_counter() - t0
                if val[self.monitor] > self.best_val:
                    self.best_val, self.best_epoch = val[self.monitor], epoch
                    atomic_save(
                        {"model": self.model.state_dict(), "epoch": epoch, "val": val},
                        self.best_path,
                    )
                self._save(epoch)  # first: a failed metrics write must not lose the epoch
                try:
                    append_csv(self.metrics_path, row)
                except OSError as err:
                    raise UserError(
                        f"cannot write {self.metrics_path} ({err.strerror or err}); epoch {epoch} "
                        f"is saved in {self.ckpt_path}: make the file writable and --resume"
                    ) from None
                plot_learning_curves(self.metrics_path, self.out / "curves.png")
                shown = " ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k != "epoch")
                print(f"epoch {epoch}/{num_epochs} {shown} best {self.best_val:.4f}", flush=True)
            if self.world > 1:
                dist.barrier()
        if self.world > 1:
            self._check_ranks_agree()
        return {"best_val": self.best_val, "best_epoch": self.best_epoch}

    def _set_lr(self, step: int, total: int) -> None:
        """Learning rate of ``step`` (0-based) out of ``total``: a function of the step alone,
        so a resumed run follows the schedule of a straight one."""
        if self.lr_schedule == "constant":
            return
        factor = 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def _check_ranks_agree(self) -> None:
        """All ranks must hold identical weights after DDP training; rank 0 records the check."""
        flat = torch.cat([p.detach().double().flatten().cpu() for p in self.model.parameters()])
        weights = torch.linspace(1.0, 2.0, len(flat), dtype=torch.float64)
        digest = torch.stack([flat.sum(), (flat * weights).sum()]).to(self.device)
        gathered = [torch.zeros_like(digest) for _ in range(self.world)]
        dist.all_gather(gathered, digest)
        if self.rank == 0:
            sums = [g.cpu().tolist() for g in gathered]
            write_json(self.out / "ddp_check.json", {"world_size": self.world, "digests": sums})


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
