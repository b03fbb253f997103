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


# ---- issue #22: defects B1-B6, the drop-in arguments, backend "auto" ----------------------


@pytest.mark.parametrize("backend", ["torch-ipm", "qpth"])
def test_b1_second_backward_through_one_forward(backend):
    """B1: the QP interface freed its graph after one backward (gradcheck, jacobian and
    retain_graph=True broke)."""
    pytest.importorskip(BACKENDS[backend].needs)
    b, y = cp.Parameter(3), cp.Variable(3)
    layer = CvxpyProblemLayer(
        cp.Problem(cp.Minimize(cp.sum_squares(y)), [y == b]), [b], [y], backend=backend
    )
    bt = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    (out,) = layer(bt)
    (g0,) = torch.autograd.grad(out[0], bt, retain_graph=True)
    (g1,) = torch.autograd.grad(out[1], bt)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(g0, eye[0], atol=1e-6) and torch.allclose(g1, eye[1], atol=1e-6)
    J = torch.autograd.functional.jacobian(lambda t: layer(t)[0], bt.detach())
    assert torch.allclose(J, eye, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch-ipm", "qpth"])
def test_b2_problem_without_constraints(backend):
    """B2: a problem without constraints crashed in the QP interface's set-up."""
    pytest.importorskip(BACKENDS[backend].needs)
    x, q = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x))
    layer = CvxpyProblemLayer(prob, [q], [x], backend=backend)
    qt = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.float64)
    qt.requires_grad_()
    (xx,) = layer(qt)
    assert torch.allclose(xx, -qt.detach(), atol=1e-8)
    xx.sum().backward()
    assert torch.allclose(qt.grad, -torch.ones_like(qt), atol=1e-6)


def test_b3_clarabel_gradient_of_an_equality():
    """B3: with dense derivatives and unreachable tolerances, the Jacobian of x = b was off
    by 1e-4; it must be the identity."""
    n = 10
    torch.manual_seed(243)
    b = torch.randn(n, dtype=torch.float64)
    x, bp = cp.Variable(n), cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x == bp])
    layer = CvxpyProblemLayer(prob, [bp], [x], backend="diffcp-clarabel")
    J = torch.autograd.functional.jacobian(lambda t: layer(t)[0], b)
    assert (J - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-6


def _lml_layer(backend):
    x, y = cp.Parameter(4), cp.Variable(4)
    obj = -x @ y - cp.sum(cp.entr(y)) - cp.sum(cp.entr(1.0 - y))
    prob = cp.Problem(cp.Minimize(obj), [cp.sum(y) == 2])
    return CvxpyProblemLayer(prob, [x], [y], backend=backend)


def test_b4_clarabel_inaccurate_status_is_retried():
    """B4: Clarabel's "Optimal Inaccurate" passed silently (y[1] - y[2] was 4e-7, exactly 0)."""
    layer = _lml_layer("diffcp-clarabel")
    (y,) = layer(torch.tensor([1.0, -1.0, -1.0, -0.999999], dtype=torch.float64))
    assert abs(float(y[1] - y[2])) < 1e-9
    assert abs(float(y.sum()) - 2) < 1e-9


def test_b4_clarabel_inaccurate_status_raises_when_retries_fail(monkeypatch):
    """When every retry stops short too, SolverError names the status."""
    import diffcp.cone_program as dcp

    inner = dcp.solve_internal

    def always_inaccurate(*args, **kwargs):
        result = inner(*args, **kwargs)
        result["info"]["status"] = "Optimal Inaccurate"
        return result

    monkeypatch.setattr(dcp, "solve_internal", always_inaccurate)
    layer = _lml_layer("diffcp-clarabel")
    with pytest.raises(SolverError, match="Optimal Inaccurate"):
        layer(torch.tensor([1.0, -1.0, -1.0, -0.5], dtype=torch.float64))


@needs_moreau
def test_b5_moreau_outputs_need_no_grad_without_inputs_that_do():
    prob, x, y = _projection(2)
    layer = CvxpyProblemLayer(prob, [y], [x], backend="moreau")
    (out,) = layer(torch.ones(2))
    assert not out.requires_grad
    out.numpy()
    (out,) = layer(torch.ones(2, requires_grad=True))
    assert out.requires_grad


@pytest.mark.parametrize("backend", ["diffcp-scs", "diffcp-clarabel"] + (["moreau"] * HAS_MOREAU))
def test_b6_sdp(backend):
    """B6: moreau received no PSD cone dimensions ("Cone dimensions must sum to ...")."""
    n = 3
    X, C = cp.Variable((n, n), symmetric=True), cp.Parameter((n, n), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X)), [X >> 0, cp.trace(X) == 1])
    layer = CvxpyProblemLayer(prob, [C], [X], backend=backend)
    C_t = torch.tensor([[2.0, 0.5, 0.1], [0.5, 3.0, 0.2], [0.1, 0.2, 1.5]], dtype=torch.float64)
    (Xs,) = layer(C_t)
    _, V = torch.linalg.eigh(C_t)  # the answer: the projector on C's smallest eigenvector
    assert torch.allclose(Xs, torch.outer(V[:, 0], V[:, 0]), atol=1e-5)


def test_cones_a_backend_cannot_take_are_refused_naming_those_that_can():
    x, y = cp.Variable(3), cp.Parameter(3)
    exp_prob = cp.Problem(cp.Minimize(cp.sum(cp.exp(x - y))), [x >= 0])
    with pytest.raises(ValueError, match=r"cannot take exponential cones.*diffcp-scs"):
        CvxpyProblemLayer(exp_prob, [y], [x], backend="qpth")
    t = cp.Variable()
    pow_cone = cp.constraints.PowCone3D(x[0] + 1, x[1] + 1, t, 0.3)
    p3 = cp.Problem(cp.Minimize(cp.sum_squares(x - y) - t), [pow_cone])
    for backend in ("diffcp-clarabel", "diffcp-scs"):
        with pytest.raises(ValueError, match=f"'{backend}' cannot take power cones"):
            CvxpyProblemLayer(p3, [y], [x], backend=backend)
    Q, q = cp.Parameter((3, 3), PSD=True), cp.Parameter(3)
    qf = cp.Problem(cp.Minimize(cp.quad_form(x, Q) + q @ x), [x >= 0])
    with pytest.raises(ValueError, match=r"parametrized quad_form .*; use one of torch-ipm"):
        CvxpyProblemLayer(qf, [Q, q], [x], backend="diffcp-scs")


def test_auto_backend_rule():
    from layers.cvxpy_layer import choose_backend

    x, y = cp.Variable(3), cp.Parameter(3)
    qp_ = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0])
    lp = cp.Problem(cp.Minimize(y @ x), [x >= 0, x <= 1])
    soc = cp.Problem(cp.Minimize(cp.norm(x - y, 2)), [x >= 0])
    expo = cp.Problem(cp.Minimize(cp.sum(cp.exp(x - y))), [x >= 0])
    Q = cp.Parameter((3, 3), PSD=True)
    qf = cp.Problem(cp.Minimize(cp.quad_form(x, Q) + y @ x), [x >= 0])
    assert choose_backend(qp_) == choose_backend(lp) == choose_backend(qf) == "torch-ipm"
    assert choose_backend(soc) == choose_backend(expo) == "diffcp-scs"
    if HAS_MOREAU:
        qf_soc = cp.Problem(cp.Minimize(cp.quad_form(x, Q) + y @ x), [cp.norm(x, 2) <= 1])
        assert choose_backend(qf_soc) == "moreau"
        t = cp.Variable()
        pow_cone = cp.constraints.PowCone3D(x[0] + 1, x[1] + 1, t, 0.3)
        power = cp.Problem(cp.Minimize(cp.sum_squares(x - y) - t), [pow_cone])
        assert choose_backend(power) == "moreau"
        big = cp.Variable(2500)
        assert choose_backend(cp.Problem(cp.Minimize(cp.sum_squares(big) + y[0] * big[0]))) == (
            "moreau"
        )
    layer = CvxpyProblemLayer(qp_, [y], [x])  # the default is "auto"; the choice is reported
    assert layer.backend.name == "torch-ipm"
    (out,) = layer(torch.tensor([1.0, -1.0, 0.5]))
    assert torch.allclose(out, torch.tensor([1.0, 0.0, 0.5]), atol=1e-6)


def test_cvxpylayers_arguments():
    """solver= names map to backends; gp= and per-call solver_args= are taken; bad input
    raises ValueError/TypeError (not SolverError)."""
    prob, x, y = _projection(3)
    assert CvxpyProblemLayer(prob, [y], [x], solver="ECOS").backend.name == "diffcp-ecos"
    assert CvxpyProblemLayer(prob, [y], [x], solver="SCS").backend.name == "diffcp-scs"
    assert CvxpyProblemLayer(prob, [y], [x], "diffcp-scs").backend.name == "diffcp-scs"
    with pytest.raises(ValueError, match="unknown solver 'GUROBI'"):
        CvxpyProblemLayer(prob, [y], [x], solver="GUROBI")
    with pytest.raises(ValueError, match="disagree"):
        CvxpyProblemLayer(prob, [y], [x], solver="SCS", backend="torch-ipm")
    layer = CvxpyProblemLayer(prob, [y], [x], solver="CLARABEL")
    assert layer.backend.name == "diffcp-clarabel"
    with pytest.raises(ValueError, match="Invalid parameter shape"):
        layer(torch.ones(4))
    with pytest.raises(ValueError, match="A tensor must be provided"):
        layer()
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        layer([1.0, 2.0, 3.0])
    with pytest.raises(SolverError):  # one iteration: Clarabel stops at its limit
        layer(torch.tensor([1.0, -1.0, 2.0]), solver_args={"max_iters": 1})
    with pytest.warns(UserWarning, match=r"\['acceleration_lookback'\] do not apply"):
        (out,) = layer(torch.tensor([1.0, -1.0, 2.0]), solver_args={"acceleration_lookback": 0})
    assert torch.allclose(out, torch.tensor([1.0, 0.0, 2.0]), atol=1e-6)
