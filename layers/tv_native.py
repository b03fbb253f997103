"""The native TV-denoising solver: an interior point on the dual box QP, an active-set polish,
the closed form on the active set with its exact derivative, and the certificate.

    x*(y; D, lam) = argmin_x  1/2 ||x - y||^2 + lam ||D x||_1

The dual of the problem is the box-constrained QP ``min_z 1/2 ||y - D'z||^2`` subject to
``|z_i| <= lam``, with ``x = y - D'z``. A Mehrotra predictor-corrector interior point solves it
for the whole batch at once (one batched ``m x m`` Cholesky per iteration, or ``n x n`` when
``m > n`` as for 2-D TV). Its multipliers identify the active set: rows with ``(D x)_i = 0`` (set
``A``, ``|z_i| < lam``) and signs ``s_i = sign((D x)_i)`` on the rest (``B``, ``z_i = lam s_i``).
On a fixed active set the solution has a closed form,

    x = P_A (y - lam D_B' s_B),   P_A = projection onto null(D_A),

computed as ``x = v - D_A' K_A^+ D_A v`` with ``K_A = D_A D_A'`` (a masked batched Cholesky with
iterative refinement). A few primal-dual active-set rounds (Hintermueller-Ito-Kunisch) fix
rows the interior point left ambiguous. The derivative of that closed form is the exact
derivative of the solution map wherever the active set is locally constant (everywhere except
on the kinks where it changes). With ``g = dL/dx``, ``q = K_A^+ D_A g`` and ``P_A g = g - D'q``:

    dL/dy = P_A g,   dL/dlam = -<s, D P_A g>,   dL/dD = -(z (P_A g)' + q x')

(``z`` the full dual), so the backward pass reuses the forward factorization: one pair of
triangular solves and two outer products.

Every solution comes with a dual certificate ``z`` (``|z_i| <= lam``) and the duality gap

    gap(x, z) = sum_i (lam |(D x)_i| - z_i (D x)_i) + 1/2 ||x - y + D'z||^2  >=  P(x) - P(x*)
              >= 1/2 ||x - x*||^2,

a sum of nonnegative terms (no cancellation), so ``sqrt(2 gap / n)`` bounds the RMS error of
``x`` (:func:`certify` does this for a candidate from any backend). Elements whose bound exceeds
``check_tol * (1 + max|y|)`` raise :class:`~layers.SolverError` naming them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from layers._batched import chol_solve, max_step
from layers._checks import SolverError

__all__ = ["NATIVE_CHECK_TOL", "TVInfo", "certify", "raise_if_inaccurate", "solve_native"]

# Default tolerance on the certified RMS error, relative to 1 + max|y| per signal.
NATIVE_CHECK_TOL = 1e-7


@dataclass
class TVInfo:
    """What a TV solve did. ``error_bound`` is ``(B,)``: the certified RMS distance to the exact
    solution, ``sqrt(2 gap / n)`` (absolute, in the units of ``y``)."""

    backend: str
    iterations: int
    polish_rounds: int
    error_bound: Tensor

    @property
    def max_error_bound(self) -> float:
        return float(self.error_bound.max()) if self.error_bound.numel() else 0.0


def _mv(D: Tensor, x: Tensor) -> Tensor:
    """``D x`` for ``D`` of shape ``(1|B, m, n)`` and ``x (B, n)`` -> ``(B, m)``."""
    if D.shape[0] == 1:
        return x @ D[0].mT
    return (D @ x.unsqueeze(-1)).squeeze(-1)


def _rmv(D: Tensor, z: Tensor) -> Tensor:
    """``D' z`` for ``D (1|B, m, n)`` and ``z (B, m)`` -> ``(B, n)``."""
    if D.shape[0] == 1:
        return z @ D[0]
    return (D.mT @ z.unsqueeze(-1)).squeeze(-1)


@dataclass
class _DualNewton:
    """The Newton system of the dual interior point at one iterate: ``(D D' + S) dz = r`` with
    ``S = diag(sig)`` (``m <= n``), or through ``(I + D' S^-1 D) v = D' S^-1 r``,
    ``dz = S^-1 (r - D v)`` (``m > n``), both by one batched Cholesky ``L``."""

    D: Tensor
    L: Tensor
    sig: Tensor
    use_m: bool

    def solve(self, r: Tensor) -> Tensor:
        if self.use_m:
            return chol_solve(self.L, r)
        w = 1.0 / self.sig
        v = chol_solve(self.L, _rmv(self.D, w * r))
        return w * (r - _mv(self.D, v))


def _factor_newton(
    K: Tensor,
    H: Tensor | None,
    D: Tensor,
    sig: Tensor,
    edges: tuple[Tensor, Tensor] | None,
) -> tuple[_DualNewton, Tensor]:
    """Assemble the Newton matrix into ``K`` (reused every iteration) and factor it; returns
    the system and Cholesky's ``info`` per element. ``H = D D'`` when ``m <= n``, else None."""
    B, size = K.shape[0], K.shape[-1]
    if H is not None:  # (D D' + S) dz = r
        K.copy_(H)
        K.diagonal(dim1=-2, dim2=-1).add_(sig)
    else:  # (I + D' S^-1 D): a weighted Laplacian for a graph D, else a dense product
        n = size
        w = 1.0 / sig
        if edges is not None:
            src, dst = edges
            K.zero_()
            flat = K.view(B, n * n)
            flat.index_add_(1, src * n + src, w).index_add_(1, dst * n + dst, w)
            flat.index_add_(1, src * n + dst, -w).index_add_(1, dst * n + src, -w)
        else:
            Dt = D.mT if D.shape[0] > 1 else D[0].mT.unsqueeze(0)
            torch.matmul(Dt * w.unsqueeze(-2), D if D.shape[0] > 1 else D[0], out=K)
        K.diagonal(dim1=-2, dim2=-1).add_(1.0)
    L, info = torch.linalg.cholesky_ex(K)
    return _DualNewton(D, L, sig, H is not None), info


def _step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest ``a`` with ``v + a dv >= 0`` per row ``(B,)`` (inf when no entry decreases)."""
    return max_step(v, dv, dim=-1, cap=math.inf).squeeze(-1)


def _box_step(
    su: Tensor, sl: Tensor, mu_u: Tensor, mu_l: Tensor, dz: Tensor, du: Tensor, dl: Tensor
) -> Tensor:
    """The step to the boundary of ``su = lam - z >= 0``, ``sl = lam + z >= 0`` and
    ``mu_u, mu_l >= 0`` along ``(dz, du, dl)``, per element ``(B,)``."""
    return torch.stack([_step(su, -dz), _step(sl, dz), _step(mu_u, du), _step(mu_l, dl)]).amin(0)


@torch.no_grad()
def _dual_ipm(
    y: Tensor,
    D: Tensor,
    lam: Tensor,
    *,
    tol: float,
    max_iter: int,
    edges: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Mehrotra predictor-corrector on ``min_z 1/2||y - D'z||^2, -lam <= z <= lam``.

    Args: ``y (B, n)``, ``D (1|B, m, n)``, ``lam (B,)``, all float64; ``edges`` optionally
    says that row ``e`` of a shared ``D`` is ``x[src[e]] - x[dst[e]]`` (a graph, as in 2-D TV), so
    the ``n x n`` system is assembled as a weighted Laplacian instead of a dense product.
    Returns ``(z, mu_u, mu_l, iterations)``: the dual point ``(B, m)`` and the multipliers of the
    upper and lower bounds (``mu_u - mu_l = D x`` at the solution).
    """
    B, n = y.shape
    m = D.shape[-2]
    lam_ = lam.unsqueeze(-1)
    Dy = _mv(D, y)
    # Start at z = 0 with multipliers that satisfy stationarity exactly (mu_u - mu_l = D y).
    kappa = 1.0 + Dy.abs().mean(-1, keepdim=True)
    z = torch.zeros_like(Dy)
    mu_u, mu_l = Dy.clamp(min=0) + kappa, (-Dy).clamp(min=0) + kappa
    size = m if m <= n else n
    H = (D @ D.mT).expand(B, m, m) if m <= n else None
    K = torch.empty(B, size, size, dtype=y.dtype, device=y.device)  # reused every iteration
    scale = 1.0 + y.abs().amax(-1)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        su, sl = lam_ - z, lam_ + z
        x = y - _rmv(D, z)
        Dx = _mv(D, x)
        rd = mu_u - mu_l - Dx  # gradient of the Lagrangian in z
        gap = (su * mu_u + sl * mu_l).sum(-1)
        obj = 0.5 * ((x - y) ** 2).sum(-1) + lam * Dx.abs().sum(-1)
        done = (gap <= tol * (1.0 + obj)) & (rd.abs().amax(-1) <= tol * scale)
        if bool(done.all()):
            break
        newton, info = _factor_newton(K, H, D, mu_u / su + mu_l / sl, edges)
        ok = (info == 0) & ~done
        # Predictor (affine scaling): complementarity targets 0.
        dz = newton.solve(-rd + mu_u - mu_l)
        du, dl = -mu_u + mu_u * dz / su, -mu_l - mu_l * dz / sl
        a = _box_step(su, sl, mu_u, mu_l, dz, du, dl).clamp(max=1.0).unsqueeze(-1)
        mu = gap.unsqueeze(-1) / (2 * m)
        mu_aff = ((su - a * dz) * (mu_u + a * du) + (sl + a * dz) * (mu_l + a * dl)).sum(
            -1, keepdim=True
        ) / (2 * m)
        sigma = (mu_aff / mu).clamp(0, 1) ** 3
        # Corrector: centring plus Mehrotra's second-order term.
        rcu = sigma * mu - su * mu_u + dz * du
        rcl = sigma * mu - sl * mu_l - dz * dl
        dz = newton.solve(-rd - rcu / su + rcl / sl)
        du, dl = (rcu + mu_u * dz) / su, (rcl - mu_l * dz) / sl
        a = (0.99 * _box_step(su, sl, mu_u, mu_l, dz, du, dl)).clamp(max=1.0)
        ok &= torch.isfinite(a) & torch.isfinite(dz).all(-1)
        a = torch.where(ok, a, 0.0).unsqueeze(-1)
        dz, du, dl = (torch.nan_to_num(v) for v in (dz, du, dl))
        z = (z + a * dz).clamp(-lam_, lam_)
        mu_u = (mu_u + a * du).clamp(min=1e-300)
        mu_l = (mu_l + a * dl).clamp(min=1e-300)
    return z, mu_u, mu_l, it


class _ActiveSystem:
    """Factorization of ``K_A = M D D' M + diag(1 - M)`` (``M = diag`` of the rows in A), shifted
    by a tiny ``delta`` and corrected by iterative refinement, so :meth:`solve` applies
    ``K_A^+`` on the range of ``D_A`` to working precision (also when rows of ``D_A`` are
    dependent, as in 2-D TV)."""

    def __init__(self, D: Tensor, M: Tensor, refine: int = 2):
        H = D @ D.mT
        self.delta = 1e-11 * (1.0 + H.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True))
        K = H * (M.unsqueeze(-1) * M.unsqueeze(-2))
        K.diagonal(dim1=-2, dim2=-1).add_(1.0 - M + self.delta)
        L, info = torch.linalg.cholesky_ex(K)
        if bool((info != 0).any()):
            bad = torch.nonzero(info != 0).flatten().tolist()
            raise SolverError(
                f"TV polish: singular active-set system for batch elements {bad[:10]}", bad
            )
        self.K, self.L, self.M, self.refine = K, L, M, refine

    def solve(self, r: Tensor) -> Tensor:
        """``K_A^+ r`` for ``r (B, m)`` supported on A; the result is supported on A."""
        r = self.M * r
        dz = chol_solve(self.L, r)
        for _ in range(self.refine):  # removes the delta shift
            res = r - (self.K @ dz.unsqueeze(-1)).squeeze(-1) + self.delta * dz
            dz = dz + chol_solve(self.L, res)
        return self.M * dz


@torch.no_grad()
def _closed_form(
    y: Tensor, D: Tensor, lam: Tensor, s: Tensor, z0: Tensor
) -> tuple[Tensor, Tensor, _ActiveSystem]:
    """The solution on a fixed active set.

    ``s (B, m)`` in ``{-1, 0, +1}``: 0 marks rows with ``(D x)_i = 0`` (set A), +-1 the sign of
    ``(D x)_i`` elsewhere. ``z0 (B, m)`` is a dual guess on A; only the least-squares
    correction is solved for, so ``x = P_A (y - lam D' s)`` whatever ``z0`` (it only reduces
    rounding). Returns ``(x (B, n), z (B, m), system)`` with ``x = y - D'z``, ``(D x)_A = 0``,
    ``z_B = lam s_B``.
    """
    M = (s == 0).to(y.dtype)
    lam_ = lam.unsqueeze(-1)
    v = y - _rmv(D, lam_ * s + M * z0)
    system = _ActiveSystem(D, M)
    dz = system.solve(_mv(D, v))
    x = v - _rmv(D, dz)
    z = M * (z0 + dz) + (1.0 - M) * lam_ * s
    return x, z, system


class _TVSolutionMap(torch.autograd.Function):
    """``x = P_A (y - lam D' s)`` on a fixed active set, with its exact derivative.

    With ``g = dL/dx``, ``q = K_A^+ D_A g`` and ``gh = P_A g = g - D'q``:
    ``dL/dy = gh``, ``dL/dlam = -<s, D gh>``, ``dL/dD = -(z gh' + q x')`` (summed over the batch
    when ``D`` is shared), where ``z`` is the full dual (``z_B = lam s_B``).
    """

    @staticmethod
    def forward(ctx, y, D, lam, x, z, s, system):
        ctx.system = system
        ctx.save_for_backward(D, x, z, s)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        D, x, z, s = ctx.saved_tensors
        q = ctx.system.solve(_mv(D, g))
        gh = g - _rmv(D, q)
        gy = gh if ctx.needs_input_grad[0] else None
        gD = glam = None
        if ctx.needs_input_grad[1]:
            if D.shape[0] == 1:
                gD = -(z.mT @ gh + q.mT @ x).unsqueeze(0)
            else:
                gD = -(z.unsqueeze(-1) * gh.unsqueeze(-2) + q.unsqueeze(-1) * x.unsqueeze(-2))
        if ctx.needs_input_grad[2]:
            glam = -(s * _mv(D, gh)).sum(-1)
        return gy, gD, glam, None, None, None, None


def _gap(x: Tensor, y: Tensor, D: Tensor, lam: Tensor, z: Tensor) -> Tensor:
    """Duality gap ``(B,)`` of primal ``x`` and dual ``z`` (clipped to the box): a sum of
    nonnegative terms, ``>= 1/2 ||x - x*||^2``."""
    lam_ = lam.unsqueeze(-1)
    zc = torch.minimum(torch.maximum(z, -lam_), lam_)
    Dx = _mv(D, x)
    stat = x - y + _rmv(D, zc)
    return ((lam_ * Dx.abs() - zc * Dx).clamp(min=0).sum(-1) + 0.5 * (stat**2).sum(-1)).clamp(min=0)


@torch.no_grad()
def _polish_signs(
    y: Tensor, D: Tensor, lam: Tensor, s: Tensor, z0: Tensor, rounds: int
) -> tuple[Tensor, Tensor, Tensor, _ActiveSystem, int]:
    """Primal-dual active-set rounds from the guess ``s``: rows of A whose dual leaves the box
    move to B, rows of B whose ``D x`` has the wrong sign move to A. Returns
    ``(s, x, z, system, rounds_used)`` for the closed form on the final ``s``."""
    lam_ = lam.unsqueeze(-1)
    tau = 1e-12 * (1.0 + y.abs().amax(-1, keepdim=True))
    x, z, system = _closed_form(y, D, lam, s, z0)
    k = 0
    for k in range(1, rounds + 1):
        Dx = _mv(D, x)
        leave = (s == 0) & (z.abs() > lam_ * (1 + 1e-12))
        wrong = (s != 0) & (s * Dx < -tau)
        if not bool((leave | wrong).any()):
            k -= 1
            break
        s = torch.where(leave, torch.sign(z), torch.where(wrong, torch.zeros_like(s), s))
        z0 = torch.minimum(torch.maximum(z, -lam_), lam_)
        x, z, system = _closed_form(y, D, lam, s, z0)
    return s, x, z, system, k


def solve_native(
    y: Tensor,
    D: Tensor,
    lam: Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 100,
    polish_rounds: int = 6,
    check_tol: float = NATIVE_CHECK_TOL,
    edges: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, TVInfo]:
    """The native backend on float64 ``y (B, n)``, ``D (1|B, m, n)``, ``lam (B,)``: the dual
    interior point (``tol``, ``max_iter``), ``polish_rounds`` active-set rounds, the
    certificate (raising beyond ``check_tol``) and the closed-form backward."""
    n = y.shape[-1]
    yd, Dd, ld = y.detach(), D.detach(), lam.detach()
    z, mu_u, mu_l, iters = _dual_ipm(yd, Dd, ld, tol=tol, max_iter=max_iter, edges=edges)
    lam_ = ld.unsqueeze(-1)
    s = torch.where(mu_u > lam_ - z, 1.0, torch.where(mu_l > lam_ + z, -1.0, 0.0)).to(y.dtype)
    s, x, z, system, rounds = _polish_signs(yd, Dd, ld, s, z, polish_rounds)
    with torch.no_grad():
        bound = torch.sqrt(2.0 * _gap(x, yd, Dd, ld, z) / n)
    info = TVInfo("native", iters, rounds, bound)
    raise_if_inaccurate(info, yd, check_tol)
    if torch.is_grad_enabled() and (y.requires_grad or D.requires_grad or lam.requires_grad):
        x = _TVSolutionMap.apply(y, D, lam, x, z, s, system)
    return x, info


def raise_if_inaccurate(info: TVInfo, y: Tensor, check_tol: float) -> None:
    """Raise :class:`SolverError` naming the elements whose certified RMS error exceeds
    ``check_tol * (1 + max|y|)``."""
    limit = check_tol * (1.0 + y.abs().amax(-1))
    bad = ~(info.error_bound <= limit)  # NaN counts as bad
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        worst = float(torch.nan_to_num(info.error_bound / limit, nan=math.inf).max())
        raise SolverError(
            f"backend {info.backend!r}: {len(idx)} of {len(y)} TV solutions fail the optimality "
            f"check (certified RMS error up to {worst:.3g}x the tolerance; batch elements "
            f"{idx[:10]}{'...' if len(idx) > 10 else ''}); raise max_iter or use another backend",
            idx,
        )


@torch.no_grad()
def certify(
    x: Tensor,
    y: Tensor,
    D: Tensor,
    lam: Tensor,
    *,
    active_tols: tuple[float, ...] = (1e-9, 1e-6, 1e-3, 1e-1),
) -> Tensor:
    """Certified RMS error ``(B,)`` of an arbitrary candidate ``x``.

    For each threshold ``t`` in ``active_tols`` (relative to ``1 + max|y|``), guess the active
    set ``|(D x)_i| <= t`` from ``x``, polish it to ``(xh, z)`` and bound
    ``||x - x*|| <= min(sqrt(2 gap(x, z)), ||x - xh|| + sqrt(2 gap(xh, z)))``; every such bound
    is valid, the smallest is returned (a threshold near ``x``'s own error finds the true active
    set, and then the bound is about the true error). Signals beyond ``2**30`` are certified
    at unit scale (``x*(c y, lam) = c x*(y, lam / c)`` for a power of two ``c``), where the
    duality gap, which grows as ``c**2``, cannot overflow.
    """
    big = y.abs().amax(-1)
    if bool((big > 2.0**30).any()):
        c = torch.where(big > 2.0**30, torch.exp2(torch.round(torch.log2(big))), 1.0)
        col = c.unsqueeze(-1)
        return certify(x / col, y / col, D, lam / c, active_tols=active_tols) * c
    n = y.shape[-1]
    scale = 1.0 + y.abs().amax(-1, keepdim=True)
    Dx = _mv(D, x)
    best = torch.full_like(lam, math.inf)
    for t in active_tols:
        s = torch.where(Dx.abs() > t * scale, torch.sign(Dx), torch.zeros_like(Dx))
        try:
            _, xh, zh, _, _ = _polish_signs(y, D, lam, s, torch.zeros_like(Dx), 2)
        except SolverError:
            continue
        direct = torch.sqrt(2.0 * _gap(x, y, D, lam, zh))
        via = (x - xh).norm(dim=-1) + torch.sqrt(2.0 * _gap(xh, y, D, lam, zh))
        best = torch.minimum(best, torch.nan_to_num(torch.minimum(direct, via), nan=math.inf))
    return best / math.sqrt(n)
