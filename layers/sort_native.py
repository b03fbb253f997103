"""Exact native solvers of the regularized LP sort relaxations.

The CVXPY statements in :mod:`layers.sort_lp` define these problems; the functions here solve the
same problems exactly, batched over all leading dims, on any device, with exact derivatives.

* :func:`project_permutahedron` -- the Euclidean projection of ``z`` onto the permutahedron
  ``P(w)`` (behind ``soft_sort``, ``soft_rank`` and ``lp_topk``): one sort, then the decreasing
  isotonic regression of ``s - w`` (``s``, ``w`` sorted in descending order) by
  pool-adjacent-violators, where every round merges all violating neighbour blocks at once.
  Backward: the isotonic regression's Jacobian averages within the pooled blocks.
* :func:`nested_topk_matrix` -- the ``n - 1`` capped-simplex projections
  ``T_k = clip(z - nu_k, 0, 1)`` (``sum T_k = k``) behind ``lp_permutahedron_sort``, with every
  threshold ``nu_k`` from one sort of ``z`` (the piecewise-linear ``sum clip(z - nu, 0, 1)`` is
  evaluated at its ``2n`` breakpoints). Backward: ``J_k = diag(f_k) - f_k f_k' / |f_k|`` with
  ``f_k`` the coordinates strictly between 0 and 1.
* :func:`birkhoff_projection` -- the projection of ``C`` onto the doubly stochastic matrices
  (the quadratically regularized Birkhoff LP): semismooth Newton on the dual ``(a, b)`` with
  ``P = [C - a 1' - 1 b']_+``, finished by an exact solve on the final support. Backward: the
  projection onto ``{Y supported on the support, Y 1 = 0, Y' 1 = 0}``.

All arithmetic that decides the solution runs in float64; results come back in the input dtype.
On the CPU the permutahedron projection (sort, pooling, backward) and the single top-k threshold
run as compiled loops (:mod:`layers._pav_kernel`, numba): one call per batch instead of dozens
of small tensor operations, which is what a small problem costs otherwise. The batched torch code
is the path on other devices (and with ``use_compiled = False``); the tests hold both to the
same results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from layers._checks import SolverError, format_indices

__all__ = [
    "birkhoff_dual",
    "birkhoff_projection",
    "isotonic_regression",
    "nested_topk_matrix",
    "project_permutahedron",
    "topk_projection",
]

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Permutahedron: pool adjacent violators, all violating pairs per round
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    """:mod:`layers._pav_kernel` (numba's compiled loops), or None without numba."""
    try:
        import layers._pav_kernel as kernels
    except ImportError:  # pragma: no cover - numba is a dependency; the torch path still works
        return None
    return kernels


def _compiled(*tensors: Tensor) -> Any:
    """The compiled kernels when every tensor is on the CPU (and numba is there), else None."""
    if not use_compiled or any(t.device.type != "cpu" for t in tensors):
        return None
    return _kernels()


use_compiled = True  # False runs the batched torch code on the CPU too (the tests compare both)


def _np(t: Tensor) -> Any:
    return t.detach().numpy()


def _pav_blocks(s: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Blocks of the decreasing isotonic regression of ``y = s - w`` (float64 ``(B, n)``):
    :func:`_pav_blocks_torch`'s result, by one compiled loop for CPU tensors."""
    kernels = _compiled(s, w)
    if kernels is None:
        return _pav_blocks_torch(s, w)
    block = torch.empty(s.shape, dtype=torch.long)
    count, ms, mw = (torch.empty_like(s) for _ in range(3))
    kernels.pav_blocks(_np(s), _np(w), *(_np(t) for t in (block, count, ms, mw)))
    return block, count, ms, mw


def _pav_blocks_torch(s: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Blocks of the decreasing isotonic regression of ``y = s - w`` (rows of ``(B, n)``).

    Returns ``(block, count, ms, mw)``: ``block (B, n)`` the block index of every position,
    ``count (B, n)`` the size of each block (1 where unused, to divide safely) and the block
    means of ``s`` and ``w`` (entry ``b`` for block ``b``). Neighbouring blocks violate when the
    mean of ``y`` rises from one to the next; comparing the means of ``s`` and ``w`` separately
    keeps ties in huge ``s`` exact. Merging any violating pair never separates an optimal block,
    so every round merges all of them; the first round, on single entries, needs no sums.
    """
    B, n = s.shape
    merge = (s[:, :-1] - s[:, 1:]) < (w[:, :-1] - w[:, 1:])
    if not bool(merge.any()):
        block = torch.arange(n, device=s.device).expand(B, n)
        return block, torch.ones_like(s), s, w
    start = torch.ones(B, n, dtype=torch.bool, device=s.device)
    start[:, 1:] = ~merge
    ones = torch.ones_like(s)
    for _ in range(n):
        block = start.cumsum(-1) - 1
        count = torch.zeros_like(s).scatter_add_(-1, block, ones)
        ms = torch.zeros_like(s).scatter_add_(-1, block, s).div_(count.clamp_min_(1))
        mw = torch.zeros_like(w).scatter_add_(-1, block, w).div_(count)
        # at a block's first position the previous position holds the previous block
        prev, cur = block[:, :-1], block[:, 1:]
        ds = ms.gather(-1, prev).sub_(ms.gather(-1, cur))
        dw = mw.gather(-1, prev).sub_(mw.gather(-1, cur))
        merge = start[:, 1:] & (ds < dw)
        if not bool(merge.any()):
            return block, count, ms, mw
        start[:, 1:] &= ~merge
    raise AssertionError("pool adjacent violators did not terminate")  # pragma: no cover


def _block_average(x: Tensor, block: Tensor, count: Tensor) -> Tensor:
    """Replace every entry by the mean over its block (same shape as ``x``)."""
    return (torch.zeros_like(x).scatter_add_(-1, block, x) / count).gather(-1, block)


class _PermutahedronProjection(torch.autograd.Function):
    """The projection of ``z (B, n)`` onto ``P(w)``: sort both, pool, put back in item order.

    In descending order the result is ``r = s - v`` with ``v`` the isotonic regression of
    ``s - w``; its Jacobian averages within the pooled blocks: ``dr/ds = I - A``,
    ``dr/dw = A``. One function (not a chain of sort, scatter and cast nodes) keeps the
    per-call overhead small.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: Tensor, w: Tensor, z_sorted: bool, w_sorted: bool
    ) -> Tensor:
        kernels = _compiled(z, w)
        if kernels is not None:  # sort, pool and put back in one compiled call per batch
            w_order = None
            if not w_sorted:
                w, w_order = torch.sort(w, dim=-1, descending=True)
            r = torch.empty_like(z)
            order = torch.empty(z.shape, dtype=torch.long)
            block, count = torch.empty_like(order), torch.empty(z.shape, dtype=F64)
            kernels.project_rows(
                _np(z), _np(w), z_sorted, *(_np(t) for t in (r, order, block, count))
            )
            ctx.compiled = True
            ctx.save_for_backward(block, count, order, w_order)
            return r
        ctx.compiled = False
        # sorted in the input's dtype (the same order, faster than in float64), then widened
        if z_sorted:
            s, z_order = z.to(F64), None
        else:
            s, z_order = torch.sort(z, dim=-1, descending=True, stable=True)
            s = s.to(F64)
        if w_sorted:
            w_desc, w_order = w.to(F64), None
        else:
            w_desc, w_order = torch.sort(w, dim=-1, descending=True)
            w_desc = w_desc.to(F64)
        block, count, ms, mw = _pav_blocks(s, w_desc)
        # r = (s - mean_block s) + mean_block w: no cancellation between huge s and small w
        r = (s - ms.gather(-1, block) + mw.gather(-1, block)).to(z.dtype)
        if z_order is not None:
            r = torch.empty_like(r).scatter_(-1, z_order, r)
        ctx.save_for_backward(block, count.to(z.dtype), z_order, w_order)
        return r

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        # a linear map with coefficients 1 / block size: exact enough in the gradient's dtype
        block, count, z_order, w_order = ctx.saved_tensors
        if ctx.compiled:
            g = g.contiguous()
            gz, gw = torch.empty_like(g), torch.empty_like(g)
            _kernels().project_rows_backward(*(_np(t) for t in (g, z_order, block, count, gz, gw)))
            if w_order is not None:
                gw = torch.empty_like(gw).scatter_(-1, w_order, gw)
            return gz, gw, None, None
        gs = g if z_order is None else g.gather(-1, z_order)  # descending order of z
        avg = _block_average(gs, block, count.to(g.dtype))
        gz, gw = gs - avg, avg
        if z_order is not None:
            gz = torch.empty_like(gz).scatter_(-1, z_order, gz)
        if w_order is not None:
            gw = torch.empty_like(gw).scatter_(-1, w_order, gw)
        return gz, gw, None, None


class _IsotonicRegression(torch.autograd.Function):
    """``v = argmin_{v_1 >= ... >= v_n} |v - y|^2``; its Jacobian averages within the blocks."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:  # type: ignore[override]
        y64 = y.to(F64)
        block, count, my, _ = _pav_blocks(y64, torch.zeros_like(y64))
        ctx.save_for_backward(block, count)
        return my.gather(-1, block).to(y.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        block, count = ctx.saved_tensors
        return _block_average(g.to(F64), block, count).to(g.dtype)


def isotonic_regression(y: Tensor) -> Tensor:
    """Decreasing isotonic regression of ``y (..., n)``: the ``isotonic`` CVXPY statement
    ``argmin_{v_1 >= ... >= v_n} |v|^2 / 2 - <y, v>`` (the dual of the permutahedron
    projection), by pool-adjacent-violators; differentiable."""
    n = y.shape[-1]
    return _IsotonicRegression.apply(y.reshape(-1, n)).reshape(y.shape)


def project_permutahedron(
    z: Tensor, w: Tensor, *, z_sorted: bool = False, w_sorted: bool = False
) -> Tensor:
    """Euclidean projection of ``z`` onto the permutahedron ``P(w)``, both ``(..., n)``.

    ``argmax_{mu in P(w)} <z, mu> - |mu|^2 / 2`` (``w`` may be broadcast against ``z``).
    Differentiable in ``z`` and ``w``. ``z_sorted`` / ``w_sorted`` say that the input is already
    in descending order (``z`` without ties), which saves its sort.
    """
    if z.shape == w.shape or (w.dim() == 1 and w.shape[-1] == z.shape[-1]):
        shape = z.shape  # the common cases, without torch.broadcast_shapes (tens of us)
    else:
        shape = torch.broadcast_shapes(z.shape, w.shape)
    n = shape[-1]
    z, w = z.expand(shape).reshape(-1, n), w.expand(shape).reshape(-1, n)
    return _PermutahedronProjection.apply(z, w, z_sorted, w_sorted).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Nested top-k (capped simplex) projections: all thresholds from one sort
# ---------------------------------------------------------------------------------------------


def _topk_thresholds(z: Tensor, ks: Tensor) -> Tensor:
    """``nu (B, len(ks))`` with ``sum_i clip(z_i - nu_j, 0, 1) = ks[j]`` (float64, for ``z`` of
    any float dtype), ``0 < k < n``.

    ``f(nu) = sum clip(z - nu, 0, 1)`` is piecewise linear with breakpoints ``z_i`` and
    ``z_i - 1``. With ``s`` sorted descending and prefix sums ``S``, at any ``nu`` the entries at
    1 are the top ``c1 = #{s - 1 >= nu}`` and the free ones the next up to ``cf = #{s > nu}``,
    so ``f(nu) = c1 + S[cf] - S[c1] - (cf - c1) nu``. ``f`` is evaluated at its two sorted
    families of breakpoints, ``nu = s_i`` and ``nu = s_i - 1`` (no merge of the two); ``nu_k``
    lies on the segment above the largest breakpoint with ``f >= k``, where
    ``nu = (S[cf] - S[c1] + c1 - k) / (cf - c1)`` exactly. Counts compare ``nu`` with ``s - 1``
    as stored, so a breakpoint ``s_i - 1`` matches itself exactly.
    """
    B, n = z.shape
    if ks.numel() == 1 and n <= _DENSE_TOPK:
        return _topk_threshold_dense(z.to(F64), float(ks.reshape(-1)[0]))
    s = torch.sort(z, dim=-1, descending=True).values.to(F64)  # in z's dtype: exact, faster
    asc = s.flip(-1).contiguous()
    asc1 = asc - 1
    S = torch.cat([s.new_zeros(B, 1), s.cumsum(-1)], -1)  # S[j] = sum of the top j

    def f(nu: Tensor) -> Tensor:
        c1 = n - torch.searchsorted(asc1, nu, right=False)  # at 1: s - 1 >= nu
        cf = n - torch.searchsorted(asc, nu, right=True)  # at 1 or free: s > nu
        return c1 + S.gather(-1, cf) - S.gather(-1, c1) - (cf - c1) * nu

    k = ks.to(dtype=F64, device=z.device).expand(B, -1).contiguous()
    lo = torch.full_like(k, -torch.inf)
    steps = max(1, n.bit_length())
    few = k.shape[-1] * steps * 8 < n  # bisection on the breakpoints beats evaluating f at all
    for bp in (s, s - 1):  # each family is sorted descending, f(bp) non-decreasing along it
        if few:
            i = _first_at_least(f, bp, k, steps)
        else:
            fb = f(bp).cummax(-1).values  # monotone despite rounding
            i = torch.searchsorted(fb, k, right=False)  # first index with f >= k
        lo = torch.where(i < n, torch.maximum(lo, bp.gather(-1, i.clamp(max=n - 1))), lo)
    c1 = n - torch.searchsorted(asc1, lo, right=True)  # on the segment just above lo
    cf = n - torch.searchsorted(asc, lo, right=True)
    nu = (S.gather(-1, cf) - S.gather(-1, c1) + c1 - k) / (cf - c1).clamp_min(1)
    return torch.where(cf > c1, nu.clamp_min(lo), lo)


def _topk_threshold_dense(z: Tensor, k: float) -> Tensor:
    """``nu (B, 1)`` of :func:`_topk_thresholds` for one ``k``, for small ``n``: ``f`` at all
    ``2n`` breakpoints at once (``(B, 2n, n)``, no sort), ``lo`` the largest with ``f >= k``, and
    ``nu`` on the segment just above it, as there (a handful of operations: at n = 16 the
    per-operation cost is what counts)."""
    bp = torch.cat([z, z - 1], -1)
    fb = (z.unsqueeze(-2) - bp.unsqueeze(-1)).clamp(0, 1).sum(-1)
    lo = torch.where(fb >= k, bp, -torch.inf).amax(-1, keepdim=True)
    at1 = z - 1 > lo  # at 1 just above lo
    free = (z > lo) & ~at1
    c1, cf = at1.sum(-1, keepdim=True), (z > lo).sum(-1, keepdim=True)
    nu = ((z * free).sum(-1, keepdim=True) + c1 - k) / (cf - c1).clamp_min(1)
    return torch.where(cf > c1, nu.clamp_min(lo), lo)


def _first_at_least(f: Callable[[Tensor], Tensor], bp: Tensor, k: Tensor, steps: int) -> Tensor:
    """The first index ``i`` (``n`` if none) with ``f(bp[..., i]) >= k`` for each entry of
    ``k (B, K)``, by bisection over the ``n`` breakpoints ``bp (B, n)`` along which ``f`` is
    non-decreasing: ``steps >= log2(n + 1)`` evaluations of ``f`` at ``K`` points per row."""
    n = bp.shape[-1]
    lo = torch.zeros_like(k, dtype=torch.long)
    hi = torch.full_like(lo, n)
    for _ in range(steps):
        mid = (lo + hi) // 2
        ok = f(bp.gather(-1, mid.clamp(max=n - 1))) >= k
        ok = ok & (mid < n)
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok | (mid >= hi), lo, mid + 1)
    return hi


_DENSE_TOPK = 32  # up to this n, one top-k threshold is found without sorting


def _chunks(B: int, n: int, budget: int = 1 << 24) -> list[slice]:
    """Slices of the batch with at most ``budget`` entries of ``n x n`` temporaries each."""
    step = max(1, budget // max(1, n * n))
    return [slice(i, min(B, i + step)) for i in range(0, B, step)]


class _TopK(torch.autograd.Function):
    """``y = clip(z - nu_k, 0, 1)``, the projection of ``z (B, n)`` onto the capped simplex."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, k: int) -> Tensor:  # type: ignore[override]
        z64 = z.to(F64)
        kernels = _compiled(z)
        if kernels is not None:
            nu = torch.empty(z.shape[0], 1, dtype=F64)
            kernels.topk_thresholds(_np(z64), float(k), _np(nu))
        else:
            nu = _topk_thresholds(z, torch.tensor([k]))
        y = (z64 - nu).clamp(0, 1)
        ctx.save_for_backward((y > 0) & (y < 1))
        return y.to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (free,) = ctx.saved_tensors
        f = free.to(g.dtype)
        gf = g * f
        return gf - f * gf.sum(-1, keepdim=True) / f.sum(-1, keepdim=True).clamp_min(1), None


def topk_projection(z: Tensor, k: int) -> Tensor:
    """Projection of ``z (..., n)`` onto ``{0 <= y <= 1, sum y = k}``, ``0 < k < n``:
    ``clip(z - nu, 0, 1)``. Backward: ``diag(f) - f f' / |f|``, ``f`` the entries in (0, 1)."""
    n = z.shape[-1]
    return _TopK.apply(z.reshape(-1, n), k).reshape(z.shape)


class _NestedTopK(torch.autograd.Function):
    """``P (B, n, n)``: ``P[i] = T_{i+1} - T_i`` with ``T_k = clip(z - nu_k, 0, 1)``,
    ``T_0 = 0``, ``T_n = 1``. Temporaries of size ``n x n`` are made a few elements at a time."""

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:  # type: ignore[override]
        B, n = z.shape
        nu = _topk_thresholds(z, torch.arange(1, n)).to(z.dtype)
        P = z.new_empty(B, n, n)
        for c in _chunks(B, n):
            T = (z[c].unsqueeze(-2) - nu[c].unsqueeze(-1)).clamp_(0, 1)  # (b, n - 1, n)
            P[c, :-1] = T
            P[c, -1] = 1
            P[c, 1:] -= T
        ctx.save_for_backward(z, nu)
        return P

    @staticmethod
    def backward(ctx: Any, G: Tensor) -> Tensor:  # type: ignore[override]
        z, nu = ctx.saved_tensors
        gz = torch.empty_like(z)
        for c in _chunks(z.shape[0], z.shape[-1]):
            d = z[c].unsqueeze(-2) - nu[c].unsqueeze(-1)
            f = ((d > 0) & (d < 1)).to(G.dtype)
            gT = (G[c, :-1] - G[c, 1:]) * f  # dL/dT_k on the free entries
            mean = gT.sum(-1, keepdim=True) / f.sum(-1, keepdim=True).clamp_min(1)
            gz[c] = (gT - f * mean).sum(-2)
        return gz


def nested_topk_matrix(z: Tensor) -> Tensor:
    """``P (..., n, n)`` with ``P[i] = T_{i+1} - T_i``, ``T_k`` the projection of ``z (..., n)``
    onto ``{0 <= y <= 1, sum y = k}`` (``T_0 = 0``, ``T_n = 1``): doubly stochastic, every
    threshold from one sort of ``z``."""
    n = z.shape[-1]
    return _NestedTopK.apply(z.reshape(-1, n)).reshape(*z.shape, n)


# ---------------------------------------------------------------------------------------------
# Birkhoff polytope: dual semismooth Newton with an exact finish
# ---------------------------------------------------------------------------------------------


def _support_solve(M: Tensor, ru: Tensor, rv: Tensor) -> tuple[Tensor, Tensor]:
    """A solution of ``[[diag(M 1), M], [M', diag(M' 1)]] [u; v] = [ru; rv]`` (singular along
    ``(c 1, -c 1)`` on every connected block of the support ``M (B, n, n)``, 0/1), for
    ``ru, rv (B, n)``: the Schur complement on ``v`` with a tiny diagonal shift, then two steps
    of iterative refinement against the unshifted system."""
    delta = 1e-10
    dr, dc = M.sum(-1), M.sum(-2)
    dri = 1.0 / (dr + delta)
    L, _ = torch.linalg.cholesky_ex(torch.diag_embed(dc + delta) - M.mT @ (dri.unsqueeze(-1) * M))

    def apply(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        Mv, Mtu = (M @ v.unsqueeze(-1)).squeeze(-1), (M.mT @ u.unsqueeze(-1)).squeeze(-1)
        return dr * u + Mv, dc * v + Mtu

    def raw(eu: Tensor, ev: Tensor) -> tuple[Tensor, Tensor]:
        rhs = ev - (M.mT @ (dri * eu).unsqueeze(-1)).squeeze(-1)
        v = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        u = dri * (eu - (M @ v.unsqueeze(-1)).squeeze(-1))
        return u, v

    u, v = raw(ru, rv)
    for _ in range(2):
        au, av = apply(u, v)
        cu, cv = raw(ru - au, rv - av)
        u, v = u + cu, v + cv
    return u, v


def _exact_step(X: Tensor, du: Tensor, dv: Tensor, iters: int = 60) -> Tensor:
    """The maximizer ``t >= 0`` of the concave piecewise quadratic
    ``phi(t) = -|[X + t dX]_+|^2 / 2 - t (1'du + 1'dv)`` with ``dX = -(du 1' + 1 dv')``.

    ``phi'`` is piecewise linear and non-increasing, with ``phi'(0) > 0`` along an ascent
    direction. A bracket ``[lo, hi]`` with ``phi'(lo) > 0 >= phi'(hi)`` shrinks by Newton steps
    on ``phi'`` (exact once no breakpoint lies between the iterate and the root), with bisection
    when a step leaves the bracket. Shapes: ``X (B, n, n)``, ``du, dv (B, n)``.
    """
    dX = -(du.unsqueeze(-1) + dv.unsqueeze(-2))
    lin = du.sum(-1) + dv.sum(-1)

    def derivatives(t: Tensor) -> tuple[Tensor, Tensor]:
        Y = X + t.view(-1, 1, 1) * dX
        on = Y > 0
        d1 = -(torch.where(on, Y * dX, 0.0)).sum((-2, -1)) - lin
        d2 = -(torch.where(on, dX * dX, 0.0)).sum((-2, -1))
        return d1, d2

    lo, hi = torch.zeros_like(lin), torch.ones_like(lin)
    d1, _ = derivatives(hi)
    for _ in range(60):  # grow hi until phi'(hi) <= 0
        grow = d1 > 0
        if not bool(grow.any()):
            break
        lo, hi = torch.where(grow, hi, lo), torch.where(grow, 2 * hi, hi)
        d1, _ = derivatives(hi)
    t = lo
    for _ in range(iters):
        d1, d2 = derivatives(t)
        lo, hi = torch.where(d1 > 0, t, lo), torch.where(d1 <= 0, t, hi)
        step = torch.where(d2 < 0, t - d1 / d2.clamp(max=-1e-300), hi)
        new = torch.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
        new = torch.where(d1.abs() <= 1e-15 * (1 + lin.abs()), t, new)
        if bool((new == t).all()):
            break
        t = new
    return t


def _band_start(C: Tensor) -> tuple[Tensor, Tensor]:
    """A dual start from a guessed support: for ``C = r t'`` with ``r`` descending, row ``i``
    (rank ``i``) next to the columns ranked ``i - 1, i, i + 1`` by ``t`` (the hard sort's
    permutation, widened by one), with ``(a, b)`` making that support's rows and columns sum
    to 1."""
    n = C.shape[-1]
    key = C[..., 0, :] - C[..., -1, :]  # (r_1 - r_n) t: orders the columns as t
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(n, device=C.device).expand_as(order).contiguous()
    )
    rows = torch.arange(n, device=C.device).view(1, n, 1)
    M = ((rank.unsqueeze(-2) - rows).abs() <= 1).to(C.dtype)
    G = C * M
    return _support_solve(M, G.sum(-1) - 1.0, G.sum(-2) - 1.0)


@torch.no_grad()
def birkhoff_dual(
    C: Tensor, max_iter: int = 100, start: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve the Birkhoff projection of ``C (B, n, n)`` (float64) through its dual.

    Maximizes the concave dual ``-|[C - a 1' - 1 b']_+|^2 / 2 - 1'a - 1'b`` by semismooth
    Newton from ``start`` (default :func:`_band_start`). The Newton step on the current support
    ``M`` (the entries of ``C - a 1' - 1 b'`` above minus rounding, so entries at zero keep the
    support connected) is taken in full where it meets the optimality conditions
    (``C - a 1' - 1 b'`` nonnegative on ``M`` and nonpositive off it, to rounding: then ``P`` is
    exact) or increases the dual enough; elsewhere the exact step along it
    (:func:`_exact_step`).

    Returns ``(a, b, M, converged)``: the duals ``(B, n)``, the support ``(B, n, n)`` (0/1) with
    ``P = (C - a 1' - 1 b') * M``, and ``(B,)`` bool.
    """
    B = C.shape[0]
    a, b = _band_start(C) if start is None else (start[0].clone(), start[1].clone())
    M = torch.zeros_like(C)
    done = torch.zeros(B, dtype=torch.bool, device=C.device)
    tau = 1e-13 * (1.0 + C.abs().amax((-2, -1)))  # rounding of an entry of C - a 1' - 1 b'
    idx = torch.arange(B, device=C.device)  # the elements still iterating
    for _ in range(max_iter):
        if idx.numel() == 0:
            break
        Ci, ai, bi, ti = C[idx], a[idx], b[idx], tau[idx].view(-1, 1, 1)
        X = Ci - ai.unsqueeze(-1) - bi.unsqueeze(-2)
        Mi = (X > -ti).to(C.dtype)  # entries at zero join: they connect the support
        P = X.clamp_min(0)
        gu, gv = P.sum(-1) - 1.0, P.sum(-2) - 1.0  # the dual's gradient
        du, dv = _support_solve(Mi, gu, gv)
        X1 = X - du.unsqueeze(-1) - dv.unsqueeze(-2)
        exact = ((X1 >= -ti) | (Mi == 0)).all(-1).all(-1) & ((X1 <= ti) | (Mi > 0)).all(-1).all(-1)
        slope = (gu * du).sum(-1) + (gv * dv).sum(-1)
        P1 = X1.clamp_min(0)
        gain = 0.5 * ((P * P).sum((-2, -1)) - (P1 * P1).sum((-2, -1))) - du.sum(-1) - dv.sum(-1)
        t = torch.ones_like(slope)
        redo = ~exact & ~(gain >= 1e-4 * slope)
        if bool(redo.any()):
            t[redo] = _exact_step(X[redo], du[redo], dv[redo])
        a[idx] = ai + t.unsqueeze(-1) * du
        b[idx] = bi + t.unsqueeze(-1) * dv
        M[idx] = Mi
        done[idx] = exact
        idx = idx[~exact]
    return a, b, M, done


class _BirkhoffProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, C: Tensor) -> Tensor:  # type: ignore[override]
        C64 = C.to(F64)
        a, b, M, done = birkhoff_dual(C64)
        if not bool(done.all()):  # again from the solutions of flatter problems (C / 4^k)
            bad = torch.nonzero(~done).flatten()
            Cb = C64[bad]
            start = None
            for k in (3, 2, 1):
                a_k, b_k, _, _ = birkhoff_dual(Cb / 4**k, start=start)
                start = (4 * a_k, 4 * b_k)
            # the last solve gets more steps: a rare element needs them
            a[bad], b[bad], M[bad], done[bad] = birkhoff_dual(Cb, max_iter=2100, start=start)
        if not bool(done.all()):
            bad = torch.nonzero(~done).flatten().tolist()
            raise SolverError(
                f"lp_birkhoff_sort (native): no exact solution for batch elements "
                f"{format_indices(bad)}; try backend='moreau'",
                bad,
            )
        P = ((C64 - a.unsqueeze(-1) - b.unsqueeze(-2)) * M).clamp_min(0)
        ctx.save_for_backward(M)
        return P.to(C.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        (M,) = ctx.saved_tensors
        G = g.to(F64) * M
        u, v = _support_solve(M, G.sum(-1), G.sum(-2))
        return (G - u.unsqueeze(-1) * M - v.unsqueeze(-2) * M).to(g.dtype)


def birkhoff_projection(C: Tensor) -> Tensor:
    """Projection of ``C (..., n, n)`` onto the doubly stochastic matrices:
    ``argmin_{P >= 0, P 1 = 1, P' 1 = 1} |P - C|^2 / 2``, differentiable in ``C``."""
    n = C.shape[-1]
    out = _BirkhoffProjection.apply(C.reshape(-1, n, n))
    return out.reshape(C.shape)
