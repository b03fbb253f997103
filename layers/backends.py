"""Solver backends: one table, ``BACKENDS``, maps a name to how a problem is solved and
differentiated.

Three kinds of backend:

* ``torch``: the project's own batched dense interior-point method (:func:`layers.qp.solve_qp`)
  with an implicit KKT backward. Pure torch, any device, no loop over batch elements.
* ``cvxpylayers``: cvxpylayers with diffcp (SCS, Clarabel, ECOS) or moreau.
* ``qpth``: the OptNet authors' batched QP solver (optional peer, ``pip install --no-deps qpth``).

Every backend serves :func:`layers.qp.qp`. :class:`CvxpyProblemLayer` (a CVXPY problem as a
layer) serves the ``cvxpylayers`` backends directly; ``torch-ipm`` and ``qpth`` plug into it through
cvxpylayers' custom ``SolverInterface`` when the canonical problem is a QP (zero and nonnegative
cones only).

===============  ===========  =====================================================================
name             kind         good at (measured with tasks/bench_qp.py; gradient error against an
                              independent active-set reference)
===============  ===========  =====================================================================
torch-ipm        torch        the default: dense QPs with up to a few thousand variables, any
                              batch, any device (pure torch; GPU untested so far), LPs and
                              singular Q too. Gradients exact to ~1e-7 (tol 1e-12) for all six
                              inputs and through the duals; equalities eliminated once by a
                              null-space basis. Cost grows as n^3 per element. The only backend
                              that finished the sparse QP (batch 32, n 1024) in
                              tasks/compare_backends.py (qpth: > 300 s).
moreau           cvxpylayers  all cones in a batched C++ solver. Its own defaults (solver
                              'auto': active set on these QPs) gave exact gradients (~1e-13) as
                              fast as torch-ipm on the small and dense QPs; the library's settings
                              (interior point, tol 1e-10, max_iter 1000, chosen for TV, where
                              max_iter 200 returned wrong answers) are 3-8x slower there with
                              gradient errors 2e-5..8e-4 (see results/backends/report.md). The
                              sort layers pass the active-set method themselves.
diffcp-clarabel  cvxpylayers  any cone, accurate interior point, one CPU solve per element; the
                              quadratic objective goes through a second-order cone, so solutions
                              and gradients are accurate to ~1e-6 only (on the small QP of
                              compare_backends its solution failed layers.qp's 1e-5 KKT check;
                              dense QP: gradient error 2e-5). With its defaults: 0.1-0.4.
diffcp-ecos      cvxpylayers  small SOCPs/LPs; like diffcp-clarabel, ~1e-6.
diffcp-scs       cvxpylayers  very large sparse conic problems where an interior point is too
                              costly; first-order, accurate (~1e-7..1e-10 here) only with the
                              tight tolerances set here.
qpth             qpth         peer for comparison: dense batched QPs with Q positive definite;
                              gradients through x only (duals returned detached). It can return a
                              wrong solution without warning; the KKT check of layers.qp catches
                              it.
===============  ===========  =====================================================================

Each backend has two settings dicts: ``tuned`` (the library's, chosen so gradients are accurate)
and ``defaults`` (the solver's own, kept for comparisons).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cvxpy as cp
import torch

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "Backend",
    "CvxpyProblemLayer",
    "SolverError",
    "get_backend",
]


class SolverError(RuntimeError):
    """A solve failed (infeasible, unbounded, inaccurate) for some batch elements.

    ``failed`` lists the batch elements concerned (empty if unknown).
    """

    def __init__(self, message: str, failed: Sequence[int] = ()):
        super().__init__(message)
        self.failed = list(failed)


@dataclass(frozen=True)
class Backend:
    """A solver backend and the settings the library uses with it."""

    name: str
    kind: str  # "torch", "cvxpylayers" or "qpth"
    solver: str | None = None  # cvxpylayers' ``solver`` argument (None = diffcp)
    tuned: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    needs: str = "cvxpylayers"  # the package that must be importable
    about: str = ""
    settings_at_init: bool = False  # moreau reads its settings when the layer is built
    check_tol: float = 1e-6  # largest relative KKT residual layers.qp accepts from it

    def solver_args(self, tuned: bool, needs_grad: bool) -> dict[str, Any]:
        """The settings for one call (``tuned`` or ``defaults``)."""
        args = dict(self.tuned if tuned else self.defaults)
        if not needs_grad:
            args.pop("mode", None)  # diffcp's solve_only_batch takes no ``mode``
        return args


_TIGHT_CLARABEL = {
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    "tol_ktratio": 1e-10,
}

# moreau: solver='auto' picks the active-set method for small QPs, whose gradients are
# combinatorial (and which, through cvxpylayers, returned wrong solutions here); 'ipm' with
# tight tolerances is accurate. max_iter 200 (its default) returned wrong answers on ~2% of
# TV problems while reporting success; 1000 fixed that.
_MOREAU_TUNED = {
    "solver": "ipm",
    "max_iter": 1000,
    "ipm_settings": {
        "tol_gap_abs": 1e-10,
        "tol_gap_rel": 1e-10,
        "tol_feas": 1e-10,
        "tol_ktratio": 1e-8,
    },
}

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in [
        Backend(
            "torch-ipm",
            "torch",
            tuned={"tol": 1e-12, "max_iter": 60},
            defaults={"tol": 1e-12, "max_iter": 60},
            needs="torch",
            about="batched dense primal-dual interior point in torch, implicit KKT backward; "
            "dense QPs, large batches, GPU",
        ),
        Backend(
            "moreau",
            "cvxpylayers",
            "MOREAU",
            tuned=_MOREAU_TUNED,
            defaults={},
            needs="moreau",
            about="batched sparse interior point with implicit backward; large sparse problems",
            settings_at_init=True,
        ),
        Backend(
            "diffcp-clarabel",
            "cvxpylayers",
            None,
            tuned={"solve_method": "Clarabel", "mode": "dense", **_TIGHT_CLARABEL},
            defaults={"solve_method": "Clarabel"},
            about="interior point, accurate, any cone; one CPU solve per batch element",
            check_tol=1e-5,
        ),
        Backend(
            "diffcp-scs",
            "cvxpylayers",
            None,
            tuned={
                "solve_method": "SCS",
                "mode": "dense",
                "eps_abs": 1e-10,
                "eps_rel": 1e-10,
                "max_iters": 100_000,
            },
            defaults={"solve_method": "SCS"},
            about="first-order (ADMM); cheap iterations, needs tight tolerances for gradients",
            check_tol=1e-5,
        ),
        Backend(
            "diffcp-ecos",
            "cvxpylayers",
            None,
            tuned={
                "solve_method": "ECOS",
                "mode": "dense",
                "abstol": 1e-10,
                "reltol": 1e-10,
                "feastol": 1e-10,
            },
            defaults={"solve_method": "ECOS"},
            needs="ecos",
            about="interior point (ECOS); small problems",
            check_tol=1e-5,
        ),
        Backend(
            "qpth",
            "qpth",
            tuned={"eps": 1e-12, "maxIter": 50},
            defaults={},
            needs="qpth",
            about="OptNet's batched dense QP solver (peer); Q must be positive definite",
            check_tol=1e-5,
        ),
    ]
}

DEFAULT_BACKEND = "torch-ipm"


def get_backend(name: str) -> Backend:
    """Look a backend up by name; an unknown or uninstalled one gets a one-line error."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    b = BACKENDS[name]
    try:
        importlib.import_module(b.needs)
    except ImportError as err:
        hint = (
            "pip install --no-deps qpth==0.0.18" if b.needs == "qpth" else f"pip install {b.needs}"
        )
        raise ImportError(f"backend {name!r} needs the package {b.needs!r}: {hint}") from err
    return b


@contextlib.contextmanager
def _no_direct_cones(solver: str | None) -> Iterator[None]:
    """Canonicalize for moreau without cvxpy's "direct cones".

    cvxpy >= 1.9 turns constraints on variables alone (``x >= 0``) into moreau direct cones, which
    cvxpylayers 1.2's moreau interface drops: the constraint silently vanished. Canonicalizing
    with the feature off keeps them as ordinary cone rows.
    """
    if solver != "MOREAU":
        yield
        return
    from cvxpy.reductions.solvers.defines import SOLVER_MAP_CONIC

    cls = type(SOLVER_MAP_CONIC["MOREAU"])
    old = cls.DIR_CONE_KINDS
    cls.DIR_CONE_KINDS = frozenset()
    try:
        yield
    finally:
        cls.DIR_CONE_KINDS = old


_CLARABEL_FAILED = {
    "Infeasible",
    "Unbounded",
    "Infeasible Inaccurate",
    "Unbounded Inaccurate",
    "Failure",
}


@contextlib.contextmanager
def _diffcp_checks_clarabel(solver: str | None) -> Iterator[None]:
    """Make diffcp raise when Clarabel reports failure, as it does for SCS and ECOS.

    diffcp 1.1 maps Clarabel's status but never checks it: an infeasible problem came back as an
    ordinary (wrong) solution. While the layer runs, diffcp's ``solve_internal`` is wrapped to
    raise ``diffcp.SolverError`` for those statuses.
    """
    if solver is not None:
        yield
        return
    import diffcp.cone_program as dcp

    inner = dcp.solve_internal

    def checked(*args: Any, **kwargs: Any) -> Any:
        result = inner(*args, **kwargs)
        status = result.get("info", {}).get("status")
        if status in _CLARABEL_FAILED and kwargs.get("raise_on_error", True):
            raise dcp.SolverError(f"Solver clarabel returned status {status}")
        return result

    dcp.solve_internal = checked
    try:
        yield
    finally:
        dcp.solve_internal = inner


class CvxpyProblemLayer(torch.nn.Module):
    """A DPP CVXPY problem as a layer, solved by the named backend.

    Wraps ``cvxpylayers.torch.CvxpyLayer``: canonicalizes once, casts inputs to float64 for the
    solver and the outputs back to the inputs' dtype and device, drops options that diffcp
    rejects when no gradient is needed, and raises :class:`SolverError` when a solve fails
    (for moreau, naming the batch elements whose status is not "solved").

    ``torch-ipm`` and ``qpth`` work when the problem canonicalizes to a QP (zero and nonnegative
    cones); they are plugged in through cvxpylayers' ``SolverInterface``.

    Args:
        problem: a DPP ``cp.Problem``.
        parameters: its parameters, in the order forward takes them.
        variables: the variables (or constraint dual variables) forward returns.
        backend: a name from :data:`BACKENDS`.
        tuned: the library's accurate settings (True) or the solver's defaults (False).
        solver_args: extra settings, overriding ``tuned`` / ``defaults``.
    """

    def __init__(
        self,
        problem: cp.Problem,
        parameters: Sequence[cp.Parameter],
        variables: Sequence[cp.Variable],
        backend: str = "diffcp-clarabel",
        *,
        tuned: bool = True,
        solver_args: dict[str, Any] | None = None,
    ):
        super().__init__()
        from cvxpylayers.torch import CvxpyLayer

        if not problem.is_dpp() and not problem.is_dpp(quad_form_dpp="qp"):  # type: ignore[call-arg]
            raise ValueError("the CVXPY problem is not DPP; cvxpylayers cannot differentiate it")
        self.backend = get_backend(backend)
        self.tuned = tuned
        self.extra_args = dict(solver_args or {})
        solver: Any = self.backend.solver
        init_args: dict[str, Any] = {}
        if self.backend.kind != "cvxpylayers":
            solver = _qp_interface(backend, tuned, self.extra_args)
        elif self.backend.settings_at_init:
            init_args = {**self.backend.solver_args(tuned, True), **self.extra_args}
        with _no_direct_cones(self.backend.solver):
            self.layer = CvxpyLayer(
                problem,
                parameters=list(parameters),
                variables=list(variables),
                solver=solver,
                solver_args=init_args,
            )

    def forward(self, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Solve for the given parameter values (batched or not); returns the variables."""
        dtype, device = params[0].dtype, params[0].device
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        args: dict[str, Any] = {}
        if self.backend.kind == "cvxpylayers":
            args = {**self.backend.solver_args(self.tuned, needs_grad), **self.extra_args}
        if not needs_grad:
            args.pop("mode", None)
        p64 = [p.to(torch.float64) for p in params]
        try:
            with _diffcp_checks_clarabel(
                self.backend.solver if self.backend.kind == "cvxpylayers" else "none"
            ):
                out = self.layer(*p64, solver_args=args)
        except SolverError:
            raise
        except Exception as err:  # solvers raise many types
            msg = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
            raise SolverError(
                f"backend {self.backend.name!r} failed: {type(err).__name__}: {msg}"
            ) from err
        if self.backend.solver == "MOREAU":
            self._check_moreau(device)
        return tuple(o.to(dtype=dtype, device=device) for o in out)

    def _check_moreau(self, device: torch.device) -> None:
        """Raise if moreau reports anything but "Solved" for some batch element."""
        try:
            solver = self.layer.ctx.solver_ctx.get_torch_solver(
                "cuda" if device.type == "cuda" else "cpu"
            )
            status = [str(getattr(s, "name", s)) for s in solver.info.status]
        except Exception:  # moreau internals moved: skip the check, the layers check KKT
            return
        bad = [i for i, s in enumerate(status) if s != "Solved"]
        if bad:
            shown = ", ".join(f"{i}: {status[i]}" for i in bad[:10])
            raise SolverError(
                f"backend 'moreau' did not solve batch elements {bad[:10]}"
                f"{' ...' if len(bad) > 10 else ''} ({shown})",
                bad,
            )


def _qp_interface(backend: str, tuned: bool, solver_args: dict[str, Any]) -> Any:
    """A cvxpylayers ``SolverInterface`` that solves the canonical problem as a dense QP with
    :func:`layers.qp.qp` (``torch-ipm`` or ``qpth``) and differentiates it with torch autograd.

    The problem is canonicalized for Clarabel (``min 1/2 x'Px + c'x, Ax + s = b, s in K``); it
    must have zero and nonnegative cones only (an LP or QP). Zero-cone rows become ``A x = b``,
    nonnegative rows ``G x <= h``; the duals come back in cvxpylayers' order ``[nu; lam]``.
    """
    import numpy as np
    from cvxpylayers.interfaces.base import SolverInterface

    class QPSolverInterface(SolverInterface):
        canon_solver = "CLARABEL"
        supports_quad_obj = True

        def setup(self, ctx: Any) -> None:
            dims = ctx.cone_dims
            other = {
                "second-order": len(dims.soc),
                "PSD": len(dims.psd),
                "exponential": dims.exp,
                "power": len(dims.p3d),
            }
            bad = {k: v for k, v in other.items() if v}
            if bad:
                raise ValueError(
                    f"backend {backend!r} solves problems that canonicalize to an LP/QP (zero "
                    f"and nonnegative cones); this one has {bad} cones: use 'moreau' or a diffcp "
                    "backend"
                )
            self.z, self.l = int(dims.zero), int(dims.nonneg)
            ind, ptr, shape = ctx.reduced_A.problem_data_index
            self.rows, self.n = int(shape[0]), int(shape[1]) - 1
            cols = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
            self.A_flat = torch.as_tensor(ind * (self.n + 1) + cols, dtype=torch.long)
            if ctx.reduced_P is not None and ctx.reduced_P.problem_data_index is not None:
                pind, pptr, _ = ctx.reduced_P.problem_data_index
                pcols = np.repeat(np.arange(len(pptr) - 1), np.diff(pptr))
                self.P_flat = torch.as_tensor(pind * self.n + pcols, dtype=torch.long)
            else:
                self.P_flat = None

        def solve_torch_batch(self, P, q, A, dims, solver_args, needs_grad):
            from layers.qp import qp

            n, z, rows = self.n, self.z, self.rows
            leaves = [
                t.detach().requires_grad_(needs_grad) if t is not None else None for t in (P, q, A)
            ]
            Pv, qv, Av = leaves
            B = qv.shape[0]
            with torch.enable_grad() if needs_grad else torch.no_grad():
                Aaug = (
                    Av.new_zeros(B, rows * (n + 1))
                    .index_add(1, self.A_flat.to(Av.device), Av)
                    .view(B, rows, n + 1)
                )
                Ac, bc = -Aaug[:, :, :n], Aaug[:, :, n]
                if self.P_flat is not None and Pv is not None:
                    Qd = Pv.new_zeros(B, n * n).index_add(1, self.P_flat.to(Pv.device), Pv)
                    Qd = Qd.view(B, n, n)
                else:
                    Qd = qv.new_zeros(B, n, n)
                G, h = (Ac[:, z:], bc[:, z:]) if self.l else (None, None)
                Ae, be = (Ac[:, :z], bc[:, :z]) if z else (None, None)
                x, lam, nu = qp(
                    Qd,
                    qv[:, :n],
                    G,
                    h,
                    Ae,
                    be,
                    backend=backend,
                    duals=True,
                    tuned=tuned,
                    solver_args=solver_args or None,
                    check_psd=False,
                )
            dual = torch.cat([nu, lam], -1)
            state = (leaves, x, dual) if needs_grad else None
            return x.detach(), dual.detach(), state

        def derivative_torch_batch(self, dprimal, ddual, state):
            leaves, x, dual = state
            inputs = [t for t in leaves if t is not None]
            outs, grads_out = [x], [dprimal]
            if dual.requires_grad:
                outs.append(dual)
                grads_out.append(ddual)
            grads = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True)
            it = iter(grads)
            full = [next(it) if t is not None else None for t in leaves]
            full = [
                torch.zeros_like(t) if g is None and t is not None else g
                for g, t in zip(full, leaves)
            ]
            return full[0], full[1], full[2]

    return QPSolverInterface()
