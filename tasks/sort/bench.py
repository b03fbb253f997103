"""Time and memory of the sort relaxations against n and batch size."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

if "ipykernel" not in sys.modules:  # scripts draw to files; notebooks keep their inline figures
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from layers import (
    LPBirkhoff,
    LPPermutahedron,
    LPTopK,
    NeuralSort,
    Sinkhorn,
    StochasticNeuralSort,
    soft_rank,
)
from tasks.common.bench import machine_info, sync
from tasks.common.cli import append_csv, set_up_torch, write_json
from tasks.common.plots import num as _num
from tasks.common.plots import read_csv

LP_METHODS = ("lp-topk", "lp-permutahedron", "soft-rank", "lp-birkhoff")
METHODS = (
    "torch.sort",
    "softmax",
    "neuralsort",
    "neuralsort-topk",
    "neuralsort-naive",
    "neuralsort-stochastic",
    "sinkhorn",
    *LP_METHODS,
    "torchsort",
)
# Rough peak memory of one forward+backward, in (batch, n, n) tensors, to skip sizes that
# cannot fit before trying them.
_NN_TENSORS = {
    "softmax": 3,
    "neuralsort": 3,
    "neuralsort-naive": 9,
    "neuralsort-stochastic": 3,
    "sinkhorn": 6,
    "lp-permutahedron": 6,
    "lp-birkhoff": 6,
}
FIELDS = (
    "method",
    "n",
    "batch",
    "k",
    "dtype",
    "device",
    "status",
    "fwd_ms",
    "fwd_bwd_ms",
    "fwd_bwd_min_ms",
    "first_call_s",
    "peak_mem_mb",
    "backend",
    "note",
)

BenchConfig = Any  # the flags dataclass of tasks/bench_sort.py


# ---------------------------------------------------------------------------------------------
# what is measured
# ---------------------------------------------------------------------------------------------


def _naive_neural_sort(s: torch.Tensor, tau: float) -> torch.Tensor:
    """The reference implementation's formula: explicit ``A_s`` and several n x n temporaries."""
    n = s.shape[-1]
    A = (s[..., :, None] - s[..., None, :]).abs()
    B = A @ torch.ones(n, n, dtype=s.dtype, device=s.device)
    scaling = n + 1 - 2 * torch.arange(1, n + 1, dtype=s.dtype, device=s.device)
    C = s[..., :, None] * scaling
    return torch.softmax((C - B).transpose(-1, -2) / tau, -1)


def make_op(
    method: str, cfg: BenchConfig, n: int, k: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str] | None:
    """``(op, output kind)`` with kind ``"matrix"`` (..., n, n) or ``"vector"`` (..., n)."""
    tau = cfg.tau
    if method == "torch.sort":
        return (lambda x: torch.sort(x, -1, descending=True).values), "vector"
    if method == "softmax":  # its input is a (batch, n, n) tensor, see ``inputs``
        return (lambda x: torch.softmax(x, -1)), "matrix"
    if method == "neuralsort":
        return NeuralSort(tau), "matrix"
    if method == "neuralsort-topk":
        m = NeuralSort(tau)
        return (lambda x: m.topk(x, k)), "vector"
    if method == "neuralsort-naive":
        return (lambda x: _naive_neural_sort(x, tau)), "matrix"
    if method == "neuralsort-stochastic":
        return StochasticNeuralSort(tau, num_samples=1), "matrix"
    if method == "sinkhorn":
        return Sinkhorn(tau, n_iters=cfg.sinkhorn_iters), "matrix"
    if method == "lp-topk":
        m = LPTopK(tau, backend=cfg.lp_backend)
        return (lambda x: m.topk(x, k)), "vector"
    if method == "lp-permutahedron":
        return LPPermutahedron(tau, backend=cfg.lp_backend), "matrix"
    if method == "soft-rank":
        return (lambda x: soft_rank(x, tau, backend=cfg.lp_backend)), "vector"
    if method == "lp-birkhoff":
        return LPBirkhoff(tau, backend=cfg.lp_backend), "matrix"
    if method == "torchsort":
        if importlib.util.find_spec("torchsort") is None:
            return None
        import torchsort

        return (lambda x: torchsort.soft_rank(x, regularization_strength=tau)), "vector"
    raise ValueError(method)


def skip_reason(method: str, cfg: BenchConfig, n: int, batch: int) -> str | None:
    if method in LP_METHODS and n > cfg.lp_max_n:
        return f"n > --lp-max-n {cfg.lp_max_n}"
    if method == "lp-birkhoff" and n > cfg.birkhoff_max_n:
        return f"n > --birkhoff-max-n {cfg.birkhoff_max_n}"
    item = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    per_nn = _NN_TENSORS.get(method, 0)
    need = per_nn * batch * n * n * item / 2**30
    if need > cfg.max_mem_gb:
        return f"needs ~{need:.1f} GB > --max-mem-gb {cfg.max_mem_gb}"
    return None


def inputs(
    method: str, n: int, batch: int, k: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct scores (or softmax logits) and the loss weights on the top-k part."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, n, n) if method == "softmax" else (batch, n)
    x = torch.randn(shape, generator=g, dtype=dtype).to(device)
    w = torch.randn(batch, n, generator=g, dtype=dtype).to(device)
    return x, w


def loss_of(out: torch.Tensor, kind: str, k: int, w: torch.Tensor) -> torch.Tensor:
    """A scalar that touches the top-k part: ``P_hat[..., :k, :]`` rows or the vector's entries."""
    if kind == "matrix":
        return (out[..., :k, :].sum(-2) * w).sum()
    return (out * w).sum()


def time_point(
    op: Callable, kind: str, x0: torch.Tensor, w: torch.Tensor, k: int, cfg: BenchConfig
) -> dict[str, Any]:
    device = x0.device
    fwd, both = [], []
    t_first = None
    for i in range(cfg.warmup + cfg.repeats):
        x = x0.clone().requires_grad_(True)
        sync(device)
        t0 = time.perf_counter()
        out = op(x)
        sync(device)
        t1 = time.perf_counter()
        loss_of(out, kind, k, w).backward()
        sync(device)
        t2 = time.perf_counter()
        if i == 0:
            t_first = t2 - t0
            if t_first > cfg.max_seconds:  # too slow to repeat
                fwd, both = [t1 - t0], [t2 - t0]
                break
        if i >= cfg.warmup:
            fwd.append(t1 - t0)
            both.append(t2 - t0)
    return {
        "fwd_ms": 1e3 * statistics.median(fwd),
        "fwd_bwd_ms": 1e3 * statistics.median(both),
        "fwd_bwd_min_ms": 1e3 * min(both),
        "first_call_s": t_first,
    }


def paired_ratio(cfg: BenchConfig, n: int, batch: int) -> dict[str, float]:
    """NeuralSort / softmax forward+backward time, the two runs alternated so that a change in
    machine load hits both: the median and the spread of the per-pair ratios."""
    dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)
    k = min(cfg.k, n)
    runs = []
    for method in ("neuralsort", "softmax"):
        op, kind = make_op(method, cfg, n, k)
        x0, w = inputs(method, n, batch, k, dtype, device, cfg.seed)
        runs.append((op, kind, x0, w))
    ratios = []
    for i in range(cfg.warmup + max(cfg.repeats, 10)):
        times = []
        for op, kind, x0, w in runs:
            x = x0.clone().requires_grad_(True)
            sync(device)
            t0 = time.perf_counter()
            loss_of(op(x), kind, k, w).backward()
            sync(device)
            times.append(time.perf_counter() - t0)
        if i >= cfg.warmup:
            ratios.append(times[0] / times[1])
    q = statistics.quantiles(ratios, n=4)
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "pairs": len(ratios)}


def peak_memory_mb(
    op: Callable, kind: str, x0: torch.Tensor, w: torch.Tensor, k: int
) -> float | None:
    """Torch memory allocated by one forward+backward above what existed before it."""
    x = x0.clone().requires_grad_(True)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        loss_of(op(x), kind, k, w).backward()
        torch.cuda.synchronize(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - base) / 2**20
    try:  # CPU: replay the profiler's allocation timeline (a private but stable API)
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action, MemoryProfile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss_of(op(x), kind, k, w).backward()
        current = peak = 0
        for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
            if action == Action.CREATE:
                current += size
            elif action == Action.DESTROY:
                current -= size
            peak = max(peak, current)
        return peak / 2**20
    except Exception as err:  # profiler internals moved
        warnings.warn(f"CPU peak memory unavailable: {err}", stacklevel=2)
        return None


# ---------------------------------------------------------------------------------------------
# sweep, summary, plot
# ---------------------------------------------------------------------------------------------


def _key(row: dict[str, Any]) -> tuple:
    return (
        row["method"],
        int(row["n"]),
        int(row["batch"]),
        row["dtype"],
        row["device"],
        row.get("backend", ""),
    )


def targets(
    rows: list[dict[str, Any]], cfg: BenchConfig, paired: dict[str, float] | None = None
) -> dict[str, Any]:
    """The issue's performance targets, from the rows measured in this folder (and the
    alternated NeuralSort / softmax runs, whose ratio decides the time target)."""
    by = {(r["method"], int(r["n"]), int(r["batch"])): r for r in rows if r["status"] == "ok"}
    out: dict[str, Any] = {}
    ns_, sm = by.get(("neuralsort", 100, 100)), by.get(("softmax", 100, 100))
    if ns_ and sm:
        ratio = _num(ns_["fwd_bwd_ms"]) / _num(sm["fwd_bwd_ms"])
        ratio_min = _num(ns_["fwd_bwd_min_ms"]) / _num(sm["fwd_bwd_min_ms"])
        out["neuralsort_vs_softmax_100x100"] = {
            "neuralsort_ms": _num(ns_["fwd_bwd_ms"]),
            "softmax_ms": _num(sm["fwd_bwd_ms"]),
            "ratio_median": ratio,
            "ratio_min": ratio_min,
            "ratio_paired": paired,
            "target": "<= 3",
            "met": (paired["median"] if paired else ratio) <= 3,
        }
    big = by.get(("neuralsort", 1024, 128))
    if big and _num(big["peak_mem_mb"]) is not None:
        naive = by.get(("neuralsort-naive", 1024, 128))
        out["neuralsort_memory_128x1024"] = {
            "peak_mem_mb": _num(big["peak_mem_mb"]),
            "naive_peak_mem_mb": _num(naive["peak_mem_mb"]) if naive else None,
            "dtype": big["dtype"],
            "target": "< 2048 MB (float32)",
            "met": _num(big["peak_mem_mb"]) < 2048,
        }
    out["lp_cost"] = [
        {
            k: r[k]
            for k in ("method", "backend", "n", "batch", "fwd_ms", "fwd_bwd_ms", "first_call_s")
        }
        for r in rows
        if r["method"] in LP_METHODS and int(r["n"]) in (16, 100) and r["status"] == "ok"
    ]
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    batches = sorted({int(r["batch"]) for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    ns = sorted({int(r["n"]) for r in rows})
    colors = plt.get_cmap("tab20")
    fig, axes = plt.subplots(2, len(batches), figsize=(4.5 * len(batches) + 1, 8), squeeze=False)
    for j, b in enumerate(batches):
        for i, (key, label) in enumerate(
            [("fwd_bwd_ms", "forward+backward (ms)"), ("peak_mem_mb", "peak memory (MB)")]
        ):
            ax = axes[i][j]
            for c, m in enumerate(methods):
                pts = sorted(
                    (int(r["n"]), _num(r[key]))
                    for r in rows
                    if r["method"] == m and int(r["batch"]) == b and _num(r[key]) is not None
                )
                pts = [(n, v) for n, v in pts if v > 0]
                if pts:
                    ref = m in ("torch.sort", "softmax", "torchsort", "neuralsort-naive")
                    ax.plot(
                        *zip(*pts),
                        "--" if ref else "-",
                        marker="o",
                        ms=3,
                        label=m,
                        color=colors(c % 20),
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
            ax.set_xlabel("n (items)")
            ax.set_ylabel(label)
            ax.set_title(f"batch {b}")
            ax.grid(True, which="major", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:  # every method that appears in some panel, once
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg) -> dict[str, Any]:
    set_up_torch(cfg.threads, cfg.device)
    # moreau rebuilds its batch solver when the batch size changes; expected here
    warnings.filterwarnings("ignore", message="Batch size has changed")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(cfg))
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    csv_path = out / "bench_sort.csv"
    if csv_path.exists() and not cfg.resume:
        csv_path.unlink()
    done = {_key(r) for r in read_csv(csv_path)} if csv_path.exists() else set()

    points = [(m, b, n) for m in cfg.methods for b in cfg.batches for n in sorted(cfg.ns)]
    too_slow: set[tuple[str, int]] = set()
    bar = tqdm(points, desc="bench_sort", disable=not cfg.progress)
    for method, batch, n in bar:
        bar.set_postfix_str(f"{method} b={batch} n={n}")
        k = min(cfg.k, n)
        row: dict[str, Any] = dict.fromkeys(FIELDS, "")
        row.update(method=method, n=n, batch=batch, k=k, dtype=cfg.dtype, device=cfg.device)
        row["backend"] = cfg.lp_backend if method in LP_METHODS else ""
        if _key(row) in done:
            continue
        reason = skip_reason(method, cfg, n, batch)
        if (method, batch) in too_slow:
            reason = f"a smaller n took > --max-seconds {cfg.max_seconds}"
        made = None if reason else make_op(method, cfg, n, k)
        if made is None:
            row.update(status="skipped", note=reason or "not installed")
            append_csv(csv_path, row)
            continue
        op, kind = made
        x0, w = inputs(method, n, batch, k, dtype, device, cfg.seed)
        try:
            row.update(time_point(op, kind, x0, w, k, cfg), status="ok")
            if cfg.memory:
                mem = peak_memory_mb(op, kind, x0, w, k)
                row["peak_mem_mb"] = "" if mem is None else mem
        except (RuntimeError, MemoryError) as err:  # out of memory, solver failure
            row.update(status="failed", note=f"{type(err).__name__}: {str(err)[:160]}")
            too_slow.add((method, batch))
        if _num(row["first_call_s"]) and row["first_call_s"] > cfg.max_seconds:
            too_slow.add((method, batch))
        append_csv(csv_path, row)
        del x0, w
        if device.type == "cuda":
            torch.cuda.empty_cache()

    paired = None
    if {"neuralsort", "softmax"} <= set(cfg.methods) and 100 in cfg.ns and 100 in cfg.batches:
        paired = paired_ratio(cfg, 100, 100)

    rows = read_csv(csv_path)
    for r in rows:  # CSV gives floats back; keep the keys plain
        r["n"], r["batch"] = int(r["n"]), int(r["batch"])
    result = {
        "meta": {
            **machine_info(cfg.device),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "config": asdict(cfg),
        "targets": targets(rows, cfg, paired),
        "records": rows,
    }
    write_json(out / "bench_sort.json", result)
    plot(rows, out / "bench_sort.png")
    print(json.dumps(result["targets"], indent=2, default=str))
    print(f"wrote {out / 'bench_sort.json'}, {out / 'bench_sort.csv'}, {out / 'bench_sort.png'}")
    return result
