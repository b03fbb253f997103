"""layers/qp.py: the OptNet QP layer and its backends (the solver itself: test_qp_ipm.py).

Checks: closed forms (unconstrained, equality-only, box projection), a high-accuracy reference
(Clarabel's active set + exact KKT solves, tasks/backends/reference.py), float64 gradcheck per
backend, pairwise agreement of every backend on x, duals and all six gradients, KKT residuals,
broadcasting and dtypes, and the error paths.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools

import pytest
import torch

from layers import BACKENDS, OptNetQP, SolverError, kkt_residuals, qp
from tasks.backends.reference import random_qp, reference

HAS_QPTH = importlib.util.find_spec("qpth") is not None
HAS_PROXSUITE = importlib.util.find_spec("proxsuite") is not None
HAS_MOREAU = importlib.util.find_spec("moreau") is not None
needs_qpth = pytest.mark.skipif(not HAS_QPTH, reason="qpth not installed (optional peer)")
needs_proxsuite = pytest.mark.skipif(
    not HAS_PROXSUITE, reason="proxsuite not installed (optional peer)"
)
PEER_MARKS = {"qpth": needs_qpth, "proxsuite": needs_proxsuite}
# the peers return their duals detached (qpth's carry no gradient; proxsuite's QPLayer's
# gradients through its duals disagree with finite differences)
DETACHED_DUALS = {"qpth", "proxsuite"}

ALL = [
    pytest.param(b, marks=PEER_MARKS[b]) if b in PEER_MARKS else b
    for b in BACKENDS
    if b != "moreau" or HAS_MOREAU
]
NAMES = [
    b
    for b in BACKENDS
    if (b != "qpth" or HAS_QPTH)
    and (b != "proxsuite" or HAS_PROXSUITE)
    and (b != "moreau" or HAS_MOREAU)
]


def problem(B=3, n=5, m=4, p=2, seed=0):
    d = random_qp(B, n, m, p, seed=seed)
    return [d[k] for k in ("Q", "q", "G", "h", "A", "b")]


def rel(a, b):
    return float((a - b).norm() / max(float(a.norm()), float(b.norm()), 1e-12))


# ------------------------------------------------------------------------------------------------
# The solver


def test_gradients_match_active_set_reference():
    data = problem(B=6, n=8, m=6, p=3, seed=1)
    gx = torch.randn(6, 8, dtype=torch.float64)
    ref = reference(dict(zip("Q q G h A b".split(), data)), gx)
    ps = [t.clone().requires_grad_() for t in data]
    (qp(*ps) * gx).sum().backward()
    for k, t in zip("Q q G h A b".split(), ps):
        assert rel(t.grad, ref.grads[k]) < 1e-7, k


def test_unconstrained_closed_form():
    Q, q = problem()[:2]
    x = qp(Q, q)
    assert torch.allclose(x, -torch.linalg.solve(Q, q.unsqueeze(-1)).squeeze(-1), atol=1e-10)


def test_equality_only_closed_form():
    Q, q, _, _, A, b = problem()
    x, lam, nu = qp(Q, q, A=A, b=b, duals=True)
    n, p = 5, 2
    K = torch.cat([torch.cat([Q, A.mT], -1), torch.cat([A, torch.zeros(3, p, p).double()], -1)], -2)
    sol = torch.linalg.solve(K, torch.cat([-q, b], -1).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(x, sol[:, :n], atol=1e-10) and torch.allclose(nu, sol[:, n:], atol=1e-9)
    assert lam.shape == (3, 0)


@pytest.mark.parametrize("backend", ALL)
def test_box_projection(backend):
    """min 1/2|x - y|^2 s.t. -1 <= x <= 1 is clamp(y, -1, 1); d x / d y is the indicator."""
    y = torch.tensor([[-2.0, -0.5, 0.3, 1.7], [0.2, 3.0, -0.9, -4.0]], dtype=torch.float64)
    y.requires_grad_()
    eye = torch.eye(4, dtype=torch.float64)
    G, h = torch.cat([eye, -eye]), torch.ones(8, dtype=torch.float64)
    x = qp(eye, -y, G, h, backend=backend)
    assert torch.allclose(x, y.detach().clamp(-1, 1), atol=1e-6)
    x.sum().backward()
    assert torch.allclose(y.grad, (y.detach().abs() < 1).double(), atol=1e-4)


@needs_qpth
def test_kkt_check_catches_a_wrong_answer():
    """qpth returns x = (0.03, 1, -0.3, 0) here, not clamp(y) = (0.1, 1, -0.9, 0), and reports
    nothing; the layer's KKT check refuses it."""
    y = torch.tensor([[0.1, 3.0, -0.9, 0.0]], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    G, h = torch.cat([eye, -eye]), torch.ones(8, dtype=torch.float64)
    x = qp(eye, -y, G, h, backend="qpth", check=False)
    if torch.allclose(x, y.clamp(-1, 1), atol=1e-6):
        pytest.skip("this qpth version solves the instance")
    with pytest.raises(SolverError, match=r"KKT check.*\[0\]"):
        qp(eye, -y, G, h, backend="qpth")


def test_inequality_only_and_lp_with_equalities():
    Q, q, G, h, _, _ = problem(B=4, n=6, m=8, p=2)
    x = qp(Q, q, G, h)
    assert (torch.einsum("bmn,bn->bm", G, x) <= h + 1e-9).all()
    # an LP (Q = 0) over a box with equalities: H is singular, the LU fallback handles it
    eye = torch.eye(6, dtype=torch.float64)
    Gb, hb = torch.cat([eye, -eye]), torch.full((12,), 10.0, dtype=torch.float64)
    Ab = torch.ones(1, 6, dtype=torch.float64)
    x = qp(
        torch.zeros(6, 6, dtype=torch.float64),
        q,
        Gb,
        hb,
        Ab,
        torch.ones(1, dtype=torch.float64),
        check_psd=False,
    )
    assert torch.allclose(x.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Gradcheck per backend (float64, tiny, mixed broadcasting)

# (eps, atol, rtol): the conic backends solve to ~1e-7 only, so their finite differences need a
# larger step and looser tolerances.
_GRADCHECK = {
    "torch-ipm": (1e-6, 1e-6, 1e-4),
    "qpth": (1e-6, 1e-5, 1e-3),
    "proxsuite": (1e-6, 1e-5, 1e-3),
    "moreau": (1e-5, 1e-4, 1e-2),
    "diffcp-clarabel": (1e-3, 2e-3, 1e-2),
    "diffcp-scs": (1e-3, 2e-3, 1e-2),
    "diffcp-ecos": (1e-3, 2e-3, 1e-2),
}


@pytest.mark.parametrize("backend", ALL)
def test_gradcheck(backend):
    Q, q, G, h, A, b = problem(B=2, n=3, m=2, p=1, seed=3)
    inputs = [Q[0], q, G[0], h, A[0], b]  # shared Q, G, A; batched q, h, b
    inputs = [t.clone().requires_grad_() for t in inputs]
    duals = backend not in DETACHED_DUALS

    def f(*a):
        out = qp(*a, backend=backend, duals=duals)
        return out if duals else (out,)

    eps, atol, rtol = _GRADCHECK[backend]
    assert torch.autograd.gradcheck(f, inputs, eps=eps, atol=atol, rtol=rtol, fast_mode=True)


# ------------------------------------------------------------------------------------------------
# Every pair of backends agrees


@pytest.fixture(scope="module")
def solutions():
    data = problem(B=4, n=5, m=4, p=2, seed=7)
    g = torch.Generator().manual_seed(0)
    gx, gl, gn = (torch.randn(4, k, dtype=torch.float64, generator=g) for k in (5, 4, 2))
    out = {}
    for be in NAMES:
        ps = [t.clone().requires_grad_() for t in data]
        x, lam, nu = qp(*ps, backend=be, duals=True)
        duals = be not in DETACHED_DUALS
        loss = (x * gx).sum() + ((lam * gl).sum() + (nu * gn).sum() if duals else 0)
        loss.backward()
        res = {"x": x.detach(), "lam": lam.detach(), "nu": nu.detach()}
        res.update({k: t.grad for k, t in zip("Q q G h A b".split(), ps)})
        if duals:  # gradients of the x-part alone, to compare with qpth and proxsuite
            ps = [t.clone().requires_grad_() for t in data]
            (qp(*ps, backend=be) * gx).sum().backward()
        res["x_only"] = [t.grad for t in ps]
        out[be] = res
    return data, out


@pytest.mark.parametrize("pair", list(itertools.combinations(NAMES, 2)), ids=lambda p: "-".join(p))
def test_backends_agree(solutions, pair):
    _, sol = solutions
    a, b = (sol[k] for k in pair)
    for k in ("x", "lam", "nu"):
        assert rel(a[k], b[k]) < 1e-5, k
    for ga, gb, k in zip(a["x_only"], b["x_only"], "Q q G h A b".split()):
        assert rel(ga, gb) < 1e-5, k
    if not DETACHED_DUALS & set(pair):  # gradients through the duals too
        for k in "Q q G h A b".split():
            assert rel(a[k], b[k]) < 1e-5, k


@pytest.mark.parametrize("backend", NAMES)
def test_kkt_residuals_at_solution(solutions, backend):
    data, sol = solutions
    s = sol[backend]
    pres, dres, comp = kkt_residuals(*data, s["x"], s["lam"], s["nu"])
    assert pres.max() < 1e-8 and dres.max() < 1e-5 and comp.max() < 1e-8


# ------------------------------------------------------------------------------------------------
# Shapes, dtypes, broadcasting


def test_unbatched_float32_roundtrip():
    Q, q, G, h, A, b = (t[0].float() for t in problem())
    x, lam, nu = qp(Q, q, G, h, A, b, duals=True)
    assert x.dtype == torch.float32 and x.shape == (5,) and lam.shape == (4,) and nu.shape == (2,)
    x64 = qp(*(t.double() for t in (Q, q, G, h, A, b)))
    assert torch.allclose(x.double(), x64, atol=1e-5)


def test_mixed_broadcasting_gradients_have_input_shapes():
    Q, q, G, h, A, b = problem()
    ins = [Q[0], q, G[0], h[0], A, b]
    ins = [t.clone().requires_grad_() for t in ins]
    qp(*ins).sum().backward()
    for t in ins:
        assert t.grad.shape == t.shape
    ps = [Q[0].expand(3, 5, 5), q, G[0].expand(3, 4, 5), h[0].expand(3, 4), A, b]
    ps = [t.clone().requires_grad_() for t in ps]
    qp(*ps).sum().backward()
    assert torch.allclose(ins[0].grad, ps[0].grad.sum(0), atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Bad input


def test_infeasible_element_is_named():
    Q, q, G, h, A, b = problem(B=3)
    h = h.clone()
    h[1] = -100.0  # G x <= -100 together with A x = b: element 1 infeasible
    G = G.clone()
    G[1] = torch.cat([torch.eye(4), torch.zeros(4, 1)], -1)
    h[1, :2] = torch.tensor([-1.0, -1.0])
    G[1, 2], h[1, 2] = -G[1, 0], -1.0  # x0 <= -1 and -x0 <= -1
    with pytest.raises(SolverError, match=r"\[1\].*infeasible") as err:
        qp(Q, q, G, h, A, b)
    assert err.value.failed == [1]


@pytest.mark.parametrize("backend", ["diffcp-clarabel"] + (["moreau"] if HAS_MOREAU else []))
def test_infeasible_element_is_named_by_other_backends(backend):
    Q, q, G, h, A, b = problem(B=3)
    G, h = G.clone(), h.clone()
    G[2, 0], h[2, 0] = torch.eye(5, dtype=torch.float64)[0], -1.0
    G[2, 1], h[2, 1] = -torch.eye(5, dtype=torch.float64)[0], -1.0  # x0 <= -1, x0 >= 1
    with pytest.raises(SolverError, match=r"\[2\]") as err:
        qp(Q, q, G, h, A, b, backend=backend)
    assert err.value.failed == [2]


def test_unbounded_element_is_named():
    Q = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)).expand(2, 2, 2)
    q = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)  # element 1: x1 -> inf
    with pytest.raises(SolverError, match=r"\[1\].*unbounded") as err:
        qp(Q, q)
    assert err.value.failed == [1]
    G = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)  # x0 >= -1 only bounds x0
    with pytest.raises(SolverError, match=r"\[1\].*unbounded"):
        qp(Q, q, G, torch.ones(1, dtype=torch.float64))


def test_inaccuracy_is_reported_not_returned():
    data = problem(B=3)
    with pytest.raises(SolverError, match="iteration limit"):
        qp(*data, solver_args={"max_iter": 2})
    with pytest.raises(SolverError, match="KKT check"):  # SCS at its own loose defaults
        qp(*data, backend="diffcp-scs", settings="defaults", check_tol=1e-11)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.__setitem__(0, -d[0]), "not positive semidefinite"),
        (lambda d: d[1].__setitem__((0, 0), float("nan")), "NaN"),
        (lambda d: d.__setitem__(1, d[1][:, :4]), "shape"),
        (lambda d: d.__setitem__(3, d[3][:2]), "batch sizes differ"),
        (lambda d: d.__setitem__(3, None), "give G and h together"),
        (lambda d: d.__setitem__(1, d[1].unsqueeze(0)), "dims"),
    ],
    ids=["not-psd", "nan", "shape", "batch", "G-without-h", "rank"],
)
def test_bad_input_one_line_errors(change, match):
    data = [t.clone() for t in problem()]
    change(data)
    with pytest.raises(ValueError, match=match) as err:
        qp(*data)
    assert "\n" not in str(err.value)


def test_unknown_and_missing_backends(monkeypatch):
    with pytest.raises(ValueError, match="choose one of torch-ipm"):
        qp(*problem(), backend="gurobi")
    fake = dataclasses.replace(BACKENDS["qpth"], needs="optlayers_no_such_package")
    monkeypatch.setitem(BACKENDS, "qpth", fake)
    with pytest.raises(ImportError, match="needs the package 'optlayers_no_such_package'"):
        qp(*problem(), backend="qpth")


def test_no_grad_evaluation_with_diffcp():
    data = problem()
    with torch.no_grad():
        x = qp(*[t.requires_grad_() for t in data], backend="diffcp-clarabel")
    assert not x.requires_grad


# ------------------------------------------------------------------------------------------------
# OptNetQP


def test_optnet_module_is_always_feasible_and_trains():
    torch.manual_seed(0)
    layer = OptNetQP(6, 4, 2).double()
    for p in layer.parameters():  # any parameters: z0 stays feasible
        p.data.normal_()
    d = layer.qp_data(torch.randn(3, 6, dtype=torch.float64))
    z0 = layer.z0
    assert (d["G"] @ z0 <= d["h"] + 1e-12).all() and torch.allclose(d["A"] @ z0, d["b"])
    x = layer(torch.randn(3, 6, dtype=torch.float64))
    assert x.shape == (3, 6)
    x.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_optnet_module_inputs_and_errors():
    layer = OptNetQP(4, 3, 0, inputs=("q", "G"), duals=True)
    q, G = torch.randn(2, 4), torch.randn(2, 3, 4)
    x, lam, nu = layer(q, G=G)
    assert x.shape == (2, 4) and x.dtype == torch.float32 and lam.shape == (2, 3)
    assert nu.shape == (2, 0)
    assert "inputs=('q', 'G')" in repr(layer)
    with pytest.raises(TypeError, match="missing inputs"):
        layer(q)
    with pytest.raises(ValueError, match="inputs must be distinct names"):
        OptNetQP(4, 3, inputs=("Q",))
    with pytest.raises(ValueError, match="exclude"):
        OptNetQP(4, 0, inputs=("q", "h"))
    with pytest.raises(ValueError, match="eps"):
        OptNetQP(4, 3, eps=0.0)
    with pytest.raises(ValueError, match=r"m must be an integer >= 0, got -1"):
        OptNetQP(4, -1)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        OptNetQP(0, 2)
