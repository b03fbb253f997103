"""OptNet QP layer (Amos & Kolter, ICML 2017): a batched, differentiable quadratic program.

    x*(Q, q, G, h, A, b) = argmin_x  1/2 x'Qx + q'x   subject to  Gx <= h,  Ax = b

Public API
----------
* :func:`qp` -- the functional layer. Batched or unbatched inputs (mixed broadcasting as in
  cvxpylayers), any subset of constraints, output in the input's dtype and device, optionally the
  duals. Backends are chosen by name (see :mod:`layers.backends` for the table).
* :class:`OptNetQP` -- an ``nn.Module`` with the paper's always-feasible parameterization
  ``Q = L L' + eps I``, ``h = G z0 + s0`` (``s0 >= 0``), ``b = A z0``.
* :func:`solve_qp` -- the project's own solver: a batched dense primal-dual interior-point method
  (Mehrotra predictor-corrector) in pure torch, float64 internally, on any device, no Python loop
  over batch elements. It returns a :class:`QPSolution` with an info record (:class:`QPInfo`:
  iterations, residuals, status). Reused by the TV-denoising layer.
* :func:`kkt_residuals` -- primal, dual and complementarity residuals of a candidate solution; the
  layer checks every backend's answer with it before using it.

Gradients of the ``torch-ipm`` backend come from the implicit function theorem applied to the KKT
conditions at the solution (OptNet eqs. 6-8), solved with the same KKT machinery as the forward
pass plus iterative refinement. They cover all six inputs and the duals as outputs.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from layers._checks import check_positive, check_tensor
from layers.backends import SolverError, get_backend

__all__ = [
    "STATUS_NAMES",
    "OptNetQP",
    "QPInfo",
    "QPSolution",
    "kkt_residuals",
    "qp",
    "solve_qp",
]

# ----------------------------------------------------------------------------------------------
# Solution record
# ----------------------------------------------------------------------------------------------

_STALL = 20  # iterations without a 10% better merit before an element is stopped
_SMALL = 64  # n + p up to which _KKT factorizes the augmented matrix with one LU
_ONE_THREAD = 1 << 18  # B (n + p)^2 up to which the solver runs on one torch thread
_REFINED = 1e-14  # relative residual at which the backward's refinement stops
_STEP = 0.999  # fraction of the step to the boundary of s, lam >= 0
_DCAP = 1e8  # cap on lam/s (relative to |Q|) in factorized matrices; refinement undoes it

RUNNING, SOLVED, INACCURATE, INFEASIBLE, UNBOUNDED, MAX_ITER, NUMERICAL = range(7)
STATUS_NAMES: dict[int, str] = {
    RUNNING: "running",
    SOLVED: "solved",
    INACCURATE: "inaccurate",
    INFEASIBLE: "primal infeasible",
    UNBOUNDED: "unbounded (dual infeasible)",
    MAX_ITER: "iteration limit",
    NUMERICAL: "numerical error",
}


@dataclass
class QPInfo:
    """What the solver did, per batch element (all tensors have shape ``(B,)``).

    ``status`` holds codes from :data:`STATUS_NAMES`: ``solved`` means every relative residual is
    below ``tol``; ``inaccurate`` means below ``sqrt(tol)`` only.
    """

    iterations: int
    status: Tensor
    primal_residual: Tensor
    dual_residual: Tensor
    gap: Tensor

    @property
    def ok(self) -> Tensor:
        """``(B,)`` bool: solved or inaccurate (a usable solution)."""
        return (self.status == SOLVED) | (self.status == INACCURATE)

    @property
    def status_names(self) -> list[str]:
        return [STATUS_NAMES[int(s)] for s in self.status]

    def failed(self) -> list[int]:
        """Indices of batch elements without a usable solution."""
        return torch.nonzero(~self.ok).flatten().tolist()


@dataclass
class QPSolution:
    """A batch of QP solutions: primal ``x (B, n)``, inequality duals ``lam (B, m)`` and slacks
    ``slack = h - Gx (B, m)``, equality duals ``nu (B, p)``, and the :class:`QPInfo`."""

    x: Tensor
    lam: Tensor
    nu: Tensor
    slack: Tensor
    info: QPInfo = field(repr=False)
    _nullspace: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------
# Small batched helpers. Inside the solver, vectors are columns ``(B, k, 1)`` and per-element
# scalars ``(B, 1, 1)``: every matrix-vector product is then a single ``bmm``.
# ----------------------------------------------------------------------------------------------


def _amax(v: Tensor) -> Tensor:
    """Max-abs over dim -2 of ``(B, k, 1)``, kept as ``(B, 1, 1)``; 0 for ``k == 0``."""
    if v.shape[-2] == 0:
        return v.new_zeros(v.shape[0], 1, 1)
    return v.abs().amax(-2, keepdim=True)


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """Column dot product ``(B, k, 1), (B, k, 1) -> (B, 1, 1)``."""
    return (u * v).sum(-2, keepdim=True)


def _add_diag(M: Tensor, d: Tensor) -> Tensor:
    """``M + diag(d)`` for ``M (B, k, k)`` and ``d (B, 1, 1)`` (a new tensor)."""
    out = M.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(d.squeeze(-1))
    return out


class _KKT:
    """Factorization of the reduced KKT matrix ``[[Q + G' diag(d) G, A'], [A, 0]]`` for a batch.

    ``H = Q + G'DG`` plus a tiny static regularization. Without equalities, Cholesky of ``H``.
    With equalities: small systems (``n + p <= 64``) take one LU of the augmented matrix (on CPU
    the per-matrix cost of batched LAPACK calls dominates there, so fewer calls win); larger
    ones the Schur complement ``S = A H^-1 A'``, both Cholesky. Whenever a Cholesky fails for
    some element (singular ``H``, e.g. an LP with equalities), LU of the augmented matrix.
    Right-hand sides are columns.
    """

    def __init__(self, Q: Tensor, G: Tensor, A: Tensor, d: Tensor | None, reg: Tensor):
        m = G.shape[-2]
        H = Q if d is None or m == 0 else torch.baddbmm(Q, G.mT, d * G)
        self.H, self.A = H, A
        self.n, self.p = H.shape[-1], A.shape[-2]
        Hr = _add_diag(H, reg)
        self.lu: Tensor | None = None
        if self.p == 0 or self.n + self.p > _SMALL:
            L, info = torch.linalg.cholesky_ex(Hr)
            if not bool(info.any()):
                self.L = L
                if self.p == 0:
                    return
                self.HiAt = torch.cholesky_solve(A.mT, L)  # (B, n, p)
                Ls, info = torch.linalg.cholesky_ex(_add_diag(torch.bmm(A, self.HiAt), reg))
                if not bool(info.any()):
                    self.Ls = Ls
                    return
        reg_d = -reg.squeeze(-1).expand(-1, self.p)
        K = torch.cat([torch.cat([Hr, A.mT], -1), torch.cat([A, torch.diag_embed(reg_d)], -1)], -2)
        self.lu, self.piv, _ = torch.linalg.lu_factor_ex(K)

    def _raw(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        if self.lu is not None:
            sol = torch.linalg.lu_solve(self.lu, self.piv, torch.cat([r1, r2], -2))
            return sol[:, : self.n], sol[:, self.n :]
        Hir1 = torch.cholesky_solve(r1, self.L)
        if self.p == 0:
            return Hir1, r2
        dnu = torch.cholesky_solve(torch.bmm(self.A, Hir1) - r2, self.Ls)
        return Hir1 - torch.bmm(self.HiAt, dnu), dnu

    def solve(self, r1: Tensor, r2: Tensor, refine: int = 0) -> tuple[Tensor, Tensor]:
        """Solve ``H dx + A' dnu = r1, A dx = r2`` (columns) with ``refine`` refinement steps."""
        dx, dnu = self._raw(r1, r2)
        for _ in range(refine):
            e1 = r1 - torch.bmm(self.H, dx) - torch.bmm(self.A.mT, dnu)
            e2 = r2 - torch.bmm(self.A, dx)
            c1, c2 = self._raw(e1, e2)
            dx, dnu = dx + c1, dnu + c2
        return dx, dnu


def _null_space(A: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``A' = [Y Z] [R; 0]`` (complete QR): ``Y (B, n, p)`` spans the rows of ``A``, ``Z (B, n,
    n - p)`` its null space, ``R (B, p, p)`` upper triangular. None when ``A`` is (nearly) rank
    deficient or has more rows than columns: the caller keeps the equalities in the KKT system."""
    p, n = A.shape[-2], A.shape[-1]
    if p > n:
        return None
    Qf, Rf = torch.linalg.qr(A.mT, mode="complete")
    R = Rf[:, :p, :]
    dg = R.diagonal(dim1=-2, dim2=-1).abs()
    if not bool((dg.amin(-1) > 1e-10 * dg.amax(-1).clamp_min(1e-300)).all()):
        return None
    return Qf[:, :, :p], Qf[:, :, p:], R


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch thread, restoring the count after (it is process-wide).
    qpth needs it: it crashes intermittently with more threads on this torch version."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _threads_for(B: int, n: int, p: int, device: torch.device) -> Iterator[None]:
    """One torch thread for small CPU problems.

    Their tensors are far too small for intra-op parallelism to help, but the batched LAPACK
    calls still start every thread, and on a busy machine each call then waits for descheduled
    threads: on 2 shared cores the small OptNet QP ran 5x slower with 2 threads than with 1.
    (``torch.set_num_threads`` is process-wide; it is restored on exit.)
    """
    if device.type != "cpu" or B * (n + p) ** 2 > _ONE_THREAD or torch.get_num_threads() == 1:
        yield
        return
    with one_thread():
        yield


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest ``a`` (capped at 1e30) with ``v + a dv >= 0``, per element ``(B, 1, 1)``."""
    return (-v / dv).masked_fill_(dv >= 0, 1e30).amin(-2, keepdim=True)


# ----------------------------------------------------------------------------------------------
# The interior-point solver
# ----------------------------------------------------------------------------------------------


def _empty_constraints(
    q: Tensor, G: Tensor | None, h: Tensor | None, A: Tensor | None, b: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, n = q.shape
    if G is None or h is None:
        G, h = q.new_zeros(B, 0, n), q.new_zeros(B, 0)
    if A is None or b is None:
        A, b = q.new_zeros(B, 0, n), q.new_zeros(B, 0)
    return G, h, A, b


def kkt_residuals(
    Q: Tensor,
    q: Tensor,
    G: Tensor | None,
    h: Tensor | None,
    A: Tensor | None,
    b: Tensor | None,
    x: Tensor,
    lam: Tensor | None,
    nu: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Relative KKT residuals of ``(x, lam, nu)`` per batch element, each of shape ``(B,)``.

    Shapes: ``Q (B, n, n)``, ``q, x (B, n)``, ``G (B, m, n)``, ``h, lam (B, m)``, ``A (B, p, n)``,
    ``b, nu (B, p)``; ``m`` or ``p`` may be 0, and absent constraints may be passed as None
    (``G, h, lam`` together, ``A, b, nu`` together), as :func:`qp` takes them.

    Returns ``(primal, dual, complementarity)``:
    primal = max(|(Gx - h)_+|, |Ax - b|) / (1 + max(|h|, |b|)), plus the largest negative ``lam``;
    dual = |Qx + q + G'lam + A'nu| / (1 + max(|Qx|, |q|, |G'lam|, |A'nu|));
    complementarity = sum |lam_i (h - Gx)_i| / (1 + |objective|); all norms are max-norms.
    """
    G, h, A, b = _empty_constraints(q, G, h, A, b)
    lam = q.new_zeros(q.shape[0], 0) if lam is None else lam
    nu = q.new_zeros(q.shape[0], 0) if nu is None else nu
    x, q, h, b, lam, nu = (t.unsqueeze(-1) for t in (x, q, h, b, lam, nu))
    Qx, Gtl, Atn = torch.bmm(Q, x), torch.bmm(G.mT, lam), torch.bmm(A.mT, nu)
    slack = h - torch.bmm(G, x)
    pres = torch.maximum(_amax((-slack).clamp_min(0)), _amax(torch.bmm(A, x) - b))
    pres = pres / (1 + torch.maximum(_amax(h), _amax(b))) + _amax((-lam).clamp_min(0))
    scale = torch.maximum(torch.maximum(_amax(Qx), _amax(q)), torch.maximum(_amax(Gtl), _amax(Atn)))
    dres = _amax(Qx + q + Gtl + Atn) / (1 + scale)
    obj = 0.5 * _dot(x, Qx) + _dot(q, x)
    comp = (lam * slack).abs().sum(-2, keepdim=True) / (1 + obj.abs())
    return pres.flatten(), dres.flatten(), comp.flatten()


def _classify(Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> Tensor:
    """Why elements failed: ``INFEASIBLE``, ``UNBOUNDED``, or ``RUNNING`` (neither: feasible and
    bounded, so the solver itself fell short), per element ``(k,)``.

    Three small auxiliary problems, each always solvable: least squares for ``Ax = b``; the
    phase-1 problem ``min t s.t. Gx - t <= h, t >= -1, Ax = b`` (infeasible iff ``t* > 0``); and,
    when feasible, the QP inside a big box (unbounded iff the box is active).
    """
    k, n = q.shape
    m, p = G.shape[-2], A.shape[-2]
    code = torch.full((k,), RUNNING, dtype=torch.long, device=q.device)
    scale = 1 + torch.maximum(
        h.abs().amax(-1) if m else h.new_zeros(k), b.abs().amax(-1) if p else b.new_zeros(k)
    )
    if p:
        xl = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
        eq_bad = (torch.bmm(A, xl.unsqueeze(-1))).squeeze(-1).sub(b).abs().amax(-1) > 1e-7 * scale
        code = torch.where(eq_bad, INFEASIBLE, code)
    else:
        eq_bad = torch.zeros(k, dtype=torch.bool, device=q.device)
    feasible = ~eq_bad
    if m:
        eps = 1e-10
        Q1 = eps * torch.eye(n + 1, dtype=q.dtype, device=q.device).expand(k, -1, -1)
        q1 = torch.cat([q.new_zeros(k, n), q.new_ones(k, 1)], -1)
        G1 = torch.cat(
            [
                torch.cat([G, -G.new_ones(k, m, 1)], -1),
                torch.cat([G.new_zeros(k, 1, n), -G.new_ones(k, 1, 1)], -1),
            ],
            -2,
        )
        h1 = torch.cat([h, h.new_ones(k, 1)], -1)
        A1 = torch.cat([A, A.new_zeros(k, p, 1)], -1)
        b1 = b.clone()
        if p:  # consistent right-hand sides for the (already flagged) inconsistent elements
            b1 = torch.where(eq_bad.unsqueeze(-1), (torch.bmm(A, xl.unsqueeze(-1))).squeeze(-1), b)
        ph1 = solve_qp(Q1, q1, G1, h1, A1, b1, tol=1e-9, classify=False)
        t = ph1.x[:, -1]
        infeasible = ph1.info.ok & (t > 1e-6 * scale)
        code = torch.where(~eq_bad & infeasible, INFEASIBLE, code)
        feasible = feasible & ph1.info.ok & ~infeasible
        x0 = ph1.x[:, :n]
    else:
        x0 = xl if p else q.new_zeros(k, n)
    if bool(feasible.any()):
        R = 1e6 * (1 + x0.abs().amax(-1, keepdim=True))
        eye = torch.eye(n, dtype=q.dtype, device=q.device).expand(k, -1, -1)
        Gb = torch.cat([G, eye, -eye], -2)
        hb = torch.cat([h, x0 + R, R - x0], -1)
        box = solve_qp(Q, q, Gb, hb, A if p else None, b if p else None, tol=1e-9, classify=False)
        hits = ((box.x - x0).abs().amax(-1, keepdim=True) > 0.5 * R).squeeze(-1)
        code = torch.where(feasible & box.info.ok & hits, UNBOUNDED, code)
    return code


@torch.no_grad()
def solve_qp(
    Q: Tensor,
    q: Tensor,
    G: Tensor | None = None,
    h: Tensor | None = None,
    A: Tensor | None = None,
    b: Tensor | None = None,
    *,
    tol: float = 1e-12,
    max_iter: int = 60,
    dtype: torch.dtype | None = torch.float64,
    classify: bool = True,
) -> QPSolution:
    """Solve a batch of convex QPs with a dense primal-dual interior-point method.

    minimize 1/2 x'Qx + q'x subject to Gx <= h, Ax = b, for each batch element.

    Args:
        Q: ``(B, n, n)`` positive semidefinite (only its symmetric part is used).
        q: ``(B, n)``.
        G, h: ``(B, m, n)`` and ``(B, m)``, or both None (no inequalities).
        A, b: ``(B, p, n)`` and ``(B, p)``, or both None (no equalities).
        tol: relative tolerance on primal residual, dual residual and duality gap. The default
            1e-12 gives gradients accurate to about 1e-8 relative.
        max_iter: iteration limit.
        dtype: working precision (float64 by default; None keeps the input's).
        classify: find out why failed elements failed (infeasible, unbounded), by solving small
            auxiliary problems for them only.

    Returns:
        A :class:`QPSolution` in the working dtype. Elements that fail are flagged in
        ``info.status`` (primal infeasible, unbounded, iteration limit, numerical error); this
        function never raises for them, the layer does.

    The method is Mehrotra's predictor-corrector on the slack form ``Gx + s = h, s >= 0`` (as in
    CVXOPT's ``coneqp`` and qpth): per iteration one factorization of ``Q + G' diag(lam/s) G``
    with ``lam/s`` capped so it stays well conditioned, and iterative refinement on the full
    Newton system to remove the cap; rows of ``G`` and ``A`` are scaled to unit norm. Equalities
    are eliminated once with a null-space basis of ``A`` (QR) when there are many of them
    (``4p >= n``) or the problem is small; otherwise (or if ``A`` is rank deficient) they stay
    in the KKT system (Schur complement or LU). Converged elements are frozen while the rest
    continue; an element whose residuals stop improving is stopped at its best iterate, and
    failed elements are classified afterwards (see ``classify``). Without inequalities the
    problem is one KKT solve.
    """
    wd = dtype or q.dtype
    G, h, A, b = _empty_constraints(q, G, h, A, b)
    Q, q, G, h, A, b = (t.to(wd) for t in (Q, q, G, h, A, b))
    Q = 0.5 * (Q + Q.mT)
    B, n = q.shape
    m, p = G.shape[-2], A.shape[-2]
    if B == 0:
        raise ValueError("solve_qp got an empty batch")

    # Row equilibration: unit-norm rows of G and A (zero rows stay as they are); columns.
    gs = G.norm(dim=-1, keepdim=True)
    gs = torch.where(gs > 0, gs, 1.0)
    as_ = A.norm(dim=-1, keepdim=True)
    as_ = torch.where(as_ > 0, as_, 1.0)
    G, h = G / gs, h.unsqueeze(-1) / gs
    A, b = A / as_, b.unsqueeze(-1) / as_
    q = q.unsqueeze(-1)
    GT, AT = G.mT, A.mT
    qdiag = 1 + Q.diagonal(dim1=-2, dim2=-1).abs().amax(-1).view(B, 1, 1)
    reg, dcap = 1e-11 * qdiag, _DCAP * qdiag
    pscale = 1 + torch.maximum(_amax(h), _amax(b))
    qmax = _amax(q)

    def residuals(x, s, lam, nu):
        Qx, Gtl = torch.bmm(Q, x), torch.bmm(GT, lam)
        rx = Qx + q + Gtl
        dscale = torch.maximum(torch.maximum(_amax(Qx), qmax), _amax(Gtl))
        rz = torch.bmm(G, x) + s - h
        pres = _amax(rz)
        if p:
            Atn = torch.bmm(AT, nu)
            rx = rx + Atn
            dscale = torch.maximum(dscale, _amax(Atn))
            ry = torch.bmm(A, x) - b
            pres = torch.maximum(pres, _amax(ry))
        else:
            ry = b
        obj = 0.5 * _dot(x, Qx) + _dot(q, x)
        gap = _dot(s, lam) / (1 + obj.abs())
        return rx, rz, ry, pres / pscale, _amax(rx) / (1 + dscale), gap

    status = torch.full((B, 1, 1), RUNNING, dtype=torch.long, device=q.device)
    it = 1
    ns = _null_space(A) if p and m and (4 * p >= n or n + p <= _SMALL) else None
    if ns is not None:
        # Eliminate the equalities once: x = xp + Z y with A xp = b and A Z = 0, then solve the
        # inequality-constrained QP in y (n - p variables, no Schur complement per iteration).
        Y, Z, R = ns
        xp = torch.bmm(Y, torch.linalg.solve_triangular(R.mT, b, upper=False))
        if n == p:  # x is fixed by the equalities
            x = xp
            s = h - torch.bmm(G, x)
            lam = torch.zeros_like(s)
            ok = s.amin(-2, keepdim=True) >= -math.sqrt(tol) * pscale
            status = torch.where(ok, SOLVED, INFEASIBLE)
            s = s.clamp_min(0)
            it = 0
        else:
            QZ = torch.bmm(Q, Z)
            sub = solve_qp(
                torch.bmm(Z.mT, QZ),
                (torch.bmm(QZ.mT, xp) + torch.bmm(Z.mT, q)).squeeze(-1),
                torch.bmm(G, Z),
                (h - torch.bmm(G, xp)).squeeze(-1),
                tol=tol,
                max_iter=max_iter,
                dtype=wd,
                classify=False,
            )
            x = xp + torch.bmm(Z, sub.x.unsqueeze(-1))
            lam, s = sub.lam.unsqueeze(-1), sub.slack.unsqueeze(-1)
            status, it = sub.info.status.view(B, 1, 1).clone(), sub.info.iterations
        # equality duals from stationarity: A'nu = -(Qx + q + G'lam), A' = Y R
        r = torch.bmm(Q, x) + q + torch.bmm(GT, lam)
        nu = -torch.linalg.solve_triangular(R, torch.bmm(Y.mT, r), upper=True)
        _, _, _, pres, dres, gap = residuals(x, s, lam, nu)
    elif m == 0:
        # Equality-constrained or unconstrained: one KKT solve (plus refinement).
        x, nu = _KKT(Q, G, A, None, reg).solve(-q, b, refine=2)
        s = lam = q.new_zeros(B, 0, 1)
        _, _, _, pres, dres, gap = residuals(x, s, lam, nu)
        merit = torch.maximum(pres, dres)
        fail = torch.where(pres > math.sqrt(tol), INFEASIBLE, UNBOUNDED)
        status = torch.where(merit <= math.sqrt(tol), INACCURATE, fail)
        status = torch.where(merit <= tol, SOLVED, status)
    else:
        # CVXOPT-style initial point: solve with D = I, then shift s and lam into the interior.
        x, nu = _KKT(Q, G, A, torch.ones_like(h), reg).solve(-q + torch.bmm(GT, h), b)
        s = h - torch.bmm(G, x)
        lam = -s
        smin, lmin = s.amin(-2, keepdim=True), lam.amin(-2, keepdim=True)
        s = s + torch.where(smin <= 0, 1 - smin, 0.0)
        lam = lam + torch.where(lmin <= 0, 1 - lmin, 0.0)

        best = (x, s, lam, nu)
        best_merit = torch.full((B, 1, 1), math.inf, dtype=wd, device=q.device)
        stall = torch.zeros((B, 1, 1), dtype=torch.long, device=q.device)
        for it in range(1, max_iter + 1):  # noqa: B007 (``it`` is reported after the loop)
            rx, rz, ry, pres, dres, gap = residuals(x, s, lam, nu)
            running = status == RUNNING
            merit = torch.maximum(torch.maximum(pres, dres), gap)
            improved = running & (merit < best_merit)
            if bool(improved.all()):
                best = (x, s, lam, nu)
            else:
                best = tuple(torch.where(improved, v, bv) for v, bv in zip((x, s, lam, nu), best))
            stall = (stall + 1).masked_fill_(running & (merit < 0.9 * best_merit), 0)
            best_merit = torch.where(improved, merit, best_merit)
            status = status.masked_fill(running & (merit <= tol), SOLVED)
            status = status.masked_fill_((status == RUNNING) & (stall >= _STALL), MAX_ITER)
            running = status == RUNNING
            n_running = int(running.sum())
            if n_running == 0:
                break

            # The factorized matrix caps lam/s (as if s were larger, ``sp``): near the solution
            # lam/s spans 1e-16..1e16 and the reduced matrix would be numerically singular.
            # Refinement against the true Newton system removes the perturbation.
            d = lam / s
            capped = d > dcap
            d = torch.where(capped, dcap, d)
            sp = torch.where(capped, lam / dcap, s)
            kkt = _KKT(Q, G, A, d, reg)

            def newton(f1, f2, f3, f4, refine, kkt=kkt, d=d, s=s, sp=sp, lam=lam):
                """Solve the full Newton system (right-hand side f1..f4) via the reduced one:

                Q dx + G'dlam + A'dnu = f1;  lam*ds + s*dlam = f2;  G dx + ds = f3;  A dx = f4.
                """

                def reduced(f1, f2, f3, f4):
                    t = (f2 - lam * f3) / sp
                    dx, dnu = kkt.solve(f1 - torch.bmm(GT, t), f4)
                    Gdx = torch.bmm(G, dx)
                    return dx, f3 - Gdx, t + d * Gdx, dnu

                dx, ds, dlam, dnu = reduced(f1, f2, f3, f4)
                for _ in range(refine):
                    e1 = (
                        f1
                        - torch.bmm(Q, dx)
                        - torch.bmm(GT, dlam)
                        - (torch.bmm(AT, dnu) if p else 0.0)
                    )
                    e2 = f2 - lam * ds - s * dlam
                    e3 = f3 - torch.bmm(G, dx) - ds
                    e4 = f4 - torch.bmm(A, dx) if p else f4
                    cx, cs, cl, cn = reduced(e1, e2, e3, e4)
                    dx, ds, dlam, dnu = dx + cx, ds + cs, dlam + cl, dnu + cn
                return dx, ds, dlam, dnu

            # Predictor (affine scaling) step, then Mehrotra's corrector.
            rs = s * lam
            mu = rs.sum(-2, keepdim=True) / m
            dx, ds, dlam, dnu = newton(-rx, -rs, -rz, -ry, 0)
            a = torch.minimum(_max_step(s, ds), _max_step(lam, dlam)).clamp(max=1.0)
            mu_aff = _dot(s + a * ds, lam + a * dlam) / m
            sigma = (mu_aff / mu).clamp(0, 1) ** 3
            rs = rs + ds * dlam - sigma * mu
            # Refinement only pays when the cap perturbed the factorized matrix.
            refine = 1 if bool(capped.any()) else 0
            dx, ds, dlam, dnu = newton(-rx, -rs, -rz, -ry, refine)
            # 0.999 of the way to the boundary (as qpth): one iteration fewer than 0.99 on the
            # dense benchmark QP, and gradients about 5x more accurate at the same tolerance.
            a = (_STEP * torch.minimum(_max_step(s, ds), _max_step(lam, dlam))).clamp(max=1.0)

            finite = torch.isfinite(a)  # a NaN anywhere in (dx, ds, dlam) makes ``a`` NaN
            if n_running == B and bool(finite.all()):
                x, s, lam, nu = x + a * dx, s + a * ds, lam + a * dlam, nu + a * dnu
            else:
                status = status.masked_fill(running & ~finite, NUMERICAL)
                upd = running & finite
                a = a.masked_fill(~upd, 0.0)
                x = torch.where(upd, x + a * dx, x)
                s = torch.where(upd, s + a * ds, s)
                lam = torch.where(upd, lam + a * dlam, lam)
                nu = torch.where(upd, nu + a * dnu, nu)

        # Elements that did not converge: report the best iterate.
        left = status != SOLVED
        if bool(left.any()):
            x, s, lam, nu = (torch.where(left, bv, v) for v, bv in zip((x, s, lam, nu), best))
            _, _, _, pres, dres, gap = residuals(x, s, lam, nu)
            merit = torch.maximum(torch.maximum(pres, dres), gap)
            usable = torch.where(merit <= math.sqrt(tol), INACCURATE, MAX_ITER)
            usable = torch.where(merit <= tol, SOLVED, usable)
            finite = torch.isfinite(merit) & torch.isfinite(x).all(-2, keepdim=True)
            status = torch.where(left, torch.where(finite, usable, NUMERICAL), status)
        else:
            _, _, _, pres, dres, gap = residuals(x, s, lam, nu)

    status = status.flatten()
    failed = (status != SOLVED) & (status != INACCURATE)
    if classify and bool(failed.any()):
        idx = torch.nonzero(failed).flatten()
        gsf, asf = gs[idx], as_[idx]
        found = _classify(
            Q[idx],
            q[idx].squeeze(-1),
            (G[idx] * gsf),
            (h[idx] * gsf).squeeze(-1),
            (A[idx] * asf),
            (b[idx] * asf).squeeze(-1),
        )
        status[idx] = torch.where(found == RUNNING, status[idx], found)
    info = QPInfo(
        iterations=it,
        status=status,
        primal_residual=pres.flatten(),
        dual_residual=dres.flatten(),
        gap=gap.flatten(),
    )
    return QPSolution(
        x=x.squeeze(-1),
        lam=(lam / gs).squeeze(-1),
        nu=(nu / as_).squeeze(-1),
        slack=(s * gs).squeeze(-1),
        info=info,
        _nullspace=ns,
    )


# ----------------------------------------------------------------------------------------------
# Implicit backward through the KKT conditions (torch-ipm backend)
# ----------------------------------------------------------------------------------------------


def _kkt_adjoint(
    Q: Tensor,
    G: Tensor,
    A: Tensor,
    x: Tensor,
    lam: Tensor,
    s: Tensor,
    nu: Tensor,
    gx: Tensor,
    glam: Tensor,
    gnu: Tensor,
    refine: int = 3,
    nullspace: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of a loss with respect to ``(Q, q, G, h, A, b)`` from its gradients with respect
    to the solution ``(x, lam, nu)``, by the implicit function theorem (OptNet, eqs. 6-8).

    Solves the adjoint KKT system, with ``w = diag(lam) d_lam`` and ``W = diag(s / lam)``::

        Q dx + G'w + A'dnu = -gx,    G dx - W w = -glam,    A dx = -gnu

    by eliminating ``w`` through the reduced matrix ``Q + G'diag(lam/s)G`` of the forward pass,
    with ``lam/s`` capped so it stays well conditioned (active constraints have ``s ~ 1e-14``),
    and up to ``refine`` steps of iterative refinement on the full system to remove the cap's
    effect (they stop once the residual is at round-off level, relative ``_REFINED``).
    Then ``dQ = (dx x' + x dx')/2, dq = dx, dG = lam dx' + w x', dh = -w,
    dA = nu dx' + dnu x', db = -dnu``. Rows of ``G`` and ``A`` are scaled to unit norm inside.
    ``nullspace`` (from the forward pass, for the row-scaled ``A``) eliminates the equalities
    as the forward pass did. Shapes as in :func:`solve_qp` (vectors ``(B, k)``).
    """
    tiny = torch.finfo(lam.dtype).tiny
    B = x.shape[0]
    gs = G.norm(dim=-1, keepdim=True)
    gs = torch.where(gs > 0, gs, 1.0)
    as_ = A.norm(dim=-1, keepdim=True)
    as_ = torch.where(as_ > 0, as_, 1.0)
    Gs, As = G / gs, A / as_
    lam_s = (lam.unsqueeze(-1) * gs).clamp_min(tiny)
    s_s = (s.unsqueeze(-1) / gs).clamp_min(tiny)
    qdiag = 1 + Q.diagonal(dim1=-2, dim2=-1).abs().amax(-1).view(B, 1, 1)
    d = lam_s / s_s
    dc = torch.minimum(d, _DCAP * qdiag)
    W = (s_s / lam_s).clamp(max=1e200)  # lam may be exactly 0 (x fixed by equalities)
    reg = 1e-11 * qdiag
    if nullspace is None:
        kkt = _KKT(Q, Gs, As, dc, reg)

        def reduced(f1: Tensor, f2: Tensor, f3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            dx, dnu = kkt.solve(f1 + torch.bmm(Gs.mT, dc * f2), f3)
            return dx, dc * (torch.bmm(Gs, dx) - f2), dnu

    else:  # the forward pass eliminated the equalities: dx = Y R^-T f3 + Z dy
        Y, Z, R = nullspace
        k = Z.shape[-1]
        GZ = torch.bmm(Gs, Z)
        kz = _KKT(torch.bmm(Z.mT, torch.bmm(Q, Z)), GZ, Z.new_zeros(B, 0, k), dc, reg)

        def reduced(f1: Tensor, f2: Tensor, f3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            dx = torch.bmm(Y, torch.linalg.solve_triangular(R.mT, f3, upper=False))
            if k:
                g = torch.bmm(Z.mT, f1 - torch.bmm(Q, dx))
                g = g + torch.bmm(GZ.mT, dc * (f2 - torch.bmm(Gs, dx)))
                dy, _ = kz.solve(g, Z.new_zeros(B, 0, 1))
                dx = dx + torch.bmm(Z, dy)
            w = dc * (torch.bmm(Gs, dx) - f2)
            r = f1 - torch.bmm(Q, dx) - torch.bmm(Gs.mT, w)
            return dx, w, torch.linalg.solve_triangular(R, torch.bmm(Y.mT, r), upper=True)

    f1, f2, f3 = -gx.unsqueeze(-1), -glam.unsqueeze(-1) / gs, -gnu.unsqueeze(-1) / as_
    dx, w, dnu = reduced(f1, f2, f3)
    for _ in range(refine):  # until the residual is at round-off level (usually after one)
        e1 = f1 - torch.bmm(Q, dx) - torch.bmm(Gs.mT, w) - torch.bmm(As.mT, dnu)
        e2 = f2 - torch.bmm(Gs, dx) + W * w
        e3 = f3 - torch.bmm(As, dx)
        size = _amax(f1) + _amax(f2) + _amax(f3) + _amax(dx) * qdiag + _amax(w) + _amax(dnu)
        if bool((_amax(e1) + _amax(e2) + _amax(e3) <= _REFINED * size).all()):
            break
        cx, cw, cn = reduced(e1, e2, e3)
        dx, w, dnu = dx + cx, w + cw, dnu + cn
    dx, w, dnu = dx.squeeze(-1), (w / gs).squeeze(-1), (dnu / as_).squeeze(-1)

    dQ = 0.5 * (dx.unsqueeze(-1) * x.unsqueeze(-2) + x.unsqueeze(-1) * dx.unsqueeze(-2))
    dG = lam.unsqueeze(-1) * dx.unsqueeze(-2) + w.unsqueeze(-1) * x.unsqueeze(-2)
    dA = nu.unsqueeze(-1) * dx.unsqueeze(-2) + dnu.unsqueeze(-1) * x.unsqueeze(-2)
    return dQ, dx, dG, -w, dA, -dnu


class _IPMFunction(torch.autograd.Function):
    """``(Q, q, G, h, A, b) -> (x, lam, nu)`` with the torch-ipm forward and the KKT adjoint."""

    @staticmethod
    def forward(ctx, Q, q, G, h, A, b, opts, box):  # type: ignore[override]
        with _threads_for(q.shape[0], q.shape[-1], A.shape[-2], q.device):
            sol = solve_qp(Q, q, G, h, A, b, **opts)
        box["solution"] = sol
        ctx.save_for_backward(0.5 * (Q + Q.mT), G, A, sol.x, sol.lam, sol.slack, sol.nu)
        ctx.nullspace = sol._nullspace
        return sol.x, sol.lam, sol.nu

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gx, glam, gnu):  # type: ignore[override]
        Q, G, A, x, lam, s, nu = ctx.saved_tensors
        gx = torch.zeros_like(x) if gx is None else gx
        glam = torch.zeros_like(lam) if glam is None else glam
        gnu = torch.zeros_like(nu) if gnu is None else gnu
        with _threads_for(x.shape[0], x.shape[-1], A.shape[-2], x.device):
            grads = _kkt_adjoint(Q, G, A, x, lam, s, nu, gx, glam, gnu, nullspace=ctx.nullspace)
        return (*grads, None, None)


class _QGradLink(torch.autograd.Function):
    """Identity on ``q`` whose backward also gives ``Q`` its gradient, ``sym(dq x')``.

    The KKT conditions depend on ``(Q, q)`` only through ``Qx + q``, so for any backend
    ``dL/dQ = sym(dL/dq x')`` exactly. Backends that take a factor of ``Q`` (diffcp) or only its
    upper triangle (moreau) get ``Q`` detached, and this link supplies its gradient; ``x`` is
    filled into ``box`` after the solve.
    """

    @staticmethod
    def forward(ctx, q, Q, box):  # type: ignore[override]
        ctx.box = box
        return q.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq):  # type: ignore[override]
        x = ctx.box["x"].to(gq.dtype)
        dQ = 0.5 * (gq.unsqueeze(-1) * x.unsqueeze(-2) + x.unsqueeze(-1) * gq.unsqueeze(-2))
        return gq, dQ, None


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------

_RANKS = {"Q": 2, "q": 1, "G": 2, "h": 1, "A": 2, "b": 1}


@dataclass
class _Problem:
    """Batched float64 problem data plus what is needed to give results back."""

    Q: Tensor
    q: Tensor
    G: Tensor
    h: Tensor
    A: Tensor
    b: Tensor
    unbatched: bool
    dtype: torch.dtype
    device: torch.device

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return self.q.shape[0], self.q.shape[1], self.G.shape[1], self.A.shape[1]


def _prepare(Q, q, G, h, A, b, check_psd: bool, wd: torch.dtype) -> _Problem:
    """Validate shapes and values, broadcast to one batch size, cast to ``wd``."""
    if (G is None) != (h is None):
        raise ValueError(
            "give G and h together (or neither); got only " + ("G" if h is None else "h")
        )
    if (A is None) != (b is None):
        raise ValueError(
            "give A and b together (or neither); got only " + ("A" if b is None else "b")
        )
    given = {"Q": Q, "q": q, "G": G, "h": h, "A": A, "b": b}
    for name, t in given.items():
        if t is not None:
            check_tensor(name, t)
            if t.dim() not in (_RANKS[name], _RANKS[name] + 1):
                raise ValueError(
                    f"{name} must have {_RANKS[name]} dims, or {_RANKS[name] + 1} with a leading "
                    f"batch dim; got shape {tuple(t.shape)}"
                )
    n = q.shape[-1]
    batch = {k: t.shape[0] for k, t in given.items() if t is not None and t.dim() > _RANKS[k]}
    if len(set(batch.values())) > 1:
        raise ValueError(f"batch sizes differ: {batch}; use one batch size or unbatched inputs")
    B = next(iter(batch.values()), 1)
    m = G.shape[-2] if G is not None else 0
    p = A.shape[-2] if A is not None else 0
    want = {"Q": (n, n), "q": (n,), "G": (m, n), "h": (m,), "A": (p, n), "b": (p,)}
    for name, t in given.items():
        if t is not None and tuple(t.shape[-_RANKS[name] :]) != want[name]:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected (batch?, "
                f"{', '.join(map(str, want[name]))}) for n={n}, m={m}, p={p}"
            )
    dtype, device = q.dtype, q.device
    if check_psd:
        _check_psd(Q.detach())

    def bat(name: str, t: Tensor | None) -> Tensor:
        if t is None:
            shape = (B, 0, n) if _RANKS[name] == 2 else (B, 0)
            return torch.zeros(shape, dtype=wd, device=device)
        t = t.to(device=device, dtype=wd)
        return t if t.dim() > _RANKS[name] else t.expand(B, *t.shape)

    return _Problem(
        bat("Q", Q),
        bat("q", q),
        bat("G", G),
        bat("h", h),
        bat("A", A),
        bat("b", b),
        unbatched=not batch,
        dtype=dtype,
        device=device,
    )


def _check_psd(Q: Tensor) -> None:
    """``Q`` (``(n, n)`` or ``(B, n, n)``) is symmetric-part PSD up to a relative 1e-8."""
    Qs = 0.5 * (Q + Q.mT).to(torch.float64)
    scale = Qs.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
    eye = torch.eye(Qs.shape[-1], dtype=Qs.dtype, device=Qs.device)
    _, info = torch.linalg.cholesky_ex(Qs + 1e-8 * scale * eye)
    bad = torch.nonzero(info.reshape(-1) != 0).flatten().tolist()
    if bad:
        Qb = Qs.reshape(-1, *Qs.shape[-2:])[bad[0]]
        low = torch.linalg.eigvalsh(Qb)[0].item()
        where = f" for batch elements {_fmt(bad)}" if Q.dim() == 3 else ""
        raise ValueError(
            f"Q is not positive semidefinite{where} (smallest eigenvalue {low:.3g}); "
            "the QP is nonconvex. Use e.g. Q = L L' + eps I."
        )


def _fmt(idx: Sequence[int], k: int = 10) -> str:
    idx = list(idx)
    return str(idx[:k])[:-1] + (f", ... ({len(idx)} in all)]" if len(idx) > k else "]")


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------

_LAYER_CACHE: dict[tuple, Any] = {}


def _run_ipm(P: _Problem, args: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, QPSolution]:
    opts = {"tol": 1e-12, "max_iter": 60, **args}
    box: dict[str, Any] = {}
    x, lam, nu = _IPMFunction.apply(P.Q, P.q, P.G, P.h, P.A, P.b, opts, box)
    return x, lam, nu, box["solution"]


def _cvxpy_layer(backend: str, n: int, m: int, p: int, tuned: bool, args: dict[str, Any]):
    """The CVXPY statement of the QP, canonicalized once per (backend, sizes, settings)."""
    key = (backend, n, m, p, tuned, tuple(sorted((k, repr(v)) for k, v in args.items())))
    if key in _LAYER_CACHE:
        return _LAYER_CACHE[key]
    import cvxpy as cp

    from layers.backends import CvxpyProblemLayer

    x = cp.Variable(n)
    q = cp.Parameter(n)
    if get_backend(backend).solver == "MOREAU":  # QP-capable: parametric quad_form is DPP
        Qp = cp.Parameter((n, n), PSD=True)
        objective = 0.5 * cp.quad_form(x, Qp) + q @ x
    else:  # diffcp: a factor F with F'F = Q
        Qp = cp.Parameter((n, n))
        objective = 0.5 * cp.sum_squares(Qp @ x) + q @ x
    params, cons = [Qp, q], []
    if m:
        G, h = cp.Parameter((m, n)), cp.Parameter(m)
        cons.append(G @ x <= h)
        params += [G, h]
    if p:
        A, b = cp.Parameter((p, n)), cp.Parameter(p)
        cons.append(A @ x == b)
        params += [A, b]
    variables = [x] + [c.dual_variables[0] for c in cons]
    layer = CvxpyProblemLayer(
        cp.Problem(cp.Minimize(objective), cons),
        params,
        variables,
        backend=backend,
        tuned=tuned,
        solver_args=args,
    )
    _LAYER_CACHE[key] = layer
    return layer


def _factor(Q: Tensor) -> Tensor:
    """``F`` with ``F'F = Q`` (Cholesky, or a symmetric square root when Q is singular)."""
    L, info = torch.linalg.cholesky_ex(Q)
    F = L.mT
    if bool(info.any()):
        w, V = torch.linalg.eigh(Q)
        R = V * w.clamp_min(0).sqrt().unsqueeze(-2)
        F = torch.where((info != 0).view(-1, 1, 1), R.mT, F)
    return F


def _run_cvxpylayers(P: _Problem, backend: str, tuned: bool, args: dict[str, Any]):
    B, n, m, p = P.sizes
    layer = _cvxpy_layer(backend, n, m, p, tuned, args)
    Qd = 0.5 * (P.Q + P.Q.mT).detach()
    box: dict[str, Any] = {}
    q = _QGradLink.apply(P.q, P.Q, box) if P.Q.requires_grad else P.q
    first = Qd if get_backend(backend).solver == "MOREAU" else _factor(Qd)
    params = [first, q] + ([P.G, P.h] if m else []) + ([P.A, P.b] if p else [])
    out = layer(*params)
    x = out[0]
    box["x"] = x.detach()
    lam = out[1] if m else P.h.new_zeros(B, 0)
    nu = out[1 + bool(m)] if p else P.b.new_zeros(B, 0)
    return x, lam, nu


def _run_qpth(P: _Problem, tuned: bool, args: dict[str, Any]):
    from qpth.qp import QPFunction

    B, n, m, p = P.sizes
    G, h = P.G, P.h
    if m == 0:  # qpth needs an inequality: 0'x <= 1 is inactive
        G, h = P.q.new_zeros(B, 1, n), P.q.new_ones(B, 1)
    A, b = (P.A, P.b) if p else (torch.Tensor().to(P.q), torch.Tensor().to(P.q))
    opts = {
        "verbose": -1,
        "check_Q_spd": False,
        **get_backend("qpth").solver_args(tuned, True),
        **args,
    }
    fn = QPFunction(**opts)
    try:
        inputs = [0.5 * (P.Q + P.Q.mT), P.q, G, h, A, b]  # qpth uses Q as given: symmetrize
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
            inputs[1] = P.q.detach().requires_grad_()  # build the graph to read the duals
        with torch.enable_grad(), one_thread():
            x = fn(*inputs)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise SolverError(
            f"backend 'qpth' failed: {' '.join(lines[:2])} (qpth needs Q positive definite)"
        ) from err
    ctx = x.grad_fn
    lam = ctx.lams.detach()[:, :m] if m else P.q.new_zeros(B, 0)
    nu = ctx.nus.detach() if p else P.q.new_zeros(B, 0)
    if not (
        torch.is_grad_enabled() and any(t.requires_grad for t in [P.Q, P.q, P.G, P.h, P.A, P.b])
    ):
        x = x.detach()
    return x, lam, nu


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


def qp(
    Q: Tensor,
    q: Tensor,
    G: Tensor | None = None,
    h: Tensor | None = None,
    A: Tensor | None = None,
    b: Tensor | None = None,
    *,
    backend: str = "torch-ipm",
    duals: bool = False,
    tuned: bool = True,
    solver_args: dict[str, Any] | None = None,
    check: bool = True,
    check_tol: float | None = None,
    check_psd: bool = True,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Solve ``min 1/2 x'Qx + q'x s.t. Gx <= h, Ax = b`` and differentiate through the solution.

    Args:
        Q: ``(n, n)`` or ``(B, n, n)``, positive semidefinite (its symmetric part is used).
        q: ``(n,)`` or ``(B, n)``.
        G, h: ``(m, n)`` / ``(B, m, n)`` and ``(m,)`` / ``(B, m)``, or both None.
        A, b: ``(p, n)`` / ``(B, p, n)`` and ``(p,)`` / ``(B, p)``, or both None.
            Batched and unbatched inputs mix freely (unbatched ones are broadcast).
        backend: a name from :data:`layers.backends.BACKENDS` (``torch-ipm``, ``moreau``,
            ``diffcp-clarabel``, ``diffcp-scs``, ``diffcp-ecos``, ``qpth``).
        duals: also return the inequality and equality duals.
        tuned: use the library's accurate solver settings (False: the solver's own defaults).
        solver_args: extra settings for the backend (override ``tuned``).
        check: check every solution's relative KKT residuals (:func:`kkt_residuals`) and raise
            :class:`~layers.backends.SolverError` naming the elements above ``check_tol``.
        check_tol: the threshold; None uses the backend's (``Backend.check_tol``: 1e-6, but
            1e-5 for the diffcp backends, whose conic form of the quadratic objective limits
            their accuracy to about 1e-6, and for qpth, which stops with complementarity
            around 1e-6).
        check_psd: check that Q is PSD (a Cholesky of ``Q + 1e-8 |Q| I``).

    Returns:
        ``x`` of shape ``(B, n)`` (``(n,)`` if every input is unbatched), in ``q``'s dtype and
        device; with ``duals=True``, ``(x, lam, nu)`` with ``lam (B, m)``, ``nu (B, p)`` (the
        KKT convention ``Qx + q + G'lam + A'nu = 0``, ``lam >= 0``).

    Raises:
        SolverError: naming the batch elements that are infeasible, unbounded, or whose solution
            fails the KKT check.
        ValueError, TypeError: bad shapes, NaN/Inf, Q not PSD, unknown backend.
        ImportError: the backend's package is not installed.
    """
    be = get_backend(backend)
    args = dict(solver_args or {})
    P = _prepare(Q, q, G, h, A, b, check_psd, torch.float64)
    sol = None
    try:
        if be.kind == "torch":
            x, lam, nu, sol = _run_ipm(P, args)
        elif be.kind == "qpth":
            x, lam, nu = _run_qpth(P, tuned, args)
        else:
            x, lam, nu = _run_cvxpylayers(P, backend, tuned, args)
    except SolverError as err:
        msg = str(err).rstrip(". ")
        raise SolverError(f"{msg}. {_diagnose(P)}".strip(), _failed_elements(P)) from err

    if sol is not None and not bool(sol.info.ok.all()):
        bad = sol.info.failed()
        why = ", ".join(f"{i}: {STATUS_NAMES[int(sol.info.status[i])]}" for i in bad[:10])
        raise SolverError(
            f"qp ({backend}): no solution for batch elements {_fmt(bad)} ({why})", bad
        )
    if check_tol is None:
        check_tol = be.check_tol
    if check:
        with torch.no_grad():
            Qs = 0.5 * (P.Q + P.Q.mT)
            res = kkt_residuals(Qs, P.q, P.G, P.h, P.A, P.b, x.detach(), lam.detach(), nu.detach())
        worst = torch.stack(res).amax(0)
        bad = torch.nonzero(~(worst <= check_tol)).flatten().tolist()
        if bad:
            raise SolverError(
                f"qp ({backend}): the solution fails the KKT check (relative residual > "
                f"{check_tol:g}) for batch elements {_fmt(bad)}; worst {worst.max().item():.2e}. "
                f"{_diagnose(P, bad)}".strip(),
                bad,
            )
    if sol is not None and bool((sol.info.status == INACCURATE).any()):
        idx = torch.nonzero(sol.info.status == INACCURATE).flatten().tolist()
        warnings.warn(
            f"qp (torch-ipm): batch elements {_fmt(idx)} solved only to sqrt(tol) accuracy",
            RuntimeWarning,
            stacklevel=2,
        )

    outs = [t.to(dtype=P.dtype, device=P.device) for t in (x, lam, nu)]
    if P.unbatched:
        outs = [t.squeeze(0) for t in outs]
    return (outs[0], outs[1], outs[2]) if duals else outs[0]


def _failed_elements(P: _Problem) -> list[int]:
    try:
        return solve_qp(P.Q, P.q, P.G, P.h, P.A, P.b).info.failed()
    except Exception:  # diagnostics must never mask the original error
        return []


def _diagnose(P: _Problem, idx: Sequence[int] | None = None) -> str:
    """A sentence on what torch-ipm finds for the problem, to explain another backend's failure."""
    try:
        info = solve_qp(P.Q, P.q, P.G, P.h, P.A, P.b).info
    except Exception:
        return ""
    bad = info.failed()
    if bad:
        why = ", ".join(f"{i}: {STATUS_NAMES[int(info.status[i])]}" for i in bad[:10])
        return f"torch-ipm finds no solution for batch elements {_fmt(bad)} ({why})."
    if idx:
        return "torch-ipm solves them: the backend is inaccurate here."
    return ""


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------

_INPUTS = ("q", "G", "h", "A", "b")


class OptNetQP(nn.Module):
    """OptNet layer with learnable QP data in the paper's always-feasible parameterization.

    ``Q = L L' + eps I`` (``L`` lower triangular), ``h = G z0 + s0`` with ``s0 = softplus(.) > 0``,
    ``b = A z0``: the point ``z0`` is always feasible, whatever the parameters. Any of
    ``q, G, h, A, b`` can instead come from the input (``inputs``); ``h`` and ``b`` are then built
    from the input ``G`` / ``A`` and remain feasible unless ``h`` or ``b`` themselves are inputs.

    Args:
        n: number of variables.
        m: number of inequalities (0 for none).
        p: number of equalities (0 for none; ``p < n`` keeps ``A`` generically full rank).
        inputs: which of ``"q", "G", "h", "A", "b"`` forward takes, in that order of arguments.
        eps: the ridge in ``Q``.
        backend, tuned, solver_args, check_tol: as in :func:`qp`.

    Shapes: forward takes the chosen inputs batched (``q (B, n)``, ``G (B, m, n)``, ``h (B, m)``,
    ``A (B, p, n)``, ``b (B, p)``) or unbatched, and returns ``x (B, n)``; with ``duals=True``
    also ``lam (B, m)`` and ``nu (B, p)``.
    """

    def __init__(
        self,
        n: int,
        m: int,
        p: int = 0,
        *,
        inputs: Sequence[str] = ("q",),
        eps: float = 1e-4,
        backend: str = "torch-ipm",
        tuned: bool = True,
        solver_args: dict[str, Any] | None = None,
        check_tol: float | None = None,
        duals: bool = False,
    ):
        super().__init__()
        for name, v in (("n", n), ("m", m + 1), ("p", p + 1)):
            if int(v) != v or v <= 0:
                raise ValueError(f"{name} must be a positive integer (m, p may be 0), got {v}")
        check_positive("eps", eps)
        unknown = [k for k in inputs if k not in _INPUTS]
        if unknown or len(set(inputs)) != len(inputs):
            raise ValueError(f"inputs must be distinct names from {_INPUTS}, got {tuple(inputs)}")
        if (m == 0 and {"G", "h"} & set(inputs)) or (p == 0 and {"A", "b"} & set(inputs)):
            raise ValueError(f"inputs {tuple(inputs)} name constraints that m={m}, p={p} exclude")
        get_backend(backend)
        self.n, self.m, self.p, self.eps = n, m, p, float(eps)
        self.inputs = tuple(k for k in _INPUTS if k in inputs)
        self.order = tuple(inputs)
        self.backend, self.tuned, self.duals = backend, tuned, duals
        self.solver_args, self.check_tol = dict(solver_args or {}), check_tol

        self.L = nn.Parameter(torch.eye(n) + 0.1 * torch.randn(n, n).tril(-1))
        self.z0 = nn.Parameter(torch.zeros(n))
        self.q = nn.Parameter(torch.zeros(n)) if "q" not in inputs else None
        self.G = nn.Parameter(torch.randn(m, n) / math.sqrt(n)) if m and "G" not in inputs else None
        self.s0 = nn.Parameter(torch.full((m,), math.log(math.e - 1))) if m else None
        self.A = nn.Parameter(torch.randn(p, n) / math.sqrt(n)) if p and "A" not in inputs else None

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, m={self.m}, p={self.p}, inputs={self.order}, eps={self.eps}, "
            f"backend={self.backend!r}"
        )

    def qp_data(self, *args: Tensor, **kwargs: Tensor) -> dict[str, Tensor | None]:
        """The QP data ``Q, q, G, h, A, b`` for these inputs (given positionally in ``inputs``
        order or by name)."""
        if len(args) > len(self.order):
            raise TypeError(
                f"expected at most {len(self.order)} inputs {self.order}, got {len(args)}"
            )
        given = dict(zip(self.order, args))
        for k, v in kwargs.items():
            if k not in self.order or k in given:
                raise TypeError(
                    f"unexpected or repeated input {k!r}; this layer takes {self.order}"
                )
            given[k] = v
        missing = [k for k in self.order if k not in given]
        if missing:
            raise TypeError(f"missing inputs {missing}; this layer takes {self.order}")
        ref = next(iter(given.values()), self.L)
        dt, dev = ref.dtype, ref.device
        L = self.L.to(dt).tril()
        Q = L @ L.mT + self.eps * torch.eye(self.n, dtype=dt, device=dev)
        z0 = self.z0.to(dt)
        data: dict[str, Tensor | None] = {"Q": Q, "q": given.get("q", self.q)}
        G = given.get("G", self.G)
        if self.m:
            data["G"] = G
            data["h"] = (
                given["h"] if "h" in given else _mv_any(G, z0) + nn.functional.softplus(self.s0)
            )
        A = given.get("A", self.A)
        if self.p:
            data["A"] = A
            data["b"] = given["b"] if "b" in given else _mv_any(A, z0)
        return {k: (v.to(dt) if v is not None else None) for k, v in data.items()}

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        data = self.qp_data(*args, **kwargs)
        return qp(
            data["Q"],
            data["q"],
            data.get("G"),
            data.get("h"),
            data.get("A"),
            data.get("b"),
            backend=self.backend,
            duals=self.duals,
            tuned=self.tuned,
            solver_args=self.solver_args,
            check_tol=self.check_tol,
            check_psd=False,
        )


def _mv_any(M: Tensor, v: Tensor) -> Tensor:
    """``M @ v`` for ``M (m, n)`` or ``(B, m, n)`` and ``v (n,)``."""
    return M @ v
