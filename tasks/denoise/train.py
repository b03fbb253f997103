"""Time-series denoising (OptNet, Table 1): the FC net, tuned TV, OptNet-tuned TV and pure
OptNet, trained and compared."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layers import TVDenoise, difference_matrix, tv_denoise
from tasks.common.cli import (
    UserError,
    atomic_save,
    atomic_write_text,
    write_json,
)
from tasks.common.data import denoising_splits
from tasks.common.plots import read_csv
from tasks.common.training import Trainer, load_checkpoint, mean_step_seconds, seed_everything

DenoiseConfig = Any  # the flags dataclass of tasks/run_denoise.py

MODELS = ["fc", "tv", "optnet_tv", "optnet"]
LABELS = {
    "fc": "FC net",
    "tv": "TV (tuned lambda)",
    "optnet_tv": "OptNet-tuned TV",
    "optnet": "pure OptNet (random D)",
}
PAPER_TEST_MSE = {"fc": 29.8, "tv": 16.5, "optnet_tv": 14.4, "optnet": 53.3}
MODEL_FLAGS = {
    "fc": ["lr_fc", "fc_hidden"],
    "optnet_tv": ["backend", "lr_tv", "lr_lam", "tv_maps"],
    "optnet": ["backend", "lr_optnet", "d_penalty", "optnet_lam", "optnet_learn_lam"],
}


class MappedTV(nn.Module):
    """``x = (I + P) TV_{D,lam}((I + W) y + b)`` with ``W, b, P`` started at 0 (exactly TV)."""

    def __init__(self, tv: TVDenoise):
        super().__init__()
        n = tv.n
        self.tv = tv
        self.inp = nn.Linear(n, n)
        self.out = nn.Linear(n, n, bias=False)
        for p in (self.inp.weight, self.inp.bias, self.out.weight):
            nn.init.zeros_(p)

    @property
    def D(self) -> torch.Tensor:
        return self.tv.D

    @property
    def lam(self) -> torch.Tensor:
        return self.tv.lam

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x = self.tv(y + self.inp(y))
        return x + self.out(x)


class FCDenoiser(nn.Module):
    """OptNet's ReLU baseline: ``(B, n) -> relu(Linear(n, h)) -> Linear(h, n)``."""

    def __init__(self, n: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, n))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


@torch.no_grad()
def mse(
    predict: Callable[[torch.Tensor], torch.Tensor],
    noisy: torch.Tensor,
    clean: torch.Tensor,
    batch: int,
    device: torch.device,
) -> float:
    """Per-entry MSE of ``predict`` over a data set, in batches (float64 accumulation)."""
    total = 0.0
    for i in range(0, len(noisy), batch):
        pred = predict(noisy[i : i + batch].to(device))
        total += ((pred.double() - clean[i : i + batch].to(device).double()) ** 2).sum().item()
    return total / clean.numel()


# ------------------------------------------------------------------------------ TV baseline
def tune_lambda(
    noisy: torch.Tensor,
    clean: torch.Tensor,
    cfg: DenoiseConfig,
    device: torch.device,
) -> tuple[float, list[dict[str, float]]]:
    """Minimise the training MSE of TV over ``lam``: a geometric grid, then golden section in
    the bracket around the best grid point, with exact (certified) solves."""
    D = difference_matrix(noisy.shape[1], dtype=torch.float64, device=device)
    seen: dict[float, float] = {}

    def f(lam: float) -> float:
        if lam not in seen:
            seen[lam] = mse(
                lambda y: tv_denoise(y.double(), D, lam, backend=cfg.backend),
                noisy,
                clean,
                cfg.eval_batch,
                device,
            )
            print(f"  tv lam {lam:8.4f}  train mse {seen[lam]:.4f}", flush=True)
        return seen[lam]

    k = 5 if cfg.quick else 9
    grid = [cfg.lam_min * (cfg.lam_max / cfg.lam_min) ** (i / (k - 1)) for i in range(k)]
    vals = [f(g) for g in grid]
    i = min(range(k), key=vals.__getitem__)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, k - 1)]
    invphi = (math.sqrt(5) - 1) / 2
    c, d = hi - invphi * (hi - lo), lo + invphi * (hi - lo)
    while hi - lo > cfg.lam_tol:
        if f(c) <= f(d):
            hi, d = d, c
            c = hi - invphi * (hi - lo)
        else:
            lo, c = c, d
            d = lo + invphi * (hi - lo)
    best = min(seen, key=seen.__getitem__)
    return best, [{"lam": lam, "train_mse": v} for lam, v in sorted(seen.items())]


def run_tv(cfg: DenoiseConfig, data: dict[str, torch.Tensor], device: torch.device) -> dict:
    """Tune TV's lam on the training set (or reuse the tuning of a resumed run)."""
    folder = Path(cfg.out) / "tv"
    saved = folder / "tv.json"
    keys = ("n_train", "n_test", "data_seed", "lam_min", "lam_max", "lam_tol", "backend")
    if cfg.resume and saved.exists():
        import json

        result = json.loads(saved.read_text())
        if all(result["config"].get(k) == getattr(cfg, k) for k in keys):
            print(f"tv: reusing lam {result['lam']:.4f} from {saved}")
            return result
    print("tv: tuning lam on the training set")
    t0 = time.perf_counter()
    lam, search = tune_lambda(data["train_noisy"], data["train_clean"], cfg, device)
    D = difference_matrix(data["train_noisy"].shape[1], dtype=torch.float64, device=device)

    def predict(y: torch.Tensor) -> torch.Tensor:
        return tv_denoise(y.double(), D, lam, backend=cfg.backend)

    result = {
        "config": {k: getattr(cfg, k) for k in keys},
        "lam": lam,
        "train_mse": min(r["train_mse"] for r in search),
        "test_mse": mse(predict, data["test_noisy"], data["test_clean"], cfg.eval_batch, device),
        "seconds": time.perf_counter() - t0,
        "evaluations": len(search),
    }
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["lam,train_mse"] + [f"{r['lam']:.6f},{r['train_mse']:.6f}" for r in search]
    atomic_write_text(folder / "lam_search.csv", "\n".join(lines) + "\n")
    write_json(saved, result)
    print(f"tv: lam {lam:.4f}  train mse {result['train_mse']:.4f}  test {result['test_mse']:.4f}")
    return result


# ------------------------------------------------------------------------------ trained models
def build_model(name: str, cfg: DenoiseConfig, n: int, tv_lam: float | None):
    """The model and its optimizer."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if name == "fc":
        model: nn.Module = FCDenoiser(n, cfg.fc_hidden)
        return model, torch.optim.Adam(model.parameters(), lr=cfg.lr_fc)
    if name == "optnet_tv":
        assert tv_lam is not None
        tv = TVDenoise(n, "diff", tv_lam, backend=cfg.backend)
        model = MappedTV(tv) if cfg.tv_maps else tv
        rest = [p for p in model.parameters() if p is not tv.log_lam]
        groups = [{"params": rest, "lr": cfg.lr_tv}, {"params": [tv.log_lam], "lr": cfg.lr_lam}]
        return model, torch.optim.Adam(groups)
    if name == "optnet":
        model = TVDenoise(
            n,
            "random",
            cfg.optnet_lam,
            learn_lam=cfg.optnet_learn_lam,
            backend=cfg.backend,
            generator=gen,
        )
        return model, torch.optim.Adam(model.parameters(), lr=cfg.lr_optnet)
    raise ValueError(name)


def run_trained(
    name: str,
    cfg: DenoiseConfig,
    data: dict[str, torch.Tensor],
    tv_lam: float | None,
) -> dict[str, Any]:
    """Train one model with the shared loop in ``--out/<name>``; returns its results row."""
    seed_everything(cfg.seed)
    n = data["train_noisy"].shape[1]
    model, optimizer = build_model(name, cfg, n, tv_lam)
    # Only the flags this model depends on, so a resumed run may change the others.
    keys = ["batch_size", "n_train", "data_seed", "seed", "device", "out", "progress", "resume"]
    keys += MODEL_FLAGS[name]
    config = {"model": name, "tv_lam": tv_lam, **{k: getattr(cfg, k) for k in keys}}
    epochs = cfg.fc_epochs if name == "fc" else cfg.num_epochs
    config["num_epochs"] = epochs
    trainer = Trainer(
        model,
        optimizer,
        out=Path(cfg.out) / name,
        config=config,
        resume=cfg.resume and (Path(cfg.out) / name / "ckpt.pt").exists(),
        monitor="neg_train_sub_mse",
        device=cfg.device,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    dev = trainer.device
    train_x, train_y = data["train_noisy"], data["train_clean"]
    sub = slice(0, min(1000, len(train_x)))
    penalty = cfg.d_penalty if name == "optnet" else 0.0
    state: dict[str, Any] = {"gen": None}

    def train_step(net: nn.Module, gen: torch.Generator) -> dict[str, float]:
        if state["gen"] is not gen:  # a new epoch: a new permutation (exact on --resume)
            state.update(gen=gen, perm=torch.randperm(len(train_x), generator=gen), k=0)
        idx = state["perm"][state["k"] : state["k"] + cfg.batch_size]
        state["k"] += cfg.batch_size
        pred = net(train_x[idx].to(dev))
        loss = ((pred - train_y[idx].to(dev)) ** 2).mean()
        total = loss + penalty * net.D.abs().sum() if penalty else loss
        total.backward()
        logs = {"mse": loss.item()}
        if isinstance(net, (TVDenoise, MappedTV)):
            logs["lam"] = net.lam.item()
        return logs

    def evaluate(net: nn.Module) -> dict[str, float]:
        train_sub = mse(net, train_x[sub], train_y[sub], cfg.eval_batch, dev)
        return {
            "train_sub_mse": train_sub,
            "test_mse": mse(net, data["test_noisy"], data["test_clean"], cfg.eval_batch, dev),
            "neg_train_sub_mse": -train_sub,
        }

    steps = max(1, len(train_x) // cfg.batch_size)
    print(f"{name}: training {epochs} epochs of {steps} steps in {trainer.out}")
    trainer.fit(epochs, steps, train_step, evaluate)
    rows = read_csv(trainer.metrics_path) if trainer.metrics_path.exists() else []
    step_s = mean_step_seconds(rows)
    row = {
        "model": name,
        "epochs": int(rows[-1]["epoch"]) if rows else 0,
        "train_mse": mse(model, train_x, train_y, cfg.eval_batch, dev),
        "test_mse": mse(model, data["test_noisy"], data["test_clean"], cfg.eval_batch, dev),
        "train_seconds_per_epoch": None if math.isnan(step_s) else step_s * steps,
    }
    if isinstance(model, (TVDenoise, MappedTV)):
        row["lam"] = model.lam.item()
    if name == "optnet_tv":
        row["D_minus_diff_norm"] = float((model.D.detach().cpu() - difference_matrix(n)).norm())
        row["maps"] = cfg.tv_maps
    return row


# ------------------------------------------------------------------------------ report, figures
def write_report(cfg: DenoiseConfig, rows: list[dict[str, Any]], tv: dict | None) -> str:
    lines = [
        "# Time-series denoising (OptNet Table 1)",
        "",
        f"{cfg.n_train} training / {cfg.n_test} test signals, backend `{cfg.backend}`, "
        f"batch {cfg.batch_size}. Per-entry MSE of the last epoch. s / epoch: the training "
        "steps (forward + backward + update) of one epoch.",
        "",
        "| model | epochs | train MSE | test MSE | paper test MSE | s / epoch |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        spe = r.get("train_seconds_per_epoch")
        label = LABELS[r["model"]]
        if r["model"] == "optnet_tv":
            label += " (D, lam + input/output maps)" if r.get("maps") else " (D, lam)"
        lines.append(
            f"| {label} | {r.get('epochs', '-')} | {r['train_mse']:.3f} | "
            f"{r['test_mse']:.3f} | {PAPER_TEST_MSE[r['model']]} | "
            f"{'-' if spe is None else f'{spe:.2f}'} |"
        )
    if tv is not None:
        lines += [
            "",
            f"TV lam tuned on the training set: {tv['lam']:.3f} "
            f"({tv['evaluations']} evaluations, {tv['seconds']:.0f} s).",
        ]
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(cfg.out) / "report.md", text)
    return text


@torch.no_grad()
def save_examples(cfg: DenoiseConfig, data: dict, models: dict[str, Any], tv_lam: float | None):
    """Predictions of every model on four test signals -> ``examples.pt``."""
    idx = torch.arange(4)
    noisy, clean = data["test_noisy"][idx], data["test_clean"][idx]
    preds = {}
    for name, predict in models.items():
        preds[name] = predict(noisy).detach().cpu().float()
    atomic_save(
        {"noisy": noisy, "clean": clean, "preds": preds, "tv_lam": tv_lam},
        Path(cfg.out) / "examples.pt",
    )


def plot_all(out: str | Path) -> list[str]:
    """Draw the figures from the files in ``out``; returns the paths written."""
    import matplotlib.pyplot as plt

    out = Path(out)
    written = []
    ex = out / "examples.pt"
    if ex.exists():
        e = torch.load(ex, weights_only=False)
        fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
        for j, ax in enumerate(axes.flat):
            ax.plot(e["noisy"][j].numpy(), color="0.7", lw=0.8, label="noisy")
            ax.plot(e["clean"][j].numpy(), color="k", lw=1.5, label="truth")
            for name, p in e["preds"].items():
                ax.plot(p[j].numpy(), lw=1.2, label=LABELS[name])
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        fig.suptitle("Test signals")
        fig.tight_layout()
        fig.savefig(out / "examples.png", dpi=110)
        plt.close(fig)
        written.append(str(out / "examples.png"))
    panels = []
    for name in ("optnet_tv", "optnet"):
        path = out / name / "ckpt.pt"
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=False)["model"]
            D = state["D" if "D" in state else "tv.D"].float()
            panels.append((f"learned D: {LABELS[name]}", D))
            if name == "optnet_tv":  # the change is small next to the +-1 of the differences
                panels.append(
                    ("learned D minus first differences", D - difference_matrix(D.shape[1]))
                )
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6), squeeze=False)
        for ax, (title, D) in zip(axes[0], panels):
            v = float(D.abs().max()) or 1.0
            im = ax.imshow(D.numpy(), cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("signal index")
            ax.set_ylabel("row of D")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "D_heatmap.png", dpi=110)
        plt.close(fig)
        written.append(str(out / "D_heatmap.png"))
    curves = {n: out / n / "metrics.csv" for n in ("fc", "optnet_tv", "optnet")}
    curves = {n: p for n, p in curves.items() if p.exists()}
    if curves:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4))
        for name, path in curves.items():
            rows = read_csv(path)
            ep = [r["epoch"] for r in rows]
            axes[0].plot(ep, [r["train_mse"] for r in rows], marker="o", ms=3, label=LABELS[name])
            axes[1].plot(ep, [r["test_mse"] for r in rows], marker="o", ms=3, label=LABELS[name])
            if name == "optnet_tv":
                for key, style in (("train_mse", "--"), ("test_mse", "-")):
                    axes[2].plot(
                        ep,
                        [r[key] for r in rows],
                        style,
                        marker="o",
                        ms=3,
                        color="C1",
                        label=f"{LABELS[name]}: {key.split('_')[0]}",
                    )
        tvj = out / "tv" / "tv.json"
        if tvj.exists():
            import json

            tv = json.loads(tvj.read_text())
            axes[0].axhline(tv["train_mse"], color="k", ls="--", lw=1, label="TV (tuned)")
            axes[1].axhline(tv["test_mse"], color="k", ls="--", lw=1, label="TV (tuned)")
            axes[2].axhline(tv["train_mse"], color="k", ls="--", lw=1, label="TV: train")
            axes[2].axhline(tv["test_mse"], color="k", ls="-", lw=1, label="TV: test")
        titles = ["train MSE (mean over the epoch's batches)", "test MSE", "TV models (linear)"]
        for ax, t in zip(axes, titles):
            ax.set_xlabel("epoch")
            ax.set_title(t)
            ax.set_yscale("log" if ax is not axes[2] else "linear")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
        plt.close(fig)
        written.append(str(out / "loss_curves.png"))
    search = out / "tv" / "lam_search.csv"
    if search.exists():
        rows = read_csv(search)
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.plot([r["lam"] for r in rows], [r["train_mse"] for r in rows], marker="o", ms=3)
        ax.set_xscale("log")
        ax.set_xlabel("lambda")
        ax.set_ylabel("train MSE")
        ax.set_title("TV: training MSE against lambda")
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(out / "lam_search.png", dpi=110)
        plt.close(fig)
        written.append(str(out / "lam_search.png"))
    return written


def run(cfg) -> dict:
    if cfg.plot_only:
        if not Path(cfg.out).is_dir():
            raise UserError(f"--plot_only: no results folder {cfg.out}")
        for p in plot_all(cfg.out):
            print(p)
        return {}
    if not cfg.resume:
        taken = [m for m in cfg.models if (Path(cfg.out) / m / "ckpt.pt").exists()]
        if taken:
            raise UserError(
                f"{cfg.out} already holds runs of {', '.join(taken)}; pass --resume to continue "
                "them, or --out to start elsewhere (nothing was overwritten)"
            )
    else:  # something of this run to continue: a trained model's checkpoint or the tuned TV
        saved = [Path(cfg.out) / m / "ckpt.pt" for m in cfg.models if m != "tv"]
        saved.append(Path(cfg.out) / "tv" / "tv.json")
        if not any(p.exists() for p in saved):
            raise UserError(f"--resume: no run of {', '.join(cfg.models)} to continue in {cfg.out}")
    device = torch.device(cfg.device)
    t0 = time.perf_counter()
    tr_x, tr_y, te_x, te_y = denoising_splits(seed=cfg.data_seed)
    data = {
        "train_noisy": tr_x[: cfg.n_train],
        "train_clean": tr_y[: cfg.n_train],
        "test_noisy": te_x[len(te_x) - cfg.n_test :],
        "test_clean": te_y[len(te_y) - cfg.n_test :],
    }
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.out) / "config.json", asdict(cfg))
    rows: list[dict[str, Any]] = []
    predictors: dict[str, Callable] = {}
    tv = None
    if "tv" in cfg.models:
        tv = run_tv(cfg, data, device)
        rows.append(
            {
                "model": "tv",
                "epochs": 0,
                "train_mse": tv["train_mse"],
                "test_mse": tv["test_mse"],
                "lam": tv["lam"],
            }
        )
        D = difference_matrix(tr_x.shape[1], dtype=torch.float64, device=device)
        predictors["tv"] = lambda y: tv_denoise(y.to(device), D, tv["lam"], backend=cfg.backend)
    for name in ("fc", "optnet_tv", "optnet"):
        if name in cfg.models:
            row = run_trained(name, cfg, data, tv["lam"] if tv else None)
            rows.append(row)
            model, _ = build_model(name, cfg, tr_x.shape[1], tv["lam"] if tv else None)
            ckpt = load_checkpoint(Path(cfg.out) / name / "ckpt.pt", device)
            model.load_state_dict(ckpt["model"])
            model.to(device).eval()
            predictors[name] = lambda y, m=model: m(y.to(device))
    save_examples(cfg, data, predictors, tv["lam"] if tv else None)
    report = write_report(cfg, rows, tv)
    result = {"config": asdict(cfg), "rows": rows, "tv": tv, "seconds": time.perf_counter() - t0}
    write_json(Path(cfg.out) / "results.json", result)
    plot_all(cfg.out)
    print("\n" + report)
    print(f"wrote {cfg.out} in {result['seconds']:.0f} s")
    return result
