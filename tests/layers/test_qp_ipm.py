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


@pytest.mark.parametrize(
    "case", ["dense", "equalities", "infeasible", "lp", "one element", "degenerate"]
)
def test_compiled_and_batched_solvers_agree(case, monkeypatch):
    """The per-element compiled loop (layers/_qp_kernel.py, the CPU path for inequality-only
    float64 problems) against the batched solver: the same solutions, duals, statuses; what
    the loop cannot solve (infeasible elements, LPs whose reduced matrix is singular) goes to
    the batched solver, so the statuses agree there too."""
    from layers import qp_ipm

    if qp_ipm._qp_kernel() is None:
        pytest.skip("numba is not installed")
    sizes = {"dense": (4, 30, 40, 0), "equalities": (5, 8, 6, 3), "one element": (1, 6, 5, 0)}
    Q, q, G, h, A, b = problem(*sizes.get(case, (4, 6, 8, 0)))
    if case == "infeasible":  # element 2: x0 <= -1 and -x0 <= -1
        G, h = G.clone(), h.clone()
        G[2, 0], h[2, 0] = torch.eye(6, dtype=torch.float64)[0], -1.0
        G[2, 1], h[2, 1] = -torch.eye(6, dtype=torch.float64)[0], -1.0
    if case == "lp":  # Q = 0 inside a box: the loop's reduced matrix may be singular
        Q = torch.zeros_like(Q)
        eye = torch.eye(6, dtype=torch.float64).expand(4, 6, 6)
        G, h = torch.cat([G, eye, -eye], -2), torch.cat([h, torch.full((4, 12), 3.0)], -1)
    if case == "degenerate":  # every constraint repeated: dependent active rows
        G, h = torch.cat([G, G], -2), torch.cat([h, h], -1)
    out = {}
    for compiled in (True, False):
        monkeypatch.setattr(qp_ipm, "use_compiled", compiled)
        out[compiled] = solve_qp(Q, q, G, h, A, b)
    a, c = out[True], out[False]
    assert a.info.status.tolist() == c.info.status.tolist()
    ok = c.info.status == SOLVED
    assert int(ok.sum()) == (3 if case == "infeasible" else len(ok))
    scale = 1 + c.x[ok].abs().max()
    assert torch.allclose(a.x[ok], c.x[ok], atol=1e-8 * scale, rtol=0)
    if case != "degenerate":  # repeated rows share their dual in any proportion
        assert torch.allclose(a.lam[ok], c.lam[ok], atol=1e-8 * (1 + c.lam[ok].abs().max()))


def test_compiled_solver_splits_the_batch_over_threads():
    """With two torch threads the compiled loop runs two halves of the batch in parallel
    threads: the same answer as one thread, element by element."""
    from layers import qp_ipm

    if qp_ipm._qp_kernel() is None:
        pytest.skip("numba is not installed")
    data = problem(B=7, n=12, m=9, p=0)
    w = torch.randn(7, 12, dtype=torch.float64)

    def grads() -> list[torch.Tensor]:  # the backward's compiled loop splits the same way
        inputs = [t.clone().requires_grad_() for t in data[:4]]
        none = (torch.zeros(7, 0, 12, dtype=torch.float64), torch.zeros(7, 0, dtype=torch.float64))
        x, lam, _, _ = solve_qp_differentiable(*inputs, *none, tol=1e-12, max_iter=60)
        ((x * w).sum() + lam.sum()).backward()
        return [t.grad for t in inputs]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, g_one = solve_qp(*data), grads()
        torch.set_num_threads(2)
        two, g_two = solve_qp(*data), grads()
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.x, two.x) and torch.equal(one.lam, two.lam)
    assert two.info.status_names == ["solved"] * 7
    assert all(torch.equal(a, b) for a, b in zip(g_one, g_two))


def _adjoint_both_ways(monkeypatch, Q, q, G, h, gx, glam):
    """``_kkt_adjoint`` at the solution of ``(Q, q, G, h)`` by the compiled loop and by the
    batched code (the same forward solution for both)."""
    from layers import qp_ipm

    B, n = q.shape
    sol = solve_qp(Q, q, G, h)
    A, nu, gnu = Q.new_zeros(B, 0, n), Q.new_zeros(B, 0), Q.new_zeros(B, 0)
    out = {}
    for compiled in (True, False):
        monkeypatch.setattr(qp_ipm, "use_compiled", compiled)
        Qs = 0.5 * (Q + Q.mT)
        out[compiled] = qp_ipm._kkt_adjoint(
            Qs, G, A, sol.x, sol.lam, sol.slack, nu, gx, glam, gnu, nullspace=sol._nullspace
        )
    return out


@pytest.mark.parametrize("case", ["dense", "one element", "many active", "lp"])
def test_compiled_and_batched_adjoints_agree(case, monkeypatch):
    """The backward's per-element compiled loop (``_qp_kernel.adjoint_batch``, with the
    gradients ``dQ`` and ``dG`` it writes) against the batched adjoint, for every input."""
    from layers import qp_ipm

    if qp_ipm._qp_kernel() is None:
        pytest.skip("numba is not installed")
    sizes = {"dense": (4, 30, 40), "one element": (1, 6, 5), "many active": (3, 8, 24)}
    B, n, m = sizes.get(case, (3, 6, 8))
    Q, q, G, h, _, _ = problem(B, n, m, 0, seed=5)
    if case == "many active":  # a large linear cost pushes against most constraints
        q = 30 * q
    if case == "lp":
        Q = torch.zeros_like(Q)
        eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
        G, h = torch.cat([G, eye, -eye], -2), torch.cat([h, torch.full((B, 2 * n), 3.0)], -1)
    g = torch.Generator().manual_seed(1)
    gx = torch.randn(B, n, generator=g, dtype=torch.float64)
    glam = torch.randn(B, G.shape[1], generator=g, dtype=torch.float64)
    out = _adjoint_both_ways(monkeypatch, Q, q, G, h, gx, glam)
    for name, a, c in zip(["Q", "q", "G", "h", "A", "b"], out[True], out[False]):
        assert a.shape == c.shape, name
        scale = 1 + c.abs().amax() if c.numel() else 1
        assert torch.allclose(a, c, atol=1e-9 * scale, rtol=0), (name, (a - c).abs().max())


def test_compiled_adjoint_leaves_an_indefinite_reduced_matrix_to_the_batched_code(monkeypatch):
    """Where the reduced matrix of an element has no Cholesky factor (here ``Q`` indefinite,
    as a caller of ``_kkt_adjoint`` might pass), the compiled loop declines and the batched
    adjoint (which falls back to LU) gives the answer."""
    from layers import qp_ipm

    if qp_ipm._qp_kernel() is None:
        pytest.skip("numba is not installed")
    Q, q, G, h, _, _ = problem(2, 5, 3, 0, seed=6)
    sol = solve_qp(Q, q, G, h)
    bad = -10 * torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    args = (G, Q.new_zeros(2, 0, 5), sol.x, sol.lam, sol.slack, Q.new_zeros(2, 0))
    grads = (torch.ones(2, 5, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
    assert qp_ipm._compiled_adjoint(bad, *args[:1], args[1], *args[2:5], *grads, 3, None) is None
    monkeypatch.setattr(qp_ipm, "use_compiled", False)
    ref = qp_ipm._kkt_adjoint(bad, *args, *grads, Q.new_zeros(2, 0))
    monkeypatch.setattr(qp_ipm, "use_compiled", True)
    got = qp_ipm._kkt_adjoint(bad, *args, *grads, Q.new_zeros(2, 0))
    for a, c in zip(got, ref):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_psd_check_agrees_with_torch(dtype, monkeypatch):
    """The layer's PSD check by the compiled loop and by torch's batched Cholesky: the same
    verdict for PSD, semidefinite-singular and indefinite elements, batched and not."""
    from layers import qp_ipm
    from layers.qp_problem import check_psd_matrix

    if qp_ipm._qp_kernel() is None:
        pytest.skip("numba is not installed")
    Q = problem(4, 6, 2, 0)[0].to(dtype)
    Q[1] = Q[1] - 1.5 * torch.linalg.eigvalsh(Q[1].double())[-1].to(dtype) * torch.eye(6)
    Q[2] = torch.ones(6, 6, dtype=dtype)  # rank one, PSD: passes
    Q[3] = Q[3].triu()  # not symmetric; its symmetric part is checked
    verdicts = {}
    for compiled in (True, False):
        monkeypatch.setattr(qp_ipm, "use_compiled", compiled)
        for batch in (Q, Q[2], Q[1]):
            try:
                check_psd_matrix(batch)
                verdicts[compiled, batch.dim(), float(batch.sum())] = "ok"
            except ValueError as err:
                verdicts[compiled, batch.dim(), float(batch.sum())] = str(err)
    for key, verdict in verdicts.items():
        if key[0]:
            assert verdict == verdicts[(False, *key[1:])]
    assert "batch elements [1]" in verdicts[True, 3, float(Q.sum())]
    assert "not positive semidefinite" in verdicts[True, 2, float(Q[1].sum())]
    assert verdicts[True, 2, float(Q[2].sum())] == "ok"
