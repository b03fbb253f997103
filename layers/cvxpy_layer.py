"""A CVXPY problem as a layer (:class:`CvxpyProblemLayer`), with each solver's quirks.

Wraps ``cvxpylayers.torch.CvxpyLayer``, solved by a backend from :data:`layers.backends.BACKENDS`
with its settings. What each solver needs:

* moreau: canonicalize without cvxpy's "direct cones" (cvxpylayers' moreau interface drops them),
  pass the settings when the layer is built, and check moreau's per-element status.
* diffcp with Clarabel: raise when Clarabel reports failure (diffcp does not check it).
* ``torch-ipm`` and ``qpth``: a cvxpylayers ``SolverInterface`` that solves the canonical problem
  as a dense QP when it has zero and nonnegative cones only.

cvxpy and cvxpylayers are imported when a layer is built, not when this module is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from layers._checks import SolverError
from layers.backends import check_settings, get_backend
from layers.qp_problem import prepare_qp
from layers.qp_solve import solve_checked

if TYPE_CHECKING:
    import cvxpy as cp

__all__ = ["CvxpyProblemLayer"]


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
        backend: a name from :data:`layers.backends.BACKENDS`.
        settings: ``"accurate"`` (the backend's ``accurate`` settings, the library's) or
            ``"defaults"`` (its ``solver_defaults``, the solver's own).
        solver_args: extra settings, overriding those.
    """

    def __init__(
        self,
        problem: cp.Problem,
        parameters: Sequence[cp.Parameter],
        variables: Sequence[cp.Variable],
        backend: str = "diffcp-clarabel",
        *,
        settings: str = "accurate",
        solver_args: dict[str, Any] | None = None,
    ):
        super().__init__()
        check_settings(settings)
        from cvxpylayers.torch import CvxpyLayer

        if not problem.is_dpp() and not problem.is_dpp(quad_form_dpp="qp"):  # type: ignore[call-arg]
            raise ValueError("the CVXPY problem is not DPP; cvxpylayers cannot differentiate it")
        self.backend = get_backend(backend)
        self.settings = settings
        self.extra_args = dict(solver_args or {})
        solver: Any = self.backend.solver
        init_args: dict[str, Any] = {}
        if self.backend.kind != "cvxpylayers":
            solver = _qp_interface(backend, settings, self.extra_args)
        elif self.backend.settings_at_init:
            init_args = {**self.backend.solver_args(settings, True), **self.extra_args}
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
            args = {**self.backend.solver_args(self.settings, needs_grad), **self.extra_args}
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


def _qp_interface(backend: str, settings: str, solver_args: dict[str, Any]) -> Any:
    """A cvxpylayers ``SolverInterface`` that solves the canonical problem as a dense QP with
    :func:`layers.qp_solve.solve_checked` (``torch-ipm`` or ``qpth``, with the KKT check of
    :func:`layers.qp.qp`) and differentiates it with torch autograd.

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
                prob = prepare_qp(Qd, qv[:, :n], G, h, Ae, be, check_psd=False)
                x, lam, nu = solve_checked(
                    prob,
                    backend,
                    settings=settings,
                    solver_args=dict(solver_args),
                    check=True,
                    check_tol=None,
                )
                x, lam, nu = (t.to(dtype=prob.dtype, device=prob.device) for t in (x, lam, nu))
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
