"""Solver backends: one table, ``BACKENDS``, maps a name to how a problem is solved and
differentiated, and holds the settings the library uses with it. It is the single source of
every backend's settings; the layers read them from here.

Three kinds of backend:

* ``torch``: the project's own batched dense interior-point method (:func:`layers.qp_ipm.solve_qp`)
  with an implicit KKT backward. Pure torch, any device, no loop over batch elements.
* ``cvxpylayers``: cvxpylayers with diffcp (SCS, Clarabel, ECOS) or moreau.
* ``qpth``: the OptNet authors' batched QP solver (optional peer, ``pip install --no-deps qpth``).
* ``proxsuite``: proxsuite's QPLayer (optional peer, ``pip install --no-deps proxsuite cmeel``).

Every backend serves :func:`layers.qp.qp`. :class:`layers.cvxpy_layer.CvxpyProblemLayer` (a CVXPY
problem as a layer) serves the ``cvxpylayers`` backends directly; ``torch-ipm`` and ``qpth`` plug
into it through cvxpylayers' custom ``SolverInterface`` when the canonical problem is a QP (zero
and nonnegative cones only).

===============  ===========  =====================================================================
name             kind         good at
===============  ===========  =====================================================================
torch-ipm        torch        the default: dense QPs with up to a few thousand variables, any
                              batch, any device (pure torch), LPs and singular Q too. Gradients
                              for all six inputs and through the duals; equalities eliminated
                              once by a null-space basis. Cost grows as n^3 per element.
moreau           cvxpylayers  all cones in a batched C++ solver. The library's settings use its
                              interior point with tight tolerances and a raised iteration limit;
                              the sort layers pass the active-set method themselves.
diffcp-clarabel  cvxpylayers  any cone, accurate interior point, one CPU solve per element; the
                              quadratic objective goes through a second-order cone, which limits
                              the accuracy of solutions and gradients.
diffcp-ecos      cvxpylayers  small SOCPs/LPs; like diffcp-clarabel.
diffcp-scs       cvxpylayers  very large sparse conic problems where an interior point is too
                              costly; first-order, accurate only with the tight tolerances set
                              here.
proxsuite        proxsuite    peer for comparison: proxsuite's QPLayer, one element at a time in
                              C++ (proximal augmented Lagrangian); gradients for all inputs
                              through x by a KKT solve to its ``eps_backward`` (duals returned
                              detached). Wrong answers on some LPs, which the KKT check of
                              layers.qp catches. Optional (``pip install --no-deps proxsuite
                              cmeel``).
qpth             qpth         peer for comparison: dense batched QPs with Q positive definite;
                              gradients through x only (duals returned detached). It can return a
                              wrong solution without warning; the KKT check of layers.qp catches
                              it.
===============  ===========  =====================================================================

Each backend has two settings dicts, chosen by the layers' ``settings=`` argument:
``accurate`` (the library's, chosen so gradients are accurate) and ``solver_defaults`` (the
solver's own, kept for comparisons). Measurements of each backend are on the results pages
(``results/backends/``), not here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "SETTINGS",
    "SOLVER_NAMES",
    "Backend",
    "check_settings",
    "get_backend",
]

SETTINGS = ("accurate", "defaults")


def check_settings(settings: str) -> str:
    """``settings`` is ``"accurate"`` (the library's) or ``"defaults"`` (the solver's own)."""
    if settings not in SETTINGS:
        raise ValueError(
            f"settings must be 'accurate' (the library's settings) or 'defaults' (the solver's "
            f"own), got {settings!r}"
        )
    return settings


@dataclass(frozen=True)
class Backend:
    """A solver backend and the settings the library uses with it."""

    name: str
    kind: str  # "torch", "cvxpylayers", "qpth" or "proxsuite"
    solver: str | None = None  # cvxpylayers' ``solver`` argument (None = diffcp)
    accurate: dict[str, Any] = field(default_factory=dict)  # the library's settings
    solver_defaults: dict[str, Any] = field(default_factory=dict)  # the solver's own
    needs: str = "cvxpylayers"  # the package that must be importable
    about: str = ""
    settings_at_init: bool = False  # moreau reads its settings when the layer is built
    check_tol: float = 1e-6  # largest relative KKT residual layers.qp accepts from it

    def solver_args(self, settings: str, needs_grad: bool) -> dict[str, Any]:
        """The settings for one call: ``accurate`` or ``solver_defaults`` (by ``settings``,
        ``"accurate"`` or ``"defaults"``), less what the solver rejects without a gradient."""
        check_settings(settings)
        args = dict(self.accurate if settings == "accurate" else self.solver_defaults)
        if not needs_grad:
            args.pop("mode", None)  # diffcp's solve_only_batch takes no ``mode``
        return args


# Clarabel's tolerances are on gaps and residuals; on exponential cones the solution is only as
# accurate as their square root, so they are tight. diffcp differentiates with LSQR
# (tests/layers/cvxpy_settings_evidence.py compares modes and tolerances over varied problems).
_TIGHT_CLARABEL = {
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    "tol_ktratio": 1e-10,
}

# What CvxpyProblemLayer retries with when Clarabel stops short of those ("Optimal
# Inaccurate"): shorter steps and tighter iterative refinement at the same tolerances; if that
# stops short too, the same at tolerances Clarabel reaches (CLARABEL_CONFIRM), whose certified
# solution must agree with the tighter one (else it is returned instead).
CLARABEL_ROBUST = {
    "max_step_fraction": 0.9,
    "iterative_refinement_reltol": 1e-16,
    "iterative_refinement_abstol": 1e-16,
    "iterative_refinement_max_iter": 50,
    "max_iter": 500,
}
CLARABEL_CONFIRM = {
    **CLARABEL_ROBUST,
    "tol_gap_abs": 1e-10,
    "tol_gap_rel": 1e-10,
    "tol_feas": 1e-10,
    "tol_ktratio": 1e-8,
}
CLARABEL_LAST = {**CLARABEL_ROBUST, "max_iter": 200}  # Clarabel's own tolerances
CLARABEL_AGREE = 1e-6  # largest difference (abs and rel) of the two solutions' entries

# moreau: solver='auto' picks the active-set method for small QPs, whose gradients are
# combinatorial (and which, through cvxpylayers, returned wrong solutions); 'ipm' with tight
# tolerances is accurate. Its default iteration limit (200) returned wrong answers on some TV
# problems while reporting success; 1000 fixed that.
_MOREAU_ACCURATE = {
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
            accurate={"tol": 1e-12, "max_iter": 60},
            solver_defaults={"tol": 1e-12, "max_iter": 60},
            needs="torch",
            about="dense primal-dual interior point (batched torch; on the CPU a compiled "
            "loop per element), implicit KKT backward; dense QPs, large batches, GPU",
        ),
        Backend(
            "moreau",
            "cvxpylayers",
            "MOREAU",
            accurate=_MOREAU_ACCURATE,
            solver_defaults={},
            needs="moreau",
            about="batched sparse interior point with implicit backward; large sparse problems",
            settings_at_init=True,
        ),
        Backend(
            "diffcp-clarabel",
            "cvxpylayers",
            None,
            accurate={"solve_method": "Clarabel", "mode": "lsqr", **_TIGHT_CLARABEL},
            solver_defaults={"solve_method": "Clarabel"},
            about="interior point, accurate, any cone; one CPU solve per batch element",
            check_tol=1e-5,
        ),
        Backend(
            "diffcp-scs",
            "cvxpylayers",
            None,
            accurate={
                "solve_method": "SCS",
                "mode": "dense",
                "eps_abs": 1e-10,
                "eps_rel": 1e-10,
                "max_iters": 100_000,
            },
            solver_defaults={"solve_method": "SCS"},
            about="first-order (ADMM); cheap iterations, needs tight tolerances for gradients",
            check_tol=1e-5,
        ),
        Backend(
            "diffcp-ecos",
            "cvxpylayers",
            None,
            accurate={
                "solve_method": "ECOS",
                "mode": "dense",
                "abstol": 1e-10,
                "reltol": 1e-10,
                "feastol": 1e-10,
            },
            solver_defaults={"solve_method": "ECOS"},
            needs="ecos",
            about="interior point (ECOS); small problems",
            check_tol=1e-5,
        ),
        Backend(
            "proxsuite",
            "proxsuite",
            accurate={
                "eps": 1e-10,
                "eps_backward": 1e-10,
                "rho_backward": 1e-10,
                "mu_backward": 1e-10,
            },
            solver_defaults={},
            needs="proxsuite",
            about="proxsuite's QPLayer (peer): proximal augmented Lagrangian in C++, one "
            "element at a time, gradients by a KKT solve with its own tolerance",
        ),
        Backend(
            "qpth",
            "qpth",
            accurate={"eps": 1e-12, "maxIter": 50},
            solver_defaults={},
            needs="qpth",
            about="OptNet's batched dense QP solver (peer); Q must be positive definite",
            check_tol=1e-5,
        ),
    ]
}

DEFAULT_BACKEND = "torch-ipm"

# cvxpylayers' ``solver=`` names and the backend each maps to.
SOLVER_NAMES: dict[str, str] = {
    "CLARABEL": "diffcp-clarabel",
    "DIFFCP": "diffcp-clarabel",
    "SCS": "diffcp-scs",
    "ECOS": "diffcp-ecos",
    "MOREAU": "moreau",
}

# Solver-neutral names of per-call settings (as cvxpylayers' users write them), per backend:
# the settings each stands for. ``eps``/``tol`` is the solver's tolerance, ``max_iters`` its
# iteration limit.
_CLARABEL_TOLS = ("tol_gap_abs", "tol_gap_rel", "tol_feas")
ARG_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "torch-ipm": {"eps": ("tol",), "max_iters": ("max_iter",)},
    "qpth": {"tol": ("eps",), "max_iters": ("maxIter",), "max_iter": ("maxIter",)},
    "diffcp-clarabel": {"eps": _CLARABEL_TOLS, "tol": _CLARABEL_TOLS, "max_iters": ("max_iter",)},
    "diffcp-scs": {"tol": ("eps",), "max_iter": ("max_iters",)},
    "diffcp-ecos": {
        "eps": ("abstol", "reltol", "feastol"),
        "tol": ("abstol", "reltol", "feastol"),
        "max_iter": ("max_iters",),
    },
    "moreau": {"max_iters": ("max_iter",)},
    "proxsuite": {"tol": ("eps",), "max_iters": ("maxIter",), "max_iter": ("maxIter",)},
}


def get_backend(name: str) -> Backend:
    """Look a backend up by name; an unknown or uninstalled one gets a one-line error."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    b = BACKENDS[name]
    try:
        importlib.import_module(b.needs)
    except ImportError as err:
        hint = {
            "qpth": "pip install --no-deps qpth==0.0.18",
            "proxsuite": "pip install --no-deps proxsuite cmeel",
        }.get(b.needs, f"pip install {b.needs}")
        raise ImportError(f"backend {name!r} needs the package {b.needs!r}: {hint}") from err
    return b
