"""layers/tv.py: the TV layers (shapes, limits, modules), the other backends, the errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from layers.tv import (
    TV_BACKENDS,
    TVDenoise,
    TVDenoise2d,
    difference_matrix,
    tv_denoise,
    tv_denoise_2d,
)
from tests.layers.references import gen, signals

F64 = torch.float64


# ----------------------------------------------------------------------------- forward


def test_limits_and_shapes():
    n = 16
    y = signals(2, n).float()
    D = difference_matrix(n)
    x = tv_denoise(y, D, 1e-6)  # lam -> 0: the input itself
    assert x.dtype == torch.float32 and x.shape == y.shape
    torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    x = tv_denoise(y, D, 1e4)  # lam large: constant signal at the mean
    torch.testing.assert_close(x, y.mean(1, keepdim=True).expand_as(y), atol=1e-4, rtol=0)
    x1 = tv_denoise(y[0], D, 1.0)  # unbatched in, unbatched out
    assert x1.shape == (n,)
    torch.testing.assert_close(x1, tv_denoise(y, D, 1.0)[0])


# ----------------------------------------------------------------------------- modules


def test_module_learns():
    n = 20
    layer = TVDenoise(n, "diff", lam=2.0)
    assert torch.equal(layer.D, difference_matrix(n)) and abs(layer.lam.item() - 2.0) < 1e-6
    y = signals(4, n).float()
    x = layer(y)
    x.pow(2).mean().backward()
    assert layer.D.grad is not None and layer.log_lam.grad is not None
    assert layer.last_info is not None and layer.last_info.backend == "native"
    fixed = TVDenoise(n, "random", lam=1.0, learn_D=False, learn_lam=False, generator=gen(0))
    assert list(fixed.parameters()) == [] and fixed.D.shape == (n - 1, n)
    again = TVDenoise(n, "random", generator=gen(0))
    assert torch.equal(again.D.detach(), fixed.D)
    layer2d = TVDenoise2d(0.5)
    out = layer2d(torch.randn(2, 4, 4))
    out.sum().backward()
    assert out.shape == (2, 4, 4) and layer2d.log_lam.grad is not None


# ----------------------------------------------------------------------------- other backends
@pytest.mark.parametrize("backend", ["diffcp-clarabel", "moreau"])
def test_cvxpylayers_backends_agree(backend):
    pytest.importorskip("cvxpylayers")
    n = 10
    y = signals(2, n, seed=14)
    D0 = difference_matrix(n, dtype=F64) + 0.1 * torch.randn(n - 1, n, generator=gen(15), dtype=F64)
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
    y = signals(2, n, seed=16)
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
    y = signals(3, 12)
    D = difference_matrix(12, dtype=F64)
    with pytest.raises(exc, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call(y, D)


def test_backend_table():
    assert TV_BACKENDS[0] == "native" and "qp" in TV_BACKENDS and "moreau" in TV_BACKENDS


def test_settings_defaults_reach_the_cvxpylayers_backends():
    """``settings="defaults"`` gives the solver its own settings (here Clarabel's); the layer
    still certifies the answer (check_tol relaxed for the loose defaults)."""
    pytest.importorskip("cvxpylayers")
    y = signals(2, 10)
    D = difference_matrix(10, dtype=F64)
    x = tv_denoise(y, D, 1.0, backend="diffcp-clarabel", settings="defaults", check_tol=1e-2)
    torch.testing.assert_close(x, tv_denoise(y, D, 1.0), atol=1e-2 * (1 + 10), rtol=0)
