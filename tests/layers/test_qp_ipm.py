"""layers/qp_ipm.py: the batched interior-point solver (solve_qp), its info record, the KKT
residuals and the differentiable solve, against an independent reference solver."""

from __future__ import annotations

import pytest
import torch

from layers import kkt_residuals, qp, solve_qp
from layers.qp_ipm import INFEASIBLE, SOLVED, UNBOUNDED, solve_qp_differentiable
from tasks.backends.reference import random_qp, reference


def problem(B=3, n=5, m=4, p=2, seed=0):
    d = random_qp(B, n, m, p, seed=seed)
    return [d[k] for k in ("Q", "q", "G", "h", "A", "b")]


def test_solve_qp_matches_reference_and_reports_info():
    data = problem(B=6, n=8, m=6, p=3)
    gx = torch.randn(6, 8, dtype=torch.float64)
    ref = reference(dict(zip("Q q G h A b".split(), data)), gx)
    sol = solve_qp(*data)
    assert sol.info.status_names == ["solved"] * 6
    assert 1 <= sol.info.iterations <= 30
    assert (sol.info.primal_residual < 1e-10).all() and (sol.info.dual_residual < 1e-10).all()
    assert torch.allclose(sol.x, ref.x, atol=1e-9)
    assert (sol.lam >= 0).all() and (sol.slack >= 0).all()


def test_kkt_residuals_take_absent_constraints_as_none():
    torch.manual_seed(0)
    F = torch.randn(3, 4, 4, dtype=torch.float64)
    Q, q = F @ F.mT + torch.eye(4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    G, h = torch.randn(3, 2, 4, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    x = torch.linalg.solve(Q, -q)  # unconstrained optimum
    pres, dres, comp = kkt_residuals(Q, q, None, None, None, None, x, None, None)
    assert pres.max() == 0 and dres.max() < 1e-12 and comp.max() == 0
    x, lam = qp(Q, q, G, h, duals=True)[:2]
    res = torch.stack(kkt_residuals(Q, q, G, h, None, None, x, lam, None))
    assert res.max() < 1e-8
    assert torch.stack(kkt_residuals(Q, q, G, h, None, None, x + 1, lam, None)).max() > 1e-3


def test_solve_qp_flags_failures_without_raising():
    """Infeasible and unbounded elements are classified in ``info.status``; the solver does not
    raise (the layer does)."""
    Q = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)).expand(3, 2, 2)
    q = torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64).repeat(3, 1, 1)
    G[1, 2] = 0.0  # element 1: nothing bounds x1, whose cost is -x1
    h = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    sol = solve_qp(Q, q, G, h)
    assert int(sol.info.status[0]) == SOLVED
    assert int(sol.info.status[1]) == UNBOUNDED
    assert int(sol.info.status[2]) == INFEASIBLE  # x0 <= -1 and -x0 <= -1
    assert sol.info.failed() == [1, 2]


def test_solve_qp_differentiable_returns_the_info():
    data = [t.clone().requires_grad_() for t in problem(B=2, seed=3)]
    x, lam, nu, sol = solve_qp_differentiable(*data, tol=1e-12, max_iter=60)
    assert sol.info.status_names == ["solved"] * 2
    assert torch.equal(x.detach(), sol.x) and torch.equal(lam.detach(), sol.lam)
    (x.sum() + lam.sum() + nu.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in data)


@pytest.mark.parametrize("with_eq", [False, True])
def test_solve_qp_matches_the_layer(with_eq):
    data = problem(B=2, seed=4)
    if not with_eq:
        data[4] = data[5] = None
    torch.testing.assert_close(qp(*data), solve_qp(*data).x, rtol=0, atol=0)
