"""layers/tv_native.py: the native TV solver (dual interior point, active-set polish, closed
form) against direct CVXPY solves, its exact gradients, and the certificate."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from layers import SolverError
from layers.tv import (
    difference_matrix,
    grid_difference_matrix,
    tv_denoise,
    tv_denoise_2d,
    tv_error_bound,
)
from tests.layers.references import gen, signals

F64 = torch.float64


def _cvxpy_tv(y: np.ndarray, D: np.ndarray, lam: float) -> np.ndarray:
    """Reference: a direct, tight Clarabel solve of the same problem (QP objective)."""
    x = cp.Variable(y.shape[0])
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y) + lam * cp.norm1(D @ x)))
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert prob.status == "optimal"
    return x.value


@pytest.mark.parametrize("kind", ["diff", "random", "tall"])
@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_native_matches_direct_cvxpy(kind, lam):
    n, B = 12, 3
    y = signals(B, n)
    if kind == "diff":
        D = difference_matrix(n, dtype=F64)
    elif kind == "random":
        D = torch.randn(n - 1, n, generator=gen(1), dtype=F64)
    else:  # more rows than columns: the n x n interior-point system
        D = torch.randn(n + 5, n, generator=gen(2), dtype=F64)
    x, info = tv_denoise(y, D, lam, return_info=True)
    for i in range(B):
        ref = _cvxpy_tv(y[i].numpy(), D.numpy(), lam)
        np.testing.assert_allclose(x[i].numpy(), ref, atol=1e-6)
    assert info.max_error_bound < 1e-6


def test_batched_D_and_lam():
    n, B = 10, 3
    y = signals(B, n)
    D = torch.randn(B, n - 1, n, generator=gen(3), dtype=F64)
    lam = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    x = tv_denoise(y, D, lam)
    for i in range(B):
        ref = tv_denoise(y[i], D[i], float(lam[i]))
        torch.testing.assert_close(x[i], ref, atol=1e-9, rtol=0)


def test_2d_matches_direct_cvxpy():
    H, W = 5, 6
    g = gen(4)
    img = (torch.rand(2, H, W, generator=g, dtype=F64) > 0.5).double()
    img = img + 0.3 * torch.randn(2, H, W, generator=g, dtype=F64)
    x, info = tv_denoise_2d(img, 0.25, return_info=True)
    D = grid_difference_matrix(H, W, dtype=F64)
    assert D.shape == (H * (W - 1) + (H - 1) * W, H * W)
    for i in range(2):
        ref = _cvxpy_tv(img[i].reshape(-1).numpy(), D.numpy(), 0.25)
        np.testing.assert_allclose(x[i].reshape(-1).numpy(), ref, atol=1e-6)
    assert x.shape == img.shape and info.max_error_bound < 1e-6


@pytest.mark.parametrize("kind", ["diff", "random", "batched"])
def test_gradcheck_y_D_lam(kind):
    n = 8
    y = (3 * torch.randn(3, n, generator=gen(5), dtype=F64)).requires_grad_()
    if kind == "diff":
        D = difference_matrix(n, dtype=F64) + 0.05 * torch.randn(
            n - 1, n, generator=gen(6), dtype=F64
        )
    elif kind == "random":
        D = torch.randn(n - 1, n, generator=gen(7), dtype=F64)
    else:
        D = torch.randn(3, n + 2, n, generator=gen(8), dtype=F64)
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
    img = torch.randn(2, 3, 4, generator=gen(9), dtype=F64).requires_grad_()
    lam = torch.tensor(0.4, dtype=F64, requires_grad=True)
    assert gradcheck(lambda a, b: tv_denoise_2d(a, b), (img, lam), eps=1e-6, atol=1e-6)


def test_error_bound_is_an_upper_bound():
    n = 30
    y = signals(4, n, seed=11)
    D = difference_matrix(n, dtype=F64)
    x = tv_denoise(y, D, 1.5)
    assert (tv_error_bound(x, y, D, 1.5) < 1e-6).all()
    for scale in (1e-6, 1e-3, 1e-1):
        xp = x + scale * torch.randn(x.shape, generator=gen(12), dtype=F64)
        true = (xp - x).norm(dim=1) / n**0.5
        bound = tv_error_bound(xp, y, D, 1.5)
        assert (bound >= true * (1 - 1e-9)).all()
        assert (bound <= 100 * true + 1e-6).all()  # and not uselessly loose


def test_inaccurate_solves_raise_with_the_elements():
    y = signals(3, 40, seed=13)
    with pytest.raises(SolverError, match="fail the optimality check") as err:
        tv_denoise(y, difference_matrix(40, dtype=F64), 1.0, max_iter=1, polish_rounds=0)
    assert err.value.failed and set(err.value.failed) <= {0, 1, 2}
