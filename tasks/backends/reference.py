"""Random QPs and the independent reference solver for QP gradients.

The reference shares no code with the layers: Clarabel (tolerances 1e-10, called directly) finds
each element's active set, a few exchanges polish it, then the equality-constrained KKT system of
that active set is solved exactly (LU, float64) for ``x`` and for the adjoint, which gives the
gradients with respect to ``Q, q, G, h, A, b`` in closed form (OptNet, eqs. 6-8).

Benchmarks (``tasks/bench_qp.py``, ``tasks/compare_backends.py``) and the library tests use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Reference", "random_qp", "reference"]


def _sparse_like(shape: tuple[int, ...], density: float, g: torch.Generator) -> torch.Tensor:
    """Gaussian entries, each kept with probability ``density``, at least one per row."""
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if density >= 1:
        return x
    keep = torch.rand(shape, generator=g, dtype=torch.float64) < density
    col = torch.randint(shape[-1], shape[:-1], generator=g)
    keep.scatter_(-1, col.unsqueeze(-1), True)
    return x * keep


def random_qp(
    batch: int, n: int, m: int, p: int, *, density: float = 1.0, seed: int = 0
) -> dict[str, torch.Tensor | None]:
    """A batch of random feasible, strictly convex QPs (float64).

    ``Q = F F'/n + 0.1 I`` (``F`` with the given density), ``q ~ N(0, I)``, ``G`` and ``A`` with
    the given density (a sparse ``A`` plus the first ``p`` rows of the identity, so it has full
    row rank and the equality duals, hence the gradients for ``A, b``, are unique), and
    ``h = G z0 + s0`` (``s0 ~ U(0, 1)``), ``b = A z0`` for a random ``z0``, so ``z0`` is
    feasible. Returns a dict with keys ``Q, q, G, h, A, b`` (``G, h`` or
    ``A, b`` None when ``m`` or ``p`` is 0).
    """
    g = torch.Generator().manual_seed(seed)
    F = _sparse_like((batch, n, n), density, g)
    Q = F @ F.mT / max(1.0, n * density) + 0.1 * torch.eye(n, dtype=torch.float64)
    q = torch.randn(batch, n, generator=g, dtype=torch.float64)
    z0 = torch.randn(batch, n, generator=g, dtype=torch.float64)
    out: dict[str, torch.Tensor | None] = {
        "Q": Q,
        "q": q,
        "G": None,
        "h": None,
        "A": None,
        "b": None,
    }
    if m:
        G = _sparse_like((batch, m, n), density, g)
        out["G"] = G
        out["h"] = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(
            batch, m, generator=g, dtype=torch.float64
        )
    if p:
        A = _sparse_like((batch, p, n), density, g)
        if density < 1:  # keep a sparse A full row rank: add the identity's first p rows
            A = A + torch.eye(p, n, dtype=torch.float64)
        out["A"], out["b"] = A, (A @ z0.unsqueeze(-1)).squeeze(-1)
    return out


@dataclass
class Reference:
    """The reference solution and gradients for one batch (float64, CPU)."""

    x: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    ok: bool  # every element's active-set solution is primal and dual feasible
    degenerate: int  # constraints with both multiplier and slack below 1e-7


def _kkt_solve(K: torch.Tensor, rhs: torch.Tensor, n: int) -> torch.Tensor:
    """Solve the KKT system ``K`` (``n`` primal rows first) by LU. A singular ``K`` (redundant
    active constraints, hence non-unique multipliers: 2-D TV, whose grid has cycles) is solved
    with ``-delta I`` on the multiplier block plus iterative refinement: the primal part is the
    unique one, the multipliers one of the valid choices."""
    try:
        return torch.linalg.solve(K, rhs)
    except torch.linalg.LinAlgError:
        pass
    delta = 1e-10 * float(K.abs().max())
    Kr = K.clone()
    idx = torch.arange(n, K.shape[0])
    Kr[idx, idx] -= delta
    lu = torch.linalg.lu_factor(Kr)
    sol = torch.linalg.lu_solve(*lu, rhs.unsqueeze(-1)).squeeze(-1)
    for _ in range(10):  # refine towards a solution of the singular (consistent) system
        sol = sol + torch.linalg.lu_solve(*lu, (rhs - K @ sol).unsqueeze(-1)).squeeze(-1)
    return sol


def reference(data: dict[str, torch.Tensor | None], gx: torch.Tensor) -> Reference:
    """Clarabel's active set per element, then the exact KKT solves (see the module docstring)."""
    import clarabel
    import scipy.sparse as sp

    Q, q = data["Q"], data["q"]
    assert Q is not None and q is not None
    B, n = q.shape
    G, h, A, b = data["G"], data["h"], data["A"], data["b"]
    m = 0 if G is None else G.shape[1]
    p = 0 if A is None else A.shape[1]
    xs, ok, degenerate = [], True, 0
    grads: dict[str, torch.Tensor | None] = {
        k: (None if v is None else torch.zeros_like(v)) for k, v in data.items()
    }

    def clarabel_settings(tol: float) -> Any:
        st = clarabel.DefaultSettings()
        st.verbose = False
        for k in ("tol_gap_abs", "tol_gap_rel", "tol_feas"):
            setattr(st, k, tol)
        st.tol_ktratio = min(1e-6, 100 * tol)
        st.max_iter = 500
        return st

    for i in range(B):
        Qi = 0.5 * (Q[i] + Q[i].T)
        rows = ([A[i]] if p else []) + ([G[i]] if m else [])  # type: ignore[index]
        rhs = ([b[i]] if p else []) + ([h[i]] if m else [])  # type: ignore[index]
        cones = ([clarabel.ZeroConeT(p)] if p else []) + (
            [clarabel.NonnegativeConeT(m)] if m else []
        )
        C = torch.cat(rows).numpy() if rows else np.zeros((0, n))
        d = torch.cat(rhs).numpy() if rhs else np.zeros(0)
        # Clarabel only has to find the active set, which needs moderate accuracy; at 1e-12 it
        # sometimes stalls with an inaccurate answer, so fall back to looser tolerances.
        for tol in (1e-10, 1e-8):
            sol = clarabel.DefaultSolver(
                sp.triu(sp.csc_matrix(Qi.numpy())).tocsc(),
                q[i].numpy(),
                sp.csc_matrix(C),
                d,
                cones,
                clarabel_settings(tol),
            ).solve()
            if str(sol.status) == "Solved":
                break
        z = torch.as_tensor(np.asarray(sol.z))
        if m:
            lam = z[p:]
            slack = h[i] - G[i] @ torch.as_tensor(np.asarray(sol.x))  # type: ignore[index]
            act = lam > slack
            degenerate += int(((lam.abs() < 1e-7) & (slack.abs() < 1e-7)).sum())
        else:
            act = torch.zeros(0, dtype=torch.bool)
        # Polish the active set (at most 50 exchanges): drop constraints whose multiplier comes
        # out negative, add violated ones, until the KKT point of the active set is optimal.
        # Near-degenerate constraints that Clarabel's tolerance cannot place are settled here.
        for _ in range(50):
            Ga = G[i][act] if m else Q.new_zeros(0, n)  # type: ignore[index]
            Cm = torch.cat([Ga] + ([A[i]] if p else []))  # type: ignore[index]
            k, r = Ga.shape[0], Cm.shape[0]
            K = torch.zeros(n + r, n + r, dtype=torch.float64)
            K[:n, :n], K[:n, n:], K[n:, :n] = Qi, Cm.T, Cm
            rhs_p = torch.cat(
                [
                    -q[i],
                    h[i][act] if m else q.new_zeros(0),  # type: ignore[index]
                    b[i] if p else q.new_zeros(0),
                ]
            )  # type: ignore[index]
            sol_p = _kkt_solve(K, rhs_p, n)
            x, y = sol_p[:n], sol_p[n:]
            lam_a, nu = y[:k], y[k:]
            if not m:
                break
            lam_max = float(lam_a.abs().max()) if k else 0.0
            scale = 1e-12 * (1.0 + float(h[i].abs().max()) + lam_max)  # type: ignore[index]
            full = torch.zeros(m, dtype=torch.float64)
            full[act] = lam_a
            viol = (h[i] - G[i] @ x) < -scale  # type: ignore[index]
            drop = act & (full < -scale)
            if not (viol.any() or drop.any()):
                break
            act = (act & ~drop) | (viol & ~act)
        adj = _kkt_solve(K, torch.cat([-gx[i], q.new_zeros(r)]), n)
        dx, dla, dnu = adj[:n], adj[n : n + k], adj[n + k :]
        grads["Q"][i] = 0.5 * (torch.outer(dx, x) + torch.outer(x, dx))  # type: ignore[index]
        grads["q"][i] = dx  # type: ignore[index]
        if m:
            gG = torch.zeros(m, n, dtype=torch.float64)
            gG[act] = torch.outer(lam_a, dx) + torch.outer(dla, x)
            gh = torch.zeros(m, dtype=torch.float64)
            gh[act] = -dla
            grads["G"][i], grads["h"][i] = gG, gh  # type: ignore[index]
            inactive_slack = (h[i] - G[i] @ x)[~act]  # type: ignore[index]
            ok &= bool((lam_a >= -1e-9).all()) and bool((inactive_slack >= -1e-9).all())
        if p:
            grads["A"][i] = torch.outer(nu, dx) + torch.outer(dnu, x)  # type: ignore[index]
            grads["b"][i] = -dnu  # type: ignore[index]
        xs.append(x)
    return Reference(torch.stack(xs), grads, ok, degenerate)
