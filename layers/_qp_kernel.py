"""The interior point of :mod:`layers.qp_ipm`, one problem at a time, compiled by numba.

The batched solver streams every operand of the whole batch through memory on each of its
dozens of products per iteration; for dense problems (n = m = 128, batch 128: 16 MB an operand)
that traffic, not arithmetic, is its cost. This loop solves the elements one after the other,
so each element's matrices stay in cache through all its iterations. It runs the same method
on the same scaled data (Mehrotra's predictor-corrector from the CVXOPT starting point, the cap
on ``lam/s`` with one refinement step when it binds, 0.999 of the step to the boundary, the
same merit), for inequality-constrained problems (``solve_qp`` eliminates equalities first).
It has no stall detection or best-iterate bookkeeping: :mod:`layers.qp_ipm` solves the
elements it leaves unsolved again with the batched code, which has them. The backward's
adjoint KKT solve (:func:`adjoint_batch`) and the layer's PSD check (:func:`psd_failures`) run
the same way. Each element's ``Q + G'DG`` is formed by BLAS ``dsyrk`` and factorized by LAPACK
``dpotrf`` in place, with BLAS on one thread (:func:`one_blas_thread`). Imported lazily, on
the first CPU solve, and only when numba is installed.
"""

from __future__ import annotations

from typing import Any

import llvmlite.binding as llvm
import numba
import numpy as np
import threadpoolctl
from numba import types
from numba.extending import get_cython_function_address

# BLAS / LAPACK of scipy (its Cython interface, Fortran conventions), called by symbol name so
# the compiled functions stay cacheable: ``dsyrk`` forms G' D G from half the products a general
# matrix product needs, ``dpotrf`` factorizes in place (np.linalg.cholesky copies, checks and
# zeroes the other triangle on each call).
_SCIPY = (("scipy.linalg.cython_blas", "dsyrk"), ("scipy.linalg.cython_lapack", "dpotrf"))
for _lib, _name in _SCIPY:
    llvm.add_symbol("optlayers_" + _name, get_cython_function_address(_lib, _name))
_P = types.voidptr
_dsyrk = types.ExternalFunction("optlayers_dsyrk", types.void(*[_P] * 10))
_dpotrf = types.ExternalFunction("optlayers_dpotrf", types.void(*[_P] * 5))
_UPPER, _NOTRANS = ord("U"), ord("N")
_BLAS = threadpoolctl.ThreadpoolController().select(user_api="blas")


def one_blas_thread() -> Any:
    """A context in which BLAS runs on one thread: the loop calls it on one element's small
    matrices, where OpenBLAS's threads cost more than they save (twice the time on two idle
    cores, several times on busy ones); parallelism comes from splitting the batch instead."""
    return _BLAS.limit(limits=1)


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
def _reduced_matrix(  # type: ignore[no-untyped-def]
    Q, G, d, reg, L, W
):  # pragma: no cover - compiled
    """Overwrite the lower triangle of ``L`` (row-major ``n x n``) with the Cholesky factor of
    ``Q + G' diag(d) G + reg I`` (``W``: an ``m x n`` work array); False if that matrix is not
    positive definite. The other triangle keeps garbage: :func:`_chol_solve` never reads it."""
    n, m = G.shape[1], G.shape[0]
    for i in range(m):
        r = np.sqrt(d[i])
        for j in range(n):
            W[i, j] = r * G[i, j]
    L[:] = Q
    for i in range(n):
        L[i, i] += reg
    # A row-major array is its transpose in Fortran's order: Fortran's upper triangle of
    # W_f W_f' (W_f = W') is our lower triangle of W'W, and dpotrf("U") leaves U with
    # U'U = H there, i.e. our lower L with L L' = H.
    uplo, trans = np.array([_UPPER], np.int8), np.array([_NOTRANS], np.int8)
    dims, one, info = np.array([n, m], np.int32), np.ones(1), np.zeros(1, np.int32)
    nn, mm = dims[0:1], dims[1:2]
    _dsyrk(uplo.ctypes, trans.ctypes, nn.ctypes, mm.ctypes, one.ctypes, W.ctypes, nn.ctypes,
           one.ctypes, L.ctypes, nn.ctypes)  # fmt: skip
    _dpotrf(uplo.ctypes, nn.ctypes, L.ctypes, nn.ctypes, info.ctypes)
    return info[0] == 0


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
    m, n = G.shape
    L, W = np.empty((n, n)), np.empty((m, n))
    if not _reduced_matrix(Q, G, np.ones(m), reg, L, W):
        return 0, np.inf  # left to the batched solver, which regularizes and falls back to LU
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
    for it in range(1, max_iter + 1):
        rx, rz, merit = _merit(Q, q, G, h, x, s, lam, pscale, qmax)
        if not merit > tol:  # solved, or NaN (left to the batched solver)
            break
        dfull = lam / s
        capped = dfull > dcap
        d = np.minimum(dfull, dcap)
        sp = np.where(capped, lam / dcap, s)
        if not _reduced_matrix(Q, G, d, reg, L, W):
            return it, np.inf
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


@numba.njit(cache=True, nogil=True)
def _amax(v: np.ndarray) -> float:  # pragma: no cover - compiled
    """``max |v|`` (0 for an empty ``v``)."""
    a = 0.0
    for i in range(v.shape[0]):
        if abs(v[i]) > a:
            a = abs(v[i])
    return a


@numba.njit(cache=True, nogil=True)
def _adjoint_one(  # type: ignore[no-untyped-def]
    Q, G, x, lam, s, gx, glam, dcap, refined, refine, dx, w, dQ, dG
):  # pragma: no cover - compiled; checked against the batched adjoint by the tests
    """The adjoint KKT solve of ``qp_ipm._kkt_adjoint`` for one inequality-only element: the
    same row scaling, capped reduced matrix and refinement on the full system (stopping at a
    relative residual ``refined``); fills ``dx`` and ``w`` and returns False if the reduced
    matrix is not positive definite. Also fills the gradients ``dQ = (dx x' + x dx') / 2`` and
    ``dG = lam dx' + w x'``."""
    m, n = G.shape
    tiny = np.finfo(np.float64).tiny
    Gs, gs = np.empty((m, n)), np.empty(m)
    for i in range(m):
        r = np.sqrt(G[i] @ G[i])
        gs[i] = r if r > 0 else 1.0
        Gs[i] = G[i] / gs[i]
    qdiag = 1.0
    for i in range(n):
        qdiag = max(qdiag, 1.0 + abs(Q[i, i]))
    lam_s = np.maximum(lam * gs, tiny)
    s_s = np.maximum(s / gs, tiny)
    dc = np.minimum(lam_s / s_s, dcap * qdiag)
    Wd = np.minimum(s_s / lam_s, 1e200)
    L, work = np.empty((n, n)), np.empty((m, n))
    if not _reduced_matrix(Q, Gs, dc, 1e-11 * qdiag, L, work):
        return False
    f1, f2 = -gx, -glam / gs
    dx[:] = _chol_solve(L, f1 + Gs.T @ (dc * f2))
    w[:] = dc * (Gs @ dx - f2)
    for _ in range(refine):  # until the residual is at round-off level (usually after one)
        Gdx = Gs @ dx
        e1 = f1 - Q @ dx - Gs.T @ w
        e2 = f2 - Gdx + Wd * w
        size = _amax(f1) + _amax(f2) + _amax(dx) * qdiag + _amax(w)
        if _amax(e1) + _amax(e2) <= refined * size:
            break
        cx = _chol_solve(L, e1 + Gs.T @ (dc * e2))
        w += dc * (Gs @ cx - e2)
        dx += cx
    w /= gs
    for i in range(n):  # dQ = (dx x' + x dx') / 2
        for j in range(n):
            dQ[i, j] = 0.5 * (dx[i] * x[j] + x[i] * dx[j])
    for i in range(m):  # dG = lam dx' + w x'
        for j in range(n):
            dG[i, j] = lam[i] * dx[j] + w[i] * x[j]
    return True


@numba.njit(cache=True, nogil=True)
def adjoint_batch(  # type: ignore[no-untyped-def]
    Q, G, x, lam, s, gx, glam, dcap, refined, refine, dx, w, dQ, dG, ok
):  # pragma: no cover - compiled
    """:func:`_adjoint_one` for every element of ``(B, ...)`` float64 arrays; fills ``dx (B, n)``,
    ``w (B, m)``, ``dQ (B, n, n)``, ``dG (B, m, n)`` and ``ok (B,)``."""
    for b in range(Q.shape[0]):
        ok[b] = _adjoint_one(
            Q[b], G[b], x[b], lam[b], s[b], gx[b], glam[b], dcap, refined, refine, dx[b], w[b],
            dQ[b], dG[b],
        )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def psd_failures(Q: np.ndarray, rel: float, bad: np.ndarray) -> None:  # pragma: no cover
    """``bad[b]``: the symmetric part of ``Q[b]`` plus ``rel * max|Q_sym|`` times the identity
    has no Cholesky factor (``Q (B, n, n)`` float64)."""
    n = Q.shape[1]
    H = np.empty((n, n))
    uplo, dims, info = np.array([_UPPER], np.int8), np.array([n], np.int32), np.zeros(1, np.int32)
    for b in range(Q.shape[0]):
        scale = 0.0
        for i in range(n):
            for j in range(n):
                H[i, j] = 0.5 * (Q[b, i, j] + Q[b, j, i])
                scale = max(scale, abs(H[i, j]))
        for i in range(n):
            H[i, i] += rel * max(scale, 1e-300)
        _dpotrf(uplo.ctypes, dims.ctypes, H.ctypes, dims.ctypes, info.ctypes)
        bad[b] = info[0] != 0
