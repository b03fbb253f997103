"""The regularized-LP sort relaxations: their CVXPY statements and the functional layers.

``soft_sort`` / ``soft_rank`` (Blondel et al., ICML 2020), ``lp_topk``, ``lp_permutahedron_sort``
and ``lp_birkhoff_sort``; the modules and the registry are in :mod:`layers.sort`.

The LP relaxations keep a quadratic regularizer on purpose: a pure LP's solution is piecewise
constant in its parameters, so its gradient is zero almost everywhere (cvxpylayers issue #127).
Each problem's CVXPY statement (:func:`sort_qp_problem`) is its definition. The ``native``
backend (the default, ``DEFAULT_LP_BACKEND``) solves the same problems exactly in batched torch
(:mod:`layers.sort_native`); any backend of :mod:`layers.backends` solves the statement through
cvxpylayers. Decisions are made in float64 whatever the input dtype; half precision is computed
in float32 and returned in its own dtype. A CVXPY problem is built once per
``(kind, n, k, backend)`` and cached for the process; cvxpy is imported then, not with this
module.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from layers._sort_common import (
    check_k,
    check_scores,
    check_strength,
    compress_gaps,
    hard_permutation,
    hard_topk,
    straight_through,
    upcast_half,
)
from layers.backends import BACKENDS, check_settings, get_backend
from layers.cvxpy_layer import CvxpyProblemLayer
from layers.sort_native import (
    birkhoff_projection,
    nested_topk_matrix,
    project_permutahedron,
    topk_projection,
)

__all__ = [
    "DEFAULT_LP_BACKEND",
    "LP_SORT_BACKENDS",
    "SortQPLayer",
    "check_lp_backend",
    "lp_birkhoff_sort",
    "lp_permutahedron_sort",
    "lp_permutahedron_topk",
    "lp_topk",
    "soft_rank",
    "soft_sort",
    "sort_qp_layer",
    "sort_qp_problem",
]

# "native" solves every LP relaxation exactly in torch (layers.sort_native); every backend of
# the table solves its CVXPY statement (sort_qp_problem) through cvxpylayers. The default is what
# tasks/compare_backends.py recommends (results/backends/recommended.json; a test ties them).
LP_SORT_BACKENDS: tuple[str, ...] = ("native", *BACKENDS)
DEFAULT_LP_BACKEND = "native"


def check_lp_backend(backend: str) -> None:
    """``backend`` is ``"native"`` or an installed backend of the table; else a one-line error."""
    if backend == "native":
        return
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r}; choose one of {', '.join(LP_SORT_BACKENDS)}"
        )
    get_backend(backend)


# ---------------------------------------------------------------------------------------------
# Regularized LPs through cvxpylayers
# ---------------------------------------------------------------------------------------------

# Moreau settings, passed when a layer is built (moreau picks its algorithm then). Its active-set
# method solves these strictly convex QPs exactly, so the (almost everywhere) Jacobian is exact
# too. The interior point method's Jacobian is smoothed by near-active bounds, whatever the
# tolerance. Active set is therefore used for the n-variable QPs (top-k, isotonic) and for small
# Birkhoff problems; the n^2-variable Birkhoff QP uses the interior point above n = 8, where the
# active set becomes much slower.
_MOREAU_ACTIVE_SET: dict[str, Any] = {"solver": "active_set"}
_MOREAU_IPM: dict[str, Any] = {
    "solver": "ipm",
    "ipm_settings": {
        "tol_gap_abs": 1e-11,
        "tol_gap_rel": 1e-11,
        "tol_feas": 1e-11,
        "tol_ktratio": 1e-9,
    },
}
_BIRKHOFF_ACTIVE_SET_MAX_N = 8
# diffcp's dense derivative forms a (vars + rows)^2 matrix; above this size use LSQR instead.
_DENSE_DERIVATIVE_LIMIT = 3000


class SortQPLayer(CvxpyProblemLayer):
    """``CvxpyProblemLayer`` with the settings the sort QPs need on each backend.

    * moreau: ``moreau_options`` (active set or a tight interior point, see above).
    * diffcp: the dense derivative is swapped for LSQR when the cone program is large.
    """

    def __init__(
        self,
        problem: Any,
        parameters: list[Any],
        variable: Any,
        backend: str,
        moreau_options: dict[str, Any],
        settings: str = "accurate",
    ):
        size = sum(v.size for v in problem.variables()) + sum(c.size for c in problem.constraints)
        b = get_backend(backend)
        extra: dict[str, Any] = {}
        if settings == "accurate" and b.solver == "MOREAU":
            extra = dict(moreau_options)
        elif (
            settings == "accurate"
            and b.solver is None
            and b.kind == "cvxpylayers"
            and size > _DENSE_DERIVATIVE_LIMIT
        ):
            extra["mode"] = "lsqr"
        super().__init__(
            problem, parameters, [variable], backend=backend, settings=settings, solver_args=extra
        )
        self.param_ndims = [p.ndim for p in parameters]

    def solve(self, *params: torch.Tensor) -> torch.Tensor:
        """Solve for ``(..., p_i)`` parameters sharing the leading dims; returns the variable.

        The solvers run on the CPU: parameters on another device are copied there and the
        solution is copied back (both differentiably).
        """
        device = params[0].device
        lead = params[0].shape[: params[0].dim() - self.param_ndims[0]]
        flat = [
            p.cpu().reshape(-1, *p.shape[p.dim() - d :]) for p, d in zip(params, self.param_ndims)
        ]
        (x,) = self(*flat)
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            x = x.detach()  # moreau's outputs require grad even when no input does
        return x.reshape(*lead, *x.shape[1:]).to(device)


def sort_qp_problem(kind: str, n: int, k: int = 0) -> tuple[Any, list[Any], Any]:
    """The DPP CVXPY statement of an LP relaxation's regularized problem.

    ``kind``: ``topk`` (``k`` needed), ``isotonic`` (the permutahedron projection's dual),
    ``permutahedron-full`` or ``birkhoff``. Returns ``(problem, parameters, variable)``; each
    call builds a new problem (a moreau layer must not share one with another layer).
    """
    import cvxpy as cp
    import numpy as np

    if kind == "topk":
        # argmax_{0 <= y <= 1, sum y = k} <z, y> - |y|^2 / 2  (z = scores / strength)
        y, z = cp.Variable(n), cp.Parameter(n)
        prob = cp.Problem(
            cp.Minimize(0.5 * cp.sum_squares(y) - z @ y), [y >= 0, y <= 1, cp.sum(y) == k]
        )
        return prob, [z], y
    if kind == "isotonic":
        # Projection onto the permutahedron, through its dual (Blondel et al. 2020, Prop. 3):
        # with s = z and w both sorted in descending order, the projection of z onto P(w) is
        # s - v (in that order), v = argmin_{v_1 >= ... >= v_n} |v - (s - w)|^2 / 2.
        # n variables, n - 1 two-term constraints, and no large partial sums (well conditioned).
        v, y = cp.Variable(n), cp.Parameter(n)
        cons = [v[: n - 1] >= v[1:]] if n > 1 else []
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(v) - y @ v), cons), [y], v
    if kind == "permutahedron-full":
        # The same projection with all facets: sum of the j largest entries <= c_j (O(n^2)).
        mu, z, c = cp.Variable(n), cp.Parameter(n), cp.Parameter(n)
        cons = [cp.sum(mu) == c[n - 1]]
        cons += [cp.sum_largest(mu, j) <= c[j - 1] for j in range(1, n)]
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(mu) - z @ mu), cons), [z, c], mu
    if kind == "birkhoff":
        # argmax_{P doubly stochastic} <P, r t^T> - |P|_F^2 / 2  (t = scores / strength). One
        # column constraint is implied by the others and is dropped (keeps the KKT system
        # nonsingular).
        P, t = cp.Variable((n, n)), cp.Parameter(n)
        r = np.arange(n - 1, -n, -2, dtype=np.float64)
        cons = [P >= 0, cp.sum(P, axis=1) == 1]
        if n > 1:
            cons.append(cp.sum(P, axis=0)[: n - 1] == 1)
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(P) - (r @ P) @ t), cons), [t], P
    raise ValueError(f"unknown problem kind {kind!r}")


def sort_qp_layer(
    kind: str,
    n: int,
    k: int = 0,
    backend: str = DEFAULT_LP_BACKEND,
    settings: str = "accurate",
) -> SortQPLayer:
    """A new layer for :func:`sort_qp_problem` on ``backend``: with the library's settings
    (``settings="accurate"``: the backend's ``accurate`` settings plus the sort QPs' own, above)
    or with the solver's defaults (``"defaults"``). Its ``solve(*params)`` takes parameters with
    any leading batch dims."""
    check_settings(settings)
    prob, params, var = sort_qp_problem(kind, n, k)
    ipm = kind == "birkhoff" and n > _BIRKHOFF_ACTIVE_SET_MAX_N
    options = _MOREAU_IPM if ipm else _MOREAU_ACTIVE_SET
    return SortQPLayer(prob, params, var, backend, options, settings=settings)


@lru_cache(maxsize=128)
def _qp_layer(kind: str, n: int, k: int, backend: str) -> SortQPLayer:
    """Build (once per process) the DPP problem ``kind`` for ``n`` items (and ``k``)."""
    return sort_qp_layer(kind, n, k, backend)


def _project_permutahedron(
    z: torch.Tensor,
    w: torch.Tensor,
    backend: str,
    *,
    z_sorted: bool = False,
    w_sorted: bool = False,
) -> torch.Tensor:
    """Euclidean projection of ``z`` onto the permutahedron ``P(w)``, both ``(..., n)``.

    This is the quadratically regularized LP ``argmax_{mu in P(w)} <z, mu> - |mu|^2 / 2``. It is
    solved through its dual, isotonic regression in the descending order of ``z`` (the
    ``"isotonic"`` problem), and the result is put back in item order. ``w`` may be broadcast.
    """
    if backend == "native":
        return project_permutahedron(z, w, z_sorted=z_sorted, w_sorted=w_sorted)
    n = z.shape[-1]
    s, order = torch.sort(z, dim=-1, descending=True, stable=True)
    w_sorted = torch.sort(w, dim=-1, descending=True).values
    if n == 1:
        return w_sorted + 0 * s
    y = s - w_sorted
    # Isotonic regression is positively homogeneous, so solve at unit scale (better conditioned
    # for the solvers) and scale back. Its Jacobian does not depend on the scale, so gradients
    # pass the scaling unchanged (a cotangent times 1e300 would overflow inside the solver).
    scale = y.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    unit = _ScaleForward.apply(y, 1.0 / scale)
    v = _ScaleForward.apply(_qp_layer("isotonic", n, 0, backend).solve(unit), scale)
    return torch.zeros_like(s).scatter(-1, order, s - v)


class _ScaleForward(torch.autograd.Function):
    """``x * factor`` forward, the identity backward: for a positively homogeneous map ``f``,
    ``f(x) = c f(x / c)`` with the same Jacobian at ``x`` and ``x / c``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * factor

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


def _lp_scores(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / eps`` as the top-k and Birkhoff LPs see it: shifted, with gaps wider than ``2 eps``
    narrowed (:func:`~layers._sort_common.compress_gaps`; the solution does not change), so
    scores of any magnitude (1e30, 1e300) give the exact solution and stay small for the
    solvers."""
    return compress_gaps(x, 2.0 * eps) / eps


def _empty_batch(x: torch.Tensor, dtype: torch.dtype, square: bool) -> torch.Tensor:
    """The output for scores ``x (..., n)`` with no elements (an empty batch), made without a
    solve: ``(..., n)`` or, with ``square``, ``(..., n, n)``; its gradient to ``x`` is zero."""
    out = x * 0
    if square:
        out = out.unsqueeze(-2).expand(*x.shape[:-1], x.shape[-1], x.shape[-1])
    return out.to(dtype)


def _topk_targets(n: int, ks: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``(len(ks), n)``: row ``j`` is ``(1, ..., 1, 0, ..., 0)`` with ``ks[j]`` ones."""
    j = torch.arange(n, device=ref.device)
    return (j[None, :] < ks[:, None]).to(ref.dtype)


def soft_sort(
    values: torch.Tensor,
    regularization_strength: float = 1.0,
    hard: bool = False,
    backend: str = DEFAULT_LP_BACKEND,
    *,
    descending: bool = False,
) -> torch.Tensor:
    """Soft sort as a quadratically regularized LP over the permutahedron (Blondel et al.).

    ``argmax_{mu in P(values)} <rho, mu> - (eps / 2) |mu|^2`` with ``rho = (n, ..., 1)``, i.e. the
    projection of ``rho / eps`` onto the permutahedron of ``values``. Same convention as
    ``torchsort.soft_sort`` / fast-soft-sort (ascending unless ``descending``).

    Args:
        values: ``(..., n)``.
        regularization_strength: ``eps > 0``. ``eps -> 0`` gives the exact sort; large ``eps``
            tends to the mean of ``values`` everywhere.
        hard: the exact sort in the forward pass, this relaxation's gradient.
        backend: ``"native"`` (exact, :mod:`layers.sort_native`) or a backend of
            ``layers.backends.BACKENDS`` solving the CVXPY statement.
        descending: sort in descending order.

    Returns:
        ``(..., n)`` softly sorted values.
    """
    n = check_scores(values, "values")
    eps = check_strength(regularization_strength)
    check_lp_backend(backend)
    x = upcast_half(values)
    if x.numel() == 0:  # an empty batch: nothing to solve
        return _empty_batch(x, values.dtype, square=False)
    sign = 1.0 if descending else -1.0
    rho = torch.arange(n, 0, -1, dtype=x.dtype, device=x.device) / eps
    out = sign * _project_permutahedron(rho.expand_as(x), sign * x, backend, z_sorted=True)
    if hard:
        exact = torch.sort(x, dim=-1, descending=descending).values
        out = straight_through(exact, out)
    return out.to(values.dtype)


def soft_rank(
    values: torch.Tensor,
    regularization_strength: float = 1.0,
    hard: bool = False,
    backend: str = DEFAULT_LP_BACKEND,
    *,
    descending: bool = False,
) -> torch.Tensor:
    """Soft ranks as a quadratically regularized LP over the permutahedron ``P(1..n)``.

    ``argmax_{mu in P(rho)} <values, mu> - (eps / 2) |mu|^2``, i.e. the projection of
    ``values / eps`` onto the permutahedron of ``rho = (n, ..., 1)``. Same convention as
    ``torchsort.soft_rank``: rank 1 = smallest value (largest if ``descending``).

    Args:
        values: ``(..., n)``.
        regularization_strength: ``eps > 0``. ``eps -> 0`` gives the exact ranks; large ``eps``
            tends to ``(n + 1) / 2`` everywhere.
        hard: the exact ranks (ties by index) in the forward pass, this relaxation's gradient.
        backend: solver backend name.
        descending: rank 1 = largest value.

    Returns:
        ``(..., n)`` soft ranks in ``[1, n]``.
    """
    n = check_scores(values, "values")
    eps = check_strength(regularization_strength)
    check_lp_backend(backend)
    x = upcast_half(values)
    if x.numel() == 0:  # an empty batch: nothing to solve
        return _empty_batch(x, values.dtype, square=False)
    sign = -1.0 if descending else 1.0
    rho = torch.arange(n, 0, -1, dtype=x.dtype, device=x.device)
    # The projection never pools across a gap in the scores wider than the spread of rho
    # (n - 1) and is invariant to shifting a cluster between such gaps: compressing them to 2 n
    # keeps the solution and keeps huge scores (1e30) small for the solvers.
    z = compress_gaps(sign * x, 2.0 * n * eps) / eps
    out = _project_permutahedron(z, rho, backend, w_sorted=True)
    if hard:  # position in the stable order of sign * values, ascending, from 1
        order = torch.sort(sign * x, dim=-1, stable=True).indices
        pos = torch.arange(1, n + 1, dtype=x.dtype, device=x.device).expand_as(x)
        out = straight_through(torch.zeros_like(x).scatter(-1, order, pos), out)
    return out.to(values.dtype)


def lp_topk(
    scores: torch.Tensor,
    k: int,
    regularization_strength: float = 1.0,
    hard: bool = False,
    backend: str = DEFAULT_LP_BACKEND,
) -> torch.Tensor:
    """Soft top-k membership as a regularized LP over ``{0 <= y <= 1, sum y = k}`` (n variables).

    ``y = argmax <scores, y> - (eps / 2) |y|^2``, i.e. the projection of ``scores / eps`` onto
    the capped simplex (the permutahedron of ``(1, ..., 1, 0, ..., 0)``).

    Args:
        scores: ``(..., n)``.
        k: ``1 <= k <= n``.
        regularization_strength: ``eps > 0``; ``eps -> 0`` gives the hard top-k indicator (for
            distinct scores).
        hard: exact top-k indicator (ties by index) with the LP's gradient.
        backend: solver backend name.

    Returns:
        ``(..., n)`` in ``[0, 1]`` summing to ``k``.
    """
    n = check_scores(scores)
    check_k(k, n)
    eps = check_strength(regularization_strength)
    check_lp_backend(backend)
    x = upcast_half(scores)
    if x.numel() == 0:  # an empty batch: nothing to solve
        return _empty_batch(x, scores.dtype, square=False)
    if k == n:  # the feasible set is one point
        y = torch.ones_like(x) + 0 * x
    elif backend == "native":
        y = topk_projection(_lp_scores(x, eps), k)
    else:
        y = _qp_layer("topk", n, k, backend).solve(_lp_scores(x, eps))
    y = straight_through(hard_topk(x, k), y) if hard else y
    return y.to(scores.dtype)


def _nested_topk_matrix(scores: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    """``P_hat[i] = T_{i+1} - T_i`` from the regularized top-k LPs ``T_k`` for all ``k``."""
    if backend == "native":
        return nested_topk_matrix(_lp_scores(scores, eps))
    n = scores.shape[-1]
    ks = torch.arange(1, n, device=scores.device)
    w = _topk_targets(n, ks, scores)  # (n - 1, n)
    z = _lp_scores(scores, eps).unsqueeze(-2).expand(*scores.shape[:-1], n - 1, n)
    T = _project_permutahedron(z, w, backend)  # (..., n - 1, n)
    zeros = torch.zeros_like(scores).unsqueeze(-2)
    T = torch.cat([zeros, T, torch.ones_like(zeros)], dim=-2)
    return T[..., 1:, :] - T[..., :-1, :]


def lp_permutahedron_sort(
    scores: torch.Tensor,
    regularization_strength: float = 1.0,
    hard: bool = False,
    backend: str = DEFAULT_LP_BACKEND,
) -> torch.Tensor:
    """Relaxed permutation matrix from nested regularized top-k LPs over permutahedra.

    ``T_k`` = projection of ``scores / eps`` onto ``P((1,)*k + (0,)*(n-k))`` (the regularized
    top-k LP); ``P_hat[..., i, :] = T_{i+1} - T_i``. All ``T_k`` are ``clip(z - nu_k, 0, 1)`` for
    the same ``z``, so they are nested and ``P_hat`` is doubly stochastic, and
    ``P_hat[..., :k, :].sum(-2) = T_k`` exactly. Costs ``n - 1`` QPs with ``n`` variables per
    batch element, solved as one batch.

    Args:
        scores: ``(..., n)``.
        regularization_strength: ``eps > 0``; ``eps -> 0`` gives the exact permutation.
        hard: exact permutation with the relaxation's gradient.
        backend: solver backend name.

    Returns:
        ``(..., n, n)`` doubly stochastic, rows = ranks (descending).
    """
    n = check_scores(scores)
    eps = check_strength(regularization_strength)
    check_lp_backend(backend)
    x = upcast_half(scores)
    if x.numel() == 0:  # an empty batch: nothing to solve
        return _empty_batch(x, scores.dtype, square=True)
    P = _nested_topk_matrix(x, eps, backend) if n > 1 else x[..., None] * 0 + 1
    P = straight_through(hard_permutation(x), P) if hard else P
    return P.to(scores.dtype)


def lp_birkhoff_sort(
    scores: torch.Tensor,
    regularization_strength: float = 1.0,
    hard: bool = False,
    backend: str = DEFAULT_LP_BACKEND,
) -> torch.Tensor:
    """Relaxed permutation matrix as a regularized LP over the Birkhoff polytope.

    ``P_hat = argmax_{P 1 = 1, P^T 1 = 1, P >= 0} <P, r s^T> - (eps / 2) |P|_F^2`` with NeuralSort's
    row weights ``r_i = n + 1 - 2i`` (the LP's solution is the sorting permutation). With entropy
    instead of the quadratic this is ``sinkhorn_sort``. ``n^2`` variables: fine for small ``n``.

    Args:
        scores: ``(..., n)``.
        regularization_strength: ``eps > 0``; ``eps -> 0`` gives the exact permutation.
        hard: exact permutation with the relaxation's gradient.
        backend: solver backend name.

    Returns:
        ``(..., n, n)`` doubly stochastic (sparse: many exact zeros), rows = ranks.
    """
    n = check_scores(scores)
    eps = check_strength(regularization_strength)
    check_lp_backend(backend)
    x = upcast_half(scores)
    if x.numel() == 0:  # an empty batch: nothing to solve
        return _empty_batch(x, scores.dtype, square=True)
    t = _lp_scores(x, eps)
    if n == 1:
        P = x[..., None] * 0 + 1
    elif backend == "native":
        r = torch.arange(n - 1, -n, -2, dtype=t.dtype, device=t.device)  # NeuralSort's weights
        P = birkhoff_projection(r.unsqueeze(-1) * t.unsqueeze(-2))
    else:
        P = _qp_layer("birkhoff", n, 0, backend).solve(t)
    P = straight_through(hard_permutation(x), P) if hard else P
    return P.to(scores.dtype)


def lp_permutahedron_topk(
    scores: torch.Tensor,
    k: int,
    regularization_strength: float = 1.0,
    hard: bool = False,
    backend: str = DEFAULT_LP_BACKEND,
) -> torch.Tensor:
    """Soft top-k membership as the projection of ``scores / eps`` onto the permutahedron
    ``P((1,)*k + (0,)*(n-k))``, solved through isotonic regression (the map of :func:`lp_topk`,
    computed as :func:`lp_permutahedron_sort` computes its rows).

    Args and returns as in :func:`lp_topk`.
    """
    n = check_scores(scores)
    check_k(k, n)
    eps = check_strength(regularization_strength)
    check_lp_backend(backend)
    x = upcast_half(scores)
    if x.numel() == 0:  # an empty batch: nothing to solve
        return _empty_batch(x, scores.dtype, square=False)
    if k == n:
        y = torch.ones_like(x) + 0 * x
    elif backend == "native":  # the same projection as lp_topk's (and as this relaxation's rows)
        y = topk_projection(_lp_scores(x, eps), k)
    else:
        w = _topk_targets(n, torch.tensor([k], device=x.device), x)[0]
        y = _project_permutahedron(_lp_scores(x, eps), w, backend)
    y = straight_through(hard_topk(x, k), y) if hard else y
    return y.to(scores.dtype)
