"""Total-variation denoising as a differentiable layer (OptNet's denoising experiment).

    x*(y; D, lam) = argmin_x  1/2 ||x - y||^2 + lam ||D x||_1

``y`` is a batch of noisy signals ``(B, n)``, ``D`` an ``(m, n)`` operator (first differences for
classical TV, or learned) and ``lam > 0`` the regularization weight. The 2-D form
(:func:`tv_denoise_2d`) uses anisotropic TV on images: ``D`` stacks the horizontal and vertical
differences of an ``H x W`` grid.

Public API
----------
* :func:`tv_denoise` / :class:`TVDenoise` -- 1-D signals with a fixed or learnable ``D`` and
  ``lam`` (``lam`` is kept positive through a log parameterization).
* :func:`tv_denoise_2d` / :class:`TVDenoise2d` -- images, anisotropic TV, learnable ``lam``.
* :func:`tv_error_bound` -- a certified bound on ``||x - x*||_2 / sqrt(n)`` for any candidate
  ``x`` (from any backend); every backend's answer is checked with it before it is used.
* :func:`difference_matrix`, :func:`grid_difference_matrix` -- the classical operators.

Backends (``backend=``)
-----------------------
==================  ===========================================================================
name                what it is
==================  ===========================================================================
native (default)    our batched interior point on the dual box QP, then an exact active-set
                    polish; gradients from the closed form on the active set (custom backward:
                    one extra triangular solve pair)
torch-ipm, moreau,  cvxpylayers on the DPP statement ``1/2||x - y||^2 + ||E x||_1`` with
diffcp-clarabel,    ``E = lam D`` formed in torch (solver settings: :mod:`layers.backends`); the
diffcp-scs,         2-D form keeps ``D`` a constant and ``lam`` a parameter
diffcp-ecos
qp                  OptNet's QP form over ``[x; t]``: ``1/2||x - y||^2 + lam 1't (+ eps/2
                    ||t||^2)`` with ``-t <= D x <= t``, through :func:`layers.qp.qp`
                    (``qp_backend=`` picks its backend, ``qp_eps=`` the ``eps``, 1e-8)
qpth                the same QP form through qpth, as in OptNet's code
==================  ===========================================================================

Every backend's answer is certified before it is returned: a dual certificate bounds the RMS
distance to the exact solution (:func:`tv_error_bound`). The ``native`` solver (dual interior
point, active-set polish, closed-form gradients) and the certificate are :mod:`layers.tv_native`.
The CVXPY statements are built once per shape and backend (:func:`_cvxpy_layer_1d`,
:func:`_cvxpy_layer_2d`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from layers._checks import check_positive, check_tensor, empty_outputs
from layers.backends import BACKENDS, check_settings
from layers.cvxpy_layer import CvxpyProblemLayer
from layers.qp import qp
from layers.tv_native import (
    NATIVE_CHECK_TOL,
    TVInfo,
    certify,
    raise_if_inaccurate,
    solve_native,
)

__all__ = [
    "TV_BACKENDS",
    "TVDenoise",
    "TVDenoise2d",
    "TVInfo",
    "difference_matrix",
    "grid_difference_matrix",
    "tv_denoise",
    "tv_denoise_2d",
    "tv_error_bound",
]

TV_BACKENDS: tuple[str, ...] = ("native", *(b for b in BACKENDS if b != "qpth"), "qp", "qpth")

# Default tolerance on the certified RMS error of the non-native backends, relative to
# 1 + max|y| per signal (the native one's is NATIVE_CHECK_TOL).
EXTERNAL_CHECK_TOL = 1e-3


# ----------------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------------


def difference_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """First differences ``(n-1, n)``: ``(D x)_i = x_i - x_{i+1}`` (OptNet's ``D``); for
    ``n = 1`` the empty ``(0, 1)`` (a single value has no differences)."""
    if n < 1:
        raise ValueError(f"signals need length n >= 1, got n={n}")
    eye = torch.eye(n, dtype=dtype, device=device)
    return eye[:-1] - eye[1:]


def _grid_edges(height: int, width: int, device: torch.device | str | None = None):
    idx = torch.arange(height * width, device=device).reshape(height, width)
    src = torch.cat([idx[:, :-1].reshape(-1), idx[:-1, :].reshape(-1)])
    dst = torch.cat([idx[:, 1:].reshape(-1), idx[1:, :].reshape(-1)])
    return src, dst


def grid_difference_matrix(
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Anisotropic TV operator of an ``height x width`` image flattened row-major:
    ``(height (width-1) + (height-1) width, height width)``, horizontal differences first
    (``(0, 1)`` for a single pixel)."""
    if height < 1 or width < 1:
        raise ValueError(f"images need at least 1 pixel, got {height}x{width}")
    src, dst = _grid_edges(height, width, device)
    D = torch.zeros(len(src), height * width, dtype=dtype, device=device)
    rows = torch.arange(len(src), device=device)
    D[rows, src] = 1.0
    D[rows, dst] = -1.0
    return D


# ----------------------------------------------------------------------------------------------
# Input handling and the other backends
# ----------------------------------------------------------------------------------------------


def _prepare(y: Tensor, D: Tensor, lam: float | Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Validate and broadcast to float64 ``y (B, n)``, ``D (1|B, m, n)``, ``lam (B,)``; ``B``
    may be 0 (an empty batch), ``n`` may not."""
    check_tensor("y", y, dims=(1, 2), expected="(n,) or (B, n)")
    unbatched = y.dim() == 1
    y2 = y.unsqueeze(0) if unbatched else y
    B, n = y2.shape
    if n == 0:
        raise ValueError(
            f"y has shape {tuple(y.shape)}: TV denoising needs at least one value per signal "
            "(n >= 1)"
        )
    check_tensor("D", D, dims=(2, 3), expected=f"(m, {n}) or (B, m, {n})")
    if D.shape[-1] != n:
        raise ValueError(
            f"D has {D.shape[-1]} columns but the signals have length {n}; D must be (m, {n})"
        )
    D3 = D.unsqueeze(0) if D.dim() == 2 else D
    if D3.shape[0] not in (1, B):
        raise ValueError(f"D has batch size {D3.shape[0]} but y has {B}")
    if not isinstance(lam, Tensor):
        if not isinstance(lam, (int, float)):
            raise TypeError(f"lam must be a float or a tensor, got {type(lam).__name__}")
        lam = torch.tensor(float(lam))
    check_positive("lam", lam)
    if lam.numel() not in (1, B) or lam.dim() > 1:
        raise ValueError(f"lam must be a scalar or have shape ({B},), got {tuple(lam.shape)}")
    f64 = torch.float64
    lam1 = lam.to(dtype=f64, device=y.device).reshape(-1).expand(B)
    return y2.to(f64), D3.to(dtype=f64, device=y.device), lam1, unbatched


@lru_cache(maxsize=32)
def _cvxpy_layer_1d(n: int, m: int, backend: str, settings: str) -> CvxpyProblemLayer:
    """``1/2||x - y||^2 + ||E x||_1`` with parameters ``y (n)`` and ``E = lam D (m, n)``."""
    import cvxpy as cp

    y, E, x = cp.Parameter(n), cp.Parameter((m, n)), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y) + cp.norm1(E @ x)))
    return CvxpyProblemLayer(prob, [y, E], [x], backend, settings=settings)


@lru_cache(maxsize=8)
def _cvxpy_layer_2d(height: int, width: int, backend: str, settings: str) -> CvxpyProblemLayer:
    """Anisotropic TV with a constant sparse ``D``; parameters ``y (H W)`` and ``lam >= 0``."""
    import cvxpy as cp
    import numpy as np
    import scipy.sparse as sp

    src, dst = (t.numpy() for t in _grid_edges(height, width))
    m, n = len(src), height * width
    rows = np.concatenate([np.arange(m), np.arange(m)])
    Dsp = sp.csr_matrix((np.r_[np.ones(m), -np.ones(m)], (rows, np.r_[src, dst])), shape=(m, n))
    y, lam, x = cp.Parameter(n), cp.Parameter(nonneg=True), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y) + lam * cp.norm1(Dsp @ x)))
    return CvxpyProblemLayer(prob, [y, lam], [x], backend, settings=settings)


def _solve_qp_form(y: Tensor, D: Tensor, lam: Tensor, qp_backend: str | None, eps: float) -> Tensor:
    """OptNet's QP over ``[x; t]``: ``1/2 x'x - y'x + lam 1't + eps/2 ||t||^2`` subject to
    ``D x - t <= 0`` and ``-D x - t <= 0``; returns ``x``."""
    B, n = y.shape
    m = D.shape[-2]
    f64 = y.dtype
    Q = torch.diag(torch.cat([torch.ones(n, dtype=f64), torch.full((m,), eps, dtype=f64)]))
    Q = Q.to(y.device).unsqueeze(0).expand(B, -1, -1)
    q = torch.cat([-y, lam.unsqueeze(-1).expand(B, m)], dim=-1)
    eye = torch.eye(m, dtype=f64, device=y.device).expand(D.shape[0], m, m)
    G = torch.cat([torch.cat([D, -eye], -1), torch.cat([-D, -eye], -1)], -2)
    G = G.expand(B, 2 * m, n + m)
    h = y.new_zeros(B, 2 * m)
    kwargs: dict[str, Any] = {} if qp_backend is None else {"backend": qp_backend}
    out = qp(Q, q, G, h, None, None, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return out[..., :n]


def _solve(
    y: Tensor,
    D: Tensor,
    lam: Tensor,
    backend: str,
    *,
    settings: str,
    check_tol: float | None,
    grid: tuple[int, int] | None = None,
    qp_backend: str | None = None,
    qp_eps: float = 1e-8,
    **native_args: Any,
) -> tuple[Tensor, TVInfo]:
    """Dispatch on ``backend``; every answer is certified before it is returned."""
    if D.shape[-2] == 0:  # no differences (a single value or pixel): the solution is y
        if backend not in TV_BACKENDS:
            raise ValueError(
                f"unknown TV backend {backend!r}; choose one of {', '.join(TV_BACKENDS)}"
            )
        return y.clone(), TVInfo(backend, 0, 0, y.new_zeros(y.shape[0]))
    if backend == "native":
        tol = NATIVE_CHECK_TOL if check_tol is None else check_tol
        edges = None if grid is None else _grid_edges(*grid, device=y.device)
        return solve_native(y, D, lam, check_tol=tol, edges=edges, **native_args)
    if native_args:
        raise TypeError(f"options {sorted(native_args)} apply to backend 'native' only")
    name = backend
    if backend == "qpth":  # OptNet's own path: the [x; t] QP through qpth (Q must be PD)
        backend, qp_backend, qp_eps = "qp", "qpth", max(qp_eps, 1e-8)
    if backend in BACKENDS:
        if grid is None:
            layer = _cvxpy_layer_1d(y.shape[-1], D.shape[-2], backend, settings)
            E = lam.reshape(-1, 1, 1) * D  # (B, m, n): batched even for a shared D
            E = E[0] if bool((lam == lam[0]).all()) and D.shape[0] == 1 else E
            (x,) = layer(y, E)
        else:
            layer = _cvxpy_layer_2d(*grid, backend, settings)
            (x,) = layer(y, lam)
        x = x.to(torch.float64)
    elif backend == "qp":
        x = _solve_qp_form(y, D, lam, qp_backend, qp_eps)
    else:
        raise ValueError(f"unknown TV backend {backend!r}; choose one of {', '.join(TV_BACKENDS)}")
    bound = certify(x.detach(), y.detach(), D.detach(), lam.detach())
    info = TVInfo(name, 0, 0, bound)
    raise_if_inaccurate(info, y.detach(), EXTERNAL_CHECK_TOL if check_tol is None else check_tol)
    return x, info


# ----------------------------------------------------------------------------------------------
# Public functions and modules
# ----------------------------------------------------------------------------------------------


def tv_denoise(
    y: Tensor,
    D: Tensor,
    lam: float | Tensor,
    *,
    backend: str = "native",
    settings: str = "accurate",
    check_tol: float | None = None,
    return_info: bool = False,
    qp_backend: str | None = None,
    qp_eps: float = 1e-8,
    **native_args: Any,
) -> Tensor | tuple[Tensor, TVInfo]:
    """Solve ``argmin_x 1/2||x - y||^2 + lam ||D x||_1`` for a batch, differentiably.

    Args:
        y: noisy signals ``(B, n)`` or ``(n,)``.
        D: operator ``(m, n)`` (shared) or ``(B, m, n)``; e.g. :func:`difference_matrix`.
        lam: ``> 0``, a float, a scalar tensor or ``(B,)``.
        backend: one of :data:`TV_BACKENDS` (``native`` is ours; see the module docstring).
        settings: cvxpylayers backends only: ``"accurate"`` (the backend's ``accurate``
            settings in :data:`~layers.backends.BACKENDS`) or ``"defaults"`` (the solver's own).
        check_tol: certified RMS error allowed, relative to ``1 + max|y|`` per signal
            (default ``1e-7`` for ``native``, ``1e-3`` for the others); beyond it
            :class:`SolverError` names the batch elements.
        return_info: also return a :class:`TVInfo`.
        qp_backend: backend of :func:`layers.qp.qp` when ``backend='qp'`` (its default if None).
        qp_eps: weight of ``eps/2 ||t||^2`` in the QP form (``qp``, ``qpth``).
        native_args: ``tol`` (interior-point tolerance, 1e-10), ``max_iter`` (100),
            ``polish_rounds`` (6).

    Returns:
        ``x`` with the shape, dtype and device of ``y`` (and the info when asked).
    """
    check_settings(settings)
    yb, Db, lb, unbatched = _prepare(y, D, lam)
    if yb.shape[0] == 0:  # an empty batch: nothing to solve
        return _empty_result(backend, [y, D, lam], tuple(y.shape), y, return_info)
    x, info = _solve(
        yb,
        Db,
        lb,
        backend,
        settings=settings,
        check_tol=check_tol,
        qp_backend=qp_backend,
        qp_eps=qp_eps,
        **native_args,
    )
    x = x.to(dtype=y.dtype, device=y.device)
    x = x.squeeze(0) if unbatched else x
    return (x, info) if return_info else x


def _empty_result(
    backend: str,
    inputs: list[Any],
    shape: tuple[int, ...],
    ref: Tensor,
    return_info: bool,
) -> Tensor | tuple[Tensor, TVInfo]:
    """The answer for an empty batch: an empty ``shape`` tensor in ``ref``'s dtype and device
    (backward gives the inputs zero gradients) and, if asked, an info with no elements."""
    if backend not in TV_BACKENDS:
        raise ValueError(f"unknown TV backend {backend!r}; choose one of {', '.join(TV_BACKENDS)}")
    tensors = [t for t in inputs if isinstance(t, Tensor)]
    (x,) = empty_outputs(tensors, [shape], ref.dtype, ref.device)
    info = TVInfo(backend, 0, 0, torch.zeros(0, dtype=torch.float64, device=ref.device))
    return (x, info) if return_info else x


@lru_cache(maxsize=8)
def _grid_D(height: int, width: int) -> Tensor:
    return grid_difference_matrix(height, width, dtype=torch.float64)


def tv_denoise_2d(
    images: Tensor,
    lam: float | Tensor,
    *,
    backend: str = "native",
    settings: str = "accurate",
    check_tol: float | None = None,
    return_info: bool = False,
    **native_args: Any,
) -> Tensor | tuple[Tensor, TVInfo]:
    """Anisotropic TV denoising of images:
    ``argmin_X 1/2||X - Y||_F^2 + lam (sum |X[i, j] - X[i, j+1]| + sum |X[i, j] - X[i+1, j]|)``.

    Args:
        images: ``(B, H, W)`` or ``(H, W)``.
        lam: ``> 0``, a float, a scalar tensor or ``(B,)``.
        backend: ``native``, a cvxpylayers backend, or ``qp``.
        Other arguments as in :func:`tv_denoise`.

    Returns:
        The denoised images, shape, dtype and device of ``images``.
    """
    check_settings(settings)
    check_tensor("images", images, dims=(2, 3), expected="(H, W) or (B, H, W)")
    unbatched = images.dim() == 2
    imgs = images.unsqueeze(0) if unbatched else images
    B, H, W = imgs.shape
    if H * W == 0:
        raise ValueError(
            f"images has shape {tuple(images.shape)}: TV denoising needs at least one pixel"
        )
    D = _grid_D(H, W).to(images.device)
    yb, Db, lb, _ = _prepare(imgs.reshape(B, H * W), D, lam)
    if B == 0:  # an empty batch: nothing to solve
        return _empty_result(backend, [images, lam], tuple(images.shape), images, return_info)
    x, info = _solve(
        yb, Db, lb, backend, settings=settings, check_tol=check_tol, grid=(H, W), **native_args
    )
    x = x.reshape(B, H, W).to(dtype=images.dtype, device=images.device)
    x = x.squeeze(0) if unbatched else x
    return (x, info) if return_info else x


@torch.no_grad()
def tv_error_bound(x: Tensor, y: Tensor, D: Tensor, lam: float | Tensor) -> Tensor:
    """Certified bound on the RMS error ``||x - x*||_2 / sqrt(n)`` of candidate solutions.

    Args:
        x, y: ``(B, n)`` or ``(n,)``; ``D`` and ``lam`` as in :func:`tv_denoise`.

    Returns:
        ``(B,)`` (or a scalar for unbatched input), float64. Valid for any ``x``: it is
        ``sqrt(2 gap / n)`` for a dual point built from ``x``'s active set.
    """
    yb, Db, lb, unbatched = _prepare(y, D, lam)
    check_tensor("x", x)
    if x.shape != y.shape:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected y's {tuple(y.shape)}")
    xb = x.reshape(yb.shape).to(torch.float64)
    out = certify(xb, yb, Db, lb)
    return out[0] if unbatched else out


def _inv_log(lam: float) -> float:
    check_positive("lam", lam)
    return math.log(lam)


class TVDenoise(nn.Module):
    """TV denoising layer with a learnable operator ``D`` and weight ``lam`` (OptNet's
    denoising model): ``(B, n)`` or ``(n,)`` noisy signals -> denoised signals, same shape.

    Args:
        n: signal length.
        D: ``'diff'`` (first differences, ``(n-1, n)``), ``'random'`` (``0.3 N(0, 1)`` entries,
            OptNet's pure-learning start) or an ``(m, n)`` tensor.
        lam: initial ``lam > 0`` (stored as ``log lam``, so it stays positive).
        learn_D, learn_lam: make them parameters (else buffers).
        m: rows of a ``'random'`` ``D`` (default ``n - 1``).
        backend: see :data:`TV_BACKENDS`.
        generator: for the ``'random'`` initialisation.
        solver_args: passed to :func:`tv_denoise` on every call (e.g. ``check_tol``).
    """

    def __init__(
        self,
        n: int,
        D: str | Tensor = "diff",
        lam: float = 1.0,
        *,
        learn_D: bool = True,
        learn_lam: bool = True,
        m: int | None = None,
        backend: str = "native",
        generator: torch.Generator | None = None,
        **solver_args: Any,
    ):
        super().__init__()
        if backend not in TV_BACKENDS:
            raise ValueError(
                f"unknown TV backend {backend!r}; choose one of {', '.join(TV_BACKENDS)}"
            )
        if isinstance(D, str):
            if D == "diff":
                D0 = difference_matrix(n)
            elif D == "random":
                D0 = 0.3 * torch.randn(m or n - 1, n, generator=generator)
            else:
                raise ValueError(f"D must be 'diff', 'random' or a tensor, got {D!r}")
        else:
            check_tensor("D", D, min_dim=2)
            if D.dim() != 2 or D.shape[1] != n:
                raise ValueError(f"D must have shape (m, {n}), got {tuple(D.shape)}")
            D0 = D.detach().clone().float()
        log_lam = torch.tensor(_inv_log(float(lam)))
        if learn_D:
            self.D = nn.Parameter(D0)
        else:
            self.register_buffer("D", D0)
        if learn_lam:
            self.log_lam = nn.Parameter(log_lam)
        else:
            self.register_buffer("log_lam", log_lam)
        self.n, self.backend, self.solver_args = n, backend, solver_args
        self.last_info: TVInfo | None = None

    @property
    def lam(self) -> Tensor:
        """The current ``lam`` (a positive scalar tensor)."""
        return self.log_lam.exp()

    def forward(self, y: Tensor) -> Tensor:
        if y.dim() == 0 or y.shape[-1] != self.n:
            raise ValueError(f"expected signals of length {self.n}, got shape {tuple(y.shape)}")
        x, self.last_info = tv_denoise(
            y, self.D, self.lam, backend=self.backend, return_info=True, **self.solver_args
        )
        return x

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, m={self.D.shape[0]}, lam={self.lam.item():.4g}, backend={self.backend!r}"
        )


class TVDenoise2d(nn.Module):
    """Anisotropic 2-D TV denoising with a learnable ``lam``: ``(B, H, W)`` or ``(H, W)`` ->
    same shape.

    Args:
        lam: initial ``lam > 0`` (stored as ``log lam``).
        learn_lam: make it a parameter.
        backend: see :data:`TV_BACKENDS`.
        solver_args: passed to :func:`tv_denoise_2d`.
    """

    def __init__(
        self,
        lam: float = 1.0,
        *,
        learn_lam: bool = True,
        backend: str = "native",
        **solver_args: Any,
    ):
        super().__init__()
        if backend not in TV_BACKENDS:
            raise ValueError(
                f"unknown TV backend {backend!r}; choose one of {', '.join(TV_BACKENDS)}"
            )
        log_lam = torch.tensor(_inv_log(float(lam)))
        if learn_lam:
            self.log_lam = nn.Parameter(log_lam)
        else:
            self.register_buffer("log_lam", log_lam)
        self.backend, self.solver_args = backend, solver_args
        self.last_info: TVInfo | None = None

    @property
    def lam(self) -> Tensor:
        return self.log_lam.exp()

    def forward(self, images: Tensor) -> Tensor:
        x, self.last_info = tv_denoise_2d(
            images, self.lam, backend=self.backend, return_info=True, **self.solver_args
        )
        return x
