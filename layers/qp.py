"""OptNet QP layer (Amos & Kolter, ICML 2017): a batched, differentiable quadratic program.

    x*(Q, q, G, h, A, b) = argmin_x  1/2 x'Qx + q'x   subject to  Gx <= h,  Ax = b

* :func:`qp` -- the functional layer. Batched or unbatched inputs (mixed broadcasting as in
  cvxpylayers), any subset of constraints, output in the input's dtype and device, optionally the
  duals. Backends are chosen by name (see :mod:`layers.backends` for the table); every answer is
  checked (:func:`layers.qp_solve.solve_checked`) before it is returned.
* :class:`OptNetQP` -- an ``nn.Module`` with the paper's always-feasible parameterization
  ``Q = L L' + eps I``, ``h = G z0 + s0`` (``s0 >= 0``), ``b = A z0``.

The ``torch-ipm`` backend is :func:`layers.qp_ipm.solve_qp` with its implicit KKT backward. For
the cvxpylayers backends the QP is stated in CVXPY below (:func:`_qp_layer`), built once per
(backend, sizes, settings).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from layers._checks import SolverError, check_positive, check_tensor, empty_outputs
from layers.backends import check_settings, get_backend
from layers.cvxpy_layer import CvxpyProblemLayer
from layers.qp_elastic import elastic_qp
from layers.qp_ipm import INFEASIBLE, solve_qp
from layers.qp_problem import QPProblem, prepare_qp
from layers.qp_solve import solve_checked

__all__ = ["CLOSEST_WEIGHT", "INFEASIBLE_POLICIES", "OptNetQP", "QPLayerInfo", "qp"]

INFEASIBLE_POLICIES = ("raise", "closest")
CLOSEST_WEIGHT = 1e6  # rho, the weight of the squared constraint violations in "closest"

# ----------------------------------------------------------------------------------------------
# The CVXPY statement of the QP (cvxpylayers backends)
# ----------------------------------------------------------------------------------------------


class _SolverArgs:
    """``solver_args`` as a hashable cache key: equal when their sorted ``(name, repr(value))``
    items are (values may be dicts); ``args`` is the dict itself."""

    def __init__(self, args: dict[str, Any]):
        self.args = dict(args)
        self.key = tuple(sorted((k, repr(v)) for k, v in args.items()))

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SolverArgs) and self.key == other.key


@lru_cache(maxsize=64)
def _qp_layer(
    backend: str, n: int, m: int, p: int, settings: str, args: _SolverArgs
) -> CvxpyProblemLayer:
    """The CVXPY statement of the QP, canonicalized once per (backend, sizes, settings)."""
    import cvxpy as cp

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
    return CvxpyProblemLayer(
        cp.Problem(cp.Minimize(objective), cons),
        params,
        variables,
        backend=backend,
        settings=settings,
        solver_args=args.args,
    )


def _factor(Q: Tensor) -> Tensor:
    """``F`` with ``F'F = Q`` (Cholesky, or a symmetric square root when Q is singular)."""
    L, info = torch.linalg.cholesky_ex(Q)
    F = L.mT
    if bool(info.any()):
        w, V = torch.linalg.eigh(Q)
        R = V * w.clamp_min(0).sqrt().unsqueeze(-2)
        F = torch.where((info != 0).view(-1, 1, 1), R.mT, F)
    return F


@dataclass
class _SolutionSlot:
    """Where :func:`_run_cvxpylayers` puts the solution ``x`` once it is known, for the backward
    of :class:`_QGradLink` (which runs before the solve in the graph)."""

    x: Tensor | None = None


class _QGradLink(torch.autograd.Function):
    """Identity on ``q`` whose backward also gives ``Q`` its gradient, ``sym(dq x')``.

    The KKT conditions depend on ``(Q, q)`` only through ``Qx + q``, so for any backend
    ``dL/dQ = sym(dL/dq x')`` exactly. Backends that take a factor of ``Q`` (diffcp) or only its
    upper triangle (moreau) get ``Q`` detached, and this link supplies its gradient; ``x`` is
    filled into the :class:`_SolutionSlot` after the solve.
    """

    @staticmethod
    def forward(ctx, q, Q, slot):  # type: ignore[override]
        ctx.slot = slot
        return q.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq):  # type: ignore[override]
        x = ctx.slot.x.to(gq.dtype)
        dQ = 0.5 * (gq.unsqueeze(-1) * x.unsqueeze(-2) + x.unsqueeze(-1) * gq.unsqueeze(-2))
        return gq, dQ, None


def _run_cvxpylayers(
    prob: QPProblem, backend: str, settings: str, args: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """The cvxpylayers backends on the CVXPY statement of the QP."""
    B, n, m, p = prob.sizes
    layer = _qp_layer(backend, n, m, p, settings, _SolverArgs(args))
    Qd = 0.5 * (prob.Q + prob.Q.mT).detach()
    slot = _SolutionSlot()
    q = _QGradLink.apply(prob.q, prob.Q, slot) if prob.Q.requires_grad else prob.q
    first = Qd if get_backend(backend).solver == "MOREAU" else _factor(Qd)
    params = [first, q] + ([prob.G, prob.h] if m else []) + ([prob.A, prob.b] if p else [])
    out = layer(*params)
    x = out[0]
    slot.x = x.detach()
    lam = out[1] if m else prob.h.new_zeros(B, 0)
    nu = out[1 + bool(m)] if p else prob.b.new_zeros(B, 0)
    return x, lam, nu


# ----------------------------------------------------------------------------------------------
# Infeasible elements: the closest feasible problem
# ----------------------------------------------------------------------------------------------


@dataclass
class QPLayerInfo:
    """What :func:`qp` did per batch element: ``relaxed (B,)`` is True where the constraints
    were infeasible and the element was solved as its closest feasible problem
    (``infeasible="closest"``)."""

    relaxed: Tensor


def _take(prob: QPProblem, idx: Tensor) -> QPProblem:
    """The batch elements ``idx`` of ``prob``."""
    return dataclasses.replace(
        prob, **{k: getattr(prob, k)[idx] for k in ("Q", "q", "G", "h", "A", "b")}
    )


def _solve_or_relax(
    prob: QPProblem, solve: Any, weight: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve ``prob``; where that fails because an element's constraints are infeasible, solve
    those elements' closest feasible problems instead. Returns ``(x, lam, nu, relaxed)``."""
    B = prob.sizes[0]
    none = torch.zeros(B, dtype=torch.bool, device=prob.q.device)
    try:
        return (*solve(prob), none)
    except SolverError as err:
        failed = sorted(set(err.failed))
        if not failed:
            raise
        idx = torch.tensor(failed, device=prob.q.device)
        sub = _take(prob, idx)
        status = solve_qp(sub.Q, sub.q, sub.G, sub.h, sub.A, sub.b).info.status
        if not bool((status == INFEASIBLE).all()):
            raise
    relaxed = none.clone()
    relaxed[idx] = True
    keep = torch.nonzero(~relaxed).flatten()
    parts = [elastic_qp(sub.Q, sub.q, sub.G, sub.h, sub.A, sub.b, weight)]
    order = [idx]
    if keep.numel():
        parts.insert(0, solve(_take(prob, keep)))
        order.insert(0, keep)
    inverse = torch.argsort(torch.cat(order))
    x, lam, nu = (torch.cat([pt[i] for pt in parts])[inverse] for i in range(3))
    return x, lam, nu, relaxed


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
    settings: str = "accurate",
    solver_args: dict[str, Any] | None = None,
    check: bool = True,
    check_tol: float | None = None,
    check_psd: bool = True,
    infeasible: str = "raise",
    closest_weight: float = CLOSEST_WEIGHT,
    info: bool = False,
) -> Any:
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
        settings: ``"accurate"``: the backend's ``accurate`` settings in
            :data:`~layers.backends.BACKENDS` (the library's); ``"defaults"``: its
            ``solver_defaults`` (the solver's own).
        solver_args: extra settings for the backend (override ``settings``).
        check: check every solution's relative KKT residuals (:func:`kkt_residuals`) and raise
            :class:`~layers.SolverError` naming the elements above ``check_tol``.
        check_tol: the threshold; None uses the backend's (``Backend.check_tol``: 1e-6, but
            1e-5 for the diffcp backends, whose conic form of the quadratic objective limits
            their accuracy, and for qpth).
        check_psd: check that Q is PSD (a Cholesky of ``Q + 1e-8 |Q| I``).
        infeasible: ``"raise"`` (default): an element whose constraints admit no ``x`` raises
            :class:`~layers.SolverError`. ``"closest"``: such an element is solved as its
            closest feasible problem, the elastic QP

                min 1/2 x'Qx + q'x + rho/2 (|s|^2 + |Âx - b̂|^2)  s.t.  Ĝx - s <= ĥ

            over ``x`` and the violations ``s``, where ``Ĝ, ĥ, Â, b̂`` are ``G, h, A, b`` with
            each row of ``G`` and ``A`` scaled to unit norm (so a violation is a distance to
            the row's hyperplane) and ``rho = closest_weight``. As rho grows its solution tends
            to the closest feasible QP's (minimize the objective over the points of least
            squared violation; proxsuite's QPLayer defines it so with unscaled rows). Its
            gradient is the exact gradient of this problem; ``lam`` and ``nu`` are the duals of
            its relaxed inequalities and equalities (so ``nu = rho (Âx - b̂)`` on ``A``'s
            rows). Feasible elements of the same batch are solved exactly as with "raise".
            Unbounded or failed elements still raise. The elastic problem is solved exactly,
            whatever the backend, by :mod:`layers.qp_elastic` (semismooth Newton).
        closest_weight: ``rho``, the weight of the squared violations (default 1e6). The
            gradient of a relaxed element grows with it in the directions that change the
            violation; a smaller weight gives smoother gradients and a less exact projection.
        info: also return a :class:`QPLayerInfo` (``relaxed (B,)``: the elements solved as
            their closest feasible problem).

    Bad input follows :mod:`layers._checks`' policy: float16 / bfloat16 are solved in float64
    and returned in their dtype; an empty batch (``B = 0``) gives empty outputs without a solve.

    Returns:
        ``x`` of shape ``(B, n)`` (``(n,)`` if every input is unbatched), in ``q``'s dtype and
        device; with ``duals=True``, ``(x, lam, nu)`` with ``lam (B, m)``, ``nu (B, p)`` (the
        KKT convention ``Qx + q + G'lam + A'nu = 0``, ``lam >= 0``); with ``info=True`` the
        :class:`QPLayerInfo` comes last.

    Raises:
        SolverError: naming the batch elements that are infeasible (with the default
            ``infeasible="raise"``), unbounded, or whose solution fails the KKT check.
        ValueError, TypeError: bad shapes, NaN/Inf, Q not PSD, unknown backend or settings.
        ImportError: the backend's package is not installed.
    """
    check_settings(settings)
    if infeasible not in INFEASIBLE_POLICIES:
        raise ValueError(
            f"infeasible must be one of {INFEASIBLE_POLICIES}, got {infeasible!r}: 'raise' "
            "raises SolverError, 'closest' solves the closest feasible problem"
        )
    prob = prepare_qp(Q, q, G, h, A, b, check_psd, torch.float64)
    B, n, m, p = prob.sizes
    if B == 0:  # an empty batch: nothing to solve
        get_backend(backend)
        shapes = [(0, n), (0, m), (0, p)]
        empty = empty_outputs([Q, q, G, h, A, b], shapes, prob.dtype, prob.device)
        outs: list[Any] = list(empty) if duals else [empty[0]]
        if info:
            outs.append(QPLayerInfo(relaxed=torch.zeros(0, dtype=torch.bool, device=prob.device)))
        return tuple(outs) if len(outs) > 1 else outs[0]

    def solve(pr: QPProblem) -> tuple[Tensor, Tensor, Tensor]:
        return solve_checked(
            pr,
            backend,
            settings=settings,
            solver_args=dict(solver_args or {}),
            check=check,
            check_tol=check_tol,
            run_cvxpy=_run_cvxpylayers,
        )

    if infeasible == "closest":
        check_positive("closest_weight", closest_weight)
        x, lam, nu, relaxed = _solve_or_relax(prob, solve, float(closest_weight))
    else:
        (x, lam, nu), relaxed = solve(prob), torch.zeros(B, dtype=torch.bool)
    outs = [t.to(dtype=prob.dtype, device=prob.device) for t in (x, lam, nu)]
    if prob.unbatched:
        outs = [t.squeeze(0) for t in outs]
        relaxed = relaxed.squeeze(0)
    outs = outs if duals else outs[:1]
    if info:
        outs.append(QPLayerInfo(relaxed=relaxed.to(prob.device)))
    return tuple(outs) if len(outs) > 1 else outs[0]


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
        backend, settings, solver_args, check_tol, infeasible, closest_weight: as in
            :func:`qp`. With ``infeasible="closest"``, ``last_relaxed`` holds the ``(B,)`` mask
            of the elements of the last forward that were solved as their closest feasible
            problem (only inputs ``h`` or ``b`` can make the problem infeasible).

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
        settings: str = "accurate",
        solver_args: dict[str, Any] | None = None,
        check_tol: float | None = None,
        duals: bool = False,
        infeasible: str = "raise",
        closest_weight: float = CLOSEST_WEIGHT,
    ):
        super().__init__()
        for name, v, low in (("n", n, 1), ("m", m, 0), ("p", p, 0)):
            if isinstance(v, bool) or int(v) != v or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        check_positive("eps", eps)
        unknown = [k for k in inputs if k not in _INPUTS]
        if unknown or len(set(inputs)) != len(inputs):
            raise ValueError(f"inputs must be distinct names from {_INPUTS}, got {tuple(inputs)}")
        if (m == 0 and {"G", "h"} & set(inputs)) or (p == 0 and {"A", "b"} & set(inputs)):
            raise ValueError(f"inputs {tuple(inputs)} name constraints that m={m}, p={p} exclude")
        get_backend(backend)
        check_settings(settings)
        if infeasible not in INFEASIBLE_POLICIES:
            raise ValueError(f"infeasible must be one of {INFEASIBLE_POLICIES}, got {infeasible!r}")
        check_positive("closest_weight", closest_weight)
        self.infeasible, self.closest_weight = infeasible, float(closest_weight)
        self.last_relaxed: Tensor | None = None
        self.n, self.m, self.p, self.eps = n, m, p, float(eps)
        self.inputs = tuple(k for k in _INPUTS if k in inputs)
        self.order = tuple(inputs)
        self.backend, self.settings, self.duals = backend, settings, duals
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
        self._check_inputs(given)
        ref = next(iter(given.values()), self.L)
        dt, dev = _working_dtype(ref.dtype), ref.device
        L = self.L.to(dt).tril()
        Q = L @ L.mT + self.eps * torch.eye(self.n, dtype=dt, device=dev)
        z0 = self.z0.to(dt)
        cast = {k: (v.to(dt) if v is not None else None) for k, v in given.items()}
        data: dict[str, Tensor | None] = {"Q": Q, "q": cast.get("q", self.q)}
        if self.m:
            G = cast["G"] if "G" in cast else self.G.to(dt)
            data["G"] = G
            data["h"] = (
                cast["h"]
                if "h" in cast
                else _mv_any(G, z0) + nn.functional.softplus(self.s0).to(dt)
            )
        if self.p:
            A = cast["A"] if "A" in cast else self.A.to(dt)
            data["A"] = A
            data["b"] = cast["b"] if "b" in cast else _mv_any(A, z0)
        return {k: (v.to(dt) if v is not None else None) for k, v in data.items()}

    def _check_inputs(self, given: dict[str, Tensor]) -> None:
        """Each input is a finite floating tensor of its shape, batched or not."""
        want = {
            "q": (self.n,),
            "G": (self.m, self.n),
            "h": (self.m,),
            "A": (self.p, self.n),
            "b": (self.p,),
        }
        for k, v in given.items():
            check_tensor(k, v)
            w = want[k]
            if v.dim() not in (len(w), len(w) + 1) or tuple(v.shape[v.dim() - len(w) :]) != w:
                raise ValueError(
                    f"{k} has shape {tuple(v.shape)}, expected {w} or {('B', *w)} for this "
                    f"layer (n={self.n}, m={self.m}, p={self.p})"
                )

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Solve the QP for these inputs; float16 / bfloat16 inputs are computed in float32 data
        (solved in float64) and the outputs returned in the first input's dtype."""
        data = self.qp_data(*args, **kwargs)
        first = args[0] if args else next(iter(kwargs.values()), None)
        *out, info = qp(
            data["Q"],
            data["q"],
            data.get("G"),
            data.get("h"),
            data.get("A"),
            data.get("b"),
            backend=self.backend,
            duals=self.duals,
            settings=self.settings,
            solver_args=self.solver_args,
            check_tol=self.check_tol,
            check_psd=False,
            infeasible=self.infeasible,
            closest_weight=self.closest_weight,
            info=True,
        )
        self.last_relaxed = info.relaxed
        if first is not None:
            out = [t.to(first.dtype) for t in out]
        return tuple(out) if self.duals else out[0]


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the QP data are built in: float32 for half precision (the parameters' dtype;
    ``qp`` solves in float64 anyway), else the inputs'."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _mv_any(M: Tensor, v: Tensor) -> Tensor:
    """``M @ v`` for ``M (m, n)`` or ``(B, m, n)`` and ``v (n,)``."""
    return M @ v
