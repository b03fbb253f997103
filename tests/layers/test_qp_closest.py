"""``infeasible="closest"`` of the QP layer: infeasible elements are solved as their closest
feasible (elastic) problem, feasible ones exactly as before, with gradients checked."""

import importlib.util

import pytest
import torch

from layers import OptNetQP, SolverError, qp

F64 = torch.float64


def box_batch(seed: int = 0):
    """Two elements with ``|x_i| <= 1``; element 1 adds ``x0 <= -2`` and ``x0 >= 2``
    (infeasible), element 0 the feasible ``|x0| <= 0.5``."""
    g = torch.Generator().manual_seed(seed)
    n = 3
    Q = torch.eye(n, dtype=F64).expand(2, n, n).clone()
    q = torch.randn(2, n, dtype=F64, generator=g)
    eye = torch.eye(n, dtype=F64)
    row = torch.zeros(2, n, dtype=F64)
    row[0, 0], row[1, 0] = 1.0, -1.0
    G = torch.cat([eye, -eye, row]).expand(2, 8, n).clone()
    h = torch.ones(2, 8, dtype=F64)
    h[0, 6:] = 0.5
    h[1, 6:] = -2.0
    return Q, q, G, h


def test_raise_is_the_default():
    with pytest.raises(SolverError) as err:
        qp(*box_batch())
    assert err.value.failed == [1]


def test_closest_mixed_batch():
    Q, q, G, h = box_batch()
    x, lam, nu, info = qp(Q, q, G, h, infeasible="closest", duals=True, info=True)
    assert info.relaxed.tolist() == [False, True]
    # the feasible element: exactly the solution with "raise"
    x0 = qp(Q[:1], q[:1], G[:1], h[:1])
    assert torch.allclose(x[0], x0[0], atol=1e-10)
    # the infeasible one: x0 = 0 balances the two violated rows; x1, x2 = clamp(-q, -1, 1)
    assert abs(float(x[1, 0])) < 1e-5
    assert torch.allclose(x[1, 1:], (-q[1, 1:]).clamp(-1, 1), atol=1e-5)
    # the duals satisfy stationarity of the original problem: Qx + q + G'lam = 0, lam >= 0
    stat = (Q @ x.unsqueeze(-1)).squeeze(-1) + q + (G.mT @ lam.unsqueeze(-1)).squeeze(-1)
    assert stat.abs().max() < 1e-6 and (lam > -1e-9).all() and nu.shape == (2, 0)


def test_closest_equalities_tend_to_the_least_squares_limit():
    """Inconsistent equalities sum(x) = 0 and sum(x) = 1: as the weight grows the solution
    tends to min 1/2|x|^2 + q'x over the least-squares points sum(x) = 1/2."""
    g = torch.Generator().manual_seed(1)
    n = 3
    Q = torch.eye(n, dtype=F64)
    q = torch.randn(n, dtype=F64, generator=g)
    A = torch.ones(2, n, dtype=F64)
    b = torch.tensor([0.0, 1.0], dtype=F64)
    limit = -q + (0.5 + q.sum()) / n
    errs = []
    for w in (1e2, 1e4, 1e6):
        x, info = qp(Q, q, None, None, A, b, infeasible="closest", closest_weight=w, info=True)
        assert bool(info.relaxed)
        errs.append(float((x - limit).abs().max()))
    assert errs[2] < 1e-5 and errs[0] > errs[1] > errs[2]


def test_closest_gradcheck_mixed_batch():
    Q, q, G, h = box_batch(seed=2)
    inputs = [t.clone().requires_grad_() for t in (Q, q, G, h)]

    def f(Q, q, G, h):
        return qp(Q, q, G, h, infeasible="closest", closest_weight=1e2, duals=True)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_closest_gradcheck_equalities():
    """Four random equalities in three variables: inconsistent, and still so after any small
    change of the data (rank-deficient rows would turn feasible under perturbation)."""
    g = torch.Generator().manual_seed(3)
    n = 3
    Q = torch.eye(n, dtype=F64)
    q = torch.randn(n, dtype=F64, generator=g)
    A = torch.randn(4, n, dtype=F64, generator=g)
    b = torch.randn(4, dtype=F64, generator=g)
    G = torch.cat([torch.eye(n), -torch.eye(n)]).to(F64)
    h = 2 * torch.ones(2 * n, dtype=F64)
    _, info = qp(Q, q, G, h, A, b, infeasible="closest", info=True)
    assert bool(info.relaxed)
    inputs = [t.clone().requires_grad_() for t in (q, A, b, h)]

    def f(q, A, b, h):
        return qp(Q, q, G, h, A, b, infeasible="closest", closest_weight=1e2, duals=True)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("proxsuite") is None, reason="proxsuite missing")
def test_closest_agrees_with_proxsuite_closest_feasible_qp():
    """proxsuite's QPLayer solves the closest feasible QP of an infeasible element; ours tends
    to it as the weight grows."""
    from proxsuite.torch.qplayer import QPFunction

    Q, q, G, h = box_batch(seed=4)  # unit rows: both definitions measure the same violations
    x = qp(Q[1], q[1], G[1], h[1], infeasible="closest", closest_weight=1e8)
    lower = torch.full_like(h[1], -1e20)
    # its infeasible path takes an unbatched G and needs an equality: 0'x = 0
    A0, b0 = torch.zeros(1, 3, dtype=F64), torch.zeros(1, dtype=F64)
    px = QPFunction(structural_feasibility=False)(Q[1], q[1], A0, b0, G[1], lower, h[1])
    assert torch.allclose(x, px[0][0].to(F64), atol=1e-4)


def test_optnet_module_closest():
    torch.manual_seed(0)
    layer = OptNetQP(3, 2, inputs=("G", "h"), infeasible="closest", closest_weight=1e3).double()
    G = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]], dtype=F64).expand(2, 2, 3)
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=F64)  # element 1: x0 <= -1, x0 >= 1
    h.requires_grad_()
    x = layer(G, h)
    assert layer.last_relaxed.tolist() == [False, True]
    x.sum().backward()
    assert torch.isfinite(h.grad).all() and h.grad[1].abs().sum() > 0


def test_bad_policy_and_weight():
    Q, q, G, h = box_batch()
    with pytest.raises(ValueError, match="infeasible must be one of"):
        qp(Q, q, G, h, infeasible="nearest")
    with pytest.raises(ValueError, match="closest_weight"):
        qp(Q, q, G, h, infeasible="closest", closest_weight=0.0)
    with pytest.raises(ValueError, match="infeasible must be one of"):
        OptNetQP(3, 2, infeasible="skip")
