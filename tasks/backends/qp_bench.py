"""Time, memory and gradient error of the QP layer's backends and their peers."""

from __future__ import annotations

import importlib.metadata
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from layers import BACKENDS, DEFAULT_BACKEND, qp
from layers._batched import one_thread
from tasks.backends.reference import Reference, random_qp, reference
from tasks.common.bench import PeakRSS, machine_info, sync
from tasks.common.cli import append_csv, set_up_torch, write_json
from tasks.common.plots import num as _num
from tasks.common.plots import read_csv

INPUTS = ("Q", "q", "G", "h", "A", "b")
SIZES: dict[str, tuple[int, int, int, int, float]] = {
    "small": (64, 20, 10, 5, 1.0),
    "dense": (128, 128, 128, 0, 1.0),
    "sparse": (32, 1024, 1024, 1024, 0.01),
    "sparse-p512": (32, 1024, 1024, 512, 0.01),
}
QUICK_SIZES: dict[str, tuple[int, int, int, int, float]] = {
    "small": (8, 10, 5, 2, 1.0),
    "dense": (8, 24, 24, 0, 1.0),
    "sparse": (4, 64, 64, 64, 0.05),
    "sparse-p512": (4, 64, 64, 32, 0.05),
}
DEFAULT_SIZES = ("small", "dense", "sparse")
# the peers that are a bare ``CvxpyLayer`` (no library code): method -> its ``solver`` argument
RAW_CVXPYLAYERS = {"cvxpylayers-default": None, "moreau-default": "MOREAU"}
# the peers, used as their documentation shows: the time targets are theirs
PEERS = ("cvxpylayers-default", "qpth-default", "proxsuite-default")
# moreau with its own settings is one of the layer's backends used untuned, not a peer; it is
# measured beside them so its (fast, active-set) defaults are visible
OTHERS = ("moreau-default",)
METHODS = (*BACKENDS, *PEERS, *OTHERS)
GRAD_TARGET = 1e-6
# the largest ratio of the default backend's time to the fastest peer's that meets the target
TIME_TARGETS = {"small": 0.8, "dense": 1.0}
FIELDS = (
    "size",
    "method",
    "batch",
    "n",
    "m",
    "p",
    "density",
    "status",
    "first_call_s",
    "fwd_ms",
    "bwd_ms",
    "fwd_bwd_ms",
    "fwd_bwd_min_ms",
    "peak_mem_mb",
    "x_err",
    "max_grad_err",
    "grad_err_all",
    *(f"grad_err_{k}" for k in INPUTS),
    "error",
)

BenchConfig = Any  # the flags dataclass of tasks/bench_qp.py


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------


def make_method(name: str, n: int, m: int, p: int) -> Callable[..., torch.Tensor]:
    """``f(Q, q, G, h, A, b) -> x (B, n)`` for a method name (constraints may be None)."""
    if name in BACKENDS:
        return lambda *a: qp(*a, backend=name)  # type: ignore[return-value]
    if name == "qpth-default":
        from qpth.qp import QPFunction

        def run_qpth(Q, q, G, h, A, b):
            if A is None:
                A = b = torch.Tensor().to(q)
            with one_thread():
                return QPFunction()(Q, q, G, h, A, b)

        return run_qpth
    if name == "proxsuite-default":
        from proxsuite.torch.qplayer import QPFunction as ProxQPFunction

        def run_proxsuite(Q, q, G, h, A, b):
            if A is None:
                A = b = torch.Tensor().to(q)
            with one_thread():
                return ProxQPFunction()(Q, q, A, b, G, torch.full_like(h, -1e20), h)[0]

        return run_proxsuite
    if name in RAW_CVXPYLAYERS:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        x = cp.Variable(n)
        F, qv = cp.Parameter((n, n)), cp.Parameter(n)
        params, cons = [F, qv], []
        if m:
            Gv, hv = cp.Parameter((m, n)), cp.Parameter(m)
            params += [Gv, hv]
            cons.append(Gv @ x <= hv)
        if p:
            Av, bv = cp.Parameter((p, n)), cp.Parameter(p)
            params += [Av, bv]
            cons.append(Av @ x == bv)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F @ x) + qv @ x), cons)
        layer = CvxpyLayer(prob, parameters=params, variables=[x], solver=RAW_CVXPYLAYERS[name])

        def run_cvxpylayers(Q, q, G, h, A, b):
            F = torch.linalg.cholesky(0.5 * (Q + Q.mT)).mT  # Q = F'F, differentiable
            args = [F, q] + ([G, h] if m else []) + ([A, b] if p else [])
            return layer(*args)[0]

        return run_cvxpylayers
    raise ValueError(f"unknown method {name!r}")


def available(name: str, n: int = 0, max_diffcp_n: int = 1 << 30) -> str | None:
    """None if the method can run here, else why not."""
    # every cvxpylayers method canonicalizes the (n, n) parameter F through CVXPY
    uses_cvxpy = name in RAW_CVXPYLAYERS or (
        name in BACKENDS and BACKENDS[name].kind == "cvxpylayers"
    )
    if uses_cvxpy and n > max_diffcp_n:
        gib = 3 * n**3 * 8 / 2**30
        return f"n={n} > --max-diffcp-n {max_diffcp_n} (canonicalization needs ~{gib:.0f} GiB)"
    need = {
        "qpth-default": "qpth",
        "proxsuite-default": "proxsuite",
        "cvxpylayers-default": "cvxpylayers",
        "moreau-default": "moreau",
    }.get(name)
    if name in BACKENDS:
        need = BACKENDS[name].needs
    try:
        importlib.import_module(need)  # type: ignore[arg-type]
    except ImportError:
        return f"{need} not installed"
    return None


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def measure(
    fn: Callable[..., torch.Tensor],
    data: dict[str, torch.Tensor | None],
    gx: torch.Tensor,
    cfg: BenchConfig,
) -> dict[str, Any]:
    """Time, memory and gradients of one method on one batch."""
    device = torch.device(cfg.device)

    def once() -> tuple[float, float, list[torch.Tensor | None], torch.Tensor]:
        ps = [
            None if v is None else v.detach().clone().to(device).requires_grad_()
            for v in data.values()
        ]
        sync(device)
        t0 = time.perf_counter()
        x = fn(*ps)
        sync(device)
        t1 = time.perf_counter()
        (x * gx.to(x)).sum().backward()
        sync(device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, [None if t is None else t.grad for t in ps], x.detach()

    t0 = time.perf_counter()
    once()
    first = time.perf_counter() - t0
    for _ in range(cfg.warmup - 1):
        once()
    repeats = cfg.repeats if first <= cfg.max_seconds else 1
    fwd, bwd = [], []
    grads: list[torch.Tensor | None] = []
    x = gx
    for _ in range(repeats):
        f, b, grads, x = once()
        fwd.append(f)
        bwd.append(b)
    mem = None
    if cfg.memory:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            once()
            mem = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            with PeakRSS() as peak:
                once()
            mem = peak.mb
    tot = [f + b for f, b in zip(fwd, bwd)]
    return {
        "first_call_s": first,
        "fwd_ms": 1e3 * statistics.median(fwd),
        "bwd_ms": 1e3 * statistics.median(bwd),
        "fwd_bwd_ms": 1e3 * statistics.median(tot),
        "fwd_bwd_min_ms": 1e3 * min(tot),
        "peak_mem_mb": mem,
        "grads": grads,
        "x": x.cpu(),
    }


def rel_error(
    a: torch.Tensor | None, b: torch.Tensor | None, floor: float = 1e-300
) -> float | None:
    """``|a - b| / max(|b|, floor)`` (Frobenius), ``a`` moved to ``b``'s CPU float64; None if
    either is None, inf if ``a`` holds NaN (so it fails every ``<=`` target)."""
    if a is None or b is None:
        return None
    a = a.detach().cpu().to(torch.float64)
    err = float((a - b).norm() / max(float(b.norm()), floor))
    return math.inf if math.isnan(err) else err


def grad_errors(grads: list[torch.Tensor | None], ref: Reference) -> dict[str, float | None]:
    """Relative error per input, and ``all`` for the six gradients stacked (NaN reads as inf,
    as in :func:`rel_error`). An input whose reference gradient is (near) zero -- ``x`` may not
    depend on it -- is measured against 1e-6 of the total gradient norm instead of its own."""
    refs = [ref.grads[k] for k in INPUTS]
    total = math.sqrt(sum(float(r.norm()) ** 2 for r in refs if r is not None))
    out: dict[str, float | None] = {
        k: rel_error(g, r, 1e-6 * total) for k, g, r in zip(INPUTS, grads, refs)
    }
    pairs = [(g, r) for g, r in zip(grads, refs) if g is not None and r is not None]
    diff = math.sqrt(sum(float((g.detach().cpu() - r).norm()) ** 2 for g, r in pairs))
    out["all"] = math.inf if math.isnan(diff) else diff / max(total, 1e-300)
    return out


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets per size: the default backend's gradient error <= ``GRAD_TARGET``, and its
    forward+backward time over the fastest peer's <= ``TIME_TARGETS[size]`` (1 by default)."""
    out: dict[str, Any] = {}
    for size in dict.fromkeys(r["size"] for r in rows):
        sel = {r["method"]: r for r in rows if r["size"] == size and r["status"] == "ok"}
        d = sel.get(DEFAULT_BACKEND)
        peers = {k: float(v["fwd_bwd_ms"]) for k, v in sel.items() if k in PEERS}
        entry: dict[str, Any] = {"default_backend": DEFAULT_BACKEND}
        if d is not None:
            err = _num(d.get("max_grad_err"))
            entry["default_grad_err"] = err
            entry["grad_target_met"] = err is not None and err <= GRAD_TARGET
            if peers:
                best = min(peers, key=peers.get)  # type: ignore[arg-type]
                entry["fastest_peer"] = best
                entry["time_ratio_vs_fastest_peer"] = float(d["fwd_bwd_ms"]) / peers[best]
                entry["time_target"] = TIME_TARGETS.get(size, 1.0)
                entry["time_target_met"] = (
                    entry["time_ratio_vs_fastest_peer"] <= entry["time_target"]
                )
            for k in OTHERS:
                if k in sel:
                    entry[f"time_ratio_vs_{k}"] = float(d["fwd_bwd_ms"]) / float(
                        sel[k]["fwd_bwd_ms"]
                    )
        fastest = min(sel, key=lambda k: float(sel[k]["fwd_bwd_ms"]), default=None)
        entry["fastest_method"] = fastest
        out[size] = entry
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Forward+backward time (forward part hatched) and max gradient error, per size."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(2, len(sizes), figsize=(4.5 * len(sizes), 7), squeeze=False)
    for j, size in enumerate(sizes):
        sel = [r for r in rows if r["size"] == size and r["status"] == "ok"]
        names = [r["method"] for r in sel]
        ypos = np.arange(len(sel))
        tot = [_num(r["fwd_bwd_ms"]) or 0.0 for r in sel]
        fwd = [_num(r["fwd_ms"]) or 0.0 for r in sel]
        colors = [
            "tab:red" if nm == DEFAULT_BACKEND else "tab:gray" if nm in PEERS else "tab:blue"
            for nm in names
        ]
        ax = axes[0, j]
        ax.barh(ypos, tot, color=colors)
        ax.barh(ypos, fwd, color="none", hatch="//", edgecolor="k", linewidth=0)
        ax.set_xscale("log")
        ax.set_yticks(ypos, names)
        ax.set_xlabel("forward+backward (ms), forward hatched")
        r0 = sel[0] if sel else {}
        dims = ", ".join(
            f"{k}={int(_num(r0.get(c)) or 0)}"
            for k, c in (("B", "batch"), ("n", "n"), ("m", "m"), ("p", "p"))
        )
        ax.set_title(f"{size}: {dims}")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax = axes[1, j]
        errs = [max(_num(r["max_grad_err"]) or 1e-17, 1e-17) for r in sel]
        ax.barh(ypos, errs, color=colors)
        ax.axvline(GRAD_TARGET, color="k", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yticks(ypos, names)
        ax.set_xlabel(f"max relative gradient error (dashed: {GRAD_TARGET:g})")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    set_up_torch(cfg.threads, cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(cfg))
    csv_path = out / "bench_qp.csv"
    done: set[tuple[str, str]] = set()
    if cfg.resume and csv_path.exists():
        done = {(str(r["size"]), str(r["method"])) for r in read_csv(csv_path)}
    elif csv_path.exists():
        csv_path.unlink()
    table = QUICK_SIZES if cfg.quick else SIZES
    todo = [(s, mt) for s in cfg.sizes for mt in cfg.methods if (s, mt) not in done]
    bar = tqdm(todo, desc="bench_qp", unit="point")
    refs: dict[str, tuple[dict[str, torch.Tensor | None], torch.Tensor, Reference]] = {}
    for size, method in bar:
        bar.set_postfix_str(f"{size} {method}")
        B, n, m, p, dens = table[size]
        if size not in refs:
            data = random_qp(B, n, m, p, density=dens, seed=cfg.seed)
            gx = torch.randn(
                B, n, generator=torch.Generator().manual_seed(cfg.seed + 1), dtype=torch.float64
            )
            refs[size] = (data, gx, reference(data, gx))
        data, gx, ref = refs[size]
        row: dict[str, Any] = {k: None for k in FIELDS}
        row.update(
            size=size, method=method, batch=B, n=n, m=m, p=p, density=dens, status="ok", error=""
        )
        why = available(method, n, cfg.max_diffcp_n)
        if why:
            row.update(status="skipped", error=why)
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = measure(make_method(method, n, m, p), data, gx, cfg)
                row.update({k: v for k, v in res.items() if k in FIELDS})
                errs = grad_errors(res["grads"], ref)
                for k in INPUTS:
                    row[f"grad_err_{k}"] = errs[k]
                present = [e for k, e in errs.items() if e is not None and k != "all"]
                row["max_grad_err"] = max(present) if present else None
                row["grad_err_all"] = errs["all"]
                row["x_err"] = rel_error(res["x"], ref.x)
            except Exception as err:  # a solver failure is a result, not a crash
                msg = next((ln for ln in str(err).splitlines() if ln.strip()), "")
                row.update(status="failed", error=f"{type(err).__name__}: {msg}"[:300])
        append_csv(csv_path, row)
    rows = read_csv(csv_path) if csv_path.exists() else []
    for size, (_, _, ref) in refs.items():
        if not ref.ok or ref.degenerate:
            warnings.warn(
                f"{size}: reference ok={ref.ok}, degenerate constraints {ref.degenerate}",
                stacklevel=1,
            )
    summary = {
        "machine": machine_info(cfg.device),
        "config": asdict(cfg),
        "sizes": {s: dict(zip(("batch", "n", "m", "p", "density"), table[s])) for s in cfg.sizes},
        "reference": {s: {"ok": r[2].ok, "degenerate": r[2].degenerate} for s, r in refs.items()},
        "targets": targets(rows),
        "rows": rows,
    }
    write_json(out / "bench_qp.json", summary)
    if rows:
        plot(rows, out / "bench_qp.png")
    for size, t in summary["targets"].items():
        print(f"{size}: {t}")
    return summary
