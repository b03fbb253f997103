"""Solving a prepared QP with a backend, and checking the answer before the layer uses it.

* :func:`run_ipm`, :func:`run_qpth`: the ``torch-ipm`` and ``qpth`` backends on a
  :class:`~layers.qp_problem.QPProblem`, with the settings of :data:`layers.backends.BACKENDS`.
* :func:`solve_checked`: run a backend, then raise :class:`~layers._checks.SolverError` naming the
  batch elements without a solution or whose solution fails the relative KKT check
  (:func:`layers.qp_ipm.kkt_residuals`), with a diagnosis by ``torch-ipm`` when another backend
  fails, and advice to rescale when the data are huge (:func:`layers._checks.scale_advice`).
  qpth solves a batch as one system, so an element without a solution spoils the others'
  answers: the others are solved again without it, and only those that fail again are named.
  The CVXPY backends come in as a runner from :mod:`layers.qp`, so this module imports no
  CVXPY code and :class:`~layers.cvxpy_layer.CvxpyProblemLayer` can use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from layers._batched import one_thread
from layers._checks import SolverError, format_indices, scale_advice
from layers.backends import get_backend
from layers.qp_ipm import (
    INACCURATE,
    STATUS_NAMES,
    QPSolution,
    kkt_residuals,
    solution_scale,
    solve_qp,
    solve_qp_differentiable,
)
from layers.qp_problem import QPProblem

__all__ = ["CvxpyRunner", "run_ipm", "run_proxsuite", "run_qpth", "solve_checked"]

# ``(problem, backend, settings, solver_args) -> (x, lam, nu)`` for the cvxpylayers backends.
CvxpyRunner = Callable[[QPProblem, str, str, dict[str, Any]], tuple[Tensor, Tensor, Tensor]]


def run_ipm(
    prob: QPProblem, settings: str, args: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor, QPSolution]:
    """The ``torch-ipm`` backend: :func:`~layers.qp_ipm.solve_qp_differentiable` with the table's
    settings (``accurate`` or ``solver_defaults``), overridden by ``args``."""
    opts = {**get_backend("torch-ipm").solver_args(settings, True), **args}
    return solve_qp_differentiable(prob.Q, prob.q, prob.G, prob.h, prob.A, prob.b, **opts)


def _some_inequality(prob: QPProblem) -> tuple[Tensor, Tensor]:
    """``(G, h)``, or the inactive ``0'x <= 1`` when there are none (qpth and proxsuite need
    at least one inequality)."""
    B, n, m, _ = prob.sizes
    if m:
        return prob.G, prob.h
    return prob.q.new_zeros(B, 1, n), prob.q.new_ones(B, 1)


def run_qpth(prob: QPProblem, settings: str, args: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """The ``qpth`` backend (OptNet's solver); its duals come back detached."""
    from qpth.qp import QPFunction

    B, _, m, p = prob.sizes
    G, h = _some_inequality(prob)
    A, b = (prob.A, prob.b) if p else (torch.Tensor().to(prob.q), torch.Tensor().to(prob.q))
    opts = {
        "verbose": -1,
        "check_Q_spd": False,
        **get_backend("qpth").solver_args(settings, True),
        **args,
    }
    fn = QPFunction(**opts)
    try:
        inputs = [0.5 * (prob.Q + prob.Q.mT), prob.q, G, h, A, b]  # qpth uses Q as given
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
            inputs[1] = prob.q.detach().requires_grad_()  # build the graph to read the duals
        with torch.enable_grad(), one_thread():
            x = fn(*inputs)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise SolverError(
            f"backend 'qpth' failed: {' '.join(lines[:2])} (qpth needs Q positive definite)"
        ) from err
    ctx = x.grad_fn
    lam = ctx.lams.detach()[:, :m] if m else prob.q.new_zeros(B, 0)
    nu = ctx.nus.detach() if p else prob.q.new_zeros(B, 0)
    data = [prob.Q, prob.q, prob.G, prob.h, prob.A, prob.b]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in data)):
        x = x.detach()
    return x, lam, nu


class _Float64Backward(torch.autograd.Function):
    """Identity on a peer's outputs whose backward runs the peer's backward with float64 as the
    default dtype (proxsuite's QPLayer allocates its gradients in the default dtype, float32)."""

    @staticmethod
    def forward(ctx, inputs, outputs, *tensors):  # type: ignore[override]
        ctx.inputs, ctx.outputs = inputs, outputs
        return tuple(t.detach().clone() for t in outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            with torch.enable_grad():
                got = torch.autograd.grad(
                    ctx.outputs, ctx.inputs, grads, allow_unused=True, retain_graph=True
                )
        finally:
            torch.set_default_dtype(old)
        return (None, None, *got)


def run_proxsuite(
    prob: QPProblem, settings: str, args: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``proxsuite`` backend: proxsuite's QPLayer (``proxsuite.torch.qplayer.QPFunction``,
    a proximal augmented Lagrangian solver in C++, one element at a time) on ``Gx <= h`` written
    as ``-1e20 <= Gx <= h``. Gradients for all inputs through ``x``; the duals come back detached
    (QPLayer's gradients through its inequality duals disagree with finite differences, e.g. for
    inactive constraints, whose duals stay 0 under small changes)."""
    from proxsuite.torch.qplayer import QPFunction

    _, _, m, p = prob.sizes
    G, h = _some_inequality(prob)
    lower = torch.full_like(h, -1e20)
    A, b = (prob.A, prob.b) if p else (prob.q.new_zeros(0), prob.q.new_zeros(0))
    opts = {**get_backend("proxsuite").solver_args(settings, True), **args}
    fn = QPFunction(**opts)
    data = [0.5 * (prob.Q + prob.Q.mT), prob.q, A, b, G, lower, h]
    needs = torch.is_grad_enabled() and any(t.requires_grad for t in data)
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in data]
    try:
        with torch.enable_grad(), one_thread():
            x, nu, lam = fn(*leaves)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise SolverError(f"backend 'proxsuite' failed: {err}") from err
    lam, nu = lam.detach()[:, :m], nu.detach()
    if not needs or not x.requires_grad:
        return x.detach(), lam, nu
    used = [(t, leaf) for t, leaf in zip(data, leaves) if leaf.requires_grad]
    (x,) = _Float64Backward.apply([leaf for _, leaf in used], [x], *[t for t, _ in used])
    return x, lam, nu


def solve_checked(
    prob: QPProblem,
    backend: str,
    *,
    settings: str,
    solver_args: dict[str, Any],
    check: bool,
    check_tol: float | None,
    run_cvxpy: CvxpyRunner | None = None,
    advise: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve ``prob`` with ``backend`` and check the answer; returns batched ``(x, lam, nu)`` in
    the working dtype. ``run_cvxpy`` solves with the cvxpylayers backends (required for them).
    Raises :class:`SolverError` as :func:`layers.qp.qp` documents; with ``advise`` its message
    ends with :func:`~layers._checks.scale_advice` on the data (the CVXPY layer, whose users
    gave parameters and not this QP, advises on its parameters itself)."""
    be = get_backend(backend)
    advice = _advice(prob) if advise else (lambda: "")
    sol = None
    try:
        if be.kind == "torch":
            x, lam, nu, sol = run_ipm(prob, settings, solver_args)
        elif be.kind == "qpth":
            x, lam, nu = run_qpth(prob, settings, solver_args)
        elif be.kind == "proxsuite":
            x, lam, nu = run_proxsuite(prob, settings, solver_args)
        elif run_cvxpy is None:
            raise ValueError(f"backend {backend!r} needs a CVXPY runner here")
        else:
            x, lam, nu = run_cvxpy(prob, backend, settings, solver_args)
    except SolverError as err:
        msg = str(err).rstrip(". ")
        raise SolverError(
            f"{msg}. {_diagnose(prob)} {advice()}".strip(), _failed_elements(prob)
        ) from err

    if sol is not None and not bool(sol.info.ok.all()):
        bad = sol.info.failed()
        why = ", ".join(f"{i}: {STATUS_NAMES[int(sol.info.status[i])]}" for i in bad[:10])
        raise SolverError(
            f"qp ({backend}): no solution for batch elements {format_indices(bad)} ({why}). "
            f"{advice()}".strip(),
            bad,
        )
    if check_tol is None:
        check_tol = be.check_tol
    if check:
        worst = _kkt_worst(prob, x, lam, nu, None if sol is None else sol._Q)
        bad = torch.nonzero(~(worst <= check_tol)).flatten().tolist()
        if bad and be.kind == "qpth":
            bad = _qpth_failures(prob, bad, settings, solver_args, check_tol)
        if bad:
            raise SolverError(
                f"qp ({backend}): the solution fails the KKT check (relative residual > "
                f"{check_tol:g}) for batch elements {format_indices(bad)}; worst "
                f"{worst.max().item():.2e}. {_diagnose(prob, bad)} {advice()}".strip(),
                bad,
            )
    if sol is not None and bool((sol.info.status == INACCURATE).any()):
        idx = torch.nonzero(sol.info.status == INACCURATE).flatten().tolist()
        warnings.warn(
            f"qp (torch-ipm): batch elements {format_indices(idx)} solved only to sqrt(tol) "
            "accuracy",
            RuntimeWarning,
            stacklevel=3,
        )
    return x, lam, nu


def _advice(prob: QPProblem) -> Callable[[], str]:
    """:func:`~layers._checks.scale_advice` on the problem's data, computed when called."""
    names = ("Q", "q", "G", "h", "A", "b")
    return lambda: scale_advice(dict(zip(names, (prob.Q, prob.q, prob.G, prob.h, prob.A, prob.b))))


def _kkt_worst(
    prob: QPProblem, x: Tensor, lam: Tensor, nu: Tensor, Qs: Tensor | None = None
) -> Tensor:
    """``(B,)``: the largest relative KKT residual of each element's answer, measured with the
    data at unit scale (:func:`~layers.qp_ipm.solution_scale`, as the solver sees them), so that
    huge solutions do not overflow the objective. ``Qs``: ``(Q + Q') / 2`` if already formed."""
    with torch.no_grad():
        if Qs is None or Qs.shape != prob.Q.shape or Qs.dtype != prob.Q.dtype:
            Qs = 0.5 * (prob.Q + prob.Q.mT)
        q, h, b = prob.q, prob.h, prob.b
        x, lam, nu = x.detach(), lam.detach(), nu.detach()
        beta = solution_scale(Qs, q, prob.G, h, prob.A, b)
        if beta is not None:
            q, h, b, x, lam, nu = (t / beta for t in (q, h, b, x, lam, nu))
        res = kkt_residuals(Qs, q, prob.G, h, prob.A, b, x, lam, nu)
    return torch.stack(res).amax(0)


def _subproblem(prob: QPProblem, idx: Sequence[int]) -> QPProblem:
    """The batch elements ``idx`` of ``prob``."""
    i = torch.tensor(list(idx), dtype=torch.long, device=prob.q.device)
    Q, q, G, h, A, b = (t.detach()[i] for t in (prob.Q, prob.q, prob.G, prob.h, prob.A, prob.b))
    return QPProblem(Q, q, G, h, A, b, unbatched=False, dtype=prob.dtype, device=prob.device)


def _qpth_failures(
    prob: QPProblem, bad: list[int], settings: str, args: dict[str, Any], tol: float
) -> list[int]:
    """The elements among ``bad`` (those whose qpth answer fails the KKT check) that fail by
    themselves: those ``torch-ipm`` finds no solution for (infeasible, unbounded), and those
    that fail again when qpth solves them without the first (qpth solves the batch as one
    system, so one element without a solution spoils the steps of all)."""
    unsolvable = set(_failed_elements(prob)) & set(bad)
    rest = [i for i in bad if i not in unsolvable]
    if not unsolvable or not rest:
        return bad
    try:
        with torch.no_grad():
            sub = _subproblem(prob, rest)
            x, lam, nu = run_qpth(sub, settings, args)
        again = torch.nonzero(~(_kkt_worst(sub, x, lam, nu) <= tol)).flatten().tolist()
    except SolverError:
        again = list(range(len(rest)))
    return sorted(unsolvable | {rest[j] for j in again})


def _failed_elements(prob: QPProblem) -> list[int]:
    try:
        return solve_qp(prob.Q, prob.q, prob.G, prob.h, prob.A, prob.b).info.failed()
    except Exception:  # diagnostics must never mask the original error
        return []


def _diagnose(prob: QPProblem, idx: Sequence[int] | None = None) -> str:
    """A sentence on what torch-ipm finds for the problem, to explain another backend's failure."""
    try:
        info = solve_qp(prob.Q, prob.q, prob.G, prob.h, prob.A, prob.b).info
    except Exception:
        return ""
    bad = info.failed()
    if bad:
        why = ", ".join(f"{i}: {STATUS_NAMES[int(info.status[i])]}" for i in bad[:10])
        return f"torch-ipm finds no solution for batch elements {format_indices(bad)} ({why})."
    if idx:
        return "torch-ipm solves them: the backend is inaccurate here."
    return ""
