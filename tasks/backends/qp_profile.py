"""Where the default QP backend's time goes, against what this machine's kernels allow.

For each size of ``tasks/bench_qp.py``: the forward and backward time of ``qp`` (torch-ipm,
every input requiring grad; median of ``--repeats``), the interior point's iterations, the
operators taking the most time in one forward + backward (``torch.profiler``, self time), and
the rates of the kernels an iteration is made of, timed alone on the same shapes: the batched
matrix product that forms ``Q + G'DG``, the Cholesky factorization (``layers._batched.Cholesky``),
a solve with it, and a matrix-vector product with ``G``. Their sum per iteration times the
iterations is the floor of the batched method on this machine. On the CPU the default path is
the compiled per-element loop (``layers._qp_kernel``; the torch profiler sees it as the self
time of ``_IPMFunction``): its floor is one factorization of the reduced matrix (``dsyrk`` +
``dpotrf`` on one element, timed alone) per element and iteration.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layers import qp, solve_qp
from layers._batched import Cholesky
from tasks.backends.qp_bench import QUICK_SIZES, SIZES
from tasks.backends.reference import random_qp
from tasks.common.bench import machine_info
from tasks.common.cli import atomic_write_text, set_up_torch, write_json

F64 = torch.float64


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernel_rates(B: int, n: int, m: int, repeats: int) -> dict[str, float]:
    """Milliseconds of each kernel of one interior-point iteration at these shapes, and the
    matrix product's GFLOP/s."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(B, m, n, dtype=F64, generator=g)
    d = torch.rand(B, m, 1, dtype=F64, generator=g)
    Q = torch.eye(n, dtype=F64).expand(B, n, n).contiguous()
    H = torch.baddbmm(Q, G.mT, d * G)
    v = torch.randn(B, n, 1, dtype=F64, generator=g)
    chol = Cholesky(H)
    out = {
        "form_H_ms": _median_ms(lambda: torch.baddbmm(Q, G.mT, d * G), repeats),
        "cholesky_ms": _median_ms(lambda: Cholesky(H), repeats),
        "solve_ms": _median_ms(lambda: chol.solve(v), repeats),
        "matvec_G_ms": _median_ms(lambda: torch.bmm(G, v), repeats),
    }
    gemm = _median_ms(lambda: torch.bmm(G.mT.contiguous(), G), repeats)
    out["gemm_gflops"] = 2 * B * m * n * n / (gemm * 1e-3) / 1e9
    out["matvec_G_gbytes_per_s"] = B * m * n * 8 / (out["matvec_G_ms"] * 1e-3) / 1e9
    return out


def compiled_rates(n: int, m: int, repeats: int) -> dict[str, float]:
    """Milliseconds of one element's reduced-matrix factorization in the compiled loop
    (``Q + G'DG``: ``dsyrk`` then ``dpotrf``, BLAS on one thread) and its GFLOP/s, or {}
    without numba."""
    from layers import qp_ipm

    kernel = qp_ipm._qp_kernel()
    if kernel is None or m == 0:
        return {}
    rng = np.random.default_rng(0)
    G, d = rng.standard_normal((m, n)), rng.random(m) + 0.1
    Q, L, W = np.eye(n), np.empty((n, n)), np.empty((m, n))
    calls = 200

    def factorize() -> None:
        for _ in range(calls):
            kernel._reduced_matrix(Q, G, d, 1e-11, L, W)

    with kernel.one_blas_thread():
        ms = _median_ms(factorize, repeats) / calls
    flops = m * n * (n + 1) + n**3 / 3
    return {"factor_ms": ms, "factor_gflops": flops / (ms * 1e-3) / 1e9}


def profile_size(size: str, quick: bool, repeats: int, top: int) -> dict[str, Any]:
    """Timing, iterations, the top operators and the kernel rates for one size."""
    B, n, m, p, dens = (QUICK_SIZES if quick else SIZES)[size]
    data = random_qp(B, n, m, p, density=dens, seed=0)
    w = torch.randn(B, n, dtype=F64, generator=torch.Generator().manual_seed(1))

    def forward_backward() -> tuple[float, float]:
        inputs = [None if t is None else t.clone().requires_grad_() for t in data.values()]
        t0 = time.perf_counter()
        x = qp(*inputs)
        t1 = time.perf_counter()
        (x * w).sum().backward()
        return t1 - t0, time.perf_counter() - t1

    forward_backward()
    runs = [forward_backward() for _ in range(repeats)]
    info = solve_qp(*data.values()).info
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        forward_backward()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    rates = kernel_rates(B, n, m, repeats)
    # one iteration: form H and factorize it once; two solves (predictor, corrector) and
    # about nine products with G or Q (residuals, right-hand sides, refinement)
    per_iter = rates["form_H_ms"] + rates["cholesky_ms"] + 2 * rates["solve_ms"]
    per_iter += 9 * rates["matvec_G_ms"]
    compiled = compiled_rates(n - p, m, repeats)  # equalities are eliminated first
    return {
        "size": size,
        "batch": B,
        "n": n,
        "m": m,
        "p": p,
        "forward_ms": 1e3 * statistics.median(r[0] for r in runs),
        "backward_ms": 1e3 * statistics.median(r[1] for r in runs),
        "iterations": info.iterations,
        "top_ops": [
            {
                "name": e.key,
                "calls": e.count,
                "self_ms": e.self_cpu_time_total / 1e3,
                "share": e.self_cpu_time_total / max(total, 1),
            }
            for e in ops[:top]
        ],
        "kernels": rates,
        "floor_per_iteration_ms": per_iter,
        "floor_forward_ms": per_iter * info.iterations,
        "compiled": compiled,
        "compiled_floor_forward_ms": (
            B * info.iterations * compiled["factor_ms"] if compiled else None
        ),
    }


def report(rows: list[dict[str, Any]]) -> str:
    """The profile as a Markdown page."""
    lines = ["# Where torch-ipm's time goes (`python tasks/profile_qp.py`)", ""]
    for r in rows:
        k = r["kernels"]
        lines += [
            f"## {r['size']}: batch {r['batch']}, n {r['n']}, m {r['m']}, p {r['p']}",
            "",
            f"forward {r['forward_ms']:.1f} ms, backward {r['backward_ms']:.1f} ms, "
            f"{r['iterations']} iterations. Kernels at these shapes: form Q + G'DG "
            f"{k['form_H_ms']:.2f} ms (gemm {k['gemm_gflops']:.0f} GFLOP/s), Cholesky "
            f"{k['cholesky_ms']:.2f} ms, a solve {k['solve_ms']:.2f} ms, G times a vector "
            f"{k['matvec_G_ms']:.2f} ms ({k['matvec_G_gbytes_per_s']:.1f} GB/s). Floor: "
            f"{r['floor_per_iteration_ms']:.1f} ms per iteration, "
            f"{r['floor_forward_ms']:.0f} ms for the forward (batched solver).",
            "",
        ]
        if r.get("compiled"):
            c = r["compiled"]
            lines += [
                f"Compiled per-element loop (the CPU default): one element's factorization "
                f"(dsyrk + dpotrf) {1e3 * c['factor_ms']:.1f} us "
                f"({c['factor_gflops']:.0f} GFLOP/s); floor {r['compiled_floor_forward_ms']:.0f} "
                f"ms for the forward (batch x iterations x one factorization).",
                "",
            ]
        lines += [
            "| operator | calls | self ms | share |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{o['name']}` | {o['calls']} | {o['self_ms']:.1f} | {100 * o['share']:.0f} % |"
            for o in r["top_ops"]
        ]
        lines.append("")
    return "\n".join(lines)


def run(cfg: Any) -> dict[str, Any]:
    set_up_torch(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [profile_size(s, cfg.quick, cfg.repeats, cfg.top) for s in cfg.sizes]
    result = {"machine": machine_info("cpu"), "config": asdict(cfg), "sizes": rows}
    write_json(out / "profile.json", result)
    atomic_write_text(out / "profile.md", report(rows))
    print(report(rows))
    return result
