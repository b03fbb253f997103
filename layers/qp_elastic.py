"""The elastic (closest feasible) form of a QP, solved exactly by a semismooth Newton method.

For an element whose constraints admit no point, :func:`layers.qp.qp` with
``infeasible="closest"`` solves instead

    min_x  F(x) = 1/2 x'Qx + q'x + rho/2 |(Ĝx - ĥ)_+|^2 + rho/2 |Âx - b̂|^2

where ``Ĝ, ĥ, Â, b̂`` are ``G, h, A, b`` with the rows of ``G`` and ``A`` scaled to unit norm
(a violation is then the distance to the row's hyperplane). This is the elastic QP
``min f(x) + rho/2 (|s|^2 + |Âx - b̂|^2) s.t. Ĝx - s <= ĥ`` with the violations ``s``
eliminated: an unconstrained, piecewise quadratic, convex problem (strongly convex when ``Q``
is positive definite on the null space of the violated rows), so Newton's method on the
current piece with an exact line search ends in a few steps at the exact minimizer. As ``rho``
grows, its solution tends to the closest feasible QP's (the minimizer of ``f`` over the points
of least squared violation).

* :func:`solve_elastic` -- the batched solver (no gradients).
* :func:`elastic_qp` -- the solution with gradients for all inputs by the implicit function
  theorem (one Newton step from the solution, differentiated), and the duals
  ``lam = rho (Ĝx - ĥ)_+ / |G_i|``, ``nu = rho (Âx - b̂) / |A_i|`` that satisfy
  ``Qx + q + G'lam + A'nu = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from layers._batched import Cholesky
from layers._checks import SolverError, format_indices

__all__ = ["elastic_qp", "solve_elastic"]

_TOL = 1e-13  # relative gradient norm at which Newton stops
_MAX_ITER = 100
_BISECT = 60  # bisection steps of the exact line search (on [0, 1])


def _row_norms(M: Tensor) -> Tensor:
    r = M.norm(dim=-1)
    return torch.where(r > 0, r, torch.ones_like(r))


def _maxabs(v: Tensor) -> Tensor:
    """``max |v|`` over the last dim, 0 when it is empty; ``(B,)``."""
    return v.abs().amax(-1) if v.shape[-1] else v.new_zeros(v.shape[0])


def _mv(M: Tensor, v: Tensor) -> Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def _gradient(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, rho: float, x: Tensor
) -> tuple[Tensor, Tensor]:
    """``grad F(x)`` and the violated-row mask (``Ĝx > ĥ``); G, A already row-scaled."""
    r = _mv(G, x) - h
    act = r > 0
    g = _mv(Q, x) + q + rho * _mv(G.mT, r.clamp_min(0))
    if A.shape[-2]:
        g = g + rho * _mv(A.mT, _mv(A, x) - b)
    return g, act


def _hessian(Q: Tensor, G: Tensor, A: Tensor, rho: float, act: Tensor) -> Tensor:
    H = Q + rho * G.mT @ (act.unsqueeze(-1) * G)
    if A.shape[-2]:
        H = H + rho * A.mT @ A
    return H


@torch.no_grad()
def solve_elastic(
    Q: Tensor,
    q: Tensor,
    G: Tensor,
    h: Tensor,
    A: Tensor,
    b: Tensor,
    rho: float,
    *,
    tol: float = _TOL,
    max_iter: int = _MAX_ITER,
) -> Tensor:
    """Minimize ``F`` (module docstring) for a batch: ``Q (B, n, n)``, ``q (B, n)``, ``G (B, m,
    n)``, ``h (B, m)``, ``A (B, p, n)``, ``b (B, p)``, all float64, rows of G and A unscaled.
    Returns ``x (B, n)``. Raises :class:`SolverError` naming the elements whose Hessian is
    singular (``F`` not strongly convex: e.g. an LP whose violated rows leave directions free)
    or that do not converge."""
    gs, as_ = _row_norms(G), _row_norms(A)
    G, h = G / gs.unsqueeze(-1), h / gs
    A, b = A / as_.unsqueeze(-1), b / as_
    Q = 0.5 * (Q + Q.mT)
    B, n = q.shape
    x = q.new_zeros(B, n)
    scale = 1 + q.abs().amax(-1) + rho * (_maxabs(h) + _maxabs(b))
    done = torch.zeros(B, dtype=torch.bool, device=q.device)
    full = torch.zeros(B, dtype=torch.bool, device=q.device)
    prev = None
    for _ in range(max_iter):
        g, act = _gradient(Q, q, G, h, A, b, rho, x)
        # exact: a full Newton step that kept the violated rows minimizes that piece exactly
        same = full & (act == prev).all(-1) if prev is not None else full
        done = done | same | (g.abs().amax(-1) <= tol * scale)
        if bool(done.all()):
            return x
        chol = Cholesky(_hessian(Q, G, A, rho, act))
        if bool((chol.info.bool() & ~done).any()):
            bad = torch.nonzero(chol.info.bool() & ~done).flatten().tolist()
            raise SolverError(
                f"closest feasible problem: the penalized objective is not strongly convex for "
                f"batch elements {format_indices(bad)} (Q is singular on the directions the "
                "violated constraints leave free); add a ridge to Q",
                bad,
            )
        dx = -chol.solve(g.unsqueeze(-1)).squeeze(-1)
        dx = torch.where(done.unsqueeze(-1), torch.zeros_like(dx), dx)
        a = _line_search(Q, q, G, h, A, b, rho, x, dx)
        x = x + a.unsqueeze(-1) * dx
        full, prev = a == 1, act
    bad = torch.nonzero(~done).flatten().tolist()
    raise SolverError(
        f"closest feasible problem: Newton did not converge in {max_iter} steps for batch "
        f"elements {format_indices(bad)}",
        bad,
    )


def _line_search(
    Q: Tensor,
    q: Tensor,
    G: Tensor,
    h: Tensor,
    A: Tensor,
    b: Tensor,
    rho: float,
    x: Tensor,
    dx: Tensor,
) -> Tensor:
    """The exact minimizer ``a`` in [0, 1] of the convex ``F(x + a dx)`` (its derivative is
    piecewise linear and increasing: bisection on its sign), ``(B,)``."""
    Qdx, gdx, r = _mv(Q, dx), _mv(G, dx), _mv(G, x) - h
    c0 = (dx * (_mv(Q, x) + q)).sum(-1)
    c1 = (dx * Qdx).sum(-1)
    if A.shape[-2]:
        adx, e = _mv(A, dx), _mv(A, x) - b
        c0 = c0 + rho * (adx * e).sum(-1)
        c1 = c1 + rho * (adx * adx).sum(-1)

    def slope(a: Tensor) -> Tensor:
        viol = (r + a.unsqueeze(-1) * gdx).clamp_min(0)
        return c0 + a * c1 + rho * (viol * gdx).sum(-1)

    one = torch.ones_like(c0)
    if bool((slope(one) <= 0).all()):
        return one
    lo, hi = torch.zeros_like(c0), one
    for _ in range(_BISECT):
        mid = 0.5 * (lo + hi)
        neg = slope(mid) <= 0
        lo, hi = torch.where(neg, mid, lo), torch.where(neg, hi, mid)
    return torch.where(slope(one) <= 0, one, 0.5 * (lo + hi))


def elastic_qp(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, rho: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, lam, nu)`` of the elastic problem with gradients for all six inputs (shapes as in
    :func:`solve_elastic`).

    ``x* = solve_elastic(...)``; then ``x = x* - H^{-1} grad F(x*)`` with ``H`` the Hessian on
    the violated rows at ``x*`` (held fixed) and ``grad F`` built from the inputs with autograd:
    its value is ``x*`` (``grad F(x*) = 0``) and its derivative ``-H^{-1} d(grad F)``, the
    implicit function theorem's. First derivatives only."""
    xs = solve_elastic(Q.detach(), q.detach(), G.detach(), h.detach(), A.detach(), b.detach(), rho)
    gs, as_ = _row_norms(G), _row_norms(A)
    Gs, hs = G / gs.unsqueeze(-1), h / gs
    As, bs = A / as_.unsqueeze(-1), b / as_
    Qs = 0.5 * (Q + Q.mT)
    g, act = _gradient(Qs, q, Gs, hs, As, bs, rho, xs)
    chol = Cholesky(_hessian(Qs.detach(), Gs.detach(), As.detach(), rho, act))
    if bool(chol.info.any()):
        bad = torch.nonzero(chol.info).flatten().tolist()
        raise SolverError(
            f"closest feasible problem: singular Hessian at the solution for batch elements "
            f"{format_indices(bad)}; add a ridge to Q",
            bad,
        )
    x = xs - chol.solve(g.unsqueeze(-1)).squeeze(-1)
    lam = rho * (_mv(Gs, x) - hs).clamp_min(0) * act / gs
    nu = rho * (_mv(As, x) - bs) / as_ if A.shape[-2] else b.new_zeros(b.shape)
    return x, lam, nu
