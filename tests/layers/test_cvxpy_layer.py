"""layers/cvxpy_layer.py: CvxpyProblemLayer (a CVXPY problem as a layer) on every backend, and
each solver's quirks (moreau's direct cones, Clarabel's status, the QP interface)."""

from __future__ import annotations

import importlib.util

import cvxpy as cp
import pytest
import torch

from layers import BACKENDS, CvxpyProblemLayer, SolverError

HAS_MOREAU = importlib.util.find_spec("moreau") is not None
needs_moreau = pytest.mark.skipif(not HAS_MOREAU, reason="moreau not installed")
CVXPY_BACKENDS = [b for b, v in BACKENDS.items() if v.kind == "cvxpylayers" and v.needs != "moreau"]
CVXPY_BACKENDS += ["moreau"] if HAS_MOREAU else []


def _projection(n: int = 4):
    """Euclidean projection onto {x >= 0}: a constraint on the variable alone."""
    x, y = cp.Variable(n), cp.Parameter(n)
    return cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0]), x, y


@needs_moreau
def test_moreau_keeps_constraints_on_variables():
    """Regression: cvxpy >= 1.9 turns ``x >= 0`` into a moreau "direct cone", which cvxpylayers
    1.2 dropped (the layer returned y itself). It must return max(y, 0)."""
    prob, x, y = _projection()
    layer = CvxpyProblemLayer(prob, [y], [x], backend="moreau")
    yy = torch.tensor([[1.5, -0.3, -2.2, 0.7], [-1.0, 0.4, 0.2, -0.1]], dtype=torch.float64)
    yy.requires_grad_()
    (xx,) = layer(yy)
    assert (xx >= -1e-8).all()
    assert torch.allclose(xx, yy.detach().clamp(min=0), atol=1e-7)
    xx.sum().backward()
    pos = yy.detach() > 0
    assert torch.allclose(yy.grad[pos], torch.ones_like(yy.grad[pos]), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch-ipm", *CVXPY_BACKENDS])
def test_problem_layer_backends_agree(backend):
    n = 4
    x, y = cp.Variable(n), cp.Parameter(n)
    G, h = cp.Parameter((2, n)), cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0, cp.sum(x) == 1, G @ x <= h])
    g = torch.Generator().manual_seed(0)
    yy = torch.randn(3, n, dtype=torch.float64, generator=g)
    GG = torch.randn(2, n, dtype=torch.float64, generator=g)
    hh = torch.rand(2, dtype=torch.float64, generator=g) + 1

    def run(name):
        layer = CvxpyProblemLayer(prob, [y, G, h], [x], backend=name)
        ps = [t.clone().requires_grad_() for t in (yy, GG, hh)]
        (out,) = layer(*ps)
        (out * torch.arange(1.0, n + 1, dtype=torch.float64)).sum().backward()
        return out.detach(), [p.grad for p in ps]

    x_ref, g_ref = run("diffcp-clarabel")
    x_b, g_b = run(backend)
    assert torch.allclose(x_b, x_ref, atol=1e-5)
    assert torch.allclose(x_b.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-6)
    for a, b in zip(g_b, g_ref):
        assert torch.allclose(a, b, atol=1e-4)


def test_problem_layer_dtype_and_no_grad():
    prob, x, y = _projection()
    layer = CvxpyProblemLayer(prob, [y], [x], backend="diffcp-clarabel")
    yy = torch.randn(2, 4)
    with torch.no_grad():  # diffcp would reject ``mode`` here
        (xx,) = layer(yy)
    assert xx.dtype == torch.float32 and torch.allclose(xx, yy.clamp(min=0), atol=1e-5)


def test_torch_ipm_layer_rejects_non_qp_cones():
    x, y = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.norm(x - y, 2)), [x >= 0])
    with pytest.raises(ValueError, match="canonicalize to an LP/QP"):
        CvxpyProblemLayer(prob, [y], [x], backend="torch-ipm")


@pytest.mark.parametrize(
    "backend", ["torch-ipm", "diffcp-clarabel"] + (["moreau"] if HAS_MOREAU else [])
)
def test_problem_layer_infeasible_raises(backend):
    x, lo = cp.Variable(2), cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= lo, x <= 1])
    layer = CvxpyProblemLayer(prob, [lo], [x], backend=backend)
    lo_val = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)  # element 1 infeasible
    with pytest.raises(SolverError):
        layer(lo_val)


def test_not_dpp_is_rejected():
    x, a = cp.Variable(2), cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) * a[0] * a[1]), [x >= 0])
    with pytest.raises(ValueError, match="not DPP"):
        CvxpyProblemLayer(prob, [a], [x])
