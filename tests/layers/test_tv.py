"""layers/tv.py: agreement with direct CVXPY solves, exact gradients, the certificate, errors."""

from __future__ import annotations

import importlib.util

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from layers import SolverError
from layers.tv import (
    TV_BACKENDS,
    TVDenoise,
    TVDenoise2d,
    difference_matrix,
    grid_difference_matrix,
    tv_denoise,
    tv_denoise_2d,
    tv_error_bound,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _signals(B: int, n: int, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant signals plus noise, float64."""
    g = _gen(seed)
    clean = torch.repeat_interleave(
        torch.randint(0, 10, (B, 4), generator=g).double(), n // 4 + 1, dim=1
    )[:, :n]
    return clean + 0.8 * torch.randn(B, n, generator=g, dtype=F64)


def _cvxpy_tv(y: np.ndarray, D: np.ndarray, lam: float) -> np.ndarray:
    """Reference: a direct, tight Clarabel solve of the same problem (QP objective)."""
    x = cp.Variable(y.shape[0])
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y) + lam * cp.norm1(D @ x)))
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert prob.status == "optimal"
    return x.value


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("kind", ["diff", "random", "tall"])
@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_native_matches_direct_cvxpy(kind, lam):
    n, B = 12, 3
    y = _signals(B, n)
    if kind == "diff":
        D = difference_matrix(n, dtype=F64)
    elif kind == "random":
        D = torch.randn(n - 1, n, generator=_gen(1), dtype=F64)
    else:  # more rows than columns: the n x n interior-point system
        D = torch.randn(n + 5, n, generator=_gen(2), dtype=F64)
    x, info = tv_denoise(y, D, lam, return_info=True)
    for i in range(B):
        ref = _cvxpy_tv(y[i].numpy(), D.numpy(), lam)
        np.testing.assert_allclose(x[i].numpy(), ref, atol=1e-6)
    assert info.max_error_bound < 1e-6


def test_batched_D_and_lam():
    n, B = 10, 3
    y = _signals(B, n)
    D = torch.randn(B, n - 1, n, generator=_gen(3), dtype=F64)
    lam = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    x = tv_denoise(y, D, lam)
    for i in range(B):
        ref = tv_denoise(y[i], D[i], float(lam[i]))
        torch.testing.assert_close(x[i], ref, atol=1e-9, rtol=0)


def test_limits_and_shapes():
    n = 16
    y = _signals(2, n).float()
    D = difference_matrix(n)
    x = tv_denoise(y, D, 1e-6)  # lam -> 0: the input itself
    assert x.dtype == torch.float32 and x.shape == y.shape
    torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    x = tv_denoise(y, D, 1e4)  # lam large: constant signal at the mean
    torch.testing.assert_close(x, y.mean(1, keepdim=True).expand_as(y), atol=1e-4, rtol=0)
    x1 = tv_denoise(y[0], D, 1.0)  # unbatched in, unbatched out
    assert x1.shape == (n,)
    torch.testing.assert_close(x1, tv_denoise(y, D, 1.0)[0])


def test_2d_matches_direct_cvxpy():
    H, W = 5, 6
    g = _gen(4)
    img = (torch.rand(2, H, W, generator=g, dtype=F64) > 0.5).double()
    img = img + 0.3 * torch.randn(2, H, W, generator=g, dtype=F64)
    x, info = tv_denoise_2d(img, 0.25, return_info=True)
    D = grid_difference_matrix(H, W, dtype=F64)
    assert D.shape == (H * (W - 1) + (H - 1) * W, H * W)
    for i in range(2):
        ref = _cvxpy_tv(img[i].reshape(-1).numpy(), D.numpy(), 0.25)
        np.testing.assert_allclose(x[i].reshape(-1).numpy(), ref, atol=1e-6)
    assert x.shape == img.shape and info.max_error_bound < 1e-6


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["diff", "random", "batched"])
def test_gradcheck_y_D_lam(kind):
    n = 8
    y = (3 * torch.randn(3, n, generator=_gen(5), dtype=F64)).requires_grad_()
    if kind == "diff":
        D = difference_matrix(n, dtype=F64) + 0.05 * torch.randn(
            n - 1, n, generator=_gen(6), dtype=F64
        )
    elif kind == "random":
        D = torch.randn(n - 1, n, generator=_gen(7), dtype=F64)
    else:
        D = torch.randn(3, n + 2, n, generator=_gen(8), dtype=F64)
    D.requires_grad_()
    lam = torch.tensor([0.7, 1.3, 2.0], dtype=F64, requires_grad=True)
    x = tv_denoise(y, D, lam)
    Dx = (D @ x.unsqueeze(-1)).squeeze(-1) if D.dim() == 3 else x @ D.mT
    assert (Dx.abs() < 1e-8).any(), "the test should exercise a nonempty active set"
    fast = kind != "diff"  # random projections for the larger D's keep this test short
    assert gradcheck(
        lambda y, D, lam: tv_denoise(y, D, lam), (y, D, lam), eps=1e-6, atol=1e-6, fast_mode=fast
    )


def test_gradcheck_2d():
    img = torch.randn(2, 3, 4, generator=_gen(9), dtype=F64).requires_grad_()
    lam = torch.tensor(0.4, dtype=F64, requires_grad=True)
    assert gradcheck(lambda a, b: tv_denoise_2d(a, b), (img, lam), eps=1e-6, atol=1e-6)


def test_module_learns():
    n = 20
    layer = TVDenoise(n, "diff", lam=2.0)
    assert torch.equal(layer.D, difference_matrix(n)) and abs(layer.lam.item() - 2.0) < 1e-6
    y = _signals(4, n).float()
    x = layer(y)
    x.pow(2).mean().backward()
    assert layer.D.grad is not None and layer.log_lam.grad is not None
    assert layer.last_info is not None and layer.last_info.backend == "native"
    fixed = TVDenoise(n, "random", lam=1.0, learn_D=False, learn_lam=False, generator=_gen(0))
    assert list(fixed.parameters()) == [] and fixed.D.shape == (n - 1, n)
    again = TVDenoise(n, "random", generator=_gen(0))
    assert torch.equal(again.D.detach(), fixed.D)
    layer2d = TVDenoise2d(0.5)
    out = layer2d(torch.randn(2, 4, 4))
    out.sum().backward()
    assert out.shape == (2, 4, 4) and layer2d.log_lam.grad is not None


# ----------------------------------------------------------------------------- certificate
def test_error_bound_is_an_upper_bound():
    n = 30
    y = _signals(4, n, seed=11)
    D = difference_matrix(n, dtype=F64)
    x = tv_denoise(y, D, 1.5)
    assert (tv_error_bound(x, y, D, 1.5) < 1e-6).all()
    for scale in (1e-6, 1e-3, 1e-1):
        xp = x + scale * torch.randn(x.shape, generator=_gen(12), dtype=F64)
        true = (xp - x).norm(dim=1) / n**0.5
        bound = tv_error_bound(xp, y, D, 1.5)
        assert (bound >= true * (1 - 1e-9)).all()
        assert (bound <= 100 * true + 1e-6).all()  # and not uselessly loose


def test_inaccurate_solves_raise_with_the_elements():
    y = _signals(3, 40, seed=13)
    with pytest.raises(SolverError, match="fail the optimality check") as err:
        tv_denoise(y, difference_matrix(40, dtype=F64), 1.0, max_iter=1, polish_rounds=0)
    assert err.value.failed and set(err.value.failed) <= {0, 1, 2}


# ----------------------------------------------------------------------------- other backends
@pytest.mark.parametrize("backend", ["diffcp-clarabel", "moreau"])
def test_cvxpylayers_backends_agree(backend):
    pytest.importorskip("cvxpylayers")
    n = 10
    y = _signals(2, n, seed=14)
    D0 = difference_matrix(n, dtype=F64) + 0.1 * torch.randn(
        n - 1, n, generator=_gen(15), dtype=F64
    )
    grads = {}
    for b in ("native", backend):
        D = D0.clone().requires_grad_()
        lam = torch.tensor(0.8, dtype=F64, requires_grad=True)
        x, info = tv_denoise(y, D, lam, backend=b, return_info=True)
        (x * torch.arange(n, dtype=F64)).sum().backward()
        grads[b] = (x.detach(), D.grad, lam.grad)
        assert info.backend == b and info.max_error_bound < 1e-2
    (xn, gDn, gln), (xo, gDo, glo) = grads["native"], grads[backend]
    torch.testing.assert_close(xo, xn, atol=1e-3, rtol=0)
    assert (gDo - gDn).norm() <= 0.05 * gDn.norm()
    assert abs(glo - gln) <= 0.05 * abs(gln)


@pytest.mark.parametrize("backend", ["qp", "qpth"])
def test_qp_form_backends(backend):
    """OptNet's [x; t] QP form, through layers.qp (our interior point) or qpth."""
    if importlib.util.find_spec("layers.qp") is None:
        pytest.skip("layers.qp is not in this checkout")
    if backend == "qpth":
        pytest.importorskip("qpth", reason="optional peer: pip install --no-deps qpth==0.0.18")
    n = 10
    y = _signals(2, n, seed=16)
    D = difference_matrix(n, dtype=F64).requires_grad_()
    x, info = tv_denoise(y, D, 0.8, backend=backend, return_info=True)
    x.sum().backward()
    assert info.backend == backend
    torch.testing.assert_close(x.detach(), tv_denoise(y, D.detach(), 0.8), atol=1e-4, rtol=0)
    assert D.grad is not None and torch.isfinite(D.grad).all()


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "exc", "needle"),
    [
        (lambda y, D: tv_denoise(y, D, 0.0), ValueError, "lam must be > 0"),
        (lambda y, D: tv_denoise(y, D, -1.0), ValueError, "lam must be > 0"),
        (lambda y, D: tv_denoise(y, D, float("nan")), ValueError, "lam must be > 0"),
        (
            lambda y, D: tv_denoise(
                y.clone().index_fill_(1, torch.tensor([3]), float("nan")), D, 1
            ),
            ValueError,
            "NaN",
        ),
        (lambda y, D: tv_denoise(y[:, :-1], D, 1.0), ValueError, "columns but the signals"),
        (lambda y, D: tv_denoise(y, D, torch.ones(5)), ValueError, "lam must be a scalar"),
        (lambda y, D: tv_denoise(y, D.expand(4, -1, -1), 1.0), ValueError, "batch size"),
        (lambda y, D: tv_denoise(y, D, 1.0, backend="cplex"), ValueError, "native"),
        (lambda y, D: tv_denoise(y.long(), D, 1.0), TypeError, "floating-point"),
        (lambda y, D: TVDenoise(8)(y), ValueError, "length 8"),
        (lambda y, D: TVDenoise(12, lam=0.0), ValueError, "lam must be > 0"),
        (lambda y, D: TVDenoise(12, "ones"), ValueError, "'diff', 'random'"),
        (lambda y, D: TVDenoise(12, backend="x"), ValueError, "choose one of"),
        (lambda y, D: tv_denoise_2d(torch.ones(2, 3, 4, 5), 1.0), ValueError, "(B, H, W)"),
    ],
)
def test_clear_errors(call, exc, needle):
    y = _signals(3, 12)
    D = difference_matrix(12, dtype=F64)
    with pytest.raises(exc, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call(y, D)


def test_backend_table():
    assert TV_BACKENDS[0] == "native" and "qp" in TV_BACKENDS and "moreau" in TV_BACKENDS
