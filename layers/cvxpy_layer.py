"""A CVXPY problem as a layer (:class:`CvxpyProblemLayer`), a drop-in for
``cvxpylayers.torch.CvxpyLayer``, with each solver's quirks.

Wraps ``cvxpylayers.torch.CvxpyLayer``, solved by a backend from :data:`layers.backends.BACKENDS`
with its settings, or by the one :func:`choose_backend` picks (``backend="auto"``). What each
solver needs:

* moreau: canonicalize without cvxpy's "direct cones" (cvxpylayers' moreau interface drops them),
  pass the PSD cone sizes (it leaves them out), pass the settings when its solver is created
  (a call's settings create one for the call), check moreau's per-element status, and detach
  outputs when no input requires grad.
* diffcp with Clarabel: raise when Clarabel reports failure (diffcp does not check it), retry
  an inaccurate solve with more robust settings, and raise if that does not solve it.
* ``torch-ipm`` and ``qpth``: a cvxpylayers ``SolverInterface`` that solves the canonical problem
  as a dense QP when it has zero and nonnegative cones only (constraints or not), and keeps its
  graph so autograd can go back through one forward more than once.

cvxpy and cvxpylayers are imported when a layer is built, not when this module is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from layers._checks import SolverError, check_tensor, empty_outputs, scale_advice
from layers.backends import (
    BACKENDS,
    CLARABEL_AGREE,
    CLARABEL_CONFIRM,
    CLARABEL_LAST,
    CLARABEL_ROBUST,
    SOLVER_NAMES,
    check_settings,
    get_backend,
)
from layers.qp_problem import prepare_qp
from layers.qp_solve import solve_checked

if TYPE_CHECKING:
    import cvxpy as cp

__all__ = ["AUTO_DENSE_LIMIT", "CvxpyProblemLayer", "choose_backend"]


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


_CLARABEL_INACCURATE = "Optimal Inaccurate"
_CLARABEL_NAMES = ("Clarabel", "CLARABEL")
_CLARABEL_TOLS = ("tol_gap_abs", "tol_gap_rel", "tol_feas", "tol_ktratio")


def _clarabel_retry(
    inner: Any, args: tuple, kwargs: dict[str, Any], first: dict[str, Any]
) -> dict[str, Any]:
    """Clarabel stopped short of its tolerances ("Optimal Inaccurate", result ``first``): retry
    with :data:`~layers.backends.CLARABEL_ROBUST`; if that stops short too, solve at
    :data:`~layers.backends.CLARABEL_CONFIRM`'s looser tolerances (then Clarabel's own,
    :data:`~layers.backends.CLARABEL_LAST`), which must be "Solved", and
    keep the first (tighter) iterate only where the two agree to
    :data:`~layers.backends.CLARABEL_AGREE` (on exponential cones it is the more accurate one).
    Raises ``diffcp.SolverError`` otherwise."""
    import diffcp.cone_program as dcp
    import numpy as np

    robust = inner(*args, **{**kwargs, **CLARABEL_ROBUST})
    if robust["info"]["status"] == "Solved":
        return robust
    loose = inner(*args, **{**kwargs, **CLARABEL_CONFIRM})
    status = loose["info"]["status"]
    if status == _CLARABEL_INACCURATE:  # last: Clarabel's own tolerances
        last = {k: v for k, v in kwargs.items() if k not in _CLARABEL_TOLS}
        loose = inner(*args, **{**last, **CLARABEL_LAST})
        status = loose["info"]["status"]
    if status != "Solved":
        raise dcp.SolverError(
            f"Solver clarabel returned status {status} (retried with "
            "layers.backends.CLARABEL_ROBUST and CLARABEL_CONFIRM)"
        )
    if all(
        np.allclose(first[k], loose[k], rtol=CLARABEL_AGREE, atol=CLARABEL_AGREE)
        for k in ("x", "y", "s")
    ):
        return first
    return loose


@contextlib.contextmanager
def _diffcp_checks_clarabel(solver: str | None) -> Iterator[None]:
    """Make diffcp raise when Clarabel reports failure, as it does for SCS and ECOS.

    diffcp 1.1 maps Clarabel's status but never checks it: an infeasible problem came back as an
    ordinary (wrong) solution, and "Optimal Inaccurate" (tolerances not reached) passed
    silently. While the layer runs, diffcp's ``solve_internal`` is wrapped to raise
    ``diffcp.SolverError`` for the failures, and to retry an inaccurate solve
    (:func:`_clarabel_retry`).
    """
    if solver is not None:
        yield
        return
    import diffcp.cone_program as dcp

    inner = dcp.solve_internal

    def checked(*args: Any, **kwargs: Any) -> Any:
        result = inner(*args, **kwargs)
        status = result.get("info", {}).get("status")
        if status == _CLARABEL_INACCURATE and kwargs.get("solve_method") in _CLARABEL_NAMES:
            result = _clarabel_retry(inner, args, kwargs, result)
            status = result["info"]["status"]
        if status in _CLARABEL_FAILED and kwargs.get("raise_on_error", True):
            raise dcp.SolverError(f"Solver clarabel returned status {status}")
        return result

    dcp.solve_internal = checked
    try:
        yield
    finally:
        dcp.solve_internal = inner


_QP_BACKENDS = (
    "torch-ipm",
    "qpth",
    "proxsuite",
    "moreau",
)  # take a parametrized quad_form objective
_ALL_CONES = {"second-order", "exponential", "PSD", "power"}
_TAKES = {  # the cones beyond zero/nonnegative each backend takes
    "torch-ipm": set(),
    "qpth": set(),
    "proxsuite": set(),
    "moreau": {"second-order", "exponential", "PSD", "power"},
    "diffcp-clarabel": {"second-order", "exponential", "PSD"},
    "diffcp-scs": {"second-order", "exponential", "PSD"},  # diffcp 1.1 cannot differentiate
    # through power cones
    "diffcp-ecos": {"second-order", "exponential"},
}
AUTO_DENSE_LIMIT = 2000  # torch-ipm is dense: more variables than this go to a sparse solver


def _needs_quad_scope(problem: cp.Problem, gp: bool) -> bool:
    """True when the problem is DPP only with a parametrized ``quad_form`` (a QP solver)."""
    if gp:
        return False
    return not problem.is_dpp() and problem.is_dpp(quad_form_dpp="qp")  # type: ignore[call-arg]


def _cones(problem: cp.Problem, gp: bool, quad: bool) -> tuple[set[str], int]:
    """The cones (beyond zero and nonnegative) of the problem canonicalized for a conic solver
    that takes a quadratic objective, and its number of variables."""
    import numpy as np
    from cvxpy.utilities import scopes

    scope = scopes.quad_form_dpp_scope() if quad else contextlib.nullcontext()
    unset = [p for p in problem.parameters() if p.value is None] if gp else []
    for p in unset:  # cvxpy's DGP reduction takes logs of the values: any positive ones do
        p.value = np.ones(p.shape)
    try:
        with scope:
            data, _, _ = problem.get_problem_data("CLARABEL", gp=gp)
    finally:
        for p in unset:
            p.value = None
    dims = data["dims"]
    found = {
        "second-order": bool(dims.soc),
        "PSD": bool(dims.psd),
        "exponential": bool(dims.exp),
        "power": bool(dims.p3d) or bool(getattr(dims, "pnd", None)),
    }
    return {k for k, v in found.items() if v}, int(data["c"].shape[0])


def _check_quad_forms(problem: cp.Problem) -> None:
    """Refuse a ``quad_form`` with a parametrized matrix in a constraint (cvxpy would fix the
    matrix at its current value)."""
    from cvxpy.atoms.quad_form import QuadForm

    for con in problem.constraints:
        for expr in con.args:
            stack = [expr]
            while stack:
                e = stack.pop()
                if isinstance(e, QuadForm) and e.args[1].parameters():
                    raise ValueError(
                        "a quad_form with a parametrized matrix is only supported in the objective"
                    )
                stack.extend(getattr(e, "args", []))


def choose_backend(problem: cp.Problem, *, gp: bool = False) -> str:
    """The backend ``backend="auto"`` picks for ``problem``.

    The rule, from the committed backend comparison (``results/backends/``):

    1. An LP or QP (zero and nonnegative cones after canonicalization) with at most
       :data:`AUTO_DENSE_LIMIT` variables goes to ``torch-ipm``, the recommended QP backend
       (it also takes a parametrized ``quad_form`` objective).
    2. A larger LP/QP goes to ``moreau`` (sparse) when it is installed, else ``diffcp-scs``
       (``torch-ipm`` when a parametrized ``quad_form`` needs a QP solver).
    3. A parametrized ``quad_form`` with other cones, or power cones: ``moreau`` (diffcp
       cannot take the first and does not differentiate through the second).
    4. Other cones (second-order, exponential, PSD; geometric programs too):
       ``diffcp-scs`` with its tight settings, the fastest accurate diffcp backend in the
       comparison; interior points (Clarabel, moreau) stop short of tight tolerances on
       exponential cones, and their solutions are then too inexact for finite differences.
    """
    import importlib.util

    quad = _needs_quad_scope(problem, gp)
    cones, n = _cones(problem, gp, quad)
    has_moreau = importlib.util.find_spec("moreau") is not None
    if not cones:
        if n <= AUTO_DENSE_LIMIT:
            return "torch-ipm"
        return "moreau" if has_moreau else ("torch-ipm" if quad else "diffcp-scs")
    if quad or "power" in cones:
        if has_moreau:
            return "moreau"
        raise ValueError(
            "power cones, or a parametrized quad_form with cones beyond LP/QP, need the backend "
            "'moreau' (pip install moreau)"
        )
    return "diffcp-scs"


def _moreau_takes_psd() -> None:
    """Pass cvxpy's PSD cone dimensions to moreau (cvxpylayers 1.2 left them out, so moreau
    saw fewer cone rows than constraints)."""
    import cvxpylayers.interfaces.moreau_if as mif

    if getattr(mif._cvxpy_dims_to_moreau_cones, "_optlayers_psd", False):
        return
    inner = mif._cvxpy_dims_to_moreau_cones

    def with_psd(dims: dict) -> Any:
        cones = inner(dims)
        psd = [int(v) for v in dims.get("s", [])]
        if psd and not list(getattr(cones, "psd_dims", [])):
            import moreau

            cones = moreau.Cones(
                num_zero_cones=cones.num_zero_cones,
                num_nonneg_cones=cones.num_nonneg_cones,
                so_cone_dims=list(cones.so_cone_dims),
                num_exp_cones=cones.num_exp_cones,
                power_alphas=list(cones.power_alphas),
                psd_dims=psd,
            )
        return cones

    with_psd._optlayers_psd = True  # type: ignore[attr-defined]
    mif._cvxpy_dims_to_moreau_cones = with_psd


@contextlib.contextmanager
def _moreau_call_settings(layer: Any, call_args: dict[str, Any]) -> Iterator[None]:
    """Apply a call's settings to moreau, which reads them when its solver is created
    (cvxpylayers 1.2 sets them on the created solver's copy, where they have no effect): for
    the call, the cached solvers are set aside and one is created with the merged settings."""
    if not call_args:
        yield
        return
    sctx = layer.ctx.solver_ctx
    saved = (sctx.options, sctx._torch_solver_cpu, sctx._torch_solver_cuda)
    sctx.options = {**sctx.options, **call_args}
    sctx._torch_solver_cpu = sctx._torch_solver_cuda = None
    try:
        yield
    finally:
        sctx.options, sctx._torch_solver_cpu, sctx._torch_solver_cuda = saved


def _translate_args(backend: str, args: dict[str, Any]) -> dict[str, Any]:
    """Per-call settings for ``backend``: solver-neutral names (``eps``, ``tol``,
    ``max_iters``) become the backend's own (:data:`layers.backends.ARG_ALIASES`); settings of
    another solver that this backend does not take are dropped with a warning."""
    import warnings

    from layers.backends import ARG_ALIASES

    aliases = ARG_ALIASES.get(backend, {})
    known = _known_args(backend)
    out: dict[str, Any] = {}
    dropped = []
    for key, value in args.items():
        if key in aliases and (known is None or key not in known):
            for name in aliases[key]:
                out[name] = value
        elif known is None or key in known:
            out[key] = value
        else:
            dropped.append(key)
    if dropped:
        warnings.warn(
            f"solver_args {sorted(dropped)} do not apply to backend {backend!r}; ignored",
            UserWarning,
            stacklevel=3,
        )
    return out


def _known_args(backend: str) -> set[str] | None:
    """The settings names ``backend`` takes (None: pass every name to the solver)."""
    diffcp = {"mode", "solve_method", "n_jobs_forward", "n_jobs_backward", "verbose"}
    if backend == "torch-ipm":
        return {"tol", "max_iter", "verbose"}
    if backend == "qpth":
        return {"eps", "maxIter", "verbose", "notImprovedLim", "check_Q_spd", "solver"}
    if backend == "proxsuite":
        return {"eps", "maxIter", "eps_backward", "rho_backward", "mu_backward", "omp_parallel"}
    if backend == "diffcp-clarabel":
        import clarabel

        return diffcp | {a for a in dir(clarabel.DefaultSettings()) if not a.startswith("_")}
    if backend == "diffcp-ecos":
        return diffcp | {
            "feastol",
            "abstol",
            "reltol",
            "feastol_inacc",
            "abstol_inacc",
            "reltol_inacc",
            "max_iters",
            "nitref",
        }
    if backend == "moreau":
        import moreau

        return {a for a in type(moreau.Settings()).model_fields}  # type: ignore[attr-defined]
    return None  # SCS: diffcp passes every name on, SCS rejects unknown ones


class CvxpyProblemLayer(torch.nn.Module):
    """A DPP CVXPY problem as a layer, solved by the named backend; a drop-in for
    ``cvxpylayers.torch.CvxpyLayer``.

    Wraps ``cvxpylayers.torch.CvxpyLayer``: canonicalizes once, casts inputs to float64 for the
    solver and the outputs back to the inputs' dtype and device, drops options that diffcp
    rejects when no gradient is needed, and raises :class:`SolverError` when a solve fails or
    is inaccurate (for moreau, naming the batch elements whose status is not "solved"). Bad
    input (wrong number of tensors, shapes, batch sizes, ``None``) raises ``ValueError`` or
    ``TypeError`` before anything is solved. Batching is cvxpylayers': a leading batch
    dimension is optional per tensor, unbatched tensors are broadcast.

    ``backend="auto"`` picks one by :func:`choose_backend`'s rule; ``layer.backend.name`` names
    the one chosen. ``solver=`` takes cvxpylayers' names (``"CLARABEL"``, ``"SCS"``,
    ``"ECOS"``, ``"MOREAU"``, mapped by :data:`layers.backends.SOLVER_NAMES`). A cone the
    backend cannot take is refused here with a ``ValueError`` naming the backends that can.

    ``torch-ipm`` and ``qpth`` work when the problem canonicalizes to a QP (zero and nonnegative
    cones); they are plugged in through cvxpylayers' ``SolverInterface``.

    Args:
        problem: a DPP ``cp.Problem`` (DGP with ``gp=True``).
        parameters: its parameters, in the order forward takes them.
        variables: the variables (or constraint dual variables) forward returns.
        solver: a cvxpylayers solver name; sets the backend (``backend`` must be "auto").
        gp: the problem is a geometric program (as in cvxpylayers).
        backend: "auto" or a name from :data:`layers.backends.BACKENDS`.
        settings: ``"accurate"`` (the backend's ``accurate`` settings, the library's) or
            ``"defaults"`` (its ``solver_defaults``, the solver's own).
        solver_args: extra settings, overriding those; a call's ``solver_args`` override these.
            Solver-neutral names (``eps``, ``tol``, ``max_iters``) are translated to the
            backend's; another solver's settings are dropped with a warning.
    """

    def __init__(
        self,
        problem: cp.Problem,
        parameters: Sequence[cp.Parameter],
        variables: Sequence[cp.Variable],
        solver: str | None = None,
        gp: bool = False,
        *,
        backend: str = "auto",
        settings: str = "accurate",
        solver_args: dict[str, Any] | None = None,
        verbose: bool = False,
    ):
        super().__init__()
        check_settings(settings)
        from cvxpylayers.torch import CvxpyLayer

        empty = [e for e in [*problem.variables(), *problem.parameters()] if e.size == 0]
        if empty:
            raise ValueError(
                f"{type(empty[0]).__name__.lower()} {empty[0].name()} has shape "
                f"{empty[0].shape}: the problem needs at least one entry in each variable and "
                "parameter"
            )
        if isinstance(solver, str) and solver in BACKENDS and backend == "auto":
            backend, solver = solver, None  # positional backend name (the old signature)
        _check_quad_forms(problem)
        if not gp and not problem.is_dpp() and not problem.is_dpp(quad_form_dpp="qp"):  # type: ignore[call-arg]
            raise ValueError("the CVXPY problem is not DPP; cvxpylayers cannot differentiate it")
        if solver is not None:
            key = str(solver).upper()
            if key not in SOLVER_NAMES:
                raise ValueError(
                    f"unknown solver {solver!r}; choose one of {', '.join(SOLVER_NAMES)} "
                    f"or a backend= from {', '.join(BACKENDS)}"
                )
            if backend not in ("auto", SOLVER_NAMES[key]):
                raise ValueError(f"solver={solver!r} and backend={backend!r} disagree")
            backend = SOLVER_NAMES[key]
        if backend == "auto":
            backend = choose_backend(problem, gp=gp)
        self.backend = get_backend(backend)
        self._check_cones(problem, gp)
        self.settings = settings
        self.extra_args = _translate_args(backend, dict(solver_args or {}))
        solver_obj: Any = self.backend.solver
        init_args: dict[str, Any] = {}
        if self.backend.kind != "cvxpylayers":
            solver_obj = _qp_interface(backend, settings, self.extra_args)
        elif self.backend.settings_at_init:
            init_args = {**self.backend.solver_args(settings, True), **self.extra_args}
        if self.backend.solver == "MOREAU":
            _moreau_takes_psd()
        with _no_direct_cones(self.backend.solver):
            self.layer = CvxpyLayer(
                problem,
                parameters=list(parameters),
                variables=list(variables),
                solver=solver_obj,
                gp=gp,
                verbose=verbose,
                solver_args=init_args,
            )
        self.param_names = [f"parameter {i} ({p.name()})" for i, p in enumerate(parameters)]
        self.param_shapes = [tuple(p.shape) for p in parameters]
        self.param_ndims = [len(p.shape) for p in parameters]
        self.out_shapes = [tuple(v.shape) for v in variables]

    def _check_cones(self, problem: cp.Problem, gp: bool) -> None:
        """Refuse, naming the backends that can, a problem this backend cannot take."""
        name = self.backend.name
        quad = _needs_quad_scope(problem, gp)
        if quad and name not in _QP_BACKENDS:
            raise ValueError(
                f"backend {name!r} cannot take a parametrized quad_form (diffcp rewrites it "
                f"with a fixed matrix); use one of {', '.join(_QP_BACKENDS)} or 'auto'"
            )
        if _TAKES[name] == _ALL_CONES:
            return  # no second canonicalization for a backend that takes every cone
        cones, _ = _cones(problem, gp, quad)
        missing = cones - _TAKES[name]
        if missing:
            able = [b for b, t in _TAKES.items() if cones <= t and (not quad or b in _QP_BACKENDS)]
            what = " (it solves problems that canonicalize to an LP/QP)" if not _TAKES[name] else ""
            raise ValueError(
                f"backend {name!r} cannot take {', '.join(sorted(missing))} cones{what}; "
                f"backends that can: {', '.join(able) or 'none'}"
            )

    def forward(
        self, *params: torch.Tensor, solver_args: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Solve for the given parameter values (batched or not); returns the variables.

        ``solver_args`` override the layer's settings for this call."""
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {i} must be a torch.Tensor, got {type(p).__name__}")
        try:
            self.layer.ctx.validate_params(list(params))  # ValueError for bad counts and shapes
        except ValueError as err:
            given = [tuple(p.shape) for p in params]
            want = [tuple(s) for s in self.param_shapes]
            raise ValueError(
                f"{err}; got shapes {given}, expected {want} (each with an optional leading "
                "batch dim)"
            ) from None
        for name, p in zip(self.param_names, params):
            check_tensor(name, p, min_dim=0)
        dtype, device = params[0].dtype, params[0].device
        sizes = {p.shape[0] for p, d in zip(params, self.param_ndims) if p.dim() > d}
        if len(sizes) > 1:
            raise ValueError(
                f"batch sizes differ: {sorted(sizes)}; give every batched parameter the same "
                "leading size (unbatched ones are broadcast)"
            )
        if sizes == {0}:  # an empty batch: nothing to solve
            return empty_outputs(params, [(0, *sh) for sh in self.out_shapes], dtype, device)
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        call_args = _translate_args(self.backend.name, dict(solver_args or {}))
        args: dict[str, Any] = dict(call_args)
        if self.backend.kind == "cvxpylayers":
            args = {
                **self.backend.solver_args(self.settings, needs_grad),
                **self.extra_args,
                **call_args,
            }
        if not needs_grad:
            args.pop("mode", None)
        p64 = [p.to(torch.float64) for p in params]
        moreau = self.backend.solver == "MOREAU"
        try:
            with (
                _diffcp_checks_clarabel(
                    self.backend.solver if self.backend.kind == "cvxpylayers" else "none"
                ),
                _moreau_call_settings(self.layer, call_args if moreau else {}),
            ):
                out = self.layer(*p64, solver_args=args)
                if moreau:
                    self._check_moreau(device)
        except Exception as err:  # solvers raise many types
            if moreau:  # a failed solve can leave moreau's solver unusable for the next call
                sctx = self.layer.ctx.solver_ctx
                sctx._torch_solver_cpu = sctx._torch_solver_cuda = None
            advice = scale_advice(dict(zip(self.param_names, params)))
            if isinstance(err, SolverError):
                if advice and advice not in str(err):
                    msg = str(err).rstrip(". ")
                    raise SolverError(f"{msg}. {advice}", err.failed) from err
                raise
            msg = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
            raise SolverError(
                f"backend {self.backend.name!r} failed: {type(err).__name__}: {msg}"
                + (f". {advice}" if advice else "")
            ) from err
        out = tuple(o.to(dtype=dtype, device=device) for o in out)
        if not needs_grad:  # moreau's outputs carry a graph even then
            out = tuple(o.detach() for o in out)
        return out

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
            if ctx.reduced_A.problem_data_index is None:  # no constraints at all
                self.rows, self.n = 0, int(ctx.q.shape[0]) - 1
                self.A_flat = torch.zeros(0, dtype=torch.long)
            else:
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
                    advise=False,  # the layer advises on its own parameters
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
            # keep the graph: autograd may call backward again through one forward
            # (gradcheck, jacobian, retain_graph=True); it is freed with ``state``
            grads = torch.autograd.grad(
                outs, inputs, grads_out, allow_unused=True, retain_graph=True
            )
            it = iter(grads)
            full = [next(it) if t is not None else None for t in leaves]
            full = [
                torch.zeros_like(t) if g is None and t is not None else g
                for g, t in zip(full, leaves)
            ]
            return full[0], full[1], full[2]

    return QPSolverInterface()
