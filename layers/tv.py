"""Total-variation denoising as a differentiable layer (OptNet's denoising experiment).

    x*(y; D, lam) = argmin_x  1/2 ||x - y||^2 + lam ||D x||_1

``y`` is a batch of noisy signals ``(B, n)``, ``D`` an ``(m, n)`` operator (first differences for
classical TV, or learned) and ``lam > 0`` the regularization weight. The 2-D form
(:func:`tv_denoise_2d`) uses anisotropic TV on images: ``D`` stacks the horizontal and vertical
differences of an ``H x W`` grid.

Public API
----------
* :func:`tv_denoise` / :class:`TVDenoise` -- 1-D signals with a fixed or learnable ``D`` and
  ``lam`` (``lam`` is kept positive through a log parameterization).
* :func:`tv_denoise_2d` / :class:`TVDenoise2d` -- images, anisotropic TV, learnable ``lam``.
* :func:`tv_error_bound` -- a certified bound on ``||x - x*||_2 / sqrt(n)`` for any candidate
  ``x`` (from any backend); every backend's answer is checked with it before it is used.
* :func:`difference_matrix`, :func:`grid_difference_matrix` -- the classical operators.

Backends (``backend=``)
-----------------------
==================  ===========================================================================
name                what it is
==================  ===========================================================================
native (default)    our batched interior point on the dual box QP, then an exact active-set
                    polish; gradients from the closed form on the active set (custom backward:
                    one extra triangular solve pair)
torch-ipm, moreau,  cvxpylayers on the DPP statement ``1/2||x - y||^2 + ||E x||_1`` with
diffcp-clarabel,    ``E = lam D`` formed in torch (solver settings: :mod:`layers.backends`); the
diffcp-scs,         2-D form keeps ``D`` a constant and ``lam`` a parameter
diffcp-ecos
qp                  OptNet's QP form over ``[x; t]``: ``1/2||x - y||^2 + lam 1't (+ eps/2
                    ||t||^2)`` with ``-t <= D x <= t``, through :func:`layers.qp.qp`
                    (``qp_backend=`` picks its backend, ``qp_eps=`` the ``eps``, 1e-8)
qpth                the same QP form through qpth, as in OptNet's code
==================  ===========================================================================

Every backend's answer is certified (see below) before it is returned.

How ``native`` works
--------------------
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
``x``. Elements whose bound exceeds ``check_tol * (1 + max|y|)`` raise :class:`SolverError`
naming them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from layers._checks import check_positive, check_tensor
from layers.backends import BACKENDS, CvxpyProblemLayer, SolverError

__all__ = [
    "TV_BACKENDS",
    "TVDenoise",
    "TVDenoise2d",
    "TVInfo",
    "difference_matrix",
    "grid_difference_matrix",
    "tv_denoise",
    "tv_denoise_2d",
    "tv_error_bound",
]

TV_BACKENDS: tuple[str, ...] = ("native", *(b for b in BACKENDS if b != "qpth"), "qp", "qpth")

# Default tolerances on the certified RMS error, relative to 1 + max|y| per signal.
NATIVE_CHECK_TOL = 1e-7
EXTERNAL_CHECK_TOL = 1e-3


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


# ----------------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------------


def difference_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """First differences ``(n-1, n)``: ``(D x)_i = x_i - x_{i+1}`` (OptNet's ``D``)."""
    if n < 2:
        raise ValueError(f"signals need length n >= 2 for differences, got n={n}")
    eye = torch.eye(n, dtype=dtype, device=device)
    return eye[:-1] - eye[1:]


def _grid_edges(height: int, width: int, device: torch.device | str | None = None):
    idx = torch.arange(height * width, device=device).reshape(height, width)
    src = torch.cat([idx[:, :-1].reshape(-1), idx[:-1, :].reshape(-1)])
    dst = torch.cat([idx[:, 1:].reshape(-1), idx[1:, :].reshape(-1)])
    return src, dst


def grid_difference_matrix(
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Anisotropic TV operator of an ``height x width`` image flattened row-major:
    ``(height (width-1) + (height-1) width, height width)``, horizontal differences first."""
    if height < 1 or width < 1 or height * width < 2:
        raise ValueError(f"images need at least 2 pixels, got {height}x{width}")
    src, dst = _grid_edges(height, width, device)
    D = torch.zeros(len(src), height * width, dtype=dtype, device=device)
    rows = torch.arange(len(src), device=device)
    D[rows, src] = 1.0
    D[rows, dst] = -1.0
    return D


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


def _chol_solve(L: Tensor, r: Tensor) -> Tensor:
    """``(L L')^{-1} r`` for ``L (B, k, k)`` lower triangular and ``r (B, k)``."""
    t = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.mT, t, upper=True).squeeze(-1)


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest ``a`` with ``v + a dv >= 0`` per row (inf when ``dv >= 0``)."""
    ratio = torch.where(dv < 0, -v / dv.clamp(max=-1e-300), torch.full_like(v, math.inf))
    return ratio.amin(-1)


# ----------------------------------------------------------------------------------------------
# Native solver: interior point on the dual box QP, active-set polish, certificate
# ----------------------------------------------------------------------------------------------


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
    use_m = m <= n
    size = m if use_m else n
    if use_m:
        H = (D @ D.mT).expand(B, m, m)
    else:
        eye_n = torch.eye(n, dtype=y.dtype, device=y.device).expand(B, n, n)
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
        sig = mu_u / su + mu_l / sl
        if use_m:  # (D D' + S) dz = r
            K.copy_(H)
            K.diagonal(dim1=-2, dim2=-1).add_(sig)
        else:  # through (I + D' S^-1 D) v = D' S^-1 r, dz = S^-1 (r - D v)
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
            K.add_(eye_n)
        L, info = torch.linalg.cholesky_ex(K)

        def solve(r: Tensor, L: Tensor = L, sig: Tensor = sig) -> Tensor:
            if use_m:
                return _chol_solve(L, r)
            w = 1.0 / sig
            v = _chol_solve(L, _rmv(D, w * r))
            return w * (r - _mv(D, v))

        ok = (info == 0) & ~done
        # Predictor (affine scaling): complementarity targets 0.
        dz = solve(-rd + mu_u - mu_l)
        du, dl = -mu_u + mu_u * dz / su, -mu_l - mu_l * dz / sl
        a = (
            torch.stack(
                [_max_step(su, -dz), _max_step(sl, dz), _max_step(mu_u, du), _max_step(mu_l, dl)]
            )
            .amin(0)
            .clamp(max=1.0)
            .unsqueeze(-1)
        )
        mu = gap.unsqueeze(-1) / (2 * m)
        mu_aff = ((su - a * dz) * (mu_u + a * du) + (sl + a * dz) * (mu_l + a * dl)).sum(
            -1, keepdim=True
        ) / (2 * m)
        sigma = (mu_aff / mu).clamp(0, 1) ** 3
        # Corrector: centring plus Mehrotra's second-order term.
        rcu = sigma * mu - su * mu_u + dz * du
        rcl = sigma * mu - sl * mu_l - dz * dl
        dz = solve(-rd - rcu / su + rcl / sl)
        du, dl = (rcu + mu_u * dz) / su, (rcl - mu_l * dz) / sl
        a = 0.99 * torch.stack(
            [_max_step(su, -dz), _max_step(sl, dz), _max_step(mu_u, du), _max_step(mu_l, dl)]
        ).amin(0)
        a = a.clamp(max=1.0)
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
        dz = _chol_solve(self.L, r)
        for _ in range(self.refine):  # removes the delta shift
            res = r - (self.K @ dz.unsqueeze(-1)).squeeze(-1) + self.delta * dz
            dz = dz + _chol_solve(self.L, res)
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


def _solve_native(
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
    """Native backend on float64 ``y (B, n)``, ``D (1|B, m, n)``, ``lam (B,)``."""
    n = y.shape[-1]
    yd, Dd, ld = y.detach(), D.detach(), lam.detach()
    z, mu_u, mu_l, iters = _dual_ipm(yd, Dd, ld, tol=tol, max_iter=max_iter, edges=edges)
    lam_ = ld.unsqueeze(-1)
    s = torch.where(mu_u > lam_ - z, 1.0, torch.where(mu_l > lam_ + z, -1.0, 0.0)).to(y.dtype)
    s, x, z, system, rounds = _polish_signs(yd, Dd, ld, s, z, polish_rounds)
    with torch.no_grad():
        bound = torch.sqrt(2.0 * _gap(x, yd, Dd, ld, z) / n)
    info = TVInfo("native", iters, rounds, bound)
    _raise_if_inaccurate(info, yd, check_tol)
    if torch.is_grad_enabled() and (y.requires_grad or D.requires_grad or lam.requires_grad):
        x = _TVSolutionMap.apply(y, D, lam, x, z, s, system)
    return x, info


def _raise_if_inaccurate(info: TVInfo, y: Tensor, check_tol: float) -> None:
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
def _certify(
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
    set, and then the bound is about the true error).
    """
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


# ----------------------------------------------------------------------------------------------
# Input handling and the other backends
# ----------------------------------------------------------------------------------------------


def _prepare(y: Tensor, D: Tensor, lam: float | Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Validate and broadcast to float64 ``y (B, n)``, ``D (1|B, m, n)``, ``lam (B,)``."""
    check_tensor("y", y)
    if y.dim() > 2:
        raise ValueError(f"y must be (n,) or (B, n), got shape {tuple(y.shape)}")
    unbatched = y.dim() == 1
    y2 = y.unsqueeze(0) if unbatched else y
    B, n = y2.shape
    if B == 0:
        raise ValueError("y is an empty batch")
    check_tensor("D", D, min_dim=2)
    if D.dim() > 3:
        raise ValueError(f"D must be (m, n) or (B, m, n), got shape {tuple(D.shape)}")
    if D.shape[-1] != n:
        raise ValueError(
            f"D has {D.shape[-1]} columns but the signals have length {n}; D must be (m, {n})"
        )
    D3 = D.unsqueeze(0) if D.dim() == 2 else D
    if D3.shape[0] not in (1, B):
        raise ValueError(f"D has batch size {D3.shape[0]} but y has {B}")
    if not isinstance(lam, Tensor):
        if not isinstance(lam, (int, float)):
            raise TypeError(f"lam must be a float or a tensor, got {type(lam).__name__}")
        lam = torch.tensor(float(lam))
    check_positive("lam", lam)
    if lam.numel() not in (1, B) or lam.dim() > 1:
        raise ValueError(f"lam must be a scalar or have shape ({B},), got {tuple(lam.shape)}")
    f64 = torch.float64
    lam1 = lam.to(dtype=f64, device=y.device).reshape(-1).expand(B)
    return y2.to(f64), D3.to(dtype=f64, device=y.device), lam1, unbatched


@lru_cache(maxsize=32)
def _cvxpy_layer_1d(n: int, m: int, backend: str, tuned: bool) -> CvxpyProblemLayer:
    """``1/2||x - y||^2 + ||E x||_1`` with parameters ``y (n)`` and ``E = lam D (m, n)``."""
    import cvxpy as cp

    y, E, x = cp.Parameter(n), cp.Parameter((m, n)), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y) + cp.norm1(E @ x)))
    return CvxpyProblemLayer(prob, [y, E], [x], backend, tuned=tuned)


@lru_cache(maxsize=8)
def _cvxpy_layer_2d(height: int, width: int, backend: str, tuned: bool) -> CvxpyProblemLayer:
    """Anisotropic TV with a constant sparse ``D``; parameters ``y (H W)`` and ``lam >= 0``."""
    import cvxpy as cp
    import numpy as np
    import scipy.sparse as sp

    src, dst = (t.numpy() for t in _grid_edges(height, width))
    m, n = len(src), height * width
    rows = np.concatenate([np.arange(m), np.arange(m)])
    Dsp = sp.csr_matrix((np.r_[np.ones(m), -np.ones(m)], (rows, np.r_[src, dst])), shape=(m, n))
    y, lam, x = cp.Parameter(n), cp.Parameter(nonneg=True), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y) + lam * cp.norm1(Dsp @ x)))
    return CvxpyProblemLayer(prob, [y, lam], [x], backend, tuned=tuned)


def _solve_qp_form(y: Tensor, D: Tensor, lam: Tensor, qp_backend: str | None, eps: float) -> Tensor:
    """OptNet's QP over ``[x; t]``: ``1/2 x'x - y'x + lam 1't + eps/2 ||t||^2`` subject to
    ``D x - t <= 0`` and ``-D x - t <= 0``; returns ``x``."""
    try:
        from layers.qp import qp
    except ImportError as err:  # pragma: no cover - depends on the checkout
        raise NotImplementedError(
            "backend 'qp' needs layers.qp.qp, which is not available"
        ) from err
    B, n = y.shape
    m = D.shape[-2]
    f64 = y.dtype
    Q = torch.diag(torch.cat([torch.ones(n, dtype=f64), torch.full((m,), eps, dtype=f64)]))
    Q = Q.to(y.device).unsqueeze(0).expand(B, -1, -1)
    q = torch.cat([-y, lam.unsqueeze(-1).expand(B, m)], dim=-1)
    eye = torch.eye(m, dtype=f64, device=y.device).expand(D.shape[0], m, m)
    G = torch.cat([torch.cat([D, -eye], -1), torch.cat([-D, -eye], -1)], -2)
    G = G.expand(B, 2 * m, n + m)
    h = y.new_zeros(B, 2 * m)
    kwargs: dict[str, Any] = {} if qp_backend is None else {"backend": qp_backend}
    out = qp(Q, q, G, h, None, None, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return out[..., :n]


def _solve(
    y: Tensor,
    D: Tensor,
    lam: Tensor,
    backend: str,
    *,
    tuned: bool,
    check_tol: float | None,
    grid: tuple[int, int] | None = None,
    qp_backend: str | None = None,
    qp_eps: float = 1e-8,
    **native_args: Any,
) -> tuple[Tensor, TVInfo]:
    """Dispatch on ``backend``; every answer is certified before it is returned."""
    if backend == "native":
        tol = NATIVE_CHECK_TOL if check_tol is None else check_tol
        edges = None if grid is None else _grid_edges(*grid, device=y.device)
        return _solve_native(y, D, lam, check_tol=tol, edges=edges, **native_args)
    if native_args:
        raise TypeError(f"options {sorted(native_args)} apply to backend 'native' only")
    name = backend
    if backend == "qpth":  # OptNet's own path: the [x; t] QP through qpth (Q must be PD)
        backend, qp_backend, qp_eps = "qp", "qpth", max(qp_eps, 1e-8)
    if backend in BACKENDS:
        if grid is None:
            layer = _cvxpy_layer_1d(y.shape[-1], D.shape[-2], backend, tuned)
            E = lam.reshape(-1, 1, 1) * D  # (B, m, n): batched even for a shared D
            E = E[0] if bool((lam == lam[0]).all()) and D.shape[0] == 1 else E
            (x,) = layer(y, E)
        else:
            layer = _cvxpy_layer_2d(*grid, backend, tuned)
            (x,) = layer(y, lam)
        x = x.to(torch.float64)
    elif backend == "qp":
        x = _solve_qp_form(y, D, lam, qp_backend, qp_eps)
    else:
        raise ValueError(f"unknown TV backend {backend!r}; choose one of {', '.join(TV_BACKENDS)}")
    bound = _certify(x.detach(), y.detach(), D.detach(), lam.detach())
    info = TVInfo(name, 0, 0, bound)
    _raise_if_inaccurate(info, y.detach(), EXTERNAL_CHECK_TOL if check_tol is None else check_tol)
    return x, info


# ----------------------------------------------------------------------------------------------
# Public functions and modules
# ----------------------------------------------------------------------------------------------


def tv_denoise(
    y: Tensor,
    D: Tensor,
    lam: float | Tensor,
    *,
    backend: str = "native",
    tuned: bool = True,
    check_tol: float | None = None,
    return_info: bool = False,
    qp_backend: str | None = None,
    qp_eps: float = 1e-8,
    **native_args: Any,
) -> Tensor | tuple[Tensor, TVInfo]:
    """Solve ``argmin_x 1/2||x - y||^2 + lam ||D x||_1`` for a batch, differentiably.

    Args:
        y: noisy signals ``(B, n)`` or ``(n,)``.
        D: operator ``(m, n)`` (shared) or ``(B, m, n)``; e.g. :func:`difference_matrix`.
        lam: ``> 0``, a float, a scalar tensor or ``(B,)``.
        backend: one of :data:`TV_BACKENDS` (``native`` is ours; see the module docstring).
        tuned: cvxpylayers backends only: the library's accurate settings (True) or the
            solver's defaults.
        check_tol: certified RMS error allowed, relative to ``1 + max|y|`` per signal
            (default ``1e-7`` for ``native``, ``1e-3`` for the others); beyond it
            :class:`SolverError` names the batch elements.
        return_info: also return a :class:`TVInfo`.
        qp_backend: backend of :func:`layers.qp.qp` when ``backend='qp'`` (its default if None).
        qp_eps: weight of ``eps/2 ||t||^2`` in the QP form (``qp``, ``qpth``).
        native_args: ``tol`` (interior-point tolerance, 1e-10), ``max_iter`` (100),
            ``polish_rounds`` (6).

    Returns:
        ``x`` with the shape, dtype and device of ``y`` (and the info when asked).
    """
    yb, Db, lb, unbatched = _prepare(y, D, lam)
    x, info = _solve(
        yb,
        Db,
        lb,
        backend,
        tuned=tuned,
        check_tol=check_tol,
        qp_backend=qp_backend,
        qp_eps=qp_eps,
        **native_args,
    )
    x = x.to(dtype=y.dtype, device=y.device)
    x = x.squeeze(0) if unbatched else x
    return (x, info) if return_info else x


@lru_cache(maxsize=8)
def _grid_D(height: int, width: int) -> Tensor:
    return grid_difference_matrix(height, width, dtype=torch.float64)


def tv_denoise_2d(
    images: Tensor,
    lam: float | Tensor,
    *,
    backend: str = "native",
    tuned: bool = True,
    check_tol: float | None = None,
    return_info: bool = False,
    **native_args: Any,
) -> Tensor | tuple[Tensor, TVInfo]:
    """Anisotropic TV denoising of images:
    ``argmin_X 1/2||X - Y||_F^2 + lam (sum |X[i, j] - X[i, j+1]| + sum |X[i, j] - X[i+1, j]|)``.

    Args:
        images: ``(B, H, W)`` or ``(H, W)``.
        lam: ``> 0``, a float, a scalar tensor or ``(B,)``.
        backend: ``native``, a cvxpylayers backend, or ``qp``.
        Other arguments as in :func:`tv_denoise`.

    Returns:
        The denoised images, shape, dtype and device of ``images``.
    """
    check_tensor("images", images, min_dim=2)
    if images.dim() > 3:
        raise ValueError(f"images must be (H, W) or (B, H, W), got shape {tuple(images.shape)}")
    unbatched = images.dim() == 2
    imgs = images.unsqueeze(0) if unbatched else images
    B, H, W = imgs.shape
    D = _grid_D(H, W).to(images.device)
    yb, Db, lb, _ = _prepare(imgs.reshape(B, H * W), D, lam)
    x, info = _solve(
        yb, Db, lb, backend, tuned=tuned, check_tol=check_tol, grid=(H, W), **native_args
    )
    x = x.reshape(B, H, W).to(dtype=images.dtype, device=images.device)
    x = x.squeeze(0) if unbatched else x
    return (x, info) if return_info else x


@torch.no_grad()
def tv_error_bound(x: Tensor, y: Tensor, D: Tensor, lam: float | Tensor) -> Tensor:
    """Certified bound on the RMS error ``||x - x*||_2 / sqrt(n)`` of candidate solutions.

    Args:
        x, y: ``(B, n)`` or ``(n,)``; ``D`` and ``lam`` as in :func:`tv_denoise`.

    Returns:
        ``(B,)`` (or a scalar for unbatched input), float64. Valid for any ``x``: it is
        ``sqrt(2 gap / n)`` for a dual point built from ``x``'s active set.
    """
    yb, Db, lb, unbatched = _prepare(y, D, lam)
    xb = x.reshape(yb.shape).to(torch.float64)
    out = _certify(xb, yb, Db, lb)
    return out[0] if unbatched else out


def _inv_log(lam: float) -> float:
    check_positive("lam", lam)
    return math.log(lam)


class TVDenoise(nn.Module):
    """TV denoising layer with a learnable operator ``D`` and weight ``lam`` (OptNet's
    denoising model): ``(B, n)`` or ``(n,)`` noisy signals -> denoised signals, same shape.

    Args:
        n: signal length.
        D: ``'diff'`` (first differences, ``(n-1, n)``), ``'random'`` (``0.3 N(0, 1)`` entries,
            OptNet's pure-learning start) or an ``(m, n)`` tensor.
        lam: initial ``lam > 0`` (stored as ``log lam``, so it stays positive).
        learn_D, learn_lam: make them parameters (else buffers).
        m: rows of a ``'random'`` ``D`` (default ``n - 1``).
        backend: see :data:`TV_BACKENDS`.
        generator: for the ``'random'`` initialisation.
        solver_args: passed to :func:`tv_denoise` on every call (e.g. ``check_tol``).
    """

    def __init__(
        self,
        n: int,
        D: str | Tensor = "diff",
        lam: float = 1.0,
        *,
        learn_D: bool = True,
        learn_lam: bool = True,
        m: int | None = None,
        backend: str = "native",
        generator: torch.Generator | None = None,
        **solver_args: Any,
    ):
        super().__init__()
        if backend not in TV_BACKENDS:
            raise ValueError(
                f"unknown TV backend {backend!r}; choose one of {', '.join(TV_BACKENDS)}"
            )
        if isinstance(D, str):
            if D == "diff":
                D0 = difference_matrix(n)
            elif D == "random":
                D0 = 0.3 * torch.randn(m or n - 1, n, generator=generator)
            else:
                raise ValueError(f"D must be 'diff', 'random' or a tensor, got {D!r}")
        else:
            check_tensor("D", D, min_dim=2)
            if D.dim() != 2 or D.shape[1] != n:
                raise ValueError(f"D must have shape (m, {n}), got {tuple(D.shape)}")
            D0 = D.detach().clone().float()
        log_lam = torch.tensor(_inv_log(float(lam)))
        if learn_D:
            self.D = nn.Parameter(D0)
        else:
            self.register_buffer("D", D0)
        if learn_lam:
            self.log_lam = nn.Parameter(log_lam)
        else:
            self.register_buffer("log_lam", log_lam)
        self.n, self.backend, self.solver_args = n, backend, solver_args
        self.last_info: TVInfo | None = None

    @property
    def lam(self) -> Tensor:
        """The current ``lam`` (a positive scalar tensor)."""
        return self.log_lam.exp()

    def forward(self, y: Tensor) -> Tensor:
        if y.dim() == 0 or y.shape[-1] != self.n:
            raise ValueError(f"expected signals of length {self.n}, got shape {tuple(y.shape)}")
        x, self.last_info = tv_denoise(
            y, self.D, self.lam, backend=self.backend, return_info=True, **self.solver_args
        )
        return x

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, m={self.D.shape[0]}, lam={self.lam.item():.4g}, backend={self.backend!r}"
        )


class TVDenoise2d(nn.Module):
    """Anisotropic 2-D TV denoising with a learnable ``lam``: ``(B, H, W)`` or ``(H, W)`` ->
    same shape.

    Args:
        lam: initial ``lam > 0`` (stored as ``log lam``).
        learn_lam: make it a parameter.
        backend: see :data:`TV_BACKENDS`.
        solver_args: passed to :func:`tv_denoise_2d`.
    """

    def __init__(
        self,
        lam: float = 1.0,
        *,
        learn_lam: bool = True,
        backend: str = "native",
        **solver_args: Any,
    ):
        super().__init__()
        if backend not in TV_BACKENDS:
            raise ValueError(
                f"unknown TV backend {backend!r}; choose one of {', '.join(TV_BACKENDS)}"
            )
        log_lam = torch.tensor(_inv_log(float(lam)))
        if learn_lam:
            self.log_lam = nn.Parameter(log_lam)
        else:
            self.register_buffer("log_lam", log_lam)
        self.backend, self.solver_args = backend, solver_args
        self.last_info: TVInfo | None = None

    @property
    def lam(self) -> Tensor:
        return self.log_lam.exp()

    def forward(self, images: Tensor) -> Tensor:
        x, self.last_info = tv_denoise_2d(
            images, self.lam, backend=self.backend, return_info=True, **self.solver_args
        )
        return x
