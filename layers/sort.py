"""Differentiable sorting: relaxed permutation matrices, soft sort / rank and soft top-k.

Conventions shared by every relaxation here:

* ``scores`` has shape ``(..., n)``; all leading dims are batch dims. Device and dtype come from
  ``scores`` and the outputs carry them back.
* A relaxed permutation matrix ``P_hat`` has shape ``(..., n, n)``. Rows are ranks in descending
  order (row 0 = the largest score), columns are items, so ``P_hat @ scores`` approximates
  ``scores`` sorted in descending order, and ``P_hat[..., :k, :].sum(-2)`` is the relaxed top-k
  membership of every item.
* Each relaxation has a temperature ``tau`` (or ``regularization_strength`` for the LP ones); the
  limit ``tau -> 0`` gives the hard sort. ``hard=True`` returns the exact permutation (or top-k
  indicator) in the forward pass with the relaxation's gradient (straight-through). Ties are
  broken by index (stable sort): among equal scores the lower index ranks first.

==========================  ===========================  ====================================
name (``SORTS``)            class / function             what it is
==========================  ===========================  ====================================
``neuralsort``              ``NeuralSort``               closed form, row-stochastic (Grover
                            ``neural_sort``              et al., ICLR 2019); O(n^2) memory
``neuralsort-stochastic``   ``StochasticNeuralSort``     Plackett-Luce samples by Gumbel
                            ``stochastic_neural_sort``   perturbation, then NeuralSort
``sinkhorn``                ``Sinkhorn``                 Sinkhorn scaling of exp(r s^T / tau):
                            ``sinkhorn_sort``            entropy-regularized Birkhoff LP
``lp-permutahedron``        ``LPPermutahedron``          quadratically regularized LP over
                            ``soft_sort``, ``soft_rank``  the permutahedron (Blondel et al.,
                            ``lp_permutahedron_sort``    ICML 2020), through cvxpylayers
``lp-birkhoff``             ``LPBirkhoff``               quadratically regularized LP over
                            ``lp_birkhoff_sort``         doubly stochastic matrices (n^2 vars)
``lp-topk``                 ``LPTopK``, ``lp_topk``      regularized LP over {0 <= y <= 1,
                                                         sum y = k} (n vars), top-k only
==========================  ===========================  ====================================

The LP relaxations keep a quadratic regularizer on purpose: a pure LP's solution is piecewise
constant in its parameters, so its gradient is zero almost everywhere (cvxpylayers issue #127).
They are solved through cvxpylayers by the backend named in ``backend`` (``layers.backends``;
default ``DEFAULT_LP_BACKEND``), in float64 whatever the input dtype. Every CVXPY problem is
built once per ``(n, k, backend)`` and cached for the process. Costs on one CPU thread, batch 100:
top-k and soft rank ~10 ms at n = 16 and ~0.3 s at n = 100; ``lp_birkhoff_sort`` ~0.3 s at
n = 16 and ~1.3 s per element at n = 100; ``lp_permutahedron_sort`` ~0.15 s at n = 16 and
~0.15 s per element at n = 100 (n - 1 QPs each). NeuralSort at n = 100 takes ~9 ms.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from layers._checks import check_positive, check_tensor
from layers.backends import CvxpyProblemLayer, get_backend

__all__ = [
    "DEFAULT_LP_BACKEND",
    "SORTS",
    "LPBirkhoff",
    "LPPermutahedron",
    "LPTopK",
    "NeuralSort",
    "Sinkhorn",
    "SortRelaxation",
    "StochasticNeuralSort",
    "get_sort",
    "lp_birkhoff_sort",
    "lp_permutahedron_sort",
    "lp_topk",
    "neural_sort",
    "sinkhorn_sort",
    "soft_rank",
    "soft_sort",
    "stochastic_neural_sort",
]

# The fastest backend whose gradients are accurate: moreau solves a whole batch in C++, and its
# active-set method solves these QPs exactly (top-k gradients within ~1e-11 of the closed form).
# Measured for the top-k LP at batch 100 x n = 100 (one shared CPU thread): ~0.3 s per
# forward+backward, against 4.6 s (diffcp-ecos) and 6.9 s (diffcp-clarabel), whose tuned
# settings (dense derivative, tolerances 1e-10) give ~5e-7 relative gradient error.
DEFAULT_LP_BACKEND = "moreau"


# ---------------------------------------------------------------------------------------------
# checks and small helpers
# ---------------------------------------------------------------------------------------------


def _check_scores(scores: torch.Tensor, name: str = "scores") -> int:
    """``scores`` is a finite floating tensor ``(..., n)`` with ``n >= 1``; returns ``n``."""
    check_tensor(name, scores, min_dim=1)
    n = scores.shape[-1]
    if n < 1:
        raise ValueError(
            f"{name} must have at least one item in its last dim, got shape {tuple(scores.shape)}"
        )
    return n


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of items), got {k}")


def _check_int(name: str, value: int, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _temperature(name: str, value: float | torch.Tensor) -> float:
    """A positive, finite temperature as a Python float (temperatures are not differentiated)."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    check_positive(name, value)
    return float(value)


def _rank_weights(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``r_i = n + 1 - 2i`` for ranks ``i = 1..n``: NeuralSort's row weights, largest first."""
    return torch.arange(n - 1, -n, -2, dtype=dtype, device=device)


def _centred(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` minus their mean. Every relaxation here is invariant to a common shift; centring
    keeps logits and solver data small (the mean is detached: its gradient is zero anyway)."""
    return scores - scores.detach().mean(-1, keepdim=True)


def _descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Item indices from largest to smallest score; ties keep index order."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def _hard_permutation(scores: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The exact permutation matrix ``(..., rows, n)`` (row i = item of rank i)."""
    n = scores.shape[-1]
    rows = n if rows is None else rows
    order = _descending_order(scores)[..., :rows]
    P = scores.new_zeros(*scores.shape[:-1], rows, n)
    return P.scatter_(-1, order.unsqueeze(-1), 1.0)


def _hard_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The exact top-k indicator ``(..., n)`` (ties by index)."""
    order = _descending_order(scores)[..., :k]
    return torch.zeros_like(scores).scatter_(-1, order, 1.0)


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Value of ``hard``, gradient of ``soft``."""
    return hard + (soft - soft.detach())


def _abs_diff_rowsum(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_s 1)_k = sum_j |s_k - s_j|`` in O(n log n) time and O(n) memory (no n x n matrix).

    In descending order with prefix sums ``c``: ``B_p = 2 c_p - c_n + (n - 2 - 2p) v_p``. The
    prefix sums are taken in float64 so they do not swallow small gaps between large scores.
    Also returns the descending order (item indices), which callers reuse.
    """
    n = s.shape[-1]
    v, order = torch.sort(s, dim=-1, descending=True)
    v = v.to(torch.float64)
    c = v.cumsum(-1)
    p = torch.arange(n, dtype=torch.float64, device=s.device)
    b_sorted = 2 * c - c[..., -1:] + (n - 2 - 2 * p) * v
    return torch.zeros_like(b_sorted).scatter(-1, order, b_sorted).to(s.dtype), order


# ---------------------------------------------------------------------------------------------
# NeuralSort
# ---------------------------------------------------------------------------------------------


# Logits more than this far below their row's maximum are raised to that floor: exp(-80) ~ 2e-35 is
# negligible next to the row's largest probability, and it keeps exp() out of the subnormal
# range, where CPUs are several times slower.
_LOGIT_FLOOR = 80.0


class _NeuralSortFn(torch.autograd.Function):
    """``softmax_k((r_i s_k - b_k) / tau)``: one fused ``addcmul``, a clamp and a fused softmax.

    The forward holds at most two ``(..., m, n)`` tensors (logits, then ``P_hat``) and keeps only
    ``P_hat`` for backward, which adds one more (the logits' gradient). ``top`` holds the items
    of ranks ``1..m``: row ``i``'s largest logit is item ``top[i]``'s (NeuralSort's row argmax is
    the exact sort, Grover et al. 2019), which gives the clamp threshold without another pass.
    With ``hard`` the forward returns the exact permutation rows and backward uses the soft ones.
    """

    @staticmethod
    def forward(
        ctx: Any,
        s: torch.Tensor,
        b: torch.Tensor,
        r: torch.Tensor,
        top: torch.Tensor,
        tau: float,
        hard: bool,
    ) -> torch.Tensor:
        r_tau = r / tau
        b_tau = b / -tau
        logits = torch.addcmul(b_tau[..., None, :], r_tau[:, None], s[..., None, :])
        # A lower bound on each row's maximum (it is one of the row's logits), and a margin of at
        # least 128 ulps so rounding can never lift the floor up to the maximum.
        row_max = r_tau * s.gather(-1, top) + b_tau.gather(-1, top)
        margin = (row_max.abs() * (128 * torch.finfo(s.dtype).eps)).clamp_(min=_LOGIT_FLOOR)
        logits.clamp_(min=(row_max - margin).unsqueeze(-1))
        P = torch.softmax(logits, -1)  # max-shifted: no overflow for large |s| / small tau
        del logits
        ctx.save_for_backward(P, r_tau)
        ctx.tau = tau
        if hard:
            return _hard_permutation(s, rows=r.shape[0])
        return P

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        P, r_tau = ctx.saved_tensors
        H = torch._softmax_backward_data(grad, P, -1, P.dtype)  # d loss / d (tau * logits)
        # One pass over H for both: sum_i r_i H_ik / tau and -sum_i H_ik / tau.
        W = torch.stack([r_tau, torch.full_like(r_tau, -1.0 / ctx.tau)])
        grads = torch.matmul(W, H)
        return grads[..., 0, :], grads[..., 1, :], None, None, None, None


def _neural_sort_rows(scores: torch.Tensor, tau: float, rows: int, hard: bool) -> torch.Tensor:
    """The first ``rows`` rows of NeuralSort's ``P_hat``: ``(..., rows, n)``."""
    n = scores.shape[-1]
    # Shifting every score by the same amount changes neither A_s nor the softmax; centring keeps
    # the logits small in float32.
    s = _centred(scores)
    b, order = _abs_diff_rowsum(s)
    r = _rank_weights(n, scores.dtype, scores.device)[:rows]
    return _NeuralSortFn.apply(s, b, r, order[..., :rows], tau, hard)


def neural_sort(scores: torch.Tensor, tau: float = 1.0, hard: bool = False) -> torch.Tensor:
    """Deterministic NeuralSort (Grover et al., ICLR 2019): the relaxed permutation matrix.

    ``P_hat[..., i, :] = softmax(((n + 1 - 2i) s - A_s 1) / tau)`` for ranks ``i = 1..n``, with
    ``(A_s)_kj = |s_k - s_j|``. Rows sum to 1 (columns need not). ``A_s 1`` is computed by sorting
    in O(n log n); the logits come from one fused ``addcmul`` and go through a fused, max-shifted
    softmax, so large ``|s|`` or small ``tau`` do not overflow. Memory: the forward holds at most
    two ``(..., n, n)`` tensors and keeps one for backward, which adds one more (the same as
    ``torch.softmax`` on a ``(..., n, n)`` input). Backward is hand-written; double backward is
    not supported.

    Args:
        scores: ``(..., n)`` floating tensor, finite.
        tau: temperature > 0. ``tau -> 0`` gives the exact permutation matrix of the descending
            sort (for distinct scores); large ``tau`` tends to the uniform matrix.
        hard: return the exact permutation matrix (ties by index) with NeuralSort's gradient.

    Returns:
        ``(..., n, n)``; row ``i`` is the relaxed one-hot of the item ranked ``i`` (descending).
    """
    n = _check_scores(scores)
    return _neural_sort_rows(scores, _temperature("tau", tau), n, hard)


def _gumbel_like(
    shape: tuple[int, ...], ref: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)`` with ``U`` clamped away from 0 and 1."""
    u = torch.rand(shape, generator=generator, dtype=ref.dtype, device=ref.device)
    tiny = torch.finfo(ref.dtype).tiny
    return -torch.log(-torch.log(u.clamp_(tiny, 1.0 - torch.finfo(ref.dtype).eps)))


def stochastic_neural_sort(
    scores: torch.Tensor,
    tau: float = 1.0,
    num_samples: int = 1,
    hard: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Relaxed samples from the Plackett-Luce distribution over permutations (Grover et al.).

    ``scores`` are the PL log-weights (the paper's ``log s``): item ``k`` is drawn first with
    probability ``softmax(scores)_k``. Each sample perturbs them with i.i.d. Gumbel noise ``g`` and
    applies NeuralSort at temperature ``tau`` (reparameterized: ``P_hat(scores + g)`` is a
    differentiable function of ``scores``). Unlike the reference PyTorch code, ``tau`` is used.

    Args:
        scores: ``(..., n)`` PL log-weights.
        tau: NeuralSort temperature > 0; ``tau -> 0`` gives exact samples of PL permutations.
        num_samples: samples per batch element, >= 1.
        hard: exact permutation matrices of the perturbed scores, straight-through gradient.
        generator: optional ``torch.Generator`` on ``scores.device`` for reproducible noise.

    Returns:
        ``(num_samples, ..., n, n)``.
    """
    n = _check_scores(scores)
    t = _temperature("tau", tau)
    _check_int("num_samples", num_samples)
    perturbed = scores.unsqueeze(0) + _gumbel_like((num_samples, *scores.shape), scores, generator)
    return _neural_sort_rows(perturbed, t, n, hard)


# ---------------------------------------------------------------------------------------------
# Sinkhorn
# ---------------------------------------------------------------------------------------------


def sinkhorn_sort(
    scores: torch.Tensor, tau: float = 1.0, n_iters: int = 20, hard: bool = False
) -> torch.Tensor:
    """Sinkhorn relaxation: Sinkhorn-normalize ``exp(r s^T / tau)`` with ``r_i = n + 1 - 2i``.

    The limit of the iterations is the entropy-regularized LP ``max <P, r s^T> + tau H(P)`` over
    the Birkhoff polytope, the baseline of the NeuralSort paper. The kernel is built from
    NeuralSort's logits ``(r s^T - 1 (A_s 1)^T) / tau`` shifted so each row's maximum is 0: they
    differ from ``r s^T / tau`` by per-row and per-column terms, so the Sinkhorn limit is the
    same, but the first row normalization already gives NeuralSort's ``P_hat``, which is close
    to the limit when ``tau`` is small (plain Sinkhorn needs O(1 / tau) iterations there). As
    each row's largest entry is at the item of that rank, every row and column of the kernel
    holds a 1, so scaling in the exp domain neither overflows nor divides by zero, even for tiny
    ``tau``. Each iteration normalizes rows then columns (``u = 1 / K v``, ``v = 1 / K^T u``), and
    a last row normalization makes rows sum to 1 exactly; columns sum to 1 up to the remaining
    Sinkhorn error. Memory: O(batch * n^2 + n_iters * batch * n); time O(n_iters * batch * n^2).

    Args:
        scores: ``(..., n)``.
        tau: temperature > 0; ``tau -> 0`` gives the exact permutation (distinct scores).
        n_iters: Sinkhorn iterations (row + column normalization), >= 1.
        hard: exact permutation in the forward pass, straight-through gradient.

    Returns:
        ``(..., n, n)``, rows = ranks (descending).
    """
    n = _check_scores(scores)
    t = _temperature("tau", tau)
    _check_int("n_iters", n_iters)
    r = _rank_weights(n, scores.dtype, scores.device)
    s = _centred(scores)
    logits = (r[:, None] * s[..., None, :] - _abs_diff_rowsum(s)[0][..., None, :]) / t
    K = (logits - logits.detach().amax(-1, keepdim=True)).exp()  # the shift's gradient is 0
    del logits
    tiny = torch.finfo(K.dtype).tiny
    v = torch.ones_like(s)
    for _ in range(n_iters):
        u = 1.0 / (K @ v.unsqueeze(-1)).squeeze(-1).clamp_min(tiny)
        v = 1.0 / (u.unsqueeze(-2) @ K).squeeze(-2).clamp_min(tiny)
    u = 1.0 / (K @ v.unsqueeze(-1)).squeeze(-1).clamp_min(tiny)
    P = u.unsqueeze(-1) * K * v.unsqueeze(-2)
    return _straight_through(_hard_permutation(scores), P) if hard else P


# ---------------------------------------------------------------------------------------------
# Regularized LPs through cvxpylayers
# ---------------------------------------------------------------------------------------------

# Moreau settings, passed when a layer is built (moreau picks its algorithm then). Its active-set
# method solves these strictly convex QPs exactly, so the (almost everywhere) Jacobian is exact
# too: gradients within 1e-11 of the closed form for top-k. The interior point method is up to
# 2x faster on top-k at n = 100, but near-active bounds smooth its Jacobian: relative gradient
# errors of 1e-7 to 1e-2 as the strength goes from 10 to 0.01, whatever the tolerance (and 2e-2
# with moreau's default tolerances). Active set is therefore used for the n-variable QPs (top-k,
# isotonic) and for small Birkhoff problems; the n^2-variable Birkhoff QP uses the interior point
# above n = 8, where active set becomes 10-15x slower.
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


class _SortQPLayer(CvxpyProblemLayer):
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
        tuned: bool = True,
    ):
        size = sum(v.size for v in problem.variables()) + sum(c.size for c in problem.constraints)
        b = get_backend(backend)
        extra: dict[str, Any] = {}
        if tuned and b.solver == "MOREAU":
            extra = dict(moreau_options)
        elif (
            tuned
            and b.solver is None
            and b.kind == "cvxpylayers"
            and size > _DENSE_DERIVATIVE_LIMIT
        ):
            extra["mode"] = "lsqr"
        super().__init__(
            problem, parameters, [variable], backend=backend, tuned=tuned, solver_args=extra
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
    kind: str, n: int, k: int = 0, backend: str = DEFAULT_LP_BACKEND, tuned: bool = True
) -> _SortQPLayer:
    """A new layer for :func:`sort_qp_problem` on ``backend``: with the library's settings
    (``tuned``) or with the solver's defaults."""
    prob, params, var = sort_qp_problem(kind, n, k)
    ipm = kind == "birkhoff" and n > _BIRKHOFF_ACTIVE_SET_MAX_N
    options = _MOREAU_IPM if ipm else _MOREAU_ACTIVE_SET
    return _SortQPLayer(prob, params, var, backend, options, tuned=tuned)


@functools.cache
def _qp_layer(kind: str, n: int, k: int, backend: str) -> _SortQPLayer:
    """Build (once per process) the DPP problem ``kind`` for ``n`` items (and ``k``)."""
    return sort_qp_layer(kind, n, k, backend)


def _check_strength(value: float | torch.Tensor) -> float:
    return _temperature("regularization_strength", value)


def _project_permutahedron(z: torch.Tensor, w: torch.Tensor, backend: str) -> torch.Tensor:
    """Euclidean projection of ``z`` onto the permutahedron ``P(w)``, both ``(..., n)``.

    This is the quadratically regularized LP ``argmax_{mu in P(w)} <z, mu> - |mu|^2 / 2``. It is
    solved through its dual, isotonic regression in the descending order of ``z`` (the
    ``"isotonic"`` problem), and the result is put back in item order. ``w`` may be broadcast.
    """
    n = z.shape[-1]
    s, order = torch.sort(z, dim=-1, descending=True, stable=True)
    w_sorted = torch.sort(w, dim=-1, descending=True).values
    if n == 1:
        return w_sorted + 0 * s
    y = s - w_sorted
    # Isotonic regression is positively homogeneous, so solve at unit scale (better conditioned
    # for the solvers) and scale back; the scale's gradient is exactly zero, hence detached.
    scale = y.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    v = scale * _qp_layer("isotonic", n, 0, backend).solve(y / scale)
    return torch.zeros_like(s).scatter(-1, order, s - v)


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
        backend: solver backend name (``layers.backends.BACKENDS``).
        descending: sort in descending order.

    Returns:
        ``(..., n)`` softly sorted values.
    """
    n = _check_scores(values, "values")
    eps = _check_strength(regularization_strength)
    get_backend(backend)
    sign = 1.0 if descending else -1.0
    rho = torch.arange(n, 0, -1, dtype=values.dtype, device=values.device) / eps
    out = sign * _project_permutahedron(rho.expand_as(values), sign * values, backend)
    if hard:
        exact = torch.sort(values, dim=-1, descending=descending).values
        out = _straight_through(exact, out)
    return out


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
    n = _check_scores(values, "values")
    eps = _check_strength(regularization_strength)
    get_backend(backend)
    sign = -1.0 if descending else 1.0
    rho = torch.arange(n, 0, -1, dtype=values.dtype, device=values.device)
    out = _project_permutahedron(sign * values / eps, rho, backend)
    if hard:  # position in the stable order of sign * values, ascending, from 1
        order = torch.sort(sign * values, dim=-1, stable=True).indices
        pos = torch.arange(1, n + 1, dtype=values.dtype, device=values.device).expand_as(values)
        out = _straight_through(torch.zeros_like(values).scatter(-1, order, pos), out)
    return out


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
    n = _check_scores(scores)
    _check_k(k, n)
    eps = _check_strength(regularization_strength)
    get_backend(backend)
    if k == n:  # the feasible set is one point
        y = torch.ones_like(scores) + 0 * scores
    else:
        y = _qp_layer("topk", n, k, backend).solve(_centred(scores) / eps)
    return _straight_through(_hard_topk(scores, k), y) if hard else y


def _nested_topk_matrix(scores: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    """``P_hat[i] = T_{i+1} - T_i`` from the regularized top-k LPs ``T_k`` for all ``k``."""
    n = scores.shape[-1]
    ks = torch.arange(1, n, device=scores.device)
    w = _topk_targets(n, ks, scores)  # (n - 1, n)
    z = (_centred(scores) / eps).unsqueeze(-2).expand(*scores.shape[:-1], n - 1, n)
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
    n = _check_scores(scores)
    eps = _check_strength(regularization_strength)
    get_backend(backend)
    P = _nested_topk_matrix(scores, eps, backend) if n > 1 else scores[..., None] * 0 + 1
    return _straight_through(_hard_permutation(scores), P) if hard else P


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
    n = _check_scores(scores)
    eps = _check_strength(regularization_strength)
    get_backend(backend)
    if n == 1:
        P = scores[..., None] * 0 + 1
    else:
        P = _qp_layer("birkhoff", n, 0, backend).solve(_centred(scores) / eps)
    return _straight_through(_hard_permutation(scores), P) if hard else P


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class SortRelaxation(torch.nn.Module):
    """Base class: ``forward(scores) -> P_hat`` and ``topk(scores, k) -> membership``.

    ``forward`` maps ``(..., n)`` scores to a relaxed permutation matrix ``(..., n, n)`` (rows =
    ranks, descending: row 0 = largest). ``topk`` returns the relaxed top-k membership ``(..., n)``,
    by default ``P_hat[..., :k, :].sum(-2)``: sums to ``k`` whenever the rows of ``P_hat`` sum to 1,
    and lies in ``[0, 1]`` when ``P_hat`` is doubly stochastic.
    """

    def forward(self, scores: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Relaxed top-k membership ``(..., n)`` of every item."""
        _check_k(k, _check_scores(scores))
        return self(scores)[..., :k, :].sum(-2)


class NeuralSort(SortRelaxation):
    """Deterministic NeuralSort (``neural_sort``); ``tau -> 0`` gives the hard sort.

    ``topk`` only builds the first ``k`` rows (O(batch * k * n) memory). NeuralSort is only
    row-stochastic, so top-k memberships sum to ``k`` but one item's may slightly exceed 1.
    """

    def __init__(self, tau: float = 1.0, hard: bool = False):
        super().__init__()
        self.tau = _temperature("tau", tau)
        self.hard = bool(hard)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, hard={self.hard}"

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return neural_sort(scores, self.tau, self.hard)

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        _check_k(k, _check_scores(scores))
        soft = _neural_sort_rows(scores, self.tau, k, False).sum(-2)
        return _straight_through(_hard_topk(scores, k), soft) if self.hard else soft


class StochasticNeuralSort(SortRelaxation):
    """Stochastic NeuralSort (``stochastic_neural_sort``): outputs have a leading sample dim.

    ``forward``: ``(num_samples, ..., n, n)``; ``topk``: ``(num_samples, ..., n)``. Pass a
    ``generator`` for reproducible samples. ``tau -> 0`` gives exact Plackett-Luce samples.
    """

    def __init__(
        self,
        tau: float = 1.0,
        num_samples: int = 1,
        hard: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.tau = _temperature("tau", tau)
        _check_int("num_samples", num_samples)
        self.num_samples = num_samples
        self.hard = bool(hard)
        self.generator = generator

    def extra_repr(self) -> str:
        return f"tau={self.tau}, num_samples={self.num_samples}, hard={self.hard}"

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return stochastic_neural_sort(scores, self.tau, self.num_samples, self.hard, self.generator)

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        n = _check_scores(scores)
        _check_k(k, n)
        g = _gumbel_like((self.num_samples, *scores.shape), scores, self.generator)
        perturbed = scores.unsqueeze(0) + g
        soft = _neural_sort_rows(perturbed, self.tau, k, False).sum(-2)
        return _straight_through(_hard_topk(perturbed, k), soft) if self.hard else soft


class Sinkhorn(SortRelaxation):
    """Sinkhorn relaxation (``sinkhorn_sort``): doubly stochastic; ``tau -> 0`` is hard."""

    def __init__(self, tau: float = 1.0, n_iters: int = 20, hard: bool = False):
        super().__init__()
        self.tau = _temperature("tau", tau)
        _check_int("n_iters", n_iters)
        self.n_iters = n_iters
        self.hard = bool(hard)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, n_iters={self.n_iters}, hard={self.hard}"

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return sinkhorn_sort(scores, self.tau, self.n_iters, self.hard)


class _LPRelaxation(SortRelaxation):
    def __init__(
        self,
        regularization_strength: float = 1.0,
        backend: str = DEFAULT_LP_BACKEND,
        hard: bool = False,
    ):
        super().__init__()
        self.regularization_strength = _check_strength(regularization_strength)
        get_backend(backend)
        self.backend = backend
        self.hard = bool(hard)

    def extra_repr(self) -> str:
        return (
            f"regularization_strength={self.regularization_strength}, "
            f"backend={self.backend!r}, hard={self.hard}"
        )

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        return lp_topk(scores, k, self.regularization_strength, self.hard, self.backend)


class LPPermutahedron(_LPRelaxation):
    """Regularized LPs over permutahedra (Blondel et al.); ``regularization_strength -> 0`` is hard.

    ``forward``: ``lp_permutahedron_sort`` (doubly stochastic, ``n - 1`` QPs per element).
    ``topk``: the projection onto ``P((1,)*k + (0,)*(n-k))``, the same map as ``LPTopK.topk``.
    ``soft_sort`` / ``soft_rank`` are the value and rank versions.
    """

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return lp_permutahedron_sort(scores, self.regularization_strength, self.hard, self.backend)

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        n = _check_scores(scores)
        _check_k(k, n)
        if k == n:
            y = torch.ones_like(scores) + 0 * scores
        else:
            w = _topk_targets(n, torch.tensor([k], device=scores.device), scores)[0]
            z = _centred(scores) / self.regularization_strength
            y = _project_permutahedron(z, w, self.backend)
        return _straight_through(_hard_topk(scores, k), y) if self.hard else y


class LPBirkhoff(_LPRelaxation):
    """Regularized LP over the Birkhoff polytope (``lp_birkhoff_sort``); strength -> 0 is hard.

    ``topk`` sums the first ``k`` rows of ``P_hat`` (each column of ``P_hat`` sums to 1, so the
    membership is in ``[0, 1]``).
    """

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return lp_birkhoff_sort(scores, self.regularization_strength, self.hard, self.backend)

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        return SortRelaxation.topk(self, scores, k)


class LPTopK(_LPRelaxation):
    """Soft top-k as a regularized LP with ``n`` variables (``lp_topk``); strength -> 0 is hard.

    Only ``topk`` is defined: the LP has no permutation matrix. ``LPPermutahedron`` builds one
    from the same LPs for every ``k``.
    """

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "LPTopK only relaxes top-k membership: call .topk(scores, k), or use LPPermutahedron "
            "(the same LPs for every k, assembled into a doubly stochastic P_hat) or LPBirkhoff"
        )


SORTS: dict[str, type[SortRelaxation]] = {
    "neuralsort": NeuralSort,
    "neuralsort-stochastic": StochasticNeuralSort,
    "sinkhorn": Sinkhorn,
    "lp-permutahedron": LPPermutahedron,
    "lp-birkhoff": LPBirkhoff,
    "lp-topk": LPTopK,
}

_LP_SORTS = {"lp-permutahedron", "lp-birkhoff", "lp-topk"}


def get_sort(name: str, tau: float = 1.0, **kwargs: Any) -> SortRelaxation:
    """Build the relaxation ``name`` from ``SORTS``.

    ``tau`` is the temperature, passed as ``regularization_strength`` to the LP relaxations;
    ``kwargs`` go to the constructor (``hard``, ``num_samples``, ``n_iters``, ``backend``...).
    """
    if name not in SORTS:
        raise ValueError(f"unknown sort relaxation {name!r}; choose one of {', '.join(SORTS)}")
    if name in _LP_SORTS:
        return SORTS[name](regularization_strength=tau, **kwargs)
    return SORTS[name](tau=tau, **kwargs)
