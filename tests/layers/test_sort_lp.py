"""Tests for layers/sort_lp.py: the regularized-LP relaxations (soft sort / rank, top-k,
permutahedron and Birkhoff matrices) against closed forms and references, gradients, caching.

Tolerances: the LP layers go through a QP solver; with the default backend (moreau,
active set on these tiny problems) solutions are exact to ~1e-12 and gradcheck passes with
``atol=1e-6``. The diffcp backends are checked against closed-form Jacobians at ``rtol=1e-4``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import layers.sort_lp as SL
from layers import CvxpyProblemLayer
from layers.sort import LPBirkhoff, LPPermutahedron, LPTopK
from layers.sort_lp import (
    lp_birkhoff_sort,
    lp_permutahedron_sort,
    lp_topk,
    soft_rank,
    soft_sort,
)
from tests.layers.references import (
    capped_simplex,
    distinct,
    perm_matrix,
    project_permutahedron,
    topk_indicator,
)

HAS_TORCHSORT = importlib.util.find_spec("torchsort") is not None
# moreau rebuilds its batch solver (and says so) when the batch size changes between calls
pytestmark = pytest.mark.filterwarnings("ignore:Batch size has changed:UserWarning")
LP_ATOL = 1e-6  # gradcheck atol for the LP layers (solver accuracy), see module docstring


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws the same numbers, whatever runs before it."""
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# permutahedron (soft sort / rank), top-k and Birkhoff
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.05, 0.5, 3.0])
def test_soft_rank_and_sort_match_pav(eps: float) -> None:
    x = torch.randn(4, 7, dtype=torch.float64)
    n = x.shape[-1]
    rho = np.arange(n, 0, -1.0)
    rank_ref = np.stack([project_permutahedron(xi / eps, rho) for xi in x.numpy()])
    sort_ref = np.stack([-project_permutahedron(rho / eps, -xi) for xi in x.numpy()])
    np.testing.assert_allclose(soft_rank(x, eps).numpy(), rank_ref, atol=1e-5)
    np.testing.assert_allclose(soft_sort(x, eps).numpy(), sort_ref, atol=1e-5)
    desc_ref = np.stack([project_permutahedron(-xi / eps, rho) for xi in x.numpy()])
    np.testing.assert_allclose(soft_rank(x, eps, descending=True).numpy(), desc_ref, atol=1e-5)
    np.testing.assert_allclose(
        soft_sort(x, eps, descending=True).numpy(), sort_ref[:, ::-1], atol=1e-5
    )


def test_permutahedron_chain_equals_full_polytope() -> None:
    """The isotonic (dual, n - 1 constraints) QP equals the projection onto the full polytope."""
    n = 5
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, n, dtype=torch.float64, generator=g) * 3
    w = torch.randn(3, n, dtype=torch.float64, generator=g)
    c = torch.sort(w, -1, descending=True).values.cumsum(-1)
    full = SL._qp_layer("permutahedron-full", n, 0, "moreau").solve(z, c)
    # the O(n^2) formulation is degenerate (many auxiliary variables): solver accuracy ~1e-6
    torch.testing.assert_close(SL._project_permutahedron(z, w, "moreau"), full, atol=1e-5, rtol=0)


@pytest.mark.skipif(not HAS_TORCHSORT, reason="torchsort is not installed")
def test_soft_rank_matches_torchsort() -> None:
    import torchsort

    x = torch.randn(3, 8, dtype=torch.float64)
    for eps in (0.1, 1.0):
        torch.testing.assert_close(
            soft_rank(x, eps), torchsort.soft_rank(x, "l2", eps), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            soft_sort(x, eps), torchsort.soft_sort(x, "l2", eps), atol=1e-5, rtol=0
        )


def test_soft_rank_limits() -> None:
    x = distinct(3, 6)
    ranks = x.argsort(-1).argsort(-1).to(x.dtype) + 1
    torch.testing.assert_close(soft_rank(x, 1e-3), ranks, atol=1e-7, rtol=0)
    torch.testing.assert_close(soft_sort(x, 1e-3), x.sort(-1).values, atol=1e-7, rtol=0)
    torch.testing.assert_close(soft_rank(x, 1e6), torch.full_like(x, 3.5), atol=1e-4, rtol=0)
    assert torch.equal(soft_rank(x, 1.0, hard=True), ranks)
    assert torch.equal(soft_sort(x, 1.0, hard=True), x.sort(-1).values)
    assert torch.equal(soft_rank(x, 1.0, hard=True, descending=True), 7 - ranks)
    ties = torch.tensor([2.0, 1.0, 2.0])
    assert torch.equal(soft_rank(ties, 1.0, hard=True), torch.tensor([2.0, 1.0, 3.0]))


def test_soft_sort_rank_gradcheck() -> None:
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: soft_rank(v, 0.5), (x,), atol=LP_ATOL)
    assert torch.autograd.gradcheck(lambda v: soft_sort(v, 0.5), (x,), atol=LP_ATOL)


def test_lp_permutahedron_matrix() -> None:
    x = torch.randn(3, 6, dtype=torch.float64)
    P = lp_permutahedron_sort(x, 0.3)
    one = torch.ones(3, 6, dtype=x.dtype)
    torch.testing.assert_close(P.sum(-1), one)
    torch.testing.assert_close(P.sum(-2), one)
    assert P.min() > -1e-9
    m = LPPermutahedron(0.3)
    for k in (1, 3, 5):  # P_hat's first k rows give exactly the regularized top-k LP
        torch.testing.assert_close(P[..., :k, :].sum(-2), m.topk(x, k), atol=1e-8, rtol=0)
        torch.testing.assert_close(m.topk(x, k), LPTopK(0.3).topk(x, k), atol=1e-8, rtol=0)
    d = distinct(2, 6)
    torch.testing.assert_close(lp_permutahedron_sort(d, 1e-3), perm_matrix(d), atol=1e-7, rtol=0)
    xg = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: lp_permutahedron_sort(v, 0.5), (xg,), atol=LP_ATOL)
    assert torch.autograd.gradcheck(lambda v: m.topk(v, 2), (xg,), atol=LP_ATOL)


def test_lp_topk_matches_capped_simplex() -> None:
    x = torch.randn(5, 9, dtype=torch.float64)
    for eps, k in [(0.1, 1), (0.5, 3), (2.0, 8)]:
        y_ref, _ = capped_simplex((x - x.mean(-1, keepdim=True)) / eps, k)
        y = lp_topk(x, k, eps)
        torch.testing.assert_close(y, y_ref, atol=1e-7, rtol=0)
        torch.testing.assert_close(y.sum(-1), torch.full((5,), float(k), dtype=x.dtype))
    d = distinct(4, 9)
    torch.testing.assert_close(lp_topk(d, 3, 1e-3), topk_indicator(d, 3), atol=1e-7, rtol=0)
    assert torch.equal(lp_topk(d, 3, 1.0, hard=True), topk_indicator(d, 3))
    torch.testing.assert_close(lp_topk(x, 9), torch.ones_like(x))


def test_lp_topk_gradcheck() -> None:
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: lp_topk(v, 2, 0.5), (x,), atol=LP_ATOL)
    assert torch.autograd.gradcheck(lambda v: LPTopK(0.5).topk(v, 3), (x,), atol=LP_ATOL)


@pytest.mark.parametrize("backend", ["moreau", "diffcp-clarabel", "diffcp-ecos", "diffcp-scs"])
def test_lp_topk_gradient_accuracy_per_backend(backend: str) -> None:
    """Each backend's vector-Jacobian product against the closed form (accurate settings)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, dtype=torch.float64, generator=g)
    v = torch.randn(4, 8, dtype=torch.float64, generator=g)
    eps, k = 0.5, 3
    _, J = capped_simplex((x - x.mean(-1, keepdim=True)) / eps, k)
    expected = (J.transpose(-1, -2) @ v[..., None])[..., 0] / eps
    xx = x.clone().requires_grad_()
    (lp_topk(xx, k, eps, backend=backend) * v).sum().backward()
    err = ((xx.grad - expected).norm() / expected.norm()).item()
    assert err < 1e-4, f"{backend}: relative gradient error {err:.2e}"


def test_pure_lp_has_zero_gradient() -> None:
    """A pure LP's solution is a vertex, so its gradient is zero (cvxpylayers #127)."""
    import cvxpy as cp

    n, k = 6, 2
    y, z = cp.Variable(n), cp.Parameter(n)
    lp = cp.Problem(cp.Maximize(z @ y), [y >= 0, y <= 1, cp.sum(y) == k])
    layer = CvxpyProblemLayer(lp, [z], [y], backend="diffcp-clarabel")
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    (sol,) = layer(x)
    torch.testing.assert_close(sol, topk_indicator(x.detach(), k), atol=1e-6, rtol=0)
    (sol * torch.randn_like(sol)).sum().backward()
    assert x.grad.abs().max() < 1e-6
    x2 = x.detach().clone().requires_grad_()  # the regularized LP's gradient does not vanish
    (lp_topk(x2, k, 0.5) * torch.randn_like(sol)).sum().backward()
    assert x2.grad.abs().max() > 1e-2


def test_moreau_keeps_variable_bounds() -> None:
    """Regression: cvxpy's direct cones dropped y >= 0 on moreau (solution went negative)."""
    x = torch.tensor([[0.5, -1.0, 2.0, 0.1, 0.3]], dtype=torch.float64)
    y = lp_topk(x, 2, 1.0, backend="moreau")
    assert y.min() > -1e-9
    torch.testing.assert_close(y, capped_simplex(x - x.mean(), 2)[0], atol=1e-8, rtol=0)


def test_lp_birkhoff() -> None:
    x = torch.randn(3, 5, dtype=torch.float64)
    P = lp_birkhoff_sort(x, 0.5)
    one = torch.ones(3, 5, dtype=x.dtype)
    torch.testing.assert_close(P.sum(-1), one, atol=1e-8, rtol=0)
    torch.testing.assert_close(P.sum(-2), one, atol=1e-8, rtol=0)
    assert P.min() > -1e-9
    # the same QP on another backend
    torch.testing.assert_close(
        lp_birkhoff_sort(x, 0.5, backend="diffcp-clarabel"), P, atol=1e-4, rtol=0
    )
    d = distinct(2, 5)
    torch.testing.assert_close(lp_birkhoff_sort(d, 1e-3), perm_matrix(d), atol=1e-7, rtol=0)
    torch.testing.assert_close(LPBirkhoff(1e-3).topk(d, 2), topk_indicator(d, 2), atol=1e-7, rtol=0)
    assert torch.equal(lp_birkhoff_sort(d, 1.0, hard=True), perm_matrix(d))
    xg = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: lp_birkhoff_sort(v, 0.5), (xg,), atol=LP_ATOL)


def test_lp_layers_batch_dtype_and_cache() -> None:
    x = torch.randn(2, 3, 5)
    y = lp_topk(x, 2, 0.5)
    assert y.shape == (2, 3, 5) and y.dtype == torch.float32
    torch.testing.assert_close(y[1, 2], lp_topk(x[1, 2], 2, 0.5))  # unbatched call
    assert lp_birkhoff_sort(x, 0.5).shape == (2, 3, 5, 5)
    assert soft_rank(x, 0.5).shape == (2, 3, 5)
    misses = SL._qp_layer.cache_info().misses
    lp_topk(torch.randn(7, 5), 2, 0.1)
    lp_birkhoff_sort(torch.randn(4, 5), 2.0)
    assert SL._qp_layer.cache_info().misses == misses  # built once per (n, k), never per call
    P = lp_topk(torch.randn(1, 1), 1)  # n = 1
    assert P.shape == (1, 1) and P.item() == 1.0


def test_lp_ties_are_defined() -> None:
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    y = lp_topk(x, 2, 1e-3)
    torch.testing.assert_close(
        y, torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=x.dtype), atol=1e-7, rtol=0
    )
    y = lp_topk(x, 1, 1e-3)  # the tie splits the unit of mass
    torch.testing.assert_close(
        y, torch.tensor([[0.0, 0.5, 0.5, 0.0]], dtype=x.dtype), atol=1e-7, rtol=0
    )
    r = soft_rank(x, 1e-3)
    torch.testing.assert_close(
        r, torch.tensor([[2.0, 3.5, 3.5, 1.0]], dtype=x.dtype), atol=1e-7, rtol=0
    )
