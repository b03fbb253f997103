"""Speed and accuracy of the TV layer's backends on OptNet's denoising workload."""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layers import SolverError, difference_matrix, tv_denoise, tv_error_bound
from tasks.backends.tv_qp import tv_qp
from tasks.common.cli import atomic_write_text, set_up_torch, write_json
from tasks.common.data import denoising_splits

BenchConfig = Any  # the flags dataclass of tasks/bench_tv.py
QPTH_CHECK_TOL = 1e-3  # certified RMS error allowed to the qpth peer


# ------------------------------------------------------------------------------ solvers
def _qpth_solve(y: torch.Tensor, D: torch.Tensor, lam: torch.Tensor, eps: float) -> torch.Tensor:
    """OptNet's QP form through qpth, called as OptNet's code calls it (batched copies: qpth
    averages, not sums, the gradients of unbatched inputs over the batch; 50 iterations)."""
    from qpth.qp import QPFunction

    d = tv_qp(y, D, lam, eps)
    e = torch.empty(0, dtype=torch.float64)
    z = QPFunction(verbose=-1, maxIter=50)(d["Q"], d["q"], d["G"], d["h"], e, e)
    return z[:, : y.shape[1]]


def solve(backend: str, y: torch.Tensor, D: torch.Tensor, lam: torch.Tensor, cfg) -> torch.Tensor:
    """``x (B, n)`` float64 from a backend. The layer's backends certify their answers; the qpth
    peer runs outside the layer, so its answers are held to the certified bound
    (:func:`layers.tv_error_bound`) at ``QPTH_CHECK_TOL`` relative to ``1 + max|y|``."""
    if backend == "qpth":
        x = _qpth_solve(y, D, lam, cfg.qpth_eps)
        bound = tv_error_bound(x.detach(), y, D.detach(), lam.detach())
        bad = torch.nonzero(~(bound <= QPTH_CHECK_TOL * (1 + y.abs().amax(1)))).flatten()
        if len(bad):
            raise SolverError(f"qpth: {len(bad)} solutions fail the certificate", bad.tolist())
        return x
    extra = {"qp_eps": cfg.qpth_eps} if backend == "qp" else {}
    return tv_denoise(y, D, lam, backend=backend, **extra)


def reference(y: np.ndarray, D: np.ndarray, lam: float) -> np.ndarray:
    """Tight direct Clarabel solves (QP objective, not the conic form), one per signal."""
    import cvxpy as cp

    n = y.shape[1]
    yp, x = cp.Parameter(n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - yp) + lam * cp.norm1(D @ x)))
    out = []
    for row in y:
        yp.value = row
        prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        out.append(x.value)
    return np.stack(out)


def _loss(x: np.ndarray | torch.Tensor, clean) -> Any:
    return ((x - clean) ** 2).mean()


# ------------------------------------------------------------------------------ benchmark
def bench_backend(name: str, cfg: BenchConfig, data: dict, ref: dict) -> dict[str, Any]:
    """Times and accuracy of one backend."""
    D0, lam0 = data["D"], torch.tensor(cfg.lam, dtype=torch.float64)
    batches = data["batches"]
    row: dict[str, Any] = {"backend": name}

    def step(y, clean, grad: bool):
        D = D0.clone().requires_grad_(grad)
        lam = lam0.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            x = solve(name, y, D, lam, cfg)
            if grad:
                _loss(x, clean).backward()
        return x.detach(), D.grad, lam.grad

    try:
        step(*batches[0], grad=True)  # warm-up (cvxpylayers canonicalization, caches)
        n_fwd = len(batches) if name == "native" else cfg.batches
        t0 = time.perf_counter()
        for y, c in batches[:n_fwd]:
            step(y, c, grad=False)
        row["forward_s"] = (time.perf_counter() - t0) / n_fwd
        t0 = time.perf_counter()
        for y, c in batches[:n_fwd]:
            step(y, c, grad=True)
        row["fwd_bwd_s"] = (time.perf_counter() - t0) / n_fwd
        row["timed_batches"] = n_fwd
        row["epoch_s"] = row["fwd_bwd_s"] * data["batches_per_epoch"]
        # Accuracy on the reference signals.
        k = cfg.ref_signals
        y, clean = batches[0][0][:k], batches[0][1][:k]
        x, gD, glam = step(y, clean, grad=True)
        row["max_abs_error"] = float((x - ref["x"]).abs().max())
        row["certified_rms_error"] = float(tv_error_bound(x, y, D0, cfg.lam).max())
        fd = ref["fd_D"]
        dirs = ref["dirs"]
        proj = torch.stack([(gD * V).sum() for V in dirs]).numpy()
        # Errors of the directional derivatives, relative to the gradient's norm (fd[0]).
        row["grad_D_rel_error"] = float(np.max(np.abs(proj - fd)) / abs(fd[0]))
        row["grad_lam_rel_error"] = float(abs(glam - ref["fd_lam"]) / abs(ref["fd_lam"]))
        row["grad_D"] = gD
        row["status"] = "ok"
    except (SolverError, RuntimeError, ValueError) as err:
        row["status"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
    except NotImplementedError as err:
        row["status"] = f"unavailable: {err}"
    return row


def full_epoch(cfg: BenchConfig, noisy: torch.Tensor, clean: torch.Tensor, D0) -> dict:
    """Time native over every training batch (forward+backward, D and lam learnable)."""
    D = D0.clone().requires_grad_()
    lam = torch.tensor(cfg.lam, dtype=torch.float64, requires_grad=True)
    t0 = time.perf_counter()
    iters, worst = [], 0.0
    for i in range(0, len(noisy), cfg.batch_size):
        x, info = tv_denoise(noisy[i : i + cfg.batch_size], D, lam, return_info=True)
        _loss(x, clean[i : i + cfg.batch_size]).backward()
        iters.append(info.iterations)
        worst = max(worst, info.max_error_bound)
    return {
        "epoch_s": time.perf_counter() - t0,
        "batches": len(iters),
        "mean_ipm_iterations": float(np.mean(iters)),
        "max_certified_rms_error": worst,
    }


def table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"TV backends: batch {cfg['batch_size']}, n = 100, D {cfg['d_kind']}, lam {cfg['lam']}, "
        f"{result['threads']} torch thread(s).",
        "",
        "| backend | forward s/batch | fwd+bwd s/batch | epoch s (est.) | epoch vs native | "
        "max abs err vs ref | certified RMS err | grad D rel err (FD) | grad lam rel err (FD) "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(r, k, fmt):
        return format(r[k], fmt) if isinstance(r.get(k), float) else "-"

    for r in result["rows"]:
        lines.append(
            f"| {r['backend']} | {f(r, 'forward_s', '.3f')} | {f(r, 'fwd_bwd_s', '.3f')} | "
            f"{f(r, 'epoch_s', '.1f')} | {f(r, 'epoch_ratio_vs_native', '.1f')}x | "
            f"{f(r, 'max_abs_error', '.1e')} | {f(r, 'certified_rms_error', '.1e')} | "
            f"{f(r, 'grad_D_rel_error', '.1e')} | {f(r, 'grad_lam_rel_error', '.1e')} | "
            f"{r['status'][:60]} |"
        )
    if "native_full_epoch" in result:
        e = result["native_full_epoch"]
        lines += [
            "",
            f"native, measured full epoch ({e['batches']} batches, fwd+bwd): "
            f"{e['epoch_s']:.1f} s, {e['mean_ipm_iterations']:.1f} interior-point "
            f"iterations per batch, max certified RMS error {e['max_certified_rms_error']:.1e}.",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["backend"] for r in rows]
    pos = np.arange(len(rows))
    fwd = [r["forward_s"] * r["epoch_s"] / r["fwd_bwd_s"] for r in rows]
    ax.barh(
        pos - 0.2, [r["epoch_s"] for r in rows], height=0.4, color="C0", label="forward+backward"
    )
    ax.barh(pos + 0.2, fwd, height=0.4, color="C1", label="forward only")
    ax.set_yticks(pos, names)
    ax.axvline(60, color="k", ls="--", lw=1, label="target: 1 min / epoch")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per epoch (9,000 signals)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x", which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg) -> dict:
    set_up_torch(cfg.threads)
    tr_x, tr_y, _, _ = denoising_splits()
    n = tr_x.shape[1]
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.d_kind == "dense":
        D0 = difference_matrix(n, dtype=torch.float64)
        D0 = D0 + cfg.d_noise * torch.randn(n - 1, n, generator=g, dtype=torch.float64)
    else:
        D0 = 0.3 * torch.randn(n - 1, n, generator=g, dtype=torch.float64)
    noisy, clean = tr_x.double(), tr_y.double()
    nb = max(cfg.batches, 6)  # native is timed on 6 batches (it is cheap), peers on --batches
    batches = [
        (
            noisy[i * cfg.batch_size : (i + 1) * cfg.batch_size],
            clean[i * cfg.batch_size : (i + 1) * cfg.batch_size],
        )
        for i in range(nb)
    ]
    data = {"D": D0, "batches": batches, "batches_per_epoch": math.ceil(9000 / cfg.batch_size)}

    # Tight references: solutions and finite-difference directional derivatives.
    print("reference: tight Clarabel solves and finite differences ...", flush=True)
    k = cfg.ref_signals
    y, c = batches[0][0][:k].numpy(), batches[0][1][:k].numpy()
    Dn = D0.numpy()
    x_ref = reference(y, Dn, cfg.lam)
    # Directions in D: the gradient's (a large directional derivative, so a good signal-to-noise
    # ratio for the differences), then random unit ones.
    Dg = D0.clone().requires_grad_()
    _loss(tv_denoise(batches[0][0][:k], Dg, cfg.lam), batches[0][1][:k]).backward()
    dirs = [Dg.grad] + [
        torch.randn(D0.shape, generator=g, dtype=torch.float64) for _ in range(cfg.fd_directions)
    ]
    dirs = [V / V.norm() for V in dirs]

    def central(f, h):
        return (f(h) - f(-h)) / (2 * h)

    fd_D = np.array(
        [
            central(lambda h, V=V: _loss(reference(y, Dn + h * V.numpy(), cfg.lam), c), cfg.fd_eps)
            for V in dirs
        ]
    )
    fd_lam = central(lambda h: _loss(reference(y, Dn, cfg.lam + h), c), 1e-6 * cfg.lam)
    ref = {"x": torch.from_numpy(x_ref), "dirs": dirs, "fd_D": fd_D, "fd_lam": float(fd_lam)}

    rows = []
    for name in cfg.backends:
        if name == "qpth" and importlib.util.find_spec("qpth") is None:
            rows.append({"backend": name, "status": "unavailable: pip install qpth"})
            continue
        print(f"{name} ...", flush=True)
        row = bench_backend(name, cfg, data, ref)
        rows.append(row)
        shown = {k: v for k, v in row.items() if k != "grad_D"}
        print(
            "  "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
            ),
            flush=True,
        )
    native = next((r for r in rows if r["backend"] == "native" and r["status"] == "ok"), None)
    for r in rows:
        if native and r["status"] == "ok":
            r["epoch_ratio_vs_native"] = r["epoch_s"] / native["epoch_s"]
            r["grad_D_rel_diff_vs_native"] = float(
                (r["grad_D"] - native["grad_D"]).norm() / native["grad_D"].norm()
            )
    for r in rows:
        r.pop("grad_D", None)
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    if cfg.full_epoch and "native" in cfg.backends:
        print("native: a full epoch ...", flush=True)
        result["native_full_epoch"] = full_epoch(cfg, noisy[:9000], clean[:9000], D0)
        print(f"  {result['native_full_epoch']}")
    out = Path(cfg.out)
    write_json(out / "bench.json", result)
    atomic_write_text(out / "bench.md", table(result))
    plot(result, out / "bench.png")
    print("\n" + table(result))
    return result
