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
                            ``lp_permutahedron_sort``    ICML 2020)
``lp-birkhoff``             ``LPBirkhoff``               quadratically regularized LP over
                            ``lp_birkhoff_sort``         doubly stochastic matrices (n^2 vars)
``lp-topk``                 ``LPTopK``, ``lp_topk``      regularized LP over {0 <= y <= 1,
                                                         sum y = k} (n vars), top-k only
==========================  ===========================  ====================================

The LP relaxations keep a quadratic regularizer on purpose: a pure LP's solution is piecewise
constant in its parameters, so its gradient is zero almost everywhere (cvxpylayers issue #127).
Their CVXPY statements and functions live in :mod:`layers.sort_lp` (solved by the backend named
in ``backend``: ``native``, the exact solvers of :mod:`layers.sort_native`, by default, or a
cvxpylayers backend); this module holds the closed forms, the :class:`SortRelaxation` interface,
the modules and the registry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from layers._sort_common import (
    centred,
    check_k,
    check_scores,
    check_strength,
    hard_permutation,
    hard_topk,
    straight_through,
    temperature,
    upcast_half,
)
from layers.sort_lp import (
    DEFAULT_LP_BACKEND,
    check_lp_backend,
    lp_birkhoff_sort,
    lp_permutahedron_sort,
    lp_permutahedron_topk,
    lp_topk,
    soft_rank,
    soft_sort,
)

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


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value: int, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _rank_weights(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``r_i = n + 1 - 2i`` for ranks ``i = 1..n``: NeuralSort's row weights, largest first."""
    return torch.arange(n - 1, -n, -2, dtype=dtype, device=device)


def _logit_dtype(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``x`` in a dtype where NeuralSort's and Sinkhorn's logits cannot overflow.

    Their logits ``(r_i s_k - (A_s 1)_k) / tau`` and the differences the softmax and the
    Sinkhorn kernel take of them stay below ``8 n spread / tau`` (``spread``: the largest
    ``max - min`` of a row). If that overflows ``x``'s dtype, ``x`` is computed in float64 (the
    callers return their results in the input's dtype); if it overflows float64 too, a
    ``ValueError`` says so.
    """
    if x.numel() == 0:
        return x
    lo, hi = torch.aminmax(x.detach(), dim=-1)
    spread = float((hi.double() - lo.double()).max())
    bound = 8.0 * x.shape[-1] * spread / tau
    if bound < torch.finfo(x.dtype).max:
        return x
    if bound < torch.finfo(torch.float64).max:
        return x.double()
    raise ValueError(
        f"scores spread over {spread:.3g} with tau={tau:g}: the logits (up to 8 n spread / tau "
        f"= {bound:.3g}) overflow float64; scale the scores down or raise tau"
    )


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
            return hard_permutation(s, rows=r.shape[0])
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
    # the logits small in float32. Half precision is computed in float32 (float64 where even
    # float32 logits would overflow) and returned in its own dtype.
    s = centred(_logit_dtype(upcast_half(scores), tau))
    b, order = _abs_diff_rowsum(s)
    r = _rank_weights(n, s.dtype, s.device)[:rows]
    return _NeuralSortFn.apply(s, b, r, order[..., :rows], tau, hard).to(scores.dtype)


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
    n = check_scores(scores)
    return _neural_sort_rows(scores, temperature("tau", tau), n, hard)


def _gumbel_like(
    shape: tuple[int, ...], ref: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)`` with ``U`` clamped away from 0 and 1, in ``ref``'s
    dtype (float32 for half precision, so half scores get the float32 path's noise)."""
    dtype = upcast_half(ref).dtype
    u = torch.rand(shape, generator=generator, dtype=dtype, device=ref.device)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp_(tiny, 1.0 - torch.finfo(dtype).eps)))


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
    n = check_scores(scores)
    t = temperature("tau", tau)
    _check_int("num_samples", num_samples)
    perturbed = scores.unsqueeze(0) + _gumbel_like((num_samples, *scores.shape), scores, generator)
    return _neural_sort_rows(perturbed, t, n, hard).to(scores.dtype)


# ---------------------------------------------------------------------------------------------
# Sinkhorn
# ---------------------------------------------------------------------------------------------


def sinkhorn_sort(
    scores: torch.Tensor, tau: float = 1.0, n_iters: int = 20, hard: bool = False
) -> torch.Tensor:
    """Sinkhorn relaxation: Sinkhorn-normalize ``exp(r s^T / tau)`` with ``r_i = n + 1 - 2i``.

    The limit of the iterations is the entropy-regularized LP ``max <P, r s^T> + tau H(P)`` over
    the Birkhoff polytope: the entropic optimal-transport sort (Cuturi et al., 2019) with anchors
    ``r``. (The NeuralSort paper's Sinkhorn baselines are another model: Sinkhorn applied to a
    matrix made from the n items' stacked CNN features.) The kernel is built from
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
    n = check_scores(scores)
    t = temperature("tau", tau)
    _check_int("n_iters", n_iters)
    # half precision computed in float32 (float64 where float32 logits would overflow), and
    # returned in its own dtype
    x = _logit_dtype(upcast_half(scores), t)
    r = _rank_weights(n, x.dtype, x.device)
    s = centred(x)
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
    return (straight_through(hard_permutation(x), P) if hard else P).to(scores.dtype)


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
        check_k(k, check_scores(scores))
        return self(scores)[..., :k, :].sum(-2)


class NeuralSort(SortRelaxation):
    """Deterministic NeuralSort (``neural_sort``); ``tau -> 0`` gives the hard sort.

    ``topk`` only builds the first ``k`` rows (O(batch * k * n) memory). NeuralSort is only
    row-stochastic, so top-k memberships sum to ``k`` but one item's may slightly exceed 1.
    """

    def __init__(self, tau: float = 1.0, hard: bool = False):
        super().__init__()
        self.tau = temperature("tau", tau)
        self.hard = bool(hard)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, hard={self.hard}"

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return neural_sort(scores, self.tau, self.hard)

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        check_k(k, check_scores(scores))
        soft = _neural_sort_rows(scores, self.tau, k, False).sum(-2)
        return straight_through(hard_topk(scores, k), soft) if self.hard else soft


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
        self.tau = temperature("tau", tau)
        _check_int("num_samples", num_samples)
        self.num_samples = num_samples
        self.hard = bool(hard)
        self.generator = generator

    def extra_repr(self) -> str:
        return f"tau={self.tau}, num_samples={self.num_samples}, hard={self.hard}"

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return stochastic_neural_sort(scores, self.tau, self.num_samples, self.hard, self.generator)

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        n = check_scores(scores)
        check_k(k, n)
        g = _gumbel_like((self.num_samples, *scores.shape), scores, self.generator)
        perturbed = scores.unsqueeze(0) + g
        soft = _neural_sort_rows(perturbed, self.tau, k, False).sum(-2)
        out = straight_through(hard_topk(perturbed, k), soft) if self.hard else soft
        return out.to(scores.dtype)


class Sinkhorn(SortRelaxation):
    """Sinkhorn relaxation (``sinkhorn_sort``): doubly stochastic; ``tau -> 0`` is hard."""

    def __init__(self, tau: float = 1.0, n_iters: int = 20, hard: bool = False):
        super().__init__()
        self.tau = temperature("tau", tau)
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
        self.regularization_strength = check_strength(regularization_strength)
        check_lp_backend(backend)
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
        n = check_scores(scores)
        check_k(k, n)
        return lp_permutahedron_topk(
            scores, k, self.regularization_strength, self.hard, self.backend
        )


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
