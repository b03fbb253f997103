"""The interior point of :mod:`layers.qp_ipm`, one problem at a time, compiled by numba.

The batched solver streams every operand of the whole batch through memory on each of its
dozens of products per iteration; for dense problems (n = m = 128, batch 128: 16 MB an operand)
that traffic, not arithmetic, is its cost. This loop solves the elements one after the other,
so each element's matrices stay in cache through all its iterations. It runs the same method
on the same scaled data (Mehrotra's predictor-corrector from the CVXOPT starting point, the cap
on ``lam/s`` with one refinement step when it binds, 0.999 of the step to the boundary, the
same merit), for inequality-constrained problems (``solve_qp`` eliminates equalities first).
It has no stall detection or best-iterate bookkeeping: :mod:`layers.qp_ipm` solves the
elements it leaves unsolved again with the batched code, which has them. Imported lazily, on
the first CPU solve, and only when numba is installed.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _chol_solve(L: np.ndarray, r: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """``(L L')^-1 r`` for a lower-triangular ``L`` (row-major; both sweeps read rows)."""
    n = L.shape[0]
    y = r.copy()
    for i in range(n):
        acc = y[i]
        for k in range(i):
            acc -= L[i, k] * y[k]
        y[i] = acc / L[i, i]
    for i in range(n - 1, -1, -1):
        y[i] /= L[i, i]
        yi = y[i]
        for k in range(i):
            y[k] -= L[i, k] * yi
    return y


@numba.njit(cache=True, nogil=True)
def _max_step(v: np.ndarray, dv: np.ndarray) -> float:  # pragma: no cover - compiled
    """The largest ``a <= 1e30`` with ``v + a dv >= 0`` (``v > 0``)."""
    a = 1e30
    for i in range(v.shape[0]):
        if dv[i] < 0:
            t = -v[i] / dv[i]
            if t < a:
                a = t
    return a


@numba.njit(cache=True, nogil=True)
def _reduced_matrix(Q: np.ndarray, G: np.ndarray, d: np.ndarray, reg: float) -> np.ndarray:
    """``L`` with ``L L' = Q + G' diag(d) G + reg I``."""  # pragma: no cover - compiled
    H = Q + G.T @ (d.reshape(-1, 1) * G)
    for i in range(H.shape[0]):
        H[i, i] += reg
    return np.linalg.cholesky(H)


@numba.njit(cache=True, nogil=True)
def _merit(Q, q, G, h, x, s, lam, pscale, qmax):  # type: ignore[no-untyped-def]  # pragma: no cover
    """Residuals ``rx``, ``rz`` and the merit ``max(pres, dres, gap)`` of ``qp_ipm``."""
    Qx = Q @ x
    Gtl = G.T @ lam
    rx = Qx + q + Gtl
    rz = G @ x + s - h
    dscale = max(np.max(np.abs(Qx)), qmax, np.max(np.abs(Gtl)))
    obj = 0.5 * (x @ Qx) + q @ x
    gap = (s @ lam) / (1 + abs(obj))
    merit = max(np.max(np.abs(rz)) / pscale, np.max(np.abs(rx)) / (1 + dscale), gap)
    return rx, rz, merit


@numba.njit(cache=True, nogil=True)
def _solve_one(  # type: ignore[no-untyped-def]
    Q, q, G, h, reg, dcap, pscale, qmax, tol, max_iter, x, s, lam
):  # pragma: no cover - compiled; checked against the batched solver by the tests
    """``min x'Qx/2 + q'x`` s.t. ``Gx <= h`` for one element; fills ``x, s, lam`` and returns
    ``(iterations, merit)`` (merit <= tol: solved)."""
    m = G.shape[0]
    L = _reduced_matrix(Q, G, np.ones(m), reg)
    x[:] = _chol_solve(L, -q + G.T @ h)
    s[:] = h - G @ x
    lam[:] = -s
    smin, lmin = s.min(), lam.min()
    if smin <= 0:
        s += 1 - smin
    if lmin <= 0:
        lam += 1 - lmin
    merit = np.inf
    it = 1
    for it in range(1, max_iter + 1):  # noqa: B007 (``it`` is returned)
        rx, rz, merit = _merit(Q, q, G, h, x, s, lam, pscale, qmax)
        if not merit > tol:  # solved, or NaN (left to the batched solver)
            break
        dfull = lam / s
        capped = dfull > dcap
        d = np.minimum(dfull, dcap)
        sp = np.where(capped, lam / dcap, s)
        L = _reduced_matrix(Q, G, d, reg)
        rs = s * lam
        mu = rs.sum() / m
        # predictor (affine scaling)
        t = (-rs + lam * rz) / sp
        dx = _chol_solve(L, -rx - G.T @ t)
        Gdx = G @ dx
        ds = -rz - Gdx
        dl = t + d * Gdx
        a = min(_max_step(s, ds), _max_step(lam, dl), 1.0)
        mu_aff = ((s + a * ds) @ (lam + a * dl)) / m
        sigma = min(max(mu_aff / mu, 0.0), 1.0) ** 3
        # corrector
        f2 = -(rs + ds * dl - sigma * mu)
        t = (f2 + lam * rz) / sp
        dx = _chol_solve(L, -rx - G.T @ t)
        Gdx = G @ dx
        ds = -rz - Gdx
        dl = t + d * Gdx
        if capped.any():  # one refinement step against the true Newton system
            e1 = -rx - Q @ dx - G.T @ dl
            t = (f2 - lam * ds - s * dl) / sp
            cx = _chol_solve(L, e1 - G.T @ t)
            Gcx = G @ cx
            dx += cx
            ds -= Gcx
            dl += t + d * Gcx
        a = min(0.999 * min(_max_step(s, ds), _max_step(lam, dl)), 1.0)
        x += a * dx
        s += a * ds
        lam += a * dl
    return it, merit


@numba.njit(cache=True, nogil=True)
def solve_batch(  # type: ignore[no-untyped-def]
    Q, q, G, h, reg, dcap, pscale, qmax, tol, max_iter, x, s, lam, iters, merit
):  # pragma: no cover - compiled
    """:func:`_solve_one` for every element of ``(B, ...)`` float64 arrays (``q``, ``h``,
    ``x``, ``s``, ``lam`` as rows; ``reg``, ``dcap``, ``pscale``, ``qmax`` per element);
    fills ``x, s, lam``, ``iters`` and ``merit`` (B,)."""
    for b in range(Q.shape[0]):
        iters[b], merit[b] = _solve_one(
            Q[b],
            q[b],
            G[b],
            h[b],
            reg[b],
            dcap[b],
            pscale[b],
            qmax[b],
            tol,
            max_iter,
            x[b],
            s[b],
            lam[b],
        )
