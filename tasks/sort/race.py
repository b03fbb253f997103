"""The LP sort relaxations raced side by side: the native solvers, the CVXPY path (the previous
default backend), torchsort and diffsort (when installed), with NeuralSort beside them.

Every method runs forward + backward on the same scores (batch x n, float32), all methods of one
n interleaved within each repeat so that a change in machine load hits them alike. A method whose
first call exceeds ``--max-seconds`` is not timed again, nor at larger n.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from layers import (
    lp_birkhoff_sort,
    lp_permutahedron_sort,
    lp_topk,
    neural_sort,
    soft_rank,
    soft_sort,
)
from tasks.common.bench import machine_info
from tasks.common.cli import set_up_torch, write_csv, write_json
from tasks.common.plots import plt
from tasks.sort.bench import peak_memory_mb

FIELDS = (
    "method",
    "family",
    "peer",
    "n",
    "batch",
    "status",
    "fwd_bwd_ms",
    "fwd_bwd_min_ms",
    "first_call_s",
    "note",
)
Op = tuple[Callable[[torch.Tensor], torch.Tensor], str]  # (op, "vector" | "matrix")


def race_ops(n: int, k: int, tau: float, cvxpy_backend: str) -> dict[str, tuple[str, Op]]:
    """``name -> (family, (op, kind))`` for one n. ``family`` groups a relaxation with its
    peers (the ratios compare within a family)."""
    ops: dict[str, tuple[str, Op]] = {}
    for b in ("native", cvxpy_backend):
        ops[f"soft_sort ({b})"] = ("soft_sort", (partial(soft_sort, **_kw(tau, b)), "vector"))
        ops[f"soft_rank ({b})"] = ("soft_rank", (partial(soft_rank, **_kw(tau, b)), "vector"))
        topk = partial(lp_topk, k=k, **_kw(tau, b))
        ops[f"lp_topk ({b})"] = ("lp_topk", (topk, "vector"))
        perm = partial(lp_permutahedron_sort, **_kw(tau, b))
        ops[f"lp_permutahedron_sort ({b})"] = ("matrix", (perm, "matrix"))
        birk = partial(lp_birkhoff_sort, **_kw(tau, b))
        ops[f"lp_birkhoff_sort ({b})"] = ("matrix", (birk, "matrix"))
    if importlib.util.find_spec("torchsort") is not None:
        import torchsort

        ts_sort = partial(torchsort.soft_sort, regularization_strength=tau)
        ts_rank = partial(torchsort.soft_rank, regularization_strength=tau)
        ops["torchsort.soft_sort"] = ("soft_sort", (ts_sort, "vector"))
        ops["torchsort.soft_rank"] = ("soft_rank", (ts_rank, "vector"))
    if importlib.util.find_spec("diffsort") is not None:
        from diffsort import DiffSortNet

        net = DiffSortNet("bitonic", n, steepness=2 * n)
        # diffsort sorts ascending; flip to rows = ranks in descending order, as the others
        ops["diffsort (bitonic)"] = ("matrix", (lambda x: net(x)[1].mT.flip(-2), "matrix"))
    ops["neuralsort"] = ("matrix", (partial(neural_sort, tau=tau), "matrix"))
    return ops


def _kw(tau: float, backend: str) -> dict[str, Any]:
    return {"regularization_strength": tau, "backend": backend}


PEERS = ("torchsort.soft_sort", "torchsort.soft_rank", "diffsort (bitonic)", "neuralsort")


def _loss(out: torch.Tensor, kind: str, k: int, w: torch.Tensor) -> torch.Tensor:
    return ((out[..., :k, :].sum(-2) if kind == "matrix" else out) * w).sum()


def _skip(name: str, n: int, cfg: Any) -> str | None:
    """Sizes a method cannot reach here, said before trying them."""
    native = "(native)" in name
    if "lp_birkhoff_sort" in name and n > (
        cfg.native_birkhoff_max_n if native else cfg.cvxpy_birkhoff_max_n
    ):
        return "n^2 variables per element"
    if not native and "(" in name and "diffsort" not in name and n > cfg.cvxpy_max_n:
        return f"n > --cvxpy-max-n {cfg.cvxpy_max_n}"
    if name.startswith("diffsort") and n > cfg.diffsort_max_n:
        return f"O(n^3) per network layer; n > --diffsort-max-n {cfg.diffsort_max_n}"
    return None


def race(cfg: Any) -> dict[str, Any]:
    """Run the race for ``cfg.ns`` at ``cfg.race_batch``; writes race.{csv,json,png} to cfg.out."""
    set_up_torch(cfg.threads, "cpu")
    warnings.filterwarnings("ignore", message="Batch size has changed")  # moreau, expected
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(cfg))
    rows: list[dict[str, Any]] = []
    slow: set[str] = set()
    for n in tqdm(sorted(cfg.race_ns), desc="race", disable=not cfg.progress):
        k = min(cfg.k, n)
        g = torch.Generator().manual_seed(cfg.seed)
        x0 = torch.randn(cfg.race_batch, n, generator=g)
        w = torch.randn(cfg.race_batch, n, generator=g)
        ops = race_ops(n, k, cfg.tau, cfg.race_cvxpy_backend)
        times: dict[str, list[float]] = {m: [] for m in ops}
        first: dict[str, float] = {}
        notes = {m: _skip(m, n, cfg) for m in ops}
        notes.update({m: "slower than --max-seconds at a smaller n" for m in ops if m in slow})
        for rep in range(cfg.warmup + cfg.repeats):
            for m, (_, (op, kind)) in ops.items():
                if notes[m] or (m in first and first[m] > cfg.max_seconds):
                    continue
                x = x0.clone().requires_grad_(True)
                t0 = time.perf_counter()
                _loss(op(x), kind, k, w).backward()
                dt = time.perf_counter() - t0
                if rep == 0:
                    first[m] = dt
                    if dt > cfg.max_seconds:
                        slow.add(m)
                        times[m].append(dt)
                elif rep >= cfg.warmup:
                    times[m].append(dt)
        for m, (family, _) in ops.items():
            row = dict.fromkeys(FIELDS, "")
            row.update(method=m, family=family, peer=m in PEERS, n=n, batch=cfg.race_batch)
            if notes[m]:
                row.update(status="skipped", note=notes[m])
            else:
                row.update(
                    status="ok",
                    fwd_bwd_ms=1e3 * statistics.median(times[m]),
                    fwd_bwd_min_ms=1e3 * min(times[m]),
                    first_call_s=first[m],
                )
            rows.append(row)
    memory = None
    if cfg.race_memory:
        op = partial(lp_permutahedron_sort, **_kw(cfg.tau, "native"))
        mb = peak_memory_mb(op, "matrix", torch.randn(128, 1024), torch.randn(128, 1024), 5)
        memory = {
            "method": "lp_permutahedron_sort (native)",
            "batch": 128,
            "n": 1024,
            "dtype": "float32",
            "peak_mem_mb": mb,
            "target_mb": 2048,
        }
    meta = {**machine_info("cpu"), "torch": torch.__version__, "time": time.strftime("%F %T")}
    result = {
        "meta": meta,
        "config": asdict(cfg),
        "ratios": ratios(rows),
        "memory": memory,
        "rows": rows,
    }
    write_csv(out / "race.csv", rows)
    write_json(out / "race.json", result)
    plot_race(rows, out / "race.png")
    print(table(rows))
    print(f"wrote {out / 'race.json'}, {out / 'race.csv'}, {out / 'race.png'}")
    return result


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each native relaxation's time over its reference: torchsort for the vector maps
    (``lp_topk`` against ``torchsort.soft_rank``), NeuralSort for the matrices."""
    ms = {(r["method"], r["n"]): r["fwd_bwd_ms"] for r in rows if r["status"] == "ok"}
    pairs = [
        ("soft_sort (native)", "torchsort.soft_sort"),
        ("soft_rank (native)", "torchsort.soft_rank"),
        ("lp_topk (native)", "torchsort.soft_rank"),
        ("lp_permutahedron_sort (native)", "neuralsort"),
        ("lp_birkhoff_sort (native)", "neuralsort"),
    ]
    out = []
    for n in sorted({r["n"] for r in rows}):
        for m, ref in pairs:
            if (m, n) in ms and (ref, n) in ms:
                out.append({"method": m, "reference": ref, "n": n, "ratio": ms[m, n] / ms[ref, n]})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: method x n, forward+backward ms (or why skipped)."""
    ns = sorted({r["n"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {
        (r["method"], r["n"]): f"{r['fwd_bwd_ms']:.2f}" if r["status"] == "ok" else "-"
        for r in rows
    }
    lines = [
        "| method | " + " | ".join(f"n = {n}" for n in ns) + " |",
        "|---" * (len(ns) + 1) + "|",
    ]
    lines += [f"| {m} | " + " | ".join(cell.get((m, n), "-") for n in ns) + " |" for m in methods]
    return "\n".join(lines)


def plot_race(rows: list[dict[str, Any]], path: Path) -> None:
    """Time against n, one panel per family, peers dashed."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 4), squeeze=False)
    for ax, fam in zip(axes[0], families):
        for m in dict.fromkeys(r["method"] for r in rows if r["family"] == fam):
            pts = [
                (r["n"], r["fwd_bwd_ms"]) for r in rows if r["method"] == m and r["status"] == "ok"
            ]
            if pts:
                peer = m in PEERS
                ax.plot(*zip(*pts), "--" if peer else "-", marker="o", ms=3, label=m)
        ax.set(xscale="log", yscale="log", xlabel="n (items)", title=fam)
        ax.set_ylabel("forward+backward (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
