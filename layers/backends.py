"""Solver backends: how a CVXPY problem becomes a differentiable PyTorch layer.

One table, ``BACKENDS``, maps a name to a backend. Each cvxpylayers backend comes with two sets
of solver settings: ``tuned`` (the library's, chosen so gradients are accurate) and ``defaults``
(the solver's own, for comparison only).

=================  =====================================================================
name               what it is
=================  =====================================================================
diffcp-clarabel    cvxpylayers + diffcp, Clarabel interior point, dense derivative
diffcp-scs         cvxpylayers + diffcp, SCS (first order), dense derivative
diffcp-ecos        cvxpylayers + diffcp, ECOS interior point, dense derivative
moreau             cvxpylayers + moreau (batched interior point, implicit backward)
=================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cvxpy as cp
import torch

__all__ = ["BACKENDS", "Backend", "CvxpyProblemLayer", "SolverError", "get_backend"]


class SolverError(RuntimeError):
    """A solve failed (infeasible, unbounded, inaccurate) for some batch elements."""

    def __init__(self, message: str, failed: Sequence[int] = ()):
        super().__init__(message)
        self.failed = list(failed)


@dataclass(frozen=True)
class Backend:
    """A cvxpylayers solver plus the settings the library uses with it."""

    name: str
    solver: str | None  # cvxpylayers' ``solver`` argument (None = diffcp)
    tuned: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    needs: str = "cvxpylayers"  # the package that must be importable
    about: str = ""

    def solver_args(self, tuned: bool, needs_grad: bool) -> dict[str, Any]:
        args = dict(self.tuned if tuned else self.defaults)
        if not needs_grad:
            args.pop("mode", None)  # diffcp's solve_only_batch takes no ``mode``
        return args


_TIGHT_CLARABEL = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8}

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in [
        Backend(
            "diffcp-clarabel",
            None,
            tuned={"solve_method": "Clarabel", "mode": "dense", **_TIGHT_CLARABEL},
            defaults={"solve_method": "Clarabel"},
            about="interior point, accurate; one CPU solve per batch element",
        ),
        Backend(
            "diffcp-scs",
            None,
            tuned={"solve_method": "SCS", "mode": "dense", "eps_abs": 1e-10, "eps_rel": 1e-10,
                   "max_iters": 100_000},
            defaults={"solve_method": "SCS"},
            about="first-order (ADMM); cheap iterations, needs tight tolerances for gradients",
        ),
        Backend(
            "diffcp-ecos",
            None,
            tuned={"solve_method": "ECOS", "mode": "dense", "abstol": 1e-10, "reltol": 1e-10,
                   "feastol": 1e-10},
            defaults={"solve_method": "ECOS"},
            needs="ecos",
            about="interior point (ECOS); small problems",
        ),
        Backend(
            "moreau",
            "MOREAU",
            tuned={"max_iter": 1000},
            defaults={},
            needs="moreau",
            about="batched interior point with implicit backward; fastest cvxpylayers path",
        ),
    ]
}


def get_backend(name: str) -> Backend:
    """Look a backend up by name; an unknown or uninstalled one gets a one-line error."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    b = BACKENDS[name]
    try:
        __import__(b.needs)
    except ImportError as err:
        raise ImportError(
            f"backend {name!r} needs the package {b.needs!r}: pip install {b.needs}"
        ) from err
    return b


class CvxpyProblemLayer(torch.nn.Module):
    """A DPP CVXPY problem as a layer, solved by the named backend.

    Wraps ``cvxpylayers.torch.CvxpyLayer``: canonicalizes once, casts inputs to float64 for the
    solver and the outputs back to the inputs' dtype and device, and drops options that diffcp
    rejects when no gradient is needed.
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

        if not problem.is_dpp():
            raise ValueError("the CVXPY problem is not DPP; cvxpylayers cannot differentiate it")
        self.backend = get_backend(backend)
        self.tuned = tuned
        self.extra_args = dict(solver_args or {})
        self.layer = CvxpyLayer(
            problem, parameters=list(parameters), variables=list(variables),
            solver=self.backend.solver,
        )

    def forward(self, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype, device = params[0].dtype, params[0].device
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        args = {**self.backend.solver_args(self.tuned, needs_grad), **self.extra_args}
        if not needs_grad:
            args.pop("mode", None)
        p64 = [p.to(torch.float64) for p in params]
        try:
            out = self.layer(*p64, solver_args=args)
        except Exception as err:  # solvers raise many types
            raise SolverError(
                f"backend {self.backend.name!r} failed: {type(err).__name__}: {err}"
            ) from err
        return tuple(o.to(dtype=dtype, device=device) for o in out)
