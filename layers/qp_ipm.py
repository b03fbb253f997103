"""The project's QP solver: a batched dense primal-dual interior-point method, and its adjoint.

    minimize 1/2 x'Qx + q'x   subject to  Gx <= h,  Ax = b     (for each batch element)

* :func:`solve_qp` -- Mehrotra predictor-corrector in pure torch, float64 internally, on any
  device, no Python loop over batch elements. On the CPU, inequality-only problems (after
  eliminating equalities) run the same method one element at a time in a compiled loop
  (:mod:`layers._qp_kernel`, numba), where each element's matrices stay in cache; what it
  leaves unsolved goes to the batched code. It returns a :class:`QPSolution` with an info
  record (:class:`QPInfo`: iterations, residuals, status codes from :data:`STATUS_NAMES`).
* :func:`kkt_residuals` -- primal, dual and complementarity residuals of a candidate solution.
* :func:`solve_qp_differentiable` -- :func:`solve_qp` as an autograd function whose backward
  applies the implicit function theorem to the KKT conditions at the solution (OptNet eqs.
  6-8), solved with the same KKT machinery as the forward pass plus iterative refinement (on
  the CPU, for inequality-only float64 problems, one element at a time by the compiled loop).
  It covers all six inputs and the duals as outputs.

This module knows nothing of backends: the layer (:mod:`layers.qp`) passes the settings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from layers._batched import Cholesky, add_diag, amax, dot, max_step, threads_for
from layers._checks import check_tensor

__all__ = [
    "INACCURATE",
    "INFEASIBLE",
    "MAX_ITER",
    "NUMERICAL",
    "RUNNING",
    "SOLVED",
    "STATUS_NAMES",
    "UNBOUNDED",
    "QPInfo",
    "QPSolution",
    "kkt_residuals",
    "solution_scale",
    "solve_qp",
    "solve_qp_differentiable",
]

_STALL = 20  # iterations without a 10% better merit before an element is stopped
_SMALL = 64  # n + p up to which _KKT factorizes the augmented matrix with one LU
_REFINED = 1e-14  # relative residual at which the backward's refinement stops
_STEP = 0.999  # fraction of the step to the boundary of s, lam >= 0
_ROW_FLOOR = 1e-3  # rows of G are scaled to norm 1, or to >= this fraction of the longest
_REFINE = 1  # refinement steps of the corrector when the cap perturbed the matrix
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
    _Q: Tensor | None = field(default=None, repr=False)  # (Q + Q') / 2 in the working dtype


# ----------------------------------------------------------------------------------------------
# KKT systems
# ----------------------------------------------------------------------------------------------


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
        if d is None or m == 0:
            Hr = add_diag(Q, reg)
        else:  # a fresh tensor: the regularization goes in place
            Hr = torch.baddbmm(Q, G.mT, d * G)
            Hr.diagonal(dim1=-2, dim2=-1).add_(reg.squeeze(-1))
        self.Hr, self.reg, self.A = Hr, reg, A
        self.n, self.p = Hr.shape[-1], A.shape[-2]
        self.lu: Tensor | None = None
        if self.p == 0 or self.n + self.p > _SMALL:
            chol = Cholesky(Hr)
            if not bool(chol.info.any()):
                self.chol = chol
                if self.p == 0:
                    return
                self.HiAt = chol.solve(A.mT)  # (B, n, p)
                schur = Cholesky(add_diag(torch.bmm(A, self.HiAt), reg))
                if not bool(schur.info.any()):
                    self.schur = schur
                    return
        reg_d = -reg.squeeze(-1).expand(-1, self.p)
        K = torch.cat([torch.cat([Hr, A.mT], -1), torch.cat([A, torch.diag_embed(reg_d)], -1)], -2)
        self.lu, self.piv, _ = torch.linalg.lu_factor_ex(K)

    def _raw(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        if self.lu is not None:
            sol = torch.linalg.lu_solve(self.lu, self.piv, torch.cat([r1, r2], -2))
            return sol[:, : self.n], sol[:, self.n :]
        Hir1 = self.chol.solve(r1)
        if self.p == 0:
            return Hir1, r2
        dnu = self.schur.solve(torch.bmm(self.A, Hir1) - r2)
        return Hir1 - torch.bmm(self.HiAt, dnu), dnu

    def solve(self, r1: Tensor, r2: Tensor, refine: int = 0) -> tuple[Tensor, Tensor]:
        """Solve ``H dx + A' dnu = r1, A dx = r2`` (columns) with ``refine`` refinement steps."""
        dx, dnu = self._raw(r1, r2)
        for _ in range(refine):
            e1 = r1 - torch.bmm(self.Hr, dx) + self.reg * dx  # residual of H = Hr - reg I
            if self.p:
                e1 = e1 - torch.bmm(self.A.mT, dnu)
            e2 = r2 - torch.bmm(self.A, dx) if self.p else r2
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
    pres = torch.maximum(amax((-slack).clamp_min(0)), amax(torch.bmm(A, x) - b))
    pres = pres / (1 + torch.maximum(amax(h), amax(b))) + amax((-lam).clamp_min(0))
    scale = torch.maximum(torch.maximum(amax(Qx), amax(q)), torch.maximum(amax(Gtl), amax(Atn)))
    dres = amax(Qx + q + Gtl + Atn) / (1 + scale)
    obj = 0.5 * dot(x, Qx) + dot(q, x)
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
        ph1 = _solve_qp(Q1, q1, G1, h1, A1, b1, tol=1e-9, classify=False)
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
        box = _solve_qp(Q, q, Gb, hb, A if p else None, b if p else None, tol=1e-9, classify=False)
        hits = ((box.x - x0).abs().amax(-1, keepdim=True) > 0.5 * R).squeeze(-1)
        code = torch.where(feasible & box.info.ok & hits, UNBOUNDED, code)
    return code


# ----------------------------------------------------------------------------------------------
# The interior-point solver, in named steps. Inside, vectors are columns ``(B, k, 1)`` and
# per-element scalars ``(B, 1, 1)``.
# ----------------------------------------------------------------------------------------------


@dataclass
class _Scaled:
    """The problem with unit-norm rows of ``G`` and ``A`` (``gs``, ``as_`` the row norms), in
    column form, with the per-element scales the solver uses."""

    Q: Tensor
    q: Tensor
    G: Tensor
    h: Tensor
    A: Tensor
    b: Tensor
    gs: Tensor
    as_: Tensor
    reg: Tensor  # static regularization of factorized matrices
    dcap: Tensor  # cap on lam/s in factorized matrices
    pscale: Tensor  # 1 + max(|h|, |b|): the primal residual's scale
    qmax: Tensor  # |q|: part of the dual residual's scale

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return self.q.shape[0], self.q.shape[1], self.G.shape[-2], self.A.shape[-2]


def _equilibrate(Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> _Scaled:
    """Row equilibration: unit-norm rows of G and A (zero rows stay as they are)."""
    B = q.shape[0]
    gs = G.norm(dim=-1, keepdim=True)
    # rows much shorter than the longest keep part of their scale: a unit row would carry
    # a huge right-hand side (an almost-parallel constraint far away), which stalls the method
    floor = _ROW_FLOOR * amax(gs) if G.shape[-2] else gs
    gs = torch.where(gs > 0, gs.clamp_min(floor), 1.0)
    as_ = A.norm(dim=-1, keepdim=True)
    as_ = torch.where(as_ > 0, as_, 1.0)
    G, h = G / gs, h.unsqueeze(-1) / gs
    A, b = A / as_, b.unsqueeze(-1) / as_
    q = q.unsqueeze(-1)
    qdiag = 1 + Q.diagonal(dim1=-2, dim2=-1).abs().amax(-1).view(B, 1, 1)
    return _Scaled(
        Q,
        q,
        G,
        h,
        A,
        b,
        gs,
        as_,
        reg=1e-11 * qdiag,
        dcap=_DCAP * qdiag,
        pscale=1 + torch.maximum(amax(h), amax(b)),
        qmax=amax(q),
    )


@dataclass
class _Iterate:
    """A primal-dual point: ``x (B, n, 1)``, slacks ``s`` and duals ``lam (B, m, 1)``, equality
    duals ``nu (B, p, 1)``."""

    x: Tensor
    s: Tensor
    lam: Tensor
    nu: Tensor

    def where(self, mask: Tensor, other: _Iterate) -> _Iterate:
        """This point where ``mask (B, 1, 1)`` holds, ``other`` elsewhere."""
        return _Iterate(*(torch.where(mask, v, ov) for v, ov in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.x, self.s, self.lam, self.nu


@dataclass
class _Residuals:
    """Residual vectors (stationarity ``rx``, inequalities ``rz``, equalities ``ry``) and the
    relative measures ``pres``, ``dres``, ``gap`` (each ``(B, 1, 1)``)."""

    rx: Tensor
    rz: Tensor
    ry: Tensor
    pres: Tensor
    dres: Tensor
    gap: Tensor

    @property
    def merit(self) -> Tensor:
        return torch.maximum(torch.maximum(self.pres, self.dres), self.gap)


def _residuals(pb: _Scaled, pt: _Iterate) -> _Residuals:
    x, s, lam, nu = pt.fields()
    Qx, Gtl = torch.bmm(pb.Q, x), torch.bmm(pb.G.mT, lam)
    rx = Qx + pb.q + Gtl
    dscale = torch.maximum(torch.maximum(amax(Qx), pb.qmax), amax(Gtl))
    rz = torch.bmm(pb.G, x) + s - pb.h
    pres = amax(rz)
    if pb.A.shape[-2]:
        Atn = torch.bmm(pb.A.mT, nu)
        rx = rx + Atn
        dscale = torch.maximum(dscale, amax(Atn))
        ry = torch.bmm(pb.A, x) - pb.b
        pres = torch.maximum(pres, amax(ry))
    else:
        ry = pb.b
    obj = 0.5 * dot(x, Qx) + dot(pb.q, x)
    gap = dot(s, lam) / (1 + obj.abs())
    return _Residuals(rx, rz, ry, pres / pb.pscale, amax(rx) / (1 + dscale), gap)


def _status_from_merit(merit: Tensor, tol: float, otherwise: Tensor | int) -> Tensor:
    """SOLVED below ``tol``, INACCURATE below ``sqrt(tol)``, ``otherwise`` elsewhere."""
    status = torch.where(merit <= math.sqrt(tol), INACCURATE, otherwise)
    return torch.where(merit <= tol, SOLVED, status)


def _solve_eliminated(
    pb: _Scaled, ns: tuple[Tensor, Tensor, Tensor], tol: float, max_iter: int, wd: torch.dtype
) -> tuple[_Iterate, Tensor, int]:
    """Eliminate the equalities once: ``x = xp + Z y`` with ``A xp = b`` and ``A Z = 0``, then
    solve the inequality-constrained QP in ``y`` (``n - p`` variables, no Schur complement per
    iteration). Returns the point, the status ``(B, 1, 1)`` and the iteration count."""
    B, n, _, p = pb.sizes
    Q, q, G, h = pb.Q, pb.q, pb.G, pb.h
    Y, Z, R = ns
    xp = torch.bmm(Y, torch.linalg.solve_triangular(R.mT, pb.b, upper=False))
    if n == p:  # x is fixed by the equalities
        x = xp
        s = h - torch.bmm(G, x)
        lam = torch.zeros_like(s)
        ok = s.amin(-2, keepdim=True) >= -math.sqrt(tol) * pb.pscale
        status = torch.where(ok, SOLVED, INFEASIBLE)
        s = s.clamp_min(0)
        it = 0
    else:
        QZ = torch.bmm(Q, Z)
        sub = _solve_qp(
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
    r = torch.bmm(Q, x) + q + torch.bmm(G.mT, lam)
    nu = -torch.linalg.solve_triangular(R, torch.bmm(Y.mT, r), upper=True)
    return _Iterate(x, s, lam, nu), status, it


def _solve_equality_only(pb: _Scaled, tol: float) -> tuple[_Iterate, Tensor]:
    """Equality-constrained or unconstrained: one KKT solve (plus refinement)."""
    B = pb.q.shape[0]
    x, nu = _KKT(pb.Q, pb.G, pb.A, None, pb.reg).solve(-pb.q, pb.b, refine=2)
    s = lam = pb.q.new_zeros(B, 0, 1)
    pt = _Iterate(x, s, lam, nu)
    res = _residuals(pb, pt)
    merit = torch.maximum(res.pres, res.dres)
    fail = torch.where(res.pres > math.sqrt(tol), INFEASIBLE, UNBOUNDED)
    return pt, _status_from_merit(merit, tol, fail)


def _initial_point(pb: _Scaled) -> _Iterate:
    """CVXOPT-style initial point: solve with D = I, then shift s and lam into the interior."""
    x, nu = _KKT(pb.Q, pb.G, pb.A, torch.ones_like(pb.h), pb.reg).solve(
        -pb.q + torch.bmm(pb.G.mT, pb.h), pb.b
    )
    s = pb.h - torch.bmm(pb.G, x)
    lam = -s
    smin, lmin = s.amin(-2, keepdim=True), lam.amin(-2, keepdim=True)
    s = s + torch.where(smin <= 0, 1 - smin, 0.0)
    lam = lam + torch.where(lmin <= 0, 1 - lmin, 0.0)
    return _Iterate(x, s, lam, nu)


class _NewtonSystem:
    """The Newton system at one iterate, through one factorization of the reduced matrix
    ``Q + G' diag(d) G`` (``d = lam/s``).

    The factorized matrix caps ``lam/s`` (as if ``s`` were larger, ``sp``): near the solution
    ``lam/s`` spans 1e-16..1e16 and the reduced matrix would be numerically singular.
    Refinement against the true Newton system removes the perturbation.
    """

    def __init__(self, pb: _Scaled, pt: _Iterate):
        self.pb, self.s, self.lam = pb, pt.s, pt.lam
        d = pt.lam / pt.s
        self.capped = d > pb.dcap
        self.d = torch.where(self.capped, pb.dcap, d)
        self.sp = torch.where(self.capped, pt.lam / pb.dcap, pt.s)
        self.kkt = _KKT(pb.Q, pb.G, pb.A, self.d, pb.reg)

    def _reduced(self, f1: Tensor, f2: Tensor, f3: Tensor, f4: Tensor) -> tuple[Tensor, ...]:
        G = self.pb.G
        t = (f2 - self.lam * f3) / self.sp
        dx, dnu = self.kkt.solve(f1 - torch.bmm(G.mT, t), f4)
        Gdx = torch.bmm(G, dx)
        return dx, f3 - Gdx, t + self.d * Gdx, dnu

    def solve(
        self, f1: Tensor, f2: Tensor, f3: Tensor, f4: Tensor, refine: int
    ) -> tuple[Tensor, ...]:
        """Solve the full Newton system (right-hand side f1..f4) via the reduced one:

        Q dx + G'dlam + A'dnu = f1;  lam*ds + s*dlam = f2;  G dx + ds = f3;  A dx = f4.
        """
        Q, G, A = self.pb.Q, self.pb.G, self.pb.A
        p = A.shape[-2]
        dx, ds, dlam, dnu = self._reduced(f1, f2, f3, f4)
        for _ in range(refine):
            e1 = (
                f1 - torch.bmm(Q, dx) - torch.bmm(G.mT, dlam) - (torch.bmm(A.mT, dnu) if p else 0.0)
            )
            e2 = f2 - self.lam * ds - self.s * dlam
            e3 = torch.zeros_like(f3)  # ds = f3 - G dx holds by construction (_reduced)
            e4 = f4 - torch.bmm(A, dx) if p else f4
            cx, cs, cl, cn = self._reduced(e1, e2, e3, e4)
            dx, ds, dlam, dnu = dx + cx, ds + cs, dlam + cl, dnu + cn
        return dx, ds, dlam, dnu


def _predictor_corrector(pb: _Scaled, pt: _Iterate, res: _Residuals) -> tuple[_Iterate, Tensor]:
    """Mehrotra's step: the predictor (affine scaling) direction, then the corrector. Returns
    the direction and its step length ``(B, 1, 1)`` (NaN where the direction has a NaN)."""
    s, lam = pt.s, pt.lam
    m = s.shape[-2]
    newton = _NewtonSystem(pb, pt)
    rs = s * lam
    mu = rs.sum(-2, keepdim=True) / m
    dx, ds, dlam, dnu = newton.solve(-res.rx, -rs, -res.rz, -res.ry, 0)
    a = torch.minimum(max_step(s, ds), max_step(lam, dlam)).clamp(max=1.0)
    mu_aff = dot(s + a * ds, lam + a * dlam) / m
    sigma = (mu_aff / mu).clamp(0, 1) ** 3
    rs = rs + ds * dlam - sigma * mu
    # Refinement only pays when the cap perturbed the factorized matrix.
    refine = _REFINE if bool(newton.capped.any()) else 0
    dx, ds, dlam, dnu = newton.solve(-res.rx, -rs, -res.rz, -res.ry, refine)
    # 0.999 of the way to the boundary (as qpth).
    a = (_STEP * torch.minimum(max_step(s, ds), max_step(lam, dlam))).clamp(max=1.0)
    return _Iterate(dx, ds, dlam, dnu), a


def _take_step(
    pt: _Iterate, step: _Iterate, a: Tensor, status: Tensor, running: Tensor, n_running: int
) -> tuple[_Iterate, Tensor]:
    """Move the running elements by ``a`` along ``step``; a non-finite ``a`` (a NaN anywhere in
    the direction) stops the element with NUMERICAL."""
    finite = torch.isfinite(a)
    if n_running == pt.x.shape[0] and bool(finite.all()):
        return _Iterate(*(v + a * dv for v, dv in zip(pt.fields(), step.fields()))), status
    status = status.masked_fill(running & ~finite, NUMERICAL)
    upd = running & finite
    a = a.masked_fill(~upd, 0.0)
    moved = _Iterate(
        *(torch.where(upd, v + a * dv, v) for v, dv in zip(pt.fields(), step.fields()))
    )
    return moved, status


@dataclass
class _Progress:
    """The best iterate so far per element and the stall counter."""

    best: _Iterate
    best_merit: Tensor
    stall: Tensor

    def update(self, pt: _Iterate, merit: Tensor, running: Tensor) -> None:
        improved = running & (merit < self.best_merit)
        self.best = pt if bool(improved.all()) else pt.where(improved, self.best)
        self.stall = (self.stall + 1).masked_fill_(running & (merit < 0.9 * self.best_merit), 0)
        self.best_merit = torch.where(improved, merit, self.best_merit)


def _interior_point(
    pb: _Scaled, tol: float, max_iter: int
) -> tuple[_Iterate, Tensor, int, _Residuals]:
    """The predictor-corrector loop. Converged elements are frozen while the rest continue; an
    element whose merit stops improving is stopped at its best iterate. Once a quarter of the
    working set has stopped, the loop continues on the running elements only (the last
    iterations of a batch often concern a few elements)."""
    B = pb.q.shape[0]
    dev = pb.q.device
    pt = _initial_point(pb)
    status = torch.full((B, 1, 1), RUNNING, dtype=torch.long, device=dev)
    progress = _Progress(
        pt,
        torch.full((B, 1, 1), math.inf, dtype=pb.q.dtype, device=dev),
        torch.zeros((B, 1, 1), dtype=torch.long, device=dev),
    )
    full = _Working(pb, pt, status, progress)  # the whole batch, updated when the set shrinks
    work, idx = full, None
    it = 1
    for it in range(1, max_iter + 1):  # noqa: B007 (``it`` is reported after the loop)
        res = _residuals(work.pb, work.pt)
        running = work.status == RUNNING
        merit = res.merit
        work.progress.update(work.pt, merit, running)
        work.status = work.status.masked_fill(running & (merit <= tol), SOLVED)
        stalled = (work.status == RUNNING) & (work.progress.stall >= _STALL)
        work.status = work.status.masked_fill_(stalled, MAX_ITER)
        running = work.status == RUNNING
        n_running = int(running.sum())
        if n_running == 0:
            break
        if 4 * n_running <= 3 * running.shape[0]:  # shrink the working set
            full.put(idx, work)
            keep = torch.nonzero(running.flatten()).flatten()
            idx = keep if idx is None else idx[keep]
            work = full.take(idx)
            res = _Residuals(*(v[keep] for v in _values(res)))
            running = work.status == RUNNING
        step, a = _predictor_corrector(work.pb, work.pt, res)
        work.pt, work.status = _take_step(work.pt, step, a, work.status, running, n_running)
    full.put(idx, work)
    pt, status, res = _report_best(pb, full.pt, full.progress.best, full.status, tol)
    return pt, status, res, it


@functools.lru_cache(maxsize=1)
def _qp_kernel() -> Any:
    """:mod:`layers._qp_kernel` (numba), or None without numba."""
    try:
        import layers._qp_kernel as kernel
    except ImportError:  # pragma: no cover - numba is a dependency; the batched path still works
        return None
    return kernel


use_compiled = True  # False: the batched solver on the CPU too (the tests compare both)


def _interior_point_any(
    pb: _Scaled, tol: float, max_iter: int
) -> tuple[_Iterate, Tensor, _Residuals, int]:
    """:func:`_interior_point`'s result. Inequality-only float64 problems on the CPU are solved
    one element at a time by the compiled loop of :mod:`layers._qp_kernel` (each element's
    matrices stay in cache); the elements it leaves unsolved, and every other problem, by the
    batched solver. The batch is split over ``torch.get_num_threads()`` threads."""
    B, n, m, p = pb.sizes
    kernel = _qp_kernel() if use_compiled else None
    if kernel is None or p or pb.q.device.type != "cpu" or pb.q.dtype != torch.float64:
        return _interior_point(pb, tol, max_iter)
    x, s, lam = pb.q.new_empty(B, n), pb.q.new_empty(B, m), pb.q.new_empty(B, m)
    iters, merit = torch.empty(B, dtype=torch.long), pb.q.new_empty(B)
    data = [v.contiguous().numpy() for v in (pb.Q, pb.q.view(B, n), pb.G, pb.h.view(B, m))]
    scales = [v.reshape(B).contiguous().numpy() for v in (pb.reg, pb.dcap, pb.pscale, pb.qmax)]
    outs = [v.numpy() for v in (x, s, lam, iters, merit)]

    def solve(part: slice) -> None:
        kernel.solve_batch(
            *(v[part] for v in data + scales), tol, max_iter, *(v[part] for v in outs)
        )

    _split(solve, B)
    pt = _Iterate(x.unsqueeze(-1), s.unsqueeze(-1), lam.unsqueeze(-1), pb.q.new_zeros(B, 0, 1))
    res = _residuals(pb, pt)
    solved = (res.merit.flatten() <= tol) & (merit <= tol)  # the loop's own verdict too
    status = torch.where(solved, SOLVED, RUNNING).view(B, 1, 1)
    it = int(iters.max())
    left = torch.nonzero(~solved).flatten()
    if left.numel():
        sub = _Scaled(*(v[left] for v in _values(pb)))
        pt2, status2, res2, it2 = _interior_point(sub, tol, max_iter)
        pt = _Iterate(*(v.index_copy(0, left, v2) for v, v2 in zip(pt.fields(), pt2.fields())))
        res = _Residuals(*(v.index_copy(0, left, v2) for v, v2 in zip(_values(res), _values(res2))))
        status, it = status.index_copy(0, left, status2), max(it, it2)
    return pt, status, res, it


def _values(obj: Any) -> list[Any]:
    """A dataclass's field values (not copies, unlike ``dataclasses.astuple``)."""
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]


@dataclass
class _Working:
    """The solver's state on a set of batch elements: problem, iterate, status, progress."""

    pb: _Scaled
    pt: _Iterate
    status: Tensor
    progress: _Progress

    def take(self, idx: Tensor) -> _Working:
        """The state of elements ``idx`` (a copy)."""
        pb = _Scaled(*(v[idx] for v in _values(self.pb)))
        sel = [self.pt, self.progress.best]
        pt, best = (_Iterate(*(v[idx] for v in p.fields())) for p in sel)
        pr = _Progress(best, self.progress.best_merit[idx], self.progress.stall[idx])
        return _Working(pb, pt, self.status[idx], pr)

    def put(self, idx: Tensor | None, part: _Working) -> None:
        """Write ``part`` (the state of elements ``idx``; None: all) into this state."""
        if idx is None:
            self.pt, self.status, self.progress = part.pt, part.status, part.progress
            return

        def put(full: _Iterate, sub: _Iterate) -> _Iterate:
            return _Iterate(*(f.index_copy(0, idx, v) for f, v in zip(full.fields(), sub.fields())))

        self.pt = put(self.pt, part.pt)
        self.status = self.status.index_copy(0, idx, part.status)
        pr = self.progress
        self.progress = _Progress(
            put(pr.best, part.progress.best),
            pr.best_merit.index_copy(0, idx, part.progress.best_merit),
            pr.stall.index_copy(0, idx, part.progress.stall),
        )


def _report_best(
    pb: _Scaled, pt: _Iterate, best: _Iterate, status: Tensor, tol: float
) -> tuple[_Iterate, Tensor, _Residuals]:
    """Elements that did not converge: report the best iterate, classified by its merit."""
    left = status != SOLVED
    if not bool(left.any()):
        return pt, status, _residuals(pb, pt)
    pt = best.where(left, pt)
    res = _residuals(pb, pt)
    merit = res.merit
    usable = _status_from_merit(merit, tol, MAX_ITER)
    finite = torch.isfinite(merit) & torch.isfinite(pt.x).all(-2, keepdim=True)
    status = torch.where(left, torch.where(finite, usable, NUMERICAL), status)
    return pt, status, res


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
        tol: relative tolerance on primal residual, dual residual and duality gap. (The layer
            passes ``BACKENDS["torch-ipm"]``'s settings.)
        max_iter: iteration limit.
        dtype: working precision (float64 by default; None keeps the input's).
        classify: find out why failed elements failed (infeasible, unbounded), by solving small
            auxiliary problems for them only.

    Bad input (:mod:`layers._checks`' policy): ``TypeError`` / ``ValueError`` naming the
    argument for non-floating, meta or non-finite data, wrong shapes and ``n = 0``; an empty
    batch (``B = 0``) gives an empty :class:`QPSolution` without a solve.

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
    _check_qp_inputs(Q, q, G, h, A, b)
    if q.shape[0] == 0:
        wd = dtype or q.dtype
        n = q.shape[1]
        m = 0 if G is None else G.shape[1]
        p = 0 if A is None else A.shape[1]

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=wd, device=q.device)

        status = torch.zeros(0, dtype=torch.long, device=q.device)
        info = QPInfo(0, status, zeros(0), zeros(0), zeros(0))
        return QPSolution(zeros(0, n), zeros(0, m), zeros(0, p), zeros(0, m), info)
    return _solve_qp(Q, q, G, h, A, b, tol=tol, max_iter=max_iter, dtype=dtype, classify=classify)


def _check_qp_inputs(
    Q: Tensor, q: Tensor, G: Tensor | None, h: Tensor | None, A: Tensor | None, b: Tensor | None
) -> None:
    """:func:`solve_qp`'s inputs are finite floating tensors of its shapes, ``n >= 1``."""
    if (G is None) != (h is None) or (A is None) != (b is None):
        raise ValueError("give G and h together and A and b together (or neither of a pair)")
    check_tensor("q", q, dims=(2,))
    B, n = q.shape
    if n == 0:
        raise ValueError(f"q has shape {(B, n)}: the QP needs at least one variable (n >= 1)")
    m = p = 0
    if G is not None:
        check_tensor("G", G, dims=(3,))
        m = G.shape[1]
    if A is not None:
        check_tensor("A", A, dims=(3,))
        p = A.shape[1]
    want = {"Q": (B, n, n), "G": (B, m, n), "h": (B, m), "A": (B, p, n), "b": (B, p)}
    for name, t in (("Q", Q), ("G", G), ("h", h), ("A", A), ("b", b)):
        if t is None:
            continue
        check_tensor(name, t)
        if tuple(t.shape) != want[name]:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {want[name]} for q of shape "
                f"{(B, n)}"
                + (f" and m={m}" if name in "Gh" else f" and p={p}" if name in "Ab" else "")
            )


@torch.no_grad()
def _solve_qp(
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
    """:func:`solve_qp` without its input checks (for data already checked, and the auxiliary
    problems built inside this module)."""
    wd = dtype or q.dtype
    G, h, A, b = _empty_constraints(q, G, h, A, b)
    Q, q, G, h, A, b = (t.to(wd) for t in (Q, q, G, h, A, b))
    Q = 0.5 * (Q + Q.mT)
    n = q.shape[1]
    m, p = G.shape[-2], A.shape[-2]
    # Data far from unit size are solved as x = beta y (see solution_scale): the residual tests
    # add 1 to data norms, and x'Qx overflows for x near 1e160, so both need data near 1.
    beta = solution_scale(Q, q, G, h, A, b)
    if beta is not None:
        q, h, b = q / beta, h / beta, b / beta
    pb = _equilibrate(Q, q, G, h, A, b)

    ns = _null_space(pb.A) if p and m and (4 * p >= n or n + p <= _SMALL) else None
    if ns is not None:
        pt, status, it = _solve_eliminated(pb, ns, tol, max_iter, wd)
        res = _residuals(pb, pt)
    elif m == 0:
        pt, status = _solve_equality_only(pb, tol)
        res, it = _residuals(pb, pt), 1
    else:
        pt, status, res, it = _interior_point_any(pb, tol, max_iter)

    status = status.flatten()
    if classify:
        _classify_failures(pb, status)
    info = QPInfo(
        iterations=it,
        status=status,
        primal_residual=res.pres.flatten(),
        dual_residual=res.dres.flatten(),
        gap=res.gap.flatten(),
    )
    x, lam = pt.x.squeeze(-1), (pt.lam / pb.gs).squeeze(-1)
    nu, slack = (pt.nu / pb.as_).squeeze(-1), (pt.s * pb.gs).squeeze(-1)
    if beta is not None:
        x, lam, nu, slack = x * beta, lam * beta, nu * beta, slack * beta
    return QPSolution(x=x, lam=lam, nu=nu, slack=slack, info=info, _nullspace=ns, _Q=Q)


# Data whose size is within 2**+-30 of 1 are solved as they are.
_SCALE_WINDOW = 2.0**30


def solution_scale(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor
) -> Tensor | None:
    """``(B, 1)`` powers of two ``beta`` near each element's data size
    ``max(|q| / max(1, max|diag Q|), |h_i| / |G_i|, |b_i| / |A_i|)`` where that size is beyond
    ``2**+-30`` (1 elsewhere), or None when no element needs one.

    With ``x = beta y`` the QP in ``y`` has data ``(Q, q / beta, G, h / beta, A, b / beta)``
    (the objective divided by ``beta**2``) and duals ``lam / beta``, ``nu / beta``: data of
    order 1, where the residual tests (which add 1 to data norms) and products like ``x'Qx``
    (which overflow near 1e160) work. Powers of two make the divisions exact. Absent
    constraints are ``(B, 0, n)`` / ``(B, 0)`` tensors.
    """
    tiny = torch.finfo(q.dtype).tiny
    zero = q.new_zeros(q.shape[0])

    def ratio(rhs: Tensor, M: Tensor) -> Tensor:
        if rhs.shape[-1] == 0:
            return zero
        norm = M.norm(dim=-1)
        return torch.where(norm > 0, rhs.abs() / norm.clamp_min(tiny), 0.0).amax(-1)

    qd = Q.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
    size = q.abs().amax(-1) / qd.clamp_min(1.0)
    size = torch.maximum(size, torch.maximum(ratio(h, G), ratio(b, A)))
    far = (size > _SCALE_WINDOW) | ((size > 0) & (size < 1 / _SCALE_WINDOW))
    if not bool(far.any()):
        return None
    beta = torch.where(far, torch.exp2(torch.round(torch.log2(size.clamp_min(tiny)))), 1.0)
    return beta.unsqueeze(-1)


def _classify_failures(pb: _Scaled, status: Tensor) -> None:
    """Replace the status of failed elements by INFEASIBLE or UNBOUNDED where that is why
    (in place); see :func:`_classify`."""
    failed = (status != SOLVED) & (status != INACCURATE)
    if not bool(failed.any()):
        return
    idx = torch.nonzero(failed).flatten()
    gsf, asf = pb.gs[idx], pb.as_[idx]
    found = _classify(
        pb.Q[idx],
        pb.q[idx].squeeze(-1),
        (pb.G[idx] * gsf),
        (pb.h[idx] * gsf).squeeze(-1),
        (pb.A[idx] * asf),
        (pb.b[idx] * asf).squeeze(-1),
    )
    status[idx] = torch.where(found == RUNNING, status[idx], found)


# ----------------------------------------------------------------------------------------------
# Implicit backward through the KKT conditions
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
    compiled = _compiled_adjoint(Q, G, A, x, lam, s, gx, glam, refine, nullspace)
    if compiled is not None:
        dQ, dx, dG, w = compiled
        return dQ, dx, dG, -w, A.new_zeros(A.shape), gnu.new_zeros(gnu.shape)
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
        size = amax(f1) + amax(f2) + amax(f3) + amax(dx) * qdiag + amax(w) + amax(dnu)
        if bool((amax(e1) + amax(e2) + amax(e3) <= _REFINED * size).all()):
            break
        cx, cw, cn = reduced(e1, e2, e3)
        dx, w, dnu = dx + cx, w + cw, dnu + cn
    dx, w, dnu = dx.squeeze(-1), (w / gs).squeeze(-1), (dnu / as_).squeeze(-1)

    dQ = 0.5 * (dx.unsqueeze(-1) * x.unsqueeze(-2) + x.unsqueeze(-1) * dx.unsqueeze(-2))
    dG = lam.unsqueeze(-1) * dx.unsqueeze(-2) + w.unsqueeze(-1) * x.unsqueeze(-2)
    dA = nu.unsqueeze(-1) * dx.unsqueeze(-2) + dnu.unsqueeze(-1) * x.unsqueeze(-2)
    return dQ, dx, dG, -w, dA, -dnu


def _compiled_adjoint(
    Q: Tensor,
    G: Tensor,
    A: Tensor,
    x: Tensor,
    lam: Tensor,
    s: Tensor,
    gx: Tensor,
    glam: Tensor,
    refine: int,
    nullspace: tuple[Tensor, Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``(dQ, dx, dG, w)`` of :func:`_kkt_adjoint` from the compiled per-element loop
    (:func:`layers._qp_kernel.adjoint_batch`) for inequality-only float64 problems on the CPU,
    or None where it does not apply (or a reduced matrix is not positive definite: the batched
    code regularizes and falls back to LU)."""
    kernel = _qp_kernel() if use_compiled else None
    B, m, n = G.shape
    if (
        kernel is None
        or nullspace is not None
        or A.shape[-2]
        or not m
        or x.device.type != "cpu"
        or x.dtype != torch.float64
    ):
        return None
    dx, w, ok = x.new_empty(B, n), x.new_empty(B, m), torch.empty(B, dtype=torch.bool)
    dQ, dG = x.new_empty(B, n, n), x.new_empty(B, m, n)
    data = [v.detach().contiguous().numpy() for v in (Q, G, x, lam, s, gx, glam)]
    outs = [v.numpy() for v in (dx, w, dQ, dG, ok)]

    def solve(part: slice) -> None:
        kernel.adjoint_batch(
            *(v[part] for v in data), _DCAP, _REFINED, refine, *(v[part] for v in outs)
        )

    _split(solve, B)
    return (dQ, dx, dG, w) if bool(ok.all()) else None


def _split(solve: Any, B: int) -> None:
    """``solve(part)`` over slices of ``range(B)``, one per torch thread, in parallel (the
    compiled loops release the GIL), with BLAS on one thread."""
    kernel = _qp_kernel()
    workers = max(1, min(torch.get_num_threads(), B))
    parts = [slice(i * B // workers, (i + 1) * B // workers) for i in range(workers)]
    with kernel.one_blas_thread():
        if workers == 1:
            solve(parts[0])
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(solve, parts))


class _IPMFunction(torch.autograd.Function):
    """``(Q, q, G, h, A, b) -> (x, lam, nu, solution)`` with the :func:`solve_qp` forward and the
    KKT adjoint backward (``solution``, the :class:`QPSolution`, is not differentiated)."""

    @staticmethod
    def forward(ctx, Q, q, G, h, A, b, opts):  # type: ignore[override]
        with threads_for(q.shape[0], q.shape[-1], A.shape[-2], q.device):
            sol = _solve_qp(Q, q, G, h, A, b, **opts)
        Qs = sol._Q if sol._Q is not None and sol._Q.dtype == Q.dtype else 0.5 * (Q + Q.mT)
        ctx.save_for_backward(Qs, G, A, sol.x, sol.lam, sol.slack, sol.nu)
        ctx.nullspace = sol._nullspace
        return sol.x, sol.lam, sol.nu, sol

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gx, glam, gnu, _gsolution):  # type: ignore[override]
        Q, G, A, x, lam, s, nu = ctx.saved_tensors
        gx = torch.zeros_like(x) if gx is None else gx
        glam = torch.zeros_like(lam) if glam is None else glam
        gnu = torch.zeros_like(nu) if gnu is None else gnu
        with threads_for(x.shape[0], x.shape[-1], A.shape[-2], x.device):
            grads = _kkt_adjoint(Q, G, A, x, lam, s, nu, gx, glam, gnu, nullspace=ctx.nullspace)
        return (*grads, None)


def solve_qp_differentiable(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, **opts: Any
) -> tuple[Tensor, Tensor, Tensor, QPSolution]:
    """:func:`solve_qp` (keyword options ``opts``) with gradients for all six inputs through
    ``(x, lam, nu)``; also returns the :class:`QPSolution` (its info record). Absent
    constraints are given as empty ``(B, 0, n)`` / ``(B, 0)`` tensors. On small CPU problems
    the solve runs on one torch thread (:func:`layers._batched.threads_for`)."""
    x, lam, nu, sol = _IPMFunction.apply(Q, q, G, h, A, b, opts)
    return x, lam, nu, sol
